"""The detectors at low dose, with and without smoothing of noisy frames, in one run.

::

    python -m benchmarks.noise_stress --out benchmarks/results/noise_stress.json

Other groups' HAADF-STEM frames are often taken at lower dose than ours, and the detector took
their noise grains for particles (issue 17). This benchmark takes labelled images and changes
only their noise: each image is scaled to [0, 1] by its 0.5 / 99.5 percentiles and replaced by
a Poisson draw of ``dose * (0.05 + x)`` counts per pixel (``dose``: the counts of the brightest
pixels; ``0``: the image as it is; one seeded draw per image and dose;
:func:`nanoscout.training.crops.low_dose`). Each noisy image is
analysed by the shipped detector of its set (STEM sets: ``detector_stem.onnx``, the others
``detector.onnx``; the card as it is, automatic scale) with the card's
``normalization.denoise`` replaced by each ``--targets`` entry (``--model``: a candidate's ONNX
file, its card beside it, for every set instead) (``none``: no smoothing;
a number: :class:`~nanoscout.analysis.modelcard.Denoise` with that target and the default
``max_px``), scored as the accuracy harness scores (IoU >= 0.5; box IoU for STEM boxes), and its
measured noise (:func:`~nanoscout.analysis.denoise.noise_sigma`) is recorded.

Sets: any set of ``nanoscout.training.evaluate`` (held-out ones only when named) and
``stem-train`` (the STEM training materials Cu, Pt and PtW, which the STEM detector was
trained on; the smoothing was never tuned on them). The default sets are tuning sets:
``emps-tune``, ``msa-tune``, ``stem-train`` and ``synthetic-tune``.
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

import numpy as np

TUNING_SETS = ("emps-tune", "msa-tune", "stem-train", "synthetic-tune")
HELDOUT_SETS = ("emps", "msa", "nffa", "stem", "synthetic")
#: sets of HAADF-STEM images, analysed by the STEM detector
STEM_SETS = ("stem", "stem-train", "stem-tune")
DEFAULT_DOSES = (0.0, 100.0, 30.0, 10.0)
DEFAULT_TARGETS = ("none", "0.05")


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that score the shipped detectors set by set: ``--threads``,
    ``--model`` and ``--max-images``."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None,
                    help="score this ONNX file (its card beside it) instead of the shipped "
                         "detector of each set")
    ap.add_argument("--max-images", type=int, default=None,
                    help="at most this many images per set (default: all)")


def run_header(module: str, given: list[str], threads: int, sets: list[str]) -> dict[str, Any]:
    """The first keys of such a benchmark's JSON: the command (``python -m benchmarks.MODULE``
    and ``given``), the machine, and which of ``sets`` are tuning and which held-out sets."""
    return {"command": " ".join([f"python -m benchmarks.{module}", *given]),
            "machine": f"{platform.machine()} CPU, ONNX Runtime {threads} intra-op threads",
            "tuning_sets": [s for s in sets if s.split(":")[0] not in HELDOUT_SETS],
            "heldout_sets": [s for s in sets if s.split(":")[0] in HELDOUT_SETS]}


def check_model(model: Path | None) -> None:
    """Refuse (SystemExit) a ``--model`` without its model card beside it."""
    if model is not None and not model.with_suffix(".json").is_file():
        raise SystemExit(f"--model {model}: no model card {model.with_suffix('.json')}")


def _samples(name: str, max_images: int | None = None) -> Iterator[Any]:
    from nanoscout.training import realdata
    from nanoscout.training.evaluate import set_samples

    if name == "stem-train":
        for n in list(realdata.load_split("stem")["train"])[:max_images]:
            yield realdata.load_stem(str(n))
    else:
        yield from set_samples(name, max_images=max_images)


def _target(text: str) -> float | None:
    if text == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < 1:
        raise SystemExit(f"--targets: {text!r} is neither 'none' nor a noise in (0, 1)")
    return v


def run_set(name: str, doses: tuple[float, ...], targets: tuple[str, ...],
            threads: int, max_images: int | None = None, model: Path | None = None
            ) -> dict[str, Any]:
    """Score set ``name``'s shipped detector (or ``model``, its card beside it) at each dose
    and smoothing target (at most ``max_images`` of its images; None: all)."""
    from nanoscout.analysis.denoise import noise_sigma
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import Denoise, ModelCard, shipped_model_dir
    from nanoscout.analysis.preprocess import normalize
    from nanoscout.engines import create_engine
    from nanoscout.training.crops import low_dose
    from nanoscout.training.evaluate import score_image, summarize

    if model is None:
        model = shipped_model_dir() / ("detector_stem.onnx" if name.split(":")[0] in STEM_SETS
                                       else "detector.onnx")
    card = ModelCard.load(model.with_suffix(".json"))
    engine = create_engine(model, "onnxruntime-cpu", threads=threads)
    detectors = {}
    for t in targets:
        v = _target(t)
        norm = card.normalization.model_copy(
            update={"denoise": None if v is None else Denoise(target=v)})
        detectors[t] = Detector(engine, card.model_copy(update={"normalization": norm}))
    samples = list(_samples(name, max_images))
    out: dict[str, Any] = {"model": f"{card.name}:{card.version}", "file": str(model),
                           "n_images": len(samples),
                           "doses": {}}
    try:
        for dose in doses:
            raw: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
            smoothed = {t: 0 for t in targets}
            noise = []
            for i, s in enumerate(samples):
                img = np.asarray(s.image, np.float32)
                if img.ndim == 3:
                    img = img.mean(axis=-1)
                im = low_dose(img, dose, np.random.default_rng([i, round(dose * 10)]))
                noise.append(round(noise_sigma(normalize(im)), 4))
                for t, det in detectors.items():
                    found = det.detect(im)
                    smoothed[t] += found.smoothing_px > 0
                    raw[t].append(score_image(found.labels, true_labels=s.labels,
                                              true_boxes=s.boxes))
            row: dict[str, Any] = {"noise": noise}
            for t in targets:
                sm = summarize(raw[t])
                row[t] = {"f1": sm["f1"], "precision": sm["precision"], "recall": sm["recall"],
                          "smoothed_frames": smoothed[t]}
            out["doses"][f"{dose:g}"] = row
            print(name, f"dose {dose:g}", json.dumps({t: round(row[t]["f1"], 4) for t in targets}),
                  flush=True)
    finally:
        engine.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: run the listed sets and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noise_stress.json"))
    ap.add_argument("--sets", default=",".join(TUNING_SETS),
                    help="comma-separated sets of nanoscout.training.evaluate, or stem-train")
    ap.add_argument("--doses", default=",".join(f"{d:g}" for d in DEFAULT_DOSES),
                    help="comma-separated counts of the brightest pixels (0: as it is)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help="comma-separated smoothing targets: 'none' or a noise in (0, 1)")
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    try:
        doses = tuple(float(d) for d in args.doses.split(",") if d)
    except ValueError as exc:
        raise SystemExit(f"--doses {args.doses!r}: {exc}") from exc
    if not doses or any(not d >= 0 for d in doses):
        raise SystemExit(f"--doses {args.doses!r}: counts >= 0, at least one")
    targets = tuple(t for t in args.targets.split(",") if t)
    for t in targets:
        _target(t)
    if not targets or not sets:
        raise SystemExit("name at least one set and one target")
    check_model(args.model)
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {
        **run_header("noise_stress", given, args.threads, sets),
        "noise_model": "Poisson draw of dose * (0.05 + x) counts per px, x the image scaled to "
                       "[0, 1] by its 0.5 / 99.5 percentiles; dose 0: the image as it is",
        "max_images": args.max_images,
        "sets": {s: run_set(s, doses, targets, args.threads, args.max_images, args.model)
                 for s in sets},
        "seconds": 0.0}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
