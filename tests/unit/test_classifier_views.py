"""The shipped classifier and lens on frames far from square: seen in views at the aspect
they were trained on (nanoscout.analysis.classifier, "Views of frames far from square")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.classifier import FieldClassifier
from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.preprocess import fixed_input
from nanoscout.sim.fields import FIELD_CLASSES, render_field, render_rod_among_spheres

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
CARD, LENS = WEIGHTS / "classifier.json", WEIGHTS / "lens.json"

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def field_classifier() -> FieldClassifier:
    """The shipped classifier and lens as the daemon runs them."""
    from nanoscout.engines import create_engine

    if not CARD.is_file() or not LENS.is_file():
        pytest.skip(f"no shipped classifier / lens in {WEIGHTS}")
    card, lens_card = ModelCard.load(CARD), ModelCard.load(LENS)
    return FieldClassifier(create_engine(card.onnx_path(CARD), "cpu", threads=1), card,
                           lens=create_engine(lens_card.onnx_path(LENS), "cpu", threads=1),
                           lens_card=lens_card)


def test_view_counts_are_bounded() -> None:
    from nanoscout.analysis.classifier import view_count

    assert [view_count(s) for s in ((512, 512), (768, 1024), (1024, 768), (1024, 1536),
                                    (4000, 6000), (1024, 8192), (8192, 1024), (10, 100_000))
            ] == [1, 1, 1, 2, 2, 8, 8, 8]


@pytest.mark.parametrize("label", ["isolated_particles", "agglomerated_particles",
                                   "empty_support"])
def test_an_8_to_1_strip_is_classified_as_its_field(field_classifier: FieldClassifier,
                                                    label: str) -> None:
    """Squeezed whole into the 256x256 input, 8192x1024 fields were classed rods_wires
    (isolated particles, 0.53, novelty 4.16), charging_saturated (agglomerated, 0.48, novelty
    4.02) and blank (support film, 0.54); in views they are their class, and usual particle
    fields are usual to the lens (novelty < 1)."""
    k = FIELD_CLASSES.index(label)
    field = render_field(label, np.random.default_rng(9_100_000 + k), shape=(1024, 8192))
    c = field_classifier.classify(field.image)
    assert c.labels[0] == label, (c.labels, c.probabilities, c.novelty)
    assert c.novelty is not None
    if label != "empty_support":
        assert c.novelty < 1.0


def test_square_frames_are_seen_whole_as_before(field_classifier: FieldClassifier) -> None:
    """Frames up to 4:3 keep the one whole-frame input: the probabilities and CAM of one
    model run on fixed_input."""
    card = field_classifier.card
    assert card.input.size is not None
    for shape in ((512, 512), (384, 512)):
        img = render_field("isolated_particles", np.random.default_rng(5), shape=shape).image
        c = field_classifier.classify(img)
        out = field_classifier.engine.infer({"image": fixed_input(img, card.input.size)})
        assert np.array_equal(np.array(list(c.all.values()), np.float32),
                              out["probabilities"][0])
        assert c.cam is not None and np.array_equal(c.cam, out["cam"][0])


def test_the_cam_of_a_strip_covers_the_frame_and_finds_its_rod(
        field_classifier: FieldClassifier) -> None:
    """A 4:1 frame's CAM is its 4 views' maps side by side (16 x 64 cells of 32 x 32 frame
    px, one scale); the rods_wires CAM peaks on the rod in each field (squeezed whole, the
    16 x 16 CAM peaked on it in 1 of 3)."""
    from nanoscout.training.evaluate_classifier import cam_peak_px

    for seed in (21, 22, 26):
        field = render_rod_among_spheres(np.random.default_rng(seed), shape=(512, 2048))
        c = field_classifier.classify(field.image)
        cam = c.cam_of("rods_wires")
        assert cam is not None and cam.max() == 255
        x, y = cam_peak_px(cam, field.image.shape)
        x0, y0, x1, y1 = field.rod_boxes[0]
        assert x0 <= x <= x1 and y0 <= y <= y1, (seed, (x, y), field.rod_boxes[0])
        assert c.cam is not None and c.cam.shape == (16, 64)
        assert c.class_maps is not None and c.class_maps.shape == (len(FIELD_CLASSES), 16, 64)


def test_a_view_without_contrast_is_left_out(field_classifier: FieldClassifier) -> None:
    """A 6:1 frame whose right half is flat (a data bar, a blanked region): the flat views
    are not run (the networks answer a constant input with isolated_particles 0.95 and
    novelty 88); the frame is its other views' class, its heatmap cells there 0."""
    field = render_field("film_structure", np.random.default_rng(3), shape=(512, 3072))
    img = field.image.copy()
    img[:, 1536:] = img.mean()
    c = field_classifier.classify(img)
    assert c.labels[0] == "film_structure" and c.novelty is not None and c.novelty < 20
    assert c.cam is not None and c.cam.shape == (16, 16 * 6)
    assert c.cam[:, 48:].max() == 0
    lens = field_classifier.lens_outputs(img)
    assert lens["reconstruction"].shape == (1, 1, 256, 256 * 6)
    assert float(np.abs(lens["reconstruction"][..., 3 * 256:]).max()) == 0.0
