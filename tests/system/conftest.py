"""Real processes over loopback: a daemon started with ``nanoscout serve`` on free ports.

Readiness is the daemon's ``NANOSCOUT-READY {json}`` line on stdout; subscribers wait for the
first ``health`` message. Nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.system


def nanoscout(*args: str, **kw: object) -> subprocess.Popen[str]:
    """Start ``nanoscout ARGS`` (as ``python -m nanoscout``) with unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "nanoscout", *args],
        cwd=REPO,
        env=env,
        text=True,
        **kw,
    )


def stop_process(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGINT ``proc`` and wait; kill it if it does not end within ``timeout`` s; close its
    pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@dataclass
class DaemonProc:
    """A running daemon process and where it listens."""

    proc: subprocess.Popen[str]
    input: str
    output: str
    metrics: str | None
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    pump: threading.Thread | None = None
    query: str | None = None  # the lens query endpoint, when served

    def scrape(self) -> str:
        """GET /metrics; returns the exposition text."""
        assert self.metrics is not None
        with urllib.request.urlopen(self.metrics, timeout=10) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
        """Signal the daemon and wait for it to exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(tmp_path: Path, *args: str, config: str = "", timeout: float = 120.0,
                 log: Path | None = None) -> DaemonProc:
    """Start a daemon on free loopback ports with an optional TOML ``config`` text; ``log``:
    a file for its stderr (its log lines; None: this process's stderr)."""
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(config, encoding="utf-8")
    with contextlib.ExitStack() as files:
        err = None if log is None else files.enter_context(log.open("w", encoding="utf-8"))
        proc = nanoscout(
            "serve", "--config", str(cfg), "--frames-endpoint", "tcp://127.0.0.1:0", "--results",
            "tcp://127.0.0.1:0", "--query", "tcp://127.0.0.1:0", "--metrics-port", "0",
            "--health-interval", "0.2", "--threads", "2",
            *args, stdout=subprocess.PIPE, stderr=err,
        )
    ep, lines, reader = wait_ready(proc, "daemon", timeout)
    return DaemonProc(proc, ep["input"], ep["output"], ep["metrics"], lines, reader,
                      ep.get("query"))


def wait_ready(proc: subprocess.Popen[str], what: str, timeout: float
               ) -> tuple[dict, queue.Queue[str], threading.Thread]:
    """Read ``proc``'s stdout (by a pump thread) until its ``NANOSCOUT-READY {json}`` line;
    returns that json, the queue that keeps receiving later lines ("" at exit) and the pump."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line)
        lines.put("")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise TimeoutError(f"{what} not ready within {timeout} s") from None
        if line == "":
            raise RuntimeError(f"{what} exited with {proc.wait()} before it was ready")
        if line.startswith("NANOSCOUT-READY "):
            return json.loads(line.split(" ", 1)[1]), lines, reader


class DaemonFactory(Protocol):
    """``daemon_factory(*serve_args, config="toml")`` → a started :class:`DaemonProc`."""

    def __call__(self, *args: str, config: str = "") -> DaemonProc: ...


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``daemon_factory(*serve_args, config="toml")`` → DaemonProc; all are stopped at teardown."""
    started: list[DaemonProc] = []

    def make(*args: str, config: str = "") -> DaemonProc:
        d = start_daemon(tmp_path, *args, config=config)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGINT)
            try:
                d.proc.wait(30)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
        if d.pump is not None:
            d.pump.join(30)


def send_and_collect(d: DaemonProc, sends: list[tuple[str, Any, dict[str, Any]]],
                     timeout: float = 120.0) -> dict[tuple[str, int], Any]:
    """Publish each (source, image, ``FramePublisher.send`` keywords) of ``sends`` into daemon
    ``d`` (one pushing publisher per source, in order) and return the ``det`` headers of them
    all by (source, seq)."""
    from nanoscout.clients.acquisition.publisher import FramePublisher
    from nanoscout.clients.subscriber import Subscriber

    dets: dict[tuple[str, int], Any] = {}
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        pubs = {s: FramePublisher(d.input, mode="push", source=s).__enter__()
                for s in dict.fromkeys(source for source, _, _ in sends)}
        try:
            for source, image, kw in sends:
                pubs[source].send(image, **kw)
            for msg in sub.messages(timeout=timeout):
                dets[(msg.header.source, msg.header.seq)] = msg.header
                if len(dets) == len(sends):
                    break
        finally:
            for p in pubs.values():
                p.__exit__(None, None, None)
    return dets

