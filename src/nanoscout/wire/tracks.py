"""The tracks table: one row per tracked particle, computed from a run's particle rows.

The daemon publishes every detection with its ``track_id`` (protocol v1.4) and each frame's
drift and merge / split events (``det.drift``, ``det.tracking``); a recorded run keeps them in
its particle and frame tables. :func:`track_table` folds them into one row per ``(source,
daemon_run, track_id)`` — the same numbers for a live recording, ``nanoscout measure --track``
and any client that has the rows — so this module is the tracks table's one definition.

A daemon numbers its tracks and fields of view from 1 each time it starts: ``daemon_run``
(protocol 1.11, the daemon's start time in ns since the epoch; 0 where not known) tells the
runs of a recording that went on across a restart apart, and no track, field or merge / split
event is ever joined across two runs (:func:`daemon_runs`).

Columns (:data:`TRACK_COLUMNS`): ``source, daemon_run, field, track_id``; ``n_frames`` (observations),
``n_sized`` (of them off the frame edge), ``first_seq, last_seq, t_first_ns, t_last_ns,
duration_s``; positions on the specimen (the frame position minus the field's drift, px):
``x_first_px, y_first_px, x_last_px, y_last_px``; ECD (``ecd_first, ecd_last, ecd_median``)
and the growth rate ``growth_per_s`` (least-squares slope of ECD against time over the sized
observations) with its standard error ``growth_se_per_s``, all in ``units`` (nm, or px when
the frames were uncalibrated; ``*_per_s``: units per second, NaN below 3 sized observations);
``shape_class`` (the most frequent); ``fate``: ``merged`` (it coalesced into ``merged_into``),
``split`` (it broke up), else ``""``; ``parents``: the tracks that merged into it or that it
split from (space-separated ids).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["TRACK_COLUMNS", "daemon_runs", "frames_per_field", "linear_rate", "qualifying",
           "track_table"]

TRACK_COLUMNS: tuple[str, ...] = (
    "source", "daemon_run", "field", "track_id", "units", "n_frames", "n_sized", "first_seq", "last_seq",
    "t_first_ns", "t_last_ns", "duration_s", "x_first_px", "y_first_px", "x_last_px",
    "y_last_px", "ecd_first", "ecd_last", "ecd_median", "growth_per_s", "growth_se_per_s",
    "shape_class", "fate", "merged_into", "parents")


def linear_rate(t_s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` against ``t_s`` and its standard error (y unit per s);
    NaN below 3 points or without a time span."""
    t = np.asarray(t_s, np.float64)
    v = np.asarray(y, np.float64)
    n = t.size
    if n < 3:
        return math.nan, math.nan
    tm = t.mean()
    sxx = float(((t - tm) ** 2).sum())
    if not sxx > 0:
        return math.nan, math.nan
    slope = float(((t - tm) * (v - v.mean())).sum() / sxx)
    resid = v - v.mean() - slope * (t - tm)
    return slope, math.sqrt(float((resid**2).sum()) / (n - 2) / sxx)


def daemon_runs(columns: Mapping[str, Any], n: int) -> np.ndarray:
    """The ``daemon_run`` of each of the ``n`` rows of a table's columns, int64 (ns since the
    epoch); 0 where the column is missing or null (a run written before protocol 1.11, or
    without a daemon)."""
    if "daemon_run" not in columns:
        return np.zeros(n, np.int64)
    col = np.asarray(columns["daemon_run"])
    if col.dtype.kind in "iu":
        return col.astype(np.int64, copy=False)
    # nulls made the column float (or object): they are 0; an int64 column never passes here
    f = np.array([math.nan if v is None else float(v) for v in col.tolist()], np.float64)
    return np.where(np.isfinite(f), f, 0).astype(np.int64)


_Key = tuple[str, int, int]  # (source, daemon_run, track_id)


def _events(frames: Mapping[str, np.ndarray]) -> tuple[dict[_Key, int], dict[_Key, str],
                                                        dict[_Key, list[int]]]:
    """merged_into, fate and parents by (source, daemon_run, track) from the frames'
    ``events`` JSON."""
    import json

    into: dict[_Key, int] = {}
    fate: dict[_Key, str] = {}
    parents: dict[_Key, list[int]] = {}
    if "events" not in frames:
        return into, fate, parents
    runs = daemon_runs(frames, len(frames["events"]))
    for source, run, text in zip(frames["source"], runs.tolist(), frames["events"],
                                 strict=True):
        if not text:
            continue
        s = str(source)
        for e in json.loads(str(text)):
            kids, pars = list(e.get("children", [])), list(e.get("parents", []))
            if e.get("kind") == "merge" and kids:
                for p in pars:
                    if p != kids[0]:
                        into[(s, run, int(p))] = int(kids[0])
                        fate[(s, run, int(p))] = "merged"
                parents.setdefault((s, run, int(kids[0])), []).extend(
                    int(p) for p in pars if p != kids[0])
            elif e.get("kind") == "split" and pars:
                for k in kids:
                    if k != pars[0]:
                        parents.setdefault((s, run, int(k)), []).append(int(pars[0]))
                fate[(s, run, int(pars[0]))] = "split"
    return into, fate, parents


def track_table(particles: Mapping[str, np.ndarray], frames: Mapping[str, np.ndarray]
                ) -> dict[str, list[Any]]:
    """The tracks table (:data:`TRACK_COLUMNS`) of a run's particle and frame columns
    (numpy arrays, as :class:`nanoscout.clients.runfile.Run` hands them out): one row per
    ``(source, daemon_run, track_id)``, so tracks of two daemon runs are never joined. Rows
    without a track (``track_id`` 0) are left out; lengths in nm where the particle rows have
    them, else px. A particle row's drift and field are those of the frame row of its source,
    daemon run, ``seq`` and acquisition time (an adapter restarted under one daemon numbers
    its frames from 0 again)."""
    out: dict[str, list[Any]] = {c: [] for c in TRACK_COLUMNS}
    if "track_id" not in particles or len(particles["track_id"]) == 0:
        return out
    raw = np.asarray(particles["track_id"], np.float64)  # a run before v1.4: null (NaN)
    tid = np.where(np.isfinite(raw), raw, 0).astype(np.int64)
    keep = tid > 0
    if not keep.any():
        return out
    run = daemon_runs(particles, keep.size)[keep]
    src = np.asarray(particles["source"]).astype(str)[keep]
    tid = tid[keep]
    seq = np.asarray(particles["seq"], np.int64)[keep]
    t_ns = np.asarray(particles["t_acq_ns"], np.int64)[keep]
    x = np.asarray(particles["x"], np.float64)[keep]
    y = np.asarray(particles["y"], np.float64)[keep]
    border = np.asarray(particles["border"], bool)[keep]
    ecd_nm = np.asarray(particles["ecd_nm"], np.float64)[keep]
    ecd_px = np.asarray(particles["ecd_px"], np.float64)[keep]
    shape = np.asarray(particles["shape_class"]).astype(str)[keep]
    # the frame's drift and field, by (source, daemon_run, seq, acquisition time): an adapter
    # restarted under one daemon numbers its frames from 0 again (its frames took the drift
    # and field of the other session's frame of the same number)
    fkey: dict[tuple[str, int, int, int], tuple[int, float, float]] = {}
    if "field" in frames and len(frames["seq"]):
        for s, r, q, ta, fld, dx, dy in zip(np.asarray(frames["source"]).astype(str),
                                            daemon_runs(frames, len(frames["seq"])).tolist(),
                                            frames["seq"], frames["t_acq_ns"], frames["field"],
                                            frames["drift_x_px"], frames["drift_y_px"],
                                            strict=True):
            fkey[(s, r, int(q), int(ta))] = (int(fld) if np.isfinite(fld) else 0,
                                             float(dx) if np.isfinite(dx) else 0.0,
                                             float(dy) if np.isfinite(dy) else 0.0)
    where = [fkey.get((s, int(r), int(q), int(ta)), (0, 0.0, 0.0))
             for s, r, q, ta in zip(src, run, seq, t_ns, strict=True)]
    fld = np.array([w[0] for w in where], np.int64)
    dxy = np.array([w[1:] for w in where], np.float64).reshape(-1, 2)
    into, fate, parents = _events(frames)
    order = np.lexsort((t_ns, tid, run, src))
    src, run, tid, seq, t_ns = src[order], run[order], tid[order], seq[order], t_ns[order]
    x, y, border, shape, fld = x[order], y[order], border[order], shape[order], fld[order]
    ecd_nm, ecd_px, dxy = ecd_nm[order], ecd_px[order], dxy[order]
    cut = np.nonzero((src[1:] != src[:-1]) | (run[1:] != run[:-1])
                     | (tid[1:] != tid[:-1]))[0] + 1
    for a, b in zip(np.concatenate([[0], cut]), np.concatenate([cut, [src.size]]),
                    strict=True):
        sl = slice(int(a), int(b))
        nm = bool(np.isfinite(ecd_nm[sl]).all())
        e = ecd_nm[sl] if nm else ecd_px[sl]
        sized = ~border[sl]
        es, ts = e[sized], (t_ns[sl][sized] - t_ns[sl][0]) / 1e9
        rate, se = linear_rate(ts, es)
        classes, counts = np.unique(shape[sl], return_counts=True)
        key = (str(src[a]), int(run[a]), int(tid[a]))
        xs, ys = x[sl] - dxy[sl, 0], y[sl] - dxy[sl, 1]
        row = {
            "source": key[0], "daemon_run": key[1], "field": int(fld[a]), "track_id": key[2],
            "units": "nm" if nm else "px", "n_frames": int(b - a), "n_sized": int(sized.sum()),
            "first_seq": int(seq[a]), "last_seq": int(seq[b - 1]),
            "t_first_ns": int(t_ns[a]), "t_last_ns": int(t_ns[b - 1]),
            "duration_s": (int(t_ns[b - 1]) - int(t_ns[a])) / 1e9,
            "x_first_px": float(xs[0]), "y_first_px": float(ys[0]),
            "x_last_px": float(xs[-1]), "y_last_px": float(ys[-1]),
            "ecd_first": float(es[0]) if es.size else math.nan,
            "ecd_last": float(es[-1]) if es.size else math.nan,
            "ecd_median": float(np.median(es)) if es.size else math.nan,
            "growth_per_s": rate, "growth_se_per_s": se,
            "shape_class": str(classes[int(np.argmax(counts))]),
            "fate": fate.get(key, ""), "merged_into": into.get(key, 0),
            "parents": " ".join(str(p) for p in sorted(set(parents.get(key, []))))}
        for c in TRACK_COLUMNS:
            out[c].append(row[c])
    return out


def frames_per_field(frames: Mapping[str, Any]) -> dict[tuple[str, int, int], int]:
    """Frames of each field of view of a run's frame columns, by (source, daemon_run, field):
    a restarted daemon numbers its fields from the start again (field 0: untracked)."""
    out: dict[tuple[str, int, int], int] = {}
    n = len(frames["source"]) if "source" in frames else 0
    if not n:
        return out
    fields = np.asarray(frames["field"], np.float64) if "field" in frames else np.zeros(n)
    for s, r, fld in zip(np.asarray(frames["source"]).astype(str),
                         daemon_runs(frames, n).tolist(), fields.tolist(), strict=True):
        key = (s, r, int(fld) if math.isfinite(fld) else 0)
        out[key] = out.get(key, 0) + 1
    return out


def qualifying(table: Mapping[str, Sequence[Any]],
               frames_per_field: Mapping[tuple[str, int, int], int],
               min_track_frames: int = 3) -> np.ndarray:
    """Which rows of a tracks table count as particles: seen on at least
    ``min_track_frames`` frames, or on every frame of a field imaged fewer times
    (``frames_per_field``: (source, daemon_run, field) -> frames, :func:`frames_per_field`),
    with a size off the frame edge."""
    n = np.asarray(table["n_frames"], np.int64)
    runs = daemon_runs(table, n.size).tolist()
    need = np.array([min(min_track_frames, max(1, frames_per_field.get((str(s), r, int(f)), 1)))
                     for s, r, f in zip(table["source"], runs, table["field"], strict=True)],
                    np.int64)
    return (n >= need) & (np.asarray(table["n_sized"], np.int64) > 0)
