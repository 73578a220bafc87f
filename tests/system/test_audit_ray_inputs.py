"""Audit of ``measure --ray`` against ``measure`` on inputs a real archive holds: pixels in a
dtype the frame protocol does not carry, a name that is not UTF-8, a long name, a corrupt file
and an image that cannot be analysed. Each costs only itself, counted as ``measure`` counts it,
and the particles are ``measure``'s."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nanoscout.batch.offline import measure_files
from nanoscout.batch.ray_measure import measure_on_ray
from nanoscout.clients.runfile import read_run
from nanoscout.daemon.app import build_pipeline
from nanoscout.daemon.config import load_config

pytestmark = pytest.mark.system

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'nanoscout[ray]')")
pa = pytest.importorskip("pyarrow")
import pyarrow.dataset as ds  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray with 2 CPU slots for the module (measure_on_ray uses it as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _inputs(shared_data: Path, folder: Path) -> list[Path]:
    """Real BF-TEM pixels as float16 and int64 TIFFs and with one NaN, a real image under a
    Latin-1 name and under a 230-byte name, a corrupt PNG, and two real DM3 files."""
    import tifffile
    from PIL import Image

    folder.mkdir()
    png = sorted((shared_data / "msa-tem-train" / "images").iterdir())[0]
    grey = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    tifffile.imwrite(folder / "half.tif", grey.astype(np.float16))
    tifffile.imwrite(folder / "wide.tif", grey.astype(np.int64) * 10)
    nan = grey.copy()
    nan[5, 5] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan)
    latin = Path(os.fsdecode(os.fsencode(folder) + b"/lat\xe9in.png"))
    shutil.copyfile(png, latin)
    long = folder / ("x" * 230 + ".png")
    shutil.copyfile(png, long)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 10)
    dm = shared_data / "instrument-files" / "dm"
    return [folder / "half.tif", folder / "wide.tif", folder / "nan.tif", latin, long,
            folder / "corrupt.png", dm / "test_STEM_image.dm3", dm / "test-1.dm3"]


def test_awkward_inputs_as_measure_counts_them(cluster: None, shared_data: Path,
                                               tmp_path: Path) -> None:
    files = _inputs(shared_data, tmp_path / "in")
    config = load_config(None, {})
    pipeline = build_pipeline(config, offline=True)
    serial = measure_files(files, pipeline, tmp_path / "run.parquet", log=lambda _: None)
    pipeline.close()
    want = read_run(tmp_path / "run.parquet").to_arrow("particles")

    out = tmp_path / "out"
    report = measure_on_ray(files, config, out)
    assert report.failed == []  # was: the float16/int64 TIFFs and both names failed
    assert len(report.measured) == len(files)
    assert report.images == serial.images == 6  # was 7: the NaN image counted as measured
    assert len(report.unreadable) == len(serial.skipped) == 2  # corrupt.png, nan.tif[0]
    got = ds.dataset(out / "particles", partitioning="hive").to_table()
    key = [("file", "ascending"), ("index", "ascending"), ("id", "ascending")]
    got, want = got.sort_by(key), want.sort_by(key)
    assert got.num_rows == want.num_rows > 0
    assert got.column("file").to_pylist() == want.column("file").to_pylist()
    for c in ("index", "ecd_px", "ecd_nm", "pixel_size_nm"):
        if c in want.column_names:
            assert np.array_equal(got.column(c).to_numpy(), want.column(c).to_numpy(),
                                  equal_nan=True), c
    again = measure_on_ray(files, config, out)  # every file is done, whatever its name
    assert again.measured == [] and len(again.skipped_done) == len(files)
