"""Classification: an image classifier predicts class probabilities; clinical metrics judge them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clinadapt.tasks.base import TASKS, Outcome, Task

if TYPE_CHECKING:
    from clinadapt.config import RunConfig
    from clinadapt.methods.base import Context, Method
    from clinadapt.shifts import ShiftSplit

# EvaluationConfig fields that belong to other tasks
_NOT_CLASSIFICATION = ("nsd_tolerance_mm", "size_edges_mm")


@TASKS.register("classification", help="single-label, binary or multi-label image classification")
class ClassificationTask(Task):
    name = "classification"
    summary_metrics = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
    headline = "balanced_accuracy"
    # a test-time run also holds, per set, its unadapted source's metrics and the change
    evaluation_parts = (
        "counts",
        "subgroups",
        "ci",
        "selective",
        "operating_point",
        "source_metrics",
        "vs_source",
        "degraded",
    )
    default_model = "tiny-resnet"
    default_data = "clinical-shift"

    def run(
        self,
        cfg: RunConfig,
        method: Method,
        split: ShiftSplit,
        ctx: Context,
        timings: dict[str, float],
    ) -> Outcome:
        from clinadapt.runner import classification_outcome

        return classification_outcome(cfg, method, split, ctx, timings)

    def evaluate(
        self, outcome: Outcome, split: ShiftSplit, cfg: RunConfig
    ) -> dict[str, dict[str, Any]]:
        from clinadapt.evaluation.compare import against_source
        from clinadapt.evaluation.evaluate import evaluate

        p = outcome.predictions
        settings = cfg.evaluation.model_dump(exclude=set(_NOT_CLASSIFICATION))
        evals = {
            name: evaluate(
                p["labels"][name],
                p["probs"][name],
                split.train.task,
                p["meta"].get(name),
                seed=cfg.seed,
                val=p["val"],
                **settings,
            )
            for name in p["probs"]
        }
        if p.get("source_probs"):
            metrics = {name: e["metrics"] for name, e in evals.items()}
            compared = against_source(
                cfg.method,
                split.train.task,
                p["labels"],
                p["probs"],
                p["source_probs"],
                metrics,
                p["meta"],
                p["val"],
                settings,
                cfg.seed,
            )
            for name, parts in compared.items():
                evals[name].update(parts)
        return evals

    def write(self, out_dir: str, record: dict[str, Any], outcome: Outcome) -> None:
        from clinadapt.store import write_run

        p = outcome.predictions
        # per-image patient ids and subgroup keys, so a report can resample patients jointly
        keep = {"patient_id", *record["config"].get("evaluation", {}).get("subgroup_keys", [])}
        meta = {n: {k: v for k, v in m.items() if k in keep} for n, m in p["meta"].items()}
        write_run(out_dir, record, p["probs"], p["labels"], meta)
