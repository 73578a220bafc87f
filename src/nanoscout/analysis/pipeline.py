"""The per-frame pipeline: one :class:`~nanoscout.analysis.frame.Frame` in, its result messages
out, in publishing order.

:meth:`Pipeline.process` runs, for one frame: detection and measurement (→ ``det``), the
morphology clusters, the source's drift and particle tracks (``track_id`` on every row,
:mod:`nanoscout.analysis.tracking`), a rate-limited ``preview``, the field-of-view classification with its
class / novelty alerts (→ ``class``, ``alert``), the source's rolling statistics and the
particle / count / drift rules (→ ``alert``, then ``stats``, always the frame's last message).
A frame without contrast (:class:`~nanoscout.wire.errors.BlankFrame`: beam blanked, shutter
closed) gets no ``class`` message and no class / novelty alert: its classification is listed in
:attr:`FrameResult.skipped`, not as a failure, and logged at INFO once when a source's frames
turn blank and once when they show contrast again (a blanked beam can last minutes).
Each message is handed to ``emit`` as soon as it is ready, so ``det`` reaches subscribers
before the summaries are computed; the returned :class:`FrameResult` lists them all with what a
caller counts (particles, stage times, failures that cost only part of the frame).

No sockets and no threads here: the daemon's worker thread and the offline ``nanoscout measure``
command call the same method, so both give identical numbers. Per-source state (statistics per
length unit, clusters, tracks, classification turn, message counters) is bounded: beyond
``max_sources`` the least recently seen source is forgotten (:attr:`FrameResult.evicted`; a
frame whose analysis raised leaves its evictions to :meth:`Pipeline.take_evicted`).
:meth:`Pipeline.request` (any thread) asks for a source's statistics to be reset or its drift
reference set; the request is applied before that source's next frame.
:meth:`Pipeline.replace_detector` switches the default detection model between two frames (the
daemon's hot swap, :mod:`nanoscout.daemon.hotswap`); every ``det`` names the model that made it
(``model``, ``model_sha256``, ``model_generation``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from nanoscout.analysis.alerts import Alert, AlertEngine, parse_rules
from nanoscout.analysis.classifier import Classification, FieldClassifier
from nanoscout.analysis.clusters import ClusterConfig, OnlineKMeans
from nanoscout.analysis.detector import Detector
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.measure import measure
from nanoscout.analysis.modality import ModalityEstimator
from nanoscout.analysis.preview import PreviewConfig, PreviewLimiter, make_preview
from nanoscout.analysis.stats import SizeStatistics, StatsConfig
from nanoscout.analysis.tracking import SourceTracker, TrackingConfig, TrackUpdate
from nanoscout.wire.codec import Message
from nanoscout.wire.errors import BlankFrame, NanoscoutError
from nanoscout.wire.headers import (
    AlertHeader,
    ClassHeader,
    DetHeader,
    FrameDrift,
    Kind,
    PreviewHeader,
    StatsHeader,
    Tracking,
    Units,
)

__all__ = ["ACTIONS", "DEFAULT_MAX_SOURCES", "FrameResult", "Pipeline", "model_sha256"]

log = logging.getLogger(__name__)

#: per-source state kept for at most this many sources by default
DEFAULT_MAX_SOURCES = 64

Emit = Callable[[Message[Any]], None]
#: what :meth:`Pipeline.request` can be asked
ACTIONS: tuple[str, ...] = ("reset_statistics", "set_drift_reference")


def model_sha256(detector: Detector, digits: int = 12) -> str | None:
    """The first ``digits`` hex digits of the sha256 of ``detector``'s ONNX file (from its
    model card; None for a detector without a card)."""
    card = getattr(detector, "card", None)
    sha = getattr(card, "sha256", None)
    return sha[:digits] if isinstance(sha, str) else None


@dataclass
class FrameResult:
    """What one frame produced.

    ``messages``: every message, in publishing order (``det`` first, ``stats`` last unless
    the summary failed). ``labels``: the instance map on the frame's grid (0 = background);
    ``table``: the particle table (lengths in ``units``). ``failures``: (stage, error) of parts
    that failed after the detections were out (``classify``, ``summary``); ``skipped``:
    (stage, error) of parts skipped on purpose, each error's ``reason`` says why (``classify``
    with :class:`~nanoscout.wire.errors.BlankFrame`, reason ``blank``: a frame without
    contrast, no ``class`` message); ``evicted``: sources forgotten to make room for this one
    (and for earlier frames whose analysis raised, unless taken by :meth:`Pipeline.take_evicted`).
    """

    frame: Frame
    messages: list[Message[Any]]
    labels: np.ndarray
    table: np.ndarray
    stage_ms: dict[str, float]
    model: str
    scale: float
    classification: Classification | None = None
    alerts: list[AlertHeader] = field(default_factory=list)
    failures: list[tuple[str, Exception]] = field(default_factory=list)
    skipped: list[tuple[str, NanoscoutError]] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    #: the tracker's findings on this frame (None: tracking off)
    tracks: TrackUpdate | None = None
    #: the table's ``score`` column holds probabilities (the detector's card is calibrated)
    calibrated: bool = False

    @property
    def det(self) -> DetHeader:
        """The frame's ``det`` header."""
        header = self.messages[0].header
        assert isinstance(header, DetHeader)
        return header


#: frames of a live source between two estimates of its modality (frames without one)
MODALITY_EVERY = 10


def _noise(detection: object) -> tuple[float | None, float | None]:
    """(noise, smoothing px) of ``det`` for a detection: both None where the noise was not
    measured (a card without ``normalization.denoise``, or a stand-in detector)."""
    noise = getattr(detection, "noise", None)
    if noise is None:
        return None, None
    return round(float(noise), 5), round(float(getattr(detection, "smoothing_px", 0.0)), 3)


class _Detected(NamedTuple):
    """What :meth:`Pipeline._detect` found on one frame (``det`` fields in brackets)."""

    labels: np.ndarray
    table: np.ndarray
    stage_ms: dict[str, float]
    model: str
    scale: float  # [working_scale]
    sha256: str | None  # [model_sha256]
    calibrated: bool
    base_only: bool  # [base_network_only]
    size_hint: str | None  # [size_hint]
    noise: float | None  # [noise]
    smoothing_px: float | None  # [smoothing_px]
    scale_agreed: bool | None  # [scale_agreed]


@dataclass
class _SourceState:
    """What the pipeline remembers of one source."""

    stats: dict[Units, SizeStatistics] = field(default_factory=dict)
    clusters: dict[Units, OnlineKMeans] = field(default_factory=dict)
    tracker: SourceTracker | None = None
    frames: int = 0
    topic_seq: dict[Kind, int] = field(default_factory=dict)
    #: a live stream's estimated modality (frames without one), the frame it was made on, and
    #: that frame's (pixel size, shape): a new magnification or frame size is estimated anew
    modality_guess: str | None = None
    modality_frame: int | None = None
    modality_view: tuple[float | None, tuple[int, ...]] | None = None
    #: classifications skipped in a row because the source's frames were blank
    blank_run: int = 0

    def next_seq(self, kind: Kind) -> int:
        n = self.topic_seq.get(kind, 0)
        self.topic_seq[kind] = n + 1
        return n


class Pipeline:
    """Detection, measurement, classification, per-source statistics and alert rules."""

    #: the daemon run every result header names (``daemon_run``, protocol 1.11: the daemon's
    #: start time, ns since the epoch), set by the daemon that owns the pipeline; None offline
    daemon_run: int | None = None

    def __init__(
        self,
        detector: Detector,
        *,
        stats_config: StatsConfig | None = None,
        rules: Sequence[dict[str, Any]] = (),
        engine_name: str = "",
        model_name: str = "",
        classifier: FieldClassifier | None = None,
        classify_every: int = 1,
        clusters: ClusterConfig | None = None,
        preview: PreviewConfig | None = None,
        rotate45_on_request: bool = False,
        modality_detectors: dict[str, tuple[Detector, str]] | None = None,
        modality_estimator: ModalityEstimator | None = None,
        max_sources: int = DEFAULT_MAX_SOURCES,
        stream_scale: bool = True,
        tracking: TrackingConfig | None = None,
        particle_size_nm: tuple[float, float] | None = None,
        particle_size_px: tuple[float, float] | None = None,
    ) -> None:
        """``classifier``: the field-of-view classifier run on every ``classify_every``-th
        frame of each source (None: no ``class`` messages). ``preview``: the ``preview``
        topic's settings (None or disabled: no previews). ``rotate45_on_request``: frames whose
        ``meta`` has ``rotate45 = true`` are also analysed turned by 45°
        (:class:`~nanoscout.analysis.detector.Detector`, ``rotate45``).
        ``modality_detectors``: modality -> (detector, model name) for the frames of that
        modality; ``detector`` analyses the others. ``modality_estimator``: gives frames
        without a modality one from their pixels (None: they go to ``detector``).
        ``stream_scale``: an automatic working scale is reused across a source's frames of one
        pixel size (a live stream); False estimates it for every frame (independent images,
        ``nanoscout measure``).
        ``tracking``: drift correction and particle tracking per source (None or disabled:
        no ``track_id``, no ``drift`` / ``tracking`` / ``unique`` / ``insitu`` blocks).
        ``particle_size_nm`` / ``particle_size_px``: the (low, high) median particle
        diameter, nm / px, of frames whose header names none (:meth:`_detect`)."""
        if max_sources < 1:
            raise ValueError(f"max_sources ({max_sources}) must be >= 1")
        self.detector = detector
        self.modality_detectors = dict(modality_detectors or {})
        self.modality_estimator = modality_estimator
        self.rotate45_on_request = rotate45_on_request
        self.classifier = classifier
        self.classify_every = classify_every
        self.stats_config = stats_config or StatsConfig()
        self.alert_engine = AlertEngine(parse_rules(list(rules)))
        self.engine_name = engine_name
        self.model_name = model_name
        self.cluster_config = clusters or ClusterConfig()
        self.preview = preview if preview is not None and preview.enabled else None
        self._previews = PreviewLimiter(self.preview.max_rate_hz if self.preview else 1.0)
        self.max_sources = max_sources
        self.stream_scale = stream_scale
        self.particle_size_nm = particle_size_nm
        self.particle_size_px = particle_size_px
        #: sources' own ranges (:meth:`set_particle_size`), set from any thread
        self._source_sizes: dict[str, tuple[float, float]] = {}
        self.tracking = tracking if tracking is not None and tracking.enabled else None
        #: 0 for the detector the pipeline was built with, +1 per :meth:`replace_detector`
        self.model_generation = 0
        self._requests: dict[str, set[str]] = {}
        self._requests_lock = threading.Lock()
        self._sources: OrderedDict[str, _SourceState] = OrderedDict()
        #: sources forgotten so far to stay within ``max_sources``
        self.evicted_total = 0
        #: sources forgotten whose eviction no FrameResult reported yet (:meth:`take_evicted`)
        self._evicted: list[str] = []

    @property
    def model_names(self) -> dict[str, str]:
        """The detection models as health and ``engine_info`` list them: "model" (the default)
        and "model_<modality>" for each modality's own."""
        return {"model": self.model_name,
                **{f"model_{m}": name for m, (_, name) in self.modality_detectors.items()}}

    @property
    def sources(self) -> int:
        """Sources whose state is kept now."""
        return len(self._sources)

    @property
    def suppressed_alerts(self) -> dict[str, int]:
        """Rule name → firings rate-limited or de-duplicated so far."""
        return dict(self.alert_engine.suppressed)

    def statistics(self, source: str, units: Units = "nm") -> SizeStatistics | None:
        """The rolling / cumulative statistics of ``source`` in ``units``, if it has any."""
        state = self._sources.get(source)
        return None if state is None else state.stats.get(units)

    def replace_detector(self, detector: Detector, *, model_name: str, engine_name: str,
                         modality_detectors: dict[str, tuple[Detector, str]] | None = None
                         ) -> None:
        """Make ``detector`` (model ``name:version``, on engine ``engine_name``) the detector
        of the frames from the next one on, and ``modality_detectors`` those of their
        modalities (None or {}: ``detector`` analyses every frame); the generation goes up by
        one. Call it only from the thread that calls :meth:`process`, between two frames (the
        daemon's worker does): a frame is analysed by one model, whole. The caller closes the
        engines no longer used."""
        self.detector = detector
        self.model_name = model_name
        self.engine_name = engine_name
        self.modality_detectors = dict(modality_detectors or {})
        self.model_generation += 1

    def request(self, source: str, action: str) -> None:
        """Ask (from any thread) for ``action`` on ``source`` before its next frame:
        ``reset_statistics`` (per-frame and unique statistics, fields, in-situ series; tracks
        and drift go on) or ``set_drift_reference`` (the next frame is the drift's zero).
        Raises ValueError naming an unknown action, or a drift reference without tracking."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        if action == "set_drift_reference" and self.tracking is None:
            raise ValueError("set_drift_reference needs tracking ([tracking] enabled)")
        with self._requests_lock:
            self._requests.setdefault(source, set()).add(action)
            while len(self._requests) > 4 * self.max_sources:  # names never seen: bounded
                del self._requests[next(iter(self._requests))]

    def set_particle_size(self, source: str, size_nm: tuple[float, float] | None) -> None:
        """Give (from any thread) ``source`` the (low, high) range of its median particle
        diameter, nm, for its frames that name none, instead of the pipeline's
        ``particle_size_nm``; None: the pipeline's again. From the source's next frame on; an
        evicted source (beyond ``max_sources``) forgets it with the rest of its state."""
        with self._requests_lock:
            if size_nm is None:
                self._source_sizes.pop(source, None)
                return
            self._source_sizes[source] = (float(size_nm[0]), float(size_nm[1]))
            while len(self._source_sizes) > 4 * self.max_sources:  # names never seen: bounded
                del self._source_sizes[next(iter(self._source_sizes))]

    def _apply_requests(self, source: str, state: _SourceState) -> None:
        with self._requests_lock:
            actions = self._requests.pop(source, set())
        if "reset_statistics" in actions:
            for st in state.stats.values():
                st.reset()
            if state.tracker is not None:
                state.tracker.reset_statistics()
        if "set_drift_reference" in actions and state.tracker is not None:
            state.tracker.set_drift_reference()

    def knows(self, source: str) -> bool:
        """Whether the pipeline keeps state of ``source`` (a frame of it was analysed and the
        source not forgotten since)."""
        return source in self._sources

    def forget(self, source: str) -> None:
        """Drop everything remembered of ``source`` (its next frame starts afresh)."""
        self._sources.pop(source, None)
        with self._requests_lock:
            self._source_sizes.pop(source, None)
        self.alert_engine.forget(source)
        self._previews.forget(source)

    def take_evicted(self) -> list[str]:
        """The sources forgotten to stay within ``max_sources`` that no :class:`FrameResult`
        reported yet, and not seen again since; they are reported once. A frame whose analysis
        raised (an engine failure) may have evicted a source before it failed: a caller that
        keeps per-source state beside the pipeline's (the daemon's metric series, the lens's
        newest frames) takes them here, or gets them with the next frame's result."""
        evicted = [s for s in dict.fromkeys(self._evicted) if s not in self._sources]
        self._evicted = []
        return evicted

    def _state(self, source: str) -> _SourceState:
        state = self._sources.get(source)
        if state is None:
            while len(self._sources) >= self.max_sources:
                old = next(iter(self._sources))
                self.forget(old)
                self._evicted.append(old)  # reported with the result, or by take_evicted
                self.evicted_total += 1
            state = self._sources[source] = _SourceState()
        self._sources.move_to_end(source)
        return state

    # ------------------------------------------------------------------ one frame

    def process(self, frame: Frame, emit: Emit | None = None) -> FrameResult:
        """Analyse one frame; each message goes to ``emit`` as soon as it is ready.

        Raises what detection raises (:class:`~nanoscout.wire.errors.EngineError`,
        :class:`~nanoscout.wire.errors.FrameError`): then nothing was emitted. Failures of the
        classification or the summary after ``det`` are caught and listed in
        :attr:`FrameResult.failures` (the summary's: no ``stats`` message); a blank frame's
        classification is skipped (:attr:`FrameResult.skipped`, no ``class`` message).
        Afterwards, whether it raised or not, the frame holds only its pixels
        (:meth:`Frame.release`): the daemon keeps frames for review and for the lens.
        """
        try:
            return self._process(frame, emit)
        finally:
            frame.release()

    def _process(self, frame: Frame, emit: Emit | None) -> FrameResult:
        """:meth:`process` without the release of the frame's prepared pixels."""
        out: list[Message[Any]] = []

        def send(msg: Message[Any]) -> None:
            out.append(msg)
            if emit is not None:
                emit(msg)

        h = frame.header
        state = self._state(h.source)
        if self._requests:
            self._apply_requests(h.source, state)
        ref = frame.ref()
        if self.daemon_run is not None:
            ref["daemon_run"] = self.daemon_run
        units = frame.units
        found = self._detect(frame, state)
        labels, table, stage_ms, model, scale = (found.labels, found.table, found.stage_ms,
                                                 found.model, found.scale)
        if self.cluster_config.enabled:
            t0 = time.perf_counter()
            km = state.clusters.get(units)
            if km is None:
                km = state.clusters[units] = OnlineKMeans(self.cluster_config)
            table["cluster"] = km.update(table, units)
            stage_ms["clusters"] = (time.perf_counter() - t0) * 1e3
        tracks = None
        if self.tracking is not None:
            if state.tracker is None:
                state.tracker = SourceTracker(self.tracking)
            tracks = state.tracker.update(table, image=frame.normalized, t_ns=h.t_acq_ns,
                                          seq=h.seq, pixel_size_nm=h.pixel_size_nm,
                                          stage=h.stage, t_recv_ns=frame.t_recv_ns)
            stage_ms.update(tracks.timings_ms)
        det = DetHeader(
            **ref, stage_ms={k: round(v, 3) for k, v in stage_ms.items()},
            topic_seq=state.next_seq(Kind.DET), t_recv_ns=frame.t_recv_ns,
            t_done_ns=time.time_ns(), pixel_size_nm=h.pixel_size_nm, units=units, n=len(table),
            engine=self.engine_name, model=model, shape=h.shape, modality=h.modality,
            meta=h.meta, working_scale=round(scale, 5), model_sha256=found.sha256,
            model_generation=self.model_generation, base_network_only=found.base_only,
            size_hint=found.size_hint, noise=found.noise, smoothing_px=found.smoothing_px,
            scale_agreed=found.scale_agreed,
            drift=None if tracks is None else FrameDrift(**tracks.drift),
            tracking=None if tracks is None else Tracking(**tracks.tracking))
        send(Message(det.topic().decode(), det, table))
        result = FrameResult(frame, out, labels, table, stage_ms, model, scale,
                             evicted=self.take_evicted(),
                             tracks=tracks, calibrated=found.calibrated)

        if self.preview is not None and self._previews.due(h.source):
            try:
                img, pscale = make_preview(frame.normalized, self.preview.max_side_px)
                pv = PreviewHeader(**ref, topic_seq=state.next_seq(Kind.PREVIEW), shape=h.shape,
                                   size=(int(img.shape[0]), int(img.shape[1])), scale=pscale,
                                   pixel_size_nm=h.pixel_size_nm)
                send(Message(pv.topic().decode(), pv, img))
            except Exception as exc:  # a display nicety must never cost a frame
                log.warning("frame %s#%d: no preview: %r", h.source, h.seq, exc)

        state.frames += 1
        if self.classifier is not None and (state.frames - 1) % self.classify_every == 0:
            try:
                self._classify(frame, state, ref, result, send)
            except Exception as exc:  # costs only the classification: det is out already
                result.failures.append(("classify", exc))

        try:
            self._summarise(frame, state, ref, result, send)
        except Exception as exc:  # statistics or a rule failed: the detections are out already
            result.failures.append(("summary", exc))
        return result

    def _modality(self, frame: Frame, state: _SourceState) -> str | None:
        """The frame's modality; for a frame without one, the modality model's estimate (a
        live stream's is made again every :data:`MODALITY_EVERY` frames of the source and when
        its pixel size or frame shape changes, so its detector does not change from frame to
        frame of one view; independent images each get one)."""
        h = frame.header
        if h.modality is not None or self.modality_estimator is None \
                or not self.modality_detectors:
            return h.modality
        view = (h.pixel_size_nm, tuple(frame.pixels.shape))
        if not self.stream_scale or state.modality_frame is None or state.modality_view != view \
                or state.frames - state.modality_frame >= MODALITY_EVERY:
            state.modality_guess = self.modality_estimator.estimate(frame.pixels)
            state.modality_frame, state.modality_view = state.frames, view
        return state.modality_guess

    def _detect(self, frame: Frame, state: _SourceState) -> _Detected:
        """Detect and measure the particles of ``frame``. Its ``particle_size_nm`` (else its
        source's, :meth:`set_particle_size`, else the pipeline's) becomes the detector's range
        in frame px where the frame has a pixel size; where no range in nm can be used, its
        ``particle_size_px`` (else the pipeline's) is."""
        h = frame.header
        turn = True if self.rotate45_on_request and h.meta.get("rotate45") is True else None
        modality = self._modality(frame, state)
        detector, model = self.modality_detectors.get(modality or "",
                                                      (self.detector, self.model_name))
        key = (h.source, h.pixel_size_nm) if self.stream_scale else None
        hint, particle_px = None, None
        size_nm = (h.particle_size_nm or self._source_sizes.get(h.source)
                   or self.particle_size_nm)
        if size_nm is not None and h.pixel_size_nm is not None:
            particle_px = (size_nm[0] / h.pixel_size_nm, size_nm[1] / h.pixel_size_nm)
        else:
            particle_px = h.particle_size_px or self.particle_size_px
            if particle_px is None and size_nm is not None:
                hint = "uncalibrated"  # a size in nm says nothing about px
        detection = detector.detect(frame.pixels, key=key,
                                    rotate45=turn, pixel_size_nm=h.pixel_size_nm,
                                    normalized=frame.normalized, particle_px=particle_px)
        if particle_px is not None:
            # a stand-in detector without the field estimated nothing with it
            hint = getattr(detection, "size_hint", None) or "unused"
        stage_ms = dict(detection.timings_ms)
        t0 = time.perf_counter()
        table = measure(detection.labels, h.pixel_size_nm, detection.scores)
        stage_ms["measure"] = (time.perf_counter() - t0) * 1e3
        return _Detected(detection.labels, table, stage_ms, model, detection.scale,
                         model_sha256(detector),
                         # a stand-in detector without the flags reports raw scores, by itself
                         bool(getattr(detection, "calibrated", False)),
                         bool(getattr(detection, "outside_range", False)), hint,
                         *_noise(detection), getattr(detection, "scale_agreed", None))

    def _classify(self, frame: Frame, state: _SourceState, ref: dict[str, Any],
                  result: FrameResult, send: Callable[[Message[Any]], None]) -> None:
        assert self.classifier is not None
        h = frame.header
        try:
            c = self.classifier.classify(frame.pixels)  # any dtype: float64 kept to normalisation
        except BlankFrame as exc:  # nothing to classify: skipped and counted, not a failure
            result.skipped.append(("classify", exc))
            if state.blank_run == 0:
                log.info("frame %s#%d: %s; not classified until a frame with contrast",
                         h.source, h.seq, exc)
            state.blank_run += 1
            return
        if state.blank_run:
            log.info("frame %s#%d: contrast again, classified (%d blank frame(s) not classified)",
                     h.source, h.seq, state.blank_run)
            state.blank_run = 0
        result.classification = c
        result.stage_ms.update(c.timings_ms)
        heat_shape = None if c.cam is None else (int(c.cam.shape[0]), int(c.cam.shape[1]))
        ch = ClassHeader(
            **ref, stage_ms={k: round(v, 3) for k, v in c.timings_ms.items()},
            topic_seq=state.next_seq(Kind.CLASS), labels=c.labels,
            probabilities=c.probabilities,
            novelty=None if c.novelty is None else round(c.novelty, 5),
            engine=f"{self.engine_name} {self.classifier.name}", heatmap_shape=heat_shape)
        send(Message(ch.topic().decode(), ch, c.cam))
        # a class rule's alert is explained by its own label's CAM (made only for the rules
        # that fire), a novelty alert by the top class's
        fired = self.alert_engine.evaluate_class(
            source=frame.source, t_ns=frame.header.t_acq_ns, labels=list(c.all),
            probabilities=list(c.all.values()), novelty=c.novelty, heatmap=c.cam,
            cam_of=c.cam_of, t_recv_ns=frame.t_recv_ns)
        for al in fired:
            send(self._alert(al, frame, state, ref, result))

    def _summarise(self, frame: Frame, state: _SourceState, ref: dict[str, Any],
                   result: FrameResult, send: Callable[[Message[Any]], None]) -> None:
        units = frame.units
        t0 = time.perf_counter()
        stats = state.stats.get(units)
        if stats is None:
            stats = state.stats[units] = SizeStatistics(self.stats_config)
        stats.update(result.table, t_ns=frame.header.t_acq_ns, frame_area_um2=frame.area_um2,
                     confidence=result.calibrated)
        snap = stats.snapshot()
        result.stage_ms["stats"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        unique = insitu = None
        if state.tracker is not None and result.tracks is not None:
            t1 = time.perf_counter()
            unique = state.tracker.unique(units)
            insitu = state.tracker.insitu(units, frame.header.t_acq_ns)
            result.stage_ms["unique"] = (time.perf_counter() - t1) * 1e3
        fired = self.alert_engine.evaluate(
            source=frame.source, t_ns=frame.header.t_acq_ns, stage=frame.header.stage,
            table=result.table, stats=snap, units=units, pixel_size_nm=frame.pixel_size_nm,
            events=() if result.tracks is None else result.tracks.tracking["events"],
            insitu=insitu, calibrated=result.calibrated, t_recv_ns=frame.t_recv_ns)
        result.stage_ms["alerts"] = (time.perf_counter() - t0) * 1e3
        alerts = [self._alert(al, frame, state, ref, result) for al in fired]
        km = state.clusters.get(units)
        sh = StatsHeader(
            **ref, stage_ms={k: round(v, 3) for k, v in result.stage_ms.items()},
            topic_seq=state.next_seq(Kind.STATS), t_ns=time.time_ns(), units=units,
            window=snap["window"], cumulative=snap["cumulative"], drift=snap["drift"],
            clusters=None if km is None else km.summary(), unique=unique, insitu=insitu,
            weights=snap["weights"])
        for msg in alerts:
            send(msg)
        send(Message(sh.topic().decode(), sh))

    def _alert(self, al: Alert, frame: Frame, state: _SourceState, ref: dict[str, Any],
               result: FrameResult) -> Message[AlertHeader]:
        """The ``alert`` message of one fired rule: the particles that fired and, for rules
        that fire on a classification, the CAM that explains it (a class rule's: its label's;
        a novelty rule's: the top class's)."""
        heat = al.heatmap
        ah = AlertHeader(
            **ref, topic_seq=state.next_seq(Kind.ALERT), rule=al.rule, kind=al.kind,
            severity=al.severity, value=float(al.value), threshold=float(al.threshold),
            explanation=al.explanation, units=frame.units, n=len(al.particles),
            heatmap_shape=None if heat is None else (int(heat.shape[0]), int(heat.shape[1])),
            confidence=al.confidence)
        result.alerts.append(ah)
        return Message(ah.topic().decode(), ah, al.particles, heat)

    def close(self) -> None:
        """Release the engines (detector, classifier, lens, modality model)."""
        self.detector.close()
        if self.modality_estimator is not None:
            self.modality_estimator.close()
        for det, _ in self.modality_detectors.values():
            det.close()
        if self.classifier is not None:
            self.classifier.engine.close()
            if self.classifier.lens is not None:
                self.classifier.lens.close()
