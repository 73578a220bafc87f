"""Connections to the daemon's listening sockets, counted from libzmq's socket monitor.

Three sockets are watched (:data:`SOCKETS`, the ``socket`` label): ``input`` (the frame
input; adapters connect), ``results`` (the result PUB; subscribers connect) and ``query``
(the lens / control REP; query clients connect). libzmq refuses a message part larger than a
socket's ``MAXMSGSIZE`` (the frame input's transport cap, :func:`transport_cap_bytes`; 1 MiB
on the query socket) by closing the peer's connection: the message is never read, so
:func:`~nanoscout.wire.codec.decode_frame` cannot count it as ``oversized``, and the peer's
socket reconnects by itself. A peer refused at the handshake (a CURVE key not authorised,
another socket type, a peer that is not ZeroMQ) is just as silent, on every socket, and so is
one that closes before its handshake is done. All show only as socket monitor events, which
:class:`Connections` reads and sorts, connection by connection (by file descriptor), into
:data:`CONNECTION_EVENTS`:

* ``accepted``: a connection accepted (TCP or IPC; ``inproc://`` has no connections to watch);
* ``disconnected``: one closed after its handshake: the peer went away (closed, crashed,
  unplugged) or sent a message part over the socket's transport cap; libzmq cannot tell
  which, so the log line names both;
* ``handshake_aborted``: one closed by the peer, or timed out (ZeroMQ's handshake interval,
  30 s), before its handshake completed: a client that closes at once (a subscriber or a
  query client that ends before its handshake is done), a TCP health probe, a port scanner.
  Routine, not a refusal: the peer went away while the daemon was still willing;
* ``handshake_failed_auth``: one refused for its CURVE key (not in the authorized folder);
* ``handshake_failed``: one refused at its handshake for what the peer is: another socket
  type (an adapter in ``--mode auto`` tries PUSH before PUB on a live daemon, so this is
  routine on the input there), a client without CURVE or holding another server key, a peer
  that is not ZeroMQ. Only when the daemon finds that out before the peer closes: a client
  refuses the daemon as well, and the one that reads the other's socket type (or mechanism)
  first closes. Under CURVE the daemon reads a client's type first, always; without CURVE
  both send theirs at once, and a client of another socket type in another process mostly
  closes first (85 to 99 times in 100 on loopback, libzmq 4.3.5), which the daemon counts as
  ``handshake_aborted``. A CURVE daemon finds out a client without CURVE keys first about 6
  times in 10, and one holding another server key always.

libzmq (4.3) reports these as: ``HANDSHAKE_FAILED_NO_DETAIL`` (a connection error or the
handshake timeout while the handshake runs: ``handshake_aborted``),
``HANDSHAKE_FAILED_PROTOCOL`` (another mechanism, no CURVE, a HELLO made for another server
key; also a CURVE message that fails to decrypt after the handshake: ``handshake_failed``),
``HANDSHAKE_FAILED_AUTH`` (the ZAP handler's refusal: ``handshake_failed_auth``), and no event
at all before the ``DISCONNECTED`` of a peer of another socket type or of a non-ZeroMQ peer
refused on a CURVE socket (``handshake_failed``). It names no connection in its handshake
events: ``NO_DETAIL`` and ``PROTOCOL`` come right before the ``DISCONNECTED`` of their own
connection (libzmq reports both in one call, on the context's one I/O thread, ZeroMQ's
default), so they are taken as that connection's end; a handshake's success and a ZAP
refusal come earlier and go to the oldest connection still in its handshake. When such a
mark proves wrong (a ``NO_DETAIL`` or ``PROTOCOL`` shows that the connection holding it was
still in its handshake), it moves to the oldest connection still in its handshake: a probe
held open while a subscriber connects does not turn the subscriber's later leaving into a
failure. What stays wrong: a client whose success or ZAP refusal went to an older connection
still in its handshake, and that closes before that one does, counts as ``handshake_failed``.

``accepted`` = ``disconnected`` + ``handshake_aborted`` + ``handshake_failed`` +
``handshake_failed_auth`` + the connections open now, per socket. A closed connection is
logged at most once per ``log_every_s`` for each event (INFO; a refused CURVE key at WARNING),
naming the socket, with the count since the last line: a flapping client cannot flood the log.

Threads: ZeroMQ sockets are not thread-safe, so a monitor's PAIR socket is read by the thread
that owns the socket it watches, which calls :meth:`Connections.read` whenever
:attr:`Connections.socket` is readable (or at least every 100 ms) and :meth:`Connections.close`
before it closes its socket: the daemon's receiver thread for the input (in its poll, and
while it waits for room in the lossless queue), its publisher thread for the results (between
two messages), the query thread for the query socket (in its poll). :meth:`Connections.counts`
may be called from any thread. A monitor's pipe is unbounded: libzmq's I/O thread blocks on a
full one, and with it every socket of the context (libzmq issue 3575).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, get_args

import zmq
from zmq.utils.monitor import recv_monitor_message

from nanoscout.lograte import LogEvery

__all__ = ["CONNECTION_EVENTS", "SOCKETS", "Connections", "SocketName", "transport_cap_bytes"]

log = logging.getLogger("nanoscout.daemon")

#: what became of connections to a socket (the ``event`` label of
#: ``nanoscout_connections_total`` and ``nanoscout_input_connections_total``, the keys of
#: ``health.input_connections`` and of each socket in ``health.connections``)
CONNECTION_EVENTS: Final = ("accepted", "disconnected", "handshake_aborted", "handshake_failed",
                            "handshake_failed_auth")

#: a watched socket's name (the ``socket`` label of ``nanoscout_connections_total``, the keys
#: of ``health.connections``)
SocketName = Literal["input", "results", "query"]
SOCKETS: Final[tuple[SocketName, ...]] = get_args(SocketName)


@dataclass(frozen=True)
class _Words:
    """How a socket's log lines name it, its peers and what else refuses their handshake."""

    title: str
    peer: str
    other: str
    cap_setting: str = ""


_WORDS: Final[dict[str, _Words]] = {
    "input": _Words("frame input", "an adapter",
                    "another socket type (an adapter in --mode auto tries PUSH before PUB on a "
                    "live daemon), a client without CURVE or holding another server key, or a "
                    "peer that is not ZeroMQ",
                    ", set by input.max_frame_bytes"),
    "results": _Words("result socket", "a subscriber",
                      "another socket type (only SUB clients may connect: an adapter pointed "
                      "at the results endpoint?), a client without CURVE or holding another "
                      "server key, or a peer that is not ZeroMQ"),
    "query": _Words("query socket", "a query client",
                    "another socket type (only REQ clients may connect), a client without "
                    "CURVE or holding another server key, or a peer that is not ZeroMQ"),
}

_MASK: Final = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKING = "handshaking"
_READY = "ready"
#: events that come right before the DISCONNECTED of their own connection: what it counts as
_ENDS: Final[dict[int, str]] = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_aborted",
                                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed"}
#: events that name no connection and come earlier: the mark they leave on one in its handshake
_MARKS: Final[dict[int, str]] = {zmq.EVENT_HANDSHAKE_SUCCEEDED: _READY,
                                 zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth"}


def transport_cap_bytes(max_frame_bytes: int) -> int:
    """The frame input's ZeroMQ ``MAXMSGSIZE``, bytes: twice ``input.max_frame_bytes`` plus
    1 MiB, far enough above the limit that ``decode_frame`` sees (and counts) every frame that
    breaks it; a message part above it is dropped by libzmq with its connection."""
    return 2 * max_frame_bytes + (1 << 20)


class Connections:
    """Counts (and logs) what becomes of the connections to ``sock``, the daemon's socket
    ``name`` (one of :data:`SOCKETS`).

    Create it before ``sock`` binds. ``cap_bytes``: the socket's transport cap
    (``MAXMSGSIZE``), bytes, named in the log line (None: the socket has none); ``on_event``:
    called with each counted event (the Prometheus counter); ``log_every_s``: at most one log
    line per event kind in this many seconds. ``socket``: the monitor's PAIR socket, for the
    owner's poller (readable: call :meth:`read`). ValueError for a name not in :data:`SOCKETS`.
    """

    def __init__(self, sock: zmq.Socket, name: SocketName, *, cap_bytes: int | None = None,
                 on_event: Callable[[str], None] = lambda event: None,
                 log_every_s: float = 60.0) -> None:
        if name not in _WORDS:
            raise ValueError(f"no such daemon socket to watch: {name!r} (known: "
                             f"{', '.join(SOCKETS)})")
        self.name: SocketName = name
        self._words = _WORDS[name]
        self._sock = sock
        self._cap = cap_bytes
        self._on_event = on_event
        addr = f"inproc://nanoscout-{name}-monitor-{id(self):x}"
        sock.monitor(addr, _MASK)
        try:
            self.socket: zmq.Socket = sock.context.socket(zmq.PAIR)
            self.socket.setsockopt(zmq.RCVHWM, 0)  # unbounded: see the module docstring
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.connect(addr)
        except BaseException:
            sock.monitor(None, 0)
            raise
        # file descriptor -> "handshaking", "ready" or "handshake_failed_auth", oldest first
        self._state: dict[int, str] = {}
        # what the next DISCONNECTED counts as (a NO_DETAIL or PROTOCOL just read), or None
        self._ending: str | None = None
        self._counts = dict.fromkeys(CONNECTION_EVENTS, 0)
        self._lock = threading.Lock()
        self._log_limit = LogEvery(log, log_every_s)
        self._closed = False

    def counts(self) -> dict[str, int]:
        """Connections by event (:data:`CONNECTION_EVENTS`) since start; any thread."""
        with self._lock:
            return dict(self._counts)

    def read(self) -> int:
        """Handle every monitor event waiting (never blocks); returns how many."""
        n = 0
        while not self._closed and self.socket.poll(0):
            msg = recv_monitor_message(self.socket)
            self._handle(int(msg["event"]), int(msg["value"]))
            n += 1
        return n

    def close(self) -> None:
        """Count the events still waiting, stop the monitor and close its socket (before
        the watched socket closes)."""
        if self._closed:
            return
        try:
            self.read()
        finally:
            self._closed = True
            self._sock.monitor(None, 0)
            self.socket.close(linger=0)

    def _handle(self, event: int, value: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self._state.pop(value, None)  # a number the OS gave again: that one is gone
            self._state[value] = _HANDSHAKING
            self._count("accepted")
        elif event in _ENDS:
            self._ending = _ENDS[event]
        elif event in _MARKS:
            self._mark(_MARKS[event])
        elif event == zmq.EVENT_DISCONNECTED:
            state = self._state.pop(value, None)
            what, self._ending = self._ending, None
            if what is not None:
                if state not in (None, _HANDSHAKING):
                    self._mark(state)  # it was still in its handshake: the mark was another's
            elif state == _HANDSHAKING:
                what = "handshake_failed"  # refused with no event: another socket type, ...
            else:
                what = "disconnected" if state in (None, _READY) else state
            self._count(what)
            self._log(what)

    def _mark(self, state: str) -> None:
        """Give ``state`` to the oldest connection still in its handshake (if any)."""
        fd = next((fd for fd, s in self._state.items() if s == _HANDSHAKING), None)
        if fd is not None:
            self._state[fd] = state

    def _count(self, event: str) -> None:
        with self._lock:
            self._counts[event] += 1
        self._on_event(event)

    def _log(self, event: str) -> None:
        since = self._log_limit.due(event)
        if since is None:
            return
        with self._lock:
            total = self._counts[event]
        words = self._words
        if event == "disconnected":
            # INFO: every peer that ends its run closes its connection this way too (the
            # demo's simulator, each acquisition, a subscriber); the counter tells the rest
            level = logging.INFO
            what = f"a connection closed after its handshake: {words.peer} that went away"
            if self._cap is not None:
                what += (f", or a message part over the transport cap of {self._cap} bytes "
                         f"(ZeroMQ's MAXMSGSIZE{words.cap_setting}), which ZeroMQ drops unread "
                         "with its connection; ZeroMQ cannot tell the two apart")
        elif event == "handshake_aborted":
            # INFO: short-lived clients, probes and scanners close so; nothing was refused
            level, what = logging.INFO, (
                "a connection closed during its handshake, the daemon refusing nothing: "
                f"{words.peer} or a TCP probe that closed before the handshake completed (so "
                "does a client of another socket type that found out first), or one silent "
                "for ZeroMQ's handshake interval (30 s)")
        elif event == "handshake_failed_auth":
            level, what = logging.WARNING, (
                "a connection was refused for its CURVE key: its public key is not in the "
                "daemon's authorized_keys folder")
        else:
            level, what = logging.INFO, (
                f"a connection was refused at its handshake: {words.other}")
        log.log(level, "%s: %s (%s: %d in all, %d more not logged since the last such line; "
                "at most one line every %g s)", words.title, what, event, total, since,
                self._log_limit.every_s)
