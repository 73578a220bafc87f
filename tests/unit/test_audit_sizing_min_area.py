"""Audit of particle sizing: ``min_area_px`` is the smallest kept particle in frame pixels
(:func:`nanoscout.analysis.instances.instances_from_logits`), whatever the post-processing
stride; areas checked against scikit-image ``regionprops``."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import regionprops

from nanoscout.analysis.instances import instances_from_half_logits, instances_from_logits
from nanoscout.analysis.measure import measure

ON, OFF = np.float32(10.0), np.float32(-10.0)


def _specks() -> tuple[np.ndarray, np.ndarray]:
    """Foreground / core logits (41 x 41) with specks of 1, 2, 3 and 4 px and a 25 px blob."""
    fg = np.full((41, 41), OFF, np.float32)
    core = np.full((41, 41), OFF, np.float32)
    fg[10, 10] = ON  # 1 px: one block at stride 2 and 3
    fg[20:22, 20] = ON  # 2 px
    fg[30, 30:32] = ON  # 3 px (an L)
    fg[31, 30] = ON
    fg[2:4, 2:4] = ON  # 4 px spread over four stride-2 blocks
    fg[5:10, 30:35] = ON  # 25 px
    core[7, 32] = ON
    return fg, core


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("min_area_px", [1, 4, 5, 9])
def test_min_area_is_in_frame_pixels_at_every_stride(stride: int, min_area_px: int) -> None:
    fg, core = _specks()
    labels, scores = instances_from_logits(fg, core, min_area_px=min_area_px,
                                           post_stride=stride, merge_contact=None)
    areas = sorted(int(r.area) for r in regionprops(labels))
    # the specks at stride 1 are the reference: every kept particle has >= min_area_px px
    ref, _ = instances_from_logits(fg, core, min_area_px=min_area_px, post_stride=1,
                                   merge_contact=None)
    assert areas == sorted(int(r.area) for r in regionprops(ref))
    assert all(a >= min_area_px for a in areas), areas
    assert len(scores) == len(areas) + 1
    # measured areas (px², uncalibrated) are the same pixel counts
    assert sorted(measure(labels, None)["area_nm2"].tolist()) == areas


def test_min_area_from_half_resolution_logits() -> None:
    # two diagonal half-resolution logits just above the threshold, their other neighbours
    # below: the 2x bilinear up-sampling leaves two one-pixel specks on the frame grid
    fg_half = np.full((16, 16), np.float32(-1.0), np.float32)
    core_half = np.full((16, 16), OFF, np.float32)
    fg_half[3, 3] = fg_half[4, 4] = np.float32(1.0)
    fg_half[3, 4] = fg_half[4, 3] = np.float32(-3.0)
    fg_half[10:14, 10:14] = ON  # and one particle of 96 px
    core_half[11:13, 11:13] = ON
    found = {}
    for min_area_px in (1, 2, 4, 96, 97):
        labels, scores = instances_from_half_logits(fg_half, core_half, (32, 32),
                                                    min_area_px=min_area_px,
                                                    merge_contact=None)
        found[min_area_px] = sorted(int(r.area) for r in regionprops(labels))
        assert len(scores) == len(found[min_area_px]) + 1
    assert found == {1: [1, 1, 96], 2: [96], 4: [96], 96: [96], 97: []}
