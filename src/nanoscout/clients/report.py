"""``nanoscout report RUN``: an HTML size-distribution report of a recorded run.

Reads a run written by :class:`nanoscout.clients.runfile.RunWriter` (``nanoscout record`` or
``nanoscout measure``) and writes ``REPORT.html`` plus its figures in ``REPORT_files/`` beside
it — PNG at 300 dpi shown in the page, SVG and PDF (vector, for a paper or a lab notebook)
linked beside each — with relative links, no JavaScript and nothing fetched from the network,
so the pair can be copied or archived as it is.

Particles are grouped by ``(source, units)``: sizes in nm and in px are never pooled. Particles
touching the frame edge (``border``) are cut by the frame, so they are left out of every size
and shape statistic (the report says how many). Lengths are in the group's units (nm, or px
when uncalibrated); times are seconds since the run's first frame.

Sections: a methods paragraph (software, detector name, version, hash and the sizing error its
model card reports, calibration, exclusions, statistics; ready to paste into a lab notebook);
summary table with percentile-bootstrap 95 % confidence intervals; ECD histogram with a
lognormal maximum-likelihood fit and its goodness of fit (Kolmogorov-Smirnov and
Anderson-Darling tests of ln d against the fitted normal, parameters estimated from the data,
Monte-Carlo p-values by :func:`scipy.stats.goodness_of_fit`); aspect-ratio and roundness
histograms; per-frame D50 and particle count over time; alerts (newest first); provenance.

Each particle is counted once when the run tracked them (particles with a ``track_id``: a live
recording with tracking, ``nanoscout measure --track``): a group's statistics, intervals,
histogram and fit are then over its tracked particles, one ECD each (the median of its
detections off the frame edge; :mod:`nanoscout.clients.report_insitu`), because the
detections of one particle on many frames are not independent; the same statistics over every
detection of every frame stay beside them in the table, named "per detection". Such groups
get an in-situ section: the size distribution over time, growth curves and rates,
coalescences, D50(t) and density(t) with intervals, the LSW ripening fit. Untracked runs
treat every detection as a particle (independent images). A recording that went on across a
daemon restart spans several daemon runs (``daemon_run``), each numbering its tracks from 1:
the provenance says how many and when each started, and a track is never joined across two.
A ``nanoscout measure`` run that did not finish (killed, or stopped by a write that failed: its
provenance has no ``stopped_utc``) is said to be unfinished, with how many of its files it
holds, before its numbers and in the provenance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanoscout.clients.progress import Bar
from nanoscout.clients.report_insitu import insitu_section, track_values
from nanoscout.clients.runfile import Run, read_run
from nanoscout.wire.errors import ConfigError, NanoscoutError, ReaderError
from nanoscout.wire.tracks import daemon_runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "FIGURE_DPI", "FIT_TEST_SAMPLES",
           "FitQuality", "GroupStats", "bootstrap_ci", "build_report", "fit_quality",
           "group_stats", "main", "methods_paragraph"]

#: percentile-bootstrap resamples and the fixed seed that makes a report reproducible
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20240611
#: at most this many alerts are listed (newest first)
MAX_ALERT_ROWS = 200
#: bootstrap resamples are drawn in chunks of at most this many values (memory bound, ~32 MB)
_BOOT_CHUNK_VALUES = 4_000_000
_EMPTY_MESSAGE = "This run contains no particles: there are no size statistics to report."
#: resolution of the PNG figures (dots per inch); SVG and PDF are vector
FIGURE_DPI = 300
#: goodness-of-fit tests: Monte-Carlo samples, and at most this many diameters (a seeded
#: subsample beyond it: with 10^5 particles any test rejects any model, and time grows as n)
FIT_TEST_MC_SAMPLES = 999
FIT_TEST_SAMPLES = 2000


@dataclass(frozen=True)
class FitQuality:
    """Goodness of the lognormal fit: KS and AD statistics of ln d against the fitted normal
    and their Monte-Carlo p-values (parameters estimated from the data), on ``n`` values."""

    n: int
    ks_statistic: float
    ks_pvalue: float
    ad_statistic: float
    ad_pvalue: float


def fit_quality(d: np.ndarray, *, seed: int = BOOTSTRAP_SEED) -> FitQuality | None:
    """Kolmogorov-Smirnov and Anderson-Darling tests of the lognormal fit of diameters ``d``
    (positive, any unit); None for fewer than 8 values or when all are equal (σ = 0: no
    distribution to test).

    Both test ln d against a normal whose mean and sd are estimated from the same data
    (:func:`scipy.stats.goodness_of_fit`, which accounts for the estimation: Lilliefors-type
    p-values by Monte Carlo, ``FIT_TEST_MC_SAMPLES`` samples). At most ``FIT_TEST_SAMPLES``
    values are tested (a seeded subsample), so p-values mean the same for any run size.
    """
    from scipy import stats

    x = np.log(_positive(d))
    # equal values, not np.std(x) == 0: the std of equal logs is often ~1e-16 (rounding)
    if x.size < 8 or float(np.ptp(x)) == 0.0:
        return None
    rng = np.random.default_rng(seed)
    if x.size > FIT_TEST_SAMPLES:
        x = rng.choice(x, FIT_TEST_SAMPLES, replace=False)
    ks = stats.goodness_of_fit(stats.norm, x, statistic="ks", n_mc_samples=FIT_TEST_MC_SAMPLES,
                               rng=np.random.default_rng(seed))
    ad = stats.goodness_of_fit(stats.norm, x, statistic="ad", n_mc_samples=FIT_TEST_MC_SAMPLES,
                               rng=np.random.default_rng(seed + 1))
    return FitQuality(int(x.size), float(ks.statistic), float(ks.pvalue), float(ad.statistic),
                      float(ad.pvalue))


@dataclass
class GroupStats:
    """Size statistics of one ``(source, units)`` group; lengths in ``units`` (nm or px).

    ``ci`` maps ``mean``, ``sd``, ``d10``, ``d50``, ``d90`` to their percentile-bootstrap
    95 % interval (NaN when fewer than 2 particles). ``lognormal_median`` = exp(mu) in
    ``units``, ``lognormal_sigma`` = std(ln d) (dimensionless), both maximum-likelihood.
    """

    source: str
    units: str
    n: int
    n_border: int
    n_frames: int
    mean: float
    sd: float
    d10: float
    d50: float
    d90: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    aspect_ratio: float = math.nan
    roundness: float = math.nan
    lognormal_median: float = math.nan
    lognormal_sigma: float = math.nan
    #: what one value is: ``particle`` (a tracked particle, counted once) or ``detection``
    basis: str = "detection"

    @property
    def per_frame(self) -> float:
        """Non-border particles per frame (NaN without frames)."""
        return self.n / self.n_frames if self.n_frames else math.nan


# --------------------------------------------------------------------------------- statistics

def bootstrap_ci(values: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap 95 % intervals of mean, sd, D10, D50 and D90 of ``values``.

    Returns ``{stat: (low, high)}`` in the unit of ``values``; NaN bounds for fewer than 2
    values. Resamples are drawn as index matrices (vectorised), in chunks to bound memory.
    """
    d = np.asarray(values, dtype=np.float64)
    n = d.size
    names = ("mean", "sd", "d10", "d50", "d90")
    if n < 2:
        return {k: (math.nan, math.nan) for k in names}
    rng = np.random.default_rng(seed)
    boot = np.empty((resamples, len(names)), dtype=np.float64)
    chunk = max(1, min(resamples, _BOOT_CHUNK_VALUES // n))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        sample = d[rng.integers(0, n, size=(stop - start, n))]
        boot[start:stop, 0] = sample.mean(axis=1)
        boot[start:stop, 1] = sample.std(axis=1, ddof=1)
        boot[start:stop, 2:] = np.quantile(sample, [0.1, 0.5, 0.9], axis=1).T
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(names)}


def _positive(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[np.isfinite(v) & (v > 0)]


def _nanmean(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def group_stats(source: str, units: str, ecd: np.ndarray, *, n_border: int = 0,
                n_frames: int = 0, aspect_ratio: np.ndarray | None = None,
                roundness: np.ndarray | None = None) -> GroupStats:
    """Statistics of the non-border ECDs ``ecd`` (in ``units``) of one group.

    Non-finite and non-positive diameters are ignored. D10/D50/D90 are number-weighted
    quantiles (linear interpolation, Hyndman-Fan type 7: ``np.quantile``'s default, as the live
    statistics' window); the lognormal fit is the maximum-likelihood one (mu = mean ln d,
    sigma = std ln d).
    """
    d = _positive(ecd)
    n = int(d.size)
    nan = math.nan
    if n == 0:
        return GroupStats(source, units, 0, n_border, n_frames, nan, nan, nan, nan, nan,
                          ci=bootstrap_ci(d))
    d10, d50, d90 = (float(q) for q in np.quantile(d, [0.1, 0.5, 0.9]))
    logd = np.log(d)
    # one size: exactly σ = 0 and median d (the mean and std of equal logs round off)
    sigma = 0.0 if float(np.ptp(logd)) == 0.0 else float(logd.std())
    return GroupStats(
        source, units, n, n_border, n_frames,
        mean=float(d.mean()), sd=float(d.std(ddof=1)) if n > 1 else nan,
        d10=d10, d50=d50, d90=d90, ci=bootstrap_ci(d),
        aspect_ratio=_nanmean(aspect_ratio) if aspect_ratio is not None else nan,
        roundness=_nanmean(roundness) if roundness is not None else nan,
        lognormal_median=float(d[0]) if sigma == 0.0 else float(math.exp(logd.mean())),
        lognormal_sigma=sigma)


# ------------------------------------------------------------------------------------ groups

@dataclass
class _Group:
    source: str
    units: str
    particles: np.ndarray  # bool mask over the particle table, border particles included
    frames: np.ndarray  # bool mask over the frame table


def _groups(run: Run) -> list[_Group]:
    p, f = run.particles, run.frames
    np_, nf = Run.rows(p), Run.rows(f)
    keys: set[tuple[str, str]] = set()
    if np_:
        keys |= set(zip(p["source"].astype(str), p["units"].astype(str)))
    if nf:
        keys |= set(zip(f["source"].astype(str), f["units"].astype(str)))
    out = []
    for source, units in sorted(keys):
        pm = ((p["source"] == source) & (p["units"] == units)) if np_ else np.zeros(0, bool)
        fm = ((f["source"] == source) & (f["units"] == units)) if nf else np.zeros(0, bool)
        out.append(_Group(source, units, np.asarray(pm, bool), np.asarray(fm, bool)))
    return out


def _table_files(run_path: Path, table: str) -> list[Path]:
    """The files on disk that hold ``table`` ("particles" or "frames") of the run."""
    if run_path.suffix == ".csv":
        return [run_path if table == "particles" else run_path.with_suffix(f".{table}.csv")]
    folder = run_path / table if (run_path / "particles").is_dir() else (
        run_path if table == "particles" else run_path / f"_{table}")
    return sorted(folder.glob("part-*.parquet"))


def _untimed_parts(run_path: Path, table: str) -> list[Path]:
    """The files of ``table`` with rows that have no acquisition time (``t_acq``; all of them
    when that cannot be told, a CSV table)."""
    if run_path.suffix == ".csv":
        return _table_files(run_path, table)
    import pyarrow.parquet as pq

    out = []
    for part in _table_files(run_path, table):
        try:
            names = pq.read_schema(part).names
            col = "t_acq" if "t_acq" in names else "t_acq_ns" if "t_acq_ns" in names else None
            if col is None or pq.read_table(part, columns=[col]).column(0).null_count:
                out.append(part)
        except (OSError, ValueError):  # pyarrow's errors are OSError / ValueError subclasses
            out.append(part)
    return out


def _check_times(run: Run, run_path: Path) -> None:
    """ReaderError naming the part(s) of a table whose rows have no acquisition time: a foreign
    Parquet file among a run's parts reads as rows of nulls (the run schema's columns)."""
    for table in ("frames", "particles"):
        cols = getattr(run, table)
        n = Run.rows(cols)
        t = cols["t_acq_ns"] if n else np.zeros(0)
        bad = int(np.isnan(t).sum()) if t.dtype.kind == "f" else 0
        if bad:
            parts = _untimed_parts(run_path, table) or [run_path]
            raise ReaderError(
                f"{', '.join(str(x) for x in parts[:3])}{' ...' if len(parts) > 3 else ''}: "
                f"{bad} of {n} {table} rows have no acquisition time (t_acq): not a nanoscout "
                f"{table} table (move the foreign file out of the run)")


def _t0_ns(run: Run) -> int | None:
    t = [int(run.frames["t_acq_ns"].min())] if Run.rows(run.frames) else []
    if Run.rows(run.particles):
        t.append(int(run.particles["t_acq_ns"].min()))
    return min(t) if t else None


@dataclass
class _Series:
    t_s: np.ndarray  # s since the run's first frame
    d50: np.ndarray  # per-frame median ECD of non-border particles, NaN without any
    n_all: np.ndarray  # particles detected in the frame (border included)
    n_inner: np.ndarray  # non-border particles in the frame


def _ecd_column(units: str) -> str:
    """The particle column holding ECD in ``units`` (unit-honest run columns)."""
    return "ecd_nm" if units == "nm" else "ecd_px"


def _series(run: Run, g: _Group, t0_ns: int) -> _Series:
    """Per-frame D50 and counts of a group, ordered by acquisition time."""
    f, p = run.frames, run.particles
    seq = f["seq"][g.frames] if Run.rows(f) else np.zeros(0, np.int64)
    t_ns = f["t_acq_ns"][g.frames] if Run.rows(f) else np.zeros(0, np.int64)
    n_all = f["n"][g.frames].astype(np.float64) if Run.rows(f) else np.zeros(0)
    runs = daemon_runs(f, Run.rows(f))[g.frames] if Run.rows(f) else np.zeros(0, np.int64)
    # a frame is its (daemon run, seq, acquisition time): an adapter restarted during a
    # recording numbers its frames from 0 again (seq alone pooled two frames' particles)
    if Run.rows(p):
        inner = g.particles & ~p["border"]
        pkey = np.stack([daemon_runs(p, Run.rows(p))[inner], p["seq"][inner],
                         p["t_acq_ns"][inner]], axis=1).astype(np.int64)
        pecd = p[_ecd_column(g.units)][inner].astype(np.float64)
        ok = np.isfinite(pecd) & (pecd > 0)
        pkey, pecd = pkey[ok], pecd[ok]
    else:
        pkey, pecd = np.zeros((0, 3), np.int64), np.zeros(0)
    order = np.lexsort(pkey.T[::-1])
    pkey, pecd = pkey[order], pecd[order]
    start = np.flatnonzero(np.concatenate([[True], (pkey[1:] != pkey[:-1]).any(axis=1)])
                           if len(pkey) else np.zeros(0, bool))
    keys = [tuple(k) for k in pkey[start].tolist()]
    medians = {k: float(np.median(v)) for k, v in zip(keys, np.split(pecd, start[1:]))}
    counts = dict(zip(keys, np.diff(np.append(start, len(pkey))).tolist()))
    by_time = np.argsort(t_ns, kind="stable")
    seq, t_ns, n_all, runs = seq[by_time], t_ns[by_time], n_all[by_time], runs[by_time]
    fkeys = [(int(r), int(q), int(t)) for r, q, t in zip(runs, seq, t_ns)]
    return _Series(
        t_s=(t_ns - t0_ns).astype(np.float64) / 1e9,
        d50=np.array([medians.get(k, math.nan) for k in fkeys], dtype=np.float64),
        n_all=n_all,
        n_inner=np.array([counts.get(k, 0) for k in fkeys], dtype=np.float64))


# ----------------------------------------------------------------------------------- figures

def _figure(width_in: float, height_in: float, ncols: int = 1) -> tuple[Figure, Any]:
    # The object-oriented API on an Agg canvas: no pyplot, so no global figure registry to
    # leak and no change to the backend of a process that imports us (e.g. a notebook).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


#: matplotlib metadata of the vector files: no creation date, so a report is reproducible
_VECTOR_META = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


def _save(fig: Figure, path: Path, formats: Sequence[str] = ("png",)) -> None:
    """Save ``fig`` as ``path`` (PNG, ``FIGURE_DPI``) and beside it in the other ``formats``,
    each through a temporary file renamed into place, so no figure is ever left cut short.
    ConfigError naming the figure when one cannot be written (a full disk: it was a
    traceback, and a torn SVG stayed in the report's folder)."""
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            if fmt == "png":
                fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
            else:
                fig.savefig(tmp, format=fmt, metadata=_VECTOR_META.get(fmt))
            tmp.replace(target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"cannot write the report figure {target}: "
                              f"{exc.strerror or exc}") from exc


def _ecd_figure(d: np.ndarray, st: GroupStats, path: Path, formats: Sequence[str]) -> None:
    """ECD histogram on log-spaced bins with the lognormal fit as expected counts per bin."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = _figure(6.4, 3.6)
    lo, hi = float(d.min()), float(d.max())
    if hi <= lo * 1.01:
        lo, hi = lo / 1.1, hi * 1.1
    nbins = int(np.clip(round(2 * d.size ** (1 / 3)), 10, 60))
    edges = np.geomspace(lo, hi, nbins + 1)
    ax.hist(d, bins=edges, color="#8fb3d9", edgecolor="#3b6a99", label=f"N = {d.size}")
    if d.size > 1 and st.lognormal_sigma > 0:
        # With a constant bin width in ln d the expected count of a bin is
        # N · φ((ln d − μ)/σ)/σ · Δln d — a smooth curve on a log axis.
        dln = math.log(hi / lo) / nbins
        x = np.geomspace(lo, hi, 200)
        mu, sigma = math.log(st.lognormal_median), st.lognormal_sigma
        z = (np.log(x) - mu) / sigma
        y = d.size * np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi)) * dln
        ax.plot(x, y, color="#c0392b", lw=2,
                label=f"lognormal: median {_fmt(st.lognormal_median)} {st.units}, "
                      f"σ {_fmt(st.lognormal_sigma)}")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")  # 5, 10, 20 rather than 5×10⁰
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"ECD ({st.units})")
    ax.set_ylabel("particles per bin")
    ax.set_title(f"{st.source}: ECD distribution (non-border)")
    ax.legend(fontsize="small")
    _save(fig, path, formats)


def _shape_figure(ar: np.ndarray, rd: np.ndarray, source: str, path: Path,
                  formats: Sequence[str]) -> None:
    fig, (ax1, ax2) = _figure(8.0, 3.2, ncols=2)
    if ar.size:
        hi = max(float(np.quantile(ar, 0.995)), 1.05)
        ax1.hist(ar, bins=40, range=(1.0, hi), color="#a3c9a8", edgecolor="#4d7a53")
    ax1.set_xlabel("aspect ratio (major / minor)")
    ax1.set_ylabel("particles")
    ax1.set_title(f"{source}: aspect ratio (N = {ar.size})")
    if rd.size:
        ax2.hist(rd, bins=40, range=(0.0, max(1.0, float(rd.max()))), color="#e5c07b",
                 edgecolor="#9a7a2e")
    ax2.set_xlabel("roundness 4·area / (π·major²)")
    ax2.set_title(f"{source}: roundness (N = {rd.size})")
    _save(fig, path, formats)


def _time_figure(s: _Series, source: str, units: str, path: Path, formats: Sequence[str]) -> None:
    fig, (ax1, ax2) = _figure(8.0, 3.2, ncols=2)
    ok = np.isfinite(s.d50)
    ax1.plot(s.t_s[ok], s.d50[ok], "o-", ms=3, color="#3b6a99")
    ax1.set_xlabel("time since first frame (s)")
    ax1.set_ylabel(f"per-frame D50 ECD ({units})")
    ax1.set_title(f"{source}: D50 per frame (non-border)")
    ax2.plot(s.t_s, s.n_all, "-", color="#999999", label="all")
    ax2.plot(s.t_s, s.n_inner, "o-", ms=3, color="#4d7a53", label="non-border")
    ax2.set_xlabel("time since first frame (s)")
    ax2.set_ylabel("particles per frame")
    ax2.set_title(f"{source}: particles per frame")
    ax2.legend(fontsize="small")
    _save(fig, path, formats)


# -------------------------------------------------------------------------------------- HTML

def _fmt(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` significant digits, no exponent; an em dash for NaN."""
    if not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ci_cell(cls: str, value: float, ci: tuple[float, float]) -> str:
    return (f'<td class="{cls}">{_fmt(value)} '
            f'<span class="ci">[{_fmt(ci[0])}, {_fmt(ci[1])}]</span></td>')


def _summary_table(stats: list[GroupStats]) -> str:
    head = ("<tr><th>source</th><th>units</th><th>counted</th><th>N<br>(non-border)</th>"
            "<th>border<br>(excluded)</th><th>N frames</th><th>mean ECD</th><th>sd ECD</th>"
            "<th>D10</th><th>D50</th><th>D90</th><th>mean aspect ratio</th>"
            "<th>mean roundness</th><th>particles / frame<br>(non-border)</th></tr>")
    rows = []
    for st in stats:
        rows.append(
            f'<tr><td class="source">{_e(st.source)}</td><td class="units">{_e(st.units)}</td>'
            f'<td class="basis">{"per particle (tracks)" if st.basis == "particle" else "per detection"}</td>'
            f'<td class="n">{st.n}</td><td class="n-border">{st.n_border}</td>'
            f'<td class="n-frames">{st.n_frames}</td>'
            + _ci_cell("mean", st.mean, st.ci["mean"]) + _ci_cell("sd", st.sd, st.ci["sd"])
            + _ci_cell("d10", st.d10, st.ci["d10"]) + _ci_cell("d50", st.d50, st.ci["d50"])
            + _ci_cell("d90", st.d90, st.ci["d90"])
            + f'<td class="aspect">{_fmt(st.aspect_ratio)}</td>'
            f'<td class="roundness">{_fmt(st.roundness)}</td>'
            f'<td class="per-frame">{_fmt(st.per_frame) if st.basis == "detection" else "—"}'
            "</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _utc(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _alerts_section(run: Run) -> str:
    a = run.alerts
    n = Run.rows(a)
    if n == 0:
        return "<p>No alerts were recorded.</p>"
    order = np.argsort(-a["t_acq_ns"], kind="stable")[:MAX_ALERT_ROWS]
    rows = []
    for i in order:
        rows.append(
            f'<tr class="severity-{_e(a["severity"][i])}"><td>{_e(_utc(int(a["t_acq_ns"][i])))}'
            f'</td><td>{_e(a["source"][i])}</td><td>{int(a["seq"][i])}</td>'
            f'<td>{_e(a["rule"][i])}</td><td>{_e(a["severity"][i])}</td>'
            f'<td class="explanation">{_e(a["explanation"][i])}</td></tr>')
    note = (f'<p class="note">Showing the newest {MAX_ALERT_ROWS} of {n} alerts.</p>'
            if n > MAX_ALERT_ROWS else f"<p>{n} alert{'s' if n != 1 else ''}, newest first.</p>")
    head = ("<tr><th>time (UTC)</th><th>source</th><th>seq</th><th>rule</th>"
            "<th>severity</th><th>explanation</th></tr>")
    return f"{note}<table>{head}{''.join(rows)}</table>"


def _unique_str(values: np.ndarray) -> str:
    u = sorted({str(v) for v in values})
    return ", ".join(_e(v) if v else "(none)" for v in u) if u else "(none)"


def _low_dose_item(f: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """The provenance row on low-dose smoothing (``noise``, ``smoothing_px`` of the frames
    table; protocol 1.9), or None where no frame's noise was measured (a model card without
    ``normalization.denoise``, or an older daemon)."""
    noise = np.array(f["noise"], dtype=np.float64)
    width = np.array(f["smoothing_px"], dtype=np.float64)
    measured = np.isfinite(noise)
    if not measured.any():
        return None
    smoothed = measured & np.isfinite(width) & (width > 0)
    text = (f"noise measured on {int(measured.sum())} of {noise.size} frames (white noise "
            f"{_fmt(float(noise[measured].min()), 3)} – {_fmt(float(noise[measured].max()), 3)} "
            "of the normalised range); ")
    if smoothed.any():
        text += (f"{int(smoothed.sum())} smoothed before the network, Gaussian "
                 f"{_fmt(float(width[smoothed].min()), 3)} – "
                 f"{_fmt(float(width[smoothed].max()), 3)} px")
    else:
        text += "none noisy enough to be smoothed"
    return "low-dose smoothing", text


def _daemon_runs_item(f: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """The provenance row on the daemon runs the frames came from (``daemon_run``, protocol
    1.11: a daemon restarted during a recording shows as a second run), or None where no
    frame names one (``measure``, an older daemon or run)."""
    runs = sorted({r for r in daemon_runs(f, Run.rows(f)).tolist() if r})
    if not runs:
        return None
    text = (f'<span class="n-daemon-runs">{len(runs)}</span> daemon '
            f"run{'s' if len(runs) > 1 else ''}, started {', '.join(_e(_utc(r)) for r in runs)}")
    if len(runs) > 1:
        text += (": the daemon restarted during the recording; each run numbers its tracks and "
                 "fields of view from 1 and starts its statistics again, so tracks are never "
                 "joined across runs")
    return "daemon runs", text


def _recording_items(prov: dict[str, Any]) -> list[tuple[str, str]]:
    """What a live recording (``nanoscout record``: its provenance has ``subscribed_utc``)
    says of itself: whether it stopped cleanly (``stopped_utc``, written only then) and the
    results it missed or refused."""
    if "subscribed_utc" not in prov:
        return []
    out = [("recording", f"stopped cleanly at {_e(str(prov['stopped_utc']))}"
            if prov.get("stopped_utc") else
            "<strong>not stopped cleanly</strong> (killed, crashed or cut off): the run holds "
            "the rows of its last whole batch and may lack the frames after it")]
    missed, rejected = prov.get("missed_results_total"), prov.get("rejected_messages")
    if missed or rejected:
        out.append(("results not recorded",
                    f"{_e(str(missed or 0))} missed (the daemon's sequence numbers skipped "
                    f"them: {_e(json.dumps(prov.get('missed_results') or {}))}), "
                    f"{_e(str(rejected or 0))} refused as unreadable"))
    return out


def _unfinished_measure(run: Run) -> str | None:
    """What a ``nanoscout measure`` run that did not finish holds (HTML), or None for any
    other run. Its provenance is written when it starts and again when it ends
    (``stopped_utc``, written only then): a measurement killed, crashed or stopped by a write
    that failed (a full disk) holds the images of only some of the files it lists."""
    prov = run.provenance
    if prov.get("command") != "nanoscout measure" or prov.get("stopped_utc"):
        return None
    f = run.frames
    held = len({str(v) for v in f["file"]}) if Run.rows(f) else 0
    listed = prov.get("files")
    of = f" of the {len(listed)} it was to measure" if isinstance(listed, list) else ""
    return ('<strong>not finished</strong> (killed, crashed or stopped by a write that failed, '
            f'such as a full disk): the run holds the images of <span class="n-files-held">'
            f"{held}</span> files{of}, and its statistics are of those alone")


def _provenance_section(run: Run) -> str:
    f = run.frames
    items: list[tuple[str, str]] = []
    if Run.rows(f):
        items.append(("models", _unique_str(f["model"])))
        items.append(("engines", _unique_str(f["engine"])))
        cal = []
        for source in sorted({str(s) for s in f["source"]}):
            px = f["pixel_size_nm"][f["source"] == source].astype(np.float64)
            sizes = sorted({float(v) for v in px[np.isfinite(px)]})
            parts = [f"{_fmt(v)} nm/px" for v in sizes[:10]]
            if len(sizes) > 10:
                parts.append(f"… and {len(sizes) - 10} more")
            if np.isnan(px).any():
                parts.append("uncalibrated (px)")
            cal.append(f"{_e(source)}: {', '.join(parts)}")
        items.append(("calibration", "<br>".join(cal)))
        ws = f["working_scale"].astype(np.float64)
        ws = ws[np.isfinite(ws)]
        items.append(("working scale (working px per frame px)",
                      f"{_fmt(float(ws.min()))} – {_fmt(float(ws.max()))}" if ws.size
                      else "not recorded"))
        handed = sum(1 for v in f["base_network_only"] if v is not None and bool(v))
        if handed:  # protocol 1.7: an adapted model handed these to its base network
            items.append(("frames analysed by an adapted model's base network",
                          f"{handed} of {Run.rows(f)} (their particles lie outside the sizes "
                          "the model was adapted on, or its network found far more particles "
                          "than the base network there)"))
        hints = [str(v) for v in f["size_hint"] if v]
        if hints:  # protocol 1.8: frames that named a particle size range
            items.append(("operator's particle size range (working scale)",
                          f"named by {len(hints)} of {Run.rows(f)} frames: the estimate lay in "
                          f"it on {hints.count('agreed')}, was moved into it on "
                          f"{hints.count('applied')}; not used on "
                          f"{hints.count('uncalibrated')} without a pixel size and "
                          f"{hints.count('unused')} at a fixed or preset scale"))
        agreed = [v for v in f["scale_agreed"] if v is not None]
        if agreed:  # protocol 1.10: frames whose working scale was estimated by consistency
            guessed = sum(1 for v in agreed if not v)
            items.append(("working scale estimate",
                          f"two estimation passes agreed on {len(agreed) - guessed} of "
                          f"{len(agreed)} estimated frames; on {guessed} none did and the model's "
                          "fallback chose it"))
        low_dose = _low_dose_item(f)
        if low_dose is not None:  # protocol 1.9: a model that smooths low-dose frames
            items.append(low_dose)
        runs = _daemon_runs_item(f)
        if runs is not None:  # protocol 1.11: the daemon processes the results came from
            items.append(runs)
        sizes_hw = sorted({(int(h), int(w)) for h, w in zip(f["height"], f["width"])})
        items.append(("frame sizes (height × width, px)",
                      ", ".join(f"{h} × {w}" for h, w in sizes_hw)))
        t = f["t_acq_ns"]
        t_lo, t_hi = int(t.min()), int(t.max())
        items.append(("time span", f"{_e(_utc(t_lo))} – {_e(_utc(t_hi))} "
                                   f"({_fmt((t_hi - t_lo) / 1e9)} s, {Run.rows(f)} frames)"))
    else:
        items.append(("frames", "none recorded"))
    items.extend(_recording_items(run.provenance))
    unfinished = _unfinished_measure(run)
    if unfinished is not None:
        items.append(("measurement", unfinished))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in items)
    prov = json.dumps(run.provenance, indent=2, sort_keys=True, default=str)
    return (f"<table>{rows}</table><h3>run provenance</h3>"
            f'<pre class="provenance">{_e(prov)}</pre>')


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}
th,td{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}.ci{color:#666;font-size:85%}.note{color:#a15c00}
.severity-critical td{background:#fde2e1}.severity-warning td{background:#fff4d6}
pre{background:#f7f7f7;padding:0.75em;overflow-x:auto}img{max-width:100%;width:48em}
.methods{background:#f7f9fc;border-left:4px solid #3b6a99;padding:0.5em 1em}
.figure-links{font-size:85%;color:#555;margin-top:0}
"""


def _img(files_dir: Path, name: str, alt: str, formats: Sequence[str]) -> str:
    """The PNG of a figure, with links to its vector versions."""
    stem = name.rsplit(".", 1)[0]
    links = " · ".join(f'<a href="{_e(files_dir.name)}/{_e(stem)}.{f}">{f.upper()}</a>'
                       for f in formats if f != "png")
    img = (f'<img src="{_e(files_dir.name)}/{_e(name)}" alt="{_e(alt)}">' if "png" in formats
           else "")
    return img + (f'<p class="figure-links">Vector: {links}</p>' if links else "")


# ----------------------------------------------------------------------------------- methods

def _models_of(run: Run) -> list[dict[str, Any]]:
    """Model provenance entries of the run (cards where known), else the names it recorded."""
    entries = run.provenance.get("model_provenance")
    if isinstance(entries, list) and entries:
        return [e for e in entries if isinstance(e, dict)]
    names = sorted({str(m) for m in run.frames["model"] if m}) if Run.rows(run.frames) else []
    return [{"model": n, "card": None} for n in names]


def _sizing_sentence(entry: dict[str, Any]) -> str:
    s = entry.get("sizing_error") or {}
    parts = []
    if "synthetic_median_abs_ecd_error_pct" in s:
        parts.append(f"a median absolute ECD error of {_fmt(s['synthetic_median_abs_ecd_error_pct'], 2)} % "
                     "on held-out synthetic frames")
    if "emps_median_abs_ecd_error_pct" in s:
        d50 = s.get("emps_d50_error_pct")
        parts.append(f"{_fmt(s['emps_median_abs_ecd_error_pct'], 2)} % on the EMPS validation "
                     "images (real TEM/SEM)" + (f", D50 error {_fmt(d50, 2)} %" if d50 is not None
                                                 else ""))
    if "stem_median_abs_ecd_error_pct" in s:
        parts.append(f"{_fmt(s['stem_median_abs_ecd_error_pct'], 2)} % on held-out HAADF-STEM "
                     "images")
    return "; ".join(parts)


def methods_paragraph(run: Run, stats: Sequence[GroupStats]) -> str:
    """A methods paragraph (plain text) for a lab notebook or a paper: software, detector with
    version, hash and the sizing error its model card reports, calibration, exclusions and the
    statistics used."""
    prov = run.provenance
    sw = prov.get("software") or {}
    version = sw.get("nanoscout") or "(version not recorded)"
    made = ("measured offline from image files (nanoscout measure)"
            if prov.get("command") == "nanoscout measure"
            else "recorded live from the analysis daemon (nanoscout record)")
    detectors = [e for e in _models_of(run) if "classifier" not in str(e.get("model"))
                 and "lens" not in str(e.get("model"))]
    model_text = []
    for e in detectors:
        text = f"{e.get('name') or e.get('model')}"
        if e.get("version"):
            text += f" version {e['version']}"
        if e.get("sha256"):
            text += f" (ONNX sha256 {str(e['sha256'])[:12]}…)"
        sizing = _sizing_sentence(e)
        if sizing:
            text += f", whose model card reports {sizing}"
        elif e.get("card") is None:
            text += " (no model card was available to the recorder: its sizing error is unknown)"
        model_text.append(text)
    engines = sorted({str(x) for x in run.frames["engine"]}) if Run.rows(run.frames) else []
    n_border = int(run.particles["border"].sum()) if Run.rows(run.particles) else 0
    units = sorted({st.units for st in stats})
    calib = ("Lengths were calibrated with the pixel size each frame carried (nm)"
             if units == ["nm"] else
             "Frames without a pixel size were measured in pixels and are reported apart "
             "(units px); calibrated frames in nm" if "px" in units else
             "No particle lengths were measured")
    parts = [
        f"Particle sizes were {made} with nanoscout {version}"
        + (f" (Python {sw['python']})" if sw.get("python") else "") + ".",
        ("Particles were segmented by the detector " + "; and ".join(model_text)
         + (f", run with {', '.join(engines)}" if engines else "") + ".")
        if model_text else "The detection model was not recorded.",
        "Each particle's size is its equivalent circular diameter, ECD = 2·√(A/π), of the "
        f"projected area A. {calib}.",
        f"{n_border} particles touching the frame edge were excluded from every size and shape "
        "statistic.",
        "D10, D50 and D90 are number-weighted ECD quantiles (linear interpolation between "
        "order statistics: Hyndman-Fan type 7, NumPy's default) with percentile-bootstrap 95 % "
        f"confidence intervals ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}).",
        "A lognormal distribution was fitted by maximum likelihood (μ = mean ln d, "
        "σ = sd ln d); its goodness of fit was tested with the Kolmogorov-Smirnov and "
        "Anderson-Darling statistics of ln d against the fitted normal, with Monte-Carlo "
        f"p-values ({FIT_TEST_MC_SAMPLES} samples, parameters re-estimated per sample; at most "
        f"{FIT_TEST_SAMPLES} diameters, a seeded subsample beyond that) computed with SciPy.",
    ]
    return " ".join(parts)


def _fit_text(fq: FitQuality | None) -> str:
    if fq is None:
        return "<p>Too few particles (or all of one size) to test the fit.</p>"
    verdict = ("consistent with a lognormal distribution at the 5 % level"
               if min(fq.ks_pvalue, fq.ad_pvalue) >= 0.05 else
               "the lognormal fit is rejected at the 5 % level by at least one test")
    return (f'<p class="fit-quality">Goodness of fit on {fq.n} diameters: Kolmogorov-Smirnov '
            f'D = <span class="ks-statistic">{_fmt(fq.ks_statistic)}</span>, p = '
            f'<span class="ks-pvalue">{_fmt(fq.ks_pvalue, 3)}</span>; Anderson-Darling '
            f'A² = <span class="ad-statistic">{_fmt(fq.ad_statistic)}</span>, p = '
            f'<span class="ad-pvalue">{_fmt(fq.ad_pvalue, 3)}</span> — {verdict}.</p>')


# ---------------------------------------------------------------------------------- report

def build_report(run_path: str | Path, out_html: Path, *,
                 formats: Sequence[str] = ("png", "svg", "pdf"), bar: Bar | None = None) -> Path:
    """Write the HTML report of the run at ``run_path`` to ``out_html``; returns ``out_html``.

    Figures go to ``<out stem>_files/`` beside ``out_html``, linked relatively, in each of
    ``formats`` (``png`` at ``FIGURE_DPI``, shown in the page; ``svg``, ``pdf``: vector,
    linked). ``bar``: a progress bar advanced once per step. Raises
    :class:`nanoscout.wire.errors.ReaderError` when the run cannot be read.
    """
    run_path, out_html = Path(run_path), Path(out_html)
    formats = tuple(dict.fromkeys(formats))
    if out_html.is_dir():  # checked first: nothing is written beside it
        raise ConfigError(f"--out {out_html} is a folder: name the report's HTML file, e.g. "
                          f"{out_html / (run_path.stem + '_report.html')}")
    run = read_run(run_path)
    _check_times(run, run_path)
    files_dir = out_html.with_name(out_html.stem + "_files")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    p = run.particles
    t0 = _t0_ns(run)
    groups = _groups(run)
    if bar is not None:
        bar.total(2 * len(groups) + 1)
    stats: list[GroupStats] = []
    figures: list[str] = []
    for i, g in enumerate(groups):
        inner = g.particles & ~p["border"] if Run.rows(p) else g.particles
        ecd = p[_ecd_column(g.units)][inner] if Run.rows(p) else np.zeros(0)
        ar = p["aspect_ratio"][inner] if Run.rows(p) else np.zeros(0)
        rd = p["roundness"][inner] if Run.rows(p) else np.zeros(0)
        st = group_stats(g.source, g.units, ecd, n_border=int((g.particles & ~inner).sum()),
                         n_frames=int(g.frames.sum()), aspect_ratio=ar, roundness=rd)
        tracked = track_values(run, g.source, g.units)
        if tracked is not None:  # each particle once: statistics over tracks
            per_detection = st
            st = group_stats(g.source, g.units, tracked[0], n_frames=int(g.frames.sum()))
            st.basis = "particle"
            stats.append(st)
            stats.append(per_detection)
        else:
            stats.append(st)
        label = f"{_e(g.source)} ({_e(g.units)})"
        if bar is not None:
            bar.advance(note=f"{g.source}: statistics")
        if st.n == 0:
            figures.append(f"<h3>{label}</h3><p>No non-border particles in this group.</p>")
            if bar is not None:
                bar.advance()
            continue
        files_dir.mkdir(exist_ok=True)
        d = _positive(ecd if tracked is None else tracked[0])
        fq = fit_quality(d)
        names = (f"g{i}_ecd.png", f"g{i}_shape.png", f"g{i}_time.png")
        _ecd_figure(d, st, files_dir / names[0], formats)
        _shape_figure(ar[np.isfinite(ar)].astype(np.float64),
                      rd[np.isfinite(rd)].astype(np.float64), g.source, files_dir / names[1],
                      formats)
        assert t0 is not None  # a group with particles has a first frame
        _time_figure(_series(run, g, t0), g.source, g.units, files_dir / names[2], formats)
        if bar is not None:
            bar.advance(note=f"{g.source}: figures")
        figures.append(
            f"<h3>{label}</h3>"
            f'<p>Lognormal fit (maximum likelihood, μ = mean ln d, σ = std ln d): median '
            f'exp(μ) = <span class="lognormal-median">{_fmt(st.lognormal_median)}</span> '
            f'{_e(g.units)}, σ = <span class="lognormal-sigma">{_fmt(st.lognormal_sigma)}'
            f"</span>.</p>{_fit_text(fq)}"
            f"{_img(files_dir, names[0], f'ECD histogram of {g.source}', formats)}"
            f"<h4>Shape</h4>{_img(files_dir, names[1], f'shape histograms of {g.source}', formats)}"
            f"<h4>Over time</h4>{_img(files_dir, names[2], f'D50 over time of {g.source}', formats)}"
            + insitu_section(run, g.source, g.units, t0, files_dir, f"g{i}", formats, fmt=_fmt,
                             img=_img, figure=_figure, save=_save, seed=BOOTSTRAP_SEED))
    n_particles = Run.rows(p)
    if n_particles == 0:
        sizes = f'<p class="empty">{_e(_EMPTY_MESSAGE)}</p>'
    else:
        n_border = int(p["border"].sum())
        sizes = (
            f"<p>{n_particles} particles recorded; {n_border} touch the frame edge and are "
            "excluded from every size and shape statistic below (their size is cut by the "
            "frame). Particles are grouped by source and units: nm and px are never pooled. "
            "D10/D50/D90 are number-weighted ECD quantiles. Brackets give percentile-bootstrap "
            f"95 % confidence intervals ({BOOTSTRAP_RESAMPLES} resamples, seed "
            f"{BOOTSTRAP_SEED}). Where the particles were tracked, a row \"per particle\" counts "
            "each once (its median ECD) and its intervals are over those independent particles; "
            "the row \"per detection\" counts every detection of every frame (per-frame "
            "statistics: a particle seen on 50 frames is in it 50 times, so its intervals are "
            "too narrow for the specimen).</p>" + _summary_table(stats)
            + "<h2>Distributions</h2>" + "".join(figures))
    unfinished = _unfinished_measure(run)
    if unfinished is not None:  # said before its numbers, not only in the provenance
        sizes = f'<p class="note unfinished">This measurement was {unfinished}.</p>' + sizes
    methods = f'<p class="methods">{_e(methods_paragraph(run, stats))}</p>'
    title = f"nanoscout report: {run_path.name}"
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p>Run: <code>{_e(run_path)}</code>. Report written "
        f"{_e(dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat())}.</p>"
        f"<h2>Methods</h2>{methods}"
        f"<h2>Size statistics</h2>{sizes}"
        f"<h2>Alerts</h2>{_alerts_section(run)}"
        f"<h2>Provenance</h2>{_provenance_section(run)}"
        "</body></html>\n")
    tmp = out_html.with_name(out_html.name + ".tmp")
    try:
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(out_html)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the report {out_html}: {exc.strerror or exc}") from exc
    if bar is not None:
        bar.advance(note="written")
    return out_html


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m nanoscout.clients.report RUN --out REPORT.html``; prints the written path."""
    ap = argparse.ArgumentParser(prog="nanoscout report",
                                 description="HTML size-distribution report of a recorded run")
    ap.add_argument("run", type=Path, help="RUN.parquet folder or RUN.csv")
    ap.add_argument("--out", type=Path, default=None,
                    help="report HTML (default: <run stem>_report.html beside the run)")
    ap.add_argument("--figures", default="png,svg,pdf",
                    help="figure formats, comma-separated (default png,svg,pdf)")
    args = ap.parse_args(argv)
    run: Path = args.run
    out: Path = args.out or run.with_name(run.stem + "_report.html")
    try:
        written = build_report(run, out, formats=[f for f in args.figures.split(",") if f])
    except NanoscoutError as exc:
        print(f"nanoscout report: error: {exc}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
