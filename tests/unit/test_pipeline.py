"""Pipeline.process: one frame in, its messages out in publishing order; per-source state is
bounded and never reset by an uncalibrated frame."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, NoReturn

import numpy as np
import pytest

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.preview import PreviewConfig
from nanoscout.analysis.stats import StatsConfig
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
        self.particle_px: list[tuple[float, float] | None] = []

    def detect(self, pixels: np.ndarray, key: object = None, rotate45: bool | None = None,
               pixel_size_nm: float | None = None,
               normalized: np.ndarray | None = None,
               particle_px: tuple[float, float] | None = None) -> SimpleNamespace:
        self.keys.append(key)
        self.normalized.append(normalized)
        self.particle_px.append(particle_px)
        labels = np.zeros(pixels.shape, np.int32)
        labels[10:20, 10:20] = 1
        labels[30:44, 30:44] = 2
        # its "estimate" is 10-14 px: a range that holds 12 px agrees with it
        hint = None if particle_px is None else (
            "agreed" if particle_px[0] <= 12.0 <= particle_px[1] else "applied")
        return SimpleNamespace(labels=labels, scores=np.array([0, 0.95, 0.97], np.float32),
                               timings_ms={"engine": 1.0}, scale=1.0, size_hint=hint)


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
    assert frame.units == "nm"
    assert frame.area_um2 == pytest.approx(64 * 64 * 0.5**2 / 1e6)


def test_confidence_rules_follow_the_calibrated_scores_of_real_detections() -> None:
    """The shipped detector (calibrated) on a synthetic frame, with no score cut so that some
    detections are unconvincing: a particle rule with min_confidence fires on exactly the
    particles at least that probable, carries the confidence over the wire, and does not
    fire when the same detections come with raw scores."""
    from pathlib import Path

    pytest.importorskip("onnxruntime")
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import create_engine
    from nanoscout.sim.synthetic import SpecimenConfig, render

    onnx = Path(__file__).resolve().parents[2] / "models" / "weights" / "detector.onnx"
    if not onnx.is_file():
        pytest.skip(f"no shipped detector at {onnx}")
    card = ModelCard.load(onnx.with_suffix(".json"))
    engine = create_engine(onnx, "onnxruntime-cpu", threads=1)
    image = render(SpecimenConfig(shape=(384, 384), pixel_size_nm=0.5), 3).image
    frame = Frame.from_image(image, pixel_size_nm=0.5, source="cam", seq=0, t_acq_ns=1)

    probe = Pipeline(Detector(engine, card, scale=1.0, min_score=0.0)).process(frame)
    inside = probe.table[~probe.table["border"]]
    conf = np.sort(inside["score"])
    assert probe.calibrated and conf[0] < 0.9 and 0.97 < conf[-1] < 0.999
    cut = 0.95  # some particles are at least this probable, some are not
    rules = [{"name": "sure", "kind": "particle", "where": {}, "min_confidence": cut,
              "cooldown_s": 0},
             {"name": "none-so-sure", "kind": "particle", "where": {},
              "min_confidence": float(conf[-1]) + 1e-3},
             {"name": "real", "kind": "count", "above": 0, "count": "expected"}]
    weighted = StatsConfig(weights="confidence")
    pipe = Pipeline(Detector(engine, card, scale=1.0, min_score=0.0), rules=rules,
                    stats_config=weighted)
    result = pipe.process(frame)
    stats = decode_message([bytes(p) for p in encode(result.messages[-1])]).header
    assert isinstance(stats, StatsHeader) and stats.weights == "confidence"
    assert stats.window.expected_count == pytest.approx(float(inside["score"].sum()), rel=1e-5)
    assert stats.window.count == len(inside)
    alerts = {m.header.rule: m for m in result.messages if isinstance(m.header, AlertHeader)}
    assert set(alerts) == {"sure", "real"}
    sure = decode_message([bytes(p) for p in encode(alerts["sure"])])
    assert isinstance(sure.header, AlertHeader) and sure.header.confidence is not None
    assert sure.header.confidence >= cut
    assert (sure.array["score"] >= np.float32(cut)).all()  # type: ignore[index]
    assert len(sure.array) == min(20, int((inside["score"] >= np.float32(cut)).sum()))  # type: ignore[arg-type]
    assert alerts["real"].header.value == pytest.approx(float(inside["score"].sum()), rel=1e-5)

    raw_card = card.model_copy(update={"score_calibration": None})
    raw = Pipeline(Detector(engine, raw_card, scale=1.0, min_score=0.0), rules=rules,
                   stats_config=weighted)
    messages = raw.process(frame).messages
    assert not [m for m in messages if isinstance(m.header, AlertHeader)]
    # raw scores weigh every particle 1, and the stats message says so
    assert isinstance(messages[-1].header, StatsHeader) and messages[-1].header.weights == "none"
    assert messages[-1].header.window.expected_count == len(inside)
    assert raw.alert_engine.skipped_raw_scores == {"sure": 1, "none-so-sure": 1, "real": 1}


def test_a_size_range_in_nm_reaches_the_detector_in_px_where_the_frame_has_a_pixel_size() -> None:
    """The frame's own ``particle_size_nm`` first, else the pipeline's (``engine.
    particle_size_nm``); a frame without a pixel size cannot use one, and its ``det`` says so."""
    pipe, det = _pipeline(particle_size_nm=(4.0, 8.0))
    first = pipe.process(_frame(px=0.5))
    assert det.particle_px[-1] == (8.0, 16.0) and first.det.size_hint == "agreed"
    own = Frame.from_image(np.full((64, 64), 100, np.uint16), pixel_size_nm=0.25, source="cam",
                           seq=1, t_acq_ns=2, particle_size_nm=(1.0, 2.0))
    assert pipe.process(own).det.size_hint == "applied"
    assert det.particle_px[-1] == (4.0, 8.0)
    bare = pipe.process(_frame(seq=2, px=None))
    assert det.particle_px[-1] is None and bare.det.size_hint == "uncalibrated"
    back = decode_message([bytes(p) for p in encode(bare.messages[0])])
    assert back.header.size_hint == "uncalibrated"  # on the wire too (protocol 1.8)
    plain, det = _pipeline()
    assert plain.process(_frame()).det.size_hint is None and det.particle_px == [None]


def test_a_size_range_in_px_serves_frames_without_a_pixel_size() -> None:
    """``particle_size_px`` (the frame's, else the pipeline's) is the range where none in nm
    can be used: a frame without a pixel size, or a calibrated one with no range in nm."""
    pipe, det = _pipeline(particle_size_nm=(4.0, 8.0), particle_size_px=(10.0, 30.0))
    assert pipe.process(_frame(px=None)).det.size_hint == "agreed"
    own = Frame.from_image(np.full((64, 64), 100, np.uint16), pixel_size_nm=None,
                           source="cam", seq=1, t_acq_ns=2, particle_size_px=(20.0, 40.0))
    assert pipe.process(own).det.size_hint == "applied"
    calibrated = Frame.from_image(np.full((64, 64), 100, np.uint16), pixel_size_nm=0.5,
                                  source="cam", seq=2, t_acq_ns=3, particle_size_px=(20.0, 40.0))
    pipe.process(calibrated)
    assert det.particle_px == [(10.0, 30.0), (20.0, 40.0), (8.0, 16.0)]
    px_only, det = _pipeline(particle_size_px=(10.0, 30.0))
    assert px_only.process(_frame()).det.size_hint == "agreed"  # calibrated, no range in nm
    assert det.particle_px == [(10.0, 30.0)]


def test_a_source_given_its_own_size_range_uses_it_until_cleared() -> None:
    """``set_particle_size`` (the control request): the source's frames that name no range
    get its range instead of the pipeline's; a frame's own range still wins; None clears it."""
    pipe, det = _pipeline(particle_size_nm=(4.0, 8.0))
    pipe.set_particle_size("cam", (1.0, 2.0))
    pipe.process(_frame())
    pipe.process(_frame("other"))
    assert det.particle_px == [(2.0, 4.0), (8.0, 16.0)]  # 0.5 nm/px
    own = Frame.from_image(np.full((64, 64), 100, np.uint16), pixel_size_nm=0.5, source="cam",
                           seq=1, t_acq_ns=2, particle_size_nm=(3.0, 6.0))
    pipe.process(own)
    pipe.set_particle_size("cam", None)
    pipe.process(_frame(seq=2))
    assert det.particle_px[2:] == [(6.0, 12.0), (8.0, 16.0)]
    pipe.set_particle_size("gone", (1.0, 2.0))
    pipe.forget("gone")
    assert "gone" not in pipe._source_sizes


def test_whether_the_scale_was_agreed_reaches_the_det_and_the_wire() -> None:
    """``det.scale_agreed`` (protocol 1.10) is the detection's; None from a detector without
    the field."""

    class Unagreed(_Detector):
        def detect(self, pixels: np.ndarray, **kw: Any) -> SimpleNamespace:  # type: ignore[override]
            found = super().detect(pixels, **kw)
            found.scale_agreed = False
            return found

    pipe = Pipeline(Unagreed(), rules=RULES)  # type: ignore[arg-type]
    result = pipe.process(_frame())
    assert result.det.scale_agreed is False
    back = decode_message([bytes(p) for p in encode(result.messages[0])])
    assert back.header.scale_agreed is False
    plain, _ = _pipeline()
    assert plain.process(_frame()).det.scale_agreed is None


def test_an_analysed_frame_holds_only_its_pixels() -> None:
    """The daemon keeps frames after their analysis (for review, bounded by ``[review]
    max_bytes`` counted in pixel bytes; the lens's newest frame per source): each also held
    its normalised float32 copy, twice a uint16 frame's own bytes (long-run audit: 64 MiB of
    kept 1024² uint16 frames took 158 MB). Released after the analysis, raised or not."""
    pipe, det = _pipeline(preview=PreviewConfig())
    frame = _frame()
    pipe.process(frame)
    assert det.normalized[-1] is not None  # the detector was given the normalised copy
    assert "normalized" not in vars(frame)
    assert frame.normalized.dtype == np.float32  # prepared again when asked

    class _Failing(_Detector):
        def detect(self, pixels: np.ndarray, **kw: Any) -> SimpleNamespace:  # type: ignore[override]
            super().detect(pixels, **kw)
            raise FrameError("engine gone", reason=Reason.ENGINE_FAILURE)

    failing = Pipeline(_Failing(), rules=RULES, preview=PreviewConfig())  # type: ignore[arg-type]
    frame = _frame()
    with pytest.raises(FrameError):
        failing.process(frame)
    assert "normalized" not in vars(frame)
