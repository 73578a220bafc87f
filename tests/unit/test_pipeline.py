"""Pipeline.process: one frame in, its messages out in publishing order; per-source state is
bounded and never reset by an uncalibrated frame."""

from __future__ import annotations

from types import SimpleNamespace
from typing import NoReturn

import numpy as np
import pytest

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.preview import PreviewConfig
from nanoscout.wire.errors import FrameError, Reason
from nanoscout.wire.headers import (
    AlertHeader,
    DetHeader,
    PreviewHeader,
    Stage,
    StatsHeader,
)
from nanoscout.wire.protocol import decode_message, encode


class _Detector:
    """Two square particles, always (enough to exercise measurement, statistics and rules)."""

    def __init__(self) -> None:
        self.keys: list[object] = []
        self.normalized: list[np.ndarray | None] = []

    def detect(self, pixels: np.ndarray, key: object = None, rotate45: bool | None = None,
               pixel_size_nm: float | None = None,
               normalized: np.ndarray | None = None) -> SimpleNamespace:
        self.keys.append(key)
        self.normalized.append(normalized)
        labels = np.zeros(pixels.shape, np.int32)
        labels[10:20, 10:20] = 1
        labels[30:44, 30:44] = 2
        return SimpleNamespace(labels=labels, scores=np.array([0, 0.95, 0.97], np.float32),
                               timings_ms={"engine": 1.0}, scale=1.0)


RULES = [{"name": "any", "kind": "count", "above": 0, "cooldown_s": 0}]


def _frame(source: str = "cam", seq: int = 0, px: float | None = 0.5, t: int = 1) -> Frame:
    return Frame.from_image(np.full((64, 64), 100, np.uint16), pixel_size_nm=px, source=source,
                            seq=seq, t_acq_ns=t, stage=Stage(x_um=1.0, y_um=2.0))


def _pipeline(**kw: object) -> tuple[Pipeline, _Detector]:
    det = _Detector()
    return Pipeline(det, rules=RULES, **kw), det  # type: ignore[arg-type]


def test_messages_come_in_publishing_order_with_one_frame_reference() -> None:
    pipe, det = _pipeline(preview=PreviewConfig())
    emitted: list[object] = []
    result = pipe.process(_frame(), emit=emitted.append)
    kinds = [type(m.header) for m in result.messages]
    assert kinds == [DetHeader, PreviewHeader, AlertHeader, StatsHeader]
    assert emitted == result.messages  # emitted as made, in the same order
    for m in result.messages:  # every result header shares the frame reference
        h = m.header
        assert (h.source, h.seq, h.t_acq_ns, h.stage) == ("cam", 0, 1, Stage(x_um=1, y_um=2))
        assert h.topic_seq == 0
        back = decode_message([bytes(p) for p in encode(m)])
        assert back.header == h
    assert result.det.n == 2 and result.det.units == "nm"
    stats = result.messages[-1].header
    assert isinstance(stats, StatsHeader)
    assert {"engine", "measure", "stats", "alerts"} <= set(stats.stage_ms)
    assert det.normalized[0] is not None  # normalised once, by the frame, for detector and preview
    result = pipe.process(_frame(seq=1))
    assert [m.header.topic_seq for m in result.messages] == [1, 1, 1]  # no preview: rate limit


def test_an_uncalibrated_frame_resets_nothing() -> None:
    pipe, _ = _pipeline()
    for seq in range(3):
        pipe.process(_frame(seq=seq))
    px_result = pipe.process(_frame(seq=3, px=None))
    px_stats = px_result.messages[-1].header
    assert isinstance(px_stats, StatsHeader) and px_stats.units == "px"
    assert px_stats.cumulative.count == 2  # its own statistics, in pixels
    nm_stats = pipe.process(_frame(seq=4)).messages[-1].header
    assert isinstance(nm_stats, StatsHeader) and nm_stats.units == "nm"
    assert nm_stats.cumulative.count == 8 and nm_stats.cumulative.n_frames == 4


def test_per_source_state_is_bounded_and_evictions_are_reported() -> None:
    pipe, _ = _pipeline(max_sources=2)
    assert pipe.process(_frame("a")).evicted == []
    assert pipe.process(_frame("b")).evicted == []
    pipe.process(_frame("a", seq=1))  # a is now the most recently seen
    assert pipe.process(_frame("c")).evicted == ["b"]
    assert pipe.sources == 2 and pipe.evicted_total == 1
    assert pipe.statistics("b") is None
    again = pipe.process(_frame("b", seq=5))  # b starts afresh
    assert again.evicted == ["a"] and again.det.topic_seq == 0
    with pytest.raises(ValueError, match="max_sources"):
        Pipeline(_Detector(), max_sources=0)  # type: ignore[arg-type]


def test_offline_pipelines_estimate_every_image_alone() -> None:
    live, det = _pipeline()
    live.process(_frame())
    offline, det_off = _pipeline(stream_scale=False)
    offline.process(_frame())
    assert det.keys == [("cam", 0.5)] and det_off.keys == [None]


def test_a_failing_summary_costs_only_the_summary() -> None:
    pipe, _ = _pipeline()

    def broken(*a: object, **k: object) -> NoReturn:
        raise RuntimeError("a rule broke")

    pipe.alert_engine.evaluate = broken  # type: ignore[method-assign]
    result = pipe.process(_frame())
    assert [type(m.header) for m in result.messages] == [DetHeader]
    assert [stage for stage, _ in result.failures] == ["summary"]


def test_frames_are_checked_once_at_construction() -> None:
    bad = np.ones((8, 8), np.float64)
    bad[2, 2] = np.nan
    with pytest.raises(FrameError) as e:
        Frame.from_image(bad, pixel_size_nm=1.0)
    assert e.value.reason is Reason.NONFINITE
    bad[2, 2] = 1e308
    with pytest.raises(FrameError) as e:
        Frame.from_image(bad, pixel_size_nm=1.0)
    assert e.value.reason is Reason.PIXEL_RANGE
    frame = _frame()
    assert frame.normalized is frame.normalized  # prepared once
    assert frame.float32.dtype == np.float32 and frame.units == "nm"
    assert frame.area_um2 == pytest.approx(64 * 64 * 0.5**2 / 1e6)
