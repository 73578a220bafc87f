"""Alert rules under an audit's edge cases: a particle drifting across the field, non-finite
confidences, a cooldown too long for the clock, contradictory rule configurations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.analysis.alerts import Alert, AlertEngine, parse_rules
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.headers import AlertHeader, Stage
from nanoscout.wire.particles import SHAPE_CLASSES, empty_table

S = 1_000_000_000  # ns per s


def _one(x: float, *, track: int = 0, score: float = 0.9, ecd: float = 10.0) -> np.ndarray:
    """One round particle at (x, 100) px."""
    t = empty_table(1)
    t["id"], t["x"], t["y"], t["ecd_nm"], t["aspect_ratio"] = 1, x, 100.0, ecd, 1.0
    t["score"], t["track_id"] = score, track
    t["shape_class"] = SHAPE_CLASSES.index("sphere")
    t["bbox"] = (int(x) - 5, 95, int(x) + 6, 106)
    return t


def _run(engine: AlertEngine, table: np.ndarray, t_ns: int, calibrated: bool = False
         ) -> list[Alert]:
    return engine.evaluate(source="cam", t_ns=t_ns, stage=Stage(x_um=0.0, y_um=0.0),
                           table=table, stats=None, units="nm", pixel_size_nm=1.0,
                           calibrated=calibrated)


def test_a_tracked_particle_drifting_across_the_field_is_reported_once_per_cooldown() -> None:
    """The same track, 30 px further on each frame (farther than its ECD), is one particle:
    reported once within the cooldown. Without a track (tracking off) the position decides."""
    engine = AlertEngine(parse_rules([{"name": "p", "kind": "particle", "where": {},
                                       "cooldown_s": 60}]))
    fired = [len(_run(engine, _one(100.0 + 30 * i, track=7), i * S)) for i in range(5)]
    assert fired == [1, 0, 0, 0, 0]
    assert engine.suppressed["p"] == 4
    # another track at a new place is a new particle
    assert len(_run(engine, _one(400.0, track=8), 5 * S)) == 1
    # untracked particles: de-duplicated by position alone, as documented
    untracked = AlertEngine(parse_rules([{"name": "p", "kind": "particle", "where": {},
                                          "cooldown_s": 60}]))
    assert [len(_run(untracked, _one(100.0 + 30 * i), i * S)) for i in range(3)] == [1, 1, 1]


def test_a_rare_particle_in_a_drifting_live_view_raises_one_alert() -> None:
    """The shipped detector and the tracker on a simulated field that drifts 4 px per frame
    (a particle's ECD every ~7 frames): every alert names a particle not reported before."""
    pytest.importorskip("onnxruntime")
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.frame import Frame
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.analysis.pipeline import Pipeline
    from nanoscout.analysis.tracking import TrackingConfig
    from nanoscout.engines import create_engine
    from nanoscout.sim.insitu import InSituSeries
    from nanoscout.sim.synthetic import SpecimenConfig

    onnx = Path(__file__).resolve().parents[2] / "models" / "weights" / "detector.onnx"
    if not onnx.is_file():
        pytest.skip(f"no shipped detector at {onnx}")
    card = ModelCard.load(onnx.with_suffix(".json"))
    engine = create_engine(onnx, "onnxruntime-cpu", threads=2)
    n = 20
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=0.5, drift_px_per_frame=(0.0, 4.0))
    series = InSituSeries(cfg, 7, growth="none", coalesce=False, diffusion_nm_per_frame=0.0,
                          n_frames=n, frame_interval_s=0.1)
    rules = [{"name": "big", "kind": "particle", "where": {"ecd_nm": {"gt": 12.5}},
              "cooldown_s": 60}]
    pipe = Pipeline(Detector(engine, card, scale=1.0), rules=rules, tracking=TrackingConfig())
    reported: set[int] = set()
    alerts = 0
    for i, fr in zip(range(n), series, strict=False):
        frame = Frame.from_image(fr.image, pixel_size_nm=0.5, source="cam", seq=i,
                                 t_acq_ns=int(fr.t_s * 1e9) + 1,
                                 stage=Stage(x_um=0.0, y_um=0.0))
        for m in pipe.process(frame).messages:
            if isinstance(m.header, AlertHeader):
                tracks = {int(t) for t in m.array["track_id"]}  # type: ignore[index]
                assert tracks - reported, f"frame {i}: tracks {tracks} reported before"
                reported |= tracks
                alerts += 1
    assert alerts >= 1 and pipe.suppressed_alerts["big"] >= n - alerts - 1


def test_a_non_finite_confidence_raises_no_count_drop_alert() -> None:
    """One particle of ten with a NaN confidence: its frame fired a count-drop rule (value
    NaN) and the NaN in the median fired it on the window's frames after it. Confidences are
    read as the statistics weigh them (NaN 0, clipped to 0..1): 9 of 9.9 is no 20 % drop."""
    engine = AlertEngine(parse_rules([{"name": "drop", "kind": "count_drop", "pct": 20,
                                       "window_frames": 3, "count": "expected",
                                       "cooldown_s": 0}]))

    def ten(nan: bool = False, score: float = 0.99) -> np.ndarray:
        t = np.concatenate([_one(20.0 + 40 * k, score=score) for k in range(10)])
        if nan:
            t["score"][4] = np.nan
        return t

    fired = [len(_run(engine, ten(nan=i == 3), i * S, calibrated=True)) for i in range(8)]
    assert fired == [0, 0, 0, 0, 0, 0, 0, 0]
    # a real drop still fires
    (alert,) = _run(engine, ten(score=0.5), 9 * S, calibrated=True)
    assert alert.value == pytest.approx(100 * (0.5 / 0.99 - 1), rel=1e-5)


@pytest.mark.parametrize("score", [float("inf"), float("nan")])
def test_an_alert_confidence_is_a_probability_whatever_the_score(score: float) -> None:
    """A calibrated table with a non-finite score still gives alerts that travel: their
    confidence is within 0..1 (an out-of-range one failed the frame's whole summary)."""
    engine = AlertEngine(parse_rules([
        {"name": "p", "kind": "particle", "where": {}, "cooldown_s": 0},
        {"name": "c", "kind": "count", "above": 0, "count": "expected", "cooldown_s": 0}]))
    fired = _run(engine, _one(100.0, score=score), 0, calibrated=True)
    assert [a.rule for a in fired] == (["p", "c"] if score > 0 else ["p"])
    for a in fired:
        assert a.confidence is not None and 0.0 <= a.confidence <= 1.0
        AlertHeader(source="cam", seq=0, t_acq_ns=0, topic_seq=0, rule=a.rule, kind=a.kind,
                    severity="warning", value=a.value, threshold=a.threshold,
                    explanation=a.explanation, confidence=a.confidence)


def test_a_cooldown_longer_than_the_clock_means_never_again() -> None:
    """cooldown_s = 1e300 (valid TOML, "once") raised OverflowError on every frame."""
    engine = AlertEngine(parse_rules([
        {"name": "p", "kind": "particle", "where": {}, "cooldown_s": 1e300},
        {"name": "c", "kind": "count", "above": 0, "cooldown_s": 1e300}]))
    assert [a.rule for a in _run(engine, _one(100.0), 0)] == ["p", "c"]
    assert _run(engine, _one(100.0), 10**18) == []
    assert engine.suppressed == {"p": 1, "c": 1}


@pytest.mark.parametrize(("rule", "needle"), [
    ({"kind": "particle", "where": {"ecd_nm": {"gt": 50, "lt": 10}}}, "ecd_nm"),
    ({"kind": "particle", "where": {"ecd_nm": {"ge": 50, "lt": 50}}}, "ecd_nm"),
    ({"kind": "particle", "where": {"aspect_ratio": {"eq": 2, "gt": 3}}}, "aspect_ratio"),
    ({"kind": "count", "above": 10, "below": 100}, "below (100.0) > above (10.0)"),
    ({"kind": "growth_rate", "above": 0.5, "below": 1.0}, "below (1.0) > above (0.5)"),
])
def test_a_contradictory_rule_is_a_config_error(rule: dict[str, Any], needle: str) -> None:
    """A rule that could never fire (an empty range) or would fire on every frame (below >
    above) is refused, naming the rule and the values."""
    with pytest.raises(ConfigError, match="'r'") as exc:
        parse_rules([{"name": "r", **rule}])
    assert needle in str(exc.value)


@pytest.mark.parametrize("rule", [
    {"kind": "particle", "where": {"ecd_nm": {"gt": 10, "lt": 50}}},
    {"kind": "particle", "where": {"ecd_nm": {"ge": 50, "le": 50}}},
    {"kind": "particle", "where": {"ecd_nm": {"eq": 20, "ge": 20, "lt": 30}}},
    {"kind": "count", "above": 100, "below": 10},
    {"kind": "count", "above": 10, "below": 10},
    {"kind": "growth_rate", "above": 0.5, "below": -0.5},
])
def test_consistent_ranges_still_parse(rule: dict[str, Any]) -> None:
    (parsed,) = parse_rules([{"name": "r", **rule}])
    assert parsed.name == "r"


def test_dedup_of_crowded_frames_follows_the_pairwise_rule() -> None:
    """The k-d tree that finds the remembered particles near a frame's gives what the rule
    says pair by pair: a duplicate lies within the larger of the two radii of a remembered one
    or carries its track id (the dense n x m distances took 0.25 s for 2000 particles)."""
    from nanoscout.analysis.alerts import _duplicates, _Memory

    rng = np.random.default_rng(5)

    def make(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        xy = rng.uniform(0, 1024, (n, 2))
        r = rng.uniform(2, 12, n)
        return xy, r, np.c_[xy - r[:, None], xy + r[:, None]], rng.integers(0, 3000, n)

    m_xy, m_r, m_bb, m_tr = make(3000)
    mem = _Memory(t_ns=np.zeros(3000, np.int64), stage=np.full((3000, 2), np.nan), xy=m_xy,
                  radius=m_r, bbox=m_bb, track=m_tr)
    xy, r, bb, tr = make(1500)
    got = _duplicates(mem, 0.5, np.array([np.nan, np.nan]), xy, r, bb, tr)
    d = np.hypot(xy[:, None, 0] - m_xy[None, :, 0], xy[:, None, 1] - m_xy[None, :, 1])
    want = ((d <= np.maximum(r[:, None], m_r[None, :]))
            | ((tr[:, None] == m_tr[None, :]) & (tr[:, None] != 0))).any(axis=1)
    assert 0 < want.sum() < len(xy)
    np.testing.assert_array_equal(got, want)
    # no remembered particle at this stage position: nothing is a duplicate
    assert not _duplicates(mem, 0.5, np.array([1.0, 2.0]), xy, r, bb, tr).any()
