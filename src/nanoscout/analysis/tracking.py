"""Particle identities across the frames of one source: drift-corrected tracking, coalescence
and fragmentation, and statistics that count each physical particle once.

:class:`SourceTracker` is fed each analysed frame of a source (:meth:`SourceTracker.update`)
after measurement, and writes every particle's ``track_id`` into the table. Per frame:

1. **fields of view**: a stage move larger than ``stage_jump_fraction`` of the field, another
   frame shape or pixel size, or a registration that finds fewer than ``new_field_matched`` of
   the previous frame's particles again starts a new field (its tracks start afresh; a field
   is what the statistics count per stage position); so does a frame acquired before the
   field's first one or the previous one (a clock set back: rates are fitted against the
   field's time, and a 3 s step back bent them by 30-45 %), and one whose acquisition time ran
   more than 60 s (:data:`CLOCK_STEP_S`) ahead of its arrival time since the source's
   previous frame, and more than 10 of the source's previous frame intervals
   (:data:`CLOCK_STEP_INTERVALS`; a clock stepped forward, or one frame stamped years ahead: a
   day's step folded into the fits made every growth rate ~0). A pause of hours advances both
   clocks alike and keeps the field, and so does a series of one frame in minutes streamed
   from an archive in seconds (each frame runs ahead by its own interval); an offline frame
   arrives when it was acquired, so there only a clock set back is seen;
2. **drift**: the frame is registered against the previous one
   (:class:`~nanoscout.analysis.drift.DriftEstimator`), and the shifts add up to the field's
   drift; particle positions minus the drift are positions on the specimen;
3. **linking**: trackpy's rule (Crocker & Grier: a KD-tree neighbour search and the least
   sum of squared steps in each ambiguous subnetwork) links the specimen positions to the
   previous frames' within ``max_step_px``; a particle missed on up to ``max_gap_frames``
   frames keeps its identity (gap closing). :class:`~nanoscout.analysis.linking.FrameLinker`
   evaluates it vectorised, with trackpy's links (tested against trackpy itself), in ~1 ms
   for 700 particles where trackpy's online ``Linker`` took ~3.7 ms (10,000: ~10 vs ~260 ms).
   laptrack was not used: its merge/split step took ~0.9 s per frame at 800 particles;
4. **coalescence and fragmentation** are read off the links: a track lost on this frame next
   to a particle whose volume (ECD³) grew by the lost one's (within
   ``merge_volume_tolerance``) merged into it (``merge``: parents [continuing, lost], child
   the continuing track, which keeps its id). The merge is published only once the lost
   track has stayed away for the gap allowance: two touching particles that the detector
   sees as one blob on a frame or two keep both identities (the linker's memory takes the
   lost one back), which is what keeps identities stable on a real video. A new track next to
   a particle that lost its volume split from it (``split``: parent, children [parent,
   new]). Appearances and disappearances are tracks that start or end otherwise.

Statistics that count each particle once (:meth:`SourceTracker.unique`): one value per track,
the median ECD of its last ``history`` observations off the frame edge, for tracks seen on at
least ``min_track_frames`` frames, or on every frame of a field imaged fewer times, and on at
least ``min_presence`` of the frames of their life (so a single frame counts every particle,
and a flickering false or faint detection on a long series counts nothing); per field and over
all fields, with 95 % intervals over tracks. A static field imaged 50 times gives the same N
and intervals as one frame of it. Growth rates dECD/dt come from a least-squares line through
each track's sized observations (with its standard error).

Lengths are kept in px (positions, ECD) with the field's pixel size beside them, so an
uncalibrated frame resets nothing: statistics in nm use the fields that have a pixel size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.spatial import cKDTree

from nanoscout.analysis.drift import DriftEstimator
from nanoscout.analysis.insitu import FieldDynamics, mean_ci, median_ci
from nanoscout.analysis.linking import FrameLinker
from nanoscout.wire.headers import Stage, Units

__all__ = ["CLOCK_STEP_INTERVALS", "CLOCK_STEP_S", "SourceTracker", "TrackUpdate", "TrackingConfig"]

log = logging.getLogger(__name__)

#: folded (finished-field) track values kept per unit and source; beyond it new ones replace
#: random old ones (reservoir sampling: the distribution stays unbiased, the count exact)
_MAX_FOLDED = 2_000_000
#: fields listed in ``unique.by_field``
_MAX_FIELDS_LISTED = 64
#: merge / split events listed per frame
_MAX_EVENTS = 256
#: a frame whose acquisition time ran this much further ahead than its arrival time since the
#: source's previous frame starts a new field (s): the source's clock stepped forward (a 200 s
#: step read 0.004 nm/s for 0.1), if the step is also more than :data:`CLOCK_STEP_INTERVALS`
#: times the source's previous frame interval. Frames held up in transport and delivered in a
#: burst, or an archived series streamed faster than it was acquired, run ahead by about
#: their own frame interval each, which is their cadence, not a step
CLOCK_STEP_S = 60.0
#: how many of the source's previous acquisition intervals a forward step must exceed too
CLOCK_STEP_INTERVALS = 10.0


class TrackingConfig(BaseModel):
    """Typed configuration of drift correction and tracking (``[tracking]``; frozen)."""

    # inf, nan: valid TOML; strict: a TOML value of another type is named, not converted
    # ("50" for an int, "no" or 0 for a bool: nanoscout.daemon.config.SECTION_CONFIG)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    enabled: bool = True
    #: largest motion of a particle between two frames after drift correction, px; None =
    #: 0.75 x the frame's median particle diameter (at least 3 px)
    max_step_px: float | None = Field(None, gt=0)
    #: frames a particle may be missed and keep its identity (gap closing)
    max_gap_frames: int = Field(2, ge=0, le=20)
    #: a new track that starts where a track of the field ended at most this many frames
    #: ago (within a third of its diameter, ECD within 25 %) takes that identity back: a
    #: particle missed for longer than the gap allowance is still one particle (0 = never)
    reidentify_frames: int = Field(50, ge=0)
    #: a track counts in the unique statistics once seen on this many frames (or on every
    #: frame of a field imaged fewer times) ...
    min_track_frames: int = Field(3, ge=1)
    #: ... and on at least this fraction of the frames of its life (first to last seen): a
    #: faint particle that the detector finds on one frame in five is not a particle to count
    min_presence: float = Field(0.7, ge=0, le=1)
    #: register frames against each other (drift correction)
    registration: bool = True
    #: fewer of the previous frame's particles found again than this fraction starts a new
    #: field (when both frames have at least 10 particles)
    new_field_matched: float = Field(0.2, ge=0, le=1)
    #: a stage move longer than this fraction of the field's width starts a new field
    stage_jump_fraction: float = Field(0.25, gt=0)
    #: relative volume mismatch allowed when reading a coalescence or fragmentation
    merge_volume_tolerance: float = Field(0.4, gt=0, lt=1)
    #: sized observations of a track kept for its size (the median of them)
    history: int = Field(32, ge=1, le=4096)
    #: sized observations before a track's growth rate counts
    growth_min_frames: int = Field(5, ge=3)
    #: frames of a field before its LSW fit is reported
    lsw_min_frames: int = Field(5, ge=3)


@dataclass
class TrackUpdate:
    """What :meth:`SourceTracker.update` found on one frame: ``drift`` and ``tracking`` (the
    ``det`` header's blocks, plain dicts), timings (ms), and the merge count."""

    drift: dict[str, Any]
    tracking: dict[str, Any]
    timings_ms: dict[str, float]
    merges: int = 0


@dataclass
class _Field:
    """One field of view of a source."""

    index: int
    shape: tuple[int, int]
    pixel_size_nm: float | None
    stage: Stage | None
    first_id: int
    n_frames: int = 0
    #: drift extent (px) for the imaged area
    xmin: float = 0.0
    xmax: float = 0.0
    ymin: float = 0.0
    ymax: float = 0.0
    dynamics: FieldDynamics = field(default_factory=FieldDynamics)
    #: the field's track values once folded: (px values, nm values or None)
    summary: dict[str, Any] | None = None

    @property
    def area_px2(self) -> float:
        """Imaged area of the field, px² (the frame widened by the drift)."""
        h, w = self.shape
        return (h + self.ymax - self.ymin) * (w + self.xmax - self.xmin)


class _Registry:
    """Per-track arrays of the current field, indexed by track id - ``base``."""

    def __init__(self, base: int, history: int) -> None:
        self.base = base
        self.h = history
        self.size = 0
        self._alloc(256)

    def _alloc(self, cap: int) -> None:
        def grow(old: np.ndarray | None, shape: tuple[int, ...], dtype: Any, fill: float
                 ) -> np.ndarray:
            new = np.full(shape, fill, dtype)
            if old is not None:
                new[: old.shape[0]] = old
            return new

        g = getattr
        self.cap = cap
        self.n_obs = grow(g(self, "n_obs", None), (cap,), np.int64, 0)
        self.n_sized = grow(g(self, "n_sized", None), (cap,), np.int64, 0)
        self.last_frame = grow(g(self, "last_frame", None), (cap,), np.int64, -1)
        self.first_frame = grow(g(self, "first_frame", None), (cap,), np.int64, -1)
        self.ended = grow(g(self, "ended", None), (cap,), np.bool_, False)
        self.ring = grow(g(self, "ring", None), (cap, self.h), np.float32, np.nan)
        self.sums = grow(g(self, "sums", None), (cap, 5), np.float64, 0.0)  # t, e, tt, te, ee
        self.last_xy = grow(g(self, "last_xy", None), (cap, 2), np.float64, np.nan)
        self.last_ecd = grow(g(self, "last_ecd", None), (cap,), np.float64, np.nan)
        self.last_border = grow(g(self, "last_border", None), (cap,), np.bool_, False)

    def ensure(self, max_id: int) -> None:
        need = max_id - self.base + 1
        if need > self.cap:
            self._alloc(max(need, 2 * self.cap))
        self.size = max(self.size, need)

    def observe(self, ids: np.ndarray, frame: int, t_s: float, xy: np.ndarray, ecd: np.ndarray,
                sized: np.ndarray) -> None:
        k = ids - self.base
        self.n_obs[k] += 1
        self.first_frame[k] = np.where(self.first_frame[k] < 0, frame, self.first_frame[k])
        self.last_frame[k] = frame
        self.last_xy[k] = xy
        self.last_ecd[k] = ecd
        self.last_border[k] = ~sized
        ks, e = k[sized], ecd[sized].astype(np.float64)
        self.ring[ks, self.n_sized[ks] % self.h] = e
        self.n_sized[ks] += 1
        self.sums[ks] += np.stack([np.full(e.size, t_s), e, np.full(e.size, t_s * t_s),
                                   t_s * e, e * e], axis=1)

    def values(self, k: np.ndarray) -> np.ndarray:
        """Median ECD (px) of the kept sized observations of tracks ``k`` (NaN: none)."""
        if k.size == 0:
            return np.empty(0)
        rows = self.ring[k]
        out = np.full(k.size, np.nan)
        ok = self.n_sized[k] > 0
        if ok.any():
            out[ok] = np.nanmedian(rows[ok], axis=1)
        return out

    def rates(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """dECD/dt (px/s) and its standard error of tracks ``k`` (NaN below 3 points)."""
        s = self.sums[k]
        n = self.n_sized[k].astype(np.float64)
        st, se_, stt, ste, see = s.T
        sxx = stt - st * st / np.maximum(n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (ste - st * se_ / np.maximum(n, 1)) / sxx
            syy = see - se_ * se_ / np.maximum(n, 1)
            resid = np.maximum(syy - slope * slope * sxx, 0.0)
            err = np.sqrt(resid / np.maximum(n - 2, 1) / sxx)
        bad = (n < 3) | ~(sxx > 0)
        slope[bad] = np.nan
        err[bad] = np.nan
        return slope, err


class SourceTracker:
    """Drift, tracks, events and the unique statistics of one source."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self._next_id = 1
        self._fields: list[_Field] = []
        self._folded: dict[Units, list[np.ndarray]] = {"px": [], "nm": []}
        self._folded_n: dict[Units, int] = {"px": 0, "nm": 0}
        self._rng = np.random.default_rng(0)
        self._drift_ref = np.zeros(2)
        self._want_reference = False
        self._frames = 0
        self._n_fields = 0
        self._last_stage: Stage | None = None
        #: the previous frame's (acquisition, arrival) times, ns (arrival None: not known)
        self._last_times: tuple[int, int | None] | None = None
        #: the acquisition interval before the previous frame, ns (None: not known yet)
        self._last_interval_ns: int | None = None
        #: calibrated area (µm²) and track count of the fields folded so far (density)
        self._folded_area_um2 = 0.0
        self._folded_count = 0
        self.total_tracks = 0
        self._start_field(None, None, None, reason="first frame")

    # ------------------------------------------------------------------ requests

    def set_drift_reference(self) -> None:
        """Make the next frame the zero of the published drift."""
        self._want_reference = True

    def reset_statistics(self) -> None:
        """Forget every count (unique statistics, fields, in-situ series); identities and the
        drift go on, and the current tracks count again from their next observation."""
        self._folded = {"px": [], "nm": []}
        self._folded_n = {"px": 0, "nm": 0}
        self._folded_area_um2 = 0.0
        self._folded_count = 0
        self._n_fields = 1
        f = self._field
        self._fields = [f]
        f.summary = None
        f.n_frames = 0
        f.dynamics = FieldDynamics(field_index=f.index)
        f.xmin = f.xmax = float(self._drift[0])
        f.ymin = f.ymax = float(self._drift[1])
        reg = self._reg
        reg.n_obs[:] = 0
        reg.n_sized[:] = 0
        reg.first_frame[:] = -1
        reg.ring[:] = np.nan
        reg.sums[:] = 0.0
        self.total_tracks = int(np.count_nonzero(~reg.ended[: reg.size]))
        self._frames = 0

    # ------------------------------------------------------------------ fields

    @property
    def _field(self) -> _Field:
        return self._fields[-1]

    def _start_field(self, shape: tuple[int, int] | None, pixel_size_nm: float | None,
                     stage: Stage | None, *, reason: str) -> None:
        if self._fields:
            self._fold(self._field)
        index = self._fields[-1].index + 1 if self._fields else 0
        self._n_fields += 1
        f = _Field(index, shape or (0, 0), pixel_size_nm, stage, self._next_id)
        f.dynamics.field_index = index
        self._fields.append(f)
        if len(self._fields) > _MAX_FIELDS_LISTED:
            del self._fields[0]
        self._reg = _Registry(self._next_id, self.config.history)
        self._linker = FrameLinker(memory=self.config.max_gap_frames)
        #: each linker track handle's id (0: none yet)
        self._nid = np.zeros(0, np.int64)
        self._drift_est = DriftEstimator()
        self._drift = np.zeros(2)
        self._drift_ref = np.zeros(2)
        self._prev_ids: np.ndarray | None = None
        #: lost track id -> the merge it looks like, published when the track expires
        self._pending: dict[int, dict[str, Any]] = {}
        #: track id -> the track it merged into (published)
        self._merged: dict[int, int] = {}
        self._new_field_reason: str | None = reason

    def _fold(self, f: _Field) -> None:
        """Move the field's qualifying tracks into the folded values; keep its summary."""
        reg = self._reg
        k = self._qualifying(f)
        v = reg.values(k)
        v = v[np.isfinite(v)]
        ci = median_ci(v)
        f.summary = {"count": int(v.size), "d50_px": float(np.median(v)) if v.size else None,
                     "ci_px": ci}
        if f.pixel_size_nm is not None:
            self._folded_area_um2 += f.area_px2 * (f.pixel_size_nm / 1000.0) ** 2
            self._folded_count += int(v.size)
        for units, scale in (("px", 1.0), ("nm", f.pixel_size_nm)):
            if scale is None or not v.size:
                continue
            vals = (v * scale).astype(np.float32)
            store = self._folded[units]  # type: ignore[index]
            have = self._folded_n[units]  # type: ignore[index]
            if have + vals.size <= _MAX_FOLDED:
                # one array, so that each frame's statistics concatenate two, not one per field
                self._folded[units] = [np.concatenate([*store, vals])]  # type: ignore[index]
            else:  # reservoir: each value kept with probability _MAX_FOLDED / n seen
                merged = np.concatenate(store) if store else np.empty(0, np.float32)
                room = _MAX_FOLDED - merged.size
                take, rest = vals[:max(room, 0)], vals[max(room, 0):]
                merged = np.concatenate([merged, take])
                pos = self._rng.integers(0, have + room + np.arange(1, rest.size + 1))
                hit = pos < _MAX_FOLDED
                merged[pos[hit]] = rest[hit]
                self._folded[units] = [merged]  # type: ignore[index]
            self._folded_n[units] += vals.size  # type: ignore[index]

    def _qualifying(self, f: _Field) -> np.ndarray:
        """Registry rows of the tracks that count (seen often enough, with a size)."""
        reg = self._reg
        need = min(self.config.min_track_frames, max(f.n_frames, 1))
        n = reg.size
        life = reg.last_frame[:n] - reg.first_frame[:n] + 1
        ok = (reg.n_obs[:n] >= need) & (reg.n_sized[:n] > 0) \
            & (reg.n_obs[:n] >= self.config.min_presence * life)
        return np.nonzero(ok)[0]

    def _check_field(self, frame_shape: tuple[int, int], pixel_size_nm: float | None,
                     stage: Stage | None, t_ns: int, t_recv_ns: int | None) -> None:
        f = self._field
        reason = None
        last, self._last_times = self._last_times, (int(t_ns), t_recv_ns)
        interval, self._last_interval_ns = self._last_interval_ns, (
            None if last is None else int(t_ns) - last[0])
        if f.n_frames == 0:
            f.shape, f.pixel_size_nm, f.stage = frame_shape, pixel_size_nm, stage
            return
        if frame_shape != f.shape:
            reason = f"frame shape {frame_shape} after {f.shape}"
        elif (pixel_size_nm is not None and f.pixel_size_nm is not None
              and abs(pixel_size_nm / f.pixel_size_nm - 1.0) > 0.02):
            reason = f"pixel size {pixel_size_nm:g} nm after {f.pixel_size_nm:g} nm"
        elif (stage is not None and self._last_stage is not None
              and pixel_size_nm is not None):
            moved = math.hypot(stage.x_um - self._last_stage.x_um,
                               stage.y_um - self._last_stage.y_um)
            width_um = max(frame_shape) * pixel_size_nm / 1000.0
            if moved > self.config.stage_jump_fraction * width_um:
                reason = f"stage moved {moved:.3g} µm"
        if reason is None and f.dynamics.t0_ns is not None and t_ns < f.dynamics.t0_ns:
            # rates are fitted against time since the field's first frame: a clock set back
            # (a restarted source) would fold two time axes into one fit
            reason = (f"acquisition time {t_ns} ns before the field's first frame "
                      f"({f.dynamics.t0_ns} ns)")
        if reason is None and last is not None and t_ns < last[0]:
            # one source's frames come in the order they were acquired: a clock set back by
            # seconds bent the growth fits (a 3 s step: 0.13-0.15 nm/s read for 0.10)
            reason = (f"acquisition time {t_ns} ns before the previous frame's ({last[0]} ns): "
                      "the source's clock was set back")
        if reason is None and last is not None and last[1] is not None and t_recv_ns is not None:
            # the fits would take the step for time that passed (a day: every rate ~0)
            # ... unless the source's cadence is that slow (a slow series streamed fast)
            ahead_s = ((t_ns - last[0]) - (t_recv_ns - last[1])) / 1e9
            cadence_s = None if interval is None or interval <= 0 else interval / 1e9
            if ahead_s > CLOCK_STEP_S and (cadence_s is None
                                           or ahead_s > CLOCK_STEP_INTERVALS * cadence_s):
                reason = (f"acquisition time {t_ns} ns ran {ahead_s:.6g} s ahead of its arrival "
                          "since the previous frame: the source's clock stepped forward")
        if reason is not None:
            self._start_field(frame_shape, pixel_size_nm, stage, reason=reason)
            self._field.shape = frame_shape
        elif f.pixel_size_nm is None and pixel_size_nm is not None:
            f.pixel_size_nm = pixel_size_nm

    # ------------------------------------------------------------------ one frame

    def update(self, table: np.ndarray, *, image: np.ndarray, t_ns: int, seq: int,
               pixel_size_nm: float | None, stage: Stage | None,
               t_recv_ns: int | None = None) -> TrackUpdate:
        """Track one frame's particles: writes ``table["track_id"]`` and returns the frame's
        drift and tracking blocks. ``image``: the frame (the detector's normalised one);
        ``table``: its particle table (lengths in nm when ``pixel_size_nm`` is given, else
        px); ``t_ns`` acquisition time, ``t_recv_ns`` its arrival at the daemon (ns; None:
        not known, no clock-step check); ``stage`` its stage position (µm) or None."""
        fin = np.isfinite(table["x"]) & np.isfinite(table["y"]) & np.isfinite(table["ecd_nm"])
        if not fin.all():  # a row without a position or size: no track (track_id 0)
            sub = table[fin]
            out = self.update(sub, image=image, t_ns=t_ns, seq=seq, pixel_size_nm=pixel_size_nm,
                              stage=stage, t_recv_ns=t_recv_ns)
            table["track_id"] = 0
            table["track_id"][fin] = sub["track_id"]
            return out
        cfg = self.config
        shape = (int(image.shape[0]), int(image.shape[1]))
        self._check_field(shape, pixel_size_nm, stage, t_ns, t_recv_ns)
        if stage is not None:
            self._last_stage = stage
        f = self._field
        px = 1.0 if pixel_size_nm is None else pixel_size_nm
        xy = np.stack([table["x"], table["y"]], axis=1).astype(np.float64)
        ecd = table["ecd_nm"].astype(np.float64) / px
        border = table["border"].astype(bool)
        diameter = float(np.median(ecd)) if ecd.size else None

        t0 = time.perf_counter()
        step = None
        if cfg.registration:
            step = self._drift_est.estimate(image, xy, diameter)
            if (f.n_frames > 0 and step.matched is not None and step.matched < cfg.new_field_matched
                    and len(xy) >= 10 and self._prev_ids is not None
                    and len(self._prev_ids) >= 10):
                why = f"registration lost ({100 * step.matched:.0f} % of particles found again)"
                self._start_field(shape, pixel_size_nm, stage, reason=why)
                f = self._field
                f.shape = shape
                step = self._drift_est.estimate(image, xy, diameter)
        if step is not None and step.method != "none":
            self._drift = self._drift + (step.dx, step.dy)
        if self._want_reference:
            self._drift_ref = self._drift.copy()
            self._want_reference = False
        d = self._drift
        f.xmin, f.xmax = min(f.xmin, d[0]), max(f.xmax, d[0])
        f.ymin, f.ymax = min(f.ymin, d[1]), max(f.ymax, d[1])
        drift_ms = (time.perf_counter() - t0) * 1e3

        t0 = time.perf_counter()
        spec = xy - d
        ids, started, back = self._link(spec, ecd, diameter, seq)
        table["track_id"] = ids
        t_s = 0.0 if f.dynamics.t0_ns is None else (t_ns - f.dynamics.t0_ns) / 1e9
        reg = self._reg
        reg.ensure(self._next_id - 1)
        here = set(ids.tolist())
        for lid in [k for k in self._pending if k in here]:
            del self._pending[lid]  # it came back: hidden, not merged
        events = back + self._events(ids, spec, ecd, border, started, seq)
        reg.observe(ids.astype(np.int64), f.n_frames, t_s, spec, ecd, ~border)
        ended, merged = self._expire(f.n_frames)
        for e in merged:
            self._merged[int(e["parents"][1])] = int(e["children"][0])
        events = merged + events
        for e in events:  # specimen -> this frame's coordinates
            e["x"], e["y"] = round(e["x"] + float(d[0]), 3), round(e["y"] + float(d[1]), 3)
        self._prev_ids = ids
        f.n_frames += 1
        self._frames += 1
        merges = sum(1 for e in events if e["kind"] == "merge")
        area_um2 = None
        if pixel_size_nm is not None:
            area_um2 = shape[0] * shape[1] * (pixel_size_nm / 1000.0) ** 2
        f.dynamics.add(t_ns=t_ns, ecd=ecd[~border], n_border=int(border.sum()), area_um2=area_um2,
                       merges=merges)
        track_ms = (time.perf_counter() - t0) * 1e3

        rel = d - self._drift_ref
        reason, self._new_field_reason = self._new_field_reason, None
        drift = {"field": f.index, "new_field": reason is not None, "reason": reason,
                 "dx_px": 0.0 if step is None else round(step.dx, 4),
                 "dy_px": 0.0 if step is None else round(step.dy, 4),
                 "x_px": round(float(rel[0]), 4), "y_px": round(float(rel[1]), 4),
                 "x_nm": None if pixel_size_nm is None else round(float(rel[0]) * px, 4),
                 "y_nm": None if pixel_size_nm is None else round(float(rel[1]) * px, 4),
                 "matched": None if step is None or step.matched is None
                 else round(step.matched, 4),
                 "method": "none" if step is None else step.method}
        active = int(np.count_nonzero(~reg.ended[: reg.size]))
        tracking = {"active": active, "started": started, "ended": ended,
                    "total": self.total_tracks, "events": events[:_MAX_EVENTS],
                    "events_truncated": max(0, len(events) - _MAX_EVENTS)}
        return TrackUpdate(drift, tracking, {"drift": drift_ms, "track": track_ms}, merges)

    def _link(self, spec: np.ndarray, ecd: np.ndarray, diameter: float | None, seq: int
              ) -> tuple[np.ndarray, int, list[dict[str, Any]]]:
        """Link this frame's specimen positions to the field's tracks; returns (track ids,
        tracks new on this frame, split events of merged tracks taken back)."""
        cfg = self.config
        reach = cfg.max_step_px or max(3.0, 0.75 * (diameter or 4.0))
        # an empty frame links nothing, but it is a frame: the tracks' gaps grow in the
        # linker's memory as in the registry, else a track given up there comes back here
        handles = self._linker.link(spec, float(reach))
        if len(spec) == 0:
            return np.zeros(0, np.uint32), 0, []
        if self._linker.tracks > self._nid.size:
            self._nid = np.concatenate(
                [self._nid, np.zeros(max(self._linker.tracks - self._nid.size, 256), np.int64)])
        ids = self._nid[handles].astype(np.uint32)
        fresh = [(int(i), int(handles[i])) for i in np.flatnonzero(ids == 0)]
        back = self._reidentify(fresh, spec, ecd, ids, seq) if cfg.reidentify_frames else []
        new = 0
        for i, h in fresh:
            if self._nid[h] == 0:
                self._nid[h] = self._next_id
                self._next_id += 1
                self.total_tracks += 1
                new += 1
            ids[i] = self._nid[h]
        return ids, new, back

    def _reidentify(self, fresh: list[tuple[int, int]], spec: np.ndarray, ecd: np.ndarray,
                    ids: np.ndarray, seq: int) -> list[dict[str, Any]]:
        """Give new tracks the identity of a track of the field that ended nearby not long
        ago (same place, same size); returns a split event for each one that had merged."""
        reg = self._reg
        n = reg.size
        if not fresh or n == 0:
            return []
        frame = self._field.n_frames
        gone = np.nonzero(reg.ended[:n] & (reg.last_frame[:n] >= frame
                                           - self.config.reidentify_frames))[0]
        if gone.size == 0:
            return []
        tree = cKDTree(reg.last_xy[gone])
        taken: set[int] = set()
        events: list[dict[str, Any]] = []
        for i, h in fresh:
            r = max(2.0, ecd[i] / 3.0)
            for j in sorted(tree.query_ball_point(spec[i], r),
                            key=lambda j: math.dist(spec[i], reg.last_xy[gone[j]])):
                k = int(gone[j])
                if k in taken or abs(reg.last_ecd[k] / max(ecd[i], 1e-9) - 1.0) > 0.25:
                    continue
                taken.add(k)
                reg.ended[k] = False
                nid = self._nid[h] = k + reg.base
                into = self._merged.pop(nid, None)
                if into is not None and into in set(ids.tolist()):
                    events.append({"kind": "split", "seq": int(seq), "parents": [into],
                                   "children": [into, nid], "x": float(spec[i, 0]),
                                   "y": float(spec[i, 1]), "ecd": float(ecd[i])})
                break
        return events

    def _events(self, ids: np.ndarray, spec: np.ndarray, ecd: np.ndarray, border: np.ndarray,
                started: int, seq: int) -> list[dict[str, Any]]:
        """Fragmentations on this frame, and the merges it suggests (kept pending until the
        lost track expires; see the module docstring). Particles cut by the frame edge take
        no part: their sizes change as they leave or enter the field."""
        reg = self._reg
        frame = self._field.n_frames
        prev_ids = self._prev_ids
        if prev_ids is None or frame == 0 or len(ids) == 0:
            return []
        tol = self.config.merge_volume_tolerance
        cur = set(ids.tolist())
        lost = np.array([i for i in prev_ids.tolist() if i not in cur], np.int64)
        kprev = ids.astype(np.int64) - reg.base
        # this frame's particles that continue a track seen on the previous frame
        was = (reg.last_frame[kprev] == frame - 1) & (kprev < reg.size) & ~border \
            & ~reg.last_border[kprev]
        vol_now = ecd**3
        vol_before = np.where(was, reg.last_ecd[kprev] ** 3, np.nan)
        events: list[dict[str, Any]] = []
        tree = cKDTree(spec)
        taken: set[int] = set()
        for lid in lost.tolist():
            k = lid - reg.base
            if k < 0 or k >= reg.size or reg.ended[k] or reg.last_border[k]:
                continue
            p, r = reg.last_xy[k], 0.5 * reg.last_ecd[k]
            vl = reg.last_ecd[k] ** 3
            near = tree.query_ball_point(p, r + float(ecd.max()) * 0.6)
            best, err = None, tol
            for j in near:
                if j in taken or not np.isfinite(vol_before[j]):
                    continue
                if math.dist(p, spec[j]) > 1.15 * (r + 0.5 * ecd[j]):
                    continue
                want = vol_before[j] + vl
                gain = vol_now[j] - vol_before[j]
                e = abs(vol_now[j] - want) / want
                if gain >= (1.0 - tol) * vl and e < err:
                    best, err = j, e
            if best is None:
                continue
            taken.add(best)
            self._pending[lid] = {"kind": "merge", "seq": int(seq),
                                  "parents": [int(ids[best]), lid], "children": [int(ids[best])],
                                  "x": float(spec[best, 0]), "y": float(spec[best, 1]),
                                  "ecd": float(ecd[best])}
        if started:
            newk = ~was & (reg.n_obs[np.clip(kprev, 0, None)] == 0) & ~border
            for s in np.nonzero(newk)[0].tolist():
                vs = vol_now[s]
                near = tree.query_ball_point(spec[s], 0.5 * ecd[s] + float(ecd.max()) * 0.6)
                best, err = None, tol
                for j in near:
                    if j == s or j in taken or not np.isfinite(vol_before[j]):
                        continue
                    if math.dist(spec[s], spec[j]) > 1.15 * 0.5 * (ecd[s] + ecd[j]):
                        continue
                    loss = vol_before[j] - vol_now[j]
                    e = abs(vol_before[j] - vol_now[j] - vs) / vol_before[j]
                    if loss >= (1.0 - tol) * vs and e < err:
                        best, err = j, e
                if best is None:
                    continue
                taken.add(best)
                events.append({"kind": "split", "seq": int(seq), "parents": [int(ids[best])],
                               "children": [int(ids[best]), int(ids[s])],
                               "x": float(spec[best, 0]), "y": float(spec[best, 1]),
                               "ecd": float(reg.last_ecd[kprev[best]])})
        return events

    def _expire(self, frame: int) -> tuple[int, list[dict[str, Any]]]:
        """End the tracks missed for longer than the gap allowance; returns how many, and
        the merges of those that were lost next to a particle that grew by them (their
        positions moved by the drift since, to stay in specimen coordinates)."""
        reg = self._reg
        n = reg.size
        old = (~reg.ended[:n]) & (reg.last_frame[:n] >= 0) & \
            (reg.last_frame[:n] < frame - self.config.max_gap_frames)
        reg.ended[:n] |= old
        merges = []
        for k in np.nonzero(old)[0].tolist():
            e = self._pending.pop(int(k) + reg.base, None)
            if e is not None:
                merges.append(e)
        return int(old.sum()), merges

    # ------------------------------------------------------------------ statistics

    def track_sizes(self, units: Units) -> np.ndarray:
        """The value (median ECD, ``units``) of every track that counts, all fields."""
        f = self._field
        scale = 1.0 if units == "px" else f.pixel_size_nm
        parts = list(self._folded[units])
        if scale is not None:
            v = self._reg.values(self._qualifying(f))
            parts.append((v[np.isfinite(v)] * scale).astype(np.float32))
        return np.concatenate(parts).astype(np.float64) if parts else np.empty(0)

    def unique(self, units: Units) -> dict[str, Any]:
        """The ``stats.unique`` block in ``units`` (nm: fields with a pixel size only)."""
        vals = self.track_sizes(units)
        f = self._field
        n_folded = self._folded_n[units]
        count = n_folded + (vals.size - sum(a.size for a in self._folded[units]))
        q = np.quantile(vals, (0.1, 0.5, 0.9)) if vals.size else (None, None, None)
        ecd = {"mean": float(vals.mean()) if vals.size else None,
               "sd": float(vals.std(ddof=1)) if vals.size > 1 else None,
               "d10": None if q[0] is None else float(q[0]),
               "d50": None if q[1] is None else float(q[1]),
               "d90": None if q[2] is None else float(q[2]),
               "min": float(vals.min()) if vals.size else None,
               "max": float(vals.max()) if vals.size else None}
        by_field = []
        area_um2 = self._folded_area_um2
        density_count = float(self._folded_count)
        for fl in self._fields:
            scale = 1.0 if units == "px" else fl.pixel_size_nm
            if fl is f:
                k = self._qualifying(f)
                v = self._reg.values(k)
                v = v[np.isfinite(v)]
                cnt, d50 = int(v.size), (float(np.median(v)) if v.size else None)
                ci = median_ci(v)
            else:
                s = fl.summary or {}
                cnt, d50, ci = s.get("count", 0), s.get("d50_px"), s.get("ci_px")
            if fl is f and fl.pixel_size_nm is not None:
                area_um2 += fl.area_px2 * (fl.pixel_size_nm / 1000.0) ** 2
                density_count += cnt
            by_field.append({
                "field": fl.index, "n_frames": fl.n_frames, "count": cnt,
                "d50": None if d50 is None or scale is None else d50 * scale,
                "d50_ci": None if ci is None or scale is None else (ci[0] * scale,
                                                                     ci[1] * scale),
                "stage": None if fl.stage is None else fl.stage.model_dump()})
        return {
            "n_frames": self._frames, "count": int(count), "tracks_total": self.total_tracks,
            "fields": self._n_fields,
            "min_track_frames": self.config.min_track_frames, "ecd": ecd,
            "ecd_d50_ci": median_ci(vals), "ecd_mean_ci": mean_ci(vals),
            "number_density_per_um2": density_count / area_um2 if area_um2 > 0 else None,
            "by_field": by_field[-_MAX_FIELDS_LISTED:],
        }

    def growth_rates(self, units: Units) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(track ids, dECD/dt, standard error) of the current field's tracks with at least
        ``growth_min_frames`` sized observations; ``units`` per s."""
        f = self._field
        reg = self._reg
        scale = 1.0 if units == "px" else f.pixel_size_nm
        k = np.nonzero(reg.n_sized[: reg.size] >= self.config.growth_min_frames)[0]
        if scale is None or k.size == 0:
            return np.empty(0, np.int64), np.empty(0), np.empty(0)
        slope, err = reg.rates(k)
        return k + reg.base, slope * scale, err * scale

    def insitu(self, units: Units, t_ns: int) -> dict[str, Any]:
        """The ``stats.insitu`` block of the current field in ``units``."""
        f = self._field
        scale = 1.0 if units == "px" else (f.pixel_size_nm or math.nan)
        _, rates, _ = self.growth_rates(units)
        return f.dynamics.summary(scale=scale, growth=rates, t_ns=t_ns,
                                  min_frames=self.config.lsw_min_frames)
