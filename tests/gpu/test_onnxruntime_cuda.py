"""ONNX Runtime with the CUDA provider (the onnxruntime-gpu wheel) on a real GPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from nanoscout.engines import available_backends, create_engine
from nanoscout.engines.onnxrt import OnnxRuntimeEngine
from nanoscout.wire.errors import EngineFailure

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _needs_cuda_provider() -> None:
    # a fixture, not an import-time skip, so that conftest's "no NVIDIA GPU" reason wins
    reason = available_backends()["onnxruntime-cuda"]
    if reason != "available":
        pytest.skip(f"ONNX Runtime CUDA not usable: {reason}")


# cuDNN may run fp32 convolutions in TF32 on Ampere and newer (10-bit mantissa)
ATOL = {"logits": 5e-3, "prob": 2e-3}


def test_cuda_matches_cpu(
    tiny_model: Path,
    cpu_reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    images: list[np.ndarray],
) -> None:
    with cast(OnnxRuntimeEngine, create_engine(tiny_model, "cuda", threads=2)) as engine:
        assert engine.name == "onnxruntime-cuda"
        assert engine.providers[0] == "CUDAExecutionProvider"
        for image in images:
            got, want = engine.infer({"image": image}), cpu_reference(image)
            assert set(got) == set(want)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL[name])


def test_cuda_checks_inputs(tiny_model: Path) -> None:
    with (
        create_engine(tiny_model, "onnxruntime-cuda") as engine,
        pytest.raises(EngineFailure, match="'image' has rank 3"),
    ):
        engine.infer({"image": np.zeros((1, 64, 64), np.float32)})


def test_auto_uses_a_gpu_backend(tiny_model: Path, tmp_path: Path) -> None:
    with create_engine(tiny_model, cache_dir=tmp_path) as engine:
        assert engine.name in ("tensorrt", "onnxruntime-cuda")
        if engine.name == "onnxruntime-cuda":
            assert engine.selection_notes[0].startswith("tensorrt ")
