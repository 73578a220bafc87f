"""Adapters against the daemon's faults: a lossless run is confirmed frame by frame, a
mismatched mode fails loudly within seconds, and what a daemon killed mid-run held is sent
again to its successor and answered there, without a frame analysed twice."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nanoscout.clients.subscriber import Subscriber
from tests.system.conftest import DaemonFactory, nanoscout, start_daemon

pytestmark = pytest.mark.system


def _run(*args: str, timeout: float = 300) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = nanoscout(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, time.monotonic() - t0


@pytest.mark.timeout(900)
def test_every_frame_of_a_lossless_push_run_is_confirmed(daemon_factory: DaemonFactory) -> None:
    """The run that used to lose its last 39 frames: 150 frames of 512² as fast as possible."""
    d = daemon_factory("--policy", "lossless", config="[classify]\nenabled = false\n")
    code, out, _ = _run("simulate", "--frames-endpoint", d.input, "--results", d.output,
                        "--mode", "push", "--rate", "0", "--frames", "150", "--size", "512")
    assert code == 0, out
    assert "sent 150 frames, 150 confirmed by the daemon" in out
    with Subscriber(d.output, topics=("health",)) as sub:
        health = sub.wait_ready(30)
    assert health.frames_processed == 150 and health.frames_dropped.get("superseded", 0) == 0


def test_the_default_adapter_mode_fits_either_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    image = tmp_path / "frame.tif"
    import numpy as np
    import tifffile

    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 4000, (256, 256), np.uint16))
    for policy in ("live", "lossless"):
        d = daemon_factory("--policy", policy)
        code, out, _ = _run("replay", str(image), str(image), "--frames-endpoint", d.input,
                            "--results", d.output, "--pixel-size", "0.5")
        assert code == 0, out
        with Subscriber(d.output, topics=("health",)) as sub:
            health = sub.wait_ready(30)
            while health.frames_received < 2:
                health = sub.wait_ready(30)
        assert health.frames_received == 2, (policy, health)


@pytest.mark.parametrize(("policy", "mode", "hint"), [("live", "push", "--mode pub"),
                                                      ("lossless", "pub", "--mode push")])
def test_a_mismatched_mode_fails_within_seconds(daemon_factory: DaemonFactory, policy: str, mode: str,
                                                hint: str) -> None:
    d = daemon_factory("--policy", policy)
    code, out, took = _run("simulate", "--frames-endpoint", d.input, "--mode", mode,
                           "--frames", "3", timeout=60)
    assert code != 0 and hint in out and took < 20, (code, out)


def test_nobody_listening_is_an_error_not_a_silent_wait() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, took = _run("simulate", "--frames-endpoint", f"tcp://127.0.0.1:{port}",
                           "--frames", "2", timeout=60)
    assert code != 0 and "no daemon answers" in out and took < 30, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_daemon_killed_mid_run_loses_nothing_once_it_is_back(tmp_path: Path) -> None:
    ports = [_free_port() for _ in range(2)]
    args = ("--policy", "lossless", "--frames-endpoint", f"tcp://127.0.0.1:{ports[0]}", "--results",
            f"tcp://127.0.0.1:{ports[1]}")
    d = start_daemon(tmp_path, *args)
    sim = nanoscout("simulate", "--frames-endpoint", d.input, "--results", d.output, "--mode",
                    "push", "--rate", "20", "--frames", "60", "--size", "256",
                    "--confirm-timeout", "60", stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
    restarted = None
    try:
        with Subscriber(d.output, topics=("health",)) as sub:
            health = sub.wait_ready(60)
            while health.frames_processed < 5:
                health = sub.wait_ready(60)
        d.proc.kill()  # kill -9: whatever it held is gone without a word
        d.proc.wait(30)
        restarted = start_daemon(tmp_path, *args)  # same endpoints: the adapter reconnects
        out, _ = sim.communicate(timeout=300)
        with Subscriber(restarted.output, topics=("health",)) as sub:
            after = sub.wait_ready(60)
    finally:
        for p in (sim, d.proc, *(() if restarted is None else (restarted.proc,))):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(60)
    assert sim.returncode == 0, out
    assert "sent 60 frames, 60 confirmed by the daemon" in out
    # the successor analysed what the killed daemon had not answered, each frame once
    assert 0 < after.frames_received < 60
    assert after.frames_processed == after.frames_received
    resent = re.search(r"\((\d+) sent again after a daemon restart\)", out)
    assert resent is not None, out


def _ignore_sigint() -> None:
    """As a non-interactive shell starts the children of a background job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_an_adapter_that_started_with_sigint_ignored(
        daemon_factory: DaemonFactory, sig: int) -> None:
    d = daemon_factory("--policy", "lossless")
    sim = nanoscout("simulate", "--frames-endpoint", d.input, "--results", d.output, "--mode",
                    "push", "--rate", "20", "--size", "256", stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
    try:
        with Subscriber(d.output, topics=("health",)) as sub:
            health = sub.wait_ready(60)
            while health.frames_processed < 3:
                health = sub.wait_ready(60)
        sim.send_signal(sig)
        out, _ = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.communicate()  # closes the pipe
    assert sim.returncode == 130, out
    # the publisher closed in order: what it sent is reported, confirmed by the daemon
    report = re.search(r"simulator: sent (\d+) frames, (\d+) confirmed by the daemon", out)
    assert report is not None, out
    assert int(report[1]) >= 3 and report[1] == report[2], out
