"""Tracebacks in the command line's log (``nanoscout.cli.logs.PrintableFormatter``): the record
line was escaped, but the traceback after it was written raw, so an exception whose text holds
a hostile file name (a reader's error for ``bad.tif\\n<date> ERROR ...``) forged a log line at
column 0, and its ``\\r`` / terminal escapes reached the terminal. Now the exception's text
(and its notes) is one escaped line; the traceback keeps its lines. The same for the error
line a command ends with (``nanoscout CMD: error: ...``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

FORGED = "2026-12-07 19:00:00,000 ERROR nanoscout.daemon: forged line"
HOSTILE = f"bad.tif\n{FORGED}\r\x1b[31mred.tif"

#: a real process with the command line's logging, a real reader's error for a real file; a
#: plain handler installed first formats (and caches) the traceback raw before the CLI's does
SCRIPT = """
import io, logging, sys
from pathlib import Path
from nanoscout.cli.logs import setup_logging
from nanoscout.clients.acquisition.readers import read_image
logging.getLogger().addHandler(logging.StreamHandler(io.StringIO()))
setup_logging(False)
path = Path(sys.argv[1])
path.write_bytes(b"not a TIFF")
try:
    read_image(path)
except Exception as exc:
    exc.add_note(f"while watching {path}")
    logging.getLogger("nanoscout.watch").exception("cannot read a file")
"""


def test_traceback_of_a_hostile_file_name_forges_no_log_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / HOSTILE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    for c in ("\x1b", "\r"):
        assert c not in log, (c, log[-3000:])
    lines = log.split("\n")
    assert not any(line.startswith(FORGED) for line in lines), log[-3000:]
    # still a readable traceback: the chain, its frames on lines of their own
    assert lines.count("Traceback (most recent call last):") == 2, log[-3000:]
    assert "The above exception was the direct cause of the following exception:" in lines
    assert sum(line.startswith('  File "') for line in lines) >= 3, log[-3000:]
    escaped = f"bad.tif\\n{FORGED}\\r\\x1b[31mred.tif"
    error = [line for line in lines if line.startswith("nanoscout.wire.errors.ReaderError: ")]
    assert len(error) == 1 and f"{escaped}: cannot read tiff file" in error[0], log[-3000:]
    assert f"while watching {tmp_path}/{escaped}" in lines, log[-3000:]  # the note, one line


def test_command_error_naming_a_hostile_file_is_one_line(tmp_path: Path) -> None:
    """``nanoscout CMD: error: ...`` (cli.main) printed the error raw: a damaged part of a run
    whose name holds a forged line made ``nanoscout report`` print that line at column 0, and
    its escapes reach the terminal."""
    from nanoscout.clients.runfile import RunWriter

    run = tmp_path / "r.parquet"
    writer = RunWriter(run, {})
    writer.close()
    writer.release()
    (run / f"part-9\n{FORGED}\r\x1b[31mred.parquet").write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "nanoscout", "report", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for c in ("\x1b", "\r"):
        assert c not in proc.stderr, (c, proc.stderr[-3000:])
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("nanoscout report: error: cannot read "), lines
    assert f"part-9\\n{FORGED}\\r\\x1b[31mred.parquet" in lines[0], lines
