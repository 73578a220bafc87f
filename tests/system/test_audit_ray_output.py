"""Audit of ``measure --ray``'s output folder under trouble: a second run into a folder a run is
writing is refused (two at once measured every file twice and the provenance kept one run's
record), a provenance that cannot be written (a file replaced by a folder, a full disk)
ends the run in one error that says what the folder holds, and an output disk that fills up
under the workers stops the run handing out files. A local Ray with 2 CPU
slots, real PNG files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoscout.batch.parts import part_paths
from nanoscout.batch.ray_measure import RayReport, measure_on_ray
from nanoscout.daemon.config import load_config
from nanoscout.wire.errors import ConfigError, NanoscoutError

pytestmark = pytest.mark.system

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nanoscout[ray]')")
pytest.importorskip("pyarrow")
import pyarrow.dataset as ds  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray with 2 CPU slots for the module (measure_on_ray uses it as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _pngs(folder: Path, n: int) -> list[Path]:
    """``n`` 128² uint8 PNGs of bright disks (uncalibrated)."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:128, :128]
    paths = []
    for k in range(n):
        img = np.full((128, 128), 40, np.uint8)
        for cy in range(16, 128, 32):
            for cx in range(16, 128, 32):
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < (5 + (k + cx) % 3) ** 2] = 200
        paths.append(folder / f"img_{k:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def test_a_second_run_into_a_folder_being_written_is_refused(cluster: None,
                                                             tmp_path: Path) -> None:
    files = _pngs(tmp_path / "in", 6)
    config = load_config(None, {})
    out = tmp_path / "out"
    second: list[BaseException] = []

    def start_another(first: RayReport) -> None:  # the first run is up and writing
        try:
            measure_on_ray(files, config, out, workers=1)
        except BaseException as exc:  # what the second run raised, checked below
            second.append(exc)

    report = measure_on_ray(files, config, out, workers=1, on_started=start_another)
    assert len(second) == 1 and isinstance(second[0], ConfigError), second
    assert str(second[0]).startswith(f"{out} is being written by another measure --ray run "
                                     "(host ")
    assert sorted(report.measured) == sorted(map(str, files))
    images = ds.dataset(out / "images", partitioning="hive").to_table()
    assert sorted(images.column("file").to_pylist()) == sorted(map(str, files))
    prov = json.loads((out / "_run.json").read_text(encoding="utf-8"))
    assert prov["earlier_runs"] == [] and prov["rows"]["images"] == 6  # one run, the first

    again = measure_on_ray(files, config, out, workers=1)  # the lock went with the run
    assert sorted(again.skipped_done) == sorted(map(str, files)) and not again.measured


def test_a_provenance_that_cannot_be_written_is_one_error_that_says_what_was_done(
        cluster: None, tmp_path: Path) -> None:
    """The final ``_run.json`` write failing (here: its temporary name taken by a folder; a
    full disk did the same) ended ``measure --ray`` in a traceback after the work was done,
    without the summary line."""
    files = _pngs(tmp_path / "in", 3)
    out = tmp_path / "out"

    def take_the_name(report: RayReport) -> None:  # after the first provenance is written
        (out / "._run.json.tmp").mkdir()

    with pytest.raises(NanoscoutError) as caught:
        measure_on_ray(files, load_config(None, {}), out, workers=1, on_started=take_the_name)
    assert str(caught.value) == (
        f"cannot write {out}: Is a directory; this run measured 3 files (their parts are "
        "written: a run started again skips them) and 0 failed; "
        f"{out / '_run.json'} does not record this run's outcome")
    images = ds.dataset(out / "images", partitioning="hive").to_table()
    assert sorted(images.column("file").to_pylist()) == sorted(map(str, files))


@pytest.fixture
def own_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on a 16 MiB tmpfs of its own (root only: ``mount``), unmounted at the
    end."""
    where = tmp_path / "out"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until its file system has no byte left (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        chunk = b"\0" * (1 << 20)
        while True:
            os.write(fd, chunk)  # short writes as the space runs out, then ENOSPC
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def test_a_full_output_disk_stops_handing_out_files(cluster: None, tmp_path: Path,
                                                    own_tmpfs: Path) -> None:
    """The output's file system fills up after the first file (the workers' writes fail with
    ENOSPC): the run handed every other file to the workers (11 of 12 analysed in vain, each
    failed, as 76 of 100 in the audit) before it ended, on its own `_run.json`. Now it starts
    no new file,
    lets the one in flight end, and ends in one line that counts the files measured, failed and
    not started; once space is freed the next run measures the failed and the not started."""
    files = _pngs(tmp_path / "in", 12)
    out = own_tmpfs
    config = load_config(None, {})
    seen: list[RayReport] = []
    filler = out / ".filler"

    def full_after_the_first(summary: dict[str, object]) -> None:
        if not filler.exists():
            _fill(filler)

    with pytest.raises(NanoscoutError) as caught:
        measure_on_ray(files, config, out, workers=2, on_started=seen.append,
                       on_file=full_after_the_first)
    report = seen[0]  # the run's own report, filled in as it went
    measured, failed = report.measured, report.failed
    # the first file, perhaps the other worker's first; each worker failed at most one more
    assert 1 <= len(measured) <= 2 and 1 <= len(failed) <= 2, (measured, failed)
    not_started = report.not_started
    assert len(measured) + len(failed) + len(not_started) == 12
    assert all("No space left on device" in why for _, why in failed), failed
    assert str(caught.value) == (
        f"cannot write {out}: No space left on device; this run measured {len(measured)} "
        f"files (their parts are written: a run started again skips them) and {len(failed)} "
        f"failed, {len(not_started)} not started (a run started again measures these and the "
        f"failed); {out / '_run.json'} does not record this run's outcome")
    assert [f for f in map(str, files) if os.path.exists(part_paths(out, f)[1])] == measured

    filler.unlink()  # space freed: the next run measures the rest
    again = measure_on_ray(files, config, out, workers=2)
    assert sorted(again.skipped_done) == sorted(measured) and not again.failed
    assert sorted(again.measured) == sorted([f for f, _ in failed] + not_started)
    images = ds.dataset(out / "images", partitioning="hive").to_table()
    assert sorted(images.column("file").to_pylist()) == sorted(map(str, files))


def test_a_file_whose_own_part_cannot_be_written_does_not_stop_the_run(
        cluster: None, tmp_path: Path) -> None:
    """A write that fails for the file's own reason (here its images part's name is taken by
    a folder: EISDIR) fails that file only; the run goes on with the others and ends."""
    files = _pngs(tmp_path / "in", 4)
    out = tmp_path / "out"
    part_paths(out, files[1])[1].mkdir(parents=True)
    report = measure_on_ray(files, load_config(None, {}), out, workers=2)
    assert [f for f, _ in report.failed] == [str(files[1])] and not report.not_started
    assert sorted(report.measured) == sorted(str(f) for f in files if f != files[1])
