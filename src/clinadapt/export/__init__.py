"""Adapted models in their library's own format: timm, open_clip, transformers, or a PEFT adapter.

``export_model(source, fmt, out)`` takes a result record (``<run_id>.json``) or an
adapted-weights file, rebuilds the fitted classifier, and writes a folder the original library
loads on its own, with the class names, the head and the preprocessing in its metadata
(``clinadapt_export.json``). For a test-time run the model exported is the source it started
from: test-time adaptation is a procedure on a stream, not a model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    from clinadapt.export.common import METADATA_FILE, check_exportable, write_json
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
    if fmt == "timm":
        from clinadapt.export.timm_format import export_timm as write
    elif fmt == "open_clip":
        from clinadapt.export.open_clip_format import export_open_clip as write
    elif fmt == "transformers":
        from clinadapt.export.hf_format import export_transformers as write
    else:
        from clinadapt.export.peft_format import export_peft as write
    with staged_folder(folder) as staging:
        meta = write(fitted, staging)
        # the metadata says where the export is loaded from: the folder, not its staging name
        meta = _renamed(meta, str(staging), str(folder))
        write_json(staging / METADATA_FILE, meta)
    meta["folder"] = str(folder)
    meta["files"] = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    return meta


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Yield a hidden folder beside ``folder``; on success it becomes ``folder`` in one rename.

    An export killed half-way leaves no folder that looks like an export (only a hidden
    ``.<name>.*.partial`` one, removed when the failure is an exception), and the next export
    to the same ``--out`` starts afresh instead of refusing a non-empty folder.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent)
    )
    try:
        yield staging
        mask = os.umask(0)
        os.umask(mask)
        staging.chmod(0o777 & ~mask)  # mkdtemp makes 0700; a folder made by mkdir would not be
        if folder.is_dir():  # checked empty before the work
            folder.rmdir()
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _renamed(value: Any, old: str, new: str) -> Any:
    """``value`` (JSON-like) with ``old`` replaced by ``new`` in every string."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_renamed(v, old, new) for v in value]
    return value


__all__ = ["FORMATS", "NATIVE", "export_model"]
