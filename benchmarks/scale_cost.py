"""What the automatic working-scale estimate costs against the engine, measured in one run.

::

    python -m benchmarks.scale_cost --out benchmarks/results/scale_cost.json

For each frame size (1024² and 2048²) and each specimen (synthetic TEM / STEM frames with
median particles of 6, 24 and 80 px, so that the estimate takes its short and its long way),
``Detector.detect`` runs with ``scale="auto"`` and no stream key (every frame estimated) for
the shipped card as it is (``card``) and with the estimate's issue-17 fields removed
(``coarse_to_fine``: the card's own passes without the self-consistency search). Reported per
frame size, estimate and specimen: the factor chosen, the medians over repeats of the ``scale``
stage (the estimate; a pass the frame reuses counts as engine time) and of the ``engine``
stage, their ratio, and the sums over the specimens. ONNX Runtime CPU, ``--threads``
intra-op threads (1 on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SPECIMENS: tuple[tuple[str, float], ...] = (("TEM", 6.0), ("STEM", 24.0), ("TEM", 80.0))


def measure(model: Path, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3,
            threads: int = 1) -> dict[str, Any]:
    """Return {size: {estimate: {specimens: [{factor, scale_ms, engine_ms, ratio}], totals}}}
    (medians over ``repeats``, ms)."""
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import AutoScale, ModelCard
    from nanoscout.engines import create_engine
    from nanoscout.sim.synthetic import SpecimenConfig, render

    card = ModelCard.load(model.with_suffix(".json"))
    ws = card.working_scale
    if ws is None:
        raise SystemExit(f"{model}: the card has no working scale")
    plain = AutoScale.model_validate(ws.auto.model_dump(
        exclude={"consistency", "consistent_px", "consistent_min_count", "min_pass_ecd_px"}))
    cards = {"card": card,
             "coarse_to_fine": card.model_copy(update={"working_scale": ws.model_copy(
                 update={"auto": plain})})}
    engine = create_engine(model, "onnxruntime-cpu", threads=threads)
    out: dict[str, Any] = {}
    for size in sizes:
        frames = [render(SpecimenConfig(modality=m, shape=(size, size),  # type: ignore[arg-type]
                                        pixel_size_nm=1.0, median_diameter_nm=d,
                                        sigma_log=0.15, coverage=0.2), 40 + k).image
                  for k, (m, d) in enumerate(SPECIMENS)]
        dets = {k: Detector(engine, c, scale="auto") for k, c in cards.items()}
        dets["card"].detect(frames[0])  # warm-up
        runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {
            (k, i): [] for k in dets for i in range(len(frames))}
        for _ in range(repeats):
            for i, fr in enumerate(frames):
                for k, d in dets.items():  # interleaved: a load change hits both alike
                    r = d.detect(fr)
                    runs[k, i].append((r.timings_ms["scale"], r.timings_ms["engine"], r.scale))
        row: dict[str, Any] = {}
        for k in dets:
            per: list[dict[str, Any]] = []
            for i, (m, dia) in enumerate(SPECIMENS):
                a = np.asarray(runs[k, i])
                sc, en = float(np.median(a[:, 0])), float(np.median(a[:, 1]))
                per.append({"specimen": f"{m} {dia:g} px", "factor": round(float(a[0, 2]), 3),
                            "scale_ms": round(sc, 1), "engine_ms": round(en, 1),
                            "scale_over_engine": round(sc / en, 3)})
            sc_total = sum(float(p["scale_ms"]) for p in per)
            en_total = sum(float(p["engine_ms"]) for p in per)
            row[k] = {"specimens": per, "scale_ms_total": round(sc_total, 1),
                      "engine_ms_total": round(en_total, 1),
                      "scale_over_engine_total": round(sc_total / en_total, 3)}
        out[f"{size}x{size}"] = row
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: time the scale estimate against the engine and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_cost.json"))
    ap.add_argument("--model", type=Path, default=Path("models/weights/detector.onnx"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    res = {"command": " ".join(["python -m benchmarks.scale_cost", *given]),
           "machine": f"{platform.machine()} CPU, ONNX Runtime {args.threads} intra-op threads",
           "model": str(args.model),
           "specimens": [f"{m}, median ECD {d:g} px" for m, d in SPECIMENS],
           "sizes": measure(args.model, repeats=args.repeats, threads=args.threads),
           "seconds": 0.0}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
