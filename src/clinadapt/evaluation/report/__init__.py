"""Reports from a directory of result records: HTML, Markdown, the tidy CSV and figure files.

``write_report(runs_dir, out_dir)`` writes ``report.html`` (self-contained), ``report.md``,
``results.csv`` (the table of :func:`clinadapt.load_records`) and ``figures/<name>.{png,svg,pdf}``
with the numbers of each figure in ``figures/<name>.csv``. What a section shows is decided by the
panels registered for its task (:mod:`.panels`, :mod:`.calibration`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinadapt.errors import DataError
from clinadapt.evaluation.report import calibration as _calibration  # noqa: F401  (registers panels)
from clinadapt.evaluation.report import segmentation as _segmentation  # noqa: F401  (panels, CIs)
from clinadapt.evaluation.report.conditions import Condition, group_conditions
from clinadapt.evaluation.report.data import DEFAULT_METRICS, Block, ReportData, Table
from clinadapt.evaluation.report.figures import FORMATS, Figure
from clinadapt.evaluation.report.panels import PANELS, panels_for, register_panel
from clinadapt.evaluation.report.provenance import condition_configs, data_table, versions_table
from clinadapt.evaluation.report.render import Page, markdown_table, render_html, render_markdown
from clinadapt.evaluation.report.tables import conditions_table, results_table
from clinadapt.record import check_metric, read_records
from clinadapt.store import atomic_write_bytes, list_records


@dataclass
class ReportFiles:
    """Where a report went: the page, the Markdown, the tidy CSV and each figure's files."""

    html: Path
    markdown: Path
    results: Path
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0
    predictions_read: int = 0

    def all(self) -> list[tuple[str, Path]]:
        """(what, path) of every file written, the page first."""
        out = [
            ("HTML report", self.html),
            ("Markdown report", self.markdown),
            ("results (one row per record x test set x metric)", self.results),
        ]
        for f in self.figures:
            out += [(f"figure {f.name} ({fmt})", p) for fmt, p in f.files.items()]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": str(self.html),
            "markdown": str(self.markdown),
            "results": str(self.results),
            "figures": {f.name: {k: str(p) for k, p in f.files.items()} for f in self.figures},
            "files": [str(p) for _, p in self.all()],
            "seconds": self.seconds,
        }


def choose_metric(metric: str | None, data: ReportData) -> str:
    """The asked metric if the records hold it (else a clear error), or the first section's
    default (each section shows its own task's, :meth:`ReportData.metric_for`)."""
    if metric is not None:
        if metric not in data.metrics():
            check_metric(data.records, metric)  # an error listing the metrics the records hold
        return metric
    return data.metric_for(next(iter(data.sections.values()), []))


def _evaluation_settings(records: list[dict[str, Any]]) -> tuple[int, float]:
    ev = (records[0]["config"].get("evaluation") or {}) if records else {}
    n_boot = int(ev.get("n_boot") or 200)
    return max(n_boot, 50), float(ev.get("alpha") or 0.05)


def build_page(data: ReportData, runs_dir: Path) -> Page:
    """Every section of the report, in order, with its tables and (drawn) figures."""
    from clinadapt import __version__

    n = len(data.records)
    by_metric: dict[str, list[Condition]] = {}  # each section's headline metric, in order
    for conds in data.sections.values():
        by_metric.setdefault(data.metric_for(conds), []).extend(conds)
    headline = "; ".join(
        f"{data.info(m).label} ({'higher' if data.info(m).higher_is_better else 'lower'} is "
        f"better)"
        + (f" for {', '.join(sorted({c.task for c in cs}))}" if len(by_metric) > 1 else "")
        for m, cs in by_metric.items()
    )
    page = Page(
        "clinadapt report",
        [
            f"{n} runs in {len(data.conditions)} conditions from {runs_dir.name}/; headline metric "
            f"{headline}. "
            f"Written {datetime.now(UTC).isoformat(timespec='seconds')} by clinadapt {__version__}.",
            "Every number comes with its 95% confidence interval in brackets and with n, the images "
            "and patients it rests on. With one seed the interval is the patient bootstrap of the "
            "record; with several seeds, tables give the mean over seeds with a bootstrap that "
            "pools the seeds (the same patients resampled in each) and, separately, the standard "
            "deviation over seeds (SD, the seed spread). Figures draw the same intervals and each "
            "seed as a dot.",
        ],
    )
    page.sections.append(("conditions", [Block("", [conditions_table(data.conditions)])]))
    for section, conds in data.sections.items():
        blocks = []
        for panel in panels_for(conds[0].task):
            block = panel.fn(data, section, conds)
            if block is not None:
                blocks.append(block)
        page.sections.append((section, blocks))
    runs = Block("")
    for metric, conds in by_metric.items():
        records = [r for c in conds for r in c.records]
        header, rows = results_table(records, metric, ci=True, maker=data.cells)
        runs.tables.append(
            Table(
                f"{data.info(metric).label} of each run",
                header,
                rows,
                "Severity means and the shifted mean of one run: patient bootstrap over its sets.",
            )
        )
    page.sections.append(("runs", [runs]))
    page.sections.append(
        ("provenance", [Block("", [versions_table(data.records), data_table(data.records)])])
    )
    page.configs = condition_configs(data.conditions)
    return page


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    formats: tuple[str, ...] = FORMATS,
) -> ReportFiles:
    """Write the report of every record in ``runs_dir`` into ``out_dir`` (default: ``runs_dir``).

    ``metric`` is the headline metric of the tables and figures (default: the task's own,
    balanced accuracy for classification); ``formats`` the figure files besides the PNG that the
    HTML page embeds.
    """
    start = time.perf_counter()
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise DataError(f"runs directory {str(runs_dir)!r} does not exist")
    if not list_records(runs_dir):
        raise DataError(
            f"no result records (*.json) in {str(runs_dir)!r}; run `clinadapt run` first"
        )
    records, skipped = read_records(runs_dir)  # unreadable files: skipped, each with a warning
    if not records:
        raise DataError(
            f"no readable result records in {str(runs_dir)!r} ({len(skipped)} file(s) skipped)"
        )
    out = Path(out_dir) if out_dir is not None else runs_dir
    if out.exists() and not out.is_dir():
        raise DataError(f"report output {str(out)!r} is a file, not a directory")
    n_boot, alpha = _evaluation_settings(records)
    data = ReportData(runs_dir, records, metric or "", n_boot, alpha)
    data.metric = choose_metric(metric, data)
    page = build_page(data, runs_dir)
    figures = [f for _, blocks in page.sections for b in blocks for f in b.figures]
    for f in figures:
        f.save(out, formats)
    results = out / "results.csv"
    frame = data.frame[data.frame["subgroup_key"].isna()]  # the table of load_records(runs_dir)
    atomic_write_bytes(results, frame.to_csv(index=False).encode())
    md = out / "report.md"
    atomic_write_bytes(md, render_markdown(page, out).encode())
    path = out / "report.html"
    atomic_write_bytes(path, render_html(page, out).encode())
    return ReportFiles(
        path, md, results, figures, time.perf_counter() - start, data.predictions.reads
    )


__all__ = [
    "DEFAULT_METRICS",
    "PANELS",
    "Condition",
    "ReportFiles",
    "group_conditions",
    "markdown_table",
    "register_panel",
    "results_table",
    "write_report",
]
