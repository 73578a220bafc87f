"""The detector's logits at half the working resolution, brought to full resolution on the host.

The detectors end in a 2x bilinear up-sampling of their stride-2 logits (ONNX ``Resize``,
``linear``, ``half_pixel``, clamped at the edges). The CPU's INT8 sibling leaves it out
(:func:`nanoscout.training.upsample_rewrite.strip_output_upsample`): the post-processing needs
full resolution for one thing only, *which pixels are foreground* (logit > threshold), and
its block-centre samples (stride 2) of both maps. Both follow from the half-resolution map
directly, at a fraction of the cost of resampling two whole maps (ONNX Runtime: ~2.9 ms for
the two 1024² maps of a 1024² frame, one core; here ~1.3 ms for the threshold and the
samples).

Full-resolution pixel (2i + a, 2j + b) of the up-sampling reads half-resolution rows i - 1, i
(a = 0) or i, i + 1 (a = 1) with weights 1/4, 3/4 or 3/4, 1/4, the same along columns, indices
clamped to the map. So its value is (9 p + 3 q + 3 r + s) / 16 of four neighbours, and the
threshold test compares that sum with 16 x the threshold: no division, no sigmoid. The result
is the up-sampling's threshold (:func:`~nanoscout.analysis.preprocess.resize_bilinear`, the
same mapping) up to float rounding within ~1e-6 of the threshold.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["centre_samples", "threshold_2x"]

#: a uint16 holds a row's even column in its first byte: the high byte on a big-endian machine
_EVEN_HIGH = sys.byteorder == "big"

#: rows of the half-resolution map processed at a time (a band of a 4k frame's 2048-px-wide
#: map is ~1 MiB of float32: the passes over it stay in cache)
_BAND_BYTES = 1 << 20


def _as_map(half: np.ndarray) -> np.ndarray:
    """``half`` as float32, or ValueError naming its shape when it is not a non-empty 2-D map."""
    if half.ndim != 2 or half.size == 0:
        raise ValueError(f"logits must be a non-empty 2-D map, got shape {half.shape}")
    return half.astype(np.float32, copy=False)


def _row_phases(m: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """Return 4 x the up-sampling along rows of ``m``'s rows [r0, r1): (even rows, odd rows)."""
    n = m.shape[0]
    three = m[r0:r1] * np.float32(3)
    even = np.empty_like(three)
    # even row 2i reads rows i - 1, i; odd row 2i + 1 rows i, i + 1 (clamped at the map's edge)
    a = 1 if r0 == 0 else 0
    np.add(three[a:], m[r0 + a - 1:r1 - 1], out=even[a:])
    if a:
        np.add(three[:1], m[:1], out=even[:1])
    b = 1 if r1 == n else 0
    np.add(three[:r1 - r0 - b], m[r0 + 1:r1 + 1 - b], out=three[:r1 - r0 - b])
    if b:
        three[-1:] += m[n - 1:n]
    return even, three


def _col_phases(p: np.ndarray, q0: np.ndarray, q1: np.ndarray) -> None:
    """Write 4 x the up-sampling along columns of ``p`` into ``q0`` (even columns) and ``q1``
    (odd columns); edge columns clamped."""
    three = p * np.float32(3)
    np.add(three[:, 1:], p[:, :-1], out=q0[:, 1:])
    np.add(three[:, :1], p[:, :1], out=q0[:, :1])
    np.add(three[:, :-1], p[:, 1:], out=q1[:, :-1])
    np.add(three[:, -1:], p[:, -1:], out=q1[:, -1:])


def threshold_2x(half: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (foreground bool (2h, 2w), centre samples float32 (h, w)) of a (h, w) logit map.

    Foreground: the 2x bilinear up-sampling of ``half`` is above ``threshold`` (a logit).
    Centre samples: the up-sampling at full-resolution pixels (2i + 1, 2j + 1), the block
    centres of the post-processing's stride-2 grid (see :func:`centre_samples`).
    """
    m = _as_map(half)
    h, w = m.shape
    t16 = np.float32(16.0 * threshold)
    # two neighbouring booleans of a full-resolution row are one uint16, so each phase's row
    # is written contiguously
    fg = np.empty((h, 2, w), np.uint16)
    centres = np.empty((h, w), np.float32)
    band = max(16, _BAND_BYTES // (4 * w))
    q0 = np.empty((min(band, h), w), np.float32)
    q1 = np.empty_like(q0)
    b0 = np.empty(q0.shape, bool)
    b1 = np.empty(q0.shape, bool)
    low, high = (b1, b0) if _EVEN_HIGH else (b0, b1)
    for r0 in range(0, h, band):
        r1 = min(h, r0 + band)
        n = r1 - r0
        for a, p in enumerate(_row_phases(m, r0, r1)):
            _col_phases(p, q0[:n], q1[:n])
            np.greater(q0[:n], t16, out=b0[:n])
            np.greater(q1[:n], t16, out=b1[:n])
            row = fg[r0:r1, a]
            np.left_shift(high[:n].view(np.uint8), 8, out=row, dtype=np.uint16)
            row |= low[:n].view(np.uint8)
            if a == 1:
                np.multiply(q1[:n], np.float32(1 / 16), out=centres[r0:r1])
    return fg.view(bool).reshape(2 * h, 2 * w), centres


def centre_samples(half: np.ndarray) -> np.ndarray:
    """Return float32 (h, w): the 2x bilinear up-sampling of ``half`` (h, w) at full-resolution
    pixels (2i + 1, 2j + 1) only, i.e. (9 m[i, j] + 3 m[i + 1, j] + 3 m[i, j + 1] +
    m[i + 1, j + 1]) / 16, indices clamped."""
    m = _as_map(half)
    rows = m * np.float32(3)  # odd rows: 3/4 of row i, 1/4 of row i + 1
    rows[:-1] += m[1:]
    rows[-1:] += m[-1:]
    out = rows * np.float32(3)  # odd columns, the same
    out[:, :-1] += rows[:, 1:]
    out[:, -1:] += rows[:, -1:]
    out *= np.float32(1 / 16)
    return out
