"""Post-processing: turn the network's foreground and core logits into particle instances.

The network predicts, per pixel, *foreground* (inside any particle) and *core* (deep inside a
particle: at least half its inner radius away from its outline, so touching particles have
disjoint cores). :func:`instances_from_logits`:

1. works out *which particle* at ``post_stride`` (default every 2nd pixel, 4x fewer pixels):
   cores are labelled; a foreground component with one core is one particle; a component with
   several cores is split by a weighted Voronoi partition (distance to each core divided by the
   core's radius, exact for touching discs of different size); a component with no core (a
   particle too small for a core) is one particle;
2. decides *where the outline is* at full resolution: the full-resolution foreground mask keeps
   the identity of the (one-pixel dilated) coarse instance map, so sizes are not quantised by
   the stride.

Instances smaller than ``min_area_px`` are dropped; labels are 1..n; ``scores[k]`` is the mean
foreground probability of particle k (halved when it had no core).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = ["instances_from_logits", "logit"]

_FOUR = ndi.generate_binary_structure(2, 1)


def logit(p: float) -> float:
    """Return log(p / (1 - p)): a probability threshold as a logit threshold."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability threshold {p!r} must be in (0, 1)")
    return math.log(p / (1.0 - p))


def _split(comp_mask: np.ndarray, cores: np.ndarray, ids: np.ndarray,
           radii: np.ndarray) -> np.ndarray:
    """Partition ``comp_mask`` between the cores ``ids`` (labels in ``cores``); returns ids map."""
    best = np.full(comp_mask.shape, np.inf, np.float32)
    out = np.zeros(comp_mask.shape, np.int32)
    for cid, rad in zip(ids.tolist(), radii.tolist(), strict=True):
        d = ndi.distance_transform_edt(cores != cid).astype(np.float32)
        d *= np.float32(1.0 / rad)
        closer = d < best
        best[closer] = d[closer]
        out[closer] = cid
    out[~comp_mask] = 0
    return out


def instances_from_logits(fg_logits: np.ndarray, core_logits: np.ndarray, *,
                          foreground: float = 0.5, core: float = 0.5, min_area_px: int = 4,
                          min_core_px: int = 1, post_stride: int = 2
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels int32 (H, W) with 0 = background and 1..n, scores float32 (n + 1,)).

    ``fg_logits`` / ``core_logits``: (H, W) float logits on the frame's grid. ``foreground`` and
    ``core`` are probability thresholds; ``min_area_px`` the smallest kept particle (px at full
    resolution); ``min_core_px`` the smallest core (px at the coarse grid) that seeds a particle.
    """
    if fg_logits.shape != core_logits.shape or fg_logits.ndim != 2:
        raise ValueError(f"logit maps must be equal 2-D shapes, got {fg_logits.shape} and "
                         f"{core_logits.shape}")
    h, w = fg_logits.shape
    s = max(1, int(post_stride))
    lf, lc = np.float32(logit(foreground)), np.float32(logit(core))
    fg_full = fg_logits > lf
    # coarse grid: sample at the centre of each s x s block
    o = s // 2
    fgc_logit = fg_logits[o::s, o::s]
    fgc = fgc_logit > lf
    cores = (core_logits[o::s, o::s] > lc) & fgc
    core_lab, n_core = ndi.label(cores, _FOUR)
    comp_lab, n_comp = ndi.label(fgc, _FOUR)
    hc, wc = fgc.shape

    core_area = np.bincount(core_lab.ravel(), minlength=n_core + 1)
    # a core's component (cores lie inside the foreground)
    core_comp = np.zeros(n_core + 1, np.int64)
    core_comp[core_lab[cores]] = comp_lab[cores]
    valid = core_area >= min_core_px
    valid[0] = False
    n_cores_in = np.bincount(core_comp[valid], minlength=n_comp + 1)

    # component -> instance id for components with exactly one core or none
    comp_to_inst = np.zeros(n_comp + 1, np.int64)
    single_cores = np.nonzero(valid & (n_cores_in[core_comp] == 1))[0]
    comp_to_inst[core_comp[single_cores]] = single_cores
    no_core = np.nonzero(n_cores_in == 0)[0][1:]
    comp_to_inst[no_core] = n_core + 1 + np.arange(no_core.size)
    inst = comp_to_inst[comp_lab].astype(np.int32)

    multi = np.nonzero(n_cores_in >= 2)[0]
    if multi.size:
        boxes = ndi.find_objects(comp_lab)
        for comp in multi.tolist():
            sl = boxes[comp - 1]
            # one coarse pixel of margin so distance transforms see the whole core
            sl = tuple(slice(max(a.start - 1, 0), min(a.stop + 1, n)) for a, n in
                       zip(sl, (hc, wc), strict=True))
            mask = comp_lab[sl] == comp
            cl = np.where(mask, core_lab[sl], 0)
            ids = np.unique(cl)
            ids = ids[(ids > 0) & valid[ids]]
            radii = np.sqrt(core_area[ids] / np.pi) + 0.5
            part = _split(mask, cl, ids, radii)
            region = inst[sl]
            region[mask] = part[mask]

    # drop tiny instances and relabel 1..n on the coarse grid (cheap), then add no-core flags
    n_max = n_core + 1 + no_core.size
    area_c = np.bincount(inst.ravel(), minlength=n_max)
    keep = area_c * (s * s) >= max(min_area_px, 1)
    keep[0] = False
    lut = np.zeros(n_max, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    had_core = np.ones(n_max, bool)
    had_core[n_core + 1:] = False
    n = int(keep.sum())
    inst = lut[inst]

    # scores: mean foreground probability on the coarse grid
    prob = 1.0 / (1.0 + np.exp(-np.clip(fgc_logit, -30, 30, dtype=np.float32)))
    cnt = np.bincount(inst.ravel(), minlength=n + 1)
    tot = np.bincount(inst.ravel(), weights=prob.ravel(), minlength=n + 1)
    scores = (tot / np.maximum(cnt, 1)).astype(np.float32)
    scores[1:] *= np.where(had_core[keep], 1.0, 0.5).astype(np.float32)
    scores[0] = 0.0

    if s == 1:
        return np.where(fg_full, inst, 0).astype(np.int32), scores
    # the coarse map covers each block by its centre sample; dilate it by one coarse pixel into
    # the background so full-resolution outline pixels of a block whose centre fell outside still
    # find their particle
    grown = ndi.grey_dilation(inst, size=(3, 3))
    inst = np.where(inst > 0, inst, grown)
    up = np.repeat(np.repeat(inst, s, axis=0), s, axis=1)[:h, :w]
    if up.shape != (h, w):  # odd sizes: the last partial block repeats the last coarse pixel
        up = np.pad(up, ((0, h - up.shape[0]), (0, w - up.shape[1])), mode="edge")
    labels = np.where(fg_full, up, 0).astype(np.int32, copy=False)
    return labels, scores
