"""Real instrument files: replayed to a running daemon, and measured offline."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoscout.clients.subscriber import Subscriber
from tests.system.conftest import nanoscout

pytestmark = pytest.mark.system

#: pixel sizes (nm) from ../shared/data/README.md; None = no calibration in the file
EXPECTED_NM = {
    "JEOL_HAADF_nanoparticles.dm4": 1.249,
    "test_STEM_image.dm3": 0.24854,
    "Fei_HAADF_UK_location.dm3": 5.51,
    "test-1.dm3": None,
    "test-1.dm4": None,
    "128x128-TEM_search.emi": 5.26121,
    "example_image.emd": None,
    "HAADFscan.mrc": 5.67913,
    "test_tiff_Zeiss_SEM_512pix.tif": 11.649976,
    "test_tiff_Zeiss_SEM_1k.tif": 2614.514,
    "FEI-Helios-Ebeam-8bits.tif": 3372.4,
    "FEI-Helios-Ebeam-16bits.tif": 3372.4,
    "test_loading_image_saved_with_DM.tif": 168.6747,
    "test_loading_image_saved_with_imageJ.tif": 168.6747,
}


def _instrument_files(root: Path) -> list[Path]:
    base = root / "instrument-files"
    files = [p for p in base.rglob("*") if p.name in EXPECTED_NM]
    assert len(files) == len(EXPECTED_NM), sorted(p.name for p in files)
    return sorted(files)


def test_replayed_instrument_files_keep_their_calibration(daemon_factory, shared_data: Path, tmp_path: Path) -> None:
    files = _instrument_files(shared_data)
    corrupt = tmp_path / "corrupt.dm3"
    corrupt.write_bytes(files[0].read_bytes()[:300])  # truncated mid-header
    d = daemon_factory("--policy", "lossless")
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        replay = nanoscout("replay", *map(str, files), str(corrupt), "--frames-endpoint", d.input, "--mode", "push",
                           stdout=subprocess.PIPE)
        seen = {}
        for msg in sub.messages(timeout=120):
            seen[msg.header.meta["file"]] = msg.header
            if len(seen) == len(files):
                break
        out, _ = replay.communicate(timeout=60)
    assert replay.returncode == 0
    assert "corrupt.dm3" in out  # reported and skipped
    assert set(seen) == set(EXPECTED_NM)
    for name, expected in EXPECTED_NM.items():
        h = seen[name]
        if expected is None:
            assert h.pixel_size_nm is None and h.units == "px", name
        else:
            assert h.units == "nm", name
            assert h.pixel_size_nm == pytest.approx(expected, rel=1e-3), name


def test_measure_writes_particles_and_label_images(shared_data: Path, tmp_path: Path) -> None:
    images = [
        shared_data / "instrument-files" / "dm" / "JEOL_HAADF_nanoparticles.dm4",
        sorted((shared_data / "stem-dev" / "images").iterdir())[0],
    ]
    out = tmp_path / "particles.csv"
    masks = tmp_path / "masks"
    proc = nanoscout("measure", *map(str, images), "--out", str(out), "--masks", str(masks),
                     stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "no particle measured"
    for img in images:
        mine = [r for r in rows if Path(r["file"]).name == img.name]
        with Image.open(masks / f"{img.stem}.png") as im:
            labels = np.asarray(im)
        assert labels.dtype == np.uint16
        assert len(mine) == len(np.unique(labels)) - 1
        ids = {int(r["id"]) for r in mine}
        assert ids == set(np.unique(labels).tolist()) - {0}
    dm4 = [r for r in rows if r["file"].endswith(".dm4")]
    assert dm4 and all(r["units"] == "nm" and float(r["pixel_size_nm"]) == pytest.approx(1.249, rel=1e-3) for r in dm4)
    jpg = [r for r in rows if r["file"].endswith(images[1].suffix)]
    assert all(r["units"] == "px" for r in jpg)
    for r in rows:
        assert float(r["ecd_nm"]) > 0 and float(r["feret_max_nm"]) >= float(r["feret_min_nm"]) > 0


def test_corrupt_file_in_measure_is_skipped_with_a_reason(shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    good = shared_data / "instrument-files" / "dm" / "JEOL_HAADF_nanoparticles.dm4"
    out = tmp_path / "p.parquet"
    proc = nanoscout("measure", str(bad), str(good), "--out", str(out), stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert "skipped" in stdout and "broken.tif" in stdout
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert set(table.column("file").to_pylist()) == {str(good)}
