"""The newest raw frames of each source, kept in memory for review (``[review] frames`` /
``max_bytes``).

A :class:`FrameRing` holds, per source, a ring of the last ``frames`` frames the worker took up,
and never more than ``max_bytes`` of pixels over all sources: a frame that would exceed it
pushes out the oldest frames kept (of any source) first. A frame larger than ``max_bytes`` by
itself is not kept. Sources are bounded too (``max_sources``; the least recently fed goes).
Frames are held by reference (the daemon's frames are read-only once received), so keeping
one costs no copy. Once analysed, a frame's instance label map may be attached to it
(:meth:`FrameRing.attach`, stored as uint16, counted in the bytes): a saved frame then comes
with the detector's own instances, the start of an operator's annotation. Every method may be
called from any thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

import numpy as np

from nanoscout.analysis.frame import Frame

__all__ = ["FrameRing"]


class FrameRing:
    """Bounded per-source rings of raw frames (frames per source, bytes in total)."""

    def __init__(self, frames: int, max_bytes: int, max_sources: int = 64) -> None:
        """``frames``: kept per source (>= 0); ``max_bytes``: pixel bytes kept over all sources
        (>= 0); ``max_sources``: sources kept (>= 1)."""
        if frames < 0 or max_bytes < 0 or max_sources < 1:
            raise ValueError(f"frame ring: frames ({frames}) and max_bytes ({max_bytes}) must be "
                             f">= 0 and max_sources ({max_sources}) >= 1")
        self.frames = frames
        self.max_bytes = max_bytes
        self.max_sources = max_sources
        self._rings: OrderedDict[str, deque[Frame]] = OrderedDict()
        #: every frame kept, oldest first, for the byte bound
        self._order: deque[Frame] = deque()
        self._bytes = 0
        self._labels: dict[int, np.ndarray] = {}  # id(frame) -> its label map
        self._lock = threading.Lock()
        #: frames that were not kept because one alone exceeds ``max_bytes``
        self.too_large = 0

    @property
    def nbytes(self) -> int:
        """Pixel bytes kept now, over all sources."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._order)

    def add(self, frame: Frame) -> None:
        """Keep ``frame`` as the newest of its source, dropping what the bounds require."""
        size = frame.pixels.nbytes
        if self.frames == 0:
            return
        with self._lock:
            if size > self.max_bytes:
                self.too_large += 1
                return
            ring = self._rings.get(frame.source)
            if ring is None:
                while len(self._rings) >= self.max_sources:
                    self._forget(next(iter(self._rings)))
                ring = self._rings[frame.source] = deque()
            self._rings.move_to_end(frame.source)
            if len(ring) >= self.frames:
                self._discard(ring.popleft())
            ring.append(frame)
            self._order.append(frame)
            self._bytes += size
            self._fit()

    def _fit(self) -> None:
        """Drop the oldest frames kept (of any source) until the bytes fit."""
        while self._bytes > self.max_bytes and self._order:
            old = self._order[0]
            self._rings[old.source].remove(old)  # the oldest kept frame of its source
            self._discard(old)

    def attach(self, frame: Frame, labels: np.ndarray) -> None:
        """Keep ``labels`` (the instance map on ``frame``'s grid, 0 background) with
        ``frame``, if the frame is still kept; maps of more than 65535 instances are not."""
        with self._lock:
            if not any(f is frame for f in self._order) or id(frame) in self._labels:
                return
            if labels.shape != frame.pixels.shape or int(labels.max(initial=0)) > 65535:
                return
            kept = self._labels[id(frame)] = labels.astype(np.uint16)
            self._bytes += kept.nbytes
            self._fit()

    def labels(self, frame: Frame) -> np.ndarray | None:
        """The label map attached to ``frame`` (uint16), or None."""
        with self._lock:
            return self._labels.get(id(frame))

    def latest(self, source: str, n: int = 1) -> list[Frame]:
        """The newest ``n`` frames of ``source`` kept, oldest first (fewer when fewer are
        kept; [] for a source without frames)."""
        with self._lock:
            ring = self._rings.get(source)
            if not ring or n <= 0:
                return []
            return list(ring)[-n:]

    def newest(self) -> Frame | None:
        """The newest frame kept of the source fed last, or None."""
        with self._lock:
            if not self._rings:
                return None
            ring = self._rings[next(reversed(self._rings))]
            return ring[-1] if ring else None

    def sources(self) -> list[str]:
        """Sources with frames kept, least recently fed first."""
        with self._lock:
            return [s for s, ring in self._rings.items() if ring]

    def forget(self, source: str) -> None:
        """Drop every frame of ``source`` (the daemon evicted it)."""
        with self._lock:
            self._forget(source)

    def _forget(self, source: str) -> None:
        for frame in self._rings.pop(source, ()):
            self._discard(frame)

    def _discard(self, frame: Frame) -> None:
        """Take ``frame`` out of the byte accounting (it has left its source's ring)."""
        for i, kept in enumerate(self._order):
            if kept is frame:
                del self._order[i]
                break
        self._bytes -= frame.pixels.nbytes
        labels = self._labels.pop(id(frame), None)
        if labels is not None:
            self._bytes -= labels.nbytes
