"""One colour, line style and marker per condition, the same in every figure of a report."""

from __future__ import annotations

from dataclasses import dataclass

# Okabe-Ito (colour-blind safe), then the rest of matplotlib's tab10
PALETTE = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
    "#8c564b",
    "#7f7f7f",
)
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES = ("", "//", "..", "xx")


@dataclass(frozen=True)
class Style:
    colour: str
    linestyle: str
    marker: str
    hatch: str

    def line(self) -> dict:
        return {"color": self.colour, "linestyle": self.linestyle, "marker": self.marker}


def assign_styles(labels: list[str]) -> dict[str, Style]:
    """A style per distinct label, in order; neighbours differ in colour, line and marker, so two
    conditions with the same numbers stay distinguishable where their lines overlap."""
    out: dict[str, Style] = {}
    for label in labels:
        if label not in out:
            i = len(out)
            out[label] = Style(
                PALETTE[i % len(PALETTE)],
                LINESTYLES[i % len(LINESTYLES)],
                MARKERS[i % len(MARKERS)],
                HATCHES[(i // len(PALETTE)) % len(HATCHES)],
            )
    return out
