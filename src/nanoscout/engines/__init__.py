"""Inference engines: one interface (:class:`Engine`), several backends, one factory.

========================  ==========================================================  =========
backend                   runtime                                                     alias
========================  ==========================================================  =========
``tensorrt``              TensorRT 10 + cuda-python on an NVIDIA GPU                  ``trt``
``onnxruntime-cuda``      ONNX Runtime with CUDAExecutionProvider (onnxruntime-gpu)   ``cuda``
``onnxruntime-cpu``       ONNX Runtime on the CPU (the embedded default)              ``cpu``
``auto``                  the first of the three above that works here
``triton``                a Triton Inference Server over gRPC (``tritonclient``)
========================  ==========================================================  =========

``triton`` is never chosen by ``auto``: it needs a server and a model name
(:class:`~nanoscout.engines.triton.TritonOptions`), and may be wrapped with a local engine for
the time the server is gone (:class:`~nanoscout.engines.fallback.FallbackEngine`).

``onnxruntime`` and ``onnxruntime-gpu`` install the same Python package and must never be
installed together; the CPU backend runs on either wheel. Runtimes are imported lazily, so
``import nanoscout.engines`` imports neither ONNX Runtime nor TensorRT.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from nanoscout.engines.base import Engine, TensorSpec, check_inputs
from nanoscout.wire.errors import ConfigError, EngineError, EngineFailure

__all__ = [
    "ALIASES",
    "BACKENDS",
    "Engine",
    "TensorSpec",
    "available_backends",
    "check_inputs",
    "create_engine",
    "resolve_backend",
]

if TYPE_CHECKING:
    from nanoscout.engines.triton import TritonOptions

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "triton")
ALIASES = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "trt": "tensorrt"}


def resolve_backend(backend: str) -> str:
    """Returns the canonical backend name for a name or alias (case-insensitive).

    Raises :class:`~nanoscout.wire.errors.ConfigError` listing the valid names for anything else.
    """
    key = str(backend).strip().lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        aliases = ", ".join(f"{a} = {b}" for a, b in ALIASES.items())
        raise ConfigError(
            f"unknown engine backend {backend!r}: choose one of {', '.join(BACKENDS)} (aliases: {aliases})"
        )
    return key


def available_backends() -> dict[str, str]:
    """Returns, per concrete backend, ``"available"`` or the one-line reason it is not.

    Imports the installed runtimes to ask them. ``onnxruntime-cuda`` is reported available
    when the wheel has the CUDA provider; a missing CUDA library shows only when an engine is
    created (``create_engine`` then raises EngineUnavailable).
    """
    from nanoscout.engines import onnxrt, tensorrt, triton

    reasons = {
        "tensorrt": tensorrt.unavailable_reason(),
        "onnxruntime-cuda": onnxrt.cuda_unavailable_reason(),
        "onnxruntime-cpu": onnxrt.cpu_unavailable_reason(),
        "triton": triton.unavailable_reason(),
    }
    return {name: reason or "available" for name, reason in reasons.items()}


def create_engine(
    model_path: str | Path,
    backend: str = "auto",
    *,
    threads: int | None = None,
    precision: Literal["fp32", "fp16"] = "fp16",
    cache_dir: Path | None = None,
    max_shape: tuple[int, int] = (4096, 4096),
    triton: TritonOptions | None = None,
) -> Engine:
    """Load an ONNX model with the named backend; returns a ready :class:`Engine`.

    ``threads`` is the ONNX Runtime intra-op thread count (default: all cores); ``precision``,
    ``cache_dir`` and ``max_shape`` (largest frame, px, height × width) apply to TensorRT only.
    ``auto`` tries TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU, and records why it
    passed over each in ``engine.selection_notes``; it fails only if the CPU backend fails.
    ``triton`` (server, model name, timeouts) is required by, and only used by, the ``triton``
    backend, which serves ``model_path`` from the server (the local file stays the reference
    its model card and digest belong to).

    Raises ConfigError for a bad backend name or option, EngineUnavailable when the runtime or
    GPU is missing (the message says what to install), EngineFailure when the model file is
    missing or cannot be loaded.
    """
    name = resolve_backend(backend)
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if len(max_shape) != 2 or min(max_shape) < 32:
        raise ConfigError(f"max_shape must be (height, width) of at least 32 px, got {max_shape}")
    path = Path(model_path)
    if not path.is_file():
        raise EngineFailure(f"model file not found: {path}")

    if name == "triton":
        if triton is None:
            raise ConfigError("backend 'triton' needs the server and model name "
                              "([engine.triton] url and models)")
        from nanoscout.engines.triton import TritonEngine

        return TritonEngine(triton)
    if name != "auto":
        return _create(name, path, threads, precision, cache_dir, max_shape)

    notes: list[str] = []
    from nanoscout.engines import onnxrt, tensorrt

    for candidate, probe in (
        ("tensorrt", tensorrt.unavailable_reason),
        ("onnxruntime-cuda", onnxrt.cuda_unavailable_reason),
    ):
        reason = probe()
        if reason is not None:
            notes.append(f"{candidate} skipped: {reason}")
            continue
        try:
            engine = _create(candidate, path, threads, precision, cache_dir, max_shape)
        except EngineError as exc:
            notes.append(f"{candidate} failed: {exc}")
            log.warning("auto: %s failed for %s, trying the next backend: %s", candidate, path, exc)
            continue
        break
    else:
        engine = _create("onnxruntime-cpu", path, threads, precision, cache_dir, max_shape)
    engine.selection_notes = tuple(notes)
    for note in notes:
        log.info("auto engine selection: %s", note)
    log.info("auto engine selection: using %s for %s", engine.name, path)
    return engine


def _create(
    name: str,
    path: Path,
    threads: int | None,
    precision: Literal["fp32", "fp16"],
    cache_dir: Path | None,
    max_shape: tuple[int, int],
) -> Engine:
    if name == "tensorrt":
        from nanoscout.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(path, precision=precision, cache_dir=cache_dir, max_shape=max_shape)

    from nanoscout.engines.onnxrt import CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntimeEngine

    if name == "onnxruntime-cuda":
        return OnnxRuntimeEngine(
            path, providers=((CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER), threads=threads
        )
    return OnnxRuntimeEngine(path, providers=(CPU_PROVIDER,), threads=threads)
