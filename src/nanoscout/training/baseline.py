"""Classical particle segmentation baseline: what an ImageJ user does by hand.

Steps: light Gaussian smoothing (sigma 1 px) -> Otsu threshold -> polarity chosen so that the
particles are the minority phase (the support covers most of a useful micrograph; this picks
bright-on-dark for HAADF and dark-on-bright for BF-TEM without being told) -> fill holes ->
drop specks below ``min_area_px`` -> Euclidean distance transform -> markers = regional maxima
of the distance map with height >= ``h`` px (ImageJ's "Watershed" uses the maxima of the EDT
with tolerance 0.5) -> watershed of the negated distance inside the mask. numpy, scipy and
scikit-image only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from nanoscout.wire.errors import FrameError

__all__ = ["BaselineDetector", "segment"]


def segment(image: np.ndarray, *, sigma: float = 1.0, min_area_px: int = 12, h: float = 1.0,
            polarity: str = "auto") -> np.ndarray:
    """Return an int32 label map (0 = background, 1..n) of the particles in a 2-D ``image``.

    ``polarity``: "auto" (particles = minority side of the Otsu threshold), "bright" or "dark".
    ``min_area_px``: smallest kept particle (px); ``h``: marker height of the distance map (px).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima, remove_small_objects
    from skimage.segmentation import watershed

    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise FrameError(f"baseline needs a non-empty 2-D image, got shape {img.shape}")
    x = img.astype(np.float32)
    if not np.isfinite(x).all():
        raise FrameError("baseline image contains NaN or inf")
    if sigma > 0:
        x = ndimage.gaussian_filter(x, sigma)
    if float(x.max()) == float(x.min()):
        return np.zeros(x.shape, np.int32)
    t = threshold_otsu(x)
    bright = x > t
    if polarity == "auto":
        mask = bright if bright.mean() <= 0.5 else ~bright
    elif polarity in ("bright", "dark"):
        mask = bright if polarity == "bright" else ~bright
    else:
        raise FrameError(f"baseline polarity {polarity!r} must be 'auto', 'bright' or 'dark'")
    mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_objects(mask, max_size=min_area_px - 1)
    if not mask.any():
        return np.zeros(x.shape, np.int32)
    dist = ndimage.distance_transform_edt(mask)
    markers, _ = ndimage.label(h_maxima(dist, h), structure=np.ones((3, 3), bool))
    labels = watershed(-dist, markers, mask=mask)
    # a component without any marker (too thin for h) is kept as one particle
    lone, n_lone = ndimage.label(mask & (labels == 0))
    if n_lone:
        labels = np.where(lone > 0, lone + labels.max(), labels)
    labels = remove_small_objects(labels, max_size=min_area_px - 1)
    # consecutive ids 1..n, like Detector.detect
    ids, inv = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        inv = inv + 1
    return inv.reshape(labels.shape).astype(np.int32)


@dataclass
class _Detection:
    labels: np.ndarray
    scores: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.scores.size - 1)


class BaselineDetector:
    """Duck-typed stand-in for :class:`nanoscout.analysis.detector.Detector` running :func:`segment`."""

    def __init__(self, **params: object) -> None:
        self.params = params

    def detect(self, image: np.ndarray) -> _Detection:
        """Return a detection (int32 labels, unit scores, ``timings_ms['total']`` in ms)."""
        t0 = time.perf_counter()
        labels = segment(image, **self.params)  # type: ignore[arg-type]
        n = int(labels.max())
        scores = np.ones(n + 1, np.float32)
        scores[0] = 0.0
        return _Detection(labels, scores, {"total": (time.perf_counter() - t0) * 1e3})
