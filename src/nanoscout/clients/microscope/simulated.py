"""A simulated microscope: a motorised stage over a virtual specimen and a camera that renders it.

The specimen (:class:`nanoscout.sim.virtual_specimen.VirtualSpecimen`) is a large area — by default
200 µm × 200 µm of ordinary particles, a few agglomerates and a few rare targets — drawn once
from a seed and rendered by the synthetic generator at the stage position, pixel size and
frame shape asked for, with fresh shot noise each time.

Times are modelled, not slept (unless ``real_time``): a move takes its travel at
``speed_um_s`` plus ``settle_s``; an exposure takes ``exposure_s``. The search loop adds them up
as instrument time, which is what a real microscope would spend. A frame's dose is
``dose_e_per_px`` electrons per pixel, ``dose_e_per_px / p²`` e/nm² at ``p`` nm/px; the camera
reports both inputs before a frame is taken (:meth:`VirtualCamera.settings`, the control
socket's ``status``) and the frame's exposure and dose with it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nanoscout.clients.microscope.interfaces import (
    AcquisitionSettings,
    CameraError,
    Exposure,
    StageLimits,
)
from nanoscout.sim.virtual_specimen import VirtualSpecimen, VirtualSpecimenConfig


@dataclass(frozen=True)
class SimulatedMicroscopeOptions:
    """Stage and camera of the simulated microscope. Positions µm, times s."""

    speed_um_s: float = 100.0  # stage travel speed
    settle_s: float = 0.3  # wait after each move
    exposure_s: float = 0.5  # per frame (a TEM camera readout; SEM: dwell × pixels)
    dose_e_per_px: float | None = 200.0  # electrons per pixel per frame; None = noiseless
    dtype: str = "uint16"
    real_time: bool = False  # sleep the modelled times (for demos), else only report them
    seed: int = 0  # shot noise


class SimulatedStage:
    """A stage with limits that reports the modelled time of each move."""

    def __init__(self, limits: StageLimits, *, speed_um_s: float = 100.0, settle_s: float = 0.3,
                 real_time: bool = False) -> None:
        if not speed_um_s > 0 or settle_s < 0:
            raise ValueError(f"speed_um_s {speed_um_s!r} must be > 0, settle_s {settle_s!r} >= 0")
        self.limits = limits
        self.speed_um_s = speed_um_s
        self.settle_s = settle_s
        self.real_time = real_time
        self._xy = (0.5 * (limits.x_min_um + limits.x_max_um),
                    0.5 * (limits.y_min_um + limits.y_max_um))
        self.travelled_um = 0.0

    def position(self) -> tuple[float, float]:
        """The current (x, y), µm."""
        return self._xy

    def move_to(self, x_um: float, y_um: float) -> float:
        """Move (checked against the limits); returns the modelled travel + settle time, s."""
        self.limits.check(x_um, y_um)
        dist = math.hypot(x_um - self._xy[0], y_um - self._xy[1])
        took = dist / self.speed_um_s + self.settle_s
        if self.real_time:
            time.sleep(took)
        self._xy = (float(x_um), float(y_um))
        self.travelled_um += dist
        return took


class VirtualCamera:
    """Renders the virtual specimen at the stage's position."""

    def __init__(self, specimen: VirtualSpecimen, stage: SimulatedStage,
                 options: SimulatedMicroscopeOptions) -> None:
        self.specimen = specimen
        self.stage = stage
        self.options = options
        self.modality: str = specimen.cfg.modality
        self._n = 0

    def acquire(self, pixel_size_nm: float, shape: tuple[int, int]) -> Exposure:
        """One frame of ``shape`` px at ``pixel_size_nm`` (any pixel size: a zoom lens)."""
        if not pixel_size_nm > 0:
            raise CameraError(f"pixel size {pixel_size_nm!r} nm must be > 0")
        o = self.options
        rng = np.random.default_rng([o.seed, self._n])
        self._n += 1
        rows, cols = shape
        frame = self.specimen.render(self.stage.position(), pixel_size_nm, (rows, cols),
                                     dose_e_per_px=o.dose_e_per_px,
                                     dtype=o.dtype,  # type: ignore[arg-type]
                                     rng=rng)
        if o.real_time:
            time.sleep(o.exposure_s)
        dose = None if o.dose_e_per_px is None else o.dose_e_per_px / pixel_size_nm**2
        return Exposure(image=frame.image, pixel_size_nm=pixel_size_nm,
                        modality=self.modality, dose_e_per_nm2=dose, exposure_s=o.exposure_s,
                        meta={"simulated": True})

    def settings(self) -> AcquisitionSettings:
        """What :meth:`acquire` will cost: ``exposure_s`` (s) and ``dose_e_per_px`` (electrons
        per pixel, so ``dose_e_per_px / p²`` e/nm² at ``p`` nm/px; None when noiseless)."""
        o = self.options
        return AcquisitionSettings(exposure_s=o.exposure_s, dose_e_per_px=o.dose_e_per_px)


def specimen_limits(specimen: VirtualSpecimen, margin_um: float = 10.0) -> StageLimits:
    """Stage limits: the specimen area plus ``margin_um`` on each side."""
    w, h = specimen.cfg.size_um
    return StageLimits(-w / 2 - margin_um, w / 2 + margin_um, -h / 2 - margin_um,
                       h / 2 + margin_um)


def target_rows(specimen: VirtualSpecimen) -> list[dict[str, object]]:
    """The specimen's targets as plain dicts (id, kind, x_um, y_um, ecd_nm, length_nm,
    width_nm), for JSON and for scoring a search."""
    return [{"id": int(r["id"]), "kind": str(r["kind"]), "x_um": float(r["x_um"]),
             "y_um": float(r["y_um"]), "ecd_nm": float(r["ecd_nm"]),
             "length_nm": float(r["length_nm"]), "width_nm": float(r["width_nm"])}
            for r in specimen.targets]


def write_truth(specimen: VirtualSpecimen, path: Path) -> Path:
    """The specimen's ground truth as JSON: configuration, targets and agglomerate centres (µm)."""
    data = {
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(specimen.cfg).items()},
        "n_particles": int(specimen.n_particles),
        "targets": target_rows(specimen),
        "agglomerates_um": [[float(x), float(y)] for x, y in specimen.agglomerate_centres],
    }
    path.write_text(json.dumps(data, indent=1, default=_jsonable), encoding="utf-8")
    return path


def _jsonable(v: object) -> object:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return dict(v)
    return str(v)


def build(cfg: VirtualSpecimenConfig, options: SimulatedMicroscopeOptions
          ) -> tuple[VirtualSpecimen, SimulatedStage, VirtualCamera]:
    """Draw the specimen and put a stage and camera over it."""
    spec = VirtualSpecimen(cfg)
    stage = SimulatedStage(specimen_limits(spec), speed_um_s=options.speed_um_s,
                           settle_s=options.settle_s, real_time=options.real_time)
    return spec, stage, VirtualCamera(spec, stage, options)
