"""The modality model: HAADF-STEM frames without a modality go to the STEM detector, everything
else to the general one, and a frame's own modality always wins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.modality import CLASSES, ROUTE_MIN_P, ModalityEstimator
from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.daemon.app import build_pipeline
from nanoscout.daemon.config import ServeConfig
from nanoscout.engines import create_engine
from nanoscout.wire.errors import ModelCardError


@pytest.fixture(scope="module")
def estimator() -> ModalityEstimator:
    est = ModalityEstimator.shipped()
    assert est is not None, "models/weights/modality.onnx is missing"
    return est


def _grey(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"))


def test_tuning_frames_are_told_apart(shared_data: Path, estimator: ModalityEstimator) -> None:
    """The STEM tuning material's HAADF frames are STEM, its bright-field frames and the EMPS
    tuning crops (TEM and SEM figure panels) are not (none of them was trained on)."""
    from nanoscout.training import realdata

    stem = shared_data / "stem-dev" / "images"
    for name in ("Pt2", "Pt4", "PtC3"):
        assert estimator.estimate(_grey(stem / f"{name}.jpg")) == "STEM", name
    for name in ("PtC1", "Pt_carbon1"):
        assert estimator.estimate(_grey(stem / f"{name}.jpg")) is None, name
    ids = realdata.emps_tuning_ids(shared_data)
    assert len(ids) > 20
    p = [estimator.p_haadf(_grey(shared_data / "emps-train" / "images" / f"{i}.png"))
         for i in ids]
    assert max(p) < ROUTE_MIN_P, sorted(p)[-3:]


def test_any_dtype_and_shape_gives_a_probability(estimator: ModalityEstimator) -> None:
    rng = np.random.default_rng(0)
    for frame in (rng.integers(0, 65535, (100, 300), dtype=np.uint16),
                  rng.random((64, 64)).astype(np.float32), np.zeros((50, 70), np.uint8)):
        assert 0.0 <= estimator.p_haadf(frame) <= 1.0


def test_a_card_of_another_task_is_refused() -> None:
    onnx = shipped_model_dir() / "classifier.onnx"
    card = ModelCard.load(onnx.with_suffix(".json"))
    with pytest.raises(ModelCardError, match="not a modality model"):
        ModalityEstimator(create_engine(onnx, "onnxruntime-cpu", threads=1), card)
    assert CLASSES == ("other", "haadf")


def test_pipeline_routes_frames_without_a_modality(shared_data: Path) -> None:
    """A HAADF-STEM frame without a modality is analysed by the STEM detector; the same frame
    saying "TEM" by the general one; with ``estimate_modality = false`` by the general one."""
    haadf = _grey(shared_data / "stem-dev" / "images" / "Pt4.jpg")
    models = {}
    for estimate in (True, False):
        pipe = build_pipeline(ServeConfig.model_validate(
            {"engine": {"estimate_modality": estimate}, "classify": {"enabled": False}}),
            offline=True)
        try:
            for modality in (None, "TEM"):
                frame = Frame.from_image(haadf, pixel_size_nm=None, source="t", seq=0,
                                         modality=modality)
                models[(estimate, modality)] = pipe.process(frame).det.model
        finally:
            pipe.close()
    stem = ModelCard.load(shipped_model_dir() / "detector_stem.json")
    general = ModelCard.load(shipped_model_dir() / "detector.json")
    assert models == {(True, None): f"{stem.name}:{stem.version}",
                      (True, "TEM"): f"{general.name}:{general.version}",
                      (False, None): f"{general.name}:{general.version}",
                      (False, "TEM"): f"{general.name}:{general.version}"}


def test_training_writes_a_model_the_estimator_loads(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A few steps on rendered frames: the ONNX file and its card load, and the card holds
    the routing of the tuning and held-out frames, counted by class; ``--rescore`` counts
    them again under another cut and leaves the network and its training record alone."""
    pytest.importorskip("torch")
    from nanoscout.analysis import modality
    from nanoscout.sim.synthetic import SpecimenConfig, render
    from nanoscout.training import haadf, train_modality
    from nanoscout.training.train_modality import Item, train, write_model

    rng = np.random.default_rng(0)
    items = []
    for k, role in enumerate(["train"] * 4 + ["tune", "held"]):
        img, _ = haadf.render(haadf.random_config(rng, (96, 96)), k)
        items.append(Item(img, 1, f"stem:h{k}", role))
        tem = render(SpecimenConfig(shape=(96, 96), modality="TEM"), k).image
        items.append(Item(tem.astype(np.float32), 0, f"emps:t{k}", role))
    net = train(items, steps=3, batch=4)
    card_path = write_model(net, items, tmp_path, "test", 1.0)
    est = ModalityEstimator.from_onnx(card_path.with_suffix(".onnx"))
    assert 0.0 <= est.p_haadf(items[0].image) <= 1.0
    ev = ModelCard.load(card_path).evaluation
    assert ev["routing_held_out"]["stem"]["n_haadf"] == 1
    assert ev["routing_held_out"]["emps"]["n_other"] == 1
    assert set(ev["routing_tuning"]["stem"]["p_haadf"]) == {"h4"}
    est.close()

    before = ModelCard.load(card_path)
    monkeypatch.setattr(train_modality, "collect", lambda **_: items)
    for mod in (modality, train_modality):
        monkeypatch.setattr(mod, "ROUTE_MIN_P", 0.0)  # every frame is "STEM"
    train_modality.main(["--out", str(tmp_path), "--rescore"])
    after = ModelCard.load(card_path)
    assert after.sha256 == before.sha256 and after.training == before.training
    held = after.evaluation["routing_held_out"]
    assert (held["stem"]["haadf_routed"], held["emps"]["other_routed"]) == (1, 1)
    assert held["emps"]["p_haadf"] == before.evaluation["routing_held_out"]["emps"]["p_haadf"]
    assert "p(haadf) >= 0.0" in held["rule"] and "--rescore" in held["command"]


def test_the_rendered_check_is_its_own_stream() -> None:
    """The check renders do not depend on how many training frames were drawn before them."""
    from nanoscout.training.train_modality import check_items

    a, b = check_items(2), check_items(2)
    assert [i.role for i in a] == ["check", "check"]
    assert all(i.name.startswith("physics-") for i in a)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))


def test_a_live_stream_is_estimated_every_tenth_frame(shared_data: Path) -> None:
    """Live frames without a modality: one estimate per source every MODALITY_EVERY frames and
    at a change of magnification (the detector does not change from frame to frame of one
    view); offline images: one each."""
    from nanoscout.analysis.pipeline import MODALITY_EVERY

    haadf = _grey(shared_data / "stem-dev" / "images" / "Pt4.jpg")[:256, :256]
    calls: dict[bool, list[str | None]] = {}
    for offline in (False, True):
        pipe = build_pipeline(ServeConfig.model_validate({"classify": {"enabled": False}}),
                              offline=offline)
        est = pipe.modality_estimator
        assert est is not None
        seen: list[str | None] = []

        def counting(frame: np.ndarray, real: Any = est.estimate,
                     seen: list[str | None] = seen) -> str | None:
            seen.append(real(frame))
            return seen[-1]

        est.estimate = counting  # type: ignore[method-assign]
        try:
            for k in range(MODALITY_EVERY + 2):
                pipe.process(Frame.from_image(haadf, pixel_size_nm=0.2, source="s", seq=k))
            # another magnification of the same source: estimated at once
            pipe.process(Frame.from_image(haadf, pixel_size_nm=0.4, source="s", seq=99))
        finally:
            pipe.close()
        calls[offline] = seen
    assert MODALITY_EVERY == 10
    assert calls[False] == ["STEM", "STEM", "STEM"]
    assert len(calls[True]) == MODALITY_EVERY + 3
