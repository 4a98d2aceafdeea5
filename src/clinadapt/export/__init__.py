"""Adapted models in their library's own format: timm, open_clip, transformers, or a PEFT adapter.

``export_model(source, fmt, out)`` takes a result record (``<run_id>.json``) or an
adapted-weights file, rebuilds the fitted classifier, and writes a folder the original library
loads on its own, with the class names, the head and the preprocessing in its metadata
(``clinadapt_export.json``). For a test-time run the model exported is the source it started
from: test-time adaptation is a procedure on a stream, not a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clinadapt.errors import ConfigError

FORMATS: tuple[str, ...] = ("timm", "open_clip", "transformers", "peft")
#: the native format of each model family
NATIVE = {"timm": "timm", "open_clip": "open_clip", "hf": "transformers"}


def export_model(
    source: str | Path, fmt: str | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """Export the model of ``source`` (a record or adapted-weights file) as ``fmt`` into ``out``.

    ``fmt`` defaults to the model family's own library; ``out`` to ``<name>-<fmt>`` beside the
    source. Returns the export's metadata with ``files`` (every file written) and ``folder``.
    """
    from clinadapt.export.common import check_exportable
    from clinadapt.fitted import load_fitted

    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    fitted = load_fitted(source)
    family = fitted.model.encoder.family
    fmt = fmt or NATIVE.get(family, "timm")
    check_exportable(fitted, fmt)
    src = Path(source)
    folder = Path(out) if out is not None else src.with_name(f"{src.stem}-{fmt}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--out {folder}: exists and is not an empty folder; choose another")
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        from clinadapt.export.timm_format import export_timm as write
    elif fmt == "open_clip":
        from clinadapt.export.open_clip_format import export_open_clip as write
    elif fmt == "transformers":
        from clinadapt.export.hf_format import export_transformers as write
    else:
        from clinadapt.export.peft_format import export_peft as write
    meta = write(fitted, folder)
    meta["folder"] = str(folder)
    meta["files"] = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    return meta


__all__ = ["FORMATS", "NATIVE", "export_model"]
