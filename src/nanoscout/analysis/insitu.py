"""In-situ science of one field of view: D50(t) and number density(t) with their intervals,
coalescence rate, growth rates of tracks, and the LSW ripening fit.

:class:`FieldDynamics` is fed one frame at a time (its particle sizes, density and
coalescences) and summarises the field (:meth:`FieldDynamics.summary`, the ``stats.insitu``
block). The interval helpers are distribution-free or exact, so that they are cheap enough for
every frame and give the same numbers however often they are asked:

* :func:`median_ci`: the 95 % interval of a median from order statistics (binomial ranks;
  None below 6 values, where no such interval reaches 95 %);
* :func:`mean_ci`: Student t interval of a mean;
* :func:`poisson_ci`: the exact (Garwood) 95 % interval of a count;
* :func:`lsw_fit`: least squares of mean radius cubed against time, ``<r>^3 = r0^3 + k t``
  (Lifshitz-Slyozov-Wagner coarsening), with the standard error of ``k`` and R².

Lengths are in the caller's unit (nm, or px for uncalibrated frames), times in s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["FieldDynamics", "lsw_fit", "mean_ci", "median_ci", "poisson_ci"]

#: per-frame points kept per field for the fits; beyond it every other one is dropped
_MAX_POINTS = 20_000


def median_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The distribution-free ``level`` interval of the median of ``values`` (order
    statistics X_(j) .. X_(n-j+1), j from the binomial(n, 1/2) quantile); None below 6
    values (no pair of order statistics covers 95 % there)."""
    x = np.sort(np.asarray(values, np.float64)[np.isfinite(values)])
    n = x.size
    j = int(sps.binom.ppf((1.0 - level) / 2.0, n, 0.5)) if n else 0
    if n < 6 or j < 1:
        return None
    return float(x[j - 1]), float(x[n - j])


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Student t ``level`` interval of the mean of ``values``; None below 2 values."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return None
    half = float(sps.t.ppf(0.5 + level / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    m = float(x.mean())
    return m - half, m + half


def poisson_ci(count: float, level: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) ``level`` interval of a Poisson count (a half particle, as border
    particles are counted, is allowed)."""
    a = (1.0 - level) / 2.0
    lo = 0.0 if count <= 0 else float(sps.chi2.ppf(a, 2.0 * count) / 2.0)
    hi = float(sps.chi2.ppf(1.0 - a, 2.0 * count + 2.0) / 2.0)
    return lo, hi


def lsw_fit(t_s: np.ndarray, mean_radius: np.ndarray) -> dict[str, Any] | None:
    """Fit ``<r>^3 = r0_cubed + k t`` by least squares (``mean_radius`` per frame, any length
    unit; ``t_s`` in s). Returns ``k`` (unit^3 / s) with its standard error ``k_se``,
    ``r0_cubed``, ``r2`` (coefficient of determination), ``n`` frames and ``span_s``; None
    with fewer than 3 frames or no time span."""
    t = np.asarray(t_s, np.float64)
    y = np.asarray(mean_radius, np.float64) ** 3
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    n = t.size
    if n < 3 or float(np.ptp(t)) <= 0:
        return None
    tm, ym = t.mean(), y.mean()
    stt = float(((t - tm) ** 2).sum())
    k = float(((t - tm) * (y - ym)).sum() / stt)
    r0 = float(ym - k * tm)
    res = y - (r0 + k * t)
    sse = float((res**2).sum())
    sst = float(((y - ym) ** 2).sum())
    se = math.sqrt(sse / (n - 2) / stt) if n > 2 else math.nan
    return {"k": k, "k_se": se, "r0_cubed": r0, "r2": 1.0 - sse / sst if sst > 0 else None,
            "n": n, "span_s": float(np.ptp(t))}


@dataclass
class FieldDynamics:
    """The in-situ time series of one field of view: per frame its time, D50, mean radius,
    density, and the field's coalescences so far."""

    field_index: int = 0
    t0_ns: int | None = None
    t_s: list[float] = field(default_factory=list)
    mean_radius: list[float] = field(default_factory=list)
    coalescences: int = 0
    #: the newest frame's numbers (summary of the frame alone)
    d50: float | None = None
    d50_ci: tuple[float, float] | None = None
    density: float | None = None
    density_ci: tuple[float, float] | None = None
    area_um2: float | None = None

    def add(self, *, t_ns: int, ecd: np.ndarray, n_border: int, area_um2: float | None,
            merges: int) -> None:
        """One frame: ``ecd`` of its non-border particles (the caller's unit), the number of
        border particles (half counted in the density), its area (µm², None uncalibrated),
        the coalescences found on it."""
        if self.t0_ns is None:
            self.t0_ns = int(t_ns)
        t = (int(t_ns) - self.t0_ns) / 1e9
        ecd = np.asarray(ecd, np.float64)
        self.coalescences += int(merges)
        self.d50 = float(np.median(ecd)) if ecd.size else None
        self.d50_ci = median_ci(ecd)
        self.area_um2 = area_um2
        if area_um2:
            count = float(ecd.size) + 0.5 * n_border
            lo, hi = poisson_ci(count)
            self.density = count / area_um2
            self.density_ci = (lo / area_um2, hi / area_um2)
        else:
            self.density = self.density_ci = None
        if ecd.size:
            self.t_s.append(t)
            self.mean_radius.append(float(ecd.mean()) / 2.0)
            if len(self.t_s) > _MAX_POINTS:
                self.t_s, self.mean_radius = self.t_s[::2], self.mean_radius[::2]

    def summary(self, *, scale: float = 1.0, growth: np.ndarray | None = None,
                t_ns: int | None = None, min_frames: int = 5) -> dict[str, Any]:
        """The ``stats.insitu`` block, lengths multiplied by ``scale`` (e.g. nm per px when
        the series is kept in px). ``growth``: dECD/dt of the field's tracks (unit / s,
        already scaled); ``t_ns``: now (for the field's time span); ``min_frames``: frames
        before the LSW fit is reported."""
        t_now = 0.0 if self.t0_ns is None or t_ns is None else (t_ns - self.t0_ns) / 1e9
        rate = rate_area = None
        if t_now > 0:
            rate = self.coalescences / t_now
            if self.area_um2:
                rate_area = rate / self.area_um2
        fit = None
        if len(self.t_s) >= min_frames:
            fit = lsw_fit(np.asarray(self.t_s), np.asarray(self.mean_radius) * scale)
        g = np.asarray(growth if growth is not None else [], np.float64)
        g = g[np.isfinite(g)]

        def sc(v: float | None) -> float | None:
            return None if v is None else v * scale

        ci = self.d50_ci
        gci = median_ci(g)
        return {
            "field": self.field_index, "t_s": round(t_now, 6), "d50": sc(self.d50),
            "d50_ci": None if ci is None else (ci[0] * scale, ci[1] * scale),
            "density_per_um2": self.density, "density_ci": self.density_ci,
            "mean_radius": sc(self.mean_radius[-1]) if self.mean_radius else None,
            "coalescences": self.coalescences, "coalescence_rate_per_s": rate,
            "coalescence_rate_per_um2_s": rate_area,
            "growth_rate_d50": float(np.median(g)) if g.size else None,
            "growth_rate_ci": gci, "growth_tracks": int(g.size), "lsw": fit,
        }
