"""``nanoscout models calibrate-lens FRAMES... --out DIR``: the AI lens's novelty reference
rebuilt on your own frames.

The shipped lens (``models/weights/lens.json``) scores novelty as its per-frame error divided by
``novelty.reference_error``, the 99th percentile of the errors of *synthetic* usual frames. Real
micrographs of a given instrument and specimen type differ from those (82 % of the real EMPS
images score above 1), so an operator's "usual" should be their own. This command:

1. reads every image of ``FRAMES`` (files or folders; TIFF, DM3/4, EMI/SER, MRC, EMD, PNG,
   JPEG) with the same readers as ``replay``/``measure``;
2. runs the lens's ONNX model on each, preprocessed exactly as the daemon does
   (:func:`nanoscout.analysis.preprocess.fixed_input` at the card's input size), with ONNX
   Runtime on the CPU;
3. sets ``reference_error`` to the ``--quantile`` (default 0.99) of those errors, and writes
   ``DIR/lens.onnx`` (the same model, copied unchanged) and ``DIR/lens.json`` (the card with
   the new ``novelty`` block, its ``data`` naming the frames, and the old reference kept in
   ``notes``), validated by :class:`nanoscout.analysis.modelcard.ModelCard`.

Point the daemon at it with ``[classify] lens = "DIR/lens.onnx"``. It prints how many of the
frames scored above 1 with the old reference and with the new one. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.analysis.preprocess import fixed_input
from nanoscout.clients.acquisition.readers import SUPPORTED_SUFFIXES, read_images
from nanoscout.clients.progress import progress
from nanoscout.engines import create_engine
from nanoscout.wire.errors import ConfigError, NanoscoutError, ReaderError

__all__ = ["calibrate_lens", "main"]

#: fewer frames than this give a quantile that is mostly noise
MIN_FRAMES = 20


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in SUPPORTED_SUFFIXES))
        else:
            out.append(p)
    return out


def _check_folder(path: Path, option: str) -> None:
    """Raise ConfigError when the folder ``path`` (made where missing) cannot be one: it, or
    the nearest of its parents that exists, is a file. ``option``: what the message names
    (the option and its value)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{option}: {p} is a file, not a folder")
            return


def frame_errors(card_path: Path, frames: list[Path], *, threads: int = 2,
                 log: Any = print, enabled: bool | None = None) -> tuple[np.ndarray, list[str]]:
    """The lens's per-frame error of every image in ``frames`` (files are read whole: every
    2-D image of a multi-image file counts); returns (errors, "file[index]" names).
    Unreadable files are reported and skipped."""
    card = ModelCard.load(card_path)
    if card.novelty is None or card.input.size is None:
        raise ConfigError(f"{card_path} is not an autoencoder card with a novelty reference")
    size = (int(card.input.size[0]), int(card.input.size[1]))
    errors: list[float] = []
    names: list[str] = []
    files = _files(frames)
    with create_engine(card.onnx_path(card_path), "onnxruntime-cpu", threads=threads) as engine, \
            progress("calibrating the lens", total=len(files), enabled=enabled) as bar:
        for path in files:
            try:
                records = read_images(path)
            except ReaderError as exc:
                bar.log(f"skipped {path}: {exc}")
                bar.advance()
                continue
            for rec in records:
                try:
                    x = fixed_input(rec.data, size)
                except NanoscoutError as exc:
                    bar.log(f"skipped {path}[{rec.index}]: {exc}")
                    continue
                out = engine.infer({card.input.name: x.astype(np.float32)})
                errors.append(float(np.asarray(out[card.novelty.error_output]).reshape(-1)[0]))
                names.append(f"{path}[{rec.index}]")
            bar.advance(note=path.name)
    return np.asarray(errors, np.float64), names


def calibrate_lens(frames: list[Path], out: Path, *, card_path: Path | None = None,
                   quantile: float = 0.99, min_frames: int = MIN_FRAMES,
                   enabled: bool | None = None) -> dict[str, Any]:
    """Rebuild the novelty reference on ``frames`` and write ``out/lens.onnx`` +
    ``out/lens.json``; returns a summary (frame count, old and new reference, share of the
    frames above novelty 1 before and after). Raises ConfigError, before any frame is read,
    for a ``quantile`` outside [0.5, 1), ``min_frames`` < 1 or an ``out`` that is a file."""
    if not 0.5 <= quantile < 1.0:
        raise ConfigError(f"--quantile must be in [0.5, 1), got {quantile}")
    if min_frames < 1:
        raise ConfigError(f"--min-frames must be >= 1, got {min_frames}")
    _check_folder(out, f"--out {out}")
    card_path = Path(card_path or shipped_model_dir() / "lens.json")
    errors, names = frame_errors(card_path, frames, enabled=enabled)
    if errors.size < min_frames:
        raise ConfigError(f"{errors.size} frames read; the reference needs at least {min_frames} "
                          "(give more frames of your usual specimens)")
    card = ModelCard.load(card_path)
    assert card.novelty is not None
    old = float(card.novelty.reference_error)
    ref = float(np.quantile(errors, quantile))
    if not ref > 0:
        raise ConfigError(f"the {quantile} quantile of the frames' errors is {ref}: not usable")
    roots = sorted({str(p) for p in frames})
    novelty = card.novelty.model_copy(update={
        "reference_error": ref, "reference_quantile": quantile,
        "quantiles": {f"p{q}": round(float(np.quantile(errors, q / 100)), 7) for q in (50, 90, 99)},
        "n_frames": int(errors.size),
        "data": f"{errors.size} of the operator's usual frames ({', '.join(roots)[:500]}), "
                "calibrated with nanoscout models calibrate-lens"})
    notes = (f"{card.notes} " if card.notes else "") + (
        f"Novelty reference recalibrated on {errors.size} user frames (was {old:.6g}, "
        f"{card.novelty.n_frames} synthetic frames).")
    new = card.model_copy(update={"novelty": novelty, "notes": notes})
    out.mkdir(parents=True, exist_ok=True)
    onnx_src = card.onnx_path(card_path)
    onnx_dst = out / new.onnx_file
    if onnx_src.resolve() != onnx_dst.resolve():
        shutil.copyfile(onnx_src, onnx_dst)
    written = new.dump(out / "lens.json")
    ModelCard.load(written)  # the new card validates and its ONNX hash matches
    return {"card": str(written), "onnx": str(onnx_dst), "frames": int(errors.size),
            "reference_error_old": old, "reference_error_new": ref, "quantile": quantile,
            "above_1_old": float(np.mean(errors / old > 1)),
            "above_1_new": float(np.mean(errors / ref > 1)),
            "frames_used": names}


def main(argv: list[str] | None = None) -> int:
    """Command line of ``nanoscout models calibrate-lens``; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="nanoscout models calibrate-lens",
        description="Rebuild the AI lens's novelty reference on your own usual frames and write "
                    "a new lens card (then set [classify] lens = \"OUT/lens.onnx\").",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("frames", nargs="+", type=Path, help="image files or folders of usual frames")
    ap.add_argument("--out", type=Path, required=True, help="folder for lens.onnx + lens.json")
    ap.add_argument("--card", type=Path, default=shipped_model_dir() / "lens.json",
                    help="the lens card to start from")
    ap.add_argument("--quantile", type=float, default=0.99,
                    help="quantile of the frames' errors that becomes novelty 1.0")
    ap.add_argument("--min-frames", type=int, default=MIN_FRAMES,
                    help="refuse with fewer frames than this")
    ap.add_argument("--json", type=Path,
                    help="also write the summary as JSON here (its folder made where missing)")
    args = ap.parse_args(argv)
    try:
        if args.json is not None:  # before the lens is written, not after
            if args.json.is_dir():
                raise ConfigError(f"--json {args.json} is a folder: name the summary's file")
            _check_folder(args.json.parent, f"--json {args.json}")
        s = calibrate_lens(args.frames, args.out, card_path=args.card, quantile=args.quantile,
                           min_frames=args.min_frames)
    except NanoscoutError as exc:
        print(f"nanoscout models calibrate-lens: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    print(f"{s['frames']} frames: reference error {s['reference_error_old']:.6g} -> "
          f"{s['reference_error_new']:.6g} ({s['quantile']:g} quantile); frames above novelty 1: "
          f"{100 * s['above_1_old']:.0f} % -> {100 * s['above_1_new']:.0f} %\n"
          f"wrote {s['card']} and {s['onnx']}: set [classify] lens = \"{s['onnx']}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
