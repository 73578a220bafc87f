"""Rolling / cumulative size statistics (nanoscout.analysis.stats)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pydantic
import pytest

from nanoscout.analysis.stats import SizeStatistics, StatsConfig
from nanoscout.wire.errors import FrameError
from nanoscout.wire.headers import MAX_SIDE_PX, PIXEL_SIZE_RANGE_NM
from nanoscout.wire.particles import empty_table

S = 1_000_000_000  # ns per s


def table(
    ecd: np.ndarray, *, ar: np.ndarray | None = None, border: np.ndarray | None = None
) -> np.ndarray:
    t = empty_table(len(ecd))
    t["ecd_nm"] = ecd
    t["aspect_ratio"] = 1.0 if ar is None else ar
    t["roundness"] = 1.0 / t["aspect_ratio"]
    if border is not None:
        t["border"] = border
    return t


def lognormal(n: int, seed: int, median: float = 20.0, sigma: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(math.log(median), sigma, n).astype(np.float32)


def test_window_exact_and_cumulative_within_bound() -> None:
    stats = SizeStatistics(StatsConfig(window_frames=5))
    frames = [lognormal(400, seed) for seed in range(30)]
    for k, ecd in enumerate(frames):
        stats.update(table(ecd), t_ns=k * S // 10, frame_area_um2=4.0)
    snap = stats.snapshot()

    win = np.concatenate(frames[-5:]).astype(np.float64)
    w = snap["window"]
    assert w["n_frames"] == 5 and w["count"] == win.size
    assert w["ecd"]["d50"] == np.median(win)
    assert w["ecd"]["d10"] == np.quantile(win, 0.1)
    assert w["ecd"]["d90"] == np.quantile(win, 0.9)
    assert w["ecd"]["mean"] == pytest.approx(win.mean(), rel=1e-12)
    assert w["ecd"]["sd"] == pytest.approx(win.std(ddof=1), rel=1e-12)

    allv = np.concatenate(frames).astype(np.float64)
    c = snap["cumulative"]
    assert c["n_frames"] == 30 and c["count"] == allv.size
    assert c["ecd"]["mean"] == pytest.approx(allv.mean(), rel=1e-12)
    assert c["ecd"]["sd"] == pytest.approx(allv.std(ddof=1), rel=1e-9)
    bound = c["ecd_quantile_rel_error"]
    assert 0 < bound < 0.003
    for q, name in ((0.1, "d10"), (0.5, "d50"), (0.9, "d90")):
        exact = np.quantile(allv, q)
        assert abs(c["ecd"][name] / exact - 1) <= bound + 1e-12
    assert c["ecd"]["d50"] == pytest.approx(np.median(allv), rel=0.01)
    assert c["ecd"]["min"] == allv.min() and c["ecd"]["max"] == allv.max()
    ar_all = np.ones_like(allv)
    assert c["aspect_ratio"]["d50"] == pytest.approx(np.median(ar_all), abs=0.005)


def test_snapshot_is_plain_and_msgpack_roundtrips() -> None:
    stats = SizeStatistics(StatsConfig())
    stats.update(table(lognormal(50, 1)), t_ns=0, frame_area_um2=1.0)
    snap = stats.snapshot()
    assert msgpack.unpackb(msgpack.packb(snap)) == snap
    h = snap["cumulative"]["histograms"]["ecd"]
    assert len(h["edges"]) == 41 and len(h["counts"]) == 40
    assert h["edges"][0] == pytest.approx(0.5) and h["edges"][-1] == pytest.approx(1000.0)
    assert sum(h["counts"]) + h["under"] + h["over"] == 50
    assert snap["window"]["histograms"]["ecd"] == h
    ar = snap["window"]["histograms"]["aspect_ratio"]
    assert ar["edges"][0] == 1.0 and ar["edges"][-1] == 5.0
    rnd = snap["window"]["histograms"]["roundness"]
    assert rnd["edges"][0] == 0.0 and rnd["edges"][-1] == 1.0 and sum(rnd["counts"]) == 50


def test_window_rolls_off_old_frames_by_count_and_age() -> None:
    stats = SizeStatistics(StatsConfig(window_frames=3, window_seconds=2.5))
    for k in range(5):
        stats.update(table(np.full(10, float(k + 1))), t_ns=k * S, frame_area_um2=None)
    w = stats.snapshot()["window"]
    assert w["n_frames"] == 3 and w["ecd"]["d50"] == 4.0  # frames 3, 4, 5
    stats.update(table(np.full(10, 100.0)), t_ns=8 * S, frame_area_um2=None)
    w = stats.snapshot()["window"]
    assert w["n_frames"] == 1 and w["ecd"]["mean"] == 100.0  # the others are > 2.5 s old
    assert stats.snapshot()["cumulative"]["n_frames"] == 6


def test_border_particles_excluded_unless_configured() -> None:
    ecd = np.array([10.0, 20.0, 30.0, 400.0], np.float32)
    border = np.array([False, False, False, True])
    for include, expected in ((False, 3), (True, 4)):
        stats = SizeStatistics(StatsConfig(include_border=include))
        stats.update(table(ecd, border=border), t_ns=0, frame_area_um2=2.0)
        snap = stats.snapshot()
        assert snap["window"]["count"] == expected
        assert snap["cumulative"]["count"] == expected
        # density counts a border particle as one half either way
        assert snap["window"]["number_density_per_um2"] == pytest.approx(3.5 / 2.0)


def test_number_density_and_units() -> None:
    stats = SizeStatistics(StatsConfig())
    stats.update(table(np.full(8, 5.0)), t_ns=0, frame_area_um2=4.0)
    stats.update(table(np.full(2, 5.0)), t_ns=S, frame_area_um2=1.0)
    snap = stats.snapshot()
    assert snap["units"] == "nm"
    assert snap["window"]["number_density_per_um2"] == pytest.approx(10 / 5.0)
    assert snap["cumulative"]["number_density_per_um2"] == pytest.approx(10 / 5.0)

    px = SizeStatistics(StatsConfig())
    px.update(table(np.full(8, 5.0)), t_ns=0, frame_area_um2=None)
    snap = px.snapshot()
    assert snap["units"] == "px"
    assert snap["window"]["number_density_per_um2"] is None
    assert snap["cumulative"]["number_density_per_um2"] is None


def test_switching_units_restarts() -> None:
    stats = SizeStatistics(StatsConfig())
    stats.update(table(np.full(8, 5.0)), t_ns=0, frame_area_um2=4.0)
    stats.update(table(np.full(3, 7.0)), t_ns=S, frame_area_um2=None)
    snap = stats.snapshot()
    assert snap["units"] == "px"
    assert snap["cumulative"]["count"] == 3 and snap["cumulative"]["n_frames"] == 1


def test_empty_frames() -> None:
    stats = SizeStatistics(StatsConfig(reference_frames=2))
    snap = stats.snapshot()
    assert snap["window"]["count"] == 0 and snap["window"]["ecd"]["d50"] is None
    assert snap["drift"]["change_pct"] is None
    for k in range(3):
        stats.update(empty_table(), t_ns=k, frame_area_um2=1.0)
    snap = stats.snapshot()
    for block in ("window", "cumulative"):
        b = snap[block]
        assert b["n_frames"] == 3 and b["count"] == 0
        assert b["ecd"]["mean"] is None and b["ecd"]["sd"] is None and b["ecd"]["d50"] is None
        assert b["aspect_ratio"]["d50"] is None
        assert b["number_density_per_um2"] == 0.0
    assert snap["drift"]["reference_complete"] is True
    assert snap["drift"]["reference_d50"] is None and snap["drift"]["change_pct"] is None
    one = SizeStatistics(StatsConfig())
    one.update(table(np.array([3.0], np.float32)), t_ns=0, frame_area_um2=1.0)
    b = one.snapshot()["cumulative"]
    assert b["ecd"]["mean"] == 3.0 and b["ecd"]["sd"] is None and b["ecd"]["d50"] == 3.0


def test_drift_change_pct() -> None:
    stats = SizeStatistics(StatsConfig(reference_frames=4, window_frames=2))
    for k in range(4):
        stats.update(table(np.array([9.0, 10.0, 11.0], np.float32)), t_ns=k, frame_area_um2=1.0)
        drift = stats.snapshot()["drift"]
        assert drift["reference_complete"] is (k == 3)
        assert drift["reference_d50"] == 10.0
        assert drift["change_pct"] == pytest.approx(0.0)
    for k in range(4, 6):  # sintering: the particles grow by 25 %
        stats.update(table(np.array([12.0, 12.5, 13.0], np.float32)), t_ns=k, frame_area_um2=1.0)
    drift = stats.snapshot()["drift"]
    assert drift["reference_d50"] == 10.0 and drift["window_d50"] == 12.5
    assert drift["change_pct"] == pytest.approx(25.0)
    stats.reset()
    assert stats.snapshot()["drift"]["reference_frames"] == 0


def test_out_of_range_values_are_counted_and_clamped() -> None:
    stats = SizeStatistics(StatsConfig(ecd_range_nm=(1.0, 100.0)))
    stats.update(
        table(np.array([0.2, 0.3, 50.0, 500.0, 800.0], np.float32)), t_ns=0, frame_area_um2=1.0
    )
    c = stats.snapshot()["cumulative"]
    assert c["histograms"]["ecd"]["under"] == 2 and c["histograms"]["ecd"]["over"] == 2
    assert c["ecd"]["d50"] == pytest.approx(50.0, rel=c["ecd_quantile_rel_error"])
    assert c["ecd"]["d10"] >= c["ecd"]["min"] == pytest.approx(0.2)


def test_bad_inputs() -> None:
    with pytest.raises(pydantic.ValidationError, match="ecd_range_nm"):
        StatsConfig(ecd_range_nm=(10.0, 1.0))
    with pytest.raises(pydantic.ValidationError):
        StatsConfig(window_frames=0)
    stats = SizeStatistics(StatsConfig())
    with pytest.raises(FrameError, match="ecd_nm"):
        stats.update(np.zeros(3, dtype=[("x", "f4")]), t_ns=0, frame_area_um2=1.0)
    with pytest.raises(FrameError, match="-1.0"):
        stats.update(empty_table(), t_ns=0, frame_area_um2=-1.0)


# ------------------------------------------------------------------ confidence weights


def scored(ecd: np.ndarray, score: np.ndarray) -> np.ndarray:
    t = table(ecd)
    t["score"] = score
    return t


def test_confidence_weights_count_each_particle_by_its_probability() -> None:
    rng = np.random.default_rng(4)
    ecd = [lognormal(300, seed) for seed in range(3)]
    conf = [rng.uniform(0.05, 1.0, 300).astype(np.float32) for _ in range(3)]
    stats = SizeStatistics(StatsConfig(weights="confidence"))
    for k in range(3):
        stats.update(scored(ecd[k], conf[k]), t_ns=k, frame_area_um2=2.0, confidence=True)
    snap = stats.snapshot()
    x = np.concatenate(ecd).astype(np.float64)
    w = np.concatenate(conf).astype(np.float64)
    assert snap["weights"] == "confidence"
    for block in ("window", "cumulative"):
        b = snap[block]
        assert b["count"] == x.size  # detections; expected_count: their probabilities
        assert b["expected_count"] == pytest.approx(w.sum(), rel=1e-9)
        mean = (w * x).sum() / w.sum()
        assert b["ecd"]["mean"] == pytest.approx(mean, rel=1e-9)
        assert b["ecd"]["sd"] == pytest.approx(  # reliability weights
            math.sqrt((w * (x - mean) ** 2).sum() / (w.sum() - (w * w).sum() / w.sum())),
            rel=1e-9)
        assert b["number_density_per_um2"] == pytest.approx(w.sum() / 6.0, rel=1e-9)
        h = b["histograms"]["ecd"]
        assert sum(h["counts"]) + h["under"] + h["over"] == x.size
        assert sum(h["weighted_counts"]) == pytest.approx(w.sum(), rel=1e-4)
    # the weighted D50: where the cumulative weight reaches half the total
    order = np.argsort(x)
    half = x[order][np.searchsorted(np.cumsum(w[order]), 0.5 * w.sum())]
    for block in ("window", "cumulative"):
        assert snap[block]["ecd"]["d50"] == pytest.approx(half, rel=0.01)
    assert snap["drift"]["reference_d50"] == pytest.approx(half, rel=0.01)


def test_confidence_weights_tilt_the_d50_towards_probable_particles() -> None:
    """Small particles the detector doubts, large ones it is sure of: the weighted D50 is
    the large ones', the number-weighted one lies between."""
    small, large = np.full(60, 5.0, np.float32), np.full(40, 20.0, np.float32)
    t = scored(np.concatenate([small, large]),
               np.concatenate([np.full(60, 0.1), np.full(40, 0.95)]).astype(np.float32))
    st = SizeStatistics(StatsConfig(weights="confidence"))
    st.update(t, t_ns=0, frame_area_um2=None, confidence=True)
    assert st.snapshot()["window"]["ecd"]["d50"] == pytest.approx(20.0)
    plain = SizeStatistics(StatsConfig())
    plain.update(t, t_ns=0, frame_area_um2=None, confidence=True)
    assert plain.snapshot()["window"]["ecd"]["d50"] == pytest.approx(5.0)


@pytest.mark.parametrize("p", [1.0, 0.5, 0.34, 0.3, 0.05])
def test_weighted_sd_does_not_depend_on_the_confidence_scale(p: float) -> None:
    """Three particles of 9, 10 and 11 nm, all at the same confidence p: the spread is 1 nm
    whatever p. The frequency-weight sd (sum w - 1 in the denominator) gave 1.41 nm at 0.5,
    5.8 nm at 0.34 and none at 0.3 (the weights summing to <= 1)."""
    stats = SizeStatistics(StatsConfig(weights="confidence"))
    ecd = np.array([9.0, 10.0, 11.0], np.float32)
    stats.update(scored(ecd, np.full(3, p, np.float32)), t_ns=0, frame_area_um2=1.0,
                 confidence=True)
    snap = stats.snapshot()
    for block in ("window", "cumulative"):
        assert snap[block]["ecd"]["mean"] == pytest.approx(10.0, rel=1e-6)
        assert snap[block]["ecd"]["sd"] == pytest.approx(1.0, rel=1e-6)
    # one particle with weight, however many without: no spread to report
    lone = SizeStatistics(StatsConfig(weights="confidence"))
    lone.update(scored(ecd, np.array([p, 0.0, 0.0], np.float32)), t_ns=0, frame_area_um2=1.0,
                confidence=True)
    for block in ("window", "cumulative"):
        assert lone.snapshot()[block]["ecd"]["sd"] is None


def test_raw_scores_and_unit_confidences_weigh_like_no_weights() -> None:
    ecd = lognormal(500, 1)
    unweighted = SizeStatistics(StatsConfig())
    unweighted.update(scored(ecd, np.full(ecd.size, 0.3, np.float32)), t_ns=0,
                      frame_area_um2=1.0)
    ref = unweighted.snapshot()
    assert ref["weights"] == "none" and ref["window"]["expected_count"] == 500.0
    raw = SizeStatistics(StatsConfig(weights="confidence"))  # an uncalibrated detector
    raw.update(scored(ecd, np.full(ecd.size, 0.3, np.float32)), t_ns=0, frame_area_um2=1.0,
               confidence=False)
    assert raw.snapshot() == ref
    sure = SizeStatistics(StatsConfig(weights="confidence"))
    sure.update(scored(ecd, np.ones(ecd.size, np.float32)), t_ns=0, frame_area_um2=1.0,
                confidence=True)
    got = sure.snapshot()
    assert got["weights"] == "confidence"
    for k in ("d10", "d50", "d90", "mean", "sd"):  # numpy's definitions when every weight is 1
        assert got["window"]["ecd"][k] == pytest.approx(ref["window"]["ecd"][k], rel=1e-9)
    with pytest.raises(pydantic.ValidationError):
        StatsConfig(weights="score")  # type: ignore[arg-type]


def test_cumulative_quantiles_of_micrometre_particles_hold_their_bound() -> None:
    """SEM particles of 1.5 µm lie beyond the published histogram's 1000 nm: the cumulative
    D10 / D50 / D90 all read as the largest particle (3763 nm against 1027 / 1478 / 2214)
    while the snapshot claimed a 0.19 % bound."""
    ecd = lognormal(400, 3, median=1500.0)
    stats = SizeStatistics(StatsConfig())
    stats.update(table(ecd), t_ns=0, frame_area_um2=1e4)
    c = stats.snapshot()["cumulative"]
    bound = c["ecd_quantile_rel_error"]
    assert 0 < bound < 0.002
    for q, name in ((0.1, "d10"), (0.5, "d50"), (0.9, "d90")):
        assert abs(c["ecd"][name] / np.quantile(ecd.astype(np.float64), q) - 1) <= bound + 1e-12
    # the published histogram keeps its range: the ones above 1000 nm are counted over it
    assert c["histograms"]["ecd"]["over"] == int((table(ecd)["ecd_nm"] > 1000.0).sum()) > 300
    # a size beyond the quantiles' own range: no bound is claimed any more
    narrow = SizeStatistics(StatsConfig(quantile_range_nm=(0.5, 1000.0)))
    narrow.update(table(ecd), t_ns=0, frame_area_um2=1e4)
    assert narrow.snapshot()["cumulative"]["ecd_quantile_rel_error"] is None
    with pytest.raises(pydantic.ValidationError, match="quantile_range_nm must satisfy"):
        StatsConfig(quantile_range_nm=(10.0, 1.0))


def test_a_clock_set_back_restarts_the_time_window() -> None:
    """A restarted source's clock starts again at 0: its old frames stayed in a 5 s window
    beside the new ones (10 frames, D50 still the old frames')."""
    S = 10**9
    stats = SizeStatistics(StatsConfig(window_seconds=5.0))
    for k in range(10):
        stats.update(table(np.full(20, 80.0)), t_ns=(100 + k) * S, frame_area_um2=1.0)
    for k in range(3):
        stats.update(table(np.full(20, 20.0)), t_ns=k * S, frame_area_um2=1.0)
    w = stats.snapshot()["window"]
    assert w["n_frames"] == 3 and w["ecd"]["d50"] == 20.0
    # a frame late by less than the window is no reset
    stats.update(table(np.full(20, 20.0)), t_ns=int(0.5 * S), frame_area_um2=1.0)
    assert stats.snapshot()["window"]["n_frames"] == 4


@pytest.mark.parametrize("pixel_size_nm", [PIXEL_SIZE_RANGE_NM[0], PIXEL_SIZE_RANGE_NM[1]])
def test_cumulative_quantiles_hold_their_bound_at_every_accepted_pixel_size(
        pixel_size_nm: float) -> None:
    """A frame at the smallest (1e-4 nm) or largest (1e6 nm) pixel size the protocol accepts:
    with the old default range (0.01 nm - 1 cm) the cumulative D10 = D50 = D90 read as the
    smallest particle at 1e-4 nm/px (0.00064 nm against 0.00091 / 0.0015 / 0.0024) and D50 =
    D90 as the largest at 1e6 nm/px (+93 % on the D50), with no bound claimed."""
    from nanoscout.analysis.measure import measure
    from nanoscout.sim.synthetic import SpecimenConfig, render

    truth = render(SpecimenConfig(shape=(512, 512), dose_e_per_px=None), 3)
    parts = measure(truth.labels, pixel_size_nm)
    ecd = parts["ecd_nm"][~parts["border"]].astype(np.float64)
    assert ecd.size > 100
    stats = SizeStatistics(StatsConfig())
    for k in range(3):
        stats.update(parts, t_ns=k * S, frame_area_um2=512 * 512 * (pixel_size_nm / 1e3) ** 2)
    c = stats.snapshot()["cumulative"]
    bound = c["ecd_quantile_rel_error"]
    assert bound is not None and 0 < bound < 0.002
    allv = np.concatenate([ecd] * 3)
    for q, name in ((0.1, "d10"), (0.5, "d50"), (0.9, "d90")):
        assert abs(c["ecd"][name] / np.quantile(allv, q) - 1) <= bound + 1e-12, name


def test_the_default_quantile_range_holds_every_ecd_a_frame_can_give() -> None:
    """From one pixel (ECD 2/sqrt(π) px) at the smallest pixel size to a particle filling the
    largest frame at the largest one; uncalibrated frames' ECDs in px lie between."""
    lo, hi = StatsConfig().quantile_range_nm
    one_px, whole_frame_px = 2.0 / math.sqrt(math.pi), 2.0 * MAX_SIDE_PX / math.sqrt(math.pi)
    assert lo <= one_px * PIXEL_SIZE_RANGE_NM[0]
    assert whole_frame_px * PIXEL_SIZE_RANGE_NM[1] <= hi
    assert lo <= one_px and whole_frame_px <= hi
