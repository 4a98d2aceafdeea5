"""The corruption registry and how a corruption is applied to one uint8 image or one volume.

Image corruptions take a float (H,W[,3]) image in [0, 1]; volume corruptions (tagged ``3d``)
take a float (X,Y,Z) volume in [0, 1] and its voxel spacing in mm, ``fn(volume, level, rng,
spacing)``. A corruption applies only to data of its own dimensionality.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clinadapt.data.base import ClinicalDataset, ImageSource
from clinadapt.data.volume import VolumeSource
from clinadapt.errors import ConfigError, DataError, RegistryError
from clinadapt.shifts.corruptions.registry import CORRUPTIONS

# fn(image in [0, 1] as float64 (H,W) or (H,W,3), level of the severity, rng) -> image; volume
# corruptions take the voxel spacing (mm) too: fn(volume, level, rng, spacing) -> volume
CorruptionFn = Callable[..., np.ndarray]
#: The tag that marks a corruption of volumes.
VOLUME_TAG = "3d"
SEVERITIES = (1, 2, 3, 4, 5)
# Modality names that mean the same thing across readers (MedMNIST says "pathology").
MODALITY_ALIASES = {"pathology": "histology", "histopathology": "histology", "derm": "dermoscopy"}


@dataclass(frozen=True)
class Corruption:
    """An acquisition artefact: a function, its five severity levels and the modalities it fits."""

    name: str
    fn: CorruptionFn
    levels: tuple
    modalities: tuple[str, ...]
    colour: bool = False  # works on RGB; grey images go through RGB and back
    help: str = ""
    # where the levels come from: a MedMNIST-C parameter table, or "ssim-band" (calibration.py)
    calibration: str = "ssim-band"

    @property
    def dims(self) -> int:
        """3 for a volume corruption (tagged ``3d``), 2 for an image corruption."""
        return 3 if VOLUME_TAG in self.modalities else 2

    def level(self, severity: int) -> object:
        """The parameter of ``severity`` (1..5)."""
        if severity not in SEVERITIES:
            raise ConfigError(
                f"corruption {self.name!r}: severity must be one of {SEVERITIES}, got {severity!r}"
            )
        return self.levels[severity - 1]


def register_corruption(
    name: str,
    levels: Sequence,
    colour: bool = False,
    modalities: Sequence[str] | None = None,
    calibration: str = "ssim-band",
) -> Callable[[CorruptionFn], CorruptionFn]:
    """Register a corruption function under ``name`` (refuses duplicates).

    A corruption declared in ``corruptions.json`` takes its modalities and help from there; one
    registered only in code (a user's own) gives ``modalities`` and its docstring is the help.
    ``calibration`` says where ``levels`` come from: a published table (MedMNIST-C's, for the
    same modality) or ``"ssim-band"``, the rule of :mod:`.calibration`.
    """
    if len(levels) != len(SEVERITIES):
        raise ValueError(f"corruption {name!r} needs {len(SEVERITIES)} levels, got {len(levels)}")

    def add(fn: CorruptionFn) -> CorruptionFn:
        if name in CORRUPTIONS:  # declared
            entry = CORRUPTIONS.entry(name)
            CORRUPTIONS.register(
                name,
                Corruption(name, fn, tuple(levels), entry.tags, colour, entry.help, calibration),
            )
            return fn
        if not modalities:
            raise ValueError(f"corruption {name!r} is not declared; give its modalities")
        doc = (fn.__doc__ or "").strip().splitlines()
        help = doc[0] if doc else ""
        c = Corruption(name, fn, tuple(levels), tuple(modalities), colour, help, calibration)
        CORRUPTIONS.register(name, c, help=help, tags=tuple(modalities))
        return fn

    return add


def get_corruption(name: str) -> Corruption:
    """The registered corruption ``name``; the error lists the known ones."""
    try:
        return CORRUPTIONS.get(name)
    except RegistryError as e:  # a bad option value, so a configuration error
        raise ConfigError(str(e)) from None


def canonical_modality(modality: str) -> str:
    """Lower-case a modality name and map its synonyms (``pathology`` -> ``histology``)."""
    m = modality.lower().replace("-", "").replace("_", "")
    return MODALITY_ALIASES.get(m, m)


def corruptions_for(modality: str, dims: int = 2) -> list[str]:
    """Names of the corruptions that fit ``modality`` (e.g. ``xray``, ``ct``, ``mri``) for
    images (``dims`` 2) or volumes (``dims`` 3)."""
    m = canonical_modality(modality)
    volume = dims == 3
    names = [
        e.name for e in CORRUPTIONS.entries() if m in e.tags and (VOLUME_TAG in e.tags) == volume
    ]
    if not names:
        known = sorted(
            {x for e in CORRUPTIONS.entries() if (VOLUME_TAG in e.tags) == volume for x in e.tags}
            - {VOLUME_TAG}
        )
        kind = "volume" if volume else "image"
        raise ConfigError(
            f"no {kind} corruptions are registered for modality {modality!r} (known modalities: "
            f"{', '.join(known)}); name them with shift_options.corruptions"
        )
    return names


def image_rng(seed: int, name: str, position: int) -> np.random.Generator:
    """The generator of one image: fixed by seed, corruption and position, not by severity.

    Sharing the draws across severities makes severity a pure change of amplitude, so a higher
    severity is never milder by chance.
    """
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(position)])


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma


def corrupt(
    image: np.ndarray, name: str, severity: int, seed: int = 0, position: int = 0
) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` to a uint8 image; same input, same output."""
    c = get_corruption(name)
    return apply_level(image, c, c.level(severity), seed, position)


def apply_level(
    image: np.ndarray, c: Corruption, level: object, seed: int = 0, position: int = 0
) -> np.ndarray:
    """Apply corruption ``c`` with parameter ``level`` (any value, e.g. while calibrating)."""
    name = c.name
    if c.dims == 3:
        raise DataError(f"corruption {name!r} is for volumes; this is a 2D image")
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise DataError(f"corruption {name!r} expects uint8 pixels, got {img.dtype}")
    x = img.astype(np.float64) / 255.0
    if x.ndim == 3 and x.shape[-1] == 4:
        x = x[..., :3]
    grey = x.ndim == 2
    if c.colour and grey:
        x = np.repeat(x[..., None], 3, axis=-1)
    y = c.fn(x, level, image_rng(seed, name, position))
    if c.colour and grey:
        y = _to_grey(y)
    return (np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def corrupt_volume(
    volume: np.ndarray,
    name: str,
    severity: int,
    seed: int = 0,
    position: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Apply volume corruption ``name`` at ``severity`` to a float (X,Y,Z) volume in [0, 1]."""
    c = get_corruption(name)
    return apply_volume_level(volume, c, c.level(severity), seed, position, spacing)


def apply_volume_level(
    volume: np.ndarray,
    c: Corruption,
    level: object,
    seed: int = 0,
    position: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Apply volume corruption ``c`` with parameter ``level``; float32 (X,Y,Z) in [0, 1] out."""
    if c.dims != 3:
        raise DataError(f"corruption {c.name!r} is for 2D images, not volumes")
    v = np.asarray(volume, dtype=np.float64)
    if v.ndim != 3:
        raise DataError(f"corruption {c.name!r} expects an (X,Y,Z) volume, got {v.shape}")
    out = c.fn(v, level, image_rng(seed, c.name, position), tuple(float(s) for s in spacing))
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0).astype(np.float32)


class CorruptedSource(ImageSource):
    """Another source's images with a corruption applied on load (seeded per source position)."""

    def __init__(self, base: ImageSource, name: str, severity: int, seed: int = 0) -> None:
        get_corruption(name).level(severity)  # fail now, not at the first load
        self.base, self.name, self.severity, self.seed = base, name, int(severity), int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def load(self, i: int) -> np.ndarray:
        return corrupt(self.base.load(i), self.name, self.severity, self.seed, position=i)

    @property
    def reads_files(self) -> bool:
        return self.base.reads_files

    def describe(self, i: int) -> str:
        return f"{self.base.describe(i)} with {self.name} at severity {self.severity}"

    def fingerprint(self) -> str:
        text = f"{self.base.fingerprint()}|{self.name}|{self.severity}|{self.seed}"
        return hashlib.sha256(text.encode()).hexdigest()


class VolumeCorruptedSource(VolumeSource):
    """Another source's volumes with a volume corruption applied on load (seeded per position);
    ``spacing`` maps source positions to their voxel size."""

    def __init__(
        self,
        base: ImageSource,
        name: str,
        severity: int,
        seed: int = 0,
        spacing: dict[int, tuple[float, ...]] | None = None,
    ) -> None:
        get_corruption(name).level(severity)  # fail now, not at the first load
        self.base, self.name, self.severity, self.seed = base, name, int(severity), int(seed)
        self.spacing = dict(spacing or {})

    def __len__(self) -> int:
        return len(self.base)

    def load(self, i: int) -> np.ndarray:
        spacing = self.spacing.get(i, (1.0, 1.0, 1.0))
        return corrupt_volume(self.base.load(i), self.name, self.severity, self.seed, i, spacing)

    def describe(self, i: int) -> str:
        return f"{self.base.describe(i)} with {self.name} at severity {self.severity}"

    def fingerprint(self) -> str:
        text = f"{self.base.fingerprint()}|{self.name}|{self.severity}|{self.seed}"
        return hashlib.sha256(text.encode()).hexdigest()


def corrupted(ds: ClinicalDataset, name: str, severity: int, seed: int = 0) -> ClinicalDataset:
    """A view of ``ds`` whose images (or volumes) carry corruption ``name`` at ``severity``.

    Every registered corruption keeps the anatomy in place (intensity, noise, blur, k-space
    artefacts, overlays; motion ghosts and thick slices blur it but do not move it), so a
    segmentation set keeps its reference masks unchanged and aligned.
    """
    c = get_corruption(name)
    if c.dims != ds.spatial_dims:
        kind = "volumes" if ds.spatial_dims == 3 else "2D images"
        try:
            fits = f"; for its modality: {', '.join(corruptions_for(ds.modality, ds.spatial_dims))}"
        except ConfigError:
            fits = ""
        raise ConfigError(
            f"corruption {name!r} is for {'volumes' if c.dims == 3 else '2D images'}, but "
            f"{ds.name!r} holds {kind}{fits}"
        )
    if ds.spatial_dims == 3:
        spacing = {int(i): tuple(s) for i, s in zip(ds.index, ds.spacing, strict=True)}
        source: ImageSource = VolumeCorruptedSource(ds.source, name, severity, seed, spacing)
    else:
        source = CorruptedSource(ds.source, name, severity, seed)
    return ds.replace(name=f"{ds.name}@{name}-{severity}", source=source)
