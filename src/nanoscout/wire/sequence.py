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
joins a running sender misses nothing. A number at or below the newest of the same named run
is late, never a restart (a relay or a second endpoint can reorder messages): the newest stays,
so the numbers after it are not counted missed twice (1, 3, 2, 4 counted 2 missed for none).
Where a tracker keeps ``holes`` (the last ranges of numbers counted missed per key, a bounded
list), a late number in one of them takes its loss back: :meth:`SequenceTracker.observe`
returns a :class:`Gap` of ``missed`` -1. A late number older than the ranges kept stays counted
(memory is bounded, not the delay).

The counts of missed numbers stop at :data:`MAX_COUNT` (2**63 - 1, the int64 counts of the
wire): a number is any int64, so two jumps from 0 to 2**63 - 1 (a sender's garbage or a
camera's 64-bit frame id) would pass it, and a ``health`` message cannot carry more.
"""

from __future__ import annotations

import bisect
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
    """``missed`` numbers of ``key`` were not seen before ``seq``; ``missed`` -1: ``seq`` came
    late, after it had been counted missed, and is counted missed no more."""

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
    duplicates (0: none); ``holes``: ranges of missed numbers remembered per key (the newest
    ones), so that a late number in one takes its loss back (0: none, a late number stays
    counted missed). Not thread-safe: one owner thread.
    """

    def __init__(self, max_keys: int | None = None, window: int = 0, holes: int = 0) -> None:
        self.max_keys = max_keys
        self.window = window
        self.holes = holes
        self._recent: dict[str, _Recent] = {}
        #: per key, the ranges [first, last] of numbers counted missed, oldest first
        self._holes: dict[str, list[tuple[int, int]]] = {}
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
        the key's last one numbers from 0, so ``seq`` numbers of it were missed before; a
        number at or below the newest of the same run is late (a Gap of ``missed`` -1 where
        it was counted missed, see ``holes``)."""
        last, last_run = self._last.get(key, (None, None))
        if last is not None and run is not None and run != last_run:
            last = -1  # a new run of the sender: its first number is 0
            self._recent.pop(key, None)
            self._holes.pop(key, None)
        gap = None
        late = last is not None and seq <= last and (resumable or run is not None)
        if late:
            gap = self._late(key, seq)
        elif last is not None and seq > last + 1:
            gap = Gap(key, seq, seq - last - 1)
            self.missed[key] = saturated_sum(self.missed.get(key, 0), gap.missed)
            self.total = saturated_sum(self.total, gap.missed)
            self.last_gap = gap
            if self.holes:
                held = self._holes.setdefault(key, [])
                held.append((last + 1, seq - 1))
                del held[:-self.holes]
        elif last is not None and seq <= last:
            self._holes.pop(key, None)  # a restart read from a falling number: a new sequence
        if not late:
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

    def _late(self, key: str, seq: int) -> Gap | None:
        """``seq`` of ``key`` came after a higher one: where it lies in a range counted missed,
        the range is split around it and its loss taken back (a Gap of ``missed`` -1)."""
        held = self._holes.get(key)
        if not held:
            return None
        i = bisect.bisect_right(held, (seq, MAX_COUNT)) - 1
        if i < 0 or not held[i][0] <= seq <= held[i][1]:
            return None  # not counted missed (a repeat), or its range was forgotten
        first, last = held[i]
        held[i:i + 1] = [r for r in ((first, seq - 1), (seq + 1, last)) if r[0] <= r[1]]
        del held[:-self.holes]
        if not held:
            del self._holes[key]
        self.missed[key] = max(self.missed.get(key, 0) - 1, 0)
        self.total = max(self.total - 1, 0)
        return Gap(key, seq, -1)

    def forget(self, key: str) -> None:
        """Forget ``key`` (its next number starts a new sequence)."""
        self._last.pop(key, None)
        self.missed.pop(key, None)
        self._recent.pop(key, None)
        self._holes.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._last
