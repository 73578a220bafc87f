"""The Parquet output of a distributed re-analysis: one part per input file, partitioned by folder.

Layout (Hive partitioning, so ``pyarrow.dataset.dataset(OUT / "particles",
partitioning="hive")`` reads it back with a ``folder`` column)::

    OUT/particles/folder=<input folder, URI-escaped>/<file stem>-<key>.parquet   one row per particle
    OUT/images/folder=<input folder, URI-escaped>/<file stem>-<key>.parquet      one row per image
    OUT/_run.json                                                              provenance
    OUT/.lock                                                                  held by the run writing OUT

``key`` is derived from the input file's absolute path, so a file always maps to the same two
parts. Each part is written to a hidden temporary file, synced to the disk and renamed into
place (atomic on one file system, and durable: a power cut leaves no empty part), particles
first, images last: a file is *done* when its images part exists. A
worker killed halfway leaves at most a temporary file (removed at the next start) or a particles
part that the retry overwrites, so files are neither lost nor counted twice, and a restarted
run skips every file that is done (:func:`done_files`). One run writes into ``OUT`` at a time
(:func:`output_lock`): a second one started while it runs is refused, naming the first.

A partition folder's name is bounded (:func:`partition_folder`): an input folder whose escaped
path would make it longer than a file system allows (255 bytes) keeps its path's start and end
around ``…`` and ends in ``~`` and a hash of the whole path; the ``folder`` column then holds
that shortened name (the ``file`` column always holds the full path). The provenance
``_run.json`` (:func:`write_provenance`, written by the driver of
:mod:`nanoscout.batch.ray_measure`) is ``measure``'s record plus the Ray facts (workers,
partitions) and the records of the earlier runs into ``OUT`` (:func:`earlier_runs`); pyarrow's
datasets skip it (a name starting with ``_``).

Columns of ``particles``: ``file``, ``index`` (image within the file), ``units``,
``pixel_size_nm`` and the particle table as unit-honest columns
(:func:`nanoscout.wire.tables.particle_columns`: ``*_px`` always pixels, ``*_nm`` nanometres or
NaN when uncalibrated, ``bbox_x0..bbox_y1``, ``shape_class`` as its name): the names of the
particle table of a ``nanoscout measure`` / ``record`` run. ``cluster`` is 255 (not assigned):
the morphology clusters are an online k-means over one stream in order, which a parallel
re-analysis does not have. ``images``: ``file``, ``index``, ``units``, ``pixel_size_nm``,
``particles``, ``top_class``, ``probability``, ``novelty`` and ``error`` (why the image or file
could not be measured; ``index`` -1 for a file that could not be read).

The writer is self-contained: it shares the column conversion with the run format, not its
writer (a run is one stream appended in order; these are independent parts, one per file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.clients.durable import replace_durably
from nanoscout.clients.provenance import write_json
from nanoscout.wire.codec import wire_text
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.particles import empty_table
from nanoscout.wire.tables import PARTICLE_TABLE_COLUMNS, particle_columns

__all__ = [
    "FORMAT",
    "IMAGE_COLUMNS",
    "LOCK",
    "PARTICLE_COLUMNS",
    "PROVENANCE",
    "FileResult",
    "ImageRow",
    "clean_temporary",
    "done_files",
    "earlier_runs",
    "output_lock",
    "part_paths",
    "partition_folder",
    "write_file_result",
    "write_provenance",
]

PARTICLE_COLUMNS: tuple[str, ...] = ("file", "index", "units", "pixel_size_nm",
                                     *PARTICLE_TABLE_COLUMNS)
IMAGE_COLUMNS: tuple[str, ...] = (
    "file", "index", "units", "pixel_size_nm", "particles", "top_class", "probability",
    "novelty", "error",
)
#: the provenance file of an output folder, and its ``format``
PROVENANCE, FORMAT = "_run.json", "nanoscout-parts/1"
#: the lock file a run holds on its output folder (:func:`output_lock`)
LOCK = ".lock"
_TMP_PREFIX = ".tmp-"
#: the most UTF-8 bytes of a file's stem a part's name keeps: with the key, the temporary
#: prefix and a uuid the name stays within a file system's 255-byte bound on a name
_STEM_BYTES = 160
#: the most bytes of a partition folder's name: a file system's bound on a name
_FOLDER_BYTES = 255
#: of a shortened partition folder's name, the most bytes of the escaped start of the input
#: folder's path (the rest of the bound, less the ellipsis and the hash, keeps its end: the
#: folders nearest the files tell partitions apart best)
_FOLDER_HEAD_BYTES = 60
_ELLIPSIS = urllib.parse.quote("…")


@dataclass
class ImageRow:
    """One image of a file: its particle table (None when it could not be measured)."""

    index: int
    units: str
    pixel_size_nm: float | None
    table: np.ndarray | None
    top_class: str | None = None
    probability: float | None = None
    novelty: float | None = None
    error: str | None = None


@dataclass
class FileResult:
    """Everything measured in one input file (``error``: the file could not be read;
    ``models``: the models that measured its images, as the provenance names them, not
    written into the parts)."""

    file: str
    images: list[ImageRow] = field(default_factory=list)
    error: str | None = None
    models: set[str] = field(default_factory=set)

    @property
    def particles(self) -> int:
        """Particles measured in the file, all images together."""
        return sum(len(im.table) for im in self.images if im.table is not None)


def _key(path: str | Path) -> str:
    # fsencode: the bytes of a name that is not valid UTF-8 (surrogate escapes) too
    return hashlib.sha1(os.fsencode(str(Path(path).absolute()))).hexdigest()[:16]


def _escaped_end(text: str, limit: int, *, end: bool) -> str:
    """The longest start (``end`` False) or end of ``text`` whose URI escape takes at most
    ``limit`` bytes, escaped (cut between characters, never inside an escape)."""
    chars = [urllib.parse.quote(c, safe="") for c in (reversed(text) if end else text)]
    kept: list[str] = []
    used = 0
    for c in chars:
        if used + len(c) > limit:
            break
        kept.append(c)
        used += len(c)
    return "".join(reversed(kept) if end else kept)


def partition_folder(folder: str | Path) -> str:
    """The name of the partition folder of the input folder ``folder`` (absolute):
    ``folder=`` and its path, URI-escaped (pyarrow's hive partitioning reads it back as the
    ``folder`` column), when that takes at most :data:`_FOLDER_BYTES` (255) bytes.

    A longer one (a deep archive: each ``/`` takes 3 bytes) keeps the escaped start of the
    path (at most :data:`_FOLDER_HEAD_BYTES` bytes) and its end around ``…``, and ends in
    ``~`` and the first 16 hex digits of the sha1 of the whole path: at most 255 bytes, the
    same for the same folder on every run and worker, and different for different folders
    (they differ in the hash even where start and end agree). Names that fit are those of
    earlier versions, so a run started again on an earlier output still finds its parts.
    """
    text = wire_text(str(folder))
    name = "folder=" + urllib.parse.quote(text, safe="")
    if len(name) <= _FOLDER_BYTES:
        return name
    suffix = "~" + _key(folder)
    head = _escaped_end(text, _FOLDER_HEAD_BYTES, end=False)
    rest = _FOLDER_BYTES - len("folder=") - len(head) - len(_ELLIPSIS) - len(suffix)
    return f"folder={head}{_ELLIPSIS}{_escaped_end(text, rest, end=True)}{suffix}"


def part_paths(out: Path, path: str | Path) -> tuple[Path, Path]:
    """(particles part, images part) of the input file ``path`` under ``out``.

    Names that are not valid UTF-8 are written as :func:`wire_text` escapes, a long stem
    is cut to :data:`_STEM_BYTES` bytes (the key still tells files apart) and a long folder
    is shortened (:func:`partition_folder`).
    """
    p = Path(path).absolute()
    folder = partition_folder(p.parent)
    stem = wire_text(p.stem).encode()[:_STEM_BYTES].decode("utf-8", "ignore")
    name = f"{stem}-{_key(p)}.parquet"
    return out / "particles" / folder / name, out / "images" / folder / name


def done_files(out: Path, paths: Iterable[str | Path]) -> set[str]:
    """The members of ``paths`` whose images part exists under ``out`` (as given)."""
    return {str(p) for p in paths if part_paths(out, p)[1].is_file()}


def clean_temporary(out: Path) -> int:
    """Remove the temporary files a killed worker or driver left under ``out`` (parts, and the
    provenance's, :func:`~nanoscout.clients.provenance.write_json`); returns how many. Called
    by the run that holds ``out`` (:func:`output_lock`)."""
    n = 0
    provenance_tmp = out / f".{PROVENANCE}.tmp"
    if provenance_tmp.is_file():
        provenance_tmp.unlink(missing_ok=True)
        n += 1
    for sub in ("particles", "images"):
        root = out / sub
        if root.is_dir():
            for tmp in root.glob(f"*/{_TMP_PREFIX}*"):
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def _columns(file: str, index: int, units: str, pixel_size_nm: float | None,
             table: np.ndarray) -> object:
    import pyarrow as pa

    n = len(table)
    cols: dict[str, object] = {
        "file": pa.array([wire_text(file)] * n, pa.string()),
        "index": pa.array(np.full(n, index, np.int64)),
        "units": pa.array([units] * n, pa.string()),
        "pixel_size_nm": pa.array([pixel_size_nm] * n, pa.float64()),
    }
    for name, values in particle_columns(table, units, pixel_size_nm).items():
        cols[name] = pa.array(values, pa.string() if values.dtype == object else None)
    return pa.table(cols)


def _particle_table(file: str, rows: Sequence[ImageRow]) -> object:
    """The particles of every measured image of one file as one pyarrow Table."""
    import pyarrow as pa

    parts = [_columns(file, im.index, im.units, im.pixel_size_nm, im.table)
             for im in rows if im.table is not None]
    if not parts:  # the columns (and types) of an empty table
        return _columns(file, 0, "nm", 1.0, empty_table(0))
    return pa.concat_tables(parts)


def _image_table(result: FileResult) -> object:
    import pyarrow as pa

    rows = result.images or [ImageRow(-1, "", None, None, error=result.error)]
    return pa.table({
        "file": pa.array([wire_text(result.file)] * len(rows), pa.string()),
        "index": pa.array([r.index for r in rows], pa.int64()),
        "units": pa.array([r.units for r in rows], pa.string()),
        "pixel_size_nm": pa.array([r.pixel_size_nm for r in rows], pa.float64()),
        "particles": pa.array([None if r.table is None else len(r.table) for r in rows],
                              pa.int64()),
        "top_class": pa.array([r.top_class for r in rows], pa.string()),
        "probability": pa.array([r.probability for r in rows], pa.float64()),
        "novelty": pa.array([r.novelty for r in rows], pa.float64()),
        "error": pa.array([r.error for r in rows], pa.string()),
    })


def _write_atomic(table: object, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file whose data reaches the disk before
    the rename (:func:`~nanoscout.clients.durable.replace_durably`): an images part marks its
    file done, so one renamed before its data (0 bytes after a power cut) made a resumed run
    skip the file and pyarrow refuse the whole output."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        pq.write_table(table, tmp)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_result(out: Path, result: FileResult) -> tuple[Path, Path]:
    """Write one file's two parts (particles, then images: the file is done after the
    second rename); returns their paths. Writing the same file again replaces its parts."""
    particles_part, images_part = part_paths(out, result.file)
    _write_atomic(_particle_table(result.file, result.images), particles_part)
    _write_atomic(_image_table(result), images_part)
    return particles_part, images_part


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the output folder ``out`` (an existing folder) for one run: an exclusive lock on
    ``out/.lock`` (:data:`LOCK`; ``flock``, which NFS clients share), which holds the host and
    process id of its holder. Raises ConfigError, naming the folder and the holder, when another
    run holds it: two runs into one folder at once measured every file twice and the
    provenance kept only one run's record. The lock is the operating system's: it is released
    when the run ends or its process dies (``kill -9``), so a run started again after a crash
    is never refused. Where the platform has no ``flock`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock to take
        yield
        return
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot lock the output folder {out} ({path}: "
                          f"{exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            raise ConfigError(f"{out} is being written by another measure --ray run ({holder}): "
                              "wait for it to end, or choose another output folder") from None
        with contextlib.suppress(OSError):  # who holds it is for the message only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def earlier_runs(out: Path) -> list[dict[str, Any]]:
    """The provenance records of the runs that wrote into ``out`` before, oldest first (empty
    when it holds no :data:`PROVENANCE`). Raises ConfigError, naming the file, when
    ``out/_run.json`` is not the provenance of such a folder (a ``measure`` run's, or no
    JSON): it is not replaced."""
    path = out / PROVENANCE
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as a provenance record ({exc}): move it "
                          "away or choose another output folder") from exc
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt != FORMAT:
        raise ConfigError(f"{path} is not the provenance of a measure --ray output (format "
                          f"{fmt!r}, not {FORMAT!r}): choose another output folder")
    earlier = record.pop("earlier_runs", None)
    return [*(earlier if isinstance(earlier, list) else []), record]


def write_provenance(out: Path, record: Mapping[str, Any]) -> Path:
    """(Re)write ``out/_run.json`` (:data:`PROVENANCE`) atomically: ``record`` with its
    :data:`FORMAT`; returns its path."""
    path = out / PROVENANCE
    write_json(path, {"format": FORMAT, **record})
    return path
