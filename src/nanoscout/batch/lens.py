"""``nanoscout lens``: the AI lens offline, one image file in, a PNG of what the lens sees out.

::

    nanoscout lens IMAGE --layer act_enc2 --out maps.png [--card models/weights/lens.json]

runs the shipped autoencoder (``models/weights/lens.onnx``, its card next to it) through the
engine factory (ONNX Runtime on the CPU) and writes a mosaic (:func:`render_activations`): the first
row holds the network input (the whole frame resampled to S x S and normalised exactly as the daemon
does, ``nanoscout.analysis.preprocess.fixed_input``; a frame wider or taller than 4:3 in views
side by side, :func:`nanoscout.analysis.classifier.model_views`, error the views' mean, as the
daemon's classifier sees it), its reconstruction and the per-pixel squared
error; the rows below hold the first ``max_maps`` channels of the chosen activation, each scaled to
its own min..max and enlarged (nearest neighbour) to the tile size. It prints the frame's novelty
error (the card's ``novelty.error_output``: a k-NN distance of texture statistics, not the pixel
error) and novelty (error / the card's reference error; 1.0 = the 99th percentile of usual frames).

An image the lens cannot analyse is named on stderr, no PNG is written and the exit status is 2:
a frame with NaN / infinite pixels, or a frame without contrast (beam blanked, shutter closed:
:class:`~nanoscout.wire.errors.BlankFrame`, the daemon's criterion,
:func:`nanoscout.analysis.classifier.model_input`), which the lens would answer like any other
such frame, with a novelty of ~88.

Image files are read by :mod:`nanoscout.clients.acquisition.readers` (PNG/TIFF/JPEG and the vendor
formats DM3/DM4, SER/EMI, MRC, EMD; colour is read as luminance). No torch, no training code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nanoscout.analysis.classifier import merge_views, model_views
from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.clients.acquisition.readers import read_images
from nanoscout.clients.lens import COLUMNS, TILE, LensError, grid, to_tile, write_live_mosaic
from nanoscout.engines import Engine, create_engine
from nanoscout.wire.errors import FrameError, ModelCardError, NanoscoutError

__all__ = ["DEFAULT_CARD", "LensOutput", "main", "render_activations", "run_lens"]

#: the shipped card (``models/weights/lens.json``)
DEFAULT_CARD = shipped_model_dir() / "lens.json"


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


def _read_card(card_path: Path) -> ModelCard:
    """Return the lens card at ``card_path``, validated as the daemon validates it
    (:meth:`ModelCard.load`: ``novelty.reference_error`` > 0, the ONNX file's sha256), or raise
    LensError naming the problem: a card the daemon refuses gives no novelty here either."""
    if not Path(card_path).is_file():
        raise LensError(f"lens card not found: {card_path}")
    try:
        card = ModelCard.load(card_path)
    except ModelCardError as exc:
        raise LensError(str(exc)) from exc
    if card.task != "autoencoder" or card.novelty is None or card.input.size is None:
        raise LensError(f"{card_path} is not an autoencoder model card with input.size and "
                        f"novelty (task {card.task!r})")
    return card


_ENGINES: dict[Path, Engine] = {}


def _engine(onnx_path: Path) -> Engine:
    engine = _ENGINES.get(onnx_path)
    if engine is None:
        if not onnx_path.is_file():
            raise LensError(f"lens model {onnx_path} does not exist")
        engine = _ENGINES[onnx_path] = create_engine(onnx_path, "onnxruntime-cpu", threads=2)
    return engine


def run_lens(card_path: str | Path, image: np.ndarray) -> LensOutput:
    """Return the lens's view of one raw frame (any real dtype, 2-D); see :class:`LensOutput`.
    Raises BlankFrame for a frame without contrast (:func:`model_views`), FrameError for
    pixels that cannot be analysed, LensError for an unusable card or model."""
    card_path = Path(card_path)
    card = _read_card(card_path)
    assert card.novelty is not None and card.input.size is not None  # _read_card checked
    engine = _engine(card.onnx_path(card_path))
    size = (int(card.input.size[0]), int(card.input.size[1]))
    # a frame far from square in views, as the daemon's classifier sees it
    xs, wide = model_views(image, size, "lens")
    got = merge_views([None if v is None else engine.infer({card.input.name: v}) for v in xs],
                      wide)
    x = merge_views([None if v is None else {"x": v} for v in xs], wide)["x"]
    err = np.asarray(got.get(card.novelty.error_output), dtype=np.float64).reshape(-1)
    if err.size != 1 or not np.isfinite(err[0]) or err[0] < 0:
        raise LensError(f"lens output {card.novelty.error_output!r} must be one finite error "
                        f">= 0, got {err[:4]}")
    error = float(err[0])
    acts = {k: np.asarray(v[0], np.float32) for k, v in got.items()
            if k.startswith("act_") and np.ndim(v) == 4}
    return LensOutput(image=x[0, 0], reconstruction=np.asarray(got["reconstruction"])[0, 0],
                      error=error, novelty=error / card.novelty.reference_error,
                      activations=acts)


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


def _mosaic(out: LensOutput, layer: str, max_maps: int, tile: int) -> np.ndarray:
    if layer not in out.activations:
        raise LensError(f"layer {layer!r} is not an output of the lens (choose one of "
                        f"{', '.join(sorted(out.activations))})")
    maps = out.activations[layer][: max(1, int(max_maps))]
    err = (out.reconstruction - out.image) ** 2
    tiles: list[np.ndarray | None] = [
        to_tile(out.image, tile, 0.0, 1.0), to_tile(out.reconstruction, tile, 0.0, 1.0),
        to_tile(err, tile, 0.0, max(float(np.percentile(err, 99.5)), 1e-12))]
    tiles += [None] * (COLUMNS - len(tiles))
    tiles += [to_tile(m, tile) for m in maps]
    return grid(tiles, tile)


def main(argv: list[str] | None = None) -> int:
    """Command line: write the lens mosaic of one image file, or (``--query``) of the newest
    frame of a live source; returns the exit status."""
    ap = argparse.ArgumentParser(prog="nanoscout lens",
                                 description="AI lens: a frame's autoencoder feature maps, its "
                                             "reconstruction and error map as a PNG mosaic")
    ap.add_argument("image", type=Path, nargs="?",
                    help="image file (PNG, TIFF, JPEG, DM3/4, SER, MRC, EMD); omit with --query")
    ap.add_argument("--layer", default="act_enc2",
                    help="activation to show: act_enc1, act_enc2 or act_code (default act_enc2); "
                         "with --query also reconstruction")
    ap.add_argument("--out", type=Path, default=Path("lens.png"), help="PNG to write")
    ap.add_argument("--max-maps", type=int, default=16, help="channels to show (default 16)")
    ap.add_argument("--index", type=int, default=0, help="image index in a multi-image file")
    ap.add_argument("--card", type=Path, default=DEFAULT_CARD, help="lens model card")
    ap.add_argument("--query", dest="connect", help="a running daemon's query endpoint (e.g. "
                    "tcp://127.0.0.1:5557): show its newest frame of --source instead of a file")
    ap.add_argument("--connect", dest="connect", help=argparse.SUPPRESS)  # the old spelling
    ap.add_argument("--source", default="sim", help="with --query: the source (default sim)")
    ap.add_argument("--timeout", type=float, default=10.0, help="with --query: seconds to wait")
    args = ap.parse_args(argv)
    fmt = Image.registered_extensions().get(args.out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:  # before any work: Pillow names it only on save
        ap.error(f"--out {args.out}: not an image type Pillow writes "
                 f"({args.out.suffix or 'no suffix'}); name it NAME.png")
    if args.connect:
        return write_live_mosaic(args)
    if args.image is None:
        ap.error("give an image file, or --query ENDPOINT for a live frame")
    try:
        records = read_images(args.image)
        if not 0 <= args.index < len(records):
            raise LensError(f"{args.image} holds {len(records)} image(s); --index {args.index} "
                            "is out of range")
        frame = records[args.index].data
        try:
            out = run_lens(args.card, frame)
        except FrameError as exc:  # NaN pixels, a blank frame: name the image, no mosaic
            raise LensError(f"{args.image} (image {args.index}): {exc}") from exc
        mosaic = _mosaic(out, args.layer, args.max_maps, TILE)
    except NanoscoutError as exc:
        print(f"nanoscout lens: {exc}", file=sys.stderr)
        return 2
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mosaic).save(args.out)
    except OSError as exc:
        print(f"nanoscout lens: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.image}: error {out.error:.6f}, novelty {out.novelty:.2f} "
          f"(1.0 = 99th percentile of usual frames); wrote {args.out} "
          f"({mosaic.shape[1]}x{mosaic.shape[0]} px, {args.layer})")
    return 0


