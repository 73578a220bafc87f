"""Wire protocol v1: round trips and every way a message can be wrong."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np
import pytest

from nanoscout.wire.errors import MalformedMessage, PayloadError, ProtocolError, VersionError
from nanoscout.wire.particles import PARTICLE_DTYPE, empty_table
from nanoscout.wire.protocol import (
    AlertHeader,
    Buffer,
    ClassHeader,
    DetHeader,
    FrameHeader,
    HealthHeader,
    LensReply,
    LensRequest,
    StatsHeader,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
    frame_header,
    pack_header,
)


def _header(arr: np.ndarray, **kw: Any) -> FrameHeader:
    return frame_header(arr, source="cam-1", seq=7, t_acq_ns=123, pixel_size_nm=kw.pop("px", 0.25), **kw)


def _bytes(parts: Iterable[Buffer]) -> list[bytes]:
    return [bytes(p) for p in parts]


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.uint16).reshape(3, 4),
        np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],  # non-contiguous
        np.arange(6, dtype=">u2").reshape(2, 3),  # big-endian
        np.arange(6, dtype=">f8").reshape(3, 2),
        np.array([[-5, 7]], dtype=np.int32),
        np.zeros((1, 1), np.uint8),
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    ],
)
def test_frame_round_trip_keeps_values_and_dtype(arr: np.ndarray) -> None:
    h = _header(arr, modality="STEM", stage=(12.5, -3.0), magnification=2e5, meta={"file": "a.dm4"})
    header, out = decode_frame(_bytes(encode_frame(h, arr)))
    assert header == h
    assert out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    assert header.stage is not None and header.stage.x_um == 12.5


def test_contiguous_frame_is_sent_without_copy() -> None:
    arr = np.arange(16, dtype=np.uint16).reshape(4, 4)
    parts = encode_frame(_header(arr), arr)
    assert isinstance(parts[2], memoryview)
    assert np.shares_memory(np.frombuffer(parts[2], dtype=np.uint16), arr)


def test_zero_size_frame_is_refused() -> None:
    arr = np.zeros((0, 5), np.uint16)
    with pytest.raises(PayloadError, match="zero-size"):
        encode_frame(_header(arr), arr)


def test_payload_length_mismatch_names_both_lengths() -> None:
    arr = np.zeros((4, 4), np.uint16)
    parts = _bytes(encode_frame(_header(arr), arr))
    with pytest.raises(PayloadError, match="30 bytes but header announces 32") as e:
        decode_frame([parts[0], parts[1], parts[2][:-2]])
    assert e.value.reason == "length"


def test_oversized_frame_is_refused_before_reading_pixels() -> None:
    arr = np.zeros((64, 64), np.uint16)
    with pytest.raises(PayloadError, match="exceeds the limit") as e:
        decode_frame(_bytes(encode_frame(_header(arr), arr)), max_bytes=1000)
    assert e.value.reason == "oversized"


def test_array_and_header_must_agree() -> None:
    arr = np.zeros((4, 4), np.uint16)
    with pytest.raises(PayloadError, match="dtype"):
        encode_frame(_header(arr), arr.astype(np.uint8))
    with pytest.raises(PayloadError, match="shape"):
        encode_frame(_header(arr), arr[:2])
    with pytest.raises(PayloadError, match="2-D"):
        frame_header(np.zeros((2, 2, 3)), source="x", seq=0, t_acq_ns=0, pixel_size_nm=None)


@pytest.mark.parametrize(
    ("parts", "error", "reason"),
    [
        ([b"garbage"], MalformedMessage, "parts"),
        ([b"frame", b"\xc1", b""], MalformedMessage, "malformed"),
        ([b"frame", msgpack.packb([1, 2, 3]), b""], MalformedMessage, "malformed"),
        ([b"frame", msgpack.packb({"source": "a"}), b""], VersionError, "version"),
        ([b"frame", msgpack.packb({"v": [2, 0]}), b""], VersionError, "version"),
        ([b"frame", msgpack.packb({"v": [1, 0], "source": "a"}), b""], MalformedMessage, "header"),
    ],
)
def test_malformed_frames_raise_with_reason(
    parts: list[bytes], error: type[ProtocolError], reason: str
) -> None:
    with pytest.raises(error) as e:
        decode_frame(parts)
    assert e.value.reason == reason


def test_minor_version_with_unknown_fields_is_accepted() -> None:
    arr = np.zeros((2, 2), np.uint8)
    d = _header(arr).model_dump(mode="json") | {"v": [1, 9], "future_field": 42}
    header, _ = decode_frame([b"frame", msgpack.packb(d), arr.tobytes()])
    assert header.v == (1, 9)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dtype", "c8", "not supported"),
        ("dtype", "nonsense", "not a numpy dtype"),
        ("pixel_size_nm", 0.0, "absurd"),
        ("pixel_size_nm", float("nan"), "absurd"),
        ("pixel_size_nm", 1e9, "absurd"),
        ("particle_size_nm", [8.0, 2.0], "low <= high"),
        ("particle_size_nm", [0.0, 2.0], "low <= high"),
        ("particle_size_nm", [1.0, 1e12], "low <= high"),
        ("particle_size_nm", [1.0, float("nan")], "finite"),
        ("particle_size_nm", [1.0, 2.0, 3.0], "particle_size_nm"),
        ("particle_size_nm", "2-10", "particle_size_nm"),
        ("particle_size_px", [30.0, 3.0], "low <= high"),
        ("particle_size_px", [0.1, 3.0], "low <= high"),
        ("source", "has space", "source"),
        ("seq", -1, "seq"),
    ],
)
def test_header_fields_are_validated(field: str, value: object, match: str) -> None:
    arr = np.zeros((2, 2), np.uint8)
    d = _header(arr).model_dump(mode="json") | {field: value}
    with pytest.raises(MalformedMessage, match=match):
        decode_frame([b"frame", msgpack.packb(d), arr.tobytes()])


def test_a_particle_size_range_round_trips() -> None:
    arr = np.zeros((2, 2), np.uint8)
    sent = frame_header(arr, source="cam", seq=0, t_acq_ns=1, pixel_size_nm=0.5,
                        particle_size_nm=(2.0, 10.0), particle_size_px=(4.0, 20.0))
    header, _ = decode_frame(_bytes(encode_frame(sent, arr)))
    assert header.particle_size_nm == (2.0, 10.0) and header.particle_size_px == (4.0, 20.0)
    assert decode_frame(_bytes(encode_frame(_header(arr), arr)))[0].particle_size_nm is None


def test_uncalibrated_frame_round_trips_as_none() -> None:
    arr = np.zeros((2, 2), np.uint8)
    header, _ = decode_frame(_bytes(encode_frame(_header(arr, px=None), arr)))
    assert header.pixel_size_nm is None


def _table(n: int) -> np.ndarray:
    t = empty_table(n)
    t["id"] = np.arange(1, n + 1)
    t["ecd_nm"] = np.linspace(2, 40, n)
    t["bbox"] = [[1, 2, 3, 4]] * n
    return t


def test_det_message_round_trip_carries_the_particle_table() -> None:
    t = _table(5)
    h = DetHeader(source="cam-1", seq=3, t_acq_ns=1, t_recv_ns=2, t_done_ns=3_000_001,
                  stage_ms={"engine": 4.5}, pixel_size_nm=0.5, units="nm", n=5,
                  engine="onnxruntime-cpu")
    msg = decode_message(_bytes(encode_message(h, t)))
    assert msg.topic == "det.cam-1" and msg.kind == "det"
    assert msg.header == h
    assert msg.array is not None and msg.array.dtype == PARTICLE_DTYPE
    np.testing.assert_array_equal(msg.array, t)
    assert h.latency_ms == pytest.approx(3.0)


def test_det_table_length_must_match_n() -> None:
    h = DetHeader(source="a", seq=0, t_acq_ns=0, t_recv_ns=0, t_done_ns=0, stage_ms={}, pixel_size_nm=None,
                  units="px", n=2, engine="x")
    parts = _bytes(encode_message(h, _table(2)))
    with pytest.raises(PayloadError, match="n=2"):
        decode_message([parts[0], parts[1], parts[2][:-1]])
    with pytest.raises(PayloadError):
        encode_message(h, _table(3))


def test_other_results_round_trip() -> None:
    stats = StatsHeader(source="s", seq=1, t_ns=5, units="nm", window={"count": 3, "d50": 7.5},
                        cumulative={})
    alert = AlertHeader(source="s", seq=1, t_acq_ns=5, rule="big", kind="particle",
                        severity="warning", value=60.0, threshold=50.0,
                        explanation="particle 3 has ECD 60 nm > 50 nm", n=1)
    health = HealthHeader(t_ns=1, uptime_s=1.0, policy="live", engines={}, frames_received=1,
                          frames_processed=1, frames_dropped={"superseded": 2}, rejected={},
                          transport_gaps=0, queue_depth=0, fps=1.0, latency_ms_p50=None,
                          latency_ms_p99=None)
    cls = ClassHeader(source="s", seq=1, t_acq_ns=5, labels=["rods"], probabilities=[0.9],
                      heatmap_shape=(2, 3))
    heat = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert decode_message(_bytes(encode_message(stats))).header == stats
    a = decode_message(_bytes(encode_message(alert, _table(1))))
    assert a.header == alert and a.array is not None and len(a.array) == 1
    assert decode_message(_bytes(encode_message(health))).topic == "health"
    c = decode_message(_bytes(encode_message(cls, heat)))
    np.testing.assert_array_equal(c.array, heat)


def test_unknown_topic_and_frame_through_encode_message_are_refused() -> None:
    arr = np.zeros((2, 2), np.uint8)
    with pytest.raises(MalformedMessage, match="unknown topic"):
        decode_message([b"weird.x", pack_header(_header(arr))])
    with pytest.raises(PayloadError):
        encode_message(_header(arr))


def test_decode_message_handles_frames() -> None:
    arr = np.arange(4, dtype=np.uint8).reshape(2, 2)
    msg = decode_message(_bytes(encode_frame(_header(arr), arr)))
    assert msg.kind == "frame"
    np.testing.assert_array_equal(msg.array, arr)


def test_alert_with_heatmap_round_trip_and_mismatches() -> None:
    heat = np.arange(12, dtype=np.uint8).reshape(3, 4)
    h = AlertHeader(source="s", seq=1, t_acq_ns=2, rule="rods", kind="class",
                    severity="warning", value=0.95, threshold=0.9, explanation="x",
                    heatmap_shape=(3, 4))
    msg = decode_message(encode_message(h, empty_table(0), heat))
    assert msg.array is not None and len(msg.array) == 0
    np.testing.assert_array_equal(msg.heatmap, heat)
    with pytest.raises(PayloadError, match="heatmap of shape"):
        encode_message(h, empty_table(0))
    with pytest.raises(PayloadError, match="uint8 of shape"):
        encode_message(h, empty_table(0), heat.astype(np.float32))
    parts = encode_message(h, empty_table(0), heat)
    with pytest.raises(PayloadError, match="does not match heatmap_shape"):
        decode_message([*parts[:3], b"\x00" * 5])
    # an alert without heatmap_shape keeps the v1.1 layout: three parts
    plain = AlertHeader(**{**h.model_dump(), "heatmap_shape": None})
    assert len(encode_message(plain, empty_table(0))) == 3


def test_a_heatmap_shape_that_cannot_be_is_a_protocol_error() -> None:
    """Negative or zero sides once passed the header and broke numpy's reshape (a ValueError
    that ended the daemon's query thread): the header refuses them, and a reader never sees
    anything but a ProtocolError."""
    base = {"v": [1, 6], "source": "x", "seq": 0, "t_acq_ns": 0, "labels": [],
            "probabilities": []}
    for shape, extra in (([-2, -3], [b"\x00" * 6]), ([0, -1], [b""]), ([2, 3], [b"\x00" * 5])):
        parts = [b"class.x", msgpack.packb({**base, "heatmap_shape": shape}), *extra]
        with pytest.raises(ProtocolError):
            decode_message(parts)


def test_lens_request_and_reply_round_trip() -> None:
    req = decode_message(encode_message(LensRequest(source="cam", outputs=["act_enc1"])))
    assert isinstance(req.header, LensRequest) and req.header.outputs == ["act_enc1"]
    maps = np.linspace(0, 1, 24, dtype=np.float32).reshape(1, 2, 3, 4)
    rep = LensReply(source="cam", seq=4, outputs=["act_enc1"], shapes=[[1, 2, 3, 4]])
    msg = decode_message(encode_message(rep, maps))
    assert msg.extra[0].dtype == np.float16 and msg.extra[0].shape == (1, 2, 3, 4)
    np.testing.assert_allclose(msg.extra[0], maps, atol=1e-3)
    with pytest.raises(PayloadError, match="one array per shape"):
        encode_message(rep)
    with pytest.raises(PayloadError, match="does not match shape"):
        decode_message([*encode_message(rep, maps)[:2], b"\x00\x00"])


def test_a_control_request_sets_or_clears_a_sources_particle_size_range() -> None:
    from nanoscout.wire.protocol import ControlRequest

    req = ControlRequest(source="cam", action="set_particle_size", particle_size_nm=(2.0, 10.0))
    back = decode_message(_bytes(encode_message(req)))
    assert back.header == req and back.header.particle_size_nm == (2.0, 10.0)
    assert ControlRequest(source="cam", action="set_particle_size").particle_size_nm is None
    with pytest.raises(ValueError, match="needs a source"):
        ControlRequest(action="set_particle_size", particle_size_nm=(2.0, 10.0))
    with pytest.raises(ValueError, match="low <= high"):
        ControlRequest(source="cam", action="set_particle_size", particle_size_nm=(10.0, 2.0))
    with pytest.raises(ValueError, match="belongs to set_particle_size"):
        ControlRequest(source="cam", action="reset_statistics", particle_size_nm=(2.0, 10.0))


def test_text_that_is_not_utf8_is_a_protocol_error_and_wire_text_makes_it_printable() -> None:
    """A file name's undecodable bytes (surrogate escapes) raised UnicodeEncodeError from
    msgpack; wire_text turns them into backslash escapes."""
    from nanoscout.wire.codec import pack_header, wire_text

    name = "lat\udce9in.png"
    header = frame_header(np.zeros((2, 2), np.uint8), source="s", seq=0, t_acq_ns=1,
                          pixel_size_nm=None, meta={"file": name})
    with pytest.raises(MalformedMessage, match="not valid UTF-8"):
        pack_header(header)
    assert wire_text(name) == "lat\\xe9in.png" and wire_text("a\ud800") == "a\\ud800"
    assert wire_text("µm ok") == "µm ok"
    pack_header(header.model_copy(update={"meta": {"file": wire_text(name)}}))


def _det_raw(**kw: Any) -> dict[str, Any]:
    return {"v": [1, 10], "source": "bad", "seq": 1, "t_acq_ns": 1, "t_recv_ns": 2,
            "t_done_ns": 3, "pixel_size_nm": 1.0, "units": "nm", "n": 0, "engine": "e",
            "shape": [128, 128]} | kw


def _stats_raw(**kw: Any) -> dict[str, Any]:
    return {"v": [1, 10], "source": "bad", "seq": 1, "t_ns": 5, "units": "nm",
            "window": {"n_frames": 1, "count": 3}, "cumulative": {"n_frames": 1, "count": 3}} | kw


_HUGE = 2**64 - 1


@pytest.mark.parametrize(("topic", "header", "match"), [
    # a det in nm that no client can convert to px (and the run file cannot store)
    ("det", _det_raw(pixel_size_nm=None), "units nm needs a pixel_size_nm"),
    ("det", _det_raw(pixel_size_nm=-2.0), "absurd"),
    ("det", _det_raw(pixel_size_nm=0.0), "absurd"),
    ("det", _det_raw(pixel_size_nm=float("nan")), "absurd"),
    ("det", _det_raw(units="px", pixel_size_nm=-2.0), "absurd"),
    # integers beyond int64: no int64 column (run file, pandas) holds them
    ("det", _det_raw(shape=[_HUGE, 5]), "shape"),
    ("det", _det_raw(shape=[-1, 5]), "shape"),
    ("det", _det_raw(n=_HUGE), "n"),
    ("stats", _stats_raw(t_ns=_HUGE), "t_ns"),
    ("stats", _stats_raw(t_ns=-(2**63)), "t_ns"),
    ("stats", _stats_raw(window={"n_frames": _HUGE, "count": 1}), "window.n_frames"),
    ("stats", _stats_raw(cumulative={"n_frames": 1, "count": _HUGE}), "cumulative.count"),
    ("stats", _stats_raw(window={"histograms": {"ecd": {"counts": [1, _HUGE]}}}), "counts"),
    ("preview", {"v": [1, 10], "source": "bad", "seq": 1, "shape": [_HUGE, 2],
                 "size": [2, 2], "scale": 0.5}, "shape"),
    # bytes where a client writes JSON
    ("det", _det_raw(meta={"file": "x.tif", "blob": b"\xff\x00"}), "meta"),
    ("stats", _stats_raw(window={"n_frames": 1, "count": 1, "junk": b"\xff\xfe"}), "junk"),
    ("stats", _stats_raw(window={"ecd": {"d50": 7.0, "more": [1, {"x": b"\x00"}]}}), "more"),
    ("stats", _stats_raw(clusters={"k": 2, "items": [{"id": 0, "name": b"\x01"}]}),
     "clusters"),
    ("stats", _stats_raw(clusters={"k": _HUGE}), "clusters"),
    # a class whose labels have no probabilities (tail showed labels[0] with probabilities[0])
    ("class", {"v": [1, 10], "source": "bad", "seq": 1, "labels": ["film"],
               "probabilities": []}, "1 labels but 0 probabilities"),
    ("class", {"v": [1, 10], "source": "bad", "seq": 1, "labels": [],
               "probabilities": [0.5]}, "0 labels but 1 probabilities"),
])
def test_result_headers_clients_cannot_handle_are_refused_at_decode(
        topic: str, header: dict[str, Any], match: str) -> None:
    """Each passed the schema once and then broke a client: ``record`` (an nm table without a
    pixel size, int64 overflow at flush, bytes in JSON columns), ``tail`` (IndexError on a
    class without probabilities), the SDK's ``to_pandas``. They are header errors now."""
    parts = [f"{topic}.bad".encode(), msgpack.packb(header, use_bin_type=True)]
    if topic == "det":
        parts.append(b"")
    elif topic == "preview":
        parts.append(b"\x00" * 4)
    with pytest.raises(MalformedMessage, match=match) as info:
        decode_message(parts)
    assert info.value.reason == "header"


def test_a_heartbeat_with_impossible_counts_or_rates_is_refused() -> None:
    """A hostile ``health`` (2**64-1 frames, a NaN rate, a negative latency) decoded and was
    shown as it came; counts are int64 and not negative, rates and times finite now."""
    base = HealthHeader(t_ns=1, uptime_s=1.0, policy="live", engines={}, frames_received=3,
                        frames_processed=2, frames_dropped={"superseded": 1}, rejected={},
                        transport_gaps=0, queue_depth=0, fps=2.5, latency_ms_p50=10.0,
                        latency_ms_p99=None).model_dump(mode="json")
    assert isinstance(decode_message([b"health", msgpack.packb(base)]).header, HealthHeader)
    for bad in ({"frames_received": 2**64 - 1}, {"fps": float("nan")}, {"uptime_s": -1.0},
                {"latency_ms_p99": float("inf")}, {"rejected": {"header": -2}},
                {"latency_ms_p50": -0.5}):
        with pytest.raises(MalformedMessage, match="health header field") as info:
            decode_message([b"health", msgpack.packb({**base, **bad})])
        assert info.value.reason == "header", bad


def test_a_result_whose_topic_names_another_source_is_refused() -> None:
    """``det.camA`` carrying a header of ``camB`` was accepted: ``tail`` filed it under camB,
    the dashboard's loss counters under camA. The topic is the header's own, or a topic
    error."""
    good = [b"det.bad", msgpack.packb(_det_raw(), use_bin_type=True), b""]
    assert isinstance(decode_message(good).header, DetHeader)
    for topic in (b"det.other", b"det", b"det.bad.x"):
        with pytest.raises(MalformedMessage, match="does not name the header's source") as info:
            decode_message([topic, *good[1:]])
        assert info.value.reason == "topic"
    stats = msgpack.packb(_stats_raw(), use_bin_type=True)
    with pytest.raises(MalformedMessage, match="does not name"):
        decode_message([b"stats.elsewhere", stats])


def test_valid_result_headers_still_decode_and_the_daemon_cannot_build_a_bad_det() -> None:
    for header in (_det_raw(), _det_raw(units="px", pixel_size_nm=None),
                   _det_raw(shape=[0, 0], meta={"file": "a.tif", "index": 3, "ok": None}),
                   _det_raw(units="px", pixel_size_nm=0.5)):
        msg = decode_message([b"det.bad", msgpack.packb(header, use_bin_type=True), b""])
        assert isinstance(msg.header, DetHeader)
    stats = _stats_raw(t_ns=2**63 - 1, window={"n_frames": 2, "count": 3, "newer": [1.5, "a"]},
                       clusters={"k": 2, "items": [{"id": 0, "centre": {"ecd": None}}]})
    msg = decode_message([b"stats.bad", msgpack.packb(stats, use_bin_type=True)])
    assert isinstance(msg.header, StatsHeader) and msg.header.window["newer"] == [1.5, "a"]
    with pytest.raises(ValueError, match="units nm needs a pixel_size_nm"):
        DetHeader(source="a", seq=0, t_recv_ns=0, t_done_ns=0, pixel_size_nm=None,
                  units="nm", n=0, engine="x")
    with pytest.raises(ValueError, match="labels but"):
        ClassHeader(source="a", seq=0, labels=["a", "b"], probabilities=[1.0])
