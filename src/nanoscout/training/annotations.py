"""Read particle annotations made elsewhere into instance label maps (lengths in px).

The format is chosen by the label file's extension:

* ``.png`` / ``.tif`` / ``.tiff``: a mask. An instance label image (0 = background, one id per
  particle) is taken as it is; a binary mask (two values, the non-zero one = particle) becomes
  its 8-connected components (touching particles then count as one). Colour masks are read
  from their first channel.
* ``.txt``: YOLO boxes, one ``class cx cy w h`` line each (normalised to the image size; the
  class is ignored). Each box becomes the model's own particle inside it when one fits the box
  (box IoU >= 0.5), else the ellipse inscribed in it (:func:`nanoscout.training.crops.ellipse_labels`).
* ``.csv``: points ``x,y[,diameter]`` in px (a header line is allowed). A point with a
  diameter becomes a disk; without one, the model's own particle under the point, else a disk of
  the median diameter the model finds in the image (else of the other points' median diameter).
* ``.zip`` / ``.roi``: ImageJ ROI sets (read by ``roifile``): polygons, freehand and traced
  outlines, ovals and rectangles are rasterised; point ROIs count as points (above).

"The model's own particle" needs a ``predict`` callable (image -> int32 instance labels, e.g.
the base detector's ``detect(image).labels``); without one, the geometric fallback is used.
Malformed input raises :class:`~nanoscout.wire.errors.ReaderError` naming the file (and line).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nanoscout.clients.acquisition.readers import read_image as read_frame_file
from nanoscout.training.crops import ellipse_labels
from nanoscout.wire.errors import ReaderError

__all__ = ["LABEL_SUFFIXES", "Annotation", "Predict", "read_annotation", "read_image"]

#: image -> int32 instance labels of the same shape (the model's own prediction)
Predict = Callable[[np.ndarray], np.ndarray]

LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".txt", ".csv", ".zip", ".roi")
_MASK = (".png", ".tif", ".tiff")
#: a point without a diameter and no detected particle anywhere: a disk of this many px
_FALLBACK_DIAMETER_PX = 10.0


@dataclass(frozen=True)
class Annotation:
    """The particles of one annotated image.

    ``labels``: int32 instance map on the image's grid (0 = background). ``kind``: "mask",
    "boxes", "points" or "rois". ``boxes``: the given boxes (N, 4) x0, y0, x1, y1 in px (pixel
    edges) for YOLO input, where the truth is the boxes themselves (scored by box IoU), else
    None. ``from_model``: how many outlines came from the model's own prediction.
    """

    path: Path
    kind: str
    labels: np.ndarray
    boxes: np.ndarray | None
    from_model: int = 0

    @property
    def n(self) -> int:
        """Return the number of annotated particles."""
        return int(np.unique(self.labels[self.labels > 0]).size)


def read_image(path: Path) -> np.ndarray:
    """Return the first 2-D image of ``path`` as float32, read as ``measure`` and ``serve``
    read it (:func:`nanoscout.clients.acquisition.readers.read_image`: TIFF, DM3/4, EMI/SER,
    MRC, EMD, PNG, JPEG; colour as 8-bit luma). Raises ReaderError."""
    try:
        record = read_frame_file(path)
    except ReaderError as exc:
        raise ReaderError(f"cannot read image {path}: {exc}") from exc
    return np.asarray(record.data, dtype=np.float32)


def read_annotation(path: Path, shape: tuple[int, int], image: np.ndarray | None = None,
                    predict: Predict | None = None) -> Annotation:
    """Return the annotation in ``path`` for an image of ``shape`` (rows, cols).

    ``image`` and ``predict`` let boxes and bare points take the model's own outline (see the
    module docstring). Raises ReaderError for an unknown extension, an unreadable or malformed
    file (naming the line), a mask whose shape differs from ``shape``, or coordinates outside
    the image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ReaderError(f"label file {path} does not exist")
    pred: np.ndarray | None = None
    if predict is not None and image is not None and suffix not in _MASK:
        pred = np.asarray(predict(image), np.int32)
        if pred.shape != tuple(shape):
            raise ReaderError(f"model prediction for {path} has shape {pred.shape}, not {shape}")
    if suffix in _MASK:
        return Annotation(path, "mask", _read_mask(path, shape), None)
    if suffix == ".txt":
        boxes = _read_yolo(path, shape)
        labels, n_model = _boxes_to_labels(shape, boxes, pred)
        return Annotation(path, "boxes", labels, boxes, n_model)
    if suffix == ".csv":
        pts = _read_points(path, shape)
        labels, n_model = _points_to_labels(shape, pts, pred)
        return Annotation(path, "points", labels, None, n_model)
    if suffix in (".zip", ".roi"):
        labels, n_model = _read_rois(path, shape, pred)
        return Annotation(path, "rois", labels, None, n_model)
    raise ReaderError(f"label file {path}: unknown extension {path.suffix!r} "
                      f"(known: {', '.join(LABEL_SUFFIXES)})")


# ------------------------------------------------------------------ masks


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path, key=0))
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise ReaderError(f"cannot read mask {path}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = _colour_instances(path, arr[..., :3])
    if arr.ndim != 2:
        raise ReaderError(f"mask {path} has shape {arr.shape}, expected a 2-D label image")
    if arr.shape != tuple(shape):
        raise ReaderError(f"mask {path} has shape {arr.shape}, its image {tuple(shape)}")
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_) \
            and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise ReaderError(f"mask {path} holds non-integer values (dtype {arr.dtype})")
    if np.any(arr < 0):
        raise ReaderError(f"mask {path} holds negative labels (min {arr.min()})")
    values = np.unique(arr)
    if values.size <= 2:  # binary (or empty): the non-zero value is particle
        fg = arr > 0
        labels, _ = ndi.label(fg, structure=np.ones((3, 3), bool))
        return labels.astype(np.int32)
    if values.max() > np.iinfo(np.int32).max:
        raise ReaderError(f"mask {path}: label {values.max()} does not fit int32")
    return arr.astype(np.int32)


#: a colour mask with more distinct colours than this is a picture, not a mask
MAX_COLOUR_INSTANCES = 10_000


def _colour_instances(path: Path, rgb: np.ndarray) -> np.ndarray:
    """A colour mask as labels: grey stored as RGB keeps its values; otherwise each colour
    is one particle (colour-coded instance maps, as annotation tools export them) and black
    is background. ReaderError for a colour picture (too many colours to be a mask)."""
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    if np.any(rgb < 0):
        raise ReaderError(f"mask {path} holds negative colour values (min {rgb.min()})")
    if rgb.dtype.kind in "ui" and rgb.dtype.itemsize <= 2:  # one int64 key per colour: fast
        flat = rgb.reshape(-1, 3).astype(np.int64)
        colours, inverse = np.unique((flat[:, 0] << 32) | (flat[:, 1] << 16) | flat[:, 2],
                                     return_inverse=True)
    else:
        colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colours) - 1 > MAX_COLOUR_INSTANCES:
        raise ReaderError(f"mask {path} has {len(colours)} colours: a picture, not a mask "
                          "(give one label per particle, or one colour per particle on black)")
    labels = inverse.reshape(rgb.shape[:2]).astype(np.int32)
    # colours are sorted and not negative, so black, where there is any, is colour 0
    return labels if not np.any(colours[0]) else labels + 1


# ------------------------------------------------------------------ YOLO boxes


def _read_yolo(path: Path, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReaderError(f"cannot read YOLO box file {path}: {exc}") from exc
    for no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) != 5:
            raise ReaderError(f"{path}:{no}: expected 5 fields 'class cx cy w h', got "
                              f"{len(parts)}: {text!r}")
        try:
            cx, cy, bw, bh = (float(v) for v in parts[1:])
        except ValueError:
            raise ReaderError(f"{path}:{no}: non-numeric box {text!r}") from None
        if not all(math.isfinite(v) for v in (cx, cy, bw, bh)) or bw <= 0 or bh <= 0 \
                or not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0) or bw > 1.0 or bh > 1.0:
            raise ReaderError(f"{path}:{no}: box {text!r} is not normalised (cx, cy in [0, 1], "
                              "0 < w, h <= 1)")
        rows.append((cx * w - bw * w / 2, cy * h - bh * h / 2,
                     cx * w + bw * w / 2, cy * h + bh * h / 2))
    return np.asarray(rows, np.float64).reshape(-1, 4)


def _instance_boxes(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids, boxes x0, y0, x1, y1 in pixel edges) of the instances of ``pred``."""
    objs = ndi.find_objects(pred)
    ids, boxes = [], []
    for k, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        ids.append(k)
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return np.asarray(ids, np.int64), np.asarray(boxes, np.float64).reshape(-1, 4)


def _boxes_to_labels(shape: tuple[int, int], boxes: np.ndarray, pred: np.ndarray | None
                     ) -> tuple[np.ndarray, int]:
    from nanoscout.training.evaluate import box_iou

    labels = ellipse_labels(shape, boxes)
    if pred is None or boxes.size == 0 or not pred.any():
        return labels, 0
    ids, pboxes = _instance_boxes(pred)
    iou = box_iou(boxes, pboxes)
    used: set[int] = set()
    n_model = 0
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    # ellipse_labels numbers the boxes 1.. in this order (larger first)
    for k, i in enumerate(order, start=1):
        j = int(np.argmax(iou[i])) if iou.shape[1] else -1
        if j < 0 or iou[i, j] < 0.5 or j in used:
            continue
        used.add(j)
        x0, y0, x1, y1 = boxes[i]
        r0, r1 = max(0, int(math.floor(y0))), min(shape[0], int(math.ceil(y1)))
        c0, c1 = max(0, int(math.floor(x0))), min(shape[1], int(math.ceil(x1)))
        inside = np.zeros(shape, bool)
        inside[r0:r1, c0:c1] = pred[r0:r1, c0:c1] == ids[j]
        if not inside.any():
            continue
        labels[labels == k] = 0
        labels[inside] = k
        n_model += 1
    return labels, n_model


# ------------------------------------------------------------------ points


def _read_points(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Return (N, 3) x, y, diameter (NaN when not given), px."""
    h, w = shape
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReaderError(f"cannot read point file {path}: {exc}") from exc
    for no, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        try:
            vals = [float(c) for c in cells if c != ""]
        except ValueError:
            if no == 1:  # a header line (x,y,diameter)
                continue
            raise ReaderError(f"{path}:{no}: non-numeric point {','.join(row)!r}") from None
        if len(vals) not in (2, 3):
            raise ReaderError(f"{path}:{no}: expected 'x,y' or 'x,y,diameter', got "
                              f"{len(vals)} values")
        x, y = vals[0], vals[1]
        d = vals[2] if len(vals) == 3 else math.nan
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h):
            raise ReaderError(f"{path}:{no}: point ({x}, {y}) lies outside the image "
                              f"({w} x {h} px)")
        if len(vals) == 3 and not (math.isfinite(d) and d > 0):
            raise ReaderError(f"{path}:{no}: diameter {d} must be > 0 px")
        out.append((x, y, d))
    return np.asarray(out, np.float64).reshape(-1, 3)


def _median_ecd(labels: np.ndarray) -> float:
    _, areas = np.unique(labels[labels > 0], return_counts=True)
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else 0.0


def _points_to_labels(shape: tuple[int, int], pts: np.ndarray, pred: np.ndarray | None
                      ) -> tuple[np.ndarray, int]:
    h, w = shape
    labels = np.zeros(shape, np.int32)
    given = pts[np.isfinite(pts[:, 2]), 2] if pts.size else np.zeros(0)
    fallback = _median_ecd(pred) if pred is not None else 0.0
    if fallback <= 0:
        fallback = float(np.median(given)) if given.size else _FALLBACK_DIAMETER_PX
    yy, xx = np.mgrid[0:h, 0:w]
    used: set[int] = set()
    n_model = 0
    # disks first, model outlines last: a click on a particle wins over a neighbour's disk
    order = np.argsort(np.isnan(pts[:, 2])) if pts.size else np.zeros(0, np.int64)
    for k, i in enumerate(order, start=1):
        x, y, d = pts[i]
        if math.isnan(d) and pred is not None:
            j = int(pred[int(y), int(x)])
            if j > 0 and j not in used:
                used.add(j)
                labels[pred == j] = k
                n_model += 1
                continue
        r = (fallback if math.isnan(d) else d) / 2.0
        r0, r1 = max(0, int(y - r) - 1), min(h, int(y + r) + 2)
        c0, c1 = max(0, int(x - r) - 1), min(w, int(x + r) + 2)
        disk = (yy[r0:r1, c0:c1] + 0.5 - y) ** 2 + (xx[r0:r1, c0:c1] + 0.5 - x) ** 2 <= r * r
        if not disk.any():
            disk[min(int(y), r1 - 1) - r0, min(int(x), c1 - 1) - c0] = True
        labels[r0:r1, c0:c1][disk] = k
    return labels, n_model


# ------------------------------------------------------------------ ImageJ ROIs


def _read_rois(path: Path, shape: tuple[int, int], pred: np.ndarray | None
               ) -> tuple[np.ndarray, int]:
    import roifile
    from skimage.draw import polygon

    try:
        rois = roifile.roiread(path)
    except Exception as exc:  # roifile raises ValueError / struct.error / zipfile errors
        raise ReaderError(f"cannot read ImageJ ROI set {path}: {exc}") from exc
    if not isinstance(rois, list):
        rois = [rois]
    labels = np.zeros(shape, np.int32)
    points = []
    k = 0
    for no, roi in enumerate(rois, start=1):
        name = roi.name or f"#{no}"
        if roi.roitype == roifile.ROI_TYPE.POINT:
            for x, y in np.asarray(roi.coordinates(), np.float64).reshape(-1, 2):
                points.append((x, y, math.nan))
            continue
        if roi.roitype in (roifile.ROI_TYPE.LINE, roifile.ROI_TYPE.ANGLE,
                           roifile.ROI_TYPE.POLYLINE, roifile.ROI_TYPE.FREELINE):
            raise ReaderError(f"{path}: ROI {name} is a line ({roi.roitype.name}), not an "
                              "outline; use polygon, freehand, oval or rectangle ROIs")
        xy = np.asarray(roi.coordinates(), np.float64).reshape(-1, 2)
        if len(xy) < 3:
            raise ReaderError(f"{path}: ROI {name} has {len(xy)} vertices, an outline needs 3")
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape)
        if rr.size == 0:
            raise ReaderError(f"{path}: ROI {name} lies outside the image "
                              f"({shape[1]} x {shape[0]} px)")
        k += 1
        labels[rr, cc] = k
    n_model = 0
    if points:
        pts = np.asarray(points, np.float64)
        h, w = shape
        bad = ~((pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h))
        if bad.any():
            x, y = pts[int(np.argmax(bad)), :2]
            raise ReaderError(f"{path}: point ROI ({x}, {y}) lies outside the image")
        plab, n_model = _points_to_labels(shape, pts, pred)
        free = (plab > 0) & (labels == 0)
        labels[free] = plab[free] + k
    return labels, n_model
