"""Each export reloads in a fresh Python that never imports clinadapt, through the load line and
the ``features`` expression its metadata gives, and reproduces clinadapt's logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from clinadapt.config import RunConfig
from clinadapt.export import export_model
from clinadapt.fitted import load_fitted
from clinadapt.models import load_model
from clinadapt.runner import run_experiment

# the user's side: only torch, safetensors and the model's own libraries
CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    spec = json.load(open(sys.argv[1]))
    x = load_file(spec["x"])["x"]

    def head(folder):
        path = f"{folder}/clinadapt_head.safetensors"
        tensors = load_file(path)
        k, d = tensors["weight"].shape
        layer = torch.nn.Linear(d, k, bias="bias" in tensors)
        layer.load_state_dict(tensors)
        with safe_open(path, framework="pt") as f:
            names = json.loads(f.metadata()["class_names"])
        return layer, names

    def logits(case):
        folder, meta = case["folder"], json.load(open(f"{case['folder']}/clinadapt_export.json"))
        fmt = meta["format"]
        if fmt == "timm":
            import timm

            return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x)
        if fmt == "open_clip":
            import open_clip

            model = open_clip.create_model(f"local-dir:{folder}").eval()
        elif fmt == "transformers":
            from transformers import AutoModel

            model = AutoModel.from_pretrained(folder).eval()
        else:  # a PEFT adapter on the untouched base, loaded with its own library
            from peft import PeftModel

            if meta["base_family"] == "timm":
                import timm

                base = timm.create_model(
                    meta["architecture"], num_classes=len(meta["class_names"]),
                    **meta["model_args"],
                )
                base.load_state_dict(load_file(case["base"]), strict=False)
                return PeftModel.from_pretrained(base, folder).eval()(x)
            if meta["base_family"] == "open_clip":
                import open_clip

                base = open_clip.create_model(f"local-dir:{case['base']}")
            else:
                from transformers import AutoModel

                base = AutoModel.from_pretrained(case["base"])
            model = PeftModel.from_pretrained(base, folder).eval()
        layer, names = head(folder)
        assert names == meta["class_names"]
        return layer(eval(meta["features"], {"torch": torch, "model": model, "x": x}))

    with torch.no_grad():
        for case in spec["cases"]:
            expected = load_file(case["expected"])["logits"]
            torch.testing.assert_close(logits(case), expected, atol=1e-5, rtol=1e-4)
            print("reloaded", case["folder"])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "clinadapt")
    assert not leaked, leaked
    """
)


def _fit(tmp_path, model, target, method="finetune"):
    cfg = RunConfig(
        model=model,
        target=target,
        method=method,
        method_options={"epochs": 1} if method == "finetune" else {},
        data_options={"patients_per_site": 8},
        out_dir=str(tmp_path / "runs"),
    )
    return tmp_path / "runs" / f"{run_experiment(cfg)['run_id']}.json"


@pytest.mark.slow
def test_every_export_reloads_without_clinadapt(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    vit = _fit(tmp_path, "tiny-vit", "lora+head")
    clip = _fit(tmp_path, "tiny-clip", "lora+head")
    hf_clip = _fit(tmp_path, "tiny-hf-clip", "lora+head")
    # the untouched bases the adapters go on (tiny models: their seeded random weights)
    timm_base = tmp_path / "tiny-vit-base.safetensors"
    save_file(load_model("tiny-vit").image_encoder.state_dict(), str(timm_base))
    clip_base = tmp_path / "tiny-clip-base"
    export_model(_fit(tmp_path, "tiny-clip", None, "zeroshot"), "open_clip", clip_base)
    hf_base = tmp_path / "tiny-hf-clip-base"
    load_model("tiny-hf-clip").library_model.save_pretrained(str(hf_base))
    cases = []
    for record, fmt, base in (
        (vit, "timm", None),
        (vit, "peft", timm_base),
        (clip, "open_clip", None),
        (clip, "peft", clip_base),
        (hf_clip, "transformers", None),
        (hf_clip, "peft", hf_base),
    ):
        folder = tmp_path / f"{record.stem}-{fmt}"
        meta = export_model(record, fmt, folder)
        assert meta["class_names"] == load_fitted(record).class_names
        with torch.no_grad():
            logits = load_fitted(record).model.eval()(x)
        expected = tmp_path / f"{folder.name}-logits.safetensors"
        save_file({"logits": logits.contiguous()}, str(expected))
        cases.append({"folder": str(folder), "base": str(base), "expected": str(expected)})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"x": str(tmp_path / "x.safetensors"), "cases": cases}))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(spec)], capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("reloaded") == len(cases)
