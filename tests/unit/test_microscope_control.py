"""The microscope's control socket: messages, simulated stage, ControlServer and ControlClient."""

from __future__ import annotations

import math
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import zmq

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import ControlClient, ControlError, ControlServer
from nanoscout.clients.microscope.interfaces import (
    AcquisitionSettings,
    Exposure,
    ReportsSettings,
    StageError,
    StageLimits,
)
from nanoscout.clients.microscope.messages import (
    CONTROL_VERSION,
    ControlReply,
    ControlRequest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from nanoscout.clients.microscope.simulated import (
    SimulatedMicroscopeOptions,
    SimulatedStage,
    build,
)
from nanoscout.sim.virtual_specimen import VirtualSpecimenConfig
from nanoscout.wire.errors import MalformedMessage, PayloadError, VersionError
from nanoscout.wire.protocol import decode_frame

# ------------------------------------------------------------------------------ messages


def _raw(**fields: object) -> list[bytes]:
    """A request map packed by hand (bypassing the model's own checks)."""
    data: dict[str, object] = {"v": list(CONTROL_VERSION)}
    data.update(fields)
    return [msgpack.packb(data, use_bin_type=True)]


@pytest.mark.parametrize("req", [
    ControlRequest(op="status"),
    ControlRequest(op="move", x_um=-12.5, y_um=1e3),
    ControlRequest(op="acquire", pixel_size_nm=0.25, shape=(512, 1024), tag="survey"),
    ControlRequest(op="acquire", pixel_size_nm=80.0, shape=(16, 16)),
    ControlRequest(op="crop", seq=7, row=10.5, col=-3.0, half_px=32),
], ids=["status", "move", "acquire-tag", "acquire", "crop"])
def test_request_round_trip(req: ControlRequest) -> None:
    parts = encode_request(req)
    assert len(parts) == 1 and isinstance(parts[0], bytes)
    assert decode_request(parts) == req
    assert decode_request([memoryview(parts[0])]) == req


def test_reply_round_trip() -> None:
    reply = ControlReply(op="acquire", source="cam0", seq=3, stage=(1.5, -2.0),
                         pixel_size_nm=20.0, shape=(64, 32), t_acq_ns=123, exposure_s=0.5,
                         image_to_stage=((0.0, -1.0), (1.0, 0.0)), frames=4)
    got, crop = decode_reply(encode_reply(reply))
    assert got == reply and crop is None
    refused = ControlReply(op="move", ok=False, error="x = 5 µm is outside")
    assert decode_reply(encode_reply(refused))[0] == refused


@pytest.mark.parametrize("op,fields,missing", [
    ("move", {}, "move needs x_um, y_um"),
    ("move", {"x_um": 1.0}, "move needs y_um"),
    ("acquire", {}, "acquire needs pixel_size_nm, shape"),
    ("acquire", {"shape": [64, 64]}, "acquire needs pixel_size_nm"),
    ("crop", {}, "crop needs seq, row, col"),
    ("crop", {"seq": 1, "col": 2.0}, "crop needs row"),
])
def test_missing_fields_are_named(op: str, fields: dict[str, object], missing: str) -> None:
    with pytest.raises(MalformedMessage, match=missing + "$"):
        decode_request(_raw(op=op, **fields))
    with pytest.raises(ValueError, match=missing):
        ControlRequest(op=op, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value", [("x_um", math.nan), ("x_um", math.inf),
                                         ("y_um", -math.inf)])
def test_non_finite_position_is_refused(field: str, value: float) -> None:
    fields: dict[str, object] = {"x_um": 1.0, "y_um": 2.0, field: value}
    with pytest.raises(MalformedMessage, match=f"{field} = .* is not finite"):
        decode_request(_raw(op="move", **fields))


@pytest.mark.parametrize("fields,match", [
    ({"op": "fly"}, "op"),
    ({"op": "acquire", "pixel_size_nm": -1.0, "shape": [64, 64]}, "pixel_size_nm"),
    ({"op": "acquire", "pixel_size_nm": 1.0, "shape": [8, 64]}, "shape"),
    ({"op": "crop", "seq": 0, "row": 1.0, "col": 1.0, "half_px": 10_000}, "half_px"),
])
def test_bad_field_values_are_named(fields: dict[str, object], match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_request(_raw(**fields))


def test_wrong_major_version_is_refused() -> None:
    parts = [msgpack.packb({"v": [2, 0], "op": "status"})]
    with pytest.raises(VersionError, match="2"):
        decode_request(parts)
    with pytest.raises(VersionError):
        decode_request([msgpack.packb({"op": "status"})])  # no version at all
    with pytest.raises(VersionError):
        decode_reply([msgpack.packb({"v": [0, 9], "op": "status"})])
    # a newer minor version with unknown fields is fine
    req = decode_request([msgpack.packb({"v": [1, 7], "op": "status", "future": 1})])
    assert req.op == "status"


@pytest.mark.parametrize("parts,match", [
    ([b"\xc1"], "not valid msgpack"),
    ([b"\x92\x01"], "not valid msgpack"),  # truncated array
    ([msgpack.packb([1, 2])], "must be a map"),
    ([msgpack.packb("status")], "must be a map"),
    ([], "1 part"),
    ([msgpack.packb({"v": [1, 0], "op": "status"})] * 2, "1 part"),
    ([b"\x80" + b"\x00" * (64 * 1024)], "exceeds"),
])
def test_garbage_is_malformed(parts: list[bytes], match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode_request(parts)


def test_crop_reply_round_trip_and_wrong_size() -> None:
    reply = ControlReply(op="crop", seq=5, crop_shape=(6, 10))
    crop = (np.arange(60) * 4).astype(np.uint8).reshape(6, 10)
    parts = encode_reply(reply, crop)
    assert len(parts) == 2
    got, got_crop = decode_reply(parts)
    assert got == reply
    assert got_crop is not None and got_crop.dtype == np.uint8
    np.testing.assert_array_equal(got_crop, crop)
    # a non-contiguous crop is sent as its values
    big = np.arange(240, dtype=np.uint8).reshape(12, 20)
    _, sub = decode_reply(encode_reply(reply, big[::2, ::2]))
    assert sub is not None
    np.testing.assert_array_equal(sub, big[::2, ::2])

    with pytest.raises(PayloadError, match=r"59 bytes .* crop_shape \(6, 10\)"):
        decode_reply([parts[0], bytes(parts[1])[:-1]])
    with pytest.raises(PayloadError, match="crop_shape None"):
        decode_reply([encode_reply(ControlReply(op="crop"))[0], bytes(parts[1])])
    with pytest.raises(PayloadError, match="uint8"):
        encode_reply(reply, crop.astype(np.uint16))
    with pytest.raises(PayloadError, match="crop_shape"):
        encode_reply(reply, crop.T)
    with pytest.raises(MalformedMessage, match="1 or 2 parts"):
        decode_reply([*parts, b""])


# ------------------------------------------------------------------------------ stage


def test_stage_limits_check_names_the_coordinate() -> None:
    lim = StageLimits(-10.0, 10.0, 0.0, 5.0)
    lim.check(-10.0, 5.0)  # edges are inside
    lim.check(0.0, 0.0)
    with pytest.raises(StageError, match=r"^x = 10\.5 µm .*\[-10, 10\]"):
        lim.check(10.5, 1.0)
    with pytest.raises(StageError, match=r"^y = -0\.1 µm .*\[0, 5\]"):
        lim.check(0.0, -0.1)
    with pytest.raises(StageError, match="^x = nan"):
        lim.check(math.nan, 1.0)
    with pytest.raises(StageError, match="^y = inf"):
        lim.check(0.0, math.inf)
    with pytest.raises(ValueError, match="empty stage limits"):
        StageLimits(1.0, 1.0, 0.0, 5.0)


def test_simulated_stage_moves_and_reports_time() -> None:
    stage = SimulatedStage(StageLimits(0.0, 100.0, 0.0, 50.0), speed_um_s=10.0, settle_s=0.2)
    assert stage.position() == (50.0, 25.0)  # starts in the middle
    took = stage.move_to(53.0, 29.0)  # 5 µm
    assert took == pytest.approx(5.0 / 10.0 + 0.2)
    assert stage.position() == (53.0, 29.0)
    assert stage.move_to(53.0, 29.0) == pytest.approx(0.2)  # settle only
    stage.move_to(53.0, 49.0)
    assert stage.travelled_um == pytest.approx(25.0)
    for x, y, name in [(150.0, 25.0, "x"), (50.0, -1.0, "y"), (math.nan, 1.0, "x")]:
        with pytest.raises(StageError, match=f"^{name} = "):
            stage.move_to(x, y)
        assert stage.position() == (53.0, 49.0)
        assert stage.travelled_um == pytest.approx(25.0)
    with pytest.raises(ValueError, match="speed_um_s"):
        SimulatedStage(StageLimits(0.0, 1.0, 0.0, 1.0), speed_um_s=0.0)


# ------------------------------------------------------------------------------ server


class FakeStage:
    """A stage that records its moves."""

    def __init__(self) -> None:
        self.limits = StageLimits(-100.0, 100.0, -50.0, 50.0)
        self._xy = (0.0, 0.0)
        self.moves: list[tuple[float, float]] = []

    def position(self) -> tuple[float, float]:
        return self._xy

    def move_to(self, x_um: float, y_um: float) -> float:
        self.limits.check(x_um, y_um)
        self.moves.append((x_um, y_um))
        self._xy = (x_um, y_um)
        return 0.25


class FakeCamera:
    """A camera that returns a uint16 gradient, or raises when told to."""

    modality = "TEM"

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    def acquire(self, pixel_size_nm: float, shape: tuple[int, int]) -> Exposure:
        self.calls += 1
        if self.fail:
            raise RuntimeError("camera driver hiccup")
        rows, cols = shape
        image = (np.arange(rows)[:, None] * 100 + np.arange(cols)[None, :] * 3).astype(np.uint16)
        return Exposure(image=image, pixel_size_nm=pixel_size_nm * 1.01, modality="TEM",
                        dose_e_per_nm2=2.5, exposure_s=0.4, magnification=50_000.0,
                        meta={"fake": True})


@dataclass
class Rig:
    ctx: zmq.Context
    pull: zmq.Socket
    stage: FakeStage
    camera: FakeCamera
    publisher: FramePublisher
    server: ControlServer

    def handle(self, req: ControlRequest) -> tuple[ControlReply, np.ndarray | None]:
        return self.server.handle(encode_request(req))

    def frame(self) -> list[bytes]:
        assert self.pull.poll(5000), "no frame was published"
        parts: list[bytes] = self.pull.recv_multipart()
        return parts


@pytest.fixture
def rig() -> Iterator[Rig]:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    frames = f"inproc://frames-{uuid.uuid4().hex}"
    pull.bind(frames)
    stage, camera = FakeStage(), FakeCamera()
    publisher = FramePublisher(frames, ctx=ctx, source="cam0", first_seq=10)
    server = ControlServer(f"inproc://control-{uuid.uuid4().hex}", stage, camera, publisher,
                           ctx=ctx, keep_frames=2, max_shape=(64, 64),
                           pixel_size_range_nm=(0.1, 1000.0))
    try:
        yield Rig(ctx, pull, stage, camera, publisher, server)
    finally:
        server.close()
        publisher.close()
        pull.close(linger=0)
        ctx.term()


def test_status(rig: Rig) -> None:
    reply, crop = rig.handle(ControlRequest(op="status"))
    assert crop is None and reply.ok
    assert reply.stage == (0.0, 0.0)
    assert reply.limits == (-100.0, 100.0, -50.0, 50.0)
    assert reply.source == "cam0" and reply.modality == "TEM"
    assert reply.frames == 10
    assert reply.max_shape == (64, 64) and reply.pixel_size_range_nm == (0.1, 1000.0)


def test_status_says_what_a_frame_costs_when_the_camera_knows(rig: Rig) -> None:
    """A camera that reports its settings (exposure, dose) has them in ``status``, over the
    wire; one that does not (FakeCamera, an older adapter) sends none of the fields."""
    assert not isinstance(rig.camera, ReportsSettings)
    parts = encode_reply(rig.handle(ControlRequest(op="status"))[0])
    assert not {"exposure_s", "dose_e_per_px", "dose_e_per_nm2"} & msgpack.unpackb(parts[0]).keys()
    reply, _ = decode_reply(parts)
    assert (reply.exposure_s, reply.dose_e_per_px, reply.dose_e_per_nm2) == (None, None, None)

    class SettingsCamera(FakeCamera):
        def settings(self) -> AcquisitionSettings:
            return AcquisitionSettings(exposure_s=0.4, dose_e_per_nm2=2.5)  # as it acquires

    server = ControlServer(f"inproc://control-{uuid.uuid4().hex}", rig.stage, SettingsCamera(),
                           rig.publisher, ctx=rig.ctx)
    try:
        reply, _ = decode_reply(encode_reply(server.handle(
            encode_request(ControlRequest(op="status")))[0]))
        assert reply.ok and reply.v == CONTROL_VERSION == (1, 2)
        assert (reply.exposure_s, reply.dose_e_per_px, reply.dose_e_per_nm2) == (0.4, None, 2.5)
        acq, _ = server.handle(encode_request(ControlRequest(op="acquire", pixel_size_nm=20.0,
                                                             shape=(32, 32))))
        assert (acq.exposure_s, acq.dose_e_per_nm2) == (reply.exposure_s, reply.dose_e_per_nm2)
    finally:
        server.close()


def test_the_simulated_camera_reports_the_cost_its_frames_then_have() -> None:
    """The simulated camera's dose is electrons per pixel: its settings say 200 e/px and
    0.5 s, and a frame at p nm/px then reports 200 / p² e/nm² and 0.5 s."""
    cfg = VirtualSpecimenConfig(size_um=(20.0, 20.0), agglomerates=0, large_targets=1,
                                wire_targets=0, coverage=0.01)
    _, _, camera = build(cfg, SimulatedMicroscopeOptions())
    assert isinstance(camera, ReportsSettings)
    s = camera.settings()
    assert (s.exposure_s, s.dose_e_per_px, s.dose_e_per_nm2) == (0.5, 200.0, None)
    for p in (5.0, 20.0):
        exp = camera.acquire(p, (32, 32))
        assert exp.exposure_s == s.exposure_s and exp.dose_e_per_nm2 == s.dose_at(p) == 200 / p**2
    _, _, noiseless = build(cfg, SimulatedMicroscopeOptions(dose_e_per_px=None, exposure_s=0.1))
    assert noiseless.settings() == AcquisitionSettings(exposure_s=0.1)
    assert noiseless.settings().dose_at(5.0) is None


def test_acquisition_settings_name_a_value_that_cannot_be() -> None:
    both = AcquisitionSettings(exposure_s=0.0, dose_e_per_px=100.0, dose_e_per_nm2=2.0)
    assert both.dose_at(5.0) == 4.0 and both.dose_at(10.0) == 2.0  # the larger model
    for name, v in [("exposure_s", -0.1), ("dose_e_per_px", math.nan),
                    ("dose_e_per_nm2", math.inf)]:
        with pytest.raises(ValueError, match=rf"^{name} = {v!r} must be a finite number >= 0"):
            AcquisitionSettings(**{name: v})


def test_acquire_publishes_a_frame(rig: Rig) -> None:
    assert rig.handle(ControlRequest(op="move", x_um=12.5, y_um=-3.0))[0].ok
    reply, _ = rig.handle(ControlRequest(op="acquire", pixel_size_nm=20.0, shape=(32, 32),
                                         tag="survey", meta={"rotate45": True}))
    assert reply.ok and reply.op == "acquire"
    assert reply.seq == 10 and reply.frames == 11
    assert reply.stage == (12.5, -3.0)
    assert reply.pixel_size_nm == pytest.approx(20.2)  # the camera's actual pixel size
    assert reply.shape == (32, 32)
    assert reply.dose_e_per_nm2 == 2.5 and reply.exposure_s == 0.4
    assert reply.image_to_stage == ((1.0, 0.0), (0.0, 1.0))

    header, image = decode_frame(rig.frame())
    assert header.seq == reply.seq and header.source == "cam0"
    assert header.t_acq_ns == reply.t_acq_ns
    assert header.stage is not None
    assert (header.stage.x_um, header.stage.y_um) == (12.5, -3.0)
    assert header.pixel_size_nm == pytest.approx(20.2)
    assert header.magnification == 50_000.0 and header.modality == "TEM"
    assert header.meta["search"] == "survey" and header.meta["fake"] is True
    assert header.meta["rotate45"] is True  # an analysis hint for the daemon
    assert image.shape == (32, 32) and image.dtype == np.uint16
    assert image[31, 31] == 31 * 100 + 31 * 3

    # without a tag there is no "search" entry; seq counts on
    reply2, _ = rig.handle(ControlRequest(op="acquire", pixel_size_nm=5.0, shape=(16, 24)))
    assert reply2.seq == 11
    header2, image2 = decode_frame(rig.frame())
    assert header2.seq == 11 and "search" not in header2.meta
    assert image2.shape == (16, 24)


def test_move_outside_the_limits_is_refused(rig: Rig) -> None:
    reply, _ = rig.handle(ControlRequest(op="move", x_um=5.0, y_um=6.0))
    assert reply.ok and reply.stage == (5.0, 6.0) and reply.move_s == 0.25
    for x, y, name in [(500.0, 0.0, "x"), (0.0, -50.5, "y")]:
        reply, _ = rig.handle(ControlRequest(op="move", x_um=x, y_um=y))
        assert not reply.ok and reply.op == "move"
        assert reply.error is not None and reply.error.startswith(f"{name} = ")
        assert "outside the stage limits" in reply.error
        assert reply.unreachable  # that place is out of reach, the stage works
    assert rig.stage.moves == [(5.0, 6.0)]
    assert rig.stage.position() == (5.0, 6.0)
    assert rig.server.refused == 2 and rig.server.answered == 1


@pytest.mark.parametrize("req,match", [
    (ControlRequest(op="acquire", pixel_size_nm=0.01, shape=(32, 32)), "pixel size 0.01 nm"),
    (ControlRequest(op="acquire", pixel_size_nm=1e4, shape=(32, 32)), "pixel size 10000 nm"),
    (ControlRequest(op="acquire", pixel_size_nm=1.0, shape=(32, 128)), r"\(32, 128\)"),
])
def test_acquire_out_of_range_is_refused(rig: Rig, req: ControlRequest, match: str) -> None:
    reply, _ = rig.handle(req)
    assert not reply.ok and reply.error is not None
    assert re.search(match, reply.error), reply.error
    assert rig.camera.calls == 0
    assert rig.pull.poll(0) == 0  # nothing was published


def test_camera_failure_is_answered_and_the_server_goes_on(rig: Rig) -> None:
    rig.camera.fail = True
    reply, _ = rig.handle(ControlRequest(op="acquire", pixel_size_nm=1.0, shape=(32, 32)))
    assert not reply.ok and reply.op == "acquire"
    assert reply.error is not None
    assert "acquire failed" in reply.error and "camera driver hiccup" in reply.error
    assert rig.pull.poll(0) == 0
    assert rig.handle(ControlRequest(op="status"))[0].ok
    rig.camera.fail = False
    reply, _ = rig.handle(ControlRequest(op="acquire", pixel_size_nm=1.0, shape=(32, 32)))
    assert reply.ok and reply.seq == 10  # the failed acquisition used no seq
    assert decode_frame(rig.frame())[0].seq == 10


def test_crop_of_kept_frames(rig: Rig) -> None:
    seqs = []
    for _ in range(3):
        reply, _ = rig.handle(ControlRequest(op="acquire", pixel_size_nm=1.0, shape=(32, 32)))
        assert reply.seq is not None
        seqs.append(reply.seq)
        rig.frame()
    reply, crop = rig.handle(ControlRequest(op="crop", seq=seqs[-1], row=16.0, col=16.0,
                                            half_px=8))
    assert reply.ok and reply.seq == seqs[-1] and reply.crop_shape == (16, 16)
    assert crop is not None and crop.dtype == np.uint8 and crop.shape == (16, 16)
    assert crop[-1, -1] > crop[0, 0]  # the gradient survives the display stretch
    # a crop over the frame's corner is black outside the frame
    _, corner = rig.handle(ControlRequest(op="crop", seq=seqs[-1], row=0.0, col=0.0, half_px=8))
    assert corner is not None and corner.shape == (16, 16)
    assert not corner[:8, :].any() and not corner[:, :8].any()
    # parts survive an encode/decode through the wire format
    back, back_crop = decode_reply(encode_reply(reply, crop))
    assert back_crop is not None
    np.testing.assert_array_equal(back_crop, crop)
    # only the last keep_frames (2) are kept
    for seq, match in [(seqs[0], f"frame {seqs[0]} is no longer kept"),
                       (999, "frame 999 is no longer kept")]:
        reply, crop = rig.handle(ControlRequest(op="crop", seq=seq, row=16.0, col=16.0))
        assert not reply.ok and crop is None
        assert reply.error is not None and match in reply.error


@pytest.mark.parametrize("parts,match", [
    ([b"garbage"], "msgpack"),
    ([msgpack.packb([1, 2, 3])], "map"),
    ([], "1 part"),
    (_raw(op="move", x_um=1.0), "move needs y_um"),
    ([msgpack.packb({"v": [9, 0], "op": "status"})], "version"),
])
def test_malformed_request_gets_a_refusal(rig: Rig, parts: list[bytes], match: str) -> None:
    reply, crop = rig.server.handle(parts)
    assert not reply.ok and crop is None
    assert reply.error is not None and match in reply.error
    assert rig.server.refused == 1
    # the reply itself is a valid message
    assert decode_reply(encode_reply(reply))[0] == reply


# ------------------------------------------------------------------------------ REQ/REP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_real_round_trip(rig: Rig) -> None:
    server = ControlServer("tcp://127.0.0.1:0", rig.stage, rig.camera, rig.publisher,
                           ctx=rig.ctx).start()
    client = ControlClient(server.endpoint, timeout=10.0, ctx=rig.ctx)
    try:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        assert not server.endpoint.endswith(":0")
        status = client.status()
        assert status.source == "cam0" and status.stage == (0.0, 0.0)
        assert client.move(20.0, -10.0).stage == (20.0, -10.0)
        acq = client.acquire(10.0, (32, 32), tag="confirm")
        assert acq.seq == 10 and acq.stage == (20.0, -10.0)
        header, _ = decode_frame(rig.frame())
        assert header.seq == 10 and header.meta["search"] == "confirm"
        crop = client.crop(10, 10.0, 20.0, half_px=6)
        assert crop.dtype == np.uint8 and crop.shape == (12, 12)
        with pytest.raises(ControlError, match=r"refused move: x = 1000\.0 µm"):
            client.move(1000.0, 0.0)
        with pytest.raises(ControlError, match="refused crop: frame 77"):
            client.crop(77, 1.0, 1.0)
        # after a refusal the client goes on
        assert client.status().stage == (20.0, -10.0)
        # garbage from another client is answered, and the server keeps serving
        raw = rig.ctx.socket(zmq.REQ)
        try:
            raw.connect(server.endpoint)
            raw.send(b"garbage")
            assert raw.poll(10_000)
            refusal, _ = decode_reply(raw.recv_multipart())
            assert not refusal.ok and refusal.op == "error"
        finally:
            raw.close(linger=0)
        assert client.status().ok
        assert server.error is None
    finally:
        client.close()
        server.close()


def test_client_times_out_and_recovers(rig: Rig) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    client = ControlClient(endpoint, timeout=0.3, ctx=rig.ctx)
    server: ControlServer | None = None
    try:
        with pytest.raises(ControlError, match=r"no answer .* within 0\.3 s \(status\)"):
            client.status()
        # a REQ socket that lost its answer was replaced: sending again is allowed
        server = ControlServer(endpoint, rig.stage, rig.camera, rig.publisher,
                               ctx=rig.ctx).start()
        reply, _ = client.request(ControlRequest(op="status"), timeout=10.0)
        assert reply.ok and reply.source == "cam0"
    finally:
        client.close()
        if server is not None:
            server.close()
