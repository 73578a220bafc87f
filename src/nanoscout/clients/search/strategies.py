"""Search strategies: a full high-magnification raster, and an adaptive survey → confirm search.

* :func:`raster_search` (the baseline) images the whole area at the high magnification, tiles
  overlapping by ``overlap_um`` (at least the largest target, so each lies wholly in one tile),
  and keeps every particle that a *target rule* of the daemon fired on.
* :func:`adaptive_search` first surveys the area at a low magnification (few, large frames),
  ranks *candidates* — particles that a candidate or target rule fired on, and the class
  activation map peaks of class / novelty rules — then visits them best first at the high
  magnification; only a target rule firing on a high-magnification frame confirms a target.
  Candidates that a confirmation frame already covered are not visited again. A candidate on
  which a target rule already fired in the survey, but that its confirmation frame did not
  confirm, gets one second look from another place in the frame.

Both stop at the budget (frames, instrument seconds or mean electron dose, whichever comes
first). A budget is a limit the totals never pass: a frame is taken only when what was spent
plus what that frame will cost stays within every budget — one frame for the frame budget, and
for time and dose the estimate of :meth:`~nanoscout.clients.search.session.Costs.estimate`
(from the frames so far: the move to the frame's place, the exposure and dose of the latest
frame at its magnification). Before the first frame the microscope's ``status`` says what a
frame costs (its exposure and dose at the current settings): a dose budget smaller than one
frame takes no frame, nor a time budget shorter than one exposure (the first move is not known
before it is made). A microscope that does not say (an older one) reports a frame's exposure
and dose only with the frame: the first frame is then taken unless a budget is 0, and a budget
smaller than one frame stops the search after it. ``stopped`` names the
budget ("budget: frames", "budget: instrument time", "budget: dose"); ``budget_stop`` says what
was spent, what the refused frame would have cost and by how much it would have passed the
budget.

The area a sweep (the raster, the adaptive survey) claims is the area its *analysed* frames
imaged, where the microscope says they were (the acquisition's stage position and actual pixel
size), never where they were asked for. A tile whose frame landed off its place (backlash,
drift, a move reported done that did not happen) by more than a quarter of the overlap on a side
it shares with a neighbour, or at all on the area's edge, is taken once more; a microscope that
gives a smaller field of view than asked (the nearest of its discrete magnifications) has the
rest of the area tiled with the field it gives. A tile still not imaged (and analysed) at the
end is *missed*: ``stopped`` is then "incomplete", ``coverage`` the share of the area imaged and
``missed_tiles`` their centres. A confirmation frame that did not land with its candidate inside
is taken once more too; a candidate whose frame and retake both failed (no results, or not on
it) is visited once more after the others, and one still not imaged with results ends the
search "incomplete" too (``unchecked``). When ``max_failed_in_a_row`` frames in a row bring no results (the
daemon is gone), the search stops with ``stopped`` = "error": it does not go on dosing the
specimen with frames nobody analyses.

A raster search can be resumed (:class:`Prior`, what an earlier run of the same search imaged
and found): its sweep starts from the earlier run's analysed frames and the tiling it ended
with, so it images only the tiles whose duty no earlier frame holds (a tile whose earlier frame
brought no results is taken: it was dosed but never searched), and its targets are de-duplicated
against the earlier run's, whose ids they continue. An adaptive search cannot be resumed
(:func:`run_search` refuses): its confirmations are chosen from the whole survey's candidates,
best first, and a run stopped part-way leaves no record of which candidates were looked at, or
what a confirmation frame that did not land on its candidate still owes it.

A move the stage refuses because it cannot reach that place (outside its limits, a soft limit,
a forbidden region: the microscope answers ``unreachable``, :class:`MoveRefused`) skips that tile
or candidate and the search goes on: no frame was taken, nothing was spent. The tile is then
missed (the search ends "incomplete") and its centre listed in ``unreachable_tiles`` too; a
candidate the stage cannot reach is left unchecked at once. A refusal is the microscope's
failure, not a place's, when ``max_refused_in_a_row`` moves in a row are refused (a stage that
refuses every place is broken: a sweep meets at most twice a row's tiles beyond a limit in a
row, at a turn of its serpentine).

The search also stops when the microscope fails (its control socket does not answer, answers
garbage, refuses anything but a move out of reach, or refuses ``max_refused_in_a_row`` moves in
a row): the search then stops at once and returns what it found so far,
with ``stopped`` = "error" and the failure in ``error``; or, between two frames, when ``stop`` is set (the
operator's Ctrl-C or SIGTERM): ``stopped`` = "interrupted". A frame whose results do not come
back is taken once more. An alert row that cannot be a target (a non-finite position, score or alert value) is
skipped, logged and counted (``skipped_rows``); a non-finite optional measurement (ECD, Feret
length, aspect ratio) is left out (None). High-magnification frames
ask the daemon for its 45° view too (frame meta ``rotate45``; wires along an image axis). Targets
are kept in stage coordinates and de-duplicated: two confirmations closer than
``min_separation_um``, or than their half Feret lengths added, are one target.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from nanoscout.clients.microscope.control import ControlError, MoveRefused
from nanoscout.clients.search.geometry import (
    Area,
    Coverage,
    FrameGeometry,
    tile_centres,
    tile_duty,
)
from nanoscout.clients.search.navigator import FoundTarget
from nanoscout.clients.search.session import FrameResult, SearchSession
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.particles import SHAPE_CLASSES
from nanoscout.wire.protocol import AlertHeader

log = logging.getLogger("nanoscout.search")

Strategy = Literal["raster", "adaptive"]

_TARGET_WEIGHT = 2.0  # candidate priority of a target rule's hit in the survey (others: 1)


@dataclass(frozen=True)
class SearchConfig:
    """What to look for, where, and how much the search may spend. Lengths µm unless named."""

    area: Area
    target_rules: tuple[str, ...]  # daemon alert rules that confirm a target (high mag.)
    candidate_rules: tuple[str, ...] = ()  # rules that only nominate candidates (survey)
    pixel_size_nm: float = 20.0  # high magnification: raster and confirmation frames
    survey_pixel_size_nm: float = 80.0
    shape: tuple[int, int] = (512, 512)  # rows, cols px, every frame
    overlap_um: float = 3.0  # tile overlap, >= the largest target
    #: the most frames, instrument time (stage moves + exposures, s) and mean electron dose
    #: over the search area (e/nm²) the search may spend: the totals never pass them (a frame
    #: is taken only when its estimated cost fits what is left; see the module docstring)
    budget_frames: int | None = None
    budget_s: float | None = None
    budget_dose_e_per_nm2: float | None = None
    min_separation_um: float = 1.0
    #: a candidate this far inside a confirmation frame counts as checked (>= half the
    #: largest target, so it was seen whole)
    confirm_margin_um: float = 2.0
    thumbnail_px: int = 48  # half size of a thumbnail, at least
    #: ask the daemon to look at high-magnification frames turned by 45° too (frame meta
    #: ``rotate45``, honoured with ``[engine] rotate45 = "on-request"``): wires along an image
    #: axis are otherwise missed
    rotate45_high_mag: bool = True
    #: frames in a row without results (each tile's retake included) that stop the search
    #: with an error: the daemon is gone, and frames nobody analyses only dose the specimen
    max_failed_in_a_row: int = 4
    #: moves in a row the stage refuses as out of its reach that stop the search with an
    #: error (a broken stage, not a place out of reach; a refused move skips its place)
    max_refused_in_a_row: int = 16

    def __post_init__(self) -> None:
        if not self.target_rules:
            raise ValueError("a search needs at least one target rule (--target-rule)")
        if self.max_refused_in_a_row < 1:
            raise ValueError(f"max_refused_in_a_row {self.max_refused_in_a_row!r} must be >= 1")
        if self.max_failed_in_a_row < 1:
            raise ValueError(f"max_failed_in_a_row {self.max_failed_in_a_row!r} must be >= 1")
        for name, v in (("pixel_size_nm", self.pixel_size_nm),
                        ("survey_pixel_size_nm", self.survey_pixel_size_nm)):
            if not v > 0:
                raise ValueError(f"{name} {v!r} must be > 0")


@dataclass(frozen=True)
class Prior:
    """What an earlier run of the same raster search imaged and found, to resume it: its
    analysed frames (where the microscope said they were), the field of view its tiling ended
    with (x, y µm; a camera may give a smaller one than asked) and its targets (ids from 1)."""

    frames: tuple[FrameGeometry, ...]
    fov_um: tuple[float, float]
    targets: tuple[FoundTarget, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """A place worth a closer look, µm; larger ``priority`` first."""

    x_um: float
    y_um: float
    priority: float
    rule: str
    seq: int


@dataclass(frozen=True)
class BudgetStop:
    """The budget that stopped a search, in ``unit``: what was spent, what the frame it
    refused would have cost (None: not known, before the first frame of a microscope that does
    not report its settings) and the budget."""

    budget: str  # "frames", "instrument time" or "dose"
    unit: str  # "frames", "s" or "e/nm²" (mean over the search area)
    spent: float
    next_frame: float | None
    limit: float

    @property
    def over(self) -> float:
        """By how much the refused frame would have passed the budget, in ``unit``."""
        return self.spent + (self.next_frame or 0.0) - self.limit

    def __str__(self) -> str:
        u = "" if self.unit == "frames" else f" {self.unit}"
        if self.next_frame is None:
            return (f"{self.budget}: {self.spent:.4g} of {self.limit:.4g}{u} spent, "
                    f"nothing left for a frame")
        return (f"{self.budget}: {self.spent:.4g} of {self.limit:.4g}{u} spent; the next "
                f"frame (~{self.next_frame:.4g}{u}) would have made {self.spent + self.next_frame:.4g}"
                f"{u}, {self.over:.4g}{u} over the budget")


@dataclass
class SearchResult:
    """What a search found and spent."""

    strategy: str
    targets: list[FoundTarget]
    frames: int
    instrument_s: float
    wall_s: float
    mean_dose_e_per_nm2: float
    failed_frames: int
    #: why it ended: "done", "candidates exhausted", "budget: frames", ..., "error",
    #: "incomplete" (the sweep missed tiles)
    stopped: str
    duplicates_merged: int = 0
    candidates: int = 0  # nominated in the survey (after merging)
    confirm_frames: int = 0
    survey_frames: int = 0
    #: (frames used, targets found) each time a target was found
    curve: list[tuple[int, int]] = field(default_factory=list)
    #: the survey's candidates after merging, best first (adaptive)
    nominated: list[Candidate] = field(default_factory=list)
    #: the microscope's failure that stopped the search (``stopped`` == "error"), or None
    error: str | None = None
    #: target-rule alert rows that could not be made targets (non-finite position, ...)
    skipped_rows: int = 0
    #: the budget that stopped the search (``stopped`` "budget: ..."), or None
    budget_stop: BudgetStop | None = None
    #: the budgets asked for (None: no limit): frames, instrument s, mean dose e/nm²
    budget_frames: int | None = None
    budget_s: float | None = None
    budget_dose_e_per_nm2: float | None = None
    #: share of the area the sweep's analysed frames imaged (raster, or the adaptive survey),
    #: 0..1; "done" / "candidates exhausted" only when no tile was missed
    coverage: float = 0.0
    #: tiles of the sweep (its final plan), and the centres (µm) of those never imaged and
    #: analysed (empty when the sweep was stopped before its end: ``coverage`` says how far)
    tiles: int = 0
    missed_tiles: list[tuple[float, float]] = field(default_factory=list)
    #: frames that did not land where they were asked for (each taken once more)
    off_target_frames: int = 0
    #: candidates (adaptive) that no confirmation frame imaged with results, after two tries
    #: (or that the stage refused to reach)
    unchecked: list[Candidate] = field(default_factory=list)
    #: places (µm) the stage refused to move to (a tile's or a candidate's centre), each once
    unreachable: list[tuple[float, float]] = field(default_factory=list)
    #: the sweep's analysed frames (an earlier run's first when resumed), and the field of
    #: view (x, y µm) its tiling ended with: what a resumed search starts from (:class:`Prior`)
    imaged: list[FrameGeometry] = field(default_factory=list)
    sweep_fov_um: tuple[float, float] | None = None

    def sweep_record(self) -> dict[str, object]:
        """The sweep as ``search.json`` keeps it for a resumed run: ``fov_um`` and one row of
        :data:`SWEEP_FRAME_COLUMNS` per analysed frame (full precision: a resumed run must
        find exactly the frames that were)."""
        return {"fov_um": None if self.sweep_fov_um is None else list(self.sweep_fov_um),
                "frame_columns": list(SWEEP_FRAME_COLUMNS),
                "frames": [[*g.center_um, g.pixel_size_nm, *g.shape,
                            *g.image_to_stage[0], *g.image_to_stage[1]] for g in self.imaged]}

    def summary(self) -> dict[str, object]:
        """JSON-friendly numbers (no thumbnails)."""
        first = self.targets[0] if self.targets else None
        return {
            "strategy": self.strategy, "targets": len(self.targets), "frames": self.frames,
            "survey_frames": self.survey_frames, "confirm_frames": self.confirm_frames,
            "candidates": self.candidates, "instrument_s": round(self.instrument_s, 2),
            "wall_s": round(self.wall_s, 2),
            "mean_dose_e_per_nm2": round(self.mean_dose_e_per_nm2, 4),
            "failed_frames": self.failed_frames, "duplicates_merged": self.duplicates_merged,
            "skipped_rows": self.skipped_rows, "stopped": self.stopped,
            "stop_detail": None if self.budget_stop is None else str(self.budget_stop),
            "budgets": {  # spent vs budget (None: no limit)
                "frames": {"spent": self.frames, "budget": self.budget_frames},
                "instrument_s": {"spent": round(self.instrument_s, 2),
                                 "budget": self.budget_s},
                "mean_dose_e_per_nm2": {"spent": round(self.mean_dose_e_per_nm2, 4),
                                        "budget": self.budget_dose_e_per_nm2}},
            "error": self.error,
            "coverage": {"area_fraction": round(self.coverage, 4), "tiles": self.tiles,
                         "missed_tiles": [[round(x, 3), round(y, 3)]
                                          for x, y in self.missed_tiles],
                         # the missed tiles the stage refused to reach
                         "unreachable_tiles": [[round(x, 3), round(y, 3)]
                                               for x, y in self.missed_tiles
                                               if (x, y) in self.unreachable]},
            "unreachable": [[round(x, 3), round(y, 3)] for x, y in self.unreachable],
            "off_target_frames": self.off_target_frames,
            "unchecked_candidates": [[round(c.x_um, 3), round(c.y_um, 3)]
                                     for c in self.unchecked],
            "first_target": None if first is None else {
                "frames": first.frame_index, "wall_s": round(first.t_s, 2),
                "instrument_s": round(first.instrument_s, 2)},
            "curve": self.curve,
        }


#: the columns of a frame of :meth:`SearchResult.sweep_record`: centre µm, pixel size nm,
#: shape px, the image-to-stage matrix by rows
SWEEP_FRAME_COLUMNS = ("x_um", "y_um", "pixel_size_nm", "rows", "cols", "a", "b", "c", "d")


class TargetBook:
    """Confirmed targets in stage coordinates, de-duplicated across overlapping frames (and
    against ``earlier``: an earlier run's targets, when the search is resumed)."""

    def __init__(self, cfg: SearchConfig, session: SearchSession,
                 earlier: tuple[FoundTarget, ...] = ()) -> None:
        self.cfg = cfg
        self.session = session
        self.targets: list[FoundTarget] = list(earlier)
        self.duplicates_merged = 0
        #: alert rows that could not be made targets (logged)
        self.skipped_rows = 0
        self.curve: list[tuple[int, int]] = []

    def _same(self, dist_um: float, feret_a: float | None, feret_b: float | None) -> bool:
        """Two confirmations this far apart are one target: closer than ``min_separation_um``
        or than their half lengths added (they overlap: a wire seen whole in one frame and
        only in part in the next)."""
        half = sum(f / 2e3 for f in (feret_a, feret_b) if f is not None and math.isfinite(f))
        return dist_um <= max(self.cfg.min_separation_um, half)

    def near(self, x_um: float, y_um: float, radius_um: float) -> bool:
        """True when a target was found within ``radius_um`` of (x, y)."""
        return any(math.hypot(t.x_um - x_um, t.y_um - y_um) <= radius_um for t in self.targets)

    def offer(self, res: FrameResult) -> list[FoundTarget]:
        """Add the targets that ``res``'s target-rule alerts name; returns the new ones.

        A row that cannot be a target (non-finite position, score or alert value) is skipped,
        logged and counted in ``skipped_rows``; the other rows are still taken."""
        new: list[FoundTarget] = []
        for msg in res.alerts:
            h = msg.header
            if (not isinstance(h, AlertHeader) or h.rule not in self.cfg.target_rules
                    or msg.array is None):
                continue
            for k, row in enumerate(msg.array):
                try:
                    target = self._target(res, h, row)
                except ValueError as exc:
                    self.skipped_rows += 1
                    log.warning("frame %s#%d: alert %r row %d is no target: %s", res.source,
                                res.seq, h.rule, k, exc)
                    continue
                if target is not None:
                    new.append(target)
        return new

    def _target(self, res: FrameResult, h: AlertHeader, row: np.void) -> FoundTarget | None:
        """The new target ``row`` names, or None when it is one found before; raises
        ValueError naming the field when the row cannot be a target."""
        units = h.units
        x, y = (float(v) for v in res.geometry.to_stage(float(row["y"]), float(row["x"])))
        if not (math.isfinite(x) and math.isfinite(y)):
            # checked before the thumbnail is asked of the microscope
            raise ValueError(f"position must be finite, got x {float(row['x'])!r}, "
                             f"y {float(row['y'])!r} px")
        feret = _finite_or_none(float(row["feret_max_nm"])) if units == "nm" else None
        if any(self._same(math.hypot(t.x_um - x, t.y_um - y), feret, t.feret_max_nm)
               for t in self.targets):
            self.duplicates_merged += 1
            return None
        score, value, threshold = float(row["score"]), float(h.value), float(h.threshold)
        for name, v in (("score", score), ("alert value", value),
                        ("alert threshold", threshold)):
            if not math.isfinite(v):  # before the thumbnail is asked of the microscope
                raise ValueError(f"{name} must be finite, got {v!r}")
        half = self.cfg.thumbnail_px
        if feret is not None:
            half = int(min(256, max(half, 0.75 * feret / res.geometry.pixel_size_nm)))
        target = FoundTarget(
            id=max((t.id for t in self.targets), default=0) + 1, rule=h.rule, label=_label(h.rule, row),
            x_um=x, y_um=y, confidence=score, value=value, threshold=threshold,
            units=units, ecd_nm=_nm(row, "ecd_nm", units),
            feret_max_nm=feret, aspect_ratio=_finite_or_none(float(row["aspect_ratio"])),
            source=res.source, seq=res.seq,
            pixel_size_nm=res.geometry.pixel_size_nm, frame_index=res.index,
            t_s=res.t_s, instrument_s=res.instrument_s,
            thumbnail=self.session.crop(res, float(row["y"]), float(row["x"]), half))
        self.targets.append(target)
        self.curve.append((res.index, len(self.targets)))
        return target


def _label(rule: str, row: np.void) -> str:
    k = int(row["shape_class"])
    return f"{rule} ({SHAPE_CLASSES[k]})" if 0 <= k < len(SHAPE_CLASSES) else rule


def _finite_or_none(v: float) -> float | None:
    """``v``, or None when it is NaN or infinite (a measurement that was not made)."""
    return v if math.isfinite(v) else None


def _nm(row: np.void, name: str, units: str) -> float | None:
    return _finite_or_none(float(row[name])) if units == "nm" else None


#: relative slack of a budget check: sums of frame costs round differently from the budget
_ROUNDING = 1e-9


class _Budget:
    def __init__(self, cfg: SearchConfig, session: SearchSession,
                 stop: threading.Event | None = None) -> None:
        self.cfg, self.session, self.stop = cfg, session, stop
        #: the microscope's failure that stopped the search (no frame may be taken), or None
        self.error: str | None = None
        #: the budget that refused the latest frame asked for, or None
        self.refused: BudgetStop | None = None
        #: frames in a row whose results did not come back
        self.failed_in_a_row = 0
        #: frames that did not land where they were asked for
        self.off_target = 0
        #: places (µm) the stage refused to move to, and the refusals since its last move
        self.unreachable: list[tuple[float, float]] = []
        self.refused_in_a_row = 0

    def refuse(self, x_um: float, y_um: float, pixel_size_nm: float, shape: tuple[int, int]
               ) -> str | None:
        """Why a frame at (x, y) µm, ``pixel_size_nm`` and ``shape`` px may not be taken
        ("interrupted", "budget: ..." with :attr:`refused` saying by how much), or None."""
        self.refused = None
        if self.stop is not None and self.stop.is_set():
            return "interrupted"
        c, cfg = self.session.costs, self.cfg
        if cfg.budget_frames is not None and c.frames + 1 > cfg.budget_frames:
            self.refused = BudgetStop("frames", "frames", c.frames, 1, cfg.budget_frames)
            return "budget: frames"
        est = c.estimate(x_um, y_um, pixel_size_nm, shape)
        a = cfg.area.width * cfg.area.height  # µm²: a frame's dose × area over it is its mean
        dose_area = None if est is None else est.dose_e_nm2_area
        for name, unit, spent, cost, limit in (
                ("instrument time", "s", c.instrument_s,
                 None if est is None else est.instrument_s, cfg.budget_s),
                ("dose", "e/nm²", c.mean_dose(cfg.area),
                 None if dose_area is None else dose_area / a, cfg.budget_dose_e_per_nm2)):
            if limit is None:
                continue
            # an unknown cost (the first frame of a microscope that does not report its
            # settings) is taken while something is left
            over = spent >= limit if cost is None else spent + cost > limit * (1 + _ROUNDING)
            if over:
                self.refused = BudgetStop(name, unit, spent, cost, limit)
                return f"budget: {name}"
        return None


def _clamp(session: SearchSession, x: float, y: float) -> tuple[float, float]:
    lim = session.limits
    if lim is None:
        return x, y
    return min(max(x, lim.x_min), lim.x_max), min(max(y, lim.y_min), lim.y_max)


Progress = Callable[[FrameResult, list[FoundTarget]], None]


def _take(session: SearchSession, budget: _Budget, x: float, y: float, pixel_size_nm: float,
          shape: tuple[int, int], purpose: str,
          landed: Callable[[FrameGeometry], bool] | None = None) -> list[FrameResult] | None:
    """One frame, and the frames taken: a frame whose results did not come (engine failure,
    timeout), or that did not land where it should (``landed`` says False of where the
    microscope says it was), is taken once more, budget permitting, so a transient failure
    does not lose what it would have shown (an off-target frame's results count too: it imaged
    somewhere). A move the stage refuses as out of its reach (:class:`MoveRefused`) takes no
    frame: the place is added to ``budget.unreachable`` and the frames taken returned (none
    when it was the first). None when the microscope failed (no answer, garbage, another
    refusal, ``max_refused_in_a_row`` moves refused in a row) or ``max_failed_in_a_row`` frames
    in a row brought no results: ``budget.error`` says why, and the search stops with what it
    found."""
    meta: dict[str, str | int | float | bool] | None = None
    if purpose != "survey" and budget.cfg.rotate45_high_mag:
        meta = {"rotate45": True}
    shots: list[FrameResult] = []
    try:
        res = _moved(budget, session.frame(x, y, pixel_size_nm, shape, purpose, meta))
        shots.append(res)
        off = res.error is None and landed is not None and not landed(res.geometry)
        if off:
            budget.off_target += 1
            cx, cy = res.geometry.center_um
            log.warning("frame at (%.2f, %.2f) µm landed at (%.2f, %.2f) µm", x, y, cx, cy)
        if (res.error is not None and budget.failed_in_a_row < budget.cfg.max_failed_in_a_row
                or off) and budget.refuse(x, y, pixel_size_nm, shape) is None:
            log.warning("taking frame at (%.2f, %.2f) µm again", x, y)
            res = _moved(budget, session.frame(x, y, pixel_size_nm, shape, purpose, meta))
            shots.append(res)
            if res.error is None and landed is not None and not landed(res.geometry):
                budget.off_target += 1
    except MoveRefused as exc:
        budget.refused_in_a_row += 1
        if (x, y) not in budget.unreachable:
            budget.unreachable.append((x, y))
        if budget.refused_in_a_row >= budget.cfg.max_refused_in_a_row:
            budget.error = (f"the stage refused {budget.refused_in_a_row} moves in a row (the "
                            f"last: {exc}); is it working?")
            log.error("the search stops: %s", budget.error)
            return None
        log.warning("skipping (%.2f, %.2f) µm: %s", x, y, exc)
        return shots
    except ControlError as exc:
        budget.error = str(exc)
        log.error("the search stops: %s", exc)
        return None
    if budget.failed_in_a_row >= budget.cfg.max_failed_in_a_row:
        budget.error = (f"no results from the daemon for {budget.failed_in_a_row} frames in a "
                        f"row (the last: {res.error}); is it running?")
        log.error("the search stops: %s", budget.error)
        return None
    return shots


def _moved(budget: _Budget, res: FrameResult) -> FrameResult:
    """``res``, a frame the stage moved for (``budget.refused_in_a_row`` reset), its failure
    counted in ``budget.failed_in_a_row`` (reset by a success)."""
    budget.refused_in_a_row = 0
    budget.failed_in_a_row = budget.failed_in_a_row + 1 if res.error is not None else 0
    return res


def _fov(cfg: SearchConfig, pixel_size_nm: float) -> tuple[float, float]:
    return FrameGeometry((0.0, 0.0), pixel_size_nm, cfg.shape).fov_um


def raster_search(session: SearchSession, cfg: SearchConfig,
                  progress: Progress | None = None, stop: threading.Event | None = None,
                  prior: Prior | None = None) -> SearchResult:
    """Image the whole area at the high magnification; every target rule hit is a target.
    ``stop``: set, the search ends before its next frame. ``prior``: resume an earlier run of
    the same search (only the tiles it did not image are taken; its targets are kept)."""
    book = TargetBook(cfg, session, () if prior is None else prior.targets)
    budget = _Budget(cfg, session, stop)

    def found(res: FrameResult) -> list[FoundTarget]:
        return book.offer(res)

    sweep = _Sweep(cfg, cfg.pixel_size_nm, prior)
    stopped = _sweep(session, cfg, budget, sweep, "raster", found, progress)
    return _result("raster", session, cfg, book, budget,
                   stopped or ("incomplete" if sweep.missed else "done"), sweep)


class _Sweep:
    """The tiles of a sweep at one pixel size and what its analysed frames imaged."""

    def __init__(self, cfg: SearchConfig, pixel_size_nm: float, prior: Prior | None = None
                 ) -> None:
        self.pixel_size_nm = pixel_size_nm
        self.fov = _fov(cfg, pixel_size_nm)
        self.coverage = Coverage(cfg.area, self.fov)
        if prior is not None:  # resumed: the earlier run's tiling and what its frames imaged
            self.fov = prior.fov_um
            for g in prior.frames:
                self.coverage.add(g)
        self.tiles = tile_centres(cfg.area, self.fov, cfg.overlap_um)
        #: tiles of the final plan that no analysed frame imaged (once the sweep ended)
        self.missed: list[tuple[float, float]] = []

    def duty(self, cfg: SearchConfig, x: float, y: float) -> Area:
        """What the frame of the tile at (x, y) µm must image (:func:`tile_duty`)."""
        return tile_duty(cfg.area, (x, y), self.fov, cfg.overlap_um / 4)


def _sweep(session: SearchSession, cfg: SearchConfig, budget: _Budget, sweep: _Sweep,
           purpose: str, on_frame: Callable[[FrameResult], list[FoundTarget]],
           progress: Progress | None) -> str:
    """Tile the area at ``sweep.pixel_size_nm``; returns why it stopped early ("" when it ran
    to its end, "error" when the microscope failed or the daemon is gone). Tiles no analysed
    frame imaged are left in ``sweep.missed``."""
    i = 0
    while i < len(sweep.tiles):
        x, y = sweep.tiles[i]
        i += 1
        duty = sweep.duty(cfg, x, y)
        if sweep.coverage.holds(duty) or (x, y) in budget.unreachable:
            continue  # imaged already (the rest of the area tiled anew), or out of reach
        why = budget.refuse(x, y, sweep.pixel_size_nm, cfg.shape)
        if why:
            return why
        shots = _take(session, budget, x, y, sweep.pixel_size_nm, cfg.shape, purpose,
                      _holds(duty))
        if shots is None:
            return "error"
        if not shots:
            continue  # the stage cannot get there: the tile is missed
        for res in shots:
            if res.error is None:
                sweep.coverage.add(res.geometry)
            new = on_frame(res)
            if progress is not None:
                progress(res, new)
        res = shots[-1]
        fx, fy = res.geometry.fov_um
        if res.error is None and (fx < sweep.fov[0] * (1 - 1e-6)
                                  or fy < sweep.fov[1] * (1 - 1e-6)):
            # the microscope gave a smaller field than asked (its nearest magnification): the
            # planned tiles would leave gaps; tile the area anew with the field it gives and
            # skip what is imaged already
            log.warning("frames at %g nm/px are %.3g x %.3g µm, not %.3g x %.3g µm: tiling the "
                        "rest of the area with them", sweep.pixel_size_nm, fx, fy, *sweep.fov)
            sweep.fov = (fx, fy)
            try:
                sweep.tiles = tile_centres(cfg.area, sweep.fov, cfg.overlap_um)
            except ValueError as exc:
                budget.error = (f"the microscope gives frames of {fx:.3g} x {fy:.3g} µm at "
                                f"{sweep.pixel_size_nm:g} nm/px: {exc}")
                log.error("the search stops: %s", budget.error)
                return "error"
            i = 0
    sweep.missed = [(x, y) for x, y in sweep.tiles
                    if not sweep.coverage.holds(sweep.duty(cfg, x, y))]
    if sweep.missed:
        log.warning("%d of %d tiles were not imaged (%.1f %% of the area was)",
                    len(sweep.missed), len(sweep.tiles), 100 * sweep.coverage.fraction)
    return ""


def survey_candidates(res: FrameResult, cfg: SearchConfig) -> list[Candidate]:
    """Candidates named by a survey frame's alerts (particles, or heatmap peaks)."""
    out: list[Candidate] = []
    for msg in res.alerts:
        h = msg.header
        rule = h.rule  # type: ignore[attr-defined]
        weight = _TARGET_WEIGHT if rule in cfg.target_rules \
            else 1.0 if rule in cfg.candidate_rules else 0.0
        if weight == 0.0:
            continue
        if msg.array is not None and len(msg.array):
            for row in msg.array:
                x, y = res.geometry.to_stage(float(row["y"]), float(row["x"]))
                # rule weight first; within a rule, bigger and surer particles first
                size = float(row["ecd_nm"]) if h.units == "nm" else float(row["area_nm2"])  # type: ignore[attr-defined]
                out.append(Candidate(float(x), float(y),
                                     weight + min(size * float(row["score"]) / 1e6, 0.99),
                                     rule, res.seq))
        elif msg.heatmap is not None:
            heat = msg.heatmap
            r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
            h_px, w_px = res.geometry.shape
            row_px = (r + 0.5) * h_px / heat.shape[0] - 0.5
            col_px = (c + 0.5) * w_px / heat.shape[1] - 0.5
            x, y = res.geometry.to_stage(row_px, col_px)
            out.append(Candidate(float(x), float(y), 0.5 * weight, rule, res.seq))
    return out


def _merge(cands: list[Candidate], sep_um: float) -> list[Candidate]:
    """Drop candidates closer than ``sep_um`` to a higher-priority one."""
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: -c.priority):
        if all(math.hypot(c.x_um - k.x_um, c.y_um - k.y_um) > sep_um for k in kept):
            kept.append(c)
    return kept


def adaptive_search(session: SearchSession, cfg: SearchConfig,
                    progress: Progress | None = None, stop: threading.Event | None = None
                    ) -> SearchResult:
    """Survey at low magnification, then confirm the best candidates at high magnification.
    ``stop``: set, the search ends before its next frame."""
    book, budget = TargetBook(cfg, session), _Budget(cfg, session, stop)
    cands: list[Candidate] = []

    def nominate(res: FrameResult) -> list[FoundTarget]:
        cands.extend(c for c in survey_candidates(res, cfg) if cfg.area.contains(c.x_um, c.y_um))
        return []

    sweep = _Sweep(cfg, cfg.survey_pixel_size_nm)
    stopped = _sweep(session, cfg, budget, sweep, "survey", nominate, progress)
    ranked = _merge(cands, cfg.min_separation_um)
    survey = session.costs.frames  # retakes included
    pending = list(ranked)
    n_cands = len(pending)
    visited: list[Candidate] = []
    #: candidates whose confirmation frame (and its retake) brought no results or did not
    #: land on them: looked at once more after the others, then left unchecked
    later: list[Candidate] = []
    unchecked: list[Candidate] = []
    while pending and not stopped:
        x, y = _clamp(session, pending[0].x_um, pending[0].y_um)
        why = budget.refuse(x, y, cfg.pixel_size_nm, cfg.shape)
        if why:
            stopped = why
            break
        best = pending.pop(0)
        if best not in visited:
            visited.append(best)
        sees = _sees(cfg, best, x, y)
        shots = _take(session, budget, x, y, cfg.pixel_size_nm, cfg.shape, "confirm", sees)
        if shots is None:
            stopped = "error"
            break
        if not shots:  # the stage cannot get there: no later look either
            unchecked.append(best)
            continue
        for res in shots:
            new = book.offer(res)
            if res.error is None:
                pending = [c for c in pending
                           if not res.geometry.covers(c.x_um, c.y_um, cfg.confirm_margin_um)]
            if progress is not None:
                progress(res, new)
        if not any(r.error is None and sees(r.geometry) for r in shots) and not book.near(
                best.x_um, best.y_um, cfg.confirm_margin_um):
            if best in later:
                unchecked.append(best)
            else:  # a later look, once: the daemon may be back, the stage may get there
                later.append(best)
                pending.append(best)
    # a second look, from another place in the frame (other context, new noise), at the
    # candidates a *target* rule already fired on in the survey but no confirmation found
    fx, fy = _fov(cfg, cfg.pixel_size_nm)
    for c in visited:
        if stopped:
            break
        if c.priority < _TARGET_WEIGHT or book.near(c.x_um, c.y_um, cfg.confirm_margin_um):
            continue
        x, y = _clamp(session, c.x_um + fx / 4, c.y_um + fy / 4)
        why = budget.refuse(x, y, cfg.pixel_size_nm, cfg.shape)
        if why:
            stopped = why
            break
        shots = _take(session, budget, x, y, cfg.pixel_size_nm, cfg.shape, "confirm",
                      _sees(cfg, c, x, y))
        if shots is None:
            stopped = "error"
            break
        for res in shots:
            new = book.offer(res)
            if progress is not None:
                progress(res, new)
    if not stopped:
        # a survey that missed tiles found no candidates there; a candidate never imaged
        # with results was not checked
        stopped = "incomplete" if sweep.missed or unchecked else "candidates exhausted"
    out = _result("adaptive", session, cfg, book, budget, stopped, sweep)
    out.candidates, out.survey_frames = n_cands, survey
    out.unchecked = unchecked
    out.confirm_frames = session.costs.frames - survey
    out.nominated = ranked
    return out


def _holds(duty: Area) -> Callable[[FrameGeometry], bool]:
    """Whether a frame landed well enough for its tile: it holds the tile's ``duty``."""
    return lambda g: g.holds(duty)


def _sees(cfg: SearchConfig, c: Candidate, x: float, y: float
          ) -> Callable[[FrameGeometry], bool]:
    """Whether a frame asked for at (x, y) µm landed well enough for candidate ``c``: ``c``
    lies inside it as far from its edges as it would have with the frame centred on (x, y), up
    to ``confirm_margin_um``."""
    def sees(g: FrameGeometry) -> bool:
        fx, fy = g.fov_um
        want = min(cfg.confirm_margin_um, fx / 2 - abs(c.x_um - x), fy / 2 - abs(c.y_um - y))
        return g.covers(c.x_um, c.y_um, max(want - 1e-3, 0.0))
    return sees


def _result(strategy: str, session: SearchSession, cfg: SearchConfig, book: TargetBook,
            budget: _Budget, stopped: str, sweep: _Sweep) -> SearchResult:
    c = session.costs
    return SearchResult(
        strategy=strategy, targets=book.targets, frames=c.frames, instrument_s=c.instrument_s,
        wall_s=time.monotonic() - session.t0, mean_dose_e_per_nm2=c.mean_dose(cfg.area),
        failed_frames=c.failed_frames, stopped=stopped,
        duplicates_merged=book.duplicates_merged, curve=book.curve,
        survey_frames=0, confirm_frames=c.frames if strategy == "raster" else 0,
        error=budget.error, skipped_rows=book.skipped_rows,
        budget_stop=budget.refused if stopped.startswith("budget:") else None,
        budget_frames=cfg.budget_frames, budget_s=cfg.budget_s,
        budget_dose_e_per_nm2=cfg.budget_dose_e_per_nm2,
        coverage=sweep.coverage.fraction, tiles=len(sweep.tiles), missed_tiles=sweep.missed,
        off_target_frames=budget.off_target, unreachable=budget.unreachable,
        imaged=list(sweep.coverage.frames), sweep_fov_um=sweep.fov)


def run_search(strategy: Strategy, session: SearchSession, cfg: SearchConfig,
               progress: Progress | None = None, stop: threading.Event | None = None,
               prior: Prior | None = None) -> SearchResult:
    """Run the named strategy; a search area beyond the stage limits, or an overlap the
    sweep's frames cannot tile with, is refused at once (:class:`ConfigError`), as is
    ``prior`` (resume an earlier run) for any strategy but the raster (module docstring).

    A move the stage refuses as out of its reach (:class:`MoveRefused`) skips that place (the
    search ends "incomplete"); when the microscope fails mid-search (:class:`ControlError`: no
    answer, garbage, another refusal, ``max_refused_in_a_row`` refused moves) the search
    stops and the result holds what was found so far, ``stopped`` = "error" and the failure in
    ``error``; nothing found is lost. ``stop`` set ends it before
    its next frame (``stopped`` "interrupted")."""
    if prior is not None and strategy != "raster":
        raise ConfigError(f"a {strategy} search cannot be resumed: its confirmations are "
                          "chosen from the whole survey's candidates, and a run stopped "
                          "part-way does not record which it looked at; only a raster search "
                          "resumes (run the search again, or search with --strategy raster)")
    lim = session.limits
    a = cfg.area
    if lim is not None and not (lim.contains(a.x_min, a.y_min)
                                and lim.contains(a.x_max, a.y_max)):
        raise ConfigError(f"search area x [{a.x_min:g}, {a.x_max:g}] y [{a.y_min:g}, "
                          f"{a.y_max:g}] µm exceeds the stage limits x [{lim.x_min:g}, "
                          f"{lim.x_max:g}] y [{lim.y_min:g}, {lim.y_max:g}] µm")
    # the sweep's tiling, before any frame: an overlap as wide as its field of view cannot tile
    sweep_nm = cfg.survey_pixel_size_nm if strategy == "adaptive" else cfg.pixel_size_nm
    try:
        tile_centres(a, _fov(cfg, sweep_nm), cfg.overlap_um)
    except ValueError as exc:
        raise ConfigError(f"--overlap {cfg.overlap_um:g} µm does not tile frames of "
                          f"{cfg.shape[1]} x {cfg.shape[0]} px at {sweep_nm:g} nm/px: {exc}"
                          ) from exc
    if strategy == "raster":
        return raster_search(session, cfg, progress, stop, prior)
    if strategy == "adaptive":
        return adaptive_search(session, cfg, progress, stop)
    raise ValueError(f"unknown strategy {strategy!r}; known: raster, adaptive")
