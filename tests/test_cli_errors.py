"""How the command line fails: one plain line naming the problem, JSON with --json, no hang."""

import json
import subprocess
import sys

import pytest

from clinadapt.cli import main
from clinadapt.errors import brief, clip_message


def _fail(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["clinadapt", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_error_text_is_printed_verbatim_not_as_markup(tmp_path, capsys, monkeypatch):
    """Brackets in paths and lists of names reach the user as they are."""
    missing = tmp_path / "runs[1]" / "[bold]x"
    code, _, err = _fail(["report", str(missing)], capsys, monkeypatch)
    assert code == 2
    assert str(missing) in err and err.startswith("error: ")
    code, _, err = _fail(
        [
            "run",
            "--set",
            "data_options.patients_per_site=5",
            "--set",
            "shift_options.source=site-z",
            "--out",
            str(tmp_path),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert "['site-z']" in err and "['site-a', 'site-b', 'site-c', 'site-d']" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_json_prints_an_error_object_on_stdout(tmp_path, capsys, monkeypatch):
    code, out, err = _fail(["run", "--model", "no-such-model", "--json"], capsys, monkeypatch)
    assert code == 2
    payload = json.loads(out)
    assert payload["error"]["type"] == "RegistryError"
    assert "no-such-model" in payload["error"]["message"]
    assert "no-such-model" in err  # and the human line on stderr
    # a usage error (unknown option) is an error object too
    code, out, _ = _fail(["models", "--json", "--no-such-flag"], capsys, monkeypatch)
    assert code == 2 and "--no-such-flag" in json.loads(out)["error"]["message"]


def test_yaml_alias_bomb_fails_at_once(tmp_path):
    """600 bytes of nested aliases expand to 9**9 values: refused before anything copies them."""
    lines = ["method: finetune", "method_options:", "  a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append("  bomb: *a8")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    assert len(cfg.read_bytes()) < 700
    for args in (["run", str(cfg)], ["run", "--set", f"method_options={cfg.read_text()}"]):
        proc = subprocess.run(
            [sys.executable, "-m", "clinadapt.cli", *args, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert "expands to more than" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (b"method: [unclosed\n", "at line 2, column 1"),  # PyYAML's own text spans 8 lines
        (b"method: tent\n  bad: indent\n", "at line 2, column 6"),
        (b"\xff\xfe\x00binary", "cannot read it as a YAML text file"),
        (b"method: seg-zeroshot\nmodel: tiny-sam\nprompt: {kind: sideways}\n", "prompt: "),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch, text, expect):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(text)
    code, _, err = _fail(["run", str(cfg), "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == 2 and str(cfg) in err and expect in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    code, _, err = _fail(["run", str(tmp_path), "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == 2 and "is not a file" in err


def test_brief_and_clip_bound_what_a_message_shows():
    x = ["x"] * 9
    for _ in range(8):
        x = [x] * 9  # 9**9 leaves behind a small object: brief must not walk them all
    text = brief({"bomb": x})
    assert len(text) <= 200 and text.startswith("{'bomb': [[")
    assert "..." in brief("a" * 1000) and len(brief("a" * 1000)) <= 200
    assert clip_message("y" * 10, limit=4) == "yyyy ... (6 more characters)"
    assert clip_message("short") == "short"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--image", "{tmp}/missing.png", "--box", "1,2,3,4"], "missing.png: no such image file"),
        (["--image", "{img}", "--box", "1,2"], "--box '1,2': expected 4 comma-separated numbers"),
        (["--image", "{img}", "--point", "a,b"], "--point 'a,b': expected 2"),
        (["--image", "{img}", "--prompts", "{tmp}/p.json"], "p.json' does not exist"),
        (["--image", "{img}"], "no prompt: give --box / --point"),
        (["--data", "clinical-shift-seg", "--derive", "boxes"], "'box', 'points'"),
        (["--image", "{img}", "--box", "1,2,3,4", "--out", "{img}"], "is a file, not a folder"),
        (["--image", "{img}", "--box", "1,2,3,4", "--modality", "mri"], "only ct changes"),
    ],
)
def test_segment_checks_its_arguments_before_loading_a_model(
    tmp_path, capsys, monkeypatch, args, expected
):
    """The default model (MedSAM) has no weights here: each error must be about the argument."""
    img = tmp_path / "x.png"
    img.write_bytes(b"not read before the model loads")
    args = [a.format(tmp=tmp_path, img=img) for a in args]
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path / "no-models"))
    code, _, err = _fail(["segment", *args], capsys, monkeypatch)
    assert code == 2 and expected in err, err
    assert "medsam" not in err.lower()


def test_fewshot_refuses_an_unknown_metric_before_it_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "fs"
    args = [
        "fewshot",
        "--metric",
        "balanced_acc",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--out",
        str(out),
    ]
    code, _, err = _fail(args, capsys, monkeypatch)
    assert code == 2 and "did you mean 'balanced_accuracy'?" in err
    assert not out.exists()  # nothing embedded, nothing written


def test_demo_with_a_file_as_out_prints_only_the_error(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    code, _, err = _fail(["demo", "--out", str(a_file)], capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --out {str(a_file)!r} is a file, not a folder; choose a folder"
    ]
