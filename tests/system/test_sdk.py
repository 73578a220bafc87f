"""The SDK against a live daemon: the documented acquisition-script example publishes, the
asyncio subscriber receives, and the tables go to pandas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from nanoscout.clients.aio import AsyncSubscriber
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import DetHeader, HealthHeader, StatsHeader, encode_message
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "publish_from_acquisition.py"


def test_example_script_publishes_and_async_subscriber_receives(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--policy", "lossless")
    n = 3

    async def collect() -> list:
        got = []
        async with AsyncSubscriber(d.output, topics=("det.my-camera",)) as sub:
            await sub.wait_ready(30)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(EXAMPLE), d.input, str(n), stdout=subprocess.PIPE)
            async for msg in sub.messages(timeout=120):
                got.append(msg)
                if len(got) == n:
                    break
            out, _ = await proc.communicate()
            assert proc.returncode == 0 and b"sent 3 frames" in out
        return got

    msgs = asyncio.run(collect())
    assert [m.header.seq for m in msgs] == [0, 1, 2]
    assert all(m.header.units == "nm" and m.header.meta["file"] == f"frame-{k}"
               for k, m in enumerate(msgs))
    df = msgs[0].to_pandas()
    # 25 bright disks of radius 8 px at 0.5 nm/px: ECD about 8 nm
    assert len(df) >= 15 and 6 < df.loc[~df["border"], "ecd_nm"].median() < 10
    assert (df["ecd_px"] * 0.5).round(3).equals(df["ecd_nm"].round(3))


def test_async_subscriber_times_out_cleanly(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()

    async def idle() -> list:
        async with AsyncSubscriber(d.output, topics=("det.nobody",)) as sub:
            await sub.wait_ready(30)
            return [m async for m in sub.messages(idle=0.5)]

    assert asyncio.run(idle()) == []


def test_a_cancelled_wait_ready_does_not_hold_up_leaving_the_async_with(tmp_path: Path) -> None:
    """Once ``wait_ready`` blocked the worker for its whole timeout, and ``close`` waited behind
    it: leaving the ``async with`` took 20 s instead of about ``poll_s``."""

    async def cancelled() -> tuple[float, float]:
        t0 = loop_time()
        async with AsyncSubscriber(f"ipc://{tmp_path}/nobody", poll_s=0.1) as sub:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.wait_ready(timeout=20), 0.5)
            t_cancel = loop_time() - t0
        return t_cancel, loop_time() - t0

    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    t_cancel, t_left = asyncio.run(cancelled())
    assert t_cancel < 2 and t_left - t_cancel < 2, (t_cancel, t_left)

    async def times_out() -> None:
        async with AsyncSubscriber(f"ipc://{tmp_path}/nobody", poll_s=0.1) as sub:
            with pytest.raises(TimeoutError, match="nobody within 0.3 s"):
                await sub.wait_ready(timeout=0.3)

    asyncio.run(times_out())


@pytest.fixture
def publisher() -> Iterator[zmq.Socket]:
    """A fake daemon's result socket: an XPUB on a free loopback port that reports every
    subscription (``XPUB_VERBOSE``)."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    pub.bind("tcp://127.0.0.1:0")
    try:
        yield pub
    finally:
        pub.close(linger=0)
        ctx.term()


def _health(seq: int) -> list:
    return encode_message(HealthHeader(
        t_ns=time.time_ns(), uptime_s=1.0, policy="live", engines={}, frames_received=0,
        frames_processed=0, frames_dropped={}, rejected={}, transport_gaps=0, queue_depth=0,
        fps=0.0, latency_ms_p50=None, latency_ms_p99=None, topic_seq=seq))


def _subscribed(pub: zmq.Socket, sub: Subscriber) -> None:
    """Wait until ``sub``'s subscription reached ``pub`` and ``sub`` has the daemon's health."""
    assert pub.poll(30_000) and pub.recv()[:1] == b"\x01"
    for seq in range(300):
        pub.send_multipart(_health(seq))
        try:
            sub.wait_ready(0.1)
            return
        except TimeoutError:
            continue
    raise AssertionError("the subscriber never saw a health message")


def _det(seq: int, n: int = 3) -> tuple[DetHeader, np.ndarray]:
    t = empty_table(n)
    t["id"] = np.arange(1, n + 1)
    t["ecd_nm"] = 8.0
    return DetHeader(source="good", seq=seq, t_acq_ns=1, t_recv_ns=2, t_done_ns=3,
                     pixel_size_nm=0.5, units="nm", n=n, engine="fake"), t


def test_the_readme_loop_survives_a_det_with_a_negative_pixel_size(
        publisher: zmq.Socket) -> None:
    """The README's loop (``msg.to_pandas()`` on every det) once died of a det with a negative
    pixel size (ValueError from to_pandas): such a det is refused at decode now, counted in
    ``rejected``, and the loop goes on to the good ones."""
    endpoint = publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    with Subscriber(endpoint, topics=("det.", "alert.")) as sub:
        _subscribed(publisher, sub)
        good, table = _det(7)
        bad = good.model_dump(mode="json") | {"source": "bad", "pixel_size_nm": -2.0}
        publisher.send_multipart([b"det.bad", msgpack.packb(bad), table.tobytes()])
        for seq in (7, 8):
            publisher.send_multipart(encode_message(_det(seq)[0], table))
        seen = []
        for msg in sub.messages(timeout=30):
            if msg.kind == "det":
                df = msg.to_pandas()
                seen.append((msg.header.source, msg.header.seq, len(df)))
                if len(seen) == 2:
                    break
        assert seen == [("good", 7, 3), ("good", 8, 3)]
        assert sub.rejected == 1 and "pixel_size_nm" in (sub.last_rejection or "")


def test_missed_counts_keep_the_sources_with_the_latest_gaps(
        publisher: zmq.Socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Subscriber.missed`` grew by one entry per source a publisher named: it keeps the
    :data:`MAX_MISSED_SOURCES` sources with the most recent gaps, and ``missed_total`` all."""
    import nanoscout.clients.subscriber as subscriber

    monkeypatch.setattr(subscriber, "MAX_MISSED_SOURCES", 3)
    endpoint = publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    with Subscriber(endpoint, topics=("stats.",)) as sub:
        _subscribed(publisher, sub)
        for i in range(5):  # stats of 5 sources, each missing one message (topic_seq 1)
            for topic_seq in (0, 2):
                publisher.send_multipart(encode_message(StatsHeader(
                    source=f"s{i}", seq=topic_seq, t_ns=1, units="px", window={},
                    cumulative={}, topic_seq=topic_seq)))
        got = [msg for _, msg in zip(range(10), sub.messages(timeout=30), strict=False)]
        assert len(got) == 10
    assert dict(sub.missed) == {"s2": 1, "s3": 1, "s4": 1} and sub.missed_total == 5


def test_results_a_restarted_daemon_sent_before_the_subscriber_saw_it_are_missed(
        publisher: zmq.Socket) -> None:
    """A restarted daemon numbers its results from 0 again (``topic_seq``), and names its run
    (``daemon_run``). Its results published while the subscriber reconnected (here 0-2, the
    first one seen is 3, below the old run's newest 5) were read as a restart with nothing
    missing; they are counted now, per source and in total."""
    from nanoscout.clients.subscriber import Gap

    endpoint = publisher.getsockopt_string(zmq.LAST_ENDPOINT)
    run1, run2 = time.time_ns(), time.time_ns() + 60 * 10**9
    sent = [(run1, k) for k in range(6)] + [(run2, 3), (run2, 4)]
    with Subscriber(endpoint, topics=("stats.",)) as sub:
        _subscribed(publisher, sub)
        for run, topic_seq in sent:
            publisher.send_multipart(encode_message(StatsHeader(
                source="s", seq=topic_seq, t_ns=1, units="px", window={}, cumulative={},
                topic_seq=topic_seq, daemon_run=run)))
        got = [(m.header.daemon_run, m.header.topic_seq)
               for _, m in zip(range(len(sent)), sub.messages(timeout=30), strict=False)]
        assert got == sent
    assert dict(sub.missed) == {"s": 3} and sub.missed_total == 3
    assert sub.last_gap == Gap("stats.s", 3, 3)
