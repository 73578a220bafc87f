"""How fast a recorded run reads back: ``read_run`` (pyarrow) against the first reader.

Usage::

    python benchmarks/runfile.py --out benchmarks/results/runfile.json
    python benchmarks/runfile.py --frames 200 --particles 500 --repeats 3 --out /tmp/r.json

Writes one run with :class:`nanoscout.clients.runfile.RunWriter` (``--frames`` frames of
``--particles`` particles, flushed every 20 frames like ``nanoscout record``'s default, into a
temporary folder, before any clock starts), then times, ``--repeats`` times each, in one
process on one run:

* ``read_run``: :func:`nanoscout.clients.runfile.read_run` (pyarrow Tables, schema cast,
  crash-consistency filter) and its ``to_pandas()``;
* ``pyarrow``: ``pyarrow.parquet.read_table(RUN)`` of the particle parts alone (the floor);
* ``pandas``: ``pandas.read_parquet(RUN)`` (what a user types);
* ``legacy``: the first reader, kept here verbatim for the comparison: ``read_table(part)
  .to_pydict()`` per part, Python lists, one ``np.asarray`` per column (the particle and frame
  tables, as it read them).

It reports the median wall time of each (s), rows per second, and the ratios legacy /
read_run in the same run. The JSON holds the machine, the command and the git commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _write_run(out: Path, frames: int, particles: int) -> int:
    from nanoscout.clients.runfile import RunWriter
    from nanoscout.wire.particles import empty_table
    from nanoscout.wire.protocol import DetHeader, Stage

    rng = np.random.default_rng(0)
    w = RunWriter(out, {"benchmark": True})
    t0 = 1_700_000_000_000_000_000
    for seq in range(frames):
        t = empty_table(particles)
        t["id"] = np.arange(1, particles + 1)
        t["x"], t["y"] = rng.uniform(0, 1024, (2, particles))
        t["ecd_nm"] = rng.lognormal(2.0, 0.3, particles)
        t["area_nm2"] = np.pi * (t["ecd_nm"] / 2) ** 2
        t["aspect_ratio"] = 1 + rng.exponential(0.2, particles)
        t["bbox"] = rng.integers(0, 1024, (particles, 4))
        t["shape_class"] = rng.integers(1, 7, particles)
        h = DetHeader(source="cam", seq=seq, t_acq_ns=t0 + seq * 10**8, t_recv_ns=t0 + seq * 10**8,
                      t_done_ns=t0 + seq * 10**8 + 10**7, stage_ms={}, pixel_size_nm=0.5,
                      units="nm", n=particles, engine="onnxruntime-cpu", model="m:1",
                      shape=(1024, 1024), stage=Stage(x_um=0.0, y_um=0.0),
                      meta={"file": f"f{seq}.dm4"})
        w.add_det(h, t)
        if w.pending_frames >= 20:
            w.flush()
    w.close()
    return frames * particles


def _legacy_read(run: Path) -> dict[str, dict[str, np.ndarray]]:
    """The first ``read_run``'s Parquet path, as it was (per part to_pydict, lists, asarray)."""
    import pyarrow.parquet as pq

    from nanoscout.clients.runfile import FRAME_COLUMNS, PARTICLE_COLUMNS

    out = {}
    for name, folder, cols in (("particles", run, PARTICLE_COLUMNS),
                               ("frames", run / "_frames", FRAME_COLUMNS)):
        data: dict[str, list[Any]] = {c: [] for c in cols}
        for part in sorted(folder.glob("part-*.parquet")):
            t = pq.read_table(part)
            d = t.to_pydict()
            for c in cols:
                data[c].extend(d.get(c, [None] * t.num_rows))
        table: dict[str, np.ndarray] = {}
        for c in cols:
            vals = data[c]
            if c in ("source", "units", "shape_class", "file", "modality", "engine", "model",
                     "meta"):
                table[c] = np.asarray(vals, dtype=object)
            elif c in ("border",):
                table[c] = np.asarray(vals, bool)
            else:
                table[c] = np.asarray([math.nan if v is None else v for v in vals])
        out[name] = table
    return out


def _time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--particles", type=int, default=500, help="particles per frame")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import pandas as pd
    import pyarrow.parquet as pq

    from nanoscout.clients.runfile import read_run

    with tempfile.TemporaryDirectory(prefix="nanoscout-runbench-") as tmp:
        run = Path(tmp) / "run.parquet"
        t0 = time.perf_counter()
        rows = _write_run(run, args.frames, args.particles)
        write_s = time.perf_counter() - t0
        read_run(run)  # warm the page cache and imports
        timings = {
            "read_run": _time(lambda: read_run(run), args.repeats),
            "read_run_to_pandas": _time(lambda: read_run(run).to_pandas(), args.repeats),
            "read_run_numpy_columns": _time(lambda: read_run(run).particles, args.repeats),
            "pyarrow_read_table": _time(lambda: pq.read_table(run), args.repeats),
            "pandas_read_parquet": _time(lambda: pd.read_parquet(run), args.repeats),
            "legacy": _time(lambda: _legacy_read(run), args.repeats),
        }
        assert pd.read_parquet(run).shape[0] == rows == read_run(run).to_arrow().num_rows
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "command": " ".join(sys.argv),
        "utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor(), "git_commit": commit},
        "run": {"frames": args.frames, "particles_per_frame": args.particles, "rows": rows,
                "write_s": round(write_s, 3)},
        "median_s": {k: round(v, 4) for k, v in timings.items()},
        "rows_per_s": {k: round(rows / v) for k, v in timings.items()},
        "ratios": {"legacy_over_read_run": round(timings["legacy"] / timings["read_run"], 2),
                   "legacy_over_read_run_numpy": round(
                       timings["legacy"] / timings["read_run_numpy_columns"], 2),
                   "read_run_over_pyarrow": round(
                       timings["read_run"] / timings["pyarrow_read_table"], 2)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"median_s": result["median_s"], "ratios": result["ratios"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
