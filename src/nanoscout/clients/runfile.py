"""A recorded run on disk: particles, frames and alerts, written in crash-safe batches.

Two layouts, chosen by the output name:

* ``RUN.parquet`` — a folder holding ``particles/``, ``frames/`` and ``alerts/`` (one Parquet
  part file per flushed batch, ``part-000001.parquet`` ...) and ``run.json`` (provenance). Each
  part is written to a temporary name, fsynced and renamed into place, so after a crash (even
  ``kill -9``) every part present is complete: the run loses at most the batch being written.
  Any Parquet reader reads a table as a dataset folder, e.g.
  ``pyarrow.dataset.dataset("RUN.parquet/particles")``.
* ``RUN.csv`` — ``RUN.csv`` (particles), ``RUN.frames.csv``, ``RUN.alerts.csv`` and
  ``RUN.json``; rows are appended, flushed and fsynced per batch. A crash can leave a partial
  last line, which :func:`read_run` drops.

A batch writes its particle and alert rows first and its frame rows last; :func:`read_run`
keeps only particle rows whose frame row exists, so a run cut anywhere is consistent.

Columns (lengths in nm, or px where ``units`` says so; times in ns since the epoch; stage in µm,
NaN when the frame had no stage position; ``pixel_size_nm`` NaN when uncalibrated):

* particles: ``source, seq, t_acq_ns, units, pixel_size_nm, stage_x_um, stage_y_um`` and the
  particle table of ``nanoscout.wire.particles`` (``bbox`` split into ``bbox_x0 .. bbox_y1``,
  ``shape_class`` as its name);
* frames: ``source, seq, t_acq_ns, t_recv_ns, t_done_ns, latency_ms, n, units,
  pixel_size_nm, stage_x_um, stage_y_um, height, width, modality, engine, model,
  working_scale``;
* alerts: ``source, seq, t_acq_ns, rule, kind, severity, value, threshold, explanation, units,
  stage_x_um, stage_y_um, n``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.wire.errors import ConfigError, ReaderError
from nanoscout.wire.particles import PARTICLE_DTYPE, SHAPE_CLASSES
from nanoscout.wire.protocol import AlertHeader, DetHeader

__all__ = ["FRAME_COLUMNS", "PARTICLE_COLUMNS", "ALERT_COLUMNS", "Run", "RunWriter", "read_run"]

_PARTICLE_FIELDS = [f for f in PARTICLE_DTYPE.names or () if f != "bbox"]
PARTICLE_COLUMNS: tuple[str, ...] = ("source", "seq", "t_acq_ns", "units", "pixel_size_nm", "stage_x_um",
                    "stage_y_um", "id", "x", "y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
                    *[f for f in _PARTICLE_FIELDS if f not in ("id", "x", "y")])
FRAME_COLUMNS: tuple[str, ...] = (
    "source", "seq", "t_acq_ns", "t_recv_ns", "t_done_ns", "latency_ms", "n", "units",
    "pixel_size_nm", "stage_x_um", "stage_y_um", "height", "width", "modality", "engine",
    "model", "working_scale")
ALERT_COLUMNS: tuple[str, ...] = (
    "source", "seq", "t_acq_ns", "rule", "kind", "severity", "value", "threshold",
    "explanation", "units", "stage_x_um", "stage_y_um", "n")
_TABLES = {"particles": PARTICLE_COLUMNS, "frames": FRAME_COLUMNS, "alerts": ALERT_COLUMNS}
_STR_COLUMNS = {"source", "units", "shape_class", "modality", "engine", "model", "rule", "kind",
                "severity", "explanation"}
_INT_COLUMNS = {"seq", "t_acq_ns", "t_recv_ns", "t_done_ns", "n", "id", "height", "width",
                "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}


def _stage(stage: Any) -> tuple[float, float]:
    return (float("nan"), float("nan")) if stage is None else (stage.x_um, stage.y_um)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def det_rows(header: DetHeader, table: np.ndarray) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Return (frame row, particle columns) for one ``det`` message."""
    sx, sy = _stage(header.stage)
    frame = {"source": header.source, "seq": header.seq, "t_acq_ns": header.t_acq_ns,
             "t_recv_ns": header.t_recv_ns, "t_done_ns": header.t_done_ns,
             "latency_ms": round(header.latency_ms, 3), "n": header.n, "units": header.units,
             "pixel_size_nm": _nan(header.pixel_size_nm), "stage_x_um": sx, "stage_y_um": sy,
             "height": header.shape[0], "width": header.shape[1],
             "modality": header.modality or "", "engine": header.engine, "model": header.model,
             "working_scale": _nan(header.working_scale)}
    n = len(table)
    cols: dict[str, list[Any]] = {
        "source": [header.source] * n, "seq": [header.seq] * n,
        "t_acq_ns": [header.t_acq_ns] * n, "units": [header.units] * n,
        "pixel_size_nm": [_nan(header.pixel_size_nm)] * n, "stage_x_um": [sx] * n,
        "stage_y_um": [sy] * n}
    for f in _PARTICLE_FIELDS:
        if f == "shape_class":
            cols[f] = [SHAPE_CLASSES[int(k)] if int(k) < len(SHAPE_CLASSES) else str(int(k))
                       for k in table[f]]
        else:
            cols[f] = table[f].tolist()
    for i, name in enumerate(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")):
        cols[name] = table["bbox"][:, i].tolist()
    return frame, {c: cols[c] for c in PARTICLE_COLUMNS}


def alert_row(header: AlertHeader) -> dict[str, Any]:
    """Return the alerts-table row of one ``alert`` message."""
    sx, sy = _stage(header.stage)
    return {"source": header.source, "seq": header.seq, "t_acq_ns": header.t_acq_ns,
            "rule": header.rule, "kind": header.kind, "severity": header.severity,
            "value": header.value, "threshold": header.threshold,
            "explanation": header.explanation, "units": header.units, "stage_x_um": sx,
            "stage_y_um": sy, "n": header.n}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._rows: dict[str, dict[str, list[Any]]] = {
            t: {c: [] for c in cols} for t, cols in _TABLES.items()}
        self._parts = 0
        self.counts = dict.fromkeys(_TABLES, 0)
        if self.fmt == "parquet":
            if out.exists() and any(out.iterdir()):
                raise ConfigError(f"{out} exists and is not empty: choose a new run name")
            for t in _TABLES:
                (out / t).mkdir(parents=True, exist_ok=True)
            self._meta_path = out / "run.json"
        else:
            for p in self._csv_paths().values():
                if p.exists():
                    raise ConfigError(f"{p} exists: choose a new run name")
            self._meta_path = out.with_suffix(".json")
            for t, p in self._csv_paths().items():
                with open(p, "w", newline="") as fh:
                    csv.writer(fh).writerow(_TABLES[t])
        self.write_provenance(provenance)

    def _csv_paths(self) -> dict[str, Path]:
        return {"particles": self.out, "frames": self.out.with_suffix(".frames.csv"),
                "alerts": self.out.with_suffix(".alerts.csv")}

    def write_provenance(self, provenance: dict[str, Any]) -> None:
        """(Re)write the run's provenance JSON atomically."""
        tmp = self._meta_path.with_name(self._meta_path.name + ".tmp")
        tmp.write_text(json.dumps(provenance, indent=1, default=str) + "\n")
        os.replace(tmp, self._meta_path)

    def add_det(self, header: DetHeader, table: np.ndarray) -> None:
        """Queue one frame's detections."""
        frame, cols = det_rows(header, table)
        for c, v in frame.items():
            self._rows["frames"][c].append(v)
        for c, vals in cols.items():
            self._rows["particles"][c].extend(vals)

    def add_alert(self, header: AlertHeader) -> None:
        """Queue one alert."""
        for c, v in alert_row(header).items():
            self._rows["alerts"][c].append(v)

    @property
    def pending_frames(self) -> int:
        """Frames waiting for the next flush."""
        return len(self._rows["frames"]["seq"])

    @property
    def pending(self) -> int:
        """Rows waiting for the next flush (all tables)."""
        return sum(len(cols[next(iter(cols))]) for cols in self._rows.values())

    def flush(self) -> None:
        """Write every queued row as one complete batch per table; durable on return."""
        if self.pending == 0:
            return
        self._parts += 1
        # frames last: a frame row commits its particle rows (read_run drops particle rows
        # whose frame row a crash kept from being written)
        for t in ("particles", "alerts", "frames"):
            cols = self._rows[t]
            n = len(cols[next(iter(cols))])
            if n == 0:
                continue
            if self.fmt == "parquet":
                self._write_part(t, cols)
            else:
                self._append_csv(t, cols, n)
            self.counts[t] += n
            self._rows[t] = {c: [] for c in _TABLES[t]}

    def _write_part(self, table: str, cols: dict[str, list[Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.out / table
        final = folder / f"part-{self._parts:06d}.parquet"
        tmp = folder / f".part-{self._parts:06d}.parquet.tmp"
        pq.write_table(pa.table(cols), tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(folder)

    def _append_csv(self, table: str, cols: dict[str, list[Any]], n: int) -> None:
        with open(self._csv_paths()[table], "a", newline="") as fh:
            w = csv.writer(fh)
            names = _TABLES[table]
            for i in range(n):
                w.writerow([cols[c][i] for c in names])
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        """Flush what is queued."""
        self.flush()


@dataclass
class Run:
    """A recorded run read back: one dict of numpy columns per table, and the provenance."""

    particles: dict[str, np.ndarray]
    frames: dict[str, np.ndarray]
    alerts: dict[str, np.ndarray]
    provenance: dict[str, Any]

    @staticmethod
    def rows(table: dict[str, np.ndarray]) -> int:
        """Number of rows of a table."""
        return len(next(iter(table.values()))) if table else 0


def _columns(names: tuple[str, ...], data: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c in names:
        vals = data.get(c, [])
        if c in _STR_COLUMNS:
            out[c] = np.asarray(vals, dtype=object)
        elif c == "border":
            out[c] = np.asarray([v in (True, "True", "true", 1, "1") for v in vals], bool)
        elif c in _INT_COLUMNS:
            out[c] = np.asarray(vals, dtype=np.int64)
        else:
            out[c] = np.asarray([math.nan if v in ("", None) else float(v) for v in vals],
                                dtype=np.float64)
    return out


def _read_csv(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    data: dict[str, list[Any]] = {c: [] for c in names}
    if not path.exists():
        raise ReaderError(f"run table {path} is missing")
    with open(path, newline="") as fh:
        text = fh.read()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # a crash mid-write: the partial last line is dropped
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ReaderError(f"{path}: not a readable CSV run table: {exc}") from exc
    if not rows or tuple(rows[0]) != names:
        raise ReaderError(f"{path}: header is not the nanoscout run format")
    for r in rows[1:]:
        if len(r) != len(names):
            continue
        for c, v in zip(names, r, strict=True):
            data[c].append(v)
    return _columns(names, data)


def _read_parquet(folder: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise ReaderError(f"run table {folder} is missing")
    data: dict[str, list[Any]] = {c: [] for c in names}
    for part in sorted(folder.glob("part-*.parquet")):
        try:
            t = pq.read_table(part)
        except Exception as exc:  # a foreign or damaged file: say which
            raise ReaderError(f"cannot read {part}: {exc}") from exc
        d = t.to_pydict()
        for c in names:
            data[c].extend(d.get(c, [None] * t.num_rows))
    return _columns(names, data)


def read_run(path: str | Path) -> Run:
    """Read a run written by :class:`RunWriter` (``RUN.parquet`` folder or ``RUN.csv``)."""
    p = Path(path)
    if p.suffix == ".parquet":
        tables = {t: _read_parquet(p / t, cols) for t, cols in _TABLES.items()}
        meta = p / "run.json"
    elif p.suffix == ".csv":
        paths = {"particles": p, "frames": p.with_suffix(".frames.csv"),
                 "alerts": p.with_suffix(".alerts.csv")}
        tables = {t: _read_csv(paths[t], _TABLES[t]) for t in _TABLES}
        meta = p.with_suffix(".json")
    else:
        raise ReaderError(f"{p}: not a run (RUN.parquet or RUN.csv)")
    provenance = json.loads(meta.read_text()) if meta.exists() else {}
    parts, frames = tables["particles"], tables["frames"]
    if Run.rows(parts):
        done = set(zip(frames["source"].tolist(), frames["seq"].tolist(), strict=True))
        keep = np.fromiter(((s, q) in done for s, q in zip(
            parts["source"].tolist(), parts["seq"].tolist(), strict=True)), bool,
            count=Run.rows(parts))
        if not keep.all():  # a crash between a batch's particle rows and its frame rows
            tables["particles"] = {c: v[keep] for c, v in parts.items()}
    return Run(tables["particles"], tables["frames"], tables["alerts"], provenance)
