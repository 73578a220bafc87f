"""Small display pictures of frames (``preview.<source>`` topic), rate-limited per source."""

from __future__ import annotations

import time

import numpy as np

from nanoscout.analysis.preprocess import normalize, resample

__all__ = ["PreviewLimiter", "make_preview"]


def make_preview(pixels: np.ndarray, max_side_px: int) -> tuple[np.ndarray, float]:
    """Return (uint8 image, scale): the frame normalised by its 0.5 / 99.5 percentiles and
    shrunk (area-averaged) so its longer side is at most ``max_side_px``; ``scale`` = preview px
    per frame px (1.0 when the frame is small enough already)."""
    x = normalize(pixels)
    h, w = x.shape
    scale = min(1.0, max_side_px / max(h, w))
    if scale < 1.0:
        x = resample(x, (max(1, round(h * scale)), max(1, round(w * scale))))
    img = np.clip(x * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return img, scale


class PreviewLimiter:
    """Allows at most ``max_rate_hz`` previews per source (the first frame always)."""

    def __init__(self, max_rate_hz: float) -> None:
        self.period_s = 1.0 / max_rate_hz
        self._last: dict[str, float] = {}

    def due(self, source: str, now: float | None = None) -> bool:
        """True (and the source's clock restarts) when a preview of ``source`` may go out."""
        now = time.monotonic() if now is None else now
        last = self._last.get(source)
        if last is not None and now - last < self.period_s:
            return False
        self._last[source] = now
        return True
