"""The lens query server (nanoscout.daemon.query) answers every request, good or bad, over real REQ/REP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from nanoscout.analysis.classifier import FieldClassifier
from nanoscout.analysis.frame import Frame
from nanoscout.clients.query import (
    QueryError,
    request_control,
    request_lens,
    save_frame,
    swap_model,
)
from nanoscout.daemon.query import LensServer
from nanoscout.wire.errors import NanoscoutError
from nanoscout.wire.protocol import ControlReply, ControlRequest, FrameHeader, decode_message
from tests.unit.test_classifier import S, _load, classifier_model, lens_model


def _guard(fn: Callable[[], None]) -> Callable[[], None]:
    return fn


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[LensServer, str]]:
    engine, card = _load(*classifier_model(tmp_path))
    lens, lens_card = _load(*lens_model(tmp_path))
    clf = FieldClassifier(engine, card, lens=lens, lens_card=lens_card)
    srv = LensServer(zmq.Context.instance(), clf)
    endpoint = srv.start("tcp://127.0.0.1:0", _guard)
    yield srv, endpoint
    srv.stop()


def _header(seq: int) -> FrameHeader:
    return FrameHeader(source="cam", seq=seq, t_acq_ns=123, shape=(64, 64), dtype="uint16",
                       pixel_size_nm=0.5)


def test_lens_maps_of_the_newest_frame(server: tuple[LensServer, str]) -> None:
    srv, endpoint = server
    frame = np.random.default_rng(3).integers(0, 4000, (64, 64)).astype(np.uint16)
    srv.offer(Frame(_header(1), np.zeros((64, 64), np.uint16)))
    srv.offer(Frame(_header(2), frame))
    reply, maps = request_lens(endpoint, "cam", ["act_enc1"])
    assert reply.seq == 2 and reply.available == ["error", "act_enc1"]
    assert srv.classifier is not None
    want = srv.classifier.lens_outputs(frame)["act_enc1"]
    assert maps["act_enc1"].shape == (1, 1, S // 2, S // 2)
    np.testing.assert_allclose(maps["act_enc1"], want, atol=2e-3)  # float16 on the wire
    assert reply.novelty == pytest.approx(srv.classifier.classify(frame).novelty, rel=1e-6)
    assert srv.answered == 1


def test_refusals_are_answers_not_hangs(server: tuple[LensServer, str]) -> None:
    srv, endpoint = server
    with pytest.raises(QueryError, match="no frame of source 'cam' analysed yet"):
        request_lens(endpoint, "cam", ["act_enc1"])
    srv.offer(Frame(_header(5), np.ones((64, 64), np.uint16)))
    with pytest.raises(QueryError, match="unknown lens output 'act_x'.*available"):
        request_lens(endpoint, "cam", ["act_x"])
    bad = srv.answer([b"det.cam", b"\x80"])
    assert "bad request" in decode_message(bad).header.error
    assert srv.refused == 3


def test_a_blank_frame_is_refused_naming_it(tmp_path: Path) -> None:
    """The shipped lens, over real REQ/REP: the newest frame of a blanked beam (every pixel 0)
    was answered with a novelty of 88; it is now refused with an error naming the frame and
    counted as refused, by the criterion under which the pipeline does not classify it. The
    next frame with contrast is answered."""
    pytest.importorskip("onnxruntime")
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import create_engine

    weights = Path(__file__).resolve().parents[2] / "models" / "weights"
    cards = {name: weights / f"{name}.json" for name in ("classifier", "lens")}
    if not all(path.is_file() for path in cards.values()):
        pytest.skip(f"no shipped classifier and lens in {weights}")
    loaded = {name: ModelCard.load(path) for name, path in cards.items()}
    engines = {name: create_engine(card.onnx_path(cards[name]), "cpu", threads=1)
               for name, card in loaded.items()}
    clf = FieldClassifier(engines["classifier"], loaded["classifier"], lens=engines["lens"],
                          lens_card=loaded["lens"])
    outcomes: list[str] = []
    srv = LensServer(zmq.Context.instance(), clf, count=outcomes.append)
    endpoint = srv.start("tcp://127.0.0.1:0", _guard)
    try:
        srv.offer(Frame(_header(7), np.zeros((64, 64), np.uint16)))
        # the frame named as it came (uint16), not as a float32 copy of it
        with pytest.raises(QueryError, match=r"frame cam#7: blank frame \(64x64 uint16, every "
                                             r"pixel 0\).*the lens's 256x256 input is 0"):
            request_lens(endpoint, "cam", ["act_enc1"])
        assert outcomes == ["refused"] and srv.answered == 0
        noise = np.random.default_rng(8).normal(1000, 20, (64, 64)).astype(np.uint16)
        srv.offer(Frame(_header(8), noise))
        reply, maps = request_lens(endpoint, "cam", ["act_enc1"])
        assert reply.seq == 8 and reply.novelty is not None and np.isfinite(reply.novelty)
        assert maps["act_enc1"].ndim == 4 and outcomes == ["refused", "answered"]
    finally:
        srv.stop()


def test_no_daemon_gives_a_timeout_error() -> None:
    with pytest.raises(QueryError, match="no answer .* within 0.3 s"):
        request_lens("tcp://127.0.0.1:9", "cam", [], timeout=0.3)


def test_impossible_control_requests_are_value_errors_before_anything_is_sent() -> None:
    """Once pydantic ValidationError tracebacks from ``save-frame --frames 0`` and ``models
    swap --sha256 XYZ`` (no daemon needed: nothing is sent)."""
    with pytest.raises(ValueError, match="save_frame: frames: Input should be greater"):
        save_frame("tcp://127.0.0.1:9", "cam", 0, timeout=0.3)
    with pytest.raises(ValueError, match="swap_model: sha256: .*'XYZ' must be 64"):
        swap_model("tcp://127.0.0.1:9", "detector.onnx", "XYZ", timeout=0.3)


def test_a_classifier_without_lens_or_control_cannot_serve(tmp_path: Path) -> None:
    engine, card = _load(*classifier_model(tmp_path))
    with pytest.raises(NanoscoutError, match="needs the lens"):
        LensServer(zmq.Context.instance(), FieldClassifier(engine, card))


def test_control_requests_reach_the_handler_and_refusals_come_back() -> None:
    seen: list[tuple[str, str]] = []

    def control(req: ControlRequest) -> ControlReply:
        if req.source == "off":
            raise ValueError("set_drift_reference needs tracking ([tracking] enabled)")
        assert req.source is not None
        seen.append((req.source, req.action))
        return ControlReply(source=req.source, action=req.action, ok=True)

    srv = LensServer(zmq.Context.instance(), None, control=control)
    endpoint = srv.start("tcp://127.0.0.1:0", _guard)
    try:
        reply = request_control(endpoint, "cam", "reset_statistics")
        assert reply.ok and reply.action == "reset_statistics"
        request_control(endpoint, "cam", "set_drift_reference")
        assert seen == [("cam", "reset_statistics"), ("cam", "set_drift_reference")]
        with pytest.raises(QueryError, match="needs tracking"):
            request_control(endpoint, "off", "set_drift_reference")
        with pytest.raises(ValueError, match="unknown control action 'explode'"):
            request_control(endpoint, "cam", "explode")
        bad = decode_message(srv.answer([b"control_request.cam", b"\x80"]))
        assert bad.kind == "control" and "bad request" in bad.header.error
        # without a lens, lens requests are refused in words
        with pytest.raises(QueryError, match="no lens is loaded"):
            request_lens(endpoint, "cam", [])
        assert srv.answered == 2 and srv.refused == 3
    finally:
        srv.stop()


def test_no_request_can_end_the_server_and_each_is_counted() -> None:
    """A class or alert message with an impossible heatmap shape (it once ended the daemon's
    query thread, and so the daemon), a request over 64 KiB (it was dropped unanswered, and
    the REQ client hung) and a handler that fails: each gets an error reply and a count."""
    import msgpack

    outcomes: list[str] = []

    def control(req: ControlRequest) -> ControlReply:
        raise RuntimeError("a bug in the handler")

    srv = LensServer(zmq.Context.instance(), None, control=control, count=outcomes.append)
    endpoint = srv.start("tcp://127.0.0.1:0", _guard)
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    try:
        bad_heat = {"v": [1, 6], "source": "x", "seq": 0, "t_acq_ns": 0, "labels": [],
                    "probabilities": [], "heatmap_shape": [-2, -3]}
        for parts in ([b"class.x", msgpack.packb(bad_heat), b"\x00" * 6],
                      [b"alert.x", msgpack.packb({**bad_heat, "heatmap_shape": [0, -1]})],
                      [b"control_request.cam", b"\x80" * 70_000]):
            sock.send_multipart(parts)
            reply = decode_message(sock.recv_multipart())
            assert "bad request" in reply.header.error, reply.header
        assert "70019 bytes exceeds 65536" in reply.header.error
        with pytest.raises(QueryError, match="internal error.*a bug in the handler"):
            request_control(endpoint, "cam", "reset_statistics")
        assert outcomes == ["refused"] * 4 and srv.refused == 4
        assert srv._thread is not None and srv._thread.is_alive()
    finally:
        sock.close()
        srv.stop()
