"""``nanoscout lens``: the AI lens offline, one image file in, a PNG of what the lens sees out.

::

    python -m clients.lens IMAGE --layer act_enc2 --out maps.png [--card models/weights/lens.json]

runs the shipped autoencoder (``models/weights/lens.onnx``, its card next to it) with ONNX
Runtime on the CPU and writes a mosaic (:func:`render_activations`): the first row holds the
network input (the whole frame resampled to S x S and normalised exactly as the daemon does,
``service.preprocess.fixed_input``), its reconstruction and the per-pixel squared error; the
rows below hold the first ``max_maps`` channels of the chosen activation, each scaled to its
own min..max and enlarged (nearest neighbour) to the tile size. It prints the frame's
novelty error (the card's ``novelty.error_output``: a k-NN distance of texture statistics, not
the pixel error) and novelty (error / the card's reference error; 1.0 = the 99th percentile of
usual frames).

Image files are read by :mod:`clients.acquisition.readers` (PNG/TIFF/JPEG and the vendor
formats DM3/DM4, SER/EMI, MRC, EMD; colour is read as luminance). Only numpy, Pillow,
onnxruntime and ``service.preprocess`` are used: no torch, no training code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import NanoscoutError
from service.preprocess import fixed_input

__all__ = ["DEFAULT_CARD", "LensOutput", "main", "mosaic_from_maps", "mosaic_shape",
           "render_activations", "run_lens"]

#: the shipped card (``models/weights/lens.json`` of this checkout)
DEFAULT_CARD = Path(__file__).resolve().parents[1] / "models" / "weights" / "lens.json"
#: tile side of the mosaic, px
TILE = 128
#: grey separator between tiles, px
GAP = 2
#: tiles per mosaic row
COLUMNS = 4


class LensError(NanoscoutError):
    """The lens card, ONNX file or requested layer is unusable (message names which)."""


@dataclass(frozen=True)
class LensOutput:
    """One frame through the lens.

    ``image`` / ``reconstruction``: (S, S) float32 normalised intensity; ``error``: the
    card's novelty error output (for the shipped lens a k-NN distance² per feature of texture
    statistics, dimensionless); ``novelty``: error / the card's reference error;
    ``activations``: name -> (c, h, w) float32.
    """

    image: np.ndarray
    reconstruction: np.ndarray
    error: float
    novelty: float
    activations: dict[str, np.ndarray]


def _read_card(card_path: Path) -> dict[str, Any]:
    try:
        card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LensError(f"lens card not found: {card_path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LensError(f"lens card {card_path} is not readable JSON: {exc}") from exc
    if not isinstance(card, dict) or card.get("task") != "autoencoder":
        raise LensError(f"{card_path} is not an autoencoder model card "
                        f"(task {card.get('task') if isinstance(card, dict) else None!r})")
    try:
        size = card["input"]["size"]
        float(card["novelty"]["reference_error"])
        str(card["onnx_file"]) + str(card["input"]["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LensError(f"lens card {card_path} lacks {exc} (input.size, input.name, "
                        "onnx_file, novelty.reference_error)") from exc
    if not (isinstance(size, list) and len(size) == 2):
        raise LensError(f"lens card {card_path}: input.size {size!r} is not [H, W]")
    return card


_SESSIONS: dict[Path, Any] = {}


def _session(onnx_path: Path) -> Any:
    sess = _SESSIONS.get(onnx_path)
    if sess is None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise LensError("the lens needs ONNX Runtime: pip install 'nanoscout[cpu]'") from exc
        if not onnx_path.is_file():
            raise LensError(f"lens model {onnx_path} does not exist")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        _SESSIONS[onnx_path] = sess
    return sess


def run_lens(card_path: str | Path, image: np.ndarray) -> LensOutput:
    """Return the lens's view of one raw frame (any real dtype, 2-D); see :class:`LensOutput`."""
    card_path = Path(card_path)
    card = _read_card(card_path)
    sess = _session(card_path.parent / card["onnx_file"])
    h, w = (int(v) for v in card["input"]["size"])
    x = fixed_input(image, (h, w))
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {card["input"]["name"]: x})))
    err_name = card["novelty"].get("error_output", "error")
    error = float(np.asarray(got[err_name]).reshape(-1)[0])
    acts = {k: np.asarray(v[0], np.float32) for k, v in got.items()
            if k.startswith("act_") and np.ndim(v) == 4}
    return LensOutput(image=x[0, 0], reconstruction=np.asarray(got["reconstruction"])[0, 0],
                      error=error, novelty=error / float(card["novelty"]["reference_error"]),
                      activations=acts)


def mosaic_shape(n_maps: int, tile: int = TILE, columns: int = COLUMNS) -> tuple[int, int]:
    """Return the (rows, cols) px of a mosaic with ``n_maps`` activation tiles."""
    rows = 1 + math.ceil(n_maps / columns)
    return rows * tile + (rows - 1) * GAP, columns * tile + (columns - 1) * GAP


def _to_tile(a: np.ndarray, tile: int, lo: float | None = None, hi: float | None = None
             ) -> np.ndarray:
    """Return ``a`` scaled lo..hi -> 0..255 (own min..max by default) as a tile x tile uint8."""
    a = np.asarray(a, np.float32)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    ri = (np.arange(tile) * a.shape[0]) // tile
    ci = (np.arange(tile) * a.shape[1]) // tile
    if a.shape[0] > tile or a.shape[1] > tile:  # shrink by block means, not by skipping
        from service.preprocess import resample
        scaled = resample(scaled, (tile, tile))
        ri, ci = np.arange(tile), np.arange(tile)
    return (np.clip(scaled[ri][:, ci], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_activations(card_path: str | Path, image: np.ndarray, layer: str,
                       max_maps: int = 16, *, tile: int = TILE) -> np.ndarray:
    """Return a uint8 (rows, cols) mosaic of the lens's view of ``image``.

    Row 0: input (0..1 normalised intensity -> 0..255), reconstruction (same scale) and the
    per-pixel squared error (0 .. its 99.5th percentile -> 0..255). Then the first
    ``max_maps`` channels of activation ``layer`` (``act_enc1``, ``act_enc2``, ``act_code``),
    four per row, each scaled to its own range. Shape: :func:`mosaic_shape` of
    min(max_maps, channels). Raises LensError for an unknown layer.
    """
    return _mosaic(run_lens(card_path, image), layer, max_maps, tile)


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
    return _grid([_to_tile(m, tile, lo, hi) for m in stack], tile, min(columns, len(stack)))


def _grid(tiles: list[np.ndarray | None], tile: int, columns: int = COLUMNS) -> np.ndarray:
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


def _mosaic(out: LensOutput, layer: str, max_maps: int, tile: int) -> np.ndarray:
    if layer not in out.activations:
        raise LensError(f"layer {layer!r} is not an output of the lens (choose one of "
                        f"{', '.join(sorted(out.activations))})")
    maps = out.activations[layer][: max(1, int(max_maps))]
    err = (out.reconstruction - out.image) ** 2
    tiles: list[np.ndarray | None] = [
        _to_tile(out.image, tile, 0.0, 1.0), _to_tile(out.reconstruction, tile, 0.0, 1.0),
        _to_tile(err, tile, 0.0, max(float(np.percentile(err, 99.5)), 1e-12))]
    tiles += [None] * (COLUMNS - len(tiles))
    tiles += [_to_tile(m, tile) for m in maps]
    return _grid(tiles, tile)


def _live(args: argparse.Namespace) -> int:
    """``--connect``: the lens maps of a live frame, asked of the daemon's query socket."""
    from PIL import Image

    from clients.query import request_lens

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


def main(argv: list[str] | None = None) -> int:
    """Command line: write the lens mosaic of one image file, or (``--connect``) of the newest
    frame of a live source; returns the exit status."""
    ap = argparse.ArgumentParser(prog="nanoscout lens",
                                 description="AI lens: a frame's autoencoder feature maps, its "
                                             "reconstruction and error map as a PNG mosaic")
    ap.add_argument("image", type=Path, nargs="?",
                    help="image file (PNG, TIFF, JPEG, DM3/4, SER, MRC, EMD); omit with --connect")
    ap.add_argument("--layer", default="act_enc2",
                    help="activation to show: act_enc1, act_enc2 or act_code (default act_enc2); "
                         "with --connect also reconstruction")
    ap.add_argument("--out", type=Path, default=Path("lens.png"), help="PNG to write")
    ap.add_argument("--max-maps", type=int, default=16, help="channels to show (default 16)")
    ap.add_argument("--index", type=int, default=0, help="image index in a multi-image file")
    ap.add_argument("--card", type=Path, default=DEFAULT_CARD, help="lens model card")
    ap.add_argument("--connect", help="a running daemon's query endpoint (e.g. "
                    "tcp://127.0.0.1:5557): show its newest frame of --source instead of a file")
    ap.add_argument("--source", default="sim", help="with --connect: the source (default sim)")
    ap.add_argument("--timeout", type=float, default=10.0, help="with --connect: seconds to wait")
    args = ap.parse_args(argv)
    if args.connect:
        return _live(args)
    if args.image is None:
        ap.error("give an image file, or --connect ENDPOINT for a live frame")
    from PIL import Image

    from clients.acquisition.readers import read_images

    try:
        records = read_images(args.image)
        if not 0 <= args.index < len(records):
            raise LensError(f"{args.image} holds {len(records)} image(s); --index {args.index} "
                            "is out of range")
        frame = records[args.index].data
        out = run_lens(args.card, frame)
        mosaic = _mosaic(out, args.layer, args.max_maps, TILE)
    except NanoscoutError as exc:
        print(f"nanoscout lens: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mosaic).save(args.out)
    print(f"{args.image}: error {out.error:.6f}, novelty {out.novelty:.2f} "
          f"(1.0 = 99th percentile of usual frames); wrote {args.out} "
          f"({mosaic.shape[1]}x{mosaic.shape[0]} px, {args.layer})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
