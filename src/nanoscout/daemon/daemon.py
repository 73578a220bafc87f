"""The inference daemon: receive → validate → queue (live / lossless) → pipeline → publish.

Three threads, each owning its resources:

* **receiver** owns the frame input socket. It decodes and validates every message (a bad one is
  counted in ``messages_rejected_total{reason}`` and logged, never fatal), checks ``seq`` for
  transport gaps and hands frames to the queue. ``lossless``: a bounded queue; when it is full
  the receiver stops reading, ZeroMQ's high-water mark fills and the adapter's ``send`` blocks
  (back-pressure, nothing dropped). ``live``: one slot per source holding the newest frame; a
  frame that replaces an unprocessed one is counted as ``dropped{reason="superseded"}``.
* **worker** runs the :class:`~nanoscout.analysis.pipeline.Pipeline` on one frame at a time. A frame that
  cannot be analysed (NaN pixels, engine failure) is counted and skipped.
* **publisher** owns the result PUB socket: it sends the worker's results and a ``health``
  message every ``health.interval_s``. A frame's results go out in the order ``det``,
  ``preview``, ``class`` (+ its alerts), particle/count/drift alerts, ``stats``: ``stats`` is
  the frame's last message, which tells a client waiting for one frame (the stage search) that
  it has everything (a summary failure sends no ``stats``: clients time out).

A failure of a thread's own loop (a bug, not a bad frame) is never swallowed: it stops the
daemon and :meth:`Daemon.wait` re-raises it in the owner. SIGINT/SIGTERM stop the receiver;
in ``lossless`` mode every frame already accepted is still processed and published.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from nanoscout.analysis.pipeline import AlertMessage, Pipeline
from nanoscout.analysis.preview import PreviewLimiter, make_preview
from nanoscout.daemon.config import ServeConfig
from nanoscout.daemon.engine_setup import engine_states
from nanoscout.daemon.metrics import Metrics
from nanoscout.daemon.query import LensServer
from nanoscout.wire.errors import NanoscoutError, ProtocolError
from nanoscout.wire.protocol import (
    FrameHeader,
    HealthHeader,
    PreviewHeader,
    decode_frame,
    encode_message,
)
from nanoscout.wire.transport import CurveServer, bind, frame_input_socket, result_publisher

log = logging.getLogger("nanoscout.daemon")

_POLL_MS = 100


@dataclass
class _Item:
    header: FrameHeader
    pixels: np.ndarray
    t_recv_ns: int
    keepalive: object  # the zmq frames backing ``pixels`` (zero-copy)


@dataclass(frozen=True)
class Endpoints:
    """Where a started daemon listens (actual ports, also when port 0 was asked for)."""

    input: str
    output: str
    metrics_url: str | None
    query: str | None = None  # the lens query socket (None: not served)


class _LiveSlots:
    """Newest-frame-wins slots, one per source; ``get`` returns the oldest waiting frame."""

    def __init__(self, on_superseded: Callable[[_Item], None]) -> None:
        self._slots: dict[str, _Item] = {}
        self._cond = threading.Condition()
        self._on_superseded = on_superseded

    def put(self, item: _Item) -> None:
        with self._cond:
            old = self._slots.get(item.header.source)
            self._slots[item.header.source] = item
            self._cond.notify()
        if old is not None:
            self._on_superseded(old)

    def get(self, timeout: float) -> _Item | None:
        with self._cond:
            if not self._slots and not self._cond.wait(timeout):
                return None
            if not self._slots:
                return None
            source = min(self._slots, key=lambda s: self._slots[s].t_recv_ns)
            return self._slots.pop(source)

    def qsize(self) -> int:
        return len(self._slots)


class Daemon:
    """One inference daemon. ``start()`` binds and launches the threads; ``wait()`` joins them."""

    def __init__(self, config: ServeConfig, pipeline: Pipeline, *, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.metrics = Metrics()
        self._ctx = ctx or zmq.Context.instance()
        self._policy = config.input.policy
        self._stop_recv = threading.Event()
        self._worker_done = threading.Event()
        self._fatal: BaseException | None = None
        self._out: queue.Queue[list] = queue.Queue()
        self._lossless: queue.Queue[_Item] = queue.Queue(maxsize=config.input.queue_size)
        self._live = _LiveSlots(self._superseded)
        self._previews = PreviewLimiter(config.preview.max_rate_hz)
        self._threads: list[threading.Thread] = []
        self._t_start = time.monotonic()
        # counters mirrored for the health message (each written by one thread only)
        self.received = 0
        self.processed = 0
        self.dropped: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.gaps = 0
        self.last_error: str | None = None
        self._last_seq: dict[str, int] = {}
        self._lat_ms: deque[float] = deque(maxlen=500)
        self._done_t: deque[float] = deque(maxlen=1000)
        self._count_lock = threading.Lock()
        self.endpoints: Endpoints | None = None
        self._curve: CurveServer | None = None
        self._query: LensServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Endpoints:
        """Bind sockets, start the metrics server and the threads; returns the bound endpoints."""
        cfg = self.config
        self._in = frame_input_socket(self._ctx, self._policy, hwm=cfg.input.hwm)
        # a transport-level cap far above the configured limit: the real check is in
        # decode_frame, which counts and reports the rejection instead of silently disconnecting
        self._in.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.input.max_frame_bytes + (1 << 20))
        self._pub = result_publisher(self._ctx, hwm=cfg.output.hwm)
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
        for name, target in (("receiver", self._receive_loop), ("worker", self._work_loop), ("publisher", self._publish_loop)):
            t = threading.Thread(target=self._guard(target), name=f"nanoscout-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        query_ep = self._start_query()
        self.endpoints = Endpoints(in_ep, out_ep, metrics_url, query_ep)
        log.info("serving: frames on %s (%s), results on %s, metrics %s", in_ep, self._policy, out_ep, metrics_url)
        return self.endpoints

    def _start_query(self) -> str | None:
        qc, clf = self.config.query, self.pipeline.classifier
        if not qc.enabled or clf is None or clf.lens is None:
            return None
        self._query = LensServer(self._ctx, clf, secure=self._curve.apply if self._curve else None)
        return self._query.start(qc.endpoint, self._guard)

    def stop(self) -> None:
        """Stop receiving; accepted frames are finished in lossless mode. Returns at once."""
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
        """Stop, join (up to ``timeout`` s), release the metrics server and CURVE authenticator."""
        self.stop()
        self.wait(timeout=timeout)
        if self._query is not None:
            self._query.stop()
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
                self._worker_done.set()

        return run

    # ------------------------------------------------------------------ counting
    def _count(self, table: dict[str, int], reason: str) -> None:
        with self._count_lock:
            table[reason] = table.get(reason, 0) + 1

    def _reject(self, reason: str, message: str) -> None:
        self._count(self.rejected, reason)
        self.metrics.rejected.labels(reason=reason).inc()
        self.last_error = message
        n = self.rejected[reason]
        if n <= 5 or n % 100 == 0:  # keep the log readable under a flood of garbage
            log.warning("rejected message (%s, #%d): %s", reason, n, message)

    def _drop(self, reason: str, n: int = 1) -> None:
        with self._count_lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.metrics.frames_dropped.labels(reason=reason).inc(n)

    def _superseded(self, item: _Item) -> None:
        self._drop("superseded")

    def _queue_depth(self) -> int:
        return self._lossless.qsize() if self._policy == "lossless" else self._live.qsize()

    # ------------------------------------------------------------------ threads
    def _receive_loop(self) -> None:
        sock = self._in
        max_bytes = self.config.input.max_frame_bytes
        try:
            while not self._stop_recv.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                frames = sock.recv_multipart(copy=False)
                t_recv = time.time_ns()
                try:
                    header, pixels = decode_frame([f.buffer for f in frames], max_bytes=max_bytes)
                except ProtocolError as exc:
                    self._reject(exc.reason, str(exc))
                    continue
                self._check_seq(header)
                self.received += 1
                self.metrics.frames_received.labels(source=header.source).inc()
                item = _Item(header, pixels, t_recv, frames)
                if self._policy == "live":
                    self._live.put(item)
                else:
                    while not self._put_lossless(item):
                        pass
                self.metrics.queue_depth.set(self._queue_depth())
        finally:
            sock.close(linger=0)

    def _put_lossless(self, item: _Item) -> bool:
        try:
            self._lossless.put(item, timeout=_POLL_MS / 1000)
            return True
        except queue.Full:
            return False

    def _check_seq(self, header: FrameHeader) -> None:
        last = self._last_seq.get(header.source)
        if last is not None and header.seq > last + 1:
            missing = header.seq - last - 1
            self.gaps += missing
            self.metrics.transport_gaps.labels(source=header.source).inc(missing)
            log.warning("source %s: %d frame(s) lost in transport before seq %d", header.source, missing, header.seq)
        self._last_seq[header.source] = header.seq  # a smaller seq means the adapter restarted

    def _next_item(self) -> _Item | None:
        timeout = _POLL_MS / 1000
        if self._policy == "live":
            return self._live.get(timeout)
        try:
            return self._lossless.get(timeout=timeout)
        except queue.Empty:
            return None

    def _work_loop(self) -> None:
        try:
            while True:
                item = self._next_item()
                if item is None:
                    if self._stop_recv.is_set() and self._queue_depth() == 0:
                        break
                    continue
                self.metrics.queue_depth.set(self._queue_depth())
                if self._stop_recv.is_set() and self._policy == "live":
                    self._drop("shutdown")
                    continue
                self._process(item)
        finally:
            self._worker_done.set()

    def _process(self, item: _Item) -> None:
        h = item.header
        try:
            det = self.pipeline.detections(h, item.pixels, item.t_recv_ns)
        except NanoscoutError as exc:
            if exc.reason in ("nonfinite", "shape"):
                self._reject(exc.reason, f"frame {h.source}#{h.seq}: {exc}")
            else:
                self._engine_failure(h, exc)
            return
        except Exception as exc:  # an engine runtime error must not kill the daemon
            self._engine_failure(h, exc)
            return
        self._out.put(encode_message(det.header, det.table))
        pv = self.config.preview
        if pv.enabled and self._previews.due(h.source):
            try:
                img, scale = make_preview(item.pixels, pv.max_side_px)
                self._out.put(encode_message(PreviewHeader(
                    source=h.source, seq=h.seq, t_acq_ns=h.t_acq_ns, shape=h.shape,
                    size=(int(img.shape[0]), int(img.shape[1])), scale=scale,
                    pixel_size_nm=h.pixel_size_nm), img))
            except Exception as exc:  # a display nicety must never cost a frame
                log.warning("frame %s#%d: no preview: %r", h.source, h.seq, exc)
        m = self.metrics
        dh = det.header
        lat_s = (dh.t_done_ns - dh.t_acq_ns) / 1e9
        m.latency.observe(max(lat_s, 0.0))
        for stage, ms in dh.stage_ms.items():
            m.stage.labels(stage=stage).observe(ms / 1e3)
        busy_s = sum(dh.stage_ms.values()) / 1e3
        m.stage.labels(stage="queue_wait").observe(max(0.0, (dh.t_done_ns - item.t_recv_ns) / 1e9 - busy_s))
        m.particles.labels(source=h.source).inc(dh.n)
        self._lat_ms.append(lat_s * 1e3)

        self._classify(item)
        if self._query is not None:
            self._query.offer(h, item.pixels)

        try:
            summary = self.pipeline.summarise(h, det)
        except Exception as exc:  # statistics or a rule failed: the detections are out already
            self.last_error = f"frame {h.source}#{h.seq}: summary failed: {exc!r}"
            log.exception("frame %s#%d: statistics/alerts failed", h.source, h.seq)
            self._drop("summary_failure")
        else:
            # alerts before stats: ``stats`` is the last message of a frame, so a client
            # that waits for a frame's results (the stage search) knows when it has them all
            self._publish_alerts(summary.alerts)
            self._out.put(encode_message(summary.stats))
            for stage, ms in summary.stage_ms.items():
                m.stage.labels(stage=stage).observe(ms / 1e3)
        m.frames_processed.labels(source=h.source).inc()
        self._done_t.append(time.monotonic())
        self.processed += 1

    def _classify(self, item: _Item) -> None:
        """Classify the frame when it is its turn and publish ``class`` (+ its alerts).

        A classifier failure costs only the classification: the detections are out already;
        it is counted in ``classify_failures_total`` and kept as ``last_error``.
        """
        h = item.header
        try:
            res = self.pipeline.classify(h, item.pixels)
        except Exception as exc:
            self.last_error = f"frame {h.source}#{h.seq}: classification failed: {exc!r}"
            log.error("frame %s#%d: classification failed: %r", h.source, h.seq, exc,
                      exc_info=not isinstance(exc, NanoscoutError))
            self.metrics.classify_failures.inc()
            return
        if res is None:
            return
        self._out.put(encode_message(res.header, *(() if res.cam is None else (res.cam,))))
        self._publish_alerts(res.alerts)
        m, c = self.metrics, res.classification
        for label, p in c.all.items():
            m.class_probability.labels(source=h.source, label=label).set(p)
        if c.novelty is not None:
            m.novelty.labels(source=h.source).set(c.novelty)
        for stage, ms in c.timings_ms.items():
            m.stage.labels(stage=stage).observe(ms / 1e3)

    def _publish_alerts(self, alerts: list[AlertMessage]) -> None:
        for ah, arrays in alerts:
            self._out.put(encode_message(ah, *arrays))
            self.metrics.alerts.labels(rule=ah.rule, severity=ah.severity).inc()

    def _engine_failure(self, h: FrameHeader, exc: BaseException) -> None:
        self._drop("engine_failure")
        self.last_error = f"frame {h.source}#{h.seq}: {exc!r}"
        log.error("frame %s#%d dropped: %r", h.source, h.seq, exc, exc_info=not isinstance(exc, NanoscoutError))

    def _engines(self) -> dict[str, str]:
        engines = {"detector": self.pipeline.engine_name, **self.pipeline.model_names}
        if self.pipeline.classifier is not None:
            engines["classifier"] = self.pipeline.classifier.name
        engines.update(engine_states(self.pipeline))  # remote engines: up, failing, fallback
        return engines

    def _health(self) -> HealthHeader:
        now = time.monotonic()
        recent = [t for t in self._done_t if now - t <= 5.0]
        span = min(5.0, now - self._t_start)
        fps = len(recent) / span if span > 0 else 0.0
        lat = np.asarray(self._lat_ms, dtype=np.float64)
        with self._count_lock:
            dropped, rejected = dict(self.dropped), dict(self.rejected)
        return HealthHeader(
            t_ns=time.time_ns(),
            uptime_s=round(now - self._t_start, 3),
            policy=self._policy,
            engines=self._engines(),
            frames_received=self.received,
            frames_processed=self.processed,
            frames_dropped=dropped,
            rejected=rejected,
            transport_gaps=self.gaps,
            queue_depth=self._queue_depth(),
            fps=round(fps, 3),
            latency_ms_p50=float(np.percentile(lat, 50)) if lat.size else None,
            latency_ms_p99=float(np.percentile(lat, 99)) if lat.size else None,
            last_error=self.last_error,
        )

    def _publish_loop(self) -> None:
        sock = self._pub
        interval = self.config.health.interval_s
        next_health = time.monotonic()
        suppressed_seen: dict[str, int] = {}
        try:
            while True:
                now = time.monotonic()
                if now >= next_health:
                    sock.send_multipart(encode_message(self._health()), copy=False)
                    for rule, n in self.pipeline.suppressed_alerts.items():
                        delta = n - suppressed_seen.get(rule, 0)
                        if delta > 0:
                            self.metrics.alerts_suppressed.labels(rule=rule).inc(delta)
                            suppressed_seen[rule] = n
                    next_health = now + interval
                try:
                    msg = self._out.get(timeout=max(0.0, min(_POLL_MS / 1000, next_health - time.monotonic())))
                except queue.Empty:
                    if self._worker_done.is_set() and self._out.empty():
                        break
                    continue
                sock.send_multipart(msg, copy=False)
            sock.send_multipart(encode_message(self._health()), copy=False)
        finally:
            sock.close(linger=1000)
