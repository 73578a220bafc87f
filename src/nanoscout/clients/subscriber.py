"""Subscriber SDK: typed results from a running daemon.

>>> with Subscriber(RESULTS, topics=("det.", "alert.")) as sub:  # e.g. tcp://127.0.0.1:5556
...     for msg in sub.messages(timeout=60):
...         if msg.kind == "det":
...             print(msg.header.source, msg.header.units, msg.array["ecd_nm"].mean() > 0)
...             break
sim nm True

(``RESULTS``: the daemon's result endpoint; the example runs against a real daemon in the
doctests, ``tests/conftest.py``.)

Every ``det``/``stats``/``class``/``alert`` message is a :class:`nanoscout.wire.protocol.Message`: its
``header`` is the typed pydantic header and ``array`` the particle table (a numpy structured
array). ZeroMQ reconnects by itself when the daemon restarts. Every result header carries a
per-topic message counter (``topic_seq``, protocol 1.3), so any lost message shows, whatever
the topics subscribed: gaps are counted per topic in :attr:`Subscriber.gaps`, per source in
:attr:`Subscriber.missed` (the :data:`MAX_MISSED_SOURCES` sources with the most recent gaps;
every gap also in :attr:`Subscriber.missed_total`), and noted on :attr:`Subscriber.last_gap`.
A restarted daemon numbers its messages from 0 again; each result names its daemon run
(``daemon_run``, protocol 1.11; a heartbeat its ``started_ns``), so the messages of a new run
published before this subscriber saw its first one (while it reconnected) are counted too.
(Frames the daemon skips in live mode are not lost messages: their ``det`` is never sent. From
a daemon older than 1.3, gaps in ``det`` frame numbers are counted instead; from one older
than 1.11, a falling ``topic_seq`` is taken for a restart with nothing missing.) A message
that comes late, after a newer one of its topic and run (a relay or two endpoints can reorder
them), is handed on, and where it was counted missed (among the last :data:`LATE_RANGES`
ranges of a topic's gaps) the loss is taken back from the counts (``topic_seq`` 1, 3, 2, 4
counted 2 missed for none). Malformed
messages are counted in :attr:`Subscriber.rejected` (by reason in
:attr:`Subscriber.rejected_by_reason`) and skipped, never raised; they are logged too, at most
one line per reason every :data:`REFUSAL_LOG_S` s (the first at once), so that a daemon of
another major protocol version, all of whose messages are refused, is named in the log rather
than taken for an idle one, and :meth:`Subscriber.wait_ready` names them when no health
message could be read. A message that comes twice (the same topic and header bytes as one of
the last :data:`DUPLICATE_WINDOW`: a publisher's bug, or two endpoints that relay one daemon)
is handed on once (health messages excepted: a repeated one only says the same again); the
repeats are counted in :attr:`Subscriber.duplicates` and logged as the
refusals are (a recorder stored them twice, and took a late repeat for a restarted daemon and
the next message for a loss).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import zmq

from nanoscout.lograte import LogEvery
from nanoscout.wire.errors import ProtocolError
from nanoscout.wire.protocol import DetHeader, HealthHeader, Message, decode_message
from nanoscout.wire.sequence import Gap, SequenceTracker
from nanoscout.wire.transport import ClientKeys, connect, result_subscriber

__all__ = ["DUPLICATE_WINDOW", "LATE_RANGES", "MAX_MISSED_SOURCES", "REFUSAL_LOG_S", "Gap",
           "Subscriber", "track_gap"]

log = logging.getLogger("nanoscout.subscriber")

#: sources :attr:`Subscriber.missed` remembers: those with the most recent gaps (a publisher
#: that names ever new sources must not grow it without bound); the topics remembered for gaps
#: (:attr:`Subscriber.gaps`) are bounded alike
MAX_MISSED_SOURCES = 4096
#: refused messages are logged at most once every this many seconds per reason (the first at
#: once; each line says how many were refused since the one before), s
REFUSAL_LOG_S = 60.0
#: messages remembered (a 16-byte digest of each one's topic and header) to recognise one that
#: comes again: every header names its message (``topic_seq``, times in ns), so two equal
#: headers are one message
DUPLICATE_WINDOW = 4096
#: ranges of missed numbers remembered per topic (the newest gaps): a late message in one is
#: counted missed no more (a later one stays counted; memory stays bounded)
LATE_RANGES = 16


def track_gap(tracker: SequenceTracker, msg: Message[Any]) -> Gap | None:
    """Record ``msg`` in ``tracker`` (keyed by topic): its ``topic_seq``, or for a ``det`` of
    a daemon older than protocol 1.3 its frame ``seq``. The numbers are the daemon run's
    (``daemon_run``, v1.11; ``health.started_ns``): a new run's first message seen with
    ``topic_seq`` n after another run's means n messages of the new run were missed. Returns
    the gap before it, if any (``missed`` -1: ``msg`` came late and was counted missed)."""
    seq = getattr(msg.header, "topic_seq", None)
    if seq is not None:
        run = getattr(msg.header, "daemon_run", getattr(msg.header, "started_ns", None))
        return tracker.observe(msg.topic, seq, run=run)
    if isinstance(msg.header, DetHeader):  # its own key: never mixed with topic_seq numbers
        return tracker.observe(f"{msg.topic}#frame", msg.header.seq)
    return None


class Subscriber:
    """A SUB connection to the daemon's result endpoint, filtered by topic prefixes."""

    def __init__(
        self,
        endpoint: str | Sequence[str],
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
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        try:
            for ep in endpoints:
                connect(self._sock, ep)
        except Exception:
            self.close()
            raise
        self.endpoint = ", ".join(endpoints)
        #: messages missed per topic (``det.sim``, ``alert.sim``, ...)
        self.gaps = SequenceTracker(max_keys=4096, holes=LATE_RANGES)
        #: messages missed per source, all its topics together, for the
        #: :data:`MAX_MISSED_SOURCES` sources with the most recent gaps (the others forgotten)
        self.missed: OrderedDict[str, int] = OrderedDict()
        #: messages missed in total, of every source (forgotten ones too)
        self.missed_total = 0
        self.rejected = 0
        #: messages refused, by reason (:class:`~nanoscout.wire.errors.Reason` values)
        self.rejected_by_reason: dict[str, int] = {}
        self.last_rejection: str | None = None
        #: messages that came again (the same topic and header as a recent one), not handed on
        self.duplicates = 0
        self._recent: OrderedDict[bytes, None] = OrderedDict()  # DUPLICATE_WINDOW digests
        # one log line per reason (and "duplicate") a minute
        self._log_every = LogEvery(log, REFUSAL_LOG_S)
        self.last_gap: Gap | None = None
        self.last_health: HealthHeader | None = None
        self.last_seen = 0.0  # monotonic time of the last message of any kind

    def wait_ready(self, timeout: float = 10.0) -> HealthHeader:
        """Block until the daemon's first ``health`` message arrives (proof of a live connection).

        Raises TimeoutError naming the endpoint if none arrives within ``timeout`` s, and the
        messages refused so far (:meth:`refused`) when some came: a daemon of another major
        protocol version is there, but none of its messages can be read.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._recv(max(0.0, deadline - time.monotonic()))
            if msg is not None and isinstance(msg.header, HealthHeader):
                return msg.header
        refused = self.refused()
        raise TimeoutError(f"no health message from the daemon at {self.endpoint} within "
                           f"{timeout} s" + ("" if refused is None else f": {refused}"))

    def refused(self) -> str | None:
        """The messages refused so far in words (how many, by reason, and the last one's
        error), or None when none was."""
        if not self.rejected:
            return None
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected_by_reason.items()))
        return (f"{self.rejected} messages came but were refused ({reasons}; last: "
                f"{self.last_rejection})")

    def _log_dropped(self, kind: str, what: str, total: int, detail: object) -> None:
        """Log one message not handed on (``kind``: a refusal's reason, or ``duplicate``;
        ``what``: "refused" or "dropped"; ``total``: so far), at most one line per kind every
        :data:`REFUSAL_LOG_S` s (the others counted for the next line)."""
        since = self._log_every.due(kind)
        if since is not None:
            log.warning("%s a message from %s (%s, %d %s in all%s): %s", what, self.endpoint,
                        kind, total, what,
                        f", {since} more since the last such line" if since else "", detail)

    def _repeated(self, parts: list[Any]) -> bool:
        """Whether this message (its topic and header) came already, among the last
        :data:`DUPLICATE_WINDOW`; remembers it when not."""
        digest = hashlib.blake2b(digest_size=16)
        for part in parts[:2]:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        key = digest.digest()
        if key in self._recent:
            return True
        self._recent[key] = None
        if len(self._recent) > DUPLICATE_WINDOW:
            self._recent.popitem(last=False)
        return False

    def connected(self, stale_s: float = 3.0) -> bool:
        """True when any message (health comes every second) arrived in the last ``stale_s`` s."""
        return self.last_seen > 0 and time.monotonic() - self.last_seen < stale_s

    def _recv(self, timeout: float | None) -> Message[Any] | None:
        ms = None if timeout is None else int(timeout * 1000)
        if not self._sock.poll(ms):
            return None
        parts = self._sock.recv_multipart(copy=False)
        self.last_seen = time.monotonic()
        try:
            msg = decode_message([p.buffer for p in parts])
        except ProtocolError as exc:
            self.rejected += 1
            reason = str(exc.reason)
            self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
            self.last_rejection = str(exc)
            self._log_dropped(reason, "refused", self.rejected, exc)
            return None
        if not isinstance(msg.header, HealthHeader) and self._repeated([p.buffer for p in parts]):
            self.duplicates += 1
            self._log_dropped("duplicate", "dropped", self.duplicates,
                              f"{msg.topic} (topic_seq "
                              f"{getattr(msg.header, 'topic_seq', None)}, frame "
                              f"{getattr(msg.header, 'seq', None)}) came again")
            return None
        if isinstance(msg.header, HealthHeader):
            self.last_health = msg.header
        gap = track_gap(self.gaps, msg)
        if gap is not None:
            source = msg.topic.split(".", 1)[1] if "." in msg.topic else msg.topic
            self.missed[source] = max(self.missed.get(source, 0) + gap.missed, 0)
            self.missed.move_to_end(source)
            if len(self.missed) > MAX_MISSED_SOURCES:
                self.missed.popitem(last=False)
            self.missed_total = max(self.missed_total + gap.missed, 0)
            if gap.missed > 0:  # a late message (-1) is no gap
                self.last_gap = gap
        return msg

    def waiting(self) -> bool:
        """Whether a message has been received and not read yet (a malformed one too)."""
        return bool(self._sock.poll(0))

    def recv(self, timeout: float | None = None) -> Message[Any] | None:
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

    def messages(self, timeout: float | None = None, idle: float | None = None
                 ) -> Iterator[Message[Any]]:
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
        if not self._sock.closed:
            self._sock.close(linger=0)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
