"""The per-frame pipeline: pixels → particle instances → measurements → statistics → alerts.

Two phases per frame: :meth:`Pipeline.detections` (detect + measure → ``det`` message) and
:meth:`Pipeline.summarise` (rolling statistics + alert rules → ``stats`` and ``alert``
messages), so the daemon can publish the particle table before the summaries are computed.

No sockets and no threads here: :class:`Pipeline` is called by the daemon's worker thread and by
the offline ``nanoscout measure`` command alike, so both give identical numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoscout.analysis.alerts import Alert, AlertEngine, parse_rules
from nanoscout.analysis.classifier import Classification, FieldClassifier
from nanoscout.analysis.clusters import ClusterConfig, OnlineKMeans
from nanoscout.analysis.detector import Detector
from nanoscout.analysis.measure import measure
from nanoscout.analysis.stats import SizeStatistics, StatsConfig
from nanoscout.wire.errors import FrameError
from nanoscout.wire.protocol import AlertHeader, ClassHeader, DetHeader, FrameHeader, StatsHeader


@dataclass
class Analysis:
    """One image analysed: instance labels (frame grid), particle table and stage times (ms)."""

    labels: np.ndarray
    table: np.ndarray
    units: str
    stage_ms: dict[str, float]
    scale: float = 1.0  # working px per frame px used by the detector
    model: str = ""  # name:version of the detection model that analysed it


@dataclass
class Detections:
    """The ``det`` message of one frame: header and particle table (and the instance labels,
    frame grid, for offline outputs; never sent)."""

    header: DetHeader
    table: np.ndarray
    labels: np.ndarray | None = None


#: an ``alert`` message ready to encode: its header and buffers (particle rows [, heatmap])
AlertMessage = tuple[AlertHeader, tuple[np.ndarray, ...]]


@dataclass
class Summary:
    """The ``stats`` message and the alerts that fired for one frame, with stage times (ms)."""

    stats: StatsHeader
    alerts: list[AlertMessage] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ClassResult:
    """The ``class`` message of one frame (header, CAM or None) and the alerts it fired."""

    header: ClassHeader
    cam: np.ndarray | None
    classification: Classification
    alerts: list[AlertMessage] = field(default_factory=list)


def alert_message(al: Alert, header: FrameHeader, units: str) -> AlertMessage:
    """The ``alert`` message of one fired rule: the particles that fired and, for rules that
    fire on a classification, the CAM that explains it."""
    heat = al.heatmap
    ah = AlertHeader(
        source=header.source,
        seq=header.seq,
        t_acq_ns=header.t_acq_ns,
        rule=al.rule,
        kind=al.kind,
        severity=al.severity,  # type: ignore[arg-type]
        value=float(al.value),
        threshold=float(al.threshold),
        explanation=al.explanation,
        units=units,  # type: ignore[arg-type]
        stage=header.stage,
        n=len(al.particles),
        heatmap_shape=None if heat is None else (int(heat.shape[0]), int(heat.shape[1])),
    )
    return ah, (al.particles,) if heat is None else (al.particles, heat)


def check_pixels(pixels: np.ndarray) -> None:
    """Raise :class:`FrameError` unless ``pixels`` is a non-empty 2-D array of finite numbers."""
    if pixels.ndim != 2 or pixels.size == 0:
        raise FrameError(f"a frame must be a non-empty 2-D array, got shape {pixels.shape}", reason="shape")
    if pixels.dtype.kind == "f":
        finite = np.isfinite(pixels)
        if not finite.all():
            bad = int(pixels.size - np.count_nonzero(finite))
            raise FrameError(
                f"frame has {bad} NaN/inf pixels of {pixels.size}; refusing to analyse it",
                reason="nonfinite",
            )


class Pipeline:
    """Detection, measurement, per-source statistics and alert rules for a stream of frames."""

    def __init__(
        self,
        detector: Detector,
        *,
        stats_config: StatsConfig | None = None,
        rules: Sequence[dict[str, Any]] = (),
        min_score: float = 0.0,
        engine_name: str = "",
        model_name: str = "",
        classifier: FieldClassifier | None = None,
        classify_every: int = 1,
        clusters: ClusterConfig | None = None,
        rotate45_on_request: bool = False,
        modality_detectors: dict[str, tuple[Detector, str]] | None = None,
    ) -> None:
        """``classifier``: the field-of-view classifier run on every ``classify_every``-th
        frame of each source by :meth:`classify` (None: no ``class`` messages).
        ``rotate45_on_request``: frames whose ``meta`` has ``rotate45 = true`` are also
        analysed turned by 45° (:class:`~nanoscout.analysis.detector.Detector`, ``rotate45``).
        ``modality_detectors``: modality -> (detector, model name) for the frames of that
        modality; ``detector`` analyses the others."""
        self.detector = detector
        self.modality_detectors = dict(modality_detectors or {})
        self.rotate45_on_request = rotate45_on_request
        self.classifier = classifier
        self.classify_every = classify_every
        self._class_counts: dict[str, int] = {}
        self.stats_config = stats_config or StatsConfig()
        self.alert_engine = AlertEngine(parse_rules(list(rules)))
        self.min_score = min_score
        self.engine_name = engine_name
        self.model_name = model_name
        self._stats: dict[str, SizeStatistics] = {}
        #: morphology clusters per source (``cluster`` column, ``stats.clusters``)
        self.cluster_config = clusters or ClusterConfig()
        self._clusters: dict[str, OnlineKMeans] = {}

    @property
    def model_names(self) -> dict[str, str]:
        """The detection models as health and ``engine_info`` list them: "model" (the default)
        and "model_<modality>" for each modality's own."""
        return {"model": self.model_name,
                **{f"model_{m}": name for m, (_, name) in self.modality_detectors.items()}}

    def analyse(self, pixels: np.ndarray, pixel_size_nm: float | None,
                source: str | None = None, rotate45: bool | None = None,
                modality: str | None = None) -> Analysis:
        """Detect and measure the particles of one image (lengths in nm, or px if uncalibrated).

        ``source``: the stream the frame belongs to; an automatic working scale is reused
        across a stream's frames of one pixel size (``Detector.auto_every``). ``modality``
        picks that modality's detector, if one is configured.
        """
        check_pixels(pixels)
        key = None if source is None else (source, pixel_size_nm)
        detector, model = self.modality_detectors.get(modality or "",
                                                      (self.detector, self.model_name))
        detection = detector.detect(pixels, key=key, rotate45=rotate45,
                                    pixel_size_nm=pixel_size_nm)
        stage_ms = dict(detection.timings_ms)
        t0 = time.perf_counter()
        labels = detection.labels
        table = measure(labels, pixel_size_nm, detection.scores)
        if self.min_score > 0 and len(table):
            table = table[table["score"] >= self.min_score]
        stage_ms["measure"] = (time.perf_counter() - t0) * 1e3
        return Analysis(labels, table, "nm" if pixel_size_nm else "px", stage_ms,
                        detection.scale, model)

    def statistics(self, source: str) -> SizeStatistics:
        """The rolling/cumulative statistics of one source (created on first use)."""
        stats = self._stats.get(source)
        if stats is None:
            stats = self._stats[source] = SizeStatistics(self.stats_config)
        return stats

    def detections(self, header: FrameHeader, pixels: np.ndarray, t_recv_ns: int) -> Detections:
        """First phase: detect and measure; returns the ``det`` message, ready to publish.

        Published before :meth:`summarise` runs, so the particle table reaches subscribers
        without waiting for statistics and alert rules.
        """
        turn = True if self.rotate45_on_request and header.meta.get("rotate45") is True else None
        a = self.analyse(pixels, header.pixel_size_nm, header.source, rotate45=turn,
                         modality=header.modality)
        if self.cluster_config.enabled:
            t0 = time.perf_counter()
            km = self._clusters.get(header.source)
            if km is None:
                km = self._clusters[header.source] = OnlineKMeans(self.cluster_config)
            a.table["cluster"] = km.update(a.table, a.units)
            a.stage_ms["clusters"] = (time.perf_counter() - t0) * 1e3
        det = DetHeader(
            source=header.source,
            seq=header.seq,
            t_acq_ns=header.t_acq_ns,
            t_recv_ns=t_recv_ns,
            t_done_ns=time.time_ns(),
            stage_ms={k: round(v, 3) for k, v in a.stage_ms.items()},
            pixel_size_nm=header.pixel_size_nm,
            units=a.units,  # type: ignore[arg-type]
            n=len(a.table),
            engine=self.engine_name,
            model=a.model,
            shape=header.shape,
            modality=header.modality,
            stage=header.stage,
            meta=header.meta,
            working_scale=round(a.scale, 5),
        )
        return Detections(det, a.table, a.labels)

    def summarise(self, header: FrameHeader, det: Detections) -> Summary:
        """Second phase: update the source's statistics and evaluate the alert rules."""
        stage_ms: dict[str, float] = {}
        units = det.header.units
        t0 = time.perf_counter()
        px_um = header.pixel_size_nm / 1000.0 if header.pixel_size_nm else None
        area_um2 = header.shape[0] * header.shape[1] * px_um**2 if px_um else None
        stats = self.statistics(header.source)
        stats.update(det.table, t_ns=header.t_acq_ns, frame_area_um2=area_um2)
        snap = stats.snapshot()
        stage_ms["stats"] = (time.perf_counter() - t0) * 1e3

        t0 = time.perf_counter()
        stage_xy = (header.stage.x_um, header.stage.y_um) if header.stage else None
        fired = self.alert_engine.evaluate(
            source=header.source,
            seq=header.seq,
            t_ns=header.t_acq_ns,
            stage=stage_xy,
            table=det.table,
            stats=snap,
            units=units,
            pixel_size_nm=header.pixel_size_nm,
        )
        stage_ms["alerts"] = (time.perf_counter() - t0) * 1e3
        alerts = [alert_message(al, header, units) for al in fired]
        stats_header = StatsHeader(
            source=header.source,
            seq=header.seq,
            t_ns=time.time_ns(),
            units=snap.get("units", units),
            window=snap.get("window", {}),
            cumulative=snap.get("cumulative", {}),
            drift=snap.get("drift", {}) or {},
            clusters=(self._clusters[header.source].summary()
                      if header.source in self._clusters else None),
        )
        return Summary(stats_header, alerts, stage_ms)

    def classify(self, header: FrameHeader, pixels: np.ndarray) -> ClassResult | None:
        """Classify the frame if it is its source's turn (every ``classify_every``-th frame);
        returns the ``class`` message and the classification alerts, or None."""
        if self.classifier is None:
            return None
        n = self._class_counts.get(header.source, 0)
        self._class_counts[header.source] = n + 1
        if n % self.classify_every:
            return None
        c = self.classifier.classify(pixels)
        ch = ClassHeader(
            source=header.source,
            seq=header.seq,
            t_acq_ns=header.t_acq_ns,
            labels=c.labels,
            probabilities=c.probabilities,
            novelty=None if c.novelty is None else round(c.novelty, 5),
            engine=f"{self.engine_name} {self.classifier.name}",
            heatmap_shape=None if c.cam is None else (int(c.cam.shape[0]), int(c.cam.shape[1])),
        )
        stage_xy = (header.stage.x_um, header.stage.y_um) if header.stage else None
        fired = self.alert_engine.evaluate_class(
            source=header.source, seq=header.seq, t_ns=header.t_acq_ns, stage=stage_xy,
            labels=list(c.all), probabilities=list(c.all.values()), novelty=c.novelty,
            heatmap=c.cam,
        )
        units = "nm" if header.pixel_size_nm else "px"
        return ClassResult(ch, c.cam, c, [alert_message(al, header, units) for al in fired])

    def close(self) -> None:
        """Release the engines (detector, classifier, lens)."""
        self.detector.engine.close()
        for det, _ in self.modality_detectors.values():
            det.engine.close()
        if self.classifier is not None:
            self.classifier.engine.close()
            if self.classifier.lens is not None:
                self.classifier.lens.close()

    @property
    def suppressed_alerts(self) -> dict[str, int]:
        """Rule name → firings rate-limited or de-duplicated so far."""
        return dict(self.alert_engine.suppressed)
