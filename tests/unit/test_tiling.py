"""Tiled inference and anti-aliased resampling.

Covers nanoscout.analysis.tiling and nanoscout.analysis.preprocess.resample.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from nanoscout.analysis.preprocess import resample
from nanoscout.analysis.tiling import infer_tiled, tile_length, tile_starts


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
    calls: list[tuple[int, ...]] = []

    def run(t: np.ndarray) -> np.ndarray:
        calls.append(t.shape)
        f = np.stack([ndi.uniform_filter(one, 33, mode="reflect") for one in t])
        return np.stack([f, -f], axis=1)

    whole = run(x[None])
    calls.clear()
    tiled = infer_tiled(run, x, 256, 24, 16)
    assert len(calls) > 4 and all(c[0] == 1 and c[1] <= 256 and c[2] <= 256 for c in calls)
    np.testing.assert_array_equal(tiled, whole)
    # batched: the same logits from fewer calls of up to 4 equal tiles
    calls.clear()
    np.testing.assert_array_equal(infer_tiled(run, x, 256, 24, 16, batch=4), whole)
    assert max(c[0] for c in calls) == 4 and len({c[1:] for c in calls}) == 1
    # a margin too small for the operator's context shows at the seams: the test can fail
    bad = infer_tiled(run, x, 256, 2, 16)
    assert not np.array_equal(bad, whole)
    with pytest.raises(ValueError, match="batch"):
        infer_tiled(run, x, 256, 24, 16, batch=0)


@pytest.mark.parametrize(("n", "tile", "margin", "count", "length"),
                         [(4096, 2304, 96, 2, 2144), (4096, 2048, 96, 3, 1504),
                          (2048, 2304, 96, 1, 2048), (8192, 2304, 96, 4, 2208)])
def test_tiles_are_few_and_no_larger_than_needed(n: int, tile: int, margin: int, count: int,
                                                 length: int) -> None:
    """A 4096 px side takes two 2144 px tiles (2 x 2: 9.6 % more pixels than the frame), not
    three fixed 2048 px ones per axis (2.25x)."""
    t = tile_length(n, tile, margin, 16)
    starts = tile_starts(n, t, margin, 16)
    assert (t, len(starts)) == (length, count)
    assert len(starts) == len(tile_starts(n, tile, margin, 16))  # no more tiles than at full size
    assert t <= tile and t % 16 == 0 and starts[-1] + t == n
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + t - b >= 2 * margin


def test_infer_tiled_single_call_when_it_fits() -> None:
    calls = []

    def run(t: np.ndarray) -> np.ndarray:
        calls.append(t.shape)
        return t[:, None]

    x = np.ones((512, 512), np.float32)
    assert infer_tiled(run, x, 512, 64, 16).shape == (1, 1, 512, 512)
    assert calls == [(1, 512, 512)]


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
