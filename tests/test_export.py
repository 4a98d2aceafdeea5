"""Exports load in the original library alone and give the same outputs as clinadapt's model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.config import RunConfig
from clinadapt.errors import IncompatibleError
from clinadapt.export import export_model
from clinadapt.fitted import load_fitted
from clinadapt.runner import run_experiment

SMALL = {"patients_per_site": 8}
runner = CliRunner(env={"COLUMNS": "200"})


def _fit(tmp_path, model, target, method="finetune", **extra):
    options = {"epochs": 1} if method == "finetune" else {}
    cfg = RunConfig(
        model=model,
        target=target,
        method=method,
        method_options=options,
        data_options=SMALL,
        out_dir=str(tmp_path / "runs"),
        **extra,
    )
    record = run_experiment(cfg)
    return tmp_path / "runs" / f"{record['run_id']}.json", record


def _reference(record_path, x):
    """Logits of clinadapt's own rebuilt model (the thing each export must reproduce)."""
    fitted = load_fitted(record_path)
    with torch.no_grad():
        return fitted.model.eval()(x), fitted


def _head(folder):
    tensors = load_file(str(folder / "clinadapt_head.safetensors"))
    with safe_open(str(folder / "clinadapt_head.safetensors"), framework="pt") as f:
        meta = f.metadata()
    k, d = tensors["weight"].shape
    head = torch.nn.Linear(d, k, bias="bias" in tensors)
    head.load_state_dict(tensors)
    return head, json.loads(meta["normalize_features"]), json.loads(meta["class_names"])


def test_timm_export_with_lora_merged_loads_in_timm_alone(tmp_path):
    import timm

    path, record = _fit(tmp_path, "tiny-vit", "lora+head")
    x = torch.randn(3, 3, 32, 32)
    expected, fitted = _reference(path, x)
    folder = tmp_path / "timm"
    meta = export_model(path, "timm", folder)
    net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-4)
    assert "lora" not in " ".join(net.state_dict())  # merged: plain timm weights
    assert net.pretrained_cfg["label_names"] == record["data"]["class_names"]
    data = timm.data.resolve_model_data_config(net)
    assert data["input_size"] == (3, 32, 32)
    assert list(data["mean"]) == list(fitted.model.preprocess.mean)
    # the same file through pretrained_cfg_overlay, with the architecture's own arguments
    k = len(record["data"]["class_names"])
    again = timm.create_model(
        "vit_small_patch16_224",
        pretrained=True,
        num_classes=k,
        pretrained_cfg_overlay={"file": str(folder / "model.safetensors"), "num_classes": k},
        **meta["model_args"],
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=1e-4)
    info = json.loads((folder / "clinadapt_export.json").read_text())
    assert info["class_names"] == record["data"]["class_names"]
    assert info["adapted_from"]["run_id"] == record["run_id"]


def test_timm_export_keeps_batchnorm_statistics(tmp_path):
    import timm

    path, _ = _fit(tmp_path, "tiny-resnet", "full")
    x = torch.randn(2, 3, 64, 64)
    expected, _ = _reference(path, x)
    folder = tmp_path / "resnet"
    export_model(path, None, folder)  # the family's own format: timm
    net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-4)


def test_peft_adapter_applies_in_peft_and_timm_alone(tmp_path):
    import timm
    from peft import PeftModel

    from clinadapt.models import load_model

    path, record = _fit(tmp_path, "tiny-vit", "lora+head")
    x = torch.randn(2, 3, 32, 32)
    expected, _ = _reference(path, x)
    folder = tmp_path / "peft"
    export_model(path, "peft", folder)
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    # the base: what timm builds for this architecture (tiny-vit's weights are its seeded init)
    k = len(record["data"]["class_names"])
    base_state = load_model("tiny-vit").image_encoder.state_dict()
    base = timm.create_model(
        "vit_small_patch16_224",
        num_classes=k,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
    )
    missing, _ = base.load_state_dict(base_state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"}
    adapted = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-4)


def test_transformers_export_and_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModel

    from clinadapt.models import load_model

    path, record = _fit(tmp_path, "tiny-dinov2", "lora+head")
    x = torch.randn(2, 3, 32, 32)
    expected, _ = _reference(path, x)
    folder = tmp_path / "hf"
    meta = export_model(path, "transformers", folder)
    net = AutoModel.from_pretrained(str(folder)).eval()
    head, normalize, names = _head(folder)
    assert meta["pooling"] == "cls" and not normalize
    assert names == record["data"]["class_names"]
    assert net.config.id2label == dict(enumerate(names))
    processor = AutoImageProcessor.from_pretrained(str(folder))
    assert processor.size == {"height": 32, "width": 32}
    with torch.no_grad():
        torch.testing.assert_close(
            head(net(pixel_values=x).pooler_output), expected, atol=1e-5, rtol=1e-4
        )
    # the LoRA as a PEFT adapter on the untouched base
    adapter = tmp_path / "hf-peft"
    export_model(path, "peft", adapter)
    base_dir = tmp_path / "base"
    load_model("tiny-dinov2").image_encoder.save_pretrained(str(base_dir))
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir)), str(adapter))
    head, _, _ = _head(adapter)
    with torch.no_grad():
        out = head(adapted.eval()(pixel_values=x).pooler_output)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_open_clip_export_of_a_zero_shot_head(tmp_path):
    import open_clip

    path, record = _fit(tmp_path, "tiny-clip", None, method="zeroshot")
    x = torch.randn(2, 3, 32, 32)
    expected, _ = _reference(path, x)
    folder = tmp_path / "oc"
    export_model(path, "open_clip", folder)
    net = open_clip.create_model(f"local-dir:{folder}").eval()
    head, normalize, names = _head(folder)
    assert normalize and names == record["data"]["class_names"]
    with torch.no_grad():
        feats = net.encode_image(x)
        out = head(torch.nn.functional.normalize(feats, dim=-1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert (
        cfg["preprocess_cfg"]["size"] == [32, 32]
        and cfg["preprocess_cfg"]["resize_mode"] == "squash"
    )


def test_exports_refuse_what_the_format_cannot_hold(tmp_path):
    path, _ = _fit(tmp_path, "tiny-vit", "lora+head")
    with pytest.raises(IncompatibleError, match="needs a model of the open_clip family"):
        export_model(path, "open_clip", tmp_path / "x")
    knn, _ = _fit(tmp_path, "tiny-vit", None, method="knn")
    with pytest.raises(IncompatibleError, match="only linear heads"):
        export_model(knn, "timm", tmp_path / "y")
    resnet, _ = _fit(tmp_path, "tiny-resnet", "full")
    with pytest.raises(IncompatibleError, match="lora or lora\\+head"):
        export_model(resnet, "peft", tmp_path / "z")


def test_export_cli_json_and_text(tmp_path):
    path, record = _fit(tmp_path, "tiny-vit", "lora+head")
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "e"), "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["format"] == "timm" and str(tmp_path / "e" / "model.safetensors") in meta["files"]
    by_id = runner.invoke(
        app,
        [
            "export",
            record["run_id"],
            "--runs",
            str(tmp_path / "runs"),
            "--format",
            "peft",
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert by_id.exit_code == 0, by_id.output
    assert "adapter_config.json" in by_id.stdout and "load with:" in by_id.stdout
    taken = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "e")])
    assert taken.exit_code != 0 and "not an empty folder" in str(taken.exception)


def test_an_interrupted_export_leaves_nothing_that_looks_like_one(tmp_path, monkeypatch):
    """The folder appears in one rename when every file is written: a failure half-way leaves
    no --out folder (and no staging folder), and the same --out then exports afresh."""
    import clinadapt.export.timm_format as timm_format

    path, _ = _fit(tmp_path, "tiny-vit", "lora+head")
    folder = tmp_path / "exports" / "e"
    real = timm_format.export_timm

    def dies_after_the_weights(fitted, out):
        real(fitted, out)
        raise KeyboardInterrupt  # e.g. Ctrl-C before the export was reported

    monkeypatch.setattr(timm_format, "export_timm", dies_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        export_model(path, "timm", folder)
    assert not folder.exists() and list(folder.parent.iterdir()) == []
    monkeypatch.setattr(timm_format, "export_timm", real)
    meta = export_model(path, "timm", folder)
    assert (folder / "model.safetensors").is_file()
    on_disk = json.loads((folder / "clinadapt_export.json").read_text())
    assert (
        on_disk["load"]
        == meta["load"]
        == f'timm.create_model("local-dir:{folder}", pretrained=True)'
    )
    assert not any(".partial" in p.read_text(errors="ignore") for p in folder.iterdir())
    assert [p.name for p in folder.parent.iterdir()] == ["e"]
    assert oct(folder.stat().st_mode & 0o777) == oct((tmp_path / "exports").stat().st_mode & 0o777)


def test_export_cli_prints_what_the_head_takes(tmp_path):
    path, _ = _fit(tmp_path, "tiny-clip", None, method="zeroshot")
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "oc")])
    assert result.exit_code == 0, result.output
    expected = "head input: torch.nn.functional.normalize(model.encode_image(x), dim=-1)"
    assert expected in result.stdout


def test_the_peft_reload_hint_builds_the_base_model_in_its_library():
    """It said `<the hf base model>`; now the call that builds the base the adapter goes on."""
    from types import SimpleNamespace

    from clinadapt.export.peft_format import base_model_code

    def enc(name, family, source):
        return SimpleNamespace(name=name, family=family, source=source)

    assert (
        base_model_code(enc("hf-clip-vit-b16", "hf", "hub: openai/clip-vit-base-patch16 -> /c"))
        == "transformers.AutoModel.from_pretrained('openai/clip-vit-base-patch16')"
    )
    assert (
        base_model_code(enc("hf-clip-vit-b16", "hf", "local dir: /models/clip"))
        == "transformers.AutoModel.from_pretrained('/models/clip')"
    )
    assert (
        base_model_code(enc("clip-vit-b16", "open_clip", "hf cache: /c"))
        == "open_clip.create_model('ViT-B-16', pretrained='openai')"
    )
    assert (
        base_model_code(enc("clip-vit-b16", "open_clip", "file: /w/clip.bin"))
        == "open_clip.create_model('ViT-B-16', pretrained='/w/clip.bin')"
    )
    biomed = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert base_model_code(enc("biomedclip", "open_clip", "hub: x")) == (
        f"open_clip.create_model({biomed!r})"
    )
    random = base_model_code(enc("tiny-hf-clip", "hf", "random init"))
    assert "random weights" in random and "--format hf" in random
