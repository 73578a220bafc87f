"""HAADF-STEM frames of supported metal nanoparticles rendered from atoms, with exact labels.

Training data for the detector (issue 17): instead of drawing particles as shapes, build them
from atoms and image them with the *incoherent* HAADF approximation, which is what makes a
catalyst frame look like one (faint small metal particles on a bright, lumpy support):

* **particles**: ``ase.cluster`` models (truncated octahedra / cuboctahedra, decahedra,
  icosahedra, random-facet FCC clusters and rounded lattice cut-outs), 1-20 nm, Pt / Pd / Ru /
  Au / Co / Rh / Ir / Ag / Ni / Cu and random or core-shell alloys, random 3-D orientations.
  Geometries are built in lattice units once and cached (:func:`cluster_geometry`), then scaled
  by the element's lattice constant.
* **supports** (continuum, the atoms of a 100 nm thick support would be millions): amorphous
  aggregates of primary spheres (silica, alumina, carbon black; projected thickness = sum of
  chord lengths), faceted crystalline grains (ceria, titania, zirconia: flat-topped prisms with
  wedge edges and lattice fringes when resolved), thin amorphous carbon films; each with a
  frozen amorphous texture (atomic scale) and porosity (nm scale).
* **image**: the projected sum of Z^n (n ~ 1.7, randomised 1.5-2.0) of every atom, splatted on
  the pixel grid, plus the support's projected Z^n density, convolved with the probe intensity
  (:func:`probe_intensity`: aperture + defocus + Cs, averaged over a pixel, plus source size),
  and a detector that saturates slowly for thick regions. A bright-field variant (``mode
  "bf"``) images the same specimen as exp(-mass thickness) with phase-contrast grain.

**Labels are exact**: particle k's label is the set of pixels whose centre lies within the
convex hull of its projected atoms grown by the atomic radius (:func:`hull_mask`). Single
atoms and sub-nanometre clusters strewn on the support are rendered but not labelled: they
are what a human annotator does not mark and what an earlier detector took for particles.

The expensive part (:func:`render_specimen`, ~0.05-1 s per 256 px frame) returns the noiseless
signal; :func:`acquire` adds what the microscope adds on each acquisition (Poisson noise at a
dose, read noise, scan-line offsets and jitter, drift shear, JPEG compression, bit depth),
moving the labels with the pixels wherever a distortion moves them. Training pre-renders
signals into a cache (``python -m nanoscout.training.haadf --cache DIR``) and acquires fresh on every use.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from nanoscout.sim.rotation import random_rotation

__all__ = ["ELEMENTS", "SUPPORTS", "HaadfConfig", "acquire", "cluster_geometry", "hull_mask",
           "probe_intensity", "random_config", "render", "render_specimen", "splat", "write_cache"]

#: element -> (Z, FCC lattice constant in nm; for the hcp metals Ru, Co the FCC cell of the
#: same nearest-neighbour distance)
ELEMENTS: dict[str, tuple[int, float]] = {
    "Pt": (78, 0.392), "Pd": (46, 0.389), "Au": (79, 0.408), "Ir": (77, 0.384),
    "Rh": (45, 0.380), "Ag": (47, 0.409), "Ru": (44, 0.379), "Co": (27, 0.354),
    "Ni": (28, 0.352), "Cu": (29, 0.361),
}
#: support -> (mean Z of its atoms weighted as Z^n is approximated by these (Z, share) pairs,
#: atoms per nm^3)
SUPPORTS: dict[str, tuple[tuple[tuple[int, float], ...], float]] = {
    "silica": (((14, 1 / 3), (8, 2 / 3)), 66.0),
    "alumina": (((13, 0.4), (8, 0.6)), 117.0),
    "carbon": (((6, 1.0),), 100.0),
    "ceria": (((58, 1 / 3), (8, 2 / 3)), 75.0),
    "titania": (((22, 1 / 3), (8, 2 / 3)), 96.0),
    "zirconia": (((40, 1 / 3), (8, 2 / 3)), 88.0),
}
_AMORPHOUS = ("silica", "alumina", "carbon")
_ATOM_RADIUS_NM = 0.13
_SHAPES = ("octahedron", "decahedron", "icosahedron", "facets", "rounded")


@dataclass(frozen=True)
class HaadfConfig:
    """One specimen and its imaging (lengths in nm unless the name says px)."""

    shape: tuple[int, int] = (256, 256)
    pixel_nm: float = 0.2
    median_diameter_nm: float = 3.0
    sigma_log: float = 0.3
    min_diameter_nm: float = 1.0
    coverage: float = 0.08  # particle area / frame area (projected)
    elements: tuple[str, ...] = ("Pt",)
    alloy: Literal["none", "random", "core-shell"] = "none"
    shape_mix: tuple[float, ...] = (0.3, 0.15, 0.1, 0.2, 0.25)  # order of _SHAPES
    cluster_fraction: float = 0.3  # share of particles in touching groups
    on_support: float = 0.9  # share of particles placed where the support is
    support: str = "silica"
    support_kind: Literal["aggregate", "grains", "film", "none"] = "aggregate"
    support_grain_nm: float = 20.0  # primary sphere / grain diameter
    support_fill: float = 0.6  # share of the frame covered by support
    support_density: float = 1.0  # multiplies the support's atoms per nm^3
    film_nm: float = 0.0  # thickness of an amorphous carbon film under everything
    texture: float = 0.15  # amorphous texture strength (relative)
    single_atoms_per_nm2: float = 0.0  # unlabelled single metal atoms on the support
    subnm_clusters_per_nm2: float = 0.0  # unlabelled 0.3-0.8 nm clusters
    z_exponent: float = 1.7
    mode: Literal["haadf", "bf"] = "haadf"
    energy_kev: float = 200.0
    semiangle_mrad: float = 22.0
    defocus_nm: float = 0.0
    cs_mm: float = 0.001
    source_fwhm_nm: float = 0.08
    saturation: float = 0.0  # 0: linear detector; larger: thick regions saturate
    min_excess: float = 0.15  # a particle must add this share of the support signal under it
    extra: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ particles


@functools.lru_cache(maxsize=4096)
def cluster_geometry(shape: str, size: int, variant: int) -> np.ndarray:
    """Return the atom positions (N, 3) float32 of a cluster in FCC lattice units, centred.

    ``shape`` one of "octahedron", "decahedron", "icosahedron", "facets", "rounded";
    ``size`` its size parameter (about the diameter in lattice constants); ``variant`` 0..7
    picks the truncation / facet layers (deterministic). Cached: geometry is reused across
    elements (scaled by the lattice constant) and orientations.
    """
    from ase.cluster import Decahedron, Icosahedron, Octahedron
    from ase.cluster.cubic import FaceCenteredCubic

    size = max(2, int(size))
    vr = np.random.default_rng([size, variant, _SHAPES.index(shape)])
    if shape == "octahedron":
        length = max(3, round(size / 0.72) + 1)
        cut = int(round(vr.uniform(0.12, 0.45) * length))
        cut = min(cut, (length - 1) // 2)
        pos = Octahedron("Cu", length, cutoff=cut, latticeconstant=1.0).positions
    elif shape == "decahedron":
        p = max(2, round(size / 1.5) + 1)
        q = int(vr.integers(1, max(2, p)))
        pos = Decahedron("Cu", p, q, int(vr.integers(0, 3)), latticeconstant=1.0).positions
    elif shape == "icosahedron":
        n = max(2, round(size / 1.15) + 1)
        pos = Icosahedron("Cu", n, latticeconstant=1.0).positions
    elif shape == "facets":
        # layer spacings a/2, a/(2 sqrt 2), a/sqrt 3: these counts give ~``size`` across
        layers = [max(1, round(size * f * vr.uniform(0.75, 1.25))) for f in (1.0, 1.42, 0.86)]
        pos = FaceCenteredCubic("Cu", [(1, 0, 0), (1, 1, 0), (1, 1, 1)], layers,
                                latticeconstant=1.0).positions
    elif shape == "rounded":
        r = size / 2.0
        axes = r * vr.uniform(0.7, 1.15, 3)
        n = int(np.ceil(axes.max())) + 1
        g = np.arange(-n, n + 1, dtype=np.float32)
        cube = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
        basis = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]], np.float32)
        pts = (cube[:, None, :] + basis[None]).reshape(-1, 3)
        keep = ((pts / axes) ** 2).sum(1) <= 1.0
        for _ in range(int(vr.integers(0, 4))):  # a few flat cuts (facets, a flat base)
            nrm = vr.normal(size=3)
            nrm /= np.linalg.norm(nrm)
            keep &= pts @ nrm <= vr.uniform(0.6, 0.95) * r
        pos = pts[keep]
    else:
        raise ValueError(f"unknown cluster shape {shape!r} (known: {', '.join(_SHAPES)})")
    pos = np.asarray(pos, np.float32)
    return pos - pos.mean(0)


def _particle(rng: np.random.Generator, cfg: HaadfConfig, diameter_nm: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Return (positions (N, 3) nm, Z (N,)) of one randomly oriented particle."""
    el = str(rng.choice(list(cfg.elements)))
    z, a = ELEMENTS[el]
    mix = np.asarray(cfg.shape_mix, np.float64)
    shape = _SHAPES[int(rng.choice(len(_SHAPES), p=mix / mix.sum()))]
    size = max(2, round(diameter_nm / a))
    pos = cluster_geometry(shape, size, int(rng.integers(8))) * a
    pos = pos @ random_rotation(rng).astype(np.float32).T
    zs = np.full(len(pos), z, np.int32)
    if cfg.alloy != "none" and len(cfg.elements) > 1:
        other = [e for e in cfg.elements if e != el]
        z2 = ELEMENTS[str(rng.choice(other))][0]
        share = float(rng.uniform(0.2, 0.6))
        if cfg.alloy == "random":
            zs[rng.random(len(pos)) < share] = z2
        else:  # core-shell: the outer shell of the other element
            r = np.linalg.norm(pos, axis=1)
            zs[r > np.quantile(r, 1.0 - share)] = z2
    return pos, zs


def hull_mask(xy_px: np.ndarray, shape: tuple[int, int], grow_px: float
              ) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (mask, (row0, col0)): pixels whose centre lies within the convex hull of the
    projected atom positions ``xy_px`` ((N, 2) as (col, row) in px, pixel centres at k + 0.5)
    grown by ``grow_px``; the mask covers rows row0.. and cols col0.. of a frame of ``shape``
    (clipped to it, possibly empty)."""
    from scipy.spatial import ConvexHull, QhullError
    from skimage.draw import polygon

    ang = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
    ring = grow_px * np.stack([np.cos(ang), np.sin(ang)], 1) / np.cos(np.pi / 16)
    try:
        hv = xy_px[ConvexHull(xy_px).vertices] if len(xy_px) >= 3 else xy_px
    except QhullError:  # collinear projections of a tiny cluster
        hv = xy_px
    pts = (hv[:, None, :] + ring[None]).reshape(-1, 2)
    pts = pts[ConvexHull(pts).vertices]
    c0, r0 = np.floor(pts.min(0)).astype(int)
    c1, r1 = np.ceil(pts.max(0)).astype(int) + 1
    h, w = shape
    r0c, c0c, r1c, c1c = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if r1c <= r0c or c1c <= c0c:
        return np.zeros((0, 0), bool), (r0c, c0c)
    # pixel (r, c) has its centre at (c + 0.5, r + 0.5)
    rr, cc = polygon(pts[:, 1] - 0.5 - r0c, pts[:, 0] - 0.5 - c0c, (r1c - r0c, c1c - c0c))
    m = np.zeros((r1c - r0c, c1c - c0c), bool)
    m[rr, cc] = True
    return m, (r0c, c0c)


def splat(img: np.ndarray, xy_px: np.ndarray, weight: np.ndarray) -> None:
    """Add ``weight`` at ``xy_px`` ((N, 2) col, row in px) to ``img`` by bilinear splatting."""
    h, w = img.shape
    x = xy_px[:, 0] - 0.5
    y = xy_px[:, 1] - 0.5
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx = (x - x0).astype(np.float32)
    fy = (y - y0).astype(np.float32)
    flat = np.zeros(h * w, np.float64)
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                       (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        flat += np.bincount(yy[ok] * w + xx[ok], weights=(weight * wt)[ok], minlength=h * w)
    img += flat.reshape(h, w).astype(img.dtype)


def _sizes(rng: np.random.Generator, cfg: HaadfConfig, n: int) -> np.ndarray:
    d = cfg.median_diameter_nm * np.exp(rng.normal(0.0, cfg.sigma_log, n))
    return np.clip(d, cfg.min_diameter_nm, 25.0)


# ------------------------------------------------------------------ supports


def _support_weight(cfg: HaadfConfig) -> float:
    """Return the support's Z^n per nm^3 (sum over its atoms)."""
    comp, dens = SUPPORTS[cfg.support]
    return dens * cfg.support_density * sum(s * z ** cfg.z_exponent for z, s in comp)


def _aggregate(rng: np.random.Generator, cfg: HaadfConfig) -> np.ndarray:
    """Return the projected thickness (nm) of aggregates of primary spheres (the support)."""
    h, w = cfg.shape
    p = cfg.pixel_nm
    t = np.zeros((h, w), np.float32)
    area_nm2 = h * w * p * p
    r_med = cfg.support_grain_nm / 2.0
    target = cfg.support_fill * area_nm2
    covered = 0.0
    yy = (np.arange(h, dtype=np.float32) + 0.5) * p
    xx = (np.arange(w, dtype=np.float32) + 0.5) * p
    n_max = 4000
    while covered < target and n_max > 0:
        # one aggregate: a random walk of touching spheres
        c = np.array([rng.uniform(-0.1, 1.1) * h * p, rng.uniform(-0.1, 1.1) * w * p,
                      0.0])
        for _ in range(int(rng.integers(3, 60))):
            r = float(r_med * np.exp(rng.normal(0.0, 0.3)))
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            c = c + d * r * rng.uniform(1.2, 1.9)
            r0, r1 = max(0, int((c[0] - r) / p)), min(h, int((c[0] + r) / p) + 2)
            c0, c1 = max(0, int((c[1] - r) / p)), min(w, int((c[1] + r) / p) + 2)
            n_max -= 1
            if r0 >= r1 or c0 >= c1:
                continue
            d2 = (yy[r0:r1, None] - c[0]) ** 2 + (xx[None, c0:c1] - c[1]) ** 2
            chord = 2.0 * np.sqrt(np.clip(r * r - d2, 0.0, None))
            t[r0:r1, c0:c1] += chord
            covered += math.pi * r * r
            if covered >= target:
                break
    return t


def _grains(rng: np.random.Generator, cfg: HaadfConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return (thickness nm, fringe phase map or zeros) of faceted crystalline grains."""
    from skimage.draw import polygon

    h, w = cfg.shape
    p = cfg.pixel_nm
    t = np.zeros((h, w), np.float32)
    fr = np.zeros((h, w), np.float32)
    target = cfg.support_fill * h * w
    covered = 0.0
    tries = 0
    while covered < target and tries < 400:
        tries += 1
        r = float(cfg.support_grain_nm / 2.0 * np.exp(rng.normal(0.0, 0.35))) / p
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        k = int(rng.integers(4, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = r * rng.uniform(0.7, 1.2, k)
        rr, cc = polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), (h, w))
        if rr.size == 0:
            continue
        r0, c0 = int(rr.min()), int(cc.min())
        m = np.zeros((int(rr.max()) - r0 + 3, int(cc.max()) - c0 + 3), bool)
        m[rr - r0 + 1, cc - c0 + 1] = True
        # flat top, wedge edges: thickness rises over a rim of ~30 % of the radius
        edge = ndi.distance_transform_edt(m)[1:-1, 1:-1]
        thick = float(r * p * rng.uniform(0.6, 1.6))
        prof = (np.minimum(edge / max(1.0, 0.3 * r), 1.0) * thick).astype(np.float32)
        view = t[r0:r0 + prof.shape[0], c0:c0 + prof.shape[1]]
        np.maximum(view, prof[:view.shape[0], :view.shape[1]], out=view)
        period = float(rng.uniform(0.19, 0.35)) / p
        if period > 2.2:  # fringes resolved
            th = rng.uniform(0, np.pi)
            fr[rr, cc] = np.cos(2 * np.pi * (cc * np.cos(th) + rr * np.sin(th)) / period
                                + rng.uniform(0, 2 * np.pi))
        covered += rr.size
    return t, fr


def _texture(rng: np.random.Generator, shape: tuple[int, int], corr_px: float) -> np.ndarray:
    """Return unit-variance Gaussian noise with correlation length ``corr_px``."""
    n = rng.normal(size=shape).astype(np.float32)
    if corr_px > 0.3:
        n = ndi.gaussian_filter(n, corr_px, mode="wrap")
        n /= max(float(n.std()), 1e-6)
    return n


# ------------------------------------------------------------------ probe


def probe_intensity(pixel_nm: float, energy_kev: float = 200.0, semiangle_mrad: float = 22.0,
                    defocus_nm: float = 0.0, cs_mm: float = 0.001,
                    source_fwhm_nm: float = 0.08, radius_px: int | None = None) -> np.ndarray:
    """Return the probe intensity averaged over each pixel of ``pixel_nm``: a (2R+1)^2 float32
    kernel summing to 1 (the scan point's pixel at its centre).

    The probe wave is an aperture of ``semiangle_mrad`` with the aberration phase
    chi(k) = pi lambda defocus k^2 + pi/2 Cs lambda^3 k^4 (defocus > 0 underfocus; abTEM's
    sign convention for ``defocus``), computed on a fine grid (<= 0.02 nm), |.|^2, convolved
    with a Gaussian source of ``source_fwhm_nm`` and integrated over pixel-sized cells.
    """
    lam = _wavelength_nm(energy_kev)
    # an odd number of fine cells per pixel, so every fine cell falls in exactly one pixel
    sub = max(1, int(math.ceil(pixel_nm / 0.02)))
    sub += 1 - sub % 2
    fine = pixel_nm / sub
    ext = max(4.0, 8.0 * pixel_nm, 3.0 * abs(defocus_nm) * semiangle_mrad * 1e-3 * 2 + 2.0)
    n = int(2 ** math.ceil(math.log2(ext / fine)))
    k = np.fft.fftfreq(n, fine)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    alpha = np.sqrt(k2) * lam
    chi = np.pi * lam * defocus_nm * k2 + 0.5 * np.pi * (cs_mm * 1e6) * lam ** 3 * k2 ** 2
    wave = (alpha <= semiangle_mrad * 1e-3) * np.exp(-1j * chi)
    inten = np.abs(np.fft.ifft2(wave)) ** 2
    if source_fwhm_nm > 0:
        g = np.exp(-2.0 * (np.pi * source_fwhm_nm / 2.3548) ** 2 * k2)
        inten = np.real(np.fft.ifft2(np.fft.fft2(inten) * g)).clip(0.0, None)
    inten = np.fft.fftshift(inten)
    inten /= inten.sum()
    # average over pixel cells centred on the probe centre
    f = float(sub)
    r = radius_px if radius_px is not None else max(1, int(math.ceil(1.5 / pixel_nm)) if
                                                    pixel_nm < 0.5 else 2)
    r = min(r, int((n * fine / 2) / pixel_nm) - 1)
    c = n // 2
    idx = (np.arange(n) - c) / f  # fine cell -> pixel coordinate
    pix = np.floor(idx + 0.5).astype(int)
    ok = np.abs(pix) <= r
    kern = np.zeros((2 * r + 1, 2 * r + 1), np.float64)
    sel = np.nonzero(ok)[0]
    cells = inten[np.ix_(sel, sel)]
    np.add.at(kern, (pix[sel][:, None] + r, pix[sel][None, :] + r), cells)
    kern /= kern.sum()
    return kern.astype(np.float32)


def _wavelength_nm(energy_kev: float) -> float:
    """Relativistic electron wavelength (nm) at ``energy_kev``."""
    e = energy_kev * 1e3
    return 1.2264259 / math.sqrt(e * (1.0 + 0.97846e-6 * e))


def _convolve(img: np.ndarray, kern: np.ndarray) -> np.ndarray:
    """Return ``img`` convolved with the odd-sized ``kern`` (reflected edges, same shape)."""
    from scipy.signal import fftconvolve

    r = kern.shape[0] // 2
    if kern.shape[0] <= 7:
        return ndi.convolve(img, kern, mode="reflect")
    pad = np.pad(img, r, mode="reflect")
    return fftconvolve(pad, kern, mode="same")[r:-r, r:-r].astype(np.float32)


# ------------------------------------------------------------------ specimen


def render_specimen(cfg: HaadfConfig, rng: np.random.Generator | int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Return (signal, labels): the noiseless frame (float32, ~[0, 1]) and its int32 instance
    labels (0 = background or support, 1..n particles) for ``cfg``."""
    rng = np.random.default_rng(rng)
    h, w = cfg.shape
    p = cfg.pixel_nm
    zn = cfg.z_exponent
    # support: thickness map (nm) and its Z^n per pixel
    if cfg.support_kind == "aggregate":
        thick = _aggregate(rng, cfg)
        fringes = np.zeros_like(thick)
    elif cfg.support_kind == "grains":
        thick, fringes = _grains(rng, cfg)
    else:
        thick = np.zeros((h, w), np.float32)
        fringes = np.zeros_like(thick)
    sw = _support_weight(cfg) if cfg.support_kind != "none" else 0.0
    # porosity (nm scale) and amorphous texture (atomic scale): frozen in the specimen
    por = 1.0 + 0.5 * cfg.texture * _texture(rng, (h, w), max(0.5, 1.5 / p))
    tex = 1.0 + cfg.texture * _texture(rng, (h, w), max(0.0, 0.12 / p))
    sup = thick * sw * por * tex * (1.0 + 0.15 * fringes)
    if cfg.film_nm > 0:
        cw = 100.0 * 6.0 ** zn
        sup = sup + cfg.film_nm * cw * (1.0 + 2 * cfg.texture * _texture(rng, (h, w),
                                                                            max(0.0, 0.15 / p)))
    sup *= p * p  # per pixel
    # particles
    metal = np.zeros((h, w), np.float32)
    labels = np.zeros((h, w), np.int32)
    area_px = h * w
    mean_d = cfg.median_diameter_nm * math.exp(cfg.sigma_log ** 2 / 2)
    n_target = int(cfg.coverage * area_px * p * p / (math.pi / 4 * mean_d ** 2))
    n_target = int(np.clip(n_target, 0, 1500))
    sizes = np.sort(_sizes(rng, cfg, n_target))[::-1]  # large first: they are hardest to place
    centres: list[tuple[float, float, float]] = []  # (row px, col px, radius px)
    grid_r: dict[tuple[int, int], list[int]] = {}
    cell = max(4.0, 2.0 * float(sizes.max()) / p) if sizes.size else 8.0
    supp = thick > 0.2 * (thick.max() if thick.max() > 0 else 1.0)
    sup_pix = np.flatnonzero(supp.ravel())
    k = 0
    for d in sizes:
        rp = d / 2.0 / p
        for _ in range(30):
            if centres and rng.random() < cfg.cluster_fraction:
                # next to an existing particle: touching group
                pr, pc, prr = centres[int(rng.integers(len(centres)))]
                a = rng.uniform(0, 2 * np.pi)
                dist = (prr + rp) * rng.uniform(0.92, 1.05)
                r_, c_ = pr + dist * math.sin(a), pc + dist * math.cos(a)
            elif sup_pix.size and rng.random() < cfg.on_support:
                q = int(sup_pix[int(rng.integers(sup_pix.size))])
                r_, c_ = q // w + rng.random(), q % w + rng.random()
            else:
                r_, c_ = rng.uniform(0, h), rng.uniform(0, w)
            gi, gj = int(r_ // cell), int(c_ // cell)
            ok = True
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    for j in grid_r.get((gi + di, gj + dj), []):
                        qr, qc, qrr = centres[j]
                        if (qr - r_) ** 2 + (qc - c_) ** 2 < (0.9 * (qrr + rp)) ** 2:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if ok:
                break
        else:
            continue
        pos, zs = _particle(rng, cfg, float(d))
        xy = np.stack([pos[:, 1] / p + c_, pos[:, 0] / p + r_], 1)
        mask, (m0, n0) = hull_mask(xy, (h, w), _ATOM_RADIUS_NM / p)
        if mask.size == 0 or not mask.any():
            continue
        # a particle that adds too little to the support under it is not rendered at all: no
        # annotator would mark it, and a label on nothing teaches the network to guess
        zsum = float((zs.astype(np.float64) ** zn).sum())
        under = float(sup[m0:m0 + mask.shape[0], n0:n0 + mask.shape[1]][mask].mean())
        if zsum / (int(mask.sum()) + 1e-9) < cfg.min_excess * under:
            continue
        k += 1
        view = labels[m0:m0 + mask.shape[0], n0:n0 + mask.shape[1]]
        view[mask] = k  # a later particle lies on top
        splat(metal, xy, zs.astype(np.float64) ** zn)
        centres.append((r_, c_, rp))
        grid_r.setdefault((int(r_ // cell), int(c_ // cell)), []).append(len(centres) - 1)
    # unlabelled specks: single atoms and sub-nm clusters on the support
    n_atoms = int(rng.poisson(cfg.single_atoms_per_nm2 * area_px * p * p * max(supp.mean(),
                                                                                 0.05)))
    if n_atoms and sup_pix.size:
        qs = sup_pix[rng.integers(sup_pix.size, size=n_atoms)]
        xy = np.stack([qs % w + rng.random(n_atoms), qs // w + rng.random(n_atoms)], 1)
        z = ELEMENTS[cfg.elements[0]][0]
        splat(metal, xy, np.full(n_atoms, float(z) ** zn))
    n_cl = int(rng.poisson(cfg.subnm_clusters_per_nm2 * area_px * p * p))
    for _ in range(n_cl):
        pos, zs = _particle(rng, replace(cfg, alloy="none"), float(rng.uniform(0.3, 0.8)))
        keep = max(3, len(pos) // 3)
        pos, zs = pos[:keep], zs[:keep]
        if sup_pix.size:
            q = int(sup_pix[int(rng.integers(sup_pix.size))])
            r_, c_ = q // w + rng.random(), q % w + rng.random()
        else:
            r_, c_ = rng.uniform(0, h), rng.uniform(0, w)
        splat(metal, np.stack([pos[:, 1] / p + c_, pos[:, 0] / p + r_], 1),
               zs.astype(np.float64) ** zn)
    kern = probe_intensity(p, cfg.energy_kev, cfg.semiangle_mrad, cfg.defocus_nm, cfg.cs_mm,
                           cfg.source_fwhm_nm)
    if cfg.mode == "haadf":
        raw = sup + metal
        if kern.shape[0] > 1:
            raw = _convolve(raw, kern)
        ref = float(np.quantile(raw, 0.999)) or 1.0
        sig = raw / ref
        if cfg.saturation > 0:
            sig = (1.0 - np.exp(-cfg.saturation * sig)) / (1.0 - math.exp(-cfg.saturation))
    else:
        # bright field: mass-thickness absorption (Z-weighted) and phase-contrast grain
        mass = sup + metal
        if kern.shape[0] > 1:
            mass = _convolve(mass, kern)
        ref = float(np.quantile(mass, 0.999)) or 1.0
        sig = np.exp(-float(rng.uniform(0.6, 2.0)) * mass / ref)
        grain = _texture(rng, (h, w), max(0.3, 0.25 / p))
        sig = sig * (1.0 + 0.5 * cfg.texture * grain)
    return sig.astype(np.float32), labels


# ------------------------------------------------------------------ acquisition


def acquire(signal: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            dose: float | None = None, jitter_px: float | None = None,
            drift: float | None = None, jpeg_quality: int | None = None,
            dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, labels): one acquisition of the noiseless ``signal`` (None arguments
    are drawn at random): scan distortions move image and labels together (line jitter: each
    row shifted by a whole-pixel amount; drift: a shear of whole pixels per row band), then
    Poisson noise at ``dose`` counts for a signal of 1, read noise, scan-line offsets, the
    bit depth ``dtype`` and JPEG compression at ``jpeg_quality`` (0 = none)."""
    h, w = signal.shape
    sig = signal
    lab = labels
    jit = float(rng.uniform(0.0, 1.2)) if jitter_px is None else jitter_px
    dr = float(rng.uniform(-0.15, 0.15)) if drift is None else drift
    if jit > 0 or dr != 0:
        rows = np.arange(h)
        shift = np.round(rng.normal(0.0, jit, h) * (rng.random(h) < 0.5) + dr * (rows - h / 2)
                         ).astype(int) if jit > 0 else np.round(dr * (rows - h / 2)).astype(int)
        cols = np.clip(np.arange(w)[None, :] - shift[:, None], 0, w - 1)
        sig = np.take_along_axis(sig, cols, 1)
        lab = np.take_along_axis(lab, cols, 1)
    dose = float(np.exp(rng.uniform(math.log(20.0), math.log(1000.0)))) if dose is None else dose
    x = rng.poisson(np.clip(sig, 0.0, None) * dose).astype(np.float32) / dose
    x += rng.normal(0.0, float(rng.uniform(0.0, 0.03)), x.shape).astype(np.float32)
    if rng.random() < 0.5:  # scan-line offsets
        x += rng.normal(0.0, float(rng.uniform(0.0, 0.03)), (h, 1)).astype(np.float32)
    dtype = str(rng.choice(["uint8", "uint16", "float32"])) if dtype is None else dtype
    q = (int(rng.integers(40, 96)) if rng.random() < 0.6 else 0) if jpeg_quality is None \
        else jpeg_quality
    lo, hi = float(np.quantile(x, 0.001)), float(np.quantile(x, 0.9995))
    if q > 0 or dtype == "uint8":
        u8 = np.clip((x - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
        if q > 0:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(u8).save(buf, format="JPEG", quality=q)
            u8 = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
        img: np.ndarray = u8 if dtype != "float32" else u8.astype(np.float32)
        if dtype == "uint16":
            img = u8.astype(np.uint16) * 257
    elif dtype == "uint16":
        img = np.clip((x - lo) / max(hi - lo, 1e-6) * 60000.0, 0, 65535).astype(np.uint16)
    else:
        img = x.astype(np.float32)
    return img, lab.astype(np.int32)


# ------------------------------------------------------------------ random specimens


def random_config(rng: np.random.Generator, shape: tuple[int, int] = (256, 256),
                  diameter_px: tuple[float, float] = (6.0, 48.0)) -> HaadfConfig:
    """Return a random training configuration: particle median 1.2-12 nm seen at a median
    of ``diameter_px`` px (log-uniform), so the pixel size follows (0.03-2 nm)."""
    med_nm = float(np.exp(rng.uniform(math.log(1.2), math.log(12.0))))
    d_px = float(np.exp(rng.uniform(math.log(diameter_px[0]), math.log(diameter_px[1]))))
    p = float(np.clip(med_nm / d_px, 0.02, 2.0))
    els = list(ELEMENTS)
    e1 = str(rng.choice(els))
    elements: tuple[str, ...] = (e1,)
    alloy = "none"
    if rng.random() < 0.25:
        elements = (e1, str(rng.choice([e for e in els if e != e1])))
        alloy = str(rng.choice(["random", "core-shell"]))
    kind = str(rng.choice(["aggregate", "grains", "film", "none"], p=[0.55, 0.25, 0.12, 0.08]))
    support = (str(rng.choice(_AMORPHOUS)) if kind == "aggregate"
               else str(rng.choice(["ceria", "titania", "zirconia", "alumina"])) if kind == "grains"
               else "carbon")
    mix = rng.dirichlet(np.ones(len(_SHAPES)))
    grain = float(np.clip(d_px * p * np.exp(rng.uniform(math.log(2.0), math.log(12.0))),
                          5.0, 80.0))
    return HaadfConfig(
        shape=shape, pixel_nm=p, median_diameter_nm=med_nm,
        sigma_log=float(rng.uniform(0.1, 0.45)), min_diameter_nm=max(0.8, 2.0 * p),
        coverage=float(np.exp(rng.uniform(math.log(0.01), math.log(0.25)))),
        elements=elements, alloy=alloy,  # type: ignore[arg-type]
        shape_mix=tuple(mix.tolist()), cluster_fraction=float(rng.uniform(0.0, 0.5)),
        on_support=float(rng.uniform(0.7, 1.0)), support=support,
        support_kind=kind,  # type: ignore[arg-type]
        support_grain_nm=grain, support_fill=float(rng.uniform(0.3, 2.0)),
        support_density=float(np.exp(rng.uniform(-1.2, 0.3))),
        film_nm=float(rng.uniform(2.0, 20.0)) if (kind == "film" or rng.random() < 0.3) else 0.0,
        texture=float(rng.uniform(0.02, 0.35)),
        single_atoms_per_nm2=float(rng.uniform(0.0, 0.3)) if p < 0.12 else 0.0,
        subnm_clusters_per_nm2=float(rng.uniform(0.0, 0.01)) if rng.random() < 0.4 else 0.0,
        z_exponent=float(rng.uniform(1.5, 2.0)),
        mode="bf" if rng.random() < 0.15 else "haadf",
        semiangle_mrad=float(rng.uniform(10.0, 30.0)),
        defocus_nm=float(rng.normal(0.0, 5.0)),
        cs_mm=float(rng.choice([0.001, 0.005, 1.2])),
        source_fwhm_nm=float(rng.uniform(0.05, 0.15)),
        saturation=float(rng.uniform(0.0, 2.0)),
        min_excess=float(rng.uniform(0.1, 0.3)),
    )


def render(cfg: HaadfConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, labels): specimen and one acquisition, both from ``seed``."""
    rng = np.random.default_rng(seed)
    sig, lab = render_specimen(cfg, rng)
    return acquire(sig, lab, rng)


def write_cache(out: Path, start: int, count: int, shape: tuple[int, int] = (320, 320),
                shard: int = 50) -> list[Path]:
    """Render ``count`` random specimens (seeds ``start`` + k) into npz shards under ``out``:
    ``signal`` float16 (n, H, W), ``labels`` uint16 (n, H, W), ``seeds`` int64 (n,)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s0 in range(start, start + count, shard):
        path = out / f"haadf_{s0}.npz"
        if path.is_file():
            paths.append(path)
            continue
        sigs, labs, seeds = [], [], []
        t0 = time.perf_counter()
        for seed in range(s0, min(s0 + shard, start + count)):
            rng = np.random.default_rng(seed)
            cfg = random_config(rng, shape)
            s, lab = render_specimen(cfg, rng)
            sigs.append(s.astype(np.float16))
            labs.append(np.minimum(lab, 65535).astype(np.uint16))
            seeds.append(seed)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, signal=np.stack(sigs), labels=np.stack(labs),
                            seeds=np.asarray(seeds))
        tmp.rename(path)
        paths.append(path)
        print(f"{path}: {len(seeds)} frames in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: pre-render a cache of HAADF training specimens (or one preview PNG)."""
    ap = argparse.ArgumentParser(description="render HAADF-STEM training specimens")
    ap.add_argument("--cache", type=Path, default=None, help="write npz shards here")
    ap.add_argument("--start", type=int, default=3_000_000)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--preview", type=Path, default=None, help="a PNG mosaic of 8 frames")
    args = ap.parse_args(argv)
    if args.preview is not None:
        from PIL import Image

        tiles = []
        for k in range(8):
            img, lab = render(random_config(np.random.default_rng(args.start + k),
                                            (args.size, args.size)), args.start + k)
            x = img.astype(np.float32)
            x = (x - x.min()) / max(float(np.ptp(x)), 1e-6)
            edge = (lab != np.roll(lab, 1, 0)) | (lab != np.roll(lab, 1, 1))
            rgb = np.stack([x, x, x], -1)
            rgb[edge] = (1.0, 0.2, 0.2)
            tiles.append(np.concatenate([np.stack([x] * 3, -1), rgb], 0))
        Image.fromarray((np.concatenate(tiles, 1) * 255).astype(np.uint8)).save(args.preview)
        return
    if args.cache is None:
        raise SystemExit("give --cache DIR or --preview FILE")
    write_cache(args.cache, args.start, args.count, (args.size, args.size))


if __name__ == "__main__":
    main()
