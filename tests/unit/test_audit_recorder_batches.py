"""Audit of the run writer's data safety: a batch a failing write (a full disk) cuts short is
taken back whole, for any reader, and two writers of one run name never share it."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from nanoscout.clients.runfile import RunWriter, read_run
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import AlertHeader, DetHeader

T0 = 1_700_000_000_000_000_000  # ns since the epoch


def _det(seq: int, n: int) -> tuple[DetHeader, np.ndarray]:
    t = empty_table(n)
    t["id"] = np.arange(1, n + 1)
    t["ecd_nm"] = np.linspace(5, 10, n)
    h = DetHeader(source="cam", seq=seq, t_acq_ns=T0 + seq, t_recv_ns=T0 + 1, t_done_ns=T0 + 2,
                  pixel_size_nm=0.5, units="nm", n=n, engine="onnxruntime-cpu", model="m:1",
                  shape=(64, 64))
    return h, t


def _alert(seq: int) -> AlertHeader:
    return AlertHeader(source="cam", seq=seq, t_acq_ns=T0 + seq, rule="r", kind="particle",
                       severity="warning", value=12.0, threshold=9.0, explanation="x")


def _break_frames_table(out: Path) -> Path:
    """Make the frames table unwritable (its folder or CSV file moved aside, a file of the
    other kind in its place); returns where it was moved."""
    table = out / "_frames" if out.suffix == ".parquet" else out.with_suffix(".frames.csv")
    aside = table.with_name(table.name + ".aside")
    table.rename(aside)
    if out.suffix == ".parquet":
        table.write_text("not a folder")
    else:
        table.mkdir()
    return aside


def _repair_frames_table(aside: Path) -> None:
    table = aside.with_name(aside.name.removesuffix(".aside"))
    if table.is_dir():
        table.rmdir()
    else:
        table.unlink()
    aside.rename(table)


@pytest.mark.parametrize("name", ["run.parquet", "run.csv"])
def test_a_batch_a_failing_write_cuts_short_is_taken_back_for_every_reader(
        tmp_path: Path, name: str) -> None:
    """A write that failed after the batch's particle (and alert) rows were on disk (ENOSPC
    on the frames part, seen with a 3 MB tmpfs) left them there: pandas / pyarrow, which read
    the run root directly, counted 231 particles of 5 frames that the run never recorded, and
    the writer had forgotten them, so a retry wrote the frames without their particles."""
    out = tmp_path / name
    w = RunWriter(out, {})
    w.add_det(*_det(0, 3))
    w.add_alert(_alert(0))
    w.flush()  # one whole batch on disk
    w.add_det(*_det(1, 4))
    w.add_alert(_alert(1))
    broken = _break_frames_table(out)
    with pytest.raises(OSError):
        w.flush()
    # straight from the files, not through read_run: only the first batch is there
    if out.suffix == ".parquet":
        assert pq.read_table(out).num_rows == 3
        assert pq.read_table(out / "_alerts").num_rows == 1
        assert not list(out.rglob(".*.tmp"))
    else:
        assert pacsv.read_csv(out).num_rows == 3
        assert pacsv.read_csv(out.with_suffix(".alerts.csv")).num_rows == 1
    assert w.counts["particles"] == 3 and w.pending_frames == 1  # the batch is still queued
    _repair_frames_table(broken)
    w.flush()
    run = read_run(out)
    assert run.rows(run.alerts) == 2
    assert run.frames["seq"].tolist() == [0, 1]
    assert run.particles["seq"].tolist() == [0] * 3 + [1] * 4  # frame 1 with every particle


def _start_writers(base: str, suffix: str, trials: int, barrier: Any, results: Any) -> None:
    """One of two processes: for each trial, wait for the other, then start a writer of the
    trial's run name; puts (trial, "won" | "refused" | the error's type)."""
    for i in range(trials):
        barrier.wait()
        try:
            RunWriter(Path(base) / f"{i}{suffix}", {"pid": os.getpid()})
            results.put((i, "won"))
        except ConfigError:
            results.put((i, "refused"))
        except Exception as exc:  # reported to the test, which fails on it
            results.put((i, type(exc).__name__))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_two_writers_of_one_run_name_started_at_once_never_share_it(
        tmp_path: Path, suffix: str) -> None:
    """Both writers passed the "exists?" check before either created the run and both wrote
    into it (two processes, 100 names: 3 shared a run, 13 ended in a FileNotFoundError on the
    shared provenance temp file; seen first as three ``record`` processes on one name). The
    run name is taken atomically: exactly one writer gets it, the other is refused."""
    ctx = mp.get_context("spawn")
    trials = 100
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_start_writers, args=(str(tmp_path), suffix, trials, barrier,
                                                      results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes: dict[int, list[str]] = {}
    for _ in range(2 * trials):
        i, what = results.get(timeout=60)
        outcomes.setdefault(i, []).append(what)
    for p in procs:
        p.join(30)
    bad = {i: o for i, o in outcomes.items() if sorted(o) != ["refused", "won"]}
    assert not bad and len(outcomes) == trials
