"""Frozen-backbone features: each image embedded once, cached on disk, reused by every head.

A cache entry is keyed by the model name and source, a digest of every image-side weight and
buffer, the preprocessing and the dataset fingerprint; change any of them and the images are
embedded again. Entries are safetensors files written atomically, so concurrent runs sharing a
cache folder never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from clinadapt.classifier import ImageClassifier
from clinadapt.compute import active_autocast
from clinadapt.data.base import ClinicalDataset
from clinadapt.errors import DataError
from clinadapt.layout import channels_last_inference
from clinadapt.progress import progress, warn
from clinadapt.store import atomic_path

CACHE_ENV = "CLINADAPT_CACHE"
FORMAT = 1  # bump when the meaning of a cached file changes
# State that does not shape image features: the classifier head and a CLIP text tower.
_NOT_IMAGE_SIDE = ("head.", "encoder.text_encoder.")


def resolve_cache_dir(default: str | Path | None = None) -> Path | None:
    """The feature cache folder: ``$CLINADAPT_CACHE/features`` when set, else ``default``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser() / "features"
    return Path(default) if default else None


def weights_digest(model: ImageClassifier) -> str:
    """Hash every image-side parameter and buffer of ``model`` (head and text tower excluded)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(_NOT_IMAGE_SIDE):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def feature_key(model: ImageClassifier, ds: ClinicalDataset) -> str:
    """The cache key of ``ds`` embedded by ``model``."""
    enc = model.encoder
    ident = {
        "format": FORMAT,
        "model": enc.name,
        "source": enc.source,
        "weights": weights_digest(model),
        "preprocess": enc.preprocess.to_dict(),
        "data": ds.fingerprint(),
    }
    dtype = active_autocast(str(next(model.parameters()).device))
    if dtype is not None:  # features computed under mixed precision are other features
        ident["autocast"] = dtype
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


@torch.no_grad()
def embed(model: ImageClassifier, ds: ClinicalDataset, batch_size: int, device: str) -> np.ndarray:
    """Embed every image of ``ds`` in eval mode: (N, D) float32 features in dataset order."""
    was_training = model.training
    model.eval()
    total = -(-len(ds) // batch_size)
    try:
        with channels_last_inference(model, device):  # faster CNN inference on the CPU
            feats = [
                model.features(x.to(device)).float().cpu()
                for x, _, _ in progress(
                    ds.batches(
                        model.preprocess,
                        batch_size,
                        pin_memory=str(device).startswith("cuda"),
                        device=device,
                    ),
                    f"embed {ds.name}",
                    total=total,
                )
            ]
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy()


class FeatureCache:
    """Features of (model, dataset) pairs, kept in memory and, with a folder, on disk.

    ``embedded`` counts the images passed through the model, ``hits`` and ``misses`` the
    look-ups; tests and sweeps read them to prove the backbone ran once.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.hits = 0
        self.misses = 0
        self.embedded = 0
        self._memory: dict[str, np.ndarray] = {}

    def path(self, key: str) -> Path | None:
        """The file of cache entry ``key`` (None without a cache folder)."""
        return self.directory / f"{key}.safetensors" if self.directory else None

    def features(
        self, model: ImageClassifier, ds: ClinicalDataset, batch_size: int = 64, device: str = "cpu"
    ) -> np.ndarray:
        """(N, D) features of ``ds`` under ``model``: from the cache, or embedded and stored."""
        key = feature_key(model, ds)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        feats = self._read(key, len(ds), model.encoder.feature_dim)
        if feats is None:
            self.misses += 1
            feats = embed(model, ds, batch_size, device)
            bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
            if len(bad):
                raise DataError(
                    f"model {model.encoder.name!r} gives non-finite features for {len(bad)} "
                    f"image(s) of {ds.name}, e.g. {ds.describe(int(bad[0]))}"
                )
            self.embedded += len(ds)
            self._write(key, feats, model, ds)
        else:
            self.hits += 1
        self._memory[key] = feats
        return feats

    def stats(self) -> dict[str, int]:
        """Look-ups answered, look-ups that embedded, and images embedded."""
        return {"hits": self.hits, "misses": self.misses, "embedded_images": self.embedded}

    def _read(self, key: str, n: int, dim: int) -> np.ndarray | None:
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            feats = load_file(str(path))["features"]
        except (OSError, KeyError, SafetensorError) as e:
            warn(f"feature cache {path} is unreadable ({e}); embedding again")
            return None
        if feats.shape != (n, dim):
            warn(f"feature cache {path} holds {feats.shape}, expected {(n, dim)}; embedding again")
            return None
        if not np.isfinite(feats).all():  # a damaged file would give NaN probabilities later
            warn(f"feature cache {path} holds non-finite values; embedding again")
            return None
        return feats

    def _write(
        self, key: str, feats: np.ndarray, model: ImageClassifier, ds: ClinicalDataset
    ) -> None:
        path = self.path(key)
        if path is None:
            return
        meta = {"model": model.encoder.name, "dataset": ds.name, "images": str(len(ds))}
        with atomic_path(path) as tmp:
            save_file({"features": np.ascontiguousarray(feats)}, str(tmp), metadata=meta)


def rows_in(whole: ClinicalDataset, part: ClinicalDataset) -> np.ndarray:
    """Positions in ``whole`` of each image of ``part`` (a view on the same images)."""
    if part.source is not whole.source:
        raise DataError(f"{part.name} is not a view of {whole.name}: they read different images")
    order = np.argsort(whole.index, kind="stable")
    sorted_index = whole.index[order]
    at = np.searchsorted(sorted_index, part.index)
    at = np.minimum(at, len(sorted_index) - 1)
    missing = sorted_index[at] != part.index
    if missing.any():
        raise DataError(f"{int(missing.sum())} image(s) of {part.name} are not in {whole.name}")
    return order[at]
