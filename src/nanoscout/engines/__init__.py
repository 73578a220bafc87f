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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nanoscout.engines.base import CalibrationSet, Engine, TensorSpec, check_inputs
from nanoscout.wire.errors import ConfigError, EngineError, EngineFailure, EngineUnavailable

__all__ = [
    "ALIASES",
    "BACKENDS",
    "PRECISIONS",
    "CalibrationSet",
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


#: precisions an engine may be asked for; "auto" = the fastest one measured to keep accuracy
PRECISIONS = ("auto", "fp32", "fp16", "int8")

def create_engine(
    model_path: str | Path,
    backend: str = "auto",
    *,
    threads: int | None = None,
    precision: str = "auto",
    cache_dir: Path | None = None,
    max_shape: tuple[int, int] = (4096, 4096),
    device: int = 0,
    max_batch: int = 1,
    int8_model: Path | None = None,
    calibration: CalibrationSet | None = None,
    triton: TritonOptions | None = None,
) -> Engine:
    """Load an ONNX model with the named backend; returns a ready :class:`Engine`.

    ``threads`` is the ONNX Runtime intra-op thread count (default: all cores); ``device`` the
    GPU index (CUDA provider and TensorRT); ``cache_dir``, ``max_shape`` (largest input, px,
    height × width), ``max_batch`` (largest batch) and ``calibration`` apply to TensorRT only.
    ``auto`` tries TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU, and records why it
    passed over each in ``engine.selection_notes``; it fails only if the CPU backend fails.
    ``triton`` (server, model name, timeouts) is required by, and only used by, the ``triton``
    backend, which serves ``model_path`` from the server (the local file stays the reference
    its model card and digest belong to).

    ``precision`` per backend (``engine.precision`` says what was chosen):

    ==============  ==========================  ====================  =========================
    precision       onnxruntime-cpu             onnxruntime-cuda      tensorrt
    ==============  ==========================  ====================  =========================
    ``auto``        int8 if ``int8_model``       fp32                  fp16
                    is given, else fp32
    ``fp32``        fp32                        fp32                  fp32 (TF32 off)
    ``fp16``        fp32 (no fp16 on the CPU)   fp32                  fp16
    ``int8``        ``int8_model`` (required)   unavailable           int8 (entropy calibrator
                                                                      over ``calibration``, or
                                                                      its cached result)
    ==============  ==========================  ====================  =========================

    ``int8_model``: the quantized sibling of ``model_path`` (``nanoscout models quantize``);
    the caller passes it for ``auto`` only when its accuracy parity passed.

    Raises ConfigError for a bad backend name or option, EngineUnavailable when the runtime or
    GPU is missing (the message says what to install), EngineFailure when the model file is
    missing or cannot be loaded.
    """
    name = resolve_backend(backend)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if len(max_shape) != 2 or min(max_shape) < 32:
        raise ConfigError(f"max_shape must be (height, width) of at least 32 px, got {max_shape}")
    if device < 0 or max_batch < 1:
        raise ConfigError(f"device {device} must be >= 0 and max_batch {max_batch} >= 1")
    path = Path(model_path)
    if not path.is_file():
        raise EngineFailure(f"model file not found: {path}")
    if int8_model is not None and not Path(int8_model).is_file():
        raise EngineFailure(f"INT8 model file not found: {int8_model}")
    opts = _Options(threads, precision, cache_dir, max_shape, device, max_batch, int8_model,
                    calibration)

    if name == "triton":
        if triton is None:
            raise ConfigError("backend 'triton' needs the server and model name "
                              "([engine.triton] url and models)")
        from nanoscout.engines.triton import TritonEngine

        return TritonEngine(triton)
    if name != "auto":
        return _create(name, path, opts)

    notes: list[str] = []
    from nanoscout.engines import onnxrt, tensorrt

    for candidate, probe in (
        ("tensorrt", lambda: tensorrt.unavailable_reason(device)),
        ("onnxruntime-cuda", onnxrt.cuda_unavailable_reason),
    ):
        reason = probe()
        if reason is not None:
            notes.append(f"{candidate} skipped: {reason}")
            continue
        try:
            engine = _create(candidate, path, opts)
        except EngineError as exc:
            notes.append(f"{candidate} failed: {exc}")
            log.warning("auto: %s failed for %s, trying the next backend: %s", candidate, path, exc)
            continue
        break
    else:
        engine = _create("onnxruntime-cpu", path, opts)
    engine.selection_notes = tuple(notes)
    for note in notes:
        log.info("auto engine selection: %s", note)
    log.info("auto engine selection: using %s (%s) for %s", engine.name, engine.precision, path)
    return engine


@dataclass(frozen=True)
class _Options:
    threads: int | None
    precision: str
    cache_dir: Path | None
    max_shape: tuple[int, int]
    device: int
    max_batch: int
    int8_model: Path | None
    calibration: CalibrationSet | None


def _create(name: str, path: Path, o: _Options) -> Engine:
    if name == "tensorrt":
        from nanoscout.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(path, precision="fp16" if o.precision == "auto" else o.precision,  # type: ignore[arg-type]
                              cache_dir=o.cache_dir, max_shape=o.max_shape, device=o.device,
                              max_batch=o.max_batch, calibration=o.calibration)

    from nanoscout.engines.onnxrt import CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntimeEngine

    if name == "onnxruntime-cuda":
        if o.precision == "int8":
            raise EngineUnavailable("INT8 on a GPU needs the tensorrt backend (onnxruntime-cuda "
                                    "runs fp32): choose backend tensorrt, or precision auto")
        return OnnxRuntimeEngine(
            path, providers=((CUDA_PROVIDER, {"device_id": o.device}), CPU_PROVIDER),
            threads=o.threads,
        )
    if o.precision == "int8" and o.int8_model is None:
        raise EngineUnavailable(
            f"no INT8 model beside {path.name}: run `nanoscout models quantize` (writes "
            f"{path.stem}.int8.onnx), or choose precision auto or fp32")
    if o.precision in ("int8", "auto") and o.int8_model is not None:
        return OnnxRuntimeEngine(o.int8_model, providers=(CPU_PROVIDER,), threads=o.threads,
                                 precision="int8")
    return OnnxRuntimeEngine(path, providers=(CPU_PROVIDER,), threads=o.threads)
