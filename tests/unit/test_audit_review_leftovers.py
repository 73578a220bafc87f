"""Audit of the review frames' temporary files: a daemon killed while it wrote a frame left its
``.NAME.tif.part`` in the review directory for ever, outside the disk budget (30 ``kill -9`` of
a writer of 2048² uint16 frames left 21 of them, 106 MiB, none ever removed). The directory's
next listing now removes those older than ``STALE_PART_S`` and leaves a younger one (it may be
being written). The writer here is really killed mid-write: a process whose file size limit
(``RLIMIT_FSIZE``) ends it with SIGXFSZ inside the TIFF write."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nanoscout.analysis.frame import Frame
from nanoscout.daemon.config import ReviewConfig
from nanoscout.daemon.review import FrameReview

_KILLED_WRITER = """
import signal
import sys
from pathlib import Path
import numpy as np
from nanoscout.analysis.frame import Frame
from nanoscout.daemon.frame_tiff import write_frame_tiff
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: a file too large kills
img = np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024).astype(np.uint16)
frame = Frame.from_image(img, pixel_size_nm=0.5, source="cam", seq=int(sys.argv[2]),
                         modality="TEM", stage=None, meta={}, t_acq_ns=1)
write_frame_tiff(frame, Path(sys.argv[1]) / f"cam-{int(sys.argv[2]):09d}.tif")
"""


def _limited() -> None:
    """In the writer: a file may not grow beyond 256 KiB; SIGXFSZ (its default action, which
    the writer restores) kills it in the middle of the 2 MiB frame."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def _killed_mid_write(directory: Path, seq: int) -> Path:
    """The temporary file a writer killed mid-write left in ``directory``."""
    directory.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(directory), str(seq)],
                          preexec_fn=_limited, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    (left,) = [p for p in directory.iterdir() if p.name.endswith(f"{seq:09d}.tif.part")]
    assert left.name.startswith(".") and left.stat().st_size > 0
    return left


def _frame(seq: int) -> Frame:
    img = np.full((16, 16), seq, np.uint16)
    return Frame.from_image(img, pixel_size_nm=0.5, source="cam", seq=seq, modality="TEM",
                            stage=None, meta={}, t_acq_ns=1 + seq)


def test_a_killed_writers_temporary_frame_is_removed_once_stale(tmp_path: Path) -> None:
    directory = tmp_path / "review"
    old = _killed_mid_write(directory, 4)
    young = _killed_mid_write(directory, 5)
    stale = time.time() - 3600  # killed an hour ago (STALE_PART_S: 10 min)
    os.utime(old, (stale, stale))
    rv = FrameReview(ReviewConfig(directory=directory, frames=4, max_bytes=1 << 20,
                                  max_disk_bytes=1 << 30))
    rv.start()
    try:
        frame = _frame(1)
        rv.offer(frame)
        (saved,) = rv.save_latest("cam", 1)
    finally:
        rv.close()
    assert saved.exists()
    assert not old.exists()  # the stale one is gone
    assert young.exists()  # the young one may be being written: left
    assert rv.leftovers_removed == 1
