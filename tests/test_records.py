"""The result record: one builder, one reader; what a folder of records may hold besides them."""

import json
import shutil

import pytest

from clinadapt.config import RunConfig
from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.report import write_report
from clinadapt.record import (
    RunRecord,
    check_metric,
    existing_record,
    load_record,
    read_records,
)
from clinadapt.runner import run_experiment


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-run")
    cfg = RunConfig(
        method="finetune",
        data_options={"patients_per_site": 8},
        method_options={"epochs": 1},
        evaluation={"n_boot": 20},
        out_dir=str(out),
    )
    record = run_experiment(cfg)
    return out, record


def test_a_written_record_reads_back_as_written(one_run):
    out, record = one_run
    path = out / f"{record['run_id']}.json"
    assert load_record(path) == json.loads(path.read_text())
    assert load_record(path, run_id=record["run_id"])["run_id"] == record["run_id"]
    typed = RunRecord.model_validate(json.loads(path.read_text()))
    assert typed.schema_version == 2 and set(typed.metrics) == set(record["metrics"])
    # every evaluation part is keyed by the same test sets as the metrics
    for part in ("subgroups", "ci", "selective"):
        assert set(record[part]) == set(record["metrics"]), part
    assert record["ci"]["site-a"]["accuracy"]["n_boot"] == 20


def test_truncated_foreign_and_misnamed_files_are_errors_naming_them(one_run, tmp_path):
    out, record = one_run
    text = (out / f"{record['run_id']}.json").read_text()
    cases = {
        "truncated.json": text[: len(text) // 3],
        "foreign.json": json.dumps({"name": "another tool", "values": [1, 2]}),
        "stub.json": json.dumps({"status": "ok"}),
        "list.json": "[1, 2, 3]",
        "future.json": json.dumps({**json.loads(text), "schema": 99}),
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=name):
            load_record(tmp_path / name)
    copied = tmp_path / "copy.json"
    copied.write_text(text)
    with pytest.raises(DataError, match="holds run"):
        load_record(copied, run_id="another-run")
    assert existing_record(tmp_path, "stub") is None
    assert existing_record(out, record["run_id"])["run_id"] == record["run_id"]


def test_a_folder_with_bad_files_is_read_with_a_warning_per_file(one_run, tmp_path, capsys):
    out, record = one_run
    runs = tmp_path / "runs"
    shutil.copytree(out, runs)
    (runs / "truncated.json").write_text('{"schema": 2, "run_id": "x", "conf')
    (runs / "notes.json").write_text('{"author": "me"}')
    records, skipped = read_records(runs)
    assert [r["run_id"] for r in records] == [record["run_id"]]
    assert sorted(skipped) == sorted(str(runs / n) for n in ("truncated.json", "notes.json"))
    err = capsys.readouterr().err
    assert "truncated.json" in err and "notes.json" in err and "warning" in err
    # the report is written from the good records, and says what it skipped on stderr
    html = write_report(runs).html
    assert html.exists()
    assert "truncated.json" in capsys.readouterr().err


def test_unknown_metric_is_an_error_listing_the_known_ones(one_run):
    out, record = one_run
    with pytest.raises(ConfigError, match=r"unknown metric 'balanced_acc'.*balanced_accuracy"):
        write_report(out, metric="balanced_acc")
    check_metric([record], "auroc")
    with pytest.raises(ConfigError, match="unknown metric"):
        check_metric([record], "dice")


def test_bn_records_and_tables_say_what_changed(tmp_path):
    """bn trains nothing: 0 parameters and normalisation statistics, not the source's "full"."""
    from clinadapt.evaluation.labels import condition_label
    from clinadapt.evaluation.report import results_table

    cfg = RunConfig(
        method="bn",
        data_options={"patients_per_site": 8},
        source={"options": {"epochs": 1}},
        evaluation={"n_boot": 0},
        out_dir=str(tmp_path),
    )
    record = run_experiment(cfg)
    assert record["target"]["spec"] == "none" and record["target"]["trainable"] == 0
    assert record["target"]["total"] > 0
    assert record["target"]["changes"] == "normalisation statistics (per test batch)"
    assert record["source"]["target"]["spec"] == "full"  # the source model was fine-tuned
    assert condition_label(record) == (
        "finetune → bn (tiny-resnet, normalisation statistics (per test batch))"
    )
    _, rows = results_table([record])
    assert "normalisation statistics" in rows[0][0] and "full" not in rows[0][0]
    write_report(tmp_path)
    assert "normalisation statistics" in (tmp_path / "report.md").read_text()
