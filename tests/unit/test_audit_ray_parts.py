"""Audit of ``measure --ray``'s parts (nanoscout.batch.parts): input names a worker met in real
archives must give a part, not a failed file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nanoscout.batch.parts import FileResult, ImageRow, done_files, write_file_result
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
