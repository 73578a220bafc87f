"""Box supervision (nanoscout.training.boxloss): the ring left unknown, boxes from labels, projection loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nanoscout.training.boxloss import boxes_from_labels, projection_loss, ring_mask  # noqa: E402
from nanoscout.training.crops import ellipse_labels  # noqa: E402


def test_ring_is_inside_the_box_and_outside_the_inner_ellipse() -> None:
    boxes = np.array([[10.0, 10.0, 30.0, 30.0]])
    ring = ring_mask((40, 40), boxes, inner=0.6)
    assert not ring[:10].any() and not ring[30:].any() and not ring[:, :10].any()
    assert ring[10, 10] and ring[29, 29]  # box corners
    assert not ring[20, 20]  # centre: trusted particle
    # ring + inner ellipse = box
    inner = ellipse_labels((40, 40), np.array([[14.0, 14.0, 26.0, 26.0]])) > 0
    assert (ring | inner)[10:30, 10:30].all()


def test_overlapping_boxes_trust_either_inner_ellipse() -> None:
    boxes = np.array([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 30.0, 30.0]])
    ring = ring_mask((32, 32), boxes, inner=0.6)
    assert not ring[20, 20]  # the second box's centre, inside the first box's ring area
    assert not ring[10, 10]  # first box's centre


def test_boxes_from_labels() -> None:
    lab = np.zeros((20, 20), np.int32)
    lab[2:5, 3:9] = 1
    lab[10, 10] = 2  # one pixel: too small
    lab[12:18, 12:14] = 3
    b = boxes_from_labels(lab)
    assert b.tolist() == [[2, 3, 5, 9], [12, 12, 18, 14]]


def test_projection_loss_is_zero_for_a_particle_touching_every_side() -> None:
    logits = torch.full((1, 20, 20), -10.0)
    logits[0, 5:15, 9:11] = 10.0  # vertical bar: touches top and bottom only
    logits[0, 9:11, 5:15] = 10.0  # and a horizontal one: a cross reaches all four sides
    boxes = torch.tensor([[0, 5, 5, 15, 15]])
    assert projection_loss(logits, boxes).item() < 1e-3
    bar = torch.full((1, 20, 20), -10.0)
    bar[0, 5:15, 9:11] = 10.0
    assert projection_loss(bar, boxes).item() > 0.3  # misses most columns
    empty = torch.zeros((1, 20, 20))
    assert projection_loss(empty, torch.zeros((0, 5), dtype=torch.int64)).item() == 0.0


def test_projection_loss_has_gradients() -> None:
    logits = torch.zeros((2, 16, 16), requires_grad=True)
    loss = projection_loss(logits, torch.tensor([[1, 2, 2, 10, 12]]))
    loss.backward()
    assert logits.grad is not None and logits.grad[1].abs().sum() > 0
    assert logits.grad[0].abs().sum() == 0
