"""Tiled inference for frames too large for one engine call, tiles batched.

The frame (already at working scale and padded to the network stride) is cut into overlapping
tiles; each tile's logits are kept only in its interior (``margin`` px from a cut edge are
dropped, because the network sees no context past the cut), and the interiors are pasted into
one logit map of the whole frame. Instances are then found once on that map, so a particle on a
tile seam is neither cut nor counted twice: stitching happens before post-processing.

The tiles are as few as the largest tile allows and no larger than they need to be
(:func:`tile_length`): a 4096 px side with tiles of at most 2304 px and 96 px margins takes two
tiles of 2144 px (2 x 2 tiles: 9.6 % more pixels than the frame), where fixed 2048 px tiles
would have taken three per axis (2.25x the pixels). All tiles of a frame have the same shape,
so up to ``batch`` of them go through the engine in one call (``(b, 1, h, w)``); ``batch``
bounds the memory of one call (about ``batch x tile²`` px of activations) and with it the
daemon's peak memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["infer_tiled", "tile_length", "tile_starts"]


def _check(tile: int, margin: int, stride: int) -> None:
    if tile % stride or margin < 0 or tile <= 2 * margin:
        raise ValueError(f"tile {tile} must be a multiple of stride {stride} and > 2 x margin "
                         f"{margin}")


def _count(n: int, tile: int, margin: int, stride: int) -> int:
    """The fewest tiles of ``tile`` px covering ``n`` px with >= 2 x ``margin`` overlap, each
    start a multiple of ``stride`` (two tiles start at 0 and ``n - tile``, exact; more get one
    stride of slack per seam for rounding the starts between)."""
    if n <= tile:
        return 1
    if n - tile <= tile - 2 * margin:
        return 2
    k = 3
    while (n - tile) / (k - 1) + stride > tile - 2 * margin:
        k += 1
    return k


def tile_starts(n: int, tile: int, margin: int, stride: int) -> list[int]:
    """Return the start offsets of tiles of length ``tile`` covering ``n`` px with overlap.

    As few tiles as possible, evenly spaced: neighbouring tiles overlap by at least
    ``2 * margin``; offsets are multiples of ``stride`` (the network's), the first is 0 and the
    last tile ends at ``n`` (``n`` a multiple of ``stride``). One tile when ``n <= tile``.
    """
    _check(tile, margin, stride)
    k = _count(n, tile, margin, stride)
    if k == 1:
        return [0]
    last = (n - tile) - (n - tile) % stride
    starts = [int(i * (n - tile) / (k - 1)) // stride * stride for i in range(k - 1)]
    return [*starts, last]


def tile_length(n: int, tile: int, margin: int, stride: int) -> int:
    """Return the shortest tile length (a multiple of ``stride``, at most ``tile``) that covers
    ``n`` px with as few tiles as ``tile`` px long ones would (:func:`tile_starts`)."""
    _check(tile, margin, stride)
    k = _count(n, tile, margin, stride)
    if k == 1:
        return n
    slack = 0 if k == 2 else stride
    t = -(-(n + (k - 1) * (2 * margin + slack)) // k)
    t = -(-t // stride) * stride
    while _count(n, t, margin, stride) > k:  # rounding: grow until the count holds
        t += stride
    return min(t, tile)


def _keep(starts: list[int], length: int, n: int) -> list[tuple[int, int]]:
    """Return, per tile, the [first, end) frame rows (or columns) whose logits it supplies:
    from the middle of the overlap with the previous tile to the middle of the next one."""
    out = []
    for i, a in enumerate(starts):
        lo = 0 if i == 0 else (a + min(n, starts[i - 1] + length)) // 2
        hi = n if i == len(starts) - 1 else (starts[i + 1] + min(n, a + length)) // 2
        out.append((lo, hi))
    return out


def infer_tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, margin: int,
                stride: int, batch: int = 1) -> np.ndarray:
    """Return the (1, C, H / r, W / r) logits of ``x`` (H, W), computed by ``run`` tile by tile.

    ``run`` maps a (b, h, w) float32 stack of tiles to their (b, C, h / r, w / r) logits, r = 1
    or 2 (a model whose last 2x up-sampling is left to the host:
    :mod:`~nanoscout.analysis.half_logits`); it is called with at most ``batch`` tiles (>= 1)
    at a time. ``x``'s sides must be multiples of ``stride``. A single engine call of one tile
    when ``x`` fits in one tile.
    """
    if batch < 1:
        raise ValueError(f"batch {batch} must be >= 1")
    _check(tile, margin, stride)
    h, w = x.shape
    if h <= tile and w <= tile:
        return run(x[None])
    # an axis that fits in one tile keeps its length (one tile along it)
    th = h if h <= tile else tile_length(h, tile, margin, stride)
    tw = w if w <= tile else tile_length(w, tile, margin, stride)
    rows = [0] if h <= tile else tile_starts(h, th, margin, stride)
    cols = [0] if w <= tile else tile_starts(w, tw, margin, stride)
    keep_r, keep_c = _keep(rows, th, h), _keep(cols, tw, w)
    jobs = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    out: np.ndarray | None = None
    r = 1
    for k in range(0, len(jobs), batch):
        part = jobs[k:k + batch]
        stack = np.stack([x[rows[i]:rows[i] + th, cols[j]:cols[j] + tw] for i, j in part])
        y = run(stack)
        if out is None:
            r = _output_stride(y.shape[2:], (th, tw), rows + cols
                               + [v for span in keep_r + keep_c for v in span])
            out = np.empty((1, y.shape[1], h // r, w // r), np.float32)
        for b, (i, j) in enumerate(part):
            (r0, r1), (c0, c1) = keep_r[i], keep_c[j]
            out[0, :, r0 // r:r1 // r, c0 // r:c1 // r] = \
                y[b, :, (r0 - rows[i]) // r:(r1 - rows[i]) // r,
                  (c0 - cols[j]) // r:(c1 - cols[j]) // r]
    assert out is not None
    return out


def _output_stride(out: tuple[int, ...], tile: tuple[int, int], cuts: list[int]) -> int:
    """Return r (1 or 2) for tiles of ``tile`` px whose logits are ``out`` px; every tile
    start and seam (``cuts``, px) must fall on the output grid."""
    for r in (1, 2):
        if tuple(out) == (tile[0] // r, tile[1] // r) and not any(c % r for c in (*tile, *cuts)):
            return r
    raise ValueError(f"tiles of {tile} px gave logits of {tuple(out)} px: neither the tile's "
                     "grid nor half of it on even seams")
