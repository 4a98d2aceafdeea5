"""Results as data: load_records, the CSV files next to each record, TensorBoard events."""

import csv
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

import clinadapt
from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.metric_info import METRIC_INFO, metric_info
from clinadapt.evaluation.tidy import COLUMNS, load_records, run_tables, trace_rows


def _rows(df, record, test_set, metric):
    sel = df[(df.run_id == record["run_id"]) & (df.test_set == test_set) & (df.metric == metric)]
    assert len(sel) == 1, (test_set, metric, len(sel))
    return sel.iloc[0]


def test_load_records_is_one_row_per_record_set_metric(tiny_runs):
    out, records = tiny_runs["single"]
    df = clinadapt.load_records(out)
    assert list(df.columns) == list(COLUMNS)
    assert df.duplicated(["run_id", "test_set", "metric"]).sum() == 0
    assert set(df.run_id) == {r["run_id"] for r in records}
    for r in records:
        for name, metrics in r["metrics"].items():
            for metric, value in metrics.items():
                if metric == "n" or value is None:
                    continue
                row = _rows(df, r, name, metric)
                assert row.value == pytest.approx(value)
                ci = r["ci"][name].get(metric)
                if ci:  # the record's own bootstrap interval, not one over seeds
                    assert (row.ci_low, row.ci_high) == pytest.approx((ci["low"], ci["high"]))
                    assert row.ci_unit == r["ci"][name]["unit"] == "patient"
                    assert row.ci_level == pytest.approx(1 - r["ci"][name]["alpha"])
                else:
                    assert math.isnan(row.ci_low)
            row = _rows(df, r, name, "accuracy")
            assert row.n_images == r["counts"][name]["images"] == r["metrics"][name]["n"]
            assert row.n_patients == r["counts"][name]["patients"]
            assert (row.model, row.method, row.seed) == (
                r["config"]["model"],
                r["config"]["method"],
                r["config"]["seed"],
            )
            # 'source' evaluates its source model unchanged: the target that model was trained on
            own = r["source"]["target"] if r["config"]["method"] == "source" else r["target"]
            assert row.target == own["spec"]
            assert row["shift"] == r["shift"]["protocol"]
            assert bool(row.in_domain) == (name in r["shift"]["in_domain"])
            aurc = _rows(df, r, name, "aurc")
            assert aurc.value == pytest.approx(r["selective"][name]["aurc"])
            assert aurc.setting == f"target error {r['selective'][name]['target_error']}"


def test_patients_counted_from_the_data(tiny_runs):
    """n_patients is the number of distinct patient ids among a test set's images."""
    out, records = tiny_runs["single"]
    df = load_records(out)
    r = records[0]
    with np.load(out / "predictions" / f"{r['run_id']}.npz") as z:
        for name in r["metrics"]:
            ids = z[f"meta/{name}/patient_id"]
            assert _rows(df, r, name, "accuracy").n_patients == len(set(ids.tolist()))
            assert len(ids) == r["counts"][name]["images"]


def test_corruption_columns_and_condition_names(tiny_runs):
    out, _records = tiny_runs["single"]
    df = load_records(out)
    corr = df[df["shift"] == "corruption"]
    assert set(corr.corruption.dropna()) == {"gaussian-noise", "blur"}
    assert set(corr.severity.dropna().astype(int)) == {1, 3}
    assert corr[corr.test_set == "clean"].severity.isna().all()
    # the source model evaluated by the 'source' method has the name of the fit that made it
    names = dict(zip(df.method, df.condition, strict=False))
    assert names["source"] == names["finetune"] == "finetune (tiny-resnet, full)"
    assert names["bn"] == "finetune → bn (tiny-resnet, normalisation statistics (per test batch))"
    assert names["tent"] == "finetune → tent (tiny-resnet, norm)"


def test_operating_point_rows_carry_their_rule(tiny_runs):
    out, (record,) = tiny_runs["binary"]
    df = load_records(out)
    assert record["data"]["task"] == "binary"
    for name, op in record["operating_point"].items():
        for metric in ("sensitivity", "specificity", "ppv", "npv"):
            row = _rows(df, record, name, metric)
            assert row.value == pytest.approx(op[metric], nan_ok=True)
            assert f"score >= {op['threshold']:.3g}" in row.setting
            assert op["chosen_on"] in row.setting
        half = _rows(df, record, name, "sensitivity_at_0.5")
        assert half.setting == "threshold 0.5"


def test_subgroup_rows(tiny_runs):
    out, records = tiny_runs["single"]
    df = load_records(out, subgroups=True)
    r = records[0]
    groups = r["subgroups"]["site-b"]["sex"]["groups"]
    for g, values in groups.items():
        sel = df[
            (df.run_id == r["run_id"])
            & (df.test_set == "site-b")
            & (df.subgroup_key == "sex")
            & (df.subgroup == g)
            & (df.metric == "balanced_accuracy")
        ]
        assert len(sel) == 1
        assert sel.iloc[0].value == pytest.approx(values["balanced_accuracy"])
        assert sel.iloc[0].n_images == values["n"]
    assert load_records(out).subgroup_key.isna().all()


def test_load_records_accepts_a_file_and_refuses_a_missing_path(tiny_runs, tmp_path):
    out, records = tiny_runs["single"]
    one = load_records(out / f"{records[0]['run_id']}.json")
    assert set(one.run_id) == {records[0]["run_id"]}
    with pytest.raises(DataError, match="no such result record"):
        load_records(tmp_path / "nothing-here")


def test_metric_directions_come_from_one_table():
    assert metric_info("ece").higher_is_better is False
    assert metric_info("hd95").unit == "mm" and not metric_info("hd95").higher_is_better
    assert metric_info("balanced_accuracy").worst({"a": 0.9, "b": 0.4}) == "b"
    assert metric_info("ece").worst({"a": 0.1, "b": 0.3}) == "b"
    declared = {"my_score": {"label": "my score", "higher_is_better": False, "high": None}}
    assert metric_info("my_score", declared).higher_is_better is False
    assert metric_info("never-heard-of").higher_is_better is True
    assert {"dice", "nsd", "hd95", "aurc"} <= set(METRIC_INFO)


def test_history_csv_next_to_the_record(tiny_runs):
    out, records = tiny_runs["single"]
    fit, tent = records[0], records[1]
    rows = list(csv.DictReader((out / f"{fit['run_id']}.history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in fit["training"]["history"]]
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        [h["loss"] for h in fit["training"]["history"]]
    )
    assert {r["stage"] for r in rows} == {"fit"}
    # tent reused the cached source model: its history comes from the summary kept beside it
    assert tent["source"]["training"]["reused"]
    rows = list(csv.DictReader((out / f"{tent['run_id']}.history.csv").open()))
    assert {r["stage"] for r in rows} == {"source"}
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        [h["loss"] for h in fit["training"]["history"]]
    )


def test_trace_rows_from_a_columnar_trace():
    record = {
        "tta": {
            "trace": {
                "site-b": {"position": [0, 32], "entropy": [0.9, 0.7], "reset": [0, 1]},
                "site-c": {"position": [0], "entropy": [0.5], "reset": [0]},
            }
        }
    }
    rows = trace_rows(record)
    assert [(r["test_set"], r["position"], r["reset"]) for r in rows] == [
        ("site-b", 0, 0),
        ("site-b", 32, 1),
        ("site-c", 0, 0),
    ]
    text = run_tables(record)["trace.csv"]
    assert text.splitlines()[0] == "test_set,position,entropy,reset"
    assert "history.csv" not in run_tables(record)


def test_tensorboard_events_hold_the_history_and_metrics(tiny_runs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clinadapt.evaluation.events import write_tensorboard

    _, records = tiny_runs["single"]
    record = records[0]
    write_tensorboard(tmp_path / "tb", record)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("fit/loss")]
    assert losses == pytest.approx([h["loss"] for h in record["training"]["history"]], rel=1e-6)
    test = acc.Scalars("test/site-b/balanced_accuracy")
    assert test[0].value == pytest.approx(record["metrics"]["site-b"]["balanced_accuracy"])


def test_tensorboard_is_a_run_setting(tiny_runs, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from clinadapt.config import RunConfig
    from clinadapt.runner import run_experiment

    out, records = tiny_runs["single"]
    shutil.copytree(out / "cache", tmp_path / "cache")  # reuse the trained model
    cfg = RunConfig(**{**records[0]["config"], "out_dir": str(tmp_path), "tensorboard": True})
    assert cfg.run_id() == records[0]["run_id"]  # logging does not change what the run is
    record = run_experiment(cfg)
    assert record["training"]["reused"]
    assert any((tmp_path / "tensorboard" / record["run_id"]).glob("events.out.tfevents.*"))
    import clinadapt.evaluation.events as events

    monkeypatch.setattr(events, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install -e \"\.\[tensorboard\]\""):
        clinadapt.config.load_config(None, tensorboard=True)


def test_results_csv_is_the_load_records_table(tiny_runs, tmp_path):
    from clinadapt.evaluation.report import write_report

    out, _ = tiny_runs["single"]
    files = write_report(out, tmp_path / "report")
    csv_df = pd.read_csv(files.results)
    df = load_records(out)
    assert list(csv_df.columns) == list(df.columns)
    assert len(csv_df) == len(df)
    key = ["run_id", "test_set", "metric"]
    merged = df.merge(csv_df, on=key, suffixes=("", "_csv"))
    assert len(merged) == len(df)
    for col in ("value", "ci_low", "ci_high", "n_images", "n_patients"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_csv"], rtol=1e-12, equal_nan=True)
    assert (merged.condition == merged.condition_csv).all()
    assert json.loads(json.dumps(list(csv_df.model.unique()))) == ["tiny-resnet"]


def test_the_record_says_which_command_made_it(monkeypatch):
    from clinadapt.runner import invocation

    monkeypatch.setattr("sys.argv", ["/opt/venv/bin/clinadapt", "run", "--set", "seed=1 2"])
    assert invocation() == "clinadapt run --set 'seed=1 2'"
    monkeypatch.setattr("sys.argv", ["/x/site-packages/clinadapt/__main__.py", "demo"])
    assert invocation() == "python -m clinadapt demo"
    monkeypatch.setattr("sys.argv", ["-c"])
    assert invocation() == "python -c"


def test_trace_csv_next_to_a_tta_record(tiny_runs):
    """The per-batch trace of a real tent run, as CSV beside its record."""
    out, records = tiny_runs["single"]
    tent = records[1]
    trace = tent["tta"]["trace"]
    assert set(trace) == set(tent["metrics"])
    rows = list(csv.DictReader((out / f"{tent['run_id']}.trace.csv").open()))
    for name, cols in trace.items():
        mine = [r for r in rows if r["test_set"] == name]
        assert [int(r["position"]) for r in mine] == cols["position"]
        assert [float(r["entropy"]) for r in mine] == pytest.approx(cols["entropy"])
    assert not (out / f"{records[0]['run_id']}.trace.csv").exists()  # a fit run has none


def test_nested_parts_of_a_set_or_group_are_not_metric_rows(tiny_runs):
    """A per-class dict inside a set's metrics or a subgroup is not a row of NaN."""
    import copy

    from clinadapt.evaluation.tidy import records_frame

    _, records = tiny_runs["single"]
    r = copy.deepcopy(records[0])
    r["metrics"]["site-b"]["per_class"] = {"a": 0.5}
    r["subgroups"]["site-b"]["sex"]["groups"]["F"]["per_class"] = {"a": 0.5}
    df = records_frame([r], subgroups=True)
    assert "per_class" not in set(df.metric)
    assert df[df.subgroup_key.notna()].value.notna().any()
