"""Fit a detector's score calibration on tuning data and write it into its model card.

::

    nanoscout models calibrate --model models/weights/detector.onnx --sets emps-tune,synthetic-tune

runs the detector on the named *tuning* sets with no score cut, pairs every predicted particle's
raw score with whether it matched a true particle (IoU >= 0.5,
:func:`nanoscout.training.evaluate.score_image`), fits the probability of a match as a
non-decreasing function of the score (isotonic regression, pool-adjacent-violators,
:func:`isotonic`) and stores it as knots in the card's ``score_calibration``
(:class:`nanoscout.analysis.modelcard.ScoreCalibration`). The detector then reports that
probability as each particle's score; the score cut stays on the raw score. Held-out sets
are refused: calibration is a tuning step, and its quality (expected calibration error) is
measured afterwards by the harness on held-out data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TUNING_SETS", "fit_calibration", "isotonic", "knots"]

TUNING_SETS = ("emps-tune", "stem-tune", "synthetic-tune")


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (x sorted, fitted y): the non-decreasing least-squares fit of ``y`` on ``x``
    (pool adjacent violators; ties in x pooled first)."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    # blocks: value, weight, count of points
    vals: list[float] = []
    wts: list[float] = []
    cnt: list[int] = []
    for v in ys:
        vals.append(float(v))
        wts.append(1.0)
        cnt.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            wts[-2] = w
            cnt[-2] += cnt[-1]
            vals.pop()
            wts.pop()
            cnt.pop()
    fit = np.repeat(vals, cnt)
    return xs, fit


def knots(xs: np.ndarray, fit: np.ndarray, max_knots: int = 24) -> tuple[list[float], list[float]]:
    """Return at most ``max_knots`` (score, probability) knots of an isotonic fit, spanning
    [0, 1] in score: the centre of each constant block of the fit, thinned evenly."""
    if xs.size == 0:
        return [0.0, 1.0], [0.0, 1.0]
    edges = np.flatnonzero(np.diff(fit) != 0) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [fit.size]])
    kx = [(float(xs[a]) + float(xs[b - 1])) / 2.0 for a, b in zip(starts, ends, strict=True)]
    ky = [float(fit[a]) for a in starts]
    if len(kx) > max_knots:
        idx = np.unique(np.linspace(0, len(kx) - 1, max_knots).round().astype(int))
        kx, ky = [kx[i] for i in idx], [ky[i] for i in idx]
    # the ends: hold the first and last probability out to scores 0 and 1
    if kx[0] > 0.0:
        kx, ky = [0.0, *kx], [ky[0], *ky]
    if kx[-1] < 1.0:
        kx, ky = [*kx, 1.0], [*ky, ky[-1]]
    # strictly increasing scores (centres of neighbouring blocks can coincide when rounded)
    out_x, out_y = [kx[0]], [ky[0]]
    for a, b in zip(kx[1:], ky[1:], strict=True):
        if a > out_x[-1] + 1e-6:
            out_x.append(round(a, 5))
            out_y.append(round(max(b, out_y[-1]), 5))
    return out_x, out_y


def fit_calibration(model: Path, sets: list[str], stem_model: Path | None = None,
                    max_images: int | None = None, threads: int = 2) -> dict[str, Any]:
    """Return {"scores", "probabilities", "data", "n", "ece_raw_in_sample",
    "ece_calibrated_in_sample"} for ``model`` from the tuning ``sets``."""
    from nanoscout.analysis.detector import Detector, base_detector_for
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import Engine, create_engine
    from nanoscout.training import realdata
    from nanoscout.training.evaluate import calibration_error, score_image, tuning_samples

    bad = [s for s in sets if s not in TUNING_SETS]
    if bad:
        raise SystemExit(f"calibration fits on tuning sets only ({', '.join(TUNING_SETS)}), "
                         f"not {bad}")
    pairs: list[list[float]] = []
    for s in sets:
        path = stem_model if (s == "stem-tune" and stem_model is not None) else model
        card = ModelCard.load(path.with_suffix(".json"))
        card = card.model_copy(update={"score_calibration": None})

        def engine(p: Path) -> Engine:
            return create_engine(p, "onnxruntime-cpu", threads=threads)

        det = Detector(engine(path), card, min_score=0.0,
                       base_detector=base_detector_for(card, path.with_suffix(".json"), engine))
        samples = (tuning_samples(max_images or 60) if s == "synthetic-tune"
                   else realdata.iter_samples(s, None, max_images))
        for smp in samples:
            found = det.detect(smp.image)
            r = score_image(found.labels, true_labels=smp.labels, true_boxes=smp.boxes,
                            pred_scores=found.scores)
            pairs.extend(r["score_hits"])
    a = np.asarray(pairs, np.float64).reshape(-1, 2)
    xs, fit = isotonic(a[:, 0], a[:, 1])
    kx, ky = knots(xs, fit)
    cal = np.interp(a[:, 0], kx, ky)
    return {"scores": kx, "probabilities": ky,
            "data": f"isotonic fit on {len(a)} detections (no score cut) of the tuning sets "
                    f"{', '.join(sets)}",
            "n": int(len(a)),
            "ece_raw_in_sample": calibration_error(a.tolist())["ece"],
            "ece_calibrated_in_sample": calibration_error(
                np.stack([cal, a[:, 1]], 1).tolist())["ece"]}


def main(argv: list[str] | None = None) -> None:
    """Command line: fit and write the score calibration of one detector card."""
    ap = argparse.ArgumentParser(description="fit a detector's score calibration")
    ap.add_argument("--model", type=Path, default=Path("models/weights/detector.onnx"))
    ap.add_argument("--sets", default="emps-tune,synthetic-tune")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--dry-run", action="store_true", help="print, do not write the card")
    args = ap.parse_args(argv)
    from nanoscout.analysis.modelcard import ModelCard, ScoreCalibration

    res = fit_calibration(args.model, [s for s in args.sets.split(",") if s],
                          max_images=args.max_images, threads=args.threads)
    print(json.dumps(res, indent=1))
    if args.dry_run:
        return
    card_path = args.model.with_suffix(".json")
    card = ModelCard.load(card_path)
    cal = ScoreCalibration(scores=tuple(res["scores"]), probabilities=tuple(res["probabilities"]),
                           data=res["data"])
    card.model_copy(update={"score_calibration": cal}).dump(card_path)
    print(f"wrote score_calibration into {card_path}")


if __name__ == "__main__":
    main()
