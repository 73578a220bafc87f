"""A float64 frame whose detail float32 cannot hold (a 10-count signal on a 1e8 offset, a range
of 1e-300) is classified as the same frame without the offset: the classifier's input was cast
to float32 before normalisation (charging_saturated 0.92 instead of the offset-free class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.classifier import FieldClassifier
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.preprocess import fixed_input
from nanoscout.sim.synthetic import SpecimenConfig, render

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"

pytest.importorskip("onnxruntime")


def _field() -> np.ndarray:
    """A particle field of about 10 counts (float64)."""
    fr = render(SpecimenConfig(modality="SEM", shape=(256, 320), pixel_size_nm=1.0), 11)
    img = fr.image.astype(np.float64)
    return 10.0 * (img - img.min()) / (img.max() - img.min())


def test_fixed_input_keeps_what_float32_cannot_hold() -> None:
    base = _field()
    want = fixed_input(base.astype(np.float32), (64, 64))
    for shifted in (base + 1e8, base * 1e-300):
        got = fixed_input(shifted, (64, 64))
        assert np.abs(got - want).max() < 1e-5


def test_the_pipeline_classifies_the_frame_as_without_its_offset() -> None:
    from nanoscout.analysis.detector import load_detector
    from nanoscout.engines import create_engine

    card = ModelCard.load(WEIGHTS / "classifier.json")
    clf = FieldClassifier(create_engine(card.onnx_path(WEIGHTS / "classifier.json"), "cpu",
                                        threads=1), card)
    det = load_detector(WEIGHTS / "detector.onnx",
                        lambda p: create_engine(p, "cpu", threads=1))
    pipe = Pipeline(det, classifier=clf)
    base = _field()

    def probs(image: np.ndarray) -> dict[str, float]:
        c = pipe.process(Frame.from_image(image, pixel_size_nm=1.0)).classification
        assert c is not None
        return c.all

    want, got = probs(base.astype(np.float32)), probs(base + 1e8)
    assert max(abs(got[k] - want[k]) for k in want) < 1e-3
