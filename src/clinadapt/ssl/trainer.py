"""The pre-training loop: unlabelled batches -> views -> loss -> AdamW, checkpointed and resumable.

Batch order is drawn from a generator seeded by (seed, step) and each image's views from its own
generator seeded by (seed, step, its place in the batch), so a resumed run sees the same images
and views as an uninterrupted one; the global torch RNG state (dropout, drop-path) is saved with
the model, optimiser and scheduler.

Under ``torchrun --nproc-per-node N`` every step's global batch is the one one process draws:
process r loads the places r, r+N, ... of it and draws their views, the objectives see the whole
batch through :mod:`clinadapt.ssl.collective` (SimCLR's negatives, DINO's centre, batch-norm
statistics), and ``DistributedDataParallel`` averages the gradients of the processes' shares.
So N processes train what one process trains, up to the order of float32 sums. Only process 0
writes the checkpoint, the exported backbone and the summary, and evaluates; a rerun loads the
checkpoint process 0 wrote (also with another number of processes: the global batch decides).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinadapt.compute import autocast, check_precision, grad_scaler, resolve_device
from clinadapt.compute import describe as describe_compute
from clinadapt.data import load_dataset
from clinadapt.data.base import ClinicalDataset
from clinadapt.distributed import init as join_processes
from clinadapt.distributed import sum_over, world, wrap
from clinadapt.errors import ConfigError, DataError
from clinadapt.models import load_model
from clinadapt.models.base import Preprocessing
from clinadapt.models.volume.base import check_spatial_dims
from clinadapt.preflight import check_data_options, check_out_dir
from clinadapt.progress import bar, status
from clinadapt.ssl import checkpoint as ckpt
from clinadapt.ssl import parallel
from clinadapt.ssl.augment import Augmenter, policy_for_modality
from clinadapt.ssl.base import SSL_METHODS, SSLMethod
from clinadapt.ssl.collective import global_batchnorm, local_batchnorm
from clinadapt.ssl.config import PretrainConfig
from clinadapt.ssl.draws import ImageDraws
from clinadapt.ssl.evaluate import eval_positions, evaluate_backbone


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` (the SimCLR/DINO/MAE schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def unlabelled_pool(ds: ClinicalDataset, cfg: PretrainConfig) -> ClinicalDataset:
    """The images pre-training sees: the probe's train and val parts, narrowed by domains.

    ``transductive`` adds the probe's test images; ``splits`` names the splits instead, and
    naming the test split needs ``transductive`` too, so test images never enter by default.
    """
    parts = eval_positions(ds, cfg.seed)
    if cfg.splits:
        unknown = sorted(set(cfg.splits) - set(ds.splits))
        if unknown:
            raise ConfigError(
                f"splits {unknown} are not in {ds.name}; its splits: {ds.splits or 'none'}"
            )
        keep = np.isin(ds.meta("split"), cfg.splits)
        if keep[parts["test"]].any() and not cfg.transductive:
            raise ConfigError(
                f"splits {cfg.splits} include the test images the probe is evaluated on; set "
                "transductive=true to pre-train on them (the summary records it)"
            )
    elif cfg.transductive:
        keep = np.ones(len(ds), dtype=bool)
    else:
        keep = np.zeros(len(ds), dtype=bool)
        keep[parts["train"]] = keep[parts["val"]] = True
    if cfg.domains:
        keep &= np.isin(ds.meta("domain"), cfg.domains)
    if keep.sum() < 2:
        raise DataError(f"{ds.name}: pre-training needs at least 2 images, found {int(keep.sum())}")
    return ds.subset(np.flatnonzero(keep), name=f"{ds.name} (unlabelled pool)")


def pool_protocol(ds: ClinicalDataset, pool: ClinicalDataset, cfg: PretrainConfig) -> dict:
    """What the pre-training pool holds, by split, and whether it is transductive."""
    counts: dict[str, int] = {}
    if ds.has_meta("split"):
        names, n = np.unique(pool.meta("split"), return_counts=True)
        counts = dict(zip(names.tolist(), n.tolist(), strict=True))
    test = ds.subset(eval_positions(ds, cfg.seed)["test"])
    return {
        "images_by_split": counts,
        "domains": cfg.domains or "all",
        "test_images": int(np.isin(pool.index, test.index).sum()),
        "transductive": cfg.transductive,
    }


def batch_positions(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The pool positions of ``step``: consecutive slices of a fresh permutation per epoch."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size : (i + 1) * batch_size]


def load_images(pool: ClinicalDataset, positions: np.ndarray, pp: Any) -> torch.Tensor:
    """A float [0,1] batch with the model's channels (volumes: (N,1,X,Y,Z) at the model's grid).

    Images keep their shared native size (crops then come from full resolution) up to twice the
    model's input side; larger or mixed sizes are resized.
    """
    imgs = [pool.image(int(i)) for i in positions]
    if pool.spatial_dims == 3:  # volumes: at the 3D backbone's grid, [0, 1]
        from clinadapt.ssl.volume import load_volumes

        return load_volumes(imgs, tuple(pp.volume_size))
    shapes = {im.shape[:2] for im in imgs}
    size: tuple[int, int] = tuple(pp.image_size)
    if len(shapes) == 1:
        h, w = next(iter(shapes))
        shrink = min(1.0, 2 * max(size) / max(h, w))
        size = (max(1, round(h * shrink)), max(1, round(w * shrink)))
    raw = Preprocessing(
        image_size=size,
        mean=(0.0,),
        std=(1.0,),
        in_chans=pp.in_chans,
        interpolation=pp.interpolation,
    )
    if len(shapes) == 1:
        return raw(imgs)
    return torch.cat([raw([im]) for im in imgs])


def _resolve_init(cfg: PretrainConfig) -> str | None:
    """The ``weights`` path of ``--from``; a clinadapt file must name the same base model."""
    if cfg.init_from is None:
        return None
    p = Path(cfg.init_from).expanduser()
    if not p.exists():
        raise ConfigError(f"--from {cfg.init_from}: no such file or folder")
    try:
        f = ckpt.weights_file(p)
    except ConfigError:
        return str(p)  # a folder in a library's own layout: load_model judges it
    meta = ckpt.read_metadata(f) if f.suffix == ".safetensors" else {}
    base = meta.get(ckpt.META_MODEL)
    if base is not None and base != cfg.model:
        raise ConfigError(
            f"--from {cfg.init_from} holds weights of {base!r}, but --model is {cfg.model!r}; "
            f"pass --model {base}"
        )
    return str(f.parent if f.name == ckpt.HF_WEIGHTS else f)


def build(cfg: PretrainConfig) -> tuple[SSLMethod, ClinicalDataset, ClinicalDataset]:
    """The method (with its backbone), the whole dataset and the unlabelled pool."""
    method_cls = SSL_METHODS.get(cfg.method)
    options = method_cls.parse_options(cfg.method_options)
    weights = _resolve_init(cfg)
    ds = load_dataset(cfg.data, **cfg.data_options)
    if method_cls.spatial_dims != ds.spatial_dims:
        fits = [
            n for n in SSL_METHODS.names() if SSL_METHODS.get(n).spatial_dims == ds.spatial_dims
        ]
        raise ConfigError(
            f"pre-training method {cfg.method!r} is for "
            f"{'volumes' if method_cls.spatial_dims == 3 else '2D images'}, but {ds.name!r} holds "
            f"{'volumes' if ds.spatial_dims == 3 else '2D images'}; use {' or '.join(fits)}"
        )
    pool = unlabelled_pool(ds, cfg)
    torch.manual_seed(cfg.seed)
    backbone = load_model(
        cfg.model,
        weights=weights,
        pretrained=cfg.pretrained or weights is not None,
        **cfg.model_options,
    ).to(cfg.device)
    if backbone.text_encoder is not None:
        backbone.text_encoder.requires_grad_(False)  # only the image tower is pre-trained
    check_spatial_dims(backbone, ds.spatial_dims, ds.name)
    pp = backbone.preprocess
    # a volume backbone normalises by its own rule (the 3D methods call it); no mean/std here
    mean, std = getattr(pp, "mean", (0.0,)), getattr(pp, "std", (1.0,))
    augment = Augmenter(policy_for_modality(ds.modality), mean, std)
    method = method_cls(backbone, options, augment).to(cfg.device)
    return method, ds, pool


def make_optimizer(method: SSLMethod, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; biases, norms and other 1-d parameters get no weight decay (as all three papers)."""
    lr = cfg.lr if cfg.lr is not None else method.base_lr * cfg.batch_size / 256
    wd = cfg.weight_decay if cfg.weight_decay is not None else method.weight_decay
    params = method.trainable_parameters()
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=method.betas,
    )


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train, checkpoint, export the backbone, evaluate it, and return the summary.

    Under torchrun each process trains on its part of every global batch; process 0 alone
    writes and evaluates, and the other processes return the summary without ``eval``.
    """
    requested = cfg.device
    device = join_processes(resolve_device(requested))
    w = world()
    check_precision(cfg.precision, device)
    cfg = cfg.model_copy(update={"device": device})
    out = check_out_dir(cfg.out_dir)  # before any work: output folder, data options
    check_data_options(cfg.data, cfg.data_options)
    state_path = out / ckpt.STATE_FILE
    state = parallel.read_state(state_path, w)  # before any work
    if state is not None and state["identity"] != cfg.identity():
        raise ConfigError(
            f"{state_path} was written by a different run ({state['identity']}); "
            "choose another --out or delete the folder to start over"
        )
    method, ds, pool = build(cfg)
    batch_size = min(cfg.batch_size, len(pool))
    parallel.check_batch(batch_size, w)
    if w.active:
        global_batchnorm(method)  # batch statistics of the global batch, as one process
        if not w.main:  # dropout and drop-path draw for other images than process 0's
            torch.manual_seed(parallel.process_seed(cfg.seed, w.rank))
    total = cfg.max_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    opt = make_optimizer(method, cfg)
    hyper = {"lr": opt.param_groups[0]["lr"], "weight_decay": opt.param_groups[0]["weight_decay"]}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    scaler = grad_scaler(device, cfg.precision)
    start, trained_s, history, baseline = 0, 0.0, [], None
    if state is not None:
        saved = state.get("hyper", hyper)
        changed = {k: (saved[k], v) for k, v in hyper.items() if not math.isclose(saved[k], v)}
        if changed:  # the optimiser state would restore the old values and train on with them
            was = ", ".join(f"{k}={old:g} (now {new:g})" for k, (old, new) in changed.items())
            raise ConfigError(
                f"{state_path} was trained with {was}; resume with the same values, or choose "
                "another --out to train with the new ones"
            )
        method.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        parallel.restore_rng(state, w, cfg.seed)
        start, trained_s, history = state["step"], state["trained_s"], state["history"]
        baseline = state.get("baseline")
        status(f"pretrain: resuming {state_path} at step {start}")
    elif cfg.evaluate and cfg.eval_baseline and w.main:
        baseline = evaluate_backbone(
            method.export_backbone(), ds, seed=cfg.seed, pretrained_on=pool
        )
    student = wrap(method)  # DistributedDataParallel under torchrun

    t0 = time.perf_counter()

    def save(step: int) -> None:
        rng = parallel.rng_states(w)  # every process takes part
        if not w.main:
            return
        ckpt.save_state(
            state_path,
            {
                "step": step,
                "trained_s": trained_s + time.perf_counter() - t0,
                "history": history,
                "baseline": baseline,
                "identity": cfg.identity(),
                "hyper": hyper,
                "model": method.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                **rng,
            },
        )

    method.train()
    places = parallel.my_places(batch_size, w)
    step, seen, stopped_early = start, 0, False
    with bar(total, f"pretrain {cfg.method}", initial=start) as pbar:
        while step < total:
            run_s = time.perf_counter() - t0
            over = cfg.max_minutes is not None and trained_s + run_s > 60 * cfg.max_minutes
            if cfg.max_minutes is not None and parallel.stop_together(over, w):
                stopped_early = True
                break
            pos = batch_positions(len(pool), batch_size, step, cfg.seed)
            images = load_images(pool, pos[places], method.backbone.preprocess)
            gen = ImageDraws.for_batch(cfg.seed, step, places)
            with autocast(device, cfg.precision):
                loss = student(images, gen, step, total)  # this process's share
            value = sum_over(loss.item())  # the global batch's loss
            if not math.isfinite(value):
                raise ConfigError(
                    f"{cfg.method}: the loss is {value} at step {step}; lower --lr "
                    f"(now {opt.param_groups[0]['lr']:.3g}) or check the images"
                )
            opt.zero_grad(set_to_none=True)
            # DistributedDataParallel averages the processes' gradients: N times each share
            # makes the average the gradient of the global batch's loss
            scaler.scale(loss * w.size).backward()  # fp16: scaled so small gradients survive
            scaler.unscale_(opt)  # the hooks and the clipping below see true gradients
            method.before_optimizer_step(step, total)
            if method.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), method.clip_grad)
            scaler.step(opt)  # skips the step when fp16 gradients overflowed
            scaler.update()
            sched.step()
            method.after_step(step, total)
            step += 1
            seen += len(pos)
            history.append(value)
            pbar.update(1)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            pbar.set_postfix(loss=f"{history[-1]:.4f}", img_s=f"{rate:.1f}")
            if step % cfg.checkpoint_every == 0 and step < total:
                save(step)
    save(step)
    run_s = time.perf_counter() - t0
    trained_s += run_s
    if w.active:
        local_batchnorm(method)  # the exported backbone holds the library's own layers

    health = method.diagnostics()
    if health["collapsed"]:
        status(
            f"pretrain: {cfg.method} has collapsed ({health}); the features are unlikely to help. "
            "Try a lower learning rate, a larger batch or the method's collapse settings "
            "(dino: teacher_temp, out_dim)."
        )
    exported = method.export_backbone()
    weights = ckpt.backbone_path(exported, out)
    if w.main:
        ckpt.save_backbone(
            exported,
            cfg.model,
            out,
            {
                "ssl_method": cfg.method,
                "steps": step,
                "dataset": ds.name,
                "init_from": cfg.init_from or "",
            },
        )
    summary: dict[str, Any] = {
        "model": cfg.model,
        "method": method.describe(),
        "data": {
            "name": ds.name,
            "modality": ds.modality,
            "unlabelled_images": len(pool),
            "pool": pool_protocol(ds, pool, cfg),
            "fingerprint": ds.fingerprint(),
        },
        "config": cfg.model_dump(),
        "compute": describe_compute(requested, device, cfg.precision)
        | ({"distributed": w.describe()} if w.active else {}),
        "steps": step,
        "optimizer": hyper,  # what trained the weights (a resumed run must keep them)
        "completed": step >= total,
        "stopped_by_time": stopped_early,
        "train_seconds": trained_s,
        "images_per_second": seen / max(run_s, 1e-9) if seen else None,
        "diagnostics": health,
        "loss_first": history[0] if history else None,
        "loss_last": float(np.mean(history[-10:])) if history else None,
        "weights": str(weights),
        "load_with": f"load_model({cfg.model!r}, weights={str(weights)!r}"
        + "".join(f", {k}={v!r}" for k, v in cfg.model_options.items())
        + ")",
    }
    if not w.main:  # process 0 evaluates and writes; the others are done
        return summary
    if cfg.evaluate:
        summary["eval"] = evaluate_backbone(exported, ds, seed=cfg.seed, pretrained_on=pool)
        if baseline is not None:
            summary["eval_baseline"] = baseline
    ckpt.write_summary(out / ckpt.SUMMARY_FILE, summary)
    return summary
