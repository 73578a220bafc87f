"""The detector: preprocessing, post-processing, the shipped ONNX model on held-out frames."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.analysis.detector import Detection, Detector, _area_weighted_median
from nanoscout.analysis.instances import (
    _grow,
    _label_runs,
    _runs,
    block_centres,
    instances_from_logits,
)
from nanoscout.analysis.modelcard import (
    AutoScale,
    InputSpec,
    ModelCard,
    Normalization,
    OutputSpec,
    Thresholds,
    TrainingInfo,
    WorkingScale,
)
from nanoscout.analysis.preprocess import (
    _percentiles,
    normalize,
    pad_to_multiple,
    resample,
    resize_bilinear,
    resize_nearest,
)
from nanoscout.engines.base import Engine, TensorSpec
from nanoscout.sim.synthetic import Specimen, SpecimenConfig, render
from nanoscout.training.evaluate import evaluate, heldout_config, match_instances
from nanoscout.wire.errors import ConfigError, EngineFailure, FrameError, ModelCardError

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
ONNX = WEIGHTS / "detector.onnx"
CARD = WEIGHTS / "detector.json"


# ------------------------------------------------------------------ helpers


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _oracle_logits(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Perfect logits for a label map (what an ideal network would output)."""
    from nanoscout.training.train import targets

    fg, core = targets(labels)
    return ((fg * 2 - 1) * 6).astype(np.float32), ((core * 2 - 1) * 6).astype(np.float32)


class OracleEngine(Engine):
    """An engine that 'predicts' the truth of a known frame (tests the detector's plumbing)."""

    name = "oracle"
    inputs = (TensorSpec("image", (1, 1, None, None), "float32"),)
    outputs = (TensorSpec("logits", (1, 2, None, None), "float32"),)

    def __init__(self, labels: np.ndarray, scale: float = 1.0) -> None:
        self.labels = labels
        self.scale = scale
        self.calls: list[tuple[int, ...]] = []

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["image"]
        self.calls.append(x.shape)
        h, w = x.shape[2:]
        # the detector resamples by scale, then pads at the bottom / right
        wh, ww = (round(n * self.scale) for n in self.labels.shape)
        lab = np.zeros((h, w), np.int32)
        lab[:wh, :ww] = resize_nearest(self.labels, (wh, ww))
        fg, core = _oracle_logits(lab)
        return {"logits": np.stack([fg, core])[None]}


def _card(**kw: object) -> ModelCard:
    fields: dict[str, object] = dict(
        name="test", version="0", task="detection-segmentation", framework="none", opset=17,
        onnx_file="none.onnx", sha256="0" * 64,
        input=InputSpec(name="image", stride_multiple=16), normalization=Normalization(),
        outputs=(OutputSpec(name="logits", channels=("foreground", "core")),),
        working_scale=WorkingScale(diameter_px_min=4, diameter_px_max=80),
        thresholds=Thresholds(), training=TrainingInfo(data="none", command="none"),
        created="2025-01-01T00:00:00+00:00")
    fields.update(kw)
    return ModelCard(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ preprocessing


def test_normalize_keeps_polarity_and_handles_dtypes() -> None:
    fr = render(SpecimenConfig(shape=(128, 128), modality="TEM"), 1)
    for img in (fr.image, fr.image.astype(np.int32), fr.image.astype(np.float64),
                (fr.image // 4).astype(np.uint8)):
        x = normalize(img)
        assert x.dtype == np.float32 and x.shape == img.shape
        assert x.min() >= -0.5 and x.max() <= 1.5
        assert x[fr.labels > 0].mean() < x[fr.labels == 0].mean()  # TEM stays dark-on-bright
    assert not normalize(np.full((8, 8), 7, np.uint16)).any()
    with pytest.raises(FrameError, match="NaN"):
        normalize(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_normalize_keeps_frames_of_a_tiny_range_or_a_large_offset() -> None:
    """The same picture in units that float32 arithmetic would lose (a range below float32's
    smallest normal number, a float64 range a 1e-13 fraction of its offset, 32- and 64-bit
    counts far above 2**24) normalises to what the plain frame does, and stays finite."""
    fr = render(SpecimenConfig(shape=(96, 96), modality="TEM"), 2)
    base = fr.image.astype(np.float64)
    ref = normalize(base)
    for img in ((base * 1e-42).astype(np.float32), base * 1e-300, 1.0 + base * 1e-13,
                (base + 2 ** 40).astype(np.int64), (base + 3e9).astype(np.uint32)):
        x = normalize(img)
        assert x.dtype == np.float32 and np.isfinite(x).all(), img.dtype
        assert np.abs(x - ref).max() < 0.02, (img.dtype, float(np.abs(x - ref).max()))
    with pytest.raises(FrameError, match="NaN"):
        normalize(np.array([[1e-300, np.nan], [0.0, 2e-300]]))


def test_histogram_percentiles_equal_numpy() -> None:
    rng = np.random.default_rng(3)
    q = (0.5, 99.5)
    for dtype, lo, hi in ((np.uint8, 0, 255), (np.uint16, 40, 4000), (np.uint16, 0, 65535),
                          (np.int16, -300, 900), (np.int32, -70000, 70000),
                          (np.uint32, 10, 60000)):
        for n in (1, 2, 7, 4096):
            a = rng.integers(lo, hi, (n, 3), endpoint=True).astype(dtype)
            # the reference in int64: numpy interpolates narrow integers in their own dtype,
            # which overflows for int16 samples spanning more than 32767
            assert _percentiles(a, q) == tuple(np.percentile(a.astype(np.int64), q)), (dtype, n)
    f = rng.normal(size=(64, 64)).astype(np.float32)
    assert _percentiles(f, q) == tuple(np.percentile(f, q))
    wide = np.array([[-(2 ** 30), 0, 2 ** 30]], np.int64)  # beyond the histogram: numpy itself
    assert _percentiles(wide, q) == tuple(np.percentile(wide, q))
    # boolean frames (numpy's percentile refuses them) normalise like 0 / 1 images
    x = normalize(np.eye(8, dtype=bool))
    assert x.dtype == np.float32 and x.max() == 1.0 and x.min() == 0.0


def test_pad_and_resize() -> None:
    a = np.arange(30 * 50, dtype=np.float32).reshape(30, 50)
    p, pads = pad_to_multiple(a, 16)
    assert p.shape == (32, 64) and pads == (2, 14)
    np.testing.assert_array_equal(p[:30, :50], a)
    tiny, _ = pad_to_multiple(np.ones((3, 5), np.float32), 16)
    assert tiny.shape == (16, 16)
    up = resize_bilinear(a, (60, 100))
    assert up.shape == (60, 100) and up.dtype == np.float32
    assert up.min() >= a.min() and up.max() <= a.max()
    np.testing.assert_allclose(resize_bilinear(up, (30, 50)), a, atol=30)
    rows, cols = np.array([0, 7, 59]), np.arange(1, 100, 3)
    np.testing.assert_array_equal(resize_bilinear(a, (60, 100), rows=rows, cols=cols),
                                  up[np.ix_(rows, cols)])
    lab = np.array([[1, 2], [3, 4]], np.int32)
    np.testing.assert_array_equal(resize_nearest(lab, (4, 4)),
                                  np.kron(lab, np.ones((2, 2), np.int32)))


# ------------------------------------------------------------------ post-processing


@pytest.mark.parametrize("stride", [1, 2])
def test_touching_discs_of_different_size_are_split_at_the_contact(stride: int) -> None:
    shape = (96, 128)
    big, small = _disc(shape, 48, 40, 20), _disc(shape, 48, 40 + 20 + 10, 10)
    truth = np.zeros(shape, np.int32)
    truth[big] = 1
    truth[small & ~big] = 2
    fg, core = _oracle_logits(truth)
    labels, scores = instances_from_logits(fg, core, post_stride=stride)
    assert labels.dtype == np.int32 and labels.shape == shape
    assert labels.max() == 2 and scores.shape == (3,)
    pairs, n_pred, n_true = match_instances(labels, truth)
    assert (n_pred, n_true, len(pairs)) == (2, 2, 2)
    assert pairs["iou"].min() > 0.9
    # the weighted split puts the boundary at the contact, not half-way between the cores
    areas = np.bincount(labels.ravel())[1:]
    np.testing.assert_allclose(np.sort(areas), np.sort([small.sum(), big.sum() - 0]), rtol=0.06)


def test_a_sliver_cut_off_by_a_broken_core_is_merged_back() -> None:
    fg = np.full((64, 64), -6.0, np.float32)
    core = fg.copy()
    fg[10:50, 10:50] = 6.0  # one 40 x 40 px particle
    core[14:46, 14:38] = 6.0  # its core, broken: a big piece and a thin strip at the edge
    core[14:46, 44:46] = 6.0
    split, _ = instances_from_logits(fg, core, merge_contact=None)
    assert split.max() == 2
    merged, scores = instances_from_logits(fg, core)
    assert merged.max() == 1 and scores.shape == (2,)
    assert (merged[10:50, 10:50] == 1).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_fragments_of_a_wire_and_a_square_merge_but_touching_discs_do_not(stride: int) -> None:
    fg = np.full((160, 160), -6.0, np.float32)
    core = fg.copy()
    fg[10:30, 10:150] = 6.0  # a 20 x 140 px wire whose core broke into three pieces
    for c0, c1 in ((14, 55), (60, 100), (105, 146)):
        core[14:26, c0:c1] = 6.0
    fg[50:110, 20:80] = 6.0  # a 60 x 60 px opaque particle whose core broke into quarters
    for r0, c0 in ((54, 24), (54, 52), (82, 24), (82, 52)):
        core[r0:r0 + 24, c0:c0 + 24] = 6.0
    touching = np.zeros((160, 160), np.int32)  # two discs touching at a narrow neck
    touching[_disc(touching.shape, 130, 100, 16)] = 1
    touching[_disc(touching.shape, 130, 131, 16) & (touching == 0)] = 2
    tf, tc = _oracle_logits(touching)
    fg = np.maximum(fg, tf)
    core = np.maximum(core, tc)
    plain, _ = instances_from_logits(fg, core, post_stride=stride)
    assert plain.max() == 3 + 4 + 2  # the contact rule alone does not repair these
    merged, scores = instances_from_logits(fg, core, post_stride=stride, merge_convex=0.97)
    assert merged.max() == 1 + 1 + 2 and scores.shape == (5,)
    assert len(np.unique(merged[10:30, 10:150])) == 1
    assert len(np.unique(merged[50:110, 20:80])) == 1
    assert merged[130, 100] != merged[130, 131]


def test_postprocess_drops_specks_and_scores_in_range() -> None:
    fg = np.full((64, 64), -6.0, np.float32)
    core = fg.copy()
    fg[10:30, 10:30] = 6.0
    core[15:25, 15:25] = 6.0
    fg[50, 50] = 6.0  # a one-pixel speck, below min_area_px
    labels, scores = instances_from_logits(fg, core, min_area_px=6)
    assert labels.max() == 1 and scores.shape == (2,)
    assert 0.9 < scores[1] <= 1.0 and scores[0] == 0
    assert (labels[10:30, 10:30] == 1).all() and labels[50, 50] == 0
    empty, s0 = instances_from_logits(np.full((32, 48), -5, np.float32),
                                      np.full((32, 48), -5, np.float32))
    assert empty.max() == 0 and s0.shape == (1,)


def _random_logits(rng: np.random.Generator, shape: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Blobby logit maps: touching particles with broken, merged and missing cores."""
    from scipy import ndimage as ndi

    fg = ndi.gaussian_filter(rng.normal(size=shape), 2.0)
    core = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    return ((fg + 0.02) * 60).astype(np.float32), ((core - 0.1) * 60).astype(np.float32)


def test_run_labelling_matches_scipy_label() -> None:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    for k in range(60):
        h, w = rng.integers(1, 50, 2)
        mask = np.zeros((h + 2, w + 2), bool)
        mask[1:-1, 1:-1] = rng.random((h, w)) < (0.25 + 0.5 * (k % 3) / 2)
        pix = np.flatnonzero(mask)
        if pix.size == 0:
            continue
        first, length = _runs(pix)
        run_lab = _label_runs(pix[first], length, w + 2)
        ref, n = ndi.label(mask)
        assert run_lab.max() + 1 == n
        np.testing.assert_array_equal(np.repeat(run_lab + 1, length), ref.reshape(-1)[pix])


def _grow_reference(inst: np.ndarray, todo: np.ndarray, rate: np.ndarray, max_iter: int
                    ) -> np.ndarray:
    """The growth rule, step by step over the whole grid (slow, obviously right)."""
    out = inst.copy()
    todo = todo.copy()
    for j in range(1, 2 * max_iter):
        active = (np.floor(j * rate) > np.floor((j - 1) * rate)) if j <= max_iter \
            else np.ones(rate.size, bool)
        active[0] = False
        src = np.where(active[out], out, 0)
        best = np.zeros_like(out)
        best[1:] = np.maximum(best[1:], src[:-1])
        best[:-1] = np.maximum(best[:-1], src[1:])
        best[:, 1:] = np.maximum(best[:, 1:], src[:, :-1])
        best[:, :-1] = np.maximum(best[:, :-1], src[:, 1:])
        claim = todo & (best > 0)
        out[claim] = best[claim]
        todo &= ~claim
    return out


def test_growth_matches_the_step_by_step_rule() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        h, w = rng.integers(3, 30, 2)
        grid = np.zeros((h + 2, w + 2), np.int32)
        n_seeds = int(rng.integers(1, 6))
        todo = np.zeros(grid.shape, bool)
        todo[1:-1, 1:-1] = rng.random((h, w)) < 0.8
        for k in range(1, n_seeds + 1):  # one- or two-pixel seeds, some touching
            r, c = rng.integers(1, h + 1), rng.integers(1, w + 1)
            grid[r, c:c + int(rng.integers(1, 3))] = k
        grid[:, -1] = grid[:, 0] = 0
        todo &= grid == 0
        rate = np.concatenate([[0.0], rng.choice([1.0, 0.7, 0.35, 0.1], n_seeds)])
        max_iter = int(rng.choice([3, 64]))
        expected = _grow_reference(grid, todo, rate, max_iter)
        got = grid.copy()
        _grow(got, np.flatnonzero(got), todo.copy(), rate, max_iter)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_core_given_at_the_block_centres_gives_the_same_instances(stride: int) -> None:
    rng = np.random.default_rng(stride)
    for shape in ((64, 64), (61, 90), (7, 5)):
        fg, core = _random_logits(rng, shape)
        full = instances_from_logits(fg, core, post_stride=stride)
        sampled = core[np.ix_(block_centres(shape[0], stride), block_centres(shape[1], stride))]
        part = instances_from_logits(fg, sampled, post_stride=stride)
        np.testing.assert_array_equal(full[0], part[0])
        np.testing.assert_array_equal(full[1], part[1])
        # a crop of a larger map (rows not contiguous) reads the same pixels
        big_fg = np.zeros((shape[0], shape[1] + 9), np.float32)
        big_core = big_fg.copy()
        big_fg[:, :shape[1]], big_core[:, :shape[1]] = fg, core
        crop = instances_from_logits(big_fg[:, :shape[1]], big_core[:, :shape[1]],
                                     post_stride=stride)
        np.testing.assert_array_equal(full[0], crop[0])
    with pytest.raises(ValueError, match="block centres"):
        instances_from_logits(np.zeros((8, 8), np.float32), np.zeros((3, 8), np.float32))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 3), (5, 5)])
def test_tiny_frames_are_labelled(shape: tuple[int, int]) -> None:
    fg = np.full(shape, 5.0, np.float32)  # all foreground, no core
    for stride in (1, 2, 3):
        labels, scores = instances_from_logits(fg, fg * 0 - 5, post_stride=stride, min_area_px=1)
        assert labels.shape == shape and labels.dtype == np.int32
        assert (labels == 1).all() and scores.shape == (2,) and 0.49 < scores[1] < 0.5
    assert block_centres(1, 2).tolist() == [0]
    assert block_centres(7, 2).tolist() == [1, 3, 5, 5]
    assert block_centres(6, 3).tolist() == [1, 4]


def test_match_instances() -> None:
    a = np.zeros((10, 10), np.int32)
    b = np.zeros((10, 10), np.int32)
    a[0:4, 0:4], b[0:4, 0:3] = 1, 7  # IoU 12/16
    a[6:8, 6:8], b[6:9, 6:9] = 2, 9  # IoU 4/9 < 0.5
    pairs, n_pred, n_true = match_instances(a, b)
    assert (n_pred, n_true) == (2, 2)
    assert pairs.tolist() == [(1, 7, pytest.approx(0.75))]
    assert len(match_instances(a, b, iou=0.4)[0]) == 2
    with pytest.raises(ValueError, match="shape"):
        match_instances(a, b[:5])


# ------------------------------------------------------------------ detector plumbing


def test_detector_with_oracle_engine_returns_labels_on_the_frame_grid() -> None:
    fr = render(SpecimenConfig(shape=(200, 300)), 2)
    eng = OracleEngine(fr.labels)
    det = Detector(eng, _card()).detect(fr.image)
    assert isinstance(det, Detection)
    assert eng.calls == [(1, 1, 208, 304)]  # padded to the stride
    assert det.labels.shape == (200, 300) and det.labels.dtype == np.int32
    assert det.scores.dtype == np.float32 and det.scores.shape == (det.n + 1,)
    assert set(np.unique(det.labels).tolist()) == set(range(det.n + 1))
    assert set(det.timings_ms) == {"preprocess", "scale", "engine", "postprocess"}
    assert det.scale == 1.0
    pairs, n_pred, n_true = match_instances(det.labels, fr.labels)
    assert len(pairs) >= 0.95 * n_true


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_detector_resamples_and_returns_original_resolution(scale: float) -> None:
    fr = render(SpecimenConfig(shape=(150, 170), median_diameter_nm=12.0), 4)
    eng = OracleEngine(fr.labels, scale)
    det = Detector(eng, _card(), scale=scale).detect(fr.image)
    h, w = round(150 * scale), round(170 * scale)
    assert eng.calls == [(1, 1, -(-h // 16) * 16, -(-w // 16) * 16)]
    assert det.labels.shape == (150, 170)
    pairs, _, n_true = match_instances(det.labels, fr.labels)
    assert len(pairs) >= 0.8 * n_true


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3)), np.zeros((0, 5)), np.zeros(7),
                                 np.zeros((3, 0), np.uint8)])
def test_detector_rejects_bad_frames_naming_the_shape(bad: np.ndarray) -> None:
    det = Detector(OracleEngine(np.zeros((8, 8), np.int32)), _card())
    with pytest.raises(FrameError, match=str(bad.shape).replace("(", r"\(").replace(")", r"\)")):
        det.detect(bad)


def test_detector_checks_card_and_engine_output() -> None:
    eng = OracleEngine(np.zeros((32, 32), np.int32))
    with pytest.raises(ModelCardError, match="classification"):
        Detector(eng, _card(task="classification", classes=("a",),
                            input=InputSpec(name="image", size=(64, 64))))
    with pytest.raises(ModelCardError, match="not an engine input"):
        Detector(eng, _card(input=InputSpec(name="pixels")))

    class Broken(OracleEngine):
        def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"logits": np.zeros((1, 2, 3, 3), np.float32)}

    with pytest.raises(EngineFailure, match="shape"):
        Detector(Broken(np.zeros((32, 32), np.int32)), _card()).detect(np.ones((32, 32)))


# ------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def shipped() -> Detector:
    if not ONNX.is_file() or not CARD.is_file():
        pytest.skip(f"no shipped model at {ONNX} (run python -m nanoscout.training.train)")
    pytest.importorskip("onnxruntime")
    from nanoscout.engines import create_engine

    return Detector(create_engine(ONNX, "onnxruntime-cpu", threads=2), ModelCard.load(CARD))


@pytest.mark.parametrize("modality", ["TEM", "STEM", "SEM"])
def test_shipped_model_finds_particles(shipped: Detector, modality: str) -> None:
    cfg = SpecimenConfig(modality=modality, shape=(256, 256), agglomerate_fraction=0.4)  # type: ignore[arg-type]
    fr = Specimen.generate(cfg, 500 + len(modality)).acquire(np.random.default_rng(1))
    det = shipped.detect(fr.image)
    pairs, n_pred, _ = match_instances(det.labels, fr.labels)
    n_true = int((fr.truth["area_px"] >= 12).sum())
    recall, precision = len(pairs) / n_true, len(pairs) / max(n_pred, 1)
    assert recall > 0.85 and precision > 0.85, (recall, precision)
    assert ((det.scores[1:] > 0) & (det.scores[1:] <= 1)).all()


def test_shipped_model_on_odd_shapes_and_dtypes(shipped: Detector) -> None:
    fr = render(SpecimenConfig(shape=(203, 317), modality="STEM", dtype="float32"), 8)
    for img in (fr.image, (fr.image * 1000).astype(np.int32), fr.image.astype(np.float64)):
        det = shipped.detect(img)
        assert det.labels.shape == (203, 317)
        assert det.n > 10
    empty = shipped.detect(np.full((64, 96), 1000, np.uint16))
    assert empty.n == 0


def test_shipped_model_heldout_quality(shipped: Detector) -> None:
    # one small held-out frame per modality (the full evaluation is nanoscout.training.evaluate)
    res = evaluate(shipped, n=3, seed=54321)
    assert heldout_config(0, 54321).shape == (512, 512)
    assert res["f1"] >= 0.85, res
    assert res["median_abs_ecd_error_pct"] <= 8.0, res


# ------------------------------------------------------------------ working scale and tiles


def _ecd_median(labels: np.ndarray) -> float:
    _, area = np.unique(labels[labels > 0], return_counts=True)
    return float(np.median(2 * np.sqrt(area / np.pi)))


def test_auto_scale_follows_the_particle_size(shipped: Detector) -> None:
    """The same specimen at 1x and 4x magnification: the chosen factors differ by ~4x, and
    the enlarged frame's particles are found as well as the original's."""
    cfg = SpecimenConfig(modality="TEM", shape=(512, 512), pixel_size_nm=1.0,
                         median_diameter_nm=50.0, sigma_log=0.15, coverage=0.2,
                         agglomerate_fraction=0.0)
    fr = render(cfg, 21)
    x = normalize(fr.image)
    big = resample(x, (2048, 2048))
    s1, s4 = shipped.estimate_scale(x), shipped.estimate_scale(big)
    assert 0.7 < 4 * s4 / s1 < 1.4, (s1, s4)
    auto = shipped.card.working_scale.auto  # type: ignore[union-attr]
    assert 0.6 * auto.target_diameter_px < _ecd_median(fr.labels) * s1 \
        < 1.6 * auto.target_diameter_px, s1
    det = Detector(shipped.engine, shipped.card, scale="auto").detect(big)
    assert det.scale == pytest.approx(s4, rel=0.05)  # detect() normalises once more
    small = resize_nearest(det.labels, (512, 512))
    pairs, _, _ = match_instances(small, fr.labels)
    assert len(pairs) >= 0.85 * int((fr.truth["area_px"] >= 12).sum())
    # particles already in the network's comfortable range: the frame is left as it is
    mid = render(SpecimenConfig(modality="STEM", shape=(512, 512), pixel_size_nm=1.0,
                                median_diameter_nm=20.0, sigma_log=0.15), 3)
    assert shipped.estimate_scale(normalize(mid.image)) == 1.0
    assert auto.keep_min_px <= 20.0 <= auto.keep_max_px
    # nothing to find: the factor stays 1 and no particle is invented
    blank = Detector(shipped.engine, shipped.card, scale="auto")
    assert blank.estimate_scale(np.zeros((300, 200), np.float32)) == 1.0
    assert blank.detect(np.full((300, 200), 7, np.uint8)).n == 0


#: the self-consistent estimate as the shipped cards set it (issue 17)
_CONSISTENT = {"consistency": 1.2, "consistent_px": (8.0, 64.0), "min_pass_ecd_px": 4.0,
               "consistent_min_count": 10}


def _with_auto(card: ModelCard, **update: object) -> ModelCard:
    ws = card.working_scale
    assert ws is not None
    return card.model_copy(update={"working_scale": ws.model_copy(
        update={"auto": AutoScale.model_validate({**ws.auto.model_dump(), **update})})})


@pytest.mark.parametrize(("modality", "diameter_px", "magnification"),
                         [("TEM", 6.0, 1), ("STEM", 12.0, 2), ("SEM", 30.0, 1),
                          ("TEM", 50.0, 4), ("STEM", 90.0, 1)])
def test_consistent_scale_brings_particles_to_the_trained_size(
        shipped: Detector, modality: str, diameter_px: float, magnification: int) -> None:
    """Frames of known particle size at several magnifications: the self-consistent estimate
    resamples the particles into the network's range (or leaves them there)."""
    card = _with_auto(shipped.card, **_CONSISTENT)
    cfg = SpecimenConfig(modality=modality, shape=(512, 512), pixel_size_nm=1.0,  # type: ignore[arg-type]
                         median_diameter_nm=diameter_px, sigma_log=0.15, coverage=0.2)
    fr = render(cfg, 31)
    x = normalize(fr.image)
    if magnification > 1:
        x = resample(x, (512 * magnification, 512 * magnification))
    true_px = _ecd_median(fr.labels) * magnification
    s = Detector(shipped.engine, card, scale="auto").estimate_scale(x)
    auto = card.working_scale.auto  # type: ignore[union-attr]
    if s == 1.0:
        assert auto.keep_min_px / 1.3 <= true_px <= auto.keep_max_px * 1.3, (s, true_px)
    else:
        assert 0.6 * auto.target_diameter_px < true_px * s < 1.6 * auto.target_diameter_px, \
            (s, true_px)


@pytest.mark.parametrize("name", ["PtC1", "Pt_carbon1"])
def test_consistent_scale_is_not_captured_by_a_support_lump(shared_data: Path, name: str
                                                            ) -> None:
    """Real HAADF-STEM frames of Pt on carbon (the STEM tuning material, trained on since STEM
    detector 1.2; 2048² px, particles 19-39 px): the coarse-to-fine passes took the support
    lumps for the particles (factor ~0.1, the particles shrunk to 2-4 px); the self-consistent
    estimate keeps them resolved. (Version 1.1, which never saw Pt, shrank PtC1's 19 px
    particles to 5.7 px.)"""
    stem_onnx = ONNX.with_name("detector_stem.onnx")
    if not stem_onnx.is_file():
        pytest.skip(f"no shipped STEM model at {stem_onnx}")
    pytest.importorskip("onnxruntime")
    from nanoscout.engines import create_engine
    from nanoscout.training.realdata import load_stem

    s = load_stem(name, shared_data)
    assert s.boxes is not None
    true_px = float(np.median(np.sqrt((s.boxes[:, 2] - s.boxes[:, 0])
                                      * (s.boxes[:, 3] - s.boxes[:, 1]))))
    card = _with_auto(ModelCard.load(stem_onnx.with_suffix(".json")), **_CONSISTENT)
    det = Detector(create_engine(stem_onnx, "onnxruntime-cpu", threads=2), card, scale="auto")
    f = det.estimate_scale(normalize(s.image))
    assert 10.0 <= true_px * f <= 48.0, (f, true_px)


#: a 1024² HAADF frame on a thick support, as the passes of the self-consistent estimate saw
#: it (X2 on the Cu tuning frame Cu_silica1 under benchmarks.scale_stress's ``thick``): factor
#: -> (area-weighted median ECD at the pass, confident particles counted). The coarse pass
#: sees the lumps; the full-size pass, centred on a lump, finds none of the faint particles.
_THICK_PASSES = {0.25: (21.7, 14), 0.5: (17.1, 12), 1.0: (0.0, 0), 2.0: (0.0, 0)}


@pytest.mark.parametrize(("fallback", "passes", "particle_px"), [
    ("coarse", _THICK_PASSES, 21.7 / 0.25),  # the first pass whose median is >= 16 px
    ("finest", _THICK_PASSES, 17.1 / 0.5),  # the finest pass that counted >= 10 particles
    # no pass counts 10: the coarse-to-fine walk decides, as before
    ("finest", {0.25: (21.7, 9), 0.5: (17.1, 9), 1.0: (0.0, 0), 2.0: (0.0, 0)}, 21.7 / 0.25),
    # the median in frame px of the passes that counted >= 10 within 8-64 px: of two, their
    # geometric mean
    ("median", _THICK_PASSES, float(np.sqrt(21.7 / 0.25 * 17.1 / 0.5))),
    # a Pt-on-carbon frame as a STEM network that never saw Pt saw it (PtC2, its passes from
    # 1/4 size): the x2 pass counts noise grains (5.5 px in the frame), one outlier among
    # three; at x1 they are below 8 px and do not count
    ("median", {0.25: (16.6, 45), 0.5: (26.3, 11), 1.0: (7.6, 648), 2.0: (11.0, 154)},
     26.3 / 0.5),
    ("median", {0.25: (21.7, 9), 0.5: (17.1, 9), 1.0: (0.0, 0), 2.0: (0.0, 0)}, 21.7 / 0.25),
    # the closest neighbouring pair within 1.5 (34.5 and 27.3 px, 1.26 apart; 44 and 34.5 are
    # 1.28 apart): a Pt-on-carbon frame as 2 x 2 tiles, whose 1/16 pass saw support lumps
    # (198 px) and which the coarse walk would take
    ("nearest", {0.25: (49.5, 12), 0.5: (22.0, 118), 1.0: (34.5, 201), 2.0: (54.6, 78)}, 34.5),
    ("coarse", {0.25: (49.5, 12), 0.5: (22.0, 118), 1.0: (34.5, 201), 2.0: (54.6, 78)},
     49.5 / 0.25),
    # no pair within 1.5: the coarse walk, as before
    ("nearest", _THICK_PASSES, 21.7 / 0.25),
])
def test_when_no_two_passes_agree_the_fallback_decides(
        shipped: Detector, monkeypatch: pytest.MonkeyPatch, fallback: str,
        passes: dict[float, tuple[float, int]], particle_px: float) -> None:
    card = _with_auto(shipped.card, **_CONSISTENT, fallback=fallback, coarse_side_px=256,
                      reliable_diameter_px=16.0)
    det = Detector(shipped.engine, card, scale="auto")
    seen: list[float] = []

    def scripted(x: np.ndarray, s: float, centre: object = None
                 ) -> tuple[np.ndarray, bool, float, int]:
        seen.append(s)
        d, n = passes[s]
        return np.zeros((1, 2, 8, 8), np.float32), False, d, n

    monkeypatch.setattr(det, "_window_pass", scripted)
    monkeypatch.setattr(det, "_densest", lambda *a: None)
    size = det.particle_size(np.zeros((1024, 1024), np.float32))
    assert size == pytest.approx(particle_px)
    assert sorted(set(seen)) == [0.25, 0.5, 1.0, 2.0] and len(seen) == 4  # each pass runs once
    a = card.working_scale.auto  # type: ignore[union-attr]
    assert det.estimate_scale(np.zeros((1024, 1024), np.float32)) == pytest.approx(
        a.factor(particle_px))


@pytest.mark.parametrize("recentre", [False, True])
def test_a_finer_pass_that_finds_nothing_on_a_lump_looks_at_the_frame_centre(
        shipped: Detector, monkeypatch: pytest.MonkeyPatch, recentre: bool) -> None:
    """The thick-support frame of the test above: with ``recentre`` the full-size pass, empty
    around the densest foreground (a lump), runs again at the frame's centre, finds 10
    particles of 32 px there, and agrees with the half-size pass (34 px)."""
    card = _with_auto(shipped.card, **_CONSISTENT, recentre=recentre, coarse_side_px=256,
                      reliable_diameter_px=16.0)
    det = Detector(shipped.engine, card, scale="auto")
    lump = (826.0, 186.0)  # (row, col): where the coarse pass found the most foreground
    seen: list[tuple[float, object]] = []

    def scripted(x: np.ndarray, s: float, centre: object = None
                 ) -> tuple[np.ndarray, bool, float, int]:
        seen.append((s, centre))
        d, n = (32.3, 10) if s == 1.0 and centre is None else _THICK_PASSES[s]
        return np.zeros((1, 2, 8, 8), np.float32), False, d, n

    monkeypatch.setattr(det, "_window_pass", scripted)
    monkeypatch.setattr(det, "_densest", lambda *a: lump)
    size = det.particle_size(np.zeros((1024, 1024), np.float32))
    if recentre:
        assert size == pytest.approx(17.1 / 0.5)
        assert seen == [(0.25, None), (0.5, lump), (1.0, lump), (1.0, None)]
    else:
        assert size == pytest.approx(21.7 / 0.25)
        assert (1.0, None) not in seen


def test_a_few_outsized_objects_cannot_hold_the_median_pixel_with_a_weight_cap() -> None:
    """30 particles of 10 px beside one support grain of 200 px (it holds 98 % of the
    pixels): by area the grain is the frame's particle size; with each weight capped at the
    10th largest it is one particle among 31."""
    grain = np.array([10.0] * 30 + [200.0])
    assert _area_weighted_median(grain) == 200.0
    assert _area_weighted_median(grain, 10) == 10.0
    # nine grains are still fewer than ten: the particles keep the median
    assert _area_weighted_median(np.array([10.0] * 30 + [200.0] * 9), 10) == 10.0
    # a swarm of specks beside ten or more real particles: the cap leaves the particles'
    # weight as it was, so they still hold the median pixel (400 specks of 4 px hold
    # 6400 px², 20 particles of 20 px 8000 px²)
    swarm = np.array([4.0] * 400 + [20.0] * 20)
    assert _area_weighted_median(swarm) == _area_weighted_median(swarm, 10) == 20.0
    # with a ratio only what is wider than ratio x the 10th largest is capped: a lognormal
    # population keeps its weights (its median pixel as before), the grain is capped to 20 px
    rng = np.random.default_rng(3)
    population = np.exp(rng.normal(np.log(12.0), 0.3, 200))
    assert _area_weighted_median(population, 10, 2.0) == _area_weighted_median(population)
    assert _area_weighted_median(population, 10) < _area_weighted_median(population)
    assert _area_weighted_median(grain, 10, 2.0) == 10.0
    assert _area_weighted_median(np.array([10.0] * 30 + [200.0] * 3), 10, 2.0) == 10.0
    # fewer detections than the rank: nothing to cap
    assert _area_weighted_median(np.array([5.0, 80.0]), 10) == 80.0
    assert _area_weighted_median(np.array([]), 10) == 0.0


def _grain_frame(s: float) -> np.ndarray:
    """A pass at factor ``s`` over a frame of 40 particles 20 px across beside one support
    grain 200 px across (frame px): the ECDs it measures, px at the pass."""
    return np.array([20.0 * s] * 40 + [200.0 * s])


def _texture_frame(s: float) -> np.ndarray:
    """Six particles 80 px across (frame px) beside 60 texture responses that are 5 px at
    every pass (they keep their size in working px, not in frame px)."""
    return np.array([80.0 * s] * 6 + [5.0] * 60)


@pytest.mark.parametrize(("frame", "cap", "particle_px"), [
    (_grain_frame, None, 200.0),  # the grain holds the median pixel and keeps its size
    (_grain_frame, "always", 20.0),
    (_grain_frame, "consistent", 20.0),  # the capped medians agree on the particles
    (_texture_frame, None, 80.0),
    # every median capped: the texture holds the median of every pass, no two passes agree,
    # and the coarse-to-fine walk takes the full-size pass's 5 px (S46-1's EMPS frames)
    (_texture_frame, "always", 5.0),
    # the capped medians (texture) do not agree from pass to pass: the uncapped ones decide
    (_texture_frame, "consistent", 80.0),
])
def test_a_capped_median_is_asked_first_where_its_passes_agree(
        shipped: Detector, monkeypatch: pytest.MonkeyPatch, frame: Any, cap: str | None,
        particle_px: float) -> None:
    update: dict[str, object] = dict(_CONSISTENT, coarse_side_px=256, reliable_diameter_px=16.0)
    if cap is not None:
        update.update(weight_cap_rank=10, weight_cap_ratio=2.0, weight_cap_mode=cap)
    det = Detector(shipped.engine, _with_auto(shipped.card, **update), scale="auto")

    def scripted(x: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ecd = frame(s)
        return np.zeros((1, 2, 8, 8), np.float32), ecd, np.ones_like(ecd)

    monkeypatch.setattr(det, "_pass", scripted)
    monkeypatch.setattr(det, "_densest", lambda *a: None)
    assert det.particle_size(np.zeros((1024, 1024), np.float32)) == pytest.approx(particle_px)


@pytest.mark.parametrize(("centre", "near"), [("foreground", (64, 64)), ("particles", (192, 192))])
def test_the_finer_passes_centre_on_the_most_foreground_or_the_most_particles(
        shipped: Detector, centre: str, near: tuple[int, int]) -> None:
    """A pass over 256 x 256 working px: one support grain 64 px across in the top-left
    quarter (4096 px of foreground), 16 particles 6 px across in the bottom-right one (576 px).
    ``window_centre = "foreground"`` (every shipped card) centres the finer passes on the
    grain; ``"particles"`` (each confident detection one unit) on the particles."""
    det = Detector(shipped.engine, _with_auto(shipped.card, window_centre=centre), scale="auto")
    logits = np.full((1, 2, 256, 256), -8.0, np.float32)
    logits[0, :, 32:96, 32:96] = 8.0  # the grain
    for r in range(4):
        for c in range(4):
            y, x = 168 + 14 * r, 168 + 14 * c
            logits[0, :, y:y + 6, x:x + 6] = 8.0
    got = det._densest(logits, 1.0, (slice(0, 256), slice(0, 256)))
    assert got is not None
    assert np.hypot(got[0] - near[0], got[1] - near[1]) < 32.0, got


def test_auto_scale_card_fields_default_to_the_old_estimate() -> None:
    a = AutoScale()
    assert a.consistency is None and a.min_pass_ecd_px == 0.0  # the coarse-to-fine passes
    assert a.fallback == "coarse" and not a.recentre and a.weight_cap_rank is None
    assert a.weight_cap_mode == "always" and a.window_centre == "foreground"
    with pytest.raises(ValueError, match="weight_cap_rank"):
        AutoScale(weight_cap_rank=0)
    with pytest.raises(ValueError, match="weight_cap_ratio"):
        AutoScale(weight_cap_rank=10, weight_cap_ratio=0.5)
    with pytest.raises(ValueError, match="fallback"):
        AutoScale(fallback="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="consistent_px"):
        AutoScale(consistency=1.2, consistent_px=(40.0, 8.0))
    with pytest.raises(ValueError, match="consistency"):
        AutoScale(consistency=1.0)


def test_auto_scale_is_reused_per_key(shipped: Detector, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    det = Detector(shipped.engine, shipped.card, scale="auto", auto_every=3)
    calls = []
    orig = det._estimate

    def counting(x: np.ndarray, particle_px: tuple[float, float] | None = None
                 ) -> tuple[float, np.ndarray | None, bool, str | None, bool | None]:
        calls.append(x.shape)
        return orig(x, particle_px)

    monkeypatch.setattr(det, "_estimate", counting)
    fr = render(SpecimenConfig(shape=(128, 160)), 5)
    for _ in range(5):
        det.detect(fr.image, key=("cam", 0.5))
    assert len(calls) == 2  # frames 1 and 4
    det.detect(fr.image[:96], key=("cam", 0.5))  # new shape: estimated again
    det.detect(fr.image, key=("other", 0.5))
    det.detect(fr.image)  # no key: every frame
    assert len(calls) == 5
    with pytest.raises(ConfigError):
        Detector(shipped.engine, shipped.card, scale="auto", auto_every=0)


def test_tiled_detection_matches_whole_frame(shipped: Detector) -> None:
    """Stitched tile logits give the same particles: none cut or counted twice at seams."""
    cfg = SpecimenConfig(modality="STEM", shape=(640, 640), median_diameter_nm=9.0,
                         coverage=0.25, agglomerate_fraction=0.4)
    fr = Specimen.generate(cfg, 77).acquire(np.random.default_rng(2))
    whole = Detector(shipped.engine, shipped.card, scale=1.0).detect(fr.image)
    tiled_det = Detector(shipped.engine, shipped.card, scale=1.0, tile_px=256,
                         tile_margin_px=48)
    tiled = tiled_det.detect(fr.image)
    pairs, n_tiled, n_whole = match_instances(tiled.labels, whole.labels, iou=0.8)
    assert n_whole > 100
    assert abs(n_tiled - n_whole) <= 0.01 * n_whole + 1
    assert len(pairs) >= 0.98 * n_whole
    with pytest.raises(ConfigError, match="tile_px"):
        Detector(shipped.engine, shipped.card, tile_px=100)


@pytest.fixture(scope="module")
def half_engine(shipped: Detector, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The shipped FP32 detector without its last step, the logits' 2x bilinear up-sampling
    (what the CPU's INT8 siblings ship): the detector finishes it on the host."""
    onnx = pytest.importorskip("onnx")
    from nanoscout.engines import create_engine
    from nanoscout.training.upsample_rewrite import strip_output_upsample

    model = onnx.load(str(ONNX))
    assert strip_output_upsample(model) == 1
    path = tmp_path_factory.mktemp("half") / "detector_half.onnx"
    onnx.save(model, str(path))
    return create_engine(path, "onnxruntime-cpu", threads=2)


@pytest.mark.parametrize("kw", [{"scale": 1.0}, {"scale": 0.6}, {"scale": 1.5},
                                {"scale": 1.0, "tile_px": 256, "tile_margin_px": 48},
                                {"scale": 1.0, "tta": 2}, {"scale": "auto"},
                                {"scale": 1.0, "rotate45": True}])
def test_a_model_with_half_resolution_logits_finds_the_same_particles(
        shipped: Detector, half_engine: Engine, kw: dict[str, Any]) -> None:
    """Every path of the detector (the live default, resampling, tiles, mirror images, the
    scale estimate, the 45° view) gives the particles of the model that up-samples itself."""
    cfg = SpecimenConfig(modality="TEM", shape=(448, 512), coverage=0.25,
                         agglomerate_fraction=0.4)
    fr = Specimen.generate(cfg, 11).acquire(np.random.default_rng(4))
    full = Detector(shipped.engine, shipped.card, **kw).detect(fr.image)
    half = Detector(half_engine, shipped.card, **kw).detect(fr.image)
    assert half.labels.shape == full.labels.shape == (448, 512)
    assert half.scale == full.scale
    pairs, n_half, n_full = match_instances(half.labels, full.labels, iou=0.8)
    assert n_full > 40
    assert abs(n_half - n_full) <= 0.02 * n_full + 1
    assert len(pairs) >= 0.97 * n_full
    # at the frame's own scale the foreground is the same but for float rounding
    if kw.get("scale") == 1.0 and len(kw) == 1:
        assert np.mean((half.labels > 0) != (full.labels > 0)) < 1e-3


def test_min_score_drops_unconvincing_particles() -> None:
    """Two discs, one with a weak foreground (p ~ 0.6): min_score 0.7 keeps only the sure one."""
    lab = np.zeros((64, 64), np.int32)
    lab[_disc(lab.shape, 16, 16, 8)] = 1
    lab[_disc(lab.shape, 44, 44, 8)] = 2
    fg, core = _oracle_logits(lab)
    fg = np.where(lab == 2, np.float32(0.4), fg)  # sigmoid(0.4) = 0.6
    both, s_both = instances_from_logits(fg, core)
    sure, s_sure = instances_from_logits(fg, core, min_score=0.7)
    assert len(s_both) == 3 and len(s_sure) == 2
    assert s_sure[1] == pytest.approx(s_both[1]) and s_sure[1] > 0.85
    assert set(np.unique(sure).tolist()) == {0, 1}
    assert (sure[lab == 1] == 1).all() and (sure[lab == 2] == 0).all()


class _EchoEngine(Engine):
    """Logits = the input plus a left-to-right ramp: position-dependent, so a mirror image
    that is not mirrored back shows up."""

    name = "echo"
    inputs = (TensorSpec("image", (1, 1, None, None), "float32"),)
    outputs = (TensorSpec("logits", (1, 2, None, None), "float32"),)

    def __init__(self) -> None:
        self.calls = 0

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        x = inputs["image"][0, 0]
        ramp = np.linspace(-1, 1, x.shape[1], dtype=np.float32)[None, :]
        return {"logits": np.stack([x + ramp, x - ramp])[None].astype(np.float32)}


def test_tta_averages_mirror_images_mirrored_back() -> None:
    x = np.random.default_rng(0).random((32, 48)).astype(np.float32)
    eng = _EchoEngine()
    one = Detector(eng, _card(), scale=1.0)._logits(x, 1)
    four = Detector(eng, _card(), scale=1.0, tta=4)._logits(x, 4)
    assert eng.calls == 5
    # the image part is equivariant and survives; the ramp averages out with its mirror
    np.testing.assert_allclose(four[0, 0], x, atol=1e-6)
    np.testing.assert_allclose(one[0, 0] - x, np.linspace(-1, 1, 48)[None, :].repeat(32, 0),
                               atol=1e-6)
    two = Detector(eng, _card(), scale=1.0, tta=2)._logits(x, 2)
    np.testing.assert_allclose(two[0, 1], x, atol=1e-6)
    with pytest.raises(ConfigError, match="tta"):
        Detector(eng, _card(), tta=3)


def test_the_45_degree_view_finds_wires_lying_along_an_image_axis(shipped: Detector) -> None:
    # the two 1.5-2.2 µm x 0.3-0.4 µm wires of seed 1 of the virtual specimen that lie along
    # the image rows, at the stage search's settings (20 nm/px preset scale 1.6, score cut 0.7,
    # deploy/search.toml): the plain view breaks one of them up (a straight particle along an
    # axis looks like a burnt-in scale bar), the view turned by 45° finds both whole
    from nanoscout.sim.virtual_specimen import VirtualSpecimen, VirtualSpecimenConfig

    det = Detector(shipped.engine, shipped.card, min_score=0.7, scale_presets=((20.0, 1.6),))
    spec = VirtualSpecimen(VirtualSpecimenConfig(seed=1))
    found: dict[bool, list[float]] = {False: [], True: []}
    for wire in [t for t in spec.targets if t["kind"] == "wire"]:
        frame = spec.render((float(wire["x_um"]), float(wire["y_um"])), 20.0, (512, 512), rng=3)
        inside = frame.labels == int(wire["id"])
        ys, xs = np.nonzero(inside)
        if np.ptp(xs) < 4 * np.ptp(ys):
            continue  # not along the rows
        for turn in (False, True):
            labels = det.detect(frame.image, rotate45=turn, pixel_size_nm=20.0).labels
            ids, counts = np.unique(labels[inside], return_counts=True)
            best = ids[ids > 0][np.argmax(counts[ids > 0])] if (ids > 0).any() else 0
            cols = np.nonzero(labels == best)[1] if best else np.zeros(1)
            found[turn].append(float(np.ptp(cols) + 1) / float(np.ptp(xs) + 1) if best else 0.0)
    assert len(found[True]) == 2
    assert min(found[False]) < 0.8  # broken up in the plain view
    assert min(found[True]) > 0.9  # whole when turned
    assert all(t >= p - 0.05 for t, p in zip(found[True], found[False], strict=True))


def test_min_score_overrides_the_cards_cut(shipped: Detector) -> None:
    frame = render(SpecimenConfig(shape=(256, 256), pixel_size_nm=0.5), 3).image
    low = Detector(shipped.engine, shipped.card, scale=1.0, min_score=0.0).detect(frame)
    card = Detector(shipped.engine, shipped.card, scale=1.0).detect(frame)
    assert low.n > card.n  # the card's cut drops some unconvincing particles
    # the cut is on the raw score; the shipped card reports calibrated probabilities
    raw_card = shipped.card.model_copy(update={"score_calibration": None})
    raw = Detector(shipped.engine, raw_card, scale=1.0).detect(frame)
    assert np.array_equal(raw.labels, card.labels)
    assert (raw.scores[1:] >= shipped.card.thresholds.min_score).all()  # type: ignore[union-attr]
    cal = shipped.card.score_calibration
    assert cal is not None
    assert np.allclose(card.scores[1:], np.interp(raw.scores[1:], cal.scores, cal.probabilities))
    with pytest.raises(ConfigError, match="min_score"):
        Detector(shipped.engine, shipped.card, min_score=1.5)


def test_scale_presets_fix_the_scale_of_known_pixel_sizes(shipped: Detector) -> None:
    det = Detector(shipped.engine, shipped.card, scale_presets=((80.0, 3.0), (20.0, 1.6)))
    frame = render(SpecimenConfig(shape=(128, 128), pixel_size_nm=0.5), 3).image
    assert det.detect(frame, pixel_size_nm=80.5).scale == 3.0  # within 2 %
    assert det.detect(frame, pixel_size_nm=20.0).scale == 1.6
    auto = det.detect(frame, pixel_size_nm=50.0).scale  # no preset: the estimate
    assert auto == shipped.detect(frame).scale
    with pytest.raises(ConfigError, match="scale preset"):
        Detector(shipped.engine, shipped.card, scale_presets=((20.0, 20.0),))


def test_score_does_not_mark_small_particles_down() -> None:
    """A 3-px-radius and a 20-px-radius disc the network is equally sure of score alike.

    The logits fall through 0 over a few px at every outline (as a real network's do); the
    score leaves that boundary ring out, so the small disc, mostly edge, is not marked down.
    """
    from scipy import ndimage as ndi

    lab = np.zeros((96, 96), np.int32)
    lab[_disc(lab.shape, 20, 20, 3)] = 1
    lab[_disc(lab.shape, 56, 56, 20)] = 2
    inside = ndi.distance_transform_edt(lab > 0)
    outside = ndi.distance_transform_edt(lab == 0)
    fg = np.clip(2.0 * (inside - outside), -6.0, 6.0).astype(np.float32)
    core = np.where(lab > 0, np.float32(4.0), np.float32(-4.0))
    labels, scores = instances_from_logits(fg, core, post_stride=1, min_area_px=4)
    assert labels.max() == 2
    small, big = scores[labels[20, 20]], scores[labels[56, 56]]
    assert small > 0.95 and big > 0.95 and abs(small - big) < 0.03
    # the whole-particle mean (the score before) put the small disc well below the big one
    p = 1.0 / (1.0 + np.exp(-fg))
    assert p[labels == labels[20, 20]].mean() < p[labels == labels[56, 56]].mean() - 0.05


def test_score_calibration_maps_reported_scores() -> None:
    from nanoscout.analysis.modelcard import ScoreCalibration

    lab = np.zeros((64, 64), np.int32)
    yy, xx = np.indices(lab.shape)
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1
    lab[(yy - 44) ** 2 + (xx - 44) ** 2 <= 64] = 2
    img = np.where(lab > 0, 200, 50).astype(np.uint8)
    raw = Detector(OracleEngine(lab), _card(), scale=1.0).detect(img)
    cal = ScoreCalibration(scores=(0.0, 0.5, 1.0), probabilities=(0.0, 0.1, 0.6))
    got = Detector(OracleEngine(lab), _card(score_calibration=cal), scale=1.0).detect(img)
    assert got.n == raw.n == 2
    assert np.array_equal(got.labels, raw.labels)
    assert np.allclose(got.scores[1:], np.interp(raw.scores[1:], cal.scores, cal.probabilities))
    with pytest.raises(ValueError, match="must increase"):
        ScoreCalibration(scores=(0.0, 0.0, 1.0), probabilities=(0.0, 0.1, 0.6))
    with pytest.raises(ValueError, match="must not decrease"):
        ScoreCalibration(scores=(0.0, 0.5, 1.0), probabilities=(0.0, 0.7, 0.6))


def test_raw_cut_inverts_the_calibration() -> None:
    from nanoscout.analysis.modelcard import ScoreCalibration

    cal = ScoreCalibration(scores=(0.0, 0.4, 0.6, 0.8, 1.0),
                           probabilities=(0.0, 0.2, 0.2, 0.9, 0.95))
    assert cal.raw_cut(0.1) == pytest.approx(0.2)  # halfway up the first segment
    assert cal.raw_cut(0.2) == pytest.approx(0.4)  # a flat step: its left knot
    assert cal.raw_cut(0.55) == pytest.approx(0.7)
    for p in (0.05, 0.2, 0.3, 0.55, 0.9, 0.93):
        assert cal.probability(cal.raw_cut(p)) == pytest.approx(p)
        assert cal.probability(cal.raw_cut(p) - 1e-6) < p
    # a calibration whose first knot is above 0: every raw score reaches its first probability
    high = ScoreCalibration(scores=(0.3, 0.9), probabilities=(0.4, 0.9))
    assert high.raw_cut(0.4) == 0.0 and high.probability(0.0) == pytest.approx(0.4)
    assert high.raw_cut(0.65) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"above the calibration's highest probability 0\.95"):
        cal.raw_cut(0.97)
    with pytest.raises(ValueError, match="within"):
        cal.raw_cut(1.0)


def _kept_by_confidence(shipped: Detector, frame: np.ndarray) -> None:
    """Cutting at min_confidence p keeps exactly the particles whose calibrated score >= p
    (of those found with no cut at all), whatever p."""
    everything = Detector(shipped.engine, shipped.card, scale=1.0, min_score=0.0).detect(frame)
    conf = everything.scores[1:]
    assert everything.calibrated and everything.n > 10
    for p in (0.3, 0.6, 0.9):
        found = Detector(shipped.engine, shipped.card, scale=1.0, min_confidence=p).detect(frame)
        assert (found.scores[1:] >= p - 1e-4).all()
        # the same particles, relabelled: float32 rounding may move one sitting on p
        near = int((np.abs(conf - p) < 1e-4).sum())
        assert abs(found.n - int((conf >= p).sum())) <= near, (p, found.n)
        kept = np.flatnonzero(conf >= p + 1e-4) + 1
        assert np.isin(kept, np.unique(everything.labels[found.labels > 0])).all()


def test_min_confidence_keeps_the_particles_that_probable(shipped: Detector) -> None:
    frame = render(SpecimenConfig(shape=(384, 384), pixel_size_nm=0.5), 3).image
    _kept_by_confidence(shipped, frame)


def test_min_confidence_on_a_real_frame(shipped: Detector, shared_data: Path) -> None:
    """A real SEM image of the NFFA set (many low-confidence detections on its texture)."""
    from nanoscout.clients.acquisition.readers import read_image

    images = sorted((shared_data / "nffa-particles" / "images").iterdir())
    if not images:
        pytest.skip("no NFFA images in the shared data")
    img = read_image(images[0]).data
    _kept_by_confidence(shipped, np.asarray(img)[:512, :512])


def test_min_confidence_needs_a_calibrated_card(shipped: Detector) -> None:
    with pytest.raises(ConfigError, match="two particle cuts"):
        Detector(shipped.engine, shipped.card, min_score=0.5, min_confidence=0.5)
    raw_card = shipped.card.model_copy(update={"score_calibration": None})
    with pytest.raises(ConfigError, match="has no score_calibration"):
        Detector(shipped.engine, raw_card, min_confidence=0.5)
    cal = shipped.card.score_calibration
    assert cal is not None
    det = Detector(shipped.engine, shipped.card, min_confidence=0.8)
    assert det.thresholds.min_score == pytest.approx(cal.raw_cut(0.8))
    assert cal.probability(det.thresholds.min_score) == pytest.approx(0.8)


# ------------------------------------------------------------------ edge context


class _PixelEngine(Engine):
    """A 'network' that calls every bright pixel a particle (its logits depend on the pixel
    alone, so any padding around the frame must leave the frame's own answer as it is)."""

    name = "pixel"
    inputs = (TensorSpec("image", (1, 1, None, None), "float32"),)
    outputs = (TensorSpec("logits", (1, 2, None, None), "float32"),)

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["image"]
        self.calls.append(x.shape)
        fg = (12.0 * (x[:, 0] - 0.5)).astype(np.float32)
        return {"logits": np.stack([fg, fg], axis=1)}


def _edge_frame() -> np.ndarray:
    """Bright discs on a dark 320² frame, two of them cut by its top and left edges."""
    x = np.zeros((320, 320), np.float32)
    for cy, cx in ((0, 100), (150, 0), (160, 160), (250, 90), (80, 250)):
        x[_disc(x.shape, cy, cx, 14)] = 1.0
    return x


def test_edge_context_pads_the_network_input_and_cuts_the_answer_back() -> None:
    """``input.edge_context_px`` 32: the network sees the frame with 32 px of its mirror image
    on every side, and the particles come out where they are (those cut by the edge too)."""
    x = _edge_frame()
    bare, ctx = _PixelEngine(), _PixelEngine()
    card = _card(input=InputSpec(name="image", stride_multiple=16, edge_context_px=32))
    plain = Detector(bare, _card(), scale=1.0).detect(x)
    found = Detector(ctx, card, scale=1.0).detect(x)
    assert bare.calls == [(1, 1, 320, 320)] and ctx.calls == [(1, 1, 384, 384)]
    assert found.n == plain.n == 5
    assert (found.labels > 0).sum() == (plain.labels > 0).sum()
    assert ((found.labels > 0) == (plain.labels > 0)).all()


def test_the_working_scale_is_estimated_without_edge_context() -> None:
    """The estimation passes see the frame bare, as a card without the context does; only the
    frame's own inference gets it (and a pass is then never reused as that inference)."""
    x = _edge_frame()
    bare, ctx = _PixelEngine(), _PixelEngine()
    auto = dict(working_scale=WorkingScale(diameter_px_min=4, diameter_px_max=80,
                                           mode="auto"))
    card = _card(input=InputSpec(name="image", stride_multiple=16, edge_context_px=32), **auto)
    plain = Detector(bare, _card(**auto), scale="auto").detect(x)
    found = Detector(ctx, card, scale="auto").detect(x)
    assert found.scale == plain.scale
    assert ctx.calls[:-1] == bare.calls[:len(ctx.calls) - 1]  # the same passes
    side = round(320 * found.scale)
    side += -side % 16
    assert ctx.calls[-1] == (1, 1, side + 64, side + 64)


def test_edge_context_must_be_a_multiple_of_the_stride() -> None:
    with pytest.raises(ValueError, match="multiple of stride_multiple 16"):
        InputSpec(name="image", stride_multiple=16, edge_context_px=20)


@pytest.mark.parametrize(("passes", "agreed"), [
    ({0.5: (20.0, 14), 1.0: (41.0, 20), 2.0: (80.0, 20)}, True),  # 40 px, then 41 px
    ({0.5: (20.0, 14), 1.0: (20.0, 14), 2.0: (20.0, 14)}, False),  # 40, 20, 10 px: texture
    ({0.5: (0.0, 0), 1.0: (0.0, 0), 2.0: (0.0, 0)}, None),  # nothing found at any pass
])
def test_the_detection_says_whether_two_passes_agreed_on_its_scale(
        shipped: Detector, monkeypatch: pytest.MonkeyPatch,
        passes: dict[float, tuple[float, int]], agreed: bool | None) -> None:
    """``Detection.scale_agreed`` (protocol 1.10): true where two neighbouring passes agreed,
    false where the fallback chose the scale, None where nothing was found or estimated; a
    stream's later frames that reuse the estimate say what it was."""
    card = _with_auto(shipped.card, **_CONSISTENT, coarse_side_px=256,
                      reliable_diameter_px=16.0)
    det = Detector(shipped.engine, card, scale="auto")

    def scripted(x: np.ndarray, s: float, centre: object = None
                 ) -> tuple[np.ndarray, bool, float, int]:
        d, n = passes[s]
        return np.zeros((1, 2, 8, 8), np.float32), False, d, n

    monkeypatch.setattr(det, "_window_pass", scripted)
    monkeypatch.setattr(det, "_densest", lambda *a: None)
    x = np.zeros((512, 512), np.float32)
    assert det.detect(x).scale_agreed is agreed
    assert [det.detect(x, key="cam").scale_agreed for _ in range(2)] == [agreed, agreed]
    assert det._memo.agreed("cam") is agreed
    assert Detector(shipped.engine, card, scale=0.5).detect(x).scale_agreed is None
