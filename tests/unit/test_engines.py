"""The engine factory and the ONNX Runtime CPU backend, on tiny ONNX models built in tmp_path."""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import threading
import traceback
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import GraphProto, TensorProto, helper, numpy_helper  # noqa: E402

from nanoscout.engines import (  # noqa: E402
    BACKENDS,
    CalibrationSet,
    TensorSpec,
    available_backends,
    create_engine,
    resolve_backend,
)
from nanoscout.engines.onnxrt import OnnxRuntimeEngine  # noqa: E402
from nanoscout.engines.tensorrt import TensorRTEngine  # noqa: E402
from nanoscout.wire.errors import ConfigError, EngineFailure, EngineUnavailable  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], np.float32) * 0.25
BIAS = np.float32(0.1)


def _save(graph: GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by older runtimes (TensorRT 10 parsers, ONNX Runtime 1.16+)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_sigmoid_model(path: Path) -> Path:
    """image float32[N, 1, H, W] -> logits (3x3 conv, pad 1) and prob = sigmoid(logits)."""
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["logits"], ["prob"]),
        ],
        "conv_sigmoid",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, "H", "W"]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, "H", "W"]),
        ],
        initializer=[
            numpy_helper.from_array(KERNEL.reshape(1, 1, 3, 3), "w"),
            numpy_helper.from_array(np.array([BIAS], np.float32), "b"),
        ],
    )
    return _save(graph, path)


def add_model(path: Path) -> Path:
    """a float32[1, 1, H, W] + b float32[1, 1, H2, W2] -> sum (broadcast rules of ONNX Add)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, "H", "W"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1, "H2", "W2"]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 1, "Hs", "Ws"])],
    )
    return _save(graph, path)


def reference(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The conv_sigmoid model in numpy: returns (logits, prob)."""
    padded = np.pad(image.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = image.shape[-2:]
    logits = np.full(image.shape, float(BIAS))
    for dy in range(3):
        for dx in range(3):
            logits += KERNEL[dy, dx] * padded[..., dy : dy + h, dx : dx + w]
    return logits, 1.0 / (1.0 + np.exp(-logits))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_sigmoid_model(tmp_path_factory.mktemp("models") / "conv_sigmoid.onnx")


@pytest.fixture(scope="module")
def cpu_engine(model_path: Path) -> Iterator[OnnxRuntimeEngine]:
    with cast(OnnxRuntimeEngine, create_engine(model_path, "cpu", threads=1)) as engine:
        yield engine


def test_cpu_engine_matches_numpy_on_two_shapes(cpu_engine: OnnxRuntimeEngine) -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 40, 56), (2, 1, 17, 9)]:
        image = rng.normal(size=shape).astype(np.float32)
        out = cpu_engine.infer({"image": image})
        logits, prob = reference(image)
        assert set(out) == {"logits", "prob"}
        assert out["prob"].shape == shape and out["prob"].dtype == np.float32
        np.testing.assert_allclose(out["logits"], logits, atol=1e-5)
        np.testing.assert_allclose(out["prob"], prob, atol=1e-6)


def test_cpu_engine_reports_spec_name_and_threads(cpu_engine: OnnxRuntimeEngine) -> None:
    assert cpu_engine.name == "onnxruntime-cpu"
    assert cpu_engine.inputs == (TensorSpec("image", (None, 1, None, None), "float32"),)
    assert [s.name for s in cpu_engine.outputs] == ["logits", "prob"]
    assert cpu_engine.providers == ("CPUExecutionProvider",)
    assert cpu_engine._session.get_session_options().intra_op_num_threads == 1
    assert cpu_engine.selection_notes == ()


def test_non_contiguous_input_gives_the_same_result(cpu_engine: OnnxRuntimeEngine) -> None:
    image = np.random.default_rng(1).random((1, 1, 30, 20), dtype=np.float32)
    transposed = np.ascontiguousarray(image.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not transposed.flags.c_contiguous
    out = cpu_engine.infer({"image": transposed})
    np.testing.assert_allclose(out["prob"], reference(image)[1], atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "needles"),
    [
        ({"img": np.zeros((1, 1, 8, 8), np.float32)}, ["'img'", "image: float32[?, 1, ?, ?]"]),
        ({"image": np.zeros((1, 8, 8), np.float32)}, ["'image'", "rank 3", "rank 4"]),
        ({"image": np.zeros((1, 2, 8, 8), np.float32)}, ["'image'", "axis 1", "expected 1"]),
        ({"image": np.zeros((1, 1, 8, 8), np.float64)}, ["'image'", "float64", "float32"]),
        ({"image": np.zeros((1, 1, 8, 8), ">f4")}, ["'image'", ">f4", "float32"]),
        ({"image": [[[[0.0]]]]}, ["'image'", "list", "numpy array"]),
        ({}, ["missing input 'image'"]),
    ],
    ids=["name", "rank", "fixed-axis", "dtype", "byte-order", "not-array", "missing"],
)
def test_bad_inputs_raise_engine_failure_naming_them(
    cpu_engine: OnnxRuntimeEngine, inputs: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(EngineFailure) as info:
        cpu_engine.infer(inputs)
    for needle in needles:
        assert needle in str(info.value)
    assert info.value.reason == "bad_input"


def test_missing_input_is_caught_before_the_runtime(tmp_path: Path) -> None:
    add = add_model(tmp_path / "add.onnx")
    with cast(OnnxRuntimeEngine, create_engine(add, "cpu", threads=1)) as engine:
        session = engine._session

        class Trap:
            def run(self, *args: object) -> None:
                raise AssertionError("the runtime was called")

        engine._session = Trap()
        with pytest.raises(EngineFailure, match="missing input 'b'.*a: float32"):
            engine.infer({"a": np.zeros((1, 1, 4, 4), np.float32)})
        engine._session = session


def test_runtime_error_becomes_engine_failure_naming_inputs(tmp_path: Path) -> None:
    with create_engine(add_model(tmp_path / "add.onnx"), "cpu", threads=1) as engine:
        a = np.ones((1, 1, 4, 4), np.float32)
        np.testing.assert_array_equal(engine.infer({"a": a, "b": a})["sum"], a + a)
        with pytest.raises(EngineFailure) as info:
            engine.infer({"a": a, "b": np.ones((1, 1, 5, 5), np.float32)})
        message = str(info.value)
        assert "a: float32[1, 1, 4, 4]" in message and "b: float32[1, 1, 5, 5]" in message
        assert info.value.__cause__ is not None


def test_closed_engine_refuses_to_run(model_path: Path) -> None:
    engine = create_engine(model_path, "cpu", threads=1)
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(EngineFailure, match="closed"):
        engine.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})


def test_auto_falls_back_to_cpu_and_says_why(model_path: Path) -> None:
    reasons = available_backends()
    if reasons["tensorrt"] == "available" or reasons["onnxruntime-cuda"] == "available":
        pytest.skip(f"a GPU backend is available here: {reasons}")
    with create_engine(model_path, threads=1) as engine:
        assert engine.name == "onnxruntime-cpu"
        notes = engine.selection_notes
        assert len(notes) == 2
        assert notes[0].startswith("tensorrt skipped: ") and reasons["tensorrt"] in notes[0]
        assert notes[1].startswith("onnxruntime-cuda skipped: ")
        assert "CUDAExecutionProvider" in notes[1]
        image = np.zeros((1, 1, 8, 8), np.float32)
        np.testing.assert_allclose(engine.infer({"image": image})["prob"], reference(image)[1])


def test_available_backends_reports_every_backend(model_path: Path) -> None:
    reasons = available_backends()
    assert set(reasons) == set(BACKENDS) - {"auto"}
    assert reasons["onnxruntime-cpu"] == "available"
    for reason in reasons.values():
        assert reason and "\n" not in reason


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("cpu", "onnxruntime-cpu"),
        ("CUDA", "onnxruntime-cuda"),
        ("trt", "tensorrt"),
        (" auto ", "auto"),
        ("onnxruntime-cpu", "onnxruntime-cpu"),
    ],
)
def test_aliases_resolve(alias: str, name: str) -> None:
    assert resolve_backend(alias) == name


def test_bad_backend_name_lists_valid_names(model_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        create_engine(model_path, "openvino")
    message = str(info.value)
    assert "'openvino'" in message
    for name in BACKENDS:
        assert name in message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"precision": "fp8"}, "'fp8'"),
        ({"device": -1}, "device -1"),
        ({"max_batch": 0}, "max_batch 0"),
        ({"threads": 0}, "threads"),
        ({"max_shape": (16, 4096)}, "(16, 4096)"),
    ],
)
def test_bad_options_raise_config_error(model_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_engine(model_path, "cpu", **kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_missing_model_file_names_the_path(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(EngineFailure, match="nope.onnx"):
        create_engine(missing, backend)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_corrupt_model_file_names_the_path(tmp_path: Path, backend: str) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not an ONNX protobuf\xff\xfe" * 10)
    with pytest.raises(EngineFailure) as info:
        create_engine(corrupt, backend)
    assert str(corrupt) in str(info.value)
    assert info.value.__cause__ is not None


def test_tensorrt_without_tensorrt_says_what_to_install(model_path: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EngineUnavailable) as info:
        create_engine(model_path, "tensorrt")
    message = str(info.value)
    assert message.startswith("TensorRT is not installed: ")
    assert "pip install 'nanoscout[tensorrt]'" in message and "\n" not in message


def test_cuda_without_cuda_provider_says_what_to_install(model_path: Path) -> None:
    if available_backends()["onnxruntime-cuda"] == "available":
        pytest.skip("the CUDA provider is available here")
    with pytest.raises(EngineUnavailable) as info:
        create_engine(model_path, "cuda")
    message = str(info.value)
    assert "no CUDAExecutionProvider" in message and "\n" not in message
    assert "pip install 'nanoscout[cuda]'" in message and "onnxruntime-gpu" in message


def test_importing_engines_does_not_import_runtimes() -> None:
    code = (
        "import sys, nanoscout.engines, nanoscout.engines.onnxrt, nanoscout.engines.tensorrt; "
        "heavy = sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'cuda') "
        "if m in sys.modules); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- the TensorRT backend's own logic, against a stand-in runtime ------------------------------
#
# No GPU here, so these tests swap in fake ``tensorrt`` and ``cuda.bindings.runtime`` modules:
# "device memory" is host memory and the fake engine runs the ONNX file with ONNX Runtime. They
# check the backend's plan cache, profile, buffer and error logic; tests/gpu checks the real API.
# The fakes behave as the real ones do where the backend depends on it (TensorRT 10's Python
# binding, NVIDIA/TensorRT python/src): the implicit-INT8 calls warn (DeprecationWarning since
# 10.1), an exception in a calibrator callback is printed and taken for the end of the data,
# set_tensor_address and add_optimization_profile report failure by their result; and the
# CUDA runtime's current device is per thread (device 0 until cudaSetDevice).

#: what TensorRT >= 10.1 warns when the implicit-quantization API is used (utils.cpp:
#: "Use " + reason + " instead.")
_INT8_DEPRECATED = "Use Deprecated in TensorRT 10.1. Superseded by explicit quantization. instead."


def _trampoline(what: str, call: Any, *args: Any) -> Any:
    """A Python callback as TensorRT's binding calls it (pyInt8.cpp): an exception is printed
    to stderr and the callback counts as having returned nothing."""
    try:
        return call(*args)
    except Exception:
        print(f"[ERROR] Exception caught in {what}(): {traceback.format_exc()}", file=sys.stderr)
        return None


class _FakeTrt(types.ModuleType):
    """The slice of the TensorRT 10 Python API that nanoscout.engines.tensorrt uses."""

    def __init__(self, gpu_builds: list[dict], cudart: _FakeCudart) -> None:
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.__version__ = "10.9.0"
        builds = gpu_builds
        import onnxruntime as ort

        class ILogger:
            class Severity:
                INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self) -> None:
                pass

        class Names:
            def __init__(self, *names: str) -> None:
                for n in names:
                    setattr(self, n, n)

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        self.ILogger = ILogger
        self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
        self.BuilderFlag = Names("FP16", "TF32", "INT8")
        self.MemoryPoolType = Names("WORKSPACE")
        self.TensorIOMode = Names("INPUT", "OUTPUT")
        self.nptype = lambda dtype: dtype

        class Tensor:
            def __init__(self, name: str, shape: tuple[int, ...]) -> None:
                self.name, self.shape = name, shape

        class Network:
            path: str  # the parsed file (set by the parser)

            def __init__(self) -> None:
                self.inputs: list[Tensor] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

        class Parser:
            def __init__(self, network: Network, logger: object) -> None:
                self.network = network
                self.errors: list[str] = []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> str:
                return self.errors[i]

            def parse_from_file(self, path: str) -> bool:
                try:
                    model = onnx.load(path)
                except Exception as exc:
                    self.errors.append(f"parse error: {exc}")
                    return False
                self.network.path = path
                for vi in model.graph.input:
                    dims = vi.type.tensor_type.shape.dim
                    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
                    self.network.inputs.append(Tensor(vi.name, shape))
                return True

        class Config:
            def __init__(self) -> None:
                # TF32 is on in a new builder config (IBuilderConfig's default flags)
                self.flags: set[str] = {"TF32"}
                self.profiles: list[dict] = []
                self.pools: dict[str, int] = {}
                self._calibrator: Any = None
                self.calibration_profile: dict | None = None

            @property
            def int8_calibrator(self) -> Any:
                warnings.warn(_INT8_DEPRECATED, DeprecationWarning, stacklevel=2)
                return self._calibrator

            @int8_calibrator.setter
            def int8_calibrator(self, calibrator: Any) -> None:
                warnings.warn(_INT8_DEPRECATED, DeprecationWarning, stacklevel=2)
                self._calibrator = calibrator

            def set_calibration_profile(self, profile: dict) -> bool:
                warnings.warn(_INT8_DEPRECATED, DeprecationWarning, stacklevel=2)
                self.calibration_profile = profile
                return True

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.pools[pool] = size

            def set_flag(self, flag: str) -> None:
                self.flags.add(flag)

            def clear_flag(self, flag: str) -> None:
                self.flags.discard(flag)

            def add_optimization_profile(self, profile: dict) -> int:
                # -1 for an invalid profile: min <= opt <= max on every axis, none negative
                for lo, opt, hi in profile.values():
                    if not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                        return -1
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Profile(dict):
            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                self[name] = [list(lo), list(opt), list(hi)]

        class Builder:
            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                assert flags == 0
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                build = {
                    "path": network.path,
                    "flags": sorted(config.flags),
                    "profile": config.profiles[0] if config.profiles else {},
                    "workspace": config.pools.get("WORKSPACE"),
                    "calibrated": None,
                    # TensorRT builds for the building thread's current CUDA device
                    "device": cudart._device(),
                }
                calib = config._calibrator
                if "INT8" in config.flags:
                    # TensorRT's calibration: the cache if the calibrator has one, else batches
                    # at the calibration profile's shape until get_batch says none are left
                    assert calib is not None and calib.get_batch_size() == 1
                    build["calibration_profile"] = config.calibration_profile
                    if _trampoline("read_calibration_cache", calib.read_calibration_cache) is None:
                        names = [t.name for t in network.inputs]
                        n = 0
                        while ptrs := _trampoline("get_batch", calib.get_batch, names):
                            assert len(ptrs) == len(names) and all(isinstance(p, int) for p in ptrs)
                            n += 1
                        _trampoline("write_calibration_cache", calib.write_calibration_cache,
                                    memoryview(b"FAKECALIB %d" % n))
                        build["calibrated"] = n
                    else:
                        build["calibrated"] = 0
                builds.append(build)
                return b"FAKEPLAN" + json.dumps(build).encode()

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine = engine
                self.shapes: dict[str, tuple[int, ...]] = {}
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                if name in self.shapes:
                    return self.shapes[name]
                # an output: its shape for these input shapes, as ONNX Runtime computes it
                key = tuple(sorted(self.shapes.items()))
                if key not in self.engine.out_shapes:
                    feeds = {k: np.zeros(v, np.float32) for k, v in self.shapes.items()}
                    outs = self.engine.session.run(None, feeds)
                    names = [o.name for o in self.engine.session.get_outputs()]
                    self.engine.out_shapes[key] = {n: o.shape for n, o in zip(names, outs, strict=True)}
                return tuple(self.engine.out_shapes[key][name])

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                # False for a name that is no I/O tensor or an address not 256-byte aligned
                if ptr % 256 or name not in {n.name for n, _ in self.engine.io}:
                    return False
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream: int) -> bool:
                assert isinstance(stream, int)
                feeds = {}
                for name, shape in self.shapes.items():
                    n = int(np.prod(shape)) * 4
                    raw = (ctypes.c_char * n).from_address(self.addresses[name])
                    feeds[name] = np.frombuffer(memoryview(raw), np.float32).reshape(shape).copy()
                outs = self.engine.session.run(None, feeds)
                for spec, out in zip(self.engine.session.get_outputs(), outs, strict=True):
                    out = np.ascontiguousarray(out)
                    ctypes.memmove(self.addresses[spec.name], out.ctypes.data, out.nbytes)
                return True

        class Engine:
            def __init__(self, build: dict) -> None:
                self.build = build
                self.session = ort.InferenceSession(build["path"], providers=["CPUExecutionProvider"])
                self.out_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
                self.io = [(i, "INPUT") for i in self.session.get_inputs()]
                self.io += [(o, "OUTPUT") for o in self.session.get_outputs()]

            @property
            def num_io_tensors(self) -> int:
                return len(self.io)

            def get_tensor_name(self, i: int) -> str:
                return self.io[i][0].name

            def _node(self, name: str) -> tuple:
                return next(x for x in self.io if x[0].name == name)

            def get_tensor_mode(self, name: str) -> str:
                return self._node(name)[1]

            def get_tensor_dtype(self, name: str) -> type:
                kind = self._node(name)[0].type  # e.g. "tensor(float)", "tensor(uint8)"
                return {"tensor(float)": np.float32, "tensor(uint8)": np.uint8,
                        "tensor(int64)": np.int64}[kind]

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return tuple(d if isinstance(d, int) else -1 for d in self._node(name)[0].shape)

            def get_tensor_profile_shape(self, name: str, index: int) -> list:
                assert index == 0
                return self.build["profile"][name]

            def create_execution_context(self) -> Context:
                return Context(self)

        class Runtime:
            def __init__(self, logger: object) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                data = bytes(data)
                if not data.startswith(b"FAKEPLAN"):
                    return None
                return Engine(json.loads(data[len(b"FAKEPLAN") :]))

        self.Builder, self.OnnxParser, self.Runtime = Builder, Parser, Runtime


class _FakeCudart(types.ModuleType):
    """cuda-python's runtime API over host memory: (err, value) tuples, err 0 = success.

    As in the CUDA runtime, the current device is per thread (0 until ``cudaSetDevice``), and
    memory and streams belong to the device current when they were made; a call that touches
    them from another device is recorded in ``wrong_device`` (the real runtime would make that
    device's CUDA context to run it)."""

    def __init__(self, gpu_name: str = "Fake GPU", count: int = 1) -> None:
        super().__init__("cuda.bindings.runtime")
        self.gpu_name = gpu_name
        self.count = count
        self.devices_set: list[int] = []
        self.blocks: dict[int, np.ndarray] = {}
        #: the streams made and not destroyed
        self.streams: set[int] = set()
        #: CUDA call name -> errors its next calls return (first first), without doing anything
        self.failures: dict[str, list[Any]] = {}
        self.wrong_device: list[str] = []
        self._owner: dict[tuple[str, int], int] = {}  # (kind, handle) -> device
        self._current = threading.local()
        self._streams = iter(range(1234, 1 << 30))
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def _device(self) -> int:
        return getattr(self._current, "device", 0)

    def _failure(self, call: str) -> Any:
        """The error injected for this call of ``call`` (``failures``), or None."""
        queue = self.failures.get(call)
        return queue.pop(0) if queue else None

    def _check(self, call: str, kind: str, handle: int) -> None:
        owner = self._owner[(kind, handle)]
        if owner != self._device():
            self.wrong_device.append(f"{call} on device {self._device()} of a {kind} of "
                                     f"device {owner}")

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, self.count

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, object]:
        props = types.SimpleNamespace(name=self.gpu_name.encode() + b"\x00\x00", major=8, minor=9)
        return 0, props

    def cudaSetDevice(self, device: int) -> tuple[Any]:
        if (err := self._failure("cudaSetDevice")) is not None:
            return (err,)
        self.devices_set.append(device)
        self._current.device = device
        return (0,)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        # cudaMalloc's addresses are aligned to at least 256 bytes
        block = np.zeros(nbytes + 256, np.uint8)
        ptr = block.ctypes.data + (-block.ctypes.data) % 256
        self.blocks[ptr] = block
        self._owner[("memory", ptr)] = self._device()
        return 0, ptr

    def cudaFree(self, ptr: int) -> tuple[Any]:
        if (err := self._failure("cudaFree")) is not None:
            return (err,)
        self._check("cudaFree", "memory", ptr)
        del self.blocks[ptr]
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, int]:
        stream = next(self._streams)
        self._owner[("stream", stream)] = self._device()
        self.streams.add(stream)
        return 0, stream

    def cudaStreamDestroy(self, stream: int) -> tuple[Any]:
        if (err := self._failure("cudaStreamDestroy")) is not None:
            return (err,)
        self._check("cudaStreamDestroy", "stream", stream)
        self.streams.remove(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[Any]:
        if (err := self._failure("cudaStreamSynchronize")) is not None:
            return (err,)
        self._check("cudaStreamSynchronize", "stream", stream)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        self._check("cudaMemcpyAsync", "stream", stream)
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpy(self, dst: int, src: int, n: int, kind: int) -> tuple[int]:
        ctypes.memmove(dst, src, n)
        return (0,)


#: what the ``fake_gpu`` fixture yields: the TensorRT builds made so far and the fake cudart
FakeGpu = tuple[list[dict[str, Any]], _FakeCudart]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    """Installs fake tensorrt and cuda-python modules; yields (list of builds, fake cudart)."""
    builds: list[dict[str, Any]] = []
    cudart = _FakeCudart()
    cuda = types.ModuleType("cuda")
    cuda.__spec__ = importlib.machinery.ModuleSpec("cuda", None, is_package=True)
    cuda.__path__ = []
    bindings = types.ModuleType("cuda.bindings")
    bindings.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings", None, is_package=True)
    bindings.__path__ = []
    vars(bindings)["runtime"] = cudart  # the submodule as an attribute of its package
    cudart.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings.runtime", None)
    for name, module in [
        ("tensorrt", _FakeTrt(builds, cudart)),
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", cudart),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    # the backend keeps one TensorRT logger per process; keep the fake's out of later tests
    monkeypatch.setattr("nanoscout.engines.tensorrt._LOGGER", None)
    return builds, cudart


def test_fake_tensorrt_engine_runs_and_caches(
    fake_gpu: FakeGpu,
    model_path: Path,
    tmp_path: Path,
) -> None:
    builds, cudart = fake_gpu
    assert available_backends()["tensorrt"] == "available"
    with cast(TensorRTEngine,
              create_engine(model_path, cache_dir=tmp_path, max_shape=(512, 256))) as engine:
        assert engine.name == "tensorrt" and engine.built and engine.selection_notes == ()
        assert engine.inputs == (TensorSpec("image", (None, 1, None, None), "float32"),)
        assert builds[-1]["flags"] == ["FP16", "TF32"]
        assert builds[-1]["profile"] == {"image": [[1, 1, 16, 16], [1, 1, 512, 256], [1, 1, 512, 256]]}
        for shape in [(1, 1, 64, 48), (1, 1, 512, 256), (1, 1, 33, 40)]:
            image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
            out = engine.infer({"image": image})
            np.testing.assert_allclose(out["prob"], reference(image)[1], atol=1e-6)
        # the 512x256 frame grew the input buffer; the smaller one after it reused it
        assert engine._buffers["image"].nbytes == 512 * 256 * 4
        for shape in [(1, 1, 513, 256), (1, 1, 15, 64), (2, 1, 64, 64)]:
            with pytest.raises(EngineFailure, match=r"'image' shape .* outside"):
                engine.infer({"image": np.zeros(shape, np.float32)})
        plan = engine.plan_path
        assert plan.parent == tmp_path and plan.name.startswith("conv_sigmoid.")
        key = json.loads(plan.with_suffix(".json").read_text())
        assert key["gpu"] == "Fake GPU" and key["compute_capability"] == "8.9"
        assert key["tensorrt"] == "10.9.0" and key["precision"] == "fp16"
    assert not cudart.blocks, "close() left device buffers allocated"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".plan"]

    with cast(TensorRTEngine,
              create_engine(model_path, "trt", cache_dir=tmp_path, max_shape=(512, 256))) as again:
        assert not again.built and again.plan_path == plan and len(builds) == 1


@pytest.mark.parametrize(
    ("change", "expect_flags"),
    [
        ({"precision": "fp32"}, []),
        ({"max_shape": (1024, 1024)}, ["FP16", "TF32"]),
        ({"gpu": "Other GPU"}, ["FP16", "TF32"]),
    ],
)
def test_fake_tensorrt_rebuilds_when_the_key_changes(
    fake_gpu: FakeGpu, model_path: Path, tmp_path: Path, change: dict[str, Any],
    expect_flags: list[str]
) -> None:
    builds, cudart = fake_gpu
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path)) as first:
        assert first.built
    if "gpu" in change:
        cudart.gpu_name = change.pop("gpu")
    with cast(TensorRTEngine,
              create_engine(model_path, "tensorrt", cache_dir=tmp_path, **change)) as second:
        assert second.built and second.plan_path != first.plan_path
    assert len(builds) == 2 and builds[1]["flags"] == expect_flags


def test_fake_tensorrt_rebuilds_a_corrupt_plan(
    fake_gpu: FakeGpu,
    model_path: Path,
    tmp_path: Path,
) -> None:
    builds, _ = fake_gpu
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path)) as first:
        plan = first.plan_path
    plan.write_bytes(b"garbage")
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path)) as second:
        assert second.built and len(builds) == 2
        image = np.ones((1, 1, 40, 40), np.float32)
        np.testing.assert_allclose(second.infer({"image": image})["prob"], reference(image)[1])
    assert plan.read_bytes().startswith(b"FAKEPLAN")


def test_fake_tensorrt_parse_failure_falls_back_in_auto(
    fake_gpu: FakeGpu,
    tmp_path: Path,
    model_path: Path,
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not onnx")
    with pytest.raises(EngineFailure, match="TensorRT cannot parse ONNX model .*corrupt.onnx"):
        create_engine(corrupt, "tensorrt", cache_dir=tmp_path)
    # auto: TensorRT fails, the CUDA provider is missing, the CPU backend names the file
    with pytest.raises(EngineFailure, match="ONNX Runtime cannot load model .*corrupt.onnx"):
        create_engine(corrupt, cache_dir=tmp_path)


# --- precisions, INT8, batches and devices ----------------------------------------------------


def test_cpu_int8_uses_the_quantized_sibling_and_says_so(model_path: Path, tmp_path: Path) -> None:
    sibling = tmp_path / "conv_sigmoid.int8.onnx"
    sibling.write_bytes(model_path.read_bytes())  # the factory only loads it
    with cast(OnnxRuntimeEngine, create_engine(model_path, "cpu", threads=1, precision="int8",
                                               int8_model=sibling)) as engine:
        assert (engine.name, engine.precision, engine.model_path) == (
            "onnxruntime-cpu", "int8", sibling)
    with create_engine(model_path, "cpu", threads=1, int8_model=sibling) as auto:
        assert auto.precision == "int8"  # "auto" takes a sibling the caller vouches for
    with cast(OnnxRuntimeEngine, create_engine(model_path, "cpu", threads=1)) as plain:
        assert (plain.precision, plain.model_path) == ("fp32", model_path)
    with pytest.raises(EngineUnavailable, match="nanoscout models quantize"):
        create_engine(model_path, "cpu", precision="int8")
    with pytest.raises(EngineFailure, match="missing.int8.onnx"):
        create_engine(model_path, "cpu", precision="int8", int8_model=tmp_path / "missing.int8.onnx")


def _calibration(n: int, shape: tuple[int, ...] = (1, 1, 64, 48), name: str = "test set"
                 ) -> tuple[CalibrationSet, list[int]]:
    calls: list[int] = []

    def inputs() -> Iterator[dict[str, np.ndarray]]:
        calls.append(n)
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield {"image": rng.normal(size=shape).astype(np.float32)}

    return CalibrationSet(name, inputs), calls


def test_fake_tensorrt_int8_calibrates_once_and_keeps_the_cache_beside_the_plans(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path) -> None:
    builds, cudart = fake_gpu
    calib, calls = _calibration(5)
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path,
                                            precision="int8", calibration=calib)) as engine:
        assert engine.precision == "int8" and engine.built and engine.calibrated_batches == 5
        assert builds[-1]["flags"] == ["FP16", "INT8", "TF32"] and builds[-1]["calibrated"] == 5
        # calibration runs at the calibration inputs' shape, inference at any shape
        assert builds[-1]["calibration_profile"] == {"image": [[1, 1, 64, 48]] * 3}
        cache = engine.calibration_path
        assert cache is not None and cache.parent == tmp_path and cache.suffix == ".calib"
        assert cache.read_bytes() == b"FAKECALIB 5"
        assert json.loads(cache.with_suffix(".calib.json").read_text()) == {"calibration": "test set"}
        assert json.loads(engine.plan_path.with_suffix(".json").read_text())["calibration"] == "test set"
        image = np.random.default_rng(2).normal(size=(1, 1, 40, 56)).astype(np.float32)
        np.testing.assert_allclose(engine.infer({"image": image})["prob"], reference(image)[1], atol=1e-6)
    assert not cudart.blocks, "the calibrator left device buffers allocated"
    # another shape limit: a new plan, calibrated from the cache, without any input
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path,
                                            precision="int8", max_shape=(512, 512))) as second:
        assert second.built and second.calibrated_batches == 0 and builds[-1]["calibrated"] == 0
    # the same key again: the cached plan, no build
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path,
                                            precision="int8", calibration=calib)) as third:
        # the set was opened twice, both in the first build: its first input's shape for the
        # calibration profile, then the calibration; never since
        assert not third.built and len(builds) == 2 and calls == [5, 5]
    # another calibration set: calibrated again
    other, _ = _calibration(3, name="other set")
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path,
                                            precision="int8", calibration=other)) as fourth:
        assert fourth.built and fourth.calibrated_batches == 3
        assert fourth.calibration_path is not None
        assert fourth.calibration_path.read_bytes() == b"FAKECALIB 3"


def test_fake_tensorrt_int8_without_calibration_says_what_to_run(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="nanoscout models build-engines --precision int8"):
        create_engine(model_path, "tensorrt", cache_dir=tmp_path, precision="int8")
    # auto backend: TensorRT cannot, the CPU runs the FP32 model (no INT8 sibling given)
    with pytest.raises(EngineUnavailable, match="nanoscout models quantize"):
        create_engine(model_path, cache_dir=tmp_path, precision="int8")


def test_fake_tensorrt_auto_precision_is_fp16(fake_gpu: FakeGpu, model_path: Path,
                                              tmp_path: Path) -> None:
    builds, _ = fake_gpu
    with create_engine(model_path, "tensorrt", cache_dir=tmp_path, precision="auto") as engine:
        assert engine.precision == "fp16" and builds[-1]["flags"] == ["FP16", "TF32"]


def test_fake_tensorrt_batches_tiles_up_to_max_batch(fake_gpu: FakeGpu, model_path: Path,
                                                     tmp_path: Path) -> None:
    builds, _ = fake_gpu
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path,
                                            max_shape=(256, 256), max_batch=4)) as engine:
        assert builds[-1]["profile"] == {"image": [[1, 1, 16, 16], [4, 1, 256, 256], [4, 1, 256, 256]]}
        tiles = np.random.default_rng(4).normal(size=(3, 1, 96, 128)).astype(np.float32)
        np.testing.assert_allclose(engine.infer({"image": tiles})["prob"], reference(tiles)[1], atol=1e-6)
        with pytest.raises(EngineFailure, match="outside"):
            engine.infer({"image": np.zeros((5, 1, 64, 64), np.float32)})
        assert json.loads(engine.plan_path.with_suffix(".json").read_text())["max_batch"] == 4


def test_fake_tensorrt_runs_on_the_configured_gpu(fake_gpu: FakeGpu, model_path: Path,
                                                  tmp_path: Path) -> None:
    _, cudart = fake_gpu
    cudart.count = 2
    with cast(TensorRTEngine,
              create_engine(model_path, "tensorrt", cache_dir=tmp_path, device=1)) as engine:
        assert engine.gpu.index == 1 and engine.device == 1
        engine.infer({"image": np.zeros((1, 1, 32, 32), np.float32)})
    assert cudart.devices_set and set(cudart.devices_set) == {1}
    with pytest.raises(EngineUnavailable, match="CUDA device 2 does not exist"):
        create_engine(model_path, "tensorrt", cache_dir=tmp_path, device=2)


def _in_thread(call: Any) -> None:
    """Run ``call`` in a new thread and wait for it; its exception is raised here."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_fake_tensorrt_frees_on_its_gpu_whichever_thread_closes(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path) -> None:
    """The daemon builds an engine on one thread and runs it on its worker; a hot swap or the
    garbage collector may close it from a third. The CUDA runtime's current device is per
    thread (device 0 until set), so every call must select the engine's GPU first."""
    _, cudart = fake_gpu
    cudart.count = 2
    engine = create_engine(model_path, "tensorrt", cache_dir=tmp_path, device=1)
    image = np.random.default_rng(6).normal(size=(1, 1, 48, 64)).astype(np.float32)
    _in_thread(lambda: np.testing.assert_allclose(engine.infer({"image": image})["prob"],
                                                  reference(image)[1], atol=1e-6))
    _in_thread(engine.close)
    assert not cudart.wrong_device, cudart.wrong_device
    assert not cudart.blocks, "close() left device buffers allocated"

#: cuda-python's error value after a kernel's illegal memory access; sticky: every later call
#: of the process's CUDA context returns it
_ILLEGAL_ADDRESS = types.SimpleNamespace(value=700, name="cudaErrorIllegalAddress")


def test_fake_tensorrt_close_after_a_cuda_error_frees_the_rest(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path) -> None:
    """After a GPU fault (an illegal address) CUDA calls fail with the sticky error. close()
    stopped at the first failure and left the other buffers, the stream, the context and the
    engine allocated: a hot swap after a fault leaked GPU memory every time. Each release is
    now attempted, and one EngineFailure names every failure."""
    _, cudart = fake_gpu
    engine = cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path))
    engine.infer({"image": np.zeros((1, 1, 32, 32), np.float32)})
    assert sorted(engine._buffers) == ["image", "logits", "prob"] and len(cudart.blocks) == 3
    assert len(cudart.streams) == 1
    image_ptr = engine._buffers["image"].ptr
    cudart.failures = {"cudaStreamSynchronize": [_ILLEGAL_ADDRESS], "cudaFree": [_ILLEGAL_ADDRESS]}
    with pytest.raises(EngineFailure) as info:
        engine.close()
    message = str(info.value)
    assert message.startswith("closing the tensorrt engine for conv_sigmoid.onnx on GPU 0: "
                              "2 release(s) failed")
    assert "CUDA cudaStreamSynchronize failed: cudaErrorIllegalAddress" in message
    assert "CUDA cudaFree of 'image' (4096 bytes) failed: cudaErrorIllegalAddress" in message
    # the failed free is the only block left; the stream is gone; nothing is held any more
    assert list(cudart.blocks) == [image_ptr]
    assert not cudart.streams
    assert engine._context is None and engine._engine is None and engine._runtime is None
    assert not engine._buffers and engine._stream is None
    calls = list(cudart.devices_set)
    engine.close()  # idempotent, also after a failed close: no second error, no CUDA call
    assert cudart.devices_set == calls
    with pytest.raises(EngineFailure, match="closed"):
        engine.infer({"image": np.zeros((1, 1, 32, 32), np.float32)})


@pytest.mark.parametrize(("precision", "device", "flags"),
                         [("fp32", 1, []), ("fp16", 0, ["FP16", "TF32"])])
def test_fake_triton_plan_has_the_engines_precision_rules_and_device(
        fake_gpu: FakeGpu, model_path: Path, precision: str, device: int,
        flags: list[str]) -> None:
    """export-triton's plan builder kept TF32 on for an "fp32" plan (the daemon's own engine
    turns it off) and built on whatever GPU the thread had; it now uses the backend's builder
    config and selects its ``device``."""
    from nanoscout.engines.triton_repository import build_plan

    builds, cudart = fake_gpu
    cudart.count = 2
    plan = build_plan(model_path, max_batch_size=4, max_shape=(256, 256),
                      precision=cast(Any, precision), device=device)
    assert plan.startswith(b"FAKEPLAN")
    assert builds[-1]["flags"] == flags and builds[-1]["device"] == device
    assert builds[-1]["profile"] == {"image": [[1, 1, 16, 16], [1, 1, 256, 256], [4, 1, 256, 256]]}
    with pytest.raises(EngineUnavailable, match="CUDA device 2 does not exist"):
        build_plan(model_path, max_batch_size=4, device=2)
    with pytest.raises(ConfigError, match="fp32 or fp16, got 'int8'"):
        build_plan(model_path, max_batch_size=4, precision=cast(Any, "int8"))


def test_fake_tensorrt_takes_the_detectors_smallest_side(fake_gpu: FakeGpu, model_path: Path,
                                                         tmp_path: Path) -> None:
    """The detectors pad a frame to their stride, 16 px (``pad_to_multiple``), and a
    working-scale pass may shrink a side to it (``Detector._pass``: at least the stride): the
    optimisation profile must take a 16 px side, not only 32."""
    from nanoscout.analysis.preprocess import pad_to_multiple

    with create_engine(model_path, "tensorrt", cache_dir=tmp_path, max_shape=(256, 256)) as engine:
        rng = np.random.default_rng(8)
        strip, _ = pad_to_multiple(rng.normal(size=(5, 200)).astype(np.float32), 16)
        assert strip.shape == (16, 208)
        for image in (strip[None, None], rng.normal(size=(1, 1, 16, 16)).astype(np.float32)):
            np.testing.assert_allclose(engine.infer({"image": image})["prob"],
                                       reference(image)[1], atol=1e-6)
        with pytest.raises(EngineFailure, match=r"'image' shape \(1, 1, 8, 64\) is outside"):
            engine.infer({"image": np.zeros((1, 1, 8, 64), np.float32)})


def test_fake_tensorrt_refused_tensor_address_is_an_error(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """set_tensor_address reports a name that is no tensor of the engine, or an address
    without 256-byte alignment, by returning False; the engine would then run on whatever
    address the tensor had before."""
    with cast(TensorRTEngine, create_engine(model_path, "tensorrt", cache_dir=tmp_path)) as engine:
        monkeypatch.setattr(engine._context, "set_tensor_address", lambda name, ptr: False)
        with pytest.raises(EngineFailure, match=r"refused device address 0x[0-9a-f]+ for tensor "
                                                r"'image' of conv_sigmoid.onnx"):
            engine.infer({"image": np.zeros((1, 1, 32, 32), np.float32)})


def test_fake_tensorrt_int8_builds_under_warnings_as_errors(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path) -> None:
    """TensorRT >= 10.1 warns (DeprecationWarning) when a calibrator or a calibration profile
    is set; with warnings as errors (this project's pytest settings) the warning aborts the
    INT8 build. The backend silences those two warnings, and only while it calls them."""
    builds, _ = fake_gpu
    calib, _ = _calibration(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with create_engine(model_path, "tensorrt", cache_dir=tmp_path, precision="int8",
                           calibration=calib) as engine:
            assert engine.precision == "int8" and builds[-1]["calibrated"] == 2
            assert builds[-1]["calibration_profile"] == {"image": [[1, 1, 64, 48]] * 3}
    with pytest.warns(DeprecationWarning, match="Superseded by explicit quantization"):
        warnings.warn(_INT8_DEPRECATED, DeprecationWarning, stacklevel=1)


@pytest.mark.parametrize(
    ("batches", "needle"),
    [
        ([{"x": np.zeros((1, 1, 64, 48), np.float32)}], "has no input 'image'"),
        ([{"image": np.zeros((1, 1, 64, 48), np.float32)},
          {"image": np.zeros((1, 1, 32, 32), np.float32)}],
         r"'image' of calibration batch 1 .* shape \(1, 1, 32, 32\), but the calibration runs "
         r"at \(1, 1, 64, 48\)"),
        ([], "set 'broken set' yielded none"),
    ],
    ids=["missing input", "another shape", "no input"],
)
def test_fake_tensorrt_int8_calibration_failure_fails_the_build(
        fake_gpu: FakeGpu, model_path: Path, tmp_path: Path,
        batches: list[dict[str, np.ndarray]], needle: str) -> None:
    """TensorRT's binding prints an exception raised in ``get_batch`` and takes it for the end
    of the data: the calibration would stop early and the build carry on, leaving an INT8 plan
    and a calibration cache made from the batches before (here none) for every later build."""
    _, cudart = fake_gpu
    broken = CalibrationSet("broken set", lambda: iter(batches))
    with pytest.raises(EngineFailure, match=f"INT8 calibration of .*conv_sigmoid.onnx .*{needle}"):
        create_engine(model_path, "tensorrt", cache_dir=tmp_path, precision="int8",
                      calibration=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a plan or calibration cache stayed"
    assert not cudart.blocks, "the calibrator left device buffers allocated"


def test_cuda_provider_gets_the_configured_device(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoscout.engines import onnxrt

    seen: list[tuple] = []

    class Recording:
        def __init__(self, path: Path, *, providers: tuple, threads: int | None,
                     precision: str = "fp32") -> None:
            seen.append(providers)
            self.name, self.precision = "onnxruntime-cuda", precision

    monkeypatch.setattr(onnxrt, "OnnxRuntimeEngine", Recording)
    create_engine(model_path, "cuda", device=3)
    assert seen == [(("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider")]
    with pytest.raises(EngineUnavailable, match="tensorrt"):
        create_engine(model_path, "cuda", precision="int8")
