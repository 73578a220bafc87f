"""Annotation readers: masks (PNG / TIFF, instance or binary), YOLO boxes, CSV points and ImageJ
ROI sets, each from small real files written here; malformed input names file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nanoscout.training.annotations import read_annotation, read_image
from nanoscout.wire.errors import ReaderError

SHAPE = (64, 80)


def _two_disks() -> np.ndarray:
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    lab = np.zeros(SHAPE, np.int32)
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 36] = 1
    lab[(yy - 40) ** 2 + (xx - 60) ** 2 <= 64] = 7
    return lab


def test_instance_png_and_tiff_are_kept(tmp_path: Path) -> None:
    lab = _two_disks()
    lab[0:3, 0:3] = 3  # a third, tiny instance: more than two values, so not binary
    Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m.tif", lab.astype(np.uint16))
    for name in ("m.png", "m.tif"):
        a = read_annotation(tmp_path / name, SHAPE)
        assert a.kind == "mask" and a.boxes is None and a.n == 3
        np.testing.assert_array_equal(a.labels, lab)


def test_binary_mask_becomes_connected_components(tmp_path: Path) -> None:
    fg = (_two_disks() > 0).astype(np.uint8) * 255
    Image.fromarray(fg).save(tmp_path / "b.png")
    a = read_annotation(tmp_path / "b.png", SHAPE)
    assert a.n == 2 and a.labels.dtype == np.int32
    assert set(np.unique(a.labels[fg > 0])) == {1, 2}


def test_mask_shape_mismatch_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ReaderError, match=r"small\.png.*\(10, 10\).*\(64, 80\)"):
        read_annotation(tmp_path / "small.png", SHAPE)


def test_yolo_boxes_become_ellipses_or_the_model_outline(tmp_path: Path) -> None:
    h, w = SHAPE
    p = tmp_path / "b.txt"
    # class cx cy w h, normalised: a 20 x 16 px box around (20, 20) and one around (60, 40)
    p.write_text(f"0 {20 / w} {20 / h} {20 / w} {16 / h}\n\n3 {60 / w} {40 / h} {16 / w} {16 / h}\n")
    a = read_annotation(p, SHAPE)
    assert a.kind == "boxes" and a.n == 2 and a.from_model == 0
    assert a.boxes is not None
    np.testing.assert_allclose(a.boxes[0], [10, 12, 30, 28])
    assert a.labels[20, 20] > 0 and a.labels[12, 10] == 0  # ellipse: the box corner is empty
    # with the model's prediction, a fitting instance replaces the ellipse
    pred = np.zeros(SHAPE, np.int32)
    pred[32:48, 52:68] = 5  # fills the second box exactly
    b = read_annotation(p, SHAPE, np.zeros(SHAPE, np.float32), predict=lambda _img: pred)
    assert b.from_model == 1
    assert b.labels[32, 52] > 0  # the square's corner: the model's outline, not the ellipse


@pytest.mark.parametrize("line, match", [
    ("0 0.5 0.5 0.1", r"b\.txt:2: expected 5 fields"),
    ("0 0.5 x 0.1 0.1", r"b\.txt:2: non-numeric"),
    ("0 1.5 0.5 0.1 0.1", r"b\.txt:2: box .* not normalised"),
    ("0 0.5 0.5 0 0.1", r"b\.txt:2: box .* not normalised"),
])
def test_malformed_yolo_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    p = tmp_path / "b.txt"
    p.write_text("0 0.5 0.5 0.1 0.1\n" + line + "\n")
    with pytest.raises(ReaderError, match=match):
        read_annotation(p, SHAPE)


def test_points_with_diameter_are_disks(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("x,y,diameter\n20.5,20.5,10\n60.5,40.5,6\n")
    a = read_annotation(p, SHAPE)
    assert a.kind == "points" and a.n == 2
    areas = np.bincount(a.labels.ravel())[1:]
    np.testing.assert_allclose(sorted(areas), sorted([np.pi * 9, np.pi * 25]), rtol=0.2)


def test_bare_points_take_the_model_instance_else_the_median_disk(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("20,20\n70,10\n")
    pred = np.zeros(SHAPE, np.int32)
    pred[14:27, 14:27] = 4  # under the first click; the second click hits background
    a = read_annotation(p, SHAPE, np.zeros(SHAPE, np.float32), predict=lambda _img: pred)
    assert a.from_model == 1
    first = a.labels[20, 20]
    assert (a.labels == first).sum() == 13 * 13  # the model's square, exactly
    # the miss: a disk of the median detected ECD (the square's, ~14.7 px)
    second = a.labels[10, 70]
    assert second not in (0, first)
    ecd = 2 * np.sqrt((a.labels == second).sum() / np.pi)
    assert 12 < ecd < 17
    # without a model, a bare point is a disk of the fallback diameter
    b = read_annotation(p, SHAPE)
    assert b.n == 2 and b.from_model == 0


@pytest.mark.parametrize("text, match", [
    ("1,2\n3,x\n", r"p\.csv:2: non-numeric"),
    ("1,2,3,4\n", r"p\.csv:1: expected 'x,y' or 'x,y,diameter'"),
    ("1,2\n100,2\n", r"p\.csv:2: point \(100\.0, 2\.0\) lies outside"),
    ("1,2,-3\n", r"p\.csv:1: diameter -3\.0 must be > 0"),
])
def test_malformed_points_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(ReaderError, match=match):
        read_annotation(p, SHAPE)


def test_imagej_roi_set_is_rasterised(tmp_path: Path) -> None:
    import roifile

    poly = roifile.ImagejRoi.frompoints([[5, 5], [25, 5], [25, 20], [5, 20]])
    poly.roitype = roifile.ROI_TYPE.POLYGON
    poly.name = "poly"
    oval = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.OVAL, left=40, top=30, right=60, bottom=50,
                             name="oval")
    rect = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=65, top=5, right=75, bottom=15,
                             name="rect")
    path = tmp_path / "set.zip"
    roifile.roiwrite(path, [poly, oval, rect])
    a = read_annotation(path, SHAPE)
    assert a.kind == "rois" and a.n == 3
    areas = sorted(np.bincount(a.labels.ravel())[1:].tolist())
    assert abs(areas[0] - 100) <= 25  # rect 10 x 10
    assert abs(areas[1] - np.pi * 100) <= 40  # oval of diameter 20
    assert abs(areas[2] - 20 * 15) <= 45  # polygon 20 x 15
    single = tmp_path / "one.roi"
    rect.tofile(single)
    assert read_annotation(single, SHAPE).n == 1


def test_roi_line_and_broken_files_are_refused(tmp_path: Path) -> None:
    import roifile

    line = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.LINE, x1=1, y1=1, x2=10, y2=10, name="l1")
    path = tmp_path / "line.roi"
    line.tofile(path)
    with pytest.raises(ReaderError, match=r"line\.roi: ROI l1 is a line"):
        read_annotation(path, SHAPE)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ReaderError, match=r"bad\.zip"):
        read_annotation(bad, SHAPE)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ReaderError, match=r"unknown extension '\.json'"):
        read_annotation(tmp_path / "x.json", SHAPE)
    with pytest.raises(ReaderError, match="does not exist"):
        read_annotation(tmp_path / "nope.png", SHAPE)


def test_read_image_grey_from_rgb_and_tiff(tmp_path: Path) -> None:
    rgb = np.zeros((*SHAPE, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    g = read_image(tmp_path / "c.png")
    assert g.shape == SHAPE and g.dtype == np.float32 and g.max() > 0
    tifffile.imwrite(tmp_path / "u16.tif", np.full(SHAPE, 4000, np.uint16))
    assert read_image(tmp_path / "u16.tif").max() == 4000
    with pytest.raises(ReaderError, match="cannot read image"):
        (tmp_path / "junk.png").write_bytes(b"junk")
        read_image(tmp_path / "junk.png")


def test_colour_masks_are_one_particle_per_colour_and_pictures_are_refused(
        tmp_path: Path) -> None:
    """An RGB mask kept only its red channel: two touching particles coloured (200, 0, 0) and
    (200, 90, 0) became one, and a photograph given by mistake "trained" to F1 0."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[5:15, 5:15] = (200, 0, 0)
    rgb[5:15, 15:25] = (200, 90, 0)  # touches the first
    rgb[25:35, 40:50] = (0, 0, 255)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    labels = read_annotation(tmp_path / "colour.png", (40, 60)).labels
    assert len(np.unique(labels)) == 4 and labels[0, 0] == 0
    assert labels[10, 10] != labels[10, 20]
    grey = np.zeros((40, 60), np.uint8)
    grey[5:15, 5:15], grey[25:35, 40:50] = 3, 7
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey_rgb.png")
    assert set(np.unique(read_annotation(tmp_path / "grey_rgb.png", (40, 60)).labels)) == {0, 3, 7}
    photo = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(ReaderError, match="a picture, not a mask"):
        read_annotation(tmp_path / "photo.png", (200, 200))
