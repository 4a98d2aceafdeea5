"""Bootstrap CIs: the vectorised resamples against the loop they replace, side by side.

The loop (kept here as it was: one resample of positions at a time, the metrics recomputed on
it) and ``bootstrap_ci`` draw the same resamples for a seed, so both give the same intervals;
the script checks that, then times 1000 patient-level resamples of one test set of the built-in
data and of a larger one (the headline metrics the loop had: accuracy, balanced accuracy, AUROC;
and every headline metric, calibration included, which only the vectorised one computes by
default).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_bootstrap.py``
"""

from __future__ import annotations

import time

import numpy as np

from clinadapt.data.synthetic import make_clinical_shift
from clinadapt.evaluation.bootstrap import bootstrap_ci
from clinadapt.evaluation.metrics import accuracy, auroc, balanced_accuracy, compute_metrics
from clinadapt.evaluation.replicates import headline_names

OLD_METRICS = ("accuracy", "balanced_accuracy", "auroc")


def loop_bootstrap_ci(labels, probs, statistic, n_boot, alpha, seed, groups=None):
    """The loop as it was: positions per resample (patients together), the statistic on each."""
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    reps: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if members is None:
            idx = rng.integers(0, len(labels), len(labels))
        else:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[i] for i in pick])
        for k, v in statistic(labels[idx], probs[idx]).items():
            reps.setdefault(k, []).append(v)
    out = {}
    for k, vals in reps.items():
        v = np.asarray(vals, dtype=np.float64)
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[k] = {"low": float(lo), "high": float(hi), "n_boot": len(v)}
    return out


def old_headline(labels, probs):
    return {
        "accuracy": accuracy(labels, probs),
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "auroc": auroc(labels, probs),
    }


def all_headline(labels, probs):
    m = compute_metrics(labels, probs)
    return {k: m[k] for k in headline_names("multiclass", probs.shape[1])}


def best_of(fn, repeat: int = 3) -> tuple[float, float]:
    """The fastest of ``repeat`` calls: (wall seconds, CPU seconds of this process)."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def cell(loop: tuple[float, float], vec: tuple[float, float]) -> str:
    return (
        f"loop {loop[0]:.3f} s, vectorised {vec[0]:.3f} s: {loop[0] / vec[0]:.1f}x "
        f"(CPU time {loop[1] / vec[1]:.1f}x)"
    )


def predictions(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    p = np.exp(rng.normal(size=(len(labels), k)) + 1.5 * np.eye(k)[labels])
    return p / p.sum(1, keepdims=True)


def main() -> None:
    rng = np.random.default_rng(0)
    test = make_clinical_shift().where(split="test", domain="site-b")
    big = make_clinical_shift(patients_per_site=600).split("test")
    n_boot = 1000
    print(f"bootstrap CIs, {n_boot} patient-level resamples (best of 3; the same intervals)")
    for ds in (test, big):
        y, pid = ds.labels, ds.meta("patient_id")
        p = predictions(y, ds.num_classes, rng)
        args = (n_boot, 0.05, 0, pid)
        # the same intervals for the same seed
        loop = loop_bootstrap_ci(y, p, old_headline, *args)
        vec = bootstrap_ci(y, p, OLD_METRICS, *args)
        for k in OLD_METRICS:
            assert np.isclose(loop[k]["low"], vec[k]["low"], rtol=1e-9), k
            assert np.isclose(loop[k]["high"], vec[k]["high"], rtol=1e-9), k
        t_loop = best_of(lambda y=y, p=p, a=args: loop_bootstrap_ci(y, p, old_headline, *a))
        t_vec = best_of(lambda y=y, p=p, a=args: bootstrap_ci(y, p, OLD_METRICS, *a))
        t_loop_all = best_of(lambda y=y, p=p, a=args: loop_bootstrap_ci(y, p, all_headline, *a), 1)
        t_vec_all = best_of(lambda y=y, p=p, a=args: bootstrap_ci(y, p, None, *a))
        n_pat = len(set(pid.tolist()))
        print(f"  {len(y):5d} images, {n_pat:4d} patients")
        print(f"    accuracy, balanced accuracy, AUROC: {cell(t_loop, t_vec)}")
        print(
            f"    all {len(headline_names('multiclass', 4))} headline metrics: {cell(t_loop_all, t_vec_all)}"
        )


if __name__ == "__main__":
    main()
