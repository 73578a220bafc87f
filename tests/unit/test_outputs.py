"""Files Fiji/ImageJ, napari and image viewers open: label TIFFs (tifffile), ROI sets
(roifile), overlays with a scale bar (Pillow), the napari reader plugin and unique names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import roifile
import tifffile
import yaml
from PIL import Image

from nanoscout.clients.napari_reader import get_reader
from nanoscout.clients.outputs import (
    UniqueNames,
    nice_length,
    write_ellipse_rois,
    write_label_tiff,
    write_overlay_png,
    write_rois,
)
from nanoscout.wire.errors import NanoscoutError
from nanoscout.wire.particles import empty_table

ROOT = Path(__file__).resolve().parents[2]


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (120, 160)).astype(np.float32)
    labels = np.zeros(image.shape, np.int32)
    yy, xx = np.mgrid[:120, :160]
    labels[(yy - 30) ** 2 + (xx - 40) ** 2 < 100] = 1  # a disk of radius 10 px
    labels[70:90, 100:140] = 2  # a 40 x 20 px rectangle
    image[labels > 0] += 50
    t = empty_table(2)
    t["id"] = [1, 2]
    t["bbox"] = [[30, 20, 51, 41], [100, 70, 140, 90]]
    t["x"], t["y"] = [40, 119.5], [30, 79.5]
    t["major_nm"], t["minor_nm"], t["orientation_deg"] = [10, 20], [10, 10], [0, 0]
    t["border"] = [False, True]
    return image, labels, t


def test_label_tiff_is_an_imagej_hyperstack_calibrated_in_nm(tmp_path: Path) -> None:
    image, labels, _ = _scene()
    path = write_label_tiff(labels, tmp_path / "a.labels.tif", image=image, pixel_size_nm=0.4,
                            properties={"file": "a.dm4"})
    with tifffile.TiffFile(path) as tf:
        assert tf.is_imagej and tf.series[0].axes == "CYX" and tf.series[0].dtype == np.uint16
        ij = tf.imagej_metadata
        assert ij is not None
        assert ij["unit"] == "nm" and ij["channels"] == 2 and ij["Labels"] == ["image", "labels"]
        num, den = tf.pages.first.tags["XResolution"].value
        assert den / num == pytest.approx(0.4)  # ImageJ: pixels per unit -> 0.4 nm per px
        data = tf.asarray()
    np.testing.assert_array_equal(data[1], labels)
    assert data[0][labels > 0].mean() > data[0][labels == 0].mean()  # the image channel
    # uncalibrated: ImageJ's "pixel" unit, no resolution in nm
    path = write_label_tiff(labels, tmp_path / "b.labels.tif")
    with tifffile.TiffFile(path) as tf:
        ij, tags = tf.imagej_metadata, tf.pages.first.tags
        assert ij is not None
        assert ij["unit"] == "pixel" and "XResolution" not in tags \
            or tags["XResolution"].value == (1, 1)
    with pytest.raises(NanoscoutError, match="70000 particles"):
        write_label_tiff(np.full((2, 2), 70000), tmp_path / "c.labels.tif")


def test_roi_set_outlines_each_particle(tmp_path: Path) -> None:
    _, labels, t = _scene()
    rois = roifile.roiread(write_rois(labels, t, tmp_path / "a.rois.zip"))
    assert isinstance(rois, list)  # a ROI set (.zip) reads as a list
    assert [r.name for r in rois] == ["0001", "0002"]
    rect = np.asarray(rois[1].coordinates())
    assert rect.min(axis=0) == pytest.approx([100, 70]) and rect.max(axis=0) == pytest.approx([140, 90])
    disk = np.asarray(rois[0].coordinates())
    r = np.hypot(disk[:, 0] - 40.5, disk[:, 1] - 30.5)
    assert 8.5 < r.mean() < 10.5  # the outline of the radius-10 disk
    ell = roifile.roiread(write_ellipse_rois(t, tmp_path / "e.rois.zip", units="nm",
                                             pixel_size_nm=0.5))
    assert isinstance(ell, list)
    e = np.asarray(ell[1].coordinates())  # 20 nm x 10 nm at 0.5 nm/px = 40 x 20 px
    assert np.ptp(e[:, 0]) == pytest.approx(40, abs=0.5) and np.ptp(e[:, 1]) == pytest.approx(20, abs=0.5)
    empty = write_rois(labels, empty_table(0), tmp_path / "none.rois.zip")
    assert roifile.roiread(empty) == []


def test_overlay_has_outlines_and_a_scale_bar(tmp_path: Path) -> None:
    image, labels, t = _scene()
    path = write_overlay_png(image, labels, tmp_path / "o.png", pixel_size_nm=0.5,
                             border_ids=[2])
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb == (255, 215, 0)).all(axis=2).sum() > 20  # yellow outlines
    assert (rgb == (80, 160, 255)).all(axis=2).sum() > 20  # the border particle in blue
    white_rows = (rgb[-20:] == 255).all(axis=2).sum(axis=1)
    assert white_rows.max() == round(nice_length(160 * 0.5 / 5) / 0.5) + 1  # the bar, px
    assert nice_length(16) == 10 and nice_length(4.9) == 2 and nice_length(0.3) == 0.2


def test_unique_names_keep_the_suffix() -> None:
    names = UniqueNames()
    got = [names(Path("dm/test-1.dm3")), names(Path("dm/test-1.dm4")),
           names(Path("other/test-1.dm3")), names(Path("a.emd"), 1, 3), names(Path("A.emd"), 1, 3)]
    assert got == ["test-1.dm3", "test-1.dm4", "test-1.dm3-2", "a.emd_1", "A.emd_1-2"]


def test_napari_reader_plugin(tmp_path: Path) -> None:
    image, labels, _ = _scene()
    path = str(write_label_tiff(labels, tmp_path / "x.dm4.labels.tif", image=image,
                                pixel_size_nm=0.25))
    assert get_reader(str(tmp_path / "x.png")) is None
    reader = get_reader(path)
    assert reader is not None
    (img, ikw, itype), (lab, lkw, ltype) = reader(path)
    assert (itype, ltype) == ("image", "labels")
    assert ikw["scale"] == lkw["scale"] == (0.25, 0.25) and lkw["name"] == "x.dm4 labels"
    np.testing.assert_array_equal(lab, labels)
    # napari finds it: the entry point names the manifest, which names the reader
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["napari.manifest"] == {
        "nanoscout": "nanoscout.clients:napari.yaml"}
    manifest = yaml.safe_load((ROOT / "src/nanoscout/clients/napari.yaml").read_text())
    (cmd,) = manifest["contributions"]["commands"]
    assert cmd["python_name"] == "nanoscout.clients.napari_reader:get_reader"
    assert manifest["contributions"]["readers"][0]["filename_patterns"] == ["*.labels.tif"]


def _foreign_or_damaged_label_tiffs(d: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (path, whether it carries nanoscout's properties, so get_reader claims it)."""
    import json

    img = (np.arange(64 * 64).reshape(64, 64) % 200).astype(np.uint8)
    good = write_label_tiff(np.zeros((64, 64), np.int32), d / "good.labels.tif", image=img,
                            pixel_size_nm=0.5)

    def ij(name: str, props: str) -> Path:
        tifffile.imwrite(d / name, img, imagej=True, metadata={"Properties": {"nanoscout": props}})
        return d / name

    (d / "truncated.labels.tif").write_bytes(good.read_bytes()[:300])
    (d / "garbage.labels.tif").write_bytes(b"hello, not a tiff" * 4)
    (d / "empty.labels.tif").write_bytes(b"")
    tifffile.imwrite(d / "stack5.labels.tif", np.zeros((5, 32, 32), np.uint8))
    tifffile.imwrite(d / "rgb.labels.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    return {
        "truncated": (d / "truncated.labels.tif", False),
        "garbage": (d / "garbage.labels.tif", False),
        "empty": (d / "empty.labels.tif", False),
        "missing": (d / "missing.labels.tif", False),
        "stack5": (d / "stack5.labels.tif", False),
        "rgb": (d / "rgb.labels.tif", False),
        "bad json": (ij("badjson.labels.tif", "{not json"), True),
        "bad pixel size": (ij("badpx.labels.tif", json.dumps({"pixel_size_nm": "abc"})), True),
        "properties a list": (ij("list.labels.tif", "[1, 2]"), True),
        "channels wrong": (ij("chan.labels.tif", json.dumps({"channels": ["image", "labels"]})),
                           True),
    }


def test_napari_reader_leaves_foreign_files_and_names_the_damaged_one(tmp_path: Path) -> None:
    """get_reader claimed every ``*.labels.tif`` by its name, and the reader then raised raw
    ValueError, JSONDecodeError, AttributeError ... on a foreign or damaged one."""
    from nanoscout.clients.napari_reader import read_labels_tiff
    from nanoscout.wire.errors import ReaderError

    cases = _foreign_or_damaged_label_tiffs(tmp_path)
    for name, (path, ours) in cases.items():
        assert (get_reader(str(path)) is not None) == ours, name
        with pytest.raises(ReaderError, match=re.escape(str(path))):
            read_labels_tiff(str(path))
    # one file napari cannot read among good ones: the whole list is not ours
    good = str(tmp_path / "good.labels.tif")
    assert get_reader([good, good]) is not None
    assert get_reader([good, str(cases["stack5"][0])]) is None


@pytest.mark.parametrize("shape", [(7, 1), (1, 1), (1, 7)])
@pytest.mark.parametrize("with_image", [True, False])
def test_label_tiff_of_a_one_pixel_wide_image_reads_back(tmp_path: Path, shape: tuple[int, int],
                                                          with_image: bool) -> None:
    """tifffile took the trailing width-1 axis of an N x 1 image for colour samples and wrote a
    stack that ImageJ, napari and nanoscout's own reader could not open."""
    from nanoscout.clients.acquisition.readers import read_images
    from nanoscout.clients.napari_reader import read_labels_tiff

    labels = np.zeros(shape, np.int32)
    labels.flat[0] = 1
    image = np.arange(labels.size, dtype=np.float32).reshape(shape) if with_image else None
    path = write_label_tiff(labels, tmp_path / "n.png.labels.tif", image=image,
                            pixel_size_nm=0.5)
    layers = read_labels_tiff(str(path))
    assert [kind for _, _, kind in layers] == (["image", "labels"] if with_image else ["labels"])
    for data, _, _ in layers:
        assert data.shape == shape
    np.testing.assert_array_equal(layers[-1][0], labels)
    records = read_images(path)
    assert [r.data.shape for r in records] == [shape] * len(layers)
    assert records[0].pixel_size_nm == pytest.approx(0.5)
