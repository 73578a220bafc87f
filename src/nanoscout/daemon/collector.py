"""How the daemon runs Python's cyclic garbage collector.

Two costs showed in the frames' latency (``benchmarks/gc_freeze.py``):

* everything start-up built (modules, the models' Python side, pydantic schemas: about a
  quarter of a million objects) lives as long as the daemon, yet every full collection walked
  it again: ~0.1 s every few dozen 1024² frames. :func:`settle` moves it to the permanent
  generation (``gc.freeze``) once start-up is done.
* tracking kept two frames of trackpy's linking state (about 24 objects per particle: ~240,000
  at 4096² with 10,000 particles; the linker is vectorised now, but any such per-particle
  Python state would do the same), and the allocations of each frame made a full collection
  walk it once per frame: 110 ms of a 4096² frame's 190 ms of tracking. That state is freed by
  reference counting (it forms almost no cycles), so :func:`settle` lets a full collection
  wait for ``FULL_EVERY`` young-generation passes (Python's default: 10). The young
  generations are still collected as usual, and a full collection still comes, about every
  10 million allocations.
"""

from __future__ import annotations

import gc

__all__ = ["FULL_EVERY", "reset", "settle"]

#: generation-1 collections between two full ones (Python's default threshold is 10)
FULL_EVERY = 1000


def settle() -> tuple[int, int, int]:
    """Once start-up is done: collect, freeze what exists, and make full collections rare.
    Returns the collector's thresholds before."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(before[0], before[1], FULL_EVERY)
    return before


def reset(thresholds: tuple[int, int, int]) -> None:
    """Undo :func:`settle` (for a benchmark that compares both): unfreeze and restore the
    thresholds."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)
