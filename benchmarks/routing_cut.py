"""Which detector a HAADF-STEM frame that does not name its modality should go to, by p(haadf).

::

    python -m benchmarks.routing_cut --out benchmarks/results/routing_cut.json

A file without metadata (PNG, JPEG, plain TIFF) goes to the STEM detector when the modality
model (``nanoscout.analysis.modality``) finds it HAADF-STEM with p(haadf) >= ``ROUTE_MIN_P``,
else to the general detector. Where the model is unsure, which detector does better on real
HAADF frames decides the cut. This benchmark renders fresh HAADF frames from atoms
(``nanoscout.training.haadf``: ``random_config`` with the mode forced to HAADF, 512 x 512,
render seeds ``--seed`` x 1,000,000 + k, never used by any shipped model), and per frame
records p(haadf) and the F1 (IoU >= 0.5 against the exact labels) of both shipped detectors
(cards as shipped). Summaries: both detectors' pooled F1 by band of p(haadf), and the routed
pipeline's pooled F1 at each candidate cut (frames at or above the cut to the STEM detector).
It also records p(haadf) of the frames that are *not* HAADF and must stay with the general
detector: the EMPS tuning papers and the STEM tuning material's bright-field frames
(tuning data; the held-out sets are never read here). ONNX Runtime CPU, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

#: candidate routing cuts summarised (ROUTE_MIN_P is one of them)
CUTS = (0.3, 0.5, 0.7, 0.9)
#: bands of p(haadf) summarised: [low, high)
BANDS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01))
#: the STEM tuning material's bright-field frames (``models/weights/modality.json``)
BRIGHT_FIELD = ("PtC1", "PtC2", "Pt_carbon1", "Pt_carbon2")
SIDE = 512


def pooled_f1(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """Pooled counts and F1 of ``method`` ("general", "stem" or "routed") over ``rows``."""
    tp, fp, fn = (sum(int(r[method][k]) for r in rows) for k in ("tp", "fp", "fn"))
    return {"n_frames": len(rows), "tp": tp, "fp": fp, "fn": fn,
            "f1": round(2 * tp / max(1, 2 * tp + fp + fn), 4)}


def summarize(rows: list[dict[str, Any]], cuts: tuple[float, ...] = CUTS) -> dict[str, Any]:
    """Both detectors by band of p(haadf), and the routed pipeline at each of ``cuts``."""
    bands = {f"[{lo}, {min(hi, 1.0)}{')' if hi < 1 else ']'}": {
        m: pooled_f1([r for r in rows if lo <= r["p_haadf"] < hi], m) for m in ("general", "stem")}
        for lo, hi in BANDS}
    routed = {}
    for c in cuts:
        picked = [{"routed": r["stem"] if r["p_haadf"] >= c else r["general"]} for r in rows]
        routed[str(c)] = {**pooled_f1(picked, "routed"),
                          "to_stem": sum(r["p_haadf"] >= c for r in rows)}
    return {"by_p_haadf": bands, "routed_at_cut": routed}


def render_rows(n: int, seed: int, threads: int = 1) -> list[dict[str, Any]]:
    """Render ``n`` HAADF frames and score both shipped detectors on each."""
    from nanoscout.analysis.detector import load_detector
    from nanoscout.analysis.modality import ModalityEstimator
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.engines import create_engine
    from nanoscout.training import haadf
    from nanoscout.training.evaluate import score_image

    weights = shipped_model_dir()
    dets = {name: load_detector(weights / file,
                                lambda p: create_engine(p, "onnxruntime-cpu", threads=threads))
            for name, file in (("general", "detector.onnx"), ("stem", "detector_stem.onnx"))}
    est = ModalityEstimator.shipped(threads=threads)
    if est is None:
        raise SystemExit(f"no modality model in {weights}")
    rng = np.random.default_rng(seed)
    rows = []
    try:
        for k in range(n):
            cfg = replace(haadf.random_config(rng, (SIDE, SIDE)), mode="haadf")
            img, lab = haadf.render(cfg, seed * 1_000_000 + k)
            row: dict[str, Any] = {
                "k": k, "support": cfg.support_kind, "pixel_nm": round(cfg.pixel_nm, 4),
                "median_nm": round(cfg.median_diameter_nm, 2), "dtype": str(img.dtype),
                "n_true": int(lab.max()), "p_haadf": round(est.p_haadf(img), 4)}
            for name, det in dets.items():
                s = score_image(det.detect(img).labels, true_labels=lab.astype(np.int32))
                row[name] = {x: int(s[x]) for x in ("tp", "fp", "fn")}
            rows.append(row)
    finally:
        est.close()
        for det in dets.values():
            det.close()
    return rows


def other_frames(threads: int = 1) -> dict[str, float]:
    """p(haadf) of the tuning frames that are not HAADF (EMPS tuning papers, the STEM tuning
    material's bright-field frames); {} where ../shared/data is missing."""
    from nanoscout.analysis.modality import ModalityEstimator
    from nanoscout.training import realdata

    if not {"emps", "stem"} <= set(realdata.available_sets()):
        return {}
    est = ModalityEstimator.shipped(threads=threads)
    if est is None:
        return {}
    out = {}
    try:
        for s in realdata.iter_samples("emps-tune"):
            out[f"emps-tune:{s.id}"] = round(est.p_haadf(s.image), 4)
        for name in BRIGHT_FIELD:
            out[f"stem-tune:{name}"] = round(est.p_haadf(realdata.load_stem(name).image), 4)
    finally:
        est.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: render, score, summarise, write JSON."""
    from nanoscout.analysis.modality import ROUTE_MIN_P

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/routing_cut.json"))
    ap.add_argument("--n", type=int, default=48, help="HAADF frames rendered")
    ap.add_argument("--seed", type=int, default=37,
                    help="configuration stream; render seeds seed x 1,000,000 + k")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    t0 = time.perf_counter()
    rows = render_rows(args.n, args.seed, args.threads)
    others = other_frames(args.threads)
    summary = summarize(rows)
    given = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {"command": " ".join(["python -m benchmarks.routing_cut", *given]),
           "machine": f"{platform.machine()} CPU, ONNX Runtime {args.threads} intra-op threads",
           "route_min_p": ROUTE_MIN_P, "frames": f"{SIDE} x {SIDE} physics HAADF renders",
           "summary": summary,
           "not_haadf_max_p": max(others.values()) if others else None,
           "not_haadf_p": others, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for band, m in summary["by_p_haadf"].items():
        print(f"p(haadf) {band:12s} {m['general']['n_frames']:3d} frames  "
              f"general F1 {m['general']['f1']:.3f}  STEM F1 {m['stem']['f1']:.3f}")
    for cut, m in summary["routed_at_cut"].items():
        print(f"cut {cut}: {m['to_stem']} of {args.n} to the STEM detector, routed F1 {m['f1']:.3f}")
    print(f"tuning frames that are not HAADF: max p(haadf) {res['not_haadf_max_p']}")
    print(f"wrote {args.out} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
