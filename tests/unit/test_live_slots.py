"""The live policy's newest-frame-wins slots, without sockets."""

from __future__ import annotations

import threading

import numpy as np

from nanoscout.analysis.frame import Frame
from nanoscout.daemon.queues import FrameQueue, LiveSlots
from nanoscout.wire.errors import Reason


def _item(source: str, seq: int, t: int, side: int = 2) -> Frame:
    px = np.zeros((side, side), np.uint8)
    return Frame.from_image(px, pixel_size_nm=None, source=source, seq=seq, t_acq_ns=t)


def test_newest_frame_wins_and_each_skip_is_reported() -> None:
    superseded: list[int] = []
    slots = LiveSlots(lambda it, why: superseded.append(it.header.seq))
    for seq in range(5):
        slots.put(_item("a", seq, seq))
    assert slots.qsize() == 1
    got = slots.get(timeout=0)
    assert got is not None and got.header.seq == 4
    assert superseded == [0, 1, 2, 3]
    assert slots.get(timeout=0) is None


def test_sources_do_not_supersede_each_other_and_oldest_goes_first() -> None:
    slots = LiveSlots(lambda it, why: None)
    slots.put(_item("b", 0, t=20))
    slots.put(_item("a", 0, t=10))
    order = [slots.get(0).header.source, slots.get(0).header.source]  # type: ignore[union-attr]
    assert order == ["a", "b"]


def test_get_wakes_up_when_a_frame_arrives() -> None:
    slots = LiveSlots(lambda it, why: None)
    got: list[Frame | None] = []
    waiting = threading.Thread(target=lambda: got.append(slots.get(timeout=30)))
    waiting.start()
    slots.put(_item("a", 7, 1))
    waiting.join(30)
    assert got and got[0] is not None and got[0].header.seq == 7


def test_more_sources_than_allowed_evict_the_oldest_waiting_frame() -> None:
    dropped: list[tuple[str, Reason]] = []
    slots = LiveSlots(lambda it, why: dropped.append((it.source, why)), max_sources=2)
    slots.put(_item("a", 0, 1))
    slots.put(_item("b", 0, 2))
    slots.put(_item("c", 0, 3))
    assert dropped == [("a", Reason.EVICTED)] and slots.qsize() == 2


def test_lossless_queue_is_bounded_in_frames_and_bytes() -> None:
    q = FrameQueue(max_frames=3, max_bytes=250)
    assert q.put(_item("a", 0, 0, side=10), timeout=0)  # 100 bytes
    assert q.put(_item("a", 1, 0, side=10), timeout=0)  # 200
    assert not q.put(_item("a", 2, 0, side=10), timeout=0)  # 300 > 250 bytes
    got = q.get(timeout=0)
    assert got is not None and got.header.seq == 0 and q.nbytes == 100
    big = FrameQueue(max_frames=3, max_bytes=10)
    assert big.put(_item("a", 0, 0, side=10), timeout=0)  # one frame always fits
    assert not big.put(_item("a", 1, 0, side=2), timeout=0)
    few = FrameQueue(max_frames=1, max_bytes=10**9)
    assert few.put(_item("a", 0, 0), timeout=0) and not few.put(_item("a", 1, 0), timeout=0)
