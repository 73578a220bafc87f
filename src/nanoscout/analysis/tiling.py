"""Tiled inference for frames too large for one engine call.

The frame (already at working scale and padded to the network stride) is cut into overlapping
tiles; each tile's logits are kept only in its interior (``margin`` px from a cut edge are
dropped, because the network sees no context past the cut), and the interiors are pasted into
one logit map of the whole frame. Instances are then found once on that map, so a particle on a
tile seam is neither cut nor counted twice: stitching happens before post-processing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["tile_starts", "infer_tiled"]


def tile_starts(n: int, tile: int, margin: int, stride: int) -> list[int]:
    """Return the start offsets of tiles of length ``tile`` covering ``n`` px with overlap.

    Neighbouring tiles overlap by at least ``2 * margin``; offsets are multiples of ``stride``
    (the network's), the last tile ends at ``n``. One tile when ``n <= tile``.
    """
    if tile % stride or margin < 0 or tile <= 2 * margin:
        raise ValueError(f"tile {tile} must be a multiple of stride {stride} and > 2 x margin "
                         f"{margin}")
    if n <= tile:
        return [0]
    step = tile - 2 * margin
    starts = list(range(0, n - tile, step - step % stride or stride))
    last = n - tile
    last -= last % stride
    if starts[-1] != last:
        starts.append(last)
    return starts


def infer_tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, margin: int,
                stride: int) -> np.ndarray:
    """Return the (1, C, H, W) logits of ``x`` (H, W), computed by ``run`` tile by tile.

    ``run`` maps a (h, w) float32 tile to its (1, C, h, w) logits. ``x``'s sides must be
    multiples of ``stride``. A single engine call when ``x`` fits in one tile.
    """
    h, w = x.shape
    rows, cols = tile_starts(h, tile, margin, stride), tile_starts(w, tile, margin, stride)
    if len(rows) == 1 and len(cols) == 1:
        return run(x)
    out: np.ndarray | None = None
    for i, r0 in enumerate(rows):
        r1 = min(h, r0 + tile)
        # keep rows from the middle of the overlap with the previous / next tile
        keep_r0 = 0 if i == 0 else (r0 + min(h, rows[i - 1] + tile)) // 2
        keep_r1 = h if i == len(rows) - 1 else (rows[i + 1] + r1) // 2
        for j, c0 in enumerate(cols):
            c1 = min(w, c0 + tile)
            keep_c0 = 0 if j == 0 else (c0 + min(w, cols[j - 1] + tile)) // 2
            keep_c1 = w if j == len(cols) - 1 else (cols[j + 1] + c1) // 2
            y = run(np.ascontiguousarray(x[r0:r1, c0:c1]))
            if out is None:
                out = np.empty((1, y.shape[1], h, w), np.float32)
            out[:, :, keep_r0:keep_r1, keep_c0:keep_c1] = \
                y[:, :, keep_r0 - r0:keep_r1 - r0, keep_c0 - c0:keep_c1 - c0]
    assert out is not None
    return out
