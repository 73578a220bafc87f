"""``nanoscout demo``: simulator → daemon → live table, on the CPU with the shipped model.

Starts ``nanoscout serve`` and ``nanoscout simulate`` as real processes on free loopback
ports, shows the live table for ``duration`` seconds (None = until Ctrl-C), then stops both
(SIGINT, as an operator would) and prints where the metrics were served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanoscout.clients.tail import run_tail

#: the daemon configuration of the demo: alert rules an operator would set for a Pt/C catalyst
DEMO_CONFIG = """\
[input]
policy = "{policy}"

[[alerts]]
name = "large-particle"
kind = "particle"
severity = "warning"
where = {{ ecd_nm = {{ gt = 20.0 }} }}

[[alerts]]
name = "elongated-particle"
kind = "particle"
severity = "info"
where = {{ aspect_ratio = {{ gt = 3.5 }}, ecd_nm = {{ gt = 10.0 }} }}

[[alerts]]
name = "d50-drift"
kind = "d50_drift"
severity = "critical"
pct = 15.0
"""


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, str]:
    """Read the daemon's stdout until its readiness line; returns its endpoints."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the daemon exited (code {proc.wait()}) before it was ready")
        if line.startswith("NANOSCOUT-READY "):
            return json.loads(line.split(" ", 1)[1])
    raise TimeoutError(f"the daemon was not ready within {timeout} s")


def _stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def run_demo(
    *,
    duration: float | None = 30.0,
    size: int = 1024,
    rate_hz: float = 5.0,
    policy: str = "live",
    config: Path | None = None,
) -> int:
    """Run the live demo; returns 0 when daemon and simulator ran and stopped cleanly."""
    exe = [sys.executable, "-m", "nanoscout"]
    with tempfile.TemporaryDirectory(prefix="nanoscout-demo-") as tmp:
        if config is None:
            config = Path(tmp) / "demo.toml"
            config.write_text(DEMO_CONFIG.format(policy=policy), encoding="utf-8")
        print(f"starting the daemon ({policy}, config {config}) ...", flush=True)
        daemon = _start(exe + ["serve", "--config", str(config), "--frames-endpoint", "tcp://127.0.0.1:0",
                               "--results", "tcp://127.0.0.1:0", "--query", "tcp://127.0.0.1:0",
                               "--metrics-port", "0"])
        sim = None
        try:
            ep = wait_ready(daemon)
            print(f"daemon ready: frames {ep['input']}, results {ep['output']}, metrics {ep['metrics']}",
                  flush=True)
            sim = _start(exe + ["simulate", "--frames-endpoint", ep["input"],
                                "--mode", "push" if policy == "lossless" else "pub",
                                "--size", str(size), "--rate", str(rate_hz)])
            state = run_tail(ep["output"], duration=duration)
            frames = sum(v.frames for v in state.sources.values())
            print(f"\ndemo finished: {frames} frames analysed, {state.n_alerts} alerts; "
                  f"metrics were served at {ep['metrics']}")
        finally:
            codes = [_stop(p) for p in (sim, daemon) if p is not None]
        return 0 if all(c in (0, -signal.SIGINT, 130) for c in codes) else 1
