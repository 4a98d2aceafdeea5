"""What each metric is: its label, which direction is better, its range and unit.

One table read by the runner (worst test set), the subgroup gaps, the tidy results and the report,
so a metric has one direction everywhere. A task that brings new metrics adds rows with
:func:`register_metric`; a record may also declare its own under ``record["metric_info"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MetricInfo:
    """How to read and draw one metric."""

    name: str
    label: str
    higher_is_better: bool
    low: float | None = 0.0  # the range, for axes; None: unbounded
    high: float | None = 1.0
    unit: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def worst(self, values: dict[str, float]) -> str:
        """The key of the worst value."""
        return (min if self.higher_is_better else max)(values, key=values.get)


_ROWS = (
    MetricInfo("accuracy", "accuracy", True, description="fraction of correct top-1 predictions"),
    MetricInfo(
        "balanced_accuracy",
        "balanced accuracy",
        True,
        description="mean recall over the classes present",
    ),
    MetricInfo("macro_f1", "macro F1", True, description="unweighted mean F1 over classes"),
    MetricInfo("auroc", "AUROC", True, description="area under the ROC curve (one-vs-rest macro)"),
    MetricInfo(
        "ece",
        "ECE",
        False,
        description="top-label expected calibration error, 15 equal-width bins (Guo et al., 2017)",
    ),
    MetricInfo("nll", "NLL", False, high=None, description="mean negative log-likelihood"),
    MetricInfo(
        "brier", "Brier score", False, high=2.0, description="mean squared error to one-hot"
    ),
    MetricInfo(
        "sensitivity", "sensitivity", True, description="recall of positives at the operating point"
    ),
    MetricInfo(
        "specificity", "specificity", True, description="recall of negatives at the operating point"
    ),
    MetricInfo(
        "ppv", "PPV", True, description="precision of positive calls at the operating point"
    ),
    MetricInfo(
        "npv", "NPV", True, description="precision of negative calls at the operating point"
    ),
    MetricInfo("sensitivity_at_0.5", "sensitivity at 0.5", True),
    MetricInfo("specificity_at_0.5", "specificity at 0.5", True),
    MetricInfo("aurc", "AURC", False, description="area under the risk-coverage curve"),
    MetricInfo(
        "coverage_at_target",
        "coverage at target error",
        True,
        description="largest fraction of cases answered with selective error <= the target",
    ),
    MetricInfo("dice", "Dice", True, description="overlap 2|A∩B| / (|A| + |B|)"),
    MetricInfo("dice_present", "Dice (reference present)", True),
    MetricInfo("iou", "IoU", True, description="intersection over union"),
    MetricInfo(
        "nsd", "NSD", True, description="normalised surface distance at a tolerance (Nikolov 2021)"
    ),
    MetricInfo(
        "hd95",
        "HD95",
        False,
        high=None,
        unit="mm",
        description="95th percentile Hausdorff distance",
    ),
    MetricInfo(
        "hd95_missing",
        "HD95 not measurable",
        False,
        description="share of cases with an object in only one of prediction and reference",
    ),
    MetricInfo(
        "false_detection",
        "false detection rate",
        False,
        description="share of empty references where something was predicted",
    ),
)
METRIC_INFO: dict[str, MetricInfo] = {m.name: m for m in _ROWS}


def register_metric(info: MetricInfo) -> MetricInfo:
    """Add a metric (a task's own); the same name twice must describe the same metric."""
    old = METRIC_INFO.get(info.name)
    if old is not None and old != info:
        raise ValueError(f"metric {info.name!r} is already described differently: {old}")
    METRIC_INFO[info.name] = info
    return info


def metric_info(name: str, declared: dict[str, Any] | None = None) -> MetricInfo:
    """The description of ``name``: a record's own declaration, the table, or a neutral default.

    A per-class name (``hd95/lesion``) is described as its metric (``hd95``) with the class in its
    label. A metric nobody describes is taken as higher-is-better with an unbounded range.
    """
    if "/" in name and name not in METRIC_INFO and not (declared and name in declared):
        base, part = name.split("/", 1)
        info = metric_info(base, declared)
        return MetricInfo(**{**info.to_dict(), "name": name, "label": f"{info.label} ({part})"})
    if declared and name in declared:
        d = declared[name]
        return MetricInfo(**{"name": name, **{k: v for k, v in d.items() if k != "name"}})
    if name in METRIC_INFO:
        return METRIC_INFO[name]
    return MetricInfo(name, name.replace("_", " "), True, low=None, high=None)


def is_lower_better(name: str) -> bool:
    """Whether smaller values of ``name`` are better (ECE, NLL, Brier, AURC, HD95, ...)."""
    return not metric_info(name).higher_is_better
