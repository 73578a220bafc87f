"""Subscriber SDK: typed results from a running daemon.

>>> with Subscriber("tcp://127.0.0.1:5556", topics=("det.", "alert.")) as sub:
...     for msg in sub.messages(timeout=10):
...         if msg.kind == "det":
...             print(msg.header.seq, msg.array["ecd_nm"].mean())

Every ``det``/``stats``/``class``/``alert`` message is a :class:`nanoscout.wire.protocol.Message`: its
``header`` is the typed pydantic header and ``array`` the particle table (a numpy structured
array). ZeroMQ reconnects by itself when the daemon restarts. Sequence gaps in ``det`` messages
(frames the daemon skipped in live mode, or results lost because this subscriber was too slow)
are counted per source in :attr:`Subscriber.missed` and noted on :attr:`Subscriber.last_gap`.
Malformed messages are counted in :attr:`Subscriber.rejected` and skipped, never raised.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import zmq

from nanoscout.wire.errors import ProtocolError
from nanoscout.wire.protocol import HealthHeader, Message, decode_message
from nanoscout.wire.transport import ClientKeys, connect, result_subscriber


@dataclass(frozen=True)
class Gap:
    """``missed`` det results of ``source`` were not seen before ``seq``."""

    source: str
    seq: int
    missed: int


class Subscriber:
    """A SUB connection to the daemon's result endpoint, filtered by topic prefixes."""

    def __init__(
        self,
        endpoint: str,
        topics: tuple[str, ...] = ("det.", "stats.", "class.", "alert.", "health"),
        *,
        ctx: zmq.Context | None = None,
        hwm: int = 10_000,
        curve: ClientKeys | None = None,
    ) -> None:
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        # health is always needed to know the daemon is there; it is filtered out of messages()
        # unless asked for.
        self._want_health = any("health".startswith(t) for t in topics) or "" in topics
        subs = tuple(topics) + (() if self._want_health else ("health",))
        self._sock = result_subscriber(self._ctx, subs, hwm=hwm)
        if curve is not None:
            curve.apply(self._sock)
        connect(self._sock, endpoint)
        self.endpoint = endpoint
        self.missed: dict[str, int] = {}
        self.rejected = 0
        self.last_gap: Gap | None = None
        self.last_health: HealthHeader | None = None
        self.last_seen = 0.0  # monotonic time of the last message of any kind
        self._last_seq: dict[str, int] = {}

    def wait_ready(self, timeout: float = 10.0) -> HealthHeader:
        """Block until the daemon's first ``health`` message arrives (proof of a live connection).

        Raises TimeoutError naming the endpoint if none arrives within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._recv(max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.kind == "health":
                return msg.header  # type: ignore[return-value]
        raise TimeoutError(f"no health message from the daemon at {self.endpoint} within {timeout} s")

    def connected(self, stale_s: float = 3.0) -> bool:
        """True when any message (health comes every second) arrived in the last ``stale_s`` s."""
        return self.last_seen > 0 and time.monotonic() - self.last_seen < stale_s

    def _recv(self, timeout: float | None) -> Message | None:
        ms = None if timeout is None else int(timeout * 1000)
        if not self._sock.poll(ms):
            return None
        parts = self._sock.recv_multipart(copy=False)
        self.last_seen = time.monotonic()
        try:
            msg = decode_message([p.buffer for p in parts])
        except ProtocolError:
            self.rejected += 1
            return None
        if msg.kind == "health":
            self.last_health = msg.header  # type: ignore[assignment]
        elif msg.kind == "det":
            self._track(msg)
        return msg

    def _track(self, msg: Message) -> None:
        source, seq = msg.header.source, msg.header.seq  # type: ignore[attr-defined]
        last = self._last_seq.get(source)
        if last is not None and seq > last + 1:
            gap = Gap(source, seq, seq - last - 1)
            self.missed[source] = self.missed.get(source, 0) + gap.missed
            self.last_gap = gap
        self._last_seq[source] = seq

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message of the subscribed topics, or None after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self._recv(remaining)
            if msg is None:
                if deadline is None or time.monotonic() >= deadline:
                    return None
                continue
            if msg.kind == "health" and not self._want_health:
                continue
            return msg

    def messages(self, timeout: float | None = None, idle: float | None = None) -> Iterator[Message]:
        """Yield messages until ``timeout`` s in total or ``idle`` s without one have passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            remaining = None if deadline is None else deadline - time.monotonic()
            wait = remaining if idle is None else (idle if remaining is None else min(idle, remaining))
            msg = self.recv(wait)
            if msg is None:
                if idle is not None:
                    return
                continue
            yield msg

    def close(self) -> None:
        """Close the socket (and the context if this subscriber created it)."""
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
