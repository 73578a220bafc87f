"""A large virtual specimen for automated stage search, rendered on request (numpy + scipy).

:class:`VirtualSpecimen` draws, once and deterministically for ``cfg.seed``, a specimen of
``size_um`` (default 200 µm x 200 µm, stage centre at (0, 0)) holding many ordinary particles,
a few agglomerates (confounders: clusters of touching ordinary particles) and rare *targets*
(``large`` compact particles and ``wire`` rods). :meth:`VirtualSpecimen.render` images any
window of it at any stage position, pixel size and frame shape with the image formation of
:mod:`nanoscout.sim.synthetic`, and exact ground truth: frame ``labels`` and ``truth`` hold *global*
particle ids, so a particle keeps its id in every frame and a frame's truth can be matched with
:attr:`VirtualSpecimen.targets` by id.

Coordinates (stage, µm): the frame is centred on the stage position ``(cx, cy)``; pixel
``(row, col)`` of an ``(H, W)`` frame with pixel size ``p`` nm has its centre at
``x = cx + (col - (W - 1) / 2) * p / 1000`` and ``y = cy + (row - (H - 1) / 2) * p / 1000``
(columns along +x, rows along +y); see :meth:`VirtualSpecimen.pixel_to_stage`.

The particles are fixed on the specimen; the support texture, the illumination gradient and
the shot noise are drawn per render from its ``rng``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import numpy as np
from scipy.spatial import cKDTree

from nanoscout.sim.synthetic import (
    KINDS,
    MODALITIES,
    Specimen,
    SpecimenConfig,
    SyntheticFrame,
    _Geometry,
    _rng,
    _support,
)

__all__ = ["TARGET_DTYPE", "TARGET_KINDS", "VirtualSpecimen", "VirtualSpecimenConfig"]

#: rare objects a stage search looks for; ``targets["kind"]`` holds one of these names
TARGET_KINDS: tuple[str, ...] = ("large", "wire")

#: one row per target; positions in stage µm, sizes in nm (length/width: feret-like extent)
TARGET_DTYPE = np.dtype(
    [
        ("id", "<i4"),  # particle id, the value in frame labels and truth
        ("kind", "U8"),  # one of TARGET_KINDS
        ("x_um", "<f8"),
        ("y_um", "<f8"),
        ("ecd_nm", "<f4"),  # equivalent (projected area) circle diameter
        ("length_nm", "<f4"),  # largest extent (max feret)
        ("width_nm", "<f4"),  # smallest extent (min feret)
    ]
)

_C = TypeVar("_C", float, np.ndarray)  # a coordinate: one value or an array of them
_DEFAULT_MIX: dict[str, float] = {"sphere": 0.8, "faceted": 0.1, "ellipse": 0.05, "rod": 0.05}
_SPHERE, _ELLIPSE, _ROD, _FACETED = 0, 1, 2, 3
_EDGE_UM = 3.0  # targets keep at least this far from the specimen edge
_AGG_EDGE_UM = 2.0  # agglomerate centres keep this far from the edge
_AGG_SPACING_UM = 3.0  # agglomerate centres apart (the blobs stay separate)
_TARGET_CLEAR_NM = 200.0  # gap around a target: its circumradius + this
_ROD_MAX_LENGTH_NM = 1000.0  # ordinary rods stay shorter than wire targets
_PLACE_ROUNDS = 40  # redraw rounds for overlapping ordinary particles
_DART_TRIES = 2000  # dart throws per target / agglomerate centre before giving up


@dataclass(frozen=True)
class VirtualSpecimenConfig:
    """What the virtual specimen holds. Lengths in nm unless the name says µm."""

    size_um: tuple[float, float] = (200.0, 200.0)  # (x width, y height), centred on (0, 0)
    modality: Literal["TEM", "STEM", "SEM"] = "TEM"
    median_diameter_nm: float = 200.0  # ordinary particles: lognormal median ECD
    sigma_log: float = 0.25
    coverage: float = 0.03  # projected area fraction of the isolated ordinary particles
    #: ordinary particles' kind weights (keys from nanoscout.sim.synthetic.KINDS); rods have aspect 2-4
    #: and stay shorter than 1 µm
    shape_mix: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_MIX))
    agglomerates: int = 30  # clusters of 5-15 touching ordinary particles (confounders)
    large_targets: int = 12  # one compact particle (sphere or faceted), ECD in large_ecd_nm
    #: targets are bigger than any ordinary particle (those are clipped at median e^(4 sigma),
    #: 544 nm by default) and no bigger than the shipped detector keeps whole at 20 nm/px
    #: (opaque particles over ~1 µm and wires over ~2.3 µm break up there)
    large_ecd_nm: tuple[float, float] = (650.0, 950.0)
    wire_targets: int = 12  # one rod (capsule), length and width uniform in these ranges
    wire_length_nm: tuple[float, float] = (1500.0, 2200.0)
    wire_width_nm: tuple[float, float] = (300.0, 400.0)
    #: least distance between targets and from targets to agglomerate centres, µm
    target_spacing_um: float = 8.0
    support_texture: float = 0.05  # relative rms contrast of the amorphous support
    contrast: float = 0.5  # particle contrast, 0..1
    blur_px: float = 0.8  # gaussian sigma of the probe / point-spread function, px
    illumination_gradient: float = 0.1  # relative change of beam intensity across a frame
    fringe: float = 0.0  # Fresnel fringe strength, 0..1, TEM only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {MODALITIES}")
        if len(self.size_um) != 2 or not min(self.size_um) > 2.0 * _EDGE_UM:
            raise ValueError(f"size_um {self.size_um!r} must be (width, height), both "
                             f"> {2.0 * _EDGE_UM} µm")
        if not self.median_diameter_nm > 0 or not self.sigma_log >= 0:
            raise ValueError(f"median_diameter_nm {self.median_diameter_nm!r} must be > 0 and "
                             f"sigma_log {self.sigma_log!r} >= 0")
        if not 0 <= self.coverage < 0.5:
            raise ValueError(f"coverage {self.coverage!r} must be in [0, 0.5)")
        unknown = set(self.shape_mix) - set(KINDS)
        if unknown or sum(max(0.0, float(v)) for v in self.shape_mix.values()) <= 0:
            raise ValueError(f"shape_mix {dict(self.shape_mix)!r} needs positive weights of "
                             f"{KINDS}")
        for name in ("agglomerates", "large_targets", "wire_targets"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 0")
        for name in ("large_ecd_nm", "wire_length_nm", "wire_width_nm"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} {getattr(self, name)!r} must be (lo, hi), 0 < lo <= hi")
        if self.wire_width_nm[1] > self.wire_length_nm[0]:
            raise ValueError(f"wire_width_nm {self.wire_width_nm!r} must not exceed "
                             f"wire_length_nm {self.wire_length_nm!r}")
        if not self.target_spacing_um >= 0:
            raise ValueError(f"target_spacing_um {self.target_spacing_um!r} must be >= 0")
        if not self.blur_px >= 0:
            raise ValueError(f"blur_px {self.blur_px!r} must be >= 0")


# --------------------------------------------------------------------------------------------
# geometry helpers (vectorised, nm)


def _circumradius(kind: np.ndarray, r: np.ndarray, aspect: np.ndarray,
                  nsides: np.ndarray) -> np.ndarray:
    """Return each particle's circumscribed radius (same unit as ``r``)."""
    out = r.astype(np.float64).copy()
    ell = kind == _ELLIPSE
    out[ell] = r[ell] * np.sqrt(aspect[ell])
    rod = kind == _ROD
    w = r[rod] * np.sqrt(np.pi / (aspect[rod] - 1.0 + np.pi / 4.0))
    out[rod] = 0.5 * aspect[rod] * w
    poly = (kind == _FACETED) | (kind == 4)
    n = nsides[poly].astype(np.float64)
    out[poly] = r[poly] * np.sqrt(2.0 * np.pi / (n * np.sin(2.0 * np.pi / n)))
    return out


def _feret(kind: int, r: float, aspect: float, nsides: int) -> tuple[float, float]:
    """Return (max, min) feret diameter of one particle (unit of ``r``)."""
    if kind == _ROD:
        w = r * math.sqrt(math.pi / (aspect - 1.0 + math.pi / 4.0))
        return aspect * w, w
    if kind == _ELLIPSE:
        return 2.0 * r * math.sqrt(aspect), 2.0 * r / math.sqrt(aspect)
    if kind in (_FACETED, 4):
        circ = r * math.sqrt(2.0 * math.pi / (nsides * math.sin(2.0 * math.pi / nsides)))
        apo = circ * math.cos(math.pi / nsides)
        if nsides % 2:
            return 2.0 * circ * math.cos(math.pi / (2 * nsides)), circ + apo
        return 2.0 * circ, 2.0 * apo
    return 2.0 * r, 2.0 * r


@dataclass
class _Parts:
    """Flat particle arrays (nm, stage coordinates); index + 1 is the particle id."""

    kind: np.ndarray
    x: np.ndarray
    y: np.ndarray
    r: np.ndarray  # equivalent (area) radius
    aspect: np.ndarray
    angle: np.ndarray
    nsides: np.ndarray
    mass: np.ndarray

    @staticmethod
    def empty() -> _Parts:
        return _Parts(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0),
                      np.zeros(0), np.zeros(0), np.zeros(0, np.int64), np.zeros(0))

    @staticmethod
    def concat(parts: list[_Parts]) -> _Parts:
        names = ("kind", "x", "y", "r", "aspect", "angle", "nsides", "mass")
        return _Parts(*(np.concatenate([getattr(p, f) for p in parts]) for f in names))

    def take(self, idx: np.ndarray) -> _Parts:
        names = ("kind", "x", "y", "r", "aspect", "angle", "nsides", "mass")
        return _Parts(*(getattr(self, f)[idx] for f in names))

    def __len__(self) -> int:
        return int(self.r.size)


def _ordinary(cfg: VirtualSpecimenConfig, rng: np.random.Generator, n: int) -> _Parts:
    """Draw ``n`` ordinary particles (sizes, kinds, shapes) at the origin."""
    lo, hi = math.exp(-4.0 * cfg.sigma_log), math.exp(4.0 * cfg.sigma_log)
    d = cfg.median_diameter_nm * np.clip(np.exp(cfg.sigma_log * rng.standard_normal(n)), lo, hi)
    w = np.array([max(0.0, float(cfg.shape_mix.get(k, 0.0))) for k in KINDS])
    kind = rng.choice(len(KINDS), size=n, p=w / w.sum()).astype(np.int64)
    aspect = np.ones(n)
    aspect[kind == _ELLIPSE] = rng.uniform(1.2, 2.0, int(np.sum(kind == _ELLIPSE)))
    aspect[kind == _ROD] = rng.uniform(2.0, 4.0, int(np.sum(kind == _ROD)))
    nsides = rng.choice(np.array([3, 4, 4, 4, 5, 6, 6, 8]), size=n).astype(np.int64)
    nsides[kind == 4] = 3
    r = 0.5 * d
    rod = kind == _ROD
    # ordinary rods must stay shorter than the wire targets they confound
    length_per_r = aspect[rod] * np.sqrt(np.pi / (aspect[rod] - 1.0 + np.pi / 4.0))
    r[rod] = np.minimum(r[rod], _ROD_MAX_LENGTH_NM / length_per_r)
    return _Parts(kind, np.zeros(n), np.zeros(n), r, aspect, rng.uniform(0.0, np.pi, n),
                  nsides, rng.uniform(0.75, 1.25, n))


def _darts(rng: np.random.Generator, n: int, half: tuple[float, float], edge: float,
           spacing: float, avoid: np.ndarray, avoid_dist: float, what: str) -> np.ndarray:
    """Return ``n`` points (x, y) in the box shrunk by ``edge``, ``spacing`` apart, clear of
    ``avoid`` by ``avoid_dist`` (dart throwing; n is small). Raises ValueError if they do not fit.
    """
    pts = np.zeros((n, 2))
    hx, hy = half[0] - edge, half[1] - edge
    for i in range(n):
        for _ in range(_DART_TRIES):
            p = np.array([rng.uniform(-hx, hx), rng.uniform(-hy, hy)])
            if i and np.min(np.hypot(*(pts[:i] - p).T)) < spacing:
                continue
            if avoid.size and np.min(np.hypot(*(avoid - p).T)) < avoid_dist:
                continue
            pts[i] = p
            break
        else:
            also = f" and {avoid_dist:g} µm from {len(avoid)} targets" if avoid.size else ""
            raise ValueError(f"cannot place {n} {what} {spacing:g} µm apart{also} in "
                             f"{2 * half[0]:g} x {2 * half[1]:g} µm (placed {i})")
    return pts


def _cluster(cfg: VirtualSpecimenConfig, rng: np.random.Generator, cx: float,
             cy: float) -> _Parts:
    """Return 5-15 ordinary particles touching each other around (cx, cy) nm."""
    p = _ordinary(cfg, rng, int(rng.integers(5, 16)))
    g = _Geometry(p.kind, p.y, p.x, p.r, p.aspect, p.angle, p.nsides, p.mass)
    placed = np.zeros(len(p), bool)
    placed[0] = True
    for i in range(1, len(p)):
        done = np.nonzero(placed)[0]
        for _ in range(20):
            j = int(rng.choice(done))
            th = rng.uniform(0.0, 2.0 * np.pi)
            ux, uy = math.cos(th), math.sin(th)
            dist = (_support(g, j, ux, uy) + _support(g, i, -ux, -uy)) * rng.uniform(0.95, 1.03)
            x, y = g.cx[j] + dist * ux, g.cy[j] + dist * uy
            ok = np.hypot(g.cx[done] - x, g.cy[done] - y) >= 0.9 * (g.r[done] + g.r[i])
            ok[done == j] = True
            if ok.all():
                g.cx[i], g.cy[i] = x, y
                placed[i] = True
                break
    q = p.take(np.nonzero(placed)[0])
    # centre the cluster's area-weighted centroid on the drawn centre
    wgt = q.r**2
    q.x += cx - float(np.sum(q.x * wgt) / wgt.sum())
    q.y += cy - float(np.sum(q.y * wgt) / wgt.sum())
    return q


# --------------------------------------------------------------------------------------------
# the specimen


class VirtualSpecimen:
    """A large specimen drawn once from ``cfg`` (deterministic for ``cfg.seed``)."""

    def __init__(self, cfg: VirtualSpecimenConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        half = (500.0 * cfg.size_um[0], 500.0 * cfg.size_um[1])  # nm
        half_um = (0.5 * cfg.size_um[0], 0.5 * cfg.size_um[1])
        targets, tparts = self._draw_targets(rng, half_um)
        agg_c = _darts(rng, cfg.agglomerates, half_um, _AGG_EDGE_UM, _AGG_SPACING_UM,
                       np.column_stack([targets["x_um"], targets["y_um"]]),
                       cfg.target_spacing_um, "agglomerates")
        clusters = [_cluster(cfg, rng, 1000.0 * x, 1000.0 * y) for x, y in agg_c]
        aparts = _Parts.concat(clusters) if clusters else _Parts.empty()
        oparts = self._draw_ordinary(rng, half, tparts, aparts)
        self._p = _Parts.concat([tparts, aparts, oparts])
        self._circ = _circumradius(self._p.kind, self._p.r, self._p.aspect, self._p.nsides)
        self._targets = targets
        self._agg_centres = agg_c
        self.n_particles = len(self._p)

    # -- drawing ------------------------------------------------------------------------------

    def _draw_targets(self, rng: np.random.Generator, half_um: tuple[float, float]
                      ) -> tuple[np.ndarray, _Parts]:
        cfg = self.cfg
        nl, nw = int(cfg.large_targets), int(cfg.wire_targets)
        n = nl + nw
        pos = _darts(rng, n, half_um, _EDGE_UM, cfg.target_spacing_um, np.zeros((0, 2)), 0.0,
                     "targets")
        is_wire = np.zeros(n, bool)
        is_wire[rng.permutation(n)[:nw]] = True  # mix the kinds over the positions
        kind = np.where(is_wire, _ROD, np.where(rng.random(n) < 0.5, _SPHERE, _FACETED))
        nsides = rng.choice(np.array([4, 5, 6, 6, 8]), size=n).astype(np.int64)  # compact: no triangles
        r, aspect = np.zeros(n), np.ones(n)
        ecd = rng.uniform(*cfg.large_ecd_nm, size=n)
        length = rng.uniform(*cfg.wire_length_nm, size=n)
        width = rng.uniform(*cfg.wire_width_nm, size=n)
        r[~is_wire] = 0.5 * ecd[~is_wire]
        aspect[is_wire] = length[is_wire] / width[is_wire]
        # capsule of width w and length L: area = w^2 (L/w - 1 + pi/4)
        r[is_wire] = width[is_wire] * np.sqrt(
            (aspect[is_wire] - 1.0 + np.pi / 4.0) / np.pi)
        parts = _Parts(kind.astype(np.int64), 1000.0 * pos[:, 0], 1000.0 * pos[:, 1], r, aspect,
                       rng.uniform(0.0, np.pi, n), nsides, rng.uniform(0.9, 1.25, n))
        out = np.zeros(n, TARGET_DTYPE)
        for i in range(n):
            fmax, fmin = _feret(int(kind[i]), r[i], aspect[i], int(nsides[i]))
            out[i] = (i + 1, "wire" if is_wire[i] else "large", pos[i, 0], pos[i, 1],
                      2.0 * r[i], fmax, fmin)
        return out, parts

    def _draw_ordinary(self, rng: np.random.Generator, half: tuple[float, float],
                       tparts: _Parts, aparts: _Parts) -> _Parts:
        """Isolated ordinary particles up to ``coverage``, clear of everything else.

        Positions are uniform; a particle whose circumcircle overlaps another's (or comes within
        a target's clearance) is redrawn, for up to ``_PLACE_ROUNDS`` rounds (pairs found with a
        k-d tree, no O(n^2) loop); the few still in conflict then are dropped (only at high
        coverage).
        """
        cfg = self.cfg
        area = cfg.coverage * 4.0 * half[0] * half[1]
        mean_a = math.pi / 4.0 * cfg.median_diameter_nm**2 * math.exp(2.0 * cfg.sigma_log**2)
        chunks: list[_Parts] = []
        got = 0.0
        while got < area:
            p = _ordinary(cfg, rng, int(1.05 * (area - got) / mean_a) + 64)
            cum = got + np.cumsum(np.pi * p.r**2)
            k = int(np.searchsorted(cum, area)) + 1
            chunks.append(p.take(np.arange(min(k, len(p)))))
            got = float(cum[min(k, len(p)) - 1])
        p = _Parts.concat(chunks) if chunks else _Parts.empty()
        n = len(p)
        circ = _circumradius(p.kind, p.r, p.aspect, p.nsides)

        def draw(idx: np.ndarray) -> None:
            p.x[idx] = rng.uniform(-half[0] + circ[idx], half[0] - circ[idx])
            p.y[idx] = rng.uniform(-half[1] + circ[idx], half[1] - circ[idx])

        draw(np.arange(n))
        acirc = _circumradius(aparts.kind, aparts.r, aparts.aspect, aparts.nsides)
        tcirc = _circumradius(tparts.kind, tparts.r, tparts.aspect, tparts.nsides)
        fixed_xy = np.column_stack([aparts.x, aparts.y])
        reach = 2.0 * max(float(circ.max(initial=0.0)), float(acirc.max(initial=0.0)))
        bad = np.zeros(n, bool)
        for _ in range(_PLACE_ROUNDS):
            xy = np.concatenate([np.column_stack([p.x, p.y]), fixed_xy])
            cc = np.concatenate([circ, acirc])
            tree = cKDTree(xy)
            pairs = tree.query_pairs(reach, output_type="ndarray")
            bad[:] = False
            if pairs.size:
                i, j = pairs[:, 0], pairs[:, 1]
                d = np.hypot(*(xy[i] - xy[j]).T)
                hit = (d < cc[i] + cc[j]) & (np.minimum(i, j) < n)
                # the later ordinary particle moves; agglomerate members (index >= n) stay
                bad[np.maximum(i, j)[hit & (np.maximum(i, j) < n)]] = True
                bad[np.minimum(i, j)[hit & (np.maximum(i, j) >= n)]] = True
            for k in range(len(tparts)):
                need = 2.0 * tcirc[k] + _TARGET_CLEAR_NM
                near = np.asarray(tree.query_ball_point(
                    (tparts.x[k], tparts.y[k]), need + reach / 2.0), dtype=np.int64)
                near = near[near < n]
                d = np.hypot(p.x[near] - tparts.x[k], p.y[near] - tparts.y[k])
                bad[near[d < need + circ[near]]] = True
            if not bad.any():
                break
            draw(np.nonzero(bad)[0])
        return p.take(np.nonzero(~bad)[0])

    # -- public -------------------------------------------------------------------------------

    @property
    def targets(self) -> np.ndarray:
        """Return the targets (TARGET_DTYPE; positions µm, sizes nm; ids are particle ids)."""
        return self._targets.copy()

    @property
    def agglomerate_centres(self) -> np.ndarray:
        """Return the agglomerates' area-weighted centres, (n, 2) stage µm (x, y)."""
        return self._agg_centres.copy()

    @staticmethod
    def pixel_to_stage(center_um: tuple[float, float], pixel_size_nm: float,
                       shape: tuple[int, int], row: _C, col: _C) -> tuple[_C, _C]:
        """Return the stage position (x, y) in µm of the centre of pixel (row, col).

        ``row``/``col`` may be floats or arrays (then the result is arrays).
        """
        h, w = shape
        return (center_um[0] + (col - (w - 1) / 2.0) * pixel_size_nm / 1000.0,
                center_um[1] + (row - (h - 1) / 2.0) * pixel_size_nm / 1000.0)

    @staticmethod
    def stage_to_pixel(center_um: tuple[float, float], pixel_size_nm: float,
                       shape: tuple[int, int], x_um: _C, y_um: _C) -> tuple[_C, _C]:
        """Return the (row, col) in px of stage position (x, y) µm (inverse of pixel_to_stage)."""
        h, w = shape
        return ((y_um - center_um[1]) * 1000.0 / pixel_size_nm + (h - 1) / 2.0,
                (x_um - center_um[0]) * 1000.0 / pixel_size_nm + (w - 1) / 2.0)

    def render(self, center_um: tuple[float, float], pixel_size_nm: float,
               shape: tuple[int, int] = (512, 512), *,
               dose_e_per_px: float | None = 200.0,
               dtype: Literal["uint8", "uint16", "float32"] = "uint16",
               rng: np.random.Generator | int | None = None) -> SyntheticFrame:
        """Return the frame of ``shape`` (rows, cols) px centred on stage ``center_um`` (x, y).

        ``labels``/``truth`` hold global particle ids; truth positions are frame px, sizes nm.
        ``rng`` (None means seed 0) draws the support texture, illumination and noise, so the
        same arguments give identical pixels.
        """
        cfg = self.cfg
        p = float(pixel_size_nm)
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"pixel_size_nm {pixel_size_nm!r} must be finite and > 0")
        if len(shape) != 2 or min(int(s) for s in shape) < 8:
            raise ValueError(f"shape {shape!r} must be (rows, cols) with both >= 8 px")
        if len(center_um) != 2 or not all(math.isfinite(float(c)) for c in center_um):
            raise ValueError(f"center_um {center_um!r} must be a finite (x, y) in µm")
        h, w = int(shape[0]), int(shape[1])
        cx_nm, cy_nm = 1000.0 * float(center_um[0]), 1000.0 * float(center_um[1])
        pr = self._p
        # particle centres in frame px (col, row) and extent
        col = (pr.x - cx_nm) / p + (w - 1) / 2.0
        row = (pr.y - cy_nm) / p + (h - 1) / 2.0
        ext = self._circ / p + 2.5  # rasteriser box: support + 1.5 px, rounded outwards
        pad = 1.0 + 4.0 * cfg.blur_px  # the blur reaches into the frame from this far
        sel = np.nonzero((col + ext > -pad) & (col - ext < w - 1 + pad)
                         & (row + ext > -pad) & (row - ext < h - 1 + pad))[0]
        # margin: no selected particle's box may reach past the canvas (the canvas is periodic:
        # it would wrap into the frame)
        over = 0.0
        if sel.size:
            over = float(max(np.max(-(col[sel] - ext[sel])), np.max(col[sel] + ext[sel] - w + 1),
                             np.max(-(row[sel] - ext[sel])), np.max(row[sel] + ext[sel] - h + 1)))
        m = max(int(math.ceil(over)) + 4, 16)
        g = _Geometry(kind=pr.kind[sel], cy=row[sel] + m, cx=col[sel] + m, r=pr.r[sel] / p,
                      aspect=pr.aspect[sel], angle=pr.angle[sel], nsides=pr.nsides[sel],
                      mass=pr.mass[sel])
        scfg = SpecimenConfig(modality=cfg.modality, shape=(h, w), pixel_size_nm=p,
                              dose_e_per_px=dose_e_per_px, blur_px=cfg.blur_px,
                              illumination_gradient=cfg.illumination_gradient,
                              support_texture=cfg.support_texture, contrast=cfg.contrast,
                              fringe=cfg.fringe, dtype=dtype)
        r = _rng(0 if rng is None else rng)
        spec = Specimen(scfg, g, r, (h + 2 * m, w + 2 * m))
        frame = spec.acquire(r, shift_px=(-float(m), -float(m)))
        lut = np.concatenate([[0], sel + 1]).astype(np.int32)
        frame.labels = lut[frame.labels]
        frame.truth["id"] = lut[frame.truth["id"]]
        return replace(frame, shift_px=(0.0, 0.0))
