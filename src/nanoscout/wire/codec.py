"""Wire protocol v1 codec: pure functions between typed headers and ZeroMQ multipart messages.

A message is ``[topic, header, *buffers]``: the topic (bytes, for SUB prefix filtering), a
msgpack map validated by the header's pydantic model, then the raw buffers its class declares
(:mod:`nanoscout.wire.buffers`). No sockets here, nothing is ever unpickled, and every header
carries ``v = [major, minor]``; a receiver rejects an unknown major version with
:class:`~nanoscout.wire.errors.VersionError` (minor versions only add optional fields, so
unknown fields are ignored).

===========================  =======================  ======================================
topic                        header                   buffers
===========================  =======================  ======================================
``frame``                    :class:`FrameHeader`     frame pixels, C order, ``shape`` and
                                                      ``dtype`` (either byte order) from the
                                                      header
``det.<source>``             :class:`DetHeader`       ``n`` rows of the particle table
                                                      (:data:`~nanoscout.wire.particles.PARTICLE_DTYPE`)
``stats.<source>``           :class:`StatsHeader`     —
``class.<source>``           :class:`ClassHeader`     uint8 heatmap of ``heatmap_shape``, only
                                                      where that is not null
``preview.<source>``         :class:`PreviewHeader`   uint8 picture of ``size`` (rows, cols)
``alert.<source>``           :class:`AlertHeader`     ``n`` particle rows that fired (always
                                                      sent, maybe empty) [, uint8 heatmap of
                                                      ``heatmap_shape`` where not null]
``ack.<source>``             :class:`AckHeader`       — (lossless, frames with a ``session``)
``health``                   :class:`HealthHeader`    —
``lens_request[.<source>]``  :class:`LensRequest`     — (query socket)
``lens.<source>``            :class:`LensReply`       one little-endian float16 array per
                                                      name in ``outputs``, of ``shapes``
``control_request[.<src>]``  :class:`ControlRequest`  — (query socket, v1.4)
``control.<source>``         :class:`ControlReply`    — (query socket, v1.4)
===========================  =======================  ======================================

What a client without nanoscout sends (pyzmq + msgpack + numpy are enough; unknown keys are
ignored, so a misspelt optional key does nothing):

* a frame, ``[b"frame", header, pixels]`` to the daemon's input (PUSH to a ``lossless``
  daemon, PUB to a ``live`` one, which subscribes to ``frame``). Header keys: ``v``
  (``[1, minor]``, required), ``source`` (1-64 of ``A-Z a-z 0-9 _ . : -``, starting with a
  letter or digit), ``seq`` and ``t_acq_ns`` (integers, floats are refused; ns since the
  epoch), ``shape`` (``[rows, cols]``, 1..65536 each), ``dtype`` (a numpy dtype string:
  ``"uint16"``, ``"<u2"``, ``">u2"``; uint8/16/32, int8/16/32, float32/64); optional:
  ``pixel_size_nm`` (nm per px; null: uncalibrated, lengths in px), ``modality`` (``"TEM"``,
  ``"STEM"`` or ``"SEM"``), ``stage`` (``{"x_um": x, "y_um": y}``, µm), ``magnification``,
  ``meta`` (a flat map, at most 64 entries), ``session`` (1-32 of ``A-Z a-z 0-9 _ -``: a
  lossless daemon answers each such frame with an ``ack.<source>``), ``particle_size_nm`` /
  ``particle_size_px`` (``[low, high]`` median diameter). A frame the daemon refuses is
  counted by reason in ``health.rejected``; only its ``ack`` (``dropped``, the reason), where
  it has one, tells its adapter.
* on the query socket (REQ to the daemon's REP, default ``tcp://127.0.0.1:5557``; the request
  topic's first word picks the kind): ``lens_request`` with ``source`` and ``outputs`` (lens
  output names, e.g. ``["act_code"]``; empty asks only for ``available``), or
  ``control_request`` with ``action`` (``reset_statistics``, ``set_drift_reference``,
  ``save_frame`` + ``frames``, ``set_particle_size`` + ``particle_size_nm``: these need
  ``source``; ``swap_model`` + ``model`` + ``sha256``, ``revert_model``). Every request gets
  one reply, topic ``lens.<source>`` / ``control.<source>`` (the request's source; empty when
  it could not be read). A refusal is the reply's ``error`` (a ``control`` reply's ``ok`` is
  true only when done); an unreadable request is answered ``"bad request: ..."`` in a
  ``control`` reply when its topic starts with ``control_request``, else in a ``lens`` reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack
import numpy as np
from pydantic import ValidationError

from nanoscout.wire.buffers import Buffer
from nanoscout.wire.errors import (
    MalformedMessage,
    PayloadError,
    ProtocolError,
    Reason,
    VersionError,
)
from nanoscout.wire.headers import HEADERS, PROTOCOL_VERSION, FrameHeader, Header, Kind

__all__ = ["MAX_HEADER_BYTES", "Message", "check_version", "decode_frame", "decode_message",
           "encode", "encode_frame", "encode_message", "pack_header", "printable", "unpack_header",
           "wire_text"]

#: largest msgpack header accepted, bytes
MAX_HEADER_BYTES = 256 * 1024

H = TypeVar("H", bound=Header)
T = TypeVar("T", bound=Header)


@dataclass(frozen=True)
class Message(Generic[H]):
    """A decoded message: its topic, typed header and decoded buffers.

    ``array``: the main payload (a frame's pixels, a particle table, a preview picture, a
    ``class`` message's CAM heatmap); ``heatmap``: an ``alert``'s explaining heatmap (v1.2);
    ``extra``: a ``lens`` reply's arrays, one per name in its header's ``outputs``.
    """

    topic: str
    header: H
    array: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    extra: tuple[np.ndarray, ...] = ()

    @property
    def kind(self) -> Kind:
        """The message kind (``det``, ``stats``, ... a :class:`~nanoscout.wire.headers.Kind`)."""
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

    def narrow(self, header_type: type[T]) -> Message[T]:
        """This message, typed by its header class; raises TypeError if it is another kind."""
        if not isinstance(self.header, header_type):
            raise TypeError(f"a {self.kind} message is not a {header_type.__name__}")
        return self  # type: ignore[return-value]  # checked just above


# ---------------------------------------------------------------------------------------------
# headers


def pack_header(header: Header) -> bytes:
    """Serialise a header to msgpack bytes; MalformedMessage when a string in it is not
    valid UTF-8 text (build such strings with :func:`wire_text`)."""
    try:
        return msgpack.packb(header.model_dump(mode="json"), use_bin_type=True)
    except UnicodeEncodeError as exc:
        bad = exc.object[max(exc.start - 40, 0):exc.end + 40]
        raise MalformedMessage(f"{header.topic_kind} header holds text that is not valid "
                               f"UTF-8 ({wire_text(bad)!r}): {exc.reason}",
                               reason=Reason.HEADER) from exc


def wire_text(text: str) -> str:
    """``text`` as valid UTF-8 text, which every header (and run file) can carry.

    A file name's bytes that are not UTF-8 reach Python as surrogate escapes (``os.fsdecode``:
    Latin-1 ``lat\\xe9in.png`` is ``'lat\\udce9in.png'``), which no UTF-8 encoder accepts: each
    becomes the backslash escape of its byte (``lat\\xe9in.png``, printable), any
    other lone surrogate ``\\udXXX``. Valid text is returned unchanged.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_escape_surrogate(c) for c in text)
    return text


def printable(text: str) -> str:
    """``text`` as one line that a terminal or a log file shows as it is, for text from
    outside (file names, vendor metadata, request fields) that is printed or logged.

    :func:`wire_text`, then every character that Python does not call printable
    (``str.isprintable``: control characters such as newline, carriage return, ESC and BEL,
    the line and paragraph separators, invisible format characters such as the bidirectional
    overrides) becomes its backslash escape (``\\n``, ``\\r``, ``\\x1b``, ``\\u202e``); the
    space stays. So a file named ``a.png\\n<date> ERROR ...`` cannot forge a second log line,
    ``\\r`` cannot overwrite the line on a terminal, and ``\\x1b]8;;URL`` cannot open a
    terminal hyperlink. Printable text is returned unchanged (backslashes included).
    """
    text = wire_text(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _escape_surrogate(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, escaped by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return c


def check_version(v: object) -> None:
    """Accept ``[1, minor]``; raise :class:`VersionError` for anything else."""
    if (
        not isinstance(v, list | tuple)
        or len(v) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in v)
    ):
        raise VersionError(f"header has no valid protocol version v (got {v!r:.60})")
    if v[0] != PROTOCOL_VERSION[0]:
        raise VersionError(
            f"protocol major version {v[0]} is not supported (this side speaks "
            f"{PROTOCOL_VERSION[0]}.x)"
        )


def unpack_header(raw: Buffer, model: type[H]) -> H:
    """Parse msgpack bytes into ``model``; raise a ProtocolError naming what was wrong."""
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}",
                               reason=Reason.HEADER_TOO_LARGE)
    try:
        data = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessage(f"header is not valid msgpack ({exc!r:.120})") from exc
    if not isinstance(data, dict):
        raise MalformedMessage(f"header must be a msgpack map, got {type(data).__name__}")
    check_version(data.get("v"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "header"
        raise MalformedMessage(f"{model.topic_kind} header field {loc}: {first['msg']}",
                               reason=Reason.HEADER) from exc


def _parts(kind: Kind, parts: Sequence[Buffer], want: int) -> None:
    if len(parts) != want:
        raise MalformedMessage(f"{kind} message must have {want} parts, got {len(parts)}",
                               reason=Reason.PARTS)


# ---------------------------------------------------------------------------------------------
# any message


def encode_message(header: Header, *arrays: np.ndarray) -> list[Buffer]:
    """Encode ``header`` and the arrays its class declares as ``[topic, header, *buffers]``.

    Buffers are zero-copy views of C-contiguous arrays. Raises :class:`PayloadError` when the
    arrays disagree with the header (count, dtype, shape, rows).
    """
    specs = [(spec, i) for spec in type(header).buffers for i in range(spec.count(header))]
    if len(arrays) != len(specs):
        wanted = ", ".join(spec.describe(header) for spec in type(header).buffers) or "nothing"
        raise PayloadError(f"this {header.topic_kind} message carries {wanted}: "
                           f"{len(specs)} array(s), got {len(arrays)}", reason=Reason.PARTS)
    parts: list[Buffer] = [header.topic(), pack_header(header)]
    parts += [spec.encode(header, arr, i) for (spec, i), arr in zip(specs, arrays, strict=True)]
    return parts


def encode(msg: Message[Any]) -> list[Buffer]:
    """Encode a :class:`Message` (its header and the arrays in its slots)."""
    arrays: list[np.ndarray] = []
    header = msg.header
    for spec in type(header).buffers:
        for i in range(spec.count(header)):
            value = msg.extra[i] if spec.slot == "extra" else getattr(msg, spec.slot)
            if value is None:
                raise PayloadError(f"this {header.topic_kind} message needs "
                                   f"{spec.describe(header)}, but its {spec.slot} is None",
                                   reason=Reason.PARTS)
            arrays.append(value)
    return encode_message(header, *arrays)


#: kinds a daemon publishes, whose topic is exactly their header's (``det.<source>``, ``health``)
_PUBLISHED = frozenset({Kind.DET, Kind.STATS, Kind.CLASS, Kind.PREVIEW, Kind.ALERT, Kind.HEALTH,
                        Kind.ACK})


def decode_message(parts: Sequence[Buffer], *, max_frame_bytes: int | None = None
                   ) -> Message[Any]:
    """Decode any message by its topic; raises a ProtocolError naming what is wrong.

    ``max_frame_bytes`` refuses a ``frame`` whose header announces more pixel bytes.
    """
    if len(parts) < 2:
        raise MalformedMessage(f"message must have at least 2 parts, got {len(parts)}",
                               reason=Reason.PARTS)
    topic = bytes(memoryview(parts[0])[:200]).decode("utf-8", errors="replace")
    try:
        kind = Kind(topic.split(".", 1)[0])
    except ValueError:
        raise MalformedMessage(f"unknown topic {topic[:60]!r}", reason=Reason.TOPIC) from None
    if kind is Kind.FRAME and topic != "frame":
        raise MalformedMessage(f"expected topic 'frame', got {topic[:40]!r}", reason=Reason.TOPIC)
    header = unpack_header(parts[1], HEADERS[kind])
    if isinstance(header, FrameHeader):
        _check_frame_size(header, max_frame_bytes)
    elif kind in _PUBLISHED and topic != header.topic().decode():
        # a subscriber files a result under its topic's source, the SDK under its header's
        raise MalformedMessage(f"topic {topic[:60]!r} does not name the header's source "
                               f"({header.topic().decode()[:60]!r})", reason=Reason.TOPIC)
    specs = [(spec, i) for spec in type(header).buffers for i in range(spec.count(header))]
    _parts(kind, parts, 2 + len(specs))
    slots: dict[str, Any] = {"array": None, "heatmap": None, "extra": []}
    for (spec, i), buf in zip(specs, parts[2:], strict=True):
        try:
            arr = spec.decode(header, buf, i)
        except ProtocolError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:  # never anything else to a reader
            raise PayloadError(f"{spec.describe(header)} cannot be read: {exc}",
                               reason=Reason.SHAPE) from exc
        if spec.slot == "extra":
            slots["extra"].append(arr)
        else:
            slots[spec.slot] = arr
    return Message(topic, header, slots["array"], slots["heatmap"], tuple(slots["extra"]))


# ---------------------------------------------------------------------------------------------
# frames


def encode_frame(header: FrameHeader, array: np.ndarray) -> list[Buffer]:
    """Encode a frame as ``[b"frame", header, pixels]`` (zero-copy when C-contiguous).

    Raises :class:`PayloadError` when the array disagrees with the header or is empty.
    """
    return encode_message(header, array)


def _check_frame_size(header: FrameHeader, max_bytes: int | None) -> None:
    expected = header.nbytes
    if max_bytes is not None and expected > max_bytes:
        raise PayloadError(
            f"frame of {expected} bytes (shape {header.shape}, {header.dtype}) exceeds the "
            f"limit of {max_bytes} bytes", reason=Reason.OVERSIZED)


def decode_frame(parts: Sequence[Buffer], *, max_bytes: int | None = None
                 ) -> tuple[FrameHeader, np.ndarray]:
    """Decode ``[b"frame", header, pixels]`` into the header and a read-only array view.

    Checks the part count, the version, the header fields (shape, dtype, bounds), that the
    frame is not larger than ``max_bytes`` and that the payload length equals rows × cols ×
    itemsize.
    """
    _parts(Kind.FRAME, parts, 3)
    if bytes(memoryview(parts[0])[:200]) != b"frame":
        raise MalformedMessage(f"expected topic 'frame', got {bytes(memoryview(parts[0])[:40])!r}",
                               reason=Reason.TOPIC)
    msg = decode_message(parts, max_frame_bytes=max_bytes)
    assert msg.array is not None and isinstance(msg.header, FrameHeader)
    return msg.header, msg.array
