"""When and at what cost the automatic working scale is estimated (nanoscout.analysis.autoscale,
Detector.estimate_scale with its bounded passes and a stream's reuse)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from nanoscout.analysis import detector as detector_module
from nanoscout.analysis.autoscale import (
    DEFAULT_TOLERANCE,
    ScaleMemo,
    content_centre,
    hinted_diameter,
    pass_window,
    signature,
)
from nanoscout.analysis.detector import Detector
from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.analysis.preprocess import normalize
from nanoscout.sim.synthetic import Specimen, SpecimenConfig, render
from nanoscout.wire.errors import ConfigError

ONNX = shipped_model_dir() / "detector.onnx"


def test_pass_window_is_the_frame_or_a_bounded_centred_window() -> None:
    assert pass_window((1024, 1024), 0.25, 384) == (slice(0, 1024), slice(0, 1024))
    rows, cols = pass_window((2048, 1000), 1.0, 384)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (832, 1216, 308, 692)
    # a coarser pass sees more of the frame for the same engine cost
    rows, _ = pass_window((4096, 4096), 0.25, 384)
    assert rows.stop - rows.start == 1536
    with pytest.raises(ValueError, match="factor"):
        pass_window((64, 64), 0.0)


def test_a_window_around_a_centre_stays_inside_the_frame() -> None:
    rows, cols = pass_window((2048, 2048), 1.0, 384, centre=(300.0, 1800.0))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (108, 492, 1608, 1992)
    rows, cols = pass_window((2048, 2048), 1.0, 384, centre=(10.0, 2040.0))  # at a corner
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 384, 1664, 2048)
    # no centre: the frame's middle, as before
    assert pass_window((2048, 2048), 1.0, 384, None) == pass_window((2048, 2048), 1.0, 384)


def test_content_centre_finds_the_foreground_in_frame_px() -> None:
    p = np.zeros((64, 64), np.float32)
    p[40:52, 8:20] = 1.0  # at factor 0.25 over a window starting at frame (100, 200)
    r, c = content_centre(p, 0.25, (100, 200))  # type: ignore[misc]
    assert 100 + 40 / 0.25 <= r <= 100 + 52 / 0.25 and 200 + 8 / 0.25 <= c <= 200 + 20 / 0.25
    assert content_centre(np.zeros((64, 64), np.float32), 0.25) is None  # nothing found
    assert content_centre(np.full((64, 64), 0.01, np.float32), 0.25) is not None  # 41 px in all


def _frames(modality: str, diameter_nm: float, n: int, seed: int = 3) -> list[np.ndarray]:
    cfg = SpecimenConfig(modality=modality, shape=(1024, 1024),  # type: ignore[arg-type]
                         median_diameter_nm=diameter_nm)
    specimen = Specimen.generate(cfg, seed)
    rng = np.random.default_rng(1)
    return [normalize(specimen.acquire(rng, shift_px=(3.0 * k, -2.0 * k)).image)
            for k in range(n)]


@pytest.mark.parametrize("modality", ["TEM", "SEM"])
def test_signature_ignores_drift_but_sees_another_particle_size(modality: str) -> None:
    drifting = _frames(modality, 8.0, 6)
    first = signature(drifting[0])
    assert max(first.distance(signature(x)) for x in drifting[1:]) < DEFAULT_TOLERANCE
    for factor in (0.7, 1.5):
        other = _frames(modality, 8.0 * factor, 1)[0]
        assert first.distance(signature(other)) > DEFAULT_TOLERANCE, factor
    # tiny and flat frames have a signature too (mirrored up to the window; all -30)
    assert signature(np.zeros((40, 70), np.float32)).bands.max() == -30.0
    assert np.isfinite(signature(drifting[0][:40, :70]).bands).all()


def test_memo_reuses_until_shape_content_or_age_says_otherwise() -> None:
    memo = ScaleMemo(max_age=3)
    a, b = _frames("STEM", 8.0, 1)[0], _frames("STEM", 16.0, 1)[0]
    sa, sb = memo.signature(a), memo.signature(b)
    assert memo.lookup("cam", a.shape, sa) is None  # new
    memo.store("cam", a.shape, sa, 0.5)
    assert memo.lookup("cam", a.shape, sa) == 0.5
    assert memo.lookup("cam", (512, 512), sa) is None  # shape
    assert memo.lookup("cam", a.shape, sb) is None  # content
    assert memo.lookup("cam", a.shape, sa) == 0.5
    assert memo.lookup("cam", a.shape, sa) is None  # age: the 4th frame since the estimate
    assert memo.reasons == {"new": 1, "shape": 1, "content": 1, "age": 1}
    # with its factor, whether an adapted card's settings covered the key's frames
    assert memo.covered("cam") and memo.covered("never seen")
    memo.store("cam", a.shape, sa, 0.5, covered=False)
    assert memo.lookup("cam", a.shape, sa) == 0.5 and not memo.covered("cam")
    blind = ScaleMemo(max_age=10, tolerance=None)
    assert blind.signature(a) is None
    blind.store("cam", a.shape, None, 2.0)
    assert blind.lookup("cam", a.shape, None) == 2.0
    few = ScaleMemo(max_age=5, max_keys=2)
    for key in ("a", "b", "c"):
        few.store(key, (8, 8), None, 1.0)
    assert len(few) == 2 and few.lookup("a", (8, 8), None) is None
    with pytest.raises(ValueError, match="max_age"):
        ScaleMemo(max_age=0)


# ------------------------------------------------------------------ the shipped detector


class Recording:
    """An engine that records the input shape of every call to the one it wraps."""

    def __init__(self, engine: object) -> None:
        self.engine = engine
        self.inputs = engine.inputs  # type: ignore[attr-defined]
        self.calls: list[tuple[int, ...]] = []

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.extend(tuple(v.shape) for v in inputs.values())
        return self.engine.infer(inputs)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def engine() -> object:
    if not ONNX.is_file():
        pytest.skip(f"no shipped detector at {ONNX}")
    pytest.importorskip("onnxruntime")
    from nanoscout.engines import create_engine

    return create_engine(ONNX, "onnxruntime-cpu", threads=2)


def _card() -> ModelCard:
    return ModelCard.load(Path(ONNX).with_suffix(".json"))


def test_estimate_passes_cost_at_most_a_window_whatever_the_frame_size(engine: object) -> None:
    """A 2048² frame of 16 px particles: a thumbnail pass and a window pass, each at most
    384² px; the factor agrees with the old whole-frame passes."""
    cfg = SpecimenConfig(modality="TEM", shape=(2048, 2048), median_diameter_nm=8.0)
    x = normalize(Specimen.generate(cfg, 5).acquire(np.random.default_rng(0)).image)
    rec = Recording(engine)
    det = Detector(rec, _card(), scale="auto")  # type: ignore[arg-type]
    bounded = det.estimate_scale(x)
    assert rec.calls and all(h * w <= 384 * 384 for _, _, h, w in rec.calls), rec.calls
    whole = Detector(engine, _card(), scale="auto",  # type: ignore[arg-type]
                     estimate_window_px=4096).estimate_scale(x)
    assert bounded == pytest.approx(whole, rel=0.1)


@pytest.mark.parametrize(("modality", "diameter_nm"), [("STEM", 6.0), ("SEM", 30.0),
                                                       ("TEM", 3.0)])
def test_bounded_estimate_agrees_with_the_whole_frame_one(engine: object, modality: str,
                                                          diameter_nm: float) -> None:
    cfg = SpecimenConfig(modality=modality, shape=(1536, 1536),  # type: ignore[arg-type]
                         median_diameter_nm=diameter_nm, pixel_size_nm=0.5)
    x = normalize(Specimen.generate(cfg, 11).acquire(np.random.default_rng(2)).image)
    bounded = Detector(engine, _card(), scale="auto").estimate_scale(x)  # type: ignore[arg-type]
    whole = Detector(engine, _card(), scale="auto",  # type: ignore[arg-type]
                     estimate_window_px=4096).estimate_scale(x)
    assert bounded == pytest.approx(whole, rel=0.15), (bounded, whole)


def test_a_stream_estimates_once_until_its_content_changes(engine: object) -> None:
    rec = Recording(engine)
    det = Detector(rec, _card(), scale="auto", auto_every=50)  # type: ignore[arg-type]
    cfg = SpecimenConfig(modality="STEM", shape=(768, 768), median_diameter_nm=8.0)
    specimen = Specimen.generate(cfg, 9)
    rng = np.random.default_rng(4)
    key = ("cam", 0.5)
    for k in range(4):  # drifting frames of one specimen
        det.detect(specimen.acquire(rng, shift_px=(2.0 * k, 1.0 * k)).image, key=key)
    assert det._memo.reasons == {"new": 1, "shape": 0, "content": 0, "age": 0}
    bigger = Specimen.generate(replace(cfg, median_diameter_nm=24.0), 9).acquire(rng).image
    scale = det.detect(bigger, key=key).scale
    assert det._memo.reasons["content"] == 1 and scale < 1.0
    # reused: the frame's only engine call is its own inference
    rec.calls.clear()
    det.detect(bigger, key=key)
    assert len(rec.calls) == 1


@pytest.mark.parametrize(("modality", "diameter_nm"), [("STEM", 12.0), ("TEM", 8.0)])
def test_particles_off_centre_around_an_empty_middle_set_the_scale(
        engine: object, modality: str, diameter_nm: float) -> None:
    """A 2048² frame whose specimen fills only its top-left 512² corner (the rest plain
    background, as vacuum between aggregates): the finer passes look where the particles
    are, and the factor brings their median (diameter_nm px) to the card's 24 px. Centred on
    the empty middle they found nothing, and the frame stayed at factor 1 (checked here)."""
    cfg = SpecimenConfig(modality=modality, shape=(512, 512),  # type: ignore[arg-type]
                         pixel_size_nm=1.0, median_diameter_nm=diameter_nm, sigma_log=0.15,
                         coverage=0.25)
    corner = render(cfg, 7).image.astype(np.float32)
    rng = np.random.default_rng(1)
    frame = rng.normal(float(np.median(corner)), 0.15 * float(corner.std()),
                       (2048, 2048)).astype(np.float32)
    frame[:512, :512] = corner
    x = normalize(frame)
    det = Detector(engine, _card(), scale="auto")  # type: ignore[arg-type]
    assert det.estimate_scale(x) == pytest.approx(24.0 / diameter_nm, rel=0.2)
    with mock.patch.object(detector_module, "content_centre", lambda *a, **k: None):
        assert det.estimate_scale(x) == 1.0  # the middle window: no particle to see


def test_another_network_can_measure_the_particle_size(engine: object) -> None:
    """``base_detector``: its passes measure the frame's median particle (frame px)
    and this card's ``auto`` turns it into the factor (an adapted model's base network,
    ``base_network``); without one, the factor is the card's factor of the
    detector's own measurement."""
    cfg = SpecimenConfig(modality="TEM", shape=(1024, 1024), median_diameter_nm=60.0,
                         pixel_size_nm=1.0, sigma_log=0.15)
    x = normalize(Specimen.generate(cfg, 4).acquire(np.random.default_rng(3)).image)
    card = _card()
    own = Detector(engine, card, scale="auto")  # type: ignore[arg-type]
    size = own.particle_size(x)
    assert size is not None and size == pytest.approx(60.0, rel=0.3)
    assert own.estimate_scale(x) == card.working_scale.auto.factor(size)  # type: ignore[union-attr]
    # a card aiming at 48 px particles, measured by the source: twice the factor
    auto = card.working_scale.auto.model_copy(  # type: ignore[union-attr]
        update={"target_diameter_px": 48.0, "keep_min_px": 24.0, "keep_max_px": 30.0})
    big = card.model_copy(update={"working_scale": card.working_scale.model_copy(  # type: ignore[union-attr]
        update={"auto": auto})})
    rec = Recording(engine)
    det = Detector(rec, big, scale="auto", base_detector=own)  # type: ignore[arg-type]
    assert det.estimate_scale(x) == pytest.approx(2.0 * own.estimate_scale(x))
    assert not rec.calls  # the estimate ran on the source's engine only
    # a frame without particles keeps factor 1 either way
    flat = np.full((512, 512), 0.5, np.float32)
    assert own.particle_size(flat) is None and det.estimate_scale(flat) == 1.0


def test_a_size_range_keeps_an_estimate_inside_it_and_replaces_one_outside() -> None:
    assert hinted_diameter(20.0, (10.0, 40.0)) == (20.0, "agreed")
    assert hinted_diameter(10.0, (10.0, 40.0)) == (10.0, "agreed")  # the ends belong to it
    assert hinted_diameter(4.0, (10.0, 40.0)) == (10.0, "applied")  # to the nearest end
    assert hinted_diameter(400.0, (10.0, 40.0)) == (40.0, "applied")
    assert hinted_diameter(None, (10.0, 40.0)) == (pytest.approx(20.0), "applied")  # its middle
    for bad in ((40.0, 10.0), (0.0, 10.0), (-1.0, 1.0), (1.0, float("inf")),
                (float("nan"), 2.0)):
        with pytest.raises(ValueError, match="particle size range"):
            hinted_diameter(5.0, bad)


def test_an_operators_size_range_overrules_an_estimate_outside_it(engine: object) -> None:
    """8 px particles (8 nm at 1 nm/px): a range around them leaves the estimate and the
    particles found as they were; a range of 60-120 px (an estimate that followed something
    else, seen from the operator's side) sets the factor for its nearest end, 60 px."""
    cfg = SpecimenConfig(modality="TEM", shape=(768, 768), median_diameter_nm=8.0,
                         pixel_size_nm=1.0, sigma_log=0.15)
    image = Specimen.generate(cfg, 21).acquire(np.random.default_rng(5)).image
    card = _card()
    det = Detector(engine, card, scale="auto")  # type: ignore[arg-type]
    alone = det.detect(image)
    assert alone.size_hint is None and alone.scale > 2.0 and alone.n > 50
    inside = det.detect(image, particle_px=(5.0, 12.0))
    assert inside.size_hint == "agreed" and inside.scale == alone.scale
    assert np.array_equal(inside.labels, alone.labels)
    outside = det.detect(image, particle_px=(60.0, 120.0))
    auto = card.working_scale.auto  # type: ignore[union-attr]
    assert outside.size_hint == "applied"
    assert outside.scale == pytest.approx(auto.factor(60.0))
    assert outside.n < alone.n / 2  # at 0.4x the 8 px particles are mostly lost
    # a fixed scale estimates nothing, so a range has nothing to act on
    assert Detector(engine, card, scale=1.0).detect(  # type: ignore[arg-type]
        image, particle_px=(60.0, 120.0)).size_hint is None
    with pytest.raises(ConfigError, match="particle size range"):
        det.detect(image, particle_px=(12.0, 5.0))


def test_a_stream_remembers_what_its_size_range_did_and_a_new_range_estimates_again(
        engine: object) -> None:
    cfg = SpecimenConfig(modality="TEM", shape=(512, 512), median_diameter_nm=8.0,
                         pixel_size_nm=1.0, sigma_log=0.15)
    specimen = Specimen.generate(cfg, 22)
    rng = np.random.default_rng(6)
    det = Detector(engine, _card(), scale="auto", auto_every=50)  # type: ignore[arg-type]
    frames = [specimen.acquire(rng, shift_px=(k, k)).image for k in range(3)]
    first = det.detect(frames[0], key="cam", particle_px=(40.0, 80.0))
    again = det.detect(frames[1], key="cam", particle_px=(40.0, 80.0))
    assert (first.size_hint, again.size_hint) == ("applied", "applied")
    assert again.scale == first.scale and det._memo.reasons["new"] == 1
    agreed = det.detect(frames[2], key="cam", particle_px=(5.0, 12.0))
    assert agreed.size_hint == "agreed" and agreed.scale > first.scale
    assert det._memo.reasons["new"] == 2
