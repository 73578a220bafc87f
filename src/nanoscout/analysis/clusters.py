"""Morphology clusters: online k-means over per-particle shape descriptors, one model per source.

Each particle is described by five scale-free or log-scaled numbers (:data:`DESCRIPTORS`):
``log_ecd`` (natural log of the ECD in the table's units), ``log_aspect_ratio`` (a ratio: its
log is symmetric, and a rod population spread over aspect ratios 2-5 no longer reaches into
the spheres' cluster), ``roundness``, ``solidity`` and ``circularity``. Distances are taken in
*standardised* units: every descriptor is divided by its running standard deviation (Welford, over
all particles fed so far), while the centres are kept in descriptor units, so they stay meaningful
as the scale estimate settles.

Life of a source's model (:class:`OnlineKMeans`):

1. **Buffering**: the first ``init_n`` particles (not touching the frame edge, finite
   descriptors) are kept; until then every particle gets :data:`UNASSIGNED` (255).
2. **Initialisation**: k-means++ seeding on the buffer (deterministic generator), then Lloyd
   iterations. Cluster ids 0..k-1 are given in order of increasing centre log ECD.
3. **Tracking** (MacQueen with a forgetting factor): each frame's particles are assigned to
   the nearest centre, then each centre moves towards the mean of its new particles by
   ``alpha = max(m / (n + m), 1 - (1 - forget)^m)`` (m new, n earlier particles): a running
   mean while n < 1/forget, afterwards an exponential memory of about 1/forget particles per
   cluster, so the clusters follow an in-situ change. ``forget = 0`` gives plain MacQueen.
   Ids never change when centres move: no relabelling churn.
4. **A new population**: a particle farther from its nearest centre than
   ``OUTLIER_FACTOR`` times that cluster's mean squared distance (and at least
   ``OUTLIER_MIN_D2``) does not move the centre; it is remembered. When the last
   ``reseed_n = max(10, init_n // (4·k))`` such outliers form a compact group farther from every
   centre than the two closest centres are from each other, one id is recycled for the group:
   a cluster whose share fell below ``DEAD_SHARE``, else the lighter of the two closest centres,
   which is merged into the other. This is the only time an id changes meaning.

Particles touching the frame edge are assigned but never update the model (their shape is cut).

:meth:`OnlineKMeans.summary` gives the per-cluster summary published in the ``stats`` message
(``StatsHeader.clusters``, protocol v1.2)::

    {"k": 3, "ready": True, "n_seen": 1234, "units": "nm", "descriptors": [...],
     "items": [{"id": 0, "count": 812, "share": 0.61, "ecd_mean": 7.9,
                "aspect_ratio_mean": 1.12, "roundness_mean": 0.9, "dominant_shape": "sphere",
                "centre": {"log_ecd": 2.06, "log_aspect_ratio": 0.11, ...}}, ...]}

``count``: particles assigned to the cluster (not touching the edge) since the start; ``share``,
``ecd_mean`` (table units), ``aspect_ratio_mean``, ``roundness_mean`` and ``dominant_shape``
(most frequent shape class) use the same forgetting as the centres, so they describe the
recent population.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanoscout.wire.errors import FrameError
from nanoscout.wire.particles import SHAPE_CLASSES

__all__ = ["DESCRIPTORS", "UNASSIGNED", "ClusterConfig", "OnlineKMeans", "descriptors"]

log = logging.getLogger(__name__)

#: per-particle descriptor columns, in this order
DESCRIPTORS: tuple[str, ...] = (
    "log_ecd", "log_aspect_ratio", "roundness", "solidity", "circularity"
)
#: cluster id of a particle not (yet) assigned
UNASSIGNED = 255
#: an outlier is farther than this many times its nearest cluster's mean squared distance
OUTLIER_FACTOR = 8.0
#: ... and farther than this (squared standardised units)
OUTLIER_MIN_D2 = 1.0
#: a cluster with a smaller share is free to take a new population
DEAD_SHARE = 0.02
_LLOYD_ITERATIONS = 25
_MIN_SD = 1e-3


class ClusterConfig(BaseModel):
    """Typed ``[clusters]`` configuration (frozen)."""

    # inf, nan: valid TOML; strict: a TOML value of another type is named, not converted
    # ("50" for an int, "no" or 0 for a bool: nanoscout.daemon.config.SECTION_CONFIG)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)

    enabled: bool = True
    #: number of clusters (1..254)
    k: int = Field(3, ge=1, le=254)
    #: particles buffered before k-means++ initialisation (at most 100,000, and k x init_n at
    #: most 1,000,000: the initialisation holds init_n x k x 5 float64 temporaries, 40 MB)
    init_n: int = Field(200, ge=1, le=100_000)
    #: forgetting factor per particle (0 = plain running means; 0.01 ≈ memory of 100 particles)
    forget: float = Field(0.01, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _enough(self) -> ClusterConfig:
        if self.init_n < self.k:
            raise ValueError(f"init_n ({self.init_n}) must be at least k ({self.k})")
        if self.init_n * self.k > 1_000_000:
            raise ValueError(f"k x init_n ({self.k} x {self.init_n}) must be at most 1,000,000 "
                             "(the initialisation's temporaries grow with it)")
        return self


def descriptors(table: np.ndarray) -> np.ndarray:
    """Return the (n, 5) float64 descriptor matrix of a particle table (see DESCRIPTORS)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ecd = np.log(table["ecd_nm"].astype(np.float64))
        log_ar = np.log(table["aspect_ratio"].astype(np.float64))
    return np.stack(
        [log_ecd, log_ar] + [table[f].astype(np.float64) for f in DESCRIPTORS[2:]], axis=1
    )


class OnlineKMeans:
    """Online k-means of one source's particles; see the module docstring."""

    def __init__(self, config: ClusterConfig | None = None, seed: int = 0) -> None:
        self.config = config or ClusterConfig()
        self._seed = seed
        self.reseed_n = max(10, self.config.init_n // (4 * self.config.k))
        self.reset()

    def reset(self) -> None:
        """Forget everything: buffer, scale estimate and clusters."""
        k = self.config.k
        self.units: str | None = None
        self.n_seen = 0
        self._rng = np.random.default_rng(self._seed)
        self._buf: list[np.ndarray] = []  # rows: descriptors, ecd, aspect ratio, shape class
        self._n_buf = 0
        # running mean / sum of squared deviations of the descriptors (Welford / Chan)
        self._mean = np.zeros(len(DESCRIPTORS))
        self._m2 = np.zeros(len(DESCRIPTORS))
        self.centres: np.ndarray | None = None  # (k, 5) descriptor units
        self._n = np.zeros(k)  # particles absorbed per cluster (for the 1/n rate)
        self._weight = np.zeros(k)  # forgetting-weighted counts (shares)
        self._msd = np.ones(k)  # mean squared standardised distance to the centre
        self._ecd = np.zeros(k)
        self._ar = np.zeros(k)
        self._shape = np.zeros((k, len(SHAPE_CLASSES)))
        self.count = np.zeros(k, dtype=np.int64)
        self._outliers: deque[np.ndarray] = deque(maxlen=self.reseed_n)

    @property
    def ready(self) -> bool:
        """True once the clusters are initialised (ids are assigned from then on)."""
        return self.centres is not None

    def update(self, table: np.ndarray, units: str = "nm") -> np.ndarray:
        """Assign every particle of one frame and update the model; returns uint8 cluster ids.

        ``units``: the table's length units ("nm" or "px"); a change restarts the model (log
        ECDs in nm and px do not mix). Ids are :data:`UNASSIGNED` until initialisation.
        """
        if units != self.units:
            if self.units is not None:
                log.warning("clusters restart: frames switched from %s to %s", self.units, units)
                self.reset()
            self.units = units
        n = len(table)
        ids = np.full(n, UNASSIGNED, dtype=np.uint8)
        if n == 0:
            return ids
        names = table.dtype.names or ()
        missing = [f for f in ("ecd_nm", "aspect_ratio", *DESCRIPTORS[2:], "border",
                               "shape_class") if f not in names]
        if missing:
            raise FrameError(f"particle table lacks fields {missing}; got dtype {table.dtype}")
        x = descriptors(table)
        finite = np.isfinite(x).all(axis=1)
        learn = finite & ~table["border"].astype(bool)
        rows = np.concatenate(
            [x, table["ecd_nm"].astype(np.float64)[:, None],
             table["aspect_ratio"].astype(np.float64)[:, None],
             table["shape_class"].astype(np.float64)[:, None]], axis=1)
        if learn.any():
            self._scale_update(x[learn])
            self.n_seen += int(learn.sum())
        if self.centres is None:
            if learn.any():
                self._buf.append(rows[learn])
                self._n_buf += int(learn.sum())
            if self._n_buf < self.config.init_n:
                return ids
            self._initialise(np.concatenate(self._buf))
            self._buf = []
            # the particles of the frame that completed the buffer are assigned, not re-learnt
            near, _ = self._nearest(x[finite])
            ids[finite] = near
            return ids
        near, d2 = self._nearest(x[finite])
        ids[finite] = near
        self._learn(rows[learn], near[learn[finite]], d2[learn[finite]])
        return ids

    # ------------------------------------------------------------------ internals

    def _sd(self) -> np.ndarray:
        if self.n_seen < 2:
            return np.ones(len(DESCRIPTORS))
        return np.maximum(np.sqrt(self._m2 / (self.n_seen - 1)), _MIN_SD)

    def _scale_update(self, x: np.ndarray) -> None:
        k = x.shape[0]
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n_seen + k
        delta = mean_b - self._mean
        self._mean += delta * k / n
        self._m2 += m2_b + delta * delta * self.n_seen * k / n

    def _d2(self, x: np.ndarray, centres: np.ndarray) -> np.ndarray:
        z = (x[:, None, :] - centres[None, :, :]) / self._sd()
        return (z * z).sum(axis=2)

    def _nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.centres is not None
        d2 = self._d2(x, self.centres)
        near = d2.argmin(axis=1)
        return near.astype(np.uint8), d2[np.arange(len(x)), near]

    def _initialise(self, rows: np.ndarray) -> None:
        """k-means++ seeding and Lloyd iterations on the buffer; ids by increasing log ECD."""
        k = self.config.k
        x = rows[:, : len(DESCRIPTORS)]
        m = len(x)
        centres = np.empty((k, x.shape[1]))
        centres[0] = x[self._rng.integers(m)]
        closest = self._d2(x, centres[:1])[:, 0]
        for j in range(1, k):
            total = closest.sum()
            pick = (self._rng.choice(m, p=closest / total) if total > 0
                    else int(self._rng.integers(m)))
            centres[j] = x[pick]
            closest = np.minimum(closest, self._d2(x, centres[j: j + 1])[:, 0])
        for _ in range(_LLOYD_ITERATIONS):
            near = self._d2(x, centres).argmin(axis=1)
            moved = centres.copy()
            for j in range(k):
                if np.any(near == j):
                    moved[j] = x[near == j].mean(axis=0)
            if np.allclose(moved, centres):
                break
            centres = moved
        order = np.argsort(centres[:, 0], kind="stable")
        self.centres = centres[order]
        near = self._d2(x, self.centres).argmin(axis=1)
        d2 = self._d2(x, self.centres)[np.arange(m), near]
        for j in range(k):
            sel = near == j
            cnt = int(sel.sum())
            self._n[j] = self._weight[j] = self.count[j] = cnt
            if cnt:
                self._msd[j] = max(float(d2[sel].mean()), 1e-6)
                self._ecd[j] = float(rows[sel, len(DESCRIPTORS)].mean())
                self._ar[j] = float(rows[sel, len(DESCRIPTORS) + 1].mean())
                self._shape[j] = np.bincount(rows[sel, -1].astype(np.int64),
                                             minlength=len(SHAPE_CLASSES))[: len(SHAPE_CLASSES)]
                self._shape[j] /= cnt

    def _learn(self, rows: np.ndarray, near: np.ndarray, d2: np.ndarray) -> None:
        assert self.centres is not None
        total = len(rows)
        if total == 0:
            return
        f = self.config.forget
        self._weight *= (1.0 - f) ** total
        nd = len(DESCRIPTORS)
        outlier = (d2 > OUTLIER_FACTOR * self._msd[near]) & (d2 > OUTLIER_MIN_D2)
        for r in rows[outlier]:
            self._outliers.append(r)
        keep = ~outlier
        rows, near, d2 = rows[keep], near[keep], d2[keep]
        for j in np.unique(near).tolist():
            sel = near == j
            m = int(sel.sum())
            alpha = max(m / (self._n[j] + m), 1.0 - (1.0 - f) ** m)
            r = rows[sel]
            self.centres[j] += alpha * (r[:, :nd].mean(axis=0) - self.centres[j])
            self._msd[j] += alpha * (max(float(d2[sel].mean()), 1e-6) - self._msd[j])
            self._ecd[j] += alpha * (float(r[:, nd].mean()) - self._ecd[j])
            self._ar[j] += alpha * (float(r[:, nd + 1].mean()) - self._ar[j])
            hist = np.bincount(r[:, -1].astype(np.int64),
                               minlength=len(SHAPE_CLASSES))[: len(SHAPE_CLASSES)] / m
            self._shape[j] += alpha * (hist - self._shape[j])
            self._n[j] += m
            self._weight[j] += m
            self.count[j] += m
        if len(self._outliers) == self.reseed_n:
            self._maybe_reseed()

    def _maybe_reseed(self) -> None:
        """Give a compact group of recent outliers its own cluster id (see the docstring)."""
        assert self.centres is not None
        k = self.config.k
        if k < 2:
            return
        group = np.array(self._outliers)
        nd = len(DESCRIPTORS)
        x = group[:, :nd]
        centre = x.mean(axis=0)
        spread = float(self._d2(x, centre[None, :])[:, 0].mean())
        gap = float(self._d2(centre[None, :], self.centres)[0].min())
        if spread > gap / 4.0:
            return  # scattered outliers, not a population
        pair = self._d2(self.centres, self.centres)
        pair[np.diag_indices(k)] = np.inf
        a, b = (int(v) for v in np.unravel_index(int(np.argmin(pair)), pair.shape))
        if gap <= pair[a, b]:
            return  # the new group is no farther away than two existing clusters are apart
        share = self._weight / max(self._weight.sum(), 1e-12)
        dead = np.flatnonzero(share < DEAD_SHARE)
        if dead.size:
            j = int(dead[np.argmin(share[dead])])
        else:
            keep_id, j = (a, b) if self._weight[a] >= self._weight[b] else (b, a)
            wa, wb = self._weight[keep_id], self._weight[j]
            t = wb / max(wa + wb, 1e-12)
            self.centres[keep_id] += t * (self.centres[j] - self.centres[keep_id])
            self._ecd[keep_id] += t * (self._ecd[j] - self._ecd[keep_id])
            self._ar[keep_id] += t * (self._ar[j] - self._ar[keep_id])
            self._shape[keep_id] += t * (self._shape[j] - self._shape[keep_id])
            self._weight[keep_id] += wb
            self._n[keep_id] += self._n[j]
        m = len(group)
        self.centres[j] = centre
        self._msd[j] = max(spread, 1e-6)
        self._ecd[j] = float(group[:, nd].mean())
        self._ar[j] = float(group[:, nd + 1].mean())
        self._shape[j] = np.bincount(group[:, -1].astype(np.int64),
                                     minlength=len(SHAPE_CLASSES))[: len(SHAPE_CLASSES)] / m
        self._n[j] = self._weight[j] = m
        self.count[j] = m
        self._outliers.clear()
        log.info("clusters: id %d now holds a new population (%d outliers)", j, m)

    # ------------------------------------------------------------------ report

    def summary(self) -> dict[str, Any]:
        """Per-cluster summary for the ``stats`` message (plain msgpack-able dict, see above)."""
        out: dict[str, Any] = {
            "k": self.config.k,
            "ready": self.ready,
            "n_seen": self.n_seen,
            "units": self.units or "nm",
            "descriptors": list(DESCRIPTORS),
            "items": [],
        }
        if self.centres is None:
            out["buffered"] = self._n_buf
            return out
        total = self._weight.sum()
        for j in range(self.config.k):
            c = self.centres[j]
            out["items"].append({
                "id": j,
                "count": int(self.count[j]),
                "share": float(self._weight[j] / total) if total > 0 else 0.0,
                "ecd_mean": _f(self._ecd[j]),
                "aspect_ratio_mean": _f(self._ar[j]),
                "roundness_mean": _f(c[2]),
                "dominant_shape": SHAPE_CLASSES[int(np.argmax(self._shape[j]))],
                "centre": {name: _f(v) for name, v in zip(DESCRIPTORS, c, strict=True)},
            })
        return out


def _f(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
