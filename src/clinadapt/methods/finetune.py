"""`finetune`: supervised training of whatever the target opened, with early stopping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.distributed import (
    ShardSampler,
    broadcast_tensors,
    ddp_loss,
    idle_loss,
    load_shards,
    sum_over,
    world,
    wrap,
)
from clinadapt.errors import ClinadaptError, ConfigError, IncompatibleError
from clinadapt.evaluation.metrics import compute_metrics, metric_names
from clinadapt.evaluation.subgroups import lower_is_better
from clinadapt.fitted import classifier_metadata
from clinadapt.methods.base import METHODS, Context, FitMethod, predict_proba
from clinadapt.methods.budget import FewShotOptions
from clinadapt.progress import bar
from clinadapt.targets.io import adapted_state, save_adapted


class FinetuneOptions(FewShotOptions):
    epochs: int = Field(30, ge=1, description="passes over the training set")
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up before the cosine decay")
    grad_clip: float | None = Field(1.0, description="clip the gradient norm (None: no clipping)")
    class_balanced: bool = Field(False, description="weight the loss by inverse class frequency")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    patience: int | None = Field(10, description="stop after this many epochs without improvement")
    monitor: str | None = Field(
        None,
        description="validation metric to select the epoch on (default: balanced_accuracy; "
        "auroc for multi-label); nll, ece and brier select their lowest value",
    )
    sync_batchnorm: bool = Field(
        False,
        description="under torchrun: batch norm with the statistics of the global batch "
        "(GlobalBatchNorm, CPU and GPU), so a BatchNorm model trains as in one process; every "
        "global batch must then hold an image for each process. No effect in one process",
    )
    checkpoint: str | None = Field(
        None,
        description="write the best epoch's adapted parameters and buffers to this .safetensors "
        "file (relative: inside the run's output folder), with the class names, preprocessing "
        "and target in its metadata; the frozen rest of the model is not saved",
    )


def default_monitor(task: str) -> str:
    """The validation metric that selects the epoch: AUROC for multi-label data (it has no
    balanced accuracy), balanced accuracy otherwise."""
    return "auroc" if task == "multilabel" else "balanced_accuracy"


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def class_weights(train: ClinicalDataset) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (absent classes get weight 0)."""
    counts = train.class_counts().astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a checkpoint of adapted tensors into ``model`` (with the same target applied).

    Every tensor in the file must exist in the model with the same shape; returns their names.
    """
    state = load_file(str(path))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise IncompatibleError(
            f"{path}: {len(unknown)} tensor(s) have no place in the model, e.g. {unknown[:3]}; "
            "apply the same target (e.g. lora+head) before loading"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise IncompatibleError(f"{path}: shape mismatch for {bad[:3]}")
    model.load_state_dict(state, strict=False)
    return sorted(state)


def batch_share(
    labels: np.ndarray, task: str, part: np.ndarray, batch: np.ndarray, weight: torch.Tensor | None
) -> float:
    """The share of a global batch's mean loss that a process's ``part`` of it carries: its
    images' share, or its share of the class weights for a class-weighted loss (whose mean
    divides by the batch's summed weights). ``labels`` are the dataset's, by position."""
    if weight is None or task == "multilabel":
        return len(part) / len(batch)
    w = weight.cpu().numpy()
    return float(w[labels[part]].sum() / w[labels[batch]].sum())


def check_batches_fill_processes(n: int, batch_size: int, processes: int) -> None:
    """ConfigError when a global batch of an epoch over ``n`` images would leave a process
    without an image: batch norm over the global batch needs every process to normalise (a
    process cannot stand aside with a zero-weighted image without changing the statistics)."""
    last = n % batch_size or batch_size
    smallest = min(batch_size, last) if n > batch_size else n
    if smallest < processes:
        raise ConfigError(
            f"sync_batchnorm: a batch of {smallest} image(s) (batch_size {batch_size}, {n} "
            f"training images) leaves some of the {processes} processes without an image; "
            "choose a batch_size whose batches, the last one too, hold one per process"
        )


def supervised_loss(
    logits: torch.Tensor, y: torch.Tensor, task: str, weight: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=None)
    return F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)


@METHODS.register("finetune")
class Finetune(FitMethod):
    """Train the parameters the target opened; keep the epoch best on the validation metric."""

    name = "finetune"
    data_parallel = True
    default_target = "full"
    Options = FinetuneOptions

    def batch_loss(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        task: str,
        weight: torch.Tensor | None,
        options: FinetuneOptions,
    ) -> torch.Tensor:
        """The loss of one training batch (subclasses add auxiliary terms). ``model`` is the
        classifier, or under torchrun its DistributedDataParallel wrapper: train through its
        forward pass."""
        return supervised_loss(model(x), y, task, weight, options.label_smoothing)

    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: FinetuneOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{self.name}: the target left no trainable parameter")
        torch.manual_seed(ctx.seed)
        # K-shot runs select the epoch on a K-shot validation set or keep the last (fixed)
        budget = self.labelled_budget(train, val, options, ctx.seed)
        train, val = budget.train, budget.val
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        steps_per_epoch = -(-len(train) // ctx.batch_size)
        total = options.epochs * steps_per_epoch
        warmup = int(options.warmup_epochs * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, total, warmup)
        )
        weight = class_weights(train).to(ctx.device) if options.class_balanced else None
        monitor = options.monitor or default_monitor(train.task)
        known = metric_names(train.task, train.num_classes)
        if monitor not in known:  # before any training, not after the first epoch
            raise ConfigError(
                f"{self.name}: monitor {monitor!r} is not a {train.task} metric; choose one of "
                f"{', '.join(known)}"
            )
        sign = -1.0 if lower_is_better(monitor) else 1.0  # compare as "higher is better"
        history: list[dict[str, float]] = []
        best, best_state, best_epoch, stale = -math.inf, None, -1, 0
        scaler = ctx.grad_scaler()
        w = world()  # under torchrun: each process takes its part of every global batch
        sync = options.sync_batchnorm and w.active
        if sync:  # before wrapping: DDP sees the layers that train
            from clinadapt.ssl.collective import global_batchnorm

            check_batches_fill_processes(len(train), ctx.batch_size, w.size)
            global_batchnorm(model)
        net = wrap(model)  # DistributedDataParallel under torchrun (rank 0's start everywhere)
        sampler = ShardSampler(len(train), ctx.batch_size, shuffle=True, seed=ctx.seed * 1000)
        pbar = bar(total, self.name)
        try:
            for epoch in range(options.epochs):
                model.train()
                sampler.set_epoch(epoch)
                losses = []
                for (x, y, pos), batch in load_shards(
                    train,
                    model.preprocess,
                    sampler,
                    workers=ctx.loader_workers,
                    pin_memory=str(ctx.device).startswith("cuda"),
                    device=ctx.device,
                ):
                    opt.zero_grad(set_to_none=True)
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    with ctx.autocast():
                        if len(pos):
                            loss = self.batch_loss(net, x, y, train.task, weight, options)
                            share = batch_share(train.labels, train.task, pos, batch, weight)
                        else:  # no image of this (short, last) batch: join the step, add 0
                            loss, share = idle_loss(net(x)), 0.0
                    # every process runs its backward pass (DDP's all-reduce waits for all)
                    scaler.scale(ddp_loss(loss, share)).backward()  # fp16: small gradients live
                    value = sum_over(loss.item() * share)  # the global batch's loss, everywhere
                    if not math.isfinite(value):
                        raise ClinadaptError(
                            f"{self.name}: non-finite loss at epoch {epoch}; lower the learning "
                            f"rate (lr={options.lr}) or check the inputs"
                        )
                    if options.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
                    scaler.step(opt)  # skips the step when fp16 gradients overflowed
                    scaler.update()
                    sched.step()
                    losses.append(value)
                    pbar.update(1)
                    pbar.set_postfix(epoch=epoch, loss=f"{value:.3f}")
                broadcast_tensors(model.buffers())  # rank 0's BatchNorm statistics everywhere
                row = {"epoch": epoch, "loss": float(np.mean(losses))}
                if val is not None:
                    m = compute_metrics(
                        val.labels, predict_proba(model, val, ctx, desc="validate"), val.task
                    )
                    row["val_" + monitor] = value = m[monitor]
                    pbar.set_postfix(epoch=epoch, loss=f"{row['loss']:.3f}", val=f"{value:.3f}")
                    if value == value and sign * value > best:  # NaN (undefined) never wins
                        best, best_epoch, stale = sign * value, epoch, 0
                        best_state = adapted_state(model)
                    else:
                        stale += 1
                history.append(row)
                if options.patience is not None and val is not None and stale >= options.patience:
                    break
        finally:
            pbar.close()
            if sync:  # the library's own layers again (exported, adapted at test time)
                from clinadapt.ssl.collective import local_batchnorm

                local_batchnorm(model)
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        out = {
            "history": history,
            "monitor": monitor,
            "best_epoch": best_epoch,
            "best_val": sign * best if best_state else None,
        }
        if val is None:
            out["selection"] = "no validation data: the last epoch"
        elif best_state is None:
            out["selection"] = f"{monitor} undefined on validation: the last epoch"
        if scaler.is_enabled():
            out["loss_scale"] = float(scaler.get_scale())
        if options.checkpoint and w.main:  # the model now holds the best epoch's state
            path = save_adapted(
                model,
                ctx.output_path(options.checkpoint),
                base=model.encoder.name,
                target=ctx.target,
                metadata=classifier_metadata(model, self.name),
            )
            out["checkpoint_file"] = str(path)
            saved = best_state if best_state is not None else adapted_state(model)
            out["checkpoint_tensors"] = len(saved)
        return out
