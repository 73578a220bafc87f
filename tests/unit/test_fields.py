"""Synthetic fields of view for the classifier: every class renders, seeds reproduce, rod boxes,
rods_wires means "contains rods" and the particle classes hold none."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import nanoscout.sim.fields as fields_mod
from nanoscout.sim.fields import (
    FIELD_CLASSES,
    Field,
    _capsule,
    render_field,
    render_rod_among_spheres,
)

SHAPE = (192, 224)


@pytest.mark.parametrize("label", FIELD_CLASSES)
def test_every_class_renders(label: str) -> None:
    f = render_field(label, np.random.default_rng(7), shape=SHAPE)
    assert isinstance(f, Field)
    assert f.label == label
    assert f.image.shape == SHAPE and f.image.dtype == np.float32
    assert np.isfinite(f.image).all() and f.image.min() >= 0 and f.image.std() > 0
    assert f.modality in ("TEM", "STEM", "SEM")
    assert f.pixel_size_nm > 0
    assert f.rod_boxes.ndim == 2 and f.rod_boxes.shape[1] == 4


def test_deterministic_per_seed() -> None:
    for label in ("isolated_particles", "film_structure", "charging_saturated"):
        a = render_field(label, np.random.default_rng(3), shape=SHAPE)
        b = render_field(label, np.random.default_rng(3), shape=SHAPE)
        c = render_field(label, np.random.default_rng(4), shape=SHAPE)
        np.testing.assert_array_equal(a.image, b.image)
        assert a.modality == b.modality and a.pixel_size_nm == b.pixel_size_nm
        assert not np.array_equal(a.image, c.image)


def test_unknown_label_is_named() -> None:
    with pytest.raises(ValueError, match="'cats'"):
        render_field("cats", np.random.default_rng(0))


def test_charging_fields_are_clipped() -> None:
    f = render_field("charging_saturated", np.random.default_rng(11), shape=SHAPE)
    assert np.mean(f.image == f.image.max()) > 0.08


def test_capsule_box_encloses_the_rod_tightly() -> None:
    alpha, thick, box = _capsule((100, 120), 40.3, 61.7, 30.0, 4.0, 0.7)
    rows, cols = np.nonzero(alpha > 0)
    x0, y0, x1, y1 = box
    assert cols.min() - 0.5 == x0 and cols.max() + 0.5 == x1
    assert rows.min() - 0.5 == y0 and rows.max() + 0.5 == y1
    assert thick.max() <= 1.0 and (thick > 0).sum() <= (alpha > 0).sum()


def test_rod_among_spheres_box() -> None:
    for seed in range(3):
        f = render_rod_among_spheres(np.random.default_rng(seed), shape=(256, 256))
        assert f.label == "rods_wires" and f.rod_boxes.shape == (1, 4)
        x0, y0, x1, y1 = f.rod_boxes[0]
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        # a long rod: its box is long in at least one direction
        assert max(x1 - x0, y1 - y0) >= 0.19 * 256
        # the rod is visible: the box's mean differs from the field's
        img = f.image
        inside = img[int(y0) + 1: int(y1), int(x0) + 1: int(x1)]
        assert abs(float(inside.mean()) - float(np.median(img))) > 0.02 * float(img.std())


@pytest.mark.parametrize("label", ["isolated_particles", "agglomerated_particles"])
def test_particle_classes_draw_no_rods(monkeypatch: pytest.MonkeyPatch, label: str) -> None:
    mixes: list[dict[str, float] | None] = []
    real = fields_mod._specimen_image

    def spy(*args: Any, **kwargs: Any) -> np.ndarray:
        mixes.append(kwargs.get("mix"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fields_mod, "_specimen_image", spy)
    for seed in range(6):
        f = render_field(label, np.random.default_rng(seed), shape=(96, 96))
        assert f.rod_boxes.shape == (0, 4)
    assert mixes
    for mix in mixes:
        # None is spheres only; nanoscout.sim.synthetic's default mix (5 % rods) must never be used
        assert mix is not None and mix.get("rod", 0.0) == 0.0 and mix.get("plate", 0.0) == 0.0


def test_rods_wires_includes_a_few_rods_among_particles() -> None:
    n_few = 0
    for seed in range(40):
        f = render_field("rods_wires", np.random.default_rng(seed), shape=(128, 128))
        n = f.rod_boxes.shape[0]
        if n == 0:
            continue
        n_few += 1
        assert 1 <= n <= 3
        for x0, y0, x1, y1 in f.rod_boxes:
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            # a rod, not a particle: its box is long (>= 8 % of the side)
            assert max(x1 - x0, y1 - y0) >= 0.08 * 128
    assert 0.25 * 40 <= n_few <= 0.65 * 40  # about 45 % of rods_wires fields


def test_rods_wires_kinds_can_be_drawn_on_their_own() -> None:
    for seed in range(4):
        needles = render_field("rods_wires", np.random.default_rng(seed), shape=(128, 128),
                               rods="needles")
        assert 1 <= len(needles.rod_boxes) <= 3 and needles.label == "rods_wires"
        dominated = render_field("rods_wires", np.random.default_rng(seed), shape=(128, 128),
                                 rods="dominated")
        assert len(dominated.rod_boxes) == 0  # rod fields and wires: no single needles
