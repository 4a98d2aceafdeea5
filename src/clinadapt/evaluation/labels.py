"""Names of shifts and conditions, the same in every table, figure and CSV.

A condition is what a record measured except its seed. It is named after the model it evaluates:
``finetune`` for the fine-tuned model as it is (whether the record came from ``finetune`` itself or
from the ``source`` test-time method that evaluates that model unchanged), ``finetune → tent`` for
that model adapted by tent on the test stream, then the backbone and what was adapted.
"""

from __future__ import annotations

from typing import Any

ARROW = " → "


def shift_label(record: dict[str, Any]) -> str:
    """The shift protocol and the options that set it apart, e.g. ``domain (source site-a)``."""
    shift = record.get("shift", {})
    name = shift.get("protocol", record.get("config", {}).get("shift", "?"))
    opts = shift.get("options", {})
    if name == "domain" and opts.get("source"):
        src = opts["source"]
        src = [src] if isinstance(src, str) else src
        return f"domain (source {', '.join(map(str, src))})"
    if name == "lodo":
        return f"leave-one-domain-out (holdout {opts.get('holdout')})"
    if name == "prevalence" and opts.get("prevalence"):
        mix = ", ".join(f"{p:.2f}" for p in opts["prevalence"])
        return f"prevalence ({mix})"
    return str(name)


def method_chain(record: dict[str, Any]) -> str:
    """``finetune``, or ``finetune → tent`` for a test-time method on a fine-tuned source.

    The ``source`` test-time method adapts nothing, so it is named after its source model.
    """
    method = record["config"]["method"]
    src = record.get("source") or {}
    src_method = src.get("method")
    if not src_method:
        return method
    if method == "source":
        return src_method
    return f"{src_method}{ARROW}{method}"


def target_spec(record: dict[str, Any]) -> str:
    """The target spec a run adapted (for ``source``: the one its source model was trained on)."""
    target = record.get("target") or {}
    if record["config"].get("method") == "source" and (record.get("source") or {}).get("target"):
        target = record["source"]["target"]
    return str(target.get("spec") or record["config"].get("target") or "default")


def target_label(record: dict[str, Any]) -> str:
    """What a run adapted: its target, or what it changed when it trained no parameter (bn:
    normalisation statistics, not the source's ``full``). ``source`` evaluates its source model
    unchanged, so it is labelled by that model's target."""
    target = record.get("target") or {}
    if record["config"].get("method") == "source" and (record.get("source") or {}).get("target"):
        target = record["source"]["target"]
    if target.get("trainable") == 0 and target.get("changes"):
        return str(target["changes"])
    return target_spec(record)


def condition_label(record: dict[str, Any]) -> str:
    """``finetune → tent (tiny-resnet, norm)``: method chain, then backbone and target."""
    return f"{method_chain(record)} ({record['config']['model']}, {target_label(record)})"


def run_label(record: dict[str, Any]) -> str:
    """The condition label and the seed of one run."""
    label = condition_label(record)
    return f"{label[:-1]}, seed {record['config']['seed']})"
