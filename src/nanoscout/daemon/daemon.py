"""The inference daemon: receive → validate → queue (live / lossless) → pipeline → publish.

Three threads, each owning its resources:

* **receiver** owns the frame input socket and its monitor socket. It decodes every message
  and checks its pixels once (:class:`~nanoscout.analysis.frame.Frame`): a bad one is counted
  in ``messages_rejected_total{reason}`` and logged at a limited rate, never fatal — whatever
  it is, even a bug met while handling it (``reason="internal"``). A message part over the
  transport cap (:func:`~nanoscout.daemon.connections.transport_cap_bytes`), which libzmq
  drops unread with its connection, and a connection refused at the handshake are counted
  from the monitor's events in ``connections_total{socket="input",event}`` (and
  ``input_connections_total{event}``) and logged at most once a minute
  (:mod:`nanoscout.daemon.connections`). It checks ``seq`` for transport gaps per source
  (counted, logged at most once a minute) and hands frames to the queue. ``lossless``: a
  queue bounded in frames and bytes; when it is full the receiver stops reading, ZeroMQ's
  high-water mark fills and the adapter's ``send`` blocks (back-pressure, nothing dropped).
  ``live``: one slot per source holding the newest frame; a frame that replaces an
  unanalysed one is counted as ``dropped{reason="superseded"}``.
* **worker** runs :meth:`Pipeline.process <nanoscout.analysis.pipeline.Pipeline.process>` on one
  frame at a time; its messages go to the publisher as they are made. A frame that cannot be
  analysed is counted (``engine_failure``, logged at most once a minute, or ``internal`` for a
  bug) and skipped; a source it evicted from the pipeline's state (beyond
  ``input.max_sources``) is forgotten here too (its series, its frames for the lens and for
  review), as after an analysed frame. A blank frame (no contrast) is answered without a
  ``class`` message, counted in ``classify_skipped_total{reason="blank"}``, not logged as a
  failure.
* **publisher** owns the result PUB socket and its monitor socket: it encodes and sends the
  worker's messages in the order the pipeline made them (``det``, ``preview``, ``class`` + its
  alerts, particle / count / drift alerts, ``stats`` last) and a ``health`` message every
  ``health.interval_s``. Between two messages, at most every 100 ms, it counts what became of
  the subscribers' connections (``connections_total{socket="results",event}``: a CURVE key
  refused is ``handshake_failed_auth``), as the query thread does for its socket.

The worker also keeps the newest raw frames of each source for review (``[review]``,
:mod:`nanoscout.daemon.review`: written as TIFF on a ``save_frame`` control request or when a
rule with ``save_frames`` fires, on the review thread) and, between two frames, installs a
detection model that a ``swap_model`` / ``revert_model`` control request loaded and probed on
the query thread (:mod:`nanoscout.daemon.hotswap`): no frame is lost to a swap and each
``det`` names its model (``model``, ``model_sha256``, ``model_generation``).

Every frame taken off the wire is answered or counted: ``frames_received = frames_processed +
frames_dropped + queue_depth`` at any time, and rejected messages are counted apart.
On SIGINT/SIGTERM the receiver keeps reading what is still arriving for up to
``input.drain_s`` (until the input has been quiet for a moment): ``lossless`` analyses and
answers those frames, ``live`` counts them as ``dropped{reason="shutdown"}``. A failure of a
thread's own loop (a socket error, not a message) is never swallowed: it stops the daemon and
:meth:`Daemon.wait` re-raises it in the owner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import FrameResult, Pipeline, model_sha256
from nanoscout.daemon.config import ServeConfig
from nanoscout.daemon.connections import Connections, transport_cap_bytes
from nanoscout.daemon.engine_setup import engine_states
from nanoscout.daemon.hotswap import Build, LoadedModel, ModelSwapper
from nanoscout.daemon.metrics import Metrics
from nanoscout.daemon.query import LensServer
from nanoscout.daemon.queues import FrameQueue, LiveSlots
from nanoscout.daemon.review import FrameReview
from nanoscout.lograte import LogEvery, RateLimitedLog
from nanoscout.wire.codec import Message, decode_frame, encode, encode_message
from nanoscout.wire.errors import EngineError, FrameError, ProtocolError, Reason
from nanoscout.wire.headers import (
    CLOCK_AHEAD_S,
    CLOCK_BEHIND_S,
    AckHeader,
    ControlReply,
    ControlRequest,
    FrameHeader,
    HealthHeader,
    StatsHeader,
)
from nanoscout.wire.sequence import Gap, SequenceTracker, saturated_sum
from nanoscout.wire.transport import CurveServer, bind, frame_input_socket, result_publisher

log = logging.getLogger("nanoscout.daemon")

_POLL_MS = 100
#: while draining at shutdown, the input counts as finished after this long without a frame, s
_DRAIN_QUIET_S = 0.3
#: frames read (and counted) after the drain, at most, before the input socket closes
_LEFTOVER_MAX = 10_000
#: a frame stamped more than this long before its arrival, or more than _CLOCK_AHEAD_S after
#: it, has an acquisition clock that disagrees with the daemon's (or a t_acq_ns of 0): its
#: latency is measured from its arrival instead, s (the wire's rule, which subscribers apply
#: to a det's times too: DetHeader.latency_ms)
_CLOCK_BEHIND_S = CLOCK_BEHIND_S
_CLOCK_AHEAD_S = CLOCK_AHEAD_S


@dataclass(frozen=True)
class Endpoints:
    """Where a started daemon listens (actual ports, also when port 0 was asked for)."""

    input: str
    output: str
    metrics_url: str | None
    query: str | None = None  # the query socket: lens and control requests (None: not served)


class Daemon:
    """One inference daemon. ``start()`` binds and launches the threads; ``wait()`` joins them."""

    def __init__(self, config: ServeConfig, pipeline: Pipeline, *, ctx: zmq.Context | None = None,
                 build: Build | None = None) -> None:
        """``build``: loads a detection model from an ONNX file as at start (the hot swap's
        loader; None: ``swap_model`` requests are refused)."""
        self.config = config
        self.pipeline = pipeline
        self.metrics = Metrics(
            rules=[(r.name, r.severity) for r in pipeline.alert_engine.rules],
            labels=pipeline.classifier.classes if pipeline.classifier is not None else ())
        self._ctx = ctx or zmq.Context.instance()
        self._policy = config.input.policy
        self._stop_recv = threading.Event()
        self._receiver_done = threading.Event()
        self._worker_done = threading.Event()
        self._fatal: BaseException | None = None
        self._out: queue.Queue[Message[Any]] = queue.Queue()
        inp = config.input
        self._lossless = FrameQueue(inp.queue_size, inp.queue_bytes)
        self._live = LiveSlots(self._dropped_frame, inp.max_sources)
        self._threads: list[threading.Thread] = []
        self._t_start = time.monotonic()
        self._warn = RateLimitedLog(log)
        self._log_every = LogEvery(log)
        # counters mirrored for the health message (each written under _count_lock)
        self.received = 0
        self.processed = 0
        self.dropped: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.last_error: str | None = None
        # receiver: frame numbers per source (and adapter session), for gaps and duplicates
        self._seqs = SequenceTracker(max_keys=4 * inp.max_sources, window=4096)
        self._started_ns = time.time_ns()
        pipeline.daemon_run = self._started_ns  # every result names this run (protocol 1.11)
        self._health_seq = 0
        self._lat_ms: deque[float] = deque(maxlen=500)
        self._done_t: deque[float] = deque(maxlen=1000)
        self._count_lock = threading.Lock()
        self.endpoints: Endpoints | None = None
        self._curve: CurveServer | None = None
        self._query: LensServer | None = None
        self._conns: Connections | None = None  # the receiver's, from start()
        self._pub_conns: Connections | None = None  # the publisher's, from start()
        m = self.metrics
        self.review = FrameReview(config.review, max_sources=inp.max_sources,
                                  on_saved=m.frames_saved.inc,
                                  on_failed=lambda r: m.frame_save_failures.labels(reason=r).inc())
        started = LoadedModel(pipeline.detector, pipeline.engine_name, pipeline.model_name,
                              config.engine.model_path(),
                              model_sha256(pipeline.detector, 64) or "",
                              dict(pipeline.modality_detectors))
        self.swapper = ModelSwapper(
            pipeline, build, started, probe=self.review.ring.newest,
            on_swap=lambda a: m.model_swaps.labels(action=a).inc(),
            on_failure=lambda a, step: m.model_swap_failures.labels(action=a, step=step).inc(),
            model_dirs=config.query.model_dirs)

    @property
    def gaps(self) -> int:
        """Frames missing from the adapters' seq numbering, in total."""
        return self._seqs.total

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Endpoints:
        """Bind sockets, start the metrics server and the threads; returns the bound endpoints."""
        cfg = self.config
        self._in = frame_input_socket(self._ctx, self._policy, hwm=cfg.input.receive_hwm())
        # a transport-level cap far above the configured limit: the real check is in
        # decode_frame, which counts and reports the rejection; above the cap libzmq drops the
        # connection unread, which only its monitor tells (counted as "disconnected")
        cap = transport_cap_bytes(cfg.input.max_frame_bytes)
        self._in.setsockopt(zmq.MAXMSGSIZE, cap)
        self._conns = Connections(self._in, "input", cap_bytes=cap,
                                  on_event=self.metrics.count_connections("input"))
        self._pub = result_publisher(self._ctx, hwm=cfg.output.hwm)
        self._pub_conns = Connections(self._pub, "results",
                                      on_event=self.metrics.count_connections("results"))
        sec = cfg.security
        if sec.curve:
            assert sec.server_secret_key is not None and sec.authorized_keys is not None
            self._curve = CurveServer(self._ctx, sec.server_secret_key, sec.authorized_keys)
            self._curve.apply(self._in)
            self._curve.apply(self._pub)
        in_ep = bind(self._in, cfg.input.endpoint)
        out_ep = bind(self._pub, cfg.output.endpoint)
        metrics_url = None
        if cfg.metrics.enabled:
            port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            metrics_url = f"http://{cfg.metrics.host}:{port}/metrics"
        self.metrics.engine_info.info(
            {"backend": self.pipeline.engine_name, **self.pipeline.model_names, "policy": self._policy}
        )
        self.review.start(self._guard)
        for name, target in (
            ("receiver", self._receive_loop),
            ("worker", self._work_loop),
            ("publisher", self._publish_loop),
        ):
            t = threading.Thread(target=self._guard(target), name=f"nanoscout-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        query_ep = self._start_query()
        self.endpoints = Endpoints(in_ep, out_ep, metrics_url, query_ep)
        log.info("serving: frames on %s (%s), results on %s, metrics %s",
                 in_ep, self._policy, out_ep, metrics_url)
        return self.endpoints

    def _start_query(self) -> str | None:
        qc, clf = self.config.query, self.pipeline.classifier
        if not qc.enabled:
            return None
        requests = self.metrics.query_requests
        self._query = LensServer(self._ctx, clf, secure=self._curve.apply if self._curve else None,
                                 control=self.control,
                                 count=lambda outcome: requests.labels(outcome=outcome).inc(),
                                 on_connection=self.metrics.count_connections("query"))
        return self._query.start(qc.endpoint, self._guard)

    def stop(self) -> None:
        """Stop receiving (after the drain); accepted frames are finished in lossless mode.
        Returns at once."""
        self._stop_recv.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Join the threads (True when all ended); re-raise a thread's fatal error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        self.maybe_raise()
        return not any(t.is_alive() for t in self._threads)

    def running(self) -> bool:
        """True while every daemon thread is alive."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def maybe_raise(self) -> None:
        """Re-raise the first fatal error of a daemon thread, if any."""
        if self._fatal is not None:
            raise RuntimeError(f"daemon thread failed: {self._fatal!r}") from self._fatal

    def close(self, timeout: float = 30.0) -> None:
        """Stop, join (up to ``timeout`` s beyond the drain), release the metrics server and
        the CURVE authenticator."""
        self.stop()
        self.wait(timeout=timeout + self.config.input.drain_s)
        if self._query is not None:
            self._query.stop()
        self.review.close()
        self.swapper.close()
        self.metrics.close()
        if self._curve is not None:
            self._curve.stop()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # a bug in a loop: stop everything, hand it to the owner
                log.exception("fatal error in %s", threading.current_thread().name)
                self._fatal = exc
                self.last_error = f"fatal: {exc!r}"
                self._stop_recv.set()
                self._receiver_done.set()
                self._worker_done.set()

        return run

    # ------------------------------------------------------------------ control requests
    def control(self, req: ControlRequest) -> ControlReply:
        """Answer one control request (the query socket's thread): statistics requests go to
        the pipeline, ``save_frame`` to the review writer, model swaps to the swapper (which
        loads and probes here and lets the worker switch). A ValueError (SwapError,
        SaveRefused, an unknown action) becomes the reply's error."""
        t0 = time.perf_counter()
        source = req.source or ""
        if req.action == "save_frame":
            files = [str(p) for p in self.review.save_latest(source, req.frames)]
            return self._control_reply(req, t0, files=files)
        if req.action == "set_particle_size":
            self.pipeline.set_particle_size(source, req.particle_size_nm)
            return self._control_reply(req, t0)
        if req.action not in ("swap_model", "revert_model"):
            self.pipeline.request(source, req.action)
            return self._control_reply(req, t0)
        try:
            if req.action == "swap_model":
                assert req.model is not None and req.sha256 is not None  # the request checked
                self.swapper.swap(req.model, req.sha256)
            else:
                self.swapper.revert()
        except ValueError as exc:
            self.last_error = f"{req.action} {req.model or ''}: {exc}"
            return self._control_reply(req, t0, error=str(exc))
        self.metrics.engine_info.info({"backend": self.pipeline.engine_name,
                                       **self.pipeline.model_names, "policy": self._policy})
        return self._control_reply(req, t0)

    def _control_reply(self, req: ControlRequest, t0: float, *, error: str | None = None,
                       files: list[str] | None = None) -> ControlReply:
        cur = self.swapper.current
        self.metrics.model_generation.set(self.pipeline.model_generation)
        return ControlReply(source=req.source or "", action=req.action, ok=error is None,
                            error=error, model=cur.name, model_sha256=cur.short_sha256,
                            model_generation=self.pipeline.model_generation,
                            files=files or [],
                            elapsed_ms=round((time.perf_counter() - t0) * 1e3, 3))

    # ------------------------------------------------------------------ counting
    def _reject(self, reason: Reason, message: str, *, exc_info: bool = False) -> None:
        with self._count_lock:
            self.rejected[reason.value] = self.rejected.get(reason.value, 0) + 1
        self.metrics.rejected.labels(reason=reason.value).inc()
        self.last_error = message
        self._warn(f"rejected message ({reason})", message, exc_info=exc_info)

    def _drop(self, reason: Reason, n: int = 1) -> None:
        with self._count_lock:
            self.dropped[reason.value] = self.dropped.get(reason.value, 0) + n
        self.metrics.frames_dropped.labels(reason=reason.value).inc(n)

    def _queue_depth(self) -> int:
        return self._lossless.qsize() if self._policy == "lossless" else self._live.qsize()

    # ------------------------------------------------------------------ receiver
    def _receive_loop(self) -> None:
        sock, conns = self._in, self._conns
        assert conns is not None  # start() made it
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(conns.socket, zmq.POLLIN)
        drain_s = self.config.input.drain_s
        stop_t: float | None = None
        last_t = time.monotonic()
        try:
            while True:
                if self._stop_recv.is_set() and stop_t is None:
                    stop_t = time.monotonic()
                    log.info("stopping: reading frames still arriving (up to %.0f s)", drain_s)
                ready = dict(poller.poll(_POLL_MS if stop_t is None else 50))
                if conns.socket in ready:
                    conns.read()
                if sock not in ready:
                    now = time.monotonic()
                    if stop_t is not None and (now - last_t >= _DRAIN_QUIET_S
                                               or now - stop_t >= drain_s):
                        break
                    continue
                frames = sock.recv_multipart(copy=False)
                self._take(frames, stopping=stop_t is not None)
                last_t = time.monotonic()  # after a put that waited for room, too
                if stop_t is not None and last_t - stop_t >= drain_s:
                    break
            # what is still readable at once is counted, never silently discarded
            for _ in range(_LEFTOVER_MAX):
                if not sock.poll(0):
                    break
                self._take(sock.recv_multipart(copy=False), stopping=True, leftover=True)
        finally:
            try:
                conns.close()  # before the socket it monitors
            finally:
                sock.close(linger=0)
                self._receiver_done.set()

    def _take(self, frames: list[zmq.Frame], *, stopping: bool, leftover: bool = False) -> None:
        """Validate one message and queue its frame; anything wrong is counted, never raised."""
        t_recv = time.time_ns()
        header: FrameHeader | None = None
        try:
            header, pixels = decode_frame([f.buffer for f in frames],
                                          max_bytes=self.config.input.max_frame_bytes)
            frame = Frame(header, pixels, t_recv)
        except (ProtocolError, FrameError) as exc:
            self._reject(exc.reason, str(exc))
            if header is not None:
                self._refused_frame(header, exc.reason)
            return
        except Exception as exc:  # last resort: a bug in one message never ends the daemon
            self._reject(Reason.INTERNAL, f"internal error while reading a frame: {exc!r}",
                         exc_info=True)
            if header is not None:
                self._refused_frame(header, Reason.INTERNAL)
            return
        try:
            self._accept(frame, stopping=stopping, leftover=leftover)
        except Exception as exc:
            self._reject(Reason.INTERNAL, f"internal error while queueing {frame.source}#"
                         f"{frame.header.seq}: {exc!r}", exc_info=True)

    def _refused_frame(self, h: FrameHeader, reason: Reason) -> None:
        """A frame whose header was read but whose pixels were refused (counted already):
        its number is taken, so that it is not reported as lost in transport, and its
        adapter is told that it was dropped and why."""
        gap, duplicate = self._observe_seq(h, count=False)
        if not duplicate:
            # a source none of whose frames was taken gets no series: a stream of names whose
            # frames are all refused would otherwise grow /metrics without bound
            self._gap(h, gap, series=self.metrics.has_source(h.source))
        self._ack(h, "duplicate" if duplicate else "dropped", None if duplicate else reason)

    def _observe_seq(self, h: FrameHeader, *, count: bool) -> tuple[Gap | None, bool]:
        """Take ``h``'s sequence number: (the gap before it, or None; whether its session
        had it already). ``count``: count an accepted frame as received."""
        # an adapter session's frames may come again after a restart of this daemon: a number
        # taken already is a duplicate, a smaller one late; without a session a smaller
        # number means the adapter restarted
        key = h.source if h.session is None else f"{h.source}/{h.session}"
        gap = None
        with self._count_lock:
            duplicate = h.session is not None and self._seqs.seen(key, h.seq)
            if not duplicate:
                gap = self._seqs.observe(key, h.seq, resumable=h.session is not None)
                self.received += count
        return gap, duplicate

    def _gap(self, h: FrameHeader, gap: Gap | None, *, series: bool = True) -> None:
        """Count (in the source's series, where ``series``) and log frames lost before ``h``;
        the log has at most one such line a minute (a live link that drops frames has a gap
        before nearly every frame it delivers)."""
        if gap is not None:
            if series:
                self.metrics.transport_gaps.labels(source=h.source).inc(gap.missed)
            self._log_every("transport gap", logging.WARNING,
                            f"source {h.source}: {gap.missed} frame(s) lost in transport "
                            f"before seq {h.seq}")

    def _accept(self, frame: Frame, *, stopping: bool, leftover: bool) -> None:
        h = frame.header
        gap, duplicate = self._observe_seq(h, count=True)
        if duplicate:
            self._reject(Reason.DUPLICATE, f"frame {h.source}#{h.seq} of session {h.session} "
                         "was taken already (a resend)")
            self._ack(h, "duplicate")
            return
        self.metrics.add_source(h.source)
        self._gap(h, gap)
        self.metrics.frames_received.labels(source=h.source).inc()
        if leftover or (stopping and self._policy == "live"):
            self._dropped_frame(frame, Reason.SHUTDOWN)
        elif self._policy == "live":
            self._live.put(frame)
        else:
            while not self._lossless.put(frame, timeout=_POLL_MS / 1000):
                if self._conns is not None:  # connections go on while back-pressure holds
                    self._conns.read()
                if self._fatal is not None:
                    self._dropped_frame(frame, Reason.SHUTDOWN)
                    return
        self.metrics.queue_depth.set(self._queue_depth())

    # ------------------------------------------------------------------ worker
    def _next_frame(self) -> Frame | None:
        timeout = _POLL_MS / 1000
        if self._policy == "live":
            return self._live.get(timeout)
        return self._lossless.get(timeout)

    def _work_loop(self) -> None:
        try:
            while True:
                self.swapper.install_pending()  # a swapped model starts between two frames
                frame = self._next_frame()
                if frame is None:
                    if self._receiver_done.is_set() and self._queue_depth() == 0:
                        break
                    continue
                self.metrics.queue_depth.set(self._queue_depth())
                if self._stop_recv.is_set() and self._policy == "live":
                    self._dropped_frame(frame, Reason.SHUTDOWN)
                    continue
                self.swapper.install_pending()
                self._work(frame)
        finally:
            self._worker_done.set()

    def _ack(self, h: FrameHeader, status: Literal["answered", "dropped", "duplicate"],
             reason: Reason | None = None) -> None:
        """Tell the adapter of the frame with header ``h`` what became of it (lossless,
        frames of a session)."""
        if h.session is None or self._policy != "lossless":
            return
        self._out.put(Message(f"ack.{h.source}", AckHeader(
            source=h.source, session=h.session, seq=h.seq, status=status,
            reason=None if reason is None else reason.value)))

    def _dropped_frame(self, frame: Frame, reason: Reason) -> None:
        self._drop(reason)
        self._ack(frame.header, "dropped", reason)
        if reason is Reason.EVICTED and not self.pipeline.knows(frame.source):
            # a source none of whose frames was analysed keeps no series (a burst of new
            # names would otherwise grow /metrics without bound)
            self.metrics.forget_source(frame.source)

    def _work(self, frame: Frame) -> None:
        h = frame.header
        if self._query is not None:  # the lens may be asked about a frame once its results go
            self._query.offer(frame)
        try:
            self.review.offer(frame)
        except Exception as exc:  # keeping a frame for review is not worth the frame
            self._warn("internal error keeping a frame for review", repr(exc), exc_info=True)
        try:
            result = self.pipeline.process(frame, emit=self._out.put)
        except EngineError as exc:
            # the frame may have evicted a source before its engine failed (an outage with
            # more sources than max_sources): what the daemon keeps of it goes too
            self._forget_evicted(self.pipeline.take_evicted())
            self._dropped_frame(frame, Reason.ENGINE_FAILURE)
            self.last_error = f"frame {h.source}#{h.seq}: {exc!r}"
            # one line a minute: an outage fails every frame (each counted as engine_failure)
            self._log_every("engine failure", logging.ERROR,
                            f"frame {h.source}#{h.seq} dropped: {exc}")
            return
        except Exception as exc:  # last resort: a bug met on one frame never ends the daemon
            self._forget_evicted(self.pipeline.take_evicted())
            self._dropped_frame(frame, Reason.INTERNAL)
            self.last_error = f"frame {h.source}#{h.seq}: internal error {exc!r}"
            self._warn("internal error analysing a frame", self.last_error, exc_info=True)
            return
        try:
            self.review.keep_labels(frame, result.labels)
        except Exception as exc:  # not worth a frame
            self._warn("internal error keeping a label map for review", repr(exc), exc_info=True)
        self._ack(frame.header, "answered")
        try:
            self._account(frame, result)
        except Exception as exc:  # metrics are not worth a frame either
            self._warn("internal error counting a frame", repr(exc), exc_info=True)
        if result.alerts:
            try:
                self._save_around(frame, result)
            except Exception as exc:  # nor is saving frames for review
                self._warn("internal error saving frames around an alert", repr(exc),
                           exc_info=True)

    def _save_around(self, frame: Frame, result: FrameResult) -> None:
        """Rules with ``save_frames`` that fired on ``frame``: the review writer saves the
        frames around it."""
        rules = {r.name: r for r in self.pipeline.alert_engine.rules}
        for ah in result.alerts:
            rule = rules.get(ah.rule)
            save = getattr(rule, "save_frames", None)
            if save is not None:
                self.review.on_alert(frame, ah.rule, save)

    def _forget_evicted(self, sources: list[str]) -> None:
        """The pipeline forgot ``sources`` (beyond ``input.max_sources``): their metric series,
        newest frame for the lens and frames for review go too, and each is counted."""
        for source in sources:
            self.metrics.forget_source(source)
            self.metrics.sources_evicted.inc()
            if self._query is not None:
                self._query.forget(source)
            self.review.forget(source)

    def _account(self, frame: Frame, result: FrameResult) -> None:
        """Metrics and health figures of one analysed frame."""
        m, h, dh = self.metrics, frame.header, result.det
        self._forget_evicted(result.evicted)
        lat_s = self._latency_s(dh.t_acq_ns, frame.t_recv_ns, dh.t_done_ns)
        m.latency.observe(lat_s)
        for stage, ms in result.stage_ms.items():
            m.stage.labels(stage=stage).observe(ms / 1e3)
        busy_s = sum(dh.stage_ms.values()) / 1e3
        m.stage.labels(stage="queue_wait").observe(
            max(0.0, (dh.t_done_ns - frame.t_recv_ns) / 1e9 - busy_s))
        m.particles.labels(source=h.source).inc(dh.n)
        m.particles_last_frame.labels(source=h.source).set(dh.n)
        if dh.base_network_only:
            m.base_network_only.labels(source=h.source).inc()
        if dh.size_hint is not None:
            m.size_hint.labels(outcome=dh.size_hint).inc()
        if dh.noise is not None:
            m.frame_noise.labels(source=h.source).set(dh.noise)
        if dh.smoothing_px:
            m.frames_smoothed.labels(source=h.source).inc()
        stats = result.messages[-1].header
        if isinstance(stats, StatsHeader):
            m.observe_stats(h.source, stats.units, stats.window)
        for ah in result.alerts:
            m.alerts.labels(rule=ah.rule, severity=ah.severity).inc()
        c = result.classification
        if c is not None:
            for label, p in c.all.items():
                m.class_probability.labels(source=h.source, label=label).set(p)
            if c.novelty is not None:
                m.novelty.labels(source=h.source).set(c.novelty)
        for stage, exc in result.failures:
            what = "classification" if stage == "classify" else "statistics/alerts"
            self.last_error = f"frame {h.source}#{h.seq}: {what} failed: {exc!r}"
            self._warn(f"{stage} failed", self.last_error, exc_info=not isinstance(exc, EngineError))
            if stage == "classify":
                m.classify_failures.inc()
            else:
                self._drop(Reason.SUMMARY_FAILURE)
        for stage, exc in result.skipped:  # on purpose (the pipeline logs it): no warning
            if stage == "classify":
                m.classify_skipped.labels(reason=exc.reason.value).inc()
        m.frames_processed.labels(source=h.source).inc()
        with self._count_lock:
            self._lat_ms.append(lat_s * 1e3)
            self._done_t.append(time.monotonic())
            self.processed += 1

    def _latency_s(self, t_acq_ns: int, t_recv_ns: int, t_done_ns: int) -> float:
        """Return a frame's latency, s: from its acquisition to its results, or from its
        arrival where its acquisition time is implausible (counted, see _CLOCK_BEHIND_S), so
        that one frame stamped 0 does not hold the latency percentiles for hundreds of frames."""
        transport_s = (t_recv_ns - t_acq_ns) / 1e9
        if -_CLOCK_AHEAD_S <= transport_s <= _CLOCK_BEHIND_S:
            return max((t_done_ns - t_acq_ns) / 1e9, 0.0)
        self.metrics.clock_skew.inc()
        self._warn("acquisition clock", f"a frame stamped {transport_s:+.3g} s before its "
                   "arrival: the adapter's clock disagrees with this host's (or t_acq_ns is 0); "
                   "its latency is measured from its arrival")
        return max((t_done_ns - t_recv_ns) / 1e9, 0.0)

    # ------------------------------------------------------------------ publisher
    def _engines(self) -> dict[str, str]:
        engines = {"detector": self.pipeline.engine_name, **self.pipeline.model_names}
        if self.pipeline.classifier is not None:
            engines["classifier"] = self.pipeline.classifier.name
        if self.pipeline.modality_estimator is not None:  # frames without a modality
            engines["modality"] = self.pipeline.modality_estimator.name
        engines.update(engine_states(self.pipeline))  # remote engines: up, failing, fallback
        return engines

    def _health(self) -> HealthHeader:
        now = time.monotonic()
        with self._count_lock:
            dropped, rejected = dict(self.dropped), dict(self.rejected)
            recent = [t for t in self._done_t if now - t <= 5.0]
            lat = np.asarray(self._lat_ms, dtype=np.float64)
            gaps, by_key = self._seqs.total, dict(self._seqs.missed)
            received, processed = self.received, self.processed
        by_source: dict[str, int] = {}
        for key, n in by_key.items():  # keys are "source" or "source/session"
            source = key.split("/", 1)[0]
            by_source[source] = saturated_sum(by_source.get(source, 0), n)  # int64 counts
        span = min(5.0, now - self._t_start)
        fps = len(recent) / span if span > 0 else 0.0
        seq, self._health_seq = self._health_seq, self._health_seq + 1
        return HealthHeader(
            t_ns=time.time_ns(),
            uptime_s=round(now - self._t_start, 3),
            policy=self._policy,
            engines=self._engines(),
            frames_received=received,
            frames_processed=processed,
            frames_dropped=dropped,
            rejected=rejected,
            transport_gaps=gaps,
            queue_depth=self._queue_depth(),
            fps=round(fps, 3),
            latency_ms_p50=float(np.percentile(lat, 50)) if lat.size else None,
            latency_ms_p99=float(np.percentile(lat, 99)) if lat.size else None,
            last_error=self.last_error,
            transport_gaps_by_source=by_source,
            sources=self.pipeline.sources,
            sources_evicted=self.pipeline.evicted_total,
            topic_seq=seq,
            started_ns=self._started_ns,
            model=self.pipeline.model_name,
            model_sha256=model_sha256(self.pipeline.detector),
            model_generation=self.pipeline.model_generation,
            model_swaps=self.swapper.swaps,
            model_swap_failures=self.swapper.failures,
            frames_saved=self.review.saved,
            frame_save_failures=sum(self.review.failed.values()),
            input_connections=self._conns.counts() if self._conns is not None else {},
            connections={c.name: c.counts() for c in (
                self._conns, self._pub_conns,
                self._query.connections if self._query is not None else None) if c is not None},
        )

    def _publish_loop(self) -> None:
        sock, conns = self._pub, self._pub_conns
        assert conns is not None  # start() made it
        interval = self.config.health.interval_s
        next_health = next_conns = time.monotonic()
        suppressed_seen: dict[str, int] = {}
        try:
            while True:
                now = time.monotonic()
                if now >= next_conns:  # not per message: a poll of the monitor each time
                    conns.read()
                    next_conns = now + _POLL_MS / 1000
                if now >= next_health:
                    sock.send_multipart(encode_message(self._health()), copy=False)
                    for rule, n in self.pipeline.suppressed_alerts.items():
                        delta = n - suppressed_seen.get(rule, 0)
                        if delta > 0:
                            self.metrics.alerts_suppressed.labels(rule=rule).inc(delta)
                            suppressed_seen[rule] = n
                    next_health = now + interval
                try:
                    msg = self._out.get(
                        timeout=max(0.0, min(_POLL_MS / 1000, next_health - time.monotonic())))
                except queue.Empty:
                    if self._worker_done.is_set() and self._out.empty():
                        break
                    continue
                try:
                    parts = encode(msg)
                except Exception as exc:  # a bug in one message: count it, keep publishing
                    self._reject(Reason.INTERNAL, f"cannot encode {msg.topic}: {exc!r}",
                                 exc_info=True)
                    continue
                sock.send_multipart(parts, copy=False)
            conns.read()  # the last health counts every connection event so far
            sock.send_multipart(encode_message(self._health()), copy=False)
        finally:
            try:
                conns.close()  # before the socket it monitors
            finally:
                sock.close(linger=1000)
