"""Drift, tracking, coalescence, unique statistics and in-situ science, scored against the
simulator's exact truth (py-motmetrics for MOTA / IDF1) with the truth labels as detector."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats as sps

from nanoscout.analysis.drift import DriftEstimator
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.insitu import lsw_fit, mean_ci, median_ci, poisson_ci
from nanoscout.analysis.measure import measure
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.preprocess import normalize
from nanoscout.analysis.tracking import SourceTracker, TrackingConfig, TrackUpdate
from nanoscout.sim.insitu import InSituSeries
from nanoscout.sim.synthetic import Specimen, SpecimenConfig
from nanoscout.wire.headers import DetHeader, Stage, StatsHeader
from nanoscout.wire.protocol import decode_message, encode

PX = 0.5


class TruthDetector:
    """Hands out the given label images in turn (the simulator's exact instances)."""

    def __init__(self, labels: list[np.ndarray]) -> None:
        self.labels = list(labels)

    def detect(self, pixels: np.ndarray, **_kw: object) -> SimpleNamespace:
        lab = self.labels.pop(0)
        n = int(lab.max())
        return SimpleNamespace(labels=lab, scores=np.ones(n + 1, np.float32),
                               timings_ms={"engine": 1.0}, scale=1.0)


def _series(**kw: object) -> list:
    cfg = SpecimenConfig(shape=(384, 384), pixel_size_nm=PX, coverage=0.12,
                         agglomerate_fraction=0.15,
                         drift_px_per_frame=kw.pop("drift", (4.0, -7.0)))  # type: ignore[arg-type]
    args = dict(n_frames=14, growth="uniform", growth_nm_per_frame=0.04,
                diffusion_nm_per_frame=0.15, drift_jitter_px=0.3)
    args.update(kw)
    return list(InSituSeries(cfg, 3, **args))  # type: ignore[arg-type]


def _track(frames: list, config: TrackingConfig | None = None
           ) -> tuple[SourceTracker, list[np.ndarray], list[TrackUpdate]]:
    tr = SourceTracker(config or TrackingConfig())
    tables, updates = [], []
    for k, f in enumerate(frames):
        t = measure(f.labels, PX)
        updates.append(tr.update(t, image=normalize(f.image), t_ns=int(f.t_s * 1e9), seq=k,
                                 pixel_size_nm=PX, stage=None))
        tables.append(t)
    return tr, tables, updates


def _truth_ids(frame: object, table: np.ndarray) -> np.ndarray:
    # measure() numbers particles by their label value: the truth id
    return table["id"].astype(np.int64)


def test_identities_follow_the_truth_through_drift_growth_and_coalescence() -> None:
    import motmetrics as mm

    frames = _series()
    tr, tables, updates = _track(frames)
    acc = mm.MOTAccumulator(auto_id=True)
    for f, t in zip(frames, tables, strict=True):
        g = f.truth
        d = mm.distances.norm2squared_matrix(np.stack([g["x"], g["y"]], 1),
                                             np.stack([t["x"], t["y"]], 1), max_d2=25.0)
        acc.update(g["id"].tolist(), t["track_id"].astype(int).tolist(), d)
    idf1 = mm.metrics.create().compute(acc, metrics=["idf1"], name="a")["idf1"].iloc[0]
    assert idf1 >= 0.95, idf1
    # every row carries a track, and a track is one particle per frame
    for t in tables:
        assert (t["track_id"] > 0).all() and len(set(t["track_id"].tolist())) == len(t)
    # drift: frame-to-frame shifts of the labels (they move by the nearest whole pixel)
    def whole(k: int, axis: int) -> int:
        return -round(-frames[k].shift_px[axis])

    for k in range(1, len(frames)):
        dy, dx = whole(k, 0) - whole(k - 1, 0), whole(k, 1) - whole(k - 1, 1)
        assert math.hypot(updates[k].drift["dx_px"] - dx, updates[k].drift["dy_px"] - dy) < 0.3
    # uniform growth 0.04 nm/frame of the radius: dECD/dt = 0.08 nm/s
    ins = tr.insitu("nm", int(frames[-1].t_s * 1e9))
    assert ins["growth_rate_d50"] == pytest.approx(0.08, rel=0.1)
    assert ins["lsw"] is not None and ins["lsw"]["k"] > 0


def test_coalescences_are_found_and_keep_the_larger_parents_id() -> None:
    frames = _series(n_frames=16, diffusion_nm_per_frame=0.25)
    _tr, _tables, updates = _track(frames)
    h, w = frames[0].image.shape
    truth = [(f.index, e) for f in frames[:-3] for e in f.events if e.kind == "merge"
             and 12 <= e.x < w - 12 and 12 <= e.y < h - 12]
    published = [(u.tracking["events"], k) for k, u in enumerate(updates)]
    merges = [(e, k) for evs, k in published for e in evs if e["kind"] == "merge"]
    assert truth, "the series must coalesce"
    found = 0
    for fi, e in truth:
        for m, k in merges:
            dx = (m["x"] - frames[k].shift_px[1]) - (e.x - frames[fi].shift_px[1])
            dy = (m["y"] - frames[k].shift_px[0]) - (e.y - frames[fi].shift_px[0])
            if abs(m["seq"] - fi) <= 3 and math.hypot(dx, dy) < 12:
                found += 1
                break
    assert found / len(truth) >= 0.8, (found, len(truth))
    for m, _k in merges:  # the continuing track is the child and one of the parents
        assert m["children"][0] == m["parents"][0] and m["seq"] <= _k


def test_a_static_field_imaged_50_times_counts_as_one_frame() -> None:
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=PX, coverage=0.15)
    fr = Specimen.generate(cfg, 4).acquire(np.random.default_rng(1))
    one = SourceTracker(TrackingConfig())
    t = measure(fr.labels, PX)
    img = normalize(fr.image)
    one.update(t.copy(), image=img, t_ns=0, seq=0, pixel_size_nm=PX, stage=None)
    many = SourceTracker(TrackingConfig())
    for k in range(50):
        many.update(t.copy(), image=img, t_ns=k * 10**9, seq=k, pixel_size_nm=PX, stage=None)
    a, b = one.unique("nm"), many.unique("nm")
    assert a["count"] == b["count"] == int((~t["border"]).sum())
    assert a["ecd"] == b["ecd"]
    assert a["ecd_d50_ci"] == b["ecd_d50_ci"] and a["ecd_mean_ci"] == b["ecd_mean_ci"]
    assert b["tracks_total"] == len(t)


def test_a_particle_missed_for_two_frames_keeps_its_identity() -> None:
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=PX, coverage=0.1)
    fr = Specimen.generate(cfg, 2).acquire(np.random.default_rng(0))
    t = measure(fr.labels, PX)
    img = normalize(fr.image)
    tr = SourceTracker(TrackingConfig(max_gap_frames=2, reidentify_frames=0))
    victim = int(np.nonzero(~t["border"])[0][0])
    ids = []
    for k in range(6):
        table = t.copy() if k not in (2, 3) else np.delete(t.copy(), victim)
        tr.update(table, image=img, t_ns=k * 10**9, seq=k, pixel_size_nm=PX, stage=None)
        ids.append({int(i): int(tid) for i, tid in zip(table["id"], table["track_id"],
                                                       strict=True)})
    want = ids[0][int(t["id"][victim])]
    assert ids[5][int(t["id"][victim])] == want
    # a longer absence ends the track; re-identification (on by default) takes it back
    tr2 = SourceTracker(TrackingConfig(max_gap_frames=1))
    for k in range(7):
        table = t.copy() if k not in (1, 2, 3, 4) else np.delete(t.copy(), victim)
        u = tr2.update(table, image=img, t_ns=k * 10**9, seq=k, pixel_size_nm=PX, stage=None)
    assert int(table["track_id"][victim]) == want and u.tracking["started"] == 0


def test_drift_estimate_is_sub_pixel_on_moving_points() -> None:
    rng = np.random.default_rng(5)
    base = ndi.gaussian_filter(rng.random((512, 512)), 3)
    pts = rng.uniform(40, 470, (300, 2))
    est = DriftEstimator()
    est.estimate(base, pts, 10.0)
    shift = (13.37, -6.42)  # x, y
    moved = ndi.shift(base, (shift[1], shift[0]), order=3, mode="wrap")
    jitter = rng.normal(0, 0.5, pts.shape)  # Brownian motion of the particles
    step = est.estimate(moved, pts + shift + jitter, 10.0)
    assert step.method == "particles" and step.matched is not None and step.matched > 0.95
    assert math.hypot(step.dx - shift[0], step.dy - shift[1]) < 0.15


def test_a_stage_move_starts_a_new_field_and_an_uncalibrated_frame_resets_nothing() -> None:
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=PX, coverage=0.1)
    a = Specimen.generate(cfg, 1).acquire(np.random.default_rng(0))
    b = Specimen.generate(cfg, 2).acquire(np.random.default_rng(0))
    tr = SourceTracker(TrackingConfig())
    ta, tb = measure(a.labels, PX), measure(b.labels, PX)
    u0 = tr.update(ta.copy(), image=normalize(a.image), t_ns=0, seq=0, pixel_size_nm=PX,
                   stage=Stage(x_um=0.0, y_um=0.0))
    u1 = tr.update(ta.copy(), image=normalize(a.image), t_ns=1, seq=1, pixel_size_nm=None,
                   stage=Stage(x_um=0.0, y_um=0.0))
    assert u0.drift["field"] == u1.drift["field"] == 0 and not u1.drift["new_field"]
    u2 = tr.update(tb.copy(), image=normalize(b.image), t_ns=2, seq=2, pixel_size_nm=PX,
                   stage=Stage(x_um=5.0, y_um=0.0))
    assert u2.drift["new_field"] and u2.drift["field"] == 1 and "stage moved" in u2.drift["reason"]
    uq = tr.unique("nm")
    assert uq["fields"] == 2 and [f["field"] for f in uq["by_field"]] == [0, 1]
    assert uq["by_field"][0]["stage"] == {"x_um": 0.0, "y_um": 0.0}
    assert uq["count"] == int((~ta["border"]).sum()) + int((~tb["border"]).sum())


def test_pipeline_publishes_track_ids_drift_and_unique_statistics_and_takes_requests() -> None:
    frames = _series(n_frames=6)
    pipe = Pipeline(TruthDetector([f.labels for f in frames]),  # type: ignore[arg-type]
                    tracking=TrackingConfig(),
                    rules=[{"name": "merge", "kind": "coalescence", "cooldown_s": 0}])
    results = []
    for k, f in enumerate(frames):
        if k == 4:
            pipe.request("sim", "set_drift_reference")
            pipe.request("sim", "reset_statistics")
        results.append(pipe.process(Frame.from_image(f.image, pixel_size_nm=PX, source="sim",
                                                     seq=k, t_acq_ns=k * 10**9)))
    det = results[3].det
    assert det.drift is not None and det.tracking is not None
    assert "drift" in det.stage_ms and "track" in det.stage_ms
    # the wire carries it all: encode, decode, same header and track ids
    msg = decode_message(encode(results[3].messages[0]))
    assert isinstance(msg.header, DetHeader) and msg.header.drift == det.drift
    assert msg.array is not None
    np.testing.assert_array_equal(msg.array["track_id"], results[3].table["track_id"])
    st = results[3].messages[-1].header
    assert isinstance(st, StatsHeader) and st.unique is not None and st.insitu is not None
    assert st.unique.count > 0 and st.unique.ecd_d50_ci is not None
    # after "set drift reference now" the drift starts at zero again; after the reset the
    # statistics count from this frame
    d4 = results[4].det.drift
    assert d4 is not None and (d4.x_px, d4.y_px) == (0.0, 0.0)
    st4 = results[4].messages[-1].header
    assert isinstance(st4, StatsHeader) and st4.unique is not None
    assert st4.unique.n_frames == 1 and st4.cumulative.n_frames == 1
    with pytest.raises(ValueError, match="unknown action"):
        pipe.request("sim", "explode")


def test_interval_helpers() -> None:
    x = np.arange(1.0, 101.0)
    lo, hi = median_ci(x)  # type: ignore[misc]
    # binomial ranks for n = 100: the 40th and 61st order statistics
    j = int(sps.binom.ppf(0.025, 100, 0.5))
    assert (lo, hi) == (x[j - 1], x[100 - j])
    assert median_ci(x[:5]) is None
    m = mean_ci(x)
    assert m is not None and m[0] < 50.5 < m[1]
    assert poisson_ci(0)[0] == 0.0 and poisson_ci(10) == pytest.approx((4.795, 18.39), abs=0.01)
    t = np.arange(10.0)
    fit = lsw_fit(t, (8.0 + 3.0 * t) ** (1 / 3))
    assert fit is not None and fit["k"] == pytest.approx(3.0) and fit["r2"] == pytest.approx(1.0)
    assert fit["r0_cubed"] == pytest.approx(8.0)


def test_event_rules_fire_on_coalescence_growth_and_a_count_drop() -> None:
    from nanoscout.analysis.alerts import AlertEngine, parse_rules

    eng = AlertEngine(parse_rules([
        {"name": "c", "kind": "coalescence", "cooldown_s": 0},
        {"name": "g", "kind": "growth_rate", "above": 0.05, "cooldown_s": 0},
        {"name": "d", "kind": "count_drop", "pct": 30, "window_frames": 3, "cooldown_s": 0}]))
    from nanoscout.wire.particles import empty_table

    def run(n: int, events: list[dict], insitu: dict | None, t: int) -> list[str]:
        tab = empty_table(n)
        return [a.rule for a in eng.evaluate(source="s", t_ns=t, stage=None, table=tab,
                                             stats=None, units="nm", events=events,
                                             insitu=insitu)]

    merge = {"kind": "merge", "parents": [3, 9], "children": [3], "x": 10.0, "y": 20.0}
    assert run(10, [], None, 0) == []
    assert run(10, [merge], {"growth_rate_d50": 0.01, "growth_tracks": 50}, 1) == ["c"]
    assert run(10, [], {"growth_rate_d50": 0.2, "growth_tracks": 50}, 2) == ["g"]
    assert run(10, [], {"growth_rate_d50": 0.2, "growth_tracks": 2}, 3) == []  # too few tracks
    assert run(5, [], None, 4) == ["d"]  # 5 < 70 % of the median 10


@pytest.mark.parametrize("shape", [(1, 512), (3, 3), (512, 2), (9, 4000)])
def test_slivers_of_frames_are_tracked_without_registration(shape: tuple[int, int]) -> None:
    tr = SourceTracker(TrackingConfig())
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    for k in range(3):
        table = measure(np.zeros(shape, np.int32), PX)
        u = tr.update(table, image=img, t_ns=k, seq=k, pixel_size_nm=PX, stage=None)
        assert u.drift["method"] == "none" and u.tracking["active"] == 0
