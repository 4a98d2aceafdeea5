"""Where the numbers came from: commands, configurations, package versions, data and seeds."""

from __future__ import annotations

from typing import Any

import yaml

from clinadapt.evaluation.report.conditions import Condition, identity
from clinadapt.evaluation.report.data import Table


def _distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def versions_table(records: list[dict[str, Any]]) -> Table:
    """Package versions; a package with more than one version across the runs is flagged."""
    names: list[str] = []
    for r in records:
        names += [n for n in (r.get("versions") or {}) if n not in names]
    rows = []
    for name in names:
        found = _distinct([(r.get("versions") or {}).get(name, "absent") for r in records])
        flag = " (differs between runs)" if len(found) > 1 else ""
        rows.append([name, ", ".join(map(str, found)) + flag])
    return Table("package versions", ["package", "version"], rows)


def data_table(records: list[dict[str, Any]]) -> Table:
    """Each dataset with its fingerprint (a hash of the images and labels as loaded)."""
    rows = []
    seen = set()
    for r in records:
        d = r.get("data") or {}
        key = (d.get("name"), d.get("fingerprint"), str(r["config"].get("data_options")))
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            [
                str(d.get("name", r["config"].get("data"))),
                str(d.get("fingerprint", "-")),
                str(d.get("images", "-")),
                str(d.get("task", "-")),
                str(d.get("modality", "-")),
                yaml.safe_dump(
                    r["config"].get("data_options") or {}, default_flow_style=True
                ).strip(),
            ]
        )
    names = [row[0] for row in rows]
    note = ""
    if len(names) != len(set(names)):
        note = "One dataset appears with several fingerprints: its runs did not see the same data."
    header = ["dataset", "fingerprint", "images", "task", "modality", "options"]
    return Table("data", header, rows, note)


def condition_configs(conditions: list[Condition]) -> list[tuple[str, str, str]]:
    """(label, seeds and commands, YAML config) per condition."""
    out = []
    for c in conditions:
        commands = _distinct([r.get("command") for r in c.records if r.get("command")])
        runs = ", ".join(f"seed {r['config']['seed']}: {r.get('run_id', '?')}" for r in c.records)
        cmd = "\n".join(commands) if commands else "(not recorded)"
        text = yaml.safe_dump(identity(c.first), sort_keys=False, default_flow_style=None)
        out.append((f"{c.label} — {c.section}", f"{runs}\ncommand: {cmd}", text))
    return out
