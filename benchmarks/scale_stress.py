"""The automatic working scale under a change of magnification or frame size, in one run.

::

    python -m benchmarks.scale_stress --out benchmarks/results/scale_stress.json

Other groups' frames differ from ours in magnification and in frame size more than in
anything else, and a working scale that goes wrong loses the whole frame (no particle found).
This benchmark takes labelled real images and changes only that:

* ``as_is``: the image as it is;
* ``half``: half the magnification (Gaussian blur of 1 px, then resampled to half the side;
  the particles are half as large in px);
* ``tiles``: a frame four times as large (2 x 2 copies of the image; its middle is what the
  image has at its corners, often vacuum or support);
* ``thick``: the image laid on a thick, uneven support (``nanoscout.training.crops.
  thick_support``: overlapping silica-sphere-like lumps or a smooth field, 0.5-3x the image's
  range, added where the particles are brighter than their surroundings, subtracted where they
  are darker; one seeded draw per image), which leaves the particles faint on a lumpy
  background, as on the held-out Pd's silica and alumina. The STEM recipe trains with the same
  transform, so this asks whether the *estimate* follows the lumps, not whether the network
  has seen such frames.
* ``grains``: one to three large, flat-topped, faceted objects (convex polygons 15-35 % of
  the image's shorter side across, 1 px edges, 0.6-1.2x the image's range, added with the
  particles' polarity as ``thick`` adds its support; one seeded draw per image): a support
  crystal, a thick region or a large agglomerate beside the particles, which an area-weighted
  median can take for the frame's particle size. The particles keep their truth (they lie on
  or beside the grains, as in HAADF intensity adds up).

and runs the shipped detector with its automatic working scale (``Detector``, the card as it
is, no stream key) twice: with the finer estimation passes centred on the frame (``centred``,
the behaviour before the content window) and centred where the first pass found the most
foreground (``content``, :func:`nanoscout.analysis.autoscale.content_centre`, as shipped).
Scored as the accuracy harness scores (IoU >= 0.5; box IoU for STEM boxes).

Sets: ``stem-train`` (the STEM training materials Cu, Pt and PtW with the STEM detector: the
network was trained on them, the estimate was never tuned on them), ``emps-tune`` (the EMPS
tuning papers with the general detector), ``msa-tune`` (the 15 BF-TEM training frames of
``msa``, which no shipped detector trained on, with the general detector),
``stem-tune:MATERIAL`` (one STEM training material's images, for a candidate network trained
without it: ``--model``; ``stem-tune`` is the STEM tuning material Pt); the held-out sets
(``stem``: Pd, ``emps``, ``nffa``, ``msa``) only when named. ``--model DIR/detector_stem.onnx``
scores a candidate (its card beside it) instead of the shipped file. ONNX Runtime CPU,
``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from scipy import ndimage as ndi

TRANSFORMS = ("as_is", "half", "tiles", "thick", "grains")
WINDOWS = ("centred", "content")
#: set -> (detector file in models/weights, the sample set of nanoscout.training.realdata)
SETS = {"stem-train": ("detector_stem.onnx", "stem-train"), "emps-tune": ("detector.onnx", "emps-tune"),
        "msa-tune": ("detector.onnx", "msa-tune"),
        "stem": ("detector_stem.onnx", "stem"), "emps": ("detector.onnx", "emps"),
        "nffa": ("detector.onnx", "nffa"), "msa": ("detector.onnx", "msa")}
TUNING_SETS = ("stem-train", "emps-tune", "msa-tune")
#: a STEM training material's images as a set (``stem-tune:Cu``), for a network trained without it
MATERIAL_PREFIX = "stem-tune:"


def _stem_tuning(name: str) -> bool:
    """Whether ``name`` is the STEM tuning material (``stem-tune``) or one training material."""
    return name == "stem-tune" or (name.startswith(MATERIAL_PREFIX) and name != MATERIAL_PREFIX)


def set_entry(name: str) -> tuple[str, str]:
    """(detector file in models/weights, sample set) of set ``name``; SystemExit if unknown."""
    if name in SETS:
        return SETS[name]
    if _stem_tuning(name):
        return "detector_stem.onnx", name
    raise SystemExit(f"unknown set {name!r} (known: {', '.join(SETS)}, {MATERIAL_PREFIX}MATERIAL)")


def is_tuning(name: str) -> bool:
    """Whether set ``name`` may be used to choose settings (not a held-out set)."""
    return name in TUNING_SETS or _stem_tuning(name)


def transform(image: np.ndarray, labels: np.ndarray | None, boxes: np.ndarray | None,
              how: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Return (image, labels, boxes) changed as ``how`` says (module docstring); ``seed``
    draws the ``thick`` support."""
    if how == "as_is":
        return image, labels, boxes
    if how == "half":
        small = ndi.zoom(ndi.gaussian_filter(image.astype(np.float32), 1.0), 0.5, order=1)
        lab = None if labels is None else ndi.zoom(labels, 0.5, order=0)[:small.shape[0], :small.shape[1]]
        return small, lab, None if boxes is None else boxes * 0.5
    if how == "tiles":
        h, w = image.shape
        big = np.tile(image, (2, 2))
        lab = None
        if labels is not None:
            n = int(labels.max()) + 1
            copies = [np.where(labels > 0, labels + k * n, 0) for k in range(4)]
            lab = np.block([[copies[0], copies[1]], [copies[2], copies[3]]])
        bx = None if boxes is None else np.concatenate(
            [boxes + np.array([dx, dy, dx, dy], np.float64) for dy in (0, h) for dx in (0, w)])
        return big, lab, bx
    if how in ("thick", "grains"):
        from nanoscout.analysis.preprocess import normalize
        from nanoscout.training.crops import ellipse_labels, thick_support

        # the particles as the STEM recipe trains on them: a box's inscribed ellipse
        fg = labels if labels is not None else ellipse_labels(
            image.shape, np.zeros((0, 4)) if boxes is None else np.asarray(boxes, np.float64))
        if how == "thick":
            out = thick_support(normalize(image), fg, np.random.default_rng([seed, 7]))
        else:
            out = add_grains(normalize(image), fg, np.random.default_rng([seed, 11]))
        return out, labels, boxes
    raise ValueError(f"unknown transform {how!r}")


def add_grains(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return ``x`` (normalised) with 1-3 large faceted grains added (module docstring: the
    ``grains`` transform), normalised again; ``labels`` give the particles' polarity."""
    from skimage.draw import polygon

    from nanoscout.analysis.preprocess import normalize
    from nanoscout.training.crops import signed_span

    h, w = x.shape
    side = float(min(h, w))
    field = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.075, 0.175)) * side  # half the grain's width
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0.0, 2.0 * np.pi, n))
        rad = r * rng.uniform(0.8, 1.2, n)
        rr, cc = polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), (h, w))
        field[rr, cc] = np.maximum(field[rr, cc], float(rng.uniform(0.6, 1.2)))
    return normalize(x + ndi.gaussian_filter(field, 1.0) * signed_span(x, labels))


def _samples(name: str) -> Iterator[Any]:
    from nanoscout.training import realdata

    if name == "stem-train":
        for n in realdata.load_split("stem")["train"]:
            yield realdata.load_stem(str(n))
    else:
        yield from realdata.iter_samples(name)


def run_set(name: str, threads: int, model: Path | None = None,
            transforms: tuple[str, ...] = TRANSFORMS, windows: tuple[str, ...] = WINDOWS,
            seed: int = 0) -> dict[str, Any]:
    """Score the shipped detector of set ``name`` (or ``model``, its card beside it) under
    each of ``transforms`` and ``windows``; image ``i`` of the set gets the support draw
    ``seed + i``."""
    from nanoscout.analysis import detector as detector_module
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
    from nanoscout.engines import create_engine
    from nanoscout.training.evaluate import score_image, summarize

    file, sample_set = set_entry(name)
    model = model if model is not None else shipped_model_dir() / file
    card = ModelCard.load(model.with_suffix(".json"))
    engine = create_engine(model, "onnxruntime-cpu", threads=threads)
    det = Detector(engine, card)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {t: [] for t in transforms} for w in windows}
    images = []
    try:
        for i, s in enumerate(_samples(sample_set)):
            img = s.image.astype(np.float32)
            if img.ndim == 3:
                img = img.mean(axis=-1)
            for how in transforms:
                im, lab, bx = transform(img, s.labels, s.boxes, how, seed=seed + i)
                row: dict[str, Any] = {"id": s.id, "transform": how, "shape": list(im.shape)}
                for window in windows:
                    if window == "centred":  # the finer passes at the frame's centre
                        with mock.patch.object(detector_module, "content_centre",
                                               lambda *a, **k: None):
                            found = det.detect(im)
                    else:
                        found = det.detect(im)
                    r = score_image(found.labels, true_labels=lab, true_boxes=bx)
                    raw[window][how].append(r)
                    row[window] = {"factor": round(float(found.scale), 4), "tp": r["tp"],
                                   "fp": r["fp"], "fn": r["fn"]}
                images.append(row)
                print(json.dumps(row), flush=True)
    finally:
        engine.close()
    summary = {w: {t: summarize(raw[w][t]) for t in transforms} for w in windows}
    f1 = {w: {t: summary[w][t]["f1"] for t in transforms} for w in windows}
    for w in windows:
        f1[w]["pooled"] = summarize([r for t in transforms for r in raw[w][t]])["f1"]
        f1[w]["frames_with_no_match"] = sum(
            1 for row in images if row[w]["tp"] == 0 and row[w]["tp"] + row[w]["fn"] > 0)
    return {"model": f"{card.name}:{card.version}", "file": str(model),
            "n_images": len(images) // len(transforms),
            "f1": f1, "images": images}


def main(argv: list[str] | None = None) -> None:
    """Command line: run the listed sets and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_stress.json"))
    ap.add_argument("--sets", default=",".join(TUNING_SETS),
                    help=f"comma-separated, of {', '.join(SETS)}, {MATERIAL_PREFIX}MATERIAL")
    ap.add_argument("--model", type=Path, default=None,
                    help="score this ONNX file (its card beside it) instead of the shipped "
                         "detector of each set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transforms", default=",".join(TRANSFORMS),
                    help=f"comma-separated, of {', '.join(TRANSFORMS)}")
    ap.add_argument("--seed", type=int, default=0,
                    help="first support draw of the thick transform (image i gets seed + i)")
    ap.add_argument("--windows", default=",".join(WINDOWS),
                    help=f"comma-separated, of {', '.join(WINDOWS)}")
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    for s in sets:
        set_entry(s)
    transforms = tuple(t for t in args.transforms.split(",") if t)
    windows = tuple(w for w in args.windows.split(",") if w)
    for got, known in ((transforms, TRANSFORMS), (windows, WINDOWS)):
        if not got or any(x not in known for x in got):
            raise SystemExit(f"choose from {', '.join(known)} (got {', '.join(got) or 'none'})")
    if args.model is not None and not args.model.with_suffix(".json").is_file():
        raise SystemExit(f"--model {args.model}: no model card {args.model.with_suffix('.json')}")
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.scale_stress", *given]),
        "machine": f"{platform.machine()} CPU, ONNX Runtime {args.threads} intra-op threads",
        "transforms": list(transforms), "windows": list(windows),
        "tuning_sets": [s for s in sets if is_tuning(s)],
        "heldout_sets": [s for s in sets if not is_tuning(s)],
        "sets": {s: run_set(s, args.threads, args.model, transforms, windows, args.seed)
                 for s in sets}, "seconds": 0.0}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for s, r in res["sets"].items():
        print(s, json.dumps(r["f1"]))


if __name__ == "__main__":
    main()
