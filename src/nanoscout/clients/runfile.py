"""A recorded run on disk: particles, frames, alerts and statistics, in crash-safe batches.

Written by ``nanoscout record`` (the live daemon's results) and ``nanoscout measure`` (files
analysed offline): the same format, so ``nanoscout report`` reads both. Two layouts, chosen by
the output name:

* ``RUN.parquet`` — a folder that **any Parquet reader opens in one line as the particle
  table**: ``pd.read_parquet("RUN.parquet")``, ``pyarrow.parquet.read_table("RUN.parquet")``,
  ``polars.read_parquet("RUN.parquet/*.parquet")``. The particle parts are the folder's own
  ``part-000001.parquet`` ...; the other tables sit in sub-folders whose names start with ``_``
  (which Parquet dataset readers skip): ``_frames/``, ``_alerts/``, ``_stats/``, ``_tracks/``
  (written when the run is closed), and the provenance is ``_run.json``. Read another table
  with ``pd.read_parquet("RUN.parquet/_frames")``.
  Each part is written under a temporary ``.``-name, fsynced and renamed into place, so after a
  crash (even ``kill -9``) every part present is complete: the run loses at most the batch
  being written.
* ``RUN.csv`` — ``RUN.csv`` (particles), ``RUN.frames.csv``, ``RUN.alerts.csv``,
  ``RUN.stats.csv``, ``RUN.tracks.csv`` (at close) and ``RUN.json``; rows are appended,
  flushed and fsynced per batch. A crash
  can leave a partial last line, which :func:`read_run` drops. Times are ISO 8601 (UTC).
  A text cell that a spreadsheet would evaluate as a formula (``=``, ``+``, ``-``, ``@``, a tab
  or a carriage return first: a file named ``=HYPERLINK(...).tif``) is written with a ``'`` in
  front (:mod:`nanoscout.clients.spreadsheet`); :func:`read_run` takes it away again, so both
  layouts read back the same text.

Beside either layout, ``measure`` writes ``RUN.classes.csv`` (:func:`classes_path`, one row per
image: :data:`CLASS_COLUMNS` then one probability per class) when its pipeline classifies.
A new run refuses to start where any file it may write exists already; :func:`delete_run`
deletes only what is recognisably a nanoscout run (its provenance, its table headers).

Temporary files. A writer killed while it writes (``kill -9``, a power cut) leaves the file it
was writing under its temporary ``.``-name: a Parquet part (``.part-000007.parquet.tmp``, 4 B to
tens of KiB), the provenance (``._run.json.tmp``, ``.RUN.json.tmp``) or the tracks table. No
reader uses them; :func:`clean_leftovers` removes them, and :func:`read_run` (``nanoscout
report``) and :func:`delete_run` call it, so they do not accumulate. A live writer holds an
exclusive ``flock`` on its run (the ``RUN.parquet`` folder, or ``RUN.csv``) from its start to
:meth:`RunWriter.close`; the lock is the operating system's, released when its process dies,
so a run some writer still holds is never cleaned (nor, where the platform has no ``flock``,
any run).

A batch writes its particle, alert and stats rows first and its frame rows last; :func:`read_run`
keeps only particle rows whose frame row exists, so a run cut anywhere is consistent.

Columns. Times are ``timestamp[ns, UTC]`` (pandas ``datetime64[ns, UTC]``); stage in µm, NaN
without a stage position; ``pixel_size_nm`` NaN when uncalibrated. Lengths are unit-honest:
``*_px`` columns always hold pixels, ``*_nm`` columns nanometres and are NaN for uncalibrated
frames (never pixels under an ``_nm`` name). Every batch table ends with ``daemon_run``: the
daemon process that made the row (protocol 1.11: its start time, ns since the epoch), so a
recording that went on across a daemon restart keeps the two runs apart (their track ids,
fields and statistics start again); 0 where not known (``measure``, a daemon before 1.11),
null in runs written before it.

* particles: ``source, seq, t_acq, file, index, units, pixel_size_nm, stage_x_um, stage_y_um``
  then the particle table's columns (:data:`nanoscout.wire.tables.PARTICLE_TABLE_COLUMNS`:
  ``id, x, y, bbox_x0..bbox_y1, area_px2, area_nm2, ecd_px, ecd_nm, ...``);
  (``track_id``: the particle's identity across frames within one ``daemon_run``, 0
  untracked);
* frames: ``source, seq, t_acq, t_recv, t_done, latency_ms, n, units, pixel_size_nm,
  stage_x_um, stage_y_um, height, width, modality, engine, model, working_scale,
  base_network_only, size_hint, noise, smoothing_px, scale_agreed, file, index, meta``
  (``latency_ms``: :attr:`~nanoscout.wire.protocol.DetHeader.latency_ms`, NaN where the
  daemon's times give none, a result done before its frame arrived;
  ``base_network_only``: an adapted model's base network analysed the frame alone,
  ``det.base_network_only``, null from older daemons;
  ``size_hint``: what an operator's particle size range did to the working scale,
  ``det.size_hint``: agreed, applied, uncalibrated, unused, empty without a range;
  ``noise``: the frame's white noise as a fraction of its normalised range and
  ``smoothing_px``: the Gaussian (frame px, 0 none) it was smoothed by before the network,
  ``det.noise`` / ``det.smoothing_px``, NaN where the model does not measure it;
  ``scale_agreed``: whether two working-scale estimation passes agreed (``det.scale_agreed``;
  false: the card's fallback chose the scale; null: nothing estimated, or an older daemon);
  ``meta``: the frame header's free map as JSON; ``file``/``index`` taken from it, or ``file``
  from the writer where its caller gives it (``measure``: the full input path, which the
  frame header's 1024-character ``meta`` strings cannot always hold); text that is not valid
  UTF-8, an undecodable file name's bytes, is written as :func:`nanoscout.wire.codec.wire_text`
  escapes (``lat\\xe9in.png``)),
  then the tracker's ``field, drift_x_px, drift_y_px, drift_x_nm, drift_y_nm, tracks_active``
  and ``events`` (the merge / split events as JSON); NaN / empty without tracking;
* alerts: ``source, seq, t_acq, rule, kind, severity, value, threshold, explanation, units,
  stage_x_um, stage_y_um, n``;
* stats: ``source, seq, t, units`` and for ``window`` and ``cumulative``: ``_n_frames,
  _count, _ecd_mean, _ecd_sd, _ecd_d10, _ecd_d50, _ecd_d90, _density_per_um2`` (ECD in
  ``units``), then ``drift`` and ``clusters`` (JSON), then the statistics that count each
  tracked particle once: ``unique_count, unique_ecd_d50, unique_ecd_d50_lo, unique_ecd_d50_hi``
  and ``unique`` / ``insitu`` (the v1.4 blocks as JSON);
* tracks: one row per tracked particle, ``(source, daemon_run, track_id)``
  (:data:`nanoscout.wire.tracks.TRACK_COLUMNS`: its field, frames, positions, ECD, growth
  rate with its standard error, fate), computed from the particle and frame rows when the run
  is closed (:func:`nanoscout.wire.tracks.track_table`); a run cut before that gets it
  computed when read.

:func:`read_run` reads both layouts (and the first format, ``nanoscout-run/1``) with pyarrow
(each table's Parquet parts in one dataset scan, when they share one schema, as one writer's do);
:class:`Run` hands the tables out as pyarrow Tables, pandas DataFrames or numpy columns.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import weakref
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from nanoscout.clients.durable import fsync_dir, replace_durably
from nanoscout.clients.provenance import write_json
from nanoscout.clients.spreadsheet import plain_text_columns, text_columns
from nanoscout.wire.codec import wire_text
from nanoscout.wire.errors import ConfigError, ProtocolError, ReaderError
from nanoscout.wire.protocol import AlertHeader, DetHeader, StatsHeader
from nanoscout.wire.tables import PARTICLE_TABLE_COLUMNS, html_table, particle_columns
from nanoscout.wire.tracks import TRACK_COLUMNS, track_table

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["ALERT_COLUMNS", "CLASS_COLUMNS", "FORMAT", "FRAME_COLUMNS", "PARTICLE_COLUMNS",
           "STATS_COLUMNS", "TABLES", "TRACK_COLUMNS", "Run", "RunWriter", "classes_path",
           "clean_leftovers", "delete_run", "read_run"]

log = logging.getLogger("nanoscout.runfile")

#: the run format written here (``run.json`` / ``_run.json`` ``format``)
FORMAT = "nanoscout-run/2"

PARTICLE_COLUMNS: tuple[str, ...] = (
    "source", "seq", "t_acq", "file", "index", "units", "pixel_size_nm", "stage_x_um",
    "stage_y_um", *PARTICLE_TABLE_COLUMNS, "daemon_run")
FRAME_COLUMNS: tuple[str, ...] = (
    "source", "seq", "t_acq", "t_recv", "t_done", "latency_ms", "n", "units",
    "pixel_size_nm", "stage_x_um", "stage_y_um", "height", "width", "modality", "engine",
    "model", "working_scale", "base_network_only", "size_hint", "noise", "smoothing_px",
    "scale_agreed", "file", "index", "meta", "field",
    "drift_x_px", "drift_y_px",
    "drift_x_nm", "drift_y_nm", "tracks_active", "events", "daemon_run")
ALERT_COLUMNS: tuple[str, ...] = (
    "source", "seq", "t_acq", "rule", "kind", "severity", "value", "threshold",
    "explanation", "units", "stage_x_um", "stage_y_um", "n", "daemon_run")
_STATS_BLOCK = ("n_frames", "count", "ecd_mean", "ecd_sd", "ecd_d10", "ecd_d50", "ecd_d90",
                "density_per_um2")
STATS_COLUMNS: tuple[str, ...] = (
    "source", "seq", "t", "units", *(f"{w}_{c}" for w in ("window", "cumulative")
                                     for c in _STATS_BLOCK), "drift", "clusters",
    "unique_count", "unique_ecd_d50", "unique_ecd_d50_lo", "unique_ecd_d50_hi", "unique",
    "insitu", "daemon_run")
#: the tables written batch by batch
TABLES: dict[str, tuple[str, ...]] = {"particles": PARTICLE_COLUMNS, "frames": FRAME_COLUMNS,
                                      "alerts": ALERT_COLUMNS, "stats": STATS_COLUMNS}
#: the first columns of ``RUN.classes.csv`` (then ``p_<class>`` per class)
CLASS_COLUMNS: tuple[str, ...] = ("file", "index", "top_class", "probability", "novelty")
#: every table of a run: the batch tables and the tracks table (written at close)
_ALL: dict[str, tuple[str, ...]] = {**TABLES, "tracks": TRACK_COLUMNS}
#: write order of a batch: frames last (a frame row commits its particle rows)
_WRITE_ORDER = ("particles", "alerts", "stats", "frames")
_STRING = {"source", "file", "units", "shape_class", "modality", "engine", "model", "meta",
           "rule", "kind", "severity", "explanation", "drift", "clusters", "events", "unique",
           "insitu", "fate", "parents", "size_hint"}
_TIME = {"t_acq", "t_recv", "t_done", "t"}
_INT64 = {"seq", "index", "n", "height", "width", "window_n_frames", "window_count",
          "cumulative_n_frames", "cumulative_count", "track_id", "n_frames", "n_sized",
          "first_seq", "last_seq", "t_first_ns", "t_last_ns", "merged_into", "daemon_run"}
_INT32 = {"bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}
_UINT = {"id": "uint32", "cluster": "uint8"}
_BOOL = {"border", "base_network_only", "scale_agreed"}


def _type(column: str) -> pa.DataType:
    import pyarrow as pa

    if column in _STRING:
        return pa.string()
    if column in _TIME:
        return pa.timestamp("ns", tz="UTC")
    if column in _INT64:
        return pa.int64()
    if column in _INT32:
        return pa.int32()
    if column in _UINT:
        return pa.uint32() if _UINT[column] == "uint32" else pa.uint8()
    if column in _BOOL:
        return pa.bool_()
    return pa.float64()


def schema(table: str) -> pa.Schema:
    """The Arrow schema of one run table (``particles``, ``frames``, ``alerts``, ``stats``,
    ``tracks``)."""
    import pyarrow as pa

    if table == "tracks":
        return pa.schema([(c, pa.int64() if c == "field" else _type(c))
                          for c in TRACK_COLUMNS])
    return pa.schema([(c, _type(c)) for c in _ALL[table]])


def _stage(stage: Any) -> tuple[float, float]:
    return (math.nan, math.nan) if stage is None else (stage.x_um, stage.y_um)


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _file_index(meta: dict[str, Any]) -> tuple[str, int]:
    index = meta.get("index", -1)
    return wire_text(str(meta.get("file", ""))), int(index) if isinstance(index, int | float) else -1


def det_rows(header: DetHeader, table: np.ndarray,
             file: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (frame row, particle columns) for one ``det`` message; ``file``: the frame's
    file as the run records it (default: the header's ``meta["file"]``)."""
    sx, sy = _stage(header.stage)
    file_meta, index = _file_index(header.meta)
    file = file_meta if file is None else wire_text(file)
    frame = {"source": header.source, "seq": header.seq, "t_acq": header.t_acq_ns,
             "t_recv": header.t_recv_ns, "t_done": header.t_done_ns,
             "latency_ms": _nan(None if (lat := header.latency_ms) is None else round(lat, 3)),
             "n": header.n, "units": header.units,
             "pixel_size_nm": _nan(header.pixel_size_nm), "stage_x_um": sx, "stage_y_um": sy,
             "height": header.shape[0], "width": header.shape[1],
             "modality": header.modality or "", "engine": header.engine, "model": header.model,
             "working_scale": _nan(header.working_scale),
             "base_network_only": header.base_network_only,
             "size_hint": header.size_hint or "", "noise": _nan(header.noise),
             "smoothing_px": _nan(header.smoothing_px), "scale_agreed": header.scale_agreed,
             "file": file, "index": index,
             "meta": json.dumps(header.meta, sort_keys=True), **_tracking_row(header),
             "daemon_run": header.daemon_run or 0}
    n = len(table)
    cols: dict[str, Any] = {
        "source": [header.source] * n, "seq": np.full(n, header.seq, np.int64),
        "t_acq": np.full(n, header.t_acq_ns, np.int64), "file": [file] * n,
        "index": np.full(n, index, np.int64), "units": [header.units] * n,
        "pixel_size_nm": np.full(n, _nan(header.pixel_size_nm)),
        "stage_x_um": np.full(n, sx), "stage_y_um": np.full(n, sy)}
    cols.update(particle_columns(table, header.units, header.pixel_size_nm))
    cols["daemon_run"] = np.full(n, header.daemon_run or 0, np.int64)
    return frame, cols


def _tracking_row(header: DetHeader) -> dict[str, Any]:
    """The frame row's tracker columns (NaN / empty without tracking)."""
    d, t = header.drift, header.tracking
    return {"field": math.nan if d is None else float(d.field),
            "drift_x_px": math.nan if d is None else d.x_px,
            "drift_y_px": math.nan if d is None else d.y_px,
            "drift_x_nm": math.nan if d is None else _nan(d.x_nm),
            "drift_y_nm": math.nan if d is None else _nan(d.y_nm),
            "tracks_active": math.nan if t is None else float(t.active),
            "events": "" if t is None or not t.events else json.dumps(
                [e.model_dump(mode="json") for e in t.events])}


def alert_row(header: AlertHeader) -> dict[str, Any]:
    """Return the alerts-table row of one ``alert`` message."""
    sx, sy = _stage(header.stage)
    return {"source": header.source, "seq": header.seq, "t_acq": header.t_acq_ns,
            "rule": header.rule, "kind": header.kind, "severity": header.severity,
            "value": header.value, "threshold": header.threshold,
            "explanation": header.explanation, "units": header.units, "stage_x_um": sx,
            "stage_y_um": sy, "n": header.n, "daemon_run": header.daemon_run or 0}


def _block(block: Any, prefix: str) -> dict[str, Any]:
    """Flat columns of a statistics block (a StatsBlock, or its dict form)."""
    ecd = block.get("ecd") or {}
    return {f"{prefix}_n_frames": int(block.get("n_frames") or 0),
            f"{prefix}_count": int(block.get("count") or 0),
            **{f"{prefix}_ecd_{k}": _nan(ecd.get(k)) for k in ("mean", "sd", "d10", "d50", "d90")},
            f"{prefix}_density_per_um2": _nan(block.get("number_density_per_um2"))}


def stats_row(header: StatsHeader) -> dict[str, Any]:
    """Return the stats-table row of one ``stats`` message (histograms left out)."""
    u = header.unique
    ci = None if u is None else u.ecd_d50_ci
    return {"source": header.source, "seq": header.seq, "t": header.t_ns, "units": header.units,
            **_block(header.window, "window"), **_block(header.cumulative, "cumulative"),
            "drift": json.dumps(header.drift.model_dump(mode="json"), sort_keys=True),
            "clusters": "" if header.clusters is None else json.dumps(header.clusters,
                                                                       default=str),
            "unique_count": math.nan if u is None else float(u.count),
            "unique_ecd_d50": math.nan if u is None else _nan(u.ecd.d50),
            "unique_ecd_d50_lo": math.nan if ci is None else ci[0],
            "unique_ecd_d50_hi": math.nan if ci is None else ci[1],
            "unique": "" if u is None else json.dumps(u.model_dump(mode="json")),
            "insitu": "" if header.insitu is None else json.dumps(
                header.insitu.model_dump(mode="json")),
            "daemon_run": header.daemon_run or 0}


def _arrow_table(name: str, cols: dict[str, list[Any]]) -> pa.Table:
    """Build a typed table from buffered columns (each a list of scalars or of arrays)."""
    import pyarrow as pa

    arrays = []
    for c in TABLES[name]:
        chunks = cols[c]
        if chunks and isinstance(chunks[0], np.ndarray):
            values: Any = np.concatenate(chunks)
        elif chunks and isinstance(chunks[0], list):
            values = [v for chunk in chunks for v in chunk]
        else:
            values = chunks
        if c in _TIME:
            arrays.append(pa.array(np.asarray(values, np.int64), pa.int64()).cast(_type(c)))
        elif isinstance(values, np.ndarray) and values.dtype == object:
            arrays.append(pa.array(values.tolist(), _type(c)))
        else:
            arrays.append(pa.array(values, _type(c)))
    return pa.Table.from_arrays(arrays, schema=schema(name))


_R = TypeVar("_R")


def _stored(what: str, rows: Callable[[], _R]) -> _R:
    """``rows()``, the rows of the message ``what`` names; ProtocolError when its values
    cannot become rows."""
    try:
        return rows()
    except (OverflowError, ValueError, TypeError) as exc:
        raise ProtocolError(f"{what} cannot be stored: {exc!s:.200}") from exc


def _joined(tables: list[pa.Table]) -> pa.Table:
    """One table of the messages' tables of one kind (typed as they were queued)."""
    import pyarrow as pa

    return pa.concat_tables(tables).combine_chunks()


class RunWriter:
    """Buffers rows and writes them as one batch per table at :meth:`flush` (crash-safe)."""

    def __init__(self, out: Path, provenance: dict[str, Any]) -> None:
        out = Path(out)
        if out.suffix == ".parquet":
            self.fmt = "parquet"
        elif out.suffix == ".csv":
            self.fmt = "csv"
        else:
            raise ConfigError(f"--out {out}: name it RUN.parquet or RUN.csv")
        self.out = out
        #: each queued message's rows, already typed (one table per message), by table
        self._tables: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._pending = dict.fromkeys(TABLES, 0)
        self._parts = 0
        self.counts = dict.fromkeys(TABLES, 0)
        if self.fmt == "parquet":
            if out.exists() and any(out.iterdir()):
                raise ConfigError(f"{out} exists and is not empty: choose a new run name "
                                  "(measure: --overwrite replaces it)")
            _refuse_existing([classes_path(out)])
            out.mkdir(parents=True, exist_ok=True)
            self._meta_path = out / "_run.json"
            _claim(self._meta_path, b"{}\n")  # two writers started at once: one gets the name
            # held by the one that got it, before any temporary file is written:
            # clean_leftovers never touches them
            self._unlock = _hold(self, out)
            for t in TABLES:
                if t != "particles":
                    (out / f"_{t}").mkdir(exist_ok=True)
        else:
            _refuse_existing(_csv_run_files(out) + [classes_path(out)])
            out.parent.mkdir(parents=True, exist_ok=True)
            self._meta_path = out.with_suffix(".json")
            for t, p in self._csv_paths().items():
                _claim(p, (",".join(TABLES[t]) + "\n").encode())
                if t == "particles":  # RUN.csv, claimed first: held before any temporary file
                    self._unlock = _hold(self, p)
        self.write_provenance({"format": FORMAT, **provenance})

    def _csv_paths(self) -> dict[str, Path]:
        return {"particles": self.out, "frames": self.out.with_suffix(".frames.csv"),
                "alerts": self.out.with_suffix(".alerts.csv"),
                "stats": self.out.with_suffix(".stats.csv")}

    @property
    def provenance_path(self) -> Path:
        """Where the provenance JSON is (``RUN.parquet/_run.json`` or ``RUN.json``)."""
        return self._meta_path

    def write_provenance(self, provenance: dict[str, Any]) -> None:
        """(Re)write the run's provenance JSON atomically (a full disk: the last whole
        provenance stays)."""
        write_json(self._meta_path, {"format": FORMAT, **provenance})

    def _queue(self, what: str, rows: dict[str, tuple[dict[str, Any], int]]) -> None:
        """Queue one message's rows (``table: (row, number of rows)``), converted to their
        tables' types here, once: all of them, or none (ProtocolError naming ``what``). So a row
        that no table can store never reaches :meth:`flush`, where it would cost the whole
        batch."""
        import pyarrow as pa

        typed = {}
        for table, (row, _) in rows.items():
            try:
                typed[table] = _arrow_table(table, {c: [v] for c, v in row.items()})
            except (pa.ArrowException, OverflowError, ValueError, TypeError) as exc:
                raise ProtocolError(f"{what} cannot be stored: its {table} row: "
                                    f"{exc!s:.200}") from exc
        for table, (_, n) in rows.items():
            self._tables[table].append(typed[table])
            self._pending[table] += n

    def mark(self) -> dict[str, tuple[int, int]]:
        """Where the queued rows of each table end now, for :meth:`take_back`."""
        return {t: (len(self._tables[t]), self._pending[t]) for t in self._tables}

    def take_back(self, mark: dict[str, tuple[int, int]]) -> None:
        """Drop the rows queued since ``mark`` (:meth:`mark`, taken after the last flush or
        later): an interrupted file's, so that the next flush commits whole files only."""
        for t, (n_parts, n_rows) in mark.items():
            del self._tables[t][n_parts:]
            self._pending[t] = n_rows

    def add_det(self, header: DetHeader, table: np.ndarray, *, file: str | None = None) -> None:
        """Queue one frame's detections; ``file``: its file as the run records it (default:
        the header's ``meta["file"]``). Raises ProtocolError, queueing nothing, when its rows
        cannot be stored (the run goes on without them)."""
        what = f"det {header.source}#{header.seq}"
        frame, cols = _stored(what, lambda: det_rows(header, table, file))
        self._queue(what, {"particles": (cols, len(table)), "frames": (frame, 1)})

    def add_alert(self, header: AlertHeader) -> None:
        """Queue one alert; ProtocolError, queueing nothing, when it cannot be stored."""
        what = f"alert {header.source}#{header.seq}"
        self._queue(what, {"alerts": (_stored(what, lambda: alert_row(header)), 1)})

    def add_stats(self, header: StatsHeader) -> None:
        """Queue one statistics snapshot; ProtocolError, queueing nothing, when it cannot be
        stored."""
        what = f"stats {header.source}#{header.seq}"
        self._queue(what, {"stats": (_stored(what, lambda: stats_row(header)), 1)})

    @property
    def pending_frames(self) -> int:
        """Frames waiting for the next flush."""
        return self._pending["frames"]

    @property
    def pending(self) -> int:
        """Rows waiting for the next flush (all tables)."""
        return sum(self._pending.values())

    def flush(self) -> None:
        """Write every queued row as one complete batch per table; durable on return."""
        if self.pending == 0:
            return
        # every table of the batch is joined before any is written: should one fail, nothing
        # is written (no alerts without their frames) and the batch stays queued
        tables = {t: _joined(self._tables[t]) for t in _WRITE_ORDER if self._pending[t]}
        self._parts += 1
        # a write that fails (a full disk) takes back the batch's tables written before it, so
        # that any reader, not only read_run, sees the batch whole or not at all
        undo: list[Callable[[], None]] = []
        try:
            for t, table in tables.items():
                undo.append(self._write_part(t, table) if self.fmt == "parquet"
                            else self._append_csv(t, table))
        except BaseException:
            for take_back in reversed(undo):
                with contextlib.suppress(OSError):
                    take_back()
            raise
        for t in tables:
            self.counts[t] += self._pending[t]
            self._tables[t] = []
            self._pending[t] = 0

    def _write_part(self, table: str, data: pa.Table) -> Callable[[], None]:
        """Write one part (durable on return); returns what removes it again."""
        import pyarrow.parquet as pq

        folder = self.out if table == "particles" else self.out / f"_{table}"
        final = folder / f"part-{self._parts:06d}.parquet"
        tmp = folder / f".part-{self._parts:06d}.parquet.tmp"
        try:
            pq.write_table(data, tmp)
            replace_durably(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a torn part would hold the space a full disk lacks
            raise

        def remove() -> None:
            final.unlink(missing_ok=True)
            fsync_dir(folder)
        return remove

    def _append_csv(self, table: str, data: pa.Table) -> Callable[[], None]:
        """Append rows to one table's CSV (durable on return); returns what cuts them off
        again. A failed append is cut off before the error goes on."""
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(text_columns(data), buf, pacsv.WriteOptions(include_header=False))
        path = self._csv_paths()[table]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # unbuffered: nothing left to write later
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(buf.getbuffer())
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

        def cut() -> None:
            os.truncate(path, size)
        return cut

    def release(self) -> None:
        """Stop holding the run (its lock, see the module docstring): the writer writes no
        more. Also done when the writer is collected or its process ends."""
        self._unlock()

    def close(self) -> None:
        """Flush what is queued, then write the tracks table (one row per tracked particle,
        from everything written: :func:`nanoscout.wire.tracks.track_table`). The run stays
        held for a last provenance: :meth:`release`."""
        import pyarrow as pa

        self.flush()
        run = read_run(self.out)
        cols = track_table(run.particles, run.frames)
        data = pa.Table.from_pydict(cols, schema=schema("tracks"))
        if self.fmt == "parquet":
            (self.out / "_tracks").mkdir(exist_ok=True)
            self._parts += 1
            self._write_part("tracks", data)
        else:
            import pyarrow.csv as pacsv

            path = self.out.with_suffix(".tracks.csv")
            tmp = path.with_name("." + path.name + ".tmp")
            buf = io.BytesIO()
            pacsv.write_csv(text_columns(data), buf, pacsv.WriteOptions(include_header=False))
            tmp.write_bytes((",".join(TRACK_COLUMNS) + "\n").encode() + buf.getvalue())
            os.replace(tmp, path)
        self.counts["tracks"] = data.num_rows


#: runs held by a writer of this process (a second ``flock`` of the same process is refused on
#: a local disk, but not where the file system emulates it with per-process locks: NFS)
_HELD: set[Path] = set()


def _hold(writer: object, anchor: Path) -> Callable[[], None]:
    """Hold ``anchor`` (a run's folder or ``RUN.csv``) for ``writer``: an exclusive ``flock``,
    released by the returned function, when ``writer`` is collected, or when the process
    dies. Where the platform has no ``flock`` (Windows) nothing is locked."""
    key = anchor.resolve()
    _HELD.add(key)
    fd: int | None = None
    try:
        import fcntl

        fd = os.open(anchor, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:  # a new run no one else can hold: a file system without locks
        if fd is not None:
            os.close(fd)
        fd = None

    def release(fd: int | None = fd) -> None:
        _HELD.discard(key)
        if fd is not None:
            os.close(fd)  # releases the lock
    return weakref.finalize(writer, release)


def _leftovers(p: Path) -> list[Path]:
    """The temporary files a killed writer of the run at ``p`` may have left."""
    if p.suffix == ".parquet":
        if not p.is_dir():
            return []
        return [f for d in (p, *(s for s in p.iterdir() if s.is_dir())) for f in d.glob(".*.tmp")]
    return [t for f in _csv_run_files(p) if (t := f.with_name(f".{f.name}.tmp")).exists()]


def clean_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in (``RUN.parquet``) or beside
    (``RUN.csv``) the run at ``path`` (see the module docstring); returns those removed.

    Removes nothing while a writer holds the run (its ``flock``, taken here without waiting
    and given back at once), nor where the platform has no ``flock`` (Windows: a live writer
    cannot be told from a dead one); a file that cannot be removed (a read-only run) is left,
    without an error."""
    p = Path(path)
    anchor = p if p.suffix in (".parquet", ".csv") else None
    if anchor is None or not anchor.exists() or anchor.resolve() in _HELD:
        return []
    try:
        import fcntl
    except ImportError:
        return []
    try:
        fd = os.open(anchor, os.O_RDONLY)
    except OSError:
        return []
    removed: list[Path] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it (or the file system cannot lock): not ours
            return []
        for f in _leftovers(p):
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    finally:
        os.close(fd)
    if removed:
        log.info("%s: removed %d temporary files a killed writer left", p, len(removed))
    return removed


def classes_path(out: str | Path) -> Path:
    """Where ``measure`` writes a run's per-image classification table: ``RUN.classes.csv``
    beside ``RUN.parquet`` or ``RUN.csv``."""
    return Path(out).with_suffix(".classes.csv")


def _csv_run_files(out: Path) -> list[Path]:
    """Every file of a ``RUN.csv`` run: its tables and its provenance ``RUN.json``."""
    return [out, *(out.with_suffix(f".{t}.csv") for t in ("frames", "alerts", "stats", "tracks")),
            out.with_suffix(".json")]


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        if p.exists():
            raise ConfigError(f"{p} exists: choose a new run name (measure: --overwrite "
                              "replaces a nanoscout run)")


def _claim(path: Path, text: bytes) -> None:
    """Create ``path`` holding ``text``, only if no file is there (an atomic check: of two
    writers of one run name started at once, the second is refused, ConfigError)."""
    try:
        with open(path, "xb") as fh:
            fh.write(text)
    except FileExistsError:
        raise ConfigError(f"{path} exists (another writer of this run started at the same "
                          "time?): choose a new run name") from None


def _first_line(path: Path) -> str:
    """The first line of a text file ("" when unreadable)."""
    try:
        with path.open("rb") as fh:
            return fh.readline(64 * 1024).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _is_csv_run(out: Path) -> bool:
    """Whether the ``RUN.csv`` and ``RUN.json`` present are a nanoscout run's: the JSON's
    ``format`` is ``nanoscout-run/...`` and the CSV has the particle table's header."""
    meta = out.with_suffix(".json")
    if meta.exists():
        try:
            fmt = json.loads(meta.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            return False
        if not (isinstance(fmt, str) and fmt.startswith("nanoscout-run/")):
            return False
    if out.exists():
        names = _first_line(out).split(",")
        known = set(_ALL["particles"]) | set(_V1_TIME) | {w for w, _, _ in _V1_LENGTH}
        if not ({"source", "seq"} <= set(names) and set(names) <= known):
            return False
    return meta.exists() or out.exists()


def delete_run(path: str | Path) -> bool:
    """Delete the run at ``path`` (to write it again) and its ``RUN.classes.csv``; returns
    whether there was one.

    Refuses (ConfigError), deleting nothing, a ``.parquet`` folder that holds no run provenance
    (``_run.json`` or ``run.json``), a ``RUN.csv`` / ``RUN.json`` that are not a run's (see
    :func:`_is_csv_run`) and a ``RUN.classes.csv`` without the classification table's header:
    nothing that is not a nanoscout run is ever deleted.
    """
    import shutil

    p = Path(path)
    folder: Path | None = None
    files: list[Path] = []
    if p.suffix == ".parquet":
        if p.exists():
            if not p.is_dir() or not ((p / "_run.json").exists() or (p / "run.json").exists()):
                raise ConfigError(f"{p} is not a nanoscout run: not deleting it")
            folder = p
    elif p.suffix == ".csv":
        files = [f for f in _csv_run_files(p) if f.exists()]
        if files and not _is_csv_run(p):
            raise ConfigError(f"{p} is not a nanoscout run: not deleting it")
    else:
        raise ConfigError(f"{p}: not a run (RUN.parquet or RUN.csv)")
    classes = classes_path(p)
    if classes.exists():
        if not _first_line(classes).startswith(",".join(CLASS_COLUMNS)):
            raise ConfigError(f"{classes} is not a nanoscout classification table: not "
                              "deleting it (move it, or choose another run name)")
        files.append(classes)
    if p.suffix == ".csv" and files:
        # before the run's files: without RUN.csv no live writer could be told from a dead one
        clean_leftovers(p)
    if folder is not None:
        shutil.rmtree(folder)
    for f in files:
        f.unlink()
    return folder is not None or bool(files)


# ---------------------------------------------------------------------------------------- read

class Run:
    """A recorded run read back: its tables (pyarrow) and provenance.

    ``run.to_pandas()`` / ``run.to_arrow()`` give the particle table (``table="frames"``,
    ``"alerts"``, ``"stats"`` the others); ``run.particles["ecd_nm"]`` ... numpy columns (times
    as ``datetime64[ns]``, and ``t_acq_ns`` ... as int64 ns since the epoch beside them).
    """

    def __init__(self, tables: dict[str, pa.Table], provenance: dict[str, Any]) -> None:
        self.tables = tables
        self.provenance = provenance

    def to_arrow(self, table: str = "particles") -> pa.Table:
        """One table as a pyarrow Table."""
        if table not in self.tables:
            raise KeyError(f"no table {table!r} in a run (tables: {', '.join(self.tables)})")
        return self.tables[table]

    def to_pandas(self, table: str = "particles") -> pd.DataFrame:
        """One table as a pandas DataFrame (times as ``datetime64[ns, UTC]``)."""
        return self.to_arrow(table).to_pandas()

    def columns(self, table: str) -> dict[str, np.ndarray]:
        """One table as numpy columns (strings as object arrays)."""
        t = self.to_arrow(table)
        out: dict[str, np.ndarray] = {}
        for name in t.column_names:
            col = t.column(name)
            if name in _TIME:
                ns = col.cast("int64").to_numpy(zero_copy_only=False)
                out[name] = ns.astype("datetime64[ns]")
                out[f"{name}_ns"] = ns
            elif name in _STRING:
                out[name] = col.to_numpy(zero_copy_only=False).astype(object, copy=False)
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        return out

    @cached_property
    def particles(self) -> dict[str, np.ndarray]:
        """Particle table as numpy columns."""
        return self.columns("particles")

    @cached_property
    def frames(self) -> dict[str, np.ndarray]:
        """Frame table as numpy columns."""
        return self.columns("frames")

    @cached_property
    def alerts(self) -> dict[str, np.ndarray]:
        """Alert table as numpy columns."""
        return self.columns("alerts")

    @cached_property
    def stats(self) -> dict[str, np.ndarray]:
        """Statistics table as numpy columns."""
        return self.columns("stats")

    @cached_property
    def tracks(self) -> dict[str, np.ndarray]:
        """Tracks table (one row per tracked particle) as numpy columns."""
        return self.columns("tracks")

    @staticmethod
    def rows(table: dict[str, np.ndarray]) -> int:
        """Number of rows of a table of numpy columns."""
        return len(next(iter(table.values()))) if table else 0

    def _repr_html_(self) -> str:
        counts = ", ".join(f"{t.num_rows} {name}" for name, t in self.tables.items())
        parts = self.tables["particles"].slice(0, 10)
        return (f"<div><b>nanoscout run</b> ({counts})"
                + html_table({c: parts.column(c).to_pylist() for c in parts.column_names},
                             caption="particles") + "</div>")


def _empty_table(name: str) -> pa.Table:
    return schema(name).empty_table()


def _conform(name: str, t: pa.Table) -> pa.Table:
    """Cast a table read from disk to the run schema (missing columns null, extra dropped)."""
    import pyarrow as pa

    arrays = []
    for field in schema(name):
        if field.name in t.column_names:
            col = t.column(field.name)
            if col.type != field.type:
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ReaderError(f"run table {name}: column {field.name} of type "
                                      f"{col.type} is not {field.type}") from exc
            arrays.append(col)
        else:
            arrays.append(pa.nulls(t.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema(name))


def _read_parts(folder: Path, name: str) -> pa.Table:
    """One table's parts as one table, in part order: one pyarrow dataset scan when every
    part has the first one's schema (as one writer writes them; about half the time of one
    ``pq.read_table`` per part), else part by part with the columns promoted; ReaderError
    naming the part when one cannot be read."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise ReaderError(f"run table {folder} is missing")
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        return _empty_table(name)
    with contextlib.suppress(OSError, pa.ArrowException):  # read part by part below: say which
        scan = ds.dataset([str(p) for p in parts], format="parquet")
        fragments = list(scan.get_fragments())
        if all(f.physical_schema.equals(scan.schema) for f in fragments):
            return scan.to_table()
    tables = []
    for part in parts:
        try:
            tables.append(pq.read_table(part))
        except (OSError, pa.ArrowException) as exc:  # a foreign or damaged file: say which
            raise ReaderError(f"cannot read {part}: {exc}") from exc
    return pa.concat_tables(tables, promote_options="permissive")


def _read_csv(path: Path, name: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not path.exists():
        if name == "stats":  # the first format had no stats table
            return _empty_table(name)
        raise ReaderError(f"run table {path} is missing")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]  # a crash mid-write: the partial last line is dropped
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    names = header.split(",") if header else []
    if set(names) != set(_ALL[name]) and not _v1_header(name, names) \
            and not set(names) <= set(_ALL[name]):  # a run written before v1.4's columns
        raise ReaderError(f"{path}: header is not the nanoscout run format")
    types = {c: schema(name).field(c).type for c in names if c in _ALL[name]}
    for c in names:
        if c in _V1_TIME:
            types[c] = pa.int64()
    try:
        t = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(newlines_in_values=True,
                                              invalid_row_handler=lambda _row: "skip"),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False,
                                                 true_values=["True", "true", "1"],
                                                 false_values=["False", "false", "0"]))
    except pa.ArrowInvalid as exc:
        raise ReaderError(f"{path}: not a readable CSV run table: {exc}") from exc
    return plain_text_columns(t)  # the text as written, without the spreadsheet's quote


# ------------------------------------------------------------------ the first format (v1)

_V1_TIME = {"t_acq_ns": "t_acq", "t_recv_ns": "t_recv", "t_done_ns": "t_done"}
_V1_LENGTH = (("area_nm2", "area", 2), ("ecd_nm", "ecd", 1), ("feret_max_nm", "feret_max", 1),
              ("feret_min_nm", "feret_min", 1), ("major_nm", "major", 1),
              ("minor_nm", "minor", 1))


def _v1_header(name: str, names: list[str]) -> bool:
    return name != "stats" and any(n in _V1_TIME for n in names)


def _upgrade_v1(name: str, t: pa.Table) -> pa.Table:
    """A ``nanoscout-run/1`` table in the current columns: ns integers become timestamps, and
    lengths that were pixels under ``*_nm`` names (uncalibrated frames) move to ``*_px``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for old, new in _V1_TIME.items():
        if old in t.column_names:
            col = t.column(old).cast(pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
            t = t.append_column(new, col).drop_columns([old])
    if name == "particles" and "ecd_px" not in t.column_names and "ecd_nm" in t.column_names:
        is_px = pc.equal(t.column("units"), "px")
        px = t.column("pixel_size_nm").cast(pa.float64())
        for wire, stem, power in _V1_LENGTH:
            if wire not in t.column_names:
                continue
            v = t.column(wire).cast(pa.float64())
            as_px = pc.if_else(is_px, v, pc.divide(v, pc.power(px, power)))
            as_nm = pc.if_else(is_px, pa.scalar(math.nan), v)
            unit = "2" if power > 1 else ""
            t = t.drop_columns([wire]).append_column(f"{stem}_px{unit}", as_px) \
                 .append_column(f"{stem}_nm{unit}", as_nm)
    return t


def _committed(particles: pa.Table, frames: pa.Table) -> pa.Table:
    """Particle rows whose frame row exists (a crash can write a batch's particles only); a
    frame is its (source, seq, daemon_run): a restarted daemon may analyse a frame again."""
    import pyarrow.compute as pc

    if particles.num_rows == 0:
        return particles

    def key(t: pa.Table) -> Any:
        run = pc.cast(pc.fill_null(t.column("daemon_run"), 0), "string")
        return pc.binary_join_element_wise(t.column("source"),
                                           pc.cast(t.column("seq"), "string"), run, "\x00")

    keep = pc.is_in(key(particles), value_set=key(frames))
    return particles if pc.all(keep).as_py() else particles.filter(keep)


def read_run(path: str | Path) -> Run:
    """Read a run written by :class:`RunWriter` (``RUN.parquet`` folder or ``RUN.csv``).

    Raises ReaderError naming the file when a table is missing or unreadable. The temporary
    files of killed writers are removed first (:func:`clean_leftovers`: never while a writer
    holds the run).
    """
    p = Path(path)
    clean_leftovers(p)
    raw: dict[str, pa.Table] = {}
    if p.suffix == ".parquet":
        if not p.is_dir():
            raise ReaderError(f"{p}: not a run folder")
        if (p / "particles").is_dir():  # nanoscout-run/1
            for t in ("particles", "frames", "alerts"):
                raw[t] = _read_parts(p / t, t)
            meta = p / "run.json"
        else:
            for t in TABLES:
                folder = p if t == "particles" else p / f"_{t}"
                raw[t] = _read_parts(folder, t)
            meta = p / "_run.json"
    elif p.suffix == ".csv":
        paths = {"particles": p, "frames": p.with_suffix(".frames.csv"),
                 "alerts": p.with_suffix(".alerts.csv"), "stats": p.with_suffix(".stats.csv")}
        raw = {t: _read_csv(paths[t], t) for t in TABLES}
        meta = p.with_suffix(".json")
    else:
        raise ReaderError(f"{p}: not a run (RUN.parquet or RUN.csv)")
    tables = {t: _conform(t, _upgrade_v1(t, raw[t]) if t in raw else _empty_table(t))
              for t in TABLES}
    tables["particles"] = _committed(tables["particles"], tables["frames"])
    tracks = p / "_tracks" if p.suffix == ".parquet" else p.with_suffix(".tracks.csv")
    if tracks.exists():
        tables["tracks"] = _conform("tracks", _read_parts(tracks, "tracks")
                                    if tracks.is_dir() else _read_csv(tracks, "tracks"))
    else:  # not closed (a crash) or written before v1.4: computed from the rows
        import pyarrow as pa

        run = Run(tables, {})
        tables["tracks"] = pa.Table.from_pydict(track_table(run.particles, run.frames),
                                                schema=schema("tracks"))
    try:
        provenance = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
    except (OSError, ValueError) as exc:
        raise ReaderError(f"{meta}: unreadable provenance: {exc}") from exc
    return Run(tables, provenance)
