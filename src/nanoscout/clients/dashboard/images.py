"""Pictures for the browser: PNG encoding, heatmap colouring and alert thumbnails (Pillow).

Everything here is a pure function of numpy arrays; coordinates are preview px unless named
otherwise. PNGs are returned base64-encoded, ready to be put into a ``data:`` URL.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["THUMB_SIDE_PX", "colorize", "heatmap_rgba", "heatmap_thumbnail", "png_b64", "thumbnail"]

#: longer side of an alert thumbnail, px
THUMB_SIDE_PX = 128

# "inferno"-like stops (value 0..1 → RGB); a heatmap reads hot = bright on a grey picture
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                dtype=np.float64)


def png_b64(image: np.ndarray) -> str:
    """Encode a uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA image as base64 PNG text."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"png_b64 needs a uint8 2-D or 3-D image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    # compress_level 1: previews are noisy micrographs that barely compress; speed matters more
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def colorize(values: np.ndarray) -> np.ndarray:
    """Map a uint8 (H, W) array through the heatmap palette; returns uint8 (H, W, 3) RGB."""
    x = values.astype(np.float64) / 255.0
    rgb = np.stack([np.interp(x, _STOPS, _RGB[:, c]) for c in range(3)], axis=-1)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def heatmap_rgba(heat: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) heatmap as RGBA for an overlay: palette colour, opacity rising with value
    (0 is fully transparent, so cold regions leave the micrograph visible)."""
    rgb = colorize(heat)
    alpha = np.clip(heat.astype(np.float64) * 1.2, 0, 255).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _fit(img: Image.Image, side: int) -> tuple[Image.Image, float]:
    """Resize so the longer side is ``side`` px; returns the image and the zoom factor."""
    zoom = side / max(img.width, img.height)
    size = (max(1, round(img.width * zoom)), max(1, round(img.height * zoom)))
    resample = Image.Resampling.NEAREST if zoom >= 2 else Image.Resampling.BILINEAR
    return img.resize(size, resample), zoom


def thumbnail(preview: np.ndarray, boxes: np.ndarray | None, *, side: int = THUMB_SIDE_PX,
              focus: int = 1, pad: float = 0.6, min_crop_px: int = 64) -> np.ndarray:
    """A crop of a uint8 preview around the first ``focus`` of ``boxes``, every box outlined
    (the focused ones brighter), as uint8 RGB.

    ``boxes``: (n, 4) x0, y0, x1, y1 in preview px (x1/y1 exclusive), or None/empty for the
    whole picture. A box given with its corners swapped (x1 < x0 or y1 < y0) is put in order;
    an empty one (zero width or height) or one with a non-finite corner is neither drawn nor
    cropped to. An alert lists the particle it names first, so the crop centres on it even
    when dozens fired. The crop is the union of the focused boxes grown by ``pad`` × its size
    on every side, at least ``min_crop_px`` wide and high, clipped to the picture (the whole
    picture when no focused box is drawable); its longer side is then scaled to ``side`` px.
    """
    h, w = preview.shape
    img = Image.fromarray(np.ascontiguousarray(preview)).convert("RGB")
    if boxes is None or len(boxes) == 0:
        return np.asarray(_fit(img, side)[0])
    raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    # a box comes from a message: order its corners (Pillow refuses x1 < x0), and keep
    # only boxes with an area (a zero-size or non-finite one draws nothing)
    b = np.concatenate([np.minimum(raw[:, :2], raw[:, 2:]), np.maximum(raw[:, :2], raw[:, 2:])],
                       axis=1)
    drawable = np.isfinite(b).all(axis=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    n_focus = max(1, focus)
    f = b[:n_focus][drawable[:n_focus]]
    b, focused = b[drawable], np.arange(len(b))[drawable] < n_focus
    if not len(b):
        return np.asarray(_fit(img, side)[0])
    if not len(f):  # nothing to centre on: the whole picture, the other boxes outlined
        f = np.array([[0.0, 0.0, float(w), float(h)]])
    x0, y0 = f[:, 0].min(), f[:, 1].min()
    x1, y1 = f[:, 2].max(), f[:, 3].max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max((x1 - x0) * (0.5 + pad), (y1 - y0) * (0.5 + pad), min_crop_px / 2)
    left = int(np.clip(np.floor(cx - half), 0, max(w - 1, 0)))
    top = int(np.clip(np.floor(cy - half), 0, max(h - 1, 0)))
    right = int(np.clip(np.ceil(cx + half), left + 1, w))
    bottom = int(np.clip(np.ceil(cy + half), top + 1, h))
    crop, zoom = _fit(img.crop((left, top, right, bottom)), side)
    draw = ImageDraw.Draw(crop)
    for i in range(len(b) - 1, -1, -1):  # focused ones last, on top
        bx0, by0, bx1, by1 = b[i]
        rect = [(bx0 - left) * zoom - 2, (by0 - top) * zoom - 2,
                (bx1 - left) * zoom + 1, (by1 - top) * zoom + 1]
        if rect[2] < 0 or rect[3] < 0 or rect[0] > crop.width or rect[1] > crop.height:
            continue
        draw.ellipse(rect, outline=(255, 60, 60) if focused[i] else (255, 150, 150),
                     width=3 if focused[i] else 1)
    return np.asarray(crop)


def heatmap_thumbnail(heat: np.ndarray, preview: np.ndarray | None = None, *,
                      side: int = THUMB_SIDE_PX) -> np.ndarray:
    """A uint8 (H, W) heatmap covering the whole frame, in the heatmap palette and blended over
    the uint8 ``preview`` when given (opacity rising with heat), longer side ``side`` px, as
    uint8 RGB."""
    heat_img = Image.fromarray(np.ascontiguousarray(heat))
    if preview is None:
        return np.asarray(_fit(Image.fromarray(colorize(heat)), side)[0])
    base, _ = _fit(Image.fromarray(np.ascontiguousarray(preview)).convert("RGB"), side)
    heat_big = np.asarray(heat_img.resize(base.size, Image.Resampling.BILINEAR))
    rgba = heatmap_rgba(heat_big).astype(np.float64)
    alpha = rgba[..., 3:4] / 255.0 * 0.75
    out = np.asarray(base, dtype=np.float64) * (1 - alpha) + rgba[..., :3] * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
