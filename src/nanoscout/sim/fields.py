"""Synthetic fields of view for the field-of-view classifier (numpy + scipy only).

:func:`render_field` draws one whole field of view of a named class (:data:`FIELD_CLASSES`).
Everything that is not the class is drawn at random for every field, so that only the class is
systematic: modality (BF-TEM dark-on-bright, HAADF-STEM bright-on-dark, SEM edge-bright), a
random contrast inversion, pixel size (0.1-20 nm, metadata only), particle size relative to the
field (ECD ~1.6-10 % of the field's side), density, electron dose (noise), probe blur,
illumination gradient, support texture and 8-bit quantisation.

Classes and what makes them so:

* ``empty_support``: an amorphous support film (visible texture, sometimes soft support
  grains), no particles.
* ``isolated_particles``: 3-22 % coverage, almost no particle touches another (< 8 %); no rods
  (spheres, ellipses of aspect < 2, faceted particles only).
* ``agglomerated_particles``: 20-45 % coverage, >= 80 % of the particles placed touching
  another (clusters and chains); no rods (same particle mix).
* ``rods_wires``: the field *contains* rods or wires, from fields dominated by them down to a
  single rod among particles (what operators set alerts on). 45 % are 1-3 rods (aspect >= 3,
  length 8-40 % of the side, width 0.4-1x the particle size, drawn in the particles' own
  contrast) among rod-free isolated or agglomerated particles, their boxes in ``rod_boxes``;
  25 % are rod fields of :mod:`nanoscout.sim.synthetic` (aspect 2-5, up to a third spheres); 30 %
  long straight or curved wires (aspect >= 10), sometimes with particles.
* ``film_structure``: a continuous island film near percolation, a cracked film, a porous
  (sponge) network, or large polycrystalline grains, covering the field.
* ``out_of_focus``: a particle field seen through strong defocus blur (Gaussian sigma
  0.8-3 % of the side, at least a third of the particle size), half of them with Fresnel-like
  fringes; the detector noise on top stays sharp.
* ``charging_saturated``: a field with large clipped-white regions (10-45 % of the pixels
  exactly at the detector's maximum) plus streaks along the scan lines and/or strong brightness
  gradients.
* ``blank``: flat illumination (gradient <= 3 %) and shot noise only.

Particles come from :class:`nanoscout.sim.synthetic.Specimen` rendered noiseless; wires, films, the
extra rods and the defects are drawn here on top of that image and the shot noise is applied
last. :class:`Field` ``image`` is float32 raw intensity (electron counts, or 8-bit grey levels
for quantised fields), like a simulator frame: the classifier's input is made from it by
``nanoscout.analysis.preprocess.fixed_input``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from nanoscout.sim.synthetic import Specimen, SpecimenConfig

__all__ = ["FIELD_CLASSES", "Field", "render_field", "render_rod_among_spheres"]

FIELD_CLASSES: tuple[str, ...] = (
    "empty_support",
    "isolated_particles",
    "agglomerated_particles",
    "rods_wires",
    "film_structure",
    "out_of_focus",
    "charging_saturated",
    "blank",
)

Modality = Literal["TEM", "STEM", "SEM"]


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


@dataclass
class Field:
    """One synthetic field of view.

    ``image``: float32 (H, W) raw intensity (counts); ``rod_boxes``: float32 (N, 4) boxes
    (x0, y0, x1, y1) in px of the rods drawn here (:func:`render_rod_among_spheres`, the few-rods
    ``rods_wires`` fields; pixel
    ``(row, col)`` has its centre at ``y = row, x = col``; the box encloses every pixel the
    rod covers), empty when none are known.
    """

    image: np.ndarray
    label: str
    pixel_size_nm: float
    modality: str
    rod_boxes: np.ndarray = field(default_factory=_no_boxes)


@dataclass(frozen=True)
class _Look:
    """The nuisance parameters of one field (everything that must not be systematic)."""

    modality: Modality
    dose: float  # electrons per px at unit intensity
    blur_px: float
    gradient: float
    texture: float
    contrast: float
    invert: bool
    quantise: bool
    pixel_size_nm: float


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw_look(rng: np.random.Generator) -> _Look:
    modality: Modality = ("TEM", "STEM", "SEM")[int(rng.integers(0, 3))]
    return _Look(
        modality=modality,
        dose=_log_uniform(rng, 20.0, 3000.0),
        blur_px=float(rng.uniform(0.4, 1.4)),
        gradient=float(rng.uniform(0.0, 0.3)),
        texture=_log_uniform(rng, 0.03, 0.15),
        contrast=float(rng.uniform(0.3, 0.8)),
        invert=bool(rng.random() < 0.12),
        quantise=bool(rng.random() < 0.3),
        pixel_size_nm=_log_uniform(rng, 0.1, 20.0),
    )


# ------------------------------------------------------------------------------- specimens


def _specimen_image(look: _Look, shape: tuple[int, int], rng: np.random.Generator, *,
                    coverage: float = 0.0, median_frac: float = 0.04, sigma_log: float = 0.25,
                    mix: dict[str, float] | None = None, agglomerate: float = 0.0,
                    texture: float | None = None, grains: float = 0.0,
                    grain_frac: float = 0.3) -> np.ndarray:
    """Return a noiseless specimen image (float32 relative intensity, illumination applied).

    Sizes are fractions of the field's side (``median_frac``: median particle ECD).
    """
    side = float(min(shape))
    median_px = max(median_frac * side, 3.0)
    cfg = SpecimenConfig(
        modality=look.modality, shape=shape, pixel_size_nm=1.0,
        median_diameter_nm=median_px, sigma_log=sigma_log, min_diameter_nm=2.0,
        max_diameter_nm=max(4.0 * median_px, 4.0), coverage=coverage,
        shape_mix=mix or {"sphere": 1.0}, agglomerate_fraction=agglomerate,
        dose_e_per_px=None, blur_px=look.blur_px, illumination_gradient=look.gradient,
        support_texture=look.texture if texture is None else texture,
        support_grains=grains, support_grain_nm=grain_frac * side,
        contrast=look.contrast, dtype="float32",
    )
    return Specimen.generate(cfg, rng).acquire(rng).image.astype(np.float32)


def _particle_mix(rng: np.random.Generator) -> dict[str, float]:
    """Return a rod-free shape mix (ellipses of nanoscout.sim.synthetic have aspect 1.2-2, not rods);
    nanoscout.sim.synthetic's default mix has 5 % rods, so it is never used for particle classes."""
    return {"sphere": 1.0, "ellipse": float(rng.uniform(0.0, 0.5)),
            "faceted": float(rng.uniform(0.0, 0.6)), "rod": 0.0}


def _isolated(look: _Look, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return _specimen_image(
        look, shape, rng, coverage=float(rng.uniform(0.03, 0.22)),
        median_frac=_log_uniform(rng, 0.016, 0.1), sigma_log=float(rng.uniform(0.05, 0.4)),
        mix=_particle_mix(rng), agglomerate=float(rng.uniform(0.0, 0.08)),
        grains=float(rng.uniform(0.1, 0.35)) if rng.random() < 0.15 else 0.0)


def _agglomerated(look: _Look, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return _specimen_image(
        look, shape, rng, coverage=float(rng.uniform(0.2, 0.45)),
        median_frac=_log_uniform(rng, 0.016, 0.08), sigma_log=float(rng.uniform(0.05, 0.4)),
        mix=_particle_mix(rng), agglomerate=float(rng.uniform(0.8, 1.0)))


# ------------------------------------------------------------------------------- overlays


def _compose(base: np.ndarray, alpha: np.ndarray, dens: np.ndarray, height: np.ndarray,
             look: _Look) -> np.ndarray:
    """Return ``base`` with extra material drawn on top in the modality's contrast.

    ``alpha``: coverage 0..1; ``dens``: projected thickness 0..~1; ``height``: surface height
    in px (SEM edge contrast). All three are blurred by the probe like the specimen.
    """
    if look.blur_px > 0:
        alpha = ndi.gaussian_filter(alpha, look.blur_px)
        dens = ndi.gaussian_filter(dens, look.blur_px)
    c = look.contrast
    if look.modality == "TEM":
        d = 0.55 * alpha + 0.45 * dens
        return (base * (1.0 - c * (1.0 - np.exp(-2.0 * d)))).astype(np.float32)
    if look.modality == "STEM":
        return (base + c * 1.4 * (0.3 * alpha + 0.7 * dens)).astype(np.float32)
    gy, gx = np.gradient(height)
    sec = np.minimum(np.sqrt(1.0 + gy * gy + gx * gx), 6.0) ** 0.8
    if look.blur_px > 0:
        sec = ndi.gaussian_filter(sec, look.blur_px)
    mat = base * (1.0 - alpha) + (0.3 + c * 0.35) * alpha
    return (mat * np.where(alpha > 0.02, sec, 1.0)).astype(np.float32)


def _capsule(shape: tuple[int, int], cy: float, cx: float, half_len: float, half_w: float,
             angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (alpha, thickness 0..1, box x0 y0 x1 y1 px) of one capsule (rod) in a frame."""
    h, w = shape
    c, s = math.cos(angle), math.sin(angle)
    hx = (half_len - half_w) * abs(c) + half_w + 1.0
    hy = (half_len - half_w) * abs(s) + half_w + 1.0
    r0, r1 = max(0, math.floor(cy - hy)), min(h, math.ceil(cy + hy) + 1)
    c0, c1 = max(0, math.floor(cx - hx)), min(w, math.ceil(cx + hx) + 1)
    alpha = np.zeros(shape, np.float32)
    thick = np.zeros(shape, np.float32)
    dy = (np.arange(r0, r1) - cy)[:, None]
    dx = (np.arange(c0, c1) - cx)[None, :]
    u, v = dx * c + dy * s, -dx * s + dy * c
    qu = np.maximum(np.abs(u) - (half_len - half_w), 0.0)
    sd = np.sqrt(qu * qu + v * v) - half_w
    a = np.clip(0.5 - sd, 0.0, 1.0)
    uu = np.clip(-sd / half_w, 0.0, 1.0)
    alpha[r0:r1, c0:c1] = a
    thick[r0:r1, c0:c1] = a * np.sqrt(uu * (2.0 - uu))
    rows, cols = np.nonzero(alpha > 0)
    box = np.array([cols.min() - 0.5, rows.min() - 0.5, cols.max() + 0.5, rows.max() + 0.5],
                   np.float32) if rows.size else np.zeros(4, np.float32)
    return alpha, thick, box


def _add_rods(base: np.ndarray, look: _Look, rng: np.random.Generator, n: int,
              width_px: float, *, length_frac: tuple[float, float] = (0.2, 0.4),
              min_aspect: float = 6.0, min_contrast: float = 0.45
              ) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, boxes x0 y0 x1 y1 px) with ``n`` rods drawn on ``base``.

    Rod length is ``length_frac`` of the side (at least ``min_aspect`` x ``width_px``); the rods
    are drawn with the look's contrast raised to at least ``min_contrast``.
    """
    shape = base.shape
    h, w = shape
    side = float(min(shape))
    alpha = np.zeros(shape, np.float32)
    thick = np.zeros(shape, np.float32)
    boxes = []
    for _ in range(n):
        half_w = 0.5 * width_px
        half_len = max(0.5 * rng.uniform(*length_frac) * side, min_aspect * half_w)
        half_len = min(half_len, 0.45 * side)
        angle = float(rng.uniform(0.0, math.pi))
        ext_x = (half_len - half_w) * abs(math.cos(angle)) + half_w + 4
        ext_y = (half_len - half_w) * abs(math.sin(angle)) + half_w + 4
        cy = float(rng.uniform(ext_y, max(h - ext_y, ext_y + 1)))
        cx = float(rng.uniform(ext_x, max(w - ext_x, ext_x + 1)))
        a, t, box = _capsule(shape, cy, cx, half_len, half_w, angle)
        np.maximum(alpha, a, out=alpha)
        np.maximum(thick, t, out=thick)
        boxes.append(box)
    height = thick * 0.5 * width_px
    rod_look = look if look.contrast >= min_contrast else _replace_contrast(look, min_contrast)
    img = _compose(base, alpha, thick, height, rod_look)
    return img, np.array(boxes, np.float32).reshape(-1, 4)


def _replace_contrast(look: _Look, contrast: float) -> _Look:
    return _Look(look.modality, look.dose, look.blur_px, look.gradient, look.texture, contrast,
                 look.invert, look.quantise, look.pixel_size_nm)


def _wires(base: np.ndarray, look: _Look, rng: np.random.Generator) -> np.ndarray:
    """Return ``base`` with 4-40 long straight or curved wires (aspect >= 10) drawn on it."""
    shape = base.shape
    h, w = shape
    side = float(min(shape))
    n = int(rng.integers(4, 41))
    width = max(_log_uniform(rng, 0.005, 0.025) * side, 2.5)
    curl = float(rng.uniform(0.0, 0.08)) if rng.random() < 0.6 else 0.0
    centre = np.zeros(shape, bool)
    for _ in range(n):
        length = rng.uniform(max(0.25, 10 * width / side), 1.2) * side
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        th = rng.uniform(0, 2 * math.pi)
        steps = int(length)
        dth = rng.normal(0.0, curl, steps)
        ths = th + np.cumsum(dth)
        ys = y + np.cumsum(np.sin(ths))
        xs = x + np.cumsum(np.cos(ths))
        ok = (ys >= 0) & (ys < h - 0.5) & (xs >= 0) & (xs < w - 0.5)
        centre[np.rint(ys[ok]).astype(int), np.rint(xs[ok]).astype(int)] = True
    d = ndi.distance_transform_edt(~centre).astype(np.float32)
    half = 0.5 * width
    alpha = np.clip(half - d + 0.5, 0.0, 1.0)
    uu = np.clip((half - d) / half, 0.0, 1.0)
    thick = alpha * np.sqrt(uu * (2.0 - uu))
    return _compose(base, alpha, thick, thick * half, look)


# ------------------------------------------------------------------------------- films


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / max(float(n.std()), 1e-6)


def _voronoi(rng: np.random.Generator, shape: tuple[int, int], cell_px: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Return (grain index map, distance to the nearest grain boundary px) of random grains."""
    h, w = shape
    n = max(4, int(h * w / (cell_px * cell_px)))
    seeds = np.zeros(shape, np.int32)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    seeds[ys, xs] = np.arange(1, n + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    grain = seeds[iy, ix]
    edge = np.zeros(shape, bool)
    edge[:, 1:] |= grain[:, 1:] != grain[:, :-1]
    edge[1:, :] |= grain[1:, :] != grain[:-1, :]
    return grain, ndi.distance_transform_edt(~edge).astype(np.float32)


def _film(look: _Look, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Return a noiseless film / structure field: island film, cracks, pores or grains."""
    side = float(min(shape))
    base = _specimen_image(look, shape, rng)
    kind = int(rng.integers(0, 4))
    scale = _log_uniform(rng, 0.012, 0.05) * side
    if kind == 0:  # island film near percolation (labyrinth), soft-edged
        f = _smooth_noise(rng, shape, scale)
        level = float(np.quantile(f, 1.0 - rng.uniform(0.4, 0.75)))
        alpha = np.clip((f - level) * rng.uniform(3.0, 8.0), 0.0, 1.0)
        dens = alpha * (0.6 + 0.2 * _smooth_noise(rng, shape, 2.0))
        height = ndi.gaussian_filter(alpha, 1.5) * scale * 0.3
    elif kind == 1:  # continuous film with a crack network
        _, dist = _voronoi(rng, shape, scale * rng.uniform(3.0, 8.0))
        crack = max(scale * rng.uniform(0.05, 0.25), 1.0)
        alpha = np.clip(dist - crack + 0.5, 0.0, 1.0)
        dens = alpha * (0.5 + 0.15 * _smooth_noise(rng, shape, scale))
        height = np.minimum(dist, 3.0 * crack)
    elif kind == 2:  # porous sponge: pores where a band-pass noise is near zero
        f = _smooth_noise(rng, shape, scale * 0.6) - 0.5 * _smooth_noise(rng, shape, scale * 2)
        f = f / max(float(f.std()), 1e-6)
        t = float(rng.uniform(0.4, 0.9))
        alpha = np.clip((np.abs(f) - t) * 4.0, 0.0, 1.0)
        if rng.random() < 0.5:
            alpha = 1.0 - alpha
        dens = alpha * 0.7
        height = ndi.gaussian_filter(alpha, 2.0) * scale * 0.5
    else:  # large polycrystalline grains with their own contrast and dark boundaries
        grain, dist = _voronoi(rng, shape, _log_uniform(rng, 0.07, 0.25) * side)
        tone = rng.uniform(0.1, 1.0, int(grain.max()) + 1).astype(np.float32)
        bound = max(side * 0.004, 1.0)
        alpha = np.ones(shape, np.float32)
        dens = tone[grain] * np.clip(dist / bound, 0.3, 1.0)
        height = tone[grain] * 4.0 + np.minimum(dist, 4.0)
    alpha = alpha.astype(np.float32)
    film_look = look if look.contrast >= 0.4 else _replace_contrast(look, 0.4)
    return _compose(base, alpha, dens.astype(np.float32), height.astype(np.float32), film_look)


# ------------------------------------------------------------------------------- defects


def _defocus(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Return ``img`` strongly blurred, half the time with defocus (Fresnel-like) fringes."""
    mean = float(img.mean())
    out = ndi.gaussian_filter(img, sigma, mode="nearest")
    if rng.random() < 0.5:
        k = float(rng.uniform(0.5, 2.0))
        out = out + k * (ndi.gaussian_filter(img, 0.6 * sigma, mode="nearest")
                         - ndi.gaussian_filter(img, 1.8 * sigma, mode="nearest"))
    return np.maximum(out, 0.02 * mean).astype(np.float32)


def _charging(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return ``img`` with bright charging blobs, scan streaks and/or a strong gradient."""
    h, w = img.shape
    side = float(min(h, w))
    ref = float(np.percentile(img, 50))
    out = img.copy()
    effects = rng.permutation(3)[: int(rng.integers(1, 4))]
    blobs = 0 in effects or not (1 in effects or 2 in effects)
    if blobs:
        f = _smooth_noise(rng, (h, w), _log_uniform(rng, 0.05, 0.2) * side)
        out = out + ref * rng.uniform(1.0, 4.0) * np.clip(f - rng.uniform(0.3, 1.2), 0, None)
    if 1 in effects:  # charging streaks: bright bands along the fast scan that decay
        rows = np.zeros(h, np.float32)
        for _ in range(int(rng.integers(3, 25))):
            r0 = int(rng.integers(0, h))
            rows[r0: r0 + int(rng.integers(1, 12))] += rng.uniform(0.5, 3.0)
        decay = np.exp(-np.arange(w, dtype=np.float32) / (rng.uniform(0.1, 1.0) * w))
        if rng.random() < 0.5:
            decay = decay[::-1]
        x0 = float(rng.uniform(0.0, 0.7))
        mask = (np.arange(w) >= int(x0 * w)).astype(np.float32)
        out = out + ref * rows[:, None] * (decay * mask)[None, :]
    if 2 in effects:  # strong brightness gradient (linear or radial)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if rng.random() < 0.5:
            th = rng.uniform(0, 2 * math.pi)
            g = (math.cos(th) * (xx / w - 0.5) + math.sin(th) * (yy / h - 0.5)) + 0.5
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            g = 1.0 - np.hypot(yy - cy, xx - cx) / side
        out = out * (1.0 + rng.uniform(1.0, 4.0) * np.clip(g, 0.0, None))
    return out.astype(np.float32)


# ------------------------------------------------------------------------------- exposure


def _expose(img: np.ndarray, look: _Look, rng: np.random.Generator, *,
            saturate: float | None = None) -> np.ndarray:
    """Return shot-noisy counts (float32) of relative intensity ``img``; saturation, quantisation
    and contrast inversion applied as the look (and ``saturate``: clipped fraction) says."""
    lam = np.maximum(img, 0.0) * np.float32(look.dose)
    counts = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
    low = lam < 12.0
    if low.any():
        counts[low] = rng.poisson(lam[low]).astype(np.float32)
    counts = np.maximum(counts, 0.0)
    if saturate is not None:
        level = float(np.quantile(counts[::2, ::2], 1.0 - saturate))
        counts = np.minimum(counts, np.float32(level))
    elif look.invert:
        counts = float(counts.max()) + float(counts.min()) - counts
    if look.quantise:
        top = float(counts.max()) if saturate is not None \
            else float(np.percentile(counts[::4, ::4], 99.9))
        counts = np.clip(np.rint(counts * (230.0 / max(top, 1e-6))), 0, 255)
        if saturate is not None:
            counts = np.minimum(counts, 230.0)
    return counts.astype(np.float32)


# ------------------------------------------------------------------------------- public


def _particle_field(look: _Look, shape: tuple[int, int], rng: np.random.Generator
                    ) -> tuple[np.ndarray, float]:
    """Return (noiseless particle field, its median particle ECD px) of any particle kind."""
    side = float(min(shape))
    k = int(rng.integers(0, 3))
    median_frac = _log_uniform(rng, 0.02, 0.1)
    if k == 2:
        mix = {"rod": 1.0, "sphere": float(rng.uniform(0.0, 0.3))}
        img = _specimen_image(look, shape, rng, coverage=float(rng.uniform(0.08, 0.3)),
                              median_frac=median_frac, mix=mix,
                              agglomerate=float(rng.uniform(0.0, 0.5)))
    else:
        img = _specimen_image(look, shape, rng, coverage=float(rng.uniform(0.05, 0.4)),
                              median_frac=median_frac, mix=_particle_mix(rng),
                              agglomerate=float(rng.uniform(0.0, 1.0)))
    return img, median_frac * side


def render_field(label: str, rng: np.random.Generator, *,
                 shape: tuple[int, int] = (512, 512),
                 rods: Literal["any", "needles", "dominated"] = "any") -> Field:
    """Return one random field of view of class ``label`` (one of :data:`FIELD_CLASSES`).

    Deterministic for a given generator state; the image is float32 raw counts of ``shape``.
    ``rods`` narrows ``rods_wires`` fields to one of its kinds: "needles" (1-3 rods among
    particles) or "dominated" (rod fields and wires); "any" draws them in the class's mix.
    Raises ValueError for an unknown label.
    """
    if label not in FIELD_CLASSES:
        raise ValueError(f"unknown field class {label!r} (known: {', '.join(FIELD_CLASSES)})")
    shape = (int(shape[0]), int(shape[1]))
    look = _draw_look(rng)
    side = float(min(shape))
    saturate: float | None = None
    boxes = _no_boxes()
    if label == "empty_support":
        grains = float(rng.uniform(0.1, 0.4)) if rng.random() < 0.3 else 0.0
        img = _specimen_image(look, shape, rng, texture=_log_uniform(rng, 0.05, 0.2),
                              grains=grains, grain_frac=float(rng.uniform(0.1, 0.4)))
    elif label == "isolated_particles":
        img = _isolated(look, shape, rng)
    elif label == "agglomerated_particles":
        img = _agglomerated(look, shape, rng)
    elif label == "rods_wires":
        v = rng.random()  # one draw whatever ``rods`` is: the mix maps onto a part of [0, 1)
        v = {"any": v, "needles": 0.45 * v, "dominated": 0.45 + 0.55 * v}[rods]
        if v < 0.45:  # the needle in the haystack: 1-3 rods among rod-free particles
            img, boxes = _few_rods(look, shape, rng)
        elif v < 0.7:  # rod fields of nanoscout.sim.synthetic (aspect 2-5)
            img = _specimen_image(
                look, shape, rng, coverage=float(rng.uniform(0.08, 0.35)),
                median_frac=_log_uniform(rng, 0.025, 0.09),
                mix={"rod": 1.0, "sphere": float(rng.uniform(0.0, 0.5))},
                agglomerate=float(rng.uniform(0.0, 0.5)))
        else:  # long wires, sometimes with a few particles
            base = _isolated(look, shape, rng) if rng.random() < 0.3 \
                else _specimen_image(look, shape, rng)
            img = _wires(base, look, rng)
    elif label == "film_structure":
        img = _film(look, shape, rng)
    elif label == "out_of_focus":
        img, d = _particle_field(look, shape, rng)
        sigma = max(_log_uniform(rng, 0.008, 0.03) * side, d / 3.0)
        img = _defocus(img, rng, min(sigma, 0.05 * side))
    elif label == "charging_saturated":
        v = rng.random()
        if v < 0.6:
            img, _ = _particle_field(look, shape, rng)
        elif v < 0.8:
            img = _specimen_image(look, shape, rng)
        else:
            img = _film(look, shape, rng)
        img = _charging(img, rng)
        saturate = float(rng.uniform(0.1, 0.45))
    else:  # blank
        level = _log_uniform(rng, 0.05, 1.0)
        g = float(rng.uniform(0.0, 0.03))
        th = rng.uniform(0, 2 * math.pi)
        yy = np.linspace(-0.5, 0.5, shape[0], dtype=np.float32)[:, None]
        xx = np.linspace(-0.5, 0.5, shape[1], dtype=np.float32)[None, :]
        img = (level * (1.0 + g * (math.sin(th) * yy + math.cos(th) * xx))).astype(np.float32)
    out = _expose(img, look, rng, saturate=saturate)
    return Field(out, label, look.pixel_size_nm, look.modality, boxes)


def _rods_among(look: _Look, shape: tuple[int, int], rng: np.random.Generator, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Return (noiseless image, rod boxes) of ``n`` long rods among isolated spheres."""
    side = float(min(shape))
    median_frac = _log_uniform(rng, 0.02, 0.05)
    mix = {"sphere": 1.0, "faceted": float(rng.uniform(0.0, 0.3))}
    base = _specimen_image(look, shape, rng, coverage=float(rng.uniform(0.04, 0.15)),
                           median_frac=median_frac, mix=mix,
                           agglomerate=float(rng.uniform(0.0, 0.1)))
    width = max(median_frac * side * rng.uniform(0.5, 1.0), 0.012 * side, 3.0)
    return _add_rods(base, look, rng, n, width)


def _few_rods(look: _Look, shape: tuple[int, int], rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Return (noiseless image, rod boxes px) of 1-3 rods among rod-free isolated or
    agglomerated particles; rod width 0.4-1x the particle ECD, length 8-40 % of the side
    (aspect >= 3), in the particles' own contrast."""
    side = float(min(shape))
    if rng.random() < 0.6:
        median_frac = _log_uniform(rng, 0.016, 0.08)
        base = _specimen_image(
            look, shape, rng, coverage=float(rng.uniform(0.03, 0.22)), median_frac=median_frac,
            sigma_log=float(rng.uniform(0.05, 0.4)), mix=_particle_mix(rng),
            agglomerate=float(rng.uniform(0.0, 0.08)))
    else:
        median_frac = _log_uniform(rng, 0.016, 0.06)
        base = _specimen_image(
            look, shape, rng, coverage=float(rng.uniform(0.2, 0.4)), median_frac=median_frac,
            sigma_log=float(rng.uniform(0.05, 0.4)), mix=_particle_mix(rng),
            agglomerate=float(rng.uniform(0.8, 1.0)))
    width = max(median_frac * side * rng.uniform(0.4, 1.0), 0.008 * side, 3.0)
    return _add_rods(base, look, rng, int(rng.integers(1, 4)), width,
                     length_frac=(0.08, 0.4), min_aspect=3.0, min_contrast=0.0)


def render_rod_among_spheres(rng: np.random.Generator, *,
                             shape: tuple[int, int] = (512, 512)) -> Field:
    """Return a field with exactly one long rod (aspect >= 6) among isolated spheres.

    ``rod_boxes`` holds that rod's box (1, 4) x0, y0, x1, y1 in px. Label ``rods_wires``.
    Used by the class-activation-map test: the map of the top class should peak on the rod.
    """
    shape = (int(shape[0]), int(shape[1]))
    look = _draw_look(rng)
    img, boxes = _rods_among(look, shape, rng, 1)
    return Field(_expose(img, look, rng), "rods_wires", look.pixel_size_nm, look.modality,
                 boxes)

