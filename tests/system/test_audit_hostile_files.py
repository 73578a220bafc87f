"""Hostile and damaged microscope files, and files still being written (an audit, 2026-12-07).

A real ``nanoscout measure`` under a memory cap meets small compressed files that expand to
gigabytes; a real writer process writes into a folder ``replay_watch`` watches.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nanoscout.clients.acquisition.replay import replay_watch
from tests.conftest import wait_until
from tests.system.conftest import nanoscout

pytestmark = pytest.mark.system


def _emd_bomb(example: Path, target: Path) -> None:
    """The shared example EMD with its image replaced by 40000 x 40000 uint8 zeros in gzip
    chunks (1.6 GB decoded, ~20 kB on disk)."""
    import h5py

    shutil.copy(example, target)
    target.chmod(0o644)
    with h5py.File(target, "r+") as f:
        group = f["signals/__unnamed__"]
        del group["data"]
        group.create_dataset("data", shape=(40000, 40000), dtype="uint8", chunks=(1024, 1024),
                             compression="gzip", fillvalue=0)
        group["data"][:1024, :1024] = 1


def _tiff_pages_bomb(target: Path) -> None:
    """A zlib TIFF of 5 pages of 16384 x 16384 px: each page is as large as an image may be,
    together they are 1.3 G px (1.3 GB decoded, ~1.3 MB on disk)."""
    import tifffile

    tile = np.zeros((4096, 4096), np.uint8)
    tifffile.imwrite(target, (tile for _ in range(5 * 16)), shape=(5, 16384, 16384),
                     dtype=np.uint8, tile=(4096, 4096), compression="zlib")


def test_small_compressed_files_that_expand_to_gigabytes_are_refused_unread(
        shared_data: Path, tmp_path: Path) -> None:
    """An 18 kB EMD of 40000 x 40000 px took 35 s and 3.1 GB of memory before it was refused
    (HDF5 was decoded whole), and a TIFF whose pages were each allowed took memory for all of
    them at once (12 pages of 15360 x 15360 px in 2.8 MB: 5.4 GB): under a 2 GiB cap both
    ended as MemoryError. Both are refused on their declared sizes now, and the next file is
    measured."""
    emd = tmp_path / "bomb.emd"
    _emd_bomb(shared_data / "instrument-files" / "emd" / "example_image.emd", emd)
    pages = tmp_path / "pages.tif"
    _tiff_pages_bomb(pages)
    assert emd.stat().st_size < 1 << 20 and pages.stat().st_size < 4 << 20
    good = tmp_path / "good.png"
    Image.fromarray(np.full((128, 128), 60, np.uint8)).save(good)

    def cap() -> None:  # what the machine would give; decoding either file takes more
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    out = tmp_path / "run.csv"
    proc = nanoscout("measure", str(emd), str(pages), str(good), "--out", str(out),
                     "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     preexec_fn=cap)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "Traceback" not in stdout and "MemoryError" not in stdout, stdout
    assert "bomb.emd: an image of 40000 x 40000 px is larger than" in stdout, stdout
    assert "pages.tif: its 5 images hold 1342177280 px in all" in stdout, stdout
    assert "measured 1 images" in stdout and "skipped 2" in stdout, stdout


# ---------------------------------------------------------------------------------------------
# a folder a microscope writes into

WRITER = r"""
import io, os, sys, time
import numpy as np, tifffile
folder, pause = sys.argv[1], float(sys.argv[2])
rng = np.random.default_rng(1)
first = rng.integers(0, 60000, (256, 256), dtype=np.uint16)
second = rng.integers(0, 60000, (256, 256), dtype=np.uint16)
def tif(a):
    buf = io.BytesIO(); tifffile.imwrite(buf, a); return buf.getvalue()
# a growing stack: an in-situ series, one page appended per acquisition
with tifffile.TiffWriter(os.path.join(folder, "series.tif")) as tw:
    for k in range(3):
        tw.write(first + k, contiguous=False)
        tw._fh.flush()
        print(f"page {k}", flush=True)
        sys.stdin.readline()  # the test says when the page was sent
# the software's "save current image" under one name: the next image has the same size
with open(os.path.join(folder, "current.tif"), "wb") as fh:
    fh.write(tif(first))
print("current 1", flush=True)
sys.stdin.readline()
with open(os.path.join(folder, "current.tif"), "r+b") as fh:
    fh.write(tif(second))
print("current 2", flush=True)
sys.stdin.readline()
"""


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


class _Collect:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()

    def send(self, image: np.ndarray, **kw: Any) -> int:
        with self.lock:
            self.sent.append((kw["meta"]["file"], kw["meta"]["index"], _digest(image)))
            return len(self.sent)

    def count(self) -> int:
        with self.lock:
            return len(self.sent)


def test_watch_sends_each_acquisition_once_from_a_growing_stack_and_a_name_reused(
        tmp_path: Path) -> None:
    """A real writer process: a TIFF series that grows by one page per acquisition was sent
    whole at each page (3 pages: 6 frames, the first one 3 times, so every statistic counted
    its particles three times), and a second image saved under the same name, the same number
    of bytes, was never sent (a change of modification time alone was taken for a touch)."""
    rng = np.random.default_rng(1)
    first = rng.integers(0, 60000, (256, 256), dtype=np.uint16)
    second = rng.integers(0, 60000, (256, 256), dtype=np.uint16)
    expected = [("series.tif", k, _digest(first + k)) for k in range(3)]
    expected += [("current.tif", 0, _digest(first)), ("current.tif", 0, _digest(second))]

    stop = threading.Event()
    pub, lines = _Collect(), list[str]()
    watcher = threading.Thread(target=lambda: replay_watch(
        tmp_path, pub, stop=stop, log=lines.append, poll_s=0.02, settle_polls=2))
    watcher.start()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        for want in (1, 2, 3, 4, 5):  # the writer waits until the step it wrote was sent
            step = writer.stdout.readline().strip()
            wait_until(lambda n=want: pub.count() >= n, timeout=20,  # type: ignore[misc]
                       what=f"frame {want} sent after the writer's {step!r}")
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.wait(timeout=20) == 0
        # written after everything else changed: by the time it is sent, a stack sent again
        # or an image sent twice has been (files that settle at one poll go oldest first)
        Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "end.png")
        wait_until(lambda: any(s[0] == "end.png" for s in pub.sent), timeout=20,
                   what="the last file sent")
    finally:
        stop.set()
        watcher.join(timeout=20)
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=20)  # closes its pipes
    assert pub.sent[:-1] == expected, "\n".join(lines)
