"""The daemon's garbage-collector policy (nanoscout.daemon.collector)."""

from __future__ import annotations

import gc

from nanoscout.daemon import collector


def test_settle_freezes_start_up_and_makes_full_collections_rare() -> None:
    before = gc.get_threshold()
    try:
        assert collector.settle() == before
        assert gc.get_freeze_count() > 1000  # this test process's modules, at least
        assert gc.get_threshold() == (before[0], before[1], collector.FULL_EVERY)
        # objects made afterwards are still collected: a cycle is freed by a full collection
        a: list[object] = []
        a.append(a)
        del a
        assert gc.collect() >= 1
    finally:
        collector.reset(before)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
