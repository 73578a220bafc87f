"""Audit of ``nanoscout measure`` re-analysing an archive: a file reached by two paths (a
``latest`` link to a session folder, a file given beside its folder) is measured once, and a
run cut short by a write that fails (a file size limit, as a full disk or a quota gives it)
ends in one line saying what the run holds, and ``nanoscout report`` marks it unfinished; a
run commits batches of files, and one killed holds whole files.
Real ``nanoscout measure`` and ``report`` processes on real PNG files."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoscout.clients.runfile import read_run
from tests.system.conftest import nanoscout

pytestmark = pytest.mark.system


def _dots(seed: int, size: int = 128) -> np.ndarray:
    """A uint8 image of bright disks of 10-14 px on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 40, np.uint8)
    for cy in range(16, size, 32):
        for cx in range(16, size, 32):
            r = 5 + int(rng.integers(0, 3))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return img


def _session(folder: Path, first: int, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"img_{k:03d}.png" for k in range(first, first + n)]
    for k, path in enumerate(paths, first):
        Image.fromarray(_dots(k)).save(path)
    return paths


def test_a_file_reached_by_two_paths_is_measured_once(tmp_path: Path) -> None:
    """``measure archive/*`` with ``archive/latest -> 2019-05-02`` measured that session's
    files twice (15 frames of 10 files: the statistics counted 5 images twice); a file given
    beside its folder was measured twice too. A folder whose images lie in sub-folders gave
    "measured 0 images" without saying why."""
    archive = tmp_path / "archive"
    one = _session(archive / "2019-05-01", 0, 3)
    two = _session(archive / "2019-05-02", 3, 2)
    (archive / "latest").symlink_to("2019-05-02")
    listed = sorted(archive.iterdir())  # the shell's archive/*: 2019-05-01, 2019-05-02, latest
    out = tmp_path / "run.parquet"
    proc = nanoscout("measure", *map(str, listed), str(one[0]), str(tmp_path), "--out",
                     str(out), "--no-progress", stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    frames = read_run(out).frames
    assert sorted(frames["file"]) == sorted(str(p) for p in one + two)  # each file once
    assert "measured 5 images" in stdout
    for again, first in [(archive / "latest" / p.name, p) for p in two] + [(one[0], one[0])]:
        assert f"{again} is the same file as {first}, listed before: measured once" in stdout
    assert f"{tmp_path}: its 1 sub-folder(s) are not measured" in stdout, stdout
    prov = json.loads((out / "_run.json").read_text())
    assert sorted(prov["files"]) == sorted(str(p) for p in one + two)


def test_a_write_that_fails_ends_measure_in_one_line_and_the_report_marks_the_run(
        tmp_path: Path) -> None:
    """A full disk, or an output folder made read-only, ended ``measure`` in a 40-line
    traceback (exit 1) that said neither what the run held nor that it was cut short, and
    ``nanoscout report`` then reported the images measured so far as the whole run."""
    files = _session(tmp_path / "in", 0, 12)
    out = tmp_path / "run.csv"
    limit = 20_000  # bytes: the provenance fits, the particle table outgrows it after a few images

    def file_size_limit() -> None:  # EFBIG on the write that crosses it (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = nanoscout("measure", str(tmp_path / "in"), "--out", str(out), "--no-progress",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     preexec_fn=file_size_limit)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, stdout
    assert "Traceback" not in stdout
    line = stdout.strip().splitlines()[-1]
    m = re.fullmatch(rf"nanoscout measure: error: cannot write the run {re.escape(str(out))}: "
                     r"File too large; measuring stopped at (\S+) \(file (\d+) of 12\): the run "
                     r"holds the (\d+) images measured before it, in whole files, and its "
                     r"provenance does not say it finished \(nanoscout report marks it "
                     r"unfinished\)", line)
    assert m is not None, line
    stopped_at, k, held = m.group(1), int(m.group(2)), int(m.group(3))
    assert 1 < k < 12 and held == k - 1 and stopped_at == str(files[k - 1])
    run = read_run(out)
    assert sorted(run.frames["file"]) == [str(p) for p in files[:held]]  # whole files only
    assert os.path.getsize(out) <= limit

    report = tmp_path / "report.html"
    proc = nanoscout("report", str(out), "--out", str(report), "--figures", "png",
                     "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    html = report.read_text(encoding="utf-8")
    said = (f'<strong>not finished</strong> (killed, crashed or stopped by a write that failed, '
            f'such as a full disk): the run holds the images of <span class="n-files-held">'
            f"{held}</span> files of the 12 it was to measure")
    assert f'<p class="note unfinished">This measurement was {said}' in html  # before the numbers
    assert html.index("not finished") < html.index("particles recorded")
    assert html.count(said) == 2  # and in the provenance


def _measure_stopped(tmp_path: Path, sig: signal.Signals
                     ) -> tuple[list[Path], Path, subprocess.Popen[str], list[str]]:
    """A real ``nanoscout measure`` of 100 PNGs sent ``sig`` once its 41st file's line is out;
    returns the files, the run, the ended process and every line it printed."""
    files = _session(tmp_path / "in", 0, 100)
    out = tmp_path / "run.parquet"
    proc = nanoscout("measure", str(tmp_path / "in"), "--out", str(out), "--no-progress",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # one line per image analysed, as it is analysed
        seen.append(line)
        if line.startswith(f"{files[40]}[0]: "):
            proc.send_signal(sig)
            break
    seen += proc.stdout.readlines()
    proc.wait(timeout=60)
    proc.stdout.close()
    return files, out, proc, seen


def test_a_run_of_many_files_commits_whole_batches_and_a_kill_keeps_whole_files(
        tmp_path: Path) -> None:
    """``measure`` committed every file as one Parquet part per table: a 1000-file run was
    3000 parts, which ``read_run`` (the run's close, ``nanoscout report``) opened one by one.
    It commits batches of files (1, 2, 4 ... 64 files): killed (``kill -9``) after its 41st
    file, the run holds the 31 files of its first five batches (or 63, should the kill come
    late), each file whole and once, in 5 (or 6) parts per table, not 41."""
    files, out, proc, seen = _measure_stopped(tmp_path, signal.SIGKILL)
    assert proc.returncode == -9, "".join(seen)
    run = read_run(out)
    held = sorted(run.frames["file"])
    assert held in ([str(p) for p in files[:31]], [str(p) for p in files[:63]]), held
    assert set(run.particles["file"]) == set(held)  # every particle's file is held, whole
    batches = {31: 5, 63: 6}[len(held)]
    for table in (out, out / "_frames", out / "_stats"):
        assert len(list(table.glob("part-*.parquet"))) == batches, table
    prov = json.loads((out / "_run.json").read_text())
    assert "stopped_utc" not in prov and (prov["batch_files"], prov["batch_s"]) == (64, 30.0)


def test_a_stopped_run_keeps_every_whole_file_it_measured(tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM (a systemd stop) ends ``measure`` as a kill does, but it is a request:
    with commits of up to 64 files, a stop lost the files of the batch being gathered (after
    the 41st file: the run held 31). It now commits them, drops the interrupted file's rows,
    and exits 130; the run holds every file before the interrupted one, whole, and stays
    unfinished (no ``stopped_utc``: ``nanoscout report`` says so)."""
    files, out, proc, seen = _measure_stopped(tmp_path, signal.SIGTERM)
    assert proc.returncode == 130, "".join(seen)
    run = read_run(out)
    held = sorted(run.frames["file"])
    assert 40 <= len(held) < 100 and held == [str(p) for p in files[:len(held)]], held
    assert set(run.particles["file"]) == set(held)  # every particle's file is held, whole
    prov = json.loads((out / "_run.json").read_text())
    assert "stopped_utc" not in prov
    assert any(f"holds the {len(held)} images" in x for x in seen), "".join(seen[-5:])


def test_a_calibration_the_reader_refused_is_named_not_called_missing(tmp_path: Path) -> None:
    """A TIFF whose ImageJ calibration reads 1e-6 nm/px (outside the 1e-4..1e6 nm/px a reader
    accepts) was reported as "no calibration", as if the file had none; the line now gives the
    reader's reason, and a PNG (no pixel size in the format) still reads as missing."""
    import tifffile

    tiny = tmp_path / "cal_tiny.tif"
    tifffile.imwrite(tiny, _dots(1), imagej=True, resolution=(1e6, 1e6),
                     metadata={"unit": "nm"})
    plain = tmp_path / "plain.png"
    Image.fromarray(_dots(2)).save(plain)
    proc = nanoscout("measure", str(tiny), str(plain), "--out", str(tmp_path / "r.csv"),
                     "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    line = next(x for x in text.splitlines() if x.startswith(str(tiny)))
    assert "absurd calibration ignored" in line and "outside 0.0001..1e+06 nm/px" in line, line
    line = next(x for x in text.splitlines() if x.startswith(str(plain)))
    assert "no calibration (png files carry no pixel size)" in line, line
