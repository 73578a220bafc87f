"""What Python's cyclic garbage collector costs the daemon's frames: as Python sets it up,
with ``gc.freeze()`` after start-up only, and as ``nanoscout serve`` runs it
(:func:`nanoscout.daemon.collector.settle`: frozen, and full collections rare), in one process.

::

    python -m benchmarks.gc_freeze --out benchmarks/results/gc_freeze.json
    python -m benchmarks.gc_freeze --size 4096 --block 8 --rounds 2 \
        --out benchmarks/results/gc_freeze_4096.json

The daemon's pipeline (default configuration, 1 engine thread) is built in this process and
analyses a stream of ``--size``² TEM frames (the latency benchmark's specimen, a few px of drift
per frame; ~700 particles at 1024², ~10,000 at 4096²), frame after frame as the daemon's worker
does. Blocks of ``--block`` frames take the settings in turn, ``--rounds`` times each, so all
see the same machine. Per frame it records the whole ``Pipeline.process`` time, its tracking
stage, and the time spent inside the collector (``gc.callbacks``), per generation. The first
block of each setting is a warm-up and is not counted.
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

SETTINGS = ("python_default", "freeze_only", "daemon")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from nanoscout.analysis.frame import Frame
    from nanoscout.daemon import collector
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import ServeConfig

    pipe = build_pipeline(ServeConfig.model_validate({"engine": {"threads": args.threads}}))
    images = [np.ascontiguousarray(e.image) for e in render_exposures(args.size, args.frames, 7)]
    python_default = gc.get_threshold()
    # time spent in the collector (s) and collections, per generation
    gc_t0 = [0.0]
    gc_s = [0.0, 0.0, 0.0]
    gc_n = [0, 0, 0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            g = info["generation"]
            gc_s[g] += time.perf_counter() - gc_t0[0]
            gc_n[g] += 1

    gc.callbacks.append(on_gc)
    seen: dict[str, dict[str, list[float]]] = {
        s: {"process_ms": [], "track_ms": [], "gc_ms": [], "gc2_ms": []} for s in SETTINGS}
    collections = {s: [0, 0, 0] for s in SETTINGS}
    k = 0
    try:
        for rnd in range(args.rounds + 1):
            for setting in SETTINGS:
                collector.reset(python_default)
                gc.collect()
                if setting == "freeze_only":
                    gc.freeze()
                elif setting == "daemon":
                    collector.settle()
                for _ in range(args.block):
                    frame = Frame.from_image(images[k % len(images)], pixel_size_nm=0.5,
                                             source="bench", modality="TEM")
                    k += 1
                    before_s, before_n = list(gc_s), list(gc_n)
                    t0 = time.perf_counter()
                    result = pipe.process(frame)
                    dt = (time.perf_counter() - t0) * 1e3
                    if rnd == 0:
                        continue  # warm-up block
                    d = [(a - b) * 1e3 for a, b in zip(gc_s, before_s, strict=True)]
                    seen[setting]["process_ms"].append(dt)
                    seen[setting]["track_ms"].append(result.stage_ms.get("track", 0.0))
                    seen[setting]["gc_ms"].append(sum(d))
                    seen[setting]["gc2_ms"].append(d[2])
                    for g in range(3):
                        collections[setting][g] += gc_n[g] - before_n[g]
    finally:
        gc.callbacks.remove(on_gc)
        collector.reset(python_default)
        pipe.close()
    out: dict[str, Any] = {}
    for s in SETTINGS:
        n = len(seen[s]["process_ms"])
        out[s] = {
            "frames": n,
            "process_ms": summary(seen[s]["process_ms"]),
            "track_ms": summary(seen[s]["track_ms"]),
            "gc_ms_per_frame_mean": round(float(np.mean(seen[s]["gc_ms"])), 3),
            "gc_generation2_ms": summary([v for v in seen[s]["gc2_ms"] if v > 0]),
            "collections_per_100_frames": [round(100 * c / max(n, 1), 2)
                                           for c in collections[s]],
        }
    a = out["python_default"]
    for s in SETTINGS[1:]:
        out[f"ratio_{s}_over_python_default"] = {
            **{q: round(out[s]["process_ms"][q] / a["process_ms"][q], 3)
               for q in ("p50", "p99", "max", "mean")},
            "track_p50": round(out[s]["track_ms"]["p50"] / a["track_ms"]["p50"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="frame side, px (default 1024)")
    ap.add_argument("--block", type=int, default=60, help="frames per block (default 60)")
    ap.add_argument("--rounds", type=int, default=3, help="counted blocks per setting")
    ap.add_argument("--frames", type=int, default=8, help="distinct exposures in the stream")
    ap.add_argument("--threads", type=int, default=1, help="engine threads (default 1)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gc_freeze.json"))
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": f"the garbage collector's cost: Pipeline.process per {args.size}² frame",
        "command": "python -m benchmarks.gc_freeze " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(), "config": vars(args) | {"out": str(args.out)}}
    report.update(run(args))
    _write(args.out, report)
    for s in SETTINGS:
        r = report[s]
        print(f"{s:15s} p50 {r['process_ms']['p50']:7.1f} ms  p99 {r['process_ms']['p99']:7.1f}"
              f" ms  max {r['process_ms']['max']:7.1f} ms  track p50 {r['track_ms']['p50']:6.1f}"
              f" ms  gc {r['gc_ms_per_frame_mean']:.2f} ms/frame  full collections "
              f"{r['gc_generation2_ms']['n']} (p50 {r['gc_generation2_ms']['p50']} ms)")
    for s in SETTINGS[1:]:
        print(f"{s} / python_default:", report[f"ratio_{s}_over_python_default"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
