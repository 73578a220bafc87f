"""The live policy's newest-frame-wins slots, without sockets."""

from __future__ import annotations

import threading

import numpy as np

from nanoscout.daemon.daemon import _Item, _LiveSlots
from nanoscout.wire.protocol import frame_header


def _item(source: str, seq: int, t: int) -> _Item:
    px = np.zeros((2, 2), np.uint8)
    return _Item(frame_header(px, source=source, seq=seq, t_acq_ns=t, pixel_size_nm=None), px, t, None)


def test_newest_frame_wins_and_each_skip_is_reported() -> None:
    superseded: list[int] = []
    slots = _LiveSlots(lambda it: superseded.append(it.header.seq))
    for seq in range(5):
        slots.put(_item("a", seq, seq))
    assert slots.qsize() == 1
    got = slots.get(timeout=0)
    assert got is not None and got.header.seq == 4
    assert superseded == [0, 1, 2, 3]
    assert slots.get(timeout=0) is None


def test_sources_do_not_supersede_each_other_and_oldest_goes_first() -> None:
    slots = _LiveSlots(lambda it: None)
    slots.put(_item("b", 0, t=20))
    slots.put(_item("a", 0, t=10))
    order = [slots.get(0).header.source, slots.get(0).header.source]  # type: ignore[union-attr]
    assert order == ["a", "b"]


def test_get_wakes_up_when_a_frame_arrives() -> None:
    slots = _LiveSlots(lambda it: None)
    got: list[_Item | None] = []
    waiting = threading.Thread(target=lambda: got.append(slots.get(timeout=30)))
    waiting.start()
    slots.put(_item("a", 7, 1))
    waiting.join(30)
    assert got and got[0] is not None and got[0].header.seq == 7
