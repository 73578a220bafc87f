"""``nanoscout measure --ray`` against the single-process ``nanoscout measure`` on 200 frames.

Usage::

    python benchmarks/ray_measure.py --out benchmarks/results/ray_measure.json
    python benchmarks/ray_measure.py --frames 40 --size 512 --out /tmp/ray.json

Frames: ``--frames`` synthetic TEM exposures (uint16, ``--size``² px, 0.5 nm/px, ImageJ TIFF with
its calibration) of two specimens in two folders, written before any clock starts.

Measured, in one run on this machine:

* ``command_runs``: wall time of the real commands as a user runs them, each a fresh process,
  ``--repeats`` times each in ABBA order (single, Ray, Ray, single):
  ``python -m nanoscout measure FILES --out single.parquet`` (one process; ONNX Runtime on
  every core) and ``python -m nanoscout measure FILES --ray --out parts/`` (a local Ray started
  by the command with one pipeline actor per core, one ONNX Runtime thread each). Start-up
  (models, Ray) included; ``speedup`` = single / ray. The target is >= 1.6.
* ``steady``: the same two paths in this process, with start-up excluded:
  ``measure_files`` after the pipeline is built, and ``measure_on_ray`` from the moment its
  actors are up (``on_started``) to the end, on a Ray this process started (``num_cpus`` =
  cores). ``single_one_thread_s`` is ``measure_files`` with one ONNX Runtime thread (what each
  actor runs); ``ceiling_speedup`` = single / (one-thread / cores) is the most that spreading
  whole files over the cores can gain over a single process that already runs ONNX Runtime on
  every core.
* ``identical``: the particle tables of the two commands compared column by column (after
  sorting by file, image, particle id; types cast to the run's), every column but
  ``cluster`` (an online k-means over the single process's ordered stream; the parallel path
  leaves it unassigned).

The load average and ``available_cores`` (CPU seconds per wall second that one busy process
per core gets, 2.0 on an idle 2-core machine) at start and end are recorded: other work on the
machine slows both paths, and takes away exactly the parallelism that Ray is meant to use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.latency import machine_info  # noqa: E402
from nanoscout.sim.synthetic import Specimen, SpecimenConfig  # noqa: E402


def write_frames(root: Path, n: int, size: int) -> list[Path]:
    """``n`` calibrated TIFF frames in ``root/specimen-a`` and ``root/specimen-b``."""
    import tifffile

    paths = []
    for folder, seed, count in (("specimen-a", 1, n // 2), ("specimen-b", 2, n - n // 2)):
        (root / folder).mkdir(parents=True)
        cfg = replace(SpecimenConfig(), shape=(size, size), dtype="uint16", pixel_size_nm=0.5)
        specimen = Specimen.generate(cfg, seed)
        rng = np.random.default_rng(seed)
        for k in range(count):
            img = specimen.acquire(rng, shift_px=(2.0 * k, -1.5 * k)).image
            path = root / folder / f"frame_{k:04d}.tif"
            tifffile.imwrite(path, img, imagej=True, resolution=(2000.0, 2000.0),
                             metadata={"unit": "micron"})
            paths.append(path)
    return paths


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def available_cores(seconds: float = 3.0) -> float:
    """How many cores this benchmark gets now: CPU seconds that one busy process per core
    receives per wall second (2.0 on an idle 2-core machine; less while others compute)."""
    import multiprocessing as mp
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [mp.Process(target=_spin, args=(seconds,)) for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return round(cpu / (time.perf_counter() - t0), 2)


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd``; returns (wall s, stdout). Raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:5]}... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc.stdout


def compare(single: Path, parts: Path) -> dict[str, Any]:
    """Row counts and whether every particle column (but ``cluster``, an online k-means over
    the single process's stream that the parallel path leaves unassigned) is identical."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from nanoscout.clients.runfile import read_run
    from nanoscout.wire.tables import PARTICLE_TABLE_COLUMNS

    columns = ["file", "index", "units", *(c for c in PARTICLE_TABLE_COLUMNS if c != "cluster")]
    key = [("file", "ascending"), ("index", "ascending"), ("id", "ascending")]
    want = read_run(single).to_arrow("particles").select(columns).sort_by(key)
    got = ds.dataset(parts / "particles", partitioning="hive").to_table()
    got = pa.table({c: got.column(c).cast(want.schema.field(c).type)
                    for c in columns}).sort_by(key)
    differ = []
    if got.num_rows != want.num_rows:
        differ = ["(row count)"]
    else:
        for c in columns:
            a, b = got.column(c), want.column(c)
            same = (np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
                    if pa.types.is_floating(a.type) else a.to_pylist() == b.to_pylist())
            if not same:
                differ.append(c)
    return {"rows_single": want.num_rows, "rows_ray": got.num_rows,
            "identical": not differ, "columns_compared": len(columns),
            "columns_differing": differ}


def steady(files: list[Path], work: Path) -> dict[str, Any]:
    """Both paths in this process, start-up excluded (see the module docstring)."""
    import ray

    from nanoscout.batch.offline import measure_files
    from nanoscout.batch.ray_measure import measure_on_ray
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import load_config

    config = load_config(None, {})
    pipeline = build_pipeline(config, offline=True)
    t0 = time.perf_counter()
    measure_files(files, pipeline, work / "steady-single.parquet", log=lambda _: None)
    single_s = time.perf_counter() - t0
    pipeline.close()
    # the same with one ONNX Runtime thread: what one Ray actor does per frame, so
    # cores x this / single is the most any split of files over the cores can gain here
    pipeline = build_pipeline(load_config(None, {"engine.threads": 1}), offline=True)
    t0 = time.perf_counter()
    measure_files(files, pipeline, work / "steady-single-1t.parquet", log=lambda _: None)
    one_thread_s = time.perf_counter() - t0
    pipeline.close()

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    started: list[float] = []
    try:
        t1 = time.perf_counter()
        report = measure_on_ray(files, config, work / "steady-parts",
                                on_started=lambda _: started.append(time.perf_counter()))
        end = time.perf_counter()
    finally:
        ray.shutdown()
    ray_s = end - started[0]
    return {"single_s": round(single_s, 2), "single_one_thread_s": round(one_thread_s, 2),
            "ceiling_speedup": round(single_s / (one_thread_s / cores), 3),
            "ray_s": round(ray_s, 2),
            "ray_actor_start_s": round(started[0] - t1, 2), "workers": report.workers,
            "single_frames_per_s": round(len(files) / single_s, 3),
            "ray_frames_per_s": round(len(files) / ray_s, 3),
            "speedup": round(single_s / ray_s, 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ray-measure-"))
    files = write_frames(work / "frames", args.frames, args.size)
    load_start = os.getloadavg()
    cores_start = available_cores()
    py = [sys.executable, "-m", "nanoscout", "measure", *map(str, files), "--no-progress"]
    # ABBA (single, ray, ray, single, ...): load that drifts over the run hits both alike
    order = ["single", "ray", "ray", "single"] * (args.repeats // 2) + \
        ["single", "ray"] * (args.repeats % 2)
    runs: dict[str, list[float]] = {"single": [], "ray": []}
    last: dict[str, str] = {}
    for k, which in enumerate(order):
        if which == "single":
            wall, out = timed([*py, "--out", str(work / f"single-{k}.parquet")])
        else:
            wall, out = timed([*py, "--ray", "--out", str(work / f"parts-{k}")])
        runs[which].append(round(wall, 2))
        last[which] = out.strip().splitlines()[-1]
    single_s, ray_s = sum(runs["single"]), sum(runs["ray"])
    first_single = next(k for k, w in enumerate(order) if w == "single")
    first_ray = next(k for k, w in enumerate(order) if w == "ray")
    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "frames": {"n": len(files), "size_px": args.size, "dtype": "uint16",
                   "pixel_size_nm": 0.5, "folders": 2, "format": "ImageJ TIFF"},
        "loadavg_at_start": [round(x, 2) for x in load_start],
        "available_cores_at_start": cores_start,
        "command_runs": {
            "order": order,
            "single": {"cmd": "python -m nanoscout measure FILES --out single.parquet",
                       "wall_s": runs["single"],
                       "frames_per_s": round(len(files) * len(runs["single"]) / single_s, 3),
                       "stdout": last["single"]},
            "ray": {"cmd": "python -m nanoscout measure FILES --ray --out parts/",
                    "wall_s": runs["ray"],
                    "frames_per_s": round(len(files) * len(runs["ray"]) / ray_s, 3),
                    "stdout": last["ray"]},
            # total single time / total Ray time over the runs (same number of each)
            "speedup": round(single_s / ray_s, 3),
        },
        "identical": compare(work / f"single-{first_single}.parquet",
                             work / f"parts-{first_ray}"),
    }
    if not args.no_steady:
        result["steady"] = steady(files, work)
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["available_cores_at_end"] = available_cores()
    result["target"] = {"speedup_at_least": 1.6,
                        "command_pass": result["command_runs"]["speedup"] >= 1.6,
                        "identical": result["identical"]["identical"]}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each command, in ABBA order (default 2)")
    p.add_argument("--no-steady", action="store_true", help="only the two commands")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    c = report["command_runs"]
    print(f"available cores {report['available_cores_at_start']} -> "
          f"{report['available_cores_at_end']}")
    print(f"single {c['single']['wall_s']} s, ray {c['ray']['wall_s']} s: speedup "
          f"{c['speedup']}; identical {report['identical']['identical']}")
    if "steady" in report:
        s = report["steady"]
        print(f"steady state: single {s['single_s']} s, ray {s['ray_s']} s: speedup "
              f"{s['speedup']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
