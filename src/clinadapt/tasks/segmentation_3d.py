"""3D segmentation: a volume backbone with its decoder predicts label volumes by sliding
windows; Dice, NSD (mm, each volume's real spacing) and HD95 judge them per volume.

The same evaluation, record and predictions file as 2D segmentation (per-volume tables,
patient-level bootstrap CIs, subgroups, size bins by the diameter of the sphere of the
reference's volume); the overlay picture of each chosen case is its axial slice with the most
reference (or predicted) voxels.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clinadapt.errors import ConfigError
from clinadapt.tasks.base import SEGMENTATION_3D, TASKS, Outcome
from clinadapt.tasks.segmentation import (
    SegmentationTask,
    fit_key,
    fit_or_reuse,
    outcome,
    target_record,
)

if TYPE_CHECKING:
    from clinadapt.config import RunConfig
    from clinadapt.methods.base import Context, Method
    from clinadapt.methods.seg.base import SegPredictions
    from clinadapt.methods.seg3d import VolumeSegmenter
    from clinadapt.shifts import ShiftSplit


def case_slice(reference: np.ndarray, prediction: np.ndarray) -> int:
    """The axial slice (axis 2) with the most reference voxels, or predicted ones if the
    reference is empty, or the middle slice."""
    per = (reference > 0).sum(axis=(0, 1))
    if not per.any():
        per = prediction.any(0).sum(axis=(0, 1))
    return int(per.argmax()) if per.any() else reference.shape[2] // 2


def slice_image(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a [0, 1] volume as a uint8 image, anterior at the top (as the 2D
    NIfTI reader shows slices)."""
    return np.rot90(np.clip(volume[:, :, k], 0, 1) * 255).round().astype(np.uint8)


def _positions(ds: Any) -> np.ndarray:
    return np.arange(len(ds)) if ds.index is None else np.asarray(ds.index)


@TASKS.register(
    SEGMENTATION_3D, help="3D segmentation: label volumes, 3D backbones, Dice per volume"
)
class VolumeSegmentationTask(SegmentationTask):
    name = SEGMENTATION_3D
    # 2D segmentation's parts but the fill-the-box baseline (no prompts here)
    evaluation_parts = tuple(p for p in SegmentationTask.evaluation_parts if p != "baselines")
    default_model = "tiny-resenc"
    default_data = "clinical-shift-3d-seg"
    default_source = "seg3d-finetune"

    def case_arrays(
        self, test: Any, pred: SegPredictions, cases: dict[str, int], prefix: str
    ) -> dict[str, np.ndarray]:
        """Per case: its axial slice (image, reference, predicted masks) and the slice index."""
        out: dict[str, np.ndarray] = {}
        for rank, i in cases.items():
            volume, ref = test.pair(i)
            k = case_slice(ref, pred.masks[i])
            key = f"{prefix}/{rank}"
            out[f"{key}/image"] = slice_image(volume, k)
            out[f"{key}/reference"] = np.rot90(ref[:, :, k]).copy()
            out[f"{key}/prediction"] = np.rot90(pred.masks[i][:, :, :, k], axes=(1, 2)).copy()
            out[f"{key}/position"] = np.array(i)
            out[f"{key}/slice"] = np.array(k)
        return out

    def build(self, cfg: RunConfig, target: str, method: Method, split: ShiftSplit):
        import torch

        from clinadapt.methods.seg3d import VolumeSegmenter
        from clinadapt.models import load_model
        from clinadapt.models.volume.base import check_spatial_dims
        from clinadapt.targets import TargetInfo, apply_target
        from clinadapt.targets.base import count_parameters

        # the backbone's random layers and the decoder start from the run's seed, not from
        # whatever the process drew before (as build_classifier does for classification)
        torch.manual_seed(cfg.seed)
        model = load_model(
            cfg.model, weights=cfg.weights, pretrained=cfg.pretrained, **cfg.model_options
        )
        check_spatial_dims(model, 3, split.train.name)
        seg = VolumeSegmenter(model, split.train.num_classes).to(cfg.device)
        if target == "none":
            for p in seg.parameters():
                p.requires_grad_(False)
            _, total = count_parameters(seg)
            return seg, TargetInfo(spec="none", trainable=0, total=total)
        options = cfg.target_options if method.name == cfg.method else None
        return seg, apply_target(seg, target, options)

    def fit(
        self,
        cfg: RunConfig,
        method: Method,
        target: str | None,
        raw_options: dict[str, Any],
        split: ShiftSplit,
        ctx: Context,
    ) -> tuple[Any, Any, Any, dict[str, Any]]:
        """Build the segmenter, open its target and train it (or reload the fit)."""

        if method.kind != "fit" or getattr(method, "task", None) != self.name:
            raise ConfigError(
                f"{method.name!r} cannot train a 3D segmentation model; choose a 3D segmentation "
                "fit method (seg3d-finetune)"
            )
        opts = method.parse_options(raw_options)
        seg, info = self.build(cfg, target or method.default_target, method, split)
        key = fit_key(cfg, method.name, info.spec, opts.model_dump(), split.train)
        key = hashlib.sha256(
            json.dumps([key, cfg.model_options, self.name], sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        ckpt = Path(cfg.out_dir) / "cache" / f"fit-{key}.safetensors"
        summary = fit_or_reuse(method, seg, info, opts, split, ctx, ckpt, cfg.model, "volumes")
        return seg, info, opts, summary

    def run(
        self,
        cfg: RunConfig,
        method: Method,
        split: ShiftSplit,
        ctx: Context,
        timings: dict[str, float],
    ) -> Outcome:
        t = time.perf_counter()
        if method.kind == "tta":
            return self._adapt(cfg, method, split, ctx, timings)
        seg, info, opts, summary = self.fit(cfg, method, cfg.target, cfg.method_options, split, ctx)
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        preds = {name: method.predict(seg, test, opts, ctx) for name, test in split.tests.items()}  # type: ignore[attr-defined]
        timings["evaluate_s"] = time.perf_counter() - t
        return outcome(seg, info, method, opts, preds, split, {"training": summary})

    def _adapt(
        self,
        cfg: RunConfig,
        method: Method,
        split: ShiftSplit,
        ctx: Context,
        timings: dict[str, float],
    ) -> Outcome:
        """Train the source (cfg.source), then adapt a fresh copy of it on each test stream."""
        import dataclasses

        from clinadapt.methods import METHODS
        from clinadapt.methods.seg3d import fresh_copy
        from clinadapt.methods.tta.protocol import order_stream
        from clinadapt.targets import TargetInfo, apply_target

        if cfg.tta_protocol != "per-shift":
            raise ConfigError(
                f"3D segmentation adapts per test set (tta_protocol per-shift), not "
                f"{cfg.tta_protocol!r}"
            )
        if getattr(method, "requires_batchnorm", False):  # before training the source
            from clinadapt.methods.seg3d import require_batchnorm
            from clinadapt.models import load_model

            require_batchnorm(
                load_model(cfg.model, pretrained=False, **cfg.model_options), method.name
            )
        t = time.perf_counter()
        source = METHODS.get(cfg.source.method)()
        seg, src_info, _, summary = self.fit(
            cfg, source, cfg.source.target, cfg.source.options, split, ctx
        )
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        opts = method.parse_options(cfg.method_options)
        src_opts = source.parse_options(cfg.source.options)
        # the unadapted source on the same volumes, to measure what adaptation changed
        source_preds = {
            name: source.predict(seg, test, src_opts, ctx)  # type: ignore[attr-defined]
            for name, test in split.tests.items()
        }
        target = cfg.target or method.default_target  # type: ignore[attr-defined]
        stream_ctx = dataclasses.replace(ctx, batch_size=cfg.stream_batch_size)
        preds: dict[str, SegPredictions] = {}
        per_set: dict[str, Any] = {}
        info = None
        for name, test in split.tests.items():
            model: VolumeSegmenter = fresh_copy(seg)
            if target == "none":
                for p in model.parameters():
                    p.requires_grad_(False)
                info = TargetInfo(spec="none", trainable=0, total=src_info.total)
            else:
                info = apply_target(model, target, cfg.target_options)
            stream = order_stream(test, cfg.stream_order, cfg.seed)
            pred, per_set[name] = method.adapt(model, stream, opts, stream_ctx)  # type: ignore[attr-defined]
            # back to the set's own order (what evaluate pairs with its references)
            where = {int(k): j for j, k in enumerate(_positions(stream))}
            order = [where[int(k)] for k in _positions(test)]
            pred.masks = [pred.masks[j] for j in order]
            preds[name] = pred
        timings["evaluate_s"] = time.perf_counter() - t
        parts: dict[str, Any] = {
            "tta": {
                "protocol": "per-shift",
                "stream_order": cfg.stream_order,
                "stream_batch_size": cfg.stream_batch_size,
                "per_set": per_set,
            },
            "source": {
                **cfg.source.model_dump(),
                "training": summary,
                "target": target_record(src_info, source),
            },
        }
        result = outcome(seg, info, method, opts, preds, split, parts)
        result.predictions["source_sets"] = source_preds
        return result
