"""One frame to analyse: its header (identity, calibration, stage) and pixels, checked once.

A :class:`Frame` is made where pixels enter nanoscout (the daemon's receiver, the offline
``measure`` command) and handed to :meth:`~nanoscout.analysis.pipeline.Pipeline.process`.
Its pixels are checked once, at construction (2-D, non-empty, finite, within ±1e30), and
normalised at most once: :attr:`Frame.normalized` (the detector's input and the preview). The
classifier, the lens (in the pipeline and on the query socket) and the modality model take the
frame's own pixels (:func:`~nanoscout.analysis.preprocess.fixed_input`, in float64 where
float32 would lose them: 32-bit counts above 2**24, float64 frames of a tiny range).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np

from nanoscout.analysis.preprocess import normalize
from nanoscout.wire.errors import FrameError, Reason
from nanoscout.wire.headers import FrameHeader, Stage, Units, frame_header

__all__ = ["MAX_ABS_PIXEL", "Frame", "check_pixels"]

#: largest pixel magnitude analysed: no detector counts beyond 2**32, and the normalisation
#: (float32) must not overflow
MAX_ABS_PIXEL = 1e30


def check_pixels(pixels: np.ndarray) -> None:
    """Raise :class:`FrameError` unless ``pixels`` is a non-empty 2-D array of finite, sane
    numbers (reason ``shape``, ``dtype``, ``nonfinite`` or ``pixel_range``)."""
    if pixels.ndim != 2 or pixels.size == 0:
        raise FrameError(f"a frame must be a non-empty 2-D array, got shape {pixels.shape}",
                         reason=Reason.SHAPE)
    if pixels.dtype.kind not in "uif":
        raise FrameError(f"frame dtype {pixels.dtype} is not a real number type",
                         reason=Reason.DTYPE)
    if pixels.dtype.kind != "f":
        return
    finite = np.isfinite(pixels)
    if not finite.all():
        bad = int(pixels.size - np.count_nonzero(finite))
        raise FrameError(f"frame has {bad} NaN/inf pixels of {pixels.size}; refusing to "
                         "analyse it", reason=Reason.NONFINITE)
    lo, hi = float(pixels.min()), float(pixels.max())
    if max(-lo, hi) > MAX_ABS_PIXEL:
        raise FrameError(f"frame pixels span {lo:.3g}..{hi:.3g}; nanoscout analyses values "
                         f"within ±{MAX_ABS_PIXEL:g}", reason=Reason.PIXEL_RANGE)


class Frame:
    """A checked frame: ``header`` (identity, calibration, stage) and read-only ``pixels``.

    ``t_recv_ns``: when the daemon took it off the wire (wall clock, ns; the acquisition
    time for offline frames). Raises :class:`FrameError` for pixels that cannot be analysed,
    and when the pixels disagree with the header.
    """

    def __init__(self, header: FrameHeader, pixels: np.ndarray, t_recv_ns: int | None = None
                 ) -> None:
        check_pixels(pixels)
        if tuple(pixels.shape) != tuple(header.shape):
            raise FrameError(f"pixels of shape {pixels.shape} under a header of shape "
                             f"{header.shape}", reason=Reason.SHAPE)
        self.header = header
        self.pixels = pixels
        self.t_recv_ns = time.time_ns() if t_recv_ns is None else t_recv_ns

    @classmethod
    def from_image(cls, image: np.ndarray, *, pixel_size_nm: float | None,
                   source: str = "offline", seq: int = 0, modality: str | None = None,
                   stage: Stage | None = None, meta: Mapping[str, Any] | None = None,
                   t_acq_ns: int | None = None,
                   particle_size_nm: tuple[float, float] | None = None,
                   particle_size_px: tuple[float, float] | None = None) -> Frame:
        """A frame of a 2-D image that did not come over the wire (offline analysis);
        ``particle_size_nm`` / ``_px``: the operator's (low, high) median particle diameter,
        nm / px."""
        arr = np.asarray(image)
        check_pixels(arr)
        t = time.time_ns() if t_acq_ns is None else t_acq_ns
        header = frame_header(arr, source=source, seq=seq, t_acq_ns=t,
                              pixel_size_nm=pixel_size_nm, modality=modality, stage=stage,
                              meta=meta, particle_size_nm=particle_size_nm,
                              particle_size_px=particle_size_px)
        return cls(header, arr, t)

    @property
    def source(self) -> str:
        """The stream the frame belongs to."""
        return self.header.source

    @property
    def units(self) -> Units:
        """Length unit of this frame's results: nm when calibrated, px otherwise."""
        return self.header.units

    @property
    def pixel_size_nm(self) -> float | None:
        """nm per pixel, or None when uncalibrated."""
        return self.header.pixel_size_nm

    @property
    def area_um2(self) -> float | None:
        """The frame's area, µm² (None when uncalibrated)."""
        px = self.header.pixel_size_nm
        if px is None:
            return None
        rows, cols = self.header.shape
        return rows * cols * (px / 1000.0) ** 2

    @cached_property
    def normalized(self) -> np.ndarray:
        """float32, percentiles 0.5 / 99.5 mapped to 0 / 1 (clipped): the detector's input and
        the preview's picture (:func:`~nanoscout.analysis.preprocess.normalize`)."""
        return normalize(self.pixels)

    def release(self) -> None:
        """Drop what was prepared from the pixels (:attr:`normalized`: 4 bytes a pixel, twice a
        uint16 frame's own) once the frame is analysed, so that a frame kept afterwards (the
        frames kept for review, the lens's newest frame per source) holds only its pixels, as
        ``[review] max_bytes`` counts them. Asked for again, it is prepared again."""
        self.__dict__.pop("normalized", None)

    def ref(self) -> dict[str, Any]:
        """The fields every result header of this frame shares (``FrameRef``)."""
        h = self.header
        return {"source": h.source, "seq": h.seq, "t_acq_ns": h.t_acq_ns, "stage": h.stage}
