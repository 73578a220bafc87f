"""Connections to the daemon's sockets: drops and refusals that libzmq makes silently are counted.

A message part over the input's transport cap (ZeroMQ ``MAXMSGSIZE``: 2 x
``input.max_frame_bytes`` + 1 MiB) never reaches ``decode_frame``: libzmq closes the adapter's
connection unread. A CURVE key the daemon does not know, or an adapter trying the wrong socket
type, is refused at the handshake. Before protocol 1.12 none of these showed anywhere; before
1.13 a subscriber or query client refused for its key showed nowhere on the daemon's side.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from socket import create_connection
from typing import Any

import numpy as np
import pytest
import zmq

from nanoscout.clients.acquisition.publisher import FramePublisher, PublishError
from nanoscout.clients.query import request_control
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import ControlRequest, encode_message, frame_header, pack_header
from nanoscout.wire.transport import ClientKeys, create_keys
from tests.system.conftest import DaemonProc, nanoscout, stop_process, wait_ready

pytestmark = pytest.mark.system

MAX_FRAME_BYTES = 65536
CAP_BYTES = 2 * MAX_FRAME_BYTES + (1 << 20)

LoggedDaemon = Callable[..., tuple[DaemonProc, Path]]


@pytest.fixture
def logged_daemon(tmp_path: Path) -> Iterator[LoggedDaemon]:
    """``logged_daemon(*serve_args, config="toml")`` → (DaemonProc, its stderr log file), as
    ``daemon_factory`` starts it; stopped at teardown."""
    started: list[DaemonProc] = []

    def make(*args: str, config: str = "") -> tuple[DaemonProc, Path]:
        n = len(started)
        cfg, log = tmp_path / f"daemon{n}.toml", tmp_path / f"daemon{n}.log"
        cfg.write_text(config, encoding="utf-8")
        with log.open("w", encoding="utf-8") as err:
            proc = nanoscout(
                "serve", "--config", str(cfg), "--frames-endpoint", "tcp://127.0.0.1:0",
                "--results", "tcp://127.0.0.1:0", "--query", "tcp://127.0.0.1:0",
                "--metrics-port", "0", "--health-interval", "0.2", "--threads", "2", *args,
                stdout=subprocess.PIPE, stderr=err)
        ep, lines, pump = wait_ready(proc, "daemon", 120.0)
        d = DaemonProc(proc, ep["input"], ep["output"], ep["metrics"], lines, pump,
                       ep.get("query"))
        started.append(d)
        return d, log

    yield make
    for d in started:
        stop_process(d.proc)
        if d.pump is not None:
            d.pump.join(30)


def _metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus exposition text (NaN when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)\{([^}]*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return float("nan")


def _health_where(sub: Subscriber, ok: Callable[[Any], bool], what: str) -> Any:
    """The first ``health`` header for which ``ok`` holds (60 s at most)."""
    for msg in sub.messages(timeout=60):
        if msg.kind == "health" and ok(msg.header):
            return msg.header
    raise AssertionError(f"no health message with {what} within 60 s")


def test_a_message_over_the_transport_cap_is_counted_and_the_adapter_carries_on(
        logged_daemon: LoggedDaemon) -> None:
    """The adapter's over-cap message closes its connection; it reconnects by itself and its
    next frame is analysed. The drop is counted in health and /metrics and logged once with the
    cap (a second closed connection within the minute is counted, not logged again)."""
    d, log = logged_daemon("--policy", "lossless", "--max-frame-bytes", str(MAX_FRAME_BYTES))
    image = np.random.default_rng(3).integers(900, 1100, (128, 128)).astype(np.uint16)
    header = pack_header(frame_header(image, source="cap", seq=0, t_acq_ns=1, pixel_size_nm=0.5))
    with Subscriber(d.output, topics=("det.", "health")) as sub:
        first = sub.wait_ready()
        assert first.input_connections == {"accepted": 0, "disconnected": 0,
                                           "handshake_aborted": 0, "handshake_failed": 0,
                                           "handshake_failed_auth": 0}
        with FramePublisher(d.input, mode="push", source="cap") as pub:
            pub.send_raw([b"frame", header, b"\0" * (CAP_BYTES + 1)])
            _health_where(sub, lambda h: h.input_connections["disconnected"] >= 1,
                          "the dropped connection")
            seq = pub.send(image, pixel_size_nm=0.5)  # over the connection made again
            assert any(m.kind == "det" and m.header.seq == seq
                       for m in sub.messages(timeout=60)), "the frame after the drop was lost"
            health = _health_where(sub, lambda h: h.frames_processed >= 1, "the frame analysed")
        closed = _health_where(sub, lambda h: h.input_connections["disconnected"] >= 2,
                               "the adapter's closed connection")
    assert d.proc.poll() is None
    # the dropped message never reached decode_frame: nothing rejected, one frame, no gap
    assert health.rejected == {} and health.frames_received == 1 and health.transport_gaps == 0
    assert health.input_connections == {"accepted": 2, "disconnected": 1,
                                        "handshake_aborted": 0, "handshake_failed": 0,
                                        "handshake_failed_auth": 0}
    assert closed.input_connections["accepted"] == 2
    text = d.scrape()
    for event, n in (("accepted", 2), ("disconnected", 2), ("handshake_aborted", 0),
                     ("handshake_failed", 0), ("handshake_failed_auth", 0)):
        assert _metric(text, "nanoscout_input_connections_total", event=event) == n, event
    assert d.stop(signal.SIGTERM) == 0  # the monitor socket does not hold up the shutdown
    warnings = [line for line in log.read_text(encoding="utf-8").splitlines()
                if f"over the transport cap of {CAP_BYTES} bytes" in line]
    assert len(warnings) == 1, warnings
    assert "INFO" in warnings[0] and "disconnected: 1 in all" in warnings[0]


def _curve_daemon(logged_daemon: LoggedDaemon, tmp_path: Path
                  ) -> tuple[DaemonProc, Path, ClientKeys, ClientKeys]:
    """A live daemon with CURVE on that authorises one client key: (daemon, its log, the
    authorised client's keys, a stranger's keys the daemon does not hold)."""
    server_pub, server_secret = create_keys(tmp_path / "server", "daemon")
    authorised = tmp_path / "authorised"
    create_keys(authorised, "operator")
    _, stranger_secret = create_keys(tmp_path / "elsewhere", "stranger")
    d, log = logged_daemon("--policy", "live", config=(
        "[security]\ncurve = true\n"
        f'server_secret_key = "{server_secret}"\nauthorized_keys = "{authorised}"\n'))
    return (d, log, ClientKeys(server_pub, authorised / "operator.key_secret"),
            ClientKeys(server_pub, stranger_secret))


def test_refused_handshakes_are_counted_and_curve_adapters_still_work(
        logged_daemon: LoggedDaemon, tmp_path: Path) -> None:
    """CURVE on a live daemon: a stranger's key is refused (``handshake_failed_auth``, logged),
    an authorised adapter in ``--mode auto`` is refused as PUSH (``handshake_failed``) and
    taken as PUB, and its frame is analysed."""
    d, log, friend, stranger = _curve_daemon(logged_daemon, tmp_path)
    image = np.random.default_rng(4).integers(900, 1100, (128, 128)).astype(np.uint16)
    with Subscriber(d.output, topics=("det.", "health"), curve=friend) as sub:
        sub.wait_ready()
        with pytest.raises(PublishError, match="refused this client's CURVE key"):
            FramePublisher(d.input, source="intruder", connect_timeout_s=10, curve=stranger)
        with FramePublisher(d.input, source="friend", curve=friend) as pub:
            assert pub.mode == "pub"
            seq = pub.send(image, pixel_size_nm=0.5)
            assert any(m.kind == "det" and m.header.seq == seq
                       for m in sub.messages(timeout=60)), "the authorised frame was lost"
        health = _health_where(sub, lambda h: h.input_connections["disconnected"] >= 1,
                               "the authorised adapter's closed connection")
    counts = health.input_connections
    assert counts["handshake_failed_auth"] >= 1 and counts["handshake_failed"] >= 1, counts
    assert counts["disconnected"] == 1, counts
    assert counts["accepted"] == sum(n for event, n in counts.items() if event != "accepted")
    assert health.frames_received == 1 and health.rejected == {}
    text = d.scrape()
    assert _metric(text, "nanoscout_input_connections_total",
                   event="handshake_failed_auth") == counts["handshake_failed_auth"]
    assert d.stop(signal.SIGTERM) == 0
    assert "refused for its CURVE key" in log.read_text(encoding="utf-8")


def _refused(health: Any, socket: str) -> int:
    """Connections to ``socket`` refused for their CURVE key, as ``health`` counts them."""
    return int(health.connections.get(socket, {}).get("handshake_failed_auth", 0))


def test_refused_subscribers_and_query_clients_are_counted_on_their_socket(
        logged_daemon: LoggedDaemon, tmp_path: Path) -> None:
    """CURVE on: a subscriber and a query client whose keys the daemon does not hold are
    refused, as before, and now counted on their own socket (``health.connections``,
    ``nanoscout_connections_total{socket}``) and warned about naming it, while authorised
    clients are served; the input's counts keep their place (``input_connections``,
    ``nanoscout_input_connections_total``)."""
    d, log, friend, stranger = _curve_daemon(logged_daemon, tmp_path)
    assert d.query is not None
    with Subscriber(d.output, topics=("health",), curve=friend) as sub:
        sub.wait_ready()
        with Subscriber(d.output, topics=("health",), curve=stranger) as spy:
            _health_where(sub, lambda h: _refused(h, "results") >= 1,
                          "the stranger's subscription refused on the results socket")
            assert spy.recv(timeout=0) is None  # refused, as before: it reads nothing
        ctx: zmq.Context = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        try:
            stranger.apply(req)
            req.connect(d.query)
            req.send_multipart(encode_message(ControlRequest(source="cam",
                                                             action="reset_statistics")))
            _health_where(sub, lambda h: _refused(h, "query") >= 1,
                          "the stranger's query client refused on the query socket")
            assert not req.poll(0), "a refused query client got an answer"
        finally:
            req.close(linger=0)
        assert request_control(d.query, "cam", "reset_statistics", curve=friend).ok
        health = _health_where(sub, lambda h: h.connections["query"]["disconnected"] >= 1,
                               "the authorised query client's closed connection")
    results, query = health.connections["results"], health.connections["query"]
    assert results["handshake_failed_auth"] >= 1 and results["handshake_failed"] == 0, results
    # the authorised subscriber is still connected: accepted counts it beside every closed one
    assert results["accepted"] >= 1 + sum(n for e, n in results.items() if e != "accepted")
    assert query["handshake_failed_auth"] >= 1 and query["handshake_failed"] == 0, query
    assert query["accepted"] >= sum(n for e, n in query.items() if e != "accepted")
    # no adapter came: the input's counts are where protocol 1.12 put them, all 0
    assert health.connections["input"] == health.input_connections == dict.fromkeys(
        ("accepted", "disconnected", "handshake_aborted", "handshake_failed",
         "handshake_failed_auth"), 0)
    text = d.scrape()
    for socket, counts in (("results", results), ("query", query)):
        assert _metric(text, "nanoscout_connections_total", socket=socket,
                       event="handshake_failed_auth") >= counts["handshake_failed_auth"]
    for event in ("accepted", "handshake_failed_auth"):
        assert _metric(text, "nanoscout_connections_total", socket="input", event=event) == 0
        assert _metric(text, "nanoscout_input_connections_total", event=event) == 0
    assert d.stop(signal.SIGTERM) == 0  # neither new monitor holds up the shutdown
    lines = log.read_text(encoding="utf-8").splitlines()
    for title in ("result socket", "query socket"):
        warned = [line for line in lines
                  if f"{title}: a connection was refused for its CURVE key" in line]
        assert len(warned) == 1 and "WARNING" in warned[0], (title, warned)


def _address(endpoint: str) -> tuple[str, int]:
    """(host, port) of a ``tcp://host:port`` endpoint."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def _probe(endpoint: str) -> None:
    """Open a plain TCP connection to ``endpoint`` and close it before any ZeroMQ greeting, as
    a TCP health probe or a port scanner does."""
    with create_connection(_address(endpoint), timeout=10):
        pass


def _ask_for_curve(endpoint: str) -> None:
    """Send a ZMTP 3.0 greeting asking for the CURVE mechanism (RFC 23: signature, version 3.0,
    mechanism, as-server, filler; 64 bytes) to a daemon without CURVE, over plain TCP, and
    read until the daemon closes the connection. A ZeroMQ client with CURVE keys does the same,
    but it also sees the daemon's NULL greeting and may close first."""
    greeting = (b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\0"
                + bytes(31))
    with create_connection(_address(endpoint), timeout=10) as conn:
        conn.sendall(greeting)
        with contextlib.suppress(ConnectionResetError):
            while conn.recv(4096):
                pass


def _closed(counts: dict[str, int]) -> int:
    """Connections closed, whatever became of them, in one socket's ``counts``."""
    return sum(n for event, n in counts.items() if event != "accepted")


def test_clients_that_close_in_their_handshake_are_not_refused(
        logged_daemon: LoggedDaemon) -> None:
    """Probes that connect and close before their ZeroMQ handshake, on each of the daemon's
    sockets, are ``handshake_aborted`` (libzmq's HANDSHAKE_FAILED_NO_DETAIL), logged at INFO,
    not ``handshake_failed``, which NanoscoutConnectionsRefused pages on for results and
    query; a peer the daemon refuses (it asks for CURVE) is still ``handshake_failed``.
    Before, each probe counted as ``handshake_failed``."""
    n = 5
    d, log = logged_daemon("--policy", "live")
    assert d.query is not None
    endpoints = {"input": d.input, "results": d.output, "query": d.query}
    with Subscriber(d.output, topics=("health",)) as sub:
        sub.wait_ready()
        for endpoint in endpoints.values():
            for _ in range(n):
                _probe(endpoint)
            _ask_for_curve(endpoint)
        health = _health_where(sub, lambda h: all(_closed(h.connections[s]) >= n + 1
                                                  for s in endpoints),
                               f"{n + 1} closed connections on every socket")
    counts = {"accepted": n + 1, "disconnected": 0, "handshake_aborted": n,
              "handshake_failed": 1, "handshake_failed_auth": 0}
    assert health.connections["input"] == health.input_connections == counts
    assert health.connections["query"] == counts
    # the subscriber reading health is still connected
    assert health.connections["results"] == {**counts, "accepted": n + 2}
    text = d.scrape()
    for socket in endpoints:
        for event in ("handshake_aborted", "handshake_failed"):
            assert _metric(text, "nanoscout_connections_total", socket=socket,
                           event=event) == counts[event], (socket, event)
    assert _metric(text, "nanoscout_input_connections_total", event="handshake_aborted") == n
    assert d.stop(signal.SIGTERM) == 0
    lines = log.read_text(encoding="utf-8").splitlines()
    for title in ("frame input", "result socket", "query socket"):
        for what, event in (("closed during its handshake", "handshake_aborted"),
                            ("was refused at its handshake", "handshake_failed")):
            logged = [line for line in lines if f"{title}: a connection {what}" in line]
            assert len(logged) == 1 and "INFO" in logged[0], (title, logged)
            assert f"({event}: 1 in all, 0 more" in logged[0], logged[0]
    assert not [line for line in lines if "WARNING" in line and "handshake" in line]


def test_a_probe_held_open_leaves_a_subscribers_handshake_its_own(
        logged_daemon: LoggedDaemon) -> None:
    """libzmq names no connection in a handshake's success, so the daemon gives it to the
    oldest connection still in its handshake: here a TCP probe held open while a subscriber
    connects. When the probe closes, libzmq's HANDSHAKE_FAILED_NO_DETAIL right before its
    DISCONNECTED shows it never finished: it is ``handshake_aborted`` and the success goes back
    to the subscriber, whose leaving is ``disconnected``. Before, the probe counted as
    ``disconnected`` and the subscriber that left as ``handshake_failed``, which pages."""
    d, _ = logged_daemon("--policy", "live")
    with Subscriber(d.output, topics=("health",)) as reader:
        reader.wait_ready()
        # accepted in the order they connect: the probe first, then the subscriber
        probe = create_connection(_address(d.output), timeout=10)
        try:
            with Subscriber(d.output, topics=("health",)) as sub:
                sub.wait_ready()  # its handshake is done, the probe's is not
                probe.close()
                probed = _health_where(reader, lambda h: _closed(h.connections["results"]) >= 1,
                                       "the probe's closed connection")
        finally:
            probe.close()
        health = _health_where(reader, lambda h: _closed(h.connections["results"]) >= 2,
                               "the subscriber's closed connection")
    counts = {"accepted": 3, "disconnected": 0, "handshake_aborted": 1, "handshake_failed": 0,
              "handshake_failed_auth": 0}
    assert probed.connections["results"] == counts  # the probe, not the subscriber, is gone
    assert health.connections["results"] == {**counts, "disconnected": 1}
