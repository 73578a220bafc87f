"""How many Parquet parts ``nanoscout measure`` writes for an archive, and what they cost to read.

Usage::

    python benchmarks/run_parts.py --out benchmarks/results/run_parts.json
    python benchmarks/run_parts.py --files 300 --repeats 1 --out /tmp/p.json

Writes ``--files`` tiny PNGs (64 x 64 px, into a temporary folder, before any clock starts),
then, in one process on the same files, for each batch size of ``--batch-files`` (default
``1``: one commit per file, as ``measure`` did before 0.2.0, and ``64``: the default,
:data:`nanoscout.batch.offline.BATCH_FILES`):

* ``measure_s``: :func:`nanoscout.batch.offline.measure_files` (wall, s), with a stand-in
  detector (two square particles per image, no network: what is timed is the run, not the
  analysis); it includes the run's close, which reads the run back for its tracks table;
* ``parts``: the Parquet parts written, per table and in all;
* ``read_run_s``: :func:`nanoscout.clients.runfile.read_run` (median of ``--repeats``, s), and
  ``read_run_per_part_s``: the same with the reader before 0.2.0 (one ``pq.read_table`` per
  part, kept verbatim here);
* ``report_s``: :func:`nanoscout.clients.report.build_report` with PNG figures (median, s).

The JSON holds the machine, the command and the git commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class _Detector:
    """Two square particles per image, always: the run's rows without a network's time."""

    def detect(self, pixels: np.ndarray, key: object = None, **_kw: Any) -> SimpleNamespace:
        labels = np.zeros(pixels.shape, np.int32)
        labels[10:20, 10:20] = 1
        labels[30:44, 30:44] = 2
        return SimpleNamespace(labels=labels, scores=np.array([0, 0.95, 0.97], np.float32),
                               timings_ms={"engine": 1.0}, scale=1.0, size_hint=None)


def _per_part(folder: Path, name: str) -> Any:
    """``runfile._read_parts`` as it was before 0.2.0: one ``pq.read_table`` per part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoscout.clients import runfile

    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        return runfile._empty_table(name)
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="permissive")


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def _one(files: Path, tmp: Path, batch_files: int, repeats: int) -> dict[str, Any]:
    from unittest import mock

    from nanoscout.analysis.pipeline import Pipeline
    from nanoscout.batch.offline import measure_files
    from nanoscout.clients import runfile
    from nanoscout.clients.report import build_report

    out = tmp / f"run-{batch_files}.parquet"
    pipe = Pipeline(_Detector())  # type: ignore[arg-type]
    t0 = time.perf_counter()
    rep = measure_files([files], pipe, out, log=lambda _s: None, batch_files=batch_files)
    measure_s = time.perf_counter() - t0
    parts = {t: len(list((out if t == "particles" else out / f"_{t}").glob("part-*.parquet")))
             for t in ("particles", "frames", "alerts", "stats", "tracks")}
    read_s = _median_s(lambda: runfile.read_run(out), repeats)
    with mock.patch.object(runfile, "_read_parts", _per_part):
        legacy_s = _median_s(lambda: runfile.read_run(out), repeats)
    html = tmp / f"report-{batch_files}.html"
    report_s = _median_s(lambda: build_report(out, html, formats=("png",)), repeats)
    return {"batch_files": batch_files, "images": rep.images, "measure_s": round(measure_s, 3),
            "parts": parts, "parts_total": sum(parts.values()), "read_run_s": read_s,
            "read_run_per_part_s": legacy_s, "report_s": report_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--batch-files", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="nanoscout-parts-") as d:
        tmp = Path(d)
        files = tmp / "in"
        files.mkdir()
        img = np.full((64, 64), 40, np.uint8)
        img[10:20, 10:20] = img[30:44, 30:44] = 200
        for k in range(args.files):
            Image.fromarray(img).save(files / f"img_{k:05d}.png")
        runs = [_one(files, tmp, b, args.repeats) for b in args.batch_files]
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "files": args.files, "repeats": args.repeats, "runs": runs,
              "machine": {"platform": platform.platform(),
                          "python": platform.python_version(), "git_commit": commit}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
