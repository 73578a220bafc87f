"""GPU tests: skipped, with the reason, on a machine without an NVIDIA GPU.

Each test module then skips itself when its own runtime is missing (TensorRT with cuda-python,
or onnxruntime-gpu), so a GPU machine with only one of them still runs that one's tests.
The fixtures build a tiny ONNX model (3x3 conv + sigmoid, dynamic N/H/W) and a CPU reference.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@functools.cache
def no_gpu_reason() -> str | None:
    """Returns why this machine has no usable NVIDIA GPU, or None when it has one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU: nvidia-smi not found"
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no NVIDIA GPU: nvidia-smi -L failed ({exc})"
    if done.returncode != 0 or "GPU" not in done.stdout:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return f"no NVIDIA GPU: nvidia-smi -L lists none ({detail[0] if detail else 'no output'})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = no_gpu_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        # this hook sees every collected test, not only this folder's
        if item.path.is_relative_to(HERE):
            item.add_marker(marker)


KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], np.float32) * 0.25


def write_conv_sigmoid_model(path: Path) -> Path:
    """Writes image float32[N, 1, H, W] -> logits (3x3 conv, pad 1), prob = sigmoid(logits)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    dims: list[str | int] = ["N", 1, "H", "W"]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["logits"], ["prob"]),
        ],
        "conv_sigmoid",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, dims),
        ],
        initializer=[
            numpy_helper.from_array(KERNEL.reshape(1, 1, 3, 3), "w"),
            numpy_helper.from_array(np.array([0.1], np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny conv + sigmoid ONNX model."""
    return write_conv_sigmoid_model(tmp_path_factory.mktemp("gpu_models") / "conv_sigmoid.onnx")


@pytest.fixture(scope="session")
def cpu_reference(tiny_model: Path) -> Iterator[Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """Runs the tiny model on ONNX Runtime CPU; returns its outputs by name."""
    from nanoscout.engines import create_engine

    with create_engine(tiny_model, "cpu", threads=2) as engine:
        yield lambda image: engine.infer({"image": image})


@pytest.fixture
def images() -> list[np.ndarray]:
    """Random frames of several sizes (float32, N=1, C=1), smallest to largest and back."""
    rng = np.random.default_rng(7)
    shapes = [(64, 96), (32, 32), (480, 640), (37, 129), (1024, 1024), (64, 96)]
    return [rng.normal(size=(1, 1, h, w)).astype(np.float32) for h, w in shapes]
