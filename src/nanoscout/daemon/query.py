"""The daemon's query socket (ZeroMQ REP): the AI lens's feature maps of a live frame, and
control requests (v1.4), on request.

A client (``nanoscout lens --connect``, the dashboard) sends a :class:`~nanoscout.wire.protocol.LensRequest`
naming a source and lens outputs (``act_enc1``, ``act_code``, ``reconstruction``, ...); the
server runs the lens on the newest frame of that source the worker has analysed and answers with
a :class:`~nanoscout.wire.protocol.LensReply` and one float16 buffer per output. Every request gets a
reply — an unknown source or output, a malformed request, a frame without contrast or a lens
failure comes back as ``error`` — so a REQ client never hangs, and nothing a client sends can
stop the daemon. (A request over 64 KiB is answered with an error unread; one with a part over
1 MiB is dropped by the transport, which disconnects its sender.) A frame without contrast
(beam blanked, shutter closed: :class:`~nanoscout.wire.errors.BlankFrame`, the criterion under
which the pipeline does not classify it, :func:`nanoscout.analysis.classifier.model_input`) is
refused before the lens runs, with an error naming the frame (``frame cam#12: blank frame
(...)``): the lens would answer any such frame alike, with a novelty of ~88. Each request is
counted, answered or refused. The lens sees the frame's own pixels, prepared as the pipeline
prepares them for its ``class`` message (``model_input``: in float64 where float32 would lose
them), so a reply's novelty is that message's novelty.

A :class:`~nanoscout.wire.protocol.ControlRequest` (the dashboard's "reset statistics" and
"set drift reference now", v1.5 "save frame", "swap model", "revert model") is handed to the
daemon's control handler (:meth:`Daemon.control <nanoscout.daemon.daemon.Daemon.control>`):
statistics requests go to the pipeline, which applies them before the source's next frame; a
model swap is loaded, checked and probed here, on this thread, never on the worker's, which
only switches between two frames; the :class:`~nanoscout.wire.protocol.ControlReply` says it
was done, or why not (a swap's reply waits for the switch: up to a model load and a probe). The
socket is served with or without the lens (lens requests then answer that none is loaded),
under the same access rules as the other sockets (loopback, or CURVE).

The server owns its socket, the socket's monitor and its thread. The monitor counts what
becomes of the clients' connections (:class:`~nanoscout.daemon.connections.Connections`,
``socket="query"``: a client refused for its CURVE key is ``handshake_failed_auth`` and a
warning in the log; :attr:`LensServer.connections`), read by this thread in the same poll as
the requests. The worker hands it frames with :meth:`LensServer.offer` (a reference, no copy;
one frame per source is kept). ONNX Runtime sessions may be run from several threads, so the
lens runs here without stopping the worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import zmq

from nanoscout.analysis.classifier import FieldClassifier
from nanoscout.analysis.frame import Frame
from nanoscout.daemon.connections import Connections
from nanoscout.wire.errors import BlankFrame, NanoscoutError, ProtocolError, Reason
from nanoscout.wire.protocol import (
    ControlReply,
    ControlRequest,
    LensReply,
    LensRequest,
    decode_message,
    encode_message,
)
from nanoscout.wire.transport import bind

log = logging.getLogger("nanoscout.query")

_POLL_MS = 100
#: a request larger than this (all parts together) is answered with an error, not read
MAX_REQUEST_BYTES = 1 << 16
#: what libzmq accepts at all per part: above it the sender is disconnected and nothing can
#: be answered (requests are small maps; this only bounds what a hostile peer costs)
_TRANSPORT_MAX_BYTES = 1 << 20


class LensServer:
    """Answers lens and control requests on a REP socket from its own thread."""

    def __init__(self, ctx: zmq.Context, classifier: FieldClassifier | None, *,
                 secure: Callable[[zmq.Socket], None] | None = None,
                 control: Callable[[ControlRequest], ControlReply] | None = None,
                 count: Callable[[str], None] | None = None,
                 on_connection: Callable[[str], None] = lambda event: None) -> None:
        """``classifier``: the one whose lens answers lens requests (None or without a lens:
        they are refused); ``control``: answers a control request (None: refused; a
        ValueError it raises is the reply's error). ``secure``: applied to the socket before
        binding (CURVE server keys). ``count``: called with "answered" or "refused" once per
        request (the daemon's Prometheus counter). ``on_connection``: called with each event
        of a client's connection (:data:`~nanoscout.daemon.connections.CONNECTION_EVENTS`)."""
        if (classifier is None or classifier.lens is None) and control is None:
            raise NanoscoutError("the query socket needs the lens ([classify] lens_enabled) "
                                 "or a control handler")
        self.classifier = classifier
        self.control = control
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _TRANSPORT_MAX_BYTES)
        if secure is not None:
            secure(self._sock)
        #: what became of the clients' connections (counts: any thread)
        self.connections = Connections(self._sock, "query", cap_bytes=_TRANSPORT_MAX_BYTES,
                                       on_event=on_connection)
        self._latest: dict[str, Frame] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.refused = 0
        self._count = count

    @property
    def available(self) -> list[str]:
        """The lens outputs a client may ask for (none without a lens)."""
        if self.classifier is None or self.classifier.lens is None:
            return []
        return [t.name for t in self.classifier.lens.outputs]

    def offer(self, frame: Frame) -> None:
        """Keep ``frame`` as the newest frame of its source (called by the worker as it starts
        analysing it, so a client that has its results finds it here)."""
        with self._lock:
            self._latest[frame.source] = frame

    def forget(self, source: str) -> None:
        """Forget the newest frame of ``source`` (the daemon evicted the source)."""
        with self._lock:
            self._latest.pop(source, None)

    def start(self, endpoint: str, guard: Callable[[Callable[[], None]], Callable[[], None]]
              ) -> str:
        """Bind and start serving; returns the bound endpoint. ``guard`` wraps the loop."""
        try:
            bound = bind(self._sock, endpoint)
        except BaseException:  # no thread will close them
            self.connections.close()
            self._sock.close(linger=0)
            raise
        self._thread = threading.Thread(target=guard(self._loop), name="nanoscout-query",
                                        daemon=True)
        self._thread.start()
        return bound

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (it closes the socket)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        sock, conns = self._sock, self.connections
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(conns.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if conns.socket in ready:
                    conns.read()
                if sock not in ready:
                    continue
                try:
                    parts = sock.recv_multipart(copy=False)
                except zmq.ZMQError as exc:  # e.g. an oversized request dropped by libzmq
                    log.warning("query socket: %s", exc)
                    continue
                try:
                    reply = self.answer(parts)
                except Exception as exc:  # a bug answering one request never ends the daemon
                    self._note(False)
                    log.warning("query request failed", exc_info=True)
                    reply = encode_message(LensReply(source="", error=f"internal error: {exc!r}"))
                sock.send_multipart(reply, copy=False)
        finally:
            try:
                conns.close()  # before the socket it monitors
            finally:
                sock.close(linger=0)

    def _note(self, ok: bool) -> None:
        """Count one request as answered (``ok``) or refused."""
        if ok:
            self.answered += 1
        else:
            self.refused += 1
        if self._count is not None:
            self._count("answered" if ok else "refused")

    def answer(self, parts: list) -> list:
        """The encoded reply to one request (never raises for anything a client sent)."""
        try:
            size = sum(memoryview(p).nbytes for p in parts)
            if size > MAX_REQUEST_BYTES:
                raise ProtocolError(f"request of {size} bytes exceeds {MAX_REQUEST_BYTES}",
                                    reason=Reason.OVERSIZED)
            msg = decode_message(parts)
            if isinstance(msg.header, ControlRequest):
                return self._control(msg.header)
            if not isinstance(msg.header, LensRequest):
                raise ProtocolError(f"expected a lens_request or control_request, got "
                                    f"{msg.kind}", reason=Reason.TOPIC)
            req: LensRequest = msg.header
        except ProtocolError as exc:
            self._note(False)
            if parts and bytes(memoryview(parts[0])[:15]) == b"control_request":
                return encode_message(ControlReply(source="", action="",
                                                   error=f"bad request: {exc}"))
            return encode_message(LensReply(source="", error=f"bad request: {exc}"))
        if self.classifier is None or self.classifier.lens is None:
            self._note(False)
            return encode_message(LensReply(source=req.source, error="no lens is loaded "
                                            "([classify] lens_enabled)"))
        with self._lock:
            latest = self._latest.get(req.source)
        available = self.available
        unknown = [o for o in req.outputs if o not in available]
        if latest is None or unknown:
            self._note(False)
            why = (f"unknown lens output {unknown[0]!r}" if unknown else
                   f"no frame of source {req.source!r} analysed yet (sources: "
                   f"{sorted(self._latest)})")
            return encode_message(LensReply(source=req.source, available=available, error=why))
        header = latest.header
        reply = LensReply(source=req.source, seq=header.seq, t_acq_ns=header.t_acq_ns,
                          available=available)
        if not req.outputs:
            self._note(True)
            return encode_message(reply)
        clf = self.classifier
        try:
            # the frame's own pixels, as the pipeline's classification: a float32 copy lost a
            # 32-bit count's low bits or a float64 frame's tiny range (refused as blank)
            out = clf.lens_outputs(latest.pixels)
            _, novelty = clf.novelty_of(out)
        except BlankFrame as exc:  # nothing for the lens to see: refused, not a lens failure
            self._note(False)
            return encode_message(reply.model_copy(update={
                "error": f"frame {header.source}#{header.seq}: {exc}"}))
        except Exception as exc:  # a lens failure is the client's answer, not the daemon's end
            self._note(False)
            log.warning("lens request for %s#%d failed: %r", header.source, header.seq, exc)
            return encode_message(reply.model_copy(update={"error": f"lens failed: {exc}"}))
        arrays = [np.asarray(out[o], dtype=np.float16) for o in req.outputs]
        self._note(True)
        return encode_message(reply.model_copy(update={
            "outputs": list(req.outputs), "shapes": [list(a.shape) for a in arrays],
            "novelty": novelty}), *arrays)

    def _control(self, req: ControlRequest) -> list:
        """Hand a control request to the control handler; the reply says whether it was done."""
        source = req.source or ""
        if self.control is None:
            self._note(False)
            return encode_message(ControlReply(source=source, action=req.action,
                                               error="this daemon takes no control requests"))
        try:
            reply = self.control(req)
        except ValueError as exc:  # e.g. a drift reference while tracking is off
            reply = ControlReply(source=source, action=req.action, error=str(exc))
        except Exception as exc:  # a bug answering one request never ends the daemon
            log.warning("control request %s failed", req.action, exc_info=True)
            reply = ControlReply(source=source, action=req.action,
                                 error=f"internal error: {exc!r}")
        if reply.ok:
            self._note(True)
            log.info("control request: %s%s", req.action, f" for source {source}" if source else "")
        else:
            self._note(False)
        return encode_message(reply)
