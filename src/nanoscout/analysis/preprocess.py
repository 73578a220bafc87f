"""Frame preprocessing for the detector: normalisation, resampling and padding (numpy only).

:func:`normalize` is the single definition of the model's input normalisation; training
(``models/train.py``) imports it, so the network sees at run time exactly what it saw in training.
"""

from __future__ import annotations

import numpy as np

from nanoscout.wire.errors import FrameError, Reason

#: percentiles mapped to 0 and 1 by :func:`normalize`
NORM_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: normalised values are clipped to this range (hot pixels, scale bars)
NORM_CLIP: tuple[float, float] = (-0.5, 1.5)
#: percentiles are estimated on every n-th row and column (exact enough, 16x cheaper)
NORM_SUBSAMPLE = 4


def check_frame(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a 2-D real array, or raise FrameError naming its shape or dtype."""
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.size == 0:
        raise FrameError(f"frame must be a non-empty 2-D array, got shape {arr.shape}",
                         reason=Reason.SHAPE)
    if arr.dtype.kind not in "uif" and arr.dtype != np.bool_:
        raise FrameError(f"frame dtype {arr.dtype} is not a real number type", reason=Reason.DTYPE)
    return arr


#: integer frames whose subsample spans at most this many values take the histogram path
_HIST_MAX_BINS = 1 << 16


def _percentiles(sub: np.ndarray, q: tuple[float, float]) -> tuple[float, float]:
    """Return ``np.percentile(sub, q)`` (linear interpolation), bit for bit.

    Integer (and boolean) samples with a span of at most 2**16 values find their order
    statistics in a histogram (one counting pass) instead of a partial sort, several times
    faster; the interpolation repeats numpy's arithmetic so the result is identical. (Numpy
    itself interpolates int8 / int16 samples in their own dtype, which overflows when they span
    more than half the type's range; this returns the exact value there, and handles boolean
    frames, which ``np.percentile`` rejects.) Other samples use ``np.percentile``.
    """
    flat = sub.reshape(-1)
    n = flat.size
    kind, size = sub.dtype.kind, sub.dtype.itemsize
    if n and (kind == "b" or (kind == "u" and size <= 2)):
        lo_v, counts = 0, np.bincount(flat.view(np.uint8) if kind == "b" else flat)
    elif n and kind in "iu" and size <= 4:
        wide = flat.astype(np.int64)
        lo_v = int(wide.min())
        wide -= lo_v
        if int(wide.max()) >= _HIST_MAX_BINS:
            p = np.percentile(sub, q)
            return float(p[0]), float(p[1])
        counts = np.bincount(wide)
    else:
        p = np.percentile(sub, q)
        return float(p[0]), float(p[1])
    cum = np.cumsum(counts)
    out = []
    for qq in q:
        # numpy's "linear" method: virtual index (n - 1) * q, value interpolated between the
        # order statistics around it (lerp from the nearer end)
        virtual = (n - 1) * np.true_divide(qq, 100)
        prev = int(np.floor(virtual))
        if virtual >= n - 1:
            prev = nxt = n - 1
        elif virtual < 0:
            prev = nxt = 0
        else:
            nxt = prev + 1
        gamma = float(virtual - prev)
        a, b = np.searchsorted(cum, [prev, nxt], side="right") + lo_v
        diff = float(b - a)
        out.append(b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return out[0], out[1]


def normalize(image: np.ndarray) -> np.ndarray:
    """Return the frame as float32 scaled so percentiles 0.5 / 99.5 map to 0 / 1 (clipped).

    Robust to dtype (uint8/uint16/int/float) and polarity-neutral (dark-on-bright and
    bright-on-dark are both kept as they are; the network was trained on both). A flat frame
    maps to all zeros. Raises FrameError when the frame holds NaN or infinity.
    """
    arr = check_frame(image)
    sub = arr[::NORM_SUBSAMPLE, ::NORM_SUBSAMPLE]
    lo, hi = _percentiles(sub, NORM_PERCENTILES)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise FrameError("frame holds NaN or infinite pixels", reason=Reason.NONFINITE)
    out = np.empty(arr.shape, np.float32)  # always new: the caller's buffer is never modified
    span = float(hi) - float(lo)
    if _needs_float64(arr.dtype, lo, hi, span):
        _normalize_float64(arr, lo, span, out)
        return out
    lo32, gain = np.float32(lo), np.float32(1.0 / span if span > 0.0 else 0.0)
    # row bands of ~256 KiB: each pass over a band runs in cache, where whole-frame passes
    # would stream a 4096² frame (64 MiB) through memory three times
    band = band_rows(arr.shape[1], 4)
    for r0 in range(0, arr.shape[0], band):
        o = out[r0:r0 + band]
        np.subtract(arr[r0:r0 + o.shape[0]], lo32, out=o, dtype=np.float32)
        if arr.dtype.kind == "f" and not np.isfinite(o).all():
            raise FrameError("frame holds NaN or infinite pixels", reason=Reason.NONFINITE)
        if span <= 0.0:
            o.fill(0.0)  # a flat frame
            continue
        o *= gain
        np.clip(o, NORM_CLIP[0], NORM_CLIP[1], out=o)
    return out


def _needs_float64(dtype: np.dtype, lo: float, hi: float, span: float) -> bool:
    """Whether float32 arithmetic would lose a frame of ``dtype`` whose percentiles are
    ``lo``/``hi`` (span ``hi - lo``): 8-byte pixels (float64 values a tiny fraction apart, int64
    counts above 2**24), 4-byte integers above 2**24 (float32 keeps 24 bits), and float32
    frames whose range is so small (below ~3e-39) that 1 / span overflows float32. Up to
    16-bit integers and ordinary float32 frames keep the fast float32 path."""
    if span <= 0.0:
        return False
    if dtype.itemsize > 4:
        return True
    if dtype.kind in "iu" and max(abs(lo), abs(hi)) > 2.0 ** 24:
        return True
    return dtype.kind == "f" and 1.0 / span > float(np.finfo(np.float32).max)


def _normalize_float64(arr: np.ndarray, lo: float, span: float, out: np.ndarray) -> None:
    """Fill ``out`` (float32) with ``(arr - lo) / span`` clipped, the arithmetic in float64,
    in row bands; raises FrameError for NaN or infinite pixels."""
    band = band_rows(arr.shape[1], 8)
    for r0 in range(0, arr.shape[0], band):
        t = arr[r0:r0 + band].astype(np.float64)
        if arr.dtype.kind == "f" and not np.isfinite(t).all():
            raise FrameError("frame holds NaN or infinite pixels", reason=Reason.NONFINITE)
        t -= lo
        t /= span  # a division: 1 / span may overflow where the quotients do not
        np.clip(t, NORM_CLIP[0], NORM_CLIP[1], out=t)
        out[r0:r0 + t.shape[0]] = t


def band_rows(width: int, itemsize: int, band_bytes: int = 1 << 18) -> int:
    """Rows of a ``width`` px wide array of ``itemsize`` bytes per px that fill about
    ``band_bytes`` (at least 1): the band that element-wise passes over a frame work in, so
    they stay in cache whatever the frame's size."""
    return max(1, band_bytes // max(1, width * itemsize))


def pad_to_multiple(image: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (padded image, (pad_rows, pad_cols)); padding at the bottom/right by reflection.

    Reflection keeps the local statistics the network sees at the edge natural, so particles
    near the bottom/right border are not distorted by a constant band.
    """
    h, w = image.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return image, (0, 0)
    # reflection needs more pixels than the pad; a tiny frame falls back to edge replication
    if ph < h and pw < w:
        return np.pad(image, ((0, ph), (0, pw)), mode="reflect"), (ph, pw)
    return np.pad(image, ((0, ph), (0, pw)), mode="edge"), (ph, pw)


def _axis_weights(n_in: int, n_out: int, span: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (index0, index1, weight1) for linear resampling of an axis (pixel-centre aligned).

    ``span``: the input extent (in input pixels) the output covers, ``n_in`` when None.
    """
    span = float(n_in) if span is None else span
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (span / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resize_bilinear(image: np.ndarray, shape: tuple[int, int], *,
                    rows: np.ndarray | None = None, cols: np.ndarray | None = None,
                    span: tuple[float, float] | None = None) -> np.ndarray:
    """Return ``image`` resampled to ``shape`` (rows, cols) by bilinear interpolation, float32.

    Pixel centres are aligned (like ``align_corners=False``); used for the detector's
    resample factor and to bring logit maps back to the frame's grid. ``rows`` / ``cols``
    (integer indices into the output grid) evaluate only those output rows / columns, e.g. the
    block centres the post-processing samples. ``span``: the extent of ``image`` (rows, cols,
    in its px from its top-left corner) that the output covers; None: all of it.
    """
    h, w = image.shape
    img = image.astype(np.float32, copy=False)
    if (h, w) == tuple(shape) and rows is None and cols is None and span in (None, (h, w)):
        return img
    r0, r1, wr = _axis_weights(h, shape[0], None if span is None else span[0])
    c0, c1, wc = _axis_weights(w, shape[1], None if span is None else span[1])
    if rows is not None:
        r0, r1, wr = r0[rows], r1[rows], wr[rows]
    if cols is not None:
        c0, c1, wc = c0[cols], c1[cols], wc[cols]
    return _separable(img, (r0, r1, wr), (c0, c1, wc))


def _separable(img: np.ndarray, rows: tuple[np.ndarray, np.ndarray, np.ndarray],
               cols: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Linear interpolation along rows, then columns, by :func:`_axis_weights` triples."""
    r0, r1, wr = rows
    c0, c1, wc = cols
    # rows, then columns (gathered with np.take, several times faster than fancy indexing
    # along the last axis); the same arithmetic in the same order as always
    tmp = img[r0]
    tmp *= (1.0 - wr)[:, None]
    tmp += img[r1] * wr[:, None]
    out = np.take(tmp, c0, axis=1)
    out *= (1.0 - wc)[None, :]
    out += np.take(tmp, c1, axis=1) * wc[None, :]
    return out


def resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return ``image`` resampled to ``shape``, anti-aliased when shrinking (float32).

    Shrinking by a factor k >= 2 first averages k x k blocks (an area filter, cheap and free of
    aliased noise; the last partial block is edge-padded and its true extent kept, so the
    geometry stays exact), then interpolates bilinearly to ``shape``; enlarging is plain
    bilinear. The detector resamples frames to its working scale with this, and the training
    crops are made with it too, so both see the same pixels.
    """
    h, w = image.shape
    k = int(min(h / max(shape[0], 1), w / max(shape[1], 1)))
    img = image.astype(np.float32, copy=False)
    if k < 2:
        return resize_bilinear(img, shape)
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw)), mode="edge")
    img = block_mean(img, k)
    return _separable(img, _axis_weights(img.shape[0], shape[0], span=h / k),
                      _axis_weights(img.shape[1], shape[1], span=w / k))


def block_mean(img: np.ndarray, k: int) -> np.ndarray:
    """Return the float32 means of the k x k blocks of ``img`` (float32, sides multiples of k).

    Summed row by row and column by column in float32 (one contiguous pass per row of a block,
    then per column), several times faster than ``mean`` over two strided axes; equal to it
    within float32 rounding."""
    hh, ww = img.shape
    rows = img.reshape(hh // k, k, ww)
    acc = rows[:, 0].copy()
    for i in range(1, k):
        acc += rows[:, i]
    cols = acc.reshape(hh // k, ww // k, k)
    out = cols[:, :, 0].copy()
    for j in range(1, k):
        out += cols[:, :, j]
    out *= np.float32(1.0 / (k * k))
    return out


def resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return a label map resampled to ``shape`` by nearest neighbour (dtype kept)."""
    h, w = labels.shape
    if (h, w) == tuple(shape):
        return labels
    ri = np.minimum(((np.arange(shape[0]) + 0.5) * (h / shape[0])).astype(np.intp), h - 1)
    ci = np.minimum(((np.arange(shape[1]) + 0.5) * (w / shape[1])).astype(np.intp), w - 1)
    return labels[ri[:, None], ci[None, :]]


def fixed_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return the (1, 1, H, W) float32 input of a fixed-size model (classifier, AI lens).

    The whole frame is resampled to ``size`` (rows, cols; anti-aliased :func:`resample`, the
    aspect ratio is not kept: a heatmap at model resolution maps back onto the frame by one
    scale per axis), then normalised by :func:`normalize`. Training code calls this too.
    :func:`fixed_views` cuts a frame far from square into several such inputs.
    """
    return normalize(_fixed_resample(image, (int(size[0]), int(size[1]))))[None, None]


def fixed_views(image: np.ndarray, size: tuple[int, int], n: int) -> np.ndarray:
    """Return the (n, 1, H, W) float32 inputs of a fixed-size model for ``n`` views of a frame.

    The frame is cut along its longer side (columns when it is wider than tall, else rows)
    into ``n`` equal, adjacent views, each resampled to ``size`` and normalised on its own,
    as :func:`fixed_input` makes a whole frame's input (the frame is resampled once, to ``n``
    inputs side by side, then cut; view ``i`` covers frame columns (rows) ``i * W / n`` to
    ``(i + 1) * W / n``). ``n`` = 1 is :func:`fixed_input`.
    """
    rows, cols = int(size[0]), int(size[1])
    if n <= 1:
        return fixed_input(image, (rows, cols))
    arr = check_frame(image)
    wide = arr.shape[1] >= arr.shape[0]
    small = _fixed_resample(arr, (rows, cols * n) if wide else (rows * n, cols))
    return np.stack([normalize(small[:, i * cols:(i + 1) * cols] if wide
                               else small[i * rows:(i + 1) * rows])[None] for i in range(n)])


def _fixed_resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return the frame resampled to ``shape`` (float32, before normalisation), in float64
    first where float32 would lose it."""
    arr = check_frame(image)
    if arr.dtype.itemsize > 2:  # up to 16 bits float32 holds every value: no pass over it
        lo, hi = float(arr.min()), float(arr.max())
        if _needs_float64(arr.dtype, lo, hi, hi - lo):
            # float32 would lose it before normalisation (a 10-count signal on a 1e8 offset, a
            # range of 1e-300): shifted and scaled to 0..1 in float64 first, which the
            # normalisation below, affine-invariant, does not see otherwise
            arr = ((arr.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    return resample(arr.astype(np.float32, copy=False), shape)
