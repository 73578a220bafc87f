"""Held-out evaluation of the detector on synthetic frames with exact ground truth.

::

    python -m nanoscout.training.evaluate --model models/weights/detector.onnx --n 20 --seed 12345

Frame ``i`` is rendered from seed ``seed + i``; the held-out stream mimics the simulator's
default (TEM / STEM / SEM in turn, 512x512 and 1024x1024 alternating, 0.5 nm/px, median ECD
8 nm = 16 px, sigma_log 0.3, coverage 0.1-0.25, 30-50 % agglomerated, 100-500 e/px). Training
used seeds 1_000_000 + k (``nanoscout.training.train``), so evaluation seeds must stay below 1_000_000.

Matching: a predicted and a true particle match when their IoU >= 0.5 (one-to-one by
construction). True particles smaller than ``min_true_area_px`` (sub-resolution specks and
slivers cut by the frame edge) are not required: missing them is no error, and a prediction
matched to one is not counted. ECD errors are over matched particles not touching the frame
edge, relative to the true ECD of the visible shape.

Real data and a classical baseline (:func:`run_harness`, ``--sets``)
-------------------------------------------------------------------

::

    python -m nanoscout.training.evaluate --sets synthetic,emps,stem,nffa,msa --out runs/accuracy.json

scores the model *and* the classical baseline (:mod:`nanoscout.training.baseline`, Otsu + distance-transform
watershed) on the held-out synthetic frames and on the validation part of each real set
(:mod:`nanoscout.training.realdata`; splits in ``models/splits``); ``--sets all`` = every available held-out
set. Two *tuning* sets, for choosing post-processing settings and never reported as held-out
results, run only when named: ``emps-tune`` (EMPS training papers left out of training),
``stem-tune`` (the STEM tuning material, :func:`nanoscout.training.realdata.stem_tuning_names`, left out of
training only in tuning experiments; ``stem-tune:Cu`` another training material, for a recipe
trained with ``--stem-holdout Cu``), ``synthetic-tune`` (:func:`tuning_config`: 60 frames,
particles 4-200 px) and two synthetic SEM sets of failure modes seen on real SEM frames:
``granular-tune`` (:func:`granular_config`: particles on a packed granular film) and
``agglomerate-tune`` (:func:`agglomerate_samples`: piles of faceted particles,
:mod:`nanoscout.sim.sem_render`).
Without ``--sets`` the command does the synthetic-only evaluation above (what
``nanoscout.training.export`` records in the model card).

Per set and method: precision, recall and F1 at IoU >= 0.5 (mask IoU where instance maps exist,
box IoU where the truth is boxes only: STEM), the median |ECD error| of matched particles (% of
the true ECD; also nm where the set is calibrated), the per-image D50 error (median over images
of |D50_pred - D50_true| / D50_true, D50 = median particle ECD of the image; an image without
any prediction counts as 100 %), and the RMSE of aspect ratio and roundness of matched
particles. Predicted and true instance maps are both measured with :func:`nanoscout.analysis.measure.measure`
so the conventions agree; for boxes, ECD = sqrt(w * h) (the inscribed ellipse) and aspect ratio
= long side / short side on both sides, roundness is not defined. True particles smaller than
``min_true_area_px`` are not required (as above); border particles are included here.

Confidence: ``calibration`` per set and method (:func:`calibration_error`) is the expected
calibration error of the reported particle scores taken as probabilities of being a true
particle (10 equal-width and 10 equal-count score bins). The ``emps`` set is also summarised
without :data:`EMPS_SPECKS_IMAGE` (``without``); neither number is tuned to.

Uncertainty: each method's ``f1_ci95`` (and ``precision_ci95``, ``recall_ci95``) is the 95 %
bootstrap interval of the pooled number over the set's resampling unit ``ci_unit`` (images, or
EMPS papers), :mod:`nanoscout.training.intervals`; ``python -m nanoscout.training.compare A.json
B.json`` gives the paired difference of two results on the same images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.clients.progress import track
from nanoscout.sim.synthetic import KINDS, Specimen, SpecimenConfig, render
from nanoscout.training.intervals import CI_METHOD, LEVEL, N_RESAMPLES, SEED, add_intervals

__all__ = ["AGGLOMERATE_SEED_BASE", "ALL_SETS", "EMPS_SPECKS_IMAGE", "GRANULAR_SEED_BASE",
           "HELDOUT_SEED_LIMIT", "MATCH_DTYPE", "SET_NOTES", "SYNTHETIC_SETS", "TARGETS",
           "TUNING_SEED_BASE", "OracleScale", "SizeHinted", "agglomerate_samples", "box_iou",
           "boxes_of_labels", "calibration_error", "check_targets", "evaluate", "evaluate_set",
           "format_table", "granular_config", "granular_samples", "heldout_config", "match_boxes",
           "int8_model", "match_instances", "run_harness", "set_samples",
           "score_image", "summarize", "synthetic_samples", "time_detector", "true_median_px",
           "tuning_config", "tuning_samples"]

ALL_SETS = ("synthetic", "emps", "stem", "nffa", "msa", "emps-tune", "stem-tune",
            "synthetic-tune", "msa-tune", "granular-tune", "agglomerate-tune")
#: the synthetic sets: generated here, always available, never routed by modality
SYNTHETIC_SETS = ("synthetic", "synthetic-tune", "granular-tune", "agglomerate-tune")

HELDOUT_SEED_LIMIT = 1_000_000
#: seeds of the synthetic *tuning* frames (:func:`tuning_config`): below the training seeds and
#: far from the held-out ones (12345 + i)
TUNING_SEED_BASE = 500_000
#: seed sequences ([base, i]) of the synthetic SEM tuning sets, apart from every training seed
GRANULAR_SEED_BASE = 777_000
AGGLOMERATE_SEED_BASE = 888_000
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


# ------------------------------------------------------------------ real-data harness


def boxes_of_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids, boxes) of the instances of ``labels``: boxes (N, 4) float64 x0, y0, x1, y1.

    Box coordinates are pixel edges in px (a pixel c spans [c, c + 1]), as YOLO boxes are.
    """
    from nanoscout.analysis.measure import measure

    t = measure(labels, None)
    return t["id"].astype(np.int64), t["bbox"].astype(np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the (N, M) IoU matrix of boxes ``a`` (N, 4) and ``b`` (M, 4), x0, y0, x1, y1."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(pred: np.ndarray, true: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Return MATCH_DTYPE pairs (pred index, true index, IoU) matched one-to-one at >= ``iou``.

    Greedy by decreasing IoU (two boxes can both overlap one box by more than half).
    """
    m = box_iou(pred, true)
    cand = np.argwhere(m >= iou)
    order = np.argsort(-m[cand[:, 0], cand[:, 1]], kind="stable")
    used_p: set[int] = set()
    used_t: set[int] = set()
    keep = []
    for i, j in cand[order]:
        if i in used_p or j in used_t:
            continue
        used_p.add(int(i))
        used_t.add(int(j))
        keep.append((int(i), int(j), float(m[i, j])))
    out = np.zeros(len(keep), MATCH_DTYPE)
    for k, row in enumerate(keep):
        out[k] = row
    return out


def score_image(pred_labels: np.ndarray, *, true_labels: np.ndarray | None = None,
                true_boxes: np.ndarray | None = None, pixel_size_nm: float | None = None,
                iou: float = 0.5, min_true_area_px: int = 12,
                pred_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Return the raw per-image scores of one prediction against mask or box truth.

    ``pred_scores`` (indexed by predicted label, as ``Detection.scores``) adds ``score_hits``:
    [score, 1 if the particle matched a required true particle else 0] per predicted particle
    (those matched to a not-required tiny one left out), for confidence calibration.

    Keys: tp, fp, fn, n_pred, n_true; ecd_err_pct (matched, % of true ECD), ecd_err_nm (only
    when calibrated), d50_pred_px / d50_true_px (median ECD of all predicted / required true
    particles, px; None when there are none), ar_pairs and roundness_pairs ([pred, true] per
    match; roundness empty for box truth).
    """
    from nanoscout.analysis.measure import measure

    if (true_labels is None) == (true_boxes is None):
        raise ValueError("give exactly one of true_labels and true_boxes")
    pt = measure(pred_labels, None)
    p_rd: np.ndarray | None
    t_rd: np.ndarray | None
    if true_labels is not None:
        tt = measure(true_labels, None)
        area_t = (tt["ecd_nm"].astype(np.float64) / 2) ** 2 * np.pi
        req = area_t >= min_true_area_px - 1e-6
        pairs, _, _ = match_instances(pred_labels, true_labels, iou)
        prow = {int(k): r for r, k in enumerate(pt["id"])}
        trow = {int(k): r for r, k in enumerate(tt["id"])}
        mp = np.array([prow[int(a)] for a in pairs["pred"]], np.int64)
        mt = np.array([trow[int(b)] for b in pairs["true"]], np.int64)
        p_ecd, t_ecd = pt["ecd_nm"].astype(np.float64), tt["ecd_nm"].astype(np.float64)
        p_ar, t_ar = pt["aspect_ratio"].astype(np.float64), tt["aspect_ratio"].astype(np.float64)
        p_rd, t_rd = pt["roundness"].astype(np.float64), tt["roundness"].astype(np.float64)
    else:
        assert true_boxes is not None
        tb = np.asarray(true_boxes, np.float64).reshape(-1, 4)
        pb = pt["bbox"].astype(np.float64)
        tw, th = tb[:, 2] - tb[:, 0], tb[:, 3] - tb[:, 1]
        pw, ph = pb[:, 2] - pb[:, 0], pb[:, 3] - pb[:, 1]
        req = np.ones(len(tb), bool)
        pairs = match_boxes(pb, tb, iou)
        mp, mt = pairs["pred"].astype(np.int64), pairs["true"].astype(np.int64)
        p_ecd, t_ecd = np.sqrt(pw * ph), np.sqrt(tw * th)
        p_ar = np.maximum(pw, ph) / np.maximum(np.minimum(pw, ph), 1e-9)
        t_ar = np.maximum(tw, th) / np.maximum(np.minimum(tw, th), 1e-9)
        p_rd = t_rd = None
    ok = req[mt] if mt.size else np.zeros(0, bool)
    mp, mt = mp[ok], mt[ok]
    tp = int(mp.size)
    n_pred, n_req = int(len(pt)), int(req.sum())
    # predictions matched to a not-required (tiny) true particle are neither TP nor FP
    n_matched_small = int((~ok).sum())
    err_px = p_ecd[mp] - t_ecd[mt]
    out: dict[str, Any] = {
        "tp": tp, "fp": n_pred - tp - n_matched_small, "fn": n_req - tp,
        "n_pred": n_pred, "n_true": n_req,
        "ecd_err_pct": (100.0 * err_px / t_ecd[mt]).tolist(),
        "ecd_err_nm": (err_px * pixel_size_nm).tolist() if pixel_size_nm else [],
        "d50_pred_px": float(np.median(p_ecd)) if n_pred else None,
        "d50_true_px": float(np.median(t_ecd[req])) if n_req else None,
        "ar_pairs": np.stack([p_ar[mp], t_ar[mt]], 1).tolist(),
        "roundness_pairs": (np.stack([p_rd[mp], t_rd[mt]], 1).tolist()
                            if p_rd is not None and t_rd is not None else []),
    }
    if pred_scores is not None:
        ids = pt["id"].astype(np.int64)
        hit = np.zeros(len(pt), np.int64)
        hit[mp] = 1
        small = np.zeros(len(pt), bool)
        if true_labels is not None:
            small_rows = np.array([prow[int(a)] for a, b in zip(pairs["pred"], pairs["true"],
                                                                 strict=True)
                                   if not req[trow[int(b)]]], np.int64)
        else:
            small_rows = np.zeros(0, np.int64)
        small[small_rows] = True
        sc = np.asarray(pred_scores, np.float64)[ids]
        out["score_hits"] = np.stack([sc[~small], hit[~small]], 1).tolist()
    return out


def calibration_error(score_hits: list[list[float]], bins: int = 10) -> dict[str, Any]:
    """Return the expected calibration error of particle scores as probabilities of being a
    true particle: ``ece`` over ``bins`` equal-width score bins in [0, 1] and ``ece_adaptive``
    over equal-count bins (the cut leaves most scores in one or two equal-width bins); both
    are sum_b n_b / N |mean score_b - hit rate_b|. Also the mean score and the hit rate (=
    precision). None values without predictions."""
    if not score_hits:
        return {"ece": None, "ece_adaptive": None, "mean_score": None, "hit_rate": None, "n": 0}
    a = np.asarray(score_hits, np.float64)
    sc, hit = a[:, 0], a[:, 1]
    n = len(a)

    def ece(edges_idx: list[np.ndarray]) -> float:
        return float(sum(len(ix) / n * abs(sc[ix].mean() - hit[ix].mean())
                         for ix in edges_idx if len(ix)))

    b = np.minimum((sc * bins).astype(int), bins - 1)
    eq_width = [np.flatnonzero(b == k) for k in range(bins)]
    order = np.argsort(sc, kind="stable")
    eq_count = [ix for ix in np.array_split(order, min(bins, n))]
    return {"ece": round(ece(eq_width), 4), "ece_adaptive": round(ece(eq_count), 4),
            "mean_score": round(float(sc.mean()), 4), "hit_rate": round(float(hit.mean()), 4),
            "n": n}


def _rmse(pairs: list[list[float]]) -> float | None:
    if not pairs:
        return None
    a = np.asarray(pairs, np.float64)
    return round(float(np.sqrt(np.mean((a[:, 0] - a[:, 1]) ** 2))), 4)


def summarize(images: list[dict[str, Any]]) -> dict[str, Any]:
    """Return set-level metrics from :func:`score_image` results (F1 etc. over all particles).

    precision/recall/f1 in [0, 1]; median_abs_ecd_error_pct in % of true ECD;
    median_abs_ecd_error_nm and ecd_mae_nm (mean) in nm (None uncalibrated); d50_error_pct: median
    over images with true particles of |D50_pred - D50_true| / D50_true in % (100 % for an image
    with no prediction); aspect_ratio_rmse / roundness_rmse over matched particles (dimensionless).
    """
    tp = sum(r["tp"] for r in images)
    fp = sum(r["fp"] for r in images)
    fn = sum(r["fn"] for r in images)
    prec = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
    rec = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    err = np.abs([x for r in images for x in r["ecd_err_pct"]])
    err_nm = np.abs([x for r in images for x in r["ecd_err_nm"]])
    d50 = []
    for r in images:
        if r["d50_true_px"] is None:
            continue
        d50.append(100.0 if r["d50_pred_px"] is None
                   else 100.0 * abs(r["d50_pred_px"] - r["d50_true_px"]) / r["d50_true_px"])
    return {
        "precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
        "tp": tp, "fp": fp, "fn": fn, "n_matched": int(err.size),
        "median_abs_ecd_error_pct": round(float(np.median(err)), 2) if err.size else None,
        "median_abs_ecd_error_nm": round(float(np.median(err_nm)), 3) if err_nm.size else None,
        "ecd_mae_nm": round(float(np.mean(err_nm)), 3) if err_nm.size else None,
        "d50_error_pct": round(float(np.median(d50)), 2) if d50 else None,
        "aspect_ratio_rmse": _rmse([p for r in images for p in r["ar_pairs"]]),
        "roundness_rmse": _rmse([p for r in images for p in r["roundness_pairs"]]),
        **({"calibration": calibration_error([p for r in images for p in r["score_hits"]])}
           if images and all("score_hits" in r for r in images) else {}),
    }


def tuning_config(i: int) -> SpecimenConfig:
    """Return synthetic tuning frame ``i``: the variety the held-out stream lacks.

    Median particle ECD 4-200 px (log-uniform), 512-1024 px frames, all three modalities,
    any shape mix, 0-75 % agglomerated, dose 30-3000 e/px, a fifth on support grains. Used to
    choose post-processing settings (score cut, working scale) alongside the EMPS tuning papers,
    so that a setting that suits real figure crops does not break tiny or huge particles.
    """
    rng = np.random.default_rng([TUNING_SEED_BASE, i])
    size = int(rng.choice([512, 768, 1024]))
    med = float(np.exp(rng.uniform(math.log(4.0), math.log(200.0))))
    mix = rng.dirichlet([3.0, 1.0, 0.5, 1.0])
    return SpecimenConfig(
        modality=str(rng.choice(_MODALITIES)),  # type: ignore[arg-type]
        shape=(size, size), pixel_size_nm=1.0, median_diameter_nm=med,
        sigma_log=float(rng.uniform(0.08, 0.4)), min_diameter_nm=2.5, max_diameter_nm=500.0,
        coverage=float(rng.uniform(0.05, 0.4)),
        shape_mix=dict(zip(KINDS[:4], mix.tolist(), strict=True)),
        agglomerate_fraction=float(rng.uniform(0.0, 0.75)),
        dose_e_per_px=float(np.exp(rng.uniform(math.log(30.0), math.log(3000.0)))),
        blur_px=float(rng.uniform(0.4, 1.5)), illumination_gradient=float(rng.uniform(0.0, 0.3)),
        support_texture=float(rng.uniform(0.0, 0.12)), contrast=float(rng.uniform(0.2, 0.7)),
        support_grains=float(rng.uniform(0.2, 0.6)) if rng.random() < 0.2 else 0.0,
        support_grain_nm=med * float(rng.uniform(4.0, 12.0)), dtype="uint16")


def tuning_samples(n: int = 60) -> Iterator[Any]:
    """Yield the synthetic tuning frames (:func:`tuning_config`) as samples (1 nm/px)."""
    from nanoscout.training.realdata import Sample

    for i in range(n):
        cfg = tuning_config(i)
        fr = render(cfg, TUNING_SEED_BASE + i)
        yield Sample("synthetic-tune", f"tune{i}", fr.image, fr.labels.astype(np.int32), None,
                     cfg.pixel_size_nm, cfg.modality)


def granular_config(i: int, relief: bool = True) -> SpecimenConfig:
    """Return frame ``i`` of ``granular-tune``: SEM particles (median 8-40 px, 512 px frames)
    on a packed granular film whose grains are 0.3-0.9x the particles' median
    (``SpecimenConfig.support_relief``); ``relief=False`` gives the same specimen on a flat film."""
    rng = np.random.default_rng([GRANULAR_SEED_BASE, i])
    med = float(np.exp(rng.uniform(math.log(8.0), math.log(40.0))))
    return SpecimenConfig(
        modality="SEM", shape=(512, 512), pixel_size_nm=1.0, median_diameter_nm=med,
        sigma_log=float(rng.uniform(0.1, 0.35)), min_diameter_nm=3.0, max_diameter_nm=300.0,
        coverage=float(rng.uniform(0.05, 0.3)), dose_e_per_px=float(rng.uniform(50, 1000)),
        blur_px=float(rng.uniform(0.5, 1.2)), support_texture=0.05,
        contrast=float(rng.uniform(0.3, 0.7)),
        support_relief=float(rng.uniform(0.4, 1.0)) if relief else 0.0,
        support_relief_nm=med * float(rng.uniform(0.3, 0.9)), dtype="uint16")


def granular_samples(n: int = 12, relief: bool = True) -> Iterator[Any]:
    """Yield the ``granular-tune`` frames (:func:`granular_config`) as samples (1 nm/px)."""
    from nanoscout.training.realdata import Sample

    for i in range(n):
        fr = Specimen.generate(granular_config(i, relief),
                               np.random.default_rng([GRANULAR_SEED_BASE + 1, i])
                               ).acquire(np.random.default_rng(i))
        yield Sample("granular-tune", f"granular{i}", fr.image, fr.labels.astype(np.int32),
                     None, 1.0, "SEM")


def agglomerate_samples(n: int = 16) -> Iterator[Any]:
    """Yield the ``agglomerate-tune`` frames: SEM piles of faceted particles (median 10-40 px,
    512 px frames; :func:`nanoscout.sim.sem_render.random_config`), as samples (1 nm/px)."""
    from nanoscout.sim.sem_render import random_config as sem_config
    from nanoscout.sim.sem_render import render as sem_render
    from nanoscout.training.realdata import Sample

    for i in range(n):
        cfg = sem_config(np.random.default_rng([AGGLOMERATE_SEED_BASE, i]), (512, 512),
                         (10.0, 40.0))
        img, lab = sem_render(cfg, np.random.default_rng([AGGLOMERATE_SEED_BASE + 1, i]))
        yield Sample("agglomerate-tune", f"agglomerate{i}", img, lab, None, 1.0, "SEM")


def synthetic_samples(n: int = 20, seed: int = 12345) -> Iterator[Any]:
    """Yield held-out synthetic frames as :class:`nanoscout.training.realdata.Sample` (0.5 nm/px)."""
    from nanoscout.training.realdata import Sample

    if seed < 0 or seed + n > HELDOUT_SEED_LIMIT:
        raise ValueError(f"held-out seeds {seed}..{seed + n - 1} overlap the training seeds "
                         f"(>= {HELDOUT_SEED_LIMIT})")
    for i in range(n):
        cfg = heldout_config(i, seed)
        rng = np.random.default_rng(seed + i)
        fr = Specimen.generate(cfg, rng).acquire(rng)
        yield Sample("synthetic", f"seed{seed + i}", fr.image, fr.labels.astype(np.int32), None,
                     cfg.pixel_size_nm, cfg.modality)


def set_samples(name: str, *, n: int = 20, seed: int = 12345, max_images: int | None = None,
                data_root: Path | None = None) -> Iterator[Any]:
    """Yield the labelled samples of harness set ``name`` (a synthetic set, or a real set of
    :func:`nanoscout.training.realdata.iter_samples`): ``n`` held-out synthetic specimens from
    ``seed``, and at most ``max_images`` of any other set (None: the tuning sets' own sizes,
    every real image)."""
    from nanoscout.training import realdata

    if name == "synthetic":
        return synthetic_samples(n, seed)
    if name == "synthetic-tune":
        return tuning_samples(max_images or 60)
    if name == "granular-tune":
        return granular_samples(max_images or 12)
    if name == "agglomerate-tune":
        return agglomerate_samples(max_images or 16)
    return realdata.iter_samples(name, data_root, max_images)


class Routed:
    """The detectors as ``nanoscout measure`` gives them files that do not name a modality:
    the modality model (:class:`~nanoscout.analysis.modality.ModalityEstimator`) sends an image
    to ``stem`` when it finds it HAADF-STEM, else to ``general``. ``routed`` counts the images
    sent to ``stem``."""

    def __init__(self, general: Any, stem: Any, estimator: Any) -> None:
        self.general, self.stem, self.estimator = general, stem, estimator
        self.auto, self.scale = general.auto, general.scale
        self.routed = 0

    def detect(self, image: np.ndarray) -> Any:
        """Return the detection of the detector the modality model chooses for ``image``."""
        if self.estimator.estimate(image) == "STEM":
            self.routed += 1
            return self.stem.detect(image)
        return self.general.detect(image)


def true_median_px(sample: Any) -> float:
    """Return the area-weighted median ECD (px) of ``sample``'s true particles (boxes:
    sqrt(w h)), the size the automatic scale measures; 0 where it has none."""
    from nanoscout.analysis.detector import _area_weighted_median

    if sample.labels is not None:
        ecd = _ecd_px(sample.labels)[1:]
    else:
        b = np.asarray(sample.boxes, dtype=np.float64).reshape(-1, 4)
        ecd = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return _area_weighted_median(ecd[ecd > 0])


class SizeHinted:
    """A diagnostic method: the detector told, for each image, the range [d / k, d k] of its
    median particle diameter, d the true area-weighted median ECD (px), as an operator who
    knows the particles' size within a factor ``k`` tells it (``particle_size_nm`` of a frame,
    ``nanoscout measure --particle-size-nm``; ``Detector.detect(particle_px=...)``). It reads
    the truth, so it measures what such an operator's range is worth, never the model alone.
    ``applied``: images whose automatic estimate lay outside the range and was replaced."""

    def __init__(self, detector: Any, k: float) -> None:
        if not k > 1:
            raise ValueError(f"size hint factor {k} must be > 1")
        self.detector, self.k = detector, k
        self.auto, self.scale = detector.auto, detector.scale
        self.applied = 0

    def detect_sample(self, sample: Any) -> Any:
        """Detect on ``sample.image`` with the range around its true median size."""
        d = true_median_px(sample)
        found = self.detector.detect(sample.image,
                                     particle_px=(d / self.k, d * self.k) if d > 0 else None)
        self.applied += found.size_hint == "applied"
        return found


class OracleScale:
    """A diagnostic method: the detector at each image's *true* working scale, the card's
    ``target_diameter_px`` over the image's true area-weighted median ECD (px; boxes:
    sqrt(w h)), within the card's resample range, and factor 1 within its keep range, as the
    automatic scale would choose had it found the true particles. Scoring it beside the
    automatic scale separates the working-scale estimate's errors from the network's. It reads
    the truth, so it is never a result of the model."""

    def __init__(self, engine: Any, card: Any, **kwargs: Any) -> None:
        self.engine, self.card, self.kwargs = engine, card, kwargs
        self.auto = False
        self.scale = "oracle"

    def factor(self, sample: Any) -> float:
        """Return the oracle factor of ``sample`` (1 where it has no true particle)."""
        d = true_median_px(sample)
        return self.card.working_scale.auto.factor(d) if d > 0 else 1.0

    def detect_sample(self, sample: Any) -> Any:
        """Detect on ``sample.image`` at the sample's oracle factor."""
        from nanoscout.analysis.detector import Detector

        det = Detector(self.engine, self.card, scale=self.factor(sample), **self.kwargs)
        return det.detect(sample.image)


def evaluate_set(methods: dict[str, Any], samples: Iterable[Any], *, iou: float = 0.5,
                 min_true_area_px: int = 12, leave_out: Collection[str] = ()) -> dict[str, Any]:
    """Run every method (name -> object with ``detect(image)``) on ``samples`` and score it.

    Returns {"n_images", "methods": {name: summarize(...) + "ms_per_image" (median wall time of
    detect, ms)}, "images": per-image tp/fp/fn/D50 per method}; with ``leave_out`` (image ids)
    also "without": {"ids", "n_images", "methods": {name: summarize(...) of the other images}}.
    """
    raw: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    ms: dict[str, list[float]] = {m: [] for m in methods}
    images = []
    for s in track(samples, "evaluating"):
        row: dict[str, Any] = {"id": s.id, "group": s.group, "shape": list(s.image.shape)}
        for name, det in methods.items():
            t0 = time.perf_counter()
            found = (det.detect_sample(s) if hasattr(det, "detect_sample")
                     else det.detect(s.image))
            labels = found.labels
            ms[name].append((time.perf_counter() - t0) * 1e3)
            r = score_image(labels, true_labels=s.labels, true_boxes=s.boxes,
                            pixel_size_nm=s.pixel_size_nm, iou=iou,
                            min_true_area_px=min_true_area_px,
                            pred_scores=getattr(found, "scores", None))
            raw[name].append(r)
            row[name] = {k: r[k] for k in ("tp", "fp", "fn", "n_pred", "n_true", "d50_pred_px",
                                          "d50_true_px")}
            row[name]["ms"] = round(ms[name][-1], 1)
            if hasattr(found, "scale"):
                row[name]["scale"] = round(float(found.scale), 4)
        images.append(row)
    out: dict[str, Any] = {"n_images": len(images), "methods": {}}
    for name in methods:
        out["methods"][name] = summarize(raw[name])
        out["methods"][name]["ms_per_image"] = (round(float(np.median(ms[name])), 1)
                                                if ms[name] else None)
    out["images"] = images
    if leave_out:
        keep = [i for i, row in enumerate(images) if row["id"] not in set(leave_out)]
        out["without"] = {"ids": sorted(leave_out), "n_images": len(keep),
                          "methods": {name: summarize([raw[name][i] for i in keep])
                                      for name in methods}}
    return out


#: the EMPS validation image whose ~2000 unannotated bright specks the detector counts
#: (models/weights/README.md): it stays in the ``emps`` set, and the harness reports the set
#: without it too (``without``), never tuning to either number
EMPS_SPECKS_IMAGE = "43be4d0a2c"

SET_NOTES = {
    "synthetic": "held-out synthetic frames, exact instance truth, 0.5 nm/px; mask IoU",
    "synthetic-tune": ("synthetic tuning frames (nanoscout.training.evaluate.tuning_config, "
                       "seeds 500000 + i): "
                       "median ECD 4-200 px, all modalities, 1 nm/px; mask IoU; for choosing "
                       "post-processing settings, not a held-out result"),
    "emps-tune": ("EMPS tuning subset: training papers with sha256(DOI) unit in [0.25, 0.33), "
                  "left out of training in tuning experiments only; mask IoU"),
    "emps": ("EMPS validation papers (models/splits/emps.json), uint16 instance maps, "
             "uncalibrated (px); mask IoU"),
    "stem": ("STEM held-out materials (models/splits/stem.json), YOLO boxes only; box IoU of "
             "instance bounding boxes; ECD = sqrt(w h) of boxes; uncalibrated (px)"),
    "stem-tune": ("STEM tuning material (nanoscout.training.realdata.stem_tuning_names: the first training "
                  "material in sha256 order), left out of training in tuning experiments only; "
                  "box IoU as for stem; not a held-out result"),
    "msa": ("BF-TEM frames of supported particles sintering in situ, held-out frames of "
            "msa-tem-train (models/splits/msa.json 'validation'); binary masks, true instances "
            "= 8-connected components; uncalibrated (px); mask IoU"),
    "msa-tune": ("BF-TEM tuning frames: the training split of msa-tem-train (models/splits/"
                 "msa.json 'train'), which the shipped detectors do not train on (a candidate "
                 "trained with --real-sets ...,msa does); masks as for msa; mask IoU; for "
                 "choosing post-processing settings, not a held-out result"),
    "granular-tune": ("synthetic SEM tuning frames on a packed granular film "
                      "(nanoscout.training.evaluate.granular_config, seeds [777000, i]): "
                      "unlabelled grains 0.3-0.9x the particles; mask IoU; not a held-out result"),
    "agglomerate-tune": ("synthetic SEM tuning frames of agglomerated faceted particles "
                         "(nanoscout.sim.sem_render, seeds [888000, i]); visible parts "
                         "labelled; mask IoU; not a held-out result"),
    "nffa": ("NFFA SEM particles, binary masks: true instances = 8-connected components "
             "(touching particles are one instance); uncalibrated (px); mask IoU"),
}


#: issue 17's targets for the model on held-out data (issue 3's ECD ones kept): set -> metric
#: -> (comparison, value); msa: issue 17's bar for other groups' BF-TEM frames
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "synthetic": {"f1": (">=", 0.98), "ecd_mae_nm": ("<=", 0.5)},
    "emps": {"f1": (">=", 0.85), "median_abs_ecd_error_pct": ("<=", 5.0),
             "d50_error_pct": ("<=", 5.0)},
    "stem": {"f1": (">=", 0.75)},
    "nffa": {"f1": (">=", 0.75)},
    "msa": {"f1": (">=", 0.90)},
}


def check_targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return {set: {metric: {target, measured, met}}} for the model's held-out results."""
    out: dict[str, dict[str, Any]] = {}
    for name, targets in TARGETS.items():
        sres = res["sets"].get(name)
        if sres is None:
            continue
        m = sres["methods"]["model"]
        row = {}
        for metric, (op, value) in targets.items():
            got = m.get(metric)
            met = got is not None and (got >= value if op == ">=" else got <= value)
            row[metric] = {"target": f"{op} {value}", "measured": got, "met": bool(met)}
        out[name] = row
    return out


def _set_kind(name: str) -> str:
    """Return the set a name stands for: ``stem-tune:Cu`` (one STEM training material, for
    cross-material experiments: :func:`nanoscout.training.realdata.stem_material_names`) is a
    ``stem-tune`` set."""
    return "stem-tune" if name.startswith("stem-tune:") else name


def _parse_scale(text: str | None, sets: list[str]) -> dict[str, float | str | None]:
    """Return the detector scale per set from "0.5", "auto", "oracle" or
    "emps=0.25,stem=oracle" (None = the model card's choice; "oracle": :class:`OracleScale`)."""
    out: dict[str, float | str | None] = dict.fromkeys(sets)
    if not text:
        return out
    for part in text.split(","):
        key, eq, val = part.rpartition("=")
        try:
            v: float | str = val if val in ("auto", "oracle") else float(val)
        except ValueError as exc:
            raise SystemExit(f"bad --scale item {part!r}: expected a number, 'auto', "
                             "'oracle' or set=number") from exc
        if not eq:
            out = dict.fromkeys(sets, v)
        elif key in out:
            out[key] = v
        else:
            raise SystemExit(f"--scale names set {key!r}, not among --sets {sets}")
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) and v <= 1 else str(v)


def format_table(res: dict[str, Any]) -> str:
    """Return a compact text table (set x method) of a harness result."""
    cols = ("precision", "recall", "f1", "median_abs_ecd_error_pct", "d50_error_pct",
            "aspect_ratio_rmse", "roundness_rmse", "ms_per_image")
    heads = ("P", "R", "F1", "|dECD|%", "dD50%", "AR rmse", "Rnd rmse", "ms/img", "ECE")
    ci_head = "F1 95% CI"  # nanoscout.training.intervals; '-' where the result has none
    width = max([15, *(len(k) + 5 for k in res["sets"])])  # room for "-w/o" and a space
    lines = [f"{'set':{width}s}{'method':10s}{'imgs':>5s}{'true':>7s}"
             + "".join(f"{h:>9s}" for h in heads) + f"{ci_head:>14s}"]
    rows = [(sname, sres) for sname, sres in res["sets"].items()]
    rows += [(f"{sname}-w/o", {**sres["without"], "methods": {
        k: {**v, "ms_per_image": None} for k, v in sres["without"]["methods"].items()}})
        for sname, sres in res["sets"].items() if "without" in sres]
    for sname, sres in rows:
        for mname, m in sres["methods"].items():
            ece = (m.get("calibration") or {}).get("ece")
            ci = m.get("f1_ci95")
            lines.append(f"{sname:{width}s}{mname:10s}{sres['n_images']:5d}{m['tp'] + m['fn']:7d}"
                         + "".join(f"{_fmt(m[c]):>9s}" for c in cols) + f"{_fmt(ece):>9s}"
                         + f"{'-' if ci is None else f'{ci[0]:.3f}-{ci[1]:.3f}':>14s}")
    models = {sres["model"] for sres in res["sets"].values() if "model" in sres}
    if len(models) > 1:
        lines.append("model: " + ", ".join(f"{k} {v['model']}" for k, v in res["sets"].items()
                                           if "model" in v))
    return "\n".join(lines)


def run_harness(model: Path, card_path: Path | None, sets: list[str] | None, *, n: int = 20,
                seed: int = 12345, scale: str | None = None, max_images: int | None = None,
                threads: int = 2, data_root: Path | None = None,
                min_score: float | None = None, tta: int = 1,
                rotate45: bool = False, stem_model: Path | None = None,
                route: Path | None = None, size_hint: float | None = None,
                scale_from: Path | None = None) -> dict[str, Any]:
    """Return the full harness result (model and baseline on each set) as a JSON-able dict.

    ``stem_model``: the detector that scores the STEM sets (``stem``, ``stem-tune``), as the
    daemon routes STEM frames to its STEM detector; None: ``model`` scores every set.
    ``route``: a modality model (ONNX); with it, and ``stem_model``, every image of the real
    sets goes where the modality model sends it (:class:`Routed`), as ``nanoscout measure``
    treats files without metadata; the synthetic frames (which carry their modality) do not.

    ``rotate45``: the detector also infers each image turned by 45° (see
    :class:`nanoscout.analysis.detector.Detector`).

    ``min_score`` overrides the card's score threshold (to see what the cut does).
    ``size_hint`` (a factor k > 1): each image's detector is told the range of its median
    particle size within k of the truth (:class:`SizeHinted`, a diagnostic).
    ``scale_from``: another detector (ONNX, its card beside it) whose network measures each
    frame's working scale for every scored detector, as an INT8 sibling's FP32 network does
    (:func:`~nanoscout.analysis.detector.scale_measurer`): two candidates scored with the same
    ``scale_from`` differ only in what they find at a given scale, not in which frames their
    own estimates take elsewhere. It reads no truth.
    """
    from nanoscout.analysis.detector import Detector, base_detector_for, scale_measurer
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import create_engine
    from nanoscout.training import realdata
    from nanoscout.training.baseline import BaselineDetector

    avail = ["synthetic", *realdata.available_sets(data_root)]
    if sets is None:
        sets = list(avail)  # the held-out sets; the tuning sets only when named
    avail.extend(s for s in SYNTHETIC_SETS if s != "synthetic")  # the synthetic tuning sets
    if "emps" in avail:
        avail.append("emps-tune")
    if "stem" in avail:
        avail.append("stem-tune")
    if "msa" in avail:
        avail.append("msa-tune")
    for s in sets:
        if _set_kind(s) not in ALL_SETS:
            raise SystemExit(f"unknown set {s!r} (known: {', '.join(ALL_SETS)}, "
                             "stem-tune:MATERIAL)")
        if _set_kind(s) not in avail:
            raise SystemExit(f"set {s!r} is not available under "
                             f"{data_root or realdata.data_root()}")
    scales = _parse_scale(scale, sets)

    measurer = None
    if scale_from is not None:
        measurer = scale_measurer(create_engine(scale_from, "onnxruntime-cpu", threads=threads),
                                  ModelCard.load(scale_from.with_suffix(".json")))

    def load(path: Path, card_file: Path | None) -> tuple[Any, Any, Any]:
        """(card, engine, its base network's detector or None: ModelCard.load_base_network)"""
        card_file = card_file or path.with_suffix(".json")
        card = ModelCard.load(card_file)
        if min_score is not None and card.thresholds is not None:
            card = card.model_copy(update={"thresholds": card.thresholds.with_cut(min_score)})
        if measurer is not None:
            if card.base_network is not None:
                raise SystemExit(f"--scale-from: {card_file} is an adapted card with a base "
                                 "network of its own")
            return card, create_engine(path, "onnxruntime-cpu", threads=threads), measurer
        base = base_detector_for(card, card_file,
                                 lambda p: create_engine(p, "onnxruntime-cpu", threads=threads))
        if base is None and card.quantization is not None and card.fp32_scale:
            # an INT8 sibling whose FP32 model measures the working scale, as the daemon runs it
            source = card_file.with_name(card.quantization.source_onnx)
            base = scale_measurer(create_engine(source, "onnxruntime-cpu", threads=threads),
                                  ModelCard.load(source.with_suffix(".json")))
        return card, create_engine(path, "onnxruntime-cpu", threads=threads), base

    card, engine, base = load(model, card_path)
    stem = load(stem_model, None) if stem_model is not None else (card, engine, base)
    baseline = BaselineDetector()
    res: dict[str, Any] = {
        "command": " ".join(["python -m nanoscout.training.evaluate", *sys.argv[1:]]),
        "model": str(model), "model_sha256": card.sha256,
        "splits": {k: str(realdata.SPLITS_DIR / f"{k}.json") for k in ("emps", "stem", "msa")
                   if k in sets},
        "iou_threshold": 0.5, "min_true_area_px": 12, "max_images": max_images,
        "min_score": card.thresholds.min_score if card.thresholds else None, "tta": tta,
        "rotate45": rotate45, "stem_model": None if stem_model is None else str(stem_model),
        "route": None if route is None else str(route), "sets": {}}
    if scale_from is not None and (route is not None or "oracle" in scales.values()):
        raise SystemExit("--scale-from needs the automatic scale and no --route")
    res["scale_from"] = None if scale_from is None else str(scale_from)
    if route is not None and (stem_model is None or "oracle" in scales.values()):
        raise SystemExit("--route needs a STEM detector (--stem-model) and no oracle scale")
    if size_hint is not None and (route is not None or "oracle" in scales.values()
                                  or not size_hint > 1):
        raise SystemExit("--size-hint needs a factor > 1, no --route and no oracle scale")
    res["size_hint"] = size_hint
    estimator = None
    if route is not None:
        from nanoscout.analysis.modality import ModalityEstimator

        estimator = ModalityEstimator.from_onnx(route, threads=threads)
    for s in sets:
        c, e, b = (stem if _set_kind(s) in ("stem", "stem-tune") and estimator is None
                   else (card, engine, base))
        det: Any = (OracleScale(e, c, tta=tta, rotate45=rotate45) if scales[s] == "oracle"
                    else Detector(e, c, scale=scales[s], tta=tta,  # type: ignore[arg-type]
                                  rotate45=rotate45, base_detector=b))
        if size_hint is not None:
            det = SizeHinted(det, size_hint)
        if estimator is not None and s not in SYNTHETIC_SETS:
            det = Routed(det, Detector(stem[1], stem[0], scale=scales[s],  # type: ignore[arg-type]
                                       tta=tta, rotate45=rotate45, base_detector=stem[2]),
                         estimator)
        samples = set_samples(s, n=n, seed=seed, max_images=max_images, data_root=data_root)
        t0 = time.perf_counter()
        out = evaluate_set({"model": det, "baseline": baseline}, samples,
                           leave_out=(EMPS_SPECKS_IMAGE,) if s == "emps" else ())
        add_intervals(out, s)
        out["note"] = (SET_NOTES[s] if s == _set_kind(s) else
                       f"STEM training material {s.split(':', 1)[1]} (nanoscout.training."
                       "realdata.stem_material_names), left out of training in cross-material "
                       "experiments only; box IoU as for stem; not a held-out result")
        out["model"] = f"{c.name}:{c.version}"
        if isinstance(det, Routed):
            out["model"] += f" (routed: {det.routed} images to {stem[0].name}:{stem[0].version})"
            out["routed_to_stem"] = det.routed
        out["detector_scale"] = "auto" if det.auto else det.scale
        if scales[s] == "oracle":
            out["note"] += ("; DIAGNOSTIC: the detector ran at each image's true working scale "
                            "(OracleScale), which reads the truth")
        if scale_from is not None:
            out["note"] += (f"; the working scale measured by {scale_from.name}'s network "
                            "(--scale-from), the scored card's own estimate not used")
        if isinstance(det, SizeHinted):
            out["note"] += (f"; DIAGNOSTIC: each image's detector was told its median particle "
                            f"size within a factor {size_hint:g} of the truth (SizeHinted)")
            out["size_hint_applied"] = det.applied
        out["seconds"] = round(time.perf_counter() - t0, 1)
        if s == "synthetic":
            out["seeds"] = f"{seed}..{seed + n - 1}"
        res["sets"][s] = out
    res["targets"] = check_targets(res)
    res["ci"] = {"level": LEVEL, "method": CI_METHOD, "n_resamples": N_RESAMPLES, "seed": SEED,
                 "how": "scipy.stats.bootstrap over each set's ci_unit (nanoscout.training."
                        "intervals): pooled F1 of resampled images, or of papers for EMPS"}
    return res


def int8_model(model: Path) -> Path:
    """The INT8 sibling of ONNX file ``model`` (``X.onnx`` -> ``X.int8.onnx``; a sibling is
    itself); SystemExit naming the file when it is not there (``nanoscout models quantize``
    writes it)."""
    from nanoscout.analysis.modelcard import quantized_sibling

    sibling = model if model.name.endswith(".int8.onnx") else quantized_sibling(model)
    if not sibling.is_file():
        raise SystemExit(f"--precision int8: no INT8 sibling {sibling} of {model} "
                         "(nanoscout models quantize writes it)")
    return sibling


def main(argv: list[str] | None = None) -> None:
    """Command line: evaluate an ONNX detector on held-out frames and print/write JSON."""
    ap = argparse.ArgumentParser(description="held-out evaluation of the particle detector")
    ap.add_argument("--model", type=Path, default=Path("models/weights/detector.onnx"))
    ap.add_argument("--card", type=Path, default=None, help="default: model path with .json")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", default=None,
                    help="detector resample factor: 0.5, or per set: emps=0.25,stem=1; "
                         "'oracle' (with --sets): each image's true working scale, a "
                         "diagnostic of the automatic scale (OracleScale)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default runs/eval.json, with --sets runs/accuracy.json)")
    ap.add_argument("--sets", default=None,
                    help="comma list of synthetic,emps,stem,nffa,msa or 'all' (available ones): "
                         "score model and classical baseline on each; tuning sets only when "
                         "named: synthetic-tune, emps-tune, stem-tune, stem-tune:MATERIAL (one "
                         "STEM training material, e.g. stem-tune:Cu), msa-tune (the BF-TEM "
                         "training frames), granular-tune and agglomerate-tune (synthetic SEM)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="with --sets: at most this many images per real set")
    ap.add_argument("--data-root", type=Path, default=None, help="default ../shared/data")
    ap.add_argument("--min-score", type=float, default=None,
                    help="with --sets: override the card's particle score threshold")
    ap.add_argument("--tta", type=int, choices=[1, 2, 4], default=1,
                    help="with --sets: test-time augmentation (mirror images averaged)")
    ap.add_argument("--rotate45", action="store_true",
                    help="with --sets: also infer each image turned by 45° (larger logit kept)")
    ap.add_argument("--stem-model", default="auto",
                    help="with --sets: detector for the STEM sets (as the daemon uses for STEM "
                         "frames): a path, 'none' (--model scores them), or 'auto': "
                         "detector_stem.onnx beside --model if it is there")
    ap.add_argument("--route", type=Path, default=None,
                    help="with --sets: a modality model (models/weights/modality.onnx): each "
                         "real image goes to the STEM detector or the general one as the model "
                         "says, as `nanoscout measure` treats files without metadata")
    ap.add_argument("--size-hint", type=float, default=None, metavar="K",
                    help="with --sets, a diagnostic: tell each image's detector the range "
                         "[d/K, d*K] of its median particle diameter d, read from the truth, "
                         "as an operator who knows the size within K would "
                         "(SizeHinted; Detector.detect(particle_px=...))")
    ap.add_argument("--scale-from", type=Path, default=None, metavar="MODEL",
                    help="with --sets: MODEL's network (ONNX, its card beside it) measures each "
                         "frame's working scale for the scored detectors, so that candidates "
                         "compare at the same scales (reads no truth)")
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                    help="int8: score the INT8 siblings of --model and the STEM model "
                         "(X.int8.onnx, written by `nanoscout models quantize`)")
    args = ap.parse_args(argv)
    from nanoscout.analysis.modelcard import quantized_sibling

    if args.precision == "int8":
        args.model = int8_model(args.model)
    if args.sets is not None:
        sets = None if args.sets == "all" else [x for x in args.sets.split(",") if x]
        stem_model: Path | None = None
        if args.stem_model == "auto":
            from nanoscout.daemon.config import SHIPPED_STEM_MODEL

            sibling = args.model.parent / SHIPPED_STEM_MODEL
            if args.precision == "int8":
                sibling = quantized_sibling(sibling)
            stem_model = sibling if sibling.is_file() and sibling != args.model else None
        elif args.stem_model != "none":
            stem_model = Path(args.stem_model)
            if args.precision == "int8":  # the STEM model's sibling too, as with "auto"
                stem_model = int8_model(stem_model)
        res = run_harness(args.model, args.card, sets, n=args.n, seed=args.seed,
                          scale=args.scale, max_images=args.max_images, threads=args.threads,
                          data_root=args.data_root, min_score=args.min_score, tta=args.tta,
                          rotate45=args.rotate45, stem_model=stem_model, route=args.route,
                          size_hint=args.size_hint, scale_from=args.scale_from)
        out = args.out or Path("runs/accuracy.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(format_table(res))
        for name, row in res["targets"].items():
            print(f"target {name}: " + ", ".join(
                f"{k} {v['measured']} ({v['target']}: {'met' if v['met'] else 'MISSED'})"
                for k, v in row.items()))
        print(f"wrote {out}")
        return
    try:
        legacy_scale = None if args.scale is None else float(args.scale)
    except ValueError as exc:
        raise SystemExit(f"--scale {args.scale!r}: per-set scales need --sets") from exc
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import create_engine

    card = ModelCard.load(args.card or args.model.with_suffix(".json"))
    engine = create_engine(args.model, "onnxruntime-cpu", threads=args.threads)
    det = Detector(engine, card, scale=legacy_scale)
    t0 = time.perf_counter()
    res = evaluate(det, args.n, args.seed)
    res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if not args.no_timing:
        res["timings_ms"] = time_detector(det)
    res["model"] = str(args.model)
    out = args.out or Path("runs/eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    brief = {k: v for k, v in res.items() if k != "frames"}
    print(json.dumps(brief, indent=1))
    if not math.isfinite(res["f1"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
