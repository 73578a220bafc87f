"""Synthetic electron-microscopy specimens with exact ground truth (numpy + scipy only).

A specimen is a set of nanoparticles (spheres, ellipses, rods, faceted polygons, triangular
plates; lognormal sizes; isolated, touching or agglomerated) lying on a support. Its geometry is
rasterised once onto a *periodic* canvas a little larger than the frame, so that a drifting field of
view can be re-acquired cheaply (:meth:`Specimen.acquire`: a window of the canvas, the beam's
illumination profile and shot noise) while the instance ground truth stays exact.

Image formation (relative intensity, then electron counts):

* ``TEM`` bright-field: dark particles on a bright amorphous-carbon support; mass-thickness
  contrast saturates with thickness, each particle has its own diffraction contrast.
* ``STEM`` HAADF: bright particles (Z-contrast, thickness dependent) on a dim support.
* ``SEM`` secondary electrons: a height map gives bright edges (tilt effect), one-sided shading
  (Everhart-Thornley detector) and brighter particle material on a textured substrate, or
  (``support_relief``) on a packed granular film: rounded grains with dark crevices and their
  own tilt contrast, never labelled, under and between the particles.

Ground truth (:class:`SyntheticFrame`): ``labels`` holds one id per particle and every pixel
belongs to at most one particle (later, upper particles win where projections overlap);
``truth`` has one row per particle visible in the frame, measured from ``labels`` (so
``ecd_nm`` is the ECD of the visible projected shape). Particle ids are stable across the frames
of one :class:`Specimen`; :class:`nanoscout.sim.insitu.InSituSeries` evolves a specimen over
time with persistent ids (tracking ground truth).

Coordinates: pixel ``(row, col)`` has its centre at ``y = row, x = col``; shifts and drift are
``(rows, cols)`` like ``shape``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "KINDS",
    "MODALITIES",
    "TRUTH_DTYPE",
    "Specimen",
    "SpecimenConfig",
    "SyntheticFrame",
    "render",
]

#: particle kinds; ``truth["kind"]`` is an index into this tuple. ``faceted`` particles are
#: regular polygons of 3, 4, 5, 6 or 8 sides (projected cubes, octahedra, ...); ``plate`` ones
#: are thin equilateral triangles (nanoprisms) with a flat thickness profile. Plates weigh 0 in
#: the default mix, so default specimens are the same as before plates existed.
KINDS: tuple[str, ...] = ("sphere", "ellipse", "rod", "faceted", "plate")
MODALITIES: tuple[str, ...] = ("TEM", "STEM", "SEM")

#: per-particle ground truth of one frame (lengths in nm, positions in px)
TRUTH_DTYPE = np.dtype(
    [
        ("id", "<i4"),  # equals the value in ``labels``
        ("x", "<f4"),  # centroid column, px, frame coordinates
        ("y", "<f4"),  # centroid row, px
        ("area_px", "<i4"),  # visible projected area, px
        ("ecd_nm", "<f4"),  # 2*sqrt(area/pi) of the visible projected shape
        ("shape_ecd_nm", "<f4"),  # ECD of the whole (unoccluded, uncut) particle, analytic
        ("major_nm", "<f4"),  # axes of the ellipse with the same second moments (4*sqrt(eig))
        ("minor_nm", "<f4"),
        ("aspect_ratio", "<f4"),  # major / minor
        ("kind", "u1"),  # index into KINDS
        ("border", "?"),  # touches the frame edge (cut by the field of view)
    ]
)

_DEFAULT_MIX: dict[str, float] = {"sphere": 0.65, "ellipse": 0.15, "rod": 0.05, "faceted": 0.15}
_GAUSS_MIN_LAM = 12.0  # above this many electrons the normal approximation of Poisson is used
_COUNTS_NOISELESS = 1000.0  # electrons per unit intensity when dose is None
_THIRD_OVERLAP = 0.1  # an agglomerating particle may overlap others than its partner this much


@dataclass(frozen=True)
class SpecimenConfig:
    """What the specimen and the microscope look like. Lengths in nm unless the name says px."""

    modality: Literal["TEM", "STEM", "SEM"] = "TEM"
    shape: tuple[int, int] = (512, 512)  # rows, cols, px
    pixel_size_nm: float = 0.5
    median_diameter_nm: float = 8.0  # lognormal median of the particles' ECD
    sigma_log: float = 0.3  # lognormal shape parameter (sd of ln ECD)
    min_diameter_nm: float = 1.0
    max_diameter_nm: float = 200.0
    coverage: float = 0.15  # projected area fraction (before overlaps are resolved)
    #: relative weights of the particle kinds (keys from KINDS; missing keys weigh 0)
    shape_mix: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_MIX))
    agglomerate_fraction: float = 0.3  # fraction of particles placed touching another one
    dose_e_per_px: float | None = 200.0  # electrons per px at unit intensity; None = noiseless
    blur_px: float = 0.8  # gaussian sigma of the probe / point-spread function, px
    illumination_gradient: float = 0.1  # relative change of beam intensity across the field
    support_texture: float = 0.05  # relative rms contrast of the amorphous support
    #: supported catalyst: area fraction of the frame covered by large soft-edged support grains
    #: (carbon, silica, alumina; not particles, never labelled), 0 = flat support film
    support_grains: float = 0.0
    support_grain_nm: float = 200.0  # typical size of those grains, nm
    #: rough polycrystalline or granular support film (SEM only; never labelled): height of its
    #: packed grains relative to their radius, 0 = smooth film. Its grains, about as large as
    #: the particles or smaller, show the same tilt contrast as particles, with darker crevices.
    support_relief: float = 0.0
    support_relief_nm: float = 10.0  # typical diameter of those grains, nm
    drift_px_per_frame: tuple[float, float] = (0.0, 0.0)  # (rows, cols) per frame (InSituSeries)
    contrast: float = 0.5  # particle contrast, 0..1 (absorbed fraction in TEM)
    fringe: float = 0.0  # Fresnel fringe (defocus halo) strength, 0..1, TEM only
    #: fraction of the elongated particles (ellipses, rods) lying along an image axis (0° or
    #: 90°, within 2°), like wires combed along a grid bar; the rest keep a uniform angle
    axis_aligned: float = 0.0
    dtype: Literal["uint8", "uint16", "float32"] = "uint16"

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {MODALITIES}")
        if len(self.shape) != 2 or min(self.shape) < 8:
            raise ValueError(f"shape {self.shape!r} must be (rows, cols) with both >= 8 px")
        if not self.pixel_size_nm > 0:
            raise ValueError(f"pixel_size_nm {self.pixel_size_nm!r} must be > 0")
        if not 0 < self.min_diameter_nm <= self.max_diameter_nm:
            raise ValueError(
                f"diameter range ({self.min_diameter_nm!r}, {self.max_diameter_nm!r}) nm is empty"
            )
        if not self.median_diameter_nm > 0 or self.sigma_log < 0:
            raise ValueError(
                f"median_diameter_nm {self.median_diameter_nm!r} / sigma_log {self.sigma_log!r}"
            )
        if not 0 <= self.support_grains < 1 or not self.support_grain_nm > 0:
            raise ValueError(f"support_grains {self.support_grains!r} must be in [0, 1) and "
                             f"support_grain_nm {self.support_grain_nm!r} > 0")
        if not 0 <= self.support_relief <= 2 or not self.support_relief_nm > 0:
            raise ValueError(f"support_relief {self.support_relief!r} must be in [0, 2] and "
                             f"support_relief_nm {self.support_relief_nm!r} > 0")
        if self.support_relief > 0 and self.modality != "SEM":
            raise ValueError(f"support_relief {self.support_relief!r}: a granular film is "
                             f"rendered for SEM only, not {self.modality}")
        if not 0 <= self.coverage < 1:
            raise ValueError(f"coverage {self.coverage!r} must be in [0, 1)")
        if not 0 <= self.axis_aligned <= 1:
            raise ValueError(f"axis_aligned {self.axis_aligned!r} not in [0, 1]")
        if not 0 <= self.agglomerate_fraction <= 1:
            raise ValueError(f"agglomerate_fraction {self.agglomerate_fraction!r} not in [0, 1]")
        if self.dose_e_per_px is not None and not self.dose_e_per_px > 0:
            raise ValueError(f"dose_e_per_px {self.dose_e_per_px!r} must be > 0 or None")
        if self.dtype not in ("uint8", "uint16", "float32"):
            raise ValueError(f"dtype {self.dtype!r} must be uint8, uint16 or float32")
        unknown = set(self.shape_mix) - set(KINDS)
        if unknown or sum(self.shape_mix.values()) <= 0:
            raise ValueError(
                f"shape_mix {dict(self.shape_mix)!r} needs positive weights of {KINDS}"
            )


@dataclass
class SyntheticFrame:
    """One acquired frame with exact instance ground truth."""

    image: np.ndarray  # (H, W) in cfg.dtype: electron counts (uint16), 8-bit scaled, or e/dose
    labels: np.ndarray  # int32 (H, W): 0 background, k = particle with truth id k
    truth: np.ndarray  # TRUTH_DTYPE, one row per particle visible in the frame
    pixel_size_nm: float
    modality: str
    shift_px: tuple[float, float] = (0.0, 0.0)  # (rows, cols) content shift of this frame
    index: int = 0  # frame number in its series (nanoscout.sim.insitu.InSituSeries)
    t_s: float = 0.0  # time of the frame in its series, s
    events: tuple[Any, ...] = ()  # what happened to the particles before it (InSituEvent)


# --------------------------------------------------------------------------------------------
# geometry


@dataclass
class _Geometry:
    """Particle parameters on a periodic canvas (px). Arrays of equal length, z-order = index."""

    kind: np.ndarray  # int, index into KINDS
    cy: np.ndarray
    cx: np.ndarray
    r: np.ndarray  # equivalent (area) radius, px
    aspect: np.ndarray  # ellipse/rod aspect ratio (1 for sphere/faceted)
    angle: np.ndarray  # rad, orientation of the major axis
    nsides: np.ndarray  # polygon sides (faceted)
    mass: np.ndarray  # relative contrast of the particle (diffraction / material)

    def __len__(self) -> int:
        return int(self.r.size)

    def take(self, idx: np.ndarray) -> _Geometry:
        return _Geometry(*(getattr(self, f)[idx] for f in _GEOM_FIELDS))


_GEOM_FIELDS = ("kind", "cy", "cx", "r", "aspect", "angle", "nsides", "mass")


def _shape_axes(kind: int, r: float, aspect: float, nsides: int) -> tuple[float, float]:
    """Return the kind's size parameters (a, b) in px for an equivalent radius ``r``.

    sphere: (r, r); ellipse: semi-axes; rod (capsule): (half length, half width);
    faceted and plate: (circumradius, apothem).
    """
    if kind == 1:
        return r * math.sqrt(aspect), r / math.sqrt(aspect)
    if kind == 2:
        # capsule of width w and length L = aspect*w: area = w^2 (aspect - 1 + pi/4)
        w = r * math.sqrt(math.pi / (aspect - 1.0 + math.pi / 4.0))
        return 0.5 * aspect * w, 0.5 * w
    if kind in (3, 4):
        n = nsides
        circ = r * math.sqrt(2.0 * math.pi / (n * math.sin(2.0 * math.pi / n)))
        return circ, circ * math.cos(math.pi / n)
    return r, r


def _support(g: _Geometry, i: int, ux: float, uy: float) -> float:
    """Return the support function of particle ``i`` along the unit vector (ux, uy), px."""
    kind = int(g.kind[i])
    a, b = _shape_axes(kind, float(g.r[i]), float(g.aspect[i]), int(g.nsides[i]))
    c, s = math.cos(g.angle[i]), math.sin(g.angle[i])
    pu, pv = ux * c + uy * s, -ux * s + uy * c  # direction in the particle frame
    if kind == 1:
        return math.hypot(a * pu, b * pv)
    if kind == 2:
        return (a - b) * abs(pu) + b
    if kind in (3, 4):
        n = int(g.nsides[i])
        th = 2.0 * math.pi * np.arange(n) / n
        return float(a * np.max(np.cos(th) * pu + np.sin(th) * pv))
    return a


def _sample_geometry(cfg: SpecimenConfig, rng: np.random.Generator, canvas: tuple[int, int],
                     target_area_px: float) -> _Geometry:
    """Draw sizes, kinds and non-overlapping / touching positions on the periodic canvas."""
    px = cfg.pixel_size_nm
    lo, hi = cfg.min_diameter_nm, cfg.max_diameter_nm
    diam: list[np.ndarray] = []
    area = 0.0
    while area < target_area_px and sum(d.size for d in diam) < 50_000:
        d = cfg.median_diameter_nm * np.exp(cfg.sigma_log * rng.standard_normal(256))
        d = d[(d >= lo) & (d <= hi)]
        if d.size == 0:  # the lognormal lies outside [lo, hi]: clip instead of rejecting
            d = np.clip(cfg.median_diameter_nm * np.exp(cfg.sigma_log * rng.standard_normal(8)),
                        lo, hi)
        r_px = 0.5 * d / px
        cum = area + np.cumsum(np.pi * r_px**2)
        n_take = int(np.searchsorted(cum, target_area_px)) + 1
        diam.append(r_px[:n_take])
        area = float(cum[min(n_take, cum.size) - 1])
    r = np.concatenate(diam) if diam else np.zeros(0)
    # at most half the canvas: bigger particles cannot be placed in a meaningful way
    r = np.minimum(r, 0.25 * min(canvas))
    r = np.sort(r)[::-1]  # place big particles first: packs better
    n = r.size
    names = list(KINDS)
    w = np.array([max(0.0, float(cfg.shape_mix.get(k, 0.0))) for k in names])
    kind = rng.choice(len(names), size=n, p=w / w.sum())
    aspect = np.ones(n)
    aspect[kind == 1] = rng.uniform(1.2, 2.0, int(np.sum(kind == 1)))
    aspect[kind == 2] = rng.uniform(2.0, 5.0, int(np.sum(kind == 2)))
    nsides = rng.choice(np.array([3, 4, 4, 4, 5, 6, 6, 8]), size=n)
    nsides[kind == 4] = 3  # plates are triangles (no extra draws: the default stream is kept)
    g = _Geometry(
        kind=kind.astype(np.int64),
        cy=np.zeros(n),
        cx=np.zeros(n),
        r=r,
        aspect=aspect,
        angle=rng.uniform(0.0, np.pi, n),
        nsides=nsides.astype(np.int64),
        mass=rng.uniform(0.75, 1.25, n),
    )
    if cfg.axis_aligned > 0:  # separate draws only when asked: the default stream is kept
        snap = np.isin(kind, (1, 2)) & (rng.random(n) < cfg.axis_aligned)
        k = int(snap.sum())
        g.angle[snap] = (rng.integers(0, 2, k) * (np.pi / 2)
                         + np.deg2rad(rng.uniform(-2.0, 2.0, k))) % np.pi
    _place(g, rng, canvas, cfg.agglomerate_fraction)
    return g


def _place(g: _Geometry, rng: np.random.Generator, canvas: tuple[int, int], agg: float) -> None:
    """Fill g.cy, g.cx: isolated particles avoid the others; agglomerated ones touch one.

    A particle joining an agglomerate touches one particle exactly (support functions along
    the joining direction, a gap or overlap of a few per cent) and may not interpenetrate any
    third particle by more than ``_THIRD_OVERLAP`` of their radii; when no such spot is found
    in a few tries it is placed on its own.
    """
    py, pxw = canvas
    n = len(g)
    circ = np.array([max(_shape_axes(int(g.kind[i]), g.r[i], g.aspect[i], int(g.nsides[i])))
                     for i in range(n)])
    for i in range(n):
        if i > 0 and rng.random() < agg:
            for _ in range(8):
                # touch a recent particle (chains and clusters form rather than pairs everywhere)
                j = int(rng.integers(max(0, i - 8), i))
                th = rng.uniform(0.0, 2.0 * np.pi)
                ux, uy = math.cos(th), math.sin(th)
                dist = (_support(g, j, ux, uy) + _support(g, i, -ux, -uy)) \
                    * rng.uniform(0.95, 1.03)
                cy, cx = (g.cy[j] + dist * uy) % py, (g.cx[j] + dist * ux) % pxw
                dy = (g.cy[:i] - cy + py / 2) % py - py / 2
                dx = (g.cx[:i] - cx + pxw / 2) % pxw - pxw / 2
                clear = dy * dy + dx * dx >= ((1.0 - _THIRD_OVERLAP) * (g.r[:i] + g.r[i])) ** 2
                clear[j] = True
                if clear.all():
                    g.cy[i], g.cx[i] = cy, cx
                    break
            else:
                _place_alone(g, i, rng, canvas, circ)
            continue
        _place_alone(g, i, rng, canvas, circ)


def _place_alone(g: _Geometry, i: int, rng: np.random.Generator, canvas: tuple[int, int],
                 circ: np.ndarray) -> None:
    """Put particle i at a random spot clear of the others (the last try if none is clear)."""
    py, pxw = canvas
    for _ in range(25):
        cy, cx = rng.uniform(0, py), rng.uniform(0, pxw)
        if i == 0:
            break
        dy = (g.cy[:i] - cy + py / 2) % py - py / 2
        dx = (g.cx[:i] - cx + pxw / 2) % pxw - pxw / 2
        if np.all(dy * dy + dx * dx > (circ[:i] + circ[i] + 1.0) ** 2):
            break
    g.cy[i], g.cx[i] = cy, cx


# --------------------------------------------------------------------------------------------
# rasterisation


def _index(start: int, stop: int, period: int) -> slice | np.ndarray:
    """Return canvas indices for [start, stop) on a periodic axis (a slice when no wrap)."""
    if start >= 0 and stop <= period:
        return slice(start, stop)
    return np.arange(start, stop) % period


def _sdf(kind: int, u: np.ndarray, v: np.ndarray, a: float, b: float, nsides: int) -> np.ndarray:
    """Return the (approximately) signed distance to the particle outline, px (< 0 inside)."""
    if kind == 1:
        k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)
    if kind == 2:
        qu = np.maximum(np.abs(u) - (a - b), 0.0)
        return np.sqrt(qu * qu + v * v) - b
    if kind in (3, 4):
        th = 2.0 * np.pi * np.arange(nsides) / nsides
        d = np.cos(th[0]) * u + np.sin(th[0]) * v
        for t in th[1:]:
            d = np.maximum(d, np.cos(t) * u + np.sin(t) * v)
        return d - b
    return np.sqrt(u * u + v * v) - a


@dataclass
class _Raster:
    labels: np.ndarray  # int32 canvas, particle id = geometry index + 1
    cover: np.ndarray  # float32, sum of antialiased coverage * mass
    thick: np.ndarray  # float32, sum of coverage * mass * normalised thickness
    height: np.ndarray  # float32, max surface height, px (SEM)
    boxes: np.ndarray  # int (n, 4): y0, x0, y1, x1 in unwrapped canvas coordinates


def _rasterize(g: _Geometry, canvas: tuple[int, int]) -> _Raster:
    py, pxw = canvas
    labels = np.zeros(canvas, np.int32)
    cover = np.zeros(canvas, np.float32)
    thick = np.zeros(canvas, np.float32)
    height = np.zeros(canvas, np.float32)
    boxes = np.zeros((len(g), 4), np.int64)
    for i in range(len(g)):
        kind, ns = int(g.kind[i]), int(g.nsides[i])
        a, b = _shape_axes(kind, float(g.r[i]), float(g.aspect[i]), ns)
        hx = _support(g, i, 1.0, 0.0) + 1.5
        hy = _support(g, i, 0.0, 1.0) + 1.5
        cy, cx = float(g.cy[i]), float(g.cx[i])
        y0, y1 = math.floor(cy - hy), math.ceil(cy + hy) + 1
        x0, x1 = math.floor(cx - hx), math.ceil(cx + hx) + 1
        boxes[i] = (y0, x0, y1, x1)
        dy = (np.arange(y0, y1) - cy)[:, None]
        dx = (np.arange(x0, x1) - cx)[None, :]
        c, s = math.cos(g.angle[i]), math.sin(g.angle[i])
        sd = _sdf(kind, dx * c + dy * s, -dx * s + dy * c, a, b, ns)
        alpha = np.clip(0.5 - sd, 0.0, 1.0)
        if kind == 4:  # a thin plate: flat, a third of a sphere's thickness, soft 1 px rim
            h = np.clip(-sd, 0.0, 1.0) * (1.0 / 3.0)
        else:
            uu = np.clip(-sd / b, 0.0, 1.0)
            h = np.sqrt(uu * (2.0 - uu))  # sphere-like thickness profile, 0 at the rim, 1 inside
        m = float(g.mass[i])
        ri, ci = _index(y0, y1, py), _index(x0, x1, pxw)
        key: tuple[slice, slice] | tuple[np.ndarray, ...]
        if isinstance(ri, slice) and isinstance(ci, slice):
            key = (ri, ci)
        else:
            key = np.ix_(np.arange(y0, y1) % py, np.arange(x0, x1) % pxw)
        cover[key] += (alpha * m).astype(np.float32)
        thick[key] += (alpha * m * h).astype(np.float32)
        height[key] = np.maximum(height[key], (h * b).astype(np.float32))
        inside = sd < 0.0
        lab = labels[key]
        lab[inside] = i + 1
        labels[key] = lab
    return _Raster(labels, cover, thick, height, boxes)


def _moments(mask: np.ndarray, oy: float, ox: float) -> tuple[int, float, float, float, float]:
    """Return (area px, centroid y, centroid x, major px, minor px) of a boolean mask."""
    ys, xs = np.nonzero(mask)
    n = ys.size
    if n == 0:
        return 0, 0.0, 0.0, 0.0, 0.0
    my, mx = ys.mean(), xs.mean()
    vy, vx = ((ys - my) ** 2).mean(), ((xs - mx) ** 2).mean()
    cxy = ((ys - my) * (xs - mx)).mean()
    tr, det = vy + vx, vy * vx - cxy * cxy
    disc = math.sqrt(max(tr * tr / 4.0 - det, 0.0))
    l1, l2 = tr / 2.0 + disc, max(tr / 2.0 - disc, 0.0)
    return n, my + oy, mx + ox, 4.0 * math.sqrt(l1), 4.0 * math.sqrt(l2)


# --------------------------------------------------------------------------------------------
# image formation


def _periodic_noise(rng: np.random.Generator, canvas: tuple[int, int], sigma: float) -> np.ndarray:
    n = rng.standard_normal(canvas, dtype=np.float32)
    n = ndi.gaussian_filter(n, sigma, mode="wrap")
    return n / max(float(n.std()), 1e-6)


def _support_grains(cfg: SpecimenConfig, rng: np.random.Generator, canvas: tuple[int, int]
                    ) -> np.ndarray:
    """Return a soft support-grain thickness map in [0, 1] covering ~``support_grains``."""
    size_px = max(cfg.support_grain_nm / cfg.pixel_size_nm, 4.0)
    field_ = _periodic_noise(rng, canvas, size_px / 3.0)
    level = float(np.quantile(field_, 1.0 - cfg.support_grains))
    mask = (field_ > level).astype(np.float32)
    soft = ndi.gaussian_filter(mask, max(size_px / 10.0, 1.0), mode="wrap")
    return np.clip(soft * 1.5, 0.0, 1.0).astype(np.float32)


def _granular_relief(cfg: SpecimenConfig, rng: np.random.Generator, canvas: tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (height px, distance to the nearest grain boundary px, relative yield) of a packed
    granular film.

    The grains are the Voronoi cells of random seeds (periodic on the canvas, like the rest of
    the specimen), each a dome of its own height rising from the crevices between cells, and
    each with its own secondary-electron yield (orientation, composition), within +-30 %.
    """
    size_px = max(cfg.support_relief_nm / cfg.pixel_size_nm, 3.0)
    h, w = canvas
    n = max(1, int(round(h * w / (0.9 * size_px * size_px))))
    seeds = np.zeros(canvas, bool)
    seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = True
    m = int(min(2.0 * size_px + 2.0, min(h, w) // 2))
    padded = np.pad(seeds, m, mode="wrap")
    _, (iy, ix) = ndi.distance_transform_edt(~padded, return_indices=True)
    cell = ((iy - m) % h) * w + (ix - m) % w  # the nearest seed's index on the canvas
    edge = (cell != np.roll(cell, 1, 0)) | (cell != np.roll(cell, 1, 1))
    dist = ndi.distance_transform_edt(~edge)[m:m + h, m:m + w].astype(np.float32)
    cell = cell[m:m + h, m:m + w]
    tall = rng.uniform(0.4, 1.0, h * w).astype(np.float32)[cell]
    # each grain a rounded dome over its own cell: 0 at the crevice, its top over the point
    # farthest from the crevices, softened so that the cells' corners do not show as facets
    inradius = np.zeros(h * w, np.float32)
    np.maximum.at(inradius, cell.ravel(), dist.ravel())
    t = np.clip(dist / np.maximum(inradius[cell], 1.0), 0.0, 1.0)
    height = cfg.support_relief * size_px / 2.0 * tall * np.sqrt(1.0 - (1.0 - t) ** 2)
    height = ndi.gaussian_filter(height, max(size_px / 8.0, 0.5), mode="wrap")
    grain_yield = rng.uniform(0.7, 1.3, h * w).astype(np.float32)[cell]
    return height.astype(np.float32), dist, grain_yield


def _form_image(cfg: SpecimenConfig, r: _Raster, rng: np.random.Generator) -> np.ndarray:
    """Return the noiseless relative intensity on the canvas (float32, background ~ 1 in TEM)."""
    canvas = r.labels.shape
    tex = cfg.support_texture * (0.75 * _periodic_noise(rng, canvas, 1.2)
                                 + 0.66 * _periodic_noise(rng, canvas, 12.0))
    c = float(np.clip(cfg.contrast, 0.0, 1.0))
    grains = _support_grains(cfg, rng, canvas) if cfg.support_grains > 0 else None
    if grains is not None:
        # grains are thick low-Z material: weaker than the particles per nm, but wide; their
        # own mottled texture makes them look like blurred clusters
        tex = tex + grains * cfg.support_texture * 2.0 * _periodic_noise(rng, canvas, 3.0)
    if cfg.modality == "TEM":
        dens = 0.55 * r.cover + 0.45 * r.thick
        if grains is not None:
            dens = dens + 0.35 * grains
        img = (1.0 + tex) * (1.0 - c * (1.0 - np.exp(-2.0 * dens)))
        if cfg.fringe > 0:
            halo = ndi.gaussian_filter(np.minimum(r.cover, 1.0), 1.5, mode="wrap") \
                - np.minimum(r.cover, 1.0)
            img += cfg.fringe * c * halo
    elif cfg.modality == "STEM":
        dens = 0.3 * r.cover + 0.7 * r.thick
        img = 0.15 * (1.0 + 3.0 * tex) + c * 1.4 * dens
        if grains is not None:
            img = img + 0.45 * grains
    else:  # SEM: tilt contrast from the height map, shading towards the detector
        h = r.height
        film = None
        if cfg.support_relief > 0:
            # particles rest on the granular film: under them lies its smoothed relief, so
            # their own top surfaces stay smooth
            relief, dist, grain_yield = _granular_relief(cfg, rng, canvas)
            under = ndi.gaussian_filter(np.minimum(r.cover, 1.0), 1.0, mode="wrap")
            smooth = ndi.gaussian_filter(relief, cfg.support_relief_nm / cfg.pixel_size_nm / 2.0,
                                         mode="wrap")
            h = h + (1.0 - under) * relief + under * smooth
            # the film's factor on the yield: 1 under the particles; elsewhere each grain's own
            # yield, lower in the crevices, from which fewer secondary electrons escape
            film = (1.0 - under) * (grain_yield * (1.0 - 0.7 * np.exp(-dist / 1.5)) - 1.0) + 1.0
        gy = 0.5 * (np.roll(h, -1, 0) - np.roll(h, 1, 0))
        gx = 0.5 * (np.roll(h, -1, 1) - np.roll(h, 1, 1))
        sec = np.minimum(np.sqrt(1.0 + gy * gy + gx * gx), 6.0)
        th = rng.uniform(0.0, 2.0 * np.pi)
        shade = (math.cos(th) * gx + math.sin(th) * gy) / sec
        material = 0.3 * (1.0 + tex) + c * 0.35 * np.minimum(r.cover, 1.2)
        if grains is not None:
            material = material + 0.15 * grains
        img = material * sec**0.8 + 0.12 * c * shade
        if film is not None:
            img = img * film
    img = np.maximum(img, 0.01).astype(np.float32)
    if cfg.blur_px > 0:
        img = ndi.gaussian_filter(img, cfg.blur_px, mode="wrap")
    return img


# --------------------------------------------------------------------------------------------
# specimen


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class Specimen:
    """A specimen rendered once; :meth:`acquire` re-images it with new noise and drift."""

    def __init__(self, cfg: SpecimenConfig, geometry: _Geometry, rng: np.random.Generator,
                 canvas: tuple[int, int]) -> None:
        self.cfg = cfg
        self.geometry = geometry
        self.canvas = canvas
        h, w = cfg.shape
        rast = _rasterize(geometry, canvas)
        clean = _form_image(cfg, rast, rng)
        # tile once so that any window (plus one row/col for interpolation) is a plain slice
        self._clean = np.pad(clean, ((0, h + 1), (0, w + 1)), mode="wrap")
        self._labels = np.pad(rast.labels, ((0, h), (0, w)), mode="wrap")
        self._ref = float(np.percentile(clean[:: 4, :: 4], 99.9))
        # the beam's illumination profile lives in frame coordinates, not on the specimen
        th = rng.uniform(0.0, 2.0 * np.pi)
        yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
        xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
        self._illum = (1.0 + cfg.illumination_gradient * (math.sin(th) * yy + math.cos(th) * xx)
                       ).astype(np.float32)
        self._stats = self._particle_stats(rast)

    @classmethod
    def generate(cls, cfg: SpecimenConfig, seed: int | np.random.Generator) -> Specimen:
        """Return a new specimen drawn from ``cfg`` (geometry and clean image rendered once)."""
        rng = _rng(seed)
        geom, canvas = cls._draw(cfg, rng)
        return cls(cfg, geom, rng, canvas)

    @staticmethod
    def _draw(cfg: SpecimenConfig, rng: np.random.Generator) -> tuple[_Geometry, tuple[int, int]]:
        h, w = cfg.shape
        # margin: the canvas exceeds the frame by more than the largest particle, so a particle
        # can never show up twice in one window of the periodic canvas
        big = 0.5 * min(cfg.max_diameter_nm, cfg.median_diameter_nm
                        * math.exp(4.0 * cfg.sigma_log)) / cfg.pixel_size_nm
        margin = int(min(max(32.0, 2.0 * big * 2.4 + 8.0), 2 * max(h, w)))
        canvas = (h + margin, w + margin)
        geom = _sample_geometry(cfg, rng, canvas, cfg.coverage * canvas[0] * canvas[1])
        # no particle may exceed the margin (it would wrap into the window twice)
        ext = np.array([2 * max(_shape_axes(int(geom.kind[i]), geom.r[i], geom.aspect[i],
                                            int(geom.nsides[i]))) + 4 for i in range(len(geom))])
        keep = ext < margin
        return geom.take(np.nonzero(keep)[0]), canvas

    def _particle_stats(self, rast: _Raster) -> np.ndarray:
        """Per-particle area/centroid/axes on the canvas, centroids in unwrapped coordinates."""
        g, (py, pxw) = self.geometry, self.canvas
        n = len(g)
        st = np.zeros(n, dtype=[("area", "i8"), ("y", "f8"), ("x", "f8"), ("major", "f8"),
                                ("minor", "f8"), ("y0", "i8"), ("x0", "i8"), ("y1", "i8"),
                                ("x1", "i8"), ("shape_ecd", "f8")])
        lab = self._labels
        for i in range(n):
            y0, x0, y1, x1 = (int(v) for v in rast.boxes[i])
            # use the tiled label canvas so that a box crossing the seam is contiguous
            oy, ox = y0 % py, x0 % pxw
            crop = lab[oy: oy + (y1 - y0), ox: ox + (x1 - x0)] == i + 1
            area, my, mx, major, minor = _moments(crop, 0.0, 0.0)
            if area:
                ys, xs = np.nonzero(crop)
                st[i] = (area, my + oy, mx + ox, major, minor,
                         oy + ys.min(), ox + xs.min(), oy + ys.max() + 1, ox + xs.max() + 1,
                         2.0 * g.r[i])
        return st

    def acquire(self, rng: np.random.Generator | int | None = None,
                shift_px: tuple[float, float] = (0.0, 0.0)) -> SyntheticFrame:
        """Return a new exposure of the field of view moved by ``shift_px`` (rows, cols, px).

        Content moves by +shift (sub-pixel shifts interpolate the image bilinearly; labels and
        truth follow the nearest whole-pixel shift). Noise is Poisson in electrons (normal
        approximation above 12 e/px), illumination gradient applied before the noise.
        """
        rng = _rng(0 if rng is None else rng)
        cfg = self.cfg
        h, w = cfg.shape
        py, pxw = self.canvas
        oy_f, ox_f = -float(shift_px[0]), -float(shift_px[1])
        iy, ix = math.floor(oy_f), math.floor(ox_f)
        fy, fx = oy_f - iy, ox_f - ix
        sy, sx = iy % py, ix % pxw
        c = self._clean
        clean: np.ndarray
        if fy == 0.0 and fx == 0.0:
            clean = c[sy: sy + h, sx: sx + w] * self._illum
        else:
            top = c[sy: sy + h, sx: sx + w + 1]
            bot = c[sy + 1: sy + h + 1, sx: sx + w + 1]
            rows = top * np.float32(1.0 - fy) + bot * np.float32(fy)
            clean = rows[:, :w] * np.float32(1.0 - fx) + rows[:, 1:] * np.float32(fx)
            clean *= self._illum
        ly, lx = round(oy_f) % py, round(ox_f) % pxw
        labels = np.ascontiguousarray(self._labels[ly: ly + h, lx: lx + w])
        image = self._expose(clean, rng)
        truth = self._truth(labels, ly, lx)
        return SyntheticFrame(image, labels, truth, cfg.pixel_size_nm, cfg.modality,
                              (float(shift_px[0]), float(shift_px[1])))

    def _expose(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        dose = cfg.dose_e_per_px
        counts: np.ndarray
        if dose is None:
            counts = clean * np.float32(_COUNTS_NOISELESS)
            scale = _COUNTS_NOISELESS
        else:
            lam = clean * np.float32(dose)
            z = rng.standard_normal(lam.shape, dtype=np.float32)
            counts = lam + np.sqrt(lam) * z
            low = lam < _GAUSS_MIN_LAM
            if low.any():
                counts[low] = rng.poisson(lam[low])
            np.maximum(counts, 0.0, out=counts)
            scale = float(dose)
        if cfg.dtype == "float32":
            return (counts / np.float32(scale)).astype(np.float32)
        if cfg.dtype == "uint16":
            return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
        # 8-bit: map the brightest specimen intensity to ~230 grey levels
        g = np.float32(230.0 / (scale * self._ref))
        return np.clip(np.rint(counts * g), 0, 255).astype(np.uint8)

    def _truth(self, labels: np.ndarray, ly: int, lx: int) -> np.ndarray:
        """Truth rows of the particles visible in the window starting at canvas (ly, lx)."""
        st, (py, pxw) = self.stats, self.canvas
        h, w = labels.shape
        px = self.cfg.pixel_size_nm
        ok = st["area"] > 0
        # relative position of each particle's box with respect to the window on the torus
        ry = (st["y0"] - ly) % py
        rx = (st["x0"] - lx) % pxw
        bh, bw = st["y1"] - st["y0"], st["x1"] - st["x0"]
        ry = np.where(ry < h, ry, np.where(ry > py - bh, ry - py, 10**9))
        rx = np.where(rx < w, rx, np.where(rx > pxw - bw, rx - pxw, 10**9))
        vis = ok & (ry < 10**9) & (rx < 10**9)
        inside = vis & (ry > 0) & (rx > 0) & (ry + bh < h) & (rx + bw < w)
        idx = np.nonzero(vis)[0]
        out = np.zeros(idx.size, TRUTH_DTYPE)
        k = 0
        kinds = self.geometry.kind
        for i in idx:
            if inside[i]:
                area, y, x = int(st["area"][i]), st["y"][i] - st["y0"][i] + ry[i], \
                    st["x"][i] - st["x0"][i] + rx[i]
                major, minor, border = st["major"][i], st["minor"][i], False
            else:
                y0, x0 = max(int(ry[i]), 0), max(int(rx[i]), 0)
                y1, x1 = min(int(ry[i] + bh[i]), h), min(int(rx[i] + bw[i]), w)
                area, y, x, major, minor = _moments(labels[y0:y1, x0:x1] == i + 1, y0, x0)
                if area == 0:
                    continue
                border = True
            out[k] = (i + 1, x, y, area, 2.0 * math.sqrt(area / math.pi) * px,
                      st["shape_ecd"][i] * px, major * px, minor * px,
                      major / max(minor, 1e-6), kinds[i], border)
            k += 1
        return out[:k]

    @property
    def stats(self) -> np.ndarray:
        """Per-particle canvas statistics (area px, unwrapped centroid and box, axes px)."""
        return self._stats


def render(cfg: SpecimenConfig, seed: int | np.random.Generator) -> SyntheticFrame:
    """Return one frame of a new specimen drawn from ``cfg`` with ``seed`` (reproducible)."""
    rng = _rng(seed)
    return Specimen.generate(cfg, rng).acquire(rng)


def with_changes(cfg: SpecimenConfig, **changes: object) -> SpecimenConfig:
    """Return a copy of ``cfg`` with some fields replaced (validated again)."""
    return replace(cfg, **changes)  # type: ignore[arg-type]
