"""What segmentation methods call on any mask model: images (+ prompts) -> probability maps.

A promptable :class:`~clinadapt.segmentation.base.Segmenter` gives one independent (sigmoid)
probability map per prompt; a dense model such as a U-Net gives a softmax over background and
the C classes. :class:`ProbMap` holds either, with the label each map stands for, so that
metrics, test-time losses and label maps treat both alike.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clinadapt.errors import DataError
from clinadapt.segmentation.prompts import Prompts

LN2 = math.log(2.0)


def union_by_class(masks: np.ndarray, class_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, H, W) booleans: per class 1..C, the union of the masks that stand for it.

    Masks of different classes may overlap (each prompt gets its own mask); the metrics take
    this form, so a prompted prediction is scored as the segmenter gave it.
    """
    out = np.zeros((num_classes, *masks.shape[1:]), dtype=bool)
    for m, c in zip(masks, np.asarray(class_ids), strict=True):
        if 1 <= c <= num_classes:
            out[c - 1] |= m
    return out


@dataclass
class ProbMap:
    """Per-pixel probabilities of one image at its resolution.

    ``probs`` (K, H, W); ``exclusive``: a softmax over K = C + 1 maps (background first), else
    K independent foreground maps (one per prompt, sigmoid); ``class_ids`` (K,) the label of
    each map (0 for the background map of a softmax).
    """

    probs: torch.Tensor
    exclusive: bool
    class_ids: np.ndarray
    threshold: float = 0.5

    def label_map(self) -> np.ndarray:
        """(H, W) int64 labels: argmax of a softmax; else the most probable map above 0.5."""
        p = self.probs.detach().float().cpu()
        ids = np.asarray(self.class_ids, dtype=np.int64)
        if p.shape[0] == 0:
            return np.zeros(tuple(p.shape[1:]), dtype=np.int64)
        best = p.argmax(0).numpy()
        if self.exclusive:
            return ids[best]
        fg = (p > self.threshold).any(0).numpy()
        return np.where(fg, ids[best], 0).astype(np.int64)

    def class_masks(self, num_classes: int) -> np.ndarray:
        """(C, H, W) booleans: one-hot labels of a softmax; else each class's maps > 0.5, united."""
        if self.exclusive:
            labels = self.label_map()
            return np.stack([labels == c for c in range(1, num_classes + 1)])
        masks = (self.probs.detach().float().cpu() > self.threshold).numpy()
        return union_by_class(masks, self.class_ids, num_classes)

    def entropy(self) -> torch.Tensor:
        """Per-pixel entropy in nats: (H, W) of the softmax, or (K, H, W) of each sigmoid map."""
        p = self.probs.float().clamp(1e-6, 1 - 1e-6)
        if self.exclusive:
            return -(p * p.log()).sum(0)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    def max_entropy(self) -> float:
        """The entropy of a uniform prediction: ln(C + 1) for a softmax, ln 2 per sigmoid map."""
        return math.log(self.probs.shape[0]) if self.exclusive else LN2

    def foreground(self) -> torch.Tensor:
        """(H, W) probability that a pixel belongs to any class."""
        if self.exclusive:
            return 1 - self.probs[0]
        if self.probs.shape[0] == 0:
            return torch.zeros(self.probs.shape[1:], device=self.probs.device)
        return self.probs.max(0).values


class MaskModel(abc.ABC):
    """A model that segment methods train, adapt and evaluate through one call."""

    @abc.abstractmethod
    def mask_probs(self, images: Sequence[np.ndarray], prompts: Sequence[Prompts]) -> list[ProbMap]:
        """Probability maps of each image for its prompts (differentiable when grad is on)."""


@torch.no_grad()
def predict_dataset(
    model: MaskModel,
    dataset,
    prompts: Sequence[Prompts],
    batch_size: int = 8,
) -> list[np.ndarray]:
    """(C, H, W) class masks of every image of ``dataset`` (a SegmentationDataset view), in
    its order (see :meth:`ProbMap.class_masks`)."""
    if len(prompts) != len(dataset):
        raise DataError(f"{len(prompts)} prompts for {len(dataset)} images of {dataset.name}")
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        maps = model.mask_probs([dataset.image(i) for i in idx], [prompts[i] for i in idx])
        out.extend(m.class_masks(dataset.num_classes) for m in maps)
    if was_training and isinstance(model, torch.nn.Module):
        model.train()
    return out
