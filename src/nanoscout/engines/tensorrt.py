"""TensorRT backend: an ONNX file built into a TensorRT engine for this GPU, cached on disk.

Written against the TensorRT 10 Python API (``tensorrt>=10,<11``: TensorRT 11 removed the
``BuilderFlag.FP16`` weak-typing flag that ``precision="fp16"`` relies on). Device memory,
copies and the stream come from ``cuda-python`` (``cuda.bindings.runtime``, or the older
``cuda.cudart``); torch is never imported by the service. Both runtimes are imported lazily,
inside the functions below, so importing this module costs nothing on a machine without a GPU.

Engine cache
------------
A TensorRT plan is only valid for the GPU model and TensorRT version that built it, so plans
are cached in ``cache_dir`` (default ``~/.cache/nanoscout/trt``) under a key made of the ONNX
file's SHA-256, the GPU name and compute capability, the TensorRT version, the precision, the
largest input shape and batch, and (INT8) the calibration set. A new GPU, TensorRT upgrade,
precision, shape limit or calibration therefore builds a new plan; a plan that fails to
deserialise is rebuilt. Plans are written to a temporary file and renamed, so a crash or a
second process building the same key never leaves half a plan.

Precisions
----------
``fp32`` (TF32 off), ``fp16`` (the FP16 builder flag: TensorRT picks FP16 kernels where they
are faster), and ``int8``: implicit quantization with an entropy calibrator
(``IInt8EntropyCalibrator2``, FP16 allowed where a layer has no INT8 kernel). The calibrator
runs the network on a :class:`~nanoscout.engines.base.CalibrationSet` (nanoscout's are the
synthetic inputs of :mod:`nanoscout.training.int8_calibration`, fed by
``nanoscout models build-engines --precision int8``) and TensorRT writes what it learnt to a
**calibration cache** beside the plans: ``<model stem>.<digest>.calib`` (+ ``.calib.json``
naming the set), keyed by the ONNX file and the TensorRT version. A later build, for another
GPU, shape limit or batch, reads the cache and needs no calibration data, so the daemon can
build INT8 plans without ever rendering a frame.

TensorRT 10.1 deprecated implicit quantization (the builder's ``int8_calibrator`` and
``set_calibration_profile`` warn with a DeprecationWarning, silenced here: the project's tests
turn warnings into errors) in favour of explicit quantization, Q/DQ nodes in the ONNX file.
The INT8 siblings ``nanoscout models quantize`` writes for ONNX Runtime are not such files for
TensorRT: their activations are unsigned 8-bit with non-zero zero points, and TensorRT's
quantization is symmetric and signed (its ONNX parser refuses a non-zero zero point). This
backend therefore always builds from the FP32 ONNX file and never reads ``*.int8.onnx``.

TensorRT's Python binding catches an exception raised in a calibrator callback, prints it and
takes it for the end of the data. The calibrator keeps it instead, and the build raises
:class:`~nanoscout.wire.errors.EngineFailure` naming it (and removes a calibration cache the
cut-short calibration wrote), as it does when no calibration input came at all.

Shapes
------
Dynamic axes of the model's inputs get one optimisation profile: the last two (height, width)
range from 16 px (the detectors' stride: the smallest side the detector sends, e.g. a
working-scale pass over a long narrow frame) to ``max_shape`` (optimum 1024 px, or less when
``max_shape`` is smaller); a dynamic batch axis ranges from 1 to ``max_batch`` (optimum
``max_batch``: the detector sends the tiles of large frames in batches of that many). INT8
calibration runs at the calibration inputs' own shape (a second, fixed profile); every
calibration input must have the first one's shape.

Devices and threads
-------------------
The CUDA runtime's current device is per thread. The engine is built on ``device`` in the
constructing thread; :meth:`TensorRTEngine.infer` and :meth:`TensorRTEngine.close` select it
again, whichever thread calls them (the daemon's worker, a hot swap, the garbage collector),
and take turns on one lock: an execution context and its buffers serve one call at a time.
After a GPU fault every CUDA call fails with the sticky error: close() still attempts each
release and then raises one EngineFailure naming every failure.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nanoscout.engines.base import CalibrationSet, Engine, TensorSpec, check_inputs
from nanoscout.wire.errors import ConfigError, EngineFailure, EngineUnavailable, Reason

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nanoscout[tensorrt]' (needs an NVIDIA GPU with CUDA 12)"
#: smallest height / width of a dynamic input (px): the detectors' stride (``stride_multiple``
#: 16), the smallest side the detector sends
MIN_SIDE_PX = 16
OPT_SIDE_PX = 1024
DEFAULT_WORKSPACE_BYTES = 2 << 30
#: bump when the plan build recipe changes, so old cached plans are not reused
#: (3: the profile's smallest side 32 -> 16 px)
_RECIPE_VERSION = 3
PRECISIONS = ("fp32", "fp16", "int8")


def default_cache_dir() -> Path:
    """Returns the default plan cache folder, ``$XDG_CACHE_HOME/nanoscout/trt``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nanoscout" / "trt"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        # find_spec imports parent packages ("cuda" for "cuda.bindings"); a missing or broken
        # parent means the module is not usable either
        return False


def _import_cudart() -> Any:
    """Returns the cuda-python runtime module (cudart)."""
    if _has_module("cuda.bindings"):
        return importlib.import_module("cuda.bindings.runtime")
    if _has_module("cuda.cudart"):
        # cuda-python < 12.6 exposed the runtime API as cuda.cudart
        return importlib.import_module("cuda.cudart")
    raise EngineUnavailable(
        f"cuda-python is not installed (TensorRT needs it for device memory): {INSTALL_HINT}"
    )


def _import_trt() -> Any:
    if not _has_module("tensorrt"):
        raise EngineUnavailable(f"TensorRT is not installed: {INSTALL_HINT}")
    try:
        import tensorrt as trt
    except Exception as exc:  # a broken install raises ImportError or OSError (missing .so)
        raise EngineUnavailable(f"TensorRT failed to import ({exc}): {INSTALL_HINT}") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineUnavailable(f"TensorRT {trt.__version__} is too old (need 10.x): {INSTALL_HINT}")
    return trt


def _cuda_check(result: Any, what: str) -> Any:
    """Unpacks a cuda-python ``(err, *values)`` tuple; raises EngineFailure on a CUDA error."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(getattr(err, "value", err)) != 0:
        raise EngineFailure(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a plan is built for: name, compute capability and device index."""

    index: int
    name: str
    compute_capability: tuple[int, int]


def _gpu_info(cudart: Any, device: int) -> GpuInfo:
    count = _cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise EngineUnavailable("no CUDA GPU found (cudaGetDeviceCount is 0)")
    if not 0 <= device < count:
        raise EngineUnavailable(f"CUDA device {device} does not exist ({count} GPU(s) found)")
    props = _cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    raw = props.name
    name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuInfo(device, name.strip("\x00 "), (int(props.major), int(props.minor)))


def unavailable_reason(device: int = 0) -> str | None:
    """Returns why TensorRT cannot be used here (one line), or None if it can.

    Checks, in order: the tensorrt and cuda-python packages, the TensorRT version, and a CUDA
    GPU at index ``device``. Imports tensorrt and cuda-python when they are installed.
    """
    try:
        _import_trt()
        cudart = _import_cudart()
        _gpu_info(cudart, device)
    except EngineUnavailable as exc:
        return str(exc)
    except EngineFailure as exc:
        # no driver or no device: cudaGetDeviceCount returns an error instead of 0
        return f"no usable CUDA GPU ({exc})"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plan_key(
    onnx_sha256: str,
    gpu: GpuInfo,
    trt_version: str,
    precision: str,
    max_shape: tuple[int, int],
    max_batch: int = 1,
    calibration: str | None = None,
) -> dict[str, Any]:
    """Returns the fields that decide whether a cached plan may be reused (JSON-serialisable).
    ``calibration``: the INT8 calibration set's name (None for other precisions)."""
    return {
        "recipe": _RECIPE_VERSION,
        "onnx_sha256": onnx_sha256,
        "gpu": gpu.name,
        "compute_capability": f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
        "tensorrt": trt_version,
        "precision": precision,
        "max_shape": list(max_shape),
        "max_batch": max_batch,
        "calibration": calibration,
    }


def calibration_file(cache_dir: Path, model_path: Path, onnx_sha256: str, trt_version: str
                     ) -> Path:
    """Returns the INT8 calibration cache of a model for a TensorRT major.minor version:
    ``<model stem>.<digest>.calib`` in ``cache_dir`` (beside the plans; GPU-independent)."""
    major_minor = ".".join(str(trt_version).split(".")[:2])
    digest = hashlib.sha256(f"{onnx_sha256} {major_minor}".encode()).hexdigest()[:24]
    return cache_dir / f"{model_path.stem}.{digest}.calib"


def plan_file(cache_dir: Path, model_path: Path, key: Mapping[str, Any]) -> Path:
    """Returns the cache file of a plan: ``<model stem>.<key digest>.plan`` in ``cache_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"{model_path.stem}.{digest}.plan"


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def _trt_logger(trt: Any) -> Any:
    """Returns the process-wide TensorRT logger, which forwards to Python logging."""
    global _LOGGER
    # two engines built at once (a hot swap beside the start-up) must not make two loggers
    with _LOGGER_LOCK:
        if _LOGGER is None or not isinstance(_LOGGER, trt.ILogger):
            levels = {
                trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
                trt.ILogger.Severity.ERROR: logging.ERROR,
                trt.ILogger.Severity.WARNING: logging.WARNING,
                trt.ILogger.Severity.INFO: logging.DEBUG,
                trt.ILogger.Severity.VERBOSE: logging.DEBUG,
            }

            class _Logger(trt.ILogger):  # type: ignore[misc]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    log.log(levels.get(severity, logging.WARNING), "TensorRT: %s", msg)

            # TensorRT treats the logger as a singleton that must outlive every builder,
            # runtime and engine, so it is created once and kept for the life of the process
            _LOGGER = _Logger()
        return _LOGGER


@contextlib.contextmanager
def _implicit_int8_api() -> Iterator[None]:
    """Silences the DeprecationWarning of TensorRT's implicit-quantization calls (deprecated in
    TensorRT 10.1, "Superseded by explicit quantization"; still the INT8 path of TensorRT 10:
    see the module docs). The binding warns with ``PyErr_WarnEx`` and ignores its result, so
    under warnings-as-errors the call returns with the exception set and Python raises it."""
    with warnings.catch_warnings():
        # catch_warnings swaps the process's filters: an engine build is rare enough
        warnings.filterwarnings("ignore", message=".*Superseded by explicit quantization",
                                category=DeprecationWarning)
        yield


def builder_config(trt: Any, builder: Any, precision: str, workspace_bytes: int) -> Any:
    """Returns a TensorRT builder config for ``precision`` (one of :data:`PRECISIONS`) with a
    workspace of ``workspace_bytes`` bytes: "fp16" and "int8" allow FP16 kernels (INT8: for
    the layers without an INT8 one; the INT8 flag and calibrator are the caller's), "fp32"
    turns TF32 off where TensorRT has the flag (on by default on Ampere and newer: "fp32"
    means full fp32). The daemon's engines and the Triton export's plans both build with it,
    on the GPU the caller selected (cudaSetDevice) before."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    return config


class _DeviceBuffer:
    """One device allocation, grown (never shrunk) as tensor shapes grow."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, cudart: Any, nbytes: int) -> int:
        # 256 bytes minimum: a zero-size tensor still needs a valid, aligned address
        nbytes = max(nbytes, 256)
        if nbytes > self.nbytes:
            self.free(cudart)
            self.ptr = int(_cuda_check(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
            self.nbytes = nbytes
        return self.ptr

    def free(self, cudart: Any, what: str = "cudaFree") -> None:
        """Free the allocation; EngineFailure naming ``what`` on a CUDA error. The buffer is
        empty afterwards either way: a failed cudaFree (a sticky error) is not retried."""
        ptr, self.ptr, self.nbytes = self.ptr, 0, 0
        if ptr:
            _cuda_check(cudart.cudaFree(ptr), what)


def _attempt(errors: list[str], what: str, call: Callable[[], object]) -> None:
    """Run one release step; its failure is added to ``errors`` instead of raised, so the
    steps after it still run (after a sticky CUDA error, e.g. an illegal address, every CUDA
    call fails, and stopping at the first would leak the rest)."""
    try:
        call()
    except EngineFailure as exc:
        errors.append(str(exc))
    except Exception as exc:  # a broken binding: still release the rest, and say so
        errors.append(f"{what} raised {exc!r}")


def _free_buffers(cudart: Any, buffers: dict[str, _DeviceBuffer], errors: list[str]) -> None:
    """Free every buffer of ``buffers`` (by tensor name), whatever fails, and empty it; each
    failure is added to ``errors``."""
    for name, buffer in buffers.items():
        what = f"cudaFree of {name!r} ({buffer.nbytes} bytes)"
        _attempt(errors, what, functools.partial(buffer.free, cudart, what))
    buffers.clear()


def _entropy_calibrator(trt: Any, cudart: Any, cache: Path, calibration: CalibrationSet | None,
                        shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``calibration``'s inputs (one batch each, every input
    of the shape ``shapes`` names) that reads and writes the calibration cache ``cache`` (+
    ``.json`` naming the set).

    TensorRT's binding catches an exception raised in a callback, prints it and takes it for
    the end of the data: the calibration would stop early, in silence, and its cache would keep
    what the batches before taught it. The calibrator keeps the exception (``error``) instead;
    :meth:`check` raises it after the build."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = 0
            self.error: BaseException | None = None
            self.cache_read = False
            self.cache_written = False
            self._buffers: dict[str, _DeviceBuffer] = {}
            self._inputs: Any = None
            self._batch_size = 1

        def get_batch_size(self) -> int:
            return self._batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.error is not None:
                return None
            try:
                return self._next_batch(names)
            except BaseException as exc:  # raised by check(): TensorRT would only print it
                self.error = exc
                return None

        def _next_batch(self, names: list[str]) -> list[int] | None:
            if calibration is None:
                return None
            if self._inputs is None:
                self._inputs = iter(calibration.inputs())
            batch = next(self._inputs, None)
            if batch is None:
                return None
            ptrs = []
            for name in names:
                if name not in batch:
                    raise EngineFailure(f"calibration set {calibration.name!r} has no input "
                                        f"{name!r} (it has {sorted(batch)})")
                arr = np.ascontiguousarray(batch[name], dtype=np.float32)
                want = shapes.get(name)
                if want is not None and arr.shape != want:
                    # TensorRT reads the calibration shape's bytes from the pointer
                    raise EngineFailure(
                        f"input {name!r} of calibration batch {self.batches} of set "
                        f"{calibration.name!r} has shape {arr.shape}, but the calibration runs "
                        f"at {want} (the first batch's shape)")
                ptr = self._buffers.setdefault(name, _DeviceBuffer()).ensure(cudart, arr.nbytes)
                _cuda_check(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice),
                            f"copy of calibration input {name!r} to the GPU")
                ptrs.append(ptr)
            self.batches += 1
            return ptrs

        def read_calibration_cache(self) -> bytes | None:
            try:
                data = cache.read_bytes()
            except OSError:
                return None
            self.cache_read = True
            return data

        def write_calibration_cache(self, data: Any) -> None:
            try:
                _write_atomic(cache, bytes(data))
                self.cache_written = True
                name = calibration.name if calibration is not None else None
                _write_atomic(cache.with_suffix(".calib.json"),
                              json.dumps({"calibration": name}, indent=1).encode())
            except OSError as exc:
                log.warning("cannot write the INT8 calibration cache %s: %s", cache, exc)

        def check(self, model: Path, built: bool) -> None:
            """Raise EngineFailure when the calibration failed, or (``built``: TensorRT made a
            plan) calibrated on nothing; a calibration cache it wrote is removed first."""
            if self.error is not None:
                problem = f"failed at calibration batch {self.batches}: {self.error}"
            elif built and not self.cache_read and self.batches == 0:
                problem = ("had no input: calibration set "
                           f"{calibration.name!r} yielded none" if calibration is not None
                           else f"had no calibration set and no calibration cache {cache}")
            else:
                return
            if self.cache_written:
                cache.unlink(missing_ok=True)
                cache.with_suffix(".calib.json").unlink(missing_ok=True)
            raise EngineFailure(f"INT8 calibration of {model} {problem}") from self.error

        def free(self) -> None:
            """Free every calibration buffer; one EngineFailure names each that failed."""
            errors: list[str] = []
            _free_buffers(cudart, self._buffers, errors)
            if errors:
                raise EngineFailure("freeing the INT8 calibration buffers failed: "
                                    + "; ".join(errors))

    return _Calibrator()


def _cached_calibration_name(cache: Path) -> str | None:
    """The calibration set a cache was made from (its ``.calib.json``), or None."""
    try:
        meta = json.loads(cache.with_suffix(".calib.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = meta.get("calibration") if isinstance(meta, dict) else None
    return str(name) if name else None


class TensorRTEngine(Engine):
    """A TensorRT engine for one ONNX model on one GPU, built once and cached as a plan file.

    After construction ``built`` says whether the plan was built now (True) or loaded from the
    cache (False), ``plan_path`` where it lives and ``build_s`` how long the build took (s).
    """

    name = "tensorrt"

    def __init__(
        self,
        model_path: str | Path,
        *,
        precision: Literal["fp32", "fp16", "int8"] = "fp16",
        cache_dir: Path | None = None,
        max_shape: tuple[int, int] = (4096, 4096),
        device: int = 0,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        max_batch: int = 1,
        calibration: CalibrationSet | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{precision!r}")
        self.precision = precision
        self.max_shape = (int(max_shape[0]), int(max_shape[1]))
        if min(self.max_shape) < MIN_SIDE_PX:
            raise ConfigError(f"max_shape {max_shape} is below the {MIN_SIDE_PX} px minimum")
        if max_batch < 1 or device < 0:
            raise ConfigError(f"max_batch {max_batch} must be >= 1 and device {device} >= 0")
        self.max_batch = int(max_batch)
        self.device = int(device)
        self._calibration = calibration
        #: the INT8 calibration cache (None for other precisions) and the batches calibrated
        #: on in this build (0: the cache was read)
        self.calibration_path: Path | None = None
        self.calibrated_batches = 0
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._device = device
        self._workspace_bytes = workspace_bytes
        self._lock = threading.Lock()
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._context: Any = None
        self._engine: Any = None
        self._stream: Any = None
        self.built = False
        self.build_s = 0.0

        if not self.model_path.is_file():
            raise EngineFailure(f"model file not found: {self.model_path}")
        trt = self._trt = _import_trt()
        cudart = self._cudart = _import_cudart()
        try:
            self.gpu = _gpu_info(cudart, device)
        except EngineFailure as exc:
            raise EngineUnavailable(f"no usable CUDA GPU ({exc})") from exc
        if precision in ("fp16", "int8") and not hasattr(trt.BuilderFlag, "FP16"):
            raise EngineUnavailable(
                f"TensorRT {trt.__version__} has no FP16 builder flag (removed in TensorRT 11): "
                "use precision='fp32' or pip install 'tensorrt-cu12>=10,<11'"
            )
        # the runtime API's current device is per thread; TensorRT builds and runs on it
        _cuda_check(cudart.cudaSetDevice(device), f"cudaSetDevice({device})")

        try:
            onnx_sha = _sha256(self.model_path)
        except OSError as exc:
            raise EngineFailure(f"cannot read model file {self.model_path}: {exc}") from exc
        calib_name = None
        if precision == "int8":
            if not hasattr(trt.BuilderFlag, "INT8") or not hasattr(trt, "IInt8EntropyCalibrator2"):
                raise EngineUnavailable(f"TensorRT {trt.__version__} has no INT8 calibrator: use "
                                        "a QDQ model or precision 'fp16'")
            self.calibration_path = calibration_file(self.cache_dir, self.model_path, onnx_sha,
                                                     str(trt.__version__))
            cached = _cached_calibration_name(self.calibration_path) \
                if self.calibration_path.is_file() else None
            if calibration is not None and cached not in (None, calibration.name):
                log.info("calibration cache %s is of set %r, not %r: calibrating again",
                         self.calibration_path, cached, calibration.name)
                self.calibration_path.unlink(missing_ok=True)
                cached = None
            if calibration is None and not self.calibration_path.is_file():
                raise EngineUnavailable(
                    f"an INT8 TensorRT engine for {self.model_path.name} needs a calibration: "
                    "run `nanoscout models build-engines --precision int8` once (it writes the "
                    f"calibration cache {self.calibration_path})")
            calib_name = calibration.name if calibration is not None else (cached or "cached")
        self.key = plan_key(onnx_sha, self.gpu, str(trt.__version__), precision, self.max_shape,
                            self.max_batch, calib_name)
        self.plan_path = plan_file(self.cache_dir, self.model_path, self.key)
        self._runtime = trt.Runtime(_trt_logger(trt))

        engine = self._load_cached()
        if engine is None:
            plan = self._build()
            engine = self._runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineFailure(
                    f"TensorRT could not deserialise the plan it just built for {self.model_path}"
                )
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineFailure(
                f"TensorRT could not create an execution context for {self.model_path} (out of GPU memory?)"
            )
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._read_io(trt, engine)
        log.info(
            "%s TensorRT %s engine for %s on %s (%s)",
            "built" if self.built else "loaded cached",
            precision,
            self.model_path.name,
            self.gpu.name,
            self.plan_path,
        )

    # --- plan cache -------------------------------------------------------------------------

    def _load_cached(self) -> Any:
        if not self.plan_path.is_file():
            return None
        try:
            data = self.plan_path.read_bytes()
        except OSError as exc:
            log.warning("cannot read cached TensorRT plan %s (%s); rebuilding", self.plan_path, exc)
            return None
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            log.warning("cached TensorRT plan %s does not deserialise; rebuilding", self.plan_path)
        return engine

    def _build(self) -> Any:
        trt = self._trt
        started = time.perf_counter()
        logger = _trt_logger(trt)
        builder = trt.Builder(logger)
        # explicit batch is the only mode in TensorRT 10, so no creation flags are needed
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file resolves external weight files relative to the model
        if not parser.parse_from_file(str(self.model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineFailure(
                f"TensorRT cannot parse ONNX model {self.model_path}: {errors or 'unknown error'}"
            )
        config = builder_config(trt, builder, self.precision, self._workspace_bytes)
        profile = builder.create_optimization_profile()
        ranges: dict[str, tuple[tuple[int, ...], ...]] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(int(d) for d in tensor.shape)
            if all(d >= 0 for d in shape):
                continue
            ranges[tensor.name] = self._profile_shapes(tensor.name, shape)
            profile.set_shape(tensor.name, *ranges[tensor.name])
        # -1: TensorRT found the profile invalid (the build would fail later, less clearly)
        if ranges and config.add_optimization_profile(profile) < 0:
            raise EngineFailure(f"TensorRT refused the optimisation profile of {self.model_path} "
                                f"(min, opt, max per input: {ranges})")
        calibrator = None
        if self.precision == "int8":
            calibrator = self._attach_calibrator(builder, network, config)
        try:
            plan = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                self.calibrated_batches = calibrator.batches
                calibrator.free()
        if calibrator is not None:
            calibrator.check(self.model_path, built=plan is not None)
        if plan is None:
            raise EngineFailure(
                f"TensorRT failed to build an engine for {self.model_path} "
                f"({self.precision}, max shape {self.max_shape}); see the TensorRT log"
            )
        data = bytes(plan)
        self.build_s = time.perf_counter() - started
        self.built = True
        try:
            _write_atomic(self.plan_path, data)
            _write_atomic(
                self.plan_path.with_suffix(".json"),
                json.dumps({**self.key, "model": str(self.model_path)}, indent=1).encode(),
            )
        except OSError as exc:
            # a read-only cache costs a rebuild next start, not a failed start
            log.warning("cannot cache TensorRT plan in %s: %s", self.cache_dir, exc)
        return data

    def _attach_calibrator(self, builder: Any, network: Any, config: Any) -> Any:
        """Set the INT8 flag, the entropy calibrator and, for dynamic inputs, the fixed
        calibration profile (TensorRT calibrates at a profile's optimum) on ``config``; returns
        the calibrator."""
        trt = self._trt
        assert self.calibration_path is not None
        config.set_flag(trt.BuilderFlag.INT8)
        shapes, dynamic = self._calibration_shapes(network)
        calibrator = _entropy_calibrator(trt, self._cudart, self.calibration_path,
                                         self._calibration, shapes)
        with _implicit_int8_api():
            config.int8_calibrator = calibrator
            if dynamic:
                profile = builder.create_optimization_profile()
                for name in dynamic:
                    profile.set_shape(name, shapes[name], shapes[name], shapes[name])
                if not config.set_calibration_profile(profile):
                    raise EngineFailure(
                        f"TensorRT refused the INT8 calibration profile of {self.model_path}: "
                        + ", ".join(f"{name} {shapes[name]}" for name in dynamic))
        return calibrator

    def _calibration_shapes(self, network: Any) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """Each network input's shape in the INT8 calibration, and the names of the dynamic
        inputs: a fixed input's own shape; a dynamic one's from the first calibration input, or
        the main profile's optimum when the cache is read and no input is at hand."""
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        declared = {t.name: tuple(int(d) for d in t.shape) for t in inputs}
        dynamic = [name for name, shape in declared.items() if any(d < 0 for d in shape)]
        first: Mapping[str, np.ndarray] = {}
        if dynamic and self._calibration is not None:
            first = next(iter(self._calibration.inputs()), {})
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in declared.items():
            if name not in dynamic:
                shapes[name] = shape
            elif name in first:
                fixed = tuple(int(d) for d in first[name].shape)
                if len(fixed) != len(shape) or any(0 <= d != f for d, f in zip(shape, fixed)):
                    assert self._calibration is not None
                    raise EngineFailure(
                        f"calibration set {self._calibration.name!r}: input {name!r} has shape "
                        f"{fixed}, but {self.model_path.name} takes {shape} (-1: any size)")
                shapes[name] = fixed
            else:
                shapes[name] = self._profile_shapes(name, shape)[1]
        return shapes, dynamic

    def _profile_shapes(
        self, name: str, shape: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        rank = len(shape)
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, d in enumerate(shape):
            if d >= 0:
                continue
            if rank >= 2 and axis >= rank - 2:
                top = self.max_shape[axis - (rank - 2)]
                lo[axis], opt[axis], hi[axis] = MIN_SIDE_PX, min(OPT_SIDE_PX, top), top
            elif axis == 0:
                lo[axis], opt[axis], hi[axis] = 1, self.max_batch, self.max_batch
            else:
                raise EngineFailure(
                    f"input {name!r} of {self.model_path} has a dynamic axis {axis} in shape "
                    f"{shape}; only batch (axis 0, up to max_batch) and the last two (height, "
                    "width) may be dynamic"
                )
        return tuple(lo), tuple(opt), tuple(hi)

    # --- I/O --------------------------------------------------------------------------------

    def _read_io(self, trt: Any, engine: Any) -> None:
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        self._np_dtypes: dict[str, np.dtype] = {}
        self._ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError as exc:
                raise EngineFailure(
                    f"tensor {name!r} of {self.model_path} has TensorRT type "
                    f"{engine.get_tensor_dtype(name)}, which has no numpy equivalent"
                ) from exc
            self._np_dtypes[name] = dtype
            spec = TensorSpec(name, tuple(d if d >= 0 else None for d in shape), dtype.name)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if any(d < 0 for d in shape):
                    lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
                    self._ranges[name] = (tuple(int(d) for d in lo), tuple(int(d) for d in hi))
            else:
                outputs.append(spec)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._ranges:
            return
        lo, hi = self._ranges[name]
        if any(not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
            raise EngineFailure(
                f"input {name!r} shape {shape} is outside the engine's range {lo}..{hi} "
                f"(rebuild with a larger max_shape, now {self.max_shape})",
                reason=Reason.BAD_INPUT,
            )

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on the GPU; returns every output by name as host numpy arrays."""
        arrays = check_inputs(self.inputs, inputs)
        # one execution context and one set of buffers: calls from several threads take turns
        with self._lock:
            context = self._context
            if context is None:
                raise EngineFailure(f"tensorrt engine for {self.model_path.name} is closed")
            cudart = self._cudart
            _cuda_check(cudart.cudaSetDevice(self._device), "cudaSetDevice")
            stream = self._stream
            h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name, array in arrays.items():
                self._check_profile(name, array.shape)
                if not context.set_input_shape(name, array.shape):
                    raise EngineFailure(
                        f"TensorRT rejected shape {array.shape} for input {name!r}",
                        reason=Reason.BAD_INPUT,
                    )
                ptr = self._buffer(name).ensure(cudart, array.nbytes)
                self._bind(context, name, ptr)
                _cuda_check(
                    cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, stream),
                    f"copy of input {name!r} to the GPU",
                )
            results: dict[str, np.ndarray] = {}
            for spec in self.outputs:
                shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise EngineFailure(
                        f"output {spec.name!r} has a data-dependent shape {shape}, which the "
                        "tensorrt backend does not support"
                    )
                out = np.empty(shape, dtype=self._np_dtypes[spec.name])
                ptr = self._buffer(spec.name).ensure(cudart, out.nbytes)
                self._bind(context, spec.name, ptr)
                results[spec.name] = out
            if not context.execute_async_v3(int(stream)):
                raise EngineFailure(
                    f"TensorRT execution failed for {self.model_path.name} on inputs "
                    + ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items())
                )
            for name, out in results.items():
                _cuda_check(
                    cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name].ptr, out.nbytes, d2h, stream),
                    f"copy of output {name!r} from the GPU",
                )
            # the inputs' host memory must stay untouched until the copies have finished
            _cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return results

    def _buffer(self, name: str) -> _DeviceBuffer:
        if name not in self._buffers:
            self._buffers[name] = _DeviceBuffer()
        return self._buffers[name]

    def _bind(self, context: Any, name: str, ptr: int) -> None:
        # False: not a tensor of this engine, or an address without 256-byte alignment;
        # execution would then read or write wherever the tensor's old address points
        if not context.set_tensor_address(name, ptr):
            raise EngineFailure(f"TensorRT refused device address {ptr:#x} for tensor {name!r} "
                                f"of {self.model_path.name}")

    def close(self) -> None:
        """Free device buffers and the stream and drop the execution context, engine and
        runtime, on the engine's GPU whichever thread calls. Every release is attempted even
        when one fails (after a GPU fault, e.g. an illegal address, each CUDA call returns the
        sticky error; stopping at the first leaked the rest at every hot swap); then one
        EngineFailure names every failure. Idempotent: a second call, also after a failed one,
        does nothing."""
        with self._lock:
            if (self._context is None and self._engine is None and self._stream is None
                    and not self._buffers):
                return
            cudart = self._cudart
            errors: list[str] = []
            # the current device is per thread: from another thread (a hot swap, the garbage
            # collector) these calls would run on device 0 and create a CUDA context there
            _attempt(errors, "cudaSetDevice", lambda: _cuda_check(
                cudart.cudaSetDevice(self._device), f"cudaSetDevice({self._device})"))
            stream, self._stream = self._stream, None
            if stream is not None:
                _attempt(errors, "cudaStreamSynchronize", lambda: _cuda_check(
                    cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize"))
            _free_buffers(cudart, self._buffers, errors)
            if stream is not None:
                _attempt(errors, "cudaStreamDestroy", lambda: _cuda_check(
                    cudart.cudaStreamDestroy(stream), "cudaStreamDestroy"))
            # the context must go before the engine it was created from, the engine before
            # the runtime that deserialised it
            self._context = None
            self._engine = None
            self._runtime = None
            if errors:
                raise EngineFailure(
                    f"closing the tensorrt engine for {self.model_path.name} on GPU "
                    f"{self._device}: {len(errors)} release(s) failed (the rest were done): "
                    + "; ".join(errors))

    def __del__(self) -> None:
        # a safety net for engines that were never closed; at interpreter exit cuda-python may
        # already be torn down, and the driver frees everything with the process anyway
        with contextlib.suppress(Exception):
            self.close()
