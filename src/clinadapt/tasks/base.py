"""A task is what a dataset asks of a model: its predictor, its metrics and its report panels.

The runner reads the same for every task: load the data and split it by the shift, take the
task the dataset declares, let it fit or adapt and predict every test set (``run``), evaluate
each set (``evaluate``), build the record, and write it with the task's predictions (``write``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from clinadapt._registry import Registry
from clinadapt.data.base import SEGMENTATION, ClinicalDataset
from clinadapt.errors import IncompatibleError

if TYPE_CHECKING:
    from clinadapt.config import RunConfig
    from clinadapt.methods.base import Context, Method
    from clinadapt.shifts import ShiftSplit

TASKS: Registry = Registry("task")


@dataclass
class Outcome:
    """What a task's run produced, before evaluation.

    ``model``, ``target`` and ``method`` are the record's parts of the same names; ``parts``
    the task's own (training, tta, source, prompts, ...); ``predictions`` whatever its
    ``evaluate`` and ``write`` read (probabilities, masks, ...).
    """

    model: dict[str, Any]
    target: dict[str, Any]
    method: dict[str, Any]
    predictions: Any
    parts: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """One kind of prediction: classification, segmentation, ..."""

    name: ClassVar[str]
    #: headline metrics of the record's ``summary`` (in-domain, shifted, worst set)
    summary_metrics: ClassVar[tuple[str, ...]]
    #: the one metric a short table of this task's runs shows
    headline: ClassVar[str]
    #: per-test-set parts of an evaluation the record keeps besides ``metrics``
    evaluation_parts: ClassVar[tuple[str, ...]]
    #: report panels (names in the report's panel registry) that show this task's records
    panels: ClassVar[tuple[str, ...]] = ()
    #: the model and dataset a run of this task uses when the config names none (offline)
    default_model: ClassVar[str]
    default_data: ClassVar[str]
    #: the fit method that trains the source of a test-time run when the config names none
    default_source: ClassVar[str] = "finetune"

    def check(self, method: Method, data: ClinicalDataset) -> None:
        """Refuse a method made for another task, naming both."""
        own = getattr(method, "task", "classification")
        if own != self.name:
            raise IncompatibleError(
                f"method {method.name!r} is a {own} method, but {data.name!r} is {self.name} "
                f"data; choose a {self.name} method (clinadapt methods lists them by task)"
            )

    @abc.abstractmethod
    def run(
        self,
        cfg: RunConfig,
        method: Method,
        split: ShiftSplit,
        ctx: Context,
        timings: dict[str, float],
    ) -> Outcome:
        """Build the predictor, fit or adapt it, and predict every test set of ``split``."""

    @abc.abstractmethod
    def evaluate(
        self, outcome: Outcome, split: ShiftSplit, cfg: RunConfig
    ) -> dict[str, dict[str, Any]]:
        """Per test set: ``metrics`` and the parts in ``evaluation_parts``."""

    @abc.abstractmethod
    def write(self, out_dir: str, record: dict[str, Any], outcome: Outcome) -> None:
        """Write the predictions, then the record (a record always has its predictions)."""


#: the task of segmentation volumes (label volumes, 3D backbones, sliding-window inference)
SEGMENTATION_3D = "segmentation-3d"


def task_of(data: ClinicalDataset) -> str:
    """The task a dataset declares: ``segmentation`` (``segmentation-3d`` for volumes) or
    ``classification``."""
    if data.task != SEGMENTATION:
        return "classification"
    return SEGMENTATION_3D if data.spatial_dims == 3 else SEGMENTATION


def task_for(data: ClinicalDataset) -> Task:
    """The registered task of ``data``."""
    from clinadapt import tasks  # noqa: F401  (registers the tasks)

    return TASKS.get(task_of(data))()


def headline_metric(records: list[dict[str, Any]]) -> str:
    """The headline metric of the records' task (the first record's; classification if old)."""
    from clinadapt import tasks  # noqa: F401

    name = (records[0].get("task") or "classification") if records else "classification"
    return TASKS.get(name).headline


def method_task(method: str) -> str:
    """The task a registered method is for (classification unless tagged otherwise)."""
    from clinadapt.methods import METHODS

    if method not in METHODS:
        return "classification"
    tags = METHODS.entry(method).tags
    for task in (SEGMENTATION_3D, SEGMENTATION):
        if task in tags:
            return task
    return "classification"


def task_defaults(method: str, source: str | None = None) -> tuple[str, str]:
    """(model, data) a run of ``method`` uses when the config names neither.

    A method that brings its own network (the U-Net baseline) names it; a test-time method
    takes the model of the fit method that trains its ``source``.
    """
    from clinadapt import tasks  # noqa: F401
    from clinadapt.methods import METHODS

    task = TASKS.get(method_task(method))
    own = None
    if method in METHODS:
        cls = METHODS.get(method)
        if cls.kind == "tta" and source in METHODS:
            cls = METHODS.get(source)
        own = getattr(cls, "default_model", None)
    return own or task.default_model, task.default_data
