"""What an adapted model's base network should do beside it, in one run.

::

    python -m benchmarks.adapt_base_network --out benchmarks/results/adapt_base_network.json

A network fine-tuned on one annotated frame (``nanoscout models adapt``) outlines particles
like the ones it was shown, but the automatic working scale runs it on coarse thumbnails and
on other magnifications too, where it was not retrained, and it may forget particles the base
network found. This benchmark adapts on the first image of each *tuning* case
(``--fine-tuned-only``, so the output is a fine-tuned network whatever the held-out half says;
``--guard freeze``, ``--minutes`` each, 1 thread) and scores the case's other images four ways
(IoU >= 0.5, box IoU for STEM boxes, as :mod:`benchmarks.adapt` scores):

* ``base``: the base detector as shipped;
* ``self``: the fine-tuned network measuring particle sizes itself (its card without
  ``base_network``: how adapted models ran before);
* ``base_measures``: the base network measuring them (``base_network``,
  :class:`nanoscout.analysis.modelcard.BaseNetwork`);
* ``merged``: as ``base_measures``, and the base network's particles merged in by score
  (``base_network.merge``).

Each fine-tuned network keeps the scale candidate and cut that ``models adapt`` chose for it
on the held-out half of its image (``adaptation``: which of its candidates won there).
Cases (never held out): the STEM tuning material (Pt) and the STEM training materials Cu and
PtW with the STEM detector as the base, and every EMPS tuning paper with at least two images
with the general detector. The held-out sets are not run here (:mod:`benchmarks.adapt`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.adapt import adapt_on

METHODS = ("base", "self", "base_measures", "merged")


def _cases() -> list[dict[str, Any]]:
    """Return the tuning cases: {key, samples (first adapted on), base (file in weights)}."""
    from nanoscout.training import realdata as rd

    out: list[dict[str, Any]] = []
    sets = rd.available_sets()
    if "stem" in sets:
        out.append({"key": "stem-tune/Pt", "base": "detector_stem.onnx",
                    "samples": [rd.load_stem(n) for n in rd.stem_tuning_names()]})
        train = [str(n) for n in rd.load_split("stem")["train"]]  # type: ignore[union-attr]
        for mat in ("Cu", "PtW"):
            out.append({"key": f"stem-train/{mat}", "base": "detector_stem.onnx",
                        "samples": [rd.load_stem(n) for n in train
                                    if rd.stem_material(n) == mat]})
    if "emps" in sets:
        dois = dict(rd.emps_index())
        by: dict[str, list[str]] = defaultdict(list)
        for i in rd.emps_tuning_ids():
            by[dois[i]].append(i)
        for d in sorted(by):
            if len(by[d]) >= 2:
                out.append({"key": f"emps-tune/{d}", "base": "detector.onnx",
                            "samples": [rd.load_emps(i, None, d) for i in by[d]]})
    return out


def _methods(base: Path, adapted: Path) -> dict[str, Any]:
    """The four detectors of the module docstring: the fine-tuned network ``adapted`` with its
    chosen scale candidate and cut, measured by itself or by the base network ``base``."""
    from nanoscout.analysis.detector import Detector, load_detector
    from nanoscout.analysis.modelcard import BaseNetwork, ModelCard
    from nanoscout.engines import create_engine

    def engine(p: Path) -> Any:
        return create_engine(p, "onnxruntime-cpu", threads=1)

    base_card = ModelCard.load(base.with_suffix(".json"))
    raw = base_card.model_copy(update={"score_calibration": None})  # merged by raw score
    alone = ModelCard.load(adapted.with_suffix(".json")).model_copy(
        update={"base_network": None})

    def with_base(merge: bool) -> Detector:
        pin = BaseNetwork(onnx_file=base.name, sha256=base_card.sha256, merge=merge)
        return Detector(engine(adapted), alone.model_copy(update={"base_network": pin}),
                        base_detector=Detector(engine(base), raw))

    return {"base": load_detector(base, engine), "self": Detector(engine(adapted), alone),
            "base_measures": with_base(False), "merged": with_base(True)}


def run_case(case: dict[str, Any], minutes: float) -> dict[str, Any]:
    """Adapt on the case's first image (a subprocess), score the four methods on the rest."""
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.training.evaluate import evaluate_set

    base = shipped_model_dir() / case["base"]
    first, rest = case["samples"][0], case["samples"][1:]
    with tempfile.TemporaryDirectory() as tmpd:
        out, wall, error = adapt_on(first, base, Path(tmpd), "freeze", minutes,
                                    ("--fine-tuned-only",))
        if error is not None:
            return error
        methods = _methods(base, out / "detector.onnx")
        try:
            res = evaluate_set(methods, rest)
        finally:
            for det in methods.values():
                det.close()
        card = json.loads((out / "detector.json").read_text())
    return {
        "base": case["base"], "adapt_on": first.id, "scored": [s.id for s in rest],
        "adapt_wall_s": round(wall, 1),
        "adaptation": {k: card["training"]["adaptation"].get(k)
                       for k in ("network", "steps", "working_scale", "min_score")},
        "f1": {m: res["methods"][m]["f1"] for m in METHODS},
        "methods": {m: {k: res["methods"][m][k] for k in ("precision", "recall", "tp", "fp", "fn")}
                    for m in METHODS},
        "per_image": [{"id": r["id"], **{m: {k: r[m][k] for k in ("tp", "fp", "fn", "scale")}
                                         for m in METHODS}} for r in res["images"]],
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: run every tuning case and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/adapt_base_network.json"))
    ap.add_argument("--minutes", type=float, default=2.0, help="adaptation budget per case, min")
    ap.add_argument("--only", default="", help="run only the cases whose key contains this")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    cases = {c["key"]: run_case(c, args.minutes) for c in _cases() if args.only in c["key"]}
    scored = [c for c in cases.values() if "f1" in c and c["scored"]]
    res: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.adapt_base_network", *given]),
        "machine": f"{platform.machine()} CPU, 1 thread",
        "protocol": __doc__.split("\n\n")[2].strip() if __doc__ else "",
        "cases": cases,
        "mean_f1": {m: round(float(np.mean([c["f1"][m] for c in scored])), 4) if scored else None
                    for m in METHODS},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for k, c in cases.items():
        print(k, json.dumps(c.get("f1", c.get("error"))))
    print("mean", json.dumps(res["mean_f1"]))


if __name__ == "__main__":
    main()
