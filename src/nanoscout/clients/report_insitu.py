"""The in-situ part of ``nanoscout report``: each particle counted once, and how they changed.

For a run whose particles carry a ``track_id`` (a live recording with tracking, or
``nanoscout measure --track``):

* :func:`track_values`: one ECD per tracked particle (its tracks-table median, off the frame
  edge) for the tracks that count (:func:`nanoscout.wire.tracks.qualifying`): the summary
  table's statistics and bootstrap intervals are computed over these independent units, never
  over the repeated detections of one particle;
* :func:`insitu_section`: the size distribution's evolution (a heat map of the ECD histogram
  over time), growth curves of the longest tracks with the tracks' median growth rate and its
  interval (percentile bootstrap over tracks), D50(t) and number density(t) with their 95 %
  intervals as the daemon published them (``stats.insitu``), coalescences and their rate, and
  the LSW ripening fit (mean radius cubed against time; the daemon's fit, drawn over the
  frames' values).

A recording that went on across a daemon restart holds several daemon runs, each numbering its
tracks and fields of view from 1: a track is its ``(daemon_run, track_id)``, never joined
across runs, and the section says how many runs the tracks come from.

Lengths are in the group's units; times in s since the run's first frame.
"""

from __future__ import annotations

import bisect
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.clients.runfile import Run
from nanoscout.wire.tracks import daemon_runs, frames_per_field, qualifying

__all__ = ["field_start_s", "insitu_section", "track_values"]

#: growth curves drawn (the longest tracks)
MAX_CURVES = 40
_INT64_MAX = 2**63 - 1


def track_values(run: Run, source: str, units: str) -> tuple[np.ndarray, int] | None:
    """The ECD (``units``) of each tracked particle of ``source`` that counts, and how many
    tracks the source has in all; None when its particles are not tracked."""
    t = run.tracks
    if not Run.rows(t):
        return None
    mine = (t["source"].astype(str) == source) & (t["units"].astype(str) == units)
    if not mine.any():
        return None
    sub = {k: v[mine] for k, v in t.items()}
    ok = qualifying(sub, frames_per_field(run.frames))
    v = sub["ecd_median"][ok].astype(np.float64)
    return v[np.isfinite(v) & (v > 0)], int(mine.sum())


def _stats_insitu(run: Run, source: str, units: str) -> list[tuple[float, dict[str, Any]]]:
    """(acquisition time of its frame, ns; insitu block) of the source's stats rows, in time
    order (the stats row's own ``t`` is when the daemon made it). A stats row's frame is the
    frame row of its (source, daemon run, seq) that the daemon finished last before it made
    the statistics: an adapter restarted during a recording numbers its frames from 0 again,
    and seq alone put the first session's statistics at the second session's times."""
    st, f = run.stats, run.frames
    out: list[tuple[float, dict[str, Any]]] = []
    if not Run.rows(st) or not Run.rows(f):
        return out
    # (source, daemon run, seq) -> [(t_done_ns, t_acq_ns)] of its frame rows, by t_done
    frames: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    for s, r, q, done, t in zip(f["source"], daemon_runs(f, Run.rows(f)).tolist(), f["seq"],
                                f["t_done_ns"], f["t_acq_ns"], strict=True):
        frames.setdefault((str(s), r, int(q)), []).append((int(done), int(t)))
    for rows in frames.values():
        rows.sort()
    for s, u, r, q, made, text in zip(st["source"].astype(str), st["units"].astype(str),
                                      daemon_runs(st, Run.rows(st)).tolist(), st["seq"],
                                      st["t_ns"], st["insitu"], strict=True):
        mine = frames.get((s, r, int(q)))
        if s != source or u != units or not text or not mine:
            continue
        i = bisect.bisect_right(mine, (int(made), _INT64_MAX)) - 1
        out.append((float(mine[max(i, 0)][1]), json.loads(str(text))))
    out.sort(key=lambda x: x[0])
    return out


def field_start_s(run: Run, source: str, t_frame_ns: float, t0_ns: int) -> float | None:
    """Time (s since ``t0_ns``) of the first frame of the field of view that the frame of
    ``source`` acquired at ``t_frame_ns`` belongs to: the origin of the daemon's in-situ fits
    in that frame's stats (their time counts from the field's first frame). None where the run
    has no such frame or no field for it (untracked). A field is one daemon run's: a restarted
    daemon numbers its fields from the start again."""
    f = run.frames
    if not Run.rows(f):
        return None
    src = f["source"].astype(str) == source
    t_acq = f["t_acq_ns"].astype(np.float64)
    fld = f["field"].astype(np.float64)
    runs = daemon_runs(f, Run.rows(f))
    here = src & (t_acq == float(t_frame_ns))
    if not here.any() or not np.isfinite(fld[here][0]):
        return None
    same = src & (fld == fld[here][0]) & (runs == runs[here][0])
    return float((t_acq[same].min() - t0_ns) / 1e9)


def _boot_median_ci(x: np.ndarray, seed: int) -> tuple[float, float]:
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    meds = np.median(x[rng.integers(0, x.size, size=(1000, x.size))], axis=1)
    lo, hi = np.quantile(meds, [0.025, 0.975])
    return float(lo), float(hi)


def insitu_section(run: Run, source: str, units: str, t0_ns: int, files_dir: Path,
                   prefix: str, formats: Sequence[str], *, fmt: Any, img: Any, figure: Any,
                   save: Any, seed: int) -> str:
    """HTML of the in-situ part of one ``(source, units)`` group (empty without tracks).

    ``fmt``, ``img``, ``figure``, ``save``: the report's number formatter, image tag, figure
    factory and saver (so both parts of the report look alike)."""
    t = run.tracks
    if not Run.rows(t):
        return ""
    mine = (t["source"].astype(str) == source) & (t["units"].astype(str) == units)
    if not mine.any():
        return ""
    tr = {k: v[mine] for k, v in t.items()}
    p = run.particles
    ecd_col = "ecd_nm" if units == "nm" else "ecd_px"
    sel = ((p["source"].astype(str) == source) & (p["units"].astype(str) == units)
           & ~p["border"] & (p["track_id"] > 0))
    t_s = (p["t_acq_ns"][sel] - t0_ns) / 1e9
    ecd = p[ecd_col][sel].astype(np.float64)
    tid = p["track_id"][sel].astype(np.int64)
    prun = daemon_runs(p, Run.rows(p))[sel]  # a track is its (daemon run, track id)
    ok = np.isfinite(ecd) & (ecd > 0)
    t_s, ecd, tid, prun = t_s[ok], ecd[ok], tid[ok], prun[ok]
    if ecd.size == 0:
        return ""
    files_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}_evolution.png", f"{prefix}_growth.png", f"{prefix}_d50_density.png",
             f"{prefix}_lsw.png"]
    u = html.escape(units)

    # 1. the ECD histogram over time
    times = np.unique(t_s)
    edges = np.geomspace(max(ecd.min() * 0.9, 1e-3), ecd.max() * 1.1, 41)
    heat = np.zeros((edges.size - 1, times.size))
    col = np.searchsorted(times, t_s)
    for j in range(times.size):
        h, _ = np.histogram(ecd[col == j], bins=edges)
        heat[:, j] = h / max(h.sum(), 1)
    fig, ax = figure(6.4, 3.6)
    tx = np.concatenate([times, [times[-1] + (times[-1] - times[0]) / max(times.size - 1, 1)
                                 if times.size > 1 else times[-1] + 1.0]])
    mesh = ax.pcolormesh(tx, edges, heat, cmap="viridis", shading="flat")
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"ECD ({units})")
    ax.set_title(f"{source}: size distribution over time (fraction of each frame's particles)")
    fig.colorbar(mesh, ax=ax, label="fraction per bin")
    save(fig, files_dir / names[0], formats)

    # 2. growth curves of the longest tracks
    order = np.argsort(-tr["n_sized"])[:MAX_CURVES]
    rates = tr["growth_per_s"].astype(np.float64)
    good = np.isfinite(rates) & (tr["n_sized"] >= 5)
    med = float(np.median(rates[good])) if good.any() else math.nan
    lo, hi = _boot_median_ci(rates[good], seed)
    fig, ax = figure(6.4, 3.6)
    tr_run = daemon_runs(tr, int(mine.sum()))
    for k in order.tolist():
        m = (tid == int(tr["track_id"][k])) & (prun == int(tr_run[k]))
        if m.sum() >= 2:
            ax.plot(t_s[m], ecd[m], lw=0.7, alpha=0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"ECD ({units})")
    ax.set_title(f"{source}: the {min(MAX_CURVES, order.size)} longest tracks")
    save(fig, files_dir / names[1], formats)

    # 3. D50(t) and density(t) with the daemon's intervals
    series = _stats_insitu(run, source, units)
    have_series = bool(series)
    if have_series:
        ts = np.array([(x[0] - t0_ns) / 1e9 for x in series])

        def get(key: str) -> np.ndarray:
            return np.array([np.nan if x[1].get(key) is None else x[1][key] for x in series],
                            dtype=np.float64)

        def band(key: str) -> tuple[np.ndarray, np.ndarray]:
            vals = [x[1].get(key) or (math.nan, math.nan) for x in series]
            return (np.array([v[0] for v in vals], np.float64),
                    np.array([v[1] for v in vals], np.float64))

        fig, axes = figure(6.4, 4.6, ncols=1)
        fig.clear()
        a1, a2 = fig.subplots(2, 1, sharex=True)
        d50, (b0, b1) = get("d50"), band("d50_ci")
        a1.fill_between(ts, b0, b1, alpha=0.3, label="95 % interval")
        a1.plot(ts, d50, lw=1.2, label="D50 of the frame")
        a1.set_ylabel(f"D50 ({units})")
        a1.legend(loc="best", fontsize=7)
        dens, (c0, c1) = get("density_per_um2"), band("density_ci")
        if np.isfinite(dens).any():
            a2.fill_between(ts, c0, c1, alpha=0.3)
            a2.plot(ts, dens, lw=1.2)
        a2.set_ylabel("particles / µm²")
        a2.set_xlabel("time (s)")
        save(fig, files_dir / names[2], formats)

    # 4. LSW: mean radius cubed against time, with the daemon's fit
    fit = series[-1][1].get("lsw") if have_series else None
    r3_t, r3 = [], []
    for j, tt in enumerate(times):
        v = ecd[col == j]
        if v.size:
            r3_t.append(tt)
            r3.append((v.mean() / 2.0) ** 3)
    fig, ax = figure(6.4, 3.6)
    ax.plot(r3_t, r3, "o", ms=3, label="mean radius³ of the frame")
    fit_text = "no fit (too few frames)"
    if fit and fit.get("k") is not None:
        # the daemon's time axis starts at the first frame of the field its last stats
        # speak of (the run's first frame only where the run has one field)
        start = field_start_s(run, source, series[-1][0], t0_ns)
        start = min(r3_t) if start is None else start
        tline = np.array([start, max(start, max(r3_t))])
        t_field = tline - start
        ax.plot(tline, fit["r0_cubed"] + fit["k"] * t_field, "-", lw=1.2,
                label="LSW fit <r>³ = r0³ + k t")
        fit_text = (f"k = <span class=\"lsw-k\">{fmt(fit['k'])}</span> ± "
                    f"{fmt(fit.get('k_se', math.nan))} {u}³/s, R² = "
                    f"<span class=\"lsw-r2\">{fmt(fit.get('r2') or math.nan)}</span> over "
                    f"{fit.get('n', 0)} frames ({fmt(fit.get('span_s', 0.0))} s) from t = "
                    f"<span class=\"lsw-t0\">{fmt(start)}</span> s, the first frame of its "
                    "field of view")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"<r>³ ({units}³)")
    ax.legend(loc="best", fontsize=7)
    save(fig, files_dir / names[3], formats)

    merged = int((tr["fate"].astype(str) == "merged").sum())
    split = int((tr["fate"].astype(str) == "split").sum())
    last = series[-1][1] if have_series else {}
    rate = last.get("coalescence_rate_per_s")
    vals = track_values(run, source, units)
    n_count = 0 if vals is None else int(vals[0].size)
    n_runs = len(set(tr_run.tolist()))
    runs_text = (f' from <span class="n-track-runs">{n_runs}</span> daemon runs (each '
                 "numbers its tracks from 1: a track never spans two)" if n_runs > 1 else "")
    return (
        f"<h4>In situ: {html.escape(source)}</h4>"
        f'<p><span class="n-tracks">{int(mine.sum())}</span> tracks{runs_text} ({n_count} '
        'count as particles: seen on enough frames, off the frame edge); <span class="n-merged">'
        f"{merged}</span> ended in a coalescence, {split} in a fragmentation"
        + (f"; coalescence rate {fmt(rate)} per s in the last field" if rate is not None
           else "")
        + f". Median growth rate dECD/dt of the {int(good.sum())} tracks with at least 5 sized "
        f'observations: <span class="growth">{fmt(med)}</span> {u}/s '
        f'<span class="ci">[{fmt(lo)}, {fmt(hi)}]</span> (percentile bootstrap over tracks). '
        f"Ripening: {fit_text}.</p>"
        + img(files_dir, names[0], f"size distribution over time of {source}", formats)
        + img(files_dir, names[1], f"growth curves of {source}", formats)
        + (img(files_dir, names[2], f"D50 and density over time of {source}", formats)
           if have_series else "")
        + img(files_dir, names[3], f"LSW ripening fit of {source}", formats))
