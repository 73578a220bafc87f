"""Control-socket messages (ZeroMQ REQ/REP), pure functions between typed models and bytes.

A request is one msgpack map (:class:`ControlRequest`); a reply is one msgpack map
(:class:`ControlReply`) followed, for ``crop``, by the crop's uint8 pixels. Every message carries
``v = [major, minor]`` of :data:`CONTROL_VERSION`; an unknown major version is refused.

==========  ==========================================  ====================================
``op``      request fields                              reply fields (besides ok / error)
==========  ==========================================  ====================================
status      —                                           stage, limits, source, modality,
                                                        frames, pixel_size_range_nm, max_shape,
                                                        (exposure_s, dose_e_per_px,
                                                        dose_e_per_nm2)
move        x_um, y_um                                  stage, move_s
acquire     pixel_size_nm, shape, (tag, meta)           source, seq, stage, pixel_size_nm,
                                                        shape, t_acq_ns, dose_e_per_nm2,
                                                        exposure_s, image_to_stage
crop        seq, row, col, half_px                      crop_shape (+ uint8 buffer)
==========  ==========================================  ====================================

Positions in µm, pixel sizes in nm, shapes (rows, cols) px.

``status``'s ``exposure_s`` (s), ``dose_e_per_px`` (electrons per pixel) and ``dose_e_per_nm2``
(e/nm² whatever the pixel size) say what one frame will cost at the camera's current settings
(:class:`~nanoscout.clients.microscope.interfaces.AcquisitionSettings`), the same quantities
``acquire`` reports of the frame it took; each is absent where the camera does not say (an
older microscope side: a search then learns a frame's cost from its first frame).

Versions: 1.0 the four commands; 1.1 ``status`` reports the acquisition settings above; 1.2
a refused ``move`` says ``unreachable = true`` when the stage refused that place (its limits, a
soft limit, a forbidden region: :class:`~nanoscout.clients.microscope.interfaces.StageError`),
not a failure of the microscope (an older side leaves it out: every refusal is a failure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nanoscout.wire.errors import MalformedMessage, PayloadError, Reason, VersionError

CONTROL_VERSION: tuple[int, int] = (1, 2)
MAX_CONTROL_BYTES = 64 * 1024  # requests are small maps
MAX_CROP_HALF_PX = 256

Op = Literal["status", "move", "acquire", "crop"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    v: tuple[int, int] = CONTROL_VERSION


class ControlRequest(_Model):
    """One command for the microscope; the fields its ``op`` needs must be set."""

    op: Op
    x_um: float | None = None
    y_um: float | None = None
    pixel_size_nm: Annotated[float, Field(gt=0)] | None = None
    shape: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] | None = None
    seq: Annotated[int, Field(ge=0)] | None = None
    row: float | None = None
    col: float | None = None
    half_px: Annotated[int, Field(ge=4, le=MAX_CROP_HALF_PX)] = 48
    tag: Annotated[str, Field(max_length=32)] | None = None  # acquire: frame meta "search"
    #: acquire: more frame meta (analysis hints such as ``rotate45``), at most 8 entries
    meta: Annotated[dict[str, str | int | float | bool], Field(max_length=8)] | None = None

    @model_validator(mode="after")
    def _needs(self) -> ControlRequest:
        need = {"move": ("x_um", "y_um"), "acquire": ("pixel_size_nm", "shape"),
                "crop": ("seq", "row", "col")}.get(self.op, ())
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{self.op} needs {', '.join(missing)}")
        for f in ("x_um", "y_um", "row", "col"):
            v = getattr(self, f)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{f} = {v!r} is not finite")
        return self


class ControlReply(_Model):
    """The answer to a :class:`ControlRequest`; ``ok = False`` with ``error`` when refused."""

    op: str
    ok: bool = True
    error: str | None = None
    #: a refused move: the stage cannot reach that place (it works; the place is out of reach)
    unreachable: bool | None = None
    stage: tuple[float, float] | None = None  # (x, y) µm after the command
    limits: tuple[float, float, float, float] | None = None  # x_min, x_max, y_min, y_max µm
    source: str | None = None
    modality: str | None = None
    frames: int = 0  # frames acquired so far
    pixel_size_range_nm: tuple[float, float] | None = None
    max_shape: tuple[int, int] | None = None
    move_s: float | None = None  # stage travel + settle time, s
    seq: int | None = None
    pixel_size_nm: float | None = None
    shape: tuple[int, int] | None = None
    t_acq_ns: int | None = None
    #: acquire: this frame's dose; status: one frame's at any pixel size (fixed illumination)
    dose_e_per_nm2: float | None = None
    #: acquire: this frame's exposure; status: one frame's at the current settings, s
    exposure_s: float | None = None
    dose_e_per_px: float | None = None  # status: electrons per pixel of one frame
    image_to_stage: tuple[tuple[float, float], tuple[float, float]] | None = None
    crop_shape: tuple[int, int] | None = None


def _pack(model: BaseModel) -> bytes:
    return msgpack.packb(model.model_dump(mode="json", exclude_none=True), use_bin_type=True)


def _unpack(raw: bytes | memoryview, model: type[_Model]) -> Any:
    if len(raw) > MAX_CONTROL_BYTES:
        raise MalformedMessage(f"control message of {len(raw)} bytes exceeds "
                               f"{MAX_CONTROL_BYTES}", reason=Reason.HEADER_TOO_LARGE)
    try:
        data = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessage(f"control message is not valid msgpack ({exc})") from exc
    if not isinstance(data, dict):
        raise MalformedMessage(f"control message must be a map, got {type(data).__name__}")
    v = data.get("v")
    if not (isinstance(v, list | tuple) and len(v) == 2 and v[0] == CONTROL_VERSION[0]):
        raise VersionError(f"control message version {v!r} is not supported (this side speaks "
                           f"{CONTROL_VERSION[0]}.x)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "message"
        raise MalformedMessage(f"control {model.__name__} field {loc}: {first['msg']}") from exc


def encode_request(req: ControlRequest) -> list[bytes]:
    """``[msgpack request]``."""
    return [_pack(req)]


def decode_request(parts: Sequence[bytes | memoryview]) -> ControlRequest:
    """Parse a request; raises a ProtocolError naming what is wrong."""
    if len(parts) != 1:
        raise MalformedMessage(f"control request must have 1 part, got {len(parts)}")
    req: ControlRequest = _unpack(parts[0], ControlRequest)
    return req


def encode_reply(reply: ControlReply, crop: np.ndarray | None = None) -> list[bytes]:
    """``[msgpack reply]`` or, with a crop, ``[msgpack reply, uint8 pixels]``."""
    if crop is None:
        return [_pack(reply)]
    if crop.dtype != np.uint8 or crop.ndim != 2 or reply.crop_shape != crop.shape:
        raise PayloadError(f"crop must be 2-D uint8 of crop_shape {reply.crop_shape}, got "
                           f"{crop.dtype} {crop.shape}")
    return [_pack(reply), np.ascontiguousarray(crop).tobytes()]


def decode_reply(parts: Sequence[bytes | memoryview]) -> tuple[ControlReply, np.ndarray | None]:
    """Parse a reply and its optional crop; raises a ProtocolError naming what is wrong."""
    if len(parts) not in (1, 2):
        raise MalformedMessage(f"control reply must have 1 or 2 parts, got {len(parts)}")
    reply: ControlReply = _unpack(parts[0], ControlReply)
    if len(parts) == 1:
        return reply, None
    shape = reply.crop_shape
    buf = np.frombuffer(bytes(parts[1]), np.uint8)
    if shape is None or buf.size != shape[0] * shape[1]:
        raise PayloadError(f"crop of {buf.size} bytes does not match crop_shape {shape}")
    return reply, buf.reshape(shape)
