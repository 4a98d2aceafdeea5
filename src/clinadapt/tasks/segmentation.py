"""Segmentation: a promptable segmenter (or a U-Net) predicts masks; Dice, NSD and HD95 judge them.

A run loads the segmenter (seg-models' registry), opens the target, fits with the method (or
reloads the fit from the run cache), then predicts every test set with prompts derived from its
references, seeded per image. For box prompts the same record holds the "fill the box" baseline
on the same boxes: on lesions a jittered reference box alone already scores a high Dice, so a
box-prompted Dice means little without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clinadapt.errors import ConfigError
from clinadapt.evaluation.seg_evaluate import against_source, evaluate_segmentation
from clinadapt.evaluation.seg_metrics import SegTable, one_hot, score_images
from clinadapt.progress import status
from clinadapt.tasks.base import TASKS, Outcome, Task

if TYPE_CHECKING:
    from clinadapt.config import RunConfig
    from clinadapt.data.segmentation import SegmentationDataset
    from clinadapt.methods.base import Context, Method
    from clinadapt.methods.seg.base import SegMethod, SegPredictions
    from clinadapt.shifts import ShiftSplit

FILL_BOX = "fill-box"
log = logging.getLogger("clinadapt.evaluation")
CASE_RANKS = ("best", "median", "worst")


def target_record(info: Any, method: Method) -> dict[str, Any]:
    """The record's target: what the method changed (the runner's rule for every task)."""
    from clinadapt.runner import target_record as record_of

    return record_of(info, method)


def outcome(
    model: Any,
    info: Any,
    method: Method,
    options: Any,
    preds: dict[str, SegPredictions],
    split: ShiftSplit,
    parts: dict[str, Any],
) -> Outcome:
    """A segmentation run's outcome: what evaluate and write read (the sets' predictions and
    views; the arrays the evaluation fills for the predictions file)."""
    return Outcome(
        model=model.describe(),
        target=target_record(info, method),
        method={"name": method.name, "kind": method.kind, "options": options.model_dump()},
        predictions={"sets": preds, "arrays": {}, "tests": split.tests},
        parts=parts,
    )


def with_prompts(split: ShiftSplit, spec: Any, seed: int) -> ShiftSplit:
    """Every view of ``split`` with the run's prompt protocol attached."""
    import dataclasses

    return dataclasses.replace(
        split,
        train=split.train.with_prompts(spec, seed),
        val=None if split.val is None else split.val.with_prompts(spec, seed),
        tests={n: t.with_prompts(spec, seed) for n, t in split.tests.items()},
    )


def describe_prompts(cfg: RunConfig) -> dict[str, Any]:
    """What the record says about the prompts."""
    spec = dict(cfg.prompt or {})
    if spec.get("kind") == "none":
        how = "none: the learned default prompt (prompt-free)"
    elif spec.get("kind") == "file":
        how = "given per image file name in the prompts file (the user's own)"
        spec["file_sha256"] = file_digest(spec["file"])
    else:
        how = (
            "derived from each image's reference mask, seeded by the run's seed and the "
            "image's index"
        )
    return {"source": how, **spec}


def file_digest(path: str) -> str:
    """SHA-256 of a prompts file: the record and the fit cache follow its content."""
    from clinadapt.segmentation.prompts import given_prompts

    given_prompts(path)  # a missing or unreadable file is a DataError naming it
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def fit_key(cfg: RunConfig, method: str, target: str, options: dict, train: Any) -> str:
    """The cache key of a fit: everything that changes the trained weights."""
    ident = {
        "task": "segmentation",
        "prompt": cfg.prompt,
        "model": cfg.model,
        "weights": cfg.weights,
        "pretrained": cfg.pretrained,
        "method": method,
        "target": target,
        "target_options": cfg.target_options,
        "options": options,
        "train": train.fingerprint(),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
    }
    if (cfg.prompt or {}).get("file"):  # the file's content, not only its name
        ident["prompts_file"] = file_digest(cfg.prompt["file"])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit_or_reuse(
    method: Method,
    model: Any,
    info: Any,
    opts: Any,
    split: ShiftSplit,
    ctx: Context,
    ckpt: Path,
    base: str,
    unit: str = "images",
) -> dict[str, Any]:
    """Reload the trained model from ``ckpt``, or train it and save it there; the summary."""
    from clinadapt.targets import load_adapted, save_adapted

    if ckpt.exists():
        status(f"reusing trained model {ckpt.name}")
        load_adapted(model, ckpt, device=ctx.device)
        return {"reused": ckpt.name}
    status(
        f"training {base} with {method.name} on {split.train.name} "
        f"({len(split.train)} {unit}, target {info.spec})"
    )
    summary = method.fit(model, split.train, split.val, opts, ctx)  # type: ignore[attr-defined]
    save_adapted(model, ckpt, base=base, target=info)
    summary["checkpoint"] = ckpt.name
    return summary


def pick_cases(table: SegTable) -> dict[str, int]:
    """Positions of the best, median and worst image by mean Dice over its classes.

    Images whose reference and prediction are both empty (trivially right) are left out.
    """
    score = table.image_dice()
    anything = (table.ref_present | table.pred_present).any(1)
    pool = np.flatnonzero(anything) if anything.any() else np.arange(len(table))
    order = pool[np.argsort(score[pool], kind="stable")]
    return {"best": int(order[-1]), "median": int(order[len(order) // 2]), "worst": int(order[0])}


def case_arrays(
    test: SegmentationDataset, pred: SegPredictions, cases: dict[str, int], prefix: str
) -> dict[str, np.ndarray]:
    """Image, reference label map, predicted (C,H,W) masks and prompt of each chosen case."""
    out: dict[str, np.ndarray] = {}
    for rank, i in cases.items():
        image, ref = test.pair(i)
        key = f"{prefix}/{rank}"
        out[f"{key}/image"] = image
        out[f"{key}/reference"] = ref
        out[f"{key}/prediction"] = pred.masks[i]
        out[f"{key}/position"] = np.array(i)
        p = pred.prompts[i] if pred.prompts else None
        if p is not None and p.boxes is not None:
            out[f"{key}/boxes"] = np.asarray(p.boxes)
        if p is not None and p.points is not None:
            out[f"{key}/points"] = np.asarray(p.points)
            out[f"{key}/point_labels"] = np.asarray(p.point_labels)
    return out


@TASKS.register("segmentation", help="2D segmentation: label maps, promptable segmenters, Dice")
class SegmentationTask(Task):
    name = "segmentation"
    summary_metrics = ("dice", "dice_present", "nsd", "hd95")
    # what promptable-segmentation papers report; it also compares every method on the same
    # (image, class) pairs, while "dice" gives prompted methods the empty pairs for free
    headline = "dice_present"
    # a test-time run also holds, per set, its unadapted source's metrics and the change
    evaluation_parts = (
        "subgroups",
        "ci",
        "size_bins",
        "baselines",
        "cases",
        "counts",
        "warnings",
        "source_metrics",
        "vs_source",
        "degraded",
    )
    default_model = "tiny-sam"
    default_data = "clinical-shift-seg"
    default_source = "seg-finetune"

    def case_arrays(
        self, test: Any, pred: SegPredictions, cases: dict[str, int], prefix: str
    ) -> dict[str, np.ndarray]:
        """The arrays of the overlay pictures of the chosen cases (2D: the images themselves)."""
        return case_arrays(test, pred, cases, prefix)

    def _segmenter(self, cfg: RunConfig, method: SegMethod, target: str | None, split):
        from clinadapt.segmentation import load_segmenter
        from clinadapt.targets import TargetInfo, apply_target
        from clinadapt.targets.base import count_parameters

        seg = load_segmenter(
            cfg.model, weights=cfg.weights, pretrained=cfg.pretrained, device=cfg.device
        )
        if split.train.prompt_spec.kind == "none":  # prompt-free: a learned prompt per class
            seg.add_default_prompt(split.train.class_names)
        target = target or method.default_target
        if target == "none":
            for p in seg.parameters():
                p.requires_grad_(False)
            _, total = count_parameters(seg)
            return seg, TargetInfo(spec="none", trainable=0, total=total)
        options = cfg.target_options if method.name == cfg.method else None
        return seg, apply_target(seg, target, options)

    def _own_network(self, cfg: RunConfig, method: SegMethod, target, options, split, ctx):
        from clinadapt.targets import TargetInfo
        from clinadapt.targets.base import count_parameters

        if target not in (None, method.default_target):
            raise ConfigError(
                f"{method.name} trains its whole network from scratch; leave target unset"
            )
        if cfg.model != method.default_model:
            raise ConfigError(
                f"{method.name} brings its own network ({method.default_model}); leave model "
                f"unset instead of {cfg.model!r}"
            )
        net = method.build(split.train, options, ctx)
        trainable, total = count_parameters(net)
        return net, TargetInfo(spec=method.default_target, trainable=trainable, total=total)

    def fit(
        self,
        cfg: RunConfig,
        method: Method,
        target: str | None,
        raw_options: dict[str, Any],
        split: ShiftSplit,
        ctx: Context,
    ) -> tuple[Any, Any, Any, dict[str, Any]]:
        """Build the predictor, open its target, and fit it (or reload the fit from the cache).

        Returns the model, its target info, the parsed options and the training summary.
        """

        if method.kind != "fit" or getattr(method, "task", None) != self.name:
            raise ConfigError(
                f"{method.name!r} cannot train a segmentation model; choose a segmentation fit "
                "method (seg-finetune, seg-fewshot, seg-zeroshot, unet)"
            )
        opts = method.parse_options(raw_options)
        if method.uses_segmenter:
            model, info = self._segmenter(cfg, method, target, split)
        else:
            model, info = self._own_network(cfg, method, target, opts, split, ctx)
        base = cfg.model if method.uses_segmenter else model.name
        key = fit_key(cfg, method.name, info.spec, opts.model_dump(), split.train)
        ckpt = Path(cfg.out_dir) / "cache" / f"fit-{key}.safetensors"
        if info.trainable == 0:
            summary = method.fit(model, split.train, split.val, opts, ctx)
        else:
            summary = fit_or_reuse(method, model, info, opts, split, ctx, ckpt, base)
        return model, info, opts, summary

    def run(
        self,
        cfg: RunConfig,
        method: Method,
        split: ShiftSplit,
        ctx: Context,
        timings: dict[str, float],
    ) -> Outcome:
        import time

        from clinadapt.segmentation.prompts import PromptSpec

        split = with_prompts(split, PromptSpec(**cfg.prompt), cfg.seed)
        t = time.perf_counter()
        if method.kind == "tta":
            return self._adapt(cfg, method, split, ctx, timings)
        model, info, opts, summary = self.fit(
            cfg, method, cfg.target, cfg.method_options, split, ctx
        )
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        preds = {name: method.predict(model, test, opts, ctx) for name, test in split.tests.items()}
        timings["evaluate_s"] = time.perf_counter() - t
        parts: dict[str, Any] = {"training": summary}
        if method.uses_segmenter:
            parts["prompts"] = describe_prompts(cfg)
        return outcome(model, info, method, opts, preds, split, parts)

    def _adapt(
        self,
        cfg: RunConfig,
        method: Method,
        split: ShiftSplit,
        ctx: Context,
        timings: dict[str, float],
    ) -> Outcome:
        """A test-time method: train the source (cfg.source), then adapt on each test stream."""
        import dataclasses
        import time

        from clinadapt.methods import METHODS
        from clinadapt.methods.seg.base import SegPredictions, image_prompts
        from clinadapt.methods.tta.seg.protocol import run_seg_tta
        from clinadapt.targets import TargetInfo, apply_target

        t = time.perf_counter()
        source = METHODS.get(cfg.source.method)()
        model, src_info, _, summary = self.fit(
            cfg, source, cfg.source.target, cfg.source.options, split, ctx
        )
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        opts = method.parse_options(cfg.method_options)
        src_opts = source.parse_options(cfg.source.options)
        # the unadapted source on the same images, to measure what adaptation changed
        source_preds = {
            name: source.predict(model, test, src_opts, ctx) for name, test in split.tests.items()
        }
        target = cfg.target or method.default_target
        if target == "none":  # the method moves no parameter of the source model
            info = TargetInfo(spec="none", trainable=0, total=src_info.total)
        else:
            info = apply_target(model, target, cfg.target_options)
        from clinadapt.segmentation import Prompts

        prompted = getattr(source, "uses_segmenter", True)  # a U-Net takes no prompt
        prompts = {
            name: [image_prompts(test, i) if prompted else Prompts() for i in range(len(test))]
            for name, test in split.tests.items()
        }
        result = run_seg_tta(
            method,
            model,
            split.tests,
            prompts,
            opts,
            dataclasses.replace(ctx, batch_size=cfg.stream_batch_size),
            protocol=cfg.tta_protocol,
            order=cfg.stream_order,
        )
        preds = {
            name: SegPredictions(
                [one_hot(m, split.tests[name].num_classes) for m in maps],
                [None if p.is_empty else p for p in prompts[name]],
            )
            for name, maps in result.masks.items()
        }
        timings["evaluate_s"] = time.perf_counter() - t
        parts: dict[str, Any] = {
            "tta": result.info,
            "source": {
                **cfg.source.model_dump(),
                "training": summary,
                "target": target_record(src_info, source),
            },
        }
        if prompted:
            parts["prompts"] = describe_prompts(cfg)
        result = outcome(model, info, method, opts, preds, split, parts)
        result.predictions["source_sets"] = source_preds
        return result

    def evaluate(
        self, outcome: Outcome, split: ShiftSplit, cfg: RunConfig
    ) -> dict[str, dict[str, Any]]:
        """Per set: metrics, size bins, subgroups, CIs; the fill-box baseline for box prompts
        (``baselines``); the best, median and worst image (``cases``, arrays for the report)."""
        from clinadapt.methods.seg.base import fill_boxes

        ev = cfg.evaluation
        out: dict[str, dict[str, Any]] = {}
        arrays = outcome.predictions["arrays"]
        for name, pred in outcome.predictions["sets"].items():
            test = outcome.predictions["tests"][name]
            refs = [test.mask(i) for i in range(len(test))]
            table = score_images(
                pred.masks, refs, test.spacing, test.class_names, ev.nsd_tolerance_mm
            )
            settings = {
                "n_boot": ev.n_boot,
                "alpha": ev.alpha,
                "seed": cfg.seed,
                "size_edges_mm": ev.size_edges_mm,
                "nsd_tolerance_mm": ev.nsd_tolerance_mm,
            }
            out[name] = evaluate_segmentation(
                table, test.metadata, subgroup_keys=ev.subgroup_keys, **settings
            )
            if any(p is not None and p.boxes is not None for p in pred.prompts):
                filled = [
                    fill_boxes(p, r.shape, test.num_classes)
                    for p, r in zip(pred.prompts, refs, strict=True)
                ]
                fb = score_images(filled, refs, test.spacing, test.class_names, ev.nsd_tolerance_mm)
                fb_eval = evaluate_segmentation(fb, test.metadata, subgroup_keys=(), **settings)
                out[name]["baselines"] = {
                    FILL_BOX: {k: fb_eval[k] for k in ("metrics", "ci") if k in fb_eval}
                }
            source = outcome.predictions.get("source_sets", {}).get(name)
            if source is not None:
                src_table = score_images(
                    source.masks, refs, test.spacing, test.class_names, ev.nsd_tolerance_mm
                )
                out[name].update(
                    against_source(
                        name,
                        table,
                        src_table,
                        test.metadata,
                        n_boot=ev.n_boot,
                        alpha=ev.alpha,
                        seed=cfg.seed,
                    )
                )
            cases = pick_cases(table)
            out[name]["cases"] = {
                rank: {"position": i, "dice": float(table.image_dice()[i])}
                for rank, i in cases.items()
            }
            arrays.update(self.case_arrays(test, pred, cases, f"cases/{name}"))
            for field in ("dice", "iou", "nsd", "hd95", "ref_area", "pred_area", "spacing"):
                arrays[f"table/{name}/{field}"] = getattr(table, field)
            pid = test.metadata.get("patient_id")
            out[name]["counts"] = {
                "images": len(test),
                "patients": None if pid is None else len(set(pid.tolist())),
            }
            for key in ("patient_id", *ev.subgroup_keys):  # for pooled, patient-level CIs
                if key in test.metadata:
                    arrays[f"meta/{name}/{key}"] = test.metadata[key]
        degraded = [d for e in out.values() for d in e.get("degraded", [])]
        if degraded:  # one line per run; every case is in the record
            from clinadapt.evaluation.compare import describe

            worst = min(degraded, key=lambda d: d["change"])
            log.warning(
                "%s ended below the unadapted source on %d of %d test sets "
                "(record['degraded']); the largest drop: %s",
                cfg.method,
                len({d["set"] for d in degraded}),
                len(out),
                describe(cfg.method, worst),
            )
        return out

    def write(self, out_dir: str, record: dict[str, Any], outcome: Outcome) -> None:
        """The per-image tables and the overlay cases (.npz), then the record."""
        from clinadapt.store import write_arrays, write_record

        out = Path(out_dir)
        arrays = outcome.predictions["arrays"]
        write_arrays(out / "predictions" / f"{record['run_id']}.npz", **arrays)
        write_record(out / f"{record['run_id']}.json", record)
