"""Text from outside (file names) printed or logged by ``nanoscout measure`` and ``nanoscout
replay``: real files whose names hold a newline, a carriage return and terminal escapes never
forge, overwrite or restyle a line of the output or of the log, and a name that looks like rich
markup is shown as it is (:func:`nanoscout.wire.codec.printable`)."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from PIL import Image

from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system

#: what an attacker wants a reader of the output (or a log parser) to see as a line of its own
FORGED = "2026-12-07 19:00:00,000 ERROR nanoscout.daemon: forged line"
#: a file name: a forged line, a carriage return, an OSC 8 hyperlink and a colour escape
HOSTILE = (f"ok.png\n{FORGED}\rover \x1b]8;;https:evil.example\x07link\x1b]8;;\x07 "
           "\x1b[31mred.png")
#: a file name that is rich markup (a hyperlink, a style); measured last (the bar's last note)
MARKUP = "z[link=https:evil.example]click[bold red]RED.png"
CONTROLS = ("\x1b", "\r", "\x07")


def _png(path: Path) -> Path:
    img = np.full((128, 128), 40, np.uint8)
    img[40:60, 40:60] = 200  # one particle: the file is measured, its name printed
    Image.fromarray(img).save(path)
    return path


def _clean(text: str) -> None:
    """No control character but newlines, and no line that is the forged one."""
    for c in CONTROLS:
        assert c not in text, (c, text[-2000:])
    assert not any(line.startswith(FORGED) for line in text.splitlines()), text[-2000:]


@pytest.mark.parametrize("bar", ["--no-progress", "--progress"])
def test_measure_prints_hostile_file_names_as_escapes(tmp_path: Path, bar: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a bar the lines go to stdout; with one (here on a pipe) above it on stderr,
    and the bar's note names each file too."""
    monkeypatch.setenv("COLUMNS", "1000")  # rich: one line per line, not wrapped at 80
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / HOSTILE)
    _png(folder / MARKUP)
    out = tmp_path / "run.csv"
    proc = nanoscout("measure", str(folder), "--out", str(out), bar,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "measured 2 images" in stdout, stdout
    _clean(stdout)
    _clean(stderr)
    lines = stdout if bar == "--no-progress" else stderr
    assert f"ok.png\\n{FORGED}\\rover \\x1b]8;;https:evil.example\\x07link" in lines, lines
    assert f"{MARKUP}[0]: " in lines, lines  # the file's line names it as it is
    if bar == "--progress":  # the bar's last note is a file name, no markup applied
        assert MARKUP in lines.rsplit("measuring", 1)[-1], lines[-2000:]


def test_replay_prints_hostile_file_names_as_escapes(daemon_factory: DaemonFactory,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / HOSTILE)
    (folder / f"bad.tif\n{FORGED}.tif").write_bytes(b"not a TIFF")  # skipped, named
    d = daemon_factory("--policy", "lossless")
    proc = nanoscout("replay", str(folder), "--frames-endpoint", d.input, "--mode", "push",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    _clean(stdout)
    _clean(stderr)
    assert f"sent ok.png\\n{FORGED}\\rover" in stdout, stdout
    assert f"bad.tif\\n{FORGED}.tif:" in stdout, stdout


def _lines(pipe: IO[str]) -> queue.Queue[str]:
    """A queue that receives each line of ``pipe`` as it comes ("" at its end)."""
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        with pipe:
            for line in pipe:
                q.put(line)
        q.put("")

    threading.Thread(target=pump, daemon=True).start()
    return q


def _until(q: queue.Queue[str], text: str, seen: list[str], timeout: float = 20.0) -> None:
    """Take lines of ``q`` (into ``seen``) until one holds ``text``."""
    while True:
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {text!r} within {timeout} s: {''.join(seen)[-2000:]}") from None
        seen.append(line)
        assert line, f"the output ended before {text!r}: {''.join(seen)[-2000:]}"
        if text in line:
            return


def test_watch_log_records_of_hostile_file_names_are_one_line(daemon_factory: DaemonFactory,
                                                               tmp_path: Path) -> None:
    """``replay --watch``: a file it cannot read, changed later, is named in a log record
    (the watcher's, on stderr): that record is one line, the name's controls escaped."""
    folder = tmp_path / "watched"
    folder.mkdir()
    d = daemon_factory("--policy", "lossless")
    proc = nanoscout("replay", "--watch", str(folder), "--frames-endpoint", d.input,
                     "--mode", "push", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _lines(proc.stdout), _lines(proc.stderr)
    seen_out: list[str] = []
    seen_err: list[str] = []
    try:
        _until(out, "watching", seen_out)
        # once a file is sent the first listing is done: the next file is new (a file there
        # at the start is never handed over again, so its change is not logged)
        _png(folder / "first.png")
        _until(out, "sent first.png", seen_out)
        bad = folder / f"bad.tif\n{FORGED}\x1b[2K.tif"
        bad.write_bytes(b"not a TIFF")
        _until(out, "will try", seen_out)
        bad.write_bytes(b"still not a TIFF")
        _until(err, "changed after it could not be read", seen_err)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    _clean("".join(seen_err))  # the log
    assert f"bad.tif\\n{FORGED}\\x1b[2K.tif changed after" in seen_err[-1], seen_err
    _clean("".join(seen_out))  # the lines replay prints
