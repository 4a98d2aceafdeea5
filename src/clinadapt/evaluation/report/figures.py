"""Report figures: drawn once, written as PNG, SVG and PDF with the numbers behind them as CSV."""

from __future__ import annotations

import base64
import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinadapt.store import atomic_write_bytes

FORMATS = ("png", "svg", "pdf")
DPI = 100
# no creation dates in the files: the same report gives the same bytes
_METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


@dataclass
class Figure:
    """One drawn figure, its caption and the rows of numbers it shows."""

    name: str
    title: str
    caption: str
    fig: Any
    data: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    png: bytes = b""

    def save(self, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> None:
        """Write ``figures/<name>.<format>`` for each format and ``<name>.csv``; close it."""
        import matplotlib

        folder = Path(out_dir) / "figures"
        try:
            for fmt in dict.fromkeys(("png", *formats)):
                buf = io.BytesIO()
                with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
                    self.fig.savefig(buf, format=fmt, dpi=DPI, metadata=_METADATA.get(fmt))
                if fmt == "png":
                    self.png = buf.getvalue()
                if fmt in formats:
                    path = folder / f"{self.name}.{fmt}"
                    atomic_write_bytes(path, buf.getvalue())
                    self.files[fmt] = path
        finally:
            pyplot().close(self.fig)
        if self.data:
            cols: list[str] = []
            for row in self.data:
                cols += [k for k in row if k not in cols]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            w.writerows(self.data)
            path = folder / f"{self.name}.csv"
            atomic_write_bytes(path, buf.getvalue().encode())
            self.files["csv"] = path

    def png_base64(self) -> str:
        return base64.b64encode(self.png).decode()
