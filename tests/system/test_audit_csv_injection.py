"""Spreadsheet formula injection (OWASP "CSV Injection") through ``nanoscout measure``'s CSV
run: real files whose names begin with =, +, -, @ or a tab were written into ``RUN.frames.csv``
and ``RUN.classes.csv`` as they are, and Excel / LibreOffice evaluate such a cell as a formula
(``=HYPERLINK(...)`` a link, ``-2+3+cmd|...`` a command). Each is now a text cell with a ' in
front (:mod:`nanoscout.clients.spreadsheet`), and ``read_run`` gives the names back exactly."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoscout.clients.runfile import read_run

pytestmark = pytest.mark.system

#: file names a spreadsheet would run (no "/": a file name cannot hold one)
FORMULAS = ('=HYPERLINK("http:evil.example","open").png', "@SUM(1+1)cmd.png",
            "-2+3+cmd|' -C calc'!A0.png", "+1+1.png", "\t=1+1.png")
#: a name that begins with a quote and then "=": one quote more, so that it reads back exactly
QUOTED = "'=quoted.png"
PLAIN = "plain-name.png"


def _png(path: Path) -> None:
    img = np.full((96, 96), 40, np.uint8)
    img[30:50, 30:50] = 200
    Image.fromarray(img).save(path)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_measure_csv_run_writes_formula_like_file_names_as_text(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    names = [*FORMULAS, QUOTED, PLAIN]
    for name in names:
        _png(folder / name)
    # run in the folder, the files named bare: the run's file column holds the names as given
    proc = subprocess.run([sys.executable, "-m", "nanoscout", "measure", "--out",
                           str(tmp_path / "run.csv"), "--no-progress", "--", *names],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {n: "'" + n for n in [*FORMULAS, QUOTED]} | {PLAIN: PLAIN}
    frames = _rows(tmp_path / "run.frames.csv")  # written by pyarrow
    assert sorted(r["file"] for r in frames) == sorted(expected.values())
    assert all(r["source"] == "measure-px" and float(r["height"]) == 96 for r in frames)
    classes = _rows(tmp_path / "run.classes.csv")  # written by the csv module
    assert sorted(r["file"] for r in classes) == sorted(expected.values())
    assert all(0 <= float(r["probability"]) <= 1 and not r["top_class"].startswith("'")
               for r in classes)
    run = read_run(tmp_path / "run.csv")  # nanoscout report reads the names as they are
    assert sorted(run.frames["file"]) == sorted(names)
