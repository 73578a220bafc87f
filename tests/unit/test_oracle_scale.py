"""The evaluation harness's oracle working scale (``--scale oracle``): the factor comes from
the image's true particles, and the harness runs the detector at it on every image."""

from __future__ import annotations

import numpy as np
import pytest

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.engines import create_engine
from nanoscout.training.evaluate import OracleScale, SizeHinted, _parse_scale, evaluate_set
from nanoscout.training.realdata import Sample


def _discs(diameters: list[float], side: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """An image of dark discs on a bright field and its instance map."""
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    for k, d in enumerate(diameters, 1):
        cy, cx = 60 + 120 * ((k - 1) // 4), 60 + 120 * ((k - 1) % 4)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (d / 2) ** 2] = k
    image = np.where(labels > 0, 60, 200).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def oracle() -> OracleScale:
    path = shipped_model_dir() / "detector.onnx"
    return OracleScale(create_engine(path, "onnxruntime-cpu", threads=1),
                       ModelCard.load(path.with_suffix(".json")))


def test_factor_follows_the_true_area_weighted_median(oracle: OracleScale) -> None:
    a = oracle.card.working_scale.auto
    image, labels = _discs([80.0] * 5 + [10.0] * 6)  # most particle pixels are in the 80s
    f = oracle.factor(Sample("t", "a", image, labels, None, None, "g"))
    assert f == pytest.approx(a.target_diameter_px / 80.0, rel=0.03)
    image, labels = _discs([24.0] * 4)  # within the keep range: no resampling
    assert oracle.factor(Sample("t", "b", image, labels, None, None, "g")) == 1.0
    boxes = np.array([[0, 0, 8, 8], [20, 20, 28, 28]], np.float64)  # 8 px boxes
    f = oracle.factor(Sample("t", "c", image, None, boxes, None, "g"))
    assert f == pytest.approx(min(a.max_resample, a.target_diameter_px / 8.0))
    empty = Sample("t", "d", image, np.zeros_like(labels), None, None, "g")
    assert oracle.factor(empty) == 1.0


def test_harness_runs_the_detector_at_each_images_oracle_factor(oracle: OracleScale) -> None:
    image, labels = _discs([80.0] * 8)
    res = evaluate_set({"model": oracle}, [Sample("t", "a", image, labels, None, None, "g")])
    row = res["images"][0]["model"]
    assert row["scale"] == pytest.approx(oracle.factor(Sample("t", "a", image, labels, None,
                                                                None, "g")), abs=1e-4)
    assert row["tp"] == 8 and row["fp"] == 0
    assert _parse_scale("emps=oracle", ["emps", "stem"]) == {"emps": "oracle", "stem": None}


def test_size_hinted_tells_each_image_a_range_around_its_true_median() -> None:
    """``--size-hint K``: the detector gets [d / K, d K] around the true area-weighted median
    d; images without true particles get no range; replaced estimates are counted."""
    from types import SimpleNamespace

    class _Recorder:
        auto, scale = True, 1.0

        def __init__(self) -> None:
            self.ranges: list[tuple[float, float] | None] = []

        def detect(self, image: np.ndarray, particle_px: tuple[float, float] | None = None
                   ) -> SimpleNamespace:
            self.ranges.append(particle_px)
            return SimpleNamespace(size_hint=None if particle_px is None else
                                   "applied" if particle_px[0] > 30 else "agreed")

    rec = _Recorder()
    hinted = SizeHinted(rec, 2.0)
    image, labels = _discs([80.0] * 5 + [10.0] * 6)
    hinted.detect_sample(Sample("t", "a", image, labels, None, None, "g"))
    image, labels = _discs([24.0] * 4)
    hinted.detect_sample(Sample("t", "b", image, labels, None, None, "g"))
    hinted.detect_sample(Sample("t", "c", image, np.zeros_like(labels), None, None, "g"))
    first, second, none = rec.ranges
    assert first is not None and second is not None and none is None
    assert first == pytest.approx((40.0, 160.0), rel=0.03)
    assert first[1] / first[0] == pytest.approx(4.0)
    assert second == pytest.approx((12.0, 48.0), rel=0.03)
    assert hinted.applied == 1
    with pytest.raises(ValueError, match="> 1"):
        SizeHinted(rec, 1.0)
