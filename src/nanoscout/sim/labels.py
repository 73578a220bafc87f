"""Instance label maps with known particles, for tests and benchmarks of the measurement."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["disk_labels"]


def disk_labels(
    shape: tuple[int, int] = (1024, 1024),
    n_particles: int = 300,
    diameter_px: float = 16.0,
    seed: int = 0,
) -> np.ndarray:
    """Return an int32 label map of up to ``n_particles`` non-overlapping disks (for benchmarks)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.int32)
    rad = diameter_px / 2.0
    half = int(math.ceil(rad)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    k = 0
    for _ in range(n_particles * 20):
        if k == n_particles:
            break
        cy = rng.uniform(half, shape[0] - half - 1)
        cx = rng.uniform(half, shape[1] - half - 1)
        iy, ix = int(cy), int(cx)
        disk = (xx + ix - cx) ** 2 + (yy + iy - cy) ** 2 <= rad * rad
        window = out[iy - half : iy + half + 1, ix - half : ix + half + 1]
        if np.any(window[disk]):
            continue
        k += 1
        window[disk] = k
    return out
