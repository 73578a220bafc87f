"""Field-of-view classes derived honestly from real instance maps (the classifier's real
training and evaluation images)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = ["emps_field_label"]


def emps_field_label(labels: np.ndarray, min_area_px: int = 12) -> str | None:
    """Return the field class an EMPS instance map supports, or None.

    Under the "field contains rods" definition of ``rods_wires``: a particle is rod-like when
    its mask's aspect ratio (second moments) is >= 3 and it does not touch the image border
    (cut particles look elongated). ``rods_wires`` when >= 2 particles are rod-like (a single
    one may be a segmentation artefact, e.g. three merged spheres in a row: such images are not
    used); with no rod-like particle, ``isolated_particles`` when <= 20 % of the particles touch
    another one (instance masks dilated by 2 px meet another instance),
    ``agglomerated_particles`` when >= 60 % do; images with fewer than 3 particles (>= 12 px,
    ``min_area_px``) or in between get None.
    """
    n = touching = rods = 0
    h, w = labels.shape
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        big = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in sl)
        sub = labels[big]
        m = sub == i
        if int(m.sum()) < min_area_px:
            continue
        n += 1
        ring = ndi.binary_dilation(m, iterations=2) & ~m
        if np.any(sub[ring] > 0):
            touching += 1
        ys, xs = np.nonzero(m)
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)))
        aspect = math.sqrt(max(ev[1], 1e-6) / max(ev[0], 1e-6))
        on_border = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w
        rods += int(aspect >= 3.0 and not on_border)
    if rods >= 2:
        return "rods_wires"
    if n < 3 or rods == 1:
        return None
    frac = touching / n
    if frac <= 0.2:
        return "isolated_particles"
    if frac >= 0.6:
        return "agglomerated_particles"
    return None
