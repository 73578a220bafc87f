"""Audit of the files a session rewrites while it runs, against a power cut: the run provenance
(``_run.json``, rewritten after every batch of ``nanoscout record``) and the parts of a
``measure --ray`` output (an images part marks its file done for a resumed run) were renamed
into place with their data never synced (``strace`` of a recording: ``rename`` of
``._run.json.tmp`` with no ``fsync`` before it; of ``write_file_result``: no ``fsync`` at
all). After a power cut such a name can hold 0 bytes: an empty ``_run.json`` made ``nanoscout
report`` refuse the whole run ("unreadable provenance") though every Parquet part was whole,
and an empty images part made a resumed run skip its file and pyarrow refuse the output.

A power cut cannot be made in a test; what makes a rename safe against one can be watched: the
file's data synced before the rename (same inode) and its folder synced after it. Real files,
the real writers; ``os.fsync`` / ``os.replace`` are only observed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanoscout.batch.parts import FileResult, ImageRow, part_paths, write_file_result
from nanoscout.clients.runfile import RunWriter
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import DetHeader

Event = tuple[str, int, str]  # ("fsync", inode, "") or ("replace", inode of the file, its name)


@pytest.fixture
def syscalls(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """The fsyncs (by inode) and renames (by inode and target) made while the test runs."""
    events: list[Event] = []
    fsync, replace = os.fsync, os.replace

    def watched_fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino, ""))
        fsync(fd)

    def watched_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        inode = os.stat(src).st_ino
        replace(src, dst)
        events.append(("replace", inode, os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", watched_fsync)
    monkeypatch.setattr(os, "replace", watched_replace)
    return events


def _durably_renamed(events: list[Event], path: Path) -> list[str]:
    """What is wrong with every rename onto ``path`` ([] when each one was durable)."""
    folder = os.stat(path.parent).st_ino
    wrong = []
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(path)]
    if not renames:
        return [f"{path} was never renamed into place"]
    for k, i in enumerate(renames, 1):
        if ("fsync", events[i][1], "") not in events[:i]:
            wrong.append(f"rename {k} onto {path.name}: its data was not synced before it")
        if ("fsync", folder, "") not in events[i + 1:]:
            wrong.append(f"rename {k} onto {path.name}: its folder was not synced after it")
    return wrong


def _det(seq: int) -> tuple[DetHeader, np.ndarray]:
    t = empty_table(3)
    t["id"] = [1, 2, 3]
    t["ecd_nm"] = [5.0, 6.0, 7.0]
    return DetHeader(source="cam", seq=seq, t_acq_ns=1 + seq, t_recv_ns=2 + seq,
                     t_done_ns=3 + seq, pixel_size_nm=0.5, units="nm", n=3,
                     engine="onnxruntime-cpu", model="m:1", shape=(64, 64)), t


@pytest.mark.parametrize("name", ["run.parquet", "run.csv"])
def test_a_recordings_provenance_is_synced_before_every_rename(
        tmp_path: Path, syscalls: list[Event], name: str) -> None:
    out = tmp_path / name
    w = RunWriter(out, {"who": "test"})
    for seq in range(4):
        w.add_det(*_det(seq))
        if seq % 2:
            w.flush()
            w.write_provenance({"rows": dict(w.counts)})  # as record does after each batch
    assert _durably_renamed(syscalls, w.provenance_path) == []
    assert json.loads(w.provenance_path.read_text())["rows"]["frames"] == 4
    assert not list(tmp_path.rglob(".*.tmp"))  # the temporary name is gone


def test_a_measure_ray_part_is_synced_before_it_marks_its_file_done(
        tmp_path: Path, syscalls: list[Event]) -> None:
    t = empty_table(2)
    t["id"] = [1, 2]
    write_file_result(tmp_path, FileResult("/data/a.tif", [ImageRow(0, "nm", 0.5, t)]))
    particles, images = part_paths(tmp_path, "/data/a.tif")
    assert _durably_renamed(syscalls, particles) == []
    assert _durably_renamed(syscalls, images) == []
    assert pq.read_table(particles).num_rows == 2 and pq.read_table(images).num_rows == 1
