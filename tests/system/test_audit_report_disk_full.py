"""Audit of ``nanoscout report`` on a disk that fills up under it: the report's figures were
written straight to their names and their errors not converted, so a full disk (a 60 KiB
tmpfs, ENOSPC) ended the command in an 82-line traceback (exit 1) and left a torn SVG
(24 576 bytes of ``g0_shape.svg``) in the report's folder. Now each figure goes through a
temporary name, and a write that fails is one line naming the figure (exit 2) that leaves no
torn or temporary file. A real ``nanoscout report`` process whose file size limit
(``RLIMIT_FSIZE``: EFBIG, as ``prlimit --fsize`` sets it) stands in for the full disk, on a
real recorded run."""

from __future__ import annotations

import resource
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.runfile import RunWriter
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import DetHeader
from tests.system.conftest import nanoscout

pytestmark = pytest.mark.system

#: the most bytes one file of the report may hold: more than the run's tables and the HTML
#: need, less than a figure
LIMIT = 12 * 1024


def _run(out: Path) -> Path:
    rng = np.random.default_rng(0)
    w = RunWriter(out, {"who": "test"})
    for seq in range(20):
        t = empty_table(30)
        t["id"] = np.arange(1, 31)
        t["ecd_nm"] = rng.lognormal(np.log(8.0), 0.3, 30)
        t["area_nm2"] = np.pi * (t["ecd_nm"] / 2) ** 2
        t["aspect_ratio"] = 1.2
        t["roundness"] = 0.8
        w.add_det(DetHeader(source="cam", seq=seq, t_acq_ns=10**18 + seq * 10**9,
                            t_recv_ns=10**18 + seq * 10**9 + 1,
                            t_done_ns=10**18 + seq * 10**9 + 2, pixel_size_nm=0.5, units="nm",
                            n=30, engine="onnxruntime-cpu", model="m:1", shape=(256, 256)), t)
    w.close()
    return out


def _limited() -> None:
    """In the child: files may not grow beyond LIMIT (EFBIG instead of SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_figure_that_cannot_be_written_is_one_line_and_leaves_no_torn_file(
        tmp_path: Path) -> None:
    run = _run(tmp_path / "run.parquet")
    html = tmp_path / "report.html"
    proc = nanoscout("report", str(run), "--out", str(html), "--figures", "svg",
                     "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     preexec_fn=_limited)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    line = err.strip()
    assert "\n" not in line, err
    assert line.startswith("nanoscout report: error: cannot write the report figure "), line
    assert "g0_ecd.svg" in line and "too large" in line.lower()
    files = tmp_path / "report_files"
    assert not html.exists()
    assert [p.name for p in files.iterdir() if p.name.startswith(".")] == []  # no temporary
    for svg in files.glob("*.svg"):  # whatever is there is a whole figure
        ET.parse(svg)
