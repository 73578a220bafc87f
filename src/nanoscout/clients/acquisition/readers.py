"""Read microscope image files into 2-D arrays with their calibration in nanometres per pixel.

Vendor formats go through rosettasciio (DigitalMicrograph ``.dm3/.dm4``, FEI/TIA ``.emi/.ser``,
``.mrc``, ``.emd``, TIFF with Zeiss/FEI/DM/ImageJ calibration tags); plain raster formats
(``.png``, ``.jpg``, ``.bmp``, ``.gif``) go through Pillow and are always uncalibrated.

Every 2-D image in a file becomes one :class:`ImageRecord`: stacks and multi-image files give one
record per plane, numbered by ``index``. Pixels keep their native dtype, in native byte order,
C-contiguous, copied out of the file (never a memory map, so the file can be moved or deleted
while the frame is in flight). Colour images are turned into 8-bit luminance with ITU-R 601-2
weights (Pillow's ``convert("L")``), the same conversion the project's ground truth was made
with, so pixel values match annotations made on the grey image. A TIFF whose colour samples lie
in separate planes (which rosettasciio cannot read) is read by tifffile, to luminance of its
channel dtype, and stays uncalibrated (its ``calibration_note`` says so).

Calibration: the two image axes' ``scale`` and ``units`` are converted to nm; an ImageJ TIFF's
own unit and X/Y resolution are read with tifffile where rosettasciio gives no unit (it knows
only ImageJ's "micron": Fiji's ``nm``, ``um``, ``A`` ... and nanoscout's own ``NAME.labels.tif``
would read as uncalibrated). A scale of 1 with no unit, an unknown or reciprocal unit, or an
absurd value (<= 0, not finite, outside the protocol's ``PIXEL_SIZE_RANGE_NM``, 1e-4 .. 1e6
nm/px) gives ``pixel_size_nm=None`` and a ``calibration_note`` that says why.
Nothing here guesses a pixel size: an uncalibrated frame stays uncalibrated.

:func:`wire_array` turns a record's pixels into a dtype the frame protocol carries (float16 and
64-bit integers are not), without loss of value: ``replay`` and ``measure`` both use it.

Anything that cannot be read raises :class:`nanoscout.wire.errors.ReaderError` naming the file and the
cause. rosettasciio submodules are imported inside the functions because they are heavy.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import re
import threading
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.wire.errors import ReaderError
from nanoscout.wire.protocol import FRAME_DTYPES, MODALITIES, PIXEL_SIZE_RANGE_NM

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageRecord",
    "calibration_to_nm",
    "drop_tia_companions",
    "frame_modality",
    "read_image",
    "read_images",
    "wire_array",
]

# suffix (lower case, with the dot) -> source_format reported in ImageRecord
_FORMATS: dict[str, str] = {
    ".dm3": "dm3",
    ".dm4": "dm4",
    ".emi": "emi",
    ".ser": "ser",
    ".mrc": "mrc",
    ".emd": "emd",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".gif": "gif",
}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_FORMATS)
"""File suffixes :func:`read_images` accepts, lower case with the leading dot (``".dm4"``)."""

_RSCIIO_MODULES: dict[str, str] = {
    "dm3": "rsciio.digitalmicrograph",
    "dm4": "rsciio.digitalmicrograph",
    "emi": "rsciio.tia",
    "ser": "rsciio.tia",
    "mrc": "rsciio.mrc",
    "emd": "rsciio.emd",
    "tiff": "rsciio.tiff",
}
_CALIBRATION_SOURCE: dict[str, str] = {
    "dm3": "DM tags",
    "dm4": "DM tags",
    "emi": "TIA header",
    "ser": "TIA header",
    "mrc": "MRC header",
    "emd": "EMD dims",
    "tiff": "TIFF tags",
}

#: the most pixels one image may have (16384 x 16384): more is refused before it is decoded
#: where the format can be compressed and says its size first (TIFF, HDF5-based EMD, Pillow
#: formats), and after reading otherwise (DM, MRC, TIA hold their pixels uncompressed, so the
#: file's own size bounds them), so that a small compressed file declaring a huge image cannot
#: take the machine's memory (the analysis needs ~40 bytes per pixel at working scale 1)
MAX_IMAGE_PIXELS = 1 << 28
#: the most pixels one file may hold in all its images together (four of the largest images,
#: 1 to 8 GiB as uint8 to float64), checked as :data:`MAX_IMAGE_PIXELS` is: a file's images
#: are all read before the first is analysed, so the bound on one image alone let a 2.8 MB
#: TIFF of 12 zlib pages of 15360 x 15360 px take 5.4 GB of memory (and a 40-page one 9 GiB
#: for its stack before a copy)
MAX_FILE_PIXELS = 1 << 30

# the daemon rejects frames outside this range, so a file outside it counts as uncalibrated
MIN_PIXEL_NM, MAX_PIXEL_NM = PIXEL_SIZE_RANGE_NM

# unit string (lower case) -> nm per unit
_NM_PER_UNIT: dict[str, float] = {
    "m": 1e9,
    "meter": 1e9,
    "metre": 1e9,
    "cm": 1e7,
    "mm": 1e6,
    "µm": 1e3,  # micro sign U+00B5
    "μm": 1e3,  # greek mu U+03BC
    "um": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "å": 0.1,  # "Å" (U+00C5) and the angstrom sign U+212B both lower-case to this
    "a": 0.1,  # MRC and some DM files write a bare "A" for angstrom on a length axis
    "ang": 0.1,
    "angstrom": 0.1,
    "angstroms": 0.1,
    "pm": 1e-3,
}
_NO_UNIT = frozenset({"", "<undefined>", "undefined", "[]", "none", "px", "pixel", "pixels"})
_STEM_WORDS = re.compile(r"\b(HAADF|MAADF|LAADF|ADF|DF[124]?|DF-[SI]|BF-S|STEM|DIGISCAN)\b")

MetaValue = str | float | int


@dataclass(frozen=True)
class ImageRecord:
    """One 2-D image read from a file, with its calibration.

    ``pixel_size_nm`` is the side of one pixel in nm, or None when the file carries no usable
    calibration (``calibration_note`` says why). ``index`` counts the 2-D images in the file
    from 0. ``meta`` is a small flat map of str/int/float (instrument, magnification,
    voltage_kv, title, detector, original scale and unit) that msgpack can encode.
    """

    data: np.ndarray
    pixel_size_nm: float | None
    modality: str | None
    path: Path
    index: int
    source_format: str
    meta: dict[str, MetaValue] = field(default_factory=dict)
    calibration_note: str = ""


def frame_modality(rec: ImageRecord, modality: str | None = None) -> str | None:
    """The modality an image is analysed as: ``modality`` when given (the user's
    ``--modality``), else the file's when it names one the frame header knows, else None."""
    if modality is not None:
        return modality
    return rec.modality if rec.modality in MODALITIES else None


def read_image(path: str | Path) -> ImageRecord:
    """Return the first 2-D image of ``path`` (see :func:`read_images`)."""
    return read_images(path)[0]


def read_images(path: str | Path) -> list[ImageRecord]:
    """Return every 2-D image in the file at ``path``, in file order, calibrated in nm per px.

    Raises ReaderError when the file is missing, has an unsupported suffix, is corrupt or
    truncated, holds no 2-D real-space image, holds one over :data:`MAX_IMAGE_PIXELS`, or
    images over :data:`MAX_FILE_PIXELS` together.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise ReaderError(f"{p}: unsupported file type {suffix or '(no suffix)'!r} (supported: {supported})")
    if not p.is_file():
        raise ReaderError(f"{p}: no such file")
    try:
        if fmt == "emd":
            _inspect_hdf5(p)
        if fmt == "tiff" and _inspect_tiff(p):
            records = _read_planar_rgb_tiff(p)
        else:
            records = (_read_pillow(p, fmt) if fmt not in _RSCIIO_MODULES
                       else _read_rsciio(p, fmt))
    except ReaderError:
        raise
    except Exception as exc:  # any parser failure means the file is bad; keep the cause chained
        raise ReaderError(f"{p}: cannot read {fmt} file ({type(exc).__name__}: {exc})") from exc
    for rec in records:
        if 0 in rec.data.shape:  # a header giving a side of 0 (an MRC with nx = 0: 16 x 0)
            raise ReaderError(f"{p}: an image of {' x '.join(map(str, rec.data.shape))} px "
                              "holds no pixel (its header gives a side of 0: a damaged file?)")
        _check_pixels(p, rec.data.shape)
    _check_file_pixels(p, [rec.data.shape for rec in records])
    return records


def _check_pixels(p: Path, shape: Sequence[int]) -> None:
    """ReaderError when an image of ``shape`` has more than :data:`MAX_IMAGE_PIXELS` pixels."""
    if math.prod(int(n) for n in shape) > MAX_IMAGE_PIXELS:
        raise ReaderError(f"{p}: an image of {' x '.join(str(int(n)) for n in shape)} px is "
                          f"larger than the {MAX_IMAGE_PIXELS} px nanoscout reads "
                          f"(16384 x 16384): split it into tiles")


def _check_file_pixels(p: Path, shapes: Sequence[Sequence[int]], what: str = "images") -> None:
    """ReaderError when the ``what`` (images, datasets) of ``shapes`` hold more than
    :data:`MAX_FILE_PIXELS` pixels together."""
    total = sum(math.prod(int(n) for n in shape) for shape in shapes)
    if total > MAX_FILE_PIXELS:
        raise ReaderError(f"{p}: its {len(shapes)} {what} hold {total} px in all, more than the "
                          f"{MAX_FILE_PIXELS} px nanoscout reads from one file (four images of "
                          f"16384 x 16384): split it into several files")


def _inspect_hdf5(p: Path) -> None:
    """Refuse an HDF5-based file (EMD) whose datasets declare too many pixels, before any is
    decoded (HDF5 compresses chunks: an 18 kB EMD of 40000 x 40000 zeros took 35 s and 3.1 GB
    to be refused after reading). Each dataset of two or more dimensions counts whole towards
    :data:`MAX_FILE_PIXELS`, and its two largest dimensions towards :data:`MAX_IMAGE_PIXELS`
    (the largest image it can hold, whichever axes the EMD flavour puts the image on). A file
    h5py cannot open is left to the reader to report."""
    import h5py

    shapes: list[tuple[int, ...]] = []
    try:
        with h5py.File(p, "r") as f:
            f.visititems(lambda _name, obj: shapes.append(tuple(obj.shape))
                         if isinstance(obj, h5py.Dataset) and obj.shape and len(obj.shape) >= 2
                         else None)
    except Exception:  # the reader says what is wrong with the file
        return
    for shape in shapes:
        _check_pixels(p, sorted(shape)[-2:])
    _check_file_pixels(p, shapes, "datasets")


def _inspect_tiff(p: Path) -> bool:
    """Refuse a TIFF whose pages declare too many pixels, each or together, before any is
    decoded (its tags say; a damaged directory is left to the reader to report), and return
    whether a page stores its colour samples in separate planes (PlanarConfiguration 2), which
    rosettasciio's TIFF reader cannot turn into an image. One pass over the file's directory."""
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            pages = [(page.shape, _tiff_layout(page)) for page in tf.pages]
    except Exception:  # the reader says what is wrong with the file
        return False
    planes = [shape[:2] if len(shape) == 3 and shape[-1] in (3, 4) else shape
              for shape, _ in pages]  # a page's samples (RGB) are read as one grey plane
    for plane in planes:
        _check_pixels(p, plane)
    _check_file_pixels(p, planes)
    return any(layout == (tifffile.PHOTOMETRIC.RGB, tifffile.PLANARCONFIG.SEPARATE)
               for _, layout in pages)


def _tiff_layout(page: Any) -> tuple[int, int]:
    """(Photometric, PlanarConfiguration) of a TIFF page, or of a frame's key page (a
    TiffFrame shares its tags)."""
    key = getattr(page, "keyframe", None) or page
    return int(key.photometric), int(key.planarconfig)


def _read_planar_rgb_tiff(p: Path) -> list[ImageRecord]:
    """Every page of a TIFF with separate colour planes as ITU-R 601-2 luminance of its
    channel dtype (grey pages as they are), read by tifffile: uncalibrated, since only
    rosettasciio reads the vendors' calibration tags."""
    import tifffile

    records: list[ImageRecord] = []
    with tifffile.TiffFile(p) as tf:
        for index, page in enumerate(tf.pages):
            data = np.asarray(page.asarray())
            photometric, planar = _tiff_layout(page)
            if photometric == tifffile.PHOTOMETRIC.RGB:
                rgb = (data[:3] if planar == tifffile.PLANARCONFIG.SEPARATE
                       else np.moveaxis(data[..., :3], -1, 0))
                data = _luma601(rgb[0], rgb[1], rgb[2])
            if data.ndim != 2:
                raise ReaderError(f"{p}: page {index} is a {data.shape} array, not a 2-D image")
            records.append(ImageRecord(
                data=np.array(data, dtype=data.dtype.newbyteorder("="), order="C"),
                pixel_size_nm=None, modality=None, path=p, index=index, source_format="tiff",
                meta={"planar_rgb": 1},
                calibration_note=("no calibration read: a TIFF with separate colour planes is "
                                  "read by tifffile as luminance, without the vendor "
                                  "calibration tags (give --pixel-size)")))
    return records


def drop_tia_companions(files: Sequence[Path]) -> list[Path]:
    """``files`` without each TIA ``name_N.ser`` whose ``name.emi`` is also listed: reading the
    ``.emi`` reads its ``.ser`` (pixels and calibration), so one acquisition is one entry."""
    emi = {(p.parent, p.stem.lower()) for p in files if p.suffix.lower() == ".emi"}

    def companion(p: Path) -> bool:
        if p.suffix.lower() != ".ser":
            return False
        stem, _, number = p.stem.rpartition("_")
        return number.isdigit() and (p.parent, stem.lower()) in emi

    return [p for p in files if not companion(p)]


def wire_array(data: np.ndarray) -> np.ndarray:
    """Return ``data`` in a dtype the frame protocol carries, converting without loss of value.

    float16 becomes float32; 64-bit integers become int32 when every value fits, else float64.
    Raises ReaderError for a dtype with no lossless match.
    """
    if f"{data.dtype.kind}{data.dtype.itemsize}" in FRAME_DTYPES:
        return data
    if data.dtype.kind == "f":
        return data.astype(np.float32)
    if data.dtype.kind in "iu":
        info = np.iinfo(np.int32)
        if data.size and info.min <= data.min() and data.max() <= info.max:
            return data.astype(np.int32)
        return data.astype(np.float64)
    raise ReaderError(f"pixel dtype {data.dtype} cannot be sent as a frame (no lossless match)")


def calibration_to_nm(scale: Any, units: Any, source: str = "metadata") -> tuple[float | None, str]:
    """Convert one axis calibration (``scale`` per pixel in ``units``) to nm per pixel.

    Returns ``(pixel_size_nm, note)``; ``pixel_size_nm`` is None when the axis is uncalibrated
    (scale 1 without unit, no or unknown unit, reciprocal unit) or the value is absurd, and
    ``note`` says which, naming the value.
    """
    unit = _unit_text(units)
    try:
        value = float(scale)
    except (TypeError, ValueError):
        return None, f"no calibration (scale {scale!r} is not a number)"
    if unit.lower() in _NO_UNIT:
        if value == 1.0:
            return None, "no calibration (scale 1, no unit)"
        return None, f"no calibration (scale {value:g} per px with no length unit in the {source})"
    if _is_reciprocal(unit):
        return None, f"no calibration (reciprocal unit {unit!r}: not a real-space image)"
    factor = _NM_PER_UNIT.get(unit.lower())
    if factor is None:
        return None, f"no calibration (unknown length unit {unit!r}, scale {value:g})"
    nm = value * factor
    if not math.isfinite(nm) or not MIN_PIXEL_NM <= nm <= MAX_PIXEL_NM:
        return None, (
            f"absurd calibration ignored ({value:g} {unit} = {nm:g} nm/px, "
            f"outside {MIN_PIXEL_NM:g}..{MAX_PIXEL_NM:g} nm/px)"
        )
    return nm, f"{value:.6g} {unit} per px from {source}"


# ---------------------------------------------------------------------------------------------
# rosettasciio formats


class _LogCapture(logging.Handler):
    """Collect the records a library logs from the current thread while it reads one file.

    tifffile does not raise on a truncated TIFF whose directory is damaged: it logs an error,
    drops the tags it could not read (the calibration among them) and returns the pixels. Those
    log records are the only sign that the calibration we would report is wrong.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)

    def messages(self, min_level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= min_level]


def _read_rsciio(p: Path, fmt: str) -> list[ImageRecord]:
    module = importlib.import_module(_RSCIIO_MODULES[fmt])
    capture = _LogCapture()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(capture)
    try:
        with warnings.catch_warnings():
            # rosettasciio's MRC reader and tifffile (on a damaged file) leave an open file to
            # the garbage collector; the warning would surface later in an unrelated place
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                signals = module.file_reader(str(p))
            except Exception as exc:
                # free the reader's locals (the open file) now, while the warning is filtered;
                # tifffile's handles sit in reference cycles, hence the collection (error path)
                traceback.clear_frames(exc.__traceback__)
                gc.collect()
                raise
    finally:
        tiff_logger.removeHandler(capture)
    errors = capture.messages(logging.ERROR)
    if errors:
        raise ReaderError(f"{p}: corrupt or truncated {fmt} file ({'; '.join(errors)[:300]})")

    records: list[ImageRecord] = []
    skipped: list[str] = []
    imagej = _imagej_axes(p) if fmt == "tiff" else None
    for signal in signals:
        modality, signal_meta = _describe(fmt, signal)
        for data, axes_yx in _planes(signal, skipped):
            source = _CALIBRATION_SOURCE[fmt]
            if imagej is not None and _unit_text(axes_yx[1].get("units")).lower() in _NO_UNIT:
                axes_yx, source = imagej, "ImageJ unit and TIFF resolution"
            x_unit = _unit_text(axes_yx[1].get("units"))
            if _is_reciprocal(x_unit):
                # diffraction patterns / FFTs: no particle can be measured on them
                skipped.append(f"reciprocal-space plane (unit {x_unit!r})")
                continue
            pixel, note, cal_meta = _calibration(axes_yx, source)
            meta = {**signal_meta, **cal_meta}
            records.append(
                ImageRecord(
                    data=data,
                    pixel_size_nm=pixel,
                    modality=modality,
                    path=p,
                    index=len(records),
                    source_format=fmt,
                    meta=meta,
                    calibration_note=note,
                )
            )
    if not records:
        why = "; ".join(skipped + capture.messages(logging.WARNING)) or (
            f"no {p.stem}_<n>.ser beside it: a TIA .emi holds only the header, its pixels are "
            "in the .ser files" if fmt == "emi" and not any(p.parent.glob(f"{p.stem}_*.ser"))
            else "empty file")
        raise ReaderError(f"{p}: no 2-D image in {fmt} file ({why[:300]})")
    return records


def _imagej_axes(p: Path) -> list[Mapping[str, Any]] | None:
    """``[y_axis, x_axis]`` (``scale`` in unit per px, ``units``) of an ImageJ TIFF's own
    calibration: the ``unit`` of its description and its first page's Y/XResolution (px per
    unit). None when the file is not an ImageJ TIFF or names no length unit. rosettasciio reads
    the resolution but keeps the unit only when it is "micron"."""
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            ij = tf.imagej_metadata or {}
            tags = tf.pages.first.tags
            res = [tags.get(name) for name in ("YResolution", "XResolution")]
    except Exception:  # the reader says what is wrong with the file
        return None
    # ImageJ writes non-ASCII characters of the unit as \uXXXX ("\u00B5m")
    unit = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)),
                  _unit_text(ij.get("unit")))
    if unit.lower() in _NO_UNIT or any(r is None for r in res):
        return None
    axes: list[Mapping[str, Any]] = []
    for tag in res:
        assert tag is not None
        num, den = tag.value
        axes.append({"scale": den / num if num else math.inf, "units": unit})
    return axes


def _planes(
    signal: Mapping[str, Any], skipped: list[str]
) -> Iterator[tuple[np.ndarray, list[Mapping[str, Any]]]]:
    """Yield ``(plane, [y_axis, x_axis])`` for each 2-D image in one rosettasciio signal."""
    data = np.asarray(signal["data"])
    axes: list[Mapping[str, Any]] = list(signal.get("axes") or [])
    if data.dtype.names:
        data = _luminance_structured(data)
    if np.iscomplexobj(data):
        skipped.append(f"complex-valued {data.shape} signal is not an image")
        return
    if data.ndim < 2:
        skipped.append(f"{data.ndim}-D signal {data.shape} is not an image")
        return
    if len(axes) != data.ndim:
        axes = [{} for _ in range(data.ndim)]
    signal_dims = [i for i, a in enumerate(axes) if not a.get("navigate", False)]
    if len(signal_dims) == 1 and data.ndim > 1 and signal_dims == [data.ndim - 1]:
        skipped.append(f"{data.shape} signal with one signal axis is a spectrum (image) set")
        return
    if len(signal_dims) > 2:
        skipped.append(f"{data.ndim}-D signal {data.shape} has more than two signal axes")
        return
    # rosettasciio lists axes in array order, and image planes are the two fastest dimensions
    axes_yx = [axes[-2], axes[-1]]
    for nav_index in np.ndindex(*data.shape[:-2]):
        yield _own_native_c(data[nav_index]), axes_yx


def _own_native_c(plane: np.ndarray) -> np.ndarray:
    """Copy a plane out of the file: native byte order, C-contiguous, never a memory map."""
    dtype = plane.dtype.newbyteorder("=") if not plane.dtype.isnative else plane.dtype
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    return np.array(plane, dtype=dtype, order="C", copy=True)


def _luminance_structured(data: np.ndarray) -> np.ndarray:
    """Turn rosettasciio's RGB(A) record arrays into ITU-R 601-2 luminance of the channel dtype."""
    names = data.dtype.names or ()
    if not {"R", "G", "B"} <= set(names):
        raise ValueError(f"unsupported structured pixel type {data.dtype} (fields {names})")
    return _luma601(data["R"], data["G"], data["B"])


def _luma601(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luminance of three colour planes, in their (native-order) integer dtype,
    rounded, or float32 for float planes."""
    luma = (r.astype(np.float64) * 299 + g.astype(np.float64) * 587
            + b.astype(np.float64) * 114) / 1000
    if np.issubdtype(r.dtype, np.integer):
        return np.rint(luma).astype(r.dtype.newbyteorder("="))
    return luma.astype(np.float32)


def _calibration(
    axes_yx: list[Mapping[str, Any]], source: str
) -> tuple[float | None, str, dict[str, MetaValue]]:
    y_axis, x_axis = axes_yx
    x_nm, x_note = calibration_to_nm(x_axis.get("scale", 1.0), x_axis.get("units"), source)
    y_nm, y_note = calibration_to_nm(y_axis.get("scale", 1.0), y_axis.get("units"), source)
    meta: dict[str, MetaValue] = {}
    unit = _unit_text(x_axis.get("units"))
    if unit.lower() not in _NO_UNIT:
        meta["scale_unit"] = unit
    scale = _clean(x_axis.get("scale"))
    if isinstance(scale, float | int):
        meta["scale"] = float(scale)
    if x_nm is None:
        return None, x_note, meta
    if y_nm is None:
        return x_nm, f"{x_note}; y axis ignored: {y_note}", meta
    if abs(x_nm - y_nm) > 0.01 * max(x_nm, y_nm):
        # the wire format has one pixel size; the area-preserving mean keeps areas right
        meta["pixel_size_x_nm"] = x_nm
        meta["pixel_size_y_nm"] = y_nm
        mean = math.sqrt(x_nm * y_nm)
        return mean, f"{x_note}; non-square pixels {x_nm:g} x {y_nm:g} nm, using {mean:g}", meta
    return x_nm, x_note, meta


# ---------------------------------------------------------------------------------------------
# modality and small metadata from each vendor's tags


def _describe(fmt: str, signal: Mapping[str, Any]) -> tuple[str | None, dict[str, MetaValue]]:
    """Return ``(modality, meta)`` from a rosettasciio signal's metadata."""
    md = signal.get("metadata") or {}
    om = signal.get("original_metadata") or {}
    meta: dict[str, MetaValue] = {}
    title = _clean(_get(md, "General.title"))
    if isinstance(title, str) and title != "__unnamed__":
        meta["title"] = title
    modality = _generic_modality(md, meta)
    vendor: str | None = None
    if fmt in ("dm3", "dm4"):
        vendor = _dm_info(om, meta)
    elif fmt in ("emi", "ser"):
        vendor = _tia_info(om, meta)
    elif fmt == "tiff":
        vendor = _tiff_info(om, meta)
    modality = vendor or modality
    if modality is None and isinstance(title, str) and _STEM_WORDS.search(title.upper()):
        modality = "STEM"  # a STEM detector name in the image title (e.g. "HAADF Image")
    return modality, {k: v for k, v in meta.items() if v is not None}


def _generic_modality(md: Mapping[str, Any], meta: dict[str, MetaValue]) -> str | None:
    """Read rosettasciio's mapping (``Acquisition_instrument.TEM/SEM``) where a reader fills it."""
    instrument = _get(md, "Acquisition_instrument")
    if not isinstance(instrument, Mapping):
        return None
    for kind in ("SEM", "TEM"):
        sub = instrument.get(kind)
        if isinstance(sub, Mapping):
            _put(meta, "voltage_kv", sub.get("beam_energy"))
            _put(meta, "magnification", sub.get("magnification"))
            _put(meta, "instrument", sub.get("microscope"))
            if kind == "SEM":
                return "SEM"
            return "STEM" if _get(sub, "Detector.Detector_name") == "HAADF" else None
    return None


def _dm_info(om: Mapping[str, Any], meta: dict[str, MetaValue]) -> str | None:
    tags = _get(om, "ImageList.TagGroup0.ImageTags")
    if not isinstance(tags, Mapping):
        return None
    info = tags.get("Microscope Info")
    info = info if isinstance(info, Mapping) else {}
    _put(meta, "instrument", info.get("Name") or _get(tags, "Session Info.Microscope"))
    _put(meta, "magnification", info.get("Indicated Magnification"))
    voltage = _clean(info.get("Voltage"))
    if isinstance(voltage, float | int) and voltage > 0:
        meta["voltage_kv"] = voltage / 1000.0  # DM stores volts
    operation = str(info.get("Operation Mode", "")).upper()
    illumination = str(info.get("Illumination Mode", "")).upper()
    if operation == "SCANNING" or "STEM" in illumination or "DigiScan" in tags:
        return "STEM"
    if operation == "IMAGING" or isinstance(tags.get("Acquisition"), Mapping):
        return "TEM"  # "Acquisition" is the camera tag group GMS writes for CCD/CMOS images
    return None


def _tia_info(om: Mapping[str, Any], meta: dict[str, MetaValue]) -> str | None:
    desc = _get(om, "ObjectInfo.ExperimentalDescription")
    if not isinstance(desc, Mapping):
        return None
    _put(meta, "instrument", desc.get("Microscope"))
    _put(meta, "voltage_kv", desc.get("High tension_kV"))
    _put(meta, "magnification", desc.get("Magnification_x"))
    words = str(desc.get("Mode", "")).upper().split()
    if "STEM" in words:
        return "STEM"
    if "TEM" in words or _get(om, "ObjectInfo.AcquireInfo.CameraNamePath") is not None:
        return "TEM"
    return None


def _tiff_info(om: Mapping[str, Any], meta: dict[str, MetaValue]) -> str | None:
    zeiss = om.get("CZ_SEM")
    if isinstance(zeiss, Mapping):
        _put(meta, "instrument", _zeiss_value(zeiss, "sv_serial_number"))
        _put(meta, "voltage_kv", _zeiss_value(zeiss, "ap_actualkv"))
        _put(meta, "detector", _zeiss_value(zeiss, "dp_detector_channel"))
        _put(meta, "magnification", _parse_magnification(_zeiss_value(zeiss, "ap_mag")))
        return "SEM"  # CZ_SEM is written only by Zeiss SEM/FIB-SEM software (SmartSEM)
    fei = om.get("fei_metadata")
    if isinstance(fei, Mapping):
        _put(meta, "instrument", _get(fei, "System.SystemType"))
        hv = _clean(_get(fei, "Beam.HV"))
        if isinstance(hv, float | int) and hv > 0:
            meta["voltage_kv"] = hv / 1000.0  # FEI xT stores volts
        _put(meta, "detector", _get(fei, "Detectors.Name"))
        beam = str(_get(fei, "Beam.Beam") or "")
        # xT (SEM/DualBeam) software; an ion-beam image is not an electron micrograph
        return "SEM" if beam.upper() != "IBEAM" else None
    return None


def _zeiss_value(zeiss: Mapping[str, Any], key: str) -> Any:
    entry = zeiss.get(key)
    # CZ_SEM entries are (label, value[, unit]) tuples
    if isinstance(entry, tuple | list) and len(entry) >= 2:
        return entry[1]
    return None


def _parse_magnification(text: Any) -> float | None:
    """``'50.00 K X'`` -> 50000.0, ``105`` -> 105.0; None when it cannot be parsed."""
    if isinstance(text, int | float):
        return float(text)
    match = re.match(r"\s*([0-9.]+)\s*([kKmM]?)", str(text or ""))
    if not match:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return value * {"": 1.0, "k": 1e3, "m": 1e6}[match.group(2).lower()]


def _get(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _put(meta: dict[str, MetaValue], key: str, value: Any) -> None:
    clean = _clean(value)
    if clean is None or clean == "" or key in meta:
        return
    if key in ("magnification", "voltage_kv") and not (
        isinstance(clean, float | int) and math.isfinite(clean) and clean > 0
    ):
        return
    meta[key] = clean


def _clean(value: Any) -> MetaValue | None:
    """Turn a metadata value into a small msgpack-able scalar, or None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip().replace("\u2028", " ")
        return text[:120] if text else None
    return None


def _is_reciprocal(unit: str) -> bool:
    return unit.startswith("1/") or "^-1" in unit or unit.endswith("-1")


def _unit_text(units: Any) -> str:
    if units is None:
        return ""
    if isinstance(units, bytes):
        units = units.decode("utf-8", "replace")
    return str(units).strip()


# ---------------------------------------------------------------------------------------------
# Pillow formats


def _read_pillow(p: Path, fmt: str) -> list[ImageRecord]:
    from PIL import Image

    records: list[ImageRecord] = []
    with Image.open(p) as image:
        frames = getattr(image, "n_frames", 1)  # an animated PNG or GIF: every frame one size
        _check_pixels(p, image.size[::-1])
        _check_file_pixels(p, [image.size[::-1]] * frames)
        for frame in range(frames):
            image.seek(frame)
            _check_pixels(p, image.size[::-1])
            image.load()  # decode now so a truncated file fails here, not later
            mode = image.mode
            data = _pillow_array(image)
            records.append(
                ImageRecord(
                    data=data,
                    pixel_size_nm=None,
                    modality=None,
                    path=p,
                    index=frame,
                    source_format=fmt,
                    meta={"mode": mode},
                    calibration_note=f"no calibration ({fmt} files carry no pixel size)",
                )
            )
    return records


def _pillow_array(image: Any) -> np.ndarray:
    if image.mode in ("L", "I", "F") or image.mode.startswith("I;16"):
        data = np.asarray(image)
    else:
        # colour, palette, 1-bit and alpha modes: 8-bit ITU-R 601-2 luma, as the ground truth
        data = np.asarray(image.convert("L"))
    if data.ndim != 2:
        raise ValueError(f"Pillow mode {image.mode!r} gave a {data.shape} array, not 2-D")
    return _own_native_c(data)
