"""In-situ (E-TEM) image series with exact truth for tracking: identities, drift, motion,
growth, Ostwald ripening, coalescence and appearance (numpy + scipy only).

:class:`InSituSeries` evolves one specimen (:mod:`nanoscout.sim.synthetic`) frame by frame and
re-images it; every frame is a :class:`~nanoscout.sim.synthetic.SyntheticFrame` whose
``labels`` and ``truth["id"]`` carry **persistent identities**: a particle keeps its id for as
long as it exists, so the stream scores a tracker (MOTA / IDF1). Per frame, radii in px:

* growth (``growth``): ``"ripening"``: particles larger than the mean grow and smaller ones
  shrink, ``dr = g (0.5 + 2 (1 - r_mean / r))`` (``g = growth_nm_per_frame``); ``"uniform"``:
  every particle grows by ``g`` (growth from the gas phase: dECD/dt = 2 g per frame, the same
  for all); ``"none"``. A particle smaller than ``min_diameter_nm`` dissolves (a ``vanish``
  event).
* motion: a Brownian step of ``diffusion_nm_per_frame`` (rms per axis, scaled by
  sqrt(r_mean / r)) and, for a ``directed_fraction`` of the particles, a steady velocity of
  ``directed_nm_per_frame`` in a direction drawn once per particle.
* coalescence (``coalesce``): two particles overlapping by more than 25 % of the smaller radius
  become one (volume conserved, at the volume-weighted centre, with a sintering neck that
  relaxes over later frames). The product keeps the id of the larger parent and the smaller
  one's ends (a ``merge`` event: parents larger, smaller; child the larger), as
  :mod:`nanoscout.analysis.tracking` reports it.
* appearance: ``appear_per_frame`` new particles per frame on average (Poisson; nucleation),
  of ``appear_diameter_nm`` (``appear`` events).
* drift: the field of view moves by ``cfg.drift_px_per_frame`` (rows, cols) per frame plus a
  random walk of ``drift_jitter_px`` rms per axis; the frame's ``shift_px`` is the content's
  total shift since frame 0 (exact, sub-pixel: the image is interpolated bilinearly, the
  labels follow the nearest whole pixel). With ``n_frames`` the specimen is drawn wide enough
  that the field never drifts round the periodic canvas (a particle that left the field never
  comes back in at the other side); an endless series wraps after a canvas width.

The support film is fixed on the specimen (it drifts with it, as a real carbon film does), and
only the shot noise is new in every frame. ``frame_interval_s`` sets the frames' times
(``SyntheticFrame.t_s``); each frame lists the events that happened just before it
(``SyntheticFrame.events``, :class:`InSituEvent`). Iterating yields frames forever unless
``n_frames`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from nanoscout.sim.synthetic import (
    Specimen,
    SpecimenConfig,
    SyntheticFrame,
    _Geometry,
    _rng,
)

__all__ = ["InSituEvent", "InSituSeries"]


@dataclass(frozen=True)
class InSituEvent:
    """Something that happened to the particles between the previous frame and ``frame``:
    ``merge`` (parents → one child), ``vanish`` (dissolved: a parent, no child), ``appear``
    (nucleated: no parent, a child). ``x``/``y``: the child's (else the parent's) position in
    ``frame``, px, frame coordinates (may lie outside the field of view)."""

    frame: int
    kind: Literal["merge", "vanish", "appear"]
    parents: tuple[int, ...]
    children: tuple[int, ...]
    x: float
    y: float


class InSituSeries:
    """An E-TEM in-situ series with exact truth (see the module docstring)."""

    def __init__(self, cfg: SpecimenConfig, seed: int | np.random.Generator,
                 growth_nm_per_frame: float = 0.02, coalesce: bool = True,
                 diffusion_nm_per_frame: float = 0.1, n_frames: int | None = None, *,
                 growth: Literal["ripening", "uniform", "none"] = "ripening",
                 directed_fraction: float = 0.0, directed_nm_per_frame: float = 0.0,
                 appear_per_frame: float = 0.0, appear_diameter_nm: float | None = None,
                 drift_jitter_px: float = 0.0, frame_interval_s: float = 1.0) -> None:
        if growth not in ("ripening", "uniform", "none"):
            raise ValueError(f"growth {growth!r} must be ripening, uniform or none")
        if not 0 <= directed_fraction <= 1:
            raise ValueError(f"directed_fraction {directed_fraction!r} not in [0, 1]")
        if appear_per_frame < 0 or drift_jitter_px < 0 or diffusion_nm_per_frame < 0:
            raise ValueError(f"appear_per_frame {appear_per_frame!r}, drift_jitter_px "
                             f"{drift_jitter_px!r} and diffusion_nm_per_frame "
                             f"{diffusion_nm_per_frame!r} must be >= 0")
        if not frame_interval_s > 0:
            raise ValueError(f"frame_interval_s {frame_interval_s!r} must be > 0")
        self.cfg = cfg
        self.rng = _rng(seed)
        px = cfg.pixel_size_nm
        self.growth = growth
        self.growth_px = growth_nm_per_frame / px
        self.diffusion_px = diffusion_nm_per_frame / px
        self.coalesce = coalesce
        self.n_frames = n_frames
        self.directed_px = directed_nm_per_frame / px
        self.directed_fraction = directed_fraction
        self.appear_per_frame = appear_per_frame
        self.appear_r_px = 0.5 * (appear_diameter_nm if appear_diameter_nm is not None
                                  else max(2.0 * cfg.min_diameter_nm,
                                           0.5 * cfg.median_diameter_nm)) / px
        self.drift_jitter_px = drift_jitter_px
        self.frame_interval_s = frame_interval_s
        # the specimen is wide enough that the drifting field never comes round the periodic
        # canvas within n_frames (a particle that left must not come back in at the far side)
        travel = (0, 0) if n_frames is None else tuple(
            math.ceil(abs(v) * n_frames + 4.0 * drift_jitter_px * math.sqrt(n_frames))
            for v in cfg.drift_px_per_frame)
        wide = replace(cfg, shape=(cfg.shape[0] + travel[0], cfg.shape[1] + travel[1]))
        self.geometry, self.canvas = Specimen._draw(wide, self.rng)
        n = len(self.geometry)
        self.ids = np.arange(1, n + 1, dtype=np.int64)
        self._next_id = n + 1
        self._velocity = self._draw_velocity(n)
        # the support (texture, grains, illumination) is drawn once: it drifts with the specimen
        self._support_seed = int(self.rng.integers(2**63 - 1))
        self._drift = np.zeros(2)
        self._events: list[InSituEvent] = []
        self.frame_index = 0

    def _draw_velocity(self, n: int) -> np.ndarray:
        """Per-particle steady velocity (rows, cols) px per frame."""
        v = np.zeros((n, 2))
        if self.directed_px > 0 and n:
            moving = self.rng.random(n) < self.directed_fraction
            th = self.rng.uniform(0.0, 2.0 * np.pi, n)
            v[moving, 0] = self.directed_px * np.sin(th[moving])
            v[moving, 1] = self.directed_px * np.cos(th[moving])
        return v

    @property
    def drift_px(self) -> tuple[float, float]:
        """The content's total shift since frame 0, (rows, cols) px."""
        return float(self._drift[0]), float(self._drift[1])

    # ------------------------------------------------------------------ dynamics

    def _keep(self, idx: np.ndarray) -> None:
        self.geometry = self.geometry.take(idx)
        self.ids = self.ids[idx]
        self._velocity = self._velocity[idx]

    def step(self) -> None:
        """Advance the particle population (and the drift) by one frame."""
        frame = self.frame_index  # the frame about to be acquired
        rng, cfg = self.rng, self.cfg
        py, pxw = self.canvas
        jitter = self.drift_jitter_px * rng.standard_normal(2) if self.drift_jitter_px else 0.0
        self._drift = self._drift + np.asarray(cfg.drift_px_per_frame, float) + jitter
        g = self.geometry
        if len(g):
            rmean = float(np.mean(g.r))
            if self.growth == "ripening":
                g.r = g.r + self.growth_px * (0.5 + 2.0 * (1.0 - rmean / g.r))
            elif self.growth == "uniform":
                g.r = g.r + self.growth_px
            rmin = max(0.5 * cfg.min_diameter_nm / cfg.pixel_size_nm, 0.5)
            gone = g.r < rmin
            for i in np.nonzero(gone)[0].tolist():
                self._event(frame, "vanish", (int(self.ids[i]),), (), g.cy[i], g.cx[i])
            self._keep(np.nonzero(~gone)[0])
            g = self.geometry
            if len(g):
                step = self.diffusion_px * np.sqrt(rmean / g.r)
                g.cy = (g.cy + step * rng.standard_normal(len(g)) + self._velocity[:, 0]) % py
                g.cx = (g.cx + step * rng.standard_normal(len(g)) + self._velocity[:, 1]) % pxw
                g.aspect = np.where(g.kind == 1, 1.0 + (g.aspect - 1.0) * 0.97, g.aspect)
                if self.coalesce:
                    self._coalesce(frame)
        self._appear(frame)
        g = self.geometry
        # keep particles smaller than the canvas margin
        g.r = np.minimum(g.r, 0.2 * (min(self.canvas) - max(cfg.shape)))

    def _event(self, frame: int, kind: Literal["merge", "vanish", "appear"],
               parents: tuple[int, ...], children: tuple[int, ...], cy: float, cx: float
               ) -> None:
        # canvas position -> position in the frame about to be acquired (its window starts
        # at -drift on the periodic canvas)
        py, pxw = self.canvas
        y = (cy + self._drift[0]) % py
        x = (cx + self._drift[1]) % pxw
        self._events.append(InSituEvent(frame, kind, parents, children, float(x), float(y)))

    def _coalesce(self, frame: int) -> None:
        g = self.geometry
        py, pxw = self.canvas
        alive = np.ones(len(g), bool)
        dy = (g.cy[:, None] - g.cy[None, :] + py / 2) % py - py / 2
        dx = (g.cx[:, None] - g.cx[None, :] + pxw / 2) % pxw - pxw / 2
        d = np.hypot(dy, dx)
        overlap = g.r[:, None] + g.r[None, :] - d
        thr = 0.25 * np.minimum(g.r[:, None], g.r[None, :])
        ii, jj = np.nonzero(np.triu(overlap > thr, 1))
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            if not (alive[i] and alive[j]):
                continue
            vi, vj = g.r[i] ** 3, g.r[j] ** 3
            t = vj / (vi + vj)
            g.cy[i] = (g.cy[i] - t * dy[i, j]) % py
            g.cx[i] = (g.cx[i] - t * dx[i, j]) % pxw
            g.r[i] = (vi + vj) ** (1.0 / 3.0)
            if g.kind[i] in (0, 1):  # sintering neck: an ellipse along the joining line
                g.kind[i] = 1
                g.aspect[i] = 1.0 + 0.5 * min(g.r[j], g.r[i]) / g.r[i]
                g.angle[i] = math.atan2(dy[i, j], dx[i, j])
            # the product is the larger parent grown: its id and its motion
            big, small = (i, j) if vi >= vj else (j, i)
            self._velocity[i] = self._velocity[big]
            keep = int(self.ids[big])
            self._event(frame, "merge", (keep, int(self.ids[small])), (keep,), g.cy[i], g.cx[i])
            self.ids[i] = keep
            alive[j] = False
        self._keep(np.nonzero(alive)[0])

    def _appear(self, frame: int) -> None:
        k = int(self.rng.poisson(self.appear_per_frame)) if self.appear_per_frame else 0
        if k == 0:
            return
        g = self.geometry
        py, pxw = self.canvas
        born: list[tuple[float, float]] = []
        for _ in range(k):
            for _try in range(20):  # a free spot: clear of every particle by a radius
                cy, cx = self.rng.uniform(0, py), self.rng.uniform(0, pxw)
                dy = (g.cy - cy + py / 2) % py - py / 2
                dx = (g.cx - cx + pxw / 2) % pxw - pxw / 2
                if np.all(np.hypot(dy, dx) > g.r + 2.0 * self.appear_r_px + 2.0):
                    born.append((cy, cx))
                    break
        if not born:
            return
        m = len(born)
        new = _Geometry(kind=np.zeros(m, np.int64), cy=np.array([b[0] for b in born]),
                        cx=np.array([b[1] for b in born]), r=np.full(m, self.appear_r_px),
                        aspect=np.ones(m), angle=np.zeros(m), nsides=np.full(m, 6, np.int64),
                        mass=self.rng.uniform(0.75, 1.25, m))
        ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
        self._next_id += m
        for (cy, cx), pid in zip(born, ids.tolist(), strict=True):
            self._event(frame, "appear", (), (pid,), cy, cx)
        self.geometry = _Geometry(*(np.concatenate([getattr(g, f), getattr(new, f)])
                                    for f in ("kind", "cy", "cx", "r", "aspect", "angle",
                                              "nsides", "mass")))
        self.ids = np.concatenate([self.ids, ids])
        self._velocity = np.concatenate([self._velocity, np.zeros((m, 2))])

    # ------------------------------------------------------------------ imaging

    def acquire(self) -> SyntheticFrame:
        """Image the particles as they are now (no dynamics step), with persistent ids."""
        spec = Specimen(self.cfg, self.geometry, np.random.default_rng(self._support_seed),
                        self.canvas)
        frame = spec.acquire(self.rng, (float(self._drift[0]), float(self._drift[1])))
        lut = np.concatenate([[0], self.ids]).astype(np.int32)
        truth = frame.truth.copy()
        truth["id"] = lut[truth["id"]]
        events = tuple(e for e in self._events if e.frame == self.frame_index)
        self._events = [e for e in self._events if e.frame > self.frame_index]
        return replace(frame, labels=lut[frame.labels], truth=truth, index=self.frame_index,
                       t_s=self.frame_index * self.frame_interval_s, events=events)

    def __iter__(self) -> Iterator[SyntheticFrame]:
        while self.n_frames is None or self.frame_index < self.n_frames:
            if self.frame_index > 0:
                self.step()
            frame = self.acquire()
            self.frame_index += 1
            yield frame
