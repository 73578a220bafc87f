"""Pseudo-masks for the STEM boxes, drawn by a detector and kept honest by the boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanoscout.training import realdata
from nanoscout.training.crops import ellipse_labels, load_real_training
from nanoscout.training.crops import pseudo_mask_labels as load_masks
from nanoscout.training.pseudo_masks import refine, write_masks

ROOT = Path(__file__).resolve().parents[2]


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r


def test_a_box_takes_the_detectors_outline_only_where_it_fits_the_box() -> None:
    shape = (80, 80)
    pred = np.zeros(shape, np.int32)
    # box 0: the detector found a square particle filling 64 % of its box: its outline is kept
    pred[12:28, 12:28] = 7
    # box 1: nothing found: the ellipse stays
    # box 2: the detector's instance runs far past the box (cut to it, it would be the box)
    pred[40:75, 0:35] = 3
    # box 3: the detector found only a sliver of the particle (< half its ellipse)
    pred[60:63, 60:70] = 5
    boxes = np.array([[10, 10, 30, 30], [40, 10, 50, 20], [10, 50, 25, 65], [58, 58, 72, 72]],
                     np.float64)
    labels, n = refine(pred, boxes)
    assert n == 1
    ell = ellipse_labels(shape, boxes)
    ids = {k: int(np.bincount(labels[ell == k + 1]).argmax()) for k in range(4)}
    square = labels == ids[0]
    assert square.sum() == 16 * 16 and square[12:28, 12:28].all()  # the detector's outline
    for k in (1, 2, 3):  # the ellipses, as the boxes alone would give
        assert ((labels == ids[k]) == (ell == k + 1)).all(), k
    # a particle's outline never leaves its box
    assert not (labels[:10] > 0).any() and not (labels[:, :10] > 0).any()


def test_masks_of_another_shape_are_refused_and_missing_ones_are_none(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "a.npz", labels=np.ones((4, 5), np.uint16))
    got = load_masks(tmp_path, "a", (4, 5))
    assert got is not None and got.dtype == np.int32 and (got == 1).all()
    assert load_masks(tmp_path, "b", (4, 5)) is None
    with pytest.raises(ValueError, match="not the image's"):
        load_masks(tmp_path, "a", (5, 4))


def test_training_reads_the_masks_the_shipped_stem_detector_drew(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    """The real STEM training images (the tuning material left out): masks written for each,
    most boxes refined, and load_real_training takes them instead of the ellipses."""
    tune = set(realdata.stem_tuning_names(shared_data))
    index = write_masks(ROOT / "models/weights/detector_stem.onnx", tmp_path, root=shared_data,
                        exclude=tuple(tune), threads=2)
    assert json.loads((tmp_path / "index.json").read_text())["images"] == index["images"]
    assert set(index["images"]) == set(realdata.load_split("stem")["train"]) - tune
    boxes = sum(v["boxes"] for v in index["images"].values())
    refined = sum(v["refined"] for v in index["images"].values())
    assert 0.5 * boxes < refined < boxes
    plain = {r.id: r for r in load_real_training(("stem",), shared_data, exclude=tune)}
    masked = {r.id: r for r in load_real_training(("stem",), shared_data, exclude=tune,
                                                 stem_masks=tmp_path)}
    assert plain.keys() == masked.keys()
    for i, r in masked.items():
        drawn = load_masks(tmp_path, i, r.image.shape)
        assert drawn is not None and (r.labels == drawn).all()
        # one instance per box, as with the ellipses
        assert np.unique(r.labels[r.labels > 0]).size == np.unique(
            plain[i].labels[plain[i].labels > 0]).size
    assert any((masked[i].labels != plain[i].labels).any() for i in masked)


def test_train_refuses_a_mask_folder_without_masks(tmp_path: Path) -> None:
    """A mistyped folder would silently train on the ellipses: refused before any training."""
    from nanoscout.training.train import main

    with pytest.raises(SystemExit, match="no pseudo-masks there"):
        main(["--stem-masks", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--steps", "1"])
