"""ONNX Runtime backend, on the CPU (the embedded default) or on a CUDA GPU.

Both variants are :class:`OnnxRuntimeEngine`; they differ only in the execution providers. The
CUDA variant needs the ``onnxruntime-gpu`` wheel, which ships the CUDAExecutionProvider and
replaces the plain ``onnxruntime`` wheel: the two install into the same ``onnxruntime`` package
and must never be installed together (the one installed last silently wins, file by file).
``onnxruntime`` itself is imported lazily, inside the functions below.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.engines.base import Engine, TensorSpec, check_inputs
from nanoscout.wire.errors import ConfigError, EngineFailure, EngineUnavailable

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

ORT_MISSING = (
    "ONNX Runtime is not installed: pip install 'nanoscout[cpu]' (onnxruntime), "
    "or 'nanoscout[cuda]' (onnxruntime-gpu) for a GPU; never both"
)

# ONNX Runtime reports element types as "tensor(<onnx type>)"
_ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

Provider = str | tuple[str, dict[str, Any]]


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineUnavailable(ORT_MISSING) from exc
    return onnxruntime


def cpu_unavailable_reason() -> str | None:
    """Returns why ONNX Runtime on the CPU cannot be used here (one line), or None if it can."""
    try:
        _import_ort()
    except EngineUnavailable as exc:
        return str(exc)
    return None


def cuda_unavailable_reason() -> str | None:
    """Returns why ONNX Runtime on CUDA cannot be used here (one line), or None if it may be.

    None only means the installed wheel has the CUDA provider; whether the CUDA and cuDNN
    libraries load and a GPU is present is known only once a session is created.
    """
    try:
        ort = _import_ort()
    except EngineUnavailable as exc:
        return str(exc)
    providers = ort.get_available_providers()
    if CUDA_PROVIDER not in providers:
        return (
            f"ONNX Runtime {ort.__version__} has no {CUDA_PROVIDER} (it has "
            f"{', '.join(providers)}): pip uninstall onnxruntime && pip install 'nanoscout[cuda]' "
            "(onnxruntime-gpu; needs an NVIDIA GPU with CUDA 12; never install both)"
        )
    return None


def _spec(node: Any) -> TensorSpec:
    # dynamic axes come back as symbolic names (str) or None; fixed axes as ints
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_TO_NUMPY.get(node.type, node.type))


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


class OnnxRuntimeEngine(Engine):
    """One ONNX Runtime inference session over an ONNX file.

    ``providers`` lists ONNX Runtime execution providers in order of preference (names, or
    ``(name, options)`` pairs); the engine is ``"onnxruntime-cuda"`` when the CUDA provider is
    among them, else ``"onnxruntime-cpu"``. ``precision`` only labels the engine: an INT8 model
    is a quantized ONNX file (``nanoscout models quantize``), loaded like any other.
    ``threads`` sets the intra-op thread count (default: every CPU core); inter-op parallelism
    is off and nodes run sequentially, which suits one frame at a time through a small
    convolutional network.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: Sequence[Provider] = (CPU_PROVIDER,),
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.model_path = Path(model_path)
        #: what the ONNX file computes in: "int8" for a quantized (QDQ) sibling
        self.precision = precision
        names = [_provider_name(p) for p in providers]
        self.name = "onnxruntime-cuda" if CUDA_PROVIDER in names else "onnxruntime-cpu"
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        if not self.model_path.is_file():
            raise EngineFailure(f"model file not found: {self.model_path}")

        ort = _import_ort()
        if CUDA_PROVIDER in names:
            reason = cuda_unavailable_reason()
            if reason is not None:
                raise EngineUnavailable(reason)

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # idle intra-op threads sleep instead of spinning: the daemon runs several sessions
        # (detector, classifier, lens) one after another on few cores, and a spinning pool
        # steals the cores the next session needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # an INT8 sibling computes in 8 bits but for its first convolution and its output:
        # ONNX Runtime's blocked float layout (NCHWc) would only add a reorder of that
        # convolution's output (the same numbers; the detector 0.6 ms faster at 1024², the
        # classifier unchanged)
        disabled = ["NchwcTransformer"] if precision == "int8" else []
        try:
            self._session: Any = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=list(providers),
                disabled_optimizers=disabled,
            )
        except Exception as exc:  # the runtime raises its own pybind exception types
            raise EngineFailure(f"ONNX Runtime cannot load model {self.model_path}: {exc}") from exc

        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        if CUDA_PROVIDER in names and CUDA_PROVIDER not in self.providers:
            # ONNX Runtime falls back to the CPU with only a logged warning when the CUDA
            # libraries fail to load; a "cuda" engine that silently runs on the CPU would lie
            # in every result header and metric
            self._session = None
            raise EngineUnavailable(
                f"ONNX Runtime could not start {CUDA_PROVIDER} for {self.model_path.name} "
                "(no GPU, or CUDA 12 / cuDNN 9 libraries not found; see the ONNX Runtime log)"
            )
        self.inputs = tuple(_spec(n) for n in self._session.get_inputs())
        self.outputs = tuple(_spec(n) for n in self._session.get_outputs())
        self._output_names = [s.name for s in self.outputs]
        log.info(
            "loaded %s (%s) with %s (%d intra-op threads, providers %s)",
            self.model_path,
            self.precision,
            self.name,
            self.threads,
            ", ".join(self.providers),
        )

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once; returns every output by name as host numpy arrays."""
        session = self._session
        if session is None:
            raise EngineFailure(f"{self.name} engine for {self.model_path.name} is closed")
        feeds = check_inputs(self.inputs, inputs)
        try:
            results = session.run(self._output_names, feeds)
        except Exception as exc:
            shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in feeds.items())
            expected = ", ".join(s.describe() for s in self.inputs)
            raise EngineFailure(
                f"{self.name} failed on inputs ({shapes}); the model takes {expected}: {exc}"
            ) from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees its memory with it). Idempotent."""
        self._session = None
