"""What a stage search needs from a microscope: a stage that moves and a camera that acquires.

These two small interfaces are all :class:`~nanoscout.clients.microscope.control.ControlServer` uses, so a
real instrument replaces the simulated one by implementing them (see the README, "Stage search
on a real microscope": SerialEM's Python module, a vendor scripting API or pycromanager)::

    class Stage(Protocol):                      # positions in µm
        limits: StageLimits
        def position(self) -> tuple[float, float]: ...
        def move_to(self, x_um: float, y_um: float) -> float: ...   # blocks until settled

    class Camera(Protocol):
        modality: str
        def acquire(self, pixel_size_nm: float, shape: tuple[int, int]) -> Exposure: ...

A camera may also say what a frame will cost before it is taken (optional,
:class:`ReportsSettings`: ``settings() -> AcquisitionSettings``, its exposure and dose at the
current settings); the control socket's ``status`` reports it, so a stage search knows the
first frame's cost before it spends it. A camera without it works as before: the search learns
a frame's cost from the first frame.

Image ↔ stage convention: a frame is centred on the stage position, image columns run along
+x and rows along +y (pixel ``(row, col)`` lies at ``x = cx + (col - (W-1)/2)·p``,
``y = cy + (row - (H-1)/2)·p``, p the pixel size). An instrument whose camera is rotated or
flipped with respect to its stage reports that in :attr:`Exposure.image_to_stage` (a 2×2 matrix
taking (col, row) pixel offsets to (x, y) stage offsets in units of the pixel size), which the
search loop applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from nanoscout.wire.errors import NanoscoutError, Reason


class StageError(NanoscoutError):
    """A stage command that cannot be carried out (outside the limits, a driver failure)."""

    reason = Reason.STAGE


class CameraError(NanoscoutError):
    """An acquisition that cannot be made (pixel size or frame size out of range, a failure)."""

    reason = Reason.CAMERA


@dataclass(frozen=True)
class StageLimits:
    """Travel limits of the stage, µm (inclusive)."""

    x_min_um: float
    x_max_um: float
    y_min_um: float
    y_max_um: float

    def __post_init__(self) -> None:
        if not (self.x_min_um < self.x_max_um and self.y_min_um < self.y_max_um):
            raise ValueError(f"empty stage limits {self}")

    def check(self, x_um: float, y_um: float) -> None:
        """Raise :class:`StageError` naming the coordinate that lies outside the limits."""
        for name, v, lo, hi in (("x", x_um, self.x_min_um, self.x_max_um),
                                ("y", y_um, self.y_min_um, self.y_max_um)):
            if not math.isfinite(v) or not lo <= v <= hi:
                raise StageError(f"{name} = {v!r} µm is outside the stage limits "
                                 f"[{lo:g}, {hi:g}] µm")


@dataclass(frozen=True)
class Exposure:
    """One acquired image and what is known about it."""

    image: np.ndarray  # 2-D, any supported dtype
    pixel_size_nm: float  # the camera's actual pixel size at this magnification
    modality: str  # TEM / STEM / SEM
    dose_e_per_nm2: float | None = None  # electron dose of this exposure, e/nm²
    exposure_s: float = 0.0  # time the beam was on (modelled for a simulator), s
    magnification: float | None = None
    #: (col, row) pixel offsets → (x, y) stage offsets, in pixel sizes; identity when the
    #: camera is aligned with the stage
    image_to_stage: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))
    meta: dict[str, str | int | float | bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class AcquisitionSettings:
    """What one frame will cost at the camera's current settings, known before it is taken
    (None: the camera does not know). The dose follows one of two models, as the
    :class:`Exposure` of a frame then reports it:

    * ``dose_e_per_px``: electrons per pixel per frame, whatever the pixel size (a STEM's probe
      current × dwell, the simulated camera): a frame at ``p`` nm/px receives
      ``dose_e_per_px / p²`` e/nm²;
    * ``dose_e_per_nm2``: e/nm² per frame, whatever the pixel size (a TEM's fixed
      illumination × exposure).

    ``exposure_s`` is the time the beam is on for one frame, s (a camera's exposure; a scanned
    frame's dwell × pixels at the frame size a search asks for). Each value must be finite and
    >= 0 (:class:`ValueError` names the field and value).
    """

    exposure_s: float | None = None
    dose_e_per_px: float | None = None
    dose_e_per_nm2: float | None = None

    def __post_init__(self) -> None:
        for name in ("exposure_s", "dose_e_per_px", "dose_e_per_nm2"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} = {v!r} must be a finite number >= 0")

    def dose_at(self, pixel_size_nm: float) -> float | None:
        """The dose of one frame at ``pixel_size_nm``, e/nm²: the larger of the two models
        given; None when neither is."""
        doses = [d for d in (self.dose_e_per_nm2, None if self.dose_e_per_px is None
                             else self.dose_e_per_px / pixel_size_nm**2) if d is not None]
        return max(doses, default=None)


class Stage(Protocol):
    """A specimen stage: absolute moves in µm."""

    limits: StageLimits

    def position(self) -> tuple[float, float]:
        """The current (x, y) position, µm."""
        ...

    def move_to(self, x_um: float, y_um: float) -> float:
        """Move to (x, y) µm and wait until settled; returns the time it took, s.

        Raises :class:`StageError` for a position outside :attr:`limits` (without moving).
        """
        ...


class Camera(Protocol):
    """Acquisition at the current stage position; the pixel size selects the magnification."""

    modality: str

    def acquire(self, pixel_size_nm: float, shape: tuple[int, int]) -> Exposure:
        """Acquire one frame of ``shape`` (rows, cols) px at about ``pixel_size_nm``.

        A real microscope has discrete magnifications: it picks the nearest one and reports
        the actual pixel size in the returned :class:`Exposure`.
        """
        ...


@runtime_checkable
class ReportsSettings(Protocol):
    """A :class:`Camera` that can say what a frame will cost before it is taken (optional:
    the control server reports it in ``status`` when the camera has this method)."""

    def settings(self) -> AcquisitionSettings:
        """Exposure (s) and dose (e/px or e/nm²) of one frame at the current settings."""
        ...
