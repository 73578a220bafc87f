"""What Python's cyclic garbage collector costs the daemon's frames, with and without
``gc.freeze()`` after start-up (what ``nanoscout serve`` does), measured in one process.

::

    python -m benchmarks.gc_freeze --out benchmarks/results/gc_freeze.json

The daemon's pipeline (default configuration, 1 engine thread) is built in this process and
analyses a stream of 1024² TEM frames (the latency benchmark's specimen, a few px of drift per
frame, ~700 particles each), frame after frame as the daemon's worker does. Blocks of
``--block`` frames alternate between the two settings (``gc.freeze()`` / ``gc.unfreeze()``
between blocks), ``--rounds`` times each, so both see the same machine. Per frame it records the
whole ``Pipeline.process`` time and the time spent inside the collector (``gc.callbacks``), per
generation. The first block of each setting is a warm-up and is not counted.

Without freezing, every full (generation 2) collection walks every object start-up made
(modules, the models' Python side, pydantic schemas: ~240,000 objects), and the many small
objects of tracking (trackpy's points) trigger one every few dozen frames.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.latency import _write, machine_info, render_exposures, summary  # noqa: E402

SETTINGS = ("no_freeze", "freeze")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from nanoscout.analysis.frame import Frame
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import ServeConfig

    pipe = build_pipeline(ServeConfig.model_validate({"engine": {"threads": args.threads}}))
    images = [np.ascontiguousarray(e.image) for e in render_exposures(1024, args.frames, 7)]
    in_gc = {"t0": 0.0, "s": [0.0, 0.0, 0.0], "n": [0, 0, 0]}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            in_gc["t0"] = time.perf_counter()
        else:
            g = info["generation"]
            in_gc["s"][g] += time.perf_counter() - in_gc["t0"]
            in_gc["n"][g] += 1

    gc.callbacks.append(on_gc)
    seen: dict[str, dict[str, list[float]]] = {
        s: {"process_ms": [], "gc_ms": [], "gc2_ms": []} for s in SETTINGS}
    collections = {s: [0, 0, 0] for s in SETTINGS}
    k = 0
    try:
        for rnd in range(args.rounds + 1):
            for setting in SETTINGS:
                gc.unfreeze()
                gc.collect()
                if setting == "freeze":
                    gc.freeze()
                for _ in range(args.block):
                    frame = Frame.from_image(images[k % len(images)], pixel_size_nm=0.5,
                                             source="bench", modality="TEM")
                    k += 1
                    before_s, before_n = list(in_gc["s"]), list(in_gc["n"])
                    t0 = time.perf_counter()
                    pipe.process(frame)
                    dt = (time.perf_counter() - t0) * 1e3
                    if rnd == 0:
                        continue  # warm-up block
                    d = [(a - b) * 1e3 for a, b in zip(in_gc["s"], before_s)]
                    seen[setting]["process_ms"].append(dt)
                    seen[setting]["gc_ms"].append(sum(d))
                    seen[setting]["gc2_ms"].append(d[2])
                    for g in range(3):
                        collections[setting][g] += in_gc["n"][g] - before_n[g]
    finally:
        gc.callbacks.remove(on_gc)
        gc.unfreeze()
        pipe.close()
    out: dict[str, Any] = {}
    for s in SETTINGS:
        n = len(seen[s]["process_ms"])
        out[s] = {
            "frames": n,
            "process_ms": summary(seen[s]["process_ms"]),
            "gc_ms_per_frame_mean": round(float(np.mean(seen[s]["gc_ms"])), 3),
            "gc_generation2_ms": summary([v for v in seen[s]["gc2_ms"] if v > 0]),
            "collections_per_100_frames": [round(100 * c / max(n, 1), 2)
                                           for c in collections[s]],
        }
    a, b = out["no_freeze"]["process_ms"], out["freeze"]["process_ms"]
    out["ratio_freeze_over_no_freeze"] = {
        q: round(b[q] / a[q], 3) for q in ("p50", "p99", "max", "mean")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block", type=int, default=60, help="frames per block (default 60)")
    ap.add_argument("--rounds", type=int, default=3, help="counted blocks per setting")
    ap.add_argument("--frames", type=int, default=8, help="distinct exposures in the stream")
    ap.add_argument("--threads", type=int, default=1, help="engine threads (default 1)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gc_freeze.json"))
    args = ap.parse_args(argv)
    report = {"benchmark": "gc.freeze() after start-up: Pipeline.process per 1024² frame",
              "command": "python -m benchmarks.gc_freeze " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(), "config": vars(args) | {"out": str(args.out)}}
    report.update(run(args))
    _write(args.out, report)
    for s in SETTINGS:
        r = report[s]
        print(f"{s:10s} p50 {r['process_ms']['p50']:7.1f} ms  p99 {r['process_ms']['p99']:7.1f} ms"
              f"  max {r['process_ms']['max']:7.1f} ms  gc {r['gc_ms_per_frame_mean']:.2f} ms/frame"
              f"  full collections {r['gc_generation2_ms']['n']}"
              f" (p50 {r['gc_generation2_ms']['p50']} ms)")
    print("freeze / no freeze:", report["ratio_freeze_over_no_freeze"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
