"""Time the particle measurement (``nanoscout.analysis.measure.measure``) on label maps of disks.

    python benchmarks/measure.py --out benchmarks/results/measure.json

Wall time (min / median / max) and the median CPU time of the measuring thread, ms, for 300,
700 and 1000 disks of 16 px on a 1024 x 1024 map (on a shared machine the CPU time shows the
cost without scheduler waits), and the share of it spent counting the diagonal pixel pairs of
the Crofton perimeter (``diagonal_share``: their median CPU time over measure's, same run).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

# the perimeter's diagonal pass is timed alone
from nanoscout.analysis.measure import _diagonal_transitions, measure  # noqa: PLC2701
from nanoscout.sim.labels import disk_labels


def benchmark(
    shape: tuple[int, int] = (1024, 1024),
    n_particles: int = 300,
    diameter_px: float = 16.0,
    repeats: int = 30,
) -> dict[str, float]:
    """Time :func:`measure` on a synthetic map of disks.

    Returns the particle count and min/median/max wall time plus the median CPU time of this
    thread, in ms (on a shared machine the CPU time shows the cost without scheduler waits).
    """
    labels = disk_labels(shape, n_particles, diameter_px)
    measure(labels, 1.0)  # warm caches and lazy imports
    ids = np.unique(labels)[1:]
    wall, cpu, diag = [], [], []
    for _ in range(repeats):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        measure(labels, 1.0)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
        c0 = time.thread_time()
        _diagonal_transitions(labels, ids)
        diag.append((time.thread_time() - c0) * 1e3)
    return {
        "particles": float(labels.max()),
        "min_ms": float(np.min(wall)),
        "median_ms": float(np.median(wall)),
        "max_ms": float(np.max(wall)),
        "cpu_median_ms": float(np.median(cpu)),
        "diagonal_share": float(np.median(diag) / np.median(cpu)),
    }




def main(argv: list[str] | None = None) -> int:
    """Run the timings and write the JSON."""
    ap = argparse.ArgumentParser(description="time the particle measurement")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/measure.json"))
    args = ap.parse_args(argv)
    result = {"benchmark": "measure", "command": " ".join(["python benchmarks/measure.py",
                                                           *sys.argv[1:]]),
              "machine": platform.platform(),
              "runs": [benchmark(n_particles=n) for n in (300, 700, 1000)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
