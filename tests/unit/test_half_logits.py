"""Half-resolution logits brought to the frame grid on the host (nanoscout.analysis.half_logits,
instances_from_half_logits, tiled inference of a stride-2 model): the same foreground, centre
samples and instances as up-sampling the maps first."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from nanoscout.analysis.half_logits import centre_samples, threshold_2x
from nanoscout.analysis.instances import instances_from_half_logits, instances_from_logits
from nanoscout.analysis.preprocess import resize_bilinear
from nanoscout.analysis.tiling import infer_tiled


def _up(m: np.ndarray) -> np.ndarray:
    return resize_bilinear(m, (2 * m.shape[0], 2 * m.shape[1]))


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (3, 7), (40, 33), (300, 700)])
@pytest.mark.parametrize("threshold", [0.0, 0.4, -1.2])
def test_threshold_and_centres_equal_the_upsampled_map(shape: tuple[int, int],
                                                       threshold: float) -> None:
    m = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    fg, centres = threshold_2x(m, threshold)
    up = _up(m)
    assert fg.shape == up.shape and fg.dtype == bool
    # float rounding may differ only within a hair of the threshold
    differ = fg != (up > threshold)
    assert not (differ & (np.abs(up - threshold) > 1e-5)).any()
    np.testing.assert_allclose(centres, up[1::2, 1::2], atol=1e-6)
    np.testing.assert_allclose(centre_samples(m), up[1::2, 1::2], atol=1e-6)


def test_threshold_bands_join_without_seams() -> None:
    """A map taller than one band (a 4k frame's) is cut into row bands: none shows."""
    m = np.random.default_rng(7).normal(size=(600, 1100)).astype(np.float32)
    fg, _ = threshold_2x(m, 0.1)
    up = _up(m)
    assert not ((fg != (up > 0.1)) & (np.abs(up - 0.1) > 1e-5)).any()


def test_threshold_rejects_a_map_that_is_not_2d() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        threshold_2x(np.zeros((2, 3, 4), np.float32), 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        centre_samples(np.zeros((0, 4), np.float32))


def _blobs(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth half-resolution logits of touching blobs: foreground and core."""
    rng = np.random.default_rng(seed)
    pts = np.zeros(shape, np.float32)
    pts[rng.integers(0, shape[0], 60), rng.integers(0, shape[1], 60)] = 1.0
    d = ndi.distance_transform_edt(pts == 0)
    r = rng.uniform(3, 7)
    return (r - d).astype(np.float32), (0.5 * r - d).astype(np.float32)


@pytest.mark.parametrize("frame", [(256, 320), (250, 318)])
def test_instances_from_half_logits_equal_those_of_the_upsampled_maps(
        frame: tuple[int, int]) -> None:
    fg, core = _blobs((128, 160), 3)
    rules = dict(foreground=0.5, core=0.5, min_area_px=4, min_core_px=1, merge_contact=1.6,
                 min_score=0.6)
    lab_h, sc_h = instances_from_half_logits(fg, core, frame, **rules)  # type: ignore[arg-type]
    h, w = frame
    lab_f, sc_f = instances_from_logits(_up(fg)[:h, :w], _up(core)[:h, :w], post_stride=2,
                                        **rules)  # type: ignore[arg-type]
    assert lab_h.shape == frame and lab_h.max() > 20
    np.testing.assert_array_equal(lab_h, lab_f)
    np.testing.assert_allclose(sc_h, sc_f, atol=1e-6)


def test_instances_from_half_logits_reject_odd_or_oversized_frames() -> None:
    fg, core = _blobs((16, 16), 1)
    for frame in [(31, 32), (32, 33), (34, 32)]:
        with pytest.raises(ValueError, match="even and within"):
            instances_from_half_logits(fg, core, frame)
    with pytest.raises(ValueError, match="one shape"):
        instances_from_half_logits(fg, core[:8], (32, 32))


def test_tiled_inference_of_a_stride_2_model_equals_the_whole_frame() -> None:
    """A model that outputs half-resolution logits: tiles are stitched on its grid."""
    x = np.random.default_rng(5).random((1008, 720)).astype(np.float32)

    def run(t: np.ndarray) -> np.ndarray:
        f = np.stack([ndi.uniform_filter(one, 33, mode="reflect")[::2, ::2] for one in t])
        return np.stack([f, -f], axis=1)

    whole = run(x[None])
    assert whole.shape == (1, 2, 504, 360)
    np.testing.assert_array_equal(infer_tiled(run, x, 256, 24, 16), whole)
    np.testing.assert_array_equal(infer_tiled(run, x, 256, 24, 16, batch=3), whole)


def test_tiled_inference_rejects_logits_on_neither_grid() -> None:
    x = np.zeros((512, 512), np.float32)
    with pytest.raises(ValueError, match="neither"):
        infer_tiled(lambda t: np.zeros((t.shape[0], 2, 100, 100), np.float32), x, 256, 24, 16)
