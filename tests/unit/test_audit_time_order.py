"""Time and order under an audit's edge cases: an acquisition clock that does not advance, steps
forward (a day, one frame stamped in 2100) or back by seconds, frame numbers that jump to the
int64 limit, and an adapter restarted during a recording (its frames numbered from 0 again)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.analysis.alerts import AlertEngine, parse_rules
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.tracking import CLOCK_STEP_S, TrackingConfig
from nanoscout.clients.report import _groups, _series, _t0_ns
from nanoscout.clients.report_insitu import _stats_insitu
from nanoscout.clients.runfile import RunWriter, read_run
from nanoscout.sim.insitu import InSituSeries
from nanoscout.sim.synthetic import SpecimenConfig
from nanoscout.wire.headers import DetHeader, Stage, StatsHeader
from nanoscout.wire.particles import SHAPE_CLASSES, empty_table
from nanoscout.wire.sequence import MAX_COUNT, SequenceTracker
from tests.unit.test_tracking import TruthDetector

S = 1_000_000_000  # ns per s
T0 = 1_796_000_000 * S  # 2026-11


def _particle() -> np.ndarray:
    t = empty_table(1)
    t["id"], t["x"], t["y"], t["ecd_nm"], t["aspect_ratio"] = 1, 100.0, 100.0, 10.0, 1.0
    t["shape_class"] = SHAPE_CLASSES.index("sphere")
    t["bbox"] = (95, 95, 106, 106)
    return t


RULES: list[dict[str, Any]] = [
    {"name": "any", "kind": "count", "above": 0, "cooldown_s": 1.0},
    {"name": "big", "kind": "particle", "where": {"ecd_nm": {"gt": 5}}, "cooldown_s": 1.0},
    {"name": "spheres", "kind": "class", "label": "spheres", "threshold": 0.5, "cooldown_s": 1.0},
]


def _firings(engine: AlertEngine, t_acq: list[int], t_recv: list[int] | None) -> list[int]:
    """The frames (indices) each rule of RULES fired on, rule after rule in RULES' order."""
    fired: dict[str, list[int]] = {r["name"]: [] for r in RULES}
    for k, t in enumerate(t_acq):
        recv = None if t_recv is None else t_recv[k]
        for a in engine.evaluate(source="cam", t_ns=t, stage=Stage(x_um=0.0, y_um=0.0),
                                 table=_particle(), stats=None, units="nm", pixel_size_nm=1.0,
                                 t_recv_ns=recv):
            fired[a.rule].append(k)
        for a in engine.evaluate_class(source="cam", t_ns=t, labels=["spheres"],
                                       probabilities=[0.9], novelty=None, heatmap=None,
                                       t_recv_ns=recv):
            fired[a.rule].append(k)
    return [k for name in fired for k in fired[name]]


def test_a_source_whose_clock_does_not_advance_is_rate_limited_not_silenced() -> None:
    """An adapter that stamps every frame t_acq_ns = 0 (or whose camera clock stopped): the
    cooldowns ran on the frame time alone, so each rule fired on its first frame and never
    again. They now end after cooldown_s of the daemon's clock (the frames' arrival) too."""
    arrivals = [T0 + k * 4 * S // 10 for k in range(8)]  # a frame every 0.4 s
    # each rule: the first frame, then the first frame 1 s of arrival later, and again
    want = [0, 3, 6] * len(RULES)
    for stamp in (0, T0):  # no clock at all, a clock that stopped
        assert _firings(AlertEngine(parse_rules(RULES)), [stamp] * 8, arrivals) == want
    # a clock that advances: the same, on either clock
    assert _firings(AlertEngine(parse_rules(RULES)), arrivals, arrivals) == want
    # the rate limit holds on the arrival clock: frames 10 ms apart fire once per second
    fast = [T0 + k * S // 100 for k in range(250)]
    assert _firings(AlertEngine(parse_rules(RULES)), [0] * 250, fast) == [0, 100, 200] * 3
    # without arrival times (offline) the frame times alone decide, as before: deterministic
    assert _firings(AlertEngine(parse_rules(RULES)), [0] * 8, None) == [0] * len(RULES)
    # a restarted source (its clock went back) starts a new cooldown, as before
    back = [T0, T0 + S // 10, 5 * S]
    assert _firings(AlertEngine(parse_rules(RULES)), back, [T0 + k for k in range(3)]) == [
        0, 2] * len(RULES)


def test_gap_counts_stop_at_the_int64_limit() -> None:
    """Frame numbers are any int64: two jumps from 0 to 2**63 - 1 counted 2**64 - 4 missed
    frames, which no health message can carry (the daemon's publisher thread died on it)."""
    seqs = SequenceTracker()
    for key in ("a", "b", "a/s1"):
        seqs.observe(key, 0)
        gap = seqs.observe(key, MAX_COUNT)
        assert gap is not None and gap.missed == MAX_COUNT - 1
    assert seqs.total == MAX_COUNT
    seqs.observe("a", 0)  # the adapter restarted
    seqs.observe("a", MAX_COUNT)
    assert seqs.missed["a"] == MAX_COUNT and seqs.total == MAX_COUNT


def _growth_run(t_acq: list[int], t_recv: list[int]) -> list[dict]:
    """A uniformly growing in-situ series (dECD/dt = 0.1 nm/s at 1 s a frame, exact
    instances as the detector) through a tracking pipeline, frames acquired at ``t_acq`` and
    arriving at ``t_recv`` (ns); returns each frame's (drift block, insitu block)."""
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=0.5, coverage=0.12)
    frames = list(InSituSeries(cfg, 8, n_frames=len(t_acq), growth="uniform",
                               growth_nm_per_frame=0.05, diffusion_nm_per_frame=0.05))
    pipe = Pipeline(TruthDetector([f.labels for f in frames]),  # type: ignore[arg-type]
                    tracking=TrackingConfig())
    out = []
    for k, f in enumerate(frames):
        image = Frame.from_image(f.image, pixel_size_nm=0.5, source="cam", seq=k,
                                 t_acq_ns=t_acq[k])
        r = pipe.process(Frame(image.header, image.pixels, t_recv[k]))
        det, stats = r.det, r.messages[-1].header
        assert isinstance(det, DetHeader) and isinstance(stats, StatsHeader)
        assert det.drift is not None and stats.insitu is not None
        out.append({"drift": det.drift.model_dump(), **stats.insitu.model_dump()})
    return out


@pytest.mark.parametrize("case", ["a day ahead", "one frame in 2100", "3 s back"])
def test_a_clock_step_starts_a_new_field_and_growth_rates_stay_true(case: str) -> None:
    """The source's clock steps at frame 6; the frames keep arriving once a second. A day's
    step forward was folded into the field's fits (growth 4e-6 nm/s instead of 0.1; the LSW
    constant ~0), one frame stamped in 2100 made them 0 for the rest of the field, and a 3 s
    step back bent them to 0.13-0.15 nm/s. Each now starts a new field, saying why, whose
    growth rates are the true 0.1 nm/s once it has enough frames. A pause (both clocks
    advance) keeps the field."""
    n = 16
    t_recv = [T0 + k * S + S // 20 for k in range(n)]
    t_acq = [T0 + k * S for k in range(n)]
    if case == "a day ahead":
        t_acq[6:] = [t + 86400 * S for t in t_acq[6:]]
    elif case == "one frame in 2100":
        t_acq[6] = 4_102_444_800 * S
    else:
        t_acq[6:] = [t - 3 * S for t in t_acq[6:]]
    out = _growth_run(t_acq, t_recv)
    assert all(o["drift"]["field"] == 0 for o in out[:6])
    assert out[6]["drift"]["new_field"]
    said = {"a day ahead": "ahead of its arrival", "one frame in 2100": "ahead of its arrival",
            "3 s back": "before the previous frame"}[case]
    assert said in out[6]["drift"]["reason"], out[6]["drift"]["reason"]
    if case == "one frame in 2100":  # and the frame after it, back in 2026, another
        assert out[7]["drift"]["new_field"] and out[7]["field"] == 2
    last = out[-1]
    assert last["t_s"] < 10.0  # the field's time, not a day or 74 years
    assert last["growth_rate_d50"] == pytest.approx(0.1, rel=0.1)
    assert last["lsw"] is not None and last["lsw"]["k"] > 1.0  # nm³/s, ~0 when folded
    if case == "a day ahead":
        # a pause of a day advances both clocks alike: the source paused, the field goes on
        paused = _growth_run(t_acq[:8], [t + S // 20 for t in t_acq[:8]])
        assert [o["drift"]["field"] for o in paused] == [0] * 8
        assert paused[-1]["t_s"] == pytest.approx(86400 + 7)
        # an acquisition clock that ran ahead of the arrivals by less than CLOCK_STEP_S
        ahead = [T0 + k * S + (0 if k < 6 else round((CLOCK_STEP_S - 10) * S)) for k in range(8)]
        assert [o["drift"]["field"] for o in _growth_run(ahead, t_recv[:8])] == [0] * 8


def test_a_slow_series_streamed_fast_keeps_its_field() -> None:
    """An archived series of one frame every 2 minutes, streamed to the daemon a frame a
    tenth of a second (re-analysis): each frame's acquisition time runs 120 s ahead of its
    arrival, which is the series' cadence, not a clock step. With the 60 s rule alone every
    frame started a new field (no track lasted, no growth rate); the step must also exceed ten
    of the source's previous frame intervals (the second frame, with no interval to judge
    by, still starts one). A day's step in that series is still a step."""
    n = 12
    t_acq = [T0 + k * 120 * S for k in range(n)]
    t_recv = [T0 + k * S // 10 for k in range(n)]
    out = _growth_run(t_acq, t_recv)
    assert [o["drift"]["field"] for o in out[2:]] == [out[1]["drift"]["field"]] * (n - 2)
    assert out[-1]["growth_rate_d50"] == pytest.approx(0.1 / 120, rel=0.1)
    stepped = t_acq[:8] + [t + 86400 * S for t in t_acq[8:]]
    out = _growth_run(stepped, t_recv)
    assert out[8]["drift"]["new_field"] and "ahead of its arrival" in out[8]["drift"]["reason"]
    assert not any(o["drift"]["new_field"] for o in out[9:])


def test_an_adapter_restarted_during_a_recording_keeps_its_frames_apart(tmp_path: Path) -> None:
    """One daemon run; the adapter restarts and numbers its frames from 0 again, on another
    field drifting the other way. The tracks table took each frame's drift and field by
    (source, daemon run, seq), so the first session's tracks got the second session's
    (106 of 207 tracks drift-corrected by the wrong frame in a real recording); the report's
    per-frame D50 and counts pooled the two frames of each number (87 particles read as
    156); its in-situ series put the first session's statistics at the second's times."""
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=0.5, coverage=0.12)
    sessions = [list(InSituSeries(replace(cfg, drift_px_per_frame=(0.0, dx)), seed, n_frames=5,
                                  growth="uniform", growth_nm_per_frame=0.05))
                for seed, dx in ((8, 6.0), (9, -6.0))]
    pipe = Pipeline(TruthDetector([f.labels for s in sessions for f in s]),  # type: ignore[arg-type]
                    tracking=TrackingConfig())
    pipe.daemon_run = T0 - 60 * S
    w = RunWriter(tmp_path / "run.parquet", {"subscribed_utc": "x"})
    t = T0
    for frames in sessions:
        for seq, sim in enumerate(frames):
            t += S
            image = Frame.from_image(sim.image, pixel_size_nm=0.5, source="cam", seq=seq,
                                     t_acq_ns=t)
            r = pipe.process(Frame(image.header, image.pixels, t + S // 20))
            assert isinstance(r.det, DetHeader)
            w.add_det(r.det, r.table)
            stats = r.messages[-1].header
            assert isinstance(stats, StatsHeader)
            w.add_stats(stats)
        t += 10 * S
    w.close()
    run = read_run(tmp_path / "run.parquet")
    f, p, tr = run.frames, run.particles, run.tracks
    assert sorted(f["seq"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert f["field"].tolist() == [0] * 5 + [1] * 5
    # a frame is its acquisition time here: every track's field and drift-corrected positions
    field = dict(zip(f["t_acq_ns"].tolist(), f["field"].tolist(), strict=True))
    drift = dict(zip(f["t_acq_ns"].tolist(), f["drift_x_px"].tolist(), strict=True))
    assert len(tr["track_id"]) > 20
    for i, tid in enumerate(tr["track_id"].tolist()):
        mine = np.flatnonzero(p["track_id"] == tid)
        first, last = mine[np.argmin(p["t_acq_ns"][mine])], mine[np.argmax(p["t_acq_ns"][mine])]
        assert tr["field"][i] == field[int(p["t_acq_ns"][first])]
        want = float(p["x"][last]) - drift[int(p["t_acq_ns"][last])]
        assert tr["x_last_px"][i] == pytest.approx(want, abs=1e-3)
    # the report's per-frame series: each point is its own frame's particles
    (g,) = _groups(run)
    t0 = _t0_ns(run)
    assert t0 is not None
    s = _series(run, g, t0)
    for k, ta in enumerate(sorted(f["t_acq_ns"].tolist())):
        inner = (p["t_acq_ns"] == ta) & ~p["border"]
        assert s.n_inner[k] == int(inner.sum())
        assert s.d50[k] == pytest.approx(float(np.median(p["ecd_nm"][inner])))
    # the in-situ series: each statistics row at its own frame's time and field
    series = _stats_insitu(run, "cam", "nm")
    assert [round(ta) for ta, _ in series] == sorted(f["t_acq_ns"].tolist())
    assert [b["field"] for _, b in series] == [0] * 5 + [1] * 5
