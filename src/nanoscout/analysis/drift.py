"""Frame-to-frame registration of one source's frames: how far the specimen drifted, px.

:class:`DriftEstimator` registers each frame against the previous one in two steps:

1. **phase correlation** of the detector's normalised frame, sampled on a grid so that its
   longer side is at most 256 px (the previous frame's spectrum is kept), to the nearest binned
   pixel, up to half the field: the peak of the inverse transform of the normalised
   cross-power spectrum, as scikit-image's :func:`~skimage.registration.phase_cross_correlation`
   finds it, computed on real-input FFTs (half the spectrum; ~0.4 ms at 1024² instead of ~1.2 ms
   with the full complex spectra, the error estimates it also computes, and its ``abs``
   of the correlation);
2. **refinement on the particles**: the previous frame's particle centroids, moved by that
   shift, are matched to this frame's (nearest neighbour within a radius, twice with a
   tightening radius), and the shift becomes the median of the matched displacements. With a
   few hundred particles this is good to a few hundredths of a pixel, and particles that move
   on their own (Brownian or directed motion, growth, a coalescence) do not bias a median.

``matched`` is the fraction of the previous frame's particles found again. The shift is the
content's motion: a particle at p in the previous frame is at p + (dx, dy) in this one (x =
columns, y = rows). Frames of another shape start afresh (:meth:`DriftEstimator.reset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy.spatial import cKDTree

__all__ = ["DriftEstimator", "DriftStep", "bin_factor"]

#: the phase correlation works on frames block-averaged to at most this side, px
_COARSE_SIDE = 256
#: fewer matched particles than this: the shift is the phase correlation's alone
_MIN_MATCHES = 5
#: frames whose coarse grid has a side shorter than this (px) are not registered
_MIN_SIDE = 8


@dataclass(frozen=True)
class DriftStep:
    """The registration of one frame against the previous one (px, x = columns, y = rows).

    ``method``: ``particles`` (refined on matched particles), ``phase`` (the image alone) or
    ``none`` (no previous frame). ``matched``: fraction of the previous frame's particles found
    again (None when either frame has none); ``n_matched`` how many.
    """

    dx: float
    dy: float
    method: str
    matched: float | None
    n_matched: int = 0


def bin_factor(shape: tuple[int, int]) -> int:
    """The block size that brings the longer side of ``shape`` to at most 256 px."""
    return max(1, math.ceil(max(shape) / _COARSE_SIDE))


def _binned(image: np.ndarray, b: int) -> np.ndarray:
    """The frame on a grid b times coarser: the sum of four samples per b x b block (at its
    corner, its centre and between), a cheap low-pass that keeps particles of a few px."""
    img = np.asarray(image, np.float32)
    if b == 1:
        return img
    h, w = img.shape[0] // b, img.shape[1] // b
    half = b // 2
    out = img[0:h * b:b, 0:w * b:b].copy()
    out += img[half:h * b:b, half:w * b:b]
    out += img[0:h * b:b, half:w * b:b]
    out += img[half:h * b:b, 0:w * b:b]
    return out


def _phase_shift(ref: np.ndarray, moving: np.ndarray, shape: tuple[int, int]
                 ) -> tuple[int, int]:
    """The whole-pixel (rows, cols) shift that registers the image of rfft2 spectrum ``moving``
    onto that of ``ref`` (both real images of ``shape``), within half the field either way."""
    cross = ref * np.conj(moving)
    # phase only (scikit-image's floor on the magnitude: 100 float eps)
    cross /= np.maximum(np.abs(cross), 100 * np.finfo(cross.real.dtype).eps)
    corr = scipy.fft.irfft2(cross, s=shape)
    peak = np.unravel_index(int(np.argmax(corr)), shape)
    sy, sx = (int(p) - n if p > n // 2 else int(p) for p, n in zip(peak, shape, strict=True))
    return sy, sx


class DriftEstimator:
    """Registers each frame of one field of view against the previous one."""

    def __init__(self, *, match_radius_px: float | None = None) -> None:
        """``match_radius_px``: how far a particle may be from where the coarse shift puts it
        to count as found again (None: 3 binned px, at least half the median particle
        diameter)."""
        self.match_radius_px = match_radius_px
        self.reset()

    def reset(self) -> None:
        """Forget the previous frame (the next one registers against nothing)."""
        self._spectrum: np.ndarray | None = None
        self._window: np.ndarray | None = None
        self._shape: tuple[int, int] | None = None
        self._points: np.ndarray | None = None

    def estimate(self, image: np.ndarray, points: np.ndarray, diameter_px: float | None = None
                 ) -> DriftStep:
        """Register ``image`` (2-D float, e.g. the detector's normalised frame) with its
        particle centroids ``points`` ((n, 2): x, y px) against the previous call's; returns
        the content's shift (px). ``diameter_px``: typical particle diameter (for the match
        radius)."""
        shape = (int(image.shape[0]), int(image.shape[1]))
        b = bin_factor(shape)
        small = _binned(image, b)
        if min(small.shape) < _MIN_SIDE:  # a sliver of a frame: nothing to register on
            self.reset()
            return DriftStep(0.0, 0.0, "none", None)
        if self._window is None or self._window.shape != small.shape:
            self._window = np.outer(np.hanning(small.shape[0]),
                                    np.hanning(small.shape[1])).astype(np.float32)
        spectrum = scipy.fft.rfft2((small - small.mean()) * self._window)
        prev_spec, prev_points = self._spectrum, self._points
        same = self._shape == shape
        self._spectrum, self._shape = spectrum, shape
        self._points = np.asarray(points, np.float64).reshape(-1, 2)
        if prev_spec is None or not same:
            return DriftStep(0.0, 0.0, "none", None)
        # whole binned pixels are enough: the particles refine it
        sy, sx = _phase_shift(prev_spec, spectrum, small.shape)
        # the shift registers this frame onto the previous one: the content moved by -shift
        dy, dx = -float(sy) * b, -float(sx) * b
        assert prev_points is not None
        cur = self._points
        if len(prev_points) == 0 or len(cur) == 0:
            return DriftStep(dx, dy, "phase", None)
        radius = self.match_radius_px
        if radius is None:
            radius = max(3.0 * b, 0.5 * (diameter_px or 0.0), 2.0)
        tree = cKDTree(cur)
        method, found = "phase", 0
        for r in (radius, 0.5 * radius):
            dist, idx = tree.query(prev_points + (dx, dy), distance_upper_bound=r)
            ok = np.isfinite(dist)
            # a particle of this frame claimed twice is ambiguous: keep neither
            claimed = np.bincount(idx[ok], minlength=len(cur) + 1)
            ok[ok] = claimed[idx[ok]] == 1
            n_matched = int(ok.sum())
            found = max(found, n_matched)
            if n_matched < _MIN_MATCHES:
                break
            d = cur[idx[ok]] - prev_points[ok]
            dx, dy = float(np.median(d[:, 0])), float(np.median(d[:, 1]))
            method = "particles"
        return DriftStep(dx, dy, method, found / len(prev_points), found)
