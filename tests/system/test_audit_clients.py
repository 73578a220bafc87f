"""Subscriber clients against a publisher that is not what they expect (an audit, 2026-12-07).

A fake daemon (a real pyzmq socket on loopback speaking the wire format) sends the real client
processes what a daemon of another version, or with a bug, may send: labels with markup and
control characters (``tail`` on a terminal), results of another major version (``record``),
and query replies that do not match their request (``lens --query``). Each client must go on,
or end with one line that says what came, never with a traceback or a wrong reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import (
    AlertHeader,
    ClassHeader,
    DetHeader,
    StatsHeader,
    encode_message,
)
from tests.conftest import wait_until
from tests.fake_daemon import health, publisher, wait_subscribed
from tests.system.conftest import nanoscout, stop_process

pytestmark = pytest.mark.system

def _recording(pub: zmq.Socket, endpoint: str, out: Path) -> subprocess.Popen[str]:
    """``nanoscout record`` of the fake daemon's results into ``out`` (batches of 0.2 s),
    once it has subscribed (its provenance says so)."""
    proc = nanoscout("record", "--results", endpoint, "--out", str(out), "--batch-seconds",
                     "0.2", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_subscribed(pub, {b"health"})
        seq = iter(range(1, 10**6))

        def subscribed() -> bool:
            pub.send_multipart(health(next(seq)))
            run = out / "_run.json"
            return run.exists() and "subscribed_utc" in run.read_text()

        wait_until(subscribed, timeout=60, what="the recorder subscribed")
    except BaseException:
        stop_process(proc)
        raise
    return proc



class _Terminal:
    """A pseudo-terminal of 40 x 160 for a client's stdout, read by a thread."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the slave side closed
                return
            if not data:
                return
            self._chunks.append(data)

    def text(self) -> bytes:
        """Everything written to the terminal so far."""
        return b"".join(self._chunks)

    def close(self) -> None:
        os.close(self.slave)
        self._thread.join(5)
        os.close(self.master)


def test_tail_on_a_terminal_shows_a_label_with_markup_and_escapes_as_text(tmp_path: Path
                                                                          ) -> None:
    """``nanoscout tail`` on a terminal draws with rich: a class label ``Pt [/dense]`` was read
    as markup and ended the tail (MarkupError at the first redraw), and an ESC sequence in an
    alert went to the terminal as it was. Both are shown as text, and the tail goes on."""
    label = "Pt [/dense] \x1b]0;PWNED\x07film"
    term = _Terminal()
    err = tmp_path / "tail.err"
    with publisher() as (pub, endpoint), err.open("w") as err_fh:
        proc = nanoscout("tail", "--results", endpoint, stdin=subprocess.DEVNULL,
                         stdout=term.slave, stderr=err_fh)
        try:
            wait_subscribed(pub, {b"health"})
            table = empty_table(2)
            table["id"] = [1, 2]
            seq = 0

            def publish() -> None:
                nonlocal seq
                seq += 1
                pub.send_multipart(health(seq))
                pub.send_multipart(encode_message(DetHeader(
                    source="cam", seq=seq, t_acq_ns=1, t_recv_ns=2, t_done_ns=3,
                    pixel_size_nm=0.5, units="nm", n=2, engine="x"), table))
                pub.send_multipart(encode_message(ClassHeader(
                    source="cam", seq=seq, labels=[label], probabilities=[0.75])))
                pub.send_multipart(encode_message(AlertHeader(
                    source="cam", seq=seq, rule="r", kind="class", severity="warning",
                    value=1.0, threshold=0.5, explanation="\x1b[2Jcleared?"),
                    empty_table(0)))

            def shown() -> bool:
                assert proc.poll() is None, f"tail ended: {err.read_text()[-2000:]}"
                publish()
                text = term.text()
                return b"Pt [/dense] \\x1b]0;PWNED" in text and b"\\x1b[2Jcleared?" in text

            wait_until(shown, timeout=60, interval=0.3, what="tail drew the label as text")
            text = term.text()
            assert b"\x1b]0;PWNED" not in text and b"\x1b[2Jcleared" not in text
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, err.read_text()[-2000:]
            assert "Traceback" not in err.read_text()
        finally:
            stop_process(proc)
            term.close()


def _v2(parts: list) -> list:
    """``parts`` (an encoded message) as a daemon of protocol 2.0 would send it."""
    header = msgpack.unpackb(bytes(parts[1]))
    return [parts[0], msgpack.packb(header | {"v": [2, 0]}), *parts[2:]]


def _frame(seq: int) -> list[list]:
    """One frame's det and stats, encoded."""
    table = empty_table(3)
    table["id"] = [1, 2, 3]
    table["ecd_nm"] = 12.5
    return [encode_message(DetHeader(source="cam", seq=seq, t_acq_ns=10**18 + seq,
                                     t_recv_ns=10**18 + seq, t_done_ns=10**18 + seq,
                                     pixel_size_nm=0.5, units="nm", n=3, engine="x",
                                     topic_seq=seq), table),
            encode_message(StatsHeader(source="cam", seq=seq, t_ns=10**18 + seq, units="nm",
                                       window={}, cumulative={}, topic_seq=seq))]


def test_record_names_a_daemon_of_another_major_version_instead_of_a_missing_one(
        tmp_path: Path) -> None:
    """All of a protocol-2 daemon's messages are refused: ``record`` said "no health message
    ... (is it running ...?)" while 2.0 heartbeats came in; it now says that they came and
    why they were refused."""
    out = tmp_path / "run.parquet"
    stop = threading.Event()
    with publisher() as (pub, endpoint):
        def send() -> None:
            seq = 0
            while not stop.wait(0.05):
                seq += 1
                for parts in (health(seq), *_frame(seq)):
                    pub.send_multipart(_v2(parts))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            proc = nanoscout("record", "--results", endpoint, "--out", str(out),
                             "--duration", "3", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=60)
        finally:
            stop.set()
            sender.join(10)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nanoscout record: error: no health message"), err
    assert "messages came but were refused (version " in last, last
    assert "protocol major version 2 is not supported" in last and "is it running" not in last
    assert "WARNING nanoscout.subscriber: refused a message" in err  # logged as they came
    assert not out.exists()


def test_record_says_when_the_daemon_turns_into_another_major_version(tmp_path: Path) -> None:
    """A daemon replaced for a while by one of protocol 2.0: every message refused, and
    ``record`` said nothing (its last line "missed results: none", exit 0). The refusals are
    logged at once (at most a line a minute per reason), counted by reason in the provenance,
    and the last lines say how many messages were not recorded."""
    out = tmp_path / "run.parquet"
    with publisher() as (pub, endpoint):
        proc = _recording(pub, endpoint, out)
        try:
            for s in range(1, 4):  # three frames of protocol 1
                for parts in _frame(s):
                    pub.send_multipart(parts)
            for s in range(4, 54):  # the daemon restarted as 2.0
                for parts in (health(s), *_frame(s)):
                    pub.send_multipart(_v2(parts))
            pub.send_multipart(_v2(health(54)))
            for parts in _frame(55):  # protocol 1 again: its batch's provenance counts all
                pub.send_multipart(parts)

            def counted() -> bool:
                assert proc.poll() is None, "the recorder ended"
                return '"rejected_messages": 151' in (out / "_run.json").read_text()

            wait_until(counted, timeout=60, what="the recorder counted the 2.0 messages")
            proc.send_signal(signal.SIGINT)
            stdout, err = proc.communicate(timeout=60)
        finally:
            stop_process(proc)
    assert proc.returncode == 0, err
    assert stdout.strip().endswith("; refused messages: 151"), stdout
    assert err.count("WARNING nanoscout.subscriber: refused a message") == 1, err
    assert "(version, 1 refused in all): protocol major version 2 is not supported" in err
    assert "WARNING nanoscout.record: 151 messages were not recorded (version 151)" in err
    import json

    prov = json.loads((out / "_run.json").read_text())
    assert prov["rows"]["frames"] == 4 and prov["rejected_by_reason"] == {"version": 151}


@contextlib.contextmanager
def _query_server(reply: list[bytes]) -> Iterator[str]:
    """A fake daemon's query socket (ROUTER, as a REP answers) that answers every request with
    ``reply``, on a thread; yields its endpoint."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(50):
                ident, _, *_request = sock.recv_multipart()
                sock.send_multipart([ident, b"", *reply])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(10)
        sock.close(linger=0)
        ctx.term()


def _lens_reply(**fields: object) -> list[bytes]:
    maps = np.full((1, 2, 4, 4), 0.5, "<f2").tobytes()
    header = {"v": [1, 13], "source": "sim", "seq": 3, "outputs": ["act_enc2"],
              "shapes": [[1, 2, 4, 4]], "available": ["act_enc2", "act_code"]} | fields
    return [b"lens.sim", msgpack.packb(header), maps]


@pytest.mark.parametrize(("reply", "said"), [
    # two names, one shape and one array: the client's zip raised ValueError
    (_lens_reply(outputs=["act_enc2", "act_code"]),
     "malformed answer from {ep}: lens header field header: Value error, 2 outputs but 1 shapes"),
    # the map asked for is not in the reply: KeyError 'act_enc2'
    (_lens_reply(outputs=["act_code"]),
     "the reply from {ep} does not answer the request for ['act_enc2'] of 'sim': it is of "
     "'sim' with ['act_code']"),
    # another source's maps are not this source's
    ([b"lens.other", *_lens_reply(source="other")[1:]],
     "the reply from {ep} does not answer the request for ['act_enc2'] of 'sim': it is of "
     "'other' with ['act_enc2']"),
], ids=["outputs-without-shapes", "output-missing", "another-source"])
def test_lens_query_refuses_a_reply_that_does_not_match_its_request(
        tmp_path: Path, reply: list[bytes], said: str) -> None:
    """``nanoscout lens --query`` against a query socket whose reply does not answer the
    request: one line naming what came (exit 2), no traceback, nothing written."""
    out = tmp_path / "lens.png"
    with _query_server(reply) as endpoint:
        proc = nanoscout("lens", "--query", endpoint, "--source", "sim", "--layer", "act_enc2",
                         "--timeout", "20", "--out", str(out), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.strip().startswith(f"nanoscout lens: {said.format(ep=endpoint)}"), err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_record_stores_a_message_that_came_twice_once(tmp_path: Path) -> None:
    """A publisher that sends a result again (a bug, or two relays of one daemon): ``record``
    stored frames 1, 1, 2, 3, 2, 4 as six frames (18 particles for 12; ``report`` counted them
    all) and took the late repeat of 2 for a restarted daemon, so that frame 4 showed as one
    result missed per topic. Each message is recorded once now, nothing is called missed, and
    the repeats are counted and logged."""
    import json

    from nanoscout.clients.runfile import read_run

    out = tmp_path / "run.parquet"
    with publisher() as (pub, endpoint):
        proc = _recording(pub, endpoint, out)
        try:
            frames = {s: _frame(s) for s in range(1, 5)}
            for s in (1, 1, 2, 3, 2, 4):
                for parts in frames[s]:
                    pub.send_multipart(parts)

            def recorded() -> bool:
                assert proc.poll() is None, "the recorder ended"
                text = (out / "_run.json").read_text()
                return '"frames": 4' in text or '"frames": 6' in text

            wait_until(recorded, timeout=60, what="the recorder wrote the frames")
            proc.send_signal(signal.SIGINT)
            stdout, err = proc.communicate(timeout=60)
        finally:
            stop_process(proc)
    assert proc.returncode == 0, err
    run = read_run(out)
    assert run.frames["seq"].tolist() == [1, 2, 3, 4]
    assert run.rows(run.particles) == 12
    prov = json.loads((out / "_run.json").read_text())
    assert prov["missed_results"] == {} and prov["missed_results_total"] == 0
    assert prov["duplicate_messages"] == 4  # det and stats of frames 1 and 2
    assert "missed results: none" in stdout
    assert "(duplicate, 1 dropped in all): det.cam (topic_seq 1, frame 1) came again" in err
    assert "4 messages came again and were recorded once" in err

