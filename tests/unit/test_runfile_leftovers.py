"""Temporary files of killed run writers do not accumulate, and a live writer's are never touched.

A writer killed while it writes leaves the file under its temporary name: 3 of 12 Parquet
recordings ``kill -9``-ed at random kept a ``.part-N.parquet.tmp`` of 0 B to 53 KiB, and a CSV
run killed in its provenance write kept ``.RUN.json.tmp`` beside it, which ``delete_run`` left
behind. A real writer process is held mid-write here (its temporary file open, half written),
then killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanoscout.clients.runfile import RunWriter, delete_run, read_run

#: a writer that starts the run, begins writing ``TMP`` (a name relative to the run's folder,
#: or beside RUN.csv) as a killed write leaves it, says so, and waits
_CHILD = """
import sys
from pathlib import Path
from nanoscout.clients.runfile import RunWriter
out, tmp = Path(sys.argv[1]), sys.argv[2]
w = RunWriter(out, {"who": "child"})
where = out if out.suffix == ".parquet" else out.parent
with open(where / tmp, "wb") as fh:
    fh.write(b"PAR1")
    fh.flush()
    print("writing", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def writer() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()


def _start(procs: list[subprocess.Popen[str]], out: Path, tmp: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), tmp], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "writing"
    return p


def _kill(p: subprocess.Popen[str]) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)


@pytest.mark.parametrize("tmp", [".part-000001.parquet.tmp", "_frames/.part-000001.parquet.tmp",
                                 "._run.json.tmp"])
def test_reading_a_run_removes_what_a_killed_writer_left(
        tmp_path: Path, writer: list[subprocess.Popen[str]], tmp: str) -> None:
    out = tmp_path / "run.parquet"
    p = _start(writer, out, tmp)
    read_run(out)  # a report of the live recording: its file being written is left alone
    assert (out / tmp).read_bytes() == b"PAR1"
    _kill(p)
    assert read_run(out).rows(read_run(out).frames) == 0
    assert not list(out.rglob("*.tmp")), sorted(out.rglob("*"))


def test_deleting_a_csv_run_removes_what_a_killed_writer_left(
        tmp_path: Path, writer: list[subprocess.Popen[str]]) -> None:
    out = tmp_path / "run.csv"
    p = _start(writer, out, ".run.json.tmp")
    read_run(out)
    assert (tmp_path / ".run.json.tmp").exists()  # live: left alone
    _kill(p)
    assert delete_run(out)
    assert sorted(f.name for f in tmp_path.iterdir()) == []


def test_a_writer_of_this_process_keeps_its_temporary_files(tmp_path: Path) -> None:
    """Until released: a report read in the recorder's own process does not clean its run."""
    out = tmp_path / "run.parquet"
    w = RunWriter(out, {})
    (out / ".part-000001.parquet.tmp").write_bytes(b"PAR1")
    w.close()  # reads the run back for its tracks table
    assert (out / ".part-000001.parquet.tmp").exists()
    read_run(out)
    assert (out / ".part-000001.parquet.tmp").exists()
    w.release()
    read_run(out)
    assert not (out / ".part-000001.parquet.tmp").exists()
