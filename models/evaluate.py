"""Held-out evaluation of the detector on synthetic frames with exact ground truth.

::

    python -m models.evaluate --model models/weights/detector.onnx --n 20 --seed 12345

Frame ``i`` is rendered from seed ``seed + i``; the held-out stream mimics the simulator's
default (TEM / STEM / SEM in turn, 512x512 and 1024x1024 alternating, 0.5 nm/px, median ECD
8 nm = 16 px, sigma_log 0.3, coverage 0.1-0.25, 30-50 % agglomerated, 100-500 e/px). Training
used seeds 1_000_000 + k (``models.train``), so evaluation seeds must stay below 1_000_000.

Matching: a predicted and a true particle match when their IoU >= 0.5 (one-to-one by
construction). True particles smaller than ``min_true_area_px`` (sub-resolution specks and
slivers cut by the frame edge) are not required: missing them is no error, and a prediction
matched to one is not counted. ECD errors are over matched particles not touching the frame
edge, relative to the true ECD of the visible shape.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.synthetic import Specimen, SpecimenConfig

__all__ = ["HELDOUT_SEED_LIMIT", "MATCH_DTYPE", "evaluate", "heldout_config", "match_instances",
           "time_detector"]

HELDOUT_SEED_LIMIT = 1_000_000
MATCH_DTYPE = np.dtype([("pred", "<i4"), ("true", "<i4"), ("iou", "<f4")])
_MODALITIES = ("TEM", "STEM", "SEM")


def match_instances(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.5
                    ) -> tuple[np.ndarray, int, int]:
    """Return (pairs, n_pred, n_true): instances matched at IoU >= ``iou``.

    ``pairs`` is a MATCH_DTYPE array (pred id, true id, IoU); ``n_pred`` / ``n_true`` count the
    distinct non-zero labels. For ``iou`` >= 0.5 a particle has at most one partner.
    """
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label maps differ in shape: {pred_labels.shape} vs {true_labels.shape}")
    p = pred_labels.ravel().astype(np.int64)
    t = true_labels.ravel().astype(np.int64)
    pid, parea = np.unique(p[p > 0], return_counts=True)
    tid, tarea = np.unique(t[t > 0], return_counts=True)
    both = (p > 0) & (t > 0)
    empty = np.zeros(0, MATCH_DTYPE)
    if not both.any():
        return empty, int(pid.size), int(tid.size)
    base = int(t.max()) + 1
    keys, inter = np.unique(p[both] * base + t[both], return_counts=True)
    kp, kt = keys // base, keys % base
    ap = parea[np.searchsorted(pid, kp)]
    at = tarea[np.searchsorted(tid, kt)]
    ious = inter / (ap + at - inter)
    ok = ious >= iou
    if iou < 0.5:  # several candidates possible: keep the best per prediction and per truth
        order = np.argsort(-ious[ok])
        sel_p, sel_t, keep = set(), set(), []
        for k in np.nonzero(ok)[0][order]:
            if kp[k] in sel_p or kt[k] in sel_t:
                continue
            sel_p.add(kp[k])
            sel_t.add(kt[k])
            keep.append(k)
        ok = np.zeros_like(ok)
        ok[keep] = True
    pairs = np.zeros(int(ok.sum()), MATCH_DTYPE)
    pairs["pred"], pairs["true"], pairs["iou"] = kp[ok], kt[ok], ious[ok]
    return pairs, int(pid.size), int(tid.size)


def heldout_config(i: int, seed: int) -> SpecimenConfig:
    """Return the configuration of held-out frame ``i`` (deterministic in i and seed)."""
    rng = np.random.default_rng([seed, i, 7])
    size = 512 if i % 2 == 0 else 1024
    return SpecimenConfig(
        modality=_MODALITIES[i % 3],  # type: ignore[arg-type]
        shape=(size, size),
        pixel_size_nm=0.5,
        median_diameter_nm=8.0,
        sigma_log=0.3,
        coverage=float(rng.uniform(0.1, 0.25)),
        agglomerate_fraction=float(rng.uniform(0.3, 0.5)),
        dose_e_per_px=float(rng.uniform(100.0, 500.0)),
        blur_px=float(rng.uniform(0.6, 1.2)),
        illumination_gradient=float(rng.uniform(0.0, 0.2)),
        support_texture=float(rng.uniform(0.03, 0.08)),
        contrast=float(rng.uniform(0.35, 0.6)),
        dtype="uint16" if i % 4 < 2 else "uint8",
    )


def _ecd_px(labels: np.ndarray) -> np.ndarray:
    area = np.bincount(labels.ravel())
    return 2.0 * np.sqrt(area / np.pi)


def evaluate(detector: Any, n: int = 20, seed: int = 12345, iou: float = 0.5,
             min_true_area_px: int = 12) -> dict[str, Any]:
    """Return held-out metrics of ``detector`` (has ``detect(image) -> Detection``) on n frames.

    Keys: precision, recall, f1, median_abs_ecd_error_pct, ecd_mae_nm, counts and per-modality
    breakdown; ECD in nm, errors in percent.
    """
    if seed < 0 or seed + n > HELDOUT_SEED_LIMIT:
        raise ValueError(f"held-out seeds {seed}..{seed + n - 1} overlap the training seeds "
                         f"(>= {HELDOUT_SEED_LIMIT})")
    per_mod: dict[str, dict[str, Any]] = {m: {"tp": 0, "fp": 0, "fn": 0, "err": [], "abs_nm": []}
                                          for m in _MODALITIES}
    frames = []
    for i in range(n):
        cfg = heldout_config(i, seed)
        rng = np.random.default_rng(seed + i)
        fr = Specimen.generate(cfg, rng).acquire(rng)
        det = detector.detect(fr.image)
        pairs, _, _ = match_instances(det.labels, fr.labels, iou)
        truth = fr.truth
        t_small = set(truth["id"][truth["area_px"] < min_true_area_px].tolist())
        t_req = set(truth["id"].tolist()) - t_small
        pred_ids = set(np.unique(det.labels[det.labels > 0]).tolist())
        matched_p = {int(a): int(b) for a, b in zip(pairs["pred"], pairs["true"], strict=True)}
        tp = sum(1 for b in matched_p.values() if b in t_req)
        fp = sum(1 for a in pred_ids if a not in matched_p)
        fn = len(t_req) - tp
        by_id = {int(r["id"]): r for r in truth}
        pecd = _ecd_px(det.labels) * cfg.pixel_size_nm
        m = per_mod[cfg.modality]
        for a, b in matched_p.items():
            r = by_id[b]
            if b in t_small or r["border"]:
                continue
            e = float(pecd[a]) - float(r["ecd_nm"])
            m["err"].append(100.0 * e / float(r["ecd_nm"]))
            m["abs_nm"].append(abs(e))
        m["tp"] += tp
        m["fp"] += fp
        m["fn"] += fn
        frames.append({"i": i, "seed": seed + i, "modality": cfg.modality, "shape": cfg.shape,
                       "dtype": cfg.dtype, "n_true": len(t_req), "tp": tp, "fp": fp, "fn": fn,
                       "timings_ms": det.timings_ms})

    def summary(tp: int, fp: int, fn: int, err: list[float], abs_nm: list[float]
                ) -> dict[str, Any]:
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        e = np.asarray(err)
        return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
                "tp": tp, "fp": fp, "fn": fn,
                "median_abs_ecd_error_pct": round(float(np.median(np.abs(e))), 3) if e.size
                else None,
                "median_ecd_bias_pct": round(float(np.median(e)), 3) if e.size else None,
                "ecd_mae_nm": round(float(np.mean(abs_nm)), 4) if abs_nm else None}

    tot = {k: sum(per_mod[m][k] for m in _MODALITIES) for k in ("tp", "fp", "fn")}
    all_err = [x for m in _MODALITIES for x in per_mod[m]["err"]]
    all_abs = [x for m in _MODALITIES for x in per_mod[m]["abs_nm"]]
    out = summary(tot["tp"], tot["fp"], tot["fn"], all_err, all_abs)
    out["per_modality"] = {m: summary(v["tp"], v["fp"], v["fn"], v["err"], v["abs_nm"])
                           for m, v in per_mod.items() if v["tp"] + v["fn"] + v["fp"]}
    out["n_frames"] = n
    out["seeds"] = f"{seed}..{seed + n - 1}"
    out["iou_threshold"] = iou
    out["min_true_area_px"] = min_true_area_px
    out["frames"] = frames
    return out


def time_detector(detector: Any, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 11,
                  seed: int = 999_000) -> dict[str, dict[str, float]]:
    """Return per-stage times (ms) of ``detector.detect`` on held-out TEM frames per size.

    Each entry holds the median over ``repeats`` runs per stage (``preprocess``, ``engine``,
    ``postprocess``, ``total``), the minimum of ``total`` and the particle count. Besides the
    default coverage (15 %, ~700 particles at 1024x1024) a sparser 1024x1024 frame with ~300
    particles is timed (key ``1024x1024_300``).
    """
    cases = [(f"{n}x{n}", n, 0.15) for n in sizes]
    if 1024 in sizes:
        cases.append(("1024x1024_300", 1024, 0.065))
    out: dict[str, dict[str, float]] = {}
    for key, size, coverage in cases:
        cfg = SpecimenConfig(shape=(size, size), coverage=coverage)
        fr = Specimen.generate(cfg, seed + size).acquire(np.random.default_rng(seed))
        detector.detect(fr.image)  # warm-up: allocations, thread pool
        runs = []
        for _ in range(repeats if size <= 1024 else max(3, repeats // 2)):
            t0 = time.perf_counter()
            det = detector.detect(fr.image)
            det.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
            runs.append(det.timings_ms)
        out[key] = {k: round(float(np.median([r[k] for r in runs])), 2) for k in runs[0]}
        out[key]["total_min"] = round(min(r["total"] for r in runs), 2)
        out[key]["n_particles"] = int(det.labels.max())
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: evaluate an ONNX detector on held-out frames and print/write JSON."""
    ap = argparse.ArgumentParser(description="held-out evaluation of the particle detector")
    ap.add_argument("--model", type=Path, default=Path("models/weights/detector.onnx"))
    ap.add_argument("--card", type=Path, default=None, help="default: model path with .json")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/eval.json"))
    args = ap.parse_args(argv)
    from service.detector import Detector
    from service.engines import create_engine
    from service.modelcard import ModelCard

    card = ModelCard.load(args.card or args.model.with_suffix(".json"))
    engine = create_engine(args.model, "onnxruntime-cpu", threads=args.threads)
    det = Detector(engine, card, scale=args.scale)
    t0 = time.perf_counter()
    res = evaluate(det, args.n, args.seed)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_timing:
        res["timings_ms"] = time_detector(det)
    res["model"] = str(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    brief = {k: v for k, v in res.items() if k != "frames"}
    print(json.dumps(brief, indent=1))
    if not math.isfinite(res["f1"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
