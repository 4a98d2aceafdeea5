"""Test-time adaptation for segmentation: the method base, the stream loop and its collapse guard.

A segmentation test-time method adapts a mask model (a promptable segmenter, or any
:class:`~clinadapt.segmentation.predict.MaskModel`) along an unlabelled stream of images with
their prompts, and returns each image's (C, H, W) class masks in stream order, in the form the
non-adaptive prediction takes (``ProbMap.class_masks``), so that a method that changes nothing
scores exactly as the source model. The prompts are the run's
(derived from each reference the same way for every method), never the reference masks.
"""

from __future__ import annotations

import abc
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from clinadapt.errors import IncompatibleError
from clinadapt.methods.base import Context, Options, TTAMethod
from clinadapt.methods.trace import StreamResult
from clinadapt.methods.tta.adapter import Adapter, GuardOptions, event
from clinadapt.progress import progress
from clinadapt.segmentation.predict import MaskModel, ProbMap
from clinadapt.segmentation.prompts import Prompts

#: A predicted foreground share below this (or above 1 - this) makes an image "degenerate".
DEGENERATE_SHARE = 1e-3
log = logging.getLogger("clinadapt.tta")


@dataclass
class SegStreamResult:
    """(C, H, W) class masks of one stream in its order, and its events (resets, would-be
    resets)."""

    masks: list[np.ndarray]
    events: list[dict[str, Any]] = field(default_factory=list)


class SegTTAMethod(TTAMethod):
    """A test-time method for segmentation: ``adapt_masks`` instead of ``adapt``."""

    task: ClassVar[str] = "segmentation"

    def adapt(self, model: Any, stream: Any, options: Options, ctx: Context) -> StreamResult:
        raise IncompatibleError(
            f"{self.name} adapts segmentation models; {getattr(stream, 'name', 'this stream')} "
            "is a classification dataset"
        )

    @abc.abstractmethod
    def adapt_masks(
        self,
        model: MaskModel,
        stream: Any,
        prompts: Sequence[Prompts],
        options: Options,
        ctx: Context,
    ) -> SegStreamResult:
        """(C, H, W) class masks of ``stream`` (a SegmentationDataset) in its order, adapting,
        and what happened on the way.

        ``model`` is the source model and stays unchanged (methods adapt a private copy).
        """


class SegCollapseGuard:
    """Watch the last ``window`` prompted images; report a collapse or a non-finite loss.

    It only reports; the stream resets on a collapse when the options say ``guard=reset`` (a
    non-finite output always resets).

    Entropy minimisation on masks collapses to all-background or all-foreground predictions
    with near-zero entropy. A stream has collapsed when, over a full window of images that asked
    for an object, the mean pixel entropy is below ``entropy_frac`` of its maximum *and* at least
    ``share`` of the images are degenerate (predicted foreground below 0.1% or above 99.9% of
    the image).
    """

    def __init__(
        self,
        window: int = 128,
        entropy_frac: float = 0.05,
        share: float = 0.95,
    ) -> None:
        self.window = window
        self.entropy_frac = entropy_frac
        self.share = share
        self.entropy: deque[float] = deque(maxlen=window)
        self.degenerate: deque[bool] = deque(maxlen=window)

    def clear(self) -> None:
        self.entropy.clear()
        self.degenerate.clear()

    def check(self, maps: Sequence[ProbMap], loss: torch.Tensor | float | None) -> str | None:
        """Add a batch of predictions; return why the stream looks broken, or None."""
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss))):
            return f"non-finite loss ({float(loss)})"
        if any(not bool(torch.isfinite(m.probs).all()) for m in maps):
            return "non-finite predictions"
        for m in maps:
            if m.probs.shape[0] == 0:
                continue  # nothing was asked of this image
            with torch.no_grad():
                self.entropy.append(float(m.entropy().mean()) / m.max_entropy())
                fg = float((m.foreground() > 0.5).float().mean())
            self.degenerate.append(fg < DEGENERATE_SHARE or fg > 1 - DEGENERATE_SHARE)
        if len(self.degenerate) < self.window:
            return None
        mean_entropy = sum(self.entropy) / len(self.entropy)
        share = sum(self.degenerate) / len(self.degenerate)
        if mean_entropy < self.entropy_frac and share >= self.share:
            return (
                f"collapse: mean pixel entropy {mean_entropy:.4f} of its maximum < "
                f"{self.entropy_frac} and {share:.0%} of the last {len(self.degenerate)} masks "
                "empty or filling the image"
            )
        return None


def make_guard(options: GuardOptions) -> SegCollapseGuard:
    return SegCollapseGuard(options.guard_window, options.guard_entropy, options.guard_share)


class SegAdapter(Adapter):
    """One private model copy adapting along a segmentation stream (reset as classification's)."""

    @abc.abstractmethod
    def forward_and_adapt(  # type: ignore[override]
        self, images: list[np.ndarray], prompts: list[Prompts]
    ) -> tuple[list[ProbMap], torch.Tensor | None]:
        """Predict a batch while adapting; return its probability maps and the loss (or None)."""

    @torch.no_grad()
    def predict(  # type: ignore[override]
        self, images: list[np.ndarray], prompts: list[Prompts]
    ) -> list[ProbMap]:
        return self.model.mask_probs(images, prompts)


def run_seg_stream(
    adapter: SegAdapter,
    stream: Any,
    prompts: Sequence[Prompts],
    ctx: Context,
    guard: SegCollapseGuard,
    method: str,
    reset_on_collapse: bool = False,
) -> SegStreamResult:
    """Adapt along ``stream`` in order, ``ctx.batch_size`` images at a time.

    A non-finite output always resets to the source model; a collapse only when
    ``reset_on_collapse`` (``guard=reset``), else it is recorded as a would-be reset.
    """
    if len(prompts) != len(stream):
        raise IncompatibleError(f"{len(prompts)} prompt sets for {len(stream)} images")
    out: list[np.ndarray] = []
    events: list[dict[str, Any]] = []
    starts = range(0, len(stream), ctx.batch_size)
    for start in progress(starts, f"{method} {stream.name}", total=len(starts)):
        idx = range(start, min(start + ctx.batch_size, len(stream)))
        images = [stream.image(i) for i in idx]
        batch_prompts = [prompts[i] for i in idx]
        maps, loss = adapter.forward_and_adapt(images, batch_prompts)
        reason = guard.check(maps, loss)
        if reason and not (reset_on_collapse or reason.startswith("non-finite")):
            events.append(event(method, stream.name, start, "would-reset", reason))
        elif reason:
            adapter.reset()
            guard.clear()
            events.append(event(method, stream.name, start, "reset", reason))
            log.warning(
                "%s: reset to the source model at image %d of %s: %s",
                method,
                start,
                stream.name,
                reason,
            )
            if any(not bool(torch.isfinite(m.probs).all()) for m in maps):
                maps = adapter.predict(images, batch_prompts)
        out.extend(m.class_masks(stream.num_classes) for m in maps)
    return SegStreamResult(out, events)


def entropy_loss(maps: Sequence[ProbMap]) -> torch.Tensor | None:
    """Mean pixel entropy over the images (and prompts) that asked for something."""
    terms = [m.entropy().mean() for m in maps if m.probs.shape[0] > 0]
    return torch.stack(terms).mean() if terms else None
