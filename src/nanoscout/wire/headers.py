"""Wire protocol v1 headers: typed, frozen pydantic models of every message kind.

Each header class names its :class:`Kind` (the topic's first word) and declares the raw buffers
that follow it on the wire (:mod:`nanoscout.wire.codec` encodes and decodes from that table).
A header cannot describe an impossible frame: every integer is bounded (sides 1..65536 px,
sequence numbers and times within int64), the source name is matched in full, pixel types come
from an allow-list and every float is finite.

Result headers are decoded to the same standard, so that no client meets a value it cannot
store or show: their counts, times and sides fit int64 (``det.shape`` 0..65536 px), a ``det``
in nm has a plausible pixel size (:data:`PIXEL_SIZE_RANGE_NM`) and a pixel size is never
absurd, a ``class`` has one probability per label, ``det.meta`` follows the rules of
``frame.meta`` (:data:`MetaValue`) and free maps (``stats.clusters``, block fields a newer
minor version adds) hold only what JSON can write (no bytes). These refuse only
values no valid sender produces, so they are no protocol change (no new minor version).

Every result of one frame shares :class:`FrameRef` (source, seq, acquisition time, stage
position, per-stage times) and carries ``topic_seq``: a per-topic, per-source message counter
(protocol v1.3) with which any subscriber sees any lost message, whatever it subscribes to.

History (minor versions only add optional fields; receivers ignore fields they do not know):

* 1.0 ``frame``, ``det``, ``stats``, ``class``, ``alert``, ``health``
* 1.1 ``preview`` topic, ``det.working_scale``
* 1.2 particle ``cluster`` column, ``stats.clusters``, heatmaps on ``alert``, lens query
* 1.3 ``topic_seq`` and the shared frame reference (``stage``, ``stage_ms``, ``t_acq_ns``) on
  every result header; ``health.transport_gaps_by_source``, ``health.sources``,
  ``health.sources_evicted`` and ``health.started_ns``; ``frame.session`` (an adapter run's
  id: its frames may be resent, and a number seen twice is a duplicate); the ``ack.<source>``
  topic (lossless: what became of each frame of a session)
* 1.4 in-situ dynamics: the particle table's ``track_id`` column (four bytes more per row: a
  v1.3 receiver cannot read a v1.4 table, as with ``cluster`` in 1.2); ``det.drift`` (the
  frame's registration: shift against the previous frame and against the field's reference,
  px and nm, the field of view it belongs to) and ``det.tracking`` (tracks started / ended,
  coalescence and fragmentation events); ``stats.unique`` (statistics that count each tracked
  particle once, per field and in total, with 95 % intervals over tracks) and ``stats.insitu``
  (D50 and number density of this frame with intervals, coalescence count and rate, growth
  rates, the LSW ripening fit); the ``control_request`` / ``control`` pair on the query socket
  (reset a source's statistics, set its drift reference now)
* 1.5 operator-in-the-loop adaptation: ``det.model_sha256`` (the first 12 hex digits of the
  sha256 of the ONNX file that analysed the frame) and ``det.model_generation`` (0 for the
  model the daemon started with, +1 for every hot swap or revert), so that every ``det`` names
  the model that made it; ``health.model`` / ``health.model_sha256`` / ``health.model_generation``
  (the detection model in use), ``health.model_swaps`` / ``health.model_swap_failures``,
  ``health.frames_saved`` / ``health.frame_save_failures`` (raw frames written for review);
  control requests ``save_frame`` (write the newest raw frame(s) of a source as calibrated
  TIFF), ``swap_model`` (``model`` = an ONNX file with its card beside it, or the card;
  ``sha256`` = the ONNX file's expected sha256) and ``revert_model`` (back to the model before
  the last swap), with ``source`` optional for the model actions; ``control`` replies carry
  ``model`` / ``model_sha256`` / ``model_generation`` (the model serving after the request),
  ``files`` (frames written) and ``elapsed_ms``. A v1.4 daemon answers the new actions with
  an ``error``; v1.4 readers ignore the new fields.
* 1.6 particle confidence: ``alert.confidence`` (the probability that the particle an alert
  describes is real, from a calibrated detector; for a count rule that counts expected
  particles, their mean confidence); ``stats.weights`` (``"confidence"``: this frame's
  particles entered the size statistics weighted by their confidence; ``"none"``: each
  counted once, as before 1.6, and always for a detector without a score calibration),
  ``expected_count`` in the ``window`` / ``cumulative`` blocks (the sum of the weights) and
  ``weighted_counts`` beside each histogram's ``counts`` (which stay the number of
  particles). A v1.5 reader ignores them; with ``weights = "confidence"`` the blocks'
  means and quantiles are confidence-weighted.
* 1.7 an adapted model's size band: ``det.base_network_only`` (True where an adapted model's
  base network alone analysed the frame, with its own card's scale and score cut, because
  the particle size it measured lies outside the sizes the adaptation was chosen on: model
  card ``base_network.particle_px``; ``model`` / ``model_sha256`` still name the adapted
  model, which holds that rule), or because the adapted network found far more particles
  than the base network there (``base_network.max_count_ratio``: it broke down on the frame;
  the same field, no new version). A v1.6 reader ignores it.
* 1.8 the operator's particle size: ``frame.particle_size_nm`` / ``frame.particle_size_px``
  (the range of the frame's median particle diameter, which the automatic working scale keeps
  its estimate inside), ``det.size_hint`` (what that range did) and the control request
  ``set_particle_size`` (a source's range for its frames that name none).
* 1.9 low-dose frames: ``det.noise`` (the frame's white noise, a fraction of its normalised
  range) and ``det.smoothing_px`` (the Gaussian it was smoothed by before the network, where
  the model card says so).
* 1.10 ``det.scale_agreed``: whether two working-scale estimation passes agreed on the
  particles' size or the card's fallback chose the scale.
* 1.11 ``daemon_run`` on every result header (:class:`FrameRef`): the daemon process that made
  the result, named by its start time in ns since the epoch (the value its ``health.started_ns``
  carries). A restarted daemon numbers its tracks, fields of view and ``topic_seq`` from the
  start again: a client that keeps results across a restart (``nanoscout record``) tells them
  apart by ``daemon_run``. Optional: None from ``nanoscout measure`` (no daemon) and from a
  daemon before 1.11; a v1.10 reader ignores it.
* 1.12 ``health.input_connections``: connections to the daemon's frame input since start, by
  event (``accepted``, ``disconnected``, ``handshake_failed``, ``handshake_failed_auth``;
  ``nanoscout.daemon.connections``). A message part over the input's transport cap (2 x
  ``input.max_frame_bytes`` + 1 MiB) is dropped by ZeroMQ with its connection before it can
  be rejected; it shows only here, as ``disconnected``, as an adapter that went away does.
  Empty from a daemon before 1.12; a v1.11 reader ignores it.
* 1.13 ``health.connections``: the same counts for each of the daemon's listening sockets, by
  socket (``input``, as ``input_connections``; ``results``, where subscribers connect;
  ``query``, where the query socket is served) and event: a subscriber or query client
  refused for its CURVE key shows here as ``handshake_failed_auth`` of its socket. Empty from
  a daemon before 1.13; a v1.12 reader ignores it. Also a new key in both maps (in
  ``input_connections`` too, from a 1.13 daemon): ``handshake_aborted``, a connection the
  peer closed (or that timed out) before its handshake completed, as a short-lived client or
  a TCP probe does, which a daemon before 1.13 counted as ``handshake_failed``; a reader
  that sums the events of a socket finds the same total.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from nanoscout.wire.buffers import (
    BufferSpec,
    Float16Maps,
    Heatmap,
    Picture,
    Pixels,
    Table,
)
from nanoscout.wire.errors import PayloadError, Reason

__all__ = [
    "FRAME_DTYPES", "HEADERS", "MAX_SIDE_PX", "PARTICLE_SIZE_RANGE_NM",
    "PARTICLE_SIZE_RANGE_PX", "PIXEL_SIZE_RANGE_NM", "PROTOCOL_VERSION", "ParticleSizeNm",
    "ParticleSizePx", "SizeHint", "check_particle_size_nm", "check_particle_size_px",
    "AckHeader", "AlertHeader", "ClassHeader", "ControlReply", "ControlRequest", "DetHeader",
    "Distribution", "Drift", "FieldStats", "FrameDrift", "FrameHeader", "FrameRef", "Header",
    "HealthHeader", "Histogram", "InSitu", "Kind", "LensReply", "LensRequest", "LswFit",
    "MODEL_ACTIONS", "MetaValue", "Modality", "PreviewHeader", "SOURCE_ACTIONS", "StatsBlock",
    "StatsHeader", "Stage", "TrackEvent", "Tracking", "UniqueStats", "Units", "frame_header",
    "CLOCK_AHEAD_S", "CLOCK_BEHIND_S",
]

PROTOCOL_VERSION: tuple[int, int] = (1, 13)

#: pixel dtypes a frame may carry (numpy kind+size, either byte order)
FRAME_DTYPES: frozenset[str] = frozenset({"u1", "u2", "u4", "i1", "i2", "i4", "f4", "f8"})

#: longest side of a frame, px
MAX_SIDE_PX = 65536

#: plausible pixel sizes, nm: from sub-ångström STEM to millimetre-scale SEM overviews
PIXEL_SIZE_RANGE_NM: tuple[float, float] = (1e-4, 1e6)

#: plausible particle diameters an operator may name, nm: from sub-nanometre clusters to
#: centimetre-scale grains
PARTICLE_SIZE_RANGE_NM: tuple[float, float] = (1e-2, 1e7)
#: the same in frame pixels (for frames without a pixel size, above all)
PARTICLE_SIZE_RANGE_PX: tuple[float, float] = (0.5, float(65536))

#: largest stage coordinate, µm (a metre: far beyond any holder)
MAX_STAGE_UM = 1e6

#: a frame stamped more than this long before its arrival (``t_recv_ns - t_acq_ns``), or more
#: than :data:`CLOCK_AHEAD_S` after it, has an acquisition clock that disagrees with the
#: daemon's (or a ``t_acq_ns`` of 0): its latency is measured from its arrival, s
CLOCK_BEHIND_S = 3600.0
CLOCK_AHEAD_S = 1.0

_INT64_MAX = 2**63 - 1
_SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")

Modality = Literal["TEM", "STEM", "SEM"]
#: what a frame's ``particle_size_nm`` did (``det.size_hint``): the automatic estimate lay in
#: the range ("agreed") or the range replaced it ("applied"); not used: the frame has no pixel
#: size and no ``particle_size_px`` ("uncalibrated") or the scale is not estimated (fixed or
#: preset: "unused")
SizeHint = Literal["agreed", "applied", "uncalibrated", "unused"]
#: the kinds of image a frame header can name
MODALITIES: tuple[str, ...] = get_args(Modality)
Units = Literal["nm", "px"]


def check_particle_size_nm(value: tuple[float, float]) -> tuple[float, float]:
    """Return an operator's particle size range (low, high), nm, as it is; ValueError unless
    :data:`PARTICLE_SIZE_RANGE_NM` holds low <= high."""
    return _check_range(value, PARTICLE_SIZE_RANGE_NM, "particle_size_nm", "nm")


def check_particle_size_px(value: tuple[float, float]) -> tuple[float, float]:
    """The same as :func:`check_particle_size_nm` for a range in frame pixels
    (:data:`PARTICLE_SIZE_RANGE_PX`)."""
    return _check_range(value, PARTICLE_SIZE_RANGE_PX, "particle_size_px", "px")


def _check_range(value: tuple[float, float], bounds: tuple[float, float], name: str,
                 unit: str) -> tuple[float, float]:
    lo, hi = bounds
    if not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name} {list(value)!r} must be [low, high] with "
                         f"{lo:g} <= low <= high <= {hi:g} {unit}")
    return value


class Kind(StrEnum):
    """Message kinds: the first word of the topic (``det.<source>`` is a ``det``)."""

    FRAME = "frame"
    DET = "det"
    STATS = "stats"
    CLASS = "class"
    PREVIEW = "preview"
    ALERT = "alert"
    HEALTH = "health"
    LENS_REQUEST = "lens_request"
    LENS = "lens"
    ACK = "ack"
    CONTROL_REQUEST = "control_request"
    CONTROL = "control"


def _source(value: str) -> str:
    if _SOURCE_RE.fullmatch(value) is None:
        raise ValueError(
            f"source {value!r} must be 1-64 characters of letters, digits and _.:- "
            "(it becomes part of the topic)"
        )
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return value


#: a source name (a topic suffix)
Source = Annotated[str, AfterValidator(_source)]
#: a sequence number or a time in ns: 0 .. 2**63 - 1 (fits every int64 column)
Count64 = Annotated[StrictInt, Field(ge=0, le=_INT64_MAX)]
Finite = Annotated[float, AfterValidator(_finite)]
#: an operator's (low, high) median particle diameter, nm (:func:`check_particle_size_nm`)
ParticleSizeNm = Annotated[tuple[Finite, Finite], AfterValidator(check_particle_size_nm)]
#: the same in frame px (:func:`check_particle_size_px`)
ParticleSizePx = Annotated[tuple[Finite, Finite], AfterValidator(check_particle_size_px)]
Side = Annotated[StrictInt, Field(ge=1, le=MAX_SIDE_PX)]
#: a count, an index or a time in a result header: 0 .. 2**63 - 1 (fits every int64 column);
#: unlike :data:`Count64` also an integral float or a numpy integer, as these fields took before
Int64Count = Annotated[int, Field(ge=0, le=_INT64_MAX)]
#: a frame side that may be unknown (0, a ``det`` of an older daemon): 0 .. 65536 px
SideOrZero = Annotated[StrictInt, Field(ge=0, le=MAX_SIDE_PX)]
#: a finite, non-negative float (seconds, rates, milliseconds)
_NonNegative = Annotated[float, AfterValidator(_finite), Field(ge=0)]
#: values of a frame's free ``meta`` map (at most 64 entries, keys of 1-64 characters): strings
#: of at most 1024 characters, int64 integers, finite floats, booleans or null
MetaValue = str | bool | int | float | None
_META_MAX = 64
#: how deep a free map in a result header may nest (:func:`_check_json`)
_JSON_MAX_DEPTH = 16


def _check_pixel_size(value: float | None) -> float | None:
    """``value`` (nm per px) unless it is absurd: ValueError outside
    :data:`PIXEL_SIZE_RANGE_NM` (None, uncalibrated, passes)."""
    lo, hi = PIXEL_SIZE_RANGE_NM
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"pixel_size_nm {value!r} is absurd (expected {lo:g}..{hi:g} nm, "
                         "or null for an uncalibrated frame)")
    return value


def _check_meta(value: object) -> object:
    """A frame's free ``meta`` map as it is (:data:`MetaValue`); ValueError naming the first
    entry that breaks the rules."""
    if not isinstance(value, dict):
        raise ValueError(f"meta must be a map, got {type(value).__name__}")
    if len(value) > _META_MAX:
        raise ValueError(f"meta has {len(value)} entries; at most {_META_MAX} are allowed")
    for key, v in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 64:
            raise ValueError(f"meta key {key!r:.40} must be a string of 1-64 characters")
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not -(2**63) <= v <= _INT64_MAX:
                raise ValueError(f"meta[{key!r}] = {v} does not fit an int64")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"meta[{key!r}] = {v} is not a finite number")
        elif isinstance(v, str):
            if len(v) > 1024:
                raise ValueError(f"meta[{key!r}] has {len(v)} characters; at most 1024")
        else:
            raise ValueError(f"meta[{key!r}] is a {type(v).__name__}; only strings, "
                             "numbers, booleans and null are allowed")
    return value


#: nm per px, or None for an uncalibrated frame (:func:`_check_pixel_size`)
PixelSizeNm = Annotated[float | None, AfterValidator(_check_pixel_size)]
#: a frame's free map (:func:`_check_meta`)
Meta = Annotated[dict[str, MetaValue], BeforeValidator(_check_meta)]


def _check_json(value: object, where: str, depth: int = 0) -> None:
    """ValueError naming ``where`` unless ``value`` is what JSON can write: null, booleans,
    int64 integers, floats, strings, lists and maps with string keys, at most
    :data:`_JSON_MAX_DEPTH` deep (a free map of a result header: ``stats.clusters``, the
    fields a newer minor version adds to a statistics block; never bytes)."""
    if depth > _JSON_MAX_DEPTH:
        raise ValueError(f"{where} is nested deeper than {_JSON_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | float | str):
        return
    if isinstance(value, int):
        if not -(2**63) <= value <= _INT64_MAX:
            raise ValueError(f"{where} = {value} does not fit an int64")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a key {k!r:.40} that is not a string")
            _check_json(v, f"{where}[{k!r:.40}]", depth + 1)
    else:
        raise ValueError(f"{where} is a {type(value).__name__}; only null, booleans, numbers, "
                         "strings, lists and maps are allowed")


class Header(BaseModel):
    """Common base: frozen; unknown (newer minor-version) fields are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    #: the message kind (the topic's first word)
    topic_kind: ClassVar[Kind]
    #: the raw buffers that follow the header on the wire, in order
    buffers: ClassVar[tuple[BufferSpec, ...]] = ()
    v: tuple[int, int] = PROTOCOL_VERSION

    def topic(self) -> bytes:
        """The ZeroMQ topic: the kind, and ``.<source>`` for per-source messages."""
        source = getattr(self, "source", None)
        kind = self.topic_kind
        return (kind.value if source is None else f"{kind.value}.{source}").encode()


class Stage(BaseModel):
    """Stage position, µm."""

    model_config = ConfigDict(frozen=True)
    x_um: Annotated[Finite, Field(ge=-MAX_STAGE_UM, le=MAX_STAGE_UM)]
    y_um: Annotated[Finite, Field(ge=-MAX_STAGE_UM, le=MAX_STAGE_UM)]


class FrameHeader(Header):
    """One acquired frame, adapter → daemon."""

    topic_kind: ClassVar[Kind] = Kind.FRAME
    buffers: ClassVar[tuple[BufferSpec, ...]] = (Pixels(),)
    source: Source
    seq: Count64
    t_acq_ns: Count64
    shape: tuple[Side, Side]
    dtype: str
    pixel_size_nm: PixelSizeNm = None
    modality: Modality | None = None
    stage: Stage | None = None
    magnification: Annotated[Finite, Field(gt=0, le=1e9)] | None = None
    meta: Meta = Field(default_factory=dict)
    #: v1.3: the adapter run that numbered this frame (1-32 of A-Z a-z 0-9 _ -); frames of one
    #: session may be resent after a daemon restart, so the daemon drops a number it already
    #: took (``rejected{reason="duplicate"}``) and counts no gap for a late one
    session: str | None = None
    #: v1.8: the operator's range (lo, hi) for the frame's median particle diameter, nm. The
    #: automatic working scale keeps an estimate inside it and moves one outside it to its
    #: nearest end (``det.size_hint``); it needs ``pixel_size_nm`` to be used
    particle_size_nm: ParticleSizeNm | None = None
    #: v1.8: the same range in frame px, used where no range in nm can be: the frame has no
    #: pixel size (figure crops, PNG / JPEG files), or no range in nm is named
    particle_size_px: ParticleSizePx | None = None

    @field_validator("session")
    @classmethod
    def _session(cls, value: str | None) -> str | None:
        if value is not None and _SESSION_RE.fullmatch(value) is None:
            raise ValueError(f"session {value!r:.40} must be 1-32 of A-Z a-z 0-9 _ -")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        try:
            dt = np.dtype(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"dtype {value!r} is not a numpy dtype") from exc
        if f"{dt.kind}{dt.itemsize}" not in FRAME_DTYPES:
            raise ValueError(
                f"dtype {value!r} is not supported; use one of "
                "uint8/uint16/uint32/int8/int16/int32/float32/float64"
            )
        return dt.str

    def topic(self) -> bytes:
        """Frames all share the topic ``frame`` (the daemon's SUB input subscribes to it)."""
        return b"frame"


    @property
    def nbytes(self) -> int:
        """Payload size the header announces, bytes (exact Python integers, no overflow)."""
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize

    @property
    def units(self) -> Units:
        """Length unit of this frame's results: nm when calibrated, px otherwise."""
        return "nm" if self.pixel_size_nm is not None else "px"


class FrameRef(Header):
    """What every result of one frame carries: which frame (source, seq, acquisition time,
    stage position in µm), the per-stage times so far (ms) and the message's ``topic_seq``."""

    source: Source
    seq: Count64
    t_acq_ns: Count64 = 0
    stage: Stage | None = None
    stage_ms: dict[str, float] = Field(default_factory=dict)
    #: per topic and source: 0, 1, 2, ... as the daemon publishes them (v1.3; None before)
    topic_seq: Count64 | None = None
    #: v1.11: the daemon run that made the result: its start time, ns since the epoch (its
    #: ``health.started_ns``); track ids, fields and ``topic_seq`` start again with each run.
    #: None without a daemon (``nanoscout measure``) or from a daemon before 1.11
    daemon_run: Int64Count | None = None


class FrameDrift(BaseModel):
    """Where this frame lies on the specimen (v1.4, :mod:`nanoscout.analysis.drift`).

    Shifts are the content's motion in the image, x = columns, y = rows (a particle at frame
    position p lies at p - (x_px, y_px) in the field's reference frame). ``dx_px``/``dy_px``:
    against the previous frame of the field; ``x_px``/``y_px``: against the field's drift
    reference (its first frame, or the frame of a "set drift reference now"); ``*_nm`` the same
    in nm (None when uncalibrated). ``field``: the field of view (0, 1, ... per source; a stage
    move or a lost registration starts a new one, ``new_field`` with its ``reason``).
    ``matched``: fraction of the previous frame's particles found again after the shift (None
    without particles); ``method``: ``particles`` (phase correlation refined on the particle
    positions), ``phase`` (the image alone), ``none`` (first frame of a field).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")
    field: Annotated[StrictInt, Field(ge=0)] = 0
    new_field: bool = False
    reason: str | None = None
    dx_px: Finite = 0.0
    dy_px: Finite = 0.0
    x_px: Finite = 0.0
    y_px: Finite = 0.0
    x_nm: Finite | None = None
    y_nm: Finite | None = None
    matched: Finite | None = None
    method: Literal["particles", "phase", "none"] = "none"


class TrackEvent(BaseModel):
    """A coalescence (``merge``: parents [continuing, absorbed], child the continuing track,
    which keeps its id) or a fragmentation (``split``: parent, children [parent, new]);
    ``x``/``y`` where (px, coordinates of the frame that carries the event), ``ecd`` the
    child's (merge) or the parent's (split) ECD in the det's units. ``seq``: the frame it
    happened on: a merge is published once the absorbed track has stayed away for the gap
    allowance (``max_gap_frames`` frames later), so that a particle only hidden for a frame or
    two is never called merged."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: Literal["merge", "split"]
    seq: Count64 | None = None
    parents: list[Annotated[StrictInt, Field(ge=1)]] = Field(max_length=8)
    children: list[Annotated[StrictInt, Field(ge=1)]] = Field(max_length=8)
    x: Finite = 0.0
    y: Finite = 0.0
    ecd: Finite | None = None


class Tracking(BaseModel):
    """What the tracker did on this frame (v1.4, :mod:`nanoscout.analysis.tracking`): tracks
    alive after it, started and ended on it (``ended`` counts tracks given up after their gap
    allowance, merged or split), tracks of the source so far, and the merge / split events."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    active: Annotated[StrictInt, Field(ge=0)] = 0
    started: Annotated[StrictInt, Field(ge=0)] = 0
    ended: Annotated[StrictInt, Field(ge=0)] = 0
    total: Annotated[StrictInt, Field(ge=0)] = 0
    events: list[TrackEvent] = Field(default_factory=list, max_length=256)
    #: events found beyond the 256 listed
    events_truncated: Annotated[StrictInt, Field(ge=0)] = 0


class DetHeader(FrameRef):
    """Detections of one frame, daemon → subscribers; the buffer is the particle table."""

    topic_kind: ClassVar[Kind] = Kind.DET
    buffers: ClassVar[tuple[BufferSpec, ...]] = (Table("n"),)
    t_recv_ns: Count64
    t_done_ns: Count64
    #: the frame's nm per px (:data:`PIXEL_SIZE_RANGE_NM`); None: uncalibrated, units px
    pixel_size_nm: PixelSizeNm
    #: the unit of the table's lengths: nm needs ``pixel_size_nm``
    units: Units
    n: Count64
    engine: str
    model: str = ""
    #: the frame's rows, cols (px); (0, 0) from a daemon older than 1.1
    shape: tuple[SideOrZero, SideOrZero] = (0, 0)
    modality: Modality | None = None
    #: the frame's meta, passed through (the rules of :attr:`FrameHeader.meta`)
    meta: Meta = Field(default_factory=dict)
    #: working px per frame px the detector resampled the frame by (v1.1; None from v1.0)
    working_scale: float | None = None
    #: v1.4: the frame's registration and field of view (None: tracking off)
    drift: FrameDrift | None = None
    #: v1.4: tracks started / ended and merge / split events on this frame (None: tracking off)
    tracking: Tracking | None = None
    #: v1.5: first 12 hex digits of the sha256 of the ONNX file that analysed this frame
    #: (None: an older daemon); with ``model`` (card name:version) it names the model. Where
    #: the engine runs the model's INT8 sibling in its place (``engine`` ends in ``/int8``),
    #: the served model's file: the identity hot swaps use
    model_sha256: str | None = None
    #: v1.5: 0 for the model the daemon started with, +1 for each hot swap or revert since
    model_generation: Annotated[StrictInt, Field(ge=0)] | None = None
    #: v1.7: True where an adapted model's base network alone analysed the frame (its particle
    #: size lies outside the adapted band, model card ``base_network.particle_px``, or the
    #: adapted network found more than ``base_network.max_count_ratio`` times its particles);
    #: None: an older daemon
    base_network_only: StrictBool | None = None
    #: v1.8: what the frame's ``particle_size_nm`` did to the working scale (:data:`SizeHint`);
    #: None: the frame named no range (or an older daemon)
    size_hint: SizeHint | None = None
    #: v1.9: the frame's white noise, a fraction of its normalised range (0.5 / 99.5
    #: percentiles -> 0 / 1; ``nanoscout.analysis.denoise.noise_sigma``); None: the model
    #: card does not smooth low-dose frames, so it was not measured (or an older daemon)
    noise: Annotated[float, Field(ge=0)] | None = None
    #: v1.9: standard deviation (frame px) of the Gaussian the frame was smoothed by before the
    #: network, because its noise was above the card's ``normalization.denoise.target``; 0: not
    #: smoothed; None: not measured (or an older daemon)
    smoothing_px: Annotated[float, Field(ge=0)] | None = None
    #: v1.10: whether two of the working-scale estimation passes agreed on the particles' size
    #: (True), or the card's fallback chose the scale without such agreement (False); None:
    #: no particle found, nothing estimated (fixed or preset scale, a card without the
    #: consistency check) or an older daemon. A diagnostic of the estimate (why did this
    #: frame get that scale?), not a measure of the result's accuracy
    scale_agreed: StrictBool | None = None


    @model_validator(mode="after")
    def _calibrated(self) -> DetHeader:
        # the daemon says nm exactly when the frame had a pixel size (FrameHeader.units): a
        # table in nm without one cannot be converted to px (runfile, to_pandas)
        if self.units == "nm" and self.pixel_size_nm is None:
            raise ValueError("units nm needs a pixel_size_nm (an uncalibrated frame's lengths "
                             "are px)")
        return self

    @property
    def latency_ms(self) -> float | None:
        """Acquisition-to-result latency, ms (clocks of adapter and daemon host), as the
        daemon measures it for its ``health`` percentiles: from the frame's arrival where its
        acquisition time is implausible (:data:`CLOCK_BEHIND_S`, :data:`CLOCK_AHEAD_S`), at
        least 0 (an adapter clock up to 1 s ahead). None (unknown) where the daemon's own
        times disagree: a result done before its frame arrived (``t_done_ns`` 0 or below
        ``t_recv_ns``) has no latency, not one of -10^12 ms."""
        if self.t_done_ns < self.t_recv_ns:
            return None
        transport_s = (self.t_recv_ns - self.t_acq_ns) / 1e9
        since = self.t_acq_ns if -CLOCK_AHEAD_S <= transport_s <= CLOCK_BEHIND_S else self.t_recv_ns
        return max((self.t_done_ns - since) / 1e6, 0.0)


class _Block(BaseModel):
    """A statistics block: typed attributes, also readable as ``block["name"]``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    @model_validator(mode="after")
    def _extras_are_json(self) -> _Block:
        # fields of a newer minor version are kept untyped: they must be what JSON can write
        for name, value in (self.model_extra or {}).items():
            _check_json(value, name)
        return self

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        """The field ``name``, or ``default``."""
        return getattr(self, name, default)


class Distribution(_Block):
    """Summary of one particle property (lengths in the stats' units), number-weighted or,
    with ``stats.weights = "confidence"``, confidence-weighted (v1.6)."""

    mean: float | None = None
    sd: float | None = None
    d10: float | None = None
    d50: float | None = None
    d90: float | None = None
    min: float | None = None
    max: float | None = None


class Histogram(_Block):
    """Counts per bin (``edges`` has one more entry), and the values below / above them."""

    edges: list[float] = Field(default_factory=list)
    counts: list[Int64Count] = Field(default_factory=list)
    under: Int64Count = 0
    over: Int64Count = 0
    #: v1.6: the sum of the particles' weights per bin (``stats.weights``), None unweighted
    weighted_counts: list[float] | None = None


class StatsBlock(_Block):
    """The ``window`` or ``cumulative`` block of a ``stats`` message (see analysis.stats)."""

    n_frames: Int64Count = 0
    count: Int64Count = 0
    ecd: Distribution = Distribution()
    aspect_ratio: Distribution = Distribution()
    roundness: Distribution = Distribution()
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    #: particles per µm²; None when uncalibrated
    number_density_per_um2: float | None = None
    #: cumulative block: the bound on its quantiles' relative error
    ecd_quantile_rel_error: float | None = None
    #: v1.6: the sum of the particles' weights (``stats.weights = "confidence"``: the expected
    #: number of real particles; ``"none"``: ``count``); None from a v1.5 daemon
    expected_count: float | None = None


class Drift(_Block):
    """D50 now against the source's first frames (in-situ growth / sintering), %."""

    reference_d50: float | None = None
    window_d50: float | None = None
    change_pct: float | None = None
    reference_frames: Int64Count = 0
    reference_complete: bool = False


class FieldStats(_Block):
    """One field of view's particles, each counted once (its tracks): ``count`` tracks whose
    size is known, their ECD D50 with its 95 % interval, the stage position (µm) when the
    frames carried one, and the frames imaged there."""

    field: Int64Count = 0
    n_frames: Int64Count = 0
    count: Int64Count = 0
    d50: float | None = None
    d50_ci: tuple[float, float] | None = None
    stage: Stage | None = None


class UniqueStats(_Block):
    """Statistics that count each physical particle once (v1.4): one value per track, its
    median ECD over its observations (border observations left out), for tracks seen on at
    least ``min_track_frames`` frames (or on every frame of a shorter field). ``count`` such
    tracks in ``fields`` fields of view over ``n_frames`` frames; ``ecd`` their distribution;
    ``ecd_d50_ci`` / ``ecd_mean_ci``: 95 % intervals over tracks (order statistics for the
    median, Student t for the mean); ``number_density_per_um2``: tracks per imaged area
    (None uncalibrated); ``by_field``: the newest fields (at most 64)."""

    n_frames: Int64Count = 0
    count: Int64Count = 0
    tracks_total: Int64Count = 0
    fields: Int64Count = 0
    min_track_frames: Int64Count = 1
    ecd: Distribution = Distribution()
    ecd_d50_ci: tuple[float, float] | None = None
    ecd_mean_ci: tuple[float, float] | None = None
    number_density_per_um2: float | None = None
    by_field: list[FieldStats] = Field(default_factory=list)


class LswFit(_Block):
    """LSW ripening fit of the source's field: mean radius cubed against time,
    ``<r>^3 = r0_cubed + k t``; ``k`` and its standard error in (length unit)^3 / s, ``r2``
    the fit's coefficient of determination over ``n`` frames spanning ``span_s`` seconds."""

    k: float | None = None
    k_se: float | None = None
    r0_cubed: float | None = None
    r2: float | None = None
    n: Int64Count = 0
    span_s: float = 0.0


class InSitu(_Block):
    """In-situ dynamics after this frame (v1.4, :mod:`nanoscout.analysis.insitu`).

    ``t_s``: seconds since the field's first frame. ``d50`` / ``d50_ci``: this frame's ECD D50
    and its 95 % order-statistic interval; ``density_per_um2`` / ``density_ci``: this frame's
    number density with its Poisson 95 % interval; ``mean_radius``: mean ECD / 2;
    ``coalescences``: merge events in the field so far, ``coalescence_rate_per_s`` their rate
    over its time (and per µm² when calibrated); ``growth_rate_d50`` / ``growth_rate_ci``: the
    median dECD/dt of the field's tracks with enough observations (length unit per s) and its
    95 % interval over tracks; ``lsw``: the ripening fit."""

    field: Int64Count = 0
    t_s: float = 0.0
    d50: float | None = None
    d50_ci: tuple[float, float] | None = None
    density_per_um2: float | None = None
    density_ci: tuple[float, float] | None = None
    mean_radius: float | None = None
    coalescences: Int64Count = 0
    coalescence_rate_per_s: float | None = None
    coalescence_rate_per_um2_s: float | None = None
    growth_rate_d50: float | None = None
    growth_rate_ci: tuple[float, float] | None = None
    growth_tracks: Int64Count = 0
    lsw: LswFit | None = None


class StatsHeader(FrameRef):
    """Rolling and cumulative size statistics of one source after one frame (analysis.stats).

    It is the frame's last message: a client waiting for one frame's results knows it has
    them all; its ``stage_ms`` holds every stage of the frame."""

    topic_kind: ClassVar[Kind] = Kind.STATS
    #: when the statistics were made, ns since the epoch
    t_ns: Count64
    units: Units
    window: StatsBlock
    cumulative: StatsBlock
    drift: Drift = Drift()
    #: v1.2: morphology clusters of the source (analysis.clusters.OnlineKMeans.summary), or None
    clusters: dict[str, Any] | None = None
    #: v1.4: each tracked particle counted once (``window`` and ``cumulative`` count every
    #: detection of every frame: per-frame statistics); None when tracking is off
    unique: UniqueStats | None = None
    #: v1.4: in-situ dynamics (growth, coalescence, ripening); None when tracking is off
    insitu: InSitu | None = None
    #: v1.6: how this frame's particles were weighted in ``window`` / ``cumulative``:
    #: "confidence" (their calibrated probability) or "none" (each 1: the statistics are
    #: not weighted, or the frame's detector has no score calibration)
    weights: Literal["confidence", "none"] = "none"

    @field_validator("clusters")
    @classmethod
    def _clusters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _check_json(value, "clusters")
        return value


class ClassHeader(FrameRef):
    """Field-of-view classification of one frame; an optional uint8 CAM heatmap follows."""

    topic_kind: ClassVar[Kind] = Kind.CLASS
    buffers: ClassVar[tuple[BufferSpec, ...]] = (Heatmap("heatmap_shape", slot="array"),)
    #: the top-k labels, most probable first, each with its probability (same length)
    labels: list[str]
    probabilities: list[float]
    novelty: float | None = None
    engine: str = ""
    heatmap_shape: tuple[Side, Side] | None = None

    @model_validator(mode="after")
    def _one_probability_per_label(self) -> ClassHeader:
        if len(self.labels) != len(self.probabilities):
            raise ValueError(f"{len(self.labels)} labels but {len(self.probabilities)} "
                             "probabilities: each label needs its probability")
        return self


class PreviewHeader(FrameRef):
    """A small uint8 picture of a frame for displays (rate-limited per source, v1.1).

    The buffer is ``size`` (rows, cols) uint8, the frame normalised by its 0.5 / 99.5
    percentiles and shrunk by ``scale`` (preview px per frame px); particle coordinates of the
    matching ``det`` message times ``scale`` land on it.
    """

    topic_kind: ClassVar[Kind] = Kind.PREVIEW
    buffers: ClassVar[tuple[BufferSpec, ...]] = (Picture("size"),)
    shape: tuple[SideOrZero, SideOrZero]  # the frame's rows, cols
    size: tuple[Side, Side]
    scale: Annotated[float, Field(gt=0)]
    pixel_size_nm: PixelSizeNm = None



class AlertHeader(FrameRef):
    """A rule that fired; the buffer holds the particle rows that fired (may be empty).

    v1.2: when ``heatmap_shape`` is set a second buffer follows, a uint8 heatmap of that shape
    covering the whole frame (the class activation map that explains a classification alert).
    """

    topic_kind: ClassVar[Kind] = Kind.ALERT
    buffers: ClassVar[tuple[BufferSpec, ...]] = (Table("n"), Heatmap("heatmap_shape"))
    rule: str
    kind: str  # the rule's kind: particle, count, d50_drift, class, novelty
    severity: Literal["info", "warning", "critical"]
    value: float
    threshold: float
    explanation: str
    units: Units = "nm"
    n: Count64 = 0
    heatmap_shape: tuple[Side, Side] | None = None
    #: v1.6: the probability that the particle described is real (a calibrated detector's
    #: score) or, for a count rule counting expected particles, their mean; None otherwise
    confidence: float | None = Field(None, ge=0, le=1)


class AckHeader(Header):
    """What became of one frame of an adapter session (lossless policy, protocol v1.3): its
    results were published (``answered``), it was dropped (``dropped``, with the reason), or it
    came again and was taken before (``duplicate``). Adapters confirm their frames with it."""

    topic_kind: ClassVar[Kind] = Kind.ACK
    source: Source
    session: str
    seq: Count64
    status: Literal["answered", "dropped", "duplicate"]
    reason: str | None = None


class HealthHeader(Header):
    """Daemon heartbeat, published every ``health.interval_s``. Counts are 64-bit and not
    negative, times and rates finite and not negative (a hostile heartbeat with 2**64-1
    frames or a NaN rate is a header error)."""

    topic_kind: ClassVar[Kind] = Kind.HEALTH
    t_ns: Int64Count
    uptime_s: _NonNegative
    policy: Literal["live", "lossless"]
    engines: dict[str, str]
    frames_received: Int64Count
    frames_processed: Int64Count
    frames_dropped: dict[str, Int64Count]
    rejected: dict[str, Int64Count]
    transport_gaps: Int64Count
    queue_depth: Int64Count
    fps: _NonNegative
    latency_ms_p50: _NonNegative | None
    latency_ms_p99: _NonNegative | None
    last_error: str | None = None
    #: v1.3: transport gaps per source, sources now tracked, sources evicted so far
    transport_gaps_by_source: dict[str, Int64Count] = Field(default_factory=dict)
    sources: Int64Count = 0
    sources_evicted: Int64Count = 0
    topic_seq: Count64 | None = None
    #: when this daemon started, ns since the epoch (a restart shows as a new value)
    started_ns: Int64Count | None = None
    #: v1.5: the detection model in use (card name:version), the first 12 hex digits of its
    #: ONNX file's sha256 and its generation (0 at start, +1 per swap or revert)
    model: str | None = None
    model_sha256: str | None = None
    model_generation: Int64Count | None = None
    #: v1.5: hot swaps and reverts done / refused or rolled back since start
    model_swaps: Int64Count = 0
    model_swap_failures: Int64Count = 0
    #: v1.5: raw frames written for review (TIFF) / saves that failed
    frames_saved: Int64Count = 0
    frame_save_failures: Int64Count = 0
    #: v1.12: connections to the frame input since start, by event: accepted, disconnected
    #: (after the handshake: an adapter that went away, or a message part over the transport
    #: cap, which ZeroMQ drops with the connection), handshake_aborted (v1.13: closed by the
    #: peer or timed out before the handshake completed, not a refusal; handshake_failed
    #: before), handshake_failed_auth (CURVE key refused), handshake_failed (another socket
    #: type, not ZeroMQ, no CURVE or another server key); empty before
    input_connections: dict[str, Int64Count] = Field(default_factory=dict)
    #: v1.13: connections to each listening socket since start, by socket (input, results,
    #: query where served) and event (as ``input_connections``); empty before
    connections: dict[str, dict[str, Int64Count]] = Field(default_factory=dict)


class LensRequest(Header):
    """A request on the daemon's query socket (REQ/REP, v1.2): the AI lens's outputs for the
    newest frame of ``source`` the daemon analysed. ``outputs``: lens output names (e.g.
    ``act_enc2``, ``reconstruction``); empty asks only for the list (``LensReply.available``).
    """

    topic_kind: ClassVar[Kind] = Kind.LENS_REQUEST
    source: Source
    outputs: list[str] = Field(default_factory=list, max_length=16)


class LensReply(Header):
    """The answer to a :class:`LensRequest`: one float16 buffer per name in ``outputs``, of the
    matching ``shapes`` (the lens's own layout, e.g. (1, channels, rows, cols); one shape per
    name, else the reply is malformed); ``error`` says why nothing came back (unknown source or
    output, no lens loaded)."""

    topic_kind: ClassVar[Kind] = Kind.LENS
    buffers: ClassVar[tuple[BufferSpec, ...]] = (Float16Maps("shapes"),)
    source: str
    seq: int = -1
    t_acq_ns: int = 0
    outputs: list[str] = Field(default_factory=list)
    shapes: list[list[Annotated[int, Field(ge=0, le=MAX_SIDE_PX)]]] = Field(default_factory=list)
    available: list[str] = Field(default_factory=list)
    novelty: float | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _one_shape_per_output(self) -> LensReply:
        # each name in outputs is one buffer of its shape: with fewer shapes the names and
        # the arrays cannot be paired (a client's zip failed with a ValueError)
        if len(self.outputs) != len(self.shapes):
            raise ValueError(f"{len(self.outputs)} outputs but {len(self.shapes)} shapes: each "
                             "output needs its shape")
        return self


#: control actions on one source (they need ``source``)
SOURCE_ACTIONS: tuple[str, ...] = ("reset_statistics", "set_drift_reference", "save_frame",
                                   "set_particle_size")
#: control actions on the daemon's detection model (``source`` is ignored)
MODEL_ACTIONS: tuple[str, ...] = ("swap_model", "revert_model")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ControlRequest(Header):
    """A request on the daemon's query socket (v1.4; v1.5 the last three actions).

    ``reset_statistics`` forgets the source's statistics, tracks and in-situ series (tracking
    goes on, new tracks from then); ``set_drift_reference`` makes the source's next frame the
    zero of its drift. Both apply before the next frame of ``source`` is analysed.
    ``save_frame`` writes the newest ``frames`` raw frames of ``source`` kept for review as
    calibrated TIFF. ``swap_model`` loads ``model`` (an ONNX file with its model card beside it,
    or the card), checks it against ``sha256`` (the ONNX file's, 64 lowercase hex digits) and
    a probe frame, and switches the daemon's detector to it between two frames;
    ``revert_model`` goes back to the model before the last swap. v1.8:
    ``set_particle_size`` gives ``source`` the range of its median particle diameter,
    ``particle_size_nm`` (None: none again), for its frames that name none
    (:attr:`FrameHeader.particle_size_nm`), from its next frame on."""

    topic_kind: ClassVar[Kind] = Kind.CONTROL_REQUEST
    source: Source | None = None
    action: Literal["reset_statistics", "set_drift_reference", "save_frame", "swap_model",
                    "revert_model", "set_particle_size"]
    #: swap_model: path of the ONNX file or its card, as the daemon's host sees it
    model: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    #: swap_model: the expected sha256 of the ONNX file (lowercase hex)
    sha256: str | None = None
    #: save_frame: how many of the newest raw frames of the source to write
    frames: Annotated[StrictInt, Field(ge=1, le=1024)] = 1
    #: set_particle_size: the source's (low, high) median particle diameter, nm; None clears it
    particle_size_nm: ParticleSizeNm | None = None

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and _SHA256_RE.fullmatch(value) is None:
            raise ValueError(f"sha256 {value!r:.80} must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ControlRequest:
        if self.action in SOURCE_ACTIONS and self.source is None:
            raise ValueError(f"{self.action} needs a source")
        if self.action == "swap_model" and (self.model is None or self.sha256 is None):
            raise ValueError("swap_model needs model (the ONNX file or its card) and sha256")
        if self.particle_size_nm is not None and self.action != "set_particle_size":
            raise ValueError(f"particle_size_nm belongs to set_particle_size, not {self.action}")
        return self


class ControlReply(Header):
    """The answer to a :class:`ControlRequest`: ``ok``, or ``error`` saying why not.

    v1.5: ``model`` / ``model_sha256`` / ``model_generation``: the detection model serving
    after the request (after a refused swap: the one still serving); ``files``: the frames a
    ``save_frame`` wrote; ``elapsed_ms``: how long the request took."""

    topic_kind: ClassVar[Kind] = Kind.CONTROL
    source: str
    action: str
    ok: bool = False
    error: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    model_generation: int | None = None
    files: list[str] = Field(default_factory=list)
    elapsed_ms: float | None = None


#: header class of each message kind
HEADERS: dict[Kind, type[Header]] = {
    h.topic_kind: h
    for h in (FrameHeader, DetHeader, StatsHeader, ClassHeader, PreviewHeader, AlertHeader,
              AckHeader, HealthHeader, LensRequest, LensReply, ControlRequest, ControlReply)
}


def frame_header(
    array: np.ndarray,
    *,
    source: str,
    seq: int,
    t_acq_ns: int,
    pixel_size_nm: float | None,
    modality: str | None = None,
    stage: tuple[float, float] | Stage | None = None,
    magnification: float | None = None,
    meta: Mapping[str, Any] | None = None,
    session: str | None = None,
    particle_size_nm: tuple[float, float] | None = None,
    particle_size_px: tuple[float, float] | None = None,
) -> FrameHeader:
    """Build the header describing ``array`` (a 2-D image); stage in µm, ``modality`` one of
    TEM, STEM, SEM, ``particle_size_nm`` / ``_px`` the operator's (low, high) median particle
    diameter, nm / frame px (validated)."""
    if array.ndim != 2:
        raise PayloadError(f"a frame must be 2-D, got shape {array.shape}", reason=Reason.SHAPE)
    if array.size == 0:
        raise PayloadError(f"zero-size frame (shape {array.shape})", reason=Reason.EMPTY)
    if stage is not None and not isinstance(stage, Stage):
        stage = Stage(x_um=stage[0], y_um=stage[1])
    return FrameHeader(
        source=source,
        seq=seq,
        t_acq_ns=t_acq_ns,
        shape=(int(array.shape[0]), int(array.shape[1])),
        dtype=array.dtype.str,
        pixel_size_nm=pixel_size_nm,
        modality=modality,
        stage=stage,
        magnification=magnification,
        meta=dict(meta or {}),
        session=session,
        particle_size_nm=particle_size_nm,
        particle_size_px=particle_size_px,
    )
