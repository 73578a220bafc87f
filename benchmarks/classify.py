"""Time of the field-of-view classifier and the AI lens per frame, on this machine's CPU.

Usage::

    python benchmarks/classify.py --out benchmarks/results/classify.json
    python benchmarks/classify.py --sizes 1024 --repeats 50 --threads 2 --out /tmp/c.json

The shipped models are loaded exactly as the daemon loads them (``nanoscout.daemon.app.build_classifier``
with the default ``[classify]`` configuration and ``--backend`` / ``--threads``). For each frame
size (square uint16 synthetic TEM frames at 0.5 nm/px from :mod:`nanoscout.sim.synthetic`, rendered
before any clock starts) it times ``FieldClassifier.classify`` ``--repeats`` times after two
warm-up calls and reports, per stage, the median, p90 and p99 in ms:

* ``classify``: the classifier, preprocessing (resample to the model's input size,
  normalisation) included, CAM included;
* ``lens``: the autoencoder's novelty score, its own preprocessing included;
* ``total``: both.

The JSON holds the machine, the command, the models (name, version, sha256) and pass/fail of the
issue-4 target: ``classify`` median ≤ 50 ms on a 1024² frame.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, package installed or not
    sys.path.insert(0, str(REPO))

#: classifier engine time target on a 1024² frame, ms (median, preprocessing included)
TARGET_CLASSIFY_MS = 50.0


def _frames(size: int, n: int) -> list[np.ndarray]:
    from nanoscout.sim.synthetic import Specimen, SpecimenConfig

    spec = Specimen.generate(SpecimenConfig(shape=(size, size), pixel_size_nm=0.5), size)
    return [np.ascontiguousarray(spec.acquire(np.random.default_rng(i)).image) for i in range(n)]


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"median": round(float(np.median(a)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "n": int(a.size)}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(sizes: list[int], repeats: int, backend: str, threads: int | None) -> dict[str, Any]:
    """Time the classifier and lens for each size; returns the JSON-ready result."""
    from nanoscout.daemon.app import build_classifier
    from nanoscout.daemon.config import load_config

    config = load_config(None, {"engine.backend": backend, "engine.threads": threads})
    clf = build_classifier(config)
    if clf is None:
        raise SystemExit("classification is disabled in the configuration")
    results: dict[str, Any] = {}
    for size in sizes:
        frames = _frames(size, 4)
        for f in frames[:2]:
            clf.classify(f)  # warm-up: first runs allocate
        per: dict[str, list[float]] = {"classify": [], "lens": [], "total": []}
        for i in range(repeats):
            t0 = time.perf_counter()
            c = clf.classify(frames[i % len(frames)])
            per["total"].append((time.perf_counter() - t0) * 1e3)
            for k, v in c.timings_ms.items():
                per[k].append(v)
        results[str(size)] = {k: _percentiles(v) for k, v in per.items() if v}
    ref = results.get("1024", {}).get("classify", {}).get("median")
    cards = [clf.card] + ([clf.lens_card] if clf.lens_card is not None else [])
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(),
                    "git_commit": _git_commit()},
        "backend": clf.engine.name,
        "threads": threads,
        "models": [{"name": c.name, "version": c.version, "sha256": c.sha256,
                    "input_size": list(c.input.size or ())} for c in cards],
        "results_ms": results,
        "targets": {"classify_1024_median_ms": {
            "target": TARGET_CLASSIFY_MS, "measured": ref,
            "met": ref is not None and ref <= TARGET_CLASSIFY_MS}},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    out = run(args.sizes, args.repeats, args.backend, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    for size, r in out["results_ms"].items():
        print(size, {k: v["median"] for k, v in r.items()})
    print("targets:", out["targets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
