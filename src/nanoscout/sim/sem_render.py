"""SEM frames of agglomerated, non-spherical particles with secondary-electron contrast.

Training data for the detector (issue 17). Each particle is a solid in 3-D: a sphere or
ellipsoid, or a convex polyhedron given by its face planes (cube, octahedron / square
bipyramid, hexagonal platelet, rod with a square or hexagonal section, truncated cube), turned
at random and piled into agglomerates on a substrate. Per pixel a z-buffer keeps the top
surface, its normal and the particle it belongs to, so

* **labels are exact**: particle k's label is where it is the visible top surface
  (a particle half hidden under another is labelled where it shows);
* **contrast is secondary-electron contrast**: yield ~ 1 / cos(tilt)^0.8 of the local surface,
  a bright band along every silhouette edge (electrons escaping through the side walls, width
  a few nm), a substrate of lower yield, shading towards an Everhart-Thornley detector on one
  side and shadowing of what lies below a neighbour's horizon in that direction (none for an
  in-lens detector), and charging on some particles (saturated patches and bright streaks
  along the scan direction);
* acquisition: blur (probe), Poisson-like noise, scan-line noise and jitter, 8 / 16 bit.

``render(cfg, seed)`` returns (image, labels); :func:`random_config` draws a training
configuration with particle median 6-48 px at working scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from nanoscout.sim.rotation import random_rotation

__all__ = ["SHAPES", "SemConfig", "random_config", "render", "solid_planes"]

SHAPES = ("sphere", "ellipsoid", "cube", "octahedron", "bipyramid", "platelet", "rod",
          "truncated_cube")


@dataclass(frozen=True)
class SemConfig:
    """One SEM specimen and its imaging (lengths in px of the frame)."""

    shape: tuple[int, int] = (256, 256)
    median_diameter_px: float = 20.0
    sigma_log: float = 0.25
    coverage: float = 0.3  # projected particle area / frame area (before overlap)
    shape_mix: tuple[float, ...] = (0.3, 0.1, 0.15, 0.1, 0.1, 0.1, 0.1, 0.05)  # SHAPES order
    agglomeration: float = 0.5  # share of particles placed against another
    stacking: float = 0.3  # share of those resting on top of the pile
    detector: Literal["etd", "inlens"] = "etd"
    edge_px: float = 2.0  # width of the bright silhouette band
    edge_gain: float = 0.8
    substrate_yield: float = 0.35  # particle yield is ~1
    substrate_texture: float = 0.05
    charging: float = 0.0  # share of particles that charge
    blur_px: float = 0.8
    dose: float = 60.0  # counts for a yield of 1
    line_noise: float = 0.02
    dtype: Literal["uint8", "uint16"] = "uint8"


def solid_planes(kind: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Return the face planes (F, 4) rows (nx, ny, nz, d) of a convex polyhedron centred at the
    origin, unit normals, solid = {p : n . p <= d}, about ``size`` across, not yet turned."""
    r = size / 2.0
    if kind == "cube":
        n = np.vstack([np.eye(3), -np.eye(3)])
        d = np.full(6, r * 0.85)
    elif kind == "truncated_cube":
        n1 = np.vstack([np.eye(3), -np.eye(3)])
        c = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)
        n2 = c / np.sqrt(3.0)
        n = np.vstack([n1, n2])
        d = np.concatenate([np.full(6, r * 0.85), np.full(8, r * 0.85 * rng.uniform(1.2, 1.6))])
    elif kind in ("octahedron", "bipyramid"):
        c = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)
        if kind == "bipyramid":  # elongated along z
            c[:, 2] *= rng.uniform(0.35, 0.6)
        n = c / np.linalg.norm(c, axis=1, keepdims=True)
        d = np.full(8, r * 0.75)
    elif kind in ("platelet", "rod"):
        k = int(rng.choice([4, 6])) if kind == "rod" else 6
        ang = 2 * np.pi * np.arange(k) / k
        side = np.stack([np.cos(ang), np.sin(ang), np.zeros(k)], 1)
        caps = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
        n = np.vstack([side, caps])
        if kind == "platelet":
            half = r * rng.uniform(0.12, 0.3)
            d = np.concatenate([np.full(k, r), [half, half]])
        else:
            half = r * rng.uniform(1.5, 3.5)
            d = np.concatenate([np.full(k, r * rng.uniform(0.3, 0.5)), [half, half]])
    else:
        raise ValueError(f"not a polyhedron: {kind!r} (known: {', '.join(SHAPES)})")
    return np.concatenate([n, d[:, None]], 1)


def _surface(kind: str, size: float, rng: np.random.Generator, lie_flat: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (top z, bottom z, normal (3, H, W), inside mask) of one solid on a local grid
    centred on it (px, z up); ``lie_flat``: rods and platelets lie on a face."""
    if kind in ("sphere", "ellipsoid"):
        ax = size / 2.0 * (np.array([1.0, 1.0, 1.0]) if kind == "sphere"
                           else rng.uniform(0.6, 1.3, 3))
        rr = float(ax.max())
        m = int(math.ceil(rr)) + 2
        g = np.arange(-m, m + 1, dtype=np.float64)
        y, x = np.meshgrid(g, g, indexing="ij")
        t = np.pi * rng.random()
        cx, sx = math.cos(t), math.sin(t)
        u, v = x * cx + y * sx, -x * sx + y * cx
        q = 1.0 - (u / ax[0]) ** 2 - (v / ax[1]) ** 2
        inside = q > 0
        zt = ax[2] * np.sqrt(np.clip(q, 0.0, None))
        # normal of the ellipsoid: gradient of (u/a)^2 + (v/b)^2 + (z/c)^2
        nu = u / ax[0] ** 2
        nv = v / ax[1] ** 2
        nz = np.where(inside, zt / ax[2] ** 2, 1.0)
        nx, ny = nu * cx - nv * sx, nu * sx + nv * cx
        nrm = np.stack([nx, ny, nz])
        nrm /= np.maximum(np.linalg.norm(nrm, axis=0), 1e-9)
        return zt, -zt, nrm, inside
    planes = solid_planes(kind, size, rng)
    if lie_flat and kind in ("rod", "platelet"):
        if kind == "rod":  # long axis in the plane of the substrate
            t = np.pi * rng.random()
            rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0],
                            [0, 0, 1.0]]) @ np.array([[0, 0, 1.0], [0, 1.0, 0], [-1.0, 0, 0]])
        else:
            t = np.pi * rng.random()
            rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0],
                            [0, 0, 1.0]])
    else:
        rot = random_rotation(rng)
    n = planes[:, :3] @ rot.T
    d = planes[:, 3]
    ext = float(np.abs(d).max()) * 2.0
    m = int(math.ceil(ext)) + 2
    g = np.arange(-m, m + 1, dtype=np.float64)
    y, x = np.meshgrid(g, g, indexing="ij")
    up = n[:, 2] > 1e-6
    down = n[:, 2] < -1e-6
    side = ~up & ~down
    # z on plane i at (x, y): (d - nx x - ny y) / nz
    def zplane(i: np.ndarray) -> np.ndarray:
        return (d[i, None, None] - n[i, 0, None, None] * x[None] - n[i, 1, None, None] * y[None]
                ) / n[i, 2, None, None]

    top_all = zplane(np.flatnonzero(up))
    bot_all = zplane(np.flatnonzero(down))
    top = top_all.min(0)
    arg = np.flatnonzero(up)[top_all.argmin(0)]
    bot = bot_all.max(0)
    inside = top > bot
    for i in np.flatnonzero(side):  # vertical faces bound the column directly
        inside &= n[i, 0] * x + n[i, 1] * y <= d[i]
    nrm = np.moveaxis(n[arg], -1, 0)
    return np.where(inside, top, 0.0), np.where(inside, bot, 0.0), nrm, inside


def render(cfg: SemConfig, seed: int | np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, labels int32) of one SEM specimen and acquisition."""
    rng = np.random.default_rng(seed)
    h, w = cfg.shape
    pad = int(2 * cfg.median_diameter_px) + 8
    H, W = h + 2 * pad, w + 2 * pad
    zbuf = np.full((H, W), 0.0)
    nbuf = np.zeros((3, H, W))
    nbuf[2] = 1.0
    lab = np.zeros((H, W), np.int32)
    charge = np.zeros((H, W), np.float32)
    mean_d = cfg.median_diameter_px * math.exp(cfg.sigma_log ** 2 / 2)
    n_target = int(np.clip(cfg.coverage * H * W / (math.pi / 4 * mean_d ** 2), 1, 3000))
    mix = np.asarray(cfg.shape_mix, float)
    mix /= mix.sum()
    centres: list[tuple[float, float, float]] = []
    for k in range(1, n_target + 1):
        size = float(np.clip(cfg.median_diameter_px * math.exp(rng.normal(0, cfg.sigma_log)),
                             3.0, 0.8 * min(h, w)))
        kind = SHAPES[int(rng.choice(len(SHAPES), p=mix))]
        top, bot, nrm, inside = _surface(kind, size, rng, lie_flat=rng.random() < 0.7)
        m = top.shape[0] // 2
        if 2 * m + 2 >= min(H, W):  # a solid larger than the canvas (a long rod)
            continue
        if centres and rng.random() < cfg.agglomeration:
            py, px, pr = centres[int(rng.integers(len(centres)))]
            a = rng.uniform(0, 2 * np.pi)
            dist = (pr + size / 2.0) * rng.uniform(0.75, 1.0)
            cy, cx = py + dist * math.sin(a), px + dist * math.cos(a)
        else:
            cy, cx = rng.uniform(m, H - m - 1), rng.uniform(m, W - m - 1)
        iy, ix = int(round(cy)), int(round(cx))
        r0, c0 = iy - m, ix - m
        if r0 < 0 or c0 < 0 or r0 + top.shape[0] > H or c0 + top.shape[1] > W:
            continue
        view = (slice(r0, r0 + top.shape[0]), slice(c0, c0 + top.shape[1]))
        under = zbuf[view][inside]
        # rest on the substrate, or on what lies under the footprint (a pile)
        base = -bot[inside].min() if inside.any() else 0.0
        lift = float(np.quantile(under, 0.7)) * (rng.uniform(0.4, 0.9)
                                                 if rng.random() < cfg.stacking else 0.0)
        z = np.where(inside, top + base + lift, -np.inf)
        vis = z > zbuf[view]
        if not vis.any():
            continue
        zbuf[view][vis] = z[vis]
        for c in range(3):
            nbuf[c][view][vis] = nrm[c][vis]
        lab[view][vis] = k
        if rng.random() < cfg.charging:
            charge[view][vis] = float(rng.uniform(0.5, 2.0))
        centres.append((cy, cx, size / 2.0))
    # relabel 1..n over the visible particles of the frame window
    lab = lab[pad:pad + h, pad:pad + w]
    keep = np.unique(lab[lab > 0])
    lut = np.zeros(int(lab.max()) + 1 if lab.size else 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    labels = lut[lab]
    zb = zbuf[pad:pad + h, pad:pad + w]
    nz = np.clip(nbuf[2, pad:pad + h, pad:pad + w], 0.05, 1.0)
    nx, ny = nbuf[0, pad:pad + h, pad:pad + w], nbuf[1, pad:pad + h, pad:pad + w]
    part = labels > 0
    # secondary-electron yield: tilt, material, edges
    sub = cfg.substrate_yield * (1.0 + cfg.substrate_texture * ndi.gaussian_filter(
        rng.normal(size=(h, w)), 1.0) / 0.28)
    y = np.where(part, 1.0 / nz ** 0.8, sub)
    # boundaries between particles and particle / substrate: distance to the nearest outline
    edge = (labels != np.roll(labels, 1, 0)) | (labels != np.roll(labels, 1, 1))
    edge |= (labels != np.roll(labels, -1, 0)) | (labels != np.roll(labels, -1, 1))
    dist = ndi.distance_transform_edt(~edge)
    y = y + np.where(part, cfg.edge_gain * np.exp(-dist / max(cfg.edge_px, 0.3)), 0.0)
    if cfg.detector == "etd":
        th = rng.uniform(0, 2 * np.pi)
        dx, dy = math.cos(th), math.sin(th)
        y = y * (1.0 + 0.35 * np.where(part, nx * dx + ny * dy, 0.0))
        # shadowing: a pixel below a neighbour's horizon towards the detector gets fewer
        shadow = np.zeros((h, w), bool)
        for step in (2, 4, 7, 11, 16):
            sh = ndi.shift(zb, (-dy * step, -dx * step), order=0, mode="nearest")
            shadow |= sh > zb + 0.8 * step
        y = np.where(shadow, y * rng.uniform(0.45, 0.8), y)
    ch = charge[pad:pad + h, pad:pad + w]
    if ch.any():
        streak = ndi.gaussian_filter1d(ch, 1.0, axis=0)
        for s in range(1, 24, 3):  # decaying bright tail along the fast scan (x) direction
            streak = np.maximum(streak, np.roll(ch, s, 1) * math.exp(-s / 8.0))
        y = y + streak
    if cfg.blur_px > 0:
        y = ndi.gaussian_filter(y, cfg.blur_px)
    x = rng.poisson(np.clip(y, 0, None) * cfg.dose).astype(np.float64) / cfg.dose
    x += rng.normal(0.0, cfg.line_noise, (h, 1))
    x = np.clip(x, 0.0, None)
    hi = float(np.quantile(x, 0.998)) or 1.0
    if cfg.dtype == "uint8":
        img = np.clip(x / hi * 235.0 + 10.0, 0, 255).astype(np.uint8)
    else:
        img = np.clip(x / hi * 60000.0, 0, 65535).astype(np.uint16)
    return img, labels.astype(np.int32)


def random_config(rng: np.random.Generator, shape: tuple[int, int] = (256, 256),
                  diameter_px: tuple[float, float] = (6.0, 48.0)) -> SemConfig:
    """Return a random SEM training configuration (median particle ``diameter_px`` px)."""
    d = float(np.exp(rng.uniform(math.log(diameter_px[0]), math.log(diameter_px[1]))))
    mix = rng.dirichlet(np.full(len(SHAPES), 0.6))
    return SemConfig(
        shape=shape, median_diameter_px=d, sigma_log=float(rng.uniform(0.08, 0.4)),
        coverage=float(rng.uniform(0.05, 0.9)), shape_mix=tuple(mix.tolist()),
        agglomeration=float(rng.uniform(0.0, 0.9)), stacking=float(rng.uniform(0.0, 0.6)),
        detector="etd" if rng.random() < 0.6 else "inlens",
        edge_px=float(rng.uniform(0.5, 0.15 * d + 0.5)), edge_gain=float(rng.uniform(0.2, 1.5)),
        substrate_yield=float(rng.uniform(0.1, 0.7)),
        substrate_texture=float(rng.uniform(0.0, 0.3)),
        charging=float(rng.uniform(0.0, 0.3)) if rng.random() < 0.25 else 0.0,
        blur_px=float(rng.uniform(0.3, 1.8)),
        dose=float(np.exp(rng.uniform(math.log(8.0), math.log(400.0)))),
        line_noise=float(rng.uniform(0.0, 0.05)),
        dtype="uint8" if rng.random() < 0.7 else "uint16",
    )
