"""The report, built from real tiny runs: CIs drawn, n shown, one name and colour per condition,
one definition per metric, provenance, files, and an HTML page that renders in a real browser."""

import csv
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.errors import ConfigError, DataError
from clinadapt.evaluation.metrics import ECE_BINS
from clinadapt.evaluation.report import write_report
from clinadapt.evaluation.report.cells import joint_bootstrap
from clinadapt.evaluation.report.predictions import read_predictions
from clinadapt.evaluation.report.statistics import full_value, replicates
from clinadapt.store import write_record


@pytest.fixture(scope="module")
def single(tiny_runs, tmp_path_factory):
    out, records = tiny_runs["single"]
    return write_report(out, tmp_path_factory.mktemp("single-report")), records


@pytest.fixture(scope="module")
def seeds(tiny_runs, tmp_path_factory):
    out, records = tiny_runs["seeds"]
    return write_report(out, tmp_path_factory.mktemp("seeds-report")), records


def figure_data(files, suffix):
    """The rows of numbers behind the figure whose name ends with ``suffix``."""
    (fig,) = [f for f in files.figures if f.name.endswith(suffix)]
    return list(csv.DictReader(fig.files["csv"].open()))


def num(x):
    return float(x) if x not in ("", None) else math.nan


def test_single_seed_bars_draw_each_records_bootstrap_ci(single):
    files, records = single
    rows = figure_data(files, "domain-source-site-a_balanced_accuracy_per-set")
    by_method = {"finetune (full)": records[0], "finetune → tent (norm)": records[1]}
    checked = 0
    for row in rows:
        if row["x"] in ("shifted mean",):
            continue
        r = by_method[row["condition"]]
        ci = r["ci"][row["x"]]["balanced_accuracy"]
        assert row["ci"] == "record"
        assert num(row["value"]) == pytest.approx(r["metrics"][row["x"]]["balanced_accuracy"])
        assert (num(row["ci_low"]), num(row["ci_high"])) == pytest.approx((ci["low"], ci["high"]))
        assert num(row["n_images"]) == r["counts"][row["x"]]["images"]
        assert num(row["n_patients"]) == r["counts"][row["x"]]["patients"]
        checked += 1
    assert checked == 8  # 2 conditions x 4 sites
    # the table shows the same interval
    md = files.markdown.read_text()
    ci = records[0]["ci"]["site-b"]["balanced_accuracy"]
    value = records[0]["metrics"]["site-b"]["balanced_accuracy"]
    assert f"{value:.3f} ({ci['low']:.3f}–{ci['high']:.3f})" in md


def test_single_seed_severity_means_get_a_pooled_interval(single):
    files, records = single
    rows = figure_data(files, "corruption_balanced_accuracy_severity")
    assert {r["x"] for r in rows} == {"0", "1", "3"}  # only the severities that ran
    mean_rows = [r for r in rows if r["corruption"] == "mean over corruptions" and r["x"] != "0"]
    assert mean_rows and all(r["ci"] == "pooled" for r in mean_rows)
    for r in mean_rows:
        assert num(r["ci_low"]) <= num(r["ci_high"])
        assert num(r["test_sets"]) == 2
    one = [r for r in rows if r["corruption"] == "blur" and r["x"] == "3"]
    src = records[2]
    assert {r["ci"] for r in one} == {"record"}
    row = next(r for r in one if r["condition"] == "finetune (full)")
    assert num(row["ci_low"]) == pytest.approx(src["ci"]["blur@3"]["balanced_accuracy"]["low"])


def test_the_pooled_bootstrap_resamples_patients_jointly(tiny_runs):
    """Checked against a plain reimplementation: one draw of patients per resample, used in
    every set; each set's metric on its drawn patients' images; the mean over sets."""
    out, records = tiny_runs["single"]
    record = records[2]
    preds = read_predictions(out / "predictions" / f"{record['run_id']}.npz")
    sets = ["gaussian-noise@3", "blur@3"]
    rep = replicates("balanced_accuracy", "multiclass", record, sets[0])
    got = joint_bootstrap([[(preds[s], rep) for s in sets]], "mean", True, 30, seed=7)

    from clinadapt.evaluation.metrics import balanced_accuracy

    rng = np.random.default_rng(7)
    ids = np.unique(np.concatenate([preds[s].patients.astype(str) for s in sets]))
    draws = [rng.integers(0, len(ids), len(ids)) for _ in range(30)]
    expected = []
    for b in range(30):
        vals = []
        for s in sets:
            p = preds[s]
            idx = np.concatenate(
                [np.flatnonzero(p.patients.astype(str) == ids[d]) for d in draws[b]]
            )
            vals.append(balanced_accuracy(p.labels[idx], p.probs[idx]))
        expected.append(np.mean(vals))
    np.testing.assert_allclose(got, expected)
    # a set counted twice is the same set: the interval does not narrow
    twice = joint_bootstrap([[(preds[s], rep) for s in [sets[0], sets[0]]]], "mean", True, 30, 7)
    once = joint_bootstrap([[(preds[sets[0]], rep)]], "mean", True, 30, 7)
    np.testing.assert_allclose(twice, once)


@pytest.mark.parametrize("which", ["single", "binary"])
def test_recomputed_metrics_are_the_records_metrics(tiny_runs, which):
    """One definition per metric: what the report recomputes from predictions is the record."""
    out, records = tiny_runs[which]
    checked = 0
    for record in records:
        preds = read_predictions(out / "predictions" / f"{record['run_id']}.npz")
        task = record["data"]["task"]
        for name, metrics in record["metrics"].items():
            parts = {
                **metrics,
                **{k: v for k, v in record["selective"][name].items() if k != "target_error"},
                **{
                    k: v
                    for k, v in (record.get("operating_point") or {}).get(name, {}).items()
                    if k in ("ppv", "npv")
                },
            }
            for metric, value in parts.items():
                if metric == "n" or value is None:
                    continue
                rep = replicates(metric, task, record, name)
                assert rep is not None, metric
                assert full_value(rep, preds[name]) == pytest.approx(value, nan_ok=True), metric
                checked += 1
    assert checked >= 9 * sum(len(r["metrics"]) for r in records)


def test_several_seeds_show_the_seed_spread_and_the_pooled_ci(seeds):
    files, records = seeds
    rows = figure_data(files, "balanced_accuracy_per-set")
    fine = [r for r in records if r["config"]["method"] == "finetune"]
    row = next(r for r in rows if r["condition"] == "finetune (full)" and r["x"] == "site-b")
    per_seed = [r["metrics"]["site-b"]["balanced_accuracy"] for r in fine]
    assert num(row["seeds"]) == 2
    assert [float(v) for v in row["seed_values"].split()] == pytest.approx(per_seed)
    assert num(row["value"]) == pytest.approx(np.mean(per_seed))
    assert num(row["seed_sd"]) == pytest.approx(np.std(per_seed, ddof=1))
    assert row["ci"] == "pooled" and num(row["ci_low"]) <= num(row["ci_high"])
    md = files.markdown.read_text()
    assert "SD = standard deviation over seeds" in md
    assert f"; SD {np.std(per_seed, ddof=1):.3f}" in md


def test_every_table_shows_n(single):
    files, records = single
    md = files.markdown.read_text()
    r = records[0]
    n_row = next(line for line in md.splitlines() if line.startswith("| n (images / patients)"))
    for name in ("site-a", "site-b", "site-c", "site-d"):
        c = r["counts"][name]
        assert f"{c['images']} img / {c['patients']} pat" in n_row
    corr = records[2]["counts"]
    assert f"{corr['clean']['images']} img / {corr['clean']['patients']} pat" in md


def test_one_name_and_one_style_per_condition(single):
    files, _ = single
    styles: dict[str, set] = {}
    sections: dict[str, set] = {}
    for f in files.figures:
        if "csv" not in f.files:
            continue
        for row in csv.DictReader(f.files["csv"].open()):
            if row.get("colour"):
                styles.setdefault(row["condition"], set()).add(
                    (row["colour"], row["linestyle"], row["marker"])
                )
                sections.setdefault(row["condition"], set()).add(row["section"])
    assert all(len(s) == 1 for s in styles.values()), styles
    assert len({next(iter(s)) for s in styles.values()}) == len(styles)  # all different
    # the fine-tuned model is "finetune" in both sections (a 'source' run in the corruption one)
    assert sections["finetune (full)"] == {"domain (source site-a)", "corruption"}
    assert "source (" not in files.markdown.read_text()


def test_reliability_shows_counts_and_the_tables_ece(single):
    files, records = single
    rows = figure_data(files, "corruption_reliability")
    src = records[2]
    shifted = [s for s in src["metrics"] if s not in src["shift"]["in_domain"]]
    ece = next(
        r
        for r in rows
        if r["panel"] == "reliability-ece"
        and r["condition"] == "finetune (full)"
        and r["x"] == "shifted sets"
    )
    assert num(ece["value"]) == pytest.approx(np.mean([src["metrics"][s]["ece"] for s in shifted]))
    bins = [
        r
        for r in rows
        if r["panel"] == "reliability"
        and r["condition"] == "finetune (full)"
        and r["part"] == "shifted sets"
    ]
    assert len(bins) == ECE_BINS
    assert sum(int(b["count"]) for b in bins) == sum(src["counts"][s]["images"] for s in shifted)
    table_line = next(
        line
        for line in files.markdown.read_text().splitlines()
        if line.startswith("| finetune (full) |") and "ECE" not in line and line.count("|") == 5
    )
    assert f"{num(ece['value']):.3f} (" in table_line.split("|")[2]


def test_binary_task_shows_the_operating_point(tiny_runs, tmp_path):
    out, (record,) = tiny_runs["binary"]
    files = write_report(out, tmp_path)
    md = files.markdown.read_text()
    op = record["operating_point"]["site-b"]
    assert f"score ≥ {op['threshold']:.3g}, chosen on {op['chosen_on']}" in md
    rows = figure_data(files, "operating-point")
    sens = next(r for r in rows if r["x"] == "site-b" and r["metric"] == "sensitivity")
    assert num(sens["value"]) == pytest.approx(op["sensitivity"], nan_ok=True)
    assert "coverage at error ≤ 0.1" in md


def test_subgroup_plots_with_cis(single):
    files, records = single
    rows = figure_data(files, "domain-source-site-a_balanced_accuracy_subgroups")
    r = records[0]
    shifted = ["site-b", "site-c", "site-d"]
    for key in ("sex", "age_group"):
        for group in ("F", "M") if key == "sex" else ("18-64", "65+"):
            row = next(
                x
                for x in rows
                if x["condition"] == "finetune (full)" and x["key"] == key and x["x"] == group
            )
            vals = [
                r["subgroups"][s][key]["groups"][group]["balanced_accuracy"]
                for s in shifted
                if group in r["subgroups"][s][key]["groups"]
            ]
            assert num(row["value"]) == pytest.approx(np.mean(vals))
            assert row["ci"] == "pooled" and num(row["ci_low"]) <= num(row["ci_high"])


def test_provenance(single):
    files, records = single
    md = files.markdown.read_text()
    r = records[0]
    assert r["versions"]["torch"] in md and r["data"]["fingerprint"] in md
    assert r["command"] and r["command"] in md
    assert f"seed 0: {r['run_id']}" in md
    assert "method_options:" in md  # the configuration of each condition


def test_figures_in_every_format(single):
    files, _ = single
    assert files.figures
    for f in files.figures:
        assert set(f.files) == {"png", "svg", "pdf", "csv"}
        assert f.files["pdf"].read_bytes().startswith(b"%PDF")
        assert "<svg" in f.files["svg"].read_text()[:2000]
        assert f.files["png"].read_bytes().startswith(b"\x89PNG")


def test_each_predictions_file_is_read_once(tiny_runs, tmp_path, monkeypatch):
    import clinadapt.evaluation.report.predictions as predictions

    calls = []
    real = np.load
    monkeypatch.setattr(
        predictions.np, "load", lambda p, *a, **k: calls.append(p) or real(p, *a, **k)
    )
    out, records = tiny_runs["single"]
    write_report(out, tmp_path)
    assert sorted(str(p) for p in calls) == sorted(
        str(out / "predictions" / f"{r['run_id']}.npz") for r in records
    )


def test_report_command_writes_to_out_and_prints_every_file(tiny_runs, tmp_path):
    out, _ = tiny_runs["seeds"]
    dest = tmp_path / "paper"
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(dest)])
    assert res.exit_code == 0, res.output
    printed = [line.rsplit(": ", 1)[1] for line in res.output.splitlines() if ": " in line]
    written = sorted(p for p in dest.rglob("*") if p.is_file())
    assert sorted(set(printed)) == sorted(str(p) for p in written)
    assert (dest / "report.html").exists() and not (out / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(dest), "--json"])
    info = json.loads(res.output)
    assert info["report"] == str(dest / "report.html")
    assert sorted(info["files"]) == sorted(str(p) for p in written)


def test_report_errors(tiny_runs, tmp_path):
    out, records = tiny_runs["single"]
    with pytest.raises(ConfigError, match=r"unknown metric .balanced_acc.*balanced_accuracy"):
        write_report(out, tmp_path / "r", metric="balanced_acc")
    with pytest.raises(DataError, match="no result records"):
        write_report(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        write_report(out, tmp_path / "file")
    # a record whose predictions were not kept: no pooled intervals, everything else still drawn
    lone = tmp_path / "lone"
    lone.mkdir()
    write_record(lone / "one.json", records[2])
    files = write_report(lone)
    rows = figure_data(files, "corruption_balanced_accuracy_severity")
    assert {
        r["ci"] for r in rows if r["corruption"] == "mean over corruptions" and r["x"] != "0"
    } == {""}
    assert not any(f.name.endswith("reliability") for f in files.figures)


def test_shift_labels_name_what_sets_runs_apart():
    from clinadapt.evaluation.labels import shift_label

    def rec(protocol, options):
        return {"config": {}, "shift": {"protocol": protocol, "options": options}}

    assert shift_label(rec("domain", {"source": ["site-a", "site-b"]})) == (
        "domain (source site-a, site-b)"
    )
    assert shift_label(rec("lodo", {"holdout": "site-c"})) == (
        "leave-one-domain-out (holdout site-c)"
    )
    assert shift_label(rec("prevalence", {"prevalence": [0.7, 0.3]})) == "prevalence (0.70, 0.30)"
    assert shift_label(rec("corruption", {"severities": [1]})) == "corruption"


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_html_renders_in_headless_chromium(single, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(
            "no chromium/chromium-browser/google-chrome on PATH (apt-get install -y chromium)"
        )
    files, _ = single
    page = files.html
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,4000",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # plots are the only coloured things on the page: their pixels must be there, decoded
    saturation = img.max(-1) - img.min(-1)
    assert (saturation > 80).mean() > 0.01
    dom = subprocess.run(
        [*cmd[:5], "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count("<img") == len(files.figures) and "<table>" in dom


def test_tta_trace_panel_draws_the_records_trace(tiny_runs, tmp_path):
    """A TTA record's per-batch trace (record['tta']['trace'][set], columns of lists) is drawn."""
    out, records = tiny_runs["single"]
    runs = tmp_path / "runs"
    shutil.copytree(out / "predictions", runs / "predictions")
    tent = json.loads(json.dumps(records[1]))
    trace = {"position": [0, 32, 64], "entropy": [0.9, 0.5, 0.2], "reset": [0, 0, 1]}
    tent["tta"]["trace"] = {"site-b": trace}
    write_record(runs / "tent.json", tent)
    write_record(runs / "fit.json", records[0])
    files = write_report(runs, tmp_path / "report")
    rows = figure_data(files, "tta-trace")
    assert [(int(r["position"]), num(r["entropy"]), int(r["reset"])) for r in rows] == [
        (0, 0.9, 0),
        (32, 0.5, 0),
        (64, 0.2, 1),
    ]
    assert {r["condition"] for r in rows} == {"finetune → tent (norm)"}


def test_segmentation_and_classification_sections_each_show_their_tasks_metric(tiny_runs, tmp_path):
    """Without --metric each section shows its task's headline metric (segmentation: Dice on the
    images whose reference holds the class); before, a report of segmentation runs failed with
    "unknown metric 'balanced_accuracy'"."""
    from clinadapt.config import load_config
    from clinadapt.runner import run_experiment

    out = tmp_path / "runs"
    shutil.copytree(tiny_runs["single"][0], out)
    seg = run_experiment(
        load_config(
            None,
            method="seg-zeroshot",
            out_dir=str(out),
            shift="domain",
            shift_options={"source": "site-a", "target_split": "test"},
            data_options={"patients_per_site": 8},
            evaluation={"n_boot": 10},
        )
    )
    files = write_report(out, tmp_path / "report")
    names = [f.name for f in files.figures]
    assert "clinical-shift-seg-domain-source-site-a_dice_present_per-set" in names
    assert "clinical-shift-domain-source-site-a_balanced_accuracy_per-set" in names
    rows = figure_data(files, "clinical-shift-seg-domain-source-site-a_dice_present_per-set")
    for row in rows:
        if row["x"] in seg["ci"]:
            ci = seg["ci"][row["x"]]["dice_present"]
            assert num(row["value"]) == pytest.approx(seg["metrics"][row["x"]]["dice_present"])
            assert (num(row["ci_low"]), num(row["ci_high"])) == pytest.approx(
                (ci["low"], ci["high"])
            )
            assert num(row["n_images"]) == seg["counts"][row["x"]]["images"]
    md = files.markdown.read_text()
    assert "Dice (reference present) of each run" in md and "balanced accuracy of each run" in md
    # an asked metric that only the segmentation records hold still makes a report
    only_seg = write_report(out, tmp_path / "dice", metric="dice")
    assert any(f.name.endswith("_dice_per-set") for f in only_seg.figures)
