"""Low-dose frames: the noise measured, the smoothing it gets, and the detector using both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
from pydantic import ValidationError

from nanoscout.analysis.denoise import noise_sigma, smooth, smoothing_px
from nanoscout.analysis.detector import Detector
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.modelcard import Denoise, ModelCard, Normalization
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.preprocess import normalize
from nanoscout.training.crops import low_dose
from nanoscout.wire.headers import DetHeader
from nanoscout.wire.protocol import decode_message, encode
from tests.unit.test_detector import OracleEngine, _card, _disc

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"


def _particles(shape: tuple[int, int] = (384, 512)) -> tuple[np.ndarray, np.ndarray]:
    """A clean frame (0 support, 1 particles, a gradient across) and its labels."""
    labels = np.zeros(shape, np.int32)
    rng = np.random.default_rng(3)
    for k in range(1, 40):
        labels[_disc(shape, rng.uniform(20, shape[0] - 20), rng.uniform(20, shape[1] - 20),
                     rng.uniform(5, 12)) & (labels == 0)] = k
    ramp = np.linspace(0.0, 0.2, shape[1], dtype=np.float32)[None, :]
    return (labels > 0).astype(np.float32) * 0.8 + ramp, labels


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.12])
def test_the_noise_of_a_frame_is_measured_and_the_particles_barely_count(sigma: float) -> None:
    clean, _ = _particles()
    noisy = clean + np.random.default_rng(1).normal(0.0, sigma, clean.shape).astype(np.float32)
    assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.08)
    assert noise_sigma(clean) < 0.002  # edges and a gradient are not noise
    assert noise_sigma(np.zeros((2, 50), np.float32)) == 0.0


def test_a_large_frame_is_measured_on_its_central_window_only() -> None:
    rng = np.random.default_rng(2)
    frame = np.zeros((3000, 3000), np.float32)
    frame[1000:2000, 1000:2000] = rng.normal(0.0, 0.1, (1000, 1000))  # quiet outside
    assert noise_sigma(frame, max_window_px=1000) == pytest.approx(0.1, rel=0.05)
    assert noise_sigma(frame, max_window_px=3000) < 0.01


def test_the_smoothing_brings_white_noise_down_to_the_target() -> None:
    rng = np.random.default_rng(4)
    noise = rng.normal(0.0, 0.12, (600, 600)).astype(np.float32)
    width = smoothing_px(0.12, 0.05, max_px=8.0)
    assert width == pytest.approx(0.12 / (2 * np.sqrt(np.pi) * 0.05))
    out = scipy.ndimage.gaussian_filter(noise, width)
    assert float(out[20:-20, 20:-20].std()) == pytest.approx(0.05, rel=0.1)
    assert smoothing_px(0.04, 0.05, 2.0) == 0.0
    assert smoothing_px(1.0, 0.05, 2.0) == 2.0  # capped
    with pytest.raises(ValueError, match="noise target 0"):
        smoothing_px(0.1, 0.0, 2.0)


def test_a_smoothed_frame_is_normalised_again_and_the_original_kept() -> None:
    clean, _ = _particles()
    x = normalize(clean + np.random.default_rng(7).normal(0.0, 0.2, clean.shape))
    before = x.copy()
    out = smooth(x, 1.5)
    np.testing.assert_array_equal(x, before)
    # the noise's extremes set x's percentiles; the smoothed frame spans [0, 1] again
    assert np.percentile(x, [0.5, 99.5]) == pytest.approx([0, 1], abs=0.02)
    assert np.percentile(out, [0.5, 99.5]) == pytest.approx([0, 1], abs=0.02)
    assert noise_sigma(out) < 0.3 * noise_sigma(x)
    assert smooth(x, 0.0) is x


def test_a_card_says_whether_and_how_far_noisy_frames_are_smoothed() -> None:
    assert Normalization().denoise is None  # older cards: never
    assert Normalization(denoise={"target": 0.05}).denoise == Denoise(target=0.05, max_px=2.0)
    for bad in ({"target": 0.0}, {"target": 1.5}, {"target": 0.05, "max_px": 0}):
        with pytest.raises(ValidationError):
            Denoise(**bad)  # type: ignore[arg-type]


def test_the_detector_smooths_a_noisy_frame_before_its_network_and_says_so() -> None:
    clean, labels = _particles()
    noisy = clean + np.random.default_rng(5).normal(0.0, 0.15, clean.shape).astype(np.float32)
    card = _card(normalization=Normalization(denoise=Denoise(target=0.05, max_px=3.0)))
    engine = OracleEngine(labels)
    det = Detector(engine, card, scale=1.0)
    x = normalize(noisy)
    before = x.copy()
    found = det.detect(noisy, normalized=x)
    np.testing.assert_array_equal(x, before)  # the caller's frame is not smoothed in place
    assert found.noise is not None and found.noise > 0.05
    assert found.smoothing_px == pytest.approx(smoothing_px(found.noise, 0.05, 3.0))
    assert found.smoothing_px > 0.5
    # the oracle engine answers the truth whatever it sees: the smoothing loses no particle
    assert found.n == Detector(OracleEngine(labels), card, scale=1.0, denoise=False).detect(noisy).n > 30
    # clean: measured, not smoothed; no card setting, or switched off: not even measured
    assert det.detect(clean).smoothing_px == 0.0
    for off in (Detector(OracleEngine(labels), _card(), scale=1.0),
                Detector(OracleEngine(labels), card, scale=1.0, denoise=False)):
        found = off.detect(noisy)
        assert found.noise is None and found.smoothing_px == 0.0


def test_the_network_sees_the_smoothed_frame() -> None:
    class Recording(OracleEngine):
        def infer(self, inputs):  # type: ignore[no-untyped-def]
            self.seen = inputs["image"][0, 0].copy()
            return super().infer(inputs)

    clean, labels = _particles((256, 256))
    noisy = clean + np.random.default_rng(6).normal(0.0, 0.15, clean.shape).astype(np.float32)
    card = _card(normalization=Normalization(denoise=Denoise(target=0.05)))
    smoothed, plain = Recording(labels), Recording(labels)
    Detector(smoothed, card, scale=1.0).detect(noisy)
    Detector(plain, card, scale=1.0, denoise=False).detect(noisy)
    assert noise_sigma(plain.seen) > 0.1
    assert noise_sigma(smoothed.seen) < 0.05


def test_the_shipped_stem_card_finds_more_at_low_dose_than_smoothing_did() -> None:
    """The STEM detector's card 1.2 smoothed low-dose frames (target 0.05) because on its
    training materials at 30 counts (the draws of ``benchmarks/noise_stress.py``) that found
    more of the annotated particles; card 1.2.1's working-scale fallback (``"nearest"``)
    finds more still without it, and smoothing on top of it would lose, so 1.2.1 has none
    (``benchmarks/results/scale_nearest.json``)."""
    onnx = WEIGHTS / "detector_stem.onnx"
    if not onnx.is_file():
        pytest.skip(f"no shipped model at {onnx}")
    pytest.importorskip("onnxruntime")
    from nanoscout.analysis.modelcard import AutoScale, WorkingScale
    from nanoscout.engines import create_engine
    from nanoscout.training import realdata
    from nanoscout.training.evaluate import score_image, summarize

    if "stem" not in realdata.available_sets():
        pytest.skip(f"no STEM images under {realdata.data_root()}")
    card = ModelCard.load(onnx.with_suffix(".json"))
    assert card.normalization.denoise is None
    ws = card.working_scale
    assert ws is not None and ws.auto.fallback == "nearest"
    smooth_card = card.model_copy(update={"normalization": card.normalization.model_copy(
        update={"denoise": Denoise(target=0.05)})})
    coarse: WorkingScale = ws.model_copy(update={"auto": AutoScale.model_validate(
        {**ws.auto.model_dump(), "fallback": "coarse"})})
    card_12 = smooth_card.model_copy(update={"working_scale": coarse})
    engine = create_engine(onnx, "onnxruntime-cpu", threads=2)
    arms = {"1.2.1": Detector(engine, card), "1.2.1 smoothed": Detector(engine, smooth_card),
            "1.2 smoothed": Detector(engine, card_12)}
    scores: dict[str, list[dict[str, object]]] = {k: [] for k in arms}
    try:
        for i, name in enumerate(realdata.load_split("stem")["train"]):
            s = realdata.load_stem(str(name))
            image = low_dose(s.image, 30.0, np.random.default_rng([i, 300]))
            noise = {}
            for key, det in arms.items():
                found = det.detect(image)
                if key == "1.2.1":
                    assert found.noise is None and found.smoothing_px == 0.0
                noise[key] = found.noise
                scores[key].append(score_image(found.labels, true_boxes=s.boxes))
            if i == 0:  # as it is, the frame reads far quieter to a card that measures it
                as_is = arms["1.2.1 smoothed"].detect(s.image)
                assert as_is.noise is not None and noise["1.2.1 smoothed"] is not None
                assert as_is.noise < 0.5 * noise["1.2.1 smoothed"]
    finally:
        engine.close()
    f1 = {k: summarize(v)["f1"] for k, v in scores.items()}
    # measured: 0.6075 / 0.5957 / 0.5945
    assert f1["1.2.1"] > f1["1.2 smoothed"] + 0.01, f1
    assert f1["1.2.1"] > f1["1.2.1 smoothed"], f1


def test_the_det_message_carries_the_noise_and_the_smoothing() -> None:
    """Protocol 1.9: ``det.noise`` and ``det.smoothing_px``, on the wire; None where the card
    does not smooth low-dose frames."""
    clean, labels = _particles((256, 256))
    noisy = clean + np.random.default_rng(8).normal(0.0, 0.15, clean.shape).astype(np.float32)
    frame = Frame.from_image(noisy, pixel_size_nm=0.5, source="cam", seq=0, t_acq_ns=1)
    card = _card(normalization=Normalization(denoise=Denoise(target=0.05)))
    det = Pipeline(Detector(OracleEngine(labels), card, scale=1.0)).process(frame).det
    assert det.noise is not None and det.noise > 0.05 and det.smoothing_px is not None
    assert det.smoothing_px == pytest.approx(smoothing_px(det.noise, 0.05, 2.0), abs=1e-3)
    back = decode_message([bytes(p) for p in encode(Pipeline(
        Detector(OracleEngine(labels), card, scale=1.0)).process(frame).messages[0])]).header
    assert isinstance(back, DetHeader) and (back.noise, back.smoothing_px) == (
        det.noise, det.smoothing_px)
    plain = Pipeline(Detector(OracleEngine(labels), _card(), scale=1.0)).process(frame).det
    assert plain.noise is None and plain.smoothing_px is None


def test_low_dose_is_shot_noise_on_the_same_picture() -> None:
    clean, _ = _particles((200, 200))
    assert low_dose(clean, 0.0, np.random.default_rng(0)).tolist() == clean.tolist()
    counts = low_dose(clean, 40.0, np.random.default_rng(1))
    again = low_dose(clean, 40.0, np.random.default_rng(1))
    assert counts.dtype == np.float32 and np.array_equal(counts, again)  # seeded
    assert (counts == np.round(counts)).all() and counts.min() >= 0  # counts
    x = np.clip((clean - np.percentile(clean, 0.5)) / np.ptp(np.percentile(clean, [0.5, 99.5])),
                0, 1)
    lam = 40.0 * (0.05 + x)
    bright = x > 0.9
    assert counts[bright].mean() == pytest.approx(lam[bright].mean(), rel=0.03)
    assert counts[bright].var() == pytest.approx(lam[bright].mean(), rel=0.15)  # Poisson


def test_the_noise_benchmark_runs_and_records_what_it_smoothed(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import json

    from benchmarks.noise_stress import main

    out = tmp_path / "noise.json"
    main(["--sets", "granular-tune", "--max-images", "1", "--doses", "0,10",
          "--targets", "none,0.05", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["tuning_sets"] == ["granular-tune"] and res["heldout_sets"] == []
    doses = res["sets"]["granular-tune"]["doses"]
    assert doses["10"]["noise"][0] > 0.05 > doses["0"]["noise"][0]
    assert doses["10"]["0.05"]["smoothed_frames"] == 1 and doses["10"]["none"]["smoothed_frames"] == 0
    assert 0.0 <= doses["10"]["0.05"]["f1"] <= 1.0
    for bad in (["--targets", "1.5"], ["--doses", "-3"], ["--doses", "x"],
                ["--model", str(tmp_path / "candidate.onnx")]):  # no card beside it
        with pytest.raises(SystemExit):
            main(["--sets", "granular-tune", *bad, "--out", str(out)])
