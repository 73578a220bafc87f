"""Search strategies (nanoscout.clients.search.strategies) against a fake session over a fake world.

The fake session "images" a list of targets and decoys (stage positions, µm): a survey frame
(the survey pixel size) raises a *candidate* rule alert naming every target and decoy inside
it; a high-magnification frame raises a *target* rule alert naming the targets wholly inside
it (at least 1.5 µm from its edges). Moves and exposures cost modelled instrument time.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from nanoscout.clients.microscope.control import ControlError
from nanoscout.clients.microscope.interfaces import AcquisitionSettings
from nanoscout.clients.search.geometry import Area, FrameGeometry, tile_centres
from nanoscout.clients.search.session import Costs, FrameResult, SearchSession
from nanoscout.clients.search.strategies import (
    Candidate,
    SearchConfig,
    TargetBook,
    adaptive_search,
    raster_search,
    run_search,
    survey_candidates,
)
from nanoscout.wire.particles import PARTICLE_DTYPE
from nanoscout.wire.protocol import AlertHeader, Message

SOURCE = "sim"
SHAPE = (64, 64)  # every frame, px
HIGH_NM, SURVEY_NM = 100.0, 400.0  # fields of view 6.4 µm and 25.6 µm
TARGET_RULE, CANDIDATE_RULE = "rod", "big_particle"
WHOLE_MARGIN_UM = 1.5  # a target this far inside a high-mag frame is seen whole

AREA = Area(0.0, 40.0, 0.0, 40.0)
TARGETS = [(7.3, 8.1), (21.0, 30.5), (33.2, 12.9), (12.6, 34.4)]
DECOYS = [(30.1, 31.7), (5.5, 22.2), (25.4, 4.0)]


def make_cfg(**kw: object) -> SearchConfig:
    base: dict[str, object] = dict(
        area=AREA, target_rules=(TARGET_RULE,), candidate_rules=(CANDIDATE_RULE,),
        pixel_size_nm=HIGH_NM, survey_pixel_size_nm=SURVEY_NM, shape=SHAPE, overlap_um=3.0)
    base.update(kw)
    return SearchConfig(**base)  # type: ignore[arg-type]


def alert(geom: FrameGeometry, seq: int, rule: str, points: list[tuple[float, float]],
          *, ecd_nm: float = 120.0, feret_nm: float = 300.0) -> Message:
    """An alert of ``rule`` whose particle rows lie at the stage ``points`` of frame ``geom``."""
    table = np.zeros(len(points), PARTICLE_DTYPE)
    for i, (x, y) in enumerate(points):
        row, col = geom.to_pixel(x, y)
        table[i]["x"], table[i]["y"] = col, row
    table["id"] = np.arange(1, len(points) + 1)
    table["ecd_nm"] = ecd_nm
    table["feret_max_nm"] = feret_nm
    table["score"] = 0.9
    table["aspect_ratio"] = 3.0
    header = AlertHeader(source=SOURCE, seq=seq, t_acq_ns=seq, rule=rule, kind="particle",
                         severity="warning", value=ecd_nm, threshold=100.0,
                         explanation=f"{rule} fired", n=len(points))
    return Message(f"alert.{SOURCE}", header, table)


@dataclass
class Shot:
    x: float
    y: float
    pixel_size_nm: float
    purpose: str
    instrument_s: float  # the search's instrument time once this frame was taken


@dataclass
class FakeSession:
    """Duck-typed like SearchSession."""

    targets: list[tuple[float, float]]
    decoys: list[tuple[float, float]] = field(default_factory=list)
    survey_nm: float = SURVEY_NM
    limits: Area | None = Area(-50.0, 90.0, -50.0, 90.0)
    fail: set[int] = field(default_factory=set)  # frame indices (1-based) whose results fail
    #: the microscope stops answering when this frame (1-based) is asked for, and after
    control_fails_at: int | None = None
    costs: Costs = field(default_factory=lambda: Costs(at_um=(0.0, 0.0)))
    t0: float = field(default_factory=time.monotonic)
    shots: list[Shot] = field(default_factory=list)
    seen: list[list[tuple[float, float]]] = field(default_factory=list)  # targets per frame
    crops: int = 0
    metas: list[dict[str, str | int | float | bool] | None] = field(default_factory=list)
    _xy: tuple[float, float] = (0.0, 0.0)

    def frame(self, x_um: float, y_um: float, pixel_size_nm: float, shape: tuple[int, int],
              purpose: str, meta: dict[str, str | int | float | bool] | None = None
              ) -> FrameResult:
        c = self.costs
        if self.control_fails_at is not None and c.frames + 1 >= self.control_fails_at:
            raise ControlError("no answer from the microscope at tcp://fake within 30 s (move)")
        self.metas.append(meta)
        move_s = math.hypot(x_um - self._xy[0], y_um - self._xy[1]) / 100.0 + 0.3
        self._xy = (x_um, y_um)
        geom = FrameGeometry((x_um, y_um), pixel_size_nm, shape)
        # exposure 0.5 s, 10 e/nm² whatever the magnification (a TEM's fixed illumination)
        c.add(pixel_size_nm, shape, (x_um, y_um), move_s, 0.5, 10.0, geom.fov_um)
        self.shots.append(Shot(x_um, y_um, pixel_size_nm, purpose, c.instrument_s))
        seq = 100 + c.frames
        res = FrameResult(purpose, c.frames, geom, SOURCE, seq, time.monotonic() - self.t0,
                          c.instrument_s)
        if c.frames in self.fail:
            res.error = f"no complete results for seq {seq} within 1 s"
            c.failed_frames += 1
            self.seen.append([])
            return res
        res.n_particles = 10
        if pixel_size_nm == self.survey_nm:
            pts = [p for p in self.targets + self.decoys if geom.covers(*p)]
            if pts:
                res.alerts.append(alert(geom, seq, CANDIDATE_RULE, pts))
            self.seen.append([])
        else:
            pts = [p for p in self.targets if geom.covers(*p, margin_um=WHOLE_MARGIN_UM)]
            if pts:
                res.alerts.append(alert(geom, seq, TARGET_RULE, pts))
            self.seen.append(pts)
        return res

    def crop(self, res: FrameResult, row: float, col: float, half_px: int) -> np.ndarray | None:
        self.crops += 1
        return np.full((2 * half_px, 2 * half_px), 128, np.uint8)

    def close(self) -> None:
        pass


def as_session(fake: FakeSession) -> SearchSession:
    return cast(SearchSession, fake)


def assert_found_once(found: list[tuple[float, float]], truth: list[tuple[float, float]]
                      ) -> None:
    assert len(found) == len(truth), (found, truth)
    for t in truth:
        near = [f for f in found if math.hypot(f[0] - t[0], f[1] - t[1]) < 0.01]
        assert len(near) == 1, (t, found)


# ------------------------------------------------------------------------------ raster


def test_raster_finds_every_target_once_despite_overlaps() -> None:
    cfg = make_cfg()
    tiles = tile_centres(AREA, (6.4, 6.4), cfg.overlap_um)
    # a target in the middle of the overlap of the first two tiles is seen whole in both
    shared = (0.5 * (tiles[0][0] + tiles[1][0]), tiles[0][1])
    truth = [*TARGETS, shared]
    fake = FakeSession(truth, DECOYS)
    res = raster_search(as_session(fake), cfg)
    assert res.stopped == "done" and res.strategy == "raster"
    assert res.frames == len(tiles) == res.confirm_frames
    assert all(s.purpose == "raster" and s.pixel_size_nm == HIGH_NM for s in fake.shots)
    assert sum(shared in pts for pts in fake.seen) == 2  # really seen twice
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], truth)
    assert res.duplicates_merged >= 1
    assert [t.id for t in res.targets] == list(range(1, len(truth) + 1))
    assert res.curve == [(t.frame_index, t.id) for t in res.targets]
    t = res.targets[0]
    assert t.rule == TARGET_RULE and t.units == "nm" and t.source == SOURCE
    assert t.ecd_nm == pytest.approx(120.0) and t.feret_max_nm == pytest.approx(300.0)
    assert t.pixel_size_nm == HIGH_NM
    assert t.thumbnail is not None and t.thumbnail.dtype == np.uint8
    assert fake.crops == len(truth)  # no thumbnail for a duplicate
    assert res.instrument_s == pytest.approx(fake.costs.instrument_s)
    assert res.mean_dose_e_per_nm2 == pytest.approx(10.0 * len(tiles) * 6.4**2 / 1600.0)


# ------------------------------------------------------------------------------ adaptive


def test_adaptive_finds_every_target_with_far_fewer_frames() -> None:
    cfg = make_cfg()
    fake = FakeSession(list(TARGETS), DECOYS)
    res = adaptive_search(as_session(fake), cfg)
    assert res.stopped == "candidates exhausted"
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS)
    n_raster = len(tile_centres(AREA, (6.4, 6.4), cfg.overlap_um))
    assert res.frames < n_raster / 5
    assert res.survey_frames == len(tile_centres(AREA, (25.6, 25.6), cfg.overlap_um))
    assert res.frames == res.survey_frames + res.confirm_frames
    assert res.candidates == len(TARGETS) + len(DECOYS)  # survey overlaps merged
    assert len(res.nominated) == res.candidates
    # survey first, then confirmations
    purposes = [s.purpose for s in fake.shots]
    assert purposes == ["survey"] * res.survey_frames + ["confirm"] * res.confirm_frames
    confirms = [s for s in fake.shots if s.purpose == "confirm"]
    assert all(s.pixel_size_nm == HIGH_NM for s in confirms)
    for d in DECOYS:
        visits = [s for s in confirms if math.hypot(s.x - d[0], s.y - d[1]) < 0.5]
        assert len(visits) <= 1, d
    assert res.confirm_frames <= len(TARGETS) + len(DECOYS)
    assert res.duplicates_merged == 0


def test_adaptive_skips_candidates_a_confirmation_frame_already_covered() -> None:
    # a decoy 1.1 µm beside a target (two candidates: > min_separation_um) lies 2.1 µm
    # inside the target's confirmation frame (> confirm_margin_um): it counts as checked
    targets = [(10.0, 10.0)]
    decoys = [(11.1, 10.0)]
    fake = FakeSession(targets, decoys)
    res = adaptive_search(as_session(fake), make_cfg())
    assert len(res.targets) == 1 and res.candidates == 2
    assert res.confirm_frames == 1


def test_adaptive_second_look_at_a_target_rule_candidate() -> None:
    # the target rule already fires in the survey (priority 2+); a confirmation frame that
    # does not see it whole earns the candidate one more frame from another place
    class TargetRuleInSurvey(FakeSession):
        def frame(self, x_um: float, y_um: float, pixel_size_nm: float,
                  shape: tuple[int, int], purpose: str,
                  meta: dict[str, str | int | float | bool] | None = None) -> FrameResult:
            res = super().frame(x_um, y_um, pixel_size_nm, shape, purpose, meta)
            if purpose == "survey":
                res.alerts = [alert(res.geometry, res.seq, TARGET_RULE, self.targets)]
            elif sum(s.purpose == "confirm" for s in self.shots) == 1:
                res.alerts = []  # the first look misses it
            return res

    fake = TargetRuleInSurvey([(20.0, 20.0)])
    res = adaptive_search(as_session(fake), make_cfg(candidate_rules=()))
    assert res.candidates == 1
    assert res.confirm_frames == 2
    assert len(res.targets) == 1
    second = [s for s in fake.shots if s.purpose == "confirm"][1]
    assert (second.x, second.y) == pytest.approx((20.0 + 6.4 / 4, 20.0 + 6.4 / 4))
    assert res.stopped == "candidates exhausted"


# ------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("strategy", ["raster", "adaptive"])
def test_frame_budget_stops_the_search(strategy: str) -> None:
    fake = FakeSession(list(TARGETS), DECOYS)
    res = run_search(strategy, as_session(fake), make_cfg(budget_frames=6))  # type: ignore[arg-type]
    assert res.stopped == "budget: frames"
    assert res.frames == 6 == len(fake.shots)


@pytest.mark.parametrize("strategy", ["raster", "adaptive"])
def test_instrument_time_budget_is_never_overshot(strategy: str) -> None:
    """The search took the frame that crossed the budget (checked before, spent after); now
    it does not start a frame it cannot finish: the frame it refused would have crossed it."""
    fake = FakeSession(list(TARGETS), DECOYS)
    res = run_search(strategy, as_session(fake), make_cfg(budget_s=5.0))  # type: ignore[arg-type]
    assert res.instrument_s == fake.shots[-1].instrument_s <= 5.0
    assert res.stopped == "budget: instrument time"
    assert res.frames == len(fake.shots) < 10
    stop = res.budget_stop
    assert stop is not None and (stop.budget, stop.unit, stop.limit) == ("instrument time", "s", 5.0)
    assert stop.spent == res.instrument_s and stop.next_frame is not None
    assert stop.over == pytest.approx(stop.spent + stop.next_frame - 5.0) and stop.over > 0
    budgets = cast(dict[str, object], res.summary()["budgets"])
    assert budgets["instrument_s"] == {"spent": round(res.instrument_s, 2), "budget": 5.0}


def test_the_refused_frame_would_have_cost_what_was_estimated() -> None:
    """Raster tiles 3.36 µm apart, 0.8336 s each (move 0.0336 + settle 0.3 + exposure 0.5):
    the 6th would have ended at 5.013 s, past a 5 s budget; the estimate is that frame's cost."""
    fake = FakeSession(list(TARGETS))
    res = raster_search(as_session(fake), make_cfg(budget_s=5.0))
    assert res.frames == 5 and res.instrument_s == pytest.approx(4.1797, abs=1e-4)
    stop = res.budget_stop
    assert stop is not None and stop.next_frame is not None
    tile = tile_centres(AREA, (6.4, 6.4), 3.0)[res.frames]
    fake.frame(*tile, HIGH_NM, SHAPE, "raster")  # the frame the search refused
    assert stop.next_frame == pytest.approx(fake.costs.instrument_s - res.instrument_s)
    assert stop.over == pytest.approx(fake.costs.instrument_s - 5.0)


def test_dose_budget_is_never_overshot() -> None:
    """A dose budget is a hard limit (a beam-sensitive specimen): the search took a 4th frame
    that brought the mean dose to 1.024 of 1 e/nm²; now it stops after the 3rd (0.768) and
    says that the 4th would have gone 0.024 e/nm² over."""
    fake = FakeSession(list(TARGETS), DECOYS)
    # each high-mag frame adds 10 e/nm² × 40.96 µm² / 1600 µm² = 0.256 e/nm² to the mean
    res = raster_search(as_session(fake), make_cfg(budget_dose_e_per_nm2=1.0))
    assert res.mean_dose_e_per_nm2 <= 1.0
    assert res.stopped == "budget: dose"
    assert res.frames == 3 and res.mean_dose_e_per_nm2 == pytest.approx(0.768)
    stop = res.budget_stop
    assert stop is not None and (stop.budget, stop.unit, stop.limit) == ("dose", "e/nm²", 1.0)
    assert stop.next_frame == pytest.approx(0.256) and stop.over == pytest.approx(0.024)
    assert str(stop) == ("dose: 0.768 of 1 e/nm² spent; the next frame (~0.256 e/nm²) would "
                         "have made 1.024 e/nm², 0.024 e/nm² over the budget")
    s = res.summary()
    assert s["stopped"] == "budget: dose" and s["stop_detail"] == str(stop)
    assert s["budgets"] == {"frames": {"spent": 3, "budget": None},
                            "instrument_s": {"spent": round(res.instrument_s, 2), "budget": None},
                            "mean_dose_e_per_nm2": {"spent": 0.768, "budget": 1.0}}


@pytest.mark.parametrize(("budget", "frames", "stopped"), [
    (16.0, 3, "budget: dose"),  # 3 survey frames: 12.288; a 4th would make 16.384
    (20.0, 4, "budget: dose"),  # the survey (16.384); the 1st confirmation is estimated 4.096
    (20.5, 4 + 7, "candidates exhausted")])  # room for that estimate: every candidate
def test_adaptive_dose_budget_counts_the_survey_and_the_confirmations(
        budget: float, frames: int, stopped: str) -> None:
    """A survey frame adds 4.096 e/nm² to the mean, a confirmation frame 0.256 (10 e/nm² over
    25.6² or 6.4² µm²). The first confirmation, at a magnification not seen yet, is estimated
    as the larger of "the same e/nm²" and "the same electrons per frame" (4.096): the dose
    budget is a hard limit whatever the instrument."""
    fake = FakeSession(list(TARGETS), DECOYS)
    res = adaptive_search(as_session(fake), make_cfg(budget_dose_e_per_nm2=budget))
    assert res.mean_dose_e_per_nm2 <= budget
    assert (res.frames, res.stopped) == (frames, stopped)
    if stopped != "candidates exhausted":
        assert res.budget_stop is not None and res.budget_stop.over > 0
        assert res.budget_stop.next_frame == pytest.approx(4.096)


def test_the_first_frame_is_taken_unknown_a_spent_budget_takes_none() -> None:
    """Before the first frame nothing says what a frame costs (the microscope reports its
    dose and exposure with the frame): it is taken, and a budget smaller than one frame stops
    the search after it, saying so. A budget of 0 takes no frame."""
    fake = FakeSession(list(TARGETS))
    res = raster_search(as_session(fake), make_cfg(budget_dose_e_per_nm2=0.1))
    assert res.frames == 1 and res.stopped == "budget: dose"
    assert res.budget_stop is not None and res.budget_stop.spent == pytest.approx(0.256)
    fake = FakeSession(list(TARGETS))
    res = raster_search(as_session(fake), make_cfg(budget_s=0.0))
    assert res.frames == 0 and res.stopped == "budget: instrument time"
    stop = res.budget_stop
    assert stop is not None and stop.next_frame is None and stop.over == 0.0
    assert str(stop) == "instrument time: 0 of 0 s spent, nothing left for a frame"


#: what the fake microscope's status says of a frame (its frame(): 0.5 s, 10 e/nm² at any size)
FAKE_SETTINGS = AcquisitionSettings(exposure_s=0.5, dose_e_per_nm2=10.0)


def priced(settings: AcquisitionSettings = FAKE_SETTINGS) -> FakeSession:
    """A fake session whose microscope reported ``settings`` in its status."""
    return FakeSession(list(TARGETS), DECOYS, costs=Costs(at_um=(0.0, 0.0), settings=settings))


@pytest.mark.parametrize(("strategy", "first_frame"), [
    ("raster", 0.256),  # 10 e/nm² × 6.4² µm² / 1600 µm²
    ("adaptive", 4.096)])  # a survey frame: 10 e/nm² × 25.6² µm² / 1600 µm²
def test_a_dose_budget_below_one_frame_takes_no_frame(strategy: str, first_frame: float) -> None:
    """The microscope's status says what a frame costs (exposure, dose), so the first frame is
    priced before it is taken: a dose budget below it takes no frame (the search took it and
    stopped after it, 0.256 of 0.1 e/nm² for the raster), saying so."""
    budget = first_frame / 2
    fake = priced()
    cfg = make_cfg(budget_dose_e_per_nm2=budget)
    res = run_search(strategy, as_session(fake), cfg)  # type: ignore[arg-type]
    assert (res.frames, fake.shots, res.mean_dose_e_per_nm2) == (0, [], 0.0)
    assert res.stopped == "budget: dose"
    stop = res.budget_stop
    assert stop is not None and (stop.spent, stop.limit) == (0.0, budget)
    assert stop.next_frame == pytest.approx(first_frame) and stop.over == pytest.approx(budget)
    assert str(stop) == (f"dose: 0 of {budget:.4g} e/nm² spent; the next frame "
                         f"(~{first_frame:.4g} e/nm²) would have made {first_frame:.4g} e/nm², "
                         f"{budget:.4g} e/nm² over the budget")
    assert res.summary()["stop_detail"] == str(stop)


def test_the_first_frame_is_priced_by_the_status_settings() -> None:
    """One frame's dose takes that frame (the estimate is what it cost); an instrument-time
    budget below one exposure takes none (the first move is not known, the exposure is)."""
    fake = priced()
    res = raster_search(as_session(fake), make_cfg(budget_dose_e_per_nm2=0.256))
    assert res.frames == 1 and res.mean_dose_e_per_nm2 == pytest.approx(0.256)
    assert res.stopped == "budget: dose"
    assert res.budget_stop is not None and res.budget_stop.next_frame == pytest.approx(0.256)
    fake = priced()
    res = raster_search(as_session(fake), make_cfg(budget_s=0.4))
    assert (res.frames, res.stopped) == (0, "budget: instrument time")
    assert res.budget_stop is not None and res.budget_stop.next_frame == 0.5
    # an exposure's worth of time: the first frame's move is not known before it is made
    fake = priced()
    res = raster_search(as_session(fake), make_cfg(budget_s=0.5))
    assert res.frames == 1 and res.instrument_s > 0.5


def test_costs_estimate_the_first_frame_from_the_settings() -> None:
    """Before the first frame the settings price it (exposure s; dose e/px at the pixel size
    asked for, or e/nm²), partly where they say only part; once a frame is measured its cost
    wins over what they said."""
    per_px = AcquisitionSettings(exposure_s=0.5, dose_e_per_px=200.0)
    c = Costs(at_um=(0.0, 0.0), settings=per_px)
    est = c.estimate(3.0, 4.0, HIGH_NM, SHAPE)  # 200 e/px at 100 nm/px: 0.02 e/nm²
    assert est is not None and est.instrument_s == 0.5  # the first move is not known
    assert est.dose_e_nm2_area == pytest.approx(0.02 * 6.4**2)
    est = c.estimate(3.0, 4.0, HIGH_NM / 2, SHAPE)  # 4 times the e/nm², a quarter of the area
    assert est is not None and est.dose_e_nm2_area == pytest.approx(0.08 * 3.2**2)
    for settings, cost in [(AcquisitionSettings(exposure_s=2.0), (2.0, None)),
                           (AcquisitionSettings(dose_e_per_nm2=1.0), (None, 6.4**2))]:
        est = Costs(settings=settings).estimate(0.0, 0.0, HIGH_NM, SHAPE)
        assert est is not None and (est.instrument_s, est.dose_e_nm2_area) == pytest.approx(cost)
    assert Costs(settings=AcquisitionSettings()).estimate(0.0, 0.0, HIGH_NM, SHAPE) is None
    c.add(HIGH_NM, SHAPE, (5.0, 0.0), 0.35, 0.7, 0.03, (6.4, 6.4))  # not as the settings said
    est = c.estimate(5.0, 0.0, HIGH_NM, SHAPE)
    assert est is not None and est.instrument_s == pytest.approx(0.35 + 0.7)
    assert est.dose_e_nm2_area == pytest.approx(0.03 * 6.4**2)


def test_costs_estimate_a_move_from_the_measured_ones() -> None:
    """A move's time grows with its length (settle + length / speed): the estimate is the
    least upper bound the measured moves give, exposure and dose of the magnification."""
    c = Costs(at_um=(0.0, 0.0))
    assert c.estimate(1.0, 0.0, HIGH_NM, SHAPE) is None  # nothing known yet
    c.add(HIGH_NM, SHAPE, (10.0, 0.0), 0.4, 0.5, 2.0, (6.4, 6.4))  # 10 µm in 0.4 s
    c.add(HIGH_NM, SHAPE, (10.0, 2.0), 0.32, 0.5, 2.0, (6.4, 6.4))  # 2 µm in 0.32 s
    assert c.moves == [(10.0, 0.4), (2.0, 0.32)] and c.frames == 2
    assert c.instrument_s == pytest.approx(1.72)
    assert c.dose_e_nm2_area == pytest.approx(2 * 2.0 * 6.4**2)
    est = c.estimate(10.0, 2.0, HIGH_NM, SHAPE)  # no move: within the shortest measured
    assert est is not None and est.instrument_s == pytest.approx(0.32 + 0.5)
    assert est.dose_e_nm2_area == pytest.approx(2.0 * 6.4**2)
    est = c.estimate(10.0, 7.0, HIGH_NM, SHAPE)  # 5 µm: within the 10 µm move's 0.4 s
    assert est is not None and est.instrument_s == pytest.approx(0.4 + 0.5)
    est = c.estimate(10.0, 22.0, HIGH_NM, SHAPE)  # 20 µm: twice the 10 µm move at most
    assert est is not None and est.instrument_s == pytest.approx(0.8 + 0.5)
    # another magnification: 4 times the side, 16 times the area: the same e/nm² over it
    est = c.estimate(10.0, 2.0, 4 * HIGH_NM, SHAPE)
    assert est is not None and est.dose_e_nm2_area == pytest.approx(2.0 * 25.6**2)
    c.add(4 * HIGH_NM, SHAPE, (10.0, 2.0), 0.3, 1.0, 0.125, (25.6, 25.6))
    # back at the high magnification it is known; at a third one, the same electrons per
    # frame as the low magnification's (0.125 × 25.6² > 2 × 3.2²) and its longer exposure
    est = c.estimate(10.0, 2.0, HIGH_NM / 2, SHAPE)
    assert est is not None and est.dose_e_nm2_area == pytest.approx(0.125 * 25.6**2)
    assert est.instrument_s == pytest.approx(0.3 + 1.0)


def test_run_search_refuses_an_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="'spiral'"):
        run_search("spiral", as_session(FakeSession([])), make_cfg())  # type: ignore[arg-type]


def test_config_needs_a_target_rule() -> None:
    with pytest.raises(ValueError, match="target rule"):
        make_cfg(target_rules=())
    with pytest.raises(ValueError, match="survey_pixel_size_nm"):
        make_cfg(survey_pixel_size_nm=0.0)


# ------------------------------------------------------------------------------ target book


def _confirm(fake: FakeSession, centre: tuple[float, float], points: list[tuple[float, float]],
             feret_nm: float = 300.0) -> FrameResult:
    res = fake.frame(*centre, HIGH_NM, SHAPE, "confirm")
    res.alerts = [alert(res.geometry, res.seq, TARGET_RULE, points, feret_nm=feret_nm)]
    return res


def test_target_book_merges_close_confirmations() -> None:
    fake = FakeSession([])
    book = TargetBook(make_cfg(min_separation_um=1.0), as_session(fake))
    assert len(book.offer(_confirm(fake, (10.0, 10.0), [(10.0, 10.0)]))) == 1
    # 0.6 µm away, seen from another frame: the same target
    assert book.offer(_confirm(fake, (11.0, 9.0), [(10.6, 10.0)])) == []
    assert len(book.targets) == 1 and book.duplicates_merged == 1
    # 2.5 µm away: another target
    new = book.offer(_confirm(fake, (12.0, 10.0), [(12.5, 10.0)]))
    assert [t.id for t in new] == [2]
    assert [(round(t.x_um, 3), round(t.y_um, 3)) for t in book.targets] == [(10.0, 10.0),
                                                                             (12.5, 10.0)]
    assert book.curve == [(1, 1), (3, 2)]
    assert book.near(12.0, 10.0, 0.6) and not book.near(11.3, 10.0, 0.6)


def test_target_book_separation_grows_with_the_feret_length() -> None:
    fake = FakeSession([])
    book = TargetBook(make_cfg(min_separation_um=1.0), as_session(fake))
    # a 4 µm long rod: confirmations 1.5 µm apart are one rod
    book.offer(_confirm(fake, (10.0, 10.0), [(10.0, 10.0)], feret_nm=4000.0))
    book.offer(_confirm(fake, (10.0, 10.0), [(11.5, 10.0)], feret_nm=4000.0))
    assert len(book.targets) == 1 and book.duplicates_merged == 1
    # a 2.2 µm wire seen whole, then only its 1.3 µm end (1.2 µm off centre): they overlap
    book.offer(_confirm(fake, (30.0, 10.0), [(30.0, 10.0)], feret_nm=2200.0))
    book.offer(_confirm(fake, (30.0, 10.0), [(31.2, 10.0)], feret_nm=1300.0))
    assert len(book.targets) == 2 and book.duplicates_merged == 2
    # two 1.5 µm wires 2 µm apart do not overlap: two targets
    book.offer(_confirm(fake, (50.0, 10.0), [(50.0, 10.0)], feret_nm=1500.0))
    book.offer(_confirm(fake, (50.0, 10.0), [(52.0, 10.0)], feret_nm=1500.0))
    assert len(book.targets) == 4


def test_target_book_ignores_other_rules() -> None:
    fake = FakeSession([])
    book = TargetBook(make_cfg(), as_session(fake))
    res = fake.frame(5.0, 5.0, HIGH_NM, SHAPE, "confirm")
    res.alerts = [alert(res.geometry, res.seq, CANDIDATE_RULE, [(5.0, 5.0)])]
    assert book.offer(res) == [] and book.targets == []


# ------------------------------------------------------------------------------ survey


def test_survey_candidates_from_particle_rows() -> None:
    fake = FakeSession([(3.0, 4.0)], [(-2.0, 1.0)])
    res = fake.frame(0.0, 0.0, SURVEY_NM, SHAPE, "survey")
    cands = survey_candidates(res, make_cfg())
    assert sorted((round(c.x_um, 3), round(c.y_um, 3)) for c in cands) == [(-2.0, 1.0),
                                                                          (3.0, 4.0)]
    assert all(c.rule == CANDIDATE_RULE and c.seq == res.seq for c in cands)
    assert all(1.0 <= c.priority < 2.0 for c in cands)
    # a target rule's hit ranks above any candidate rule's
    res.alerts.append(alert(res.geometry, res.seq, TARGET_RULE, [(1.0, 1.0)]))
    res.alerts.append(alert(res.geometry, res.seq, "unrelated", [(2.0, 2.0)]))
    cands = survey_candidates(res, make_cfg())
    best = max(cands, key=lambda c: c.priority)
    assert best.rule == TARGET_RULE and best.priority >= 2.0
    assert len(cands) == 3


def test_survey_candidate_at_a_heatmap_peak() -> None:
    fake = FakeSession([])
    res = fake.frame(10.0, -5.0, SURVEY_NM, SHAPE, "survey")
    heat = np.zeros((8, 8), np.uint8)
    heat[2, 5] = 200
    heat[6, 1] = 90
    header = AlertHeader(source=SOURCE, seq=res.seq, t_acq_ns=1, rule="novelty",
                         kind="novelty", severity="info", value=0.9, threshold=0.5,
                         explanation="unusual frame", heatmap_shape=(8, 8))
    res.alerts = [Message(f"alert.{SOURCE}", header, np.zeros(0, PARTICLE_DTYPE), heat)]
    cands = survey_candidates(res, make_cfg(candidate_rules=("novelty",)))
    assert len(cands) == 1
    c = cands[0]
    assert isinstance(c, Candidate) and c.rule == "novelty" and c.seq == res.seq
    # heatmap cell (2, 5) covers rows 16..23, cols 40..47: its centre is pixel (19.5, 43.5),
    # (19.5 - 31.5, 43.5 - 31.5) px × 0.4 µm from the frame centre
    assert (c.x_um, c.y_um) == pytest.approx((10.0 + 12 * 0.4, -5.0 - 12 * 0.4))
    assert c.priority == pytest.approx(0.5)
    # the same alert with no particle table at all
    res.alerts = [Message(f"alert.{SOURCE}", header, None, heat)]
    assert survey_candidates(res, make_cfg(candidate_rules=("novelty",))) == cands
    # not a rule of this search: no candidate
    assert survey_candidates(res, make_cfg()) == []


# ------------------------------------------------------------------------------ failures


def test_raster_survives_a_failed_frame() -> None:
    cfg = make_cfg()
    tiles = tile_centres(AREA, (6.4, 6.4), cfg.overlap_um)
    fake = FakeSession(list(TARGETS), fail={3})
    res = raster_search(as_session(fake), cfg)
    # the failed tile is taken once more
    assert res.stopped == "done" and res.frames == len(tiles) + 1
    assert res.failed_frames == 1
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS)


def test_adaptive_survives_failed_frames() -> None:
    # frames 2 and 5 fail: both are survey tiles (2, and 5 = the retake of 2 moved the count);
    # each is taken once more, so nothing is lost
    fake = FakeSession(list(TARGETS), DECOYS, fail={2, 5})
    res = adaptive_search(as_session(fake), make_cfg())
    assert res.failed_frames == 2
    assert res.stopped == "candidates exhausted"
    assert res.survey_frames == 4 + 2
    assert res.frames == len(fake.shots)
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS)


def test_a_failed_confirmation_frame_prunes_no_candidate() -> None:
    # as in the "already covered" test, but the first confirmation frame fails: the other
    # candidate is still visited, and its frame sees the target whole
    fake = FakeSession([(10.0, 10.0)], [(11.1, 10.0)], fail={5})
    res = adaptive_search(as_session(fake), make_cfg())
    assert res.survey_frames == 4 and res.candidates == 2
    # the failed frame is taken again and covers both candidates
    assert res.confirm_frames == 2 and res.failed_frames == 1
    assert len(res.targets) == 1


def test_adaptive_retries_a_candidate_whose_confirmation_frame_failed() -> None:
    # a failed frame (result timeout) is taken once more: its candidate is not lost
    fake = FakeSession(list(TARGETS), DECOYS, fail={5})  # 4 survey frames, then the 1st confirm
    res = adaptive_search(as_session(fake), make_cfg())
    assert res.failed_frames == 1
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS)


@dataclass
class FailsAt(FakeSession):
    """Every frame centred on ``bad`` (µm) brings no results."""

    bad: tuple[float, float] = (0.0, 0.0)

    def frame(self, x_um: float, y_um: float, *a: Any, **kw: Any) -> FrameResult:
        res = super().frame(x_um, y_um, *a, **kw)
        if math.hypot(x_um - self.bad[0], y_um - self.bad[1]) < 0.01:
            res.error, res.alerts, res.n_particles = "no complete results", [], None
            self.costs.failed_frames += 1
        return res


def test_a_candidate_whose_confirmation_frames_failed_is_looked_at_again_later() -> None:
    """Its confirmation frame and the retake failed (frames 5 and 6: the daemon restarting):
    the candidate was dropped and the search said "candidates exhausted" with 3 of 4 targets.
    Now it is visited once more after the others; never imaged with results, it is left
    unchecked and the search says "incomplete"."""
    fake = FakeSession(list(TARGETS), DECOYS, fail={5, 6})
    res = adaptive_search(as_session(fake), make_cfg())
    assert res.failed_frames == 2
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS)
    assert res.stopped == "candidates exhausted" and res.unchecked == []

    fake = FailsAt(list(TARGETS), DECOYS, bad=TARGETS[0])
    res = adaptive_search(as_session(fake), make_cfg())
    assert sum(math.hypot(s.x - TARGETS[0][0], s.y - TARGETS[0][1]) < 0.01
               for s in fake.shots) == 4  # two tries of a frame and its retake
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS[1:])
    assert res.stopped == "incomplete"
    assert [(c.x_um, c.y_um) for c in res.unchecked] == [pytest.approx(TARGETS[0])]
    assert res.summary()["unchecked_candidates"] == [list(TARGETS[0])]  # µm to 1 nm


def test_high_magnification_frames_ask_for_the_45_degree_view() -> None:
    fake = FakeSession(list(TARGETS), DECOYS)
    res = adaptive_search(as_session(fake), make_cfg())
    asked = [m is not None and m.get("rotate45") is True for m in fake.metas]
    assert asked == [s.purpose != "survey" for s in fake.shots] and any(asked) and res.targets
    fake = FakeSession(list(TARGETS))
    raster_search(as_session(fake), replace(make_cfg(), rotate45_high_mag=False))
    assert fake.metas and all(m is None for m in fake.metas)


# ------------------------------------------------------------ the microscope fails, bad rows


@pytest.mark.parametrize(("strategy", "fails_at"), [("raster", 40), ("adaptive", 7)])
def test_a_failing_microscope_stops_the_search_with_what_it_found(strategy: str,
                                                                  fails_at: int) -> None:
    whole = run_search(strategy, as_session(FakeSession(list(TARGETS), DECOYS)),  # type: ignore[arg-type]
                       make_cfg())
    fake = FakeSession(list(TARGETS), DECOYS, control_fails_at=fails_at)
    res = run_search(strategy, as_session(fake), make_cfg())  # type: ignore[arg-type]
    assert res.stopped == "error" and res.error is not None and "no answer" in res.error
    assert res.frames == fails_at - 1 == len(fake.shots)  # no frame after the failure
    assert 0 < len(res.targets) < len(whole.targets)
    assert [(t.x_um, t.y_um) for t in res.targets] == \
        [(t.x_um, t.y_um) for t in whole.targets][:len(res.targets)]
    assert res.summary()["error"] == res.error and res.summary()["stopped"] == "error"


def test_a_microscope_failing_in_the_survey_stops_the_adaptive_search() -> None:
    fake = FakeSession(list(TARGETS), DECOYS, control_fails_at=2)
    res = adaptive_search(as_session(fake), make_cfg())
    assert res.stopped == "error" and res.frames == 1 and res.confirm_frames == 0
    assert res.targets == []


def test_a_target_row_without_a_position_is_skipped_and_counted() -> None:
    fake = FakeSession([])
    book = TargetBook(make_cfg(), as_session(fake))
    res = _confirm(fake, (10.0, 10.0), [(9.0, 9.0), (10.0, 10.0), (11.0, 11.0)])
    table = res.alerts[0].array
    assert table is not None
    table["x"][0] = table["y"][0] = np.nan  # the daemon's row without a position
    table["score"][2] = np.nan
    new = book.offer(res)
    assert [(round(t.x_um, 3), round(t.y_um, 3)) for t in new] == [(10.0, 10.0)]
    assert book.skipped_rows == 2 and fake.crops == 1  # no thumbnail asked for a bad row
    # a measurement that was not made (non-finite) is left out, not fatal
    res = _confirm(fake, (20.0, 20.0), [(20.0, 20.0)], feret_nm=np.inf)
    assert res.alerts[0].array is not None
    res.alerts[0].array["aspect_ratio"] = np.nan
    (t,) = book.offer(res)
    assert t.feret_max_nm is None and t.aspect_ratio is None and book.skipped_rows == 2


class NanRows(FakeSession):
    """Every target alert starts with a row without a position (x = y = NaN)."""

    def frame(self, x_um: float, y_um: float, pixel_size_nm: float, shape: tuple[int, int],
              purpose: str, meta: dict[str, str | int | float | bool] | None = None
              ) -> FrameResult:
        res = super().frame(x_um, y_um, pixel_size_nm, shape, purpose, meta)
        bad = np.zeros(1, PARTICLE_DTYPE)
        bad["x"] = bad["y"] = np.nan
        bad["score"] = 0.9
        res.alerts = [Message(m.topic, m.header, np.concatenate([bad, m.array]))
                      for m in res.alerts if m.array is not None]
        return res


def test_a_search_keeps_going_past_a_row_without_a_position() -> None:
    fake = NanRows(list(TARGETS), DECOYS)
    res = raster_search(as_session(fake), make_cfg())
    assert res.stopped == "done" and res.error is None
    assert_found_once([(t.x_um, t.y_um) for t in res.targets], TARGETS)
    assert res.skipped_rows == sum(1 for pts in fake.seen if pts) > 0
    assert res.summary()["skipped_rows"] == res.skipped_rows


# ------------------------------------------------------------ nanoscout search (command.run)


def _run_command(tmp_path: Path, fake: FakeSession, monkeypatch: pytest.MonkeyPatch,
                 **budgets: float | None) -> tuple[int, Path]:
    import argparse

    from nanoscout.clients.search import command

    monkeypatch.setattr(command, "SearchSession", lambda *a, **kw: fake)
    out = tmp_path / "found"
    args = argparse.Namespace(
        control=f"ipc://{tmp_path}/never-asked", connect=f"ipc://{tmp_path}/nor-this",
        strategy="raster", area=AREA, target_rule=[TARGET_RULE], candidate_rule=[],
        pixel_size=HIGH_NM, survey_pixel_size=SURVEY_NM, size=SHAPE[0], overlap=3.0,
        budget_frames=None, budget_s=None, budget_dose=None, min_separation=1.0,
        result_timeout=3.0, out=out)
    for k, v in budgets.items():
        setattr(args, k, v)
    return command.run(args, None), out


def test_the_command_writes_what_was_found_when_the_microscope_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from nanoscout.clients.search.navigator import read_json, read_nav

    code, out = _run_command(tmp_path, FakeSession(list(TARGETS), control_fails_at=40),
                             monkeypatch)
    assert code == 2
    found = read_json(out / "targets.json")
    assert 0 < len(found) < len(TARGETS) and len(read_nav(out / "targets.nav")) == len(found)
    assert len((out / "targets.csv").read_text().splitlines()) == len(found) + 1
    meta = json.loads((out / "search.json").read_text())["search"]
    assert meta["stopped"] == "error" and "no answer from the microscope" in meta["error"]
    assert meta["targets"] == len(found) and meta["frames"] == 39
    err = capsys.readouterr().err
    assert "error: no answer from the microscope" in err and str(out) in err


def test_the_command_skips_a_row_without_a_position(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoscout.clients.search.navigator import read_json

    fake = NanRows(list(TARGETS))
    code, out = _run_command(tmp_path, fake, monkeypatch)
    assert code == 0
    assert_found_once([(t.x_um, t.y_um) for t in read_json(out / "targets.json")], TARGETS)
    meta = json.loads((out / "search.json").read_text())["search"]
    assert meta["stopped"] == "done" and meta["error"] is None
    assert meta["skipped_rows"] == sum(1 for pts in fake.seen if pts) > 0


def test_the_command_states_spent_vs_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSession(list(TARGETS))
    code, out = _run_command(tmp_path, fake, monkeypatch, budget_dose=1.0, budget_s=100.0)
    assert code == 0
    meta = json.loads((out / "search.json").read_text())["search"]
    assert meta["stopped"] == "budget: dose" and meta["frames"] == 3 == len(fake.shots)
    assert meta["budgets"]["mean_dose_e_per_nm2"] == {"spent": 0.768, "budget": 1.0}
    assert meta["budgets"]["instrument_s"]["budget"] == 100.0
    assert meta["budgets"]["frames"] == {"spent": 3, "budget": None}
    detail = ("dose: 0.768 of 1 e/nm² spent; the next frame (~0.256 e/nm²) would have made "
              "1.024 e/nm², 0.024 e/nm² over the budget")
    assert meta["stop_detail"] == detail
    assert f"search: budget {detail}" in capsys.readouterr().out


@dataclass
class SignalledAt(FakeSession):
    """The operator presses Ctrl-C while frame ``at`` (1-based) is taken."""

    at: int = 5

    def frame(self, *a: Any, **kw: Any) -> FrameResult:
        res = super().frame(*a, **kw)
        if self.costs.frames == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return res


def test_ctrl_c_ends_the_command_between_frames_with_what_was_found_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A signal ended a search with a KeyboardInterrupt and nothing written; now it ends the
    search before the next frame, the targets found so far are written, exit status 130, and
    the handlers before the command are back."""
    from nanoscout.clients.search.navigator import read_json

    before = signal.getsignal(signal.SIGINT)
    fake = SignalledAt(list(TARGETS), at=25)
    code, out = _run_command(tmp_path, fake, monkeypatch)
    assert code == 130 and signal.getsignal(signal.SIGINT) is before
    meta = json.loads((out / "search.json").read_text())["search"]
    assert meta["stopped"] == "interrupted" and meta["frames"] == 25 == len(fake.shots)
    assert len(read_json(out / "targets.json")) == meta["targets"] > 0
    assert "interrupted" in capsys.readouterr().err


@dataclass
class StopsAt(FakeSession):
    """A stage that never gets past x = ``stop_um`` (and says where it is)."""

    stop_um: float = 20.0

    def frame(self, x_um: float, *a: Any, **kw: Any) -> FrameResult:
        return super().frame(min(x_um, self.stop_um), *a, **kw)


def test_the_command_says_when_tiles_were_never_imaged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The raster said "done" with the area beyond x = 23.2 µm (42 %) never imaged. It ends
    "incomplete", exit status 3 (it was 0, as for a search that covered its area)."""
    fake = StopsAt(list(TARGETS))
    code, out = _run_command(tmp_path, fake, monkeypatch)
    assert code == 3
    meta = json.loads((out / "search.json").read_text())["search"]
    assert meta["stopped"] == "incomplete"
    cov = meta["coverage"]
    # the share imaged, never more than was (x up to 20 + 3.2 µm of 40)
    assert 23.2 / 40 - 0.01 <= cov["area_fraction"] <= 23.2 / 40
    assert cov["missed_tiles"] and all(x > 20.0 for x, _ in cov["missed_tiles"])
    assert meta["off_target_frames"] == 2 * len(cov["missed_tiles"])  # each taken twice
    err = capsys.readouterr().err
    assert (f"incomplete: {len(cov['missed_tiles'])} of {cov['tiles']} tiles were never "
            f"imaged and analysed ({100 * cov['area_fraction']:.1f} % of the area was)") in err
