"""Raw frames written for review: calibrated ImageJ TIFF with the frame header as metadata.

:func:`write_frame_tiff` writes one :class:`~nanoscout.analysis.frame.Frame` with tifffile as
an ImageJ TIFF that Fiji, napari and ``nanoscout measure`` / ``models adapt`` (rosettasciio)
read calibrated: ``unit = micron`` (ImageJ's name for µm, the one unit rosettasciio reads from
an ImageJ TIFF) and the resolution in pixels per µm (1000 / ``pixel_size_nm``; uncalibrated
frames: ``unit = pixel``, no resolution). The frame's whole header (source, seq, acquisition time,
pixel size, modality, stage, meta) is stored as JSON in the ImageJ ``Properties`` under
``nanoscout_frame`` (read it back with :func:`read_frame_tiff`), and why the frame was saved
under ``nanoscout_saved``. ImageJ TIFF holds uint8, uint16 and float32 pixels; other pixel
types are written as float32 (the header keeps the frame's own dtype).

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

__all__ = ["FRAME_PROPERTY", "frame_file_name", "read_frame_tiff", "write_frame_tiff",
           "write_label_map"]

#: the ImageJ property that holds the frame header (JSON)
FRAME_PROPERTY = "nanoscout_frame"
#: the ImageJ property that says why the frame was saved (JSON)
SAVED_PROPERTY = "nanoscout_saved"
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


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
    pixels = np.asarray(frame.pixels)
    data = pixels if pixels.dtype in _IMAGEJ_DTYPES else pixels.astype(np.float32)
    px = h.pixel_size_nm
    props = {FRAME_PROPERTY: h.model_dump_json(),
             SAVED_PROPERTY: json.dumps(saved or {}, default=str)}
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
    NanoscoutError naming the file when it holds no nanoscout frame header."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        pixels = tf.asarray()
        meta = tf.imagej_metadata or {}
    props = meta.get("Properties") or {}
    if FRAME_PROPERTY not in props:
        raise NanoscoutError(f"{path} holds no nanoscout frame header "
                             f"(ImageJ property {FRAME_PROPERTY!r})")
    header = FrameHeader.model_validate_json(props[FRAME_PROPERTY])
    return pixels, header, json.loads(props.get(SAVED_PROPERTY) or "{}")
