"""The Parquet output of a distributed re-analysis: one part per input file, partitioned by folder.

Layout (Hive partitioning, so ``pyarrow.dataset.dataset(OUT / "particles",
partitioning="hive")`` reads it back with a ``folder`` column)::

    OUT/particles/folder=<input folder, URI-escaped>/<file stem>-<key>.parquet   one row per particle
    OUT/images/folder=<input folder, URI-escaped>/<file stem>-<key>.parquet      one row per image

``key`` is derived from the input file's absolute path, so a file always maps to the same two
parts. Each part is written to a hidden temporary file and renamed into place (atomic on one
file system), particles first, images last: a file is *done* when its images part exists. A
worker killed halfway leaves at most a temporary file (removed at the next start) or a particles
part that the retry overwrites, so files are neither lost nor counted twice, and a restarted
run skips every file that is done (:func:`done_files`).

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

import hashlib
import os
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanoscout.wire.codec import wire_text
from nanoscout.wire.particles import empty_table
from nanoscout.wire.tables import PARTICLE_TABLE_COLUMNS, particle_columns

__all__ = [
    "IMAGE_COLUMNS",
    "PARTICLE_COLUMNS",
    "FileResult",
    "ImageRow",
    "clean_temporary",
    "done_files",
    "part_paths",
    "write_file_result",
]

PARTICLE_COLUMNS: tuple[str, ...] = ("file", "index", "units", "pixel_size_nm",
                                     *PARTICLE_TABLE_COLUMNS)
IMAGE_COLUMNS: tuple[str, ...] = (
    "file", "index", "units", "pixel_size_nm", "particles", "top_class", "probability",
    "novelty", "error",
)
_TMP_PREFIX = ".tmp-"
#: the most UTF-8 bytes of a file's stem a part's name keeps: with the key, the temporary
#: prefix and a uuid the name stays within a file system's 255-byte bound on a name
_STEM_BYTES = 160


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
    """Everything measured in one input file (``error``: the file could not be read)."""

    file: str
    images: list[ImageRow] = field(default_factory=list)
    error: str | None = None

    @property
    def particles(self) -> int:
        """Particles measured in the file, all images together."""
        return sum(len(im.table) for im in self.images if im.table is not None)


def _key(path: str | Path) -> str:
    # fsencode: the bytes of a name that is not valid UTF-8 (surrogate escapes) too
    return hashlib.sha1(os.fsencode(str(Path(path).absolute()))).hexdigest()[:16]


def part_paths(out: Path, path: str | Path) -> tuple[Path, Path]:
    """(particles part, images part) of the input file ``path`` under ``out``.

    Names that are not valid UTF-8 are written as :func:`wire_text` escapes and a long stem
    is cut to :data:`_STEM_BYTES` bytes (the key still tells files apart).
    """
    p = Path(path).absolute()
    folder = "folder=" + urllib.parse.quote(wire_text(str(p.parent)), safe="")
    stem = wire_text(p.stem).encode()[:_STEM_BYTES].decode("utf-8", "ignore")
    name = f"{stem}-{_key(p)}.parquet"
    return out / "particles" / folder / name, out / "images" / folder / name


def done_files(out: Path, paths: Iterable[str | Path]) -> set[str]:
    """The members of ``paths`` whose images part exists under ``out`` (as given)."""
    return {str(p) for p in paths if part_paths(out, p)[1].is_file()}


def clean_temporary(out: Path) -> int:
    """Remove the temporary files a killed worker left under ``out``; returns how many."""
    n = 0
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
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
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
