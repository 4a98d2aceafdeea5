"""Files clinadapt reads that it did not write: nothing they hold may run, and each refusal is one
line naming the file."""

import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from clinadapt.cli import main
from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.models import load_model
from clinadapt.ssl import make_config, pretrain


class WritesAFile:
    """A pickle payload: unpickling it calls exec, which writes ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def _evil(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"step": WritesAFile(marker), "model": {}}, f)
    return path


def _cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["clinadapt", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


PRETRAIN = ["pretrain", "--method", "simclr", "--model", "tiny-vit", "--data", "clinical-shift"]
PRETRAIN += ["--max-steps", "1", "--batch-size", "4", "--quiet"]


def test_pretrain_does_not_run_a_crafted_checkpoint(tmp_path, capsys, monkeypatch):
    """Resuming from an --out folder whose checkpoint.pt is a malicious pickle: refused unread."""
    marker = tmp_path / "ran.txt"
    out = tmp_path / "out"
    _evil(out / "checkpoint.pt", marker)
    code, err = _cli([*PRETRAIN, "--out", str(out)], capsys, monkeypatch)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert code == 2 and str(out / "checkpoint.pt") in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_pretrain_from_a_malicious_or_corrupt_file_is_one_line(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran.txt"
    evil = _evil(tmp_path / "weights.pt", marker)
    code, err = _cli(
        [*PRETRAIN, "--out", str(tmp_path / "o1"), "--from", str(evil)], capsys, monkeypatch
    )
    assert not marker.exists()
    assert code == 2 and str(evil) in err and "refused" in err
    assert len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    code, err = _cli(
        [*PRETRAIN, "--out", str(tmp_path / "o2"), "--from", str(junk)], capsys, monkeypatch
    )
    assert code == 2 and str(junk) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model", ["tiny-resnet", "tiny-vit", "tiny-clip"])
def test_weights_that_are_a_malicious_pickle_are_refused_naming_the_file(tmp_path, model):
    marker = tmp_path / "ran.txt"
    evil = _evil(tmp_path / "w.pt", marker)
    with pytest.raises(IncompatibleError, match="refused") as exc:
        load_model(model, weights=evil)
    assert not marker.exists()
    assert str(evil) in str(exc.value) and "\n" not in str(exc.value)


def test_transformers_folder_with_a_malicious_bin_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    folder = tmp_path / "hf"
    _evil(folder / "pytorch_model.bin", marker)
    (folder / "config.json").write_text("{}")
    with pytest.raises(IncompatibleError, match="refused") as exc:
        load_model("tiny-hf-clip", weights=folder)
    assert not marker.exists() and str(folder) in str(exc.value)


def test_foreign_weights_are_one_line_naming_the_file(tmp_path):
    foreign = tmp_path / "other.pt"
    torch.save({"some.other.layer": torch.zeros(3)}, foreign)
    with pytest.raises(IncompatibleError) as exc:
        load_model("tiny-clip", weights=foreign)
    assert str(foreign) in str(exc.value) and "\n" not in str(exc.value)
    corrupt = tmp_path / "half.safetensors"
    save_file({"w": torch.zeros(64)}, str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    with pytest.raises(IncompatibleError) as exc:
        load_model("tiny-resnet", weights=corrupt)
    assert str(corrupt) in str(exc.value) and "\n" not in str(exc.value)


def test_resuming_a_pretraining_with_another_lr_is_refused(tmp_path):
    """The optimiser state would keep the old lr while the summary recorded the new one."""
    common = dict(
        model="tiny-vit",
        method="simclr",
        method_options={"proj_dim": 16},
        data_options={"patients_per_site": 8},
        max_steps=2,
        batch_size=8,
        out_dir=str(tmp_path / "run"),
        evaluate=False,
    )
    first = pretrain(make_config(**common, lr=1e-3))
    assert first["optimizer"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"lr=0\.001 \(now 0\.01\)"):
        pretrain(make_config(**common, lr=1e-2))
    again = pretrain(make_config(**common, lr=1e-3))  # the same settings: finished, nothing new
    assert again["steps"] == 2 and again["optimizer"]["lr"] == pytest.approx(1e-3)


def test_segmenter_checkpoint_that_is_a_malicious_pickle_is_one_line(tmp_path, capsys, monkeypatch):
    """`segment --weights` and segmentation runs read SAM/MedSAM .pth files: a pickle that
    would run code is refused in one line naming the file (not torch's multi-line text)."""
    from PIL import Image

    marker = tmp_path / "ran.txt"
    evil = _evil(tmp_path / "medsam.pth", marker)
    image = tmp_path / "x.png"
    Image.new("L", (16, 16), 90).save(image)
    args = ["segment", "--image", str(image), "--model", "tiny-sam", "--box", "1,1,8,8"]
    args += ["--weights", str(evil), "--out", str(tmp_path / "masks"), "--quiet"]
    code, err = _cli(args, capsys, monkeypatch)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert code == 2 and str(evil) in err and "refused" in err
    assert len(err.strip().splitlines()) == 1, err
    # a transformers folder (config.json + pytorch_model.bin) goes through from_pretrained
    folder = tmp_path / "sam"
    _evil(folder / "pytorch_model.bin", marker)
    (folder / "config.json").write_text('{"model_type": "sam"}')
    args[args.index(str(evil))] = str(folder)
    code, err = _cli(args, capsys, monkeypatch)
    assert not marker.exists()
    assert code == 2 and str(folder) in err and "refused" in err
    assert len(err.strip().splitlines()) == 1, err
