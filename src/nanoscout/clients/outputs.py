"""Files that Fiji/ImageJ, napari and any image viewer open natively, with the calibration.

For one analysed image (its pixels, instance labels and particle table):

* :func:`write_label_tiff` — ``NAME.labels.tif``: an ImageJ hyperstack (tifffile), axes CYX,
  uint16: channel 1 the image (a display copy, rescaled to 0..65535 between its 0.1 and 99.9
  percentiles), channel 2 the instance labels (0 = background, k = particle ``id`` k). The
  resolution is in nm (ImageJ ``unit = nm``, X/Y resolution = px per nm), so Fiji's
  *Analyze > Set Scale* and *Measure* report nm; uncalibrated images say ``unit = pixel``.
  The ImageJ ``Properties`` carry ``nanoscout`` JSON (source file, index, pixel size, units).
* :func:`write_rois` — ``NAME.rois.zip``: an ImageJ ROI set (roifile): one polygon per particle
  traced along its label's outline, named by particle id (``0007``), opened by Fiji's ROI
  Manager beside the label TIFF. :func:`write_ellipse_rois` writes the fitted ellipses instead
  (from a particle table alone, for the recorder, which has no label image).
* :func:`write_overlay_png` — ``NAME.overlay.png``: 8-bit RGB, the image with every particle's
  outline (yellow; border particles in blue) and a scale bar (nm, or px when uncalibrated).
* napari: ``nanoscout.clients.napari_reader`` (a reader plugin, declared in ``napari.yaml``)
  opens ``NAME.labels.tif`` as an image and a labels layer with the scale in nm.

:class:`UniqueNames` gives every input image its own stem (``test-1.dm3`` and ``test-1.dm4``
never collide: the suffix stays in the name).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.wire.errors import NanoscoutError

__all__ = ["UniqueNames", "nice_length", "output_names", "write_ellipse_rois", "write_label_tiff",
           "write_overlay_png", "write_rois"]

#: ImageJ's 16-bit ceiling for label values
MAX_LABEL = 65535


class UniqueNames:
    """A unique file stem per input image, handed out one at a time.

    The stem is the file's whole name (suffix kept: ``test-1.dm3``, ``test-1.dm4``), plus
    ``_<index>`` for files holding several images; equal names from different folders get
    ``-2``, ``-3`` ... Names are compared case-insensitively (Windows and macOS file systems).
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def __call__(self, path: Path, index: int = 0, images_in_file: int = 1) -> str:
        """Return a stem not handed out before for image ``index`` of ``path``."""
        base = path.name if images_in_file == 1 else f"{path.name}_{index}"
        name, k = base, 1
        while name.lower() in self._taken:
            k += 1
            name = f"{base}-{k}"
        self._taken.add(name.lower())
        return name


def output_names(items: Sequence[tuple[Path, int, int]]) -> list[str]:
    """:class:`UniqueNames` for ``(path, index, images in file)`` items, in order."""
    names = UniqueNames()
    return [names(*item) for item in items]


def _display_u16(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(a, (0.1, 99.9)) if a.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 65535).round().astype(np.uint16)


def _display_u8(image: np.ndarray) -> np.ndarray:
    return (_display_u16(image) >> 8).astype(np.uint8)


def _label_lut() -> np.ndarray:
    """A 3 x 256 ImageJ LUT: black background, well separated colours for labels."""
    rng = np.random.default_rng(7)
    lut = rng.integers(64, 256, size=(3, 256), dtype=np.uint8)
    lut[:, 0] = 0
    return lut


def write_label_tiff(labels: np.ndarray, path: Path, *, image: np.ndarray | None = None,
                     pixel_size_nm: float | None = None,
                     properties: dict[str, Any] | None = None) -> Path:
    """Write ``labels`` (and ``image``, same shape) as an ImageJ hyperstack TIFF; see the module
    docstring. ``pixel_size_nm``: nm per px (None: uncalibrated). Raises NanoscoutError for
    more than 65535 particles or a shape mismatch."""
    import tifffile

    top = int(labels.max(initial=0))
    if top > MAX_LABEL:
        raise NanoscoutError(f"{top} particles do not fit a 16-bit label image ({path})")
    planes = [labels.astype(np.uint16)]
    names = ["labels"]
    luts = [_label_lut()]
    if image is not None:
        if image.shape != labels.shape:
            raise NanoscoutError(f"image {image.shape} and labels {labels.shape} differ ({path})")
        planes.insert(0, _display_u16(image))
        names.insert(0, "image")
        luts.insert(0, np.tile(np.arange(256, dtype=np.uint8), (3, 1)))
    data = np.stack(planes)
    props = {"nanoscout": json.dumps({"pixel_size_nm": pixel_size_nm,
                                      "units": "nm" if pixel_size_nm else "px",
                                      "channels": names, **(properties or {})}, default=str)}
    # written as ImageJ's full TZCYXS shape: given CYX, tifffile takes a trailing axis of size
    # 1 (an N x 1 image) for colour samples and writes a stack ImageJ and napari cannot read
    data = data[np.newaxis, np.newaxis, ..., np.newaxis]
    metadata: dict[str, Any] = {"axes": "TZCYXS", "mode": "composite", "Labels": names,
                                "LUTs": luts, "Properties": props,
                                "unit": "nm" if pixel_size_nm else "pixel"}
    resolution = None
    if pixel_size_nm:
        resolution = (1.0 / pixel_size_nm, 1.0 / pixel_size_nm)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, imagej=True, resolution=resolution, metadata=metadata)
    return path


def _outline(mask: np.ndarray) -> np.ndarray:
    """The longest outline of a boolean ``mask`` as (n, 2) x, y vertices in px (pixel edges)."""
    from skimage.measure import find_contours

    padded = np.pad(mask, 1).astype(np.float32)
    contours = find_contours(padded, 0.5)
    if not contours:
        return np.zeros((0, 2))
    c = max(contours, key=len)
    # find_contours gives (row, col) of the padded grid at pixel centres; pixel k's centre is
    # at k + 0.5 in ImageJ's edge-based coordinates
    return np.column_stack((c[:, 1] - 1 + 0.5, c[:, 0] - 1 + 0.5))


def write_rois(labels: np.ndarray, table: np.ndarray, path: Path) -> Path:
    """Write one polygon ROI per particle of ``table`` (outline of its label) as an ImageJ ROI
    set (a ZIP Fiji's ROI Manager opens); ROI names are the zero-padded particle ids."""
    import roifile

    rois = []
    h, w = labels.shape
    for row in table:
        k = int(row["id"])
        x0, y0, x1, y1 = (int(v) for v in row["bbox"])
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        crop = labels[y0:y1, x0:x1] == k
        pts = _outline(crop)
        if len(pts) < 3:
            continue
        pts += (x0, y0)
        roi = roifile.ImagejRoi.frompoints(pts, name=f"{k:04d}")
        rois.append(roi)
    return _write_roiset(rois, path)


def _write_roiset(rois: list[Any], path: Path) -> Path:
    import roifile

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    if rois:
        roifile.roiwrite(path, rois)
    else:  # an empty set is still a valid (empty) ZIP, so every image has its file
        import zipfile

        with zipfile.ZipFile(path, "w"):
            pass
    return path


def ellipse_points(x: float, y: float, major_px: float, minor_px: float,
                   orientation_deg: float, n: int = 36) -> np.ndarray:
    """(n, 2) x, y vertices (px) of the ellipse with the given centre, full axes (px) and
    major-axis angle (degrees counter-clockwise from +x, image y pointing down)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a, b = major_px / 2, minor_px / 2
    th = math.radians(orientation_deg)
    ex, ey = a * np.cos(t), b * np.sin(t)
    return np.column_stack((x + 0.5 + ex * math.cos(th) + ey * math.sin(th),
                            y + 0.5 - ex * math.sin(th) + ey * math.cos(th)))


def write_ellipse_rois(table: np.ndarray, path: Path, *, units: str = "nm",
                       pixel_size_nm: float | None = None) -> Path:
    """Write each particle's fitted ellipse as a polygon ROI (ImageJ ROI set ZIP).

    ``units``/``pixel_size_nm`` are the ``det`` header's: ``major_nm``/``minor_nm`` are
    converted to px when the table is in nm.
    """
    import roifile

    scale = 1.0 / pixel_size_nm if units == "nm" and pixel_size_nm else 1.0
    rois = []
    for row in table:
        pts = ellipse_points(float(row["x"]), float(row["y"]), float(row["major_nm"]) * scale,
                             max(float(row["minor_nm"]) * scale, 0.5),
                             float(row["orientation_deg"]))
        rois.append(roifile.ImagejRoi.frompoints(pts, name=f"{int(row['id']):04d}"))
    return _write_roiset(rois, path)


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``target`` (> 0): a scale bar's length."""
    if not target > 0:
        raise ValueError(f"scale bar target must be positive, got {target!r}")
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**k <= target:
            return float(m * 10**k)
    return float(10**k)


def _bar_label(length: float, unit: str) -> str:
    if unit == "nm" and length >= 1000:
        return f"{length / 1000:g} µm"
    return f"{length:g} {unit}"


def write_overlay_png(image: np.ndarray, labels: np.ndarray, path: Path, *,
                      pixel_size_nm: float | None = None,
                      border_ids: Iterable[int] = ()) -> Path:
    """Write the image (8-bit grey) with particle outlines and a scale bar as an RGB PNG.

    Outlines are yellow, those of ``border_ids`` (particles cut by the frame edge) blue. The
    scale bar is about a fifth of the width, labelled in nm (µm from 1000 nm) or px.
    """
    from PIL import Image, ImageDraw, ImageFont
    from skimage.segmentation import find_boundaries

    grey = _display_u8(image)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = (255, 215, 0)
    border = np.isin(labels, np.fromiter(border_ids, dtype=np.int64)) & edges
    rgb[border] = (80, 160, 255)
    im = Image.fromarray(rgb, "RGB")
    h, w = labels.shape
    unit, per_px = ("nm", pixel_size_nm) if pixel_size_nm else ("px", 1.0)
    length = nice_length(w * per_px / 5)
    bar_px = max(1, round(length / per_px))
    draw = ImageDraw.Draw(im)
    size = max(10, min(w, h) // 30)
    font = ImageFont.load_default(size=size)
    text = _bar_label(length, unit)
    margin = max(4, w // 50)
    thick = max(2, h // 150)
    x1, y1 = w - margin, h - margin
    x0, y0 = x1 - bar_px, y1 - thick
    tw = draw.textlength(text, font=font)
    box = (min(x0, x1 - tw) - 4, y0 - size - 8, x1 + 4, y1 + 4)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.rectangle((x0, y0, x1, y1), fill=(255, 255, 255))
    draw.text((x1 - tw, y0 - size - 4), text, fill=(255, 255, 255), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG", dpi=(300, 300))
    return path
