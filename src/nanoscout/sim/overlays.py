"""Burnt-in annotations that are not particles: scale bars, panel letters, SEM data bars.

Real frames (and every figure crop in EMPS) carry them; a detector trained only on clean
synthetic frames calls a scale bar a rod and a text glyph a cluster of particles. During
training :func:`burn_in` paints some onto a normalised crop and clears the particle targets
under them, so the network learns that they are background.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["burn_in"]

_WORDS = ("50 nm", "100 nm", "20 nm", "200 nm", "1 µm", "5 nm", "a", "b)", "(c)", "d", "2 µm",
          "HV 15.0 kV", "WD 5.1 mm", "Mag 50 kX", "SE2", "InLens", "x120k", "EHT = 5.00 kV")


def _text(draw: ImageDraw.ImageDraw, rng: np.random.Generator, xy: tuple[float, float],
          size: int, fill: int) -> None:
    font = ImageFont.load_default(size=size)
    draw.text(xy, str(rng.choice(_WORDS)), fill=fill, font=font)


def burn_in(x: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a mask of the painted pixels after painting 1-3 annotations onto ``x`` in place.

    ``x``: (H, W) float32 normalised image (~0..1). ``targets``: (C, H, W) float32 training
    targets whose foreground and core channels (0 and 1) are cleared under the annotations.
    """
    h, w = x.shape
    paint = Image.new("L", (w, h), 0)     # 0: untouched, 1: dark ink, 2: bright ink
    draw = ImageDraw.Draw(paint)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["bar", "scale", "text"], p=[0.3, 0.35, 0.35])
        ink = int(rng.integers(1, 3))
        size = int(rng.integers(9, 28))
        if kind == "bar":  # SEM data bar: a band along the bottom with white text on black
            bh = int(rng.integers(max(8, h // 14), max(9, h // 6)))
            draw.rectangle((0, h - bh, w, h), fill=ink)
            for _ in range(int(rng.integers(1, 4))):
                _text(draw, rng, (float(rng.uniform(0, w * 0.8)), h - bh + 1.0),
                      min(size, bh - 2), 3 - ink)
        elif kind == "scale":  # scale bar with its length written above or below
            bw, th = int(rng.integers(w // 10, w // 3)), int(rng.integers(2, 8))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(size + 2, h - th))
            draw.rectangle((x0, y0, x0 + bw, y0 + th), fill=ink)
            _text(draw, rng, (x0 + bw / 4.0, y0 - size - 2.0), size, ink)
        else:  # panel letter or label anywhere, sometimes on a box
            px, py = float(rng.uniform(0, w * 0.85)), float(rng.uniform(0, h * 0.9))
            if rng.random() < 0.3:
                draw.rectangle((px - 2, py - 2, px + 2.5 * size, py + size + 2), fill=3 - ink)
            _text(draw, rng, (px, py), size, ink)
    ink_map = np.asarray(paint)
    mask = ink_map > 0
    if mask.any():
        lo, hi = float(rng.uniform(-0.3, 0.1)), float(rng.uniform(0.9, 1.3))
        x[ink_map == 1] = lo
        x[ink_map == 2] = hi
        targets[0][mask] = 0.0
        targets[1][mask] = 0.0
    return mask
