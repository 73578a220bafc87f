"""A remote engine with a local stand-in: the frame is analysed locally while the server is gone.

:class:`FallbackEngine` sends every request to its ``primary`` (a Triton server). When a request
fails for a reason the server is to blame for (unreachable, too slow, model unloaded: any
:class:`~nanoscout.wire.errors.EngineFailure` except ``bad_input``), that same request runs on the
``fallback`` engine (ONNX Runtime on this machine) and the next ``retry_s`` seconds of requests
go straight to the fallback; then the primary gets one request again. A slow server therefore
costs one ``timeout_s`` per ``retry_s``, not one per frame.

Both engines must take the same tensors: the fallback's specs must equal the primary's, so a
fallback is only ever the same ONNX model run locally. :meth:`FallbackEngine.state` says which
engine is serving and how many requests each has served (the daemon's health message).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanoscout.engines.base import Engine
from nanoscout.wire.errors import ConfigError, EngineFailure, Reason

__all__ = ["FallbackEngine"]

log = logging.getLogger(__name__)


def _shapes_match(a: Engine, b: Engine) -> str | None:
    """None when ``a`` and ``b`` take and give the same named tensors, else what differs."""
    for what, x, y in (("inputs", a.inputs, b.inputs), ("outputs", a.outputs, b.outputs)):
        if {s.name: (len(s.shape), s.dtype) for s in x} != \
                {s.name: (len(s.shape), s.dtype) for s in y}:
            return (f"{what} differ: {', '.join(s.describe() for s in x)} vs "
                    f"{', '.join(s.describe() for s in y)}")
    return None


class FallbackEngine(Engine):
    """``primary`` while it works, ``fallback`` for ``retry_s`` seconds after each failure."""

    def __init__(self, primary: Engine, fallback: Engine, *, retry_s: float = 5.0) -> None:
        if not retry_s >= 0:
            raise ConfigError(f"fallback retry_s {retry_s} must be >= 0")
        differ = _shapes_match(primary, fallback)
        if differ is not None:
            raise ConfigError(f"the fallback engine ({fallback.name}) does not run the same "
                              f"model as {primary.name}: {differ}")
        self.primary = primary
        self.fallback = fallback
        self.retry_s = retry_s
        self.name = primary.name
        self.inputs = primary.inputs
        self.outputs = primary.outputs
        self.selection_notes = primary.selection_notes
        self.served = {"primary": 0, "fallback": 0}
        self.fallbacks = 0  # requests the primary failed and the fallback served
        self.last_failure: str | None = None
        self._down_until = 0.0  # time.monotonic() until which the fallback serves
        self._down_since: float | None = None  # time.time() the primary failed first
        self._lock = threading.Lock()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on the primary, or on the fallback while the primary is failing."""
        if time.monotonic() >= self._down_until:
            try:
                out = self.primary.infer(inputs)
            except EngineFailure as exc:
                if exc.reason == Reason.BAD_INPUT:  # the fallback would refuse it just the same
                    raise
                self._failed(exc)
            else:
                with self._lock:
                    self.served["primary"] += 1
                    if self._down_since is not None:
                        log.info("%s serves again (fallback served %d requests)",
                                 self.primary.name, self.fallbacks)
                    self._down_since = None
                return out
        out = self.fallback.infer(inputs)
        with self._lock:
            self.served["fallback"] += 1
        return out

    def _failed(self, exc: EngineFailure) -> None:
        with self._lock:
            self.fallbacks += 1
            self.last_failure = str(exc)
            self._down_until = time.monotonic() + self.retry_s
            first = self._down_since is None
            if first:
                self._down_since = time.time()
        if first:
            log.warning("%s failed, serving from %s for the next %g s: %s", self.primary.name,
                        self.fallback.name, self.retry_s, exc)

    def state(self) -> str:
        """One line for the health message: which engine serves, and the counts."""
        primary = _state(self.primary)
        counts = (f"{self.served['primary']} requests served remotely, "
                  f"{self.served['fallback']} by the local {self.fallback.name}")
        if self._down_since is None:
            return f"{primary}; {counts}"
        since = time.strftime("%H:%M:%S", time.localtime(self._down_since))
        return (f"FALLBACK to the local {self.fallback.name} since {since} ({counts}); "
                f"{primary}")

    def close(self) -> None:
        """Close both engines. Idempotent."""
        self.primary.close()
        self.fallback.close()


def _state(engine: Any) -> str:
    state = getattr(engine, "state", None)
    return str(state()) if callable(state) else str(engine.name)
