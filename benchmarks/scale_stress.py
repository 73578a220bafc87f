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
  image has at its corners, often vacuum or support).

and runs the shipped detector with its automatic working scale (``Detector``, the card as it
is, no stream key) twice: with the finer estimation passes centred on the frame (``centred``,
the behaviour before the content window) and centred where the first pass found the most
foreground (``content``, :func:`nanoscout.analysis.autoscale.content_centre`, as shipped).
Scored as the accuracy harness scores (IoU >= 0.5; box IoU for STEM boxes).

Sets: ``stem-train`` (the STEM training materials Cu, Pt and PtW with the STEM detector: the
network was trained on them, the estimate was never tuned on them), ``emps-tune`` (the EMPS
tuning papers with the general detector); the held-out sets (``stem``: Pd, ``emps``, ``nffa``,
``msa``) only when named. ONNX Runtime CPU, ``--threads`` intra-op threads.
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

TRANSFORMS = ("as_is", "half", "tiles")
WINDOWS = ("centred", "content")
#: set -> (detector file in models/weights, the sample set of nanoscout.training.realdata)
SETS = {"stem-train": ("detector_stem.onnx", "stem-train"), "emps-tune": ("detector.onnx", "emps-tune"),
        "stem": ("detector_stem.onnx", "stem"), "emps": ("detector.onnx", "emps"),
        "nffa": ("detector.onnx", "nffa"), "msa": ("detector.onnx", "msa")}
TUNING_SETS = ("stem-train", "emps-tune")


def transform(image: np.ndarray, labels: np.ndarray | None, boxes: np.ndarray | None,
              how: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Return (image, labels, boxes) changed as ``how`` says (module docstring)."""
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
    raise ValueError(f"unknown transform {how!r}")


def _samples(name: str) -> Iterator[Any]:
    from nanoscout.training import realdata

    if name == "stem-train":
        for n in realdata.load_split("stem")["train"]:
            yield realdata.load_stem(str(n))
    else:
        yield from realdata.iter_samples(name)


def run_set(name: str, threads: int) -> dict[str, Any]:
    """Score the shipped detector of set ``name`` under every transform and window."""
    from nanoscout.analysis import detector as detector_module
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
    from nanoscout.engines import create_engine
    from nanoscout.training.evaluate import score_image, summarize

    model = shipped_model_dir() / SETS[name][0]
    card = ModelCard.load(model.with_suffix(".json"))
    engine = create_engine(model, "onnxruntime-cpu", threads=threads)
    det = Detector(engine, card)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {t: [] for t in TRANSFORMS} for w in WINDOWS}
    images = []
    try:
        for s in _samples(SETS[name][1]):
            img = s.image.astype(np.float32)
            if img.ndim == 3:
                img = img.mean(axis=-1)
            for how in TRANSFORMS:
                im, lab, bx = transform(img, s.labels, s.boxes, how)
                row: dict[str, Any] = {"id": s.id, "transform": how, "shape": list(im.shape)}
                for window in WINDOWS:
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
    summary = {w: {t: summarize(raw[w][t]) for t in TRANSFORMS} for w in WINDOWS}
    f1 = {w: {t: summary[w][t]["f1"] for t in TRANSFORMS} for w in WINDOWS}
    for w in WINDOWS:
        f1[w]["pooled"] = summarize([r for t in TRANSFORMS for r in raw[w][t]])["f1"]
        f1[w]["frames_with_no_match"] = sum(
            1 for row in images if row[w]["tp"] == 0 and row[w]["tp"] + row[w]["fn"] > 0)
    return {"model": f"{card.name}:{card.version}", "n_images": len(images) // len(TRANSFORMS),
            "f1": f1, "images": images}


def main(argv: list[str] | None = None) -> None:
    """Command line: run the listed sets and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_stress.json"))
    ap.add_argument("--sets", default=",".join(TUNING_SETS),
                    help=f"comma-separated, of {', '.join(SETS)}")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    for s in sets:
        if s not in SETS:
            raise SystemExit(f"unknown set {s!r} (known: {', '.join(SETS)})")
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.scale_stress", *given]),
        "machine": f"{platform.machine()} CPU, ONNX Runtime {args.threads} intra-op threads",
        "transforms": list(TRANSFORMS), "windows": list(WINDOWS),
        "tuning_sets": [s for s in sets if s in TUNING_SETS],
        "heldout_sets": [s for s in sets if s not in TUNING_SETS],
        "sets": {s: run_set(s, args.threads) for s in sets}, "seconds": 0.0}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for s, r in res["sets"].items():
        print(s, json.dumps(r["f1"]))


if __name__ == "__main__":
    main()
