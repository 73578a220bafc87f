"""The one exception hierarchy of nanoscout.

::

    NanoscoutError
    ├── ConfigError            bad configuration file, option or alert rule
    ├── ProtocolError          a message that cannot be accepted (counted as a rejection)
    │   ├── VersionError       unknown major protocol version
    │   ├── MalformedMessage   garbage bytes, wrong number of parts, header that fails validation
    │   └── PayloadError       header/payload mismatch, unsupported dtype, zero-size/oversized frame
    ├── FrameError             a valid message whose pixels cannot be analysed (NaN/inf, absurd calibration)
    ├── EngineError
    │   ├── EngineUnavailable  the runtime (extra) is not installed or no device is present
    │   └── EngineFailure      the runtime failed while loading or running a model
    ├── ModelCardError         missing or inconsistent model card
    └── ReaderError            an image file that cannot be read (corrupt, unknown format)

Every rejection carries a short machine-readable ``reason`` used as the Prometheus label
(``nanoscout_rejected_total{reason=...}``), and a message that names the offending value.
Errors raised by dependencies are converted at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class NanoscoutError(Exception):
    """Base class of every error nanoscout raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(NanoscoutError):
    reason = "config"


class ProtocolError(NanoscoutError):
    reason = "protocol"


class VersionError(ProtocolError):
    reason = "version"


class MalformedMessage(ProtocolError):
    reason = "malformed"


class PayloadError(ProtocolError):
    reason = "payload"


class FrameError(NanoscoutError):
    reason = "frame"


class EngineError(NanoscoutError):
    reason = "engine"


class EngineUnavailable(EngineError):
    reason = "engine_unavailable"


class EngineFailure(EngineError):
    reason = "engine_failure"


class ModelCardError(NanoscoutError):
    reason = "model_card"


class ReaderError(NanoscoutError):
    reason = "reader"
