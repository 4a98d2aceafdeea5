"""Tasks: what a dataset asks of a model (its predictor, metrics and report panels)."""

from clinadapt.tasks import (  # noqa: F401  (registrations)
    classification,
    segmentation,
    segmentation_3d,
)
from clinadapt.tasks.base import TASKS, Outcome, Task, method_task, task_defaults, task_for, task_of

__all__ = ["TASKS", "Outcome", "Task", "method_task", "task_defaults", "task_for", "task_of"]
