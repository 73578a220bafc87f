"""A frame's shot noise, measured, and smoothed down where it is high (low-dose frames).

At low dose a frame's pixel noise is as strong as the particles' contrast, and the detector
takes noise grains for small particles or loses faint particles in it (the HAADF-STEM
collections of issue 17: "noise specks taken for particles"). Units: a normalised frame
(:func:`~nanoscout.analysis.preprocess.normalize`: its 0.5 / 99.5 percentiles are 0 / 1), so a
noise of 0.05 is 5 % of the frame's range; smoothing widths are frame px.

* :func:`noise_sigma` estimates the standard deviation of the frame's pixel-to-pixel (white)
  noise: the median absolute response of Immerkaer's 3 x 3 Laplacian-difference kernel (J.
  Immerkaer, *Fast noise variance estimation*, CVIU 64 (1996) 300), which cancels planes and
  straight edges, so that the particles barely count, scaled to a standard deviation
  (x 1.4826 / 6: the kernel's gain on white noise is 6). A median rather than Immerkaer's
  mean, so that particle edges and texture, a minority of pixels, do not raise the estimate.
  Noise that is correlated over several pixels (after a smoothing filter, JPEG, or an
  up-sampled frame) reads lower than its own standard deviation: the estimate measures the
  fine grain that the network confuses with small particles.
* :func:`smoothing_px` is the width of the Gaussian that brings that noise down to a target:
  a 2-D Gaussian of standard deviation s px divides white noise by ``2 sqrt(pi) s``.
* :func:`smooth` applies it and normalises the result again (a new array; the frame is not
  modified).

Measured on the real tuning frames (EMPS tuning papers, the BF-TEM ``msa-tune`` frames, the
STEM training materials) as they are and with Poisson noise of 100 / 30 / 10 counts at the
brightest pixel (``benchmarks/noise_stress.py``): as they are they read 0.001-0.08 (median
0.002-0.003 for EMPS and STEM, 0.033 for ``msa-tune``), at 30 counts 0.06-0.13. The card's
target (``normalization.denoise``; 0.05 in the STEM detector's card 1.2, none since 1.2.1)
was chosen there, with the synthetic tuning frames. At that target the real frames as they
are stay untouched but one EMPS and one STEM frame; 25 of the 60 synthetic tuning frames
(doses down to 15 e/px) are smoothed.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

from nanoscout.analysis.preprocess import normalize

__all__ = ["MAX_NOISE_WINDOW_PX", "noise_sigma", "smooth", "smoothing_px"]

#: the noise is measured on the frame's central window of at most this many px per side
MAX_NOISE_WINDOW_PX = 1024
#: white noise's standard deviation -> median absolute response of the kernel: 6 / 1.4826
_KERNEL_GAIN = 6.0
_MAD_TO_SIGMA = 1.4826


def noise_sigma(x: np.ndarray, max_window_px: int = MAX_NOISE_WINDOW_PX) -> float:
    """Return the standard deviation of the white noise of a normalised frame ``x`` (2-D),
    in the frame's own units (a fraction of its range after normalisation): see the module
    docs. Only the central window of at most ``max_window_px`` px per side is read (24 ms at
    1024² and at 4096² on these 2 cores, a test run beside it). A frame under 3 px on a side,
    or flat, returns 0."""
    h, w = x.shape
    r0, c0 = max(0, (h - max_window_px) // 2), max(0, (w - max_window_px) // 2)
    v = np.asarray(x[r0:r0 + max_window_px, c0:c0 + max_window_px], np.float32)
    if min(v.shape) < 3:
        return 0.0
    # Immerkaer's kernel [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] as the outer product of the
    # second differences [1, -2, 1] along both axes
    d = v[:, :-2] - 2.0 * v[:, 1:-1] + v[:, 2:]
    r = d[:-2] - 2.0 * d[1:-1] + d[2:]
    return float(_MAD_TO_SIGMA * np.median(np.abs(r)) / _KERNEL_GAIN)


def smoothing_px(sigma: float, target: float, max_px: float) -> float:
    """Return the standard deviation (frame px) of the Gaussian that brings white noise of
    ``sigma`` down to ``target`` (same units), at most ``max_px``; 0 where ``sigma`` is at
    most ``target`` (nothing to do). Raises ValueError unless ``target`` and ``max_px`` > 0."""
    if not (target > 0 and max_px > 0):
        raise ValueError(f"noise target {target} and largest smoothing {max_px} px must be > 0")
    if not sigma > target:
        return 0.0
    return float(min(max_px, sigma / (2.0 * math.sqrt(math.pi) * target)))


def smooth(x: np.ndarray, width_px: float) -> np.ndarray:
    """Return the normalised frame ``x`` (2-D float) smoothed by a Gaussian of standard
    deviation ``width_px`` frame px (edges mirrored) and normalised again: a new float32 array,
    or ``x`` itself for a width of 0 (1 px: 22 ms at 1024², 0.55 s at 4096² here). Normalised
    again because the network was trained on frames whose percentiles span [0, 1]; the noise's
    extremes set them before the smoothing."""
    if not width_px > 0:
        return x
    return normalize(scipy.ndimage.gaussian_filter(np.asarray(x, np.float32), width_px,
                                                   mode="mirror"))
