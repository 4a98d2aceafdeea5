"""The collapse monitor: watch a test-time stream's predictions for the trivial solution.

By default it only watches and records (``guard=watch``), so a method behaves as its paper; with
``guard=reset`` the stream goes back to the source model when the monitor sees a collapse.
Non-finite outputs always send it back (a NaN is never a prediction), counted as a reset.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

import torch


@dataclass
class Reading:
    """The monitor's view after one batch (entropies normalised by ln K)."""

    entropy: float  # mean prediction entropy of the batch / ln K
    diversity: float  # entropy of the window's predicted-class histogram / ln K
    top_share: float  # share of the window's predictions in its most frequent class
    collapse: str | None  # why the full window looks collapsed, else None


class CollapseGuard:
    """Watch the last ``window`` predictions for the signature of a collapsed stream.

    A stream has collapsed when, over a full window, the mean prediction entropy is below
    ``entropy_frac * ln K`` *and* one class takes at least ``share`` of the predictions:
    the signature of entropy minimisation that has found the trivial solution. A class-sorted
    stream with a very confident model can also show it, which is why the default only records.
    """

    def __init__(
        self, num_classes: int, window: int = 128, entropy_frac: float = 0.05, share: float = 0.95
    ) -> None:
        self.num_classes = num_classes
        self.log_k = math.log(max(num_classes, 2))
        self.window = window
        self.max_entropy = entropy_frac * math.log(num_classes) if num_classes > 1 else 0.0
        self.share = share
        self.entropy: deque[float] = deque(maxlen=window)
        self.preds: deque[int] = deque(maxlen=window)

    def clear(self) -> None:
        """Forget the window (after a reset, the new model starts afresh)."""
        self.entropy.clear()
        self.preds.clear()

    def observe(self, probs: torch.Tensor) -> Reading:
        """Add a batch of (finite) probabilities; return the monitor's reading."""
        probs = probs.detach().float()
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        self.entropy.extend(ent.tolist())
        self.preds.extend(probs.argmax(1).tolist())
        counts = Counter(self.preds)
        n = len(self.preds)
        p = torch.tensor([c / n for c in counts.values()])
        diversity = float(-(p * p.log()).sum()) / self.log_k
        top_share = max(counts.values()) / n
        collapse = None
        mean_entropy = sum(self.entropy) / len(self.entropy)
        if n >= self.window and mean_entropy < self.max_entropy and top_share >= self.share:
            collapse = (
                f"collapse: mean entropy {mean_entropy:.4f} < {self.max_entropy:.4f} and "
                f"{top_share:.0%} of the last {n} predictions in one class"
            )
        return Reading(float(ent.mean()) / self.log_k, diversity, top_share, collapse)


def non_finite(probs: torch.Tensor, loss: torch.Tensor | float | None = None) -> str | None:
    """Why a batch's outputs cannot be used (a non-finite loss or prediction), or None."""
    if loss is not None and not math.isfinite(float(loss)):
        return f"non-finite loss ({float(loss)})"
    if not torch.isfinite(probs).all():
        return "non-finite predictions"
    return None
