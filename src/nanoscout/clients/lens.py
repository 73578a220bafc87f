"""The AI lens's pictures: feature maps as a PNG mosaic, and the maps of a live frame asked of
the daemon's query socket (``nanoscout lens --query``, the dashboard's lens view).

The offline lens (one image file through the lens model) is :mod:`nanoscout.batch.lens`.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from PIL import Image

from nanoscout.clients.query import request_lens
from nanoscout.wire.errors import NanoscoutError

__all__ = ["COLUMNS", "GAP", "TILE", "LensError", "grid", "mosaic_from_maps", "mosaic_shape",
           "to_tile", "write_live_mosaic"]

#: tile side of the mosaic, px
TILE = 128
#: grey separator between tiles, px
GAP = 2
#: tiles per mosaic row
COLUMNS = 4


class LensError(NanoscoutError):
    """The lens card, ONNX file or requested layer is unusable (message names which)."""


def mosaic_shape(n_maps: int, tile: int = TILE, columns: int = COLUMNS) -> tuple[int, int]:
    """Return the (rows, cols) px of a mosaic with ``n_maps`` activation tiles."""
    rows = 1 + math.ceil(n_maps / columns)
    return rows * tile + (rows - 1) * GAP, columns * tile + (columns - 1) * GAP


def to_tile(a: np.ndarray, tile: int, lo: float | None = None, hi: float | None = None
             ) -> np.ndarray:
    """Return ``a`` scaled lo..hi -> 0..255 (own min..max by default) as a tile x tile uint8."""
    a = np.asarray(a, np.float32)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    ri = (np.arange(tile) * a.shape[0]) // tile
    ci = (np.arange(tile) * a.shape[1]) // tile
    if a.shape[0] > tile or a.shape[1] > tile:  # shrink by area averaging, not by skipping
        shrunk = Image.fromarray(scaled.astype(np.float32), mode="F").resize((tile, tile),
                                                                             Image.Resampling.BOX)
        scaled = np.asarray(shrunk, np.float32)
        ri, ci = np.arange(tile), np.arange(tile)
    return (np.clip(scaled[ri][:, ci], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mosaic_from_maps(maps: np.ndarray, max_maps: int = 16, tile: int = TILE, *,
                     columns: int = COLUMNS, lo: float | None = None,
                     hi: float | None = None) -> np.ndarray:
    """Return a uint8 mosaic of the first ``max_maps`` of ``maps`` ((c, h, w), or any array
    whose last two axes are the map rows and columns), ``columns`` tiles per row (fewer when
    there are fewer maps), each ``tile`` px square and scaled ``lo``..``hi`` -> 0..255 (each
    map's own min..max by default), separated by ``GAP`` px of grey."""
    a = np.asarray(maps)
    if a.ndim < 2 or a.size == 0:
        raise LensError(f"feature maps need at least 2 dimensions and some values, got shape "
                        f"{a.shape}")
    stack = a.reshape(-1, a.shape[-2], a.shape[-1])[: max(1, int(max_maps))]
    return grid([to_tile(m, tile, lo, hi) for m in stack], tile, min(columns, len(stack)))


def grid(tiles: list[np.ndarray | None], tile: int, columns: int = COLUMNS) -> np.ndarray:
    """Place ``tiles`` row by row, ``columns`` per row, on a grey background (None: empty)."""
    rows = max(1, math.ceil(len(tiles) / columns))
    mosaic = np.full((rows * tile + (rows - 1) * GAP, columns * tile + (columns - 1) * GAP), 96,
                     np.uint8)
    for k, t in enumerate(tiles):
        if t is None:
            continue
        r, c = divmod(k, columns)
        mosaic[r * (tile + GAP): r * (tile + GAP) + tile,
               c * (tile + GAP): c * (tile + GAP) + tile] = t
    return mosaic


def write_live_mosaic(args: argparse.Namespace) -> int:
    """``--query``: the lens maps of a live frame, asked of the daemon's query socket."""
    try:
        reply, maps = request_lens(args.connect, args.source, [args.layer],
                                   timeout=args.timeout)
        a = maps[args.layer].astype(np.float32)
        mosaic = mosaic_from_maps(a[0] if a.ndim == 4 else a, args.max_maps)
    except NanoscoutError as exc:
        print(f"nanoscout lens: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mosaic).save(args.out)
    novelty = "-" if reply.novelty is None else f"{reply.novelty:.2f}"
    print(f"{args.source}#{reply.seq}: novelty {novelty}; wrote {args.out} "
          f"({mosaic.shape[1]}x{mosaic.shape[0]} px, {args.layer} {tuple(a.shape)})")
    return 0


