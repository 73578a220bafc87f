"""TensorRT backend on a real GPU: numerics against ONNX Runtime CPU, plan cache, shape limits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from nanoscout.engines import CalibrationSet, available_backends, create_engine
from nanoscout.engines.tensorrt import TensorRTEngine
from nanoscout.wire.errors import EngineFailure

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _needs_tensorrt() -> None:
    # a fixture, not an import-time skip, so that conftest's "no NVIDIA GPU" reason wins
    reason = available_backends()["tensorrt"]
    if reason != "available":
        pytest.skip(f"TensorRT not usable: {reason}")


# fp16 keeps ~3 significant digits; logits here are O(1) and the sigmoid squashes errors
FP16_ATOL = {"logits": 2e-2, "prob": 5e-3}
FP32_ATOL = {"logits": 1e-5, "prob": 1e-6}


def _assert_close(got: dict, want: dict, atol: dict) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape and got[name].dtype == expected.dtype
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=atol[name], err_msg=name)


def test_fp16_matches_cpu_on_many_shapes(
    tiny_model: Path,
    cpu_reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    images: list[np.ndarray],
    tmp_path: Path,
) -> None:
    with cast(TensorRTEngine,
              create_engine(tiny_model, "tensorrt", cache_dir=tmp_path, precision="fp16")) as engine:
        assert engine.name == "tensorrt" and engine.built and engine.plan_path.is_file()
        assert engine.plan_path.parent == tmp_path
        for image in images:
            _assert_close(engine.infer({"image": image}), cpu_reference(image), FP16_ATOL)


def test_fp32_matches_cpu_closely(
    tiny_model: Path,
    cpu_reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    images: list[np.ndarray],
    tmp_path: Path,
) -> None:
    with create_engine(tiny_model, "trt", cache_dir=tmp_path, precision="fp32") as engine:
        for image in images[:3]:
            _assert_close(engine.infer({"image": image}), cpu_reference(image), FP32_ATOL)


def test_second_create_reuses_the_cached_plan(tiny_model: Path, tmp_path: Path) -> None:
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)) as first:
        assert first.built
        plan, stamp = first.plan_path, first.plan_path.stat().st_mtime_ns
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)) as second:
        assert not second.built, "the plan was rebuilt although the cache held it"
        assert second.plan_path == plan and plan.stat().st_mtime_ns == stamp
        image = np.ones((1, 1, 40, 40), np.float32)
        assert second.infer({"image": image})["prob"].shape == image.shape
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".plan"]


@pytest.mark.parametrize(
    ("changed", "kwargs"),
    [("precision", {"precision": "fp32"}), ("max_shape", {"max_shape": (512, 512)})],
)
def test_changing_the_key_rebuilds(tiny_model: Path, tmp_path: Path, changed: str, kwargs: dict) -> None:
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)) as base:
        assert base.built
    with cast(TensorRTEngine,
              create_engine(tiny_model, "tensorrt", cache_dir=tmp_path, **kwargs)) as other:
        assert other.built, f"changing {changed} reused the old plan"
        assert other.plan_path != base.plan_path
        assert base.plan_path.is_file() and other.plan_path.is_file()


def test_a_corrupt_cached_plan_is_rebuilt(
    tiny_model: Path,
    cpu_reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)) as first:
        plan = first.plan_path
    plan.write_bytes(b"not a TensorRT plan" * 100)
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)) as again:
        assert again.built
        image = np.zeros((1, 1, 64, 64), np.float32)
        _assert_close(again.infer({"image": image}), cpu_reference(image), FP16_ATOL)
    assert plan.read_bytes()[:19] != b"not a TensorRT plan"


def test_shapes_outside_the_profile_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    with create_engine(tiny_model, "tensorrt", cache_dir=tmp_path, max_shape=(256, 128)) as engine:
        engine.infer({"image": np.zeros((1, 1, 256, 128), np.float32)})
        # 16 px: the detectors' stride, the smallest side they send
        engine.infer({"image": np.zeros((1, 1, 16, 64), np.float32)})
        for shape in [(1, 1, 257, 128), (1, 1, 8, 64), (2, 1, 64, 64)]:
            with pytest.raises(EngineFailure, match=r"'image' shape .* outside"):
                engine.infer({"image": np.zeros(shape, np.float32)})


def test_buffers_grow_and_are_reused(tiny_model: Path, tmp_path: Path) -> None:
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)) as engine:
        engine.infer({"image": np.zeros((1, 1, 512, 512), np.float32)})
        ptr, size = engine._buffers["image"].ptr, engine._buffers["image"].nbytes
        engine.infer({"image": np.zeros((1, 1, 64, 64), np.float32)})
        assert (engine._buffers["image"].ptr, engine._buffers["image"].nbytes) == (ptr, size)
        engine.infer({"image": np.zeros((1, 1, 1024, 1024), np.float32)})
        assert engine._buffers["image"].nbytes == 1024 * 1024 * 4


def test_bad_inputs_and_closed_engine(tiny_model: Path, tmp_path: Path) -> None:
    engine = create_engine(tiny_model, "tensorrt", cache_dir=tmp_path)
    with pytest.raises(EngineFailure, match="'image' has dtype"):
        engine.infer({"image": np.zeros((1, 1, 64, 64), np.float64)})
    with pytest.raises(EngineFailure, match="unknown input 'x'"):
        engine.infer({"x": np.zeros((1, 1, 64, 64), np.float32)})
    engine.close()
    engine.close()
    with pytest.raises(EngineFailure, match="closed"):
        engine.infer({"image": np.zeros((1, 1, 64, 64), np.float32)})


def test_threads_take_turns(
    tiny_model: Path,
    cpu_reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    frames = [rng.normal(size=(1, 1, 96 + 8 * i, 128)).astype(np.float32) for i in range(8)]
    errors: list[BaseException] = []
    with create_engine(tiny_model, "tensorrt", cache_dir=tmp_path) as engine:

        def work(image: np.ndarray) -> None:
            try:
                for _ in range(5):
                    _assert_close(engine.infer({"image": image}), cpu_reference(image), FP16_ATOL)
            except BaseException as exc:  # handed to the test thread below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f,)) for f in frames]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        # a thread still running after its time would pass the test below unseen
        assert not [t for t in threads if t.is_alive()], "an inference thread did not finish"
    assert not errors, errors[0]


def _calibration(batches: list[dict[str, np.ndarray]]) -> CalibrationSet:
    return CalibrationSet(f"{len(batches)} batches", lambda: iter(batches))


def test_int8_calibrates_and_a_broken_set_fails_the_build(
    tiny_model: Path,
    cpu_reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    """The implicit-INT8 calls warn on TensorRT >= 10.1 and this suite turns warnings into
    errors; an exception in the calibrator is swallowed by TensorRT's binding, so the backend
    must raise it itself and leave no calibration cache behind."""
    rng = np.random.default_rng(11)
    good = [{"image": rng.normal(size=(1, 1, 96, 128)).astype(np.float32)} for _ in range(4)]
    with cast(TensorRTEngine, create_engine(tiny_model, "tensorrt", cache_dir=tmp_path / "ok",
                                            precision="int8",
                                            calibration=_calibration(good))) as engine:
        assert engine.built and engine.calibrated_batches == 4
        assert engine.calibration_path is not None and engine.calibration_path.stat().st_size
        image = good[0]["image"]
        # INT8 activations: agreement on average (the calibration may clip rare outliers)
        error = np.abs(engine.infer({"image": image})["prob"] - cpu_reference(image)["prob"])
        assert float(error.mean()) < 0.01, float(error.mean())
    broken = [{"x": good[0]["image"]}]
    with pytest.raises(EngineFailure, match="INT8 calibration of .* has no input 'image'"):
        create_engine(tiny_model, "tensorrt", cache_dir=tmp_path / "broken", precision="int8",
                      calibration=_calibration(broken))
    assert not list((tmp_path / "broken").glob("*.calib")), "a calibration cache stayed"


def test_auto_prefers_tensorrt(tiny_model: Path, tmp_path: Path) -> None:
    with create_engine(tiny_model, cache_dir=tmp_path) as engine:
        assert engine.name == "tensorrt"
        assert engine.selection_notes == ()
