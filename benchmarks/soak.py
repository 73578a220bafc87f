"""Soak benchmark: a daemon under a long, varied load keeps its memory, files and threads flat.

    python benchmarks/soak.py --minutes 10 --out benchmarks/results/soak.json

Starts a real daemon (``nanoscout serve``, live policy, ``max_sources`` small so that source
eviction runs all the time) and, from this process, for the whole run: frames from a rotating
set of source names far beyond ``max_sources`` (each new name is new per-source state the
daemon must bound), a share of malformed messages (``tests/system/malformed.py``), and
subscribers that connect, read a little and vanish. Every ``--sample-s`` seconds it reads the
daemon's resident memory, open file descriptors and threads from ``/proc``, and its health.

Writes JSON: the samples, and the slopes of RSS (MB/min), open files and threads (per min)
fitted by least squares over the second half of the run (after warm-up: engine arenas, first
compilations), with the target ``rss_slope_mb_per_min < 1`` and whether it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoscout.clients.acquisition.publisher import FramePublisher  # noqa: E402
from nanoscout.clients.subscriber import Subscriber  # noqa: E402
from nanoscout.sim.synthetic import SpecimenConfig, render  # noqa: E402
from tests.system.malformed import malformed  # noqa: E402

TARGET_RSS_SLOPE_MB_PER_MIN = 1.0


def _proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024.0,
            "threads": float(fields["Threads"]),
            "open_files": float(len(os.listdir(f"/proc/{pid}/fd")))}


def _slope(t_min: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against t (per minute)."""
    if t_min.size < 3:
        return float("nan")
    return float(np.polyfit(t_min, y, 1)[0])


def _start_daemon(config: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoscout", "serve", "--config", str(config), "--policy", "live",
         "--frames-endpoint", "tcp://127.0.0.1:0", "--results", "tcp://127.0.0.1:0",
         "--query", "tcp://127.0.0.1:0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("NANOSCOUT-READY "):
            return proc, json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"the daemon exited with {proc.wait()} before it was ready")


def main(argv: list[str] | None = None) -> int:
    """Run the soak and write the JSON; returns 0 when the RSS target holds."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the run, min")
    ap.add_argument("--sample-s", type=float, default=5.0, help="sampling period, s")
    ap.add_argument("--rate", type=float, default=8.0, help="frames per second sent")
    ap.add_argument("--sources", type=int, default=400, help="distinct source names used")
    ap.add_argument("--max-sources", type=int, default=16, help="the daemon's input.max_sources")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/soak.json")
    args = ap.parse_args(argv)

    rng = random.Random(0)
    images = [render(SpecimenConfig(shape=(256, 256), pixel_size_nm=1.0,
                                    median_diameter_nm=12.0), k).image for k in range(4)]
    bad = [parts for _, parts in malformed(2000, seed=9)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "soak.toml"
        cfg.write_text(f"[input]\nmax_sources = {args.max_sources}\n"
                       "max_frame_bytes = 2097152\n", encoding="utf-8")
        daemon, ep = _start_daemon(cfg)
        ctx = zmq.Context()
        samples: list[dict[str, float]] = []
        sent = rejected_sent = churned = 0
        pubs: dict[str, FramePublisher] = {}
        raw = ctx.socket(zmq.XPUB)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(ep["input"])
        t0 = time.monotonic()
        next_sample = t0
        period = 1.0 / args.rate
        try:
            while time.monotonic() - t0 < args.minutes * 60:
                now = time.monotonic()
                if now >= next_sample:
                    s = _proc_stats(daemon.pid)
                    s["t_s"] = round(now - t0, 2)
                    samples.append(s)
                    next_sample += args.sample_s
                    # subscriber churn: one connects, reads a moment, vanishes
                    with Subscriber(ep["output"], ctx=ctx) as sub:
                        sub.recv(timeout=0.2)
                    churned += 1
                source = f"soak{rng.randrange(args.sources)}"
                pub = pubs.get(source)
                if pub is None:
                    if len(pubs) >= 8:  # adapters come and go too
                        pubs.pop(next(iter(pubs))).close(confirm=False)
                    pub = pubs[source] = FramePublisher(ep["input"], mode="pub", source=source,
                                                        ctx=ctx, log_line=lambda _: None)
                pub.send(images[sent % len(images)], pixel_size_nm=rng.choice([1.0, None]))
                sent += 1
                if sent % 5 == 0:  # a malformed message every fifth frame
                    raw.send_multipart(bad[rejected_sent % len(bad)])
                    rejected_sent += 1
                time.sleep(max(0.0, period - (time.monotonic() - now)))
            with Subscriber(ep["output"], topics=("health",), ctx=ctx) as sub:
                health = sub.wait_ready(30)
        finally:
            for pub in pubs.values():
                pub.close(confirm=False)
            raw.close(linger=0)
            ctx.term()
            daemon.send_signal(signal.SIGINT)
            code = daemon.wait(120)
    t = np.array([s["t_s"] for s in samples]) / 60.0
    half = t >= t[-1] / 2 if t.size else np.zeros(0, bool)
    slopes = {f"{k}_slope_per_min": round(_slope(t[half], np.array([s[k] for s in samples])[half]), 4)
              for k in ("rss_mb", "open_files", "threads")}
    result = {
        "benchmark": "soak", "command": " ".join(["python benchmarks/soak.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "minutes": args.minutes, "frames_sent": sent, "malformed_sent": rejected_sent,
        "sources": args.sources, "max_sources": args.max_sources,
        "subscriber_churns": churned, "daemon_exit_code": code,
        "health": {"frames_received": health.frames_received,
                   "frames_processed": health.frames_processed,
                   "frames_dropped": health.frames_dropped, "rejected": health.rejected,
                   "sources": health.sources, "sources_evicted": health.sources_evicted},
        **slopes,
        "rss_mb_first": samples[0]["rss_mb"] if samples else None,
        "rss_mb_last": samples[-1]["rss_mb"] if samples else None,
        "target": {"rss_slope_mb_per_min_below": TARGET_RSS_SLOPE_MB_PER_MIN,
                   "met": bool(slopes["rss_mb_slope_per_min"] < TARGET_RSS_SLOPE_MB_PER_MIN)},
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if result["target"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
