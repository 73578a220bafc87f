"""The one exception hierarchy of nanoscout, and the reasons a message or frame is turned away.

::

    NanoscoutError
    ├── ConfigError            bad configuration file, option or alert rule
    │   └── StartupError       ``serve``'s configuration refused before any model loads (exit 78)
    ├── ProtocolError          a message that cannot be accepted (counted as a rejection)
    │   ├── VersionError       unknown major protocol version
    │   ├── MalformedMessage   garbage bytes, wrong number of parts, header that fails validation
    │   └── PayloadError       header/payload mismatch, unsupported dtype, zero-size/oversized frame
    ├── FrameError             a valid message whose pixels cannot be analysed (NaN/inf, absurd values)
    │   └── BlankFrame         a frame without contrast: nothing to classify (detection still runs)
    ├── EngineError
    │   ├── EngineUnavailable  the runtime (extra) is not installed or no device is present
    │   └── EngineFailure      the runtime failed while loading or running a model
    ├── ModelCardError         missing or inconsistent model card
    └── ReaderError            an image file that cannot be read (corrupt, unknown format)

Every error carries a :class:`Reason`, used as the Prometheus label
(``nanoscout_messages_rejected_total{reason=...}``, ``nanoscout_frames_dropped_total{reason=...}``),
and a message that names the offending value. Callers sort failures by exception type, never by
comparing reason words. Errors raised by dependencies are converted at the boundary with
``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a message was rejected or an accepted frame was not answered (metric label values)."""

    # a message refused before it became a frame (``messages_rejected_total``)
    MALFORMED = "malformed"  #: not msgpack, not a map, or an unknown kind of garbage
    VERSION = "version"  #: missing or unsupported protocol version
    HEADER = "header"  #: a header field failed validation
    HEADER_TOO_LARGE = "header_too_large"
    PARTS = "parts"  #: wrong number of multipart parts
    TOPIC = "topic"  #: unknown or unexpected topic
    LENGTH = "length"  #: payload length does not match the header
    OVERSIZED = "oversized"  #: frame larger than ``input.max_frame_bytes``
    EMPTY = "empty"  #: zero-size frame
    SHAPE = "shape"  #: impossible shape
    DTYPE = "dtype"  #: unsupported pixel type
    NONFINITE = "nonfinite"  #: NaN or infinite pixels
    PIXEL_RANGE = "pixel_range"  #: finite pixels too large to analyse (|value| > 1e30)
    DUPLICATE = "duplicate"  #: a frame of an adapter session taken already (a resend)
    INTERNAL = "internal"  #: a bug met while handling the message (logged at a limited rate)
    # an accepted frame that was not answered (``frames_dropped_total``)
    SUPERSEDED = "superseded"  #: live policy: a newer frame of the source replaced it
    ENGINE_FAILURE = "engine_failure"
    SUMMARY_FAILURE = "summary_failure"  #: detections published, statistics/alerts failed
    SHUTDOWN = "shutdown"  #: the daemon stopped before analysing it (live policy)
    EVICTED = "evicted"  #: its source was evicted (``input.max_sources``) while it waited
    # an answered frame whose classification was skipped on purpose (``classify_skipped_total``)
    BLANK = "blank"  #: no contrast (:class:`BlankFrame`): beam blanked, shutter closed, ...
    # other errors (not counted on the wire)
    ERROR = "error"
    CONFIG = "config"
    PROTOCOL = "protocol"
    PAYLOAD = "payload"
    FRAME = "frame"
    ENGINE = "engine"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    BAD_INPUT = "bad_input"  #: an engine input that does not match the model's spec
    MODEL_CARD = "model_card"
    READER = "reader"
    CALIBRATION = "calibration"
    STAGE = "stage"  #: a stage command that cannot be carried out
    CAMERA = "camera"  #: an acquisition that cannot be made
    CONTROL = "control"  #: the microscope's control socket did not answer or refused


#: reasons a message can be rejected with (every one is a ``messages_rejected_total`` label at 0)
REJECTION_REASONS: tuple[Reason, ...] = (
    Reason.MALFORMED, Reason.VERSION, Reason.HEADER, Reason.HEADER_TOO_LARGE, Reason.PARTS,
    Reason.TOPIC, Reason.LENGTH, Reason.OVERSIZED, Reason.EMPTY, Reason.SHAPE, Reason.DTYPE,
    Reason.NONFINITE, Reason.PIXEL_RANGE, Reason.DUPLICATE, Reason.INTERNAL,
)
#: reasons an accepted frame can be dropped for (every one a ``frames_dropped_total`` label at 0)
DROP_REASONS: tuple[Reason, ...] = (
    Reason.SUPERSEDED, Reason.ENGINE_FAILURE, Reason.SUMMARY_FAILURE, Reason.SHUTDOWN,
    Reason.EVICTED, Reason.INTERNAL,
)
#: reasons a frame's classification is skipped for (every one a ``classify_skipped_total``
#: label at 0)
CLASSIFY_SKIP_REASONS: tuple[Reason, ...] = (Reason.BLANK,)


#: exit status of ``nanoscout serve`` refusing its configuration at start-up (sysexits.h
#: ``EX_CONFIG``): systemd's ``RestartPreventExitStatus=78`` keeps it from retrying a
#: configuration that cannot work
EXIT_CONFIG = 78


class NanoscoutError(Exception):
    """Base class of every error nanoscout raises on purpose."""

    reason: Reason = Reason.ERROR
    #: the command line's exit status for this error (2: as for a bad option)
    exit_status: int = 2

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(NanoscoutError):
    """A bad configuration file, option or alert rule."""

    reason = Reason.CONFIG


class StartupError(ConfigError):
    """``nanoscout serve``'s configuration cannot work, found before any model loads: a value
    the file or a flag gives wrongly, a port in use, a model file missing, a folder that cannot
    be written (:mod:`nanoscout.daemon.preflight`). Exit status :data:`EXIT_CONFIG`."""

    exit_status = EXIT_CONFIG


class ProtocolError(NanoscoutError):
    """A message that cannot be accepted (counted as a rejection)."""

    reason = Reason.PROTOCOL


class VersionError(ProtocolError):
    """A missing or unknown major protocol version."""

    reason = Reason.VERSION


class MalformedMessage(ProtocolError):
    """Garbage bytes, a wrong number of parts, or a header that fails validation."""

    reason = Reason.MALFORMED


class PayloadError(ProtocolError):
    """A header/payload mismatch, an unsupported dtype, or a zero-size or oversized frame."""

    reason = Reason.PAYLOAD


class FrameError(NanoscoutError):
    """A valid message whose pixels cannot be analysed (NaN/inf, absurd values)."""

    reason = Reason.FRAME


class BlankFrame(FrameError):
    """A frame without contrast, e.g. beam blanked, shutter closed, a detector sending zeros:
    the classifier's input is one constant value, so no class and no novelty can be told
    (:meth:`nanoscout.analysis.classifier.FieldClassifier.classify`). The frame is still
    analysed otherwise; its classification is skipped and counted, not failed."""

    reason = Reason.BLANK


class EngineError(NanoscoutError):
    """An inference engine could not be used."""

    reason = Reason.ENGINE


class EngineUnavailable(EngineError):
    """The runtime (extra) is not installed or no device is present."""

    reason = Reason.ENGINE_UNAVAILABLE


class EngineFailure(EngineError):
    """The runtime failed while loading or running a model."""

    reason = Reason.ENGINE_FAILURE


class ModelCardError(NanoscoutError):
    """A missing or inconsistent model card."""

    reason = Reason.MODEL_CARD


class ReaderError(NanoscoutError):
    """An image file that cannot be read (corrupt, unknown format)."""

    reason = Reason.READER
