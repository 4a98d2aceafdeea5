"""Group result records into conditions (everything but the seed), named the same everywhere."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from clinadapt.evaluation.labels import method_chain, shift_label, target_label

# config fields that say where or how fast a run went, not what it measured
NOT_IDENTITY = ("seed", "out_dir", "device", "tensorboard", "loader_workers", "stream_executor")


def identity(record: dict[str, Any]) -> dict[str, Any]:
    """The configuration of a run except its seed and where it ran."""
    return {k: v for k, v in record["config"].items() if k not in NOT_IDENTITY}


def condition_key(record: dict[str, Any]) -> str:
    """What makes a run's experiment, except its seed."""
    text = json.dumps(identity(record), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclass
class Condition:
    """The runs of one experiment over seeds."""

    key: str
    label: str
    shift: str
    section: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any]:
        return self.records[0]

    @property
    def seeds(self) -> list[int]:
        return sorted(r["config"]["seed"] for r in self.records)

    @property
    def method(self) -> str:
        return self.first["config"]["method"]

    @property
    def chain(self) -> str:
        return method_chain(self.first)

    @property
    def task(self) -> str:
        return str((self.first.get("data") or {}).get("task", ""))

    @property
    def is_tta(self) -> bool:
        return bool(self.first.get("source"))

    @property
    def in_domain(self) -> set[str]:
        return {s for r in self.records for s in (r.get("shift") or {}).get("in_domain", [])}

    @property
    def sets(self) -> list[str]:
        """Test sets in the order the runs wrote them."""
        out: list[str] = []
        for r in self.records:
            out += [s for s in r.get("metrics", {}) if s not in out]
        return out


def _labels(groups: list[Condition]) -> None:
    """Short labels: the method chain, then only the parts that tell conditions apart."""
    parts = {
        g.key: {"model": g.first["config"]["model"], "target": target_label(g.first)}
        for g in groups
    }
    varying = [p for p in ("model", "target") if len({v[p] for v in parts.values()}) > 1]
    for g in groups:
        extra = [str(parts[g.key][p]) for p in varying]
        g.label = g.chain + (f" ({', '.join(extra)})" if extra else "")
    # conditions of one section still sharing a label differ in some option: name it
    by_label: dict[tuple[str, str], list[Condition]] = {}
    for g in groups:
        by_label.setdefault((g.section, g.label), []).append(g)
    for same in by_label.values():
        if len({g.key for g in same}) < 2:
            continue
        flats = [_flat(identity(g.first)) for g in same]
        keys = sorted({k for f in flats for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        # the shift is a section of its own: leave it out of the label
        differ = [k for k in differ if not k.startswith("shift")] or differ
        for g, f in zip(same, flats, strict=True):
            opts = ", ".join(f"{k.rsplit('.', 1)[-1]}={f.get(k)}" for k in differ[:3])
            g.label = f"{g.label} [{opts}]" if opts else f"{g.label} [{g.key[:6]}]"


def group_conditions(records: list[dict[str, Any]]) -> list[Condition]:
    """Conditions, by section (dataset and shift), the models as trained before the test-time
    methods that start from them."""
    groups: dict[str, Condition] = {}
    datasets = {r["config"].get("data") for r in records}
    for r in records:
        key = condition_key(r)
        if key not in groups:
            shift = shift_label(r)
            section = f"{r['config'].get('data')} · {shift}" if len(datasets) > 1 else shift
            groups[key] = Condition(key, "", shift, section)
        groups[key].records.append(r)
    for g in groups.values():
        g.records.sort(key=lambda r: r["config"]["seed"])
    _labels(list(groups.values()))
    return sorted(
        groups.values(), key=lambda g: (_protocol_rank(g), g.section, "→" in g.chain, g.label)
    )


SECTION_ORDER = ("domain", "lodo", "prevalence", "corruption", "none")


def _protocol_rank(g: Condition) -> int:
    protocol = (g.first.get("shift") or {}).get("protocol", g.first["config"].get("shift"))
    return SECTION_ORDER.index(protocol) if protocol in SECTION_ORDER else len(SECTION_ORDER)


def baseline(c: Condition, conditions: list[Condition]) -> Condition | None:
    """For a test-time method, the condition of the same section that evaluates its source model
    unchanged (the ``source`` method, or the fit method with the same options)."""
    src = c.first.get("source")
    if not src or c.method == "source":
        return None
    model = c.first["config"]["model"]
    for other in conditions:
        o = other.first
        if other is c or other.section != c.section or o["config"]["model"] != model:
            continue
        if o["config"]["method"] == "source" and (o.get("source") or {}).get("options") == src.get(
            "options"
        ):
            return other
        if o["config"]["method"] == src.get("method") and o["config"].get(
            "method_options"
        ) == src.get("options"):
            return other
    return None
