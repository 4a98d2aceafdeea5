"""3D segmentation with the volume backbones of the registry.

``seg3d-finetune`` trains a backbone's encoder with its own U-shaped decoder (``make_decoder``:
ResEnc, STU-Net, Primus, SwinUNETR; from the checkpoint's decoder where it has one) on
patches of the backbone's ``volume_size``, with Dice + cross-entropy (nnU-Net's loss, MONAI
``DiceCELoss``) and AdamW, keeping the epoch with the best validation Dice. Volumes of any size
are predicted by MONAI's ``sliding_window_inference`` over patches of ``volume_size`` (overlap
0.5 and Gaussian weighting, nnU-Net's inference settings). Each volume is normalised as a whole
by the backbone's intensity rule before its patches are cut.

Test-time methods on voxel logits: ``seg3d-bn`` normalises every BatchNorm layer with the test
batch's statistics (Schneider et al. / Nado et al.; the 3D form of ``bn``), ``seg3d-tent``
minimises the mean voxel entropy of the softmax over background and classes by updating the
affine parameters of the normalisation layers, BatchNorm in train mode (Wang et al., ICLR 2021,
applied to segmentation logits per voxel as in its segmentation experiments), with Tent's Adam
at 1e-3, one step per test batch, predictions from the forward pass that computed the loss.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clinadapt.data.volume import VolumeSegmentationDataset
from clinadapt.errors import IncompatibleError
from clinadapt.evaluation.seg_metrics import one_hot
from clinadapt.methods.base import METHODS, Context, Method, Options
from clinadapt.methods.seg.base import SegPredictions
from clinadapt.methods.seg.train import fit_epochs
from clinadapt.models.volume.base import VolumeModel
from clinadapt.progress import progress

TASK = "segmentation-3d"


class SlidingWindow(Options):
    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="window overlap (nnU-Net: 0.5)")
    sw_mode: Literal["gaussian", "constant"] = Field(
        "gaussian", description="how overlapping windows are blended (nnU-Net: gaussian)"
    )
    sw_batch_size: int = Field(4, ge=1, description="windows per forward pass")


class VolumeSegmenter(nn.Module):
    """A 3D backbone with its segmentation decoder: (N,1,X,Y,Z) -> (N, C+1, X,Y,Z) logits."""

    def __init__(self, model: VolumeModel, num_classes: int) -> None:
        super().__init__()
        if getattr(model, "spatial_dims", 2) != 3 or not hasattr(model, "make_decoder"):
            raise IncompatibleError(
                f"3D segmentation needs a 3D backbone with a decoder; {model.name!r} is not one "
                "(tiny-resenc, tiny-stunet, tiny-primus, tiny-swinunetr, resenc-l, stunet-b, ...)"
            )
        self.volume = model
        self.decoder, self.decoder_info = model.make_decoder(num_classes + 1)
        self.num_classes = num_classes

    @property
    def name(self) -> str:
        return self.volume.name

    @property
    def roi(self) -> tuple[int, int, int]:
        """The patch the network takes (the backbone's ``volume_size``)."""
        return tuple(int(s) for s in self.volume.preprocess.volume_size)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.volume.features(x), x)

    def model_input(self, volume: np.ndarray) -> torch.Tensor:
        """One float (X,Y,Z) volume in [0, 1] as a normalised (1,1,X,Y,Z) tensor."""
        t = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
        return self.volume.preprocess.model_input(t)

    def logits(self, x: torch.Tensor, sw: SlidingWindow) -> torch.Tensor:
        """(N, C+1, X,Y,Z) logits of a normalised batch by sliding windows of ``roi``."""
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            x, self.roi, sw.sw_batch_size, self, overlap=sw.overlap, mode=sw.sw_mode
        )

    def describe(self) -> dict[str, Any]:
        d = self.volume.describe()
        d["task"] = TASK
        d["decoder"] = dict(self.decoder_info)
        d["parameters"] = sum(p.numel() for p in self.parameters())
        return d


def label_masks(labels: torch.Tensor, num_classes: int) -> list[np.ndarray]:
    """(N,X,Y,Z) label volumes as a list of (C,X,Y,Z) booleans."""
    return [one_hot(v, num_classes, dims=3) for v in labels.cpu().numpy()]


def batches_by_shape(stream: VolumeSegmentationDataset, size: int) -> list[list[int]]:
    """Consecutive positions of ``stream`` in its order, ``size`` at a time, each batch of one
    volume shape (a batch is stacked)."""
    out: list[list[int]] = []
    shape = None
    for i in range(len(stream)):
        s = stream.volume(i).shape
        if out and len(out[-1]) < size and s == shape:
            out[-1].append(i)
        else:
            out.append([i])
            shape = s
    return out


def stacked(
    seg: VolumeSegmenter, stream: VolumeSegmentationDataset, pos: list[int]
) -> torch.Tensor:
    dev = next(seg.parameters()).device
    return torch.cat([seg.model_input(stream.volume(i)) for i in pos]).to(dev)


@torch.no_grad()
def predict_volumes(
    seg: VolumeSegmenter, ds: VolumeSegmentationDataset, sw: SlidingWindow, ctx: Context
) -> SegPredictions:
    """Sliding-window predictions of every volume of ``ds`` (model in eval mode)."""
    seg.eval()
    masks: list[np.ndarray] = []
    for pos in progress(batches_by_shape(ds, ctx.batch_size), f"segment {ds.name}"):
        with ctx.autocast():
            logits = seg.logits(stacked(seg, ds, pos), sw).float()
        masks += label_masks(logits.argmax(1), ds.num_classes)
    return SegPredictions(masks, [None] * len(ds))


def random_patch(
    x: torch.Tensor, y: torch.Tensor, roi: tuple[int, int, int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``roi`` patch of a (1,X,Y,Z) volume and its (X,Y,Z) labels (zero-padded when the
    volume is smaller: 0 is the normalised volume's mean and background)."""
    pad = [max(0, r - s) for r, s in zip(roi, x.shape[1:], strict=True)]
    if any(pad):
        spec = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
        x, y = F.pad(x, spec), F.pad(y, spec)
    start = [int(rng.integers(0, s - r + 1)) for s, r in zip(x.shape[1:], roi, strict=True)]
    sl = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
    return x[(slice(None), *sl)], y[sl]


class Seg3DOptions(SlidingWindow):
    epochs: int = Field(20, ge=1, description="passes over the training volumes")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    patience: int = Field(
        10, ge=1, description="stop after this many epochs without a better validation Dice"
    )


class Seg3DMethod(Method):
    """A method of 3D segmentation (task ``segmentation-3d``)."""

    task: ClassVar[str] = TASK


@METHODS.register("seg3d-finetune")
class Seg3DFinetune(Seg3DMethod):
    """Train a 3D backbone and its decoder on labelled volumes (Dice + CE, patches)."""

    name = "seg3d-finetune"
    kind = "fit"
    default_target: ClassVar[str] = "full"
    Options: ClassVar[type[Options]] = Seg3DOptions

    def fit(
        self,
        seg: VolumeSegmenter,
        train: VolumeSegmentationDataset,
        val: VolumeSegmentationDataset | None,
        options: Seg3DOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        roi = seg.roi

        def batch_loss(pos: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
            xs, ys = [], []
            for i in pos:
                vol, lab = train.pair(int(i))
                x, y = random_patch(
                    seg.model_input(vol)[0], torch.tensor(lab, dtype=torch.long), roi, rng
                )
                xs.append(x)
                ys.append(y[None])
            x, y = torch.stack(xs).to(ctx.device), torch.stack(ys).to(ctx.device)
            return loss_fn(seg(x).float(), y)

        def predict(ds: VolumeSegmentationDataset) -> SegPredictions:
            return predict_volumes(seg, ds, options, ctx)

        return fit_epochs(seg, train, val, options, ctx, batch_loss, predict, desc="seg3d epoch")

    def predict(
        self,
        seg: VolumeSegmenter,
        test: VolumeSegmentationDataset,
        options: Seg3DOptions,
        ctx: Context,
    ) -> SegPredictions:
        return predict_volumes(seg, test, options, ctx)


class Seg3DTTA(Seg3DMethod):
    """Adapts a trained 3D segmenter along an unlabelled stream of volumes while predicting it."""

    kind = "tta"
    default_target: ClassVar[str] = "norm"
    #: whether the method adapts BatchNorm statistics (checked before the source is trained)
    requires_batchnorm: ClassVar[bool] = False

    @abc.abstractmethod
    def adapt(
        self,
        seg: VolumeSegmenter,
        stream: VolumeSegmentationDataset,
        options: Any,
        ctx: Context,
    ) -> tuple[SegPredictions, dict[str, Any]]:
        """Predictions of ``stream`` in its order and what the method did; ``seg`` is a copy
        the method may change."""


def require_batchnorm(model: nn.Module, method: str) -> None:
    """Refuse a network without BatchNorm for a method that adapts BatchNorm statistics."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        name = getattr(model, "name", type(model).__name__)
        raise IncompatibleError(
            f"{method} needs BatchNorm layers; model {name!r} has none (it normalises per "
            "instance or layer); build it with model_options norm=batch where the architecture "
            "offers it (tiny-resenc, resenc-l)"
        )


class BN3DOptions(SlidingWindow):
    prior: float = Field(
        0.0, ge=0.0, le=1.0, description="weight of the source statistics (0: test batch only)"
    )


@METHODS.register("seg3d-bn")
class Seg3DBatchNorm(Seg3DTTA):
    """Normalise with the test batch's statistics; no parameter is updated."""

    name = "seg3d-bn"
    default_target = "none"
    requires_batchnorm = True
    changes = "normalisation statistics (per test batch)"
    Options: ClassVar[type[Options]] = BN3DOptions

    def adapt(
        self, seg: VolumeSegmenter, stream: VolumeSegmentationDataset, options: Any, ctx: Context
    ) -> tuple[SegPredictions, dict[str, Any]]:
        from clinadapt.methods.tta.bn import replace_batchnorm

        require_batchnorm(seg, self.name)
        layers = replace_batchnorm(seg, options.prior)
        masks: list[np.ndarray] = []
        batches = batches_by_shape(stream, ctx.batch_size)
        seg.eval()
        with torch.no_grad():
            for pos in progress(batches, f"{self.name} {stream.name}"):
                with ctx.autocast():
                    logits = seg.logits(stacked(seg, stream, pos), options).float()
                masks += label_masks(logits.argmax(1), stream.num_classes)
        info = {"batches": len(batches), "updates": 0, "batchnorm_layers": layers}
        return SegPredictions(masks, [None] * len(stream)), info


class Tent3DOptions(SlidingWindow):
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (Tent: 1e-3)")
    steps: int = Field(1, ge=1, description="update steps per test batch (Tent: 1)")


def voxel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over voxels (and the batch) of the softmax entropy over the channel axis."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


@METHODS.register("seg3d-tent")
class Seg3DTent(Seg3DTTA):
    """Tent on voxel logits: minimise the mean voxel entropy through the norm affine parameters."""

    name = "seg3d-tent"
    Options: ClassVar[type[Options]] = Tent3DOptions

    def adapt(
        self, seg: VolumeSegmenter, stream: VolumeSegmentationDataset, options: Any, ctx: Context
    ) -> tuple[SegPredictions, dict[str, Any]]:
        from clinadapt.methods.tta.bn import replace_batchnorm

        replace_batchnorm(seg, 0.0)  # Tent: BatchNorm with the test batch's statistics
        params = [p for p in seg.parameters() if p.requires_grad]
        if not params:
            raise IncompatibleError(f"{self.name}: the target opens no parameter to update")
        opt = torch.optim.Adam(params, lr=options.lr, betas=(0.9, 0.999))
        seg.eval()
        masks: list[np.ndarray] = []
        entropies: list[float] = []
        batches = batches_by_shape(stream, ctx.batch_size)
        for pos in progress(batches, f"{self.name} {stream.name}"):
            x = stacked(seg, stream, pos)
            for step in range(options.steps):
                with ctx.autocast():
                    logits = seg.logits(x, options).float()
                loss = voxel_entropy(logits)
                if step == 0:  # Tent predicts with the forward pass of its first update
                    masks += label_masks(logits.detach().argmax(1), stream.num_classes)
                    entropies.append(float(loss.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        info = {
            "batches": len(batches),
            "updates": len(batches) * options.steps,
            "mean_entropy": float(np.mean(entropies)) if entropies else None,
            "trace": {"entropy": entropies},
        }
        return SegPredictions(masks, [None] * len(stream)), info


def fresh_copy(seg: VolumeSegmenter) -> VolumeSegmenter:
    """A copy of the source segmenter for one test stream (the per-shift protocol)."""
    return copy.deepcopy(seg)
