"""Subscriber clients against a publisher whose messages come out of order or with times that
give no latency (an audit, 2026-12-07).

A fake daemon (a real pyzmq socket on loopback speaking the wire format) sends:

* ``det`` messages of one daemon run with ``topic_seq`` 1, 3, 2, 4 (a relay reordered them):
  the real :class:`~nanoscout.clients.subscriber.Subscriber` handed on 4 and counted 2 missed
  (3 was counted once before 2 and again after it, read as a restart); nothing was missed;
* a ``det`` whose ``t_done_ns`` is 0 (before its ``t_recv_ns``): ``nanoscout tail`` showed a
  latency of -1000000000100.0 ms and ``nanoscout record`` stored it in the run's frames.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.runfile import read_run
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import DetHeader, encode_message
from tests.fake_daemon import RUN, health, publisher, wait_subscribed
from tests.system.conftest import nanoscout, stop_process

pytestmark = pytest.mark.system


def _det(topic_seq: int, *, t_done_ns: int | None = None, source: str = "cam") -> list:
    t = 10**18 + topic_seq * 10**8
    table = empty_table(1)
    return encode_message(DetHeader(
        source=source, seq=topic_seq, t_acq_ns=t, t_recv_ns=t + 10**6,
        t_done_ns=t + 5 * 10**6 if t_done_ns is None else t_done_ns, pixel_size_nm=0.5,
        units="nm", n=1, engine="x", topic_seq=topic_seq, daemon_run=RUN), table)


def test_a_message_that_comes_late_is_not_counted_lost() -> None:
    """``topic_seq`` 1, 3, 2, 4 of one daemon run: four handed on and none missed (it counted
    2); a real loss after it (6 never sent) is still counted, once."""
    with publisher() as (pub, endpoint), Subscriber(endpoint, topics=("det.",)) as sub:
        wait_subscribed(pub, {b"det.", b"health"})
        for k in (1, 3, 2, 4, 5, 7):
            pub.send_multipart(_det(k))
        got = [m.header.topic_seq for m in sub.messages(timeout=30, idle=3)]
    assert got == [1, 3, 2, 4, 5, 7]
    assert sub.missed_total == 1 and dict(sub.missed) == {"cam": 1}, (
        sub.missed_total, dict(sub.missed))
    assert sub.gaps.total == 1 and sub.last_gap is not None and sub.last_gap.seq == 7


def test_tail_and_record_show_a_det_done_before_its_arrival_as_unknown_latency(
        tmp_path: Path) -> None:
    """A det stamped done at 0 (before its frame's arrival): ``tail`` printed a latency of
    -1000000000100.0 ms and ``record`` stored it; now tail says the latency is unknown (and
    the good frames' latency is still shown), record stores NaN."""
    out = tmp_path / "run.parquet"
    stop = threading.Event()
    with publisher() as (pub, endpoint):
        def send() -> None:
            k = 0
            while not stop.wait(0.05):
                k += 1
                pub.send_multipart(health(k, RUN))
                pub.send_multipart(_det(k, t_done_ns=0 if k % 2 else None))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        tail = nanoscout("tail", "--results", endpoint, "--duration", "4",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        record = nanoscout("record", "--results", endpoint, "--out", str(out),
                           "--duration", "4", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            text, err = tail.communicate(timeout=60)
            _, rec_err = record.communicate(timeout=60)
        finally:
            stop.set()
            sender.join(10)
            stop_process(tail)
            stop_process(record)
    assert tail.returncode == 0, err
    rows = [line.split() for line in text.splitlines() if line.startswith("cam ")]
    # every redraw: p50 and p99 of the good frames only (the old p50 was -500000000847.5)
    assert rows and all(r[2:4] in (["5.0", "5.0"], ["-", "-"]) for r in rows), rows
    assert "latency unknown (result stamped before its frame arrived), frames: cam " in text, (
        text[-2000:])
    assert rows[-1][2:4] == ["5.0", "5.0"], rows  # the good frames: 5 ms from acquisition
    assert record.returncode == 0, rec_err
    lat = read_run(out).frames["latency_ms"]
    assert len(lat) >= 4 and np.isnan(lat).any(), lat  # unknown: NaN
    assert (lat[~np.isnan(lat)] == 5.0).all(), lat
