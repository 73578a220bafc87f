"""Engine time of the shipped detectors against detector 3.0, measured in the same run.

::

    python -m benchmarks.engine_time --out benchmarks/results/engine_time.json

Detector 3.0's ONNX file and card are taken from git (``--baseline-rev``, default the last
commit that shipped it), so both are timed on the same machine, at the same load, back to
back: ONNX Runtime CPU, 2 intra-op threads (``--threads``), one 1024 x 1024 input (the
network alone, median of ``--repeats`` runs after two warm-ups), interleaved model by model so
a load change hits all alike; and the whole ``Detector.detect`` (fixed scale 1, so every
model runs one full pass) on a held-out synthetic 1024 x 1024 TEM frame, reporting its
``engine`` stage. The issue's budget: the CPU default at most 2 x detector 3.0's engine time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BASELINE_REV = "5661ada"


def _from_git(rev: str, path: str, out: Path) -> Path:
    out.write_bytes(subprocess.run(["git", "show", f"{rev}:{path}"], check=True,
                                   capture_output=True).stdout)
    return out


def measure(models: dict[str, Path], repeats: int = 15, size: int = 1024, threads: int = 2
            ) -> dict[str, Any]:
    """Return per model {network_ms (median), network_ms_min, detect_engine_ms (median),
    detect_total_ms (median)} and the ratios to the first model."""
    import onnxruntime as ort

    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import create_engine
    from nanoscout.sim.synthetic import Specimen, SpecimenConfig

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the daemon
    sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            for k, p in models.items()}
    x = np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)
    for s in sess.values():
        for _ in range(2):
            s.run(None, {"image": x})
    net: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(None, {"image": x})
            net[k].append((time.perf_counter() - t0) * 1e3)
    fr = Specimen.generate(SpecimenConfig(shape=(size, size), coverage=0.15), 999_000 + size
                           ).acquire(np.random.default_rng(999_000))
    dets = {k: Detector(create_engine(p, "onnxruntime-cpu", threads=threads),
                        ModelCard.load(p.with_suffix(".json")), scale=1.0)
            for k, p in models.items()}
    for d in dets.values():
        d.detect(fr.image)
    eng: dict[str, list[float]] = {k: [] for k in models}
    tot: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(max(5, repeats // 2)):
        for k, d in dets.items():
            t0 = time.perf_counter()
            r = d.detect(fr.image)
            tot[k].append((time.perf_counter() - t0) * 1e3)
            eng[k].append(r.timings_ms["engine"])
    first = next(iter(models))
    out: dict[str, Any] = {}
    for k in models:
        out[k] = {"file": str(models[k]),
                  "network_ms": round(float(np.median(net[k])), 1),
                  "network_ms_min": round(float(np.min(net[k])), 1),
                  "detect_engine_ms": round(float(np.median(eng[k])), 1),
                  "detect_total_ms": round(float(np.median(tot[k])), 1)}
    for k in models:
        out[k]["network_ratio_to_" + first] = round(out[k]["network_ms"] / out[first]["network_ms"],
                                                    3)
        out[k]["engine_ratio_to_" + first] = round(
            out[k]["detect_engine_ms"] / out[first]["detect_engine_ms"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: time detector 3.0 (from git) and the given / shipped detectors."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_time.json"))
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--models", default="models/weights/detector.onnx,"
                                        "models/weights/detector_stem.onnx",
                    help="comma list of ONNX files (card beside each), e.g. a deep candidate "
                         "exported by nanoscout models export")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = _from_git(args.baseline_rev, "models/weights/detector.onnx", d / "detector.onnx")
        _from_git(args.baseline_rev, "models/weights/detector.json", d / "detector.json")
        models = {"detector 3.0 (" + args.baseline_rev + ")": base}
        for p in (Path(x) for x in args.models.split(",") if x):
            models[str(p)] = p
        t0 = time.perf_counter()
        given = sys.argv[1:] if argv is None else argv
        res = {"command": " ".join(["python -m benchmarks.engine_time", *given]),
               "machine": f"{platform.machine()} CPU, ONNX Runtime {args.threads} intra-op "
                          "threads",
               "input": "1024 x 1024",
               "models": measure(models, args.repeats, threads=args.threads),
               "seconds": 0.0}
        res["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
