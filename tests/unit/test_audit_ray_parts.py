"""Audit of ``measure --ray``'s parts (nanoscout.batch.parts): input names a worker met in real
archives (a name not UTF-8, a long name, a deep folder) must give a part, not a failed file; the
folder's provenance keeps the earlier runs' records and never replaces a file not its own."""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

import pytest

from nanoscout.batch.parts import (
    FORMAT,
    PROVENANCE,
    FileResult,
    ImageRow,
    clean_temporary,
    done_files,
    earlier_runs,
    part_paths,
    partition_folder,
    write_file_result,
    write_provenance,
)
from nanoscout.batch.ray_measure import measure_on_ray
from nanoscout.daemon.config import ServeConfig
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.particles import empty_table

pa = pytest.importorskip("pyarrow")
import pyarrow.dataset as ds  # noqa: E402


@pytest.mark.parametrize("name", [b"lat\xe9in.png", b"x" * 230 + b".png"],
                         ids=["not-utf8", "230-byte-name"])
def test_part_of_an_awkward_file_name(tmp_path: Path, name: bytes) -> None:
    # a Latin-1 name reaches Python with surrogate escapes; a long one fits the file system
    # itself, but not with the part's key and temporary prefix added
    path = os.fsdecode(os.fsencode(tmp_path / "in") + b"/" + name)
    result = FileResult(path, [ImageRow(0, "px", None, empty_table(3))])
    out = tmp_path / "out"
    particles, images = write_file_result(out, result)
    assert particles.is_file() and images.is_file()
    assert done_files(out, [path]) == {path}
    got = ds.dataset(out / "particles", partitioning="hive").to_table()
    assert got.num_rows == 3
    # the run's spelling of such a name (measure's `file`): escapes, valid UTF-8
    want = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert set(got.column("file").to_pylist()) == {want}
    assert ds.dataset(out / "images", partitioning="hive").to_table().num_rows == 1


def test_partition_folders_of_a_deep_archive_are_bounded_and_distinct(tmp_path: Path) -> None:
    # a real deep tree: two parents of ~260 characters (each '/' escapes to 3 bytes, so the
    # partition name was over 300 bytes and the worker's mkdir failed: "File name too long")
    # that differ only in the middle, and a short parent whose name stays as it was
    root = tmp_path / ("archive-" + "a" * 90)
    deep = [root / f"session-{k}" / ("z" * 120 + "-run") for k in (1, 2)]
    short = tmp_path / "in"
    files = []
    for folder in [*deep, short]:
        folder.mkdir(parents=True)
        files.append(folder / "frame.tif")
        files[-1].write_bytes(b"")
    assert all(len(str(f.parent)) > 200 for f in files[:2])
    names = [part_paths(tmp_path / "out", f)[0].parent.name for f in files]
    assert all(len(n.encode()) <= 255 for n in names), [len(n.encode()) for n in names]
    assert len(set(names)) == 3
    assert names == [part_paths(tmp_path / "out", f)[0].parent.name for f in files]
    assert names[:2] == [partition_folder(f.parent) for f in files[:2]]
    assert names[2] == "folder=" + urllib.parse.quote(str(short), safe="")
    # readable: the start of the path, "…", its end (the folders nearest the files)
    assert all(n.endswith("-run~" + n[-16:]) and "%E2%80%A6" in n for n in names[:2])
    out = tmp_path / "out"
    for f in files:
        write_file_result(out, FileResult(str(f), [ImageRow(0, "px", None, empty_table(2))]))
    assert done_files(out, map(str, files)) == set(map(str, files))
    got = ds.dataset(out / "particles", partitioning="hive").to_table()
    assert got.num_rows == 6
    by_folder: dict[str, set[str]] = {}
    for folder, file in zip(got.column("folder").to_pylist(), got.column("file").to_pylist(),
                            strict=True):
        by_folder.setdefault(folder, set()).add(file)
    assert sorted(by_folder.values(), key=sorted) == sorted(({str(f)} for f in files), key=sorted)
    assert str(short) in by_folder


def test_provenance_keeps_earlier_runs_and_refuses_a_file_not_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert earlier_runs(out) == []
    first = {"command": "nanoscout measure --ray", "models": ["a:1@0123456789ab"]}
    write_provenance(out, {**first, "earlier_runs": []})
    write_provenance(out, {"command": "nanoscout measure --ray", "models": ["b:2"],
                           "earlier_runs": earlier_runs(out)})
    assert earlier_runs(out) == [{"format": FORMAT, **first},
                                 {"format": FORMAT, "command": "nanoscout measure --ray",
                                  "models": ["b:2"]}]
    assert not list(out.glob(".*"))  # no temporary file left
    # a measure run's provenance (or no JSON) is not replaced: named in the error
    for text in ('{"format": "nanoscout-run/2"}', "{not json"):
        (out / PROVENANCE).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(str(out / PROVENANCE))):
            earlier_runs(out)
        with pytest.raises(ConfigError, match="_run.json"):
            measure_on_ray([tmp_path / "x.tif"], ServeConfig(), out)
        assert (out / PROVENANCE).read_text(encoding="utf-8") == text


def test_a_killed_drivers_provenance_temporary_is_cleaned(tmp_path: Path) -> None:
    """A driver killed while it rewrote ``_run.json`` leaves ``._run.json.tmp`` beside it:
    the next run's cleaning left it there for ever (it removed only the parts' temporaries)."""
    out = tmp_path / "out"
    out.mkdir()
    write_provenance(out, {"runs": []})
    leftover = out / f".{PROVENANCE}.tmp"
    leftover.write_text('{"format": "nanoscout-par')  # cut short by the kill
    part_tmp = out / "images" / "folder=x" / ".tmp-0123-a.png.parquet"
    part_tmp.parent.mkdir(parents=True)
    part_tmp.write_bytes(b"PAR1")
    assert clean_temporary(out) == 2
    assert not leftover.exists() and not part_tmp.exists()
    assert (out / PROVENANCE).is_file()  # the provenance itself stays
