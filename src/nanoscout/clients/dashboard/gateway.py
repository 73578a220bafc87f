"""Dashboard gateway: subscribe to the daemon and keep only the newest of everything.

:class:`DashboardState` folds decoded messages into *items*, one per thing the page draws,
each replaced whole by a newer one (latest-wins) and stamped with a rising version:

=================  =========  ==========================================================
key                event      payload
=================  =========  ==========================================================
``sources``        sources    source names in the order first seen (those kept)
``frame:<src>``    frame      newest ``preview`` as PNG + the particles of the ``det``
                              with the same seq (ellipse/bbox in preview px; ``track_id``
                              and each track's trail over the recent frames, drift-corrected
                              onto this frame)
``det:<src>``      det        newest ``det`` summary: seq, n, latency, frames, seq gaps
``stats:<src>``    stats      newest ``stats`` header + a bounded D50 / count time series
``class:<src>``    class      newest ``class`` header + its CAM heatmap as RGBA PNG
``health``         health     newest ``health`` header
=================  =========  ==========================================================

A particle's history (its ECD, position and shape over the recent frames) is asked on demand
(:meth:`DashboardState.track_history`, the page's hover box), not pushed. Track ids, fields of
view and drift are a daemon run's (``daemon_run``, protocol 1.11): when a source's results
name another run (the daemon restarted), the frames kept of the earlier run are forgotten, so
the new run's track 3 is never drawn or listed with the old run's track 3, and ``frame:<src>``
becomes a frame without a picture (``png`` None, a ``note`` the page shows in its placeholder)
until the new run's first preview: the earlier run's picture is not shown as the new run's.
Frame numbers are an adapter session's: a ``det`` whose ``seq`` is not above the source's last
one (the adapter restarted under the same daemon run) forgets the kept frames too, so a track's
history and trails never mix two sessions' frames of the same numbers.

Alerts are the exception: a bounded list (newest ``max_alerts``), each with an id, so a client
gets every alert it has not seen yet rather than only the newest. Payloads (PNG encoding,
JSON) are built lazily once per item version, however many browsers watch. An item whose
payload cannot be built (a message the daemon should not have sent) has no payload
(:meth:`Item.data` returns None): it is logged and counted (``payload_errors`` in the status),
and every other item is still shown.

At most ``max_sources`` sources are kept (default 64; a dashboard watches a few microscopes):
beyond that the least recently seen one is forgotten with all its items, and counted
(``sources_evicted`` in the status).

:class:`Gateway` runs the SUB socket in a thread and feeds the state; a failure of that thread
is kept and raised by :meth:`Gateway.check` in the owner's thread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoscout.clients.dashboard.images import heatmap_rgba, heatmap_thumbnail, png_b64, thumbnail
from nanoscout.clients.subscriber import LATE_RANGES, Subscriber, track_gap
from nanoscout.wire.errors import NanoscoutError, Reason
from nanoscout.wire.particles import NO_CLUSTER, NUMERIC_FIELDS, PARTICLE_DTYPE, SHAPE_CLASSES
from nanoscout.wire.protocol import (
    AlertHeader,
    ClassHeader,
    DetHeader,
    FrameRef,
    HealthHeader,
    Message,
    PreviewHeader,
    StatsHeader,
)
from nanoscout.wire.sequence import SequenceTracker
from nanoscout.wire.transport import ClientKeys

__all__ = ["DEFAULT_MAX_SOURCES", "TOPICS", "DashboardState", "Gateway", "Item"]

log = logging.getLogger("nanoscout.dashboard")

#: topic prefixes the gateway subscribes to
TOPICS: tuple[str, ...] = ("det.", "stats.", "class.", "alert.", "preview.", "health")

#: most particles drawn per frame (the rest are counted in ``truncated``)
MAX_DRAWN_PARTICLES = 5000
#: particle rows listed with an alert
MAX_ALERT_ROWS = 10
#: positions per particle trail drawn on the frame (the newest frames of its track)
TRAIL_FRAMES = 12
#: sources kept by default (the daemon's own ``input.max_sources`` default)
DEFAULT_MAX_SOURCES = 64
#: the items of one source, by key prefix (forgotten with the source)
_SOURCE_ITEMS = ("frame:", "det:", "stats:", "class:")

# one failed build is logged and counted once, however many threads asked for it
_FAIL_LOCK = threading.Lock()


@dataclass
class Item:
    """One latest-wins entry: the SSE event name, a version and a lazily built JSON payload.

    ``on_error(item, why)`` is called once when the payload cannot be built (the state counts
    it)."""

    key: str
    event: str
    version: int
    build: Callable[[], dict[str, Any]]
    on_error: Callable[[Item, str], None] | None = field(default=None, repr=False)
    _text: str | None = field(default=None, repr=False)
    #: why the payload could not be built, or None
    error: str | None = field(default=None, repr=False)

    def data(self) -> str | None:
        """The payload as JSON text (built on first use, then cached), or None when it cannot
        be built (``error`` says why; logged and reported once): one bad message never takes
        the snapshot or an event stream down with it."""
        if self._text is None and self.error is None:
            # two threads may both build it once; the result is the same
            try:
                self._text = json.dumps(_finite(self.build()), separators=(",", ":"),
                                        allow_nan=False)
            except Exception as exc:  # whatever a message held: this item only is lost
                why = f"{self.key} v{self.version}: {type(exc).__name__}: {exc}"[:500]
                with _FAIL_LOCK:
                    first, self.error = self.error is None, why
                if first:
                    log.warning("cannot show %s", why, exc_info=True)
                    if self.on_error is not None:
                        self.on_error(self, why)
        return self._text


@dataclass
class _Source:
    """What the state remembers of one source."""

    #: recent, by seq, of one adapter session: a seq not above the last forgets them
    dets: OrderedDict[int, Message] = field(default_factory=OrderedDict)
    previews: deque[Message] = field(default_factory=lambda: deque(maxlen=8))
    pending: Message | None = None  # newest preview still waiting for its det
    #: the daemon run the kept dets and previews are of (None: not named, before v1.11)
    daemon_run: int | None = None
    frames: int = 0
    #: frames without a det (gaps in det frame numbers: live, superseded frames among them)
    missed: int = 0
    last_seq: int | None = None
    #: messages lost on the way here (gaps in topic_seq); None until a topic_seq is seen
    lost: int | None = None
    gap_events: int = 0
    last_gap_seq: int | None = None
    det_times: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    series: deque[tuple[float, float | None, int | None]] = field(
        default_factory=lambda: deque(maxlen=600))
    alerts: int = 0

    def forget_frames(self) -> None:
        """Forget the kept frames (dets, previews, a preview waiting for its det): they are
        of an earlier daemon run or adapter session, whose numbers the next ones reuse."""
        self.dets.clear()
        self.previews.clear()
        self.pending = None


class DashboardState:
    """Latest-wins state of everything the dashboard shows (thread-safe).

    ``stale_s``: no message for longer than this (s) means the daemon is unreachable.
    ``query``: the daemon's query socket the AI-lens view asks (None: no lens view).
    ``max_sources``: sources kept; beyond, the least recently seen one is forgotten (its
    items too) and counted in ``sources_evicted``.
    ``clock``: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, *, endpoints: Sequence[str] = (), query: str | None = None,
                 max_alerts: int = 50, max_sources: int = DEFAULT_MAX_SOURCES,
                 stale_s: float = 3.0, recent_dets: int = 64, series_len: int = 600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (max_alerts < 1 or max_sources < 1 or stale_s <= 0 or recent_dets < 1
                or series_len < 2):
            raise ValueError(
                f"max_alerts ({max_alerts}), max_sources ({max_sources}) and recent_dets "
                f"({recent_dets}) must be >= 1, series_len ({series_len}) >= 2 and stale_s "
                f"({stale_s}) > 0")
        self.endpoints = list(endpoints)
        self.stale_s = stale_s
        self.clock = clock
        self.started = clock()
        self.last_seen = 0.0
        self.messages = 0
        self.rejected = 0
        self.last_rejection: str | None = None
        #: monotonic s of the last message decoded (ingested) and of the last refused (0: none)
        self.last_accepted = 0.0
        self.last_refused = 0.0
        #: items whose payload could not be built (each message's one is lost, nothing else)
        self.payload_errors = 0
        self.last_payload_error: str | None = None
        self.max_sources = max_sources
        self.sources_evicted = 0
        self._names: dict[str, None] = {}  # the kept sources, in the order first seen
        self._recent_dets = recent_dets
        self._series_len = series_len
        self._cond = threading.Condition()
        self._version = 0
        self._items: dict[str, Item] = {}
        self._alerts: deque[tuple[int, Item]] = deque(maxlen=max_alerts)
        self._alert_id = 0
        self._src: OrderedDict[str, _Source] = OrderedDict()  # least recently seen first
        # messages missed, per topic (a late one taken back)
        self._gaps = SequenceTracker(max_keys=4096, holes=LATE_RANGES)
        self._set("meta", "meta", lambda: {
            "shape_classes": list(SHAPE_CLASSES), "endpoints": self.endpoints,
            "stale_s": self.stale_s, "query": query, "no_cluster": NO_CLUSTER})

    # ------------------------------------------------------------------ input

    def ingest(self, msg: Message, now: float | None = None) -> None:
        """Fold one decoded message into the state (``now``: monotonic s of its arrival)."""
        with self._cond:
            self.last_seen = self.last_accepted = self.clock() if now is None else now
            self.messages += 1
            h = msg.header
            gap = track_gap(self._gaps, msg)
            if "." in msg.topic and (gap is not None or getattr(h, "topic_seq", None) is not None):
                s = self._source(msg.topic.split(".", 1)[1].split("#", 1)[0])
                if getattr(h, "topic_seq", None) is not None:
                    # messages the daemon sent that never came
                    s.lost = max((s.lost or 0) + (0 if gap is None else gap.missed), 0)
                if gap is not None and gap.missed > 0:  # -1: a late message, no gap
                    s.gap_events += 1
                    s.last_gap_seq = getattr(h, "seq", None)
            if isinstance(h, FrameRef):
                self._follow_run(h)
            if isinstance(h, DetHeader):
                self._det(msg, h, self.last_seen)
            elif isinstance(h, PreviewHeader):
                self._preview(msg, h)
            elif isinstance(h, StatsHeader):
                self._stats(h)
            elif isinstance(h, ClassHeader):
                self._class(msg, h)
            elif isinstance(h, AlertHeader):
                self._alert(msg, h)
            elif isinstance(h, HealthHeader):
                self._set("health", "health", lambda: h.model_dump(mode="json"))
            self._cond.notify_all()

    def reject(self, why: str, now: float | None = None, n: int = 1) -> None:
        """Count ``n`` messages that could not be decoded (they still prove the daemon is
        there); ``why``: the last one's reason."""
        with self._cond:
            self.last_seen = self.last_refused = self.clock() if now is None else now
            self.messages += n
            self.rejected += n
            self.last_rejection = why
            self._cond.notify_all()

    # ------------------------------------------------------------------ output

    @property
    def sources(self) -> list[str]:
        """The kept sources' names, in the order first seen."""
        with self._cond:
            return list(self._names)

    @property
    def version(self) -> int:
        """Rises by one with every item change."""
        return self._version

    def item(self, key: str) -> Item | None:
        """The current item under ``key`` (e.g. ``frame:sim``), or None."""
        with self._cond:
            return self._items.get(key)

    def updates(self, sent: dict[str, int], after_alert: int = 0
                ) -> tuple[list[Item], list[tuple[int, Item]]]:
        """Items whose version differs from ``sent[key]``, and the alerts with id >
        ``after_alert`` (oldest first; at most the bounded list)."""
        with self._cond:
            changed = [it for k, it in self._items.items() if sent.get(k) != it.version]
            alerts = [(i, it) for i, it in self._alerts if i > after_alert]
        return changed, alerts

    def wait(self, version: int, timeout: float) -> bool:
        """Block until the version differs from ``version`` or ``timeout`` s pass; True if it
        changed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._version != version, timeout)

    def connected(self, now: float | None = None) -> bool:
        """True when a message arrived in the last ``stale_s`` s."""
        now = self.clock() if now is None else now
        return self.last_seen > 0 and now - self.last_seen <= self.stale_s

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Connection status: ``connected``, ``unreachable`` (no message for > ``stale_s`` s,
        counted from start-up when none ever came), ``age_s`` of the last message (None before
        the first), message and rejection counts, ``refusing``: connected only by messages
        that are refused (one refused in the last ``stale_s`` s and none decoded: a daemon of
        another major protocol version, whose results are never shown), ``refused_age_s``: s
        since the last refused message (None before the first), ``source_age_s``: s since
        each source's newest ``det``."""
        now = self.clock() if now is None else now
        with self._cond:
            connected = self.connected(now)
            since = max(self.last_seen, self.started)
            refused_recently = self.last_refused > 0 and now - self.last_refused <= self.stale_s
            accepted_recently = (self.last_accepted > 0
                                 and now - self.last_accepted <= self.stale_s)
            return {
                "connected": connected,
                "unreachable": not connected and now - since > self.stale_s,
                "age_s": None if self.last_seen == 0 else round(now - self.last_seen, 2),
                "endpoints": self.endpoints,
                "messages": self.messages,
                "rejected": self.rejected,
                "last_rejection": self.last_rejection,
                "refusing": connected and refused_recently and not accepted_recently,
                "refused_age_s": (None if self.last_refused == 0
                                  else round(now - self.last_refused, 2)),
                "payload_errors": self.payload_errors,
                "last_payload_error": self.last_payload_error,
                "sources_evicted": self.sources_evicted,
                # s since each source's newest det: a source whose frames stopped while the
                # daemon (and other sources) go on is stale too
                "source_age_s": {name: round(now - s.det_times[-1], 1)
                                 for name, s in self._src.items() if s.det_times},
            }

    def track_history(self, source: str, track_id: int) -> dict[str, Any]:
        """The recent history of one tracked particle of ``source`` (the ``det`` messages kept
        here, newest ``recent_dets`` frames, all of the source's current daemon run and adapter
        session): per frame ``seq``, ``t_s`` (s before the newest frame, by acquisition time),
        ``ecd`` (``units``), ``x``/``y`` (frame px), ``shape_class`` and ``border``;
        ``daemon_run``: that run (its start, ns since the epoch; None where the daemon does not
        name it)."""
        with self._cond:
            s = self._src.get(source)
            dets = [] if s is None else list(s.dets.values())
            run = None if s is None else s.daemon_run
        out: dict[str, Any] = {"source": source, "track_id": int(track_id), "units": None,
                               "daemon_run": run,
                               "seq": [], "t_s": [], "ecd": [], "x": [], "y": [],
                               "shape_class": [], "border": []}
        if not dets:
            return out
        t_last = dets[-1].header.t_acq_ns  # type: ignore[attr-defined]
        for m in dets:
            h, t = m.header, m.array
            if t is None or t.dtype != PARTICLE_DTYPE:
                continue
            rows = t[t["track_id"] == track_id]
            if not len(rows):
                continue
            r = rows[0]
            out["units"] = h.units  # type: ignore[attr-defined]
            out["seq"].append(int(h.seq))  # type: ignore[attr-defined]
            out["t_s"].append(round((h.t_acq_ns - t_last) / 1e9, 3))  # type: ignore[attr-defined]
            out["ecd"].append(round(float(r["ecd_nm"]), 3))
            out["x"].append(round(float(r["x"]), 2))
            out["y"].append(round(float(r["y"]), 2))
            k = int(r["shape_class"])
            out["shape_class"].append(SHAPE_CLASSES[k] if k < len(SHAPE_CLASSES) else str(k))
            out["border"].append(bool(r["border"]))
        return out

    def missed(self, source: str) -> int:
        """Frames of ``source`` without a ``det`` here (gaps in det frame numbers; in live
        mode superseded frames among them). Messages lost on the way: ``lost`` of its det
        payload (gaps in ``topic_seq``)."""
        with self._cond:
            s = self._src.get(source)
            return 0 if s is None else s.missed

    # ------------------------------------------------------------------ internals

    def _set(self, key: str, event: str, build: Callable[[], dict[str, Any]]) -> None:
        self._version += 1
        self._items[key] = Item(key, event, self._version, build, self._payload_failed)

    def _payload_failed(self, item: Item, why: str) -> None:
        with self._cond:
            self.payload_errors += 1
            self.last_payload_error = why

    def _source(self, name: str) -> _Source:
        """The state of source ``name``, marked as just seen (O(1)); a new one beyond
        ``max_sources`` makes the least recently seen one forgotten."""
        s = self._src.get(name)
        if s is not None:
            self._src.move_to_end(name)
            return s
        while len(self._src) >= self.max_sources:
            old, _ = self._src.popitem(last=False)
            del self._names[old]
            for prefix in _SOURCE_ITEMS:
                self._items.pop(prefix + old, None)
            if not self.sources_evicted:
                log.warning("more than %d sources: forgetting the least recently seen (%s)",
                            self.max_sources, old)
            self.sources_evicted += 1
        s = self._src[name] = _Source(series=deque(maxlen=self._series_len))
        self._names[name] = None
        # the list is copied when a client asks (at most max_sources names), not per source
        self._set("sources", "sources", lambda: {"sources": self.sources})
        return s

    def _follow_run(self, h: FrameRef) -> None:
        """A result of another daemon run than the source's kept frames: a restarted daemon
        numbers its tracks and fields from 1 again, so the earlier run's frames (track
        history, trails, previews waiting for their det) are forgotten, and the frame shown
        (the earlier run's preview) is replaced by none until this run's first preview. A
        result that names no run (a daemon before v1.11) is taken for the kept frames' run, as
        before."""
        s = self._source(h.source)
        if h.daemon_run is not None and h.daemon_run != s.daemon_run:
            s.daemon_run = h.daemon_run
            s.forget_frames()
            key = f"frame:{h.source}"
            if key in self._items:
                # the page draws the last frame item it got until another comes: the earlier
                # run's picture (and particles) would pass for this run's until its preview
                source, run = h.source, h.daemon_run
                self._set(key, "frame", lambda: _no_frame_payload(source, run))

    def _det(self, msg: Message, h: DetHeader, now: float) -> None:
        s = self._source(h.source)
        if s.last_seq is not None and h.seq > s.last_seq + 1:
            s.missed += h.seq - s.last_seq - 1
        elif s.last_seq is not None and h.seq <= s.last_seq:
            # the adapter restarted under this daemon run (its frames numbered from 0 again):
            # the kept frames are its earlier session's, whose numbers the new one reuses, so
            # they are forgotten, as those of an earlier daemon run are (a track's history
            # and trails of one session, its times from that session's newest frame)
            s.forget_frames()
        s.last_seq = h.seq
        s.frames += 1
        s.det_times.append(now)
        s.dets[h.seq] = msg
        while len(s.dets) > self._recent_dets:
            s.dets.popitem(last=False)
        times = list(s.det_times)
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        summary = {
            "source": h.source, "seq": h.seq, "n": h.n, "units": h.units, "engine": h.engine,
            "model": h.model, "latency_ms": h.latency_ms, "stage_ms": h.stage_ms,
            "t_acq_ns": h.t_acq_ns, "shape": h.shape, "pixel_size_nm": h.pixel_size_nm,
            "working_scale": h.working_scale, "base_network_only": h.base_network_only,
            "size_hint": h.size_hint, "noise": h.noise, "smoothing_px": h.smoothing_px,
            "frames": s.frames, "missed": s.missed,
            "lost": s.lost,
            "gap_events": s.gap_events, "last_gap_seq": s.last_gap_seq, "fps": fps,
            "stage": None if h.stage is None else h.stage.model_dump()}
        self._set(f"det:{h.source}", "det", lambda: summary)
        if s.pending is not None and s.pending.header.seq == h.seq:  # type: ignore[attr-defined]
            self._set_frame(h.source, s.pending, msg)
            s.pending = None

    def _preview(self, msg: Message, h: PreviewHeader) -> None:
        s = self._source(h.source)
        s.previews.append(msg)
        det = s.dets.get(h.seq)
        s.pending = msg if det is None else None
        self._set_frame(h.source, msg, det)

    def _set_frame(self, source: str, preview: Message, det: Message | None) -> None:
        recent: list[Message] = []
        if det is not None:  # the frames before it, for the particles' trails
            dets = self._src[source].dets
            recent = [m for q, m in dets.items() if q <= det.header.seq][-TRAIL_FRAMES:]  # type: ignore[attr-defined]
        self._set(f"frame:{source}", "frame", lambda: _frame_payload(preview, det, recent))

    def _stats(self, h: StatsHeader) -> None:
        s = self._source(h.source)
        det = s.dets.get(h.seq)
        d50 = (h.window.get("ecd") or {}).get("d50")
        s.series.append((h.t_ns / 1e9, d50, None if det is None else det.header.n))  # type: ignore[attr-defined]
        series = list(s.series)
        self._set(f"stats:{h.source}", "stats", lambda: _stats_payload(h, series))

    def _class(self, msg: Message, h: ClassHeader) -> None:
        self._source(h.source)
        heat = msg.array
        self._set(f"class:{h.source}", "class", lambda: _class_payload(h, heat))

    def _alert(self, msg: Message, h: AlertHeader) -> None:
        s = self._source(h.source)
        s.alerts += 1
        preview = next((p for p in reversed(s.previews) if p.header.seq == h.seq),  # type: ignore[attr-defined]
                       s.previews[-1] if s.previews else None)
        table, heat = msg.array, getattr(msg, "heatmap", None)  # heatmap: protocol v1.2
        if table is not None and table.dtype == np.uint8 and table.ndim == 2:
            table, heat = None, table  # a heatmap in place of the rows
        self._alert_id += 1
        aid = self._alert_id
        self._version += 1
        self._alerts.append((aid, Item(f"alert:{aid}", "alert", self._version,
                                       lambda: _alert_payload(aid, h, table, heat, preview),
                                       self._payload_failed)))


# ---------------------------------------------------------------------------------------------
# payloads (plain dicts, built outside the lock on first use)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _col(values: np.ndarray, decimals: int) -> list[float | None]:
    """A numeric column as a JSON list, rounded, non-finite values as None."""
    v = np.round(np.asarray(values, dtype=np.float64), decimals)
    return [x if math.isfinite(x) else None for x in v.tolist()]


def particles_payload(h: DetHeader, table: np.ndarray, scale: float) -> dict[str, Any]:
    """The particles of one frame for drawing on its preview: centre ``x``/``y``, ellipse
    semi-axes ``a``/``b`` and ``bbox`` in preview px (frame px × ``scale``; lengths in nm
    converted with ``pixel_size_nm`` first), ``angle`` in degrees counter-clockwise as
    displayed, and the measurements (``units``) for the hover box."""
    total = len(table)
    t = table[:MAX_DRAWN_PARTICLES]
    per_len = scale
    if h.units == "nm" and h.pixel_size_nm:
        per_len = scale / h.pixel_size_nm  # preview px per nm
    return {
        "seq": h.seq, "n": total, "truncated": total - len(t), "units": h.units,
        "engine": h.engine, "latency_ms": h.latency_ms,
        "id": t["id"].tolist(),
        # a pixel's centre lies half a pixel inside its edges: centroid (x + 0.5) · scale
        "x": _col((t["x"] + 0.5) * scale, 2), "y": _col((t["y"] + 0.5) * scale, 2),
        "a": _col(t["major_nm"] * 0.5 * per_len, 2), "b": _col(t["minor_nm"] * 0.5 * per_len, 2),
        "angle": _col(t["orientation_deg"], 1),
        "bbox": _col(t["bbox"].reshape(-1) * scale, 1),
        "ecd": _col(t["ecd_nm"], 2), "area": _col(t["area_nm2"], 1),
        "feret_max": _col(t["feret_max_nm"], 2), "feret_min": _col(t["feret_min_nm"], 2),
        "major": _col(t["major_nm"], 2), "minor": _col(t["minor_nm"], 2),
        "aspect_ratio": _col(t["aspect_ratio"], 3), "roundness": _col(t["roundness"], 3),
        "circularity": _col(t["circularity"], 3), "solidity": _col(t["solidity"], 3),
        "score": _col(t["score"], 3), "shape_class": t["shape_class"].tolist(),
        "border": t["border"].tolist(),
        # v1.2: morphology cluster id (NO_CLUSTER = 255: not assigned yet)
        "cluster": t["cluster"].tolist() if "cluster" in (t.dtype.names or ()) else
        [NO_CLUSTER] * len(t),
        # v1.4: the particle's identity across frames (0: not tracked) and the frame's drift
        "track_id": t["track_id"].tolist(),
        "drift": None if h.drift is None else h.drift.model_dump(mode="json"),
        "tracking": None if h.tracking is None else {
            "active": h.tracking.active, "total": h.tracking.total,
            "merges": sum(1 for e in h.tracking.events if e.kind == "merge")},
    }


def trails_payload(det: Message, recent: Sequence[Message], scale: float
                   ) -> list[list[float]]:
    """Per drawn particle of ``det``: its track's positions over ``recent`` (oldest first,
    this frame last) as a flat list x0, y0, x1, y1, ... in preview px of this frame: past
    positions moved by the drift since (the path on the specimen, as it lies in this frame).
    Frames of another field of view, and untracked particles, give no trail."""
    h, table = det.header, det.array
    assert isinstance(h, DetHeader) and table is not None
    t = table[:MAX_DRAWN_PARTICLES]
    if h.drift is None or not len(t):
        return [[] for _ in range(len(t))]
    now = np.array([h.drift.x_px, h.drift.y_px])
    ids, xs, ys, order = [], [], [], []
    for k, m in enumerate(recent):
        mh = m.header
        if not isinstance(mh, DetHeader) or mh.drift is None or m.array is None:
            continue
        if mh.drift.field != h.drift.field or mh.seq > h.seq:
            continue
        a = m.array
        shift = now - np.array([mh.drift.x_px, mh.drift.y_px])
        ids.append(a["track_id"].astype(np.int64))
        xs.append((a["x"] + shift[0] + 0.5) * scale)
        ys.append((a["y"] + shift[1] + 0.5) * scale)
        order.append(np.full(len(a), k))
    if not ids:
        return [[] for _ in range(len(t))]
    tid, x, y, o = (np.concatenate(v) for v in (ids, xs, ys, order))
    srt = np.lexsort((o, tid))
    tid, x, y = tid[srt], x[srt], y[srt]
    lo = np.searchsorted(tid, t["track_id"].astype(np.int64), side="left")
    hi = np.searchsorted(tid, t["track_id"].astype(np.int64), side="right")
    out: list[list[float]] = []
    for i in range(len(t)):
        if t["track_id"][i] == 0 or hi[i] - lo[i] < 2:
            out.append([])
            continue
        pts = np.stack([x[lo[i]:hi[i]], y[lo[i]:hi[i]]], 1).reshape(-1)
        out.append([round(float(v), 1) for v in pts])
    return out


def _frame_payload(preview: Message, det: Message | None, recent: Sequence[Message] = ()
                   ) -> dict[str, Any]:
    h = preview.header
    assert isinstance(h, PreviewHeader) and preview.array is not None
    out: dict[str, Any] = {
        "source": h.source, "seq": h.seq, "t_acq_ns": h.t_acq_ns, "shape": list(h.shape),
        "size": list(h.size), "scale": h.scale, "pixel_size_nm": h.pixel_size_nm,
        "png": png_b64(preview.array), "det": None}
    if det is not None and det.array is not None:
        assert isinstance(det.header, DetHeader)
        out["det"] = particles_payload(det.header, det.array, h.scale)
        out["det"]["trails"] = trails_payload(det, recent, h.scale)
    return out


def _no_frame_payload(source: str, daemon_run: int) -> dict[str, Any]:
    """The ``frame`` item of a source whose daemon run changed before the new run's first
    preview: no picture (``png`` None; the page shows its placeholder with ``note``)."""
    return {"source": source, "daemon_run": daemon_run, "png": None, "det": None,
            "note": "the daemon restarted: waiting for its first preview"}


def _stats_payload(h: StatsHeader, series: list[tuple[float, float | None, int | None]]
                   ) -> dict[str, Any]:
    out = h.model_dump(mode="json")
    t_last = series[-1][0] if series else 0.0
    out["series"] = {"t": [round(t - t_last, 3) for t, _, _ in series],
                     "d50": [d for _, d, _ in series], "count": [c for _, _, c in series]}
    return out


def _class_payload(h: ClassHeader, heat: np.ndarray | None) -> dict[str, Any]:
    out = h.model_dump(mode="json")
    out["heatmap_png"] = None
    if heat is not None and heat.ndim == 2 and heat.size:
        out["heatmap_png"] = png_b64(heatmap_rgba(heat))
    return out


def _alert_value_unit(h: AlertHeader, rows: np.ndarray | None) -> str:
    """The unit of an alert's ``value`` and ``threshold`` as the page appends it (" nm",
    " px²", "°", " %", " nm/s", or "" for counts, ratios and probabilities). A particle rule's
    value is its first condition's field of the particle it describes (the first row), so the
    field is the one of that row holding the value; a rule of shape alone counts particles."""
    if h.kind in ("d50_drift", "count_drop"):
        return " %"
    if h.kind == "growth_rate":
        return f" {h.units}/s"
    if h.kind != "particle" or rows is None or not len(rows):
        return ""
    first = rows[0]
    for name in NUMERIC_FIELDS:
        if float(first[name]) == h.value:
            if name.endswith("_nm2"):
                return f" {h.units}²"
            if name.endswith("_nm"):
                return f" {h.units}"
            return "°" if name.endswith("_deg") else ""
    return ""


def _alert_payload(aid: int, h: AlertHeader, array: np.ndarray | None,
                   heat: np.ndarray | None, preview: Message | None) -> dict[str, Any]:
    out = h.model_dump(mode="json")
    out["id"] = aid
    rows = array if array is not None and array.dtype == PARTICLE_DTYPE else None
    out["value_unit"] = _alert_value_unit(h, rows)
    out["particles"] = []
    out["thumb_png"] = None
    out["thumb_note"] = ""
    if rows is not None:
        out["particles"] = [
            {"id": int(r["id"]), "x": float(r["x"]), "y": float(r["y"]),
             "ecd": float(r["ecd_nm"]), "aspect_ratio": float(r["aspect_ratio"]),
             "shape_class": SHAPE_CLASSES[int(r["shape_class"])]
             if int(r["shape_class"]) < len(SHAPE_CLASSES) else str(int(r["shape_class"]))}
            for r in rows[:MAX_ALERT_ROWS]]
    pv = None if preview is None else preview.array
    if heat is not None and heat.ndim == 2 and heat.size:
        # an explaining heatmap (AlertHeader.heatmap_shape) covers the whole frame
        out["thumb_png"] = png_b64(heatmap_thumbnail(heat, pv))
        out["thumb_note"] = "heatmap" + ("" if pv is None else f" over preview #{preview.header.seq}")  # type: ignore[union-attr]
    elif preview is not None:
        ph = preview.header
        assert isinstance(ph, PreviewHeader) and preview.array is not None
        boxes = None
        if rows is not None and len(rows):
            boxes = rows["bbox"].astype(np.float64) * ph.scale
        out["thumb_png"] = png_b64(thumbnail(preview.array, boxes))
        out["thumb_note"] = (f"frame #{ph.seq}" if ph.seq == h.seq
                             else f"preview #{ph.seq} (frame #{h.seq} had none)")
    return out


# ---------------------------------------------------------------------------------------------
# the receiving thread


class Gateway:
    """A SUB socket on the daemon's result endpoint(s) feeding a :class:`DashboardState`.

    Several endpoints may be given (e.g. the daemon and a separate classifier); ZeroMQ
    reconnects by itself when one restarts. Call :meth:`start`, then :meth:`check`
    periodically (it raises the receiving thread's failure), and :meth:`close`.
    """

    def __init__(self, endpoints: Sequence[str], *, state: DashboardState | None = None,
                 curve: ClientKeys | None = None, hwm: int = 10_000) -> None:
        if not endpoints:
            raise NanoscoutError("the dashboard needs at least one result endpoint")
        self.endpoints = list(endpoints)
        self.state = state or DashboardState(endpoints=self.endpoints)
        self._sub = Subscriber(self.endpoints, TOPICS, hwm=hwm, curve=curve)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dashboard-gateway", daemon=True)

    def start(self) -> Gateway:
        """Start receiving; returns self."""
        self._thread.start()
        return self

    def _run(self) -> None:
        state, sub = self.state, self._sub
        rejected = 0
        try:
            while not self._stop.is_set():
                msg = sub.recv(0.1)
                if sub.rejected != rejected:  # messages came but could not be decoded
                    state.reject(sub.last_rejection or "malformed message",
                                 n=sub.rejected - rejected)
                    rejected = sub.rejected
                if msg is not None:
                    state.ingest(msg)
        except BaseException as exc:  # kept for check(); the owner decides
            self._error = exc

    def check(self) -> None:
        """Raise NanoscoutError if the receiving thread failed."""
        if self._error is not None:
            raise NanoscoutError(f"dashboard gateway stopped receiving: {self._error!r}",
                                 reason=Reason.ERROR) from self._error

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # stuck in a call; the daemon thread dies with the process
        self._sub.close()
