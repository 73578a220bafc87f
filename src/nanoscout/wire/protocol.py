"""Wire protocol v1: pure functions between typed headers and ZeroMQ multipart messages.

A message is ``[topic, header, *buffers]``: the topic (bytes, for SUB prefix filtering), a
msgpack map validated by a pydantic model, then raw buffers. No sockets here, nothing is ever
unpickled, and every header carries ``v = [major, minor]``; a receiver rejects an unknown major
version with :class:`~nanoscout.wire.errors.VersionError` (minor versions only add optional fields, so
unknown fields are ignored).

=================  ===================  =====================================================
topic              header               buffers
=================  ===================  =====================================================
``frame``          :class:`FrameHeader`  frame pixels, C order, dtype and shape from the header
``det.<source>``   :class:`DetHeader`    particle table (:data:`~nanoscout.wire.particles.PARTICLE_DTYPE`)
``stats.<source>`` :class:`StatsHeader`  —
``class.<source>`` :class:`ClassHeader`  optional uint8 heatmap
``alert.<source>`` :class:`AlertHeader`  particle rows that fired
``health``         :class:`HealthHeader` —
=================  ===================  =====================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nanoscout.wire.errors import MalformedMessage, PayloadError, VersionError
from nanoscout.wire.particles import PARTICLE_DTYPE

PROTOCOL_VERSION: tuple[int, int] = (1, 2)

#: pixel dtypes a frame may carry (numpy kind+size, either byte order)
FRAME_DTYPES: frozenset[str] = frozenset({"u1", "u2", "u4", "i1", "i2", "i4", "f4", "f8"})

#: largest msgpack header accepted, bytes
MAX_HEADER_BYTES = 256 * 1024

#: plausible pixel sizes, nm: from sub-ångström STEM to millimetre-scale SEM overviews
PIXEL_SIZE_RANGE_NM: tuple[float, float] = (1e-4, 1e6)

_SOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

Modality = Literal["TEM", "STEM", "SEM"]
Buffer = bytes | memoryview


class _Header(BaseModel):
    """Common base: frozen, unknown (newer minor-version) fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    topic_kind: ClassVar[str] = ""
    v: tuple[int, int] = PROTOCOL_VERSION


class Stage(BaseModel):
    """Stage position, µm."""

    model_config = ConfigDict(frozen=True)
    x_um: float
    y_um: float


MetaValue = str | int | float | bool | None


def _check_source(value: str) -> str:
    if not _SOURCE_RE.match(value):
        raise ValueError(
            f"source {value!r} must be 1-64 characters of letters, digits and _.:- "
            "(it becomes part of the topic)"
        )
    return value


class FrameHeader(_Header):
    """One acquired frame, adapter → daemon."""

    topic_kind: ClassVar[str] = "frame"
    source: str
    seq: Annotated[int, Field(ge=0)]
    t_acq_ns: Annotated[int, Field(ge=0)]
    shape: tuple[int, int]
    dtype: str
    pixel_size_nm: float | None = None
    modality: Modality | None = None
    stage: Stage | None = None
    magnification: Annotated[float, Field(gt=0)] | None = None
    meta: dict[str, MetaValue] = Field(default_factory=dict)

    _src = field_validator("source")(_check_source)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        try:
            dt = np.dtype(value)
        except TypeError as exc:
            raise ValueError(f"dtype {value!r} is not a numpy dtype") from exc
        if f"{dt.kind}{dt.itemsize}" not in FRAME_DTYPES:
            raise ValueError(
                f"dtype {value!r} is not supported; use one of "
                "uint8/uint16/uint32/int8/int16/int32/float32/float64"
            )
        return dt.str

    @field_validator("pixel_size_nm")
    @classmethod
    def _pixel_size(cls, value: float | None) -> float | None:
        lo, hi = PIXEL_SIZE_RANGE_NM
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(
                f"pixel_size_nm {value!r} is absurd (expected {lo:g}..{hi:g} nm, "
                "or null for an uncalibrated frame)"
            )
        return value

    @field_validator("meta")
    @classmethod
    def _meta(cls, value: dict[str, MetaValue]) -> dict[str, MetaValue]:
        if len(value) > 64:
            raise ValueError(f"meta has {len(value)} entries; at most 64 are allowed")
        return value

    @property
    def nbytes(self) -> int:
        """Payload size the header announces, bytes."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class DetHeader(_Header):
    """Detections of one frame, daemon → subscribers; the buffer is the particle table."""

    topic_kind: ClassVar[str] = "det"
    source: str
    seq: int
    t_acq_ns: int
    t_recv_ns: int
    t_done_ns: int
    stage_ms: dict[str, float]
    pixel_size_nm: float | None
    units: Literal["nm", "px"]
    n: Annotated[int, Field(ge=0)]
    engine: str
    model: str = ""
    shape: tuple[int, int] = (0, 0)
    modality: Modality | None = None
    stage: Stage | None = None
    meta: dict[str, MetaValue] = Field(default_factory=dict)  # the frame's meta, passed through
    #: working px per frame px the detector resampled the frame by (v1.1; None from v1.0)
    working_scale: float | None = None

    @property
    def latency_ms(self) -> float:
        """Acquisition-to-result latency, ms (clocks of adapter and daemon host)."""
        return (self.t_done_ns - self.t_acq_ns) / 1e6


class StatsHeader(_Header):
    """Rolling and cumulative size statistics of one source (see nanoscout.analysis.stats)."""

    topic_kind: ClassVar[str] = "stats"
    source: str
    seq: int
    t_ns: int
    units: Literal["nm", "px"]
    window: dict[str, Any]
    cumulative: dict[str, Any]
    drift: dict[str, Any] = Field(default_factory=dict)
    #: v1.2: morphology clusters of the source (nanoscout.analysis.clusters.OnlineKMeans.summary), or None
    clusters: dict[str, Any] | None = None


class ClassHeader(_Header):
    """Field-of-view classification of one frame."""

    topic_kind: ClassVar[str] = "class"
    source: str
    seq: int
    t_acq_ns: int
    labels: list[str]
    probabilities: list[float]
    novelty: float | None = None
    engine: str = ""
    heatmap_shape: tuple[int, int] | None = None


class PreviewHeader(_Header):
    """A small uint8 picture of a frame for displays (rate-limited per source, v1.1).

    The buffer is ``size`` (rows, cols) uint8, the frame normalised by its 0.5 / 99.5
    percentiles and shrunk by ``scale`` (preview px per frame px); particle coordinates of the
    matching ``det`` message times ``scale`` land on it.
    """

    topic_kind: ClassVar[str] = "preview"
    source: str
    seq: int
    t_acq_ns: int
    shape: tuple[int, int]  # the frame's rows, cols
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    scale: Annotated[float, Field(gt=0)]
    pixel_size_nm: float | None = None


class AlertHeader(_Header):
    """A rule that fired; the buffer holds the particle rows that fired (may be empty).

    v1.2: when ``heatmap_shape`` is set a second buffer follows, a uint8 heatmap of that shape
    covering the whole frame (the class activation map that explains a classification alert).
    """

    topic_kind: ClassVar[str] = "alert"
    source: str
    seq: int
    t_acq_ns: int
    rule: str
    kind: str
    severity: Literal["info", "warning", "critical"]
    value: float
    threshold: float
    explanation: str
    units: Literal["nm", "px"] = "nm"
    stage: Stage | None = None
    n: int = 0
    heatmap_shape: tuple[int, int] | None = None


class HealthHeader(_Header):
    """Daemon heartbeat, published every ``health.interval_s``."""

    topic_kind: ClassVar[str] = "health"
    t_ns: int
    uptime_s: float
    policy: Literal["live", "lossless"]
    engines: dict[str, str]
    frames_received: int
    frames_processed: int
    frames_dropped: dict[str, int]
    rejected: dict[str, int]
    transport_gaps: int
    queue_depth: int
    fps: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    last_error: str | None = None


class LensRequest(_Header):
    """A request on the daemon's query socket (REQ/REP, v1.2): the AI lens's outputs for the
    newest frame of ``source`` the daemon analysed. ``outputs``: lens output names (e.g.
    ``act_enc2``, ``reconstruction``); empty asks only for the list (``LensReply.available``).
    """

    topic_kind: ClassVar[str] = "lens_request"
    source: str
    outputs: list[str] = Field(default_factory=list, max_length=16)


class LensReply(_Header):
    """The answer to a :class:`LensRequest`: one float16 buffer per name in ``outputs``, of the
    matching ``shapes`` (the lens's own layout, e.g. (1, channels, rows, cols)); ``error`` says
    why nothing came back (unknown source or output, no lens loaded)."""

    topic_kind: ClassVar[str] = "lens"
    source: str
    seq: int = -1
    t_acq_ns: int = 0
    outputs: list[str] = Field(default_factory=list)
    shapes: list[list[int]] = Field(default_factory=list)
    available: list[str] = Field(default_factory=list)
    novelty: float | None = None
    error: str | None = None


HEADERS: dict[str, type[_Header]] = {
    h.topic_kind: h
    for h in (FrameHeader, DetHeader, StatsHeader, ClassHeader, PreviewHeader, AlertHeader,
              HealthHeader, LensRequest, LensReply)
}


@dataclass(frozen=True)
class Message:
    """A decoded message: its topic, typed header and decoded payload (if any)."""

    topic: str
    header: _Header
    array: np.ndarray | None = None
    #: an ``alert``'s explaining uint8 heatmap (v1.2), when its header has ``heatmap_shape``
    heatmap: np.ndarray | None = None
    #: a ``lens`` reply's arrays, one per name in its header's ``outputs``
    extra: tuple[np.ndarray, ...] = ()

    @property
    def kind(self) -> str:
        """Topic kind: ``frame``, ``det``, ``stats``, ``class``, ``preview``, ``alert`` or
        ``health``."""
        return self.header.topic_kind

    # SDK conveniences (the conversion lives in nanoscout.wire.tables)
    def to_arrow(self) -> Any:
        """The particle rows of a det/alert message as a pyarrow Table (unit-honest columns)."""
        from nanoscout.wire.tables import message_to_arrow

        return message_to_arrow(self)

    def to_pandas(self) -> Any:
        """The particle rows of a det/alert message as a pandas DataFrame."""
        from nanoscout.wire.tables import message_to_pandas

        return message_to_pandas(self)

    def _repr_html_(self) -> str:
        from nanoscout.wire.tables import message_html

        return message_html(self)


# ---------------------------------------------------------------------------------------------
# header packing


def pack_header(header: _Header) -> bytes:
    """Serialise a header to msgpack bytes."""
    return msgpack.packb(header.model_dump(mode="json"), use_bin_type=True)


def unpack_header(raw: Buffer, model: type[_Header]) -> Any:
    """Parse msgpack bytes into ``model``; raise a ProtocolError naming what was wrong."""
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedMessage(
            f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}", reason="header_too_large"
        )
    try:
        data = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessage(f"header is not valid msgpack ({exc})", reason="malformed") from exc
    if not isinstance(data, dict):
        raise MalformedMessage(
            f"header must be a msgpack map, got {type(data).__name__}", reason="malformed"
        )
    check_version(data.get("v"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "header"
        raise MalformedMessage(
            f"{model.topic_kind} header field {loc}: {first['msg']}", reason="header"
        ) from exc


def check_version(v: object) -> None:
    """Accept ``[1, minor]``; raise :class:`VersionError` for anything else."""
    if (
        not isinstance(v, list | tuple)
        or len(v) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in v)
    ):
        raise VersionError(f"header has no valid protocol version v (got {v!r})")
    if v[0] != PROTOCOL_VERSION[0]:
        raise VersionError(
            f"protocol major version {v[0]} is not supported (this side speaks "
            f"{PROTOCOL_VERSION[0]}.x)"
        )


def _split(parts: Sequence[Buffer], n_min: int, n_max: int, what: str) -> None:
    if not n_min <= len(parts) <= n_max:
        want = str(n_min) if n_min == n_max else f"{n_min}-{n_max}"
        raise MalformedMessage(
            f"{what} message must have {want} parts, got {len(parts)}", reason="parts"
        )


# ---------------------------------------------------------------------------------------------
# frames


def frame_header(
    array: np.ndarray,
    *,
    source: str,
    seq: int,
    t_acq_ns: int,
    pixel_size_nm: float | None,
    modality: str | None = None,
    stage: tuple[float, float] | None = None,
    magnification: float | None = None,
    meta: Mapping[str, MetaValue] | None = None,
) -> FrameHeader:
    """Build the header describing ``array`` (a 2-D image); stage in µm."""
    if array.ndim != 2:
        raise PayloadError(f"a frame must be 2-D, got shape {array.shape}", reason="shape")
    return FrameHeader(
        source=source,
        seq=seq,
        t_acq_ns=t_acq_ns,
        shape=(int(array.shape[0]), int(array.shape[1])),
        dtype=array.dtype.str,
        pixel_size_nm=pixel_size_nm,
        modality=modality,  # type: ignore[arg-type]  # validated by pydantic
        stage=None if stage is None else Stage(x_um=stage[0], y_um=stage[1]),
        magnification=magnification,
        meta=dict(meta or {}),
    )


def encode_frame(header: FrameHeader, array: np.ndarray) -> list[Buffer]:
    """Encode a frame as ``[b"frame", header, pixels]``.

    The pixel buffer is a zero-copy view when ``array`` is C-contiguous (one copy otherwise).
    Raises :class:`PayloadError` when the array disagrees with the header or is empty.
    """
    if tuple(array.shape) != tuple(header.shape):
        raise PayloadError(
            f"array shape {array.shape} does not match header shape {header.shape}",
            reason="shape",
        )
    if array.dtype.str != header.dtype:
        raise PayloadError(
            f"array dtype {array.dtype.str} does not match header dtype {header.dtype}",
            reason="dtype",
        )
    if array.size == 0:
        raise PayloadError(f"zero-size frame (shape {array.shape})", reason="empty")
    data = np.ascontiguousarray(array)
    return [b"frame", pack_header(header), data.data.cast("B")]


def decode_frame(
    parts: Sequence[Buffer], *, max_bytes: int | None = None
) -> tuple[FrameHeader, np.ndarray]:
    """Decode ``[b"frame", header, pixels]`` into the header and a read-only array view.

    Checks the part count, the version, the header fields, that the frame is not empty or
    larger than ``max_bytes``, and that the payload length equals shape × itemsize.
    """
    _split(parts, 3, 3, "frame")
    if bytes(parts[0]) != b"frame":
        raise MalformedMessage(f"expected topic 'frame', got {bytes(parts[0])[:40]!r}", reason="topic")
    header: FrameHeader = unpack_header(parts[1], FrameHeader)
    expected = header.nbytes
    if expected == 0:
        raise PayloadError(f"zero-size frame (shape {header.shape})", reason="empty")
    if max_bytes is not None and expected > max_bytes:
        raise PayloadError(
            f"frame of {expected} bytes (shape {header.shape}, {header.dtype}) exceeds the "
            f"limit of {max_bytes} bytes",
            reason="oversized",
        )
    payload = memoryview(parts[2])
    if payload.nbytes != expected:
        raise PayloadError(
            f"payload is {payload.nbytes} bytes but header announces {expected} "
            f"(shape {header.shape}, {header.dtype})",
            reason="length",
        )
    array = np.frombuffer(payload, dtype=np.dtype(header.dtype)).reshape(header.shape)
    return header, array


# ---------------------------------------------------------------------------------------------
# results


def _topic(kind: str, source: str | None) -> bytes:
    return (kind if source is None else f"{kind}.{source}").encode()


def _table_buffer(table: np.ndarray) -> memoryview:
    if table.dtype != PARTICLE_DTYPE:
        raise PayloadError(f"particle table has dtype {table.dtype}, expected PARTICLE_DTYPE", reason="dtype")
    return np.ascontiguousarray(table).data.cast("B")


def _decode_table(buf: Buffer, n: int) -> np.ndarray:
    mv = memoryview(buf)
    if mv.nbytes != n * PARTICLE_DTYPE.itemsize:
        raise PayloadError(
            f"particle table is {mv.nbytes} bytes but n={n} needs "
            f"{n * PARTICLE_DTYPE.itemsize}",
            reason="length",
        )
    return np.frombuffer(mv, dtype=PARTICLE_DTYPE)


def encode_message(header: _Header, *arrays: np.ndarray) -> list[Buffer]:
    """Encode any result header (det/stats/class/alert/health) with its buffers.

    ``det`` and ``alert`` take one particle table; ``class`` takes an optional uint8 heatmap,
    and so does ``alert`` after its table when its header names a ``heatmap_shape``.
    """
    kind = header.topic_kind
    if kind == "frame":
        raise PayloadError("use encode_frame for frames", reason="topic")
    source = getattr(header, "source", None)
    parts: list[Buffer] = [_topic(kind, source), pack_header(header)]
    if kind in ("det", "alert"):
        heat_shape = getattr(header, "heatmap_shape", None)
        want = 2 if heat_shape is not None else 1
        if len(arrays) != want:
            raise PayloadError(
                f"{kind} message needs one particle table"
                + (f" and a heatmap of shape {heat_shape}" if heat_shape is not None else ""),
                reason="parts",
            )
        table = arrays[0]
        n = header.n  # type: ignore[attr-defined]
        if len(table) != n:
            raise PayloadError(f"header n={n} but table has {len(table)} rows", reason="length")
        parts.append(_table_buffer(table))
        if heat_shape is not None:
            heat = arrays[1]
            if heat.dtype != np.uint8 or heat.shape != tuple(heat_shape):
                raise PayloadError(f"{kind} heatmap must be uint8 of shape {heat_shape}, got "
                                   f"{heat.dtype} {heat.shape}", reason="shape")
            parts.append(np.ascontiguousarray(heat).data.cast("B"))
    elif kind == "class":
        for arr in arrays:
            parts.append(np.ascontiguousarray(arr, dtype=np.uint8).data.cast("B"))
    elif kind == "lens":
        shapes = [tuple(x) for x in header.shapes]  # type: ignore[attr-defined]
        if len(arrays) != len(shapes) or any(a.shape != sh for a, sh in zip(arrays, shapes,
                                                                           strict=False)):
            raise PayloadError(f"lens reply needs one array per shape {shapes}", reason="shape")
        for arr in arrays:
            parts.append(np.ascontiguousarray(arr, dtype="<f2").data.cast("B"))
    elif kind == "preview":
        size = header.size  # type: ignore[attr-defined]
        if len(arrays) != 1 or arrays[0].dtype != np.uint8 or arrays[0].shape != tuple(size):
            raise PayloadError(f"preview message needs one uint8 image of size {size}",
                               reason="shape")
        parts.append(np.ascontiguousarray(arrays[0]).data.cast("B"))
    elif arrays:
        raise PayloadError(f"{kind} message carries no buffers", reason="parts")
    return parts


def _decode_heatmap(buf: Buffer, shape: tuple[int, int] | None) -> np.ndarray:
    heat = np.frombuffer(memoryview(buf), dtype=np.uint8)
    if shape is None or heat.size != shape[0] * shape[1]:
        raise PayloadError(f"heatmap of {heat.size} bytes does not match heatmap_shape {shape}",
                           reason="length")
    return heat.reshape(shape)


def decode_message(parts: Sequence[Buffer]) -> Message:
    """Decode any message by its topic; raises a ProtocolError naming what is wrong."""
    if len(parts) < 2:
        raise MalformedMessage(f"message must have at least 2 parts, got {len(parts)}", reason="parts")
    topic = bytes(parts[0]).decode("utf-8", errors="replace")
    kind = topic.split(".", 1)[0]
    model = HEADERS.get(kind)
    if model is None:
        raise MalformedMessage(f"unknown topic {topic[:60]!r}", reason="topic")
    if kind == "frame":
        header, array = decode_frame(parts)
        return Message(topic, header, array)
    header = unpack_header(parts[1], model)
    if kind == "det":
        _split(parts, 3, 3, kind)
        return Message(topic, header, _decode_table(parts[2], header.n))
    if kind == "alert":
        want = 3 if header.heatmap_shape is None else 4
        _split(parts, want, want, kind)
        table = _decode_table(parts[2], header.n)
        heat = _decode_heatmap(parts[3], header.heatmap_shape) if want == 4 else None
        return Message(topic, header, table, heat)
    if kind == "class":
        _split(parts, 2, 3, kind)
        if len(parts) == 3:
            return Message(topic, header, _decode_heatmap(parts[2], header.heatmap_shape))
        return Message(topic, header)
    if kind == "lens":
        n = len(header.shapes)
        _split(parts, 2 + n, 2 + n, kind)
        arrays = []
        for buf, shape in zip(parts[2:], header.shapes, strict=True):
            arr = np.frombuffer(memoryview(buf), dtype="<f2")
            if arr.size != int(np.prod(shape)):
                raise PayloadError(f"lens output of {arr.size} values does not match shape "
                                   f"{shape}", reason="length")
            arrays.append(arr.reshape(shape))
        return Message(topic, header, None, extra=tuple(arrays))
    if kind == "preview":
        _split(parts, 3, 3, kind)
        rows, cols = header.size
        img = np.frombuffer(memoryview(parts[2]), dtype=np.uint8)
        if img.size != rows * cols:
            raise PayloadError(f"preview of {img.size} bytes does not match size {header.size}",
                               reason="length")
        return Message(topic, header, img.reshape(rows, cols))
    _split(parts, 2, 2, kind)
    return Message(topic, header)
