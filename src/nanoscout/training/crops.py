"""Training crops from the real data sets (training parts of their splits only).

* EMPS training papers (``models/splits/emps.json`` ``train``): instance maps as they are.
* STEM training materials (``models/splits/stem.json`` ``train``): only boxes exist, so each box
  becomes the ellipse inscribed in it (a pseudo instance; the evaluation on STEM is by box IoU);
  :class:`RealImage` keeps the boxes too, for box-supervised losses (``nanoscout.training.boxloss``).
* BF-TEM training frames (``models/splits/msa.json`` ``train``): mask blobs as instances.

Every crop is taken at a random *working scale*: the image is resampled so that its median
particle ECD becomes ``d ~ logUniform(diameter_range)`` px, the way the detector's automatic
scale resamples a frame at run time, then cut to ``size`` x ``size`` (smaller images are padded
and the padding is marked invalid, so the loss ignores it). Photometric augmentation (gamma,
contrast inversion, blur, Gaussian noise) and flips / 90-degree rotations follow. A thick,
uneven support can be laid under a crop first (:func:`thick_support`): in HAADF-STEM the
support's signal adds to the particles', so a thick support leaves them faint against a bright,
lumpy background.

Nothing here reads a validation image: :func:`load_real_training` takes its lists from the
committed split files and refuses an id that is also listed as validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nanoscout.analysis.preprocess import normalize, resample, resize_nearest
from nanoscout.training.realdata import emps_index, load_emps, load_msa, load_split, load_stem
from nanoscout.wire.errors import ConfigError

__all__ = ["RealImage", "crop_at_scale", "ellipse_labels", "load_real_training", "low_dose",
           "photometric", "pseudo_mask_labels", "signed_span", "thick_support"]


@dataclass(frozen=True)
class RealImage:
    """One training image: normalised float32 grey image and int32 instance labels (px)."""

    set: str
    id: str
    image: np.ndarray
    labels: np.ndarray
    median_ecd_px: float
    #: pixels whose label the truth does not tell (box supervision: between a box and its
    #: inner ellipse, :func:`nanoscout.training.boxloss.ring_mask`); None: every pixel is known
    ignore: np.ndarray | None = None


def ellipse_labels(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """Return an int32 instance map with the ellipse inscribed in each (x0, y0, x1, y1) box.

    Larger boxes are drawn first, so a small particle overlapping a large one stays visible.
    """
    h, w = shape
    lab = np.zeros(shape, np.int32)
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    for k, i in enumerate(order, start=1):
        x0, y0, x1, y1 = boxes[i]
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        ax, ay = max((x1 - x0) / 2.0, 0.5), max((y1 - y0) / 2.0, 0.5)
        r0, r1 = max(0, int(math.floor(y0))), min(h, int(math.ceil(y1)) + 1)
        c0, c1 = max(0, int(math.floor(x0))), min(w, int(math.ceil(x1)) + 1)
        if r0 >= r1 or c0 >= c1:
            continue
        yy = (np.arange(r0, r1)[:, None] + 0.5 - cy) / ay
        xx = (np.arange(c0, c1)[None, :] + 0.5 - cx) / ax
        inside = yy * yy + xx * xx <= 1.0
        lab[r0:r1, c0:c1][inside] = k
    return lab


def pseudo_mask_labels(folder: Path, image_id: str, shape: tuple[int, int]) -> np.ndarray | None:
    """Return the pseudo-mask instance map (int32, px) of STEM image ``image_id`` from
    ``folder`` (``<id>.npz`` written by :mod:`nanoscout.training.pseudo_masks`), or None where
    the folder has none. Raises ValueError for a map of another shape (masks written for other
    images)."""
    path = Path(folder) / f"{image_id}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        labels = z["labels"].astype(np.int32)
    if labels.shape != tuple(shape):
        raise ValueError(f"{path}: pseudo-mask shape {labels.shape} is not the image's {shape}")
    return labels


def _median_ecd(labels: np.ndarray) -> float:
    _, areas = np.unique(labels[labels > 0], return_counts=True)
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else 0.0


def load_real_training(sets: tuple[str, ...] = ("emps", "stem"), root: Path | None = None,
                       exclude: set[str] | None = None, box_ring: float | None = None,
                       stem_masks: Path | None = None) -> list[RealImage]:
    """Return the training images of ``sets`` (never a validation image; ``exclude``: more ids).

    ``box_ring``: for box-only truth (STEM), mark the pixels between each box and its inner
    ellipse (half-axes x ``box_ring``) as unknown (``RealImage.ignore``); None: the inscribed
    ellipses are taken as the masks everywhere (detector 3.0).
    ``stem_masks``: a folder of pseudo-masks refined by a detector
    (:mod:`nanoscout.training.pseudo_masks`, :func:`pseudo_mask_labels`), taken instead of the
    ellipses for the STEM images it holds.
    """
    out: list[RealImage] = []
    exclude = exclude or set()
    for name in sets:
        split = load_split(name)
        val = set(split["validation"])
        ids = [i for i in split["train"] if i not in exclude]
        if val & set(ids):
            raise ConfigError(f"split {name}: ids listed as both train and validation")
        if name == "emps":
            dois = dict(emps_index(root))
            for i in ids:
                s = load_emps(i, root, dois.get(i, ""))
                assert s.labels is not None
                out.append(RealImage("emps", i, normalize(s.image), s.labels,
                                     _median_ecd(s.labels)))
        elif name == "stem":
            for i in ids:
                s = load_stem(i, root)
                assert s.boxes is not None
                lab = (None if stem_masks is None
                       else pseudo_mask_labels(stem_masks, i, s.image.shape))
                if lab is None:
                    lab = ellipse_labels(s.image.shape, s.boxes)
                ign = None
                if box_ring is not None:
                    from nanoscout.training.boxloss import ring_mask

                    ign = ring_mask(s.image.shape, s.boxes, box_ring)
                out.append(RealImage("stem", i, normalize(s.image), lab, _median_ecd(lab), ign))
        elif name == "msa":
            for i in ids:
                s = load_msa(i, root)
                assert s.labels is not None
                out.append(RealImage("msa", i, normalize(s.image), s.labels,
                                     _median_ecd(s.labels)))
        else:
            raise ConfigError(f"no training data loader for set {name!r}")
    return [r for r in out if r.median_ecd_px > 0]


def crop_at_scale(item: RealImage, rng: np.random.Generator, size: int,
                  diameter_range: tuple[float, float] = (8.0, 48.0),
                  max_upsample: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image, labels, valid) crops of ``size`` x ``size`` at a random working scale.

    ``valid`` is 1 on image pixels and 0 on padding (and on ``item.ignore`` pixels).
    """
    lo, hi = diameter_range
    target = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    s = min(target / item.median_ecd_px, max_upsample)
    h, w = item.image.shape
    hh, ww = max(1, round(h * s)), max(1, round(w * s))
    # cut the source window first so huge images are not resampled whole
    ch, cw = min(hh, size), min(ww, size)
    r0 = int(rng.integers(0, hh - ch + 1))
    c0 = int(rng.integers(0, ww - cw + 1))
    sr0, sr1 = int(math.floor(r0 / s)), min(h, int(math.ceil((r0 + ch) / s)) + 1)
    sc0, sc1 = int(math.floor(c0 / s)), min(w, int(math.ceil((c0 + cw) / s)) + 1)
    src = item.image[sr0:sr1, sc0:sc1]
    lab = item.labels[sr0:sr1, sc0:sc1]
    oh, ow = max(1, round(src.shape[0] * s)), max(1, round(src.shape[1] * s))
    img = resample(src, (oh, ow))[:ch, :cw]
    labr = resize_nearest(lab, (oh, ow))[:ch, :cw]
    out_img = np.full((size, size), float(np.median(img)), np.float32)
    out_lab = np.zeros((size, size), np.int32)
    valid = np.zeros((size, size), np.float32)
    pr = int(rng.integers(0, size - img.shape[0] + 1))
    pc = int(rng.integers(0, size - img.shape[1] + 1))
    out_img[pr:pr + img.shape[0], pc:pc + img.shape[1]] = img
    out_lab[pr:pr + img.shape[0], pc:pc + img.shape[1]] = labr
    valid[pr:pr + img.shape[0], pc:pc + img.shape[1]] = 1.0
    if item.ignore is not None:
        ign = resize_nearest(item.ignore[sr0:sr1, sc0:sc1].astype(np.uint8), (oh, ow))[:ch, :cw]
        valid[pr:pr + img.shape[0], pc:pc + img.shape[1]] *= 1.0 - ign
    return out_img, out_lab, valid


def photometric(x: np.ndarray, rng: np.random.Generator, invert_p: float = 0.25) -> np.ndarray:
    """Return ``x`` (normalised, ~[0, 1]) with random gamma, inversion, blur and noise."""
    y = np.clip(x, 0.0, 1.0) ** float(np.exp(rng.uniform(-0.35, 0.35)))
    y = y * float(rng.uniform(0.7, 1.2)) + float(rng.uniform(-0.1, 0.1))
    if rng.random() < invert_p:
        y = 1.0 - y
    if rng.random() < 0.25:
        y = ndi.gaussian_filter(y, sigma=float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.35:
        y = y + rng.normal(0.0, float(rng.uniform(0.01, 0.1)), y.shape)
    return np.clip(y, -0.5, 1.5).astype(np.float32)


def low_dose(image: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``image`` (2-D) as a Poisson draw of ``dose * (0.05 + x)`` counts per pixel,
    float32, where x is the image scaled to [0, 1] by its 0.5 / 99.5 percentiles: the same
    specimen at a dose of ``dose`` counts in its brightest pixels (shot noise; the 0.05 is a
    dark level, so the darkest pixels are not noise-free). The image itself (as float32) for a
    dose of 0. ``benchmarks/noise_stress.py`` scores the detectors on such frames; training
    lays it on real crops (``low_dose_p``)."""
    x = np.asarray(image, np.float64)
    if dose <= 0:
        return x.astype(np.float32)
    lo, hi = np.percentile(x, [0.5, 99.5])
    x = np.clip((x - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    return rng.poisson(dose * (0.05 + x)).astype(np.float32)


def thick_support(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  amplitude: tuple[float, float] = (0.5, 3.0)) -> np.ndarray:
    """Return ``x`` (normalised, ~[0, 1]) on a thick, uneven support, normalised again.

    HAADF-STEM intensity adds up along the beam: a particle on a thick support (silica or
    alumina spheres, stacked carbon) sits on the support's projected thickness; in a
    bright-field image (particles darker than the rest of ``labels``' crop) the support darkens
    the frame instead, so the thickness is subtracted there. The support
    is drawn as overlapping spheres (projected thickness ``sqrt(1 - r^2)``, radii 1/8 to 2/3
    of the crop's side) or a smooth random field, scaled to ``amplitude`` times the crop's
    own range; the sum is normalised by its percentiles as the detector normalises a frame,
    which leaves the particles' contrast smaller by about ``1 / (1 + amplitude)``. Labels
    stay as they are.
    """
    h, w = x.shape
    side = float(min(h, w))
    if rng.random() < 0.6:
        field = np.zeros((h, w), np.float32)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for _ in range(int(rng.integers(2, 9))):
            r = float(rng.uniform(side / 8.0, side * 2.0 / 3.0))
            cy, cx = rng.uniform(-r / 2.0, h + r / 2.0), rng.uniform(-r / 2.0, w + r / 2.0)
            d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)
            field += np.sqrt(np.clip(1.0 - d2, 0.0, None)) * float(rng.uniform(0.5, 1.0))
    else:
        field = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32),
                                    sigma=float(rng.uniform(side / 16.0, side / 4.0)))
    lo, hi = float(field.min()), float(field.max())
    if hi - lo < 1e-6:
        return x.astype(np.float32)
    y = x + (field - lo) / (hi - lo) * signed_span(x, labels) * float(rng.uniform(*amplitude))
    return normalize(y)


def support_crystals(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                     size_ratio: tuple[float, float] = (3.0, 10.0)) -> np.ndarray:
    """Return ``x`` (normalised, ~[0, 1]) with one to three unlabelled support crystals added,
    normalised again; ``labels`` stay as they are.

    A supported catalyst often shows a few objects far larger than its particles beside or
    under them: a support crystal, a thick region, an agglomerate. Each is a convex polygon
    (4-8 corners) or an ellipse, ``size_ratio`` times the crop's median particle diameter
    across (``labels``; 24 px where it has none), with a thickness wedge across it and a
    faint smooth texture, edges blurred by 0.5-2 px, 0.4-1.5x the crop's range, added with
    the particles' polarity as :func:`thick_support` adds its support. Drawn apart from
    ``benchmarks/scale_stress.py``'s ``grains`` (polygons sized by the frame, flat tops), so
    that benchmark still asks something the training never showed.
    """
    from skimage.draw import ellipse, polygon

    h, w = x.shape
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    diameter = float(2.0 * np.sqrt(np.median(counts) / np.pi)) if ids.size else 24.0
    field = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        r = 0.5 * diameter * float(rng.uniform(*size_ratio))
        cy, cx = float(rng.uniform(0, h)), float(rng.uniform(0, w))
        if rng.random() < 0.6:
            n = int(rng.integers(4, 9))
            ang = np.sort(rng.uniform(0.0, 2.0 * np.pi, n))
            rad = r * rng.uniform(0.7, 1.3, n)
            rr, cc = polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), (h, w))
        else:
            rr, cc = ellipse(cy, cx, r * float(rng.uniform(0.5, 1.0)), r,
                             shape=(h, w), rotation=float(rng.uniform(0.0, np.pi)))
        if rr.size == 0:
            continue
        theta = float(rng.uniform(0.0, 2.0 * np.pi))
        wedge = 1.0 + float(rng.uniform(-0.5, 0.5)) * (
            (yy[rr, cc] - cy) * np.sin(theta) + (xx[rr, cc] - cx) * np.cos(theta)) / max(r, 1.0)
        texture = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32),
                                      sigma=max(1.0, diameter / 4.0))[rr, cc]
        texture *= float(rng.uniform(0.0, 0.15)) / max(float(texture.std()), 1e-6)
        field[rr, cc] = np.maximum(field[rr, cc],
                                   float(rng.uniform(0.4, 1.5)) * (wedge + texture))
    field = ndi.gaussian_filter(field, float(rng.uniform(0.5, 2.0)))
    return normalize(x + field * signed_span(x, labels))


def signed_span(x: np.ndarray, labels: np.ndarray) -> float:
    """The range of ``x`` (its 0.5 / 99.5 percentiles; 1 where flat), negative where the
    particles (``labels`` > 0) are darker than the rest: what a thick object beside them adds
    in HAADF (their polarity) and takes away in bright field."""
    span = float(np.percentile(x, 99.5) - np.percentile(x, 0.5)) or 1.0
    fg = labels > 0
    return -span if fg.any() and not fg.all() and x[fg].mean() < x[~fg].mean() else span
