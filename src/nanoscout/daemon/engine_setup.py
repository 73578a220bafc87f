"""The daemon's engines from ``[engine]``: local runtimes, or a Triton server with a local stand-in.

:func:`make_engine` is what :mod:`nanoscout.daemon.app` calls for every model it loads
(detectors, classifier, lens); :func:`engine_states` gives the one-line state of each engine that
has one (a Triton server, a fallback), for the health message's ``engines``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nanoscout.daemon.config import EngineConfig
from nanoscout.daemon.precision import load_engine
from nanoscout.engines import Engine, create_engine, resolve_backend
from nanoscout.engines.fallback import FallbackEngine
from nanoscout.engines.triton import TritonEngine, TritonOptions, file_sha256
from nanoscout.wire.errors import EngineError, EngineFailure

if TYPE_CHECKING:
    from nanoscout.analysis.pipeline import Pipeline

__all__ = ["engine_states", "make_engine"]

log = logging.getLogger("nanoscout")


def make_engine(eng: EngineConfig, model: Path, *, device: int | None = None,
                max_shape: tuple[int, int] = (4096, 4096), max_batch: int = 1) -> Engine:
    """The engine for the ONNX file ``model`` as ``[engine]`` says.

    Local engines run in ``engine.precision`` (an INT8 sibling only as
    :mod:`nanoscout.daemon.precision` allows) on GPU ``device`` (default ``engine.device``);
    ``max_shape`` (largest input, px, height × width) and ``max_batch`` size TensorRT's
    optimisation profile.

    ``backend = "triton"``: the model of that name on ``[engine.triton] url`` (its digest checked
    against ``model``'s), wrapped in a :class:`FallbackEngine` over a local ``fallback`` engine
    when one is configured (in FP32 under ``precision = "auto"``: the model the server runs).
    A server that is not ready at start raises
    :class:`~nanoscout.wire.errors.EngineUnavailable` without a fallback; with one, the daemon
    starts on the local engine and tries the server again every ``retry_s``.
    """
    gpu = eng.device if device is None else device

    def local(backend: str, precision: str = eng.precision) -> Engine:
        return load_engine(model, backend=backend, precision=precision, threads=eng.threads,
                           device=gpu, max_shape=max_shape, max_batch=max_batch,
                           cache_dir=eng.cache_dir)

    if resolve_backend(eng.backend) != "triton":
        return local(eng.backend)
    tc = eng.triton
    options = TritonOptions(
        url=tc.url, model=tc.model_name(model), version=tc.version, timeout_s=tc.timeout_s,
        connect_timeout_s=tc.connect_timeout_s, shared_memory=tc.shared_memory,
        expected_sha256=file_sha256(model) if tc.check_sha256 and model.is_file() else None,
    )
    if tc.fallback is None:
        return create_engine(model, "triton", triton=options)
    # the server runs the FP32 file, so "auto" gives the fallback that same model (identical
    # particles whichever engine serves); an explicit precision is honoured
    standby = local(tc.fallback, "fp32" if eng.precision == "auto" else eng.precision)
    try:
        remote: Engine = create_engine(model, "triton", triton=options)
    except EngineError as exc:
        log.warning("Triton is not ready (%s): starting on the local %s engine, retrying the "
                    "server every %g s", exc, standby.name, tc.retry_s)
        remote = _Reconnecting(options, standby, str(exc))
    return FallbackEngine(remote, standby, retry_s=tc.retry_s)


class _Reconnecting(Engine):
    """A Triton engine that was not ready at start: each request (one per ``retry_s``, paced
    by the FallbackEngine) tries to connect once and, once connected, serves from the server."""

    name = "triton"

    def __init__(self, options: TritonOptions, local: Engine, why: str) -> None:
        self._options = replace(options, connect_timeout_s=0.0)  # one attempt per request
        self._engine: TritonEngine | None = None
        self.inputs, self.outputs = local.inputs, local.outputs
        self._why = why

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Connect on first use (EngineFailure while the server is not ready), then run the
        model on the server."""
        if self._engine is None:
            try:
                self._engine = TritonEngine(self._options)
            except EngineError as exc:
                self._why = str(exc)
                raise EngineFailure(f"Triton still not ready: {exc}") from exc
            log.info("Triton model %s at %s is ready now", self._options.model,
                     self._options.url)
        return self._engine.infer(inputs)

    def state(self) -> str:
        """The connected engine's state, or why it is not connected."""
        if self._engine is None:
            return f"{self._options.url} {self._options.model}: not connected: {self._why}"
        return self._engine.state()

    def close(self) -> None:
        """Close the server connection, if any. Idempotent."""
        if self._engine is not None:
            self._engine.close()


def engine_states(pipeline: Pipeline) -> dict[str, str]:
    """``{"<role>_state": line}`` for each of the pipeline's engines that reports a state
    (roles: detector, detector_<modality>, classifier, lens); {} for purely local engines."""
    engines: dict[str, object] = {"detector": pipeline.detector.engine}
    for modality, (det, _) in pipeline.modality_detectors.items():
        engines[f"detector_{modality}"] = det.engine
    clf = pipeline.classifier
    if clf is not None:
        engines["classifier"] = clf.engine
        if clf.lens is not None:
            engines["lens"] = clf.lens
    states: dict[str, str] = {}
    for role, engine in engines.items():
        state = getattr(engine, "state", None)
        if callable(state):
            states[f"{role}_state"] = str(state())
    return states
