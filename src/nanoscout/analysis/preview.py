"""Small display pictures of frames (``preview.<source>`` topic), rate-limited per source."""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from nanoscout.analysis.preprocess import resample

__all__ = ["PreviewConfig", "PreviewLimiter", "make_preview"]


class PreviewConfig(BaseModel):
    """``preview.<source>`` topic: small uint8 pictures of frames for dashboards."""

    # inf, nan: valid TOML; strict: a TOML value of another type is named, not converted
    # ("50" for an int, "no" or 0 for a bool: nanoscout.daemon.config.SECTION_CONFIG)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)
    enabled: bool = True
    max_rate_hz: float = Field(2.0, gt=0, le=100)  # per source
    max_side_px: int = Field(512, ge=16, le=4096)


def make_preview(normalized: np.ndarray, max_side_px: int) -> tuple[np.ndarray, float]:
    """Return (uint8 image, scale): the normalised frame (``Frame.normalized``: 0.5 / 99.5
    percentiles at 0 / 1) shrunk (area-averaged) so its longer side is at most
    ``max_side_px``; ``scale`` = preview px per frame px (1.0 when small enough already)."""
    x = normalized
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

    def forget(self, source: str) -> None:
        """Forget ``source`` (its next frame gets a preview)."""
        self._last.pop(source, None)
