"""One sequence-gap tracker for every numbered stream: the daemon's frames per source, and a
subscriber's messages per topic (``topic_seq``).

A number that jumps forward by more than one means messages were lost in between; a number
that goes back means the sender restarted (counting starts again, nothing is missing) — unless
the stream is *resumable* (an adapter session that resends frames after a daemon restart): then
a number at or below the newest is a late or resent one, and one already seen is a duplicate
(:meth:`SequenceTracker.seen`, over the last ``window`` numbers of the key).

Where the numbers name the sender's run (a result's ``daemon_run``, a heartbeat's
``started_ns``), a number of another run than the key's last one starts a new sequence whose
first number is 0: a restart is told from the run, not guessed from a falling number, and the
numbers of the new run before the first one seen are counted as missed (however high it is).
The first number ever seen of a key starts its sequence, whatever its run: a receiver that
joins a running sender misses nothing.

The counts of missed numbers stop at :data:`MAX_COUNT` (2**63 - 1, the int64 counts of the
wire): a number is any int64, so two jumps from 0 to 2**63 - 1 (a sender's garbage or a
camera's 64-bit frame id) would pass it, and a ``health`` message cannot carry more.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_COUNT", "Gap", "SequenceTracker", "saturated_sum"]

#: the largest count of missed numbers kept (the int64 counts of the wire protocol)
MAX_COUNT = 2**63 - 1


def saturated_sum(*counts: int) -> int:
    """The sum of ``counts``, at most :data:`MAX_COUNT`."""
    return min(sum(counts), MAX_COUNT)


@dataclass(frozen=True)
class Gap:
    """``missed`` numbers of ``key`` were not seen before ``seq``."""

    key: str
    seq: int
    missed: int


class _Recent:
    """The last numbers seen of one key (for duplicates), at most ``window`` of them: an int64
    ring that grows by doubling up to ``window`` (8 bytes a number: 32 KiB for the daemon's
    4096, where a deque and a set of Python ints took about 280 KiB)."""

    __slots__ = ("ring", "n", "pos", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.ring = np.empty(min(window, 64), np.int64)
        self.n = 0  # numbers held
        self.pos = 0  # where the next one goes once the ring is full

    def add(self, seq: int) -> None:
        """Remember ``seq`` (the oldest number goes once ``window`` are held)."""
        if self.n < self.ring.size:
            self.ring[self.n] = seq
            self.n += 1
        elif self.ring.size < self.window:  # grow: the numbers stay in arrival order
            grown = np.empty(min(2 * self.ring.size, self.window), np.int64)
            grown[: self.n] = self.ring
            grown[self.n] = seq
            self.ring, self.n = grown, self.n + 1
        else:
            self.ring[self.pos] = seq
            self.pos = (self.pos + 1) % self.window

    def __contains__(self, seq: int) -> bool:
        return bool((self.ring[: self.n] == seq).any())


class SequenceTracker:
    """Per-key increasing sequence numbers; counts what is missing.

    ``max_keys`` bounds the keys remembered (least recently seen forgotten first; their missed
    counts stay in :attr:`total`); ``window``: numbers remembered per key to recognise
    duplicates (0: none). Not thread-safe: one owner thread.
    """

    def __init__(self, max_keys: int | None = None, window: int = 0) -> None:
        self.max_keys = max_keys
        self.window = window
        self._recent: dict[str, _Recent] = {}
        self._last: OrderedDict[str, tuple[int, int | None]] = OrderedDict()  # newest, its run
        #: numbers missed per key, at most :data:`MAX_COUNT` (keys that were forgotten are
        #: dropped from here)
        self.missed: dict[str, int] = {}
        #: numbers missed in total, at most :data:`MAX_COUNT`
        self.total = 0
        self.last_gap: Gap | None = None

    def seen(self, key: str, seq: int) -> bool:
        """True when ``seq`` of ``key`` is among the last ``window`` numbers recorded."""
        recent = self._recent.get(key)
        return recent is not None and seq in recent

    def observe(self, key: str, seq: int, *, resumable: bool = False,
                run: int | None = None) -> Gap | None:
        """Record ``seq`` of ``key``; returns the gap before it, if any. ``resumable``: a
        number at or below the newest is late (or resent), not a restart of the sender.
        ``run``: the sender's run that numbered ``seq`` (e.g. ``daemon_run``, ns since the
        epoch; None: not known, a restart is read from a falling number); another run than
        the key's last one numbers from 0, so ``seq`` numbers of it were missed before."""
        last, last_run = self._last.get(key, (None, None))
        if last is not None and run is not None and run != last_run:
            last = -1  # a new run of the sender: its first number is 0
            self._recent.pop(key, None)
        gap = None
        if last is not None and seq > last + 1:
            gap = Gap(key, seq, seq - last - 1)
            self.missed[key] = saturated_sum(self.missed.get(key, 0), gap.missed)
            self.total = saturated_sum(self.total, gap.missed)
            self.last_gap = gap
        if last is None or seq > last or not resumable:
            self._last[key] = (seq, run)
        self._last.move_to_end(key)
        if self.window:
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = _Recent(self.window)
            recent.add(seq)
        if self.max_keys is not None and len(self._last) > self.max_keys:
            self.forget(next(iter(self._last)))
        return gap

    def forget(self, key: str) -> None:
        """Forget ``key`` (its next number starts a new sequence)."""
        self._last.pop(key, None)
        self.missed.pop(key, None)
        self._recent.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._last
