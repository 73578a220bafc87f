"""The live tracker's linker (:class:`nanoscout.analysis.linking.FrameLinker`) against trackpy's
online ``Linker``, whose rule it implements, in one run.

::

    python -m benchmarks.linking --out benchmarks/results/linking.json

Streams of particle positions as a drift-corrected live stream gives them to the linker: ~700
particles in a 1024 px field (the latency benchmark's 1024² frame) and ~10,000 in a 4096 px
field, each random-walking by 1 px per frame, 2 % missed on a frame (gap closing, memory 2),
a few replaced per frame; search range 8 px (the tracker's 0.75 x a ~10 px diameter). Both
linkers see the same frames, interleaved frame by frame, and must give the same tracks (the
JSON says whether they did); per frame time p50 and the ratio trackpy / FrameLinker.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.latency import _write, machine_info, summary  # noqa: E402

#: (particles, field side px) per case
CASES = ((700, 1024.0), (10_000, 4096.0))
STEP_PX = 1.0
MISS_P = 0.02
REACH_PX = 8.0
MEMORY = 2


def _stream(n: int, side: float, frames: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, side, (n, 2))
    out = []
    for _ in range(frames):
        pos += rng.normal(0, STEP_PX, pos.shape)
        gone = rng.choice(n, max(1, n // 200), replace=False)
        pos[gone] = rng.uniform(0, side, (gone.size, 2))
        seen = rng.random(n) >= MISS_P
        out.append(pos[seen].copy())
    return out


def _canonical(ids: list[list[int]]) -> list[list[tuple[int, int]]]:
    first: dict[int, tuple[int, int]] = {}
    return [[first.setdefault(int(t), (f, i)) for i, t in enumerate(frame)]
            for f, frame in enumerate(ids)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from trackpy.linking.linking import Linker

    from nanoscout.analysis.linking import FrameLinker

    cases = {}
    for n, side in CASES:
        frames = _stream(n, side, args.frames, seed=n)
        ours, theirs = FrameLinker(MEMORY), Linker(REACH_PX, memory=MEMORY)
        t_ours: list[float] = []
        t_theirs: list[float] = []
        ids_ours: list[list[int]] = []
        ids_theirs: list[list[int]] = []
        for t, pos in enumerate(frames):
            t0 = time.perf_counter()
            if t == 0:
                theirs.init_level(pos, t)
            else:
                theirs.next_level(pos, t)
            t1 = time.perf_counter()
            ids_ours.append(ours.link(pos, REACH_PX).tolist())
            t2 = time.perf_counter()
            ids_theirs.append(theirs.particle_ids)
            if t > 0:  # the first frame links nothing
                t_theirs.append((t1 - t0) * 1e3)
                t_ours.append((t2 - t1) * 1e3)
        a, b = summary(t_ours), summary(t_theirs)
        cases[str(n)] = {"particles": n, "field_px": side, "frames": args.frames,
                         "frame_linker_ms": a, "trackpy_ms": b,
                         "ratio_trackpy_over_frame_linker_p50": round(b["p50"] / a["p50"], 2),
                         "same_tracks": _canonical(ids_ours) == _canonical(ids_theirs)}
        print(f"{n} particles: FrameLinker {a['p50']} ms, trackpy {b['p50']} ms, "
              f"same tracks: {cases[str(n)]['same_tracks']}", flush=True)
    return {"benchmark": "frame-to-frame linking: analysis.linking.FrameLinker vs trackpy's "
                         "online Linker, same frames, interleaved",
            "command": " ".join(["python -m benchmarks.linking", *sys.argv[1:]]),
            "machine": machine_info(),
            "config": {"step_px": STEP_PX, "miss_p": MISS_P, "search_range_px": REACH_PX,
                       "memory": MEMORY},
            "cases": cases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=40)
    args = p.parse_args(argv)
    report = run(args)
    _write(args.out, report)
    print(f"wrote {args.out}")
    return 0 if all(c["same_tracks"] for c in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
