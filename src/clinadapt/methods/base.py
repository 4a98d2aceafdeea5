"""How to adapt: the two kinds of method and the one way every method predicts."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from clinadapt.classifier import ImageClassifier
from clinadapt.compute import autocast, grad_scaler
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import IncompatibleError
from clinadapt.layout import channels_last_inference
from clinadapt.methods.registry import METHODS  # noqa: F401  (re-exported: modules register through here)
from clinadapt.methods.trace import StreamResult
from clinadapt.progress import progress
from clinadapt.validate import parse_model

if TYPE_CHECKING:
    from clinadapt.methods.budget import LabelledBudget


class Options(BaseModel):
    """Base of every method's typed options: unknown fields and non-finite numbers (lr=inf) are
    errors, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class Context:
    """What a method may use besides its data: batch size, seed, device, caches.

    For a test-time method ``batch_size`` is the stream's batch size.
    """

    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    # unlabelled target sets by name (labels hidden), for methods with ``uses_unlabelled``
    unlabelled: dict[str, ClinicalDataset] = field(default_factory=dict)
    # where frozen-backbone features are cached (None: $CLINADAPT_CACHE, else memory only)
    cache_dir: str | None = None
    # mixed precision of forward passes: fp32, bf16 or fp16 (see clinadapt.compute)
    precision: str = "fp32"
    # the run's output folder: relative paths a method writes (checkpoints) go there
    out_dir: str | None = None
    # what the target opened (a TargetInfo), for files that must rebuild it (checkpoints)
    target: Any = None
    # a backbone object given to clinadapt.run (copied for each model built), else None
    encoder: Any = None

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for forward passes at the run's precision (nothing for fp32)."""
        return autocast(self.device, self.precision)

    def grad_scaler(self) -> Any:
        """A loss scaler for fp16 training (a pass-through at other precisions)."""
        return grad_scaler(self.device, self.precision)

    def output_path(self, path: str | Path) -> Path:
        """``path`` inside the run's output folder, unless it is absolute."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.out_dir is None else Path(self.out_dir) / p

    # processes decoding image files ahead of the model (None: automatic, see data.loading)
    loader_workers: int | None = None

    def batches(
        self, ds: ClinicalDataset, preprocess: Any, **options: Any
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """``ds.batches`` at this context's batch size, workers and (for CUDA) pinned memory, the
        images preprocessed on this context's device."""
        return ds.batches(
            preprocess,
            self.batch_size,
            workers=self.loader_workers,
            pin_memory=str(self.device).startswith("cuda"),
            device=self.device,
            **options,
        )


class Method(abc.ABC):  # noqa: B024 (the two kinds below hold the abstract methods)
    """A registered way to adapt; subclasses say their ``kind`` and typed ``Options``."""

    name: ClassVar[str] = "method"
    kind: ClassVar[Literal["fit", "tta"]] = "fit"
    #: the task a method is for; segmentation methods register with tags=("segmentation",)
    task: ClassVar[str] = "classification"
    Options: ClassVar[type[Options]] = Options
    #: What the method changes when it trains no parameter, in a few words for tables (bn:
    #: "normalisation statistics (per test batch)"); records show it with 0 trainable
    #: parameters. None: the parameters of its target.
    changes: ClassVar[str | None] = None

    def parse_options(self, options: dict[str, Any] | None) -> Options:
        """Validate ``options``; an unknown key or bad value is one ConfigError naming it."""
        return parse_model(self.Options, options, f"method {self.name!r}")


class FitMethod(Method):
    """Trains the classifier on labelled source data (in place)."""

    kind = "fit"
    default_target: ClassVar[str] = "head"
    #: Whether ``fit`` learns from the labels (zero-shot does not): then the training data must
    #: hold at least two classes.
    reads_labels: ClassVar[bool] = True
    #: True for domain-adaptation methods that also learn from the shifted test images without
    #: their labels (transductive); the runner then passes them in ``ctx.unlabelled``
    uses_unlabelled: ClassVar[bool] = False
    #: Whether ``fit`` can choose on cross-validation within the support set (selection support-cv)
    cross_validates: ClassVar[bool] = False
    #: Whether ``fit`` splits each global batch between the processes ``torchrun`` starts
    #: (clinadapt.distributed) and trains what one process would; others refuse to run there
    data_parallel: ClassVar[bool] = False

    def labelled_budget(
        self,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: Options,
        seed: int,
    ) -> LabelledBudget:
        """The labelled images ``fit`` may see with ``options`` (K per class in K-shot runs).

        The runner passes only these to ``fit`` and chooses the operating point on their
        validation part; ``fit`` applies the same budget to what it is given (a no-op then).
        """
        from clinadapt.methods.budget import labelled_budget

        return labelled_budget(train, val, options, seed, cross_validates=self.cross_validates)

    @abc.abstractmethod
    def fit(
        self,
        model: ImageClassifier,
        train: ClinicalDataset,
        val: ClinicalDataset | None,
        options: Options,
        ctx: Context,
    ) -> dict[str, Any]:
        """Adapt ``model`` on ``train``; return a training summary (history, best epoch, ...)."""

    def load_adapted(self, model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint of what ``fit`` adapted (trainable parameters and buffers)."""
        model.load_state_dict(state, strict=False)


class TTAMethod(Method):
    """Adapts a source-trained classifier on an unlabelled test stream while predicting it."""

    kind = "tta"
    default_target: ClassVar[str] = "norm"
    #: the fit method that must train the source (None: any, ``source.method`` decides); TTT++
    #: needs what its own source training learns
    source_method: ClassVar[str | None] = None
    #: the fit methods whose source it can adapt, the first the default (None: any)
    source_methods: ClassVar[tuple[str, ...] | None] = None
    #: it needs single-label classes (a softmax over them); checked before the source trains
    single_label: ClassVar[bool] = False

    def prepare(
        self,
        model: ImageClassifier,
        source: ClinicalDataset | None,
        options: Options,
        ctx: Context,
    ) -> None:
        """Called once before the streams with labelled source images (the validation split).

        EATA estimates its Fisher information here; most methods need nothing.
        """

    @abc.abstractmethod
    def adapt(
        self, model: ImageClassifier, stream: ClinicalDataset, options: Options, ctx: Context
    ) -> StreamResult:
        """Adapt along ``stream`` in its own order; return its (N, K) probabilities and what
        the method did (a per-batch trace, events), never changing ``model`` itself."""


def check_single_label(method: TTAMethod, data: ClinicalDataset) -> None:
    """IncompatibleError when ``method`` needs single-label classes and ``data`` is multi-label."""
    if method.single_label and data.task == "multilabel":
        raise IncompatibleError(
            f"{method.name}: test-time adaptation here needs single-label classes (softmax); "
            f"{data.name} is multi-label"
        )


@torch.no_grad()
def predict_proba(
    model: ImageClassifier, ds: ClinicalDataset, ctx: Context, desc: str = "predict"
) -> np.ndarray:
    """Softmax (or sigmoid for multi-label) probabilities of a frozen model in eval mode."""
    model.eval()
    out = []
    total = -(-len(ds) // ctx.batch_size)
    with channels_last_inference(model, ctx.device):  # faster CNN inference on the CPU
        for x, _, _ in progress(ctx.batches(ds, model.preprocess), desc, total=total):
            with ctx.autocast():
                logits = model(x.to(ctx.device)).float()
            out.append(logits_to_proba(logits, ds.task).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def logits_to_proba(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
