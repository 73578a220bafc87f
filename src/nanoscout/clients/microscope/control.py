"""The microscope's control socket (ZeroMQ REQ/REP): stage moves and acquisitions on request.

:class:`ControlServer` wraps any :class:`~nanoscout.clients.microscope.interfaces.Stage` and
:class:`~nanoscout.clients.microscope.interfaces.Camera` (simulated or real) and a
:class:`~nanoscout.clients.acquisition.publisher.FramePublisher`: an ``acquire`` command takes a frame at
the current stage position and publishes it to the daemon through the normal frame input, with
the stage position, pixel size and magnification in its header, then answers with the frame's
``seq`` so the caller can match the daemon's results to it. Every request gets a reply — a
position outside the limits, a malformed request or a driver failure comes back as
``ok = False`` with the reason — so a REQ client never hangs and nothing a client sends can
stop the server. The last ``keep_frames`` frames are kept for ``crop`` (target thumbnails).
``status`` also says what a frame will cost (exposure, dose) when the camera reports its
settings (:class:`~nanoscout.clients.microscope.interfaces.ReportsSettings`).

:class:`ControlClient` is the caller's side, with a timeout per command.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import zmq

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.interfaces import (
    AcquisitionSettings,
    Camera,
    CameraError,
    ReportsSettings,
    Stage,
    StageError,
)
from nanoscout.clients.microscope.messages import (
    ControlReply,
    ControlRequest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from nanoscout.wire.errors import NanoscoutError, ProtocolError, Reason
from nanoscout.wire.transport import bind, connect

log = logging.getLogger("nanoscout.microscope")

_POLL_MS = 100

DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5558"  # REP: stage moves and acquisitions


class ControlError(NanoscoutError):
    """The microscope did not answer, or refused a command (its reason is the message)."""

    reason = Reason.CONTROL


class MoveRefused(ControlError):
    """The microscope refused one move because its stage cannot reach that place (outside its
    limits or a soft limit: a :class:`StageError` on the microscope side, reply
    ``unreachable``); the microscope itself works, and other places may be reached."""


def display_crop(image: np.ndarray, row: float, col: float, half: int) -> np.ndarray:
    """A uint8 crop of ``image`` centred on (row, col), 1st-99th percentile of the frame → 0-255.

    Parts of the crop outside the frame are black.
    """
    h, w = image.shape
    r0, c0 = int(round(row)) - half, int(round(col)) - half
    out = np.zeros((2 * half, 2 * half), np.uint8)
    ys, xs = max(r0, 0), max(c0, 0)
    ye, xe = min(r0 + 2 * half, h), min(c0 + 2 * half, w)
    if ye > ys and xe > xs:
        lo, hi = (float(v) for v in np.percentile(image[::4, ::4], (1.0, 99.0)))
        part = (image[ys:ye, xs:xe].astype(np.float32) - lo) / max(hi - lo, 1e-9) * 255.0
        out[ys - r0: ye - r0, xs - c0: xe - c0] = np.clip(part, 0, 255)
    return out


class ControlServer:
    """Answers control requests on a REP socket (``serve`` blocks; ``start`` runs a thread)."""

    def __init__(self, endpoint: str, stage: Stage, camera: Camera, publisher: FramePublisher,
                 *, keep_frames: int = 64, ctx: zmq.Context | None = None,
                 max_shape: tuple[int, int] = (4096, 4096),
                 pixel_size_range_nm: tuple[float, float] = (0.01, 10_000.0)) -> None:
        self.stage = stage
        self.camera = camera
        self.publisher = publisher
        self.max_shape = max_shape
        self.pixel_size_range_nm = pixel_size_range_nm
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        self.endpoint = bind(self._sock, endpoint)
        self._frames: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keep = keep_frames
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.refused = 0
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ControlServer:
        """Serve from a background thread (its failure is kept in :attr:`error`)."""
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.serve()
        except BaseException as exc:  # reaches the owner through .error / close()
            self.error = exc
            log.exception("control server failed")

    def serve(self) -> None:
        """Answer requests until :meth:`stop`."""
        while not self._stop.is_set():
            if not self._sock.poll(_POLL_MS):
                continue
            parts = self._sock.recv_multipart(copy=True)
            reply, crop = self.handle(parts)
            self._sock.send_multipart(encode_reply(reply, crop))

    def stop(self) -> None:
        """Ask the serving loop to end (returns at once)."""
        self._stop.set()

    def close(self) -> None:
        """Stop, join the thread and close the socket; re-raises a failure of the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
        if self.error is not None:
            raise ControlError(f"the control server failed: {self.error!r}") from self.error

    # ------------------------------------------------------------------ commands

    def handle(self, parts: list[bytes]) -> tuple[ControlReply, np.ndarray | None]:
        """One request → its reply (never raises for anything a client sends)."""
        op = "error"
        try:
            req = decode_request(parts)
            op = req.op
            reply, crop = getattr(self, f"_{req.op}")(req)
        except StageError as exc:  # that place is out of the stage's reach; it still works
            self.refused += 1
            return ControlReply(op=op, ok=False, error=str(exc), unreachable=True), None
        except (ProtocolError, CameraError, ValueError) as exc:
            self.refused += 1
            return ControlReply(op=op, ok=False, error=str(exc)), None
        except Exception as exc:  # a driver failure must not stop the server
            self.refused += 1
            log.exception("control %s failed", op)
            return ControlReply(op=op, ok=False, error=f"{op} failed: {exc!r}"), None
        self.answered += 1
        return reply, crop

    def _status(self, req: ControlRequest) -> tuple[ControlReply, None]:
        lim = self.stage.limits
        # a camera that cannot say what a frame costs leaves these out (the search learns it
        # from the first frame)
        cost = (self.camera.settings() if isinstance(self.camera, ReportsSettings)
                else AcquisitionSettings())
        return ControlReply(
            op="status", stage=self.stage.position(),
            limits=(lim.x_min_um, lim.x_max_um, lim.y_min_um, lim.y_max_um),
            source=self.publisher.source, modality=self.camera.modality,
            frames=self.publisher.seq, pixel_size_range_nm=self.pixel_size_range_nm,
            max_shape=self.max_shape, exposure_s=cost.exposure_s,
            dose_e_per_px=cost.dose_e_per_px, dose_e_per_nm2=cost.dose_e_per_nm2), None

    def _move(self, req: ControlRequest) -> tuple[ControlReply, None]:
        assert req.x_um is not None and req.y_um is not None
        self.stage.limits.check(req.x_um, req.y_um)
        took = self.stage.move_to(req.x_um, req.y_um)
        return ControlReply(op="move", stage=self.stage.position(), move_s=took), None

    def _acquire(self, req: ControlRequest) -> tuple[ControlReply, None]:
        assert req.pixel_size_nm is not None and req.shape is not None
        lo, hi = self.pixel_size_range_nm
        if not lo <= req.pixel_size_nm <= hi:
            raise CameraError(f"pixel size {req.pixel_size_nm:g} nm is outside this "
                              f"microscope's range [{lo:g}, {hi:g}] nm")
        if req.shape[0] > self.max_shape[0] or req.shape[1] > self.max_shape[1]:
            raise CameraError(f"frame shape {req.shape} exceeds the camera's {self.max_shape}")
        exp = self.camera.acquire(req.pixel_size_nm, req.shape)
        stage = self.stage.position()
        t_acq = time.time_ns()
        meta: dict[str, Any] = {**exp.meta, **(req.meta or {})}
        if req.tag:
            meta["search"] = req.tag
        seq = self.publisher.send(exp.image, pixel_size_nm=exp.pixel_size_nm,
                                  modality=exp.modality, stage=stage,
                                  magnification=exp.magnification, meta=meta, t_acq_ns=t_acq)
        self._frames[seq] = exp.image
        while len(self._frames) > self._keep:
            self._frames.popitem(last=False)
        return ControlReply(
            op="acquire", source=self.publisher.source, seq=seq, stage=stage,
            pixel_size_nm=exp.pixel_size_nm, shape=(int(exp.image.shape[0]),
                                                    int(exp.image.shape[1])),
            t_acq_ns=t_acq, dose_e_per_nm2=exp.dose_e_per_nm2, exposure_s=exp.exposure_s,
            image_to_stage=exp.image_to_stage, frames=self.publisher.seq), None

    def _crop(self, req: ControlRequest) -> tuple[ControlReply, np.ndarray]:
        assert req.seq is not None and req.row is not None and req.col is not None
        img = self._frames.get(req.seq)
        if img is None:
            raise CameraError(f"frame {req.seq} is no longer kept (the last {self._keep} are)")
        crop = display_crop(img, req.row, req.col, req.half_px)
        return ControlReply(op="crop", seq=req.seq, crop_shape=crop.shape), crop


class ControlClient:
    """REQ side of the control socket; every command has a timeout (s)."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0, ctx: zmq.Context | None = None
                 ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            connect(sock, self.endpoint)
            self._sock = sock
        return self._sock

    def request(self, req: ControlRequest, timeout: float | None = None
                ) -> tuple[ControlReply, np.ndarray | None]:
        """Send ``req`` and return (reply, crop); raises :class:`ControlError` when refused,
        :class:`MoveRefused` when a move was refused as out of the stage's reach."""
        sock = self._socket()
        ms = int(1000 * (self.timeout if timeout is None else timeout))
        sock.send_multipart(encode_request(req))
        if not sock.poll(ms):
            # a REQ socket that lost its answer cannot send again: start a new one
            sock.close(linger=0)
            self._sock = None
            raise ControlError(f"no answer from the microscope at {self.endpoint} within "
                               f"{ms / 1000:g} s ({req.op})")
        try:
            reply, crop = decode_reply(sock.recv_multipart())
        except ProtocolError as exc:
            raise ControlError(f"malformed answer from {self.endpoint}: {exc}") from exc
        if not reply.ok:
            if req.op == "move" and reply.unreachable:
                raise MoveRefused(f"the microscope refused move: {reply.error}")
            raise ControlError(f"the microscope refused {req.op}: {reply.error}")
        return reply, crop

    def status(self) -> ControlReply:
        """Stage position and limits, source name, camera range and, where the microscope
        says, what one frame costs at the current settings (``exposure_s`` s,
        ``dose_e_per_px`` e/px or ``dose_e_per_nm2`` e/nm²)."""
        return self.request(ControlRequest(op="status"))[0]

    def move(self, x_um: float, y_um: float) -> ControlReply:
        """Move the stage (blocks until settled); raises :class:`MoveRefused` when the stage
        cannot reach (x, y) µm, :class:`ControlError` on any other failure."""
        return self.request(ControlRequest(op="move", x_um=x_um, y_um=y_um))[0]

    def acquire(self, pixel_size_nm: float, shape: tuple[int, int], tag: str | None = None,
                meta: dict[str, str | int | float | bool] | None = None) -> ControlReply:
        """Acquire and publish one frame (``tag`` and ``meta`` go into its header's meta);
        the reply names its ``seq``."""
        return self.request(ControlRequest(op="acquire", pixel_size_nm=pixel_size_nm,
                                           shape=shape, tag=tag, meta=meta))[0]

    def crop(self, seq: int, row: float, col: float, half_px: int = 48) -> np.ndarray:
        """A uint8 crop of a recent frame around (row, col) px."""
        _, crop = self.request(ControlRequest(op="crop", seq=seq, row=row, col=col,
                                              half_px=half_px))
        assert crop is not None
        return crop

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
