"""Prometheus metrics of one daemon, on its own registry (so several daemons can share a process).

Names (all prefixed ``nanoscout_``):

=====================================  =========  ==========================================
frames_received_total{source}          counter    frames accepted by validation
frames_processed_total{source}         counter    frames whose results were published
frames_dropped_total{reason}           counter    accepted frames not answered: superseded (live),
                                                  engine_failure, summary_failure, shutdown,
                                                  evicted, internal
messages_rejected_total{reason}        counter    malformed, version, header, length, oversized,
                                                  nonfinite, pixel_range, internal, ...
input_connections_total{event}         counter    connections to the frame input: accepted,
                                                  disconnected (after the handshake: an adapter
                                                  that went away, or a message part over the
                                                  transport cap, which ZeroMQ drops with the
                                                  connection), handshake_aborted (closed or
                                                  timed out in the handshake: a client that
                                                  closed at once, a TCP probe; not a refusal),
                                                  handshake_failed_auth (CURVE key refused),
                                                  handshake_failed (another socket type, not
                                                  ZeroMQ, no CURVE or another server key)
connections_total{socket,event}        counter    the same events on each listening socket:
                                                  input (its counts also above), results
                                                  (subscribers), query (lens / control
                                                  clients, where served); a CURVE key refused
                                                  on any is handshake_failed_auth
transport_gaps_total{source}           counter    frames missing from the adapter's seq numbering
                                                  (of sources with series: a source all of whose
                                                  frames were refused has none, its gaps count
                                                  in ``health.transport_gaps``)
sources_evicted_total                  counter    sources forgotten beyond ``input.max_sources``
particles_measured_total{source}       counter
frames_base_network_only_total{source} counter    frames an adapted model handed to its base
                                                  network (``det.base_network_only``)
frames_clock_skew_total                counter    frames whose latency is measured from their
                                                  arrival: their t_acq_ns is implausible
frames_size_hint_total{outcome}        counter    frames that named a particle size range
                                                  (``particle_size_nm``), by what it did
                                                  (``det.size_hint``): agreed, applied,
                                                  uncalibrated, unused
frames_smoothed_total{source}          counter    low-dose frames smoothed before the network
                                                  (``det.smoothing_px`` > 0: their noise was
                                                  above the card's ``normalization.denoise``)
frame_noise{source}                    gauge      the newest frame's white noise, a fraction of
                                                  its normalised range (``det.noise``; set only
                                                  where the card measures it)
alerts_total{rule,severity}            counter
alerts_suppressed_total{rule}          counter    rate-limited / de-duplicated firings
latency_seconds                        histogram  acquisition → results published
stage_seconds{stage}                   histogram  queue_wait, preprocess, scale, engine,
                                                  postprocess, measure, clusters, drift, track,
                                                  stats, unique, alerts, classify, lens
queue_depth                            gauge      frames accepted and waiting
class_probability{source,label}        gauge      the latest classification's probability per class
novelty{source}                        gauge      the latest AI-lens novelty score (1 = reference)
classify_failures_total                counter    frames whose classification failed
classify_skipped_total{reason}         counter    frames not classified on purpose: blank (no
                                                  contrast: beam blanked, shutter closed; no
                                                  ``class`` message, the two gauges above keep
                                                  the last classified frame's values)
ecd_d10/ecd_d50/ecd_d90{source,units}  gauge      window D10/D50/D90 of ECD (nm, or px for
                                                  uncalibrated frames: ``units`` says which)
window_particles{source}               gauge      non-border particles in the statistics window
particles_last_frame{source}           gauge      particles detected in the source's newest frame
number_density_per_um2{source}         gauge      window particles per µm² (calibrated only)
alert_threshold{name}                  gauge      this deployment's Prometheus alert thresholds
                                                  (``[metrics]`` of the daemon config; the rules
                                                  in deploy/nanoscout-rules.yml compare to them)
engine_info{backend,model,...}         info
model_swaps_total{action}              counter    hot swaps / reverts of the detection model done
model_swap_failures_total{action,step} counter    swaps / reverts refused or rolled back, by the
                                                  step that failed (``hotswap.FAILURE_STEPS``:
                                                  resolve, sha256, card, load, probe, switch;
                                                  history, switch)
model_generation                       gauge      0 for the model started with, +1 per swap or
                                                  revert
frames_saved_total                     counter    raw frames written for review (TIFF)
query_requests_total{outcome}          counter    requests on the query / control socket:
                                                  answered, or refused (malformed, too large,
                                                  unknown source or output, a refused control
                                                  request; each also got an error reply)
frame_save_failures_total{reason}      counter    no_frame, disk_budget, queue_full, write_error
=====================================  =========  ==========================================

Every labelled counter whose label values are known at start (reasons, alert rules) exists at
zero from the start, and a source's counters exist at zero from its first frame taken, so that
Prometheus' ``increase()`` sees the first step. A source evicted from the daemon's state loses
its series (:meth:`Metrics.forget_source`; also when the frame that evicted it failed, e.g. in
an engine outage), and a source whose frames were all refused gets none, so /metrics stays
bounded by ``input.max_sources`` however many sources come and go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from nanoscout.daemon.connections import CONNECTION_EVENTS, SocketName
from nanoscout.daemon.hotswap import FAILURE_STEPS
from nanoscout.wire.errors import (
    CLASSIFY_SKIP_REASONS,
    DROP_REASONS,
    REJECTION_REASONS,
    ConfigError,
)
from nanoscout.wire.headers import SizeHint

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
# up to the latency's 10 s: queue_wait (a lossless backlog) and engine (a large frame on the
# CPU) are parts of the latency and take seconds; beyond the last finite bucket
# histogram_quantile answers that bucket's bound
_STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    """All daemon metrics; ``serve()`` exposes them over HTTP.

    ``rules``: (name, severity) of every configured alert rule; ``labels``: the classifier's
    classes (their per-source gauges are removed with the source).
    """

    def __init__(self, rules: Iterable[tuple[str, str]] = (), labels: Iterable[str] = ()) -> None:
        r = self.registry = CollectorRegistry()
        self.frames_received = Counter(
            "nanoscout_frames_received", "Frames accepted by validation", ["source"], registry=r
        )
        self.frames_processed = Counter(
            "nanoscout_frames_processed", "Frames whose results were published", ["source"], registry=r
        )
        self.frames_dropped = Counter(
            "nanoscout_frames_dropped", "Accepted frames not processed, by reason", ["reason"], registry=r
        )
        self.rejected = Counter(
            "nanoscout_messages_rejected", "Input messages rejected, by reason", ["reason"], registry=r
        )
        self.input_connections = Counter(
            "nanoscout_input_connections", "Connections to the frame input, by event: accepted, "
            "disconnected (after the handshake: an adapter that went away, or a message part "
            "over the transport cap, which ZeroMQ drops with the connection), "
            "handshake_aborted (closed or timed out in the handshake: not a refusal), "
            "handshake_failed_auth (CURVE key refused), handshake_failed (any other refusal)",
            ["event"], registry=r,
        )
        self.connections = Counter(
            "nanoscout_connections", "Connections to the daemon's listening sockets, by socket "
            "(input: adapters, results: subscribers, query: lens and control clients) and "
            "event: accepted, disconnected (after the handshake), handshake_aborted (closed or "
            "timed out in the handshake: not a refusal), handshake_failed_auth (CURVE key "
            "refused), handshake_failed (any other refusal)", ["socket", "event"], registry=r,
        )
        self.transport_gaps = Counter(
            "nanoscout_transport_gaps", "Frames missing from the adapter's seq numbering",
            ["source"], registry=r,
        )
        self.sources_evicted = Counter(
            "nanoscout_sources_evicted", "Sources forgotten beyond input.max_sources", registry=r
        )
        self.particles = Counter(
            "nanoscout_particles_measured", "Particles measured", ["source"], registry=r
        )
        self.base_network_only = Counter(
            "nanoscout_frames_base_network_only",
            "Frames an adapted model handed to its base network: their particle size lies "
            "outside the sizes it was adapted on, or it found far more particles than the base "
            "network there (det.base_network_only)", ["source"], registry=r,
        )
        self.size_hint = Counter(
            "nanoscout_frames_size_hint",
            "Frames that named a particle size range (particle_size_nm), by what it did to the "
            "working scale: agreed (the estimate lay in it), applied (the range replaced the "
            "estimate), uncalibrated (no pixel size), unused (fixed or preset scale)",
            ["outcome"], registry=r,
        )
        self.frames_smoothed = Counter(
            "nanoscout_frames_smoothed",
            "Low-dose frames smoothed before the network: their white noise was above the "
            "model card's normalization.denoise target (det.smoothing_px > 0)", ["source"],
            registry=r,
        )
        self.frame_noise = Gauge(
            "nanoscout_frame_noise",
            "The newest frame's white noise, a fraction of its normalised range (det.noise)",
            ["source"], registry=r,
        )
        self.alerts = Counter("nanoscout_alerts", "Alerts published", ["rule", "severity"], registry=r)
        self.alerts_suppressed = Counter(
            "nanoscout_alerts_suppressed", "Alert firings rate-limited or de-duplicated",
            ["rule"], registry=r,
        )
        self.latency = Histogram(
            "nanoscout_latency_seconds", "Seconds from acquisition to published results (arrival to "
            "published results for frames counted in nanoscout_frames_clock_skew)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.clock_skew = Counter(
            "nanoscout_frames_clock_skew", "Frames whose acquisition time (t_acq_ns) lies more "
            "than an hour before their arrival or more than a second after it: the adapter's "
            "clock disagrees with the daemon's (or sent 0)", registry=r,
        )
        self.stage = Histogram(
            "nanoscout_stage_seconds", "Seconds per pipeline stage", ["stage"],
            buckets=_STAGE_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("nanoscout_queue_depth", "Frames waiting", registry=r)
        self.class_probability = Gauge(
            "nanoscout_class_probability", "Latest field-of-view class probability",
            ["source", "label"], registry=r,
        )
        self.novelty = Gauge("nanoscout_novelty", "Latest AI-lens novelty score (1 = reference)",
                             ["source"], registry=r)
        self.classify_failures = Counter(
            "nanoscout_classify_failures", "Frames whose classification failed", registry=r
        )
        self.classify_skipped = Counter(
            "nanoscout_classify_skipped", "Frames not classified on purpose, by reason (blank: "
            "no contrast, e.g. beam blanked)", ["reason"], registry=r)
        self.ecd = {q: Gauge(f"nanoscout_ecd_{q}", f"Window {q.upper()} of the equivalent circular "
                             "diameter (nm, or px when units=px)", ["source", "units"], registry=r)
                    for q in ("d10", "d50", "d90")}
        self.window_particles = Gauge(
            "nanoscout_window_particles", "Non-border particles in the statistics window",
            ["source"], registry=r)
        self.particles_last_frame = Gauge(
            "nanoscout_particles_last_frame", "Particles detected in the newest frame",
            ["source"], registry=r)
        self.number_density = Gauge(
            "nanoscout_number_density_per_um2", "Window particles per square micrometre",
            ["source"], registry=r)
        self.alert_threshold = Gauge(
            "nanoscout_alert_threshold", "Alert thresholds of this deployment (daemon config "
            "[metrics]), compared by the Prometheus rules", ["name"], registry=r)
        self.engine_info = Info("nanoscout_engine", "Detection engine in use", registry=r)
        self.model_swaps = Counter("nanoscout_model_swaps", "Hot swaps and reverts of the "
                                   "detection model", ["action"], registry=r)
        self.model_swap_failures = Counter(
            "nanoscout_model_swap_failures", "Hot swaps / reverts refused or rolled back, by "
            "the step that failed", ["action", "step"], registry=r)
        self.model_generation = Gauge("nanoscout_model_generation", "Detection model "
                                      "generation (0 at start, +1 per swap or revert)",
                                      registry=r)
        self.frames_saved = Counter("nanoscout_frames_saved", "Raw frames written for review",
                                    registry=r)
        self.frame_save_failures = Counter(
            "nanoscout_frame_save_failures", "Raw frames not written for review, by reason",
            ["reason"], registry=r)
        self.query_requests = Counter(
            "nanoscout_query_requests", "Requests on the query / control socket, by outcome "
            "(answered or refused)", ["outcome"], registry=r)
        self._server: WSGIServer | None = None
        self._labels = tuple(labels)
        #: sources with series (:meth:`add_source` .. :meth:`forget_source`)
        self._sources: set[str] = set()
        # every series whose labels are known now exists at zero from the start
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason=reason.value)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason=reason.value)
        for event in CONNECTION_EVENTS:
            self.input_connections.labels(event=event)
        for reason in CLASSIFY_SKIP_REASONS:
            self.classify_skipped.labels(reason=reason.value)
        for action, steps in FAILURE_STEPS.items():
            self.model_swaps.labels(action=action)
            for step in steps:
                self.model_swap_failures.labels(action=action, step=step)
        for outcome in ("answered", "refused"):
            self.query_requests.labels(outcome=outcome)
        for outcome in get_args(SizeHint):
            self.size_hint.labels(outcome=outcome)
        for why in ("no_frame", "disk_budget", "queue_full", "write_error"):
            self.frame_save_failures.labels(reason=why)
        for rule, severity in rules:
            self.alerts.labels(rule=rule, severity=severity)
            self.alerts_suppressed.labels(rule=rule)

    def count_connections(self, socket: SocketName) -> Callable[[str], None]:
        """Create the ``connections_total`` series of ``socket`` at zero (every event of
        :data:`~nanoscout.daemon.connections.CONNECTION_EVENTS`, ``handshake_aborted``
        included, so ``increase()`` sees the first of each); returns the function that counts
        one of its events (for ``input`` also in
        ``input_connections_total``, kept for the dashboards and rules that read it)."""
        for event in CONNECTION_EVENTS:
            self.connections.labels(socket=socket, event=event)
        if socket != "input":
            return lambda event: self.connections.labels(socket=socket, event=event).inc()

        def count_input(event: str) -> None:
            self.connections.labels(socket=socket, event=event).inc()
            self.input_connections.labels(event=event).inc()

        return count_input

    def add_source(self, source: str) -> None:
        """Create the per-source counters of a new source at zero."""
        self._sources.add(source)
        for counter in (self.frames_received, self.frames_processed, self.transport_gaps,
                        self.particles, self.base_network_only, self.frames_smoothed):
            counter.labels(source=source)

    def forget_source(self, source: str) -> None:
        """Remove every series of ``source`` (it was evicted from the daemon's state)."""
        self._sources.discard(source)
        for metric in (self.frames_received, self.frames_processed, self.transport_gaps,
                       self.particles, self.base_network_only, self.novelty,
                       self.frames_smoothed, self.frame_noise):
            with contextlib.suppress(KeyError):
                metric.remove(source)
        for label in self._labels:
            with contextlib.suppress(KeyError):
                self.class_probability.remove(source, label)
        for gauge in (self.window_particles, self.particles_last_frame, self.number_density):
            with contextlib.suppress(KeyError):
                gauge.remove(source)
        for gauge in self.ecd.values():
            for units in ("nm", "px"):
                with contextlib.suppress(KeyError):
                    gauge.remove(source, units)

    def has_source(self, source: str) -> bool:
        """Whether ``source`` has series now (a frame of it was taken and it was not
        forgotten since)."""
        return source in self._sources

    def observe_stats(self, source: str, units: str, window: Any) -> None:
        """Set the size gauges of ``source`` from a ``stats`` message's ``window`` block
        (ECD in ``units``); quantiles of an empty window are left as they were."""
        ecd = window.get("ecd") or {}
        for q, gauge in self.ecd.items():
            value = ecd.get(q)
            if value is not None:
                gauge.labels(source=source, units=units).set(float(value))
        count = window.get("count")
        if count is not None:
            self.window_particles.labels(source=source).set(int(count))
        density = window.get("number_density_per_um2")
        if density is not None:
            self.number_density.labels(source=source).set(float(density))

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        """Publish this deployment's alert thresholds (name -> value, in the name's unit)."""
        for name, value in thresholds.items():
            self.alert_threshold.labels(name=name).set(float(value))

    def serve(self, host: str, port: int) -> int:
        """Start the ``/metrics`` HTTP server on host:port (0 = any free port); returns the port.

        ConfigError when it cannot bind (the port is taken, the host is not this machine's), as
        for the ZeroMQ sockets (:func:`nanoscout.wire.transport.bind`)."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot bind the metrics server to {host}:{port}: "
                              f"{exc.strerror or exc}") from exc
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
