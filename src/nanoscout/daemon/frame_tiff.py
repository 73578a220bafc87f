"""Raw frames written for review: calibrated ImageJ TIFF with the frame header as metadata.

:func:`write_frame_tiff` writes one :class:`~nanoscout.analysis.frame.Frame` with tifffile as
an ImageJ TIFF that Fiji, napari and ``nanoscout measure`` / ``models adapt`` (rosettasciio)
read calibrated: ``unit = micron`` (ImageJ's name for µm, the one unit rosettasciio reads from
an ImageJ TIFF) and the resolution in pixels per µm (1000 / ``pixel_size_nm``; uncalibrated
frames: ``unit = pixel``, no resolution). The frame's whole header (source, seq, acquisition time,
pixel size, modality, stage, meta) is stored as JSON in the ImageJ ``Properties`` under
``nanoscout_frame`` (read it back with :func:`read_frame_tiff`), and why the frame was saved
under ``nanoscout_saved``. ImageJ TIFF holds uint8, uint16 and float32 pixels; other pixel
types are written as float32 (the header keeps the frame's own dtype) where float32 holds the
frame: 32-bit integers up to 2**24, and any frame whose range float32 splits into at least
2**16 steps. A frame it cannot hold (a 200-count signal on a 2**32 - 300 offset of a uint32
frame, which float32 rounds to 2 values; a float64 frame of a 1e-300 range, 0 in float32) is
stored as ``(pixel - offset) / scale`` in float32 (``offset`` its smallest pixel, ``scale`` 1
for integers, its range for floats), with ``{"offset": ..., "scale": ...}`` under the ImageJ
property ``nanoscout_pixels``: :func:`read_frame_tiff` gives the frame's own values back
(integers exactly), and the pipeline, whose normalisation ignores an offset and a scale, finds
the same particles in the file as in the frame (it found none in the flat picture written
before).

:func:`frame_file_name` builds the file name from the source and sequence number alone: a
source name cannot climb out of the review directory (``..``, ``/``), whatever it holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.frame import Frame
from nanoscout.wire.errors import NanoscoutError
from nanoscout.wire.headers import FrameHeader

__all__ = ["FRAME_PROPERTY", "PIXELS_PROPERTY", "frame_file_name", "read_frame_tiff",
           "write_frame_tiff", "write_label_map"]

#: the ImageJ property that holds the frame header (JSON)
FRAME_PROPERTY = "nanoscout_frame"
#: the ImageJ property that says why the frame was saved (JSON)
SAVED_PROPERTY = "nanoscout_saved"
#: the ImageJ property of a frame stored as (pixel - offset) / scale (JSON: offset, scale)
PIXELS_PROPERTY = "nanoscout_pixels"
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
#: float32's step between neighbouring values: relative (23 stored bits), and the smallest
#: (subnormal) one
_F32_REL_STEP, _F32_MIN_STEP = 2.0**-23, 2.0**-149
#: steps across a frame's range below which float32 does not hold it
_MIN_LEVELS = 2**16
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _float32_holds(pixels: np.ndarray, lo: float, hi: float) -> bool:
    """Whether ``pixels`` (a dtype ImageJ lacks, values ``lo``..``hi``) keep their picture as
    float32: integers up to 2**24 exactly, other frames when float32 splits their range into
    at least :data:`_MIN_LEVELS` steps (a constant frame: unless its value is below float32's
    normal numbers, 1.2e-38, where float32 keeps few digits of it or none)."""
    big = max(abs(lo), abs(hi))
    if pixels.dtype.kind in "iu" and big <= 2.0**24:
        return True
    if hi == lo:
        return big == 0.0 or big >= float(np.finfo(np.float32).tiny)
    return hi - lo >= _MIN_LEVELS * max(big * _F32_REL_STEP, _F32_MIN_STEP)


def _imagej_pixels(pixels: np.ndarray) -> tuple[np.ndarray, dict[str, float] | None]:
    """(the array an ImageJ TIFF holds, None), or (``(pixels - offset) / scale`` as float32,
    ``{"offset", "scale"}``) for a frame float32 does not hold (module docstring)."""
    if pixels.dtype in _IMAGEJ_DTYPES:
        return pixels, None
    lo, hi = float(pixels.min()), float(pixels.max())
    if _float32_holds(pixels, lo, hi):
        return pixels.astype(np.float32), None
    scale = 1.0 if pixels.dtype.kind in "iu" or hi == lo else hi - lo
    stored = ((pixels.astype(np.float64) - lo) / scale).astype(np.float32)
    return stored, {"offset": lo, "scale": scale}


def frame_file_name(source: str, seq: int, suffix: str = "") -> str:
    """``<source>-<seq:09d>[-suffix].tif`` with every character of ``source`` and ``suffix``
    other than letters, digits, ``_`` and ``-`` replaced by ``_`` (no ``.``, no separator:
    the name stays inside its directory)."""
    safe = _UNSAFE.sub("_", source).strip("_") or "source"
    tail = _UNSAFE.sub("_", suffix).strip("_")
    return f"{safe[:64]}-{int(seq):09d}{'-' + tail[:64] if tail else ''}.tif"


def write_frame_tiff(frame: Frame, path: Path, *, saved: dict[str, Any] | None = None) -> Path:
    """Write ``frame`` to ``path`` (see the module docstring); ``saved``: why (e.g. the rule
    that fired), stored as JSON. Writes to a temporary name first and renames, so a reader
    never sees half a file. Raises OSError from the file system."""
    import tifffile

    h = frame.header
    data, stored_as = _imagej_pixels(np.asarray(frame.pixels))
    px = h.pixel_size_nm
    props = {FRAME_PROPERTY: h.model_dump_json(),
             SAVED_PROPERTY: json.dumps(saved or {}, default=str)}
    if stored_as is not None:
        props[PIXELS_PROPERTY] = json.dumps(stored_as)
    metadata: dict[str, Any] = {"axes": "YX", "unit": "micron" if px else "pixel",
                                "Properties": props}
    resolution = (1000.0 / px, 1000.0 / px) if px else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tifffile.imwrite(tmp, data, imagej=True, resolution=resolution, metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_label_map(labels: np.ndarray, path: Path) -> Path:
    """Write an instance label map (0 background, 1..n particles) as a plain uint16 TIFF, the
    mask format ``nanoscout models adapt`` reads; temporary name first, then renamed."""
    import tifffile

    tmp = path.with_name(f".{path.name}.part")
    try:
        tifffile.imwrite(tmp, np.asarray(labels, dtype=np.uint16))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_frame_header(path: Path) -> FrameHeader | None:
    """The frame header of a TIFF written by :func:`write_frame_tiff` (pixels not read), or
    None for any other file, readable or not."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            props = (tf.imagej_metadata or {}).get("Properties") or {}
        return FrameHeader.model_validate_json(props[FRAME_PROPERTY])
    except Exception:  # not a TIFF, not ours, or a damaged header: no header
        return None


def read_frame_tiff(path: Path) -> tuple[np.ndarray, FrameHeader, dict[str, Any]]:
    """(pixels, frame header, why it was saved) of a TIFF written by :func:`write_frame_tiff`;
    NanoscoutError naming the file when it holds no nanoscout frame header. A frame stored
    as ``(pixel - offset) / scale`` (property ``nanoscout_pixels``) comes back in its header's
    dtype (integers exact, floats within float32's precision of its range); other pixels as
    the file holds them (float32 for a dtype ImageJ lacks)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        pixels = tf.asarray()
        meta = tf.imagej_metadata or {}
    props = meta.get("Properties") or {}
    if FRAME_PROPERTY not in props:
        raise NanoscoutError(f"{path} holds no nanoscout frame header "
                             f"(ImageJ property {FRAME_PROPERTY!r})")
    header = FrameHeader.model_validate_json(props[FRAME_PROPERTY])
    if PIXELS_PROPERTY in props:
        stored = json.loads(props[PIXELS_PROPERTY])
        values = pixels.astype(np.float64) * float(stored["scale"]) + float(stored["offset"])
        dtype = np.dtype(header.dtype)
        pixels = (np.rint(values) if dtype.kind in "iu" else values).astype(dtype)
    return pixels, header, json.loads(props.get(SAVED_PROPERTY) or "{}")
