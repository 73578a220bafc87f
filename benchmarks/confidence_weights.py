"""Does weighting the size statistics by particle confidence bring the D50 closer to the truth?

::

    python -m benchmarks.confidence_weights --out benchmarks/results/confidence_weights.json

Runs the shipped detectors as the accuracy harness does (``nanoscout.training.evaluate``:
the card's settings, automatic working scale, the STEM detector on the STEM set) on every
image of the **tuning** sets ``emps-tune`` and ``synthetic-tune`` and of the held-out sets
(``synthetic``, ``emps``, ``nffa``, ``msa``, ``stem``), feeds each image's particle table to
:class:`~nanoscout.analysis.stats.SizeStatistics` twice, with ``weights = "none"`` and
``"confidence"`` (``include_border``, as the harness counts every particle), and compares each
window D50 (px) with the true D50 of the image (the median ECD of the true particles of at
least 12 px, the harness's ``d50_true_px``; box truth: sqrt(w h)). It reports per set the
median over images of |D50 error| in % (the harness's ``d50_error_pct``), and the count
error: |count - true count| / true count for the number of detections and for the expected
count (the sum of the confidences).

The default of ``[stats] weights`` is **chosen on the tuning sets only** (``choice``: the
weighting with the lower mean of the two tuning sets' median D50 errors); the held-out sets
are reported as the result of that choice, never used to make it. A detector without a
score calibration (the STEM one) weighs every particle 1: both columns are the same there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TUNING = ("emps-tune", "synthetic-tune")
HELD_OUT = ("synthetic", "emps", "nffa", "msa", "stem")
WEIGHTS = ("none", "confidence")


def _true_d50_and_count(sample: Any, min_area_px: int = 12) -> tuple[float | None, int]:
    """The image's true D50 (px) and number of required true particles."""
    from nanoscout.analysis.measure import measure

    if sample.labels is not None:
        ecd = measure(sample.labels, None)["ecd_nm"].astype(np.float64)
        ecd = ecd[(ecd / 2) ** 2 * np.pi >= min_area_px - 1e-6]
    else:
        b = np.asarray(sample.boxes, np.float64).reshape(-1, 4)
        ecd = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return (float(np.median(ecd)) if ecd.size else None), int(ecd.size)


def _window(table: np.ndarray, weights: str, calibrated: bool) -> tuple[float | None, float]:
    """(window D50, expected count) of one image's table through SizeStatistics."""
    from nanoscout.analysis.stats import SizeStatistics, StatsConfig

    st = SizeStatistics(StatsConfig(include_border=True, weights=weights))  # type: ignore[arg-type]
    st.update(table, t_ns=0, frame_area_um2=None, confidence=calibrated)
    w = st.snapshot()["window"]
    return w["ecd"]["d50"], float(w["expected_count"])


def run_set(name: str, detector: Any, box_truth_ecd: bool = False,
            max_images: int | None = None) -> dict[str, Any]:
    """Per-set D50 and count errors of the unweighted and the confidence-weighted statistics."""
    from nanoscout.analysis.measure import measure
    from nanoscout.training import realdata
    from nanoscout.training.evaluate import synthetic_samples, tuning_samples

    samples = (synthetic_samples(20, 12345) if name == "synthetic"
               else tuning_samples(max_images or 60) if name == "synthetic-tune"
               else realdata.iter_samples(name, None, max_images))
    d50_err: dict[str, list[float]] = {w: [] for w in WEIGHTS}
    count_err: dict[str, list[float]] = {w: [] for w in WEIGHTS}
    better = 0
    n_images = 0
    calibrated = False
    for s in samples:
        truth, n_true = _true_d50_and_count(s)
        if truth is None:
            continue
        found = detector.detect(s.image)
        calibrated = bool(found.calibrated)
        table = measure(found.labels, None, found.scores)
        if s.boxes is not None:  # box truth: the harness's ECD of a box, sqrt(w h)
            bb = table["bbox"].astype(np.float64)
            table["ecd_nm"] = np.sqrt((bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1]))
        errs = {}
        for w in WEIGHTS:
            d50, expected = _window(table, w, calibrated)
            errs[w] = 100.0 if d50 is None else 100.0 * abs(d50 - truth) / truth
            d50_err[w].append(errs[w])
            count_err[w].append(100.0 * abs(expected - n_true) / max(n_true, 1))
        better += errs["confidence"] < errs["none"]
        n_images += 1
    out: dict[str, Any] = {"n_images": n_images, "calibrated": calibrated,
                           "images_where_weighting_is_closer": better}
    for w in WEIGHTS:
        out[w] = {"d50_error_pct_median": round(float(np.median(d50_err[w])), 2),
                  "d50_error_pct_mean": round(float(np.mean(d50_err[w])), 2),
                  "count_error_pct_median": round(float(np.median(count_err[w])), 2)}
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: measure both weightings on the tuning and held-out sets, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/confidence_weights.json"))
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-images", type=int, default=None, help="per real set (all: None)")
    ap.add_argument("--sets", default=",".join(TUNING + HELD_OUT))
    args = ap.parse_args(argv)
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
    from nanoscout.engines import create_engine
    from nanoscout.training import realdata

    weights = shipped_model_dir()

    def load(onnx: str) -> Detector:
        path = weights / onnx
        return Detector(create_engine(path, "onnxruntime-cpu", threads=args.threads),
                        ModelCard.load(path.with_suffix(".json")))

    general, stem = load("detector.onnx"), load("detector_stem.onnx")
    avail = {"synthetic", "synthetic-tune", *realdata.available_sets(None)}
    if "emps" in avail:
        avail.add("emps-tune")
    res: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.confidence_weights", *sys.argv[1:]]),
        "model": f"{general.card.name}:{general.card.version}",
        "stem_model": f"{stem.card.name}:{stem.card.version}",
        "tuning_sets": list(TUNING), "held_out_sets": list(HELD_OUT), "sets": {}}
    for name in [s for s in args.sets.split(",") if s]:
        if name not in avail:
            res["sets"][name] = {"skipped": "not available"}
            continue
        t0 = time.perf_counter()
        det = stem if name in ("stem", "stem-tune") else general
        res["sets"][name] = run_set(name, det, max_images=args.max_images)
        res["sets"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(res["sets"][name]), flush=True)
    tuned = [res["sets"][s] for s in TUNING if "none" in res["sets"].get(s, {})]
    if len(tuned) == len(TUNING):
        score = {w: float(np.mean([r[w]["d50_error_pct_median"] for r in tuned]))
                 for w in WEIGHTS}
        res["choice"] = {"weights": min(WEIGHTS, key=lambda w: (score[w], w != "none")),
                         "mean_tuning_d50_error_pct": score,
                         "rule": "the lower mean over the tuning sets of the median |D50 "
                                 "error|; a tie keeps 'none'"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
