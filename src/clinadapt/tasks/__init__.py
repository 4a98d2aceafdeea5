"""Tasks: what a dataset asks of a model (its predictor, metrics and report panels)."""

from clinadapt.tasks import classification, segmentation  # noqa: F401  (registrations)
from clinadapt.tasks.base import TASKS, Outcome, Task, method_task, task_defaults, task_for, task_of

__all__ = ["TASKS", "Outcome", "Task", "method_task", "task_defaults", "task_for", "task_of"]
