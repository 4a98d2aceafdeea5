"""`clinadapt run` with the few-shot methods, fine-tuning checkpoints, and the few-shot sweep."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clinadapt.classifier import ImageClassifier
from clinadapt.cli import app
from clinadapt.config import RunConfig
from clinadapt.errors import ConfigError, DataError, IncompatibleError
from clinadapt.fewshot_sweep import parse_seeds, run_fewshot_sweep, sweep_table
from clinadapt.methods import METHODS, Context, predict_proba
from clinadapt.methods.finetune import load_checkpoint
from clinadapt.models import load_model
from clinadapt.record import load_record
from clinadapt.runner import run_experiment
from clinadapt.targets import apply_target

SMALL = ["-o", "data_options.patients_per_site=40", "--quiet"]


@pytest.mark.parametrize(
    ("method", "model"),
    [
        ("prototype", "tiny-resnet"),
        ("knn", "tiny-resnet"),
        ("tip-adapter", "tiny-clip"),
        ("tip-adapter", "tiny-resnet"),
        ("tip-adapter-f", "tiny-clip"),
        ("linear-probe", "tiny-resnet"),
        ("finetune", "tiny-resnet"),
    ],
)
def test_run_writes_a_record_and_a_rerun_restores_it(tmp_path, method, model):
    args = ["run", "--method", method, "--model", model, "--out", str(tmp_path), *SMALL]
    args += ["-o", "method_options.shots=2", "--json"]
    if method == "finetune":
        args += ["--target", "head", "-o", "method_options.epochs=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.json")
    record = load_record(path, run_id=path.stem)
    assert record["method"]["name"] == method
    assert set(record["metrics"]) == {"site-a", "site-b", "site-c", "site-d"}
    assert record["method"]["options"]["shots"] == 2
    if method.startswith("tip-adapter"):
        assert record["training"]["zero_shot"] is (model == "tiny-clip")
        if model == "tiny-resnet":
            assert "cache model only" in record["training"]["note"]
    if method != "finetune":
        assert record["training"]["support_images"] == 2 * 4
        assert list((tmp_path / "cache" / "features").glob("*.safetensors"))
    # the same run again: the head comes back from the runner's checkpoint, not a new fit
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    record2 = json.loads(path.read_text())
    assert "reused" in record2["training"]
    assert record2["metrics"] == record["metrics"]


@pytest.mark.parametrize(
    ("model_name", "target"),
    [
        ("tiny-resnet", "head"),
        ("tiny-resnet", "norm"),
        ("tiny-resnet", "bias"),
        ("tiny-resnet", "full"),
        ("tiny-vit", "lora+head"),
        ("tiny-vit", "adapter+head"),
        ("tiny-vit", "prompt+head"),
    ],
)
def test_finetune_checkpoint_holds_the_adapted_tensors(tmp_path, small_shift, model_name, target):
    data = small_shift.where(domain="site-a")
    train, val = data.where(split="train"), data.where(split="val")
    torch.manual_seed(0)  # the frozen head of norm/bias targets: the same in both models
    model = ImageClassifier(load_model(model_name), 4)
    apply_target(model, target)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    method = METHODS.get("finetune")()
    path = tmp_path / "best.safetensors"
    opts = method.parse_options({"epochs": 1, "checkpoint": str(path)})
    summary = method.fit(model, train, val, opts, Context(batch_size=32))
    saved = load_file(str(path))
    assert set(saved) == trainable | buffers
    assert summary["checkpoint_tensors"] == len(saved)
    if target != "full":
        assert len(saved) < len(model.state_dict())
    torch.manual_seed(0)
    fresh = ImageClassifier(load_model(model_name), 4)
    apply_target(fresh, target)
    before = predict_proba(fresh, val, Context())
    load_checkpoint(fresh, path)
    after = predict_proba(fresh, val, Context())
    np.testing.assert_allclose(after, predict_proba(model, val, Context()), atol=1e-6)
    assert not np.allclose(before, after)


def test_loading_a_checkpoint_into_the_wrong_model_is_refused(tmp_path, small_shift):
    data = small_shift.where(domain="site-a", split="train")
    model = ImageClassifier(load_model("tiny-resnet"), 4)
    apply_target(model, "head")
    method = METHODS.get("finetune")()
    path = tmp_path / "head.safetensors"
    method.fit(
        model, data, None, method.parse_options({"epochs": 1, "checkpoint": str(path)}), Context()
    )
    with pytest.raises(IncompatibleError, match="no place"):
        load_checkpoint(ImageClassifier(load_model("tiny-vit"), 4), path)


def _sweep_base(tmp_path, model="tiny-clip"):
    return RunConfig(model=model, data_options={"patients_per_site": 40}, out_dir=str(tmp_path))


def test_sweep_embeds_once_and_resumes(tmp_path):
    base = _sweep_base(tmp_path)
    result = run_fewshot_sweep(base, ["prototype", "knn"], [1, 2], [0, 1])
    assert len(result.records) == 8 and result.skipped == 0
    n_images = result.records[0]["data"]["images"]
    assert result.cache == {"hits": 0, "misses": 1, "embedded_images": n_images}
    assert len(list(tmp_path.glob("*.json"))) == 8
    again = run_fewshot_sweep(base, ["prototype", "knn"], [1, 2], [0, 1])
    assert again.skipped == 8 and again.cache["embedded_images"] == 0
    assert [r["run_id"] for r in again.records] == [r["run_id"] for r in result.records]
    more = run_fewshot_sweep(base, ["prototype"], [1, 2], [0, 1, 2])  # a new seed only
    assert more.skipped == 4 and more.cache == {"hits": 1, "misses": 0, "embedded_images": 0}


def test_sweep_with_too_many_shots_fails_before_embedding(tmp_path):
    with pytest.raises(DataError, match="64-shot"):
        run_fewshot_sweep(_sweep_base(tmp_path), ["prototype"], [1, 64], [0])
    assert not list(tmp_path.glob("**/*.safetensors")) and not list(tmp_path.glob("*.json"))


def _assert_same(a, b, where=""):
    """Two JSON trees equal, floats to 1e-6."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, (where, a, b)


def test_sweep_record_equals_a_single_run(tmp_path):
    """The sweep (cached rows of one pass) and `run` (its own forward passes) write the same
    record: every metric, subgroup, bootstrap CI and selective-prediction figure, with the
    run's evaluation settings."""
    base = _sweep_base(tmp_path / "sweep", model="tiny-resnet")
    base = base.model_copy(update={"evaluation": base.evaluation.model_copy(update={"n_boot": 50})})
    (rec,) = run_fewshot_sweep(base, ["prototype"], [2], [1]).records
    cfg = RunConfig(**{**rec["config"], "out_dir": str(tmp_path / "run")})
    single = run_experiment(cfg)
    assert single["run_id"] == rec["run_id"]
    assert set(rec) == set(single) | {"fewshot"}
    assert rec["ci"]["site-b"]["accuracy"]["n_boot"] == 50  # the run's evaluation settings
    for part in ("metrics", "summary", "subgroups", "ci", "selective", "data", "shift"):
        _assert_same(rec[part], single[part], part)
    for part in ("target", "method", "model"):
        _assert_same(rec[part], single[part], part)
    assert rec["target"]["changes"] == "class-mean prototypes (no training)"
    assert rec["target"]["trainable"] == 0


def test_sweep_table_is_mean_and_sample_sd():
    def rec(method, shots, value):
        return {
            "method": {"name": method, "options": {"shots": shots}},
            "summary": {"balanced_accuracy": {"in_domain": value, "shifted": value / 2}},
        }

    values = {
        (m, k): [0.1 * k + i * 0.05 + (m == "knn") * 0.2 for i in range(3)]
        for m in ("prototype", "knn")
        for k in (1, 4)
    }
    records = [rec(m, k, v) for (m, k), vs in values.items() for v in vs]
    header, rows = sweep_table(records, view="in_domain")
    assert header == ["shots", "prototype", "knn"]
    assert [r[0] for r in rows] == ["1", "4"]
    vs = values[("knn", 4)]
    mean, sd = sum(vs) / 3, (sum((v - sum(vs) / 3) ** 2 for v in vs) / 2) ** 0.5
    assert rows[1][2] == f"{mean:.3f} ± {sd:.3f}"
    _, shifted = sweep_table(records[:-1], view="shifted")
    assert shifted[1][2] == f"{np.mean(vs[:2]) / 2:.3f} ± {np.std(vs[:2], ddof=1) / 2:.3f} (n=2)"


def test_sweep_refuses_methods_that_train_the_backbone(tmp_path):
    with pytest.raises(ConfigError, match="frozen features"):
        run_fewshot_sweep(_sweep_base(tmp_path), ["finetune"], [1], [0])
    with pytest.raises(ConfigError, match="unknown option 'kk'; did you mean 'k'"):
        run_fewshot_sweep(_sweep_base(tmp_path), ["knn"], [1], [0], {"knn": {"kk": 3}})
    with pytest.raises(ConfigError, match="per method"):
        base = _sweep_base(tmp_path).model_copy(update={"method_options": {"k": 3}})
        run_fewshot_sweep(base, ["knn"], [1], [0])
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,9") == [4, 9]
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("x")


def test_fewshot_cli_end_to_end(tmp_path):
    args = ["fewshot", "--shots", "1,2", "--seeds", "2", "--methods", "prototype,tip-adapter"]
    args += ["--out", str(tmp_path), "-o", "data_options.patients_per_site=40"]
    args += ["-o", "method_options.tip-adapter.search_steps=[20,5]", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["records"]) == 8 and out["feature_cache"]["misses"] == 1
    assert out["table"]["header"] == ["shots", "prototype", "tip-adapter"]
    assert len(out["table"]["rows"]) == 2
    rec = json.loads((tmp_path / f"{out['records'][-1]}.json").read_text())
    assert rec["method"]["options"]["search_steps"] == [20, 5]
    assert rec["fewshot"]["shots"] == 2 and rec["fewshot"]["support_seed"] == 1
    table = CliRunner().invoke(app, [*args[:-1], "--quiet"])
    assert (
        table.exit_code == 0 and "prototype" in table.output and "8 result records" in table.output
    )


@pytest.mark.slow
def test_finetune_beats_chance_on_the_built_in_data(tmp_path):
    cfg = RunConfig(
        method="finetune",
        target="full",
        out_dir=str(tmp_path),
        method_options={"epochs": 20},
    )
    record = run_experiment(cfg)
    # the built-in size (200 patients per site): 0.79 and 0.78 for seeds 0 and 1; with 120
    # patients per site tiny-resnet over-fits its ~150 training images (0.20-0.24)
    assert record["metrics"]["site-a"]["balanced_accuracy"] > 0.6  # chance: 0.25
    assert record["training"]["best_val"] > 0.6


def test_an_unknown_view_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    """`clinadapt fewshot --view site-x` used to fail only in the table, after the sweep."""
    import sys

    import clinadapt.fewshot_sweep as fs
    from clinadapt.cli import main

    def no_sweep(*a, **k):
        raise AssertionError("the sweep ran before the view was checked")

    monkeypatch.setattr(fs, "run_fewshot_sweep", no_sweep)
    args = ["fewshot", "--model", "tiny-vit", "--view", "site-x", "--out", str(tmp_path)]
    monkeypatch.setattr(
        sys, "argv", ["clinadapt", *args, "--set", "data_options.patients_per_site=6"]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "unknown view 'site-x'" in err and "site-b" in err
    base = RunConfig(data_options={"patients_per_site": 6})
    fs.check_view(base, "site-b")  # a test set of the shift, and the summary views, pass
    fs.check_view(base, "worst")
