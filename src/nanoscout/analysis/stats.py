"""Rolling and cumulative particle-size statistics of one source.

:class:`SizeStatistics` is fed one particle table per frame (:meth:`~SizeStatistics.update`)
and reports a plain, msgpack-able dict (:meth:`~SizeStatistics.snapshot`) with three blocks:

``window``
    Exact statistics over the last ``window_frames`` frames and, if ``window_seconds`` is set,
    only frames at most that old (age measured from the newest frame's ``t_ns``; a frame older
    than the whole time window, a clock set back, restarts it). The per-frame values are kept
    in a deque and trimmed on every update.
``cumulative``
    Everything since the start (or the last :meth:`~SizeStatistics.reset`) in bounded memory:
    exact running count, mean and standard deviation (Chan/Welford merge per frame), exact
    min/max, and quantiles read from a fine histogram. That ECD histogram has ``quantile_bins``
    log-spaced bins over ``quantile_range_nm`` (1e-4 nm to 1e11 nm by default,
    :data:`DEFAULT_QUANTILE_RANGE_NM`: every ECD a frame the protocol accepts can give, from
    one pixel at 1e-4 nm/px to a whole 65536² px frame at 1e6 nm/px, and every ECD in px of an
    uncalibrated frame; it was 0.01 nm to 1 cm, and at 1e-4 or 1e6 nm/px every cumulative
    D10 / D50 / D90 read as the smallest or largest particle), each spanning a factor
    r = (hi/lo)^(1/bins) (1.0035 for the defaults). A quantile is
    interpolated between the geometric centres of the bins holding the two order statistics
    that the exact (linearly interpolated, numpy default) quantile lies between, so **its
    relative error is at most sqrt(r) - 1** (0.17 % with the defaults) for quantiles inside
    ``quantile_range_nm``; the block reports this bound as ``ecd_quantile_rel_error``, and
    None once a particle fell outside the range (such values stand in as the exact min/max
    when a quantile falls among them: no bound there).
    Aspect-ratio and roundness medians come from linear fine histograms (1..21 in steps of
    0.01, 0..1 in steps of 0.0005): absolute error at most half a step.
``drift``
    The D50 of the first ``reference_frames`` frames (the reference; exact), the window D50
    and their relative change in percent, for in-situ sintering / growth experiments.

Every block has ``n_frames``, ``count``, ``ecd`` (mean, sd, d10, d50, d90, min, max),
``aspect_ratio`` and ``roundness`` (mean, sd, d50), ``histograms`` (``ecd``: ``ecd_bins``
log-spaced bins over ``ecd_range_nm``; ``aspect_ratio``: 16 linear bins over 1..5;
``roundness``: 20 linear bins over 0..1; each with ``edges``, ``counts``, ``under``, ``over``)
and ``number_density_per_um2``. Sizes are number-weighted; ``sd`` is the sample standard
deviation (ddof = 1) and None below two particles; means and quantiles are None without
particles.

Units: lengths are nm when frames are calibrated and px otherwise. A frame is taken as
calibrated when ``frame_area_um2`` is given; the snapshot's ``units`` says which ("nm" until
the first frame). If a source switches between calibrated and uncalibrated frames the
statistics restart (mixing nm and px would be meaningless) and a warning is logged.

Confidence weights (``weights = "confidence"``): a frame whose particle scores are calibrated
probabilities (``update(..., confidence=True)``: its detector's card has a score calibration)
enters with each particle weighted by its probability of being real: ``expected_count`` is the
sum of the weights (the expected number of real particles), means and standard deviations are
weighted (reliability weights, as GSL's ``gsl_stats_wsd``: sd = sqrt(sum w (x - mean)² /
(V1 - V2/V1)) with V1 = sum w, V2 = sum w², so scaling every weight leaves it unchanged and
unit weights give ddof = 1; None below two particles of positive weight; it was the
frequency-weight sqrt(... / (sum w - 1)): three particles of 9, 10, 11 nm at confidence 0.34
had sd 5.8 nm instead of 1.0 and at 0.3 none),
the exact window quantiles interpolate linearly between the sorted values placed at their
exclusive cumulative weight over (sum w - the last weight) (numpy's default when every weight
is 1), the cumulative quantiles are the centre of the fine bin where the cumulative weight
reaches q of the total (same error bound as above), the histograms gain ``weighted_counts``
(``counts`` stay the number of particles) and the number density counts expected particles.
Frames with raw scores (a detector without a calibration, e.g. the shipped STEM one) weigh
every particle 1; the snapshot's ``weights`` says how the newest frame was weighted. With
``weights = "none"``, or until a weighted frame arrives, everything is number-weighted as
described above and ``expected_count`` equals ``count``.

Particles flagged ``border`` are left out of the size statistics unless ``include_border``.
The number density counts every particle, a border particle as one half (about half of the
particles cut by the frame edge have their centre inside the frame, so this is unbiased for
particles small against the frame), divided by the frame area; None when uncalibrated.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from nanoscout.wire.errors import FrameError

__all__ = ["DEFAULT_QUANTILE_RANGE_NM", "SizeStatistics", "StatsConfig", "confidences"]

log = logging.getLogger(__name__)

_AR_EDGES = np.linspace(1.0, 5.0, 17)
_ROUND_EDGES = np.linspace(0.0, 1.0, 21)
_AR_FINE = (1.0, 21.0, 2000)
_ROUND_FINE = (0.0, 1.0, 2000)
_NEEDED_FIELDS = ("ecd_nm", "aspect_ratio", "roundness", "border")

#: the ECDs the cumulative quantiles hold to their bound by default, nm (px on uncalibrated
#: frames): one pixel (ECD 2/sqrt(π) px) at the smallest pixel size the protocol accepts
#: (1e-4 nm) up to a particle filling a 65536² px frame (ECD 73,949 px) at the largest (1e6 nm)
DEFAULT_QUANTILE_RANGE_NM: tuple[float, float] = (1e-4, 1e11)


class StatsConfig(BaseModel):
    """Typed configuration of the size statistics (frozen)."""

    # inf, nan: valid TOML; strict: a TOML value of another type is named, not converted
    # ("50" for an int, "no" or 0 for a bool: nanoscout.daemon.config.SECTION_CONFIG)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    #: rolling window: the last N frames ...
    window_frames: int = Field(50, ge=1)
    #: ... and, if set, only frames at most this many seconds older than the newest one
    window_seconds: float | None = Field(None, gt=0)
    include_border: bool = False
    #: log-spaced ECD histogram reported in the snapshot
    ecd_bins: int = Field(40, ge=1, le=10_000)
    ecd_range_nm: tuple[float, float] = (0.5, 1000.0)
    #: the first N frames form the drift reference
    reference_frames: int = Field(20, ge=1)
    #: fine log bins over quantile_range_nm for the cumulative quantiles (sets the error
    #: bound: 0.17 % with the defaults, 15 decades in 10,000 bins)
    quantile_bins: int = Field(10_000, ge=10, le=1_000_000)
    #: the sizes (nm, or px on uncalibrated frames) the cumulative quantiles hold to the bound
    quantile_range_nm: tuple[float, float] = DEFAULT_QUANTILE_RANGE_NM
    #: "confidence": each particle of a frame with calibrated scores counts with its
    #: probability of being real (see the module docstring); "none": each counts once
    weights: Literal["confidence", "none"] = "none"

    @field_validator("ecd_range_nm", "quantile_range_nm", mode="before")
    @classmethod
    def _array(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # a TOML array (strict: items too)

    @field_validator("ecd_range_nm", "quantile_range_nm")
    @classmethod
    def _check_range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"{info.field_name} must satisfy 0 < lo < hi (finite), got {v}")
        return v


@dataclass
class _Frame:
    t_ns: int
    ecd: np.ndarray
    ar: np.ndarray
    rnd: np.ndarray
    density_count: float
    area_um2: float | None
    #: histogram slot counts [under, bins..., over] of ecd, ar, rnd
    slots: tuple[np.ndarray, np.ndarray, np.ndarray]
    #: the particles' weights (their confidences), None: each 1
    w: np.ndarray | None = None
    #: histogram slot sums of the weights, as ``slots`` (None: unweighted)
    wslots: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def weights(self) -> np.ndarray:
        """The particles' weights (ones when unweighted)."""
        return np.ones(self.ecd.size) if self.w is None else self.w


class _Moments:
    """Exact running count, (weighted) mean and sum of squared deviations (Chan et al. merge;
    ``n`` is the sum of the weights, ``n2`` the sum of their squares, ``k`` the number of
    values)."""

    def __init__(self) -> None:
        self.n = 0.0
        self.n2 = 0.0
        self.k = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, x: np.ndarray, w: np.ndarray | None = None) -> None:
        if x.size == 0:
            return
        self.k += x.size
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        k = float(x.size) if w is None else float(w.sum())
        if k <= 0.0:
            return
        self.n2 += float(x.size) if w is None else float((w * w).sum())
        mean_b = float(x.mean()) if w is None else float((w * x).sum() / k)
        d2 = (x - mean_b) ** 2
        m2_b = float(d2.sum() if w is None else (w * d2).sum())
        n = self.n + k
        delta = mean_b - self.mean
        self.mean += delta * k / n
        self.m2 += m2_b + delta * delta * self.n * k / n
        self.n = n

    def sd(self) -> float | None:
        return _reliability_sd(self.m2, self.n, self.n2)


class _FineHistogram:
    """Counts over fixed edges plus under/over, with bounded-error quantiles."""

    def __init__(self, edges: np.ndarray, centres: np.ndarray) -> None:
        self.edges = edges
        self.centres = centres
        # slot 0 = under, 1..nbins = bins, nbins+1 = over
        self.counts = np.zeros(edges.size + 1, dtype=np.int64)
        #: the sums of the weights per slot
        self.wcounts = np.zeros(edges.size + 1, dtype=np.float64)

    def add(self, x: np.ndarray, w: np.ndarray | None = None) -> None:
        counts = _slot_counts(x, self.edges)
        self.counts += counts
        self.wcounts += counts if w is None else _slot_counts(x, self.edges, w)

    def weighted_quantiles(self, qs: tuple[float, ...], lo: float, hi: float
                           ) -> list[float | None]:
        """Quantiles of the weighted values: the centre of the slot where the cumulative
        weight reaches q of the total, clamped to [lo, hi]."""
        total = float(self.wcounts.sum())
        if not total > 0.0:
            return [None for _ in qs]
        cum = np.cumsum(self.wcounts)
        centres = np.concatenate([[lo], self.centres, [hi]])
        out: list[float | None] = []
        for q in qs:
            i = min(int(np.searchsorted(cum, q * total, side="left")), cum.size - 1)
            out.append(float(min(max(centres[i], lo), hi)))
        return out

    def quantiles(self, qs: tuple[float, ...], lo: float, hi: float) -> list[float | None]:
        """Quantiles (numpy 'linear' definition) estimated from bin centres, clamped to [lo, hi]."""
        n = int(self.counts.sum())
        if n == 0:
            return [None for _ in qs]
        cum = np.cumsum(self.counts)
        centres = np.concatenate([[lo], self.centres, [hi]])
        out: list[float | None] = []
        for q in qs:
            rank = q * (n - 1)
            r0 = math.floor(rank)
            r1 = min(r0 + 1, n - 1)
            f = rank - r0
            c0 = centres[int(np.searchsorted(cum, r0, side="right"))]
            c1 = centres[int(np.searchsorted(cum, r1, side="right"))]
            out.append(float(min(max((1 - f) * c0 + f * c1, lo), hi)))
        return out


def _linear_fine(lo: float, hi: float, bins: int) -> _FineHistogram:
    edges = np.linspace(lo, hi, bins + 1)
    return _FineHistogram(edges, 0.5 * (edges[:-1] + edges[1:]))


class SizeStatistics:
    """Rolling-window, cumulative and drift statistics of particle sizes for one source."""

    def __init__(self, config: StatsConfig) -> None:
        self.config = config
        lo, hi = config.ecd_range_nm
        self._ecd_edges = np.geomspace(lo, hi, config.ecd_bins + 1)
        qlo, qhi = config.quantile_range_nm
        fine = np.geomspace(qlo, qhi, config.quantile_bins + 1)
        self._fine_edges = fine
        self._fine_centres = np.sqrt(fine[:-1] * fine[1:])
        self.quantile_rel_error = math.sqrt((qhi / qlo) ** (1.0 / config.quantile_bins)) - 1.0
        self.reset()

    def reset(self) -> None:
        """Forget every frame: window, cumulative and drift reference."""
        self.units = "nm"
        self._units_set = False
        self._window: deque[_Frame] = deque()
        self._last_t_ns: int | None = None
        self._n_frames = 0
        self._density_count = 0.0
        self._density_area: float | None = 0.0
        self._m_ecd = _Moments()
        self._m_ar = _Moments()
        self._m_rnd = _Moments()
        self._f_ecd = _FineHistogram(self._fine_edges, self._fine_centres)
        self._f_ar = _linear_fine(*_AR_FINE)
        self._f_rnd = _linear_fine(*_ROUND_FINE)
        self._h_ecd = np.zeros(self._ecd_edges.size + 1, dtype=np.int64)
        self._h_ar = np.zeros(_AR_EDGES.size + 1, dtype=np.int64)
        self._h_rnd = np.zeros(_ROUND_EDGES.size + 1, dtype=np.int64)
        self._ref_frames = 0
        self._ref_values: list[np.ndarray] = []
        self._ref_weights: list[np.ndarray | None] = []
        self._ref_d50: float | None = None
        #: a frame weighted by confidence has been added (the cumulative block is weighted)
        self._weighted = False
        #: how the newest frame was weighted
        self._last_weights: Literal["confidence", "none"] = "none"
        self._h_ecd_w = np.zeros(self._ecd_edges.size + 1, dtype=np.float64)
        self._h_ar_w = np.zeros(_AR_EDGES.size + 1, dtype=np.float64)
        self._h_rnd_w = np.zeros(_ROUND_EDGES.size + 1, dtype=np.float64)

    def update(self, table: np.ndarray, *, t_ns: int, frame_area_um2: float | None,
               confidence: bool = False) -> None:
        """Add one frame's particle table (ECD in nm, or px when ``frame_area_um2`` is None).

        ``t_ns``: the frame's acquisition time (ns), used for the time window.
        ``frame_area_um2``: imaged area (µm²) of a calibrated frame, or None if uncalibrated.
        ``confidence``: the table's ``score`` column holds probabilities (a calibrated
        detector's): with ``weights = "confidence"`` they weigh the particles.
        """
        names = table.dtype.names or ()
        missing = [f for f in _NEEDED_FIELDS if f not in names]
        if missing:
            raise FrameError(f"particle table lacks fields {missing}; got dtype {table.dtype}")
        if frame_area_um2 is not None and not (
            math.isfinite(frame_area_um2) and frame_area_um2 > 0
        ):
            raise FrameError(f"frame_area_um2 must be > 0 or None, got {frame_area_um2!r}")
        units = "nm" if frame_area_um2 is not None else "px"
        if self._units_set and units != self.units:
            log.warning(
                "size statistics restart: frames switched from %s to %s units", self.units, units
            )
            self.reset()
        self.units = units
        self._units_set = True

        weighted = confidence and self.config.weights == "confidence"
        if weighted and "score" not in names:
            raise FrameError(f"confidence weights need a score column; got dtype {table.dtype}")
        self._last_weights = "confidence" if weighted else "none"
        self._weighted |= weighted
        border = table["border"].astype(bool)
        keep = table if self.config.include_border else table[~border]
        ecd = keep["ecd_nm"].astype(np.float64)
        ar = keep["aspect_ratio"].astype(np.float64)
        rnd = keep["roundness"].astype(np.float64)
        w = None
        if weighted:
            score = confidences(table["score"])
            w = score if self.config.include_border else score[~border]
            density_count = float(score[~border].sum()) + 0.5 * float(score[border].sum())
        else:
            density_count = (float(np.count_nonzero(~border))
                             + 0.5 * float(np.count_nonzero(border)))

        slots = (
            _slot_counts(ecd, self._ecd_edges),
            _slot_counts(ar, _AR_EDGES),
            _slot_counts(rnd, _ROUND_EDGES),
        )
        wslots = None if w is None else (
            _slot_counts(ecd, self._ecd_edges, w),
            _slot_counts(ar, _AR_EDGES, w),
            _slot_counts(rnd, _ROUND_EDGES, w),
        )
        frame = _Frame(int(t_ns), ecd, ar, rnd, density_count, frame_area_um2, slots, w,
                       wslots)
        span = (None if self.config.window_seconds is None
                else round(self.config.window_seconds * 1e9))
        if span is not None and self._last_t_ns is not None and t_ns < self._last_t_ns - span:
            # older than the whole time window: a clock set back (a restarted source); its
            # old frames would stay beside the new ones until as much time passed again
            log.warning("size statistics: a frame at %d ns, %.3g s before the newest: the "
                        "clock was set back; the time window restarts", t_ns,
                        (self._last_t_ns - t_ns) / 1e9)
            self._window.clear()
            self._last_t_ns = None
        self._window.append(frame)
        self._last_t_ns = int(t_ns if self._last_t_ns is None else max(self._last_t_ns, t_ns))
        while len(self._window) > self.config.window_frames:
            self._window.popleft()
        if span is not None:
            oldest = self._last_t_ns - span
            while self._window and self._window[0].t_ns < oldest:
                self._window.popleft()

        self._n_frames += 1
        self._density_count += density_count
        if frame_area_um2 is None:
            self._density_area = None
        elif self._density_area is not None:
            self._density_area += frame_area_um2
        self._m_ecd.add(ecd, w)
        self._m_ar.add(ar, w)
        self._m_rnd.add(rnd, w)
        self._f_ecd.add(ecd, w)
        self._f_ar.add(ar, w)
        self._f_rnd.add(rnd, w)
        self._h_ecd += slots[0]
        self._h_ar += slots[1]
        self._h_rnd += slots[2]
        ws = slots if wslots is None else wslots
        self._h_ecd_w += ws[0]
        self._h_ar_w += ws[1]
        self._h_rnd_w += ws[2]

        if self._ref_frames < self.config.reference_frames:
            self._ref_frames += 1
            self._ref_values.append(ecd)
            self._ref_weights.append(w)
            if self._ref_frames == self.config.reference_frames:
                self._ref_d50 = self._reference_d50()
                self._ref_values = []
                self._ref_weights = []

    def snapshot(self) -> dict[str, Any]:
        """Return the statistics as a plain dict (str keys; floats, ints, bools, lists, None).

        Lengths in the snapshot's ``units`` (nm or px), densities in particles per µm².
        """
        window = self._window_block()
        ref_complete = self._ref_frames >= self.config.reference_frames
        ref = self._ref_d50 if ref_complete else self._reference_d50()
        now = window["ecd"]["d50"]
        change = None
        if ref is not None and now is not None and ref > 0:
            change = 100.0 * (now - ref) / ref
        return {
            "units": self.units,
            "t_ns": self._last_t_ns,
            "weights": self._last_weights,
            "window": window,
            "cumulative": self._cumulative_block(),
            "drift": {
                "reference_d50": ref,
                "window_d50": now,
                "change_pct": change,
                "reference_frames": self._ref_frames,
                "reference_complete": ref_complete,
            },
        }

    # ------------------------------------------------------------------ internals

    def _reference_d50(self) -> float | None:
        values = np.concatenate(self._ref_values) if self._ref_values else np.empty(0)
        if not values.size:
            return None
        if all(w is None for w in self._ref_weights):
            return float(np.median(values))
        w = np.concatenate([np.ones(v.size) if w is None else w
                            for v, w in zip(self._ref_values, self._ref_weights, strict=True)])
        return _weighted_quantiles(values, w, (0.5,))[0]

    def _window_block(self) -> dict[str, Any]:
        """The window block: exact statistics of the frames in the window, weighted by
        confidence when a frame in it is."""
        frames = list(self._window)
        weighted = any(f.w is not None for f in frames)
        ecd = np.concatenate([f.ecd for f in frames]) if frames else np.empty(0)
        ar = np.concatenate([f.ar for f in frames]) if frames else np.empty(0)
        rnd = np.concatenate([f.rnd for f in frames]) if frames else np.empty(0)
        w = np.concatenate([f.weights() for f in frames]) if weighted else None

        def exact(x: np.ndarray) -> dict[str, float | None]:
            return _exact(x) if w is None else _weighted_exact(x, w)

        def quantiles(x: np.ndarray, qs: tuple[float, ...]) -> list[float | None]:
            return _quantiles(x, qs) if w is None else _weighted_quantiles(x, w, qs)

        areas = [f.area_um2 for f in frames if f.area_um2 is not None]
        density = None
        if frames and len(areas) == len(frames):
            density = sum(f.density_count for f in frames) / sum(areas)
        hists: dict[str, Any] = {}
        for i, (name, edges) in enumerate((("ecd", self._ecd_edges), ("aspect_ratio", _AR_EDGES),
                                           ("roundness", _ROUND_EDGES))):
            total = np.zeros(edges.size + 1, np.int64)
            wtotal = np.zeros(edges.size + 1, np.float64)
            for f in frames:
                total += f.slots[i]
                wtotal += f.slots[i] if f.wslots is None else f.wslots[i]
            hists[name] = _slots_to_hist(total, edges, wtotal if weighted else None)
        d10, d50, d90 = quantiles(ecd, (0.1, 0.5, 0.9))
        return {
            "n_frames": len(frames),
            "count": int(ecd.size),
            "expected_count": float(ecd.size) if w is None else float(w.sum()),
            "ecd": {
                **exact(ecd),
                "d10": d10,
                "d50": d50,
                "d90": d90,
                "min": float(ecd.min()) if ecd.size else None,
                "max": float(ecd.max()) if ecd.size else None,
            },
            "aspect_ratio": {**exact(ar), "d50": quantiles(ar, (0.5,))[0]},
            "roundness": {**exact(rnd), "d50": quantiles(rnd, (0.5,))[0]},
            "histograms": hists,
            "number_density_per_um2": density,
        }

    def _cumulative_block(self) -> dict[str, Any]:
        m = self._m_ecd
        if self._weighted:
            d10, d50, d90 = self._f_ecd.weighted_quantiles((0.1, 0.5, 0.9), m.min, m.max)
            (ar50,) = self._f_ar.weighted_quantiles((0.5,), self._m_ar.min, self._m_ar.max)
            (rnd50,) = self._f_rnd.weighted_quantiles((0.5,), self._m_rnd.min, self._m_rnd.max)
        else:
            d10, d50, d90 = self._f_ecd.quantiles((0.1, 0.5, 0.9), m.min, m.max)
            (ar50,) = self._f_ar.quantiles((0.5,), self._m_ar.min, self._m_ar.max)
            (rnd50,) = self._f_rnd.quantiles((0.5,), self._m_rnd.min, self._m_rnd.max)
        density = None
        if self._density_area:
            density = self._density_count / self._density_area
        wh = self._weighted
        return {
            "n_frames": self._n_frames,
            "count": m.k,
            "expected_count": m.n,
            "ecd": {
                **_moments(m),
                "d10": d10,
                "d50": d50,
                "d90": d90,
                "min": m.min if m.k else None,
                "max": m.max if m.k else None,
            },
            "aspect_ratio": {**_moments(self._m_ar), "d50": ar50},
            "roundness": {**_moments(self._m_rnd), "d50": rnd50},
            "histograms": {
                "ecd": _slots_to_hist(self._h_ecd, self._ecd_edges,
                                      self._h_ecd_w if wh else None),
                "aspect_ratio": _slots_to_hist(self._h_ar, _AR_EDGES,
                                               self._h_ar_w if wh else None),
                "roundness": _slots_to_hist(self._h_rnd, _ROUND_EDGES,
                                            self._h_rnd_w if wh else None),
            },
            "number_density_per_um2": density,
            # the bound holds for quantiles inside the fine range only
            "ecd_quantile_rel_error": (self.quantile_rel_error
                                       if not (self._f_ecd.counts[0] or self._f_ecd.counts[-1])
                                       else None),
        }


def confidences(scores: np.ndarray) -> np.ndarray:
    """Calibrated particle scores as probabilities of being real (float64): NaN counts as 0,
    everything is clipped to 0..1 (the weights here, the alerts' confidences and counts)."""
    return np.clip(np.nan_to_num(scores.astype(np.float64)), 0.0, 1.0)


def _slot_counts(x: np.ndarray, edges: np.ndarray, w: np.ndarray | None = None
                 ) -> np.ndarray:
    """Counts (sums of ``w``) in slots [under, bin 0 .. bin n-1, over] with np.histogram's
    bin rules."""
    slot = np.searchsorted(edges, x, side="right")
    slot[x == edges[-1]] = edges.size - 1
    return np.bincount(slot, weights=w, minlength=edges.size + 1)


def _slots_to_hist(slots: np.ndarray, edges: np.ndarray, wslots: np.ndarray | None = None
                   ) -> dict[str, Any]:
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in slots[1:-1]],
        "under": int(slots[0]),
        "over": int(slots[-1]),
        "weighted_counts": (None if wslots is None
                            else [round(float(c), 4) for c in wslots[1:-1]]),
    }


def _reliability_sd(m2: float, v1: float, v2: float) -> float | None:
    """Standard deviation from m2 = sum w (x - mean)², V1 = sum w and V2 = sum w² (reliability
    weights: unbiased for any weight scale, ddof = 1 when every weight is 1); None while fewer
    than two values carry weight (V1 - V2/V1 is then 0 up to rounding)."""
    if not v1 > 0.0:
        return None
    denom = v1 - v2 / v1
    if not denom > 1e-12 * v1:
        return None
    return math.sqrt(max(m2, 0.0) / denom)


def _weighted_exact(x: np.ndarray, w: np.ndarray) -> dict[str, float | None]:
    """Weighted mean and reliability-weighted sd (see :func:`_reliability_sd`)."""
    n = float(w.sum())
    if not n > 0.0:
        return {"mean": None, "sd": None}
    mean = float((w * x).sum() / n)
    m2 = float((w * (x - mean) ** 2).sum())
    return {"mean": mean, "sd": _reliability_sd(m2, n, float((w * w).sum()))}


def _weighted_quantiles(x: np.ndarray, w: np.ndarray, qs: tuple[float, ...]
                        ) -> list[float | None]:
    """Weighted quantiles: the sorted values with positive weight placed at their exclusive
    cumulative weight over (total - the last weight), linearly interpolated (numpy's default
    definition when every weight is 1); None without weight."""
    pos = w > 0.0
    x, w = x[pos], w[pos]
    if not x.size:
        return [None for _ in qs]
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    span = float(w.sum() - w[-1])
    if not span > 0.0:
        return [float(x[-1]) for _ in qs]
    at = (np.cumsum(w) - w) / span
    return [float(v) for v in np.interp(qs, at, x)]


def _exact(x: np.ndarray) -> dict[str, float | None]:
    return {
        "mean": float(x.mean()) if x.size else None,
        "sd": float(x.std(ddof=1)) if x.size > 1 else None,
    }


def _quantiles(x: np.ndarray, qs: tuple[float, ...]) -> list[float | None]:
    """Exact quantiles (numpy's default linear interpolation); None for an empty sample."""
    if not x.size:
        return [None for _ in qs]
    return [float(v) for v in np.quantile(x, qs)]


def _moments(m: _Moments) -> dict[str, float | None]:
    return {"mean": m.mean if m.n else None, "sd": m.sd()}
