"""clinadapt on a GPU in one command of a few minutes: the demo, a fine-tuning throughput check
with AMP, the TTA, target and loading benchmarks, every CUDA code path once, and the precision
and segmentation checks.

    bash benchmarks/gpu.sh --budget-s 330     # wheels from ./.whl first; or:
    PYTHONPATH=src python benchmarks/gpu.py --budget-s 330
    bash benchmarks/gpu.sh --device cpu       # a rehearsal on the CPU, small

Each step runs in its own process with its own time cap, cut to what is left of the budget
(counted from ``GPU_BENCH_T0``, which gpu.sh sets before it installs the wheels); a step that
fails, is cut short or cannot import a package is reported and the next one runs. The summary
(``summary.txt``, ``summary.json``) and each step's log (``logs/STEP.log``) are written to
``--out`` (default ``$OUT``, else ``gpu-bench``) after every step, figures as soon as measured.

Steps, in order (the most wanted first; the budget drops the last ones):
  check        packages, versions, the CUDA device
  demo         the demo's six runs on the GPU, wall time and balanced accuracies
  finetune     the input pipeline alone (float32 preprocessed on the CPU vs uint8 batches with
               the float work on the GPU), then training images/s of ViT-B/16 and ResNet-50
               (224 px, batch 128): a bare PyTorch loop on tensors already on the GPU in fp32,
               bf16, fp16 against clinadapt's finetune (fp32 and bf16 with 0 loader workers,
               bf16 with 4)
  tta          benchmarks/bench_tta.py (source, bn, tent vs the reference Tent, sar)
  paths        short runs through every method kind, target, pre-training and file loading
  precision    benchmarks/gpu_check_precision.py (fp32/bf16/fp16, tent from source.from, export)
  segmentation benchmarks/gpu_check_segmentation.py
  targets      benchmarks/bench_targets.py
  loading      benchmarks/bench_loading.py (PNGs, float vs uint8 path, 0/2/4 workers, pinned
               memory; workers started per epoch vs kept)
  same         a source model trained once: source/bn/tent on the GPU vs the CPU (NLL within 1e-3)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# import name -> the distribution to carry as a wheel when it is missing (pyproject.toml's pins
# and what they import at run time; benchmarks/gpu_wheels.sh downloads them)
NEEDED = {
    "torch": "torch (a CUDA build)",
    "torchvision": "torchvision (the build that matches torch)",
    "numpy": "numpy",
    "scipy": "scipy",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
    "pydantic": "pydantic==2.14.3",
    "typer": "typer==0.29.1",
    "rich": "rich==15.0.0",
    "huggingface_hub": "huggingface_hub",
    "timm": "timm==1.0.31",
    "open_clip": "open_clip_torch==3.3.0",
    "transformers": "transformers==5.23.0",
    "peft": "peft==0.21.2",
    "pydicom": "pydicom==3.0.2",
    "nibabel": "nibabel==5.4.2",
    "monai": "monai==1.6.1",
}


def elapsed() -> float:
    """Seconds since the benchmark started (gpu.sh's clock when it set one, else this process)."""
    return time.time() - T0


T0 = float(os.environ.get("GPU_BENCH_T0") or time.time())


class Rec:
    """One step's figures and lines, written to its JSON file as soon as each arrives (so a step
    cut short by its time cap still reports what it measured)."""

    def __init__(self, path: Path, device: str, steps: int) -> None:
        self.path, self.device, self.steps = path, device, steps
        self.data: dict[str, Any] = {"figures": {}, "lines": []}

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def fig(self, key: str, value: Any) -> None:
        self.data["figures"][key] = value
        self.flush()

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.data["lines"].append(text)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and math.isfinite(a) and math.isfinite(b) else "n/a"


def sync(rec: Rec) -> None:
    if rec.cuda:
        import torch

        torch.cuda.synchronize()


# --- steps run in a child process -----------------------------------------------------------
def step_check(rec: Rec, work: Path) -> None:
    missing = []
    for module, dist in NEEDED.items():
        try:
            m = importlib.import_module(module)
            rec.fig(module, getattr(m, "__version__", "?"))
        except Exception as e:
            missing.append(f"{dist} ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    rec.fig("python", platform.python_version())
    if missing:
        rec.line("missing: " + "; ".join(missing))
    import torch

    rec.fig("torch cuda", torch.version.cuda)
    if rec.cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        rec.fig("device", torch.cuda.get_device_name(0))
        rec.fig("bf16", torch.cuda.is_bf16_supported())
        rec.fig("TF32 convolutions (cuDNN default)", torch.backends.cudnn.allow_tf32)
        free, total = torch.cuda.mem_get_info()
        rec.fig("memory GiB free/total", f"{free / 2**30:.0f}/{total / 2**30:.0f}")
    import clinadapt.runner  # the modules every run needs

    rec.fig("clinadapt", getattr(clinadapt.runner, "__name__", "?"))
    if missing:
        raise RuntimeError(
            f"{len(missing)} package(s) missing: put their wheels in .whl "
            "(benchmarks/gpu_wheels.sh); the steps that need them fail"
        )


def step_demo(rec: Rec, work: Path) -> None:
    from clinadapt.demo import demo_configs
    from clinadapt.runner import run_experiment

    t = time.perf_counter()
    records = []
    for cfg in demo_configs(str(work / "demo"), device=rec.device):
        records.append(run_experiment(cfg))
        rec.line(f"{cfg.method} / {cfg.shift}: {time.perf_counter() - t:.1f} s so far")
    rec.fig(f"demo six runs on {rec.device}, s", round(time.perf_counter() - t, 1))
    ba = {k: round(v["balanced_accuracy"], 3) for k, v in records[0]["metrics"].items()}
    rec.fig("finetune balanced accuracy per site", ba)
    shifted = {
        r["config"]["method"]: round(r["summary"]["balanced_accuracy"]["shifted"], 3)
        for r in records[:3]
    }
    rec.fig("shifted mean balanced accuracy", shifted)


def step_finetune(rec: Rec, work: Path) -> None:
    """Training images/s: a bare timm loop (fp32, bf16, fp16) against clinadapt's finetune."""
    import numpy as np
    import timm
    import torch

    from clinadapt.classifier import ImageClassifier
    from clinadapt.data.base import ArraySource, ClinicalDataset
    from clinadapt.methods import METHODS, Context
    from clinadapt.models import load_model

    dev, steps = rec.device, rec.steps
    torch.backends.cudnn.benchmark = True
    batch, size = (128, 224) if rec.cuda else (4, 64)
    archs = ("vit_base_patch16_224", "resnet50") if rec.cuda else ("resnet18",)
    precisions = ("fp32", "bf16", "fp16") if rec.cuda else ("fp32", "bf16")
    n = batch * steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n + batch, size, size), dtype=np.uint8)
    ds = ClinicalDataset(
        "throughput",
        ArraySource(images),
        rng.integers(0, 4, n + batch),
        ["a", "b", "c", "d"],
        metadata={"split": np.array(["train"] * n + ["val"] * batch)},
    )
    train, val = ds.split("train"), ds.split("val")
    input_pipeline(rec, train, batch, size)
    for arch in archs:
        key = f"{arch} train images/s, batch {batch}, {size} px"
        extra = {"img_size": size} if "vit" in arch else {}
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, 4, (batch,), device=dev)
        fig: dict[str, str] = {}
        bare: dict[str, float] = {}
        for precision in precisions:
            torch.manual_seed(0)
            m = timm.create_model(arch, pretrained=False, num_classes=4, **extra).to(dev).train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(dev, enabled=precision == "fp16")
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

            def step(m=m, opt=opt, scaler=scaler, dtype=dtype, x=x, y=y) -> None:
                with torch.autocast(dev, dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
                    loss = torch.nn.functional.cross_entropy(m(x).float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

            for _ in range(3):
                step()
            sync(rec)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(rec)
            bare[precision] = batch * steps / (time.perf_counter() - t)
            fig[f"bare {precision}"] = f"{bare[precision]:.0f}"
            if precision != "fp32":
                fig[f"bare {precision} / fp32"] = fmt_ratio(bare[precision], bare["fp32"])
            rec.fig(key, dict(fig))
            del m, opt
        # clinadapt's finetune: grey uint8 images in memory, batches stacked as uint8 (in the
        # loader workers when there are any), pinned, the float work on the GPU
        method = METHODS.get("finetune")()
        opts = method.parse_options({"epochs": 1, "patience": None})
        for precision, workers in (("fp32", 0), ("bf16", 0), ("bf16", 4)):
            torch.manual_seed(0)
            encoder = load_model(f"timm:{arch}", pretrained=False, **extra)
            model = ImageClassifier(encoder, 4).to(dev)
            ctx = Context(batch_size=batch, device=dev, loader_workers=workers, precision=precision)
            sync(rec)
            t = time.perf_counter()
            with ctx.autocast():
                method.fit(model, train, val, opts, ctx)
            sync(rec)
            ips = (n + batch) / (time.perf_counter() - t)
            fig[f"clinadapt finetune {precision}, {workers} loader workers"] = (
                f"{ips:.0f} ({fmt_ratio(ips, bare[precision])} of the bare {precision} loop; "
                "one epoch with its validation pass, uint8 batches, float work on the GPU)"
            )
            rec.fig(key, dict(fig))
            del model
        if rec.cuda:
            torch.cuda.empty_cache()


def input_pipeline(rec: Rec, ds: Any, batch: int, size: int) -> None:
    """Images/s of the batches alone, onto the device as a 3-channel model's input: float32
    preprocessed on the CPU then copied (the path before) vs uint8 copied, float on the device."""
    import numpy as np

    from clinadapt.models.base import Preprocessing

    pp = Preprocessing((size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3)

    def rate(workers: int, on: str | None) -> float:
        t = time.perf_counter()
        for x, _, _ in ds.batches(pp, batch, workers=workers, pin_memory=rec.cuda, device=on):
            x.to(rec.device, non_blocking=rec.cuda)
        sync(rec)
        return len(ds) / (time.perf_counter() - t)

    rate(0, rec.device)  # warm-up: kernels, pinned-memory pool
    fig: dict[str, str] = {}
    # the same images through both paths: the device's kernels against the CPU's (the resize
    # is antialiased in both); on the CPU the two are bit for bit equal (tests)
    imgs = [ds.image(i) for i in range(min(batch, len(ds)))]
    for shape in ((size, size), (size + 32, size + 17)):  # native size, and a resize
        views = [np.resize(im, shape) for im in imgs]
        cpu = pp(views)
        dev = pp.device_stage(pp.host_stage(views), rec.device).cpu()
        fig[f"max |device - CPU| at {shape[0]}x{shape[1]}"] = f"{(dev - cpu).abs().max():.2e}"
    for workers in (0, 4):
        old, new = rate(workers, None), rate(workers, rec.device)
        fig[f"{workers} workers: float32 on the CPU"] = f"{old:.0f}"
        fig[f"{workers} workers: uint8, float on the device"] = (
            f"{new:.0f} ({fmt_ratio(new, old)} the float32 path)"
        )
        rec.fig(f"input pipeline images/s, grey {size} px uint8 in memory, batch {batch}", fig)


def step_paths(rec: Rec, work: Path) -> None:
    """Every kind of method, target, pre-training and file loading once on the device."""
    import numpy as np
    from PIL import Image

    from clinadapt.config import RunConfig
    from clinadapt.runner import run_experiment
    from clinadapt.ssl import make_config
    from clinadapt.ssl import pretrain as run_pretrain

    dev = rec.device
    pngs = work / "pngs"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("normal", "effusion")):
        (pngs / name).mkdir(parents=True, exist_ok=True)
        for i in range(24):
            img = (rng.integers(0, 120, (72, 64)) + 100 * c).astype(np.uint8)
            Image.fromarray(img).save(pngs / name / f"{i:03d}.png")
    tiny = {"data_options": {"patients_per_site": 8}, "evaluation": {"n_boot": 20}}
    quick = {"source": {"options": {"epochs": 1}}}
    fit1 = {"method_options": {"epochs": 1}}
    shots = {"data_options": {"patients_per_site": 30}}  # K distinct patients per class
    runs: dict[str, dict[str, Any]] = {
        "finetune tiny-resnet": {**fit1},
        "finetune tiny-resnet fp16 (loss scaling)": {"precision": "fp16", **fit1},
        "finetune tiny-vit lora+head": {"model": "tiny-vit", "target": "lora+head", **fit1},
        "finetune tiny-vit adapter+head": {"model": "tiny-vit", "target": "adapter+head", **fit1},
        "finetune tiny-vit prompt+head": {"model": "tiny-vit", "target": "prompt+head", **fit1},
        "finetune tiny-swin last-k+head": {"model": "tiny-swin", "target": "last-k+head", **fit1},
        "adaptive temperature tiny-vit": {
            "model": "tiny-vit",
            "adaptive_temperature": True,
            **fit1,
        },
        "linear-probe": {"method": "linear-probe"},
        "prototype 2-shot": {"method": "prototype", "method_options": {"shots": 2}, **shots},
        "knn": {"method": "knn"},
        "zeroshot tiny-clip": {"model": "tiny-clip", "method": "zeroshot"},
        "tip-adapter-f tiny-clip": {
            "model": "tiny-clip",
            "method": "tip-adapter-f",
            "method_options": {"shots": 2},
            **shots,
        },
        "coop tiny-clip": {
            "model": "tiny-clip",
            "method": "coop",
            "method_options": {"epochs": 1, "shots": 2},
            **shots,
        },
        "dapl tiny-clip": {"model": "tiny-clip", "method": "dapl", "method_options": {"epochs": 1}},
        "tpt tiny-clip": {"model": "tiny-clip", "method": "tpt", "source": {"method": "zeroshot"}},
        "tda tiny-clip": {"model": "tiny-clip", "method": "tda", "source": {"method": "zeroshot"}},
        **{
            f"{m} tiny-resnet": {"method": m, **quick}
            for m in ("bn", "tent", "eata", "sar", "t3a", "vnl", "tttpp")
        },
        "tent tiny-resnet bf16": {"method": "tent", "precision": "bf16", **quick},
        "memo tiny-resnet": {"method": "memo", "method_options": {"augmentations": 4}, **quick},
        "tent tiny-vit lora continual": {
            "model": "tiny-vit",
            "method": "tent",
            "target": "lora",
            "tta_protocol": "continual",
            **quick,
        },
        "finetune on PNG files, 2 workers, pinned": {
            "data": str(pngs),
            "shift": "none",
            "loader_workers": 2,
            "data_options": {},
            **fit1,
        },
    }
    if not rec.cuda:  # fp16 autocast is a CUDA feature
        runs.pop("finetune tiny-resnet fp16 (loss scaling)")
    failed = []
    for name, fields in runs.items():
        t = time.perf_counter()
        cfg = {**tiny, **fields, "device": dev, "out_dir": str(work / "paths")}
        try:
            r = run_experiment(RunConfig(**cfg), write=False)
            vals = [v for m in r["metrics"].values() for v in m.values()]
            assert r["status"] == "ok", f"status {r['status']}"
            bad = [v for v in vals if isinstance(v, float) and math.isinf(v)]
            assert not bad, f"infinite metrics {bad[:3]}"
            if cfg.get("precision"):
                assert r["compute"]["autocast"], f"{cfg['precision']} did not autocast"
            rec.line(f"ok     {name} ({time.perf_counter() - t:.1f} s)")
        except Exception as e:
            failed.append(name)
            rec.line(f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for method, options in (("simclr", {}), ("mae", {"decoder_dim": 32, "decoder_depth": 1})):
        t = time.perf_counter()
        precision = ("fp16" if rec.cuda else "bf16") if method == "simclr" else "fp32"
        try:
            run_pretrain(
                make_config(
                    model="tiny-vit",
                    method=method,
                    method_options=options,
                    data_options={"patients_per_site": 8},
                    out_dir=str(work / f"pretrain-{method}"),
                    max_steps=5,
                    batch_size=16,
                    device=dev,
                    precision=precision,
                    eval_baseline=False,
                )
            )
            rec.line(f"ok     pretrain {method} {precision} ({time.perf_counter() - t:.1f} s)")
        except Exception as e:
            failed.append(f"pretrain {method}")
            rec.line(f"FAILED pretrain {method}: {type(e).__name__}: {str(e).splitlines()[0]}")
    rec.fig(f"runs on {dev}", f"{len(runs) + 2 - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def step_same(rec: Rec, work: Path) -> None:
    """A model trained once (CPU), then evaluated and adapted on each device: same numbers
    (TF32 off for this check: cuDNN's default TF32 convolutions differ from fp32 by ~1e-3)."""
    import torch

    from clinadapt.config import RunConfig
    from clinadapt.runner import run_experiment

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    common = dict(
        data_options={"patients_per_site": 20},
        out_dir=str(work / "same"),
        evaluation={"n_boot": 50},
        source={"options": {"epochs": 3}},
    )
    run_experiment(
        RunConfig(method="finetune", method_options={"epochs": 3}, device="cpu", **common)
    )
    worst = {}
    for method in ("source", "bn", "tent"):
        by_device = {}
        for device in ("cpu", rec.device):
            r = run_experiment(RunConfig(method=method, device=device, **common), write=False)
            assert r["source"]["training"].get("reused"), "the source model was trained again"
            by_device[device] = r["metrics"]
        a, b = by_device["cpu"], by_device[rec.device]
        worst[method] = round(max(abs(a[s]["nll"] - b[s]["nll"]) for s in a), 5)
        rec.fig(f"largest NLL difference cpu vs {rec.device}", dict(worst))
    assert max(worst.values()) <= 1e-3, f"{rec.device} and cpu disagree: {worst}"


CHILD_STEPS: dict[str, Callable[[Rec, Path], None]] = {
    "check": step_check,
    "demo": step_demo,
    "finetune": step_finetune,
    "paths": step_paths,
    "same": step_same,
}


def check_script_imports(rec: Rec, script: Path) -> None:
    """CPU rehearsal of a CUDA-only script: every clinadapt name it imports exists."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clinadapt"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")
    rec.line(f"{script.name}: needs CUDA; on the CPU its clinadapt imports were checked")


def run_child(name: str, rec: Rec, work: Path) -> int:
    """The body of a step's process: 0 ok, 1 failed (the reason is the last line of stderr)."""
    os.environ.setdefault("CLINADAPT_QUIET", "1")
    try:
        if name in CHILD_STEPS:
            CHILD_STEPS[name](rec, work)
        else:  # a CUDA-only check script, rehearsed on the CPU
            check_script_imports(rec, BENCH / f"gpu_check_{name}.py")
        return 0
    except BaseException as e:
        import traceback

        traceback.print_exc()
        print(f"STEP FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return 1


# --- the orchestrator (imports nothing heavy: it survives any missing package) --------------
# name, time cap in seconds on the GPU, command (None: a step of this file)
def plan(device: str, steps: int) -> list[tuple[str, float, list[str] | None]]:
    cuda = device == "cuda"
    py = [sys.executable]
    check = (
        (lambda s: [*py, str(BENCH / f"gpu_check_{s}.py")]) if cuda else (lambda s: None)
    )  # on the CPU: only their imports (they refuse to run without CUDA)
    return [
        ("check", 45, None),
        ("demo", 60, None),
        ("finetune", 80, None),
        (
            "tta",
            50,
            [
                *py,
                str(BENCH / "bench_tta.py"),
                f"--device={device}",
                f"--images={1024 if cuda else 64}",
                "--batch-size=64",
                "--repeats=2",
                "--rounds=1",
                "--methods=source,bn,tent-ref,tent,sar",
            ],
        ),
        ("paths", 80, None),
        ("precision", 70, check("precision")),
        ("segmentation", 60, check("segmentation")),
        (
            "targets",
            35,
            py
            + [str(BENCH / "bench_targets.py"), f"--device={device}"]
            + (["--batch=32", "--repeats=2"] if cuda else ["--batch=2", "--repeats=1"]),
        ),
        (
            "loading",
            35,
            [
                *py,
                str(BENCH / "bench_loading.py"),
                f"--device={device}",
                f"--images={512 if cuda else 64}",
                "--repeats=1",
                "--epochs=3",
            ],
        ),
        ("same", 40, None),
    ]


class Summary:
    def __init__(self, out: Path, budget: float, device: str) -> None:
        self.out, self.budget, self.device = out, budget, device
        self.steps: list[dict[str, Any]] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def text(self) -> str:
        lines = [
            f"clinadapt GPU benchmark on {self.device}: {elapsed():.0f} s of a "
            f"{self.budget:.0f} s budget (wheel install included)"
        ]
        for s in self.steps:
            lines.append(f"[{s['status'].split(' ')[0]:>9}] {s['step']} ({s.get('seconds', 0)} s)")
            if s["status"] != "ok":
                lines.append(f"            {s['status']}")
            for k, v in s["figures"].items():
                lines.append(f"            {k}: {v}")
            lines.extend(f"            {line}" for line in s["lines"])
        return "\n".join(lines)

    def write(self) -> None:
        text = self.text()
        for name, content in (
            ("summary.txt", text + "\n"),
            (
                "summary.json",
                json.dumps(
                    {
                        "device": self.device,
                        "budget_s": self.budget,
                        "elapsed_s": round(elapsed(), 1),
                        "steps": self.steps,
                    },
                    indent=2,
                    default=str,
                ),
            ),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(self.out / name)


def kill_group(proc: subprocess.Popen) -> None:
    """End a step's process and everything it started (DataLoader workers), by its group."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(
    summary: Summary, name: str, cap: float, cmd: list[str] | None, args: argparse.Namespace
) -> None:
    row: dict[str, Any] = {"step": name, "status": "running", "figures": {}, "lines": []}
    summary.steps.append(row)
    left = summary.budget - elapsed()
    timeout = min(cap * args.cap_scale, left)
    if timeout < 10:
        row["status"] = f"skipped ({left:.0f} s of the budget left)"
        print(f"== {name}: {row['status']}", flush=True)
        summary.write()
        return
    rec_path = summary.out / "logs" / f"{name}.json"
    log_path = summary.out / "logs" / f"{name}.log"
    rec_path.unlink(missing_ok=True)
    if cmd is None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
        cmd += ["--rec", str(rec_path), "--device", args.device, "--steps", str(args.steps)]
        cmd += ["--work", str(args.work)]
    print(f"== {name} (cap {timeout:.0f} s, {elapsed():.0f} s elapsed)", flush=True)
    summary.write()
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = None
    row["seconds"] = round(time.perf_counter() - t, 1)
    out = log_path.read_text(errors="replace").splitlines()
    if rec_path.exists():
        with contextlib.suppress(ValueError):
            row.update(json.loads(rec_path.read_text()))
    else:  # an outside script: its last lines are its figures
        row["lines"] = [ln for ln in out if ln.strip()][-25:]
    if rc is None:
        row["status"] = f"CUT at its {timeout:.0f} s cap (figures so far kept; logs/{name}.log)"
    elif rc == 0:
        row["status"] = "ok"
    else:
        why = next((ln for ln in reversed(out) if ln.startswith("STEP FAILED")), None)
        why = why or next((ln for ln in reversed(out) if ln.strip()), "no output")
        row["status"] = f"FAILED (exit {rc}): {why[:300]}"
    print(f"-- {name}: {row['status']} ({row['seconds']} s)", flush=True)
    for k, v in row["figures"].items():
        print(f"   {k}: {v}", flush=True)
    summary.write()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=330,
        help="seconds for everything (wheel install included): each step's cap is cut to what "
        "is left, steps that would get under 10 s are skipped",
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry-run-cpu", action="store_true", help="the same as --device cpu")
    ap.add_argument("--only", help="comma-separated step names (default: all)")
    ap.add_argument("--steps", type=int, default=15, help="timed training steps per setting")
    ap.add_argument(
        "--cap-scale", type=float, default=None, help="multiply every step's cap (CPU: 6)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rec", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run_cpu:
        args.device = "cpu"
    if args.child:
        rec = Rec(Path(args.rec), args.device, args.steps)
        rec.flush()
        work = Path(args.work) / args.child
        work.mkdir(parents=True, exist_ok=True)
        return run_child(args.child, rec, work)
    for key in ("CLINADAPT_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.device == "cpu":
        args.steps = min(args.steps, 2)
    if args.cap_scale is None:
        args.cap_scale = 1.0 if args.device == "cuda" else 6.0
    steps = plan(args.device, args.steps)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s[0] for s in steps}
        if unknown:
            ap.error(f"unknown step(s) {sorted(unknown)}; steps: {[s[0] for s in steps]}")
        steps = [s for s in steps if s[0] in wanted]
    summary = Summary(Path(args.out), args.budget_s, args.device)
    print(f"GPU benchmark: {len(steps)} steps, budget {args.budget_s:.0f} s, out {args.out}")
    with tempfile.TemporaryDirectory(prefix="clinadapt-gpu-") as tmp:
        args.work = tmp
        for name, cap, cmd in steps:
            run_step(summary, name, cap, cmd, args)
    text = summary.text()
    print("\n" + "=" * 100 + "\n" + text)
    print(f"\nwritten: {summary.out / 'summary.txt'}, {summary.out / 'summary.json'}, logs/")
    return 0 if all(s["status"] == "ok" for s in summary.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
