"""Test-time adaptation methods (each module registers itself; tda and tpt are the CLIP ones)."""

from clinadapt.methods.tta import (  # noqa: F401
    bn,
    eata,
    memo,
    sar,
    seg,
    source,
    t3a,
    tda,
    tent,
    tpt,
    tttpp,
    vnl,
)
