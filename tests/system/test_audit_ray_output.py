"""Audit of ``measure --ray``'s output folder under trouble: a second run into a folder a run is
writing is refused (two at once measured every file twice and the provenance kept one run's
record), and a provenance that cannot be written (a file replaced by a folder, a full disk)
ends the run in one error that says what the folder holds. A local Ray with 2 CPU slots, real
PNG files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
