"""The daemon's two waiting rooms for accepted frames, one per delivery policy.

:class:`FrameQueue` (``lossless``): a FIFO bounded in frames and in bytes; a full queue makes
the receiver stop reading, so ZeroMQ's high-water mark pushes back on the adapter.
:class:`LiveSlots` (``live``): one slot per source holding its newest frame; a frame that
replaces a waiting one is reported (``superseded``), as is the oldest waiting frame when more
sources wait than allowed (``evicted``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

from nanoscout.analysis.frame import Frame
from nanoscout.wire.errors import Reason

__all__ = ["FrameQueue", "LiveSlots"]


class FrameQueue:
    """Lossless: a FIFO bounded in frames and in bytes (one frame always fits)."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._items: deque[Frame] = deque()
        self.nbytes = 0
        self._cond = threading.Condition()

    def put(self, frame: Frame, timeout: float) -> bool:
        """Append ``frame``; False when there is no room within ``timeout`` s."""
        size = frame.pixels.nbytes
        with self._cond:
            def room() -> bool:
                return not self._items or (len(self._items) < self.max_frames
                                           and self.nbytes + size <= self.max_bytes)
            if not self._cond.wait_for(room, timeout):
                return False
            self._items.append(frame)
            self.nbytes += size
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Frame | None:
        """The oldest frame, or None after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            frame = self._items.popleft()
            self.nbytes -= frame.pixels.nbytes
            self._cond.notify_all()
            return frame

    def qsize(self) -> int:
        """Return the number of frames waiting."""
        return len(self._items)


class LiveSlots:
    """Newest-frame-wins slots, one per source (at most ``max_sources``); ``get`` returns the
    oldest waiting frame. ``on_drop(frame, reason)`` is told of every frame replaced."""

    def __init__(self, on_drop: Callable[[Frame, Reason], None], max_sources: int = 64) -> None:
        self._slots: OrderedDict[str, Frame] = OrderedDict()
        self._cond = threading.Condition()
        self._on_drop = on_drop
        self.max_sources = max_sources

    def put(self, frame: Frame) -> None:
        """Put ``frame`` in its source's slot, reporting the frame it replaces or evicts."""
        dropped: list[tuple[Frame, Reason]] = []
        with self._cond:
            old = self._slots.pop(frame.source, None)
            if old is not None:
                dropped.append((old, Reason.SUPERSEDED))
            self._slots[frame.source] = frame
            while len(self._slots) > self.max_sources:
                _, oldest = self._slots.popitem(last=False)
                dropped.append((oldest, Reason.EVICTED))
            self._cond.notify()
        for f, reason in dropped:
            self._on_drop(f, reason)

    def get(self, timeout: float) -> Frame | None:
        """The oldest waiting frame (by receive time), or None after ``timeout`` s."""
        with self._cond:
            if not self._slots and not self._cond.wait(timeout):
                return None
            if not self._slots:
                return None
            source = min(self._slots, key=lambda s: self._slots[s].t_recv_ns)
            return self._slots.pop(source)

    def qsize(self) -> int:
        """Return the number of sources with a frame waiting."""
        return len(self._slots)
