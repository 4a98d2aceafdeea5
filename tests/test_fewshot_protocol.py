"""The K-shot promise: no step of a K-shot run sees more than K labelled images per class."""

import importlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from clinadapt.config import RunConfig
from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.errors import ConfigError, DataError
from clinadapt.fewshot_sweep import run_fewshot_sweep
from clinadapt.methods import METHODS, Context
from clinadapt.methods.budget import (
    KSHOT_VAL_MAX,
    labelled_budget,
    n_cv_folds,
    resolve_selection,
    stratified_folds,
)
from clinadapt.methods.frozen import FrozenFeatureMethod, LabelledFeatures
from clinadapt.methods.logistic import logistic_path
from clinadapt.methods.tip_adapter import alpha_beta_grid
from clinadapt.models import load_model
from clinadapt.runner import run_experiment

K = 2
# the module (its name is shadowed by the function in clinadapt.evaluation)
evaluate_module = importlib.import_module("clinadapt.evaluation.evaluate")


@pytest.fixture(scope="module")
def binary_npz(tmp_path_factory):
    """A PneumoniaMNIST-shaped file: 2 classes, 20 labelled training images per class."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in {"train": 40, "val": 20, "test": 20}.items():
        y = np.arange(n) % 2
        base = rng.integers(60, 120, (n, 28, 28))
        arrays[f"{split}_images"] = np.clip(base + 80 * y[:, None, None], 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = y.astype(np.uint8)[:, None]
    path = tmp_path_factory.mktemp("data") / "pneumoniamnist.npz"
    np.savez_compressed(path, **arrays)
    return str(path)


class Spy:
    """Counts, per class, the labelled images each step of a run is handed."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, np.ndarray]] = []
        original = evaluate_module.evaluate

        def evaluate(*args, val=None, **kwargs):
            if val is not None:  # the operating point's data
                self.calls.append(("operating point", np.bincount(np.asarray(val[0]))))
            return original(*args, val=val, **kwargs)

        monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
        self.monkeypatch = monkeypatch

    def fit(self, cls) -> None:
        original = cls.fit

        def fit(method, model, train, val, options, ctx):
            self.calls.append(("fit train", train.class_counts()))
            if val is not None:
                self.calls.append(("fit val", val.class_counts()))
            return original(method, model, train, val, options, ctx)

        self.monkeypatch.setattr(cls, "fit", fit)

    def fit_head(self, cls) -> None:
        original = cls.fit_head

        def fit_head(method, model, support, val, data, options, ctx):
            self.calls.append(("support", np.bincount(support.y)))
            self.calls.append(("data", data.class_counts()))
            if val is not None:
                self.calls.append(("selection val", np.bincount(val.y)))
            return original(method, model, support, val, data, options, ctx)

        self.monkeypatch.setattr(cls, "fit_head", fit_head)

    def most(self, step: str) -> int:
        return max((int(c.max()) for s, c in self.calls if s == step), default=0)


RUNS = [
    ("prototype", "tiny-resnet", {}),
    ("knn", "tiny-resnet", {}),
    ("linear-probe", "tiny-resnet", {}),
    ("tip-adapter", "tiny-resnet", {"search_steps": [10, 5]}),
    ("tip-adapter-f", "tiny-clip", {"epochs": 2, "search_steps": [10, 5]}),
    ("finetune", "tiny-resnet", {"epochs": 1}),
    ("coop", "tiny-clip", {"epochs": 1}),
]


@pytest.mark.parametrize(("name", "model", "options"), RUNS)
def test_a_k_shot_run_sees_k_labelled_images_per_class(
    tmp_path, monkeypatch, binary_npz, name, model, options
):
    spy = Spy(monkeypatch)
    spy.fit(type(METHODS.get(name)()))
    cfg = RunConfig(
        model=model,
        data=binary_npz,
        shift="none",
        method=name,
        method_options={"shots": K, **options},
        target="head" if name == "finetune" else None,
        evaluation={"n_boot": 0},
        out_dir=str(tmp_path),
    )
    record = run_experiment(cfg)
    assert spy.most("fit train") == K
    assert spy.most("fit val") == 0 and spy.most("operating point") == 0
    assert record["labelled"]["max_per_class"] == K
    assert record["labelled"]["per_class"] == {"train": [K, K], "val": []}
    expected = "support-cv" if name in ("linear-probe", "tip-adapter", "tip-adapter-f") else "fixed"
    assert record["labelled"]["selection"] == expected
    # no labelled validation image within the budget: the operating point is 0.5, and says so
    assert record["operating_point"]["test"]["chosen_on"] == "default"


@pytest.mark.parametrize("name", ["linear-probe", "finetune"])
def test_a_k_shot_validation_set_is_counted_and_recorded(tmp_path, monkeypatch, binary_npz, name):
    spy = Spy(monkeypatch)
    spy.fit(type(METHODS.get(name)()))
    shots = 3
    options = {"shots": shots, "selection": "kshot-val"}
    if name == "finetune":
        options["epochs"] = 2
    record = run_experiment(
        RunConfig(
            data=binary_npz,
            shift="none",
            method=name,
            method_options=options,
            target="head",
            evaluation={"n_boot": 0},
            out_dir=str(tmp_path),
        )
    )
    k_val = min(shots, KSHOT_VAL_MAX)
    assert spy.most("fit train") == shots and spy.most("fit val") == k_val
    assert spy.most("operating point") == k_val  # chosen on the K-shot validation set only
    assert record["labelled"]["max_per_class"] == shots + k_val
    assert record["labelled"]["per_class"]["val"] == [k_val, k_val]
    assert record["operating_point"]["test"]["chosen_on"].startswith("validation")


def test_whole_validation_split_is_refused_in_a_k_shot_run(tmp_path, binary_npz):
    cfg = RunConfig(
        data=binary_npz,
        shift="none",
        method="linear-probe",
        method_options={"shots": K, "selection": "validation"},
        out_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match="every labelled image of the validation split"):
        run_experiment(cfg)


def test_the_few_shot_sweep_keeps_the_same_promise(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    methods = ["prototype", "knn", "linear-probe", "tip-adapter"]
    for name in methods:
        cls = type(METHODS.get(name)())
        assert issubclass(cls, FrozenFeatureMethod)
        spy.fit_head(cls)
    base = RunConfig(data_options={"patients_per_site": 40}, out_dir=str(tmp_path))
    result = run_fewshot_sweep(
        base, methods, [1, 2], [0], {"tip-adapter": {"search_steps": [8, 4]}}
    )
    assert spy.most("support") == 2 and spy.most("data") == 2
    assert spy.most("selection val") == 0
    for rec in result.records:
        shots = rec["method"]["options"]["shots"]
        assert rec["labelled"]["max_per_class"] == shots
        assert rec["labelled"]["selection"] == (
            "support-cv" if shots >= 2 and rec["method"]["name"] in methods[2:] else "fixed"
        )


# --- the budget itself ------------------------------------------------------------------------


def test_selection_resolution():
    assert resolve_selection("auto", None, True) == "validation"
    assert resolve_selection("auto", 4, True) == "support-cv"
    assert resolve_selection("auto", 1, True) == "fixed"
    assert resolve_selection("auto", 4, False) == "fixed"
    assert resolve_selection("kshot-val", 4, False) == "kshot-val"
    with pytest.raises(ConfigError, match="validation split"):
        resolve_selection("validation", 4, True)
    with pytest.raises(ConfigError, match="at least 2 shots"):
        resolve_selection("support-cv", 1, True)
    with pytest.raises(ConfigError, match="cannot select by cross-validation"):
        resolve_selection("support-cv", 4, False)
    with pytest.raises(ConfigError, match=r"needs method_options\.shots"):
        resolve_selection("kshot-val", None, True)


def _labelled(name, n_per_class, classes=4, shared_patients=0):
    """A dataset of blank images: ``n_per_class`` per class, one patient each (some shared)."""
    n = n_per_class * classes
    pid = [f"p{i}" for i in range(n)]
    pid[:shared_patients] = [f"shared{i}" for i in range(shared_patients)]
    return ClinicalDataset(
        name,
        ArraySource(np.zeros((n, 4, 4), np.uint8)),
        np.arange(n) % classes,
        [f"c{c}" for c in range(classes)],
        metadata={"patient_id": np.array(pid)},
    )


def test_budget_draws_k_per_class_and_a_patient_disjoint_kshot_validation():
    train = _labelled("train", 30, shared_patients=12)
    val = _labelled("val", 10, shared_patients=12)  # the same 12 patients on both sides
    probe = METHODS.get("linear-probe")()
    budget = probe.labelled_budget(train, val, probe.parse_options({"shots": 5}), seed=3)
    assert list(budget.train.class_counts()) == [5] * 4 and budget.val is None
    again = probe.labelled_budget(budget.train, val, probe.parse_options({"shots": 5}), seed=3)
    assert np.array_equal(again.train.index, budget.train.index)  # idempotent
    opts = probe.parse_options({"shots": 6, "selection": "kshot-val"})
    kv = probe.labelled_budget(train, val, opts, seed=1)
    assert list(kv.val.class_counts()) == [KSHOT_VAL_MAX] * 4
    assert not set(kv.val.meta("patient_id")) & set(kv.train.meta("patient_id"))
    assert kv.describe()["max_per_class"] == 6 + KSHOT_VAL_MAX
    full = probe.labelled_budget(train, val, probe.parse_options({}), seed=0)
    assert full.train is train and full.val is val and full.selection == "validation"
    with pytest.raises(DataError, match="500-shot"):  # too few images of a class
        probe.labelled_budget(train, val, probe.parse_options({"shots": 500}), seed=0)
    y = np.repeat(np.arange(3), [4, 5, 6])
    folds = stratified_folds(y, n_cv_folds(y, 5), seed=0)
    assert n_cv_folds(y, 5) == 4 and set(folds) == {0, 1, 2, 3}
    for f in range(4):  # every fold holds out and keeps every class
        assert set(y[folds == f]) == set(y[folds != f]) == {0, 1, 2}


# --- the solver and the selections against scikit-learn --------------------------------------


def _blobs(seed, n, d, k, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y = np.arange(n) % k
    return centres[y] + spread * rng.normal(size=(n, d)), y


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize(("k", "n", "d"), [(3, 30, 50), (2, 12, 40), (4, 200, 8), (3, 300, 150)])
def test_logistic_path_solves_each_problem_as_sklearn(k, n, d):
    """Newton on the span of few-shot features; scipy's L-BFGS-B for the last, larger one."""
    x, y = _blobs(k, n, d, k)
    folds = stratified_folds(y, 3, seed=0)
    masks = np.vstack([folds != f for f in range(3)] + [np.ones(n, bool)])
    cs = [1e-2, 1.0, 100.0]
    fits = logistic_path(x, y, k, cs, masks)
    for c, fit in zip(cs, fits, strict=True):
        for p, rows in enumerate(masks):
            ref = LogisticRegression(C=c, max_iter=20000, tol=1e-10).fit(x[rows], y[rows])
            got = _softmax(fit.logits(x, p))
            np.testing.assert_allclose(got, ref.predict_proba(x), atol=2e-5 if n < 300 else 2e-4)


def test_linear_probe_support_cv_picks_the_best_pooled_out_of_fold_c(small_shift):
    x, y = _blobs(5, 16, 30, 4, spread=2.0)
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    probe = METHODS.get("linear-probe")()
    opts = probe.parse_options({"shots": 4, "selection": "support-cv", "cv_folds": 4})
    data = small_shift.where(split="train")
    model = type("M", (), {})()  # the probe does not touch the model
    head, summary = probe.fit_head(model, LabelledFeatures(x, y), None, data, opts, Context(seed=2))
    folds = stratified_folds(y, 4, seed=2)
    scores = []
    for c in grid:
        pred = np.empty_like(y)
        for f in range(4):
            clf = LogisticRegression(C=c, max_iter=20000, tol=1e-10).fit(
                x[folds != f], y[folds != f]
            )
            pred[folds == f] = clf.predict(x[folds == f])
        scores.append(balanced_accuracy_score(y, pred))
    best = grid[int(np.argmax(scores))]
    assert summary["C"] == best and summary["selection"] == "support-cv"
    assert list(summary["cv_balanced_accuracy_by_C"].values()) == pytest.approx(scores)
    ref = LogisticRegression(C=best, max_iter=20000, tol=1e-10).fit(x, y)  # no refit needed
    with torch.no_grad():
        got = torch.softmax(head(torch.as_tensor(x, dtype=torch.float32)).double(), 1).numpy()
    np.testing.assert_allclose(got, ref.predict_proba(x), atol=1e-4)
    fixed = probe.parse_options({"shots": 1, "selection": "fixed", "c": 0.5})
    _, one = probe.fit_head(model, LabelledFeatures(x, y), None, data, fixed, Context())
    assert one["C"] == 0.5 and "cv_balanced_accuracy_by_C" not in one


def test_tip_adapter_support_cv_against_a_brute_force_search(small_shift):
    resnet = load_model("tiny-resnet")
    model = type("M", (), {"encoder": resnet})()
    x, y = _blobs(6, 12, resnet.feature_dim, 4, spread=3.0)
    x = x.astype(np.float32)
    data = small_shift.where(split="train")
    tip = METHODS.get("tip-adapter")()
    opts = tip.parse_options(
        {"shots": 3, "selection": "support-cv", "search_steps": [6, 4], "cv_folds": 3}
    )
    _, summary = tip.fit_head(model, LabelledFeatures(x, y), None, data, opts, Context(seed=4))
    folds = stratified_folds(y, 3, seed=4)
    f = torch.nn.functional.normalize(torch.as_tensor(x), dim=-1)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), 4).float()
    betas, alphas = alpha_beta_grid((7.0, 3.0), (6, 4))
    best = (-1.0, None, None)
    for b in betas.tolist():
        for a in alphas.tolist():
            pred = np.empty_like(y)
            for fold in range(3):
                fit, held = folds != fold, folds == fold
                affinity = torch.exp(-b * (1 - f[held] @ f[fit].T)) @ onehot[fit]
                pred[held] = (a * affinity).argmax(1).numpy()
            s = balanced_accuracy_score(y, pred)
            if s > best[0] + 1e-9:
                best = (s, a, b)
    assert summary["selection"] == "support-cv" and summary["cv_folds"] == 3
    assert summary["cv_balanced_accuracy"] == pytest.approx(best[0])
    assert (summary["alpha"], summary["beta"]) == pytest.approx((best[1], best[2]))


def test_budget_function_matches_the_method_hook(small_shift):
    train, val = small_shift.where(split="train"), small_shift.where(split="val")
    ft = METHODS.get("finetune")()
    opts = ft.parse_options({"shots": 2})
    a = ft.labelled_budget(train, val, opts, seed=0)
    b = labelled_budget(train, val, opts, 0, cross_validates=False)
    assert np.array_equal(a.train.index, b.train.index) and a.selection == b.selection == "fixed"
