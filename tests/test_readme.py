"""The README's tour, YAML example and Python API run as written (in a scratch directory)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
CLI = [sys.executable, "-m", "clinadapt.cli"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _api_block() -> str:
    """The Python API section's block (it runs on its own, in a fresh folder)."""
    return next(b for b in _blocks("python") if "clinadapt.load_model" in b)


def _commands(block: str) -> list[list[str]]:
    out = []
    for line in block.replace("\\\n", " ").splitlines():  # join continued lines
        line = line.split("  #", 1)[0].strip()
        if line.startswith("clinadapt "):
            out.append(shlex.split(line)[1:])
    return out


def test_readme_names_the_two_setup_commands():
    bash = _blocks("bash")
    assert 'pip install -e ".[dev]"' in bash[0] and "clinadapt demo" in bash[0]
    assert bash[1].strip() == ".venv/bin/pytest"
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and ".venv/bin/clinadapt demo" in ci
    assert ".venv/bin/pytest" in ci


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path, monkeypatch):
    env = {**os.environ, "CLINADAPT_QUIET": "1", "COLUMNS": "200"}
    commands = [c for b in _blocks("bash")[2:] for c in _commands(b)]
    assert len(commands) >= 8, commands
    for block in _blocks("yaml"):  # each starts with "# <file name>"
        (tmp_path / block.splitlines()[0].lstrip("# ").strip()).write_text(block)
    for args in commands:
        proc = subprocess.run(
            CLI + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"clinadapt {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "clinadapt-runs" / "report.html").exists()
    monkeypatch.chdir(tmp_path)  # the other Python blocks read what the tour wrote
    for code in _blocks("python"):
        if code != _api_block():
            exec(compile(code, "README.md", "exec"), {})


@pytest.mark.slow
def test_readme_python_api_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _api_block()
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["features"].shape == (8, namespace["model"].feature_dim)
    assert "shifted" in namespace["record"]["summary"]["balanced_accuracy"]
    df = namespace["df"]  # load_records: one row per record x test set x metric
    assert set(df.run_id) == {namespace["record"]["run_id"]}
    assert len(namespace["auroc"]) == len(namespace["record"]["metrics"])


def test_readme_report_figure_is_the_demos():
    """The README shows a figure as the demo writes it: a small committed PNG whose name the
    README gives as the demo's own figure file."""
    from clinadapt.evaluation.report.figures import slug

    text = README.read_text()
    png = README.parent / "docs" / "demo-domain-shift.png"
    assert "](docs/demo-domain-shift.png)" in text
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size < 100_000
    demo_name = f"{slug('domain (source site-a)')}_balanced_accuracy_per-set.png"
    assert f"clinadapt-demo/figures/{demo_name}" in text
