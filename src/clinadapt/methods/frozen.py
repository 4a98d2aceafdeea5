"""Fit methods on frozen features: embed through the cache, sample the support set, fit a head."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import DataError, IncompatibleError
from clinadapt.features import FeatureCache, resolve_cache_dir
from clinadapt.methods.base import Context, FitMethod
from clinadapt.methods.budget import FewShotOptions


class FrozenOptions(FewShotOptions):
    """Shots, and how a head that searches hyper-parameters selects them (``selection``)."""


@dataclass(frozen=True)
class LabelledFeatures:
    """Frozen (N, D) features with their (N,) class labels."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or len(self.x) != len(self.y):
            raise DataError(f"features {self.x.shape} do not match labels {self.y.shape}")


class FeatureHead(nn.Module):
    """A head mapping features to logits whose whole state lives in buffers.

    Buffers travel with the runner's checkpoint (trainable parameters + buffers), and
    :meth:`from_state` rebuilds the head from them, so a cached fit restores exactly.
    """

    def __init__(self, **buffers: torch.Tensor | float | int) -> None:
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, torch.as_tensor(value))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "head.") -> FeatureHead:
        """Rebuild the head from a checkpoint's ``head.*`` buffers."""
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise IncompatibleError(f"{cls.__name__}: the checkpoint holds no {prefix}* tensors")
        try:
            return cls(**own)
        except TypeError as e:
            raise IncompatibleError(f"{cls.__name__}: checkpoint tensors {sorted(own)}: {e}") from e


class FrozenFeatureMethod(FitMethod, abc.ABC):
    """Embed once through the feature cache, then fit a head on the support features."""

    default_target = "head"
    Options = FrozenOptions
    head_type: ClassVar[type[FeatureHead] | None] = None

    @abc.abstractmethod
    def fit_head(
        self,
        model: ImageClassifier,
        support: LabelledFeatures,
        val: LabelledFeatures | None,
        data: ClinicalDataset,
        options: Any,
        ctx: Context,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Return a head mapping features to logits, and a summary of how it was chosen.

        ``support`` and ``val`` are all the labelled data it may use (``val`` is None unless
        ``options.selection`` is kshot-val or validation); ``data`` is the support set itself
        (class names, modality, task).
        """

    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: FrozenOptions,
        ctx: Context,
    ) -> dict[str, Any]:
        if train.task == "multilabel":
            raise IncompatibleError(
                f"{self.name}: multi-label tasks are not supported; use finetune --target head"
            )
        budget = self.labelled_budget(train, val, options, ctx.seed)  # before any embedding
        cache = FeatureCache(resolve_cache_dir(ctx.cache_dir))
        feats = cache.features(model, budget.train, ctx.batch_size, ctx.device)
        support = LabelledFeatures(feats, budget.train.labels)
        va = None
        if budget.val is not None:
            va = LabelledFeatures(
                cache.features(model, budget.val, ctx.batch_size, ctx.device), budget.val.labels
            )
        resolved = options.model_copy(update={"selection": budget.selection})
        head, summary = self.fit_head(model, support, va, budget.train, resolved, ctx)
        model.head = head.to(ctx.device)
        return {
            **summary,
            "selection": budget.selection,
            "support_images": len(budget.train),
            "feature_cache": cache.stats(),
        }

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        if self.head_type is not None:
            device = next(iter(state.values())).device
            model.head = self.head_type.from_state(state).to(device)
        super().load_adapted(model, state)


def head_logits(head: nn.Module, x: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """Logits of a feature head for (N, D) features."""
    with torch.no_grad():
        return head(torch.as_tensor(x, dtype=torch.float32, device=device)).float().cpu()
