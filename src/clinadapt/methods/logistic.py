"""L2-regularised logistic regression on cached features: many problems and a C path at once.

The objective of each problem is scikit-learn's ``LogisticRegression(C=C)`` (lbfgs): the mean
cross-entropy over its training rows plus ``||W||^2 / (2 C n)``, the intercept unpenalised;
softmax over K >= 3 classes, the binomial form (one weight vector) for two.

Three things make a whole grid, with cross-validation, cost about one scikit-learn fit:

- the weights of an L2-regularised linear model lie in the span of its training features, so
  the features are reduced once to r = rank(X) <= min(n, D) coordinates (X = U S V^T, solve on
  U S, map back with V): exact, and small in the few-shot regime where n << D;
- the problems of a cross-validation (one per fold, plus the whole support set) are solved
  together, batched, by Newton's method with a backtracking line search (scipy's L-BFGS-B, as
  scikit-learn uses, when the Hessians would be too large);
- the C grid is walked from strong to weak regularisation, each C starting from the previous
  solution (the regularisation path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

# Newton when each Hessian has at most this many rows and forming them all costs at most this
# many products (few-shot problems); scipy's L-BFGS-B otherwise, where it is faster.
NEWTON_MAX_SIZE = 400
NEWTON_MAX_WORK = 5e7
LBFGS_TOL = 1e-5


@dataclass(frozen=True)
class LogisticFit:
    """Softmax heads of P problems over all classes: weight (P, D, K) and bias (P, K)."""

    weight: np.ndarray
    bias: np.ndarray
    iterations: int

    def logits(self, x: np.ndarray, problem: int = 0) -> np.ndarray:
        """(N, K) logits of problem ``problem`` for features ``x``."""
        return np.asarray(x, dtype=np.float64) @ self.weight[problem] + self.bias[problem]


def logistic_path(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cs: list[float],
    masks: np.ndarray | None = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-8,
) -> list[LogisticFit]:
    """One :class:`LogisticFit` per C, in the order given, for problems on rows ``masks``.

    ``masks`` is (P, n) boolean, the training rows of each problem (default: one problem on
    every row); each problem must see every class present in ``y``. Classes absent from ``y``
    get zero weights and a -1e4 bias (never predicted). ``tol`` bounds the largest gradient
    entry of each problem's objective at the solution.
    """
    x = np.asarray(x, dtype=np.float64)
    classes = np.unique(y)
    t = np.searchsorted(classes, y)
    masks = np.ones((1, len(y)), bool) if masks is None else np.asarray(masks, bool)
    binary = len(classes) == 2
    k = 1 if binary else len(classes)
    if len(x) < x.shape[1]:  # few-shot: solve in the span of the features
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        r = int((s > s.max(initial=0.0) * 1e-10).sum())
        coords, basis = u[:, :r] * s[:r], vt[:r].T
    else:
        coords, basis = x, None
    phi = np.hstack([coords, np.ones((len(x), 1))])
    a = phi.shape[1]
    work = masks.shape[0] * len(x) * (a * k) ** 2
    solve = _newton if a * k <= NEWTON_MAX_SIZE and work <= NEWTON_MAX_WORK else _lbfgs
    theta = np.zeros((masks.shape[0], a, k))
    fits = []
    for c in cs:
        theta, steps = solve(_Problems(phi, t, k, masks, float(c)), theta, max_iter, tol)
        w = theta[:, :-1] if basis is None else basis @ theta[:, :-1]
        fits.append(LogisticFit(*_full_head(w, theta[:, -1], classes, num_classes, binary), steps))
    return fits


def _full_head(
    w: np.ndarray, b: np.ndarray, classes: np.ndarray, num_classes: int, binary: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax heads over ``num_classes`` (binomial: softmax([0, z]) = sigmoid(z))."""
    if binary:
        w = np.concatenate([np.zeros_like(w), w], axis=2)
        b = np.concatenate([np.zeros_like(b), b], axis=1)
    p, d, _ = w.shape
    full_w = np.zeros((p, d, num_classes))
    full_b = np.full((p, num_classes), -1e4)
    full_w[:, :, classes] = w
    full_b[:, classes] = b
    return full_w, full_b


class _Problems:
    """P logistic problems on the rows of ``phi`` (last column 1): values, gradients, probs."""

    def __init__(self, phi: np.ndarray, t: np.ndarray, k: int, masks: np.ndarray, c: float) -> None:
        n_p = masks.sum(1).astype(np.float64)
        self.phi, self.t, self.k = phi, t, k  # (n, a), (n,) class positions, 1 if binomial
        self.weights = masks / n_p[:, None]  # (P, n): 1/n_p on each problem's rows, else 0
        self.lam = 1.0 / (c * n_p)  # (P,)
        self.target = t[:, None].astype(np.float64) if k == 1 else np.eye(k)[t]  # (n, k)

    @property
    def binary(self) -> bool:
        return self.k == 1

    def evaluate(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P,) objectives (mean loss + lam/2 ||theta without the intercepts||^2), (P, n, k) probs."""
        z = self.phi @ theta  # (P, n, k)
        if self.binary:
            loss = -log_expit((2.0 * self.t - 1.0) * z[..., 0])
            prob = expit(z)
        else:
            z = z - z.max(-1, keepdims=True)
            e = np.exp(z)
            total = e.sum(-1)
            loss = np.log(total) - (z * self.target).sum(-1)
            prob = e / total[..., None]
        penalty = 0.5 * self.lam * np.einsum("pak,pak->p", theta[:, :-1], theta[:, :-1])
        return (loss * self.weights).sum(1) + penalty, prob

    def value(self, theta: np.ndarray) -> np.ndarray:
        return self.evaluate(theta)[0]

    def gradient(self, theta: np.ndarray, prob: np.ndarray) -> np.ndarray:
        resid = (prob - self.target) * self.weights[..., None]
        grad = self.phi.T @ resid  # (P, a, k)
        grad[:, :-1] += self.lam[:, None, None] * theta[:, :-1]
        return grad


def _newton(
    prob_set: _Problems, theta: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """Batched Newton steps with a per-problem backtracking (Armijo) line search.

    Parameters are flattened class-major, (k, a): the Hessian of the mean cross-entropy is then
    blockdiag_k(Phi^T diag(w p_k) Phi) - M^T M with M[n, (k, a)] = sqrt(w_n) p_nk phi_na.
    """
    phi, k, binary = prob_set.phi, prob_set.k, prob_set.binary
    p, a = theta.shape[0], phi.shape[1]
    ridge = np.tile(np.r_[np.ones(a - 1), 0.0], k)  # no penalty on the intercepts
    # softmax leaves a common shift of the intercepts free: a tiny ridge keeps the solve regular
    ridge_all = prob_set.lam[:, None] * ridge + 1e-10
    steps = 0
    for steps in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        f0, prob = prob_set.evaluate(theta)
        grad = prob_set.gradient(theta, prob)
        if np.abs(grad).max() < tol:
            break
        w = prob_set.weights
        if binary:
            curv = prob[..., 0] * (1 - prob[..., 0]) * w
            hess = (phi.T * curv[:, None, :]) @ phi
        else:
            m = (np.sqrt(w)[..., None, None] * prob[..., None] * phi[None, :, None, :]).reshape(
                p, len(phi), k * a
            )
            hess = -(m.transpose(0, 2, 1) @ m)
            for j in range(k):
                block = (phi.T * (prob[..., j] * w)[:, None, :]) @ phi
                hess[:, j * a : (j + 1) * a, j * a : (j + 1) * a] += block
        idx = np.arange(a * k)
        hess[:, idx, idx] += ridge_all
        g = grad.transpose(0, 2, 1).reshape(p, k * a, 1)
        step = np.linalg.solve(hess, g).reshape(p, k, a).transpose(0, 2, 1)
        slope = (grad * step).sum((1, 2))
        size = np.ones(p)
        for _ in range(40):
            trial = theta - size[:, None, None] * step
            ok = prob_set.value(trial) <= f0 - 1e-4 * size * slope
            if ok.all():
                break
            size = np.where(ok, size, size / 2)
        theta = theta - size[:, None, None] * step
    return theta, steps


def _lbfgs(
    prob_set: _Problems, theta: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """The same problems by scipy's L-BFGS-B (as scikit-learn), for Hessians too large to form."""
    shape = theta.shape

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        th = flat.reshape(shape)
        value, prob = prob_set.evaluate(th)
        return float(value.sum()), prob_set.gradient(th, prob).ravel()

    res = minimize(
        fun,
        theta.ravel(),
        jac=True,
        method="L-BFGS-B",
        # a gradient of 1e-5 at most (scikit-learn stops at 1e-4): Newton's 1e-8 would cost
        # L-BFGS many more iterations than the probabilities need
        options={
            "maxiter": max(max_iter, 1000),
            "gtol": max(tol, LBFGS_TOL),
            "ftol": 64 * np.finfo(float).eps,
        },
    )
    return res.x.reshape(shape), int(res.nit)
