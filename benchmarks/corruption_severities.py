"""How strong each corruption's five severities are: mean SSIM against the clean image.

Prints, for every registered corruption, where its levels come from (MedMNIST-C's published
parameters, or the SSIM-band rule) and its mean SSIM at severities 1-5 on the reference images
(clinadapt.shifts.corruptions.calibration), with the band each rule-calibrated severity must
fall in. ``--search`` finds, for the rule-calibrated corruptions, the levels whose SSIM is the
band's centre, by bisection along each corruption's one-parameter path below; the registered
levels are these, rounded.

    python benchmarks/corruption_severities.py
    python benchmarks/corruption_severities.py --search streak ring
    python benchmarks/corruption_severities.py --search ring-3d motion-3d   (volumes)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

# One-parameter paths t -> level, from no artefact (t = 0) to a strong one.
PATHS: dict[str, tuple[Callable[[float], object], float]] = {
    "streak": (lambda t: t, 1.0),
    "ring": (lambda t: t, 1.0),
    "windowing": (lambda t: (0.3 * t, 1.0 - 0.8 * t), 1.0),
    "bias-field": (lambda t: t, 3.0),
    "ghosting": (lambda t: t, 0.99),
    "motion": (lambda t: (0.2 + 0.3 * t, 12.0 * t), 1.0),
    "rician-noise": (lambda t: t, 0.5),
    "lighting": (lambda t: t, 2.0),
    "colour-cast": (lambda t: t, 2.0),
    "stain": (lambda t: t, 2.0),
    "vignetting": (lambda t: t, 2.0),
    "hair": (lambda t: t, 20.0),
    "bubbles": (lambda t: t, 10.0),
    # volume artefacts (reference volumes of clinical-shift-3d)
    "bias-field-3d": (lambda t: t, 3.0),
    "ghosting-3d": (lambda t: t, 1.0),
    "motion-3d": (lambda t: t, 30.0),
    "spike-3d": (lambda t: t, 3.0),
    "rician-noise-3d": (lambda t: t, 0.5),
    "ct-noise-3d": (lambda t: t, 0.5),
    "streak-3d": (lambda t: t, 2.0),
    "ring-3d": (lambda t: t, 1.0),
    "beam-hardening-3d": (lambda t: t, 2.0),
    "thick-slices": (lambda t: 1.0 + t, 15.0),
}


def search(name: str) -> list[object]:
    """Levels whose mean SSIM is each band's centre (bisection on the corruption's path)."""
    from clinadapt.shifts.corruptions import get_corruption
    from clinadapt.shifts.corruptions.base import apply_level, apply_volume_level
    from clinadapt.shifts.corruptions.calibration import (
        SSIM_MEDIANS,
        reference_images,
        reference_volumes,
        ssim,
        ssim_volumes,
    )

    c = get_corruption(name)
    path, top = PATHS[name]

    def score(t: float) -> float:
        level = path(t)
        if c.dims == 3:
            vols = reference_volumes()
            out = [apply_volume_level(v, c, level, 0, i, sp) for i, (v, sp) in enumerate(vols)]
            return ssim_volumes([v for v, _ in vols], out)
        images = reference_images(c.colour)
        return ssim(images, [apply_level(im, c, level, 0, i) for i, im in enumerate(images)])

    levels = []
    for target in SSIM_MEDIANS:
        lo, hi = 0.0, top
        for _ in range(16):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if score(mid) > target else (lo, mid)
        levels.append(path((lo + hi) / 2))
    return levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--search", nargs="*", default=None, help="rule-calibrated corruptions")
    p.add_argument("--dims", type=int, choices=(2, 3), default=None, help="only 2D or 3D ones")
    args = p.parse_args()
    os.environ.setdefault("CLINADAPT_QUIET", "1")

    from clinadapt.shifts.corruptions import CORRUPTIONS
    from clinadapt.shifts.corruptions.calibration import SSIM_BANDS, ssim_by_severity

    if args.search is not None:
        names = args.search or sorted(PATHS)
        if args.dims is not None:
            from clinadapt.shifts.corruptions import get_corruption

            names = [n for n in names if get_corruption(n).dims == args.dims]
        for name in names:
            print(
                f"{name:18s} {[round(float(v), 4) if isinstance(v, float) else v for v in search(name)]}"
            )
        return
    bands = "  ".join(f"{lo:.3f}-{hi:.3f}" for lo, hi in SSIM_BANDS.values())
    print(f"SSIM bands of the rule, severities 1-5: {bands}")
    for entry in CORRUPTIONS.entries():
        c = entry.obj
        if args.dims is not None and c.dims != args.dims:
            continue
        scores = ssim_by_severity(c.name)
        ruled = c.calibration == "ssim-band"
        ok = all(lo <= s <= hi for s, (lo, hi) in zip(scores, SSIM_BANDS.values(), strict=True))
        flag = ("in bands" if ok else "OUT OF BANDS") if ruled else ""
        row = " ".join(f"{s:.3f}" for s in scores)
        print(f"{c.name:15s} {row}  {flag:12s} {c.calibration}")


if __name__ == "__main__":
    main()
