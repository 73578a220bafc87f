"""How accurate frames are whose working scale the estimation passes agreed on, and the others.

::

    python -m benchmarks.scale_agreement --out benchmarks/results/scale_agreement.json

The detector's automatic working scale (``working_scale.auto.consistency``) looks for two
neighbouring estimation passes that agree on the particles' size in frame px; where none do,
the card's fallback chooses the scale, and the detection says so (``Detection.scale_agreed``
false, ``det.scale_agreed`` on the wire and in the run's ``frames`` table). This benchmark
scores each labelled frame with the shipped detector of its set (or ``--model``), as the
accuracy harness scores (IoU >= 0.5; box IoU for STEM boxes), and pools the frames by that
flag: F1 of the frames whose passes agreed, of those whose fallback decided, and of those
where nothing was found. Nothing is chosen with it: it asks whether the flag could warn an
operator. Tuning sets by default; the held-out sets (``emps``, ``nffa``, ``msa``, ``stem``)
when named, as a report. Measured 2026-12-07 (``benchmarks/results/scale_agreement.json``):
on the tuning sets the fallback's frames scored lower (EMPS tuning papers 0.78 against 0.95,
synthetic tuning frames 0.41 against 0.87), on the held-out sets not (EMPS validation 0.70
against 0.62, NFFA 0.80 against 0.34: passes that agree on specks or grains), so no warning
is built on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.noise_stress import (
    STEM_SETS,
    _samples,
    add_model_arguments,
    check_model,
    run_header,
)

TUNING_SETS = ("emps-tune", "msa-tune", "synthetic-tune", "stem-train")
GROUPS = {True: "agreed", False: "fallback", None: "nothing found"}


def _pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    return {"frames": len(rows), "tp": tp, "fp": fp, "fn": fn,
            "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None}


def run_set(name: str, model: Path | None, threads: int,
            max_images: int | None) -> dict[str, Any]:
    """Score set ``name`` frame by frame; pool the frames by ``Detection.scale_agreed``."""
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
    from nanoscout.engines import create_engine
    from nanoscout.training.evaluate import score_image

    if model is None:
        model = shipped_model_dir() / ("detector_stem.onnx" if name.split(":")[0] in STEM_SETS
                                       else "detector.onnx")
    card = ModelCard.load(model.with_suffix(".json"))
    det = Detector(create_engine(model, "onnxruntime-cpu", threads=threads), card)
    frames = []
    for s in _samples(name, max_images):
        found = det.detect(s.image)
        r = score_image(found.labels, true_labels=s.labels, true_boxes=s.boxes)
        frames.append({"id": s.id, "scale_agreed": found.scale_agreed,
                       "scale": round(found.scale, 4), "tp": r["tp"], "fp": r["fp"],
                       "fn": r["fn"]})
    return {"model": f"{card.name}:{card.version}", "file": str(model),
            "all": _pooled(frames),
            **{label: _pooled([f for f in frames if f["scale_agreed"] is flag])
               for flag, label in GROUPS.items()},
            "frames": frames}


def main(argv: list[str] | None = None) -> None:
    """Command line: run the listed sets and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_agreement.json"))
    ap.add_argument("--sets", default=",".join(TUNING_SETS),
                    help="comma-separated sets of nanoscout.training.evaluate, or stem-train")
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    if not sets:
        raise SystemExit("name at least one set")
    check_model(args.model)
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {**run_header("scale_agreement", given, args.threads, sets),
                           "sets": {}}
    for name in sets:
        res["sets"][name] = out = run_set(name, args.model, args.threads, args.max_images)
        print(f"{name}: all {out['all']['f1']} ({out['all']['frames']} frames); agreed "
              f"{out['agreed']['f1']} ({out['agreed']['frames']}); fallback "
              f"{out['fallback']['f1']} ({out['fallback']['frames']}); nothing found "
              f"{out['nothing found']['frames']}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
