"""Random numbers drawn per image, so an image's views do not depend on the rest of its batch.

Each image of a step gets its own generator, seeded by (seed, step, the image's place in the
global batch). Whether one process draws the views of a whole batch or several processes
(torchrun) each draw those of their part, every image gets the same crops, flips, jitter and
masks, and a resumed run draws what an uninterrupted one drew.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def image_seed(seed: int, step: int, place: int) -> int:
    """A 63-bit generator seed for the image at ``place`` of the global batch of ``step``."""
    state = np.random.SeedSequence([seed, step, place]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ImageDraws:
    """One ``torch.Generator`` per image of a batch; every draw returns one row per image."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def for_batch(cls, seed: int, step: int, places: Iterable[int]) -> ImageDraws:
        """The generators of the images at ``places`` of ``step``'s global batch."""
        return cls([torch.Generator().manual_seed(image_seed(seed, step, int(p))) for p in places])

    @classmethod
    def seeded(cls, seed: int, n: int) -> ImageDraws:
        """Generators for a batch of ``n`` images (places 0..n-1 of step 0 of ``seed``)."""
        return cls.for_batch(seed, 0, range(n))

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U[0, 1) of shape (n, *shape): row i from image i's generator."""
        return self._stack(torch.rand, shape, dtype)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, 1) of shape (n, *shape): row i from image i's generator."""
        return self._stack(torch.randn, shape, dtype)

    def _stack(self, fn, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.generators:
            return torch.empty(0, *shape, dtype=dtype)
        return torch.stack([fn(shape, generator=g, dtype=dtype) for g in self.generators])
