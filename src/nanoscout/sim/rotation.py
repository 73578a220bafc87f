"""Random orientations of 3-D particle models (the SEM renderer's solids, HAADF clusters)."""

from __future__ import annotations

import numpy as np

__all__ = ["random_rotation"]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Return a uniformly random 3-D rotation matrix (3, 3), float64: a normalised Gaussian
    quaternion (four draws from ``rng``) turned into its matrix."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])
