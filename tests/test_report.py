"""Reports: aggregate tables over seeds, CSV, and an HTML page that renders in a real browser."""

import csv
import shutil
import subprocess
import zlib

import numpy as np
import pytest
from scipy import stats

from clinadapt.errors import DataError
from clinadapt.evaluation.aggregate import columns, format_cell, group_conditions, mean_ci
from clinadapt.evaluation.evaluate import evaluate
from clinadapt.evaluation.report import results_table, write_report
from clinadapt.store import write_arrays, write_record

DOMAINS = ["site-a", "site-b", "site-c"]


def _probs(rng, y, skill, k=4):
    logits = rng.normal(size=(len(y), k))
    logits[np.arange(len(y)), y] += skill
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def _record(out, method, seed, shift, sets, source=None):
    """A run record as the runner writes it, from synthetic predictions with a set skill."""
    rng = np.random.default_rng([zlib.crc32(f"{method}/{shift}".encode()), seed])
    evals, probs, labels = {}, {}, {}
    for name, skill in sets.items():
        y = rng.integers(0, 4, 80)
        p = _probs(rng, y, skill)
        meta = {"sex": rng.choice(["F", "M"], 80), "age_group": rng.choice(["18-64", "65+"], 80)}
        evals[name] = evaluate(y, p, "multiclass", meta, n_boot=20)
        probs[name], labels[name] = p, y
    in_domain = ["site-a"] if shift == "domain" else ["clean"]
    run_id = f"{method}-{shift}-s{seed}"
    cfg = {
        "model": "tiny-resnet",
        "method": method,
        "method_options": {"epochs": 2} if method == "finetune" else {},
        "shift": shift,
        "seed": seed,
        "target": None,
        "out_dir": str(out),
    }
    rec = {
        "run_id": run_id,
        "created": "2026-01-01T00:00:00+00:00",
        "config": cfg,
        "seed": seed,
        "versions": {},
        "data": {},
        "model": {},
        "method": {"name": method},
        "shift": {"protocol": shift, "options": {"source": ["site-a"]}, "in_domain": in_domain},
        "target": {"spec": "full"},
        "metrics": {k: e["metrics"] for k, e in evals.items()},
        "subgroups": {k: e["subgroups"] for k, e in evals.items()},
        "selective": {k: e["selective"] for k, e in evals.items()},
        "summary": {},
        "status": "ok",
    }
    if source:
        rec["source"] = source
    write_arrays(
        out / "predictions" / f"{run_id}.npz",
        **{f"probs/{k}": v for k, v in probs.items()},
        **{f"labels/{k}": v for k, v in labels.items()},
    )
    write_record(out / f"{run_id}.json", rec)
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recs = []
    for seed in range(3):
        recs.append(
            _record(out, "finetune", seed, "domain", {"site-a": 3, "site-b": 1, "site-c": 0.5})
        )
        recs.append(
            _record(
                out,
                "bn",
                seed,
                "domain",
                {"site-a": 3, "site-b": 2, "site-c": 1.5},
                source={"method": "finetune", "options": {"epochs": 2}},
            )
        )
    for seed in range(2):
        sets = {"clean": 3.0}
        for c in ("blur", "jpeg"):
            for s in (1, 3, 5):
                sets[f"{c}@{s}"] = 3.0 - 0.5 * s
        recs.append(_record(out, "finetune", seed, "corruption", sets))
    return out, recs


def test_mean_ci_is_the_t_interval():
    v = [0.5, 0.6, 0.7, 0.65]
    m, lo, hi = mean_ci(v)
    ref = stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    assert m == pytest.approx(np.mean(v))
    assert (lo, hi) == pytest.approx(ref)
    assert np.isnan(mean_ci([0.4])[1]) and format_cell(*mean_ci([0.4])) == "0.400"
    assert format_cell(0.5, 0.4, 0.62) == "0.500 ± 0.110"


def test_corruption_sets_collapse_to_severities(runs):
    _, recs = runs
    corr = recs[-1]
    cols = columns(corr, "accuracy")
    by_hand = np.mean([corr["metrics"][f"{c}@3"]["accuracy"] for c in ("blur", "jpeg")])
    assert cols["severity 3"] == pytest.approx(by_hand)
    shifted = [v["accuracy"] for k, v in corr["metrics"].items() if k != "clean"]
    assert cols["shifted mean"] == pytest.approx(np.mean(shifted))
    assert cols["worst"] == pytest.approx(min(v["accuracy"] for v in corr["metrics"].values()))
    header, _rows = results_table([corr], "accuracy")
    assert header[1:5] == ["clean (in-domain)", "severity 1", "severity 3", "severity 5"]


def test_write_report_tables_csv_and_recovery(runs):
    out, recs = runs
    path = write_report(out, metric="balanced_accuracy")
    conds = group_conditions(recs)
    # by shift, the source (finetune) before the test-time method (bn) that starts from it
    assert [(c.shift, c.method, len(c.records)) for c in conds] == [
        ("corruption", "finetune", 2),
        ("domain (source site-a)", "finetune", 3),
        ("domain (source site-a)", "bn", 3),
    ]
    md = (out / "report.md").read_text()
    assert "## domain (source site-a)" in md and "## corruption" in md
    # the CSV holds the mean and t-interval over seeds, recomputed here from the records
    rows = list(csv.DictReader((out / "results.csv").open()))
    row = next(
        r
        for r in rows
        if r["condition"].startswith("bn ")
        and r["column"] == "site-b"
        and r["metric"] == "balanced_accuracy"
    )
    vals = [
        r["metrics"]["site-b"]["balanced_accuracy"] for r in recs if r["config"]["method"] == "bn"
    ]
    m, lo, _hi = mean_ci(vals)
    assert float(row["mean"]) == pytest.approx(m, rel=1e-5)
    assert float(row["ci_low"]) == pytest.approx(lo, rel=1e-5)
    assert row["seeds"] == "3"
    # bn's gain over its finetuned source on the shifted sites
    shifted = lambda meth: np.mean(  # noqa: E731
        [
            np.mean([r["metrics"][s]["balanced_accuracy"] for s in ("site-b", "site-c")])
            for r in recs
            if r["config"]["method"] == meth and r["shift"]["protocol"] == "domain"
        ]
    )
    assert f"{shifted('bn') - shifted('finetune'):+.3f} (vs finetune)" in md
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 4  # bars, severity, reliability, risk-coverage
    assert "Reliability" in page and "Risk-coverage" in page and "gap by sex" in page


def test_report_without_predictions_or_records(tmp_path, runs):
    with pytest.raises(DataError, match="no result records"):
        write_report(tmp_path)
    _out, recs = runs
    write_record(tmp_path / "one.json", recs[0])  # its predictions stay behind
    page = write_report(tmp_path).read_text()
    assert page.count("data:image/png") == 1 and "no stored predictions" in page


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_html_renders_in_headless_chromium(runs, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(
            "no chromium/chromium-browser/google-chrome on PATH (apt-get install -y chromium)"
        )
    out, _ = runs
    page = write_report(out, out_dir=tmp_path)
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
    assert dom.count("<img") == 4 and "<table>" in dom


def test_shift_labels_name_what_sets_runs_apart():
    from clinadapt.evaluation.aggregate import shift_label

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
