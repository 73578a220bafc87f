"""One sequence-gap tracker for every numbered stream: the daemon's frames per source, and a
subscriber's messages per topic (``topic_seq``).

A number that jumps forward by more than one means messages were lost in between; a number
that goes back means the sender restarted (counting starts again, nothing is missing).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Gap", "SequenceTracker"]


@dataclass(frozen=True)
class Gap:
    """``missed`` numbers of ``key`` were not seen before ``seq``."""

    key: str
    seq: int
    missed: int


class SequenceTracker:
    """Per-key increasing sequence numbers; counts what is missing.

    ``max_keys`` bounds the keys remembered (least recently seen forgotten first; their missed
    counts stay in :attr:`total`). Not thread-safe: one owner thread.
    """

    def __init__(self, max_keys: int | None = None) -> None:
        self.max_keys = max_keys
        self._last: OrderedDict[str, int] = OrderedDict()
        #: numbers missed per key (keys that were forgotten are dropped from here)
        self.missed: dict[str, int] = {}
        #: numbers missed in total
        self.total = 0
        self.last_gap: Gap | None = None

    def observe(self, key: str, seq: int) -> Gap | None:
        """Record ``seq`` of ``key``; returns the gap before it, if any."""
        last = self._last.get(key)
        gap = None
        if last is not None and seq > last + 1:
            gap = Gap(key, seq, seq - last - 1)
            self.missed[key] = self.missed.get(key, 0) + gap.missed
            self.total += gap.missed
            self.last_gap = gap
        self._last[key] = seq
        self._last.move_to_end(key)
        if self.max_keys is not None and len(self._last) > self.max_keys:
            self.forget(next(iter(self._last)))
        return gap

    def forget(self, key: str) -> None:
        """Forget ``key`` (its next number starts a new sequence)."""
        self._last.pop(key, None)
        self.missed.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._last
