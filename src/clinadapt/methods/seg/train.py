"""Supervised training of a promptable segmenter, MedSAM's recipe by default.

MedSAM (Ma et al., Nat. Commun. 2024; train_one_gpu.py): AdamW, lr 1e-4, weight decay 0.01;
loss = Dice (sigmoid, squared denominator, MONAI ``DiceLoss``) + binary cross-entropy, at the
image resolution; one prompt per training image and step, for a random object of the image,
drawn afresh each time by the run's prompt protocol (MedSAM: a box whose sides move outwards by
0..20 px); the prompt encoder frozen (target ``image-encoder+decoder``). Validation Dice with the
evaluation prompts picks the best epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from clinadapt.data.segmentation import SegmentationDataset
from clinadapt.errors import DataError
from clinadapt.evaluation.seg_metrics import score_images, summarise_table
from clinadapt.methods.base import Context, Options
from clinadapt.methods.seg.base import predict_with_prompts
from clinadapt.progress import progress, status

if TYPE_CHECKING:
    from clinadapt.segmentation import Segmenter


class TrainOptions(Options):
    """Training settings shared by the supervised segmentation methods."""

    epochs: int = Field(10, ge=1, description="passes over the training images")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (MedSAM: 1e-4)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (MedSAM: 0.01)")
    objects_per_image: Literal["one", "all"] = Field(
        "one",
        description="prompts per training image and step: one random object (MedSAM) or all",
    )
    patience: int = Field(
        5, ge=1, description="stop after this many epochs without a better validation Dice"
    )


def dice_bce(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MedSAM's loss on (P,H,W) probabilities: MONAI Dice (squared) + binary cross-entropy."""
    from monai.losses import DiceLoss

    probs, t = probs.float(), targets.float()
    dice = DiceLoss(sigmoid=False, squared_pred=True, reduction="mean")(probs[:, None], t[:, None])
    # CUDA autocast refuses binary_cross_entropy on probabilities whatever their dtype (CPU
    # autocast lets it through): leave autocast for the loss, computed in fp32
    with torch.autocast(device_type=probs.device.type, enabled=False):
        bce = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), t)
    return dice + bce


def _encoder_trainable(seg: Segmenter) -> bool:
    return any(p.requires_grad for m in seg.encoder_modules() for p in m.parameters())


def _step_loss(
    seg: Segmenter,
    images: list[np.ndarray],
    maps: list[np.ndarray],
    spec: Any,
    options: TrainOptions,
    rng: np.random.Generator,
    modality: str,
    cache: dict[int, Any] | None,
    keys: list[int],
    draw: Callable[[int, np.random.Generator], Any],
) -> torch.Tensor | None:
    """The loss of one batch; ``draw(j, rng)`` gives image ``j``'s prompts for this step."""
    from clinadapt.segmentation import Prompts
    from clinadapt.segmentation.base import take

    x, frames = seg.preprocess(images, modality)
    if cache is not None:  # frozen encoder: each image's features once, reused every epoch
        missing = [j for j, k in enumerate(keys) if k not in cache]
        if missing:
            with torch.no_grad():
                feats = seg.encode(x[missing])
            for n, j in enumerate(missing):
                cache[keys[j]] = take(feats, n)
        per_image = [cache[k] for k in keys]
    else:
        feats = seg.encode(x)
        per_image = [take(feats, j) for j in range(len(images))]
    losses = []
    for j, ref in enumerate(maps):
        if spec.kind == "none":  # the learned default prompt: one mask per class
            prompts = Prompts()
            targets = np.stack([ref == c for c in range(1, seg.default_prompt.num_classes + 1)])
        else:
            d = draw(j, rng)
            if d.prompts.count == 0:
                continue  # nothing to prompt on this image
            pick = (
                np.arange(d.prompts.count)
                if options.objects_per_image == "all"
                else rng.integers(0, d.prompts.count, 1)
            )
            prompts, targets = d.prompts.select(pick), d.targets[pick]
        mp = seg.model_prompts(prompts, frames[j])
        low, _ = seg.decode_prompts(per_image[j], mp, multimask=False)
        probs = seg.upsample(low[:, 0], frames[j])
        losses.append(dice_bce(probs, torch.as_tensor(targets, device=probs.device)))
    return torch.stack(losses).mean() if losses else None


def validation_dice(pred: Any, val: SegmentationDataset) -> float:
    """Mean Dice of predictions over ``val`` (all image x class pairs: the model selection of
    every segmentation method, U-Net included)."""
    refs = [val.mask(i) for i in range(len(val))]
    return summarise_table(score_images(pred.masks, refs, val.spacing, val.class_names))["dice"]


BatchLoss = Callable[[np.ndarray, np.random.Generator], "torch.Tensor | None"]


def fit_epochs(
    model: torch.nn.Module,
    train: SegmentationDataset,
    val: SegmentationDataset | None,
    options: Any,
    ctx: Context,
    batch_loss: BatchLoss,
    predict: Callable[[SegmentationDataset], Any],
    desc: str = "epoch",
) -> dict[str, Any]:
    """The training loop every supervised segmentation method shares.

    AdamW over the trainable parameters (``options.lr``, ``options.weight_decay``), seeded
    shuffled batches of ``ctx.batch_size`` positions, ``batch_loss(positions, rng)`` (None:
    nothing to learn from that batch), fp16 loss scaling, a DataError on a non-finite loss; with
    ``val``, validation Dice after each epoch keeps the best trainable state and stops after
    ``options.patience`` epochs without improvement.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("training needs trainable parameters; choose a target that opens some")
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scaler = ctx.grad_scaler()
    rng = np.random.default_rng(ctx.seed)
    torch.manual_seed(ctx.seed)
    keys = _trainable_keys(model)
    history: list[dict[str, float]] = []
    best, best_epoch, best_state, waited = -np.inf, -1, None, 0
    for epoch in range(options.epochs):
        model.train()
        order = rng.permutation(len(train))
        total, steps = 0.0, 0
        batches = range(0, len(order), ctx.batch_size)
        label = f"{desc} {epoch + 1}/{options.epochs}"
        for start in progress(batches, label, total=len(batches)):
            loss = batch_loss(order[start : start + ctx.batch_size], rng)
            if loss is None:
                continue
            if not torch.isfinite(loss):
                raise DataError(f"the loss became {loss.item()} at epoch {epoch + 1}; lower lr")
            opt.zero_grad()
            scaler.scale(loss).backward()  # fp16: scaled so small gradients survive
            scaler.step(opt)  # skips the step when fp16 gradients overflowed
            scaler.update()
            total, steps = total + loss.item(), steps + 1
        row = {"epoch": epoch + 1, "loss": total / max(steps, 1)}
        if val is not None:
            row["val_dice"] = validation_dice(predict(val), val)
            if row["val_dice"] > best:
                best, best_epoch, waited = row["val_dice"], epoch + 1, 0
                best_state = {
                    k: v.detach().clone() for k, v in model.state_dict().items() if k in keys
                }
            else:
                waited += 1
        history.append(row)
        status(
            f"{desc} {epoch + 1}: loss {row['loss']:.4f}"
            + (f", val Dice {row['val_dice']:.3f}" if "val_dice" in row else "")
        )
        if val is not None and waited >= options.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return {
        "history": history,
        "epochs_run": len(history),
        "best_epoch": best_epoch if val is not None else len(history),
        "best_val_dice": None if val is None else float(best),
        "train_images": len(train),
        **({"loss_scale": float(scaler.get_scale())} if scaler.is_enabled() else {}),
    }


def train_segmenter(
    seg: Segmenter,
    train: SegmentationDataset,
    val: SegmentationDataset | None,
    options: TrainOptions,
    ctx: Context,
) -> dict[str, Any]:
    """Train the parameters the target opened on ``train``; keep the best validation epoch."""
    spec = train.prompt_spec
    if spec is None:
        raise DataError(f"{train.name}: training a segmenter needs the run's prompt protocol")
    if spec.kind != "none" and not train.labels.any():
        raise DataError(f"{train.name}: no training image has an object to prompt")
    cache: dict[int, Any] | None = None if _encoder_trainable(seg) else {}

    def batch_loss(pos: np.ndarray, rng: np.random.Generator) -> torch.Tensor | None:
        return _step_loss(
            seg,
            [train.image(int(i)) for i in pos],
            [train.mask(int(i)) for i in pos],
            spec,
            options,
            rng,
            train.modality,
            cache,
            [int(train.index[i]) for i in pos],
            lambda j, r: train.draw_prompts(int(pos[j]), r),
        )

    def predict(ds: SegmentationDataset) -> Any:
        return predict_with_prompts(seg, ds, ctx, desc="validate")

    summary = fit_epochs(seg, train, val, options, ctx, batch_loss, predict)
    return {**summary, "embeddings_cached": cache is not None}


def _trainable_keys(seg: torch.nn.Module) -> set[str]:
    names = {n for n, p in seg.named_parameters() if p.requires_grad}
    return names | {n for n, _ in seg.named_buffers()}
