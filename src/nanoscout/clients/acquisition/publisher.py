"""FramePublisher: the one place where adapters turn a numpy image into a ``frame`` message.

It makes sure frames are not lost unnoticed:

* **The right socket, or a loud failure.** On connect it watches the ZeroMQ handshake. A
  ``lossless`` daemon takes PUSH, a ``live`` one PUB; ``mode="auto"`` (the default) tries PUSH,
  then PUB, and uses the one the daemon accepts. A mode the daemon refuses, nothing listening,
  or a CURVE key the daemon does not know is an error within ``connect_timeout_s``, naming what
  to do, instead of frames vanishing.
* **No slow-joiner loss (live).** Frames are published through an XPUB socket, and the first
  is sent only once the daemon's subscription has arrived.
* **End-to-end confirmation (lossless).** With the daemon's result endpoint (``results``; the
  default one when the frame endpoint is the default), the publisher subscribes to its
  ``ack.<source>`` messages, which say for every frame of its session whether the daemon
  answered it (or had taken it before) or dropped it, and why. :meth:`close` waits for
  the outstanding ones (as long as confirmations keep coming, ``confirm_timeout_s`` without
  one at most) and reports those never answered (:class:`SendReport`), which the commands turn
  into a non-zero exit naming them.
* **Resent after a daemon restart (lossless).** Every frame carries this publisher's
  ``session``; unanswered frames are kept (at most ``resend_max_bytes``; the arrays are
  referenced, not copied: do not modify an array after sending it) and, when the daemon's
  health shows it restarted (a new ``started_ns``), sent again with their numbers. The daemon
  drops a number of a session it took already, so nothing is analysed twice; what the killed
  daemon held is answered by the new one.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.errors import ConfigError, NanoscoutError, Reason
from nanoscout.wire.protocol import (
    AckHeader,
    Buffer,
    HealthHeader,
    MetaValue,
    encode_frame,
    frame_header,
)
from nanoscout.wire.transport import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_RESULT_ENDPOINT,
    ClientKeys,
    connect,
)

__all__ = ["FramePublisher", "Mode", "PublishError", "SendReport", "seq_ranges"]

log = logging.getLogger("nanoscout.publisher")

Mode = Literal["push", "pub", "auto"]
#: at close, how long queued live frames may take to leave, ms
_PUB_LINGER_MS = 2000


class PublishError(NanoscoutError):
    """The daemon cannot take this adapter's frames (wrong mode, nobody listening, bad key)."""

    reason = Reason.CONFIG


@dataclass
class SendReport:
    """What a publisher sent and what the daemon confirmed (``confirmed`` is None when the
    frames were not confirmed: live mode, or no result endpoint)."""

    sent: int = 0
    confirmed: int | None = None
    unconfirmed: list[int] = field(default_factory=list)
    #: frames the daemon took and dropped: seq -> reason (engine_failure, shutdown, ...)
    dropped: dict[int, str] = field(default_factory=dict)
    #: frames sent again after a daemon restart
    resent: int = 0

    @property
    def complete(self) -> bool:
        """True unless frames sent for confirmation were dropped or never answered."""
        return not self.unconfirmed and not self.dropped

    def describe(self) -> str:
        """One line for the operator."""
        if self.confirmed is None:
            return f"sent {self.sent} frames"
        text = f"sent {self.sent} frames, {self.confirmed} confirmed by the daemon"
        if self.resent:
            text += f" ({self.resent} sent again after a daemon restart)"
        if self.dropped:
            reasons = sorted(set(self.dropped.values()))
            text += (f"; {len(self.dropped)} DROPPED by the daemon ({', '.join(reasons)}; seq "
                     f"{seq_ranges(list(self.dropped))})")
        if self.unconfirmed:
            text += (f"; {len(self.unconfirmed)} NOT confirmed (seq "
                     f"{seq_ranges(self.unconfirmed)})")
        return text


def seq_ranges(seqs: list[int], limit: int = 12) -> str:
    """``[1, 2, 3, 7, 9, 10]`` as ``1-3, 7, 9-10`` (at most ``limit`` ranges, then "...")."""
    out: list[str] = []
    s = sorted(seqs)
    i = 0
    while i < len(s) and len(out) < limit:
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ", ".join(out) + (", ..." if i < len(s) else "")


_MISMATCH = {
    "push": "it is a live daemon (SUB input): send with --mode pub, or --mode auto",
    "pub": "it is a lossless daemon (PULL input): send with --mode push, or --mode auto",
}


def _handshake(sock: zmq.Socket, endpoint: str, timeout_s: float) -> str | None:
    """Connect ``sock`` and watch its handshake; returns None when the peer accepted it, else
    why not ("type", "auth", "nobody"). ``inproc://`` has no handshake to watch: None."""
    if endpoint.startswith("inproc://"):
        connect(sock, endpoint)
        return None
    monitor = sock.get_monitor_socket()
    try:
        connect(sock, endpoint)
        deadline = time.monotonic() + timeout_s
        connected = refused = 0
        while time.monotonic() < deadline:
            if not monitor.poll(max(1, int(1000 * (deadline - time.monotonic())))):
                break
            event = zmq.Event(recv_monitor_message(monitor)["event"])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return None
            if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH,):
                return "auth"
            if event == zmq.EVENT_CONNECTED:
                connected += 1
            elif event == zmq.EVENT_DISCONNECTED and connected:
                refused += 1
                if refused >= 2:  # the peer closes every connection of this socket type
                    return "type"
        return "type" if refused else "nobody"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


class FramePublisher:
    """Connects to the daemon's frame input and sends frames with increasing ``seq``.

    ``mode``: ``"push"`` for a ``lossless`` daemon (send blocks while the daemon is behind:
    back-pressure), ``"pub"`` for a ``live`` one, ``"auto"`` whichever the daemon accepts
    (over ``inproc://``, which has no handshake to watch, ``auto`` means ``push``).
    ``results``: the daemon's result endpoint, for confirmation (lossless); by default the
    default result endpoint when ``endpoint`` is the default frame endpoint, else none.
    Raises :class:`PublishError` when the daemon cannot take the frames.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        mode: Mode = "auto",
        source: str = "replay",
        hwm: int = 100,
        ctx: zmq.Context | None = None,
        first_seq: int = 0,
        curve: ClientKeys | None = None,
        results: str | None = None,
        connect_timeout_s: float = 10.0,
        confirm_timeout_s: float = 30.0,
        resend_max_bytes: int = 2 << 30,
        log_line: Callable[[str], None] | None = None,
    ) -> None:
        if mode not in ("push", "pub", "auto"):
            raise ConfigError(f"frame output mode {mode!r} must be 'push', 'pub' or 'auto'")
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self.endpoint = endpoint
        self.source = source
        self.seq = first_seq
        self.confirm_timeout_s = confirm_timeout_s
        self._say = log_line or log.info
        self._hwm, self._curve = hwm, curve
        self.mode: Literal["push", "pub"] = "push"
        self._sock: zmq.Socket | None = None
        self._confirm: Subscriber | None = None
        self._outstanding: dict[int, None] = {}
        #: unanswered frames kept for a resend: seq -> encoded parts (and their bytes)
        self._unanswered: OrderedDict[int, list[Buffer]] = OrderedDict()
        self._unanswered_bytes = 0
        self.resend_max_bytes = resend_max_bytes
        self._daemon_started: int | None = None
        #: this publisher's run: its frames may be resent, and the daemon drops duplicates
        self.session = secrets.token_hex(6)
        self.report = SendReport()
        try:
            self.mode = self._open(mode, connect_timeout_s)
            if self.mode == "push":
                self._open_confirmations(results, connect_timeout_s)
        except BaseException:
            self.close(confirm=False)
            raise

    # ------------------------------------------------------------------ connecting
    def _socket(self, mode: Literal["push", "pub"]) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUSH if mode == "push" else zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve.apply(sock)
        return sock

    def _open(self, mode: Mode, timeout_s: float) -> Literal["push", "pub"]:
        tried: list[str] = []
        for candidate in (("push", "pub") if mode == "auto" else (mode,)):
            sock = self._socket(candidate)  # type: ignore[arg-type]
            why = _handshake(sock, self.endpoint, timeout_s)
            if why is None and candidate == "pub" and not self._subscribed(sock, timeout_s):
                why = "type"
            if why is None:
                self._sock = sock
                return candidate  # type: ignore[return-value]
            sock.close(linger=0)
            if why == "nobody":
                raise PublishError(f"no daemon answers at {self.endpoint} (waited "
                                   f"{timeout_s:g} s): is `nanoscout serve` running there?")
            if why == "auth":
                raise PublishError(f"the daemon at {self.endpoint} refused this client's "
                                   "CURVE key (is its public key in the daemon's authorized "
                                   "folder?)")
            tried.append(candidate)
        if mode == "auto":
            raise PublishError(f"the peer at {self.endpoint} accepts neither PUSH nor PUB "
                               "frames: is it a nanoscout frame input?")
        raise PublishError(f"the daemon at {self.endpoint} refuses {mode.upper()} frames: "
                           f"{_MISMATCH[mode]}")

    @staticmethod
    def _subscribed(sock: zmq.Socket, timeout_s: float) -> bool:
        """Wait until a subscriber's subscription reaches the XPUB socket (no slow joiner)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
            if sock.poll(wait_ms) and sock.recv()[:1] == b"\x01":
                return True
        return False

    def _open_confirmations(self, results: str | None, timeout_s: float) -> None:
        implicit = results is None
        if implicit:
            if self.endpoint != DEFAULT_FRAME_ENDPOINT:
                self._say(f"frames to {self.endpoint} are sent unconfirmed (give the daemon's "
                          "result endpoint, --results, to have each one confirmed)")
                return
            results = DEFAULT_RESULT_ENDPOINT
        assert results is not None
        sub = Subscriber(results, topics=(f"ack.{self.source}", "health"), ctx=self._ctx,
                         curve=self._curve)
        try:
            health = sub.wait_ready(timeout_s)
        except TimeoutError:
            sub.close()
            if implicit:
                self._say(f"no health from a daemon at {results}: frames are sent unconfirmed")
                return
            raise PublishError(f"no daemon publishes results at {results} (waited "
                               f"{timeout_s:g} s): give its result endpoint with --results"
                               ) from None
        if health.policy != "lossless":
            sub.close()
            raise PublishError(f"the daemon publishing at {results} runs policy "
                               f"{health.policy!r}, but {self.endpoint} took PUSH frames: "
                               "are --connect and --results the same daemon's?")
        self._confirm = sub
        self._daemon_started = health.started_ns
        self.report.confirmed = 0

    # ------------------------------------------------------------------ sending
    def send(
        self,
        image: np.ndarray,
        *,
        pixel_size_nm: float | None,
        modality: str | None = None,
        stage: tuple[float, float] | None = None,
        magnification: float | None = None,
        meta: Mapping[str, MetaValue] | None = None,
        t_acq_ns: int | None = None,
        particle_size_nm: tuple[float, float] | None = None,
        particle_size_px: tuple[float, float] | None = None,
    ) -> int:
        """Send one 2-D image (stage in µm, pixel size in nm; ``particle_size_nm``: the
        operator's (low, high) median particle diameter, nm, that guides the daemon's
        working scale; ``particle_size_px``: the same in px, for a frame without a pixel
        size); returns the ``seq`` it was given."""
        assert self._sock is not None
        seq = self.seq
        header = frame_header(
            image,
            source=self.source,
            seq=seq,
            t_acq_ns=time.time_ns() if t_acq_ns is None else t_acq_ns,
            pixel_size_nm=pixel_size_nm,
            modality=modality,
            stage=stage,
            magnification=magnification,
            meta=meta,
            session=self.session,
            particle_size_nm=particle_size_nm,
            particle_size_px=particle_size_px,
        )
        parts = encode_frame(header, image)
        self._sock.send_multipart(parts, copy=False)
        self.seq += 1
        self.report.sent += 1
        if self._confirm is not None:
            self._outstanding[seq] = None
            self._keep(seq, parts, image.nbytes)
            self._collect(0.0)
        return seq

    def _keep(self, seq: int, parts: list[Buffer], nbytes: int) -> None:
        """Keep an unanswered frame for a resend, within ``resend_max_bytes``."""
        self._unanswered[seq] = parts
        self._unanswered_bytes += nbytes
        while self._unanswered_bytes > self.resend_max_bytes and len(self._unanswered) > 1:
            _, old = self._unanswered.popitem(last=False)  # can no longer be resent
            self._unanswered_bytes -= memoryview(old[2]).nbytes

    def _answered(self, seq: int) -> None:
        parts = self._unanswered.pop(seq, None)
        if parts is not None:
            self._unanswered_bytes -= memoryview(parts[2]).nbytes

    def _restarted(self, health: HealthHeader) -> None:
        """The daemon's health: after a restart, send every unanswered frame again."""
        started = health.started_ns
        if started is None or started == self._daemon_started:
            return
        known = self._daemon_started is not None
        self._daemon_started = started
        if not known or not self._unanswered or self._sock is None:
            return
        self._say(f"the daemon restarted: sending {len(self._unanswered)} unanswered frame(s) "
                  f"again (seq {seq_ranges(list(self._unanswered))})")
        for parts in self._unanswered.values():
            self._sock.send_multipart(parts, copy=False)
            self.report.resent += 1

    def send_raw(self, parts: list[bytes]) -> None:
        """Send arbitrary multipart bytes (for fault-injection tests and tools)."""
        assert self._sock is not None
        self._sock.send_multipart(parts)

    def _collect(self, timeout_s: float) -> int:
        """Read the confirmations that have arrived (waiting up to ``timeout_s`` for the
        first); returns how many were new."""
        sub = self._confirm
        assert sub is not None
        new = 0
        wait: float | None = timeout_s
        while True:
            msg = sub.recv(wait)
            if msg is None:
                return new
            wait = 0.0
            if isinstance(msg.header, HealthHeader):
                self._restarted(msg.header)
                continue
            ack = msg.header
            if not (isinstance(ack, AckHeader) and ack.source == self.source
                    and ack.session == self.session):
                continue
            if self._outstanding.pop(ack.seq, 0) is not None:
                continue  # not outstanding (any more)
            self._answered(ack.seq)
            new += 1
            if ack.status == "dropped":
                self.report.dropped[ack.seq] = ack.reason or "unknown"
            else:
                assert self.report.confirmed is not None
                self.report.confirmed += 1

    @property
    def outstanding(self) -> list[int]:
        """Sequence numbers sent for confirmation and not answered yet."""
        return list(self._outstanding)

    def close(self, *, confirm: bool = True) -> SendReport:
        """Wait for the confirmations (as long as they keep coming; at most
        ``confirm_timeout_s`` without one), close, and return what was sent and confirmed.

        Without confirmation, queued frames get ``confirm_timeout_s`` to be delivered.
        """
        if self._confirm is not None:
            if confirm:  # wait as long as answers keep coming
                quiet_until = time.monotonic() + self.confirm_timeout_s
                while self._outstanding and time.monotonic() < quiet_until:
                    if self._collect(min(1.0, quiet_until - time.monotonic())):
                        quiet_until = time.monotonic() + self.confirm_timeout_s
            self.report.unconfirmed = list(self._outstanding)
            self._confirm.close()
            self._confirm = None
        if self._sock is not None and not self._sock.closed:
            # what is still queued gets time to leave: confirmed frames have left already;
            # unconfirmed pushes get the timeout; live frames (newest wins anyway) a moment,
            # so a stopped daemon does not hold the adapter's exit
            if not confirm or self.report.confirmed is not None:
                linger = 0
            elif self.mode == "pub":
                linger = _PUB_LINGER_MS
            else:
                linger = int(self.confirm_timeout_s * 1000)
            self._sock.close(linger=linger)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()
        return self.report

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(confirm=exc[0] is None)
