"""Hot-swap benchmark: detection models swapped under a live stream, with no frame lost or
mis-attributed.

    nice -n 10 python benchmarks/hotswap.py --swaps 20 --out benchmarks/results/hotswap.json

Starts a real daemon (``nanoscout serve``, lossless policy, the shipped detector) and, from this
process, streams synthetic frames from a FramePublisher (confirmed end to end) while it asks
for ``--swaps`` hot swaps over the query socket, cycling through four models: the shipped
detector, a renamed copy of it (same weights and sha256, another file and card name), the
shipped STEM detector (other weights, other sha256) and an adapted model as ``models adapt``
writes one (a copy of the shipped detector's weights whose card names the STEM detector as its
base network, beside it, with its particles merged in: two engines per model); then one
revert. Every ``det`` names the
model that analysed its frame (``model``, ``model_sha256``, ``model_generation``, protocol 1.5).

Writes JSON: frames sent / answered / lost / answered twice / mis-attributed (a ``det`` whose
model or sha256 is not the one of its generation) / late (sent after a swap was confirmed but
analysed by an older model), the swap round-trip latency seen by the client and the daemon's
own time per swap (load, sha256, probe, switch), and the target: 0 lost and 0 mis-attributed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoscout.analysis.modelcard import sha256_file, shipped_model_dir  # noqa: E402
from nanoscout.clients.acquisition.publisher import FramePublisher  # noqa: E402
from nanoscout.clients.query import revert_model, swap_model  # noqa: E402
from nanoscout.clients.subscriber import Subscriber  # noqa: E402
from nanoscout.wire.protocol import DetHeader, HealthHeader  # noqa: E402


def _start_daemon(workdir: Path, model: Path, threads: int) -> tuple[subprocess.Popen[str],
                                                                     dict[str, Any]]:
    config = workdir / "daemon.toml"
    config.write_text(f'[classify]\nenabled = false\n[review]\ndirectory = "{workdir}/review"\n',
                      encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoscout", "serve", "--config", str(config), "--policy",
         "lossless", "--model", str(model), "--threads", str(threads),
         "--frames-endpoint", "tcp://127.0.0.1:0", "--results", "tcp://127.0.0.1:0",
         "--query", "tcp://127.0.0.1:0", "--metrics-port", "0", "--health-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("NANOSCOUT-READY "):
            return proc, json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"the daemon exited with {proc.wait()} before it was ready")


def _renamed_copy(directory: Path) -> Path:
    src = shipped_model_dir() / "detector.onnx"
    onnx = directory / "renamed.onnx"
    shutil.copyfile(src, onnx)
    card = json.loads(src.with_suffix(".json").read_text(encoding="utf-8"))
    card.update(onnx_file=onnx.name, name=card["name"] + "-renamed")
    onnx.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return onnx


def _adapted_copy(directory: Path) -> Path:
    """An adapted model's folder: ``adapted.onnx`` (the shipped detector's weights, no score
    calibration) with ``base_network.onnx`` (the shipped STEM detector) pinned in its card,
    merged."""
    folder = directory / "adapted"
    folder.mkdir()
    stem = shipped_model_dir() / "detector_stem.onnx"
    shutil.copyfile(stem, folder / "base_network.onnx")
    base = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    base.update(onnx_file="base_network.onnx")
    (folder / "base_network.json").write_text(json.dumps(base), encoding="utf-8")
    src = shipped_model_dir() / "detector.onnx"
    onnx = folder / "adapted.onnx"
    shutil.copyfile(src, onnx)
    card = json.loads(src.with_suffix(".json").read_text(encoding="utf-8"))
    card.update(onnx_file=onnx.name, name=card["name"] + "-adapted", score_calibration=None,
                base_network={"onnx_file": "base_network.onnx", "sha256": base["sha256"],
                              "merge": True})
    onnx.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return onnx


def _frame(seq: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(seq)
    img = rng.normal(300.0, 25.0, (side, side))
    yy, xx = np.mgrid[0:side, 0:side]
    for k in range(16):
        cy, cx = (k // 4 + 0.5) * side / 4 + seq % 5, (k % 4 + 0.5) * side / 4
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (5 + k % 5) ** 2] += 2000.0
    return np.clip(img, 0, 65535).astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON; returns 0 when no frame was lost or
    mis-attributed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--swaps", type=int, default=20, help="hot swaps (then one revert)")
    ap.add_argument("--side", type=int, default=256, help="frame side, px")
    ap.add_argument("--threads", type=int, default=1, help="engine CPU threads of the daemon")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/hotswap.json")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="nanoscout-hotswap-"))
    shipped = shipped_model_dir() / "detector.onnx"
    cycle = [_renamed_copy(workdir), shipped_model_dir() / "detector_stem.onnx",
             _adapted_copy(workdir), shipped]
    proc, ep = _start_daemon(workdir, shipped, args.threads)
    stop = threading.Event()
    sent_after: list[int] = []
    replies: list[dict[str, Any]] = []
    try:
        with Subscriber(ep["output"], topics=("det.", "health")) as sub:
            sub.wait_ready(30)
            pub = FramePublisher(ep["input"], mode="push", source="bench", results=ep["output"],
                                 confirm_timeout_s=120)
            reports: list[Any] = []
            started = threading.Event()

            def stream() -> None:
                seq = 0
                while not stop.is_set() or seq < 10:
                    pub.send(_frame(seq, args.side), pixel_size_nm=0.5)
                    seq += 1
                    started.set()
                reports.append(pub.close())

            sender = threading.Thread(target=stream)
            t0 = time.perf_counter()
            sender.start()
            started.wait(60)
            by_generation: dict[int, tuple[str, str]] = {0: ("", sha256_file(shipped)[:12])}
            for k in range(args.swaps + 1):
                t = time.perf_counter()
                if k < args.swaps:
                    target = cycle[k % len(cycle)]
                    reply = swap_model(ep["query"], target, timeout=120)
                else:
                    reply = revert_model(ep["query"], timeout=120)
                rtt_ms = (time.perf_counter() - t) * 1e3
                assert reply.model_generation is not None
                by_generation[reply.model_generation] = (reply.model or "",
                                                         reply.model_sha256 or "")
                sent_after.append(pub.seq)
                replies.append({"action": reply.action, "model": reply.model,
                                "model_sha256": reply.model_sha256,
                                "generation": reply.model_generation,
                                "round_trip_ms": round(rtt_ms, 2),
                                "daemon_ms": reply.elapsed_ms})
            stop.set()
            sender.join(600)
            wall = time.perf_counter() - t0
            report = reports[0]
            dets: dict[int, list[DetHeader]] = {}
            health: HealthHeader | None = None
            for msg in sub.messages(timeout=60, idle=10):
                if isinstance(msg.header, DetHeader):
                    dets.setdefault(msg.header.seq, []).append(msg.header)
                elif isinstance(msg.header, HealthHeader):
                    health = msg.header
                    if health.frames_processed >= report.sent and len(dets) >= report.sent:
                        break
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        shutil.rmtree(workdir, ignore_errors=True)
    first = dets.get(0, [None])[0]
    by_generation[0] = (first.model if first is not None else "", by_generation[0][1])
    sent = report.sent
    lost = [s for s in range(sent) if s not in dets]
    twice = [s for s, v in dets.items() if len(v) > 1]
    misattributed = [s for s, v in dets.items() for h in v
                     if h.model_generation not in by_generation
                     or (h.model, h.model_sha256) != by_generation[h.model_generation]]
    late = 0
    for k, first_seq in enumerate(sent_after):
        late += sum(1 for s in range(first_seq, sent) if s in dets
                    and (dets[s][0].model_generation or 0) < k + 1)
    rtt = np.array([r["round_trip_ms"] for r in replies[:-1]])
    own = np.array([r["daemon_ms"] for r in replies[:-1]])
    result = {
        "benchmark": "hotswap",
        "command": "python benchmarks/hotswap.py " + " ".join(argv or sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "frame_side_px": args.side, "policy": "lossless", "engine_threads": args.threads,
        "models": [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
                   for p in cycle],
        "swaps": args.swaps, "reverts": 1,
        "frames_sent": sent, "frames_answered": len(dets), "frames_lost": len(lost),
        "frames_answered_twice": len(twice), "frames_misattributed": len(misattributed),
        "frames_late": late, "confirmed_by_publisher": report.complete,
        "generations_seen": len({h[0].model_generation for h in dets.values()}),
        "wall_s": round(wall, 2), "fps": round(sent / wall, 2),
        "swap_round_trip_ms": {"median": round(float(np.median(rtt)), 1),
                               "max": round(float(rtt.max()), 1)},
        "swap_daemon_ms": {"median": round(float(np.median(own)), 1),
                           "max": round(float(own.max()), 1)},
        "revert_round_trip_ms": replies[-1]["round_trip_ms"],
        "health": None if health is None else {"model_swaps": health.model_swaps,
                                               "model_swap_failures": health.model_swap_failures},
        "replies": replies,
        "target": "0 frames lost, 0 mis-attributed, 0 late across the swaps",
    }
    result["target_met"] = not lost and not misattributed and not twice and late == 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "replies"}, indent=1))
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
