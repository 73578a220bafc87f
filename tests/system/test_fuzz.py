"""Thousands of malformed messages against a real daemon, on both policies: it survives, counts
every one (health equals /metrics), and still answers real frames correctly afterwards."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq

from nanoscout.analysis.frame import Frame
from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.subscriber import Subscriber
from nanoscout.daemon.app import build_pipeline
from nanoscout.daemon.config import load_config
from nanoscout.sim.synthetic import SpecimenConfig, render
from nanoscout.wire.headers import HealthHeader
from nanoscout.wire.protocol import Buffer, encode_message
from tests.conftest import wait_until
from tests.system.conftest import DaemonFactory, DaemonProc, nanoscout, stop_process, wait_ready
from tests.system.malformed import GENERATORS, Parts, malformed, malformed_results, valid_oddities

pytestmark = pytest.mark.system

N_MALFORMED = {"lossless": 10_000, "live": 11_500}  # live: >= 10 000 reach the daemon
#: malformed result messages thrown at the recorder and the dashboard
N_RESULTS = 10_000
#: the fuzz daemons: small frames only (2 MiB), and room for every message in the buffers
CONFIG = """
[input]
max_frame_bytes = 2097152
hwm = 20000
buffer_bytes = 68719476736
[classify]
enabled = false
"""


def _rejected_in_metrics(text: str) -> int:
    total = 0
    for line in text.splitlines():
        m = re.match(r'^nanoscout_messages_rejected_total\{reason="([a-z_]+)"\} (\S+)$', line)
        if m:
            total += int(float(m.group(2)))
    return total


def _health(sub: Subscriber, done: object, timeout: float) -> HealthHeader:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        msg = sub.recv(timeout=1.0)
        if msg is not None and isinstance(msg.header, HealthHeader):
            last = msg.header
            if done(last):  # type: ignore[operator]
                return last
    raise AssertionError(f"the daemon did not get there within {timeout} s: {last}")


@pytest.mark.parametrize("policy", ["lossless", "live"])
def test_ten_thousand_malformed_messages_are_all_counted_and_nothing_dies(
        daemon_factory: DaemonFactory, policy: str) -> None:
    d = daemon_factory("--policy", policy, config=CONFIG)
    messages = malformed(N_MALFORMED[policy], seed=1 if policy == "live" else 0)
    assert len({kind for kind, _ in messages}) == len(GENERATORS)
    # a live daemon subscribes to the "frame" topic: ZeroMQ never hands it anything else
    expected = sum(policy == "lossless" or (len(p) > 0 and p[0].startswith(b"frame"))
                   for _, p in messages)
    assert expected >= 10_000
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH if policy == "lossless" else zmq.XPUB)
    raw.setsockopt(zmq.SNDHWM, 0)  # queue everything: nothing may be lost on the way
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(d.input)
        if policy == "live":  # the daemon's subscription has arrived: nothing is lost to it
            assert raw.poll(30_000) and raw.recv()[:1] == b"\x01"
        _flood_then_check(d, ctx, raw, messages, expected, policy)
    finally:
        raw.close(linger=0)
        ctx.term()


def _flood_then_check(d: DaemonProc, ctx: zmq.Context, raw: zmq.Socket,
                      messages: list[tuple[str, Parts]], expected: int, policy: str) -> None:
    with Subscriber(d.output, topics=("det.", "health"), ctx=ctx) as sub:
        sub.wait_ready(30)
        t0 = time.monotonic()
        for _, parts in messages:
            raw.send_multipart(parts)
        health = _health(sub, lambda h: sum(h.rejected.values()) >= expected, timeout=300)
        elapsed = time.monotonic() - t0
        assert d.proc.poll() is None, "the daemon died"
        assert sum(health.rejected.values()) == expected, health.rejected
        assert health.frames_received == 0 and health.frames_dropped == {}
        assert set(health.rejected) <= {"parts", "topic", "malformed", "version", "header",
                                        "header_too_large", "length", "oversized", "empty",
                                        "nonfinite", "pixel_range"}, health.rejected
        assert health.rejected.get("internal", 0) == 0
        assert _rejected_in_metrics(d.scrape()) == expected  # health equals /metrics
        # and real frames are still answered, and with the particles an in-process pipeline
        # finds in them
        with FramePublisher(d.input, source="after", ctx=ctx, results=d.output if
                            policy == "lossless" else None) as pub:
            oddities = valid_oddities()
            good = render(SpecimenConfig(shape=(256, 256), pixel_size_nm=1.0,
                                         median_diameter_nm=14.0), 3).image
            seqs = [pub.send(arr, pixel_size_nm=px) for arr, px in oddities]
            last = pub.send(good, pixel_size_nm=0.8)  # its own calibration: its own scale
            dets = {}
            for msg in sub.messages(timeout=120):
                if msg.kind == "det" and msg.header.source == "after":
                    dets[msg.header.seq] = msg
                    if msg.header.seq == last:
                        break
            report = pub.close()
        assert last in dets, "the good frame after the flood was not answered"
        if policy == "lossless":  # every oddity answered, and confirmed to the adapter
            assert sorted(dets) == [*seqs, last] and report.unconfirmed == []
        det = dets[last]
        assert det.array is not None
        want = _in_process(good)
        assert det.header.units == "nm" and det.header.n == len(want) > 10
        np.testing.assert_allclose(np.sort(det.array["ecd_nm"]), np.sort(want["ecd_nm"]),
                                   rtol=1e-5)
    print(f"{policy}: {expected} malformed messages counted in {elapsed:.1f} s")


def _in_process(image: np.ndarray) -> np.ndarray:
    """The particle table the daemon's pipeline gives ``image`` in this process."""
    pipeline = build_pipeline(load_config(None, {"classify.enabled": False}), offline=True)
    try:
        return pipeline.process(Frame.from_image(image, pixel_size_nm=0.8)).table
    finally:
        pipeline.close()


def _result_publisher(ctx: zmq.Context, *, verbose: bool = False) -> tuple[zmq.Socket, str]:
    """A fake daemon's result socket (XPUB, no high-water mark, no linger; ``verbose``: it
    reports every subscription) bound on a free loopback port: (socket, endpoint)."""
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    if verbose:
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    try:
        return pub, f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    except BaseException:
        pub.close()
        raise


def _wait_recorder_subscribed(out: Path, health: Callable[[], None]) -> None:
    """Send heartbeats (``health``) until the recorder writing ``out`` has subscribed."""

    def subscribed() -> bool:
        health()
        run = out / "_run.json"
        return run.exists() and "subscribed_utc" in run.read_text()

    wait_until(subscribed, timeout=60, what="recorder subscribed")


def _health_message(topic_seq: int) -> list[Buffer]:
    """A daemon's health message, as a fake publisher's heartbeat."""
    return encode_message(HealthHeader(
        t_ns=time.time_ns(), uptime_s=1.0, policy="live", engines={}, frames_received=0,
        frames_processed=0, frames_dropped={}, rejected={}, transport_gaps=0, queue_depth=0,
        fps=0.0, latency_ms_p50=None, latency_ms_p99=None, topic_seq=topic_seq))


def test_recorder_and_dashboard_survive_ten_thousand_malformed_results(tmp_path: Path) -> None:
    """A broken (or hostile) publisher on the result side: the recorder and the dashboard,
    real processes, count every message they cannot decode and go on recording / serving."""
    ctx = zmq.Context()
    pub, endpoint = _result_publisher(ctx)
    procs: list[subprocess.Popen[str]] = []
    try:
        seq = iter(range(10**6))

        def health() -> None:
            pub.send_multipart(_health_message(next(seq)))

        out = tmp_path / "run.parquet"
        rec = nanoscout("record", "--connect", endpoint, "--out", str(out), "--duration", "600",
                        stdout=subprocess.PIPE)
        procs.append(rec)
        dash = nanoscout("dashboard", "--connect", endpoint, "--port", "0",
                         stdout=subprocess.PIPE)
        procs.append(dash)
        url = wait_ready(dash, "dashboard", 60)[0]["dashboard"]
        subscribers = 0
        while subscribers < 2:  # both subscriptions arrived (XPUB sees them)
            health()
            if pub.poll(200) and pub.recv()[:1] == b"\x01":
                subscribers += 1

        _wait_recorder_subscribed(out, health)
        bad = malformed_results(N_RESULTS, seed=5)
        for parts in bad:
            pub.send_multipart(parts)
        health()

        def dashboard_counted() -> bool:
            with urllib.request.urlopen(url + "api/snapshot", timeout=10) as r:
                snap = json.loads(r.read())
            return bool(snap["status"]["rejected"] >= N_RESULTS)

        wait_until(dashboard_counted, timeout=120, what="the dashboard counted every message")
        assert rec.poll() is None and dash.poll() is None, "a subscriber died"
        rec.send_signal(signal.SIGINT)
        assert rec.wait(60) == 0
        prov = json.loads((out / "_run.json").read_text())
        # the recorder subscribes to det, alert, stats and health: ZeroMQ filters the rest
        to_recorder = sum(p[0].startswith((b"det.", b"alert.", b"stats.", b"health")) for p in bad)
        assert prov["rejected_messages"] == to_recorder > 6000
        with urllib.request.urlopen(url + "api/snapshot", timeout=10) as r:
            snap = json.loads(r.read())
        assert snap["status"]["rejected"] == N_RESULTS and snap["status"]["connected"]
    finally:
        for p in procs:
            stop_process(p)
        pub.close(linger=0)
        ctx.term()


def _hostile_results() -> list[Parts]:
    """Result messages that passed the header schema once and then broke a client (the
    second client audit): ``record`` died of the first seven, ``tail`` of the class."""
    import msgpack

    from nanoscout.wire.particles import empty_table

    table = empty_table(3)
    table["id"] = [1, 2, 3]

    def det(**kw: object) -> Parts:
        h = {"v": [1, 10], "source": "bad", "seq": 1, "t_acq_ns": 1, "t_recv_ns": 2,
             "t_done_ns": 3, "pixel_size_nm": 1.0, "units": "nm", "n": 3, "engine": "x",
             "shape": [128, 128]} | kw
        return [b"det.bad", msgpack.packb(h, use_bin_type=True), table.tobytes()]

    def stats(**kw: object) -> Parts:
        h = {"v": [1, 10], "source": "bad", "seq": 1, "t_ns": 5, "units": "nm",
             "window": {"n_frames": 1, "count": 3}, "cumulative": {"n_frames": 1, "count": 3}}
        return [b"stats.bad", msgpack.packb(h | kw, use_bin_type=True)]

    return [det(pixel_size_nm=None), det(pixel_size_nm=-2.0),
            det(meta={"file": "x.tif", "blob": b"\xff\x00"}), det(shape=[2**64 - 1, 5]),
            stats(t_ns=2**64 - 1), stats(window={"n_frames": 2**64 - 1, "count": 1}),
            stats(window={"n_frames": 1, "count": 1, "junk": b"\xff\xfe"}),
            [b"class.bad", msgpack.packb({"v": [1, 10], "source": "bad", "seq": 1,
                                          "labels": ["film"], "probabilities": []})]]


def test_recorder_and_tail_survive_results_that_once_passed_the_schema(tmp_path: Path) -> None:
    """Real ``record`` and ``tail`` processes against a hostile publisher: each such message is
    refused at decode and counted, and the good results after them are recorded and shown."""
    from nanoscout.wire.particles import empty_table
    from nanoscout.wire.protocol import AlertHeader, DetHeader, StatsHeader

    ctx = zmq.Context()
    # every subscription is seen, not only the first of a topic
    pub, endpoint = _result_publisher(ctx, verbose=True)
    procs: list[subprocess.Popen[str]] = []
    tail_out = tmp_path / "tail.txt"
    try:
        seq = iter(range(10**6))

        def health() -> None:
            pub.send_multipart(_health_message(next(seq)))

        out = tmp_path / "run.parquet"
        procs.append(nanoscout("record", "--results", endpoint, "--out", str(out),
                               "--batch-seconds", "0.2", stdout=subprocess.PIPE))
        with tail_out.open("w") as fh:
            procs.append(nanoscout("tail", "--results", endpoint, stdout=fh))
        healths = 0
        while healths < 2:  # both subscribed to health, their last subscription
            health()
            if pub.poll(200) and pub.recv() == b"\x01health":
                healths += 1

        _wait_recorder_subscribed(out, health)
        bad = _hostile_results()
        for parts in bad:
            pub.send_multipart(parts)
        table = empty_table(2)
        table["id"] = [1, 2]
        for s in range(1000, 1005):  # the good results after them
            pub.send_multipart(encode_message(DetHeader(
                source="good", seq=s, t_acq_ns=1, t_recv_ns=2, t_done_ns=3, pixel_size_nm=0.5,
                units="nm", n=2, engine="x"), table))
            pub.send_multipart(encode_message(StatsHeader(
                source="good", seq=s, t_ns=5, units="nm", window={"ecd": {"d50": 7.25}},
                cumulative={})))
            pub.send_multipart(encode_message(AlertHeader(
                source="good", seq=s, rule="r", kind="particle", severity="info", value=1.0,
                threshold=0.0, explanation=f"good alert {s}"), empty_table(0)))

        def recorded() -> bool:
            health()
            return _frames_recorded(out) == 5

        wait_until(recorded, timeout=60, what="the good frames recorded")

        def shown() -> bool:
            health()
            text = tail_out.read_text()
            return "good alert 1004" in text and "refused: 8 undecodable" in text

        wait_until(shown, timeout=60, what="tail showed the good results")
        assert all(p.poll() is None for p in procs), "a subscriber died"
        for p in procs:
            p.send_signal(signal.SIGINT)
            assert p.wait(60) == 0
        prov = json.loads((out / "_run.json").read_text())
        assert prov["rejected_messages"] == 7  # the recorder does not subscribe to class
        good = next(ln for ln in reversed(tail_out.read_text().splitlines())
                    if ln.startswith("good "))
        assert "7.2" in good and "bad" not in tail_out.read_text().split("alerts:")[-1]
    finally:
        for p in procs:
            stop_process(p)
        pub.close(linger=0)
        ctx.term()


def _frames_recorded(out: Path) -> int:
    """Frames recorded so far in the run at ``out``."""
    from nanoscout.clients.runfile import read_run

    run = read_run(out)
    return run.rows(run.frames)
