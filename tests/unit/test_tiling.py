"""Tiled inference and anti-aliased resampling.

Covers nanoscout.analysis.tiling and nanoscout.analysis.preprocess.resample.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from nanoscout.analysis.preprocess import resample
from nanoscout.analysis.tiling import infer_tiled, tile_starts


@pytest.mark.parametrize(("n", "tile", "margin"), [(100, 128, 16), (1000, 256, 32),
                                                    (4096, 2048, 96), (2064, 2048, 96)])
def test_tile_starts_cover_with_overlap(n: int, tile: int, margin: int) -> None:
    starts = tile_starts(n, tile, margin, 16)
    assert starts[0] == 0
    assert all(s % 16 == 0 for s in starts)
    if n <= tile:
        assert starts == [0]
        return
    assert starts[-1] + tile >= n - 15 and starts[-1] + tile <= n
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= 2 * margin, (a, b)  # each seam has context on both sides
        assert b > a


def test_tile_starts_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="multiple"):
        tile_starts(1000, 250, 16, 16)
    with pytest.raises(ValueError, match="margin"):
        tile_starts(1000, 256, 128, 16)


def test_infer_tiled_equals_whole_frame_for_a_local_operator() -> None:
    """A 33x33 filter needs 16 px of context: with a 24 px margin, stitching is exact."""
    rng = np.random.default_rng(3)
    x = rng.random((1008, 720)).astype(np.float32)
    calls: list[tuple[int, int]] = []

    def run(t: np.ndarray) -> np.ndarray:
        calls.append(t.shape)
        f = ndi.uniform_filter(t, 33, mode="reflect")
        return np.stack([f, -f])[None]

    whole = run(x)
    calls.clear()
    tiled = infer_tiled(run, x, 256, 24, 16)
    assert len(calls) > 4 and all(c[0] <= 256 and c[1] <= 256 for c in calls)
    np.testing.assert_array_equal(tiled, whole)
    # a margin too small for the operator's context shows at the seams: the test can fail
    bad = infer_tiled(run, x, 256, 2, 16)
    assert not np.array_equal(bad, whole)


def test_infer_tiled_single_call_when_it_fits() -> None:
    calls = []

    def run(t: np.ndarray) -> np.ndarray:
        calls.append(t.shape)
        return t[None, None]

    x = np.ones((512, 512), np.float32)
    assert infer_tiled(run, x, 512, 64, 16) is not None and calls == [(512, 512)]


def test_resample_area_averages_when_shrinking_and_keeps_geometry() -> None:
    ramp = np.tile(np.arange(1000, dtype=np.float32), (40, 1))
    out = resample(ramp, (4, 100))  # k = 10 blocks: means of 0..9, 10..19, ...
    np.testing.assert_allclose(out[0, :4], [4.5, 14.5, 24.5, 34.5])
    # an edge not divisible by k: the partial block is edge-padded, the extent kept exact
    odd = np.tile(np.arange(1003, dtype=np.float32), (8, 1))
    centre = resample(odd, (2, 250))[0]
    expect = (np.arange(250) + 0.5) * 1003 / 250 - 0.5
    assert np.abs(centre[5:-5] - expect[5:-5]).max() < 0.6
    # aliasing: a pixel-period checkerboard averages to grey instead of a moire pattern
    cb = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)
    small = resample(cb, (64, 64))
    assert np.abs(small - 0.5).max() < 1e-6
    assert resample(cb, (1024, 1024)).shape == (1024, 1024)
