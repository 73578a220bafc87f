"""Box supervision for the detector: training on images whose truth is boxes, not masks.

The STEM training images carry YOLO boxes only. Detector 3.0 trained on the ellipse inscribed
in each box as if it were the particle's mask, which is wrong near the outline (a faceted or
irregular particle fills more of its box, a rounded one less). Here (BoxInst-style, Tian et al.
2021, without the colour-affinity term):

* **trusted pixels only**: outside every box is background, the inner part of each inscribed
  ellipse (``inner`` of its half-axes) is particle; the ring between, where the outline lies
  somewhere, is left out of the per-pixel losses (:func:`ring_mask`);
* **projection loss**: the particle must reach every side of its box and not beyond it: the
  maximum of the foreground probability over the box's rows must be 1 for every column of the
  box, and the same over its columns (:func:`projection_loss`, a Dice loss on the two
  projections). Together with "background outside the boxes" this is what a box says.

Boxes are recovered from the (transformed) ellipse label map of each crop by
:func:`boxes_from_labels`, so crops, rescaling, flips and rotations need no box bookkeeping.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi

__all__ = ["boxes_from_labels", "projection_loss", "ring_mask"]


def ring_mask(shape: tuple[int, int], boxes: np.ndarray, inner: float = 0.6) -> np.ndarray:
    """Return a bool map of the pixels whose label a box does not tell: inside a box
    ((x0, y0, x1, y1) px, pixel edges) but outside every box's inner ellipse (half-axes x
    ``inner``, same centre). Pixel centres are at k + 0.5."""
    h, w = shape
    in_box = np.zeros(shape, bool)
    in_core = np.zeros(shape, bool)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        r0, r1 = max(0, int(np.floor(y0))), min(h, int(np.ceil(y1)))
        c0, c1 = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)))
        if r0 >= r1 or c0 >= c1:
            continue
        yy = np.arange(r0, r1)[:, None] + 0.5
        xx = np.arange(c0, c1)[None, :] + 0.5
        inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        in_box[r0:r1, c0:c1] |= inside
        ay, ax = max(inner * (y1 - y0) / 2.0, 0.5), max(inner * (x1 - x0) / 2.0, 0.5)
        e = ((yy - (y0 + y1) / 2.0) / ay) ** 2 + ((xx - (x0 + x1) / 2.0) / ax) ** 2 <= 1.0
        in_core[r0:r1, c0:c1] |= e
    return in_box & ~in_core


def boxes_from_labels(labels: np.ndarray, min_side_px: int = 2) -> np.ndarray:
    """Return the (K, 4) int64 boxes (r0, c0, r1, c1; r1, c1 exclusive) of the instances of
    ``labels`` whose sides are both at least ``min_side_px``."""
    out = []
    for sl in ndi.find_objects(labels):
        if sl is None:
            continue
        r, c = sl
        if r.stop - r.start >= min_side_px and c.stop - c.start >= min_side_px:
            out.append((r.start, c.start, r.stop, c.stop))
    return np.asarray(out, np.int64).reshape(-1, 4)


def projection_loss(fg_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Return the mean projection Dice loss over ``boxes`` (N, 5) int64 rows (crop index, r0,
    c0, r1, c1) of the foreground logits ``fg_logits`` (B, H, W); 0 without boxes.

    For one box, p = sigmoid(logits) inside it; the column maxima (max over the box's rows)
    and the row maxima must all be 1: loss = 1 - 2 sum(m) / (sum(m) + n) per projection.
    """
    if boxes.numel() == 0:
        return fg_logits.sum() * 0.0
    total = fg_logits.new_zeros(())
    for b, r0, c0, r1, c1 in boxes.tolist():
        p = torch.sigmoid(fg_logits[b, r0:r1, c0:c1])
        for m in (p.amax(dim=0), p.amax(dim=1)):
            total = total + 1.0 - 2.0 * m.sum() / (m.sum() + m.numel())
    return total / (2 * boxes.shape[0])
