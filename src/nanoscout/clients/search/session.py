"""One frame of a search, end to end: move the stage, acquire, and collect the daemon's results.

:class:`SearchSession` holds the two connections of a search — the microscope's control socket
(REQ) and the daemon's results (SUB) — and turns "image here at this pixel size" into a
:class:`FrameResult`: the frame's place on the stage, its particle count, the alerts it raised
(particle rows that fired, or the class activation map of a class/novelty rule) and its
classification. The daemon publishes a frame's messages in order ``det``, ``preview``,
``class`` (+ its alerts), particle alerts, ``stats``; ``stats`` ends the frame. A frame whose
results do not come within ``result_timeout_s`` (an engine failure, a daemon that is gone) is
returned with its ``error`` set and counted, never waited on forever. Only messages of the
microscope's own source count (a topic subscription is a prefix: ``det.stage`` also receives
``det.stage2``).

Costs are added up as the search goes: frames, instrument time (modelled or real stage moves
plus exposures, s) and electron dose (e/nm² summed over the frames' areas, divided by the search
area: the mean dose the specimen received). :meth:`Costs.estimate` says what the next frame will
cost before it is taken, from what the frames so far cost (the microscope reports a frame's
move time, exposure and dose with the frame), so that a budget is checked before it is spent:

* before the first frame, from the acquisition settings the microscope's ``status`` reported
  (:class:`~nanoscout.clients.microscope.interfaces.AcquisitionSettings`: exposure s, dose
  e/px or e/nm² of one frame): that exposure, and that dose at the pixel size asked for over
  the frame's area. The first move's time is not known yet (no move measured): the time
  estimate is the exposure alone, a lower bound. A microscope that reports no settings (an
  older one) gives no estimate: nothing is known before the first frame;
* once frames exist their measured costs, whatever the settings said: exposure (s) and dose
  (e/nm²) of the latest frame at the same magnification (pixel size asked for and shape); at
  a magnification not seen yet the longest exposure seen, and the larger of "the same e/nm²"
  (a TEM's fixed illumination) and "the same electrons per frame" (a fixed dose per pixel, as
  a STEM's dwell or the simulated camera) of every magnification seen: an upper bound for
  either kind of instrument;
* the stage move from the measured moves, as an upper bound for a move time that grows
  linearly with the distance (settle s plus distance / speed): a move of ``d`` µm takes at
  most ``t_j · max(1, d / d_j)`` for every measured move ``j`` (``d_j`` µm in ``t_j`` s), the
  least of these.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from nanoscout.clients.microscope.control import ControlClient, ControlError
from nanoscout.clients.microscope.interfaces import AcquisitionSettings
from nanoscout.clients.search.geometry import Area, FrameGeometry
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import AlertHeader, ClassHeader, DetHeader, Message
from nanoscout.wire.transport import ClientKeys

log = logging.getLogger("nanoscout.search")


@dataclass
class FrameResult:
    """What one search frame showed."""

    purpose: str  # "raster", "survey" or "confirm"
    index: int  # 1-based: frames the search had used once this one was taken
    geometry: FrameGeometry
    source: str
    seq: int
    t_s: float  # wall time since the search started, when the results were in
    instrument_s: float  # instrument time since the search started (moves + exposures)
    n_particles: int | None = None  # None: no detections came back
    alerts: list[Message] = field(default_factory=list)
    classification: ClassHeader | None = None
    error: str | None = None


@dataclass(frozen=True)
class FrameCost:
    """What one frame costs: instrument time (stage move + exposure, s) and electron dose times
    its area (e/nm² × µm²; divided by the search area, its share of the mean dose); None where
    it is not known (before the first frame, a setting the microscope did not report)."""

    instrument_s: float | None
    dose_e_nm2_area: float | None


@dataclass(frozen=True)
class _Magnification:
    """The latest frame at one magnification: exposure s, dose e/nm² (None: not reported) and
    field of view µm²."""

    exposure_s: float
    dose_e_per_nm2: float | None
    area_um2: float


@dataclass
class Costs:
    """What the search has spent so far, and what it learnt of a frame's cost."""

    frames: int = 0
    instrument_s: float = 0.0
    dose_e_nm2_area: float = 0.0  # Σ dose (e/nm²) × frame area (µm²)
    failed_frames: int = 0
    #: the stage position after the latest frame (µm); None before it when not known
    at_um: tuple[float, float] | None = None
    #: (distance µm, time s) of each stage move whose start was known
    moves: list[tuple[float, float]] = field(default_factory=list)
    #: the latest frame of each magnification: (pixel size asked for nm, shape px) → its costs
    seen: dict[tuple[float, tuple[int, int]], _Magnification] = field(default_factory=dict)
    #: what a frame costs at the microscope's settings, as its ``status`` said (None: not said)
    settings: AcquisitionSettings | None = None

    def mean_dose(self, area: Area) -> float:
        """Electron dose per nm² averaged over the search area."""
        return self.dose_e_nm2_area / (area.width * area.height)

    def add(self, pixel_size_nm: float, shape: tuple[int, int], stage_um: tuple[float, float],
            move_s: float, exposure_s: float, dose_e_per_nm2: float | None,
            fov_um: tuple[float, float]) -> None:
        """Count one frame asked for at ``pixel_size_nm`` and ``shape`` (px), taken at
        ``stage_um`` (µm) after a move of ``move_s`` s, exposed ``exposure_s`` s with
        ``dose_e_per_nm2`` (None: not reported) over ``fov_um`` (x, y µm)."""
        self.frames += 1
        self.instrument_s += move_s + exposure_s
        area = fov_um[0] * fov_um[1]
        if dose_e_per_nm2 is not None:
            self.dose_e_nm2_area += dose_e_per_nm2 * area
        if self.at_um is not None:
            self.moves.append((math.dist(self.at_um, stage_um), move_s))
        self.at_um = stage_um
        self.seen[(pixel_size_nm, shape)] = _Magnification(exposure_s, dose_e_per_nm2, area)

    def estimate(self, x_um: float, y_um: float, pixel_size_nm: float, shape: tuple[int, int]
                 ) -> FrameCost | None:
        """What a frame at (``x_um``, ``y_um``) µm, ``pixel_size_nm`` and ``shape`` (rows, cols
        px) will cost at most, from the frames so far (the rules in the module docstring);
        before the first frame from :attr:`settings` (its time the exposure alone, the first
        move not being known), None where they say nothing (nothing is known)."""
        if not self.seen:
            return self._from_settings(pixel_size_nm, shape)
        mag = self.seen.get((pixel_size_nm, shape))
        if mag is not None:
            exposure_s = mag.exposure_s
            dose = 0.0 if mag.dose_e_per_nm2 is None else mag.dose_e_per_nm2 * mag.area_um2
        else:
            area = shape[0] * shape[1] * (pixel_size_nm / 1e3) ** 2
            exposure_s = max(m.exposure_s for m in self.seen.values())
            dose = max((m.dose_e_per_nm2 * max(m.area_um2, area) for m in self.seen.values()
                        if m.dose_e_per_nm2 is not None), default=0.0)
        return FrameCost(self._move_s(x_um, y_um) + exposure_s, dose)

    def _from_settings(self, pixel_size_nm: float, shape: tuple[int, int]) -> FrameCost | None:
        """The first frame's cost as :attr:`settings` say: exposure s (no move measured yet)
        and dose (e/nm² at ``pixel_size_nm``) × area (µm²); None when they say neither."""
        s = self.settings
        dose = None if s is None else s.dose_at(pixel_size_nm)
        if s is None or (s.exposure_s is None and dose is None):
            return None
        area = shape[0] * shape[1] * (pixel_size_nm / 1e3) ** 2
        return FrameCost(s.exposure_s, None if dose is None else dose * area)

    def _move_s(self, x_um: float, y_um: float) -> float:
        """The longest a move to (x, y) µm is expected to take, s: the bound of the module
        docstring; with no measured move of a distance > 0 the longest measured, or 0."""
        if self.at_um is None:
            return max((t for _, t in self.moves), default=0.0)
        d = math.dist(self.at_um, (x_um, y_um))
        bounds = [t if dj >= d else t * d / dj for dj, t in self.moves if dj >= d or dj > 0]
        if bounds:
            return min(bounds)
        return max((t for _, t in self.moves), default=0.0)


class SearchSession:
    """Drives the microscope and reads the daemon's results for one search."""

    def __init__(self, control: ControlClient, results_endpoint: str, *,
                 result_timeout_s: float = 30.0, ready_timeout_s: float = 30.0,
                 curve: ClientKeys | None = None) -> None:
        self.control = control
        status = control.status()
        if status.source is None:
            raise ValueError("the microscope did not say which source its frames carry")
        self.source = status.source
        #: the stage's travel limits, or None when the microscope does not say
        self.limits = None if status.limits is None else Area(*status.limits)
        self.result_timeout_s = result_timeout_s
        topics = tuple(f"{k}.{self.source}" for k in ("det", "class", "alert", "stats"))
        self._sub = Subscriber(results_endpoint, topics, curve=curve)
        self._sub.wait_ready(ready_timeout_s)  # connected before the first frame goes out
        try:
            settings = AcquisitionSettings(status.exposure_s, status.dose_e_per_px,
                                           status.dose_e_per_nm2)
        except ValueError as exc:
            raise ControlError(f"the microscope at {control.endpoint} reported acquisition "
                               f"settings that cannot be: {exc}") from exc
        #: where the stage is: the first move's length is measured from there; what a frame
        #: costs before the first one (absent from an older microscope: not known)
        self.costs = Costs(at_um=status.stage, settings=settings)
        self.t0 = time.monotonic()

    def frame(self, x_um: float, y_um: float, pixel_size_nm: float, shape: tuple[int, int],
              purpose: str, meta: dict[str, str | int | float | bool] | None = None
              ) -> FrameResult:
        """Image at (x, y) µm and return the daemon's results for that frame (``meta``: extra
        frame meta, e.g. the analysis hint ``rotate45``). Raises :class:`ControlError` when
        the microscope does not answer, refuses, or answers an acquisition without its seq,
        stage position, shape or pixel size."""
        moved = self.control.move(x_um, y_um)
        acq = self.control.acquire(pixel_size_nm, shape, tag=purpose, meta=meta)
        if acq.seq is None or acq.stage is None or acq.shape is None or acq.pixel_size_nm is None:
            missing = [k for k in ("seq", "stage", "shape", "pixel_size_nm")
                       if getattr(acq, k) is None]
            raise ControlError(f"the microscope at {self.control.endpoint} answered acquire "
                               f"without {', '.join(missing)}")
        c = self.costs
        geom = FrameGeometry(acq.stage, acq.pixel_size_nm, acq.shape,
                             acq.image_to_stage or ((1.0, 0.0), (0.0, 1.0)))
        c.add(pixel_size_nm, shape, acq.stage, moved.move_s or 0.0, acq.exposure_s or 0.0,
              acq.dose_e_per_nm2, geom.fov_um)
        res = FrameResult(purpose, c.frames, geom, self.source, acq.seq, 0.0, c.instrument_s)
        self._collect(res)
        res.t_s = time.monotonic() - self.t0
        if res.error is not None:
            c.failed_frames += 1
            log.warning("frame %s#%d: %s", self.source, acq.seq, res.error)
        return res

    def _collect(self, res: FrameResult) -> None:
        deadline = time.monotonic() + self.result_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                res.error = (f"no complete results for seq {res.seq} within "
                             f"{self.result_timeout_s:g} s"
                             + (" (no detections)" if res.n_particles is None else ""))
                return
            msg = self._sub.recv(left)
            if msg is None:
                continue
            if getattr(msg.header, "source", None) != self.source:
                # topics are prefixes: "det.stage" also brings "det.stage2", whose frames
                # are numbered from 0 too
                continue
            seq = getattr(msg.header, "seq", None)
            if seq != res.seq:
                continue  # a late message of an earlier frame
            h = msg.header
            if isinstance(h, DetHeader):
                res.n_particles = h.n
                # once detections are out the rest follows within milliseconds; a summary
                # failure sends no stats, so do not wait the whole timeout for it
                deadline = min(deadline, time.monotonic() + 5.0)
            elif isinstance(h, AlertHeader):
                res.alerts.append(msg)
            elif isinstance(h, ClassHeader):
                res.classification = h
            elif msg.kind == "stats":
                return

    def crop(self, res: FrameResult, row: float, col: float, half_px: int) -> np.ndarray | None:
        """A display crop of a recent frame, or None when the microscope has it no more."""
        try:
            return self.control.crop(res.seq, row, col, half_px)
        except Exception as exc:  # a thumbnail is a nicety: never lose a target over it
            log.warning("no thumbnail for %s#%d: %s", res.source, res.seq, exc)
            return None

    def close(self) -> None:
        """Close the result subscription (the control client belongs to the caller)."""
        self._sub.close()
