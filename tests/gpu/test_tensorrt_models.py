"""Every shipped model as a TensorRT engine on a real GPU: FP16 and INT8 (entropy calibrator,
cache beside the plans), batched detector tiles, the configured device, and the detectors'
INT8 accuracy parity against ONNX Runtime FP32 on held-out data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.engines import CalibrationSet, available_backends, create_engine
from nanoscout.engines.tensorrt import TensorRTEngine

pytestmark = pytest.mark.gpu

WEIGHTS = shipped_model_dir()
MODELS = ("detector", "detector_stem", "classifier", "lens")


@pytest.fixture(autouse=True, scope="module")
def _needs_tensorrt() -> None:
    # a fixture, not an import-time skip, so that conftest's "no NVIDIA GPU" reason wins
    reason = available_backends()["tensorrt"]
    if reason != "available":
        pytest.skip(f"TensorRT not usable: {reason}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt")


def _card(name: str) -> ModelCard:
    return ModelCard.load(WEIGHTS / f"{name}.json")


def _inputs(card: ModelCard, n: int) -> Iterator[dict[str, np.ndarray]]:
    """Calibration-like inputs that are not the calibration's own (seeds after them)."""
    from nanoscout.training.int8_calibration import calibration_inputs

    yield from calibration_inputs(card, n, start=1000)


def _engine(name: str, cache: Path, precision: str, **kw: Any) -> TensorRTEngine:
    from nanoscout.training.int8_calibration import calibration_inputs, describe_calibration

    card = _card(name)
    calib = None
    if precision == "int8":
        calib = CalibrationSet(describe_calibration(card, 16), lambda: calibration_inputs(card, 16))
    shape = card.input.size or (2304, 2304)
    return cast(TensorRTEngine, create_engine(
        WEIGHTS / f"{name}.onnx", "tensorrt", precision=precision, cache_dir=cache,
        calibration=calib, max_shape=(int(shape[0]), int(shape[1])), **kw))


def _agreement(card: ModelCard, got: dict[str, np.ndarray], want: dict[str, np.ndarray]
               ) -> float:
    """How far the engine's answer is from the CPU's, in the model's own terms (0 = same):
    detectors: share of pixels whose foreground decision differs; classifier: 1 when the
    top class differs; lens: relative error of the novelty error."""
    if card.task == "detection-segmentation":
        out = card.outputs[0]
        fg = out.channels.index("foreground")
        return float(np.mean((got[out.name][:, fg] > 0) != (want[out.name][:, fg] > 0)))
    if card.task == "classification":
        return float(np.argmax(got["probabilities"]) != np.argmax(want["probabilities"]))
    assert card.novelty is not None
    e = card.novelty.error_output
    return float(abs(got[e].item() - want[e].item()) / max(abs(want[e].item()), 1e-6))


#: largest disagreement per task and precision (see _agreement)
TOLERANCE = {("detection-segmentation", "fp16"): 0.002, ("detection-segmentation", "int8"): 0.01,
             ("classification", "fp16"): 0.0, ("classification", "int8"): 0.0,
             ("autoencoder", "fp16"): 0.02, ("autoencoder", "int8"): 0.1}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("name", MODELS)
def test_every_shipped_model_builds_and_agrees_with_the_cpu(name: str, precision: str,
                                                            cache: Path) -> None:
    card = _card(name)
    with _engine(name, cache, precision) as engine, \
            create_engine(WEIGHTS / f"{name}.onnx", "onnxruntime-cpu", precision="fp32") as cpu:
        assert engine.name == "tensorrt" and engine.precision == precision
        worst = max(_agreement(card, engine.infer(x), cpu.infer(x)) for x in _inputs(card, 4))
        assert worst <= TOLERANCE[(card.task, precision)], (name, precision, worst)


def test_int8_calibrates_once_and_later_builds_read_the_cache(cache: Path,
                                                              tmp_path: Path) -> None:
    with _engine("detector", tmp_path, "int8") as first:
        assert first.built and first.calibrated_batches == 16
        calib = first.calibration_path
        assert calib is not None and calib.parent == tmp_path and calib.stat().st_size > 0
    # another shape limit: a new plan from the cache, without calibration inputs
    with cast(TensorRTEngine, create_engine(WEIGHTS / "detector.onnx", "tensorrt",
                                            precision="int8", cache_dir=tmp_path,
                                            max_shape=(1024, 1024))) as second:
        assert second.built and second.calibrated_batches == 0


def test_detector_tiles_go_through_in_batches(cache: Path) -> None:
    card = _card("detector")
    rng = np.random.default_rng(0)
    tiles = rng.random((3, 1, 512, 512), dtype=np.float32)
    with _engine("detector", cache, "fp16", max_batch=4) as engine:
        batched = engine.infer({card.input.name: tiles})[card.outputs[0].name]
        single = np.concatenate([engine.infer({card.input.name: t[None]})[card.outputs[0].name]
                                 for t in tiles])
        np.testing.assert_allclose(batched, single, atol=0.05)


def test_engines_run_on_the_configured_gpu(cache: Path) -> None:
    from nanoscout.engines.tensorrt import _gpu_info, _import_cudart

    cudart = _import_cudart()
    count = int(cudart.cudaGetDeviceCount()[1])
    device = count - 1  # the last GPU (the only one on a single-GPU machine)
    with _engine("classifier", cache, "fp16", device=device) as engine:
        assert engine.gpu == _gpu_info(cudart, device)
        x = next(_inputs(_card("classifier"), 1))
        assert engine.infer(x)["probabilities"].shape == (1, len(_card("classifier").classes or ()))


@pytest.mark.parametrize("name", ["detector", "detector_stem"])
def test_int8_detector_keeps_its_f1(name: str, cache: Path) -> None:
    """The issue's parity rule on a GPU: INT8 loses at most 0.01 F1 on any held-out set."""
    from nanoscout.training.build_engines import build_model

    res = build_model(WEIGHTS / f"{name}.onnx", precision="int8", device=0, cache_dir=cache,
                      tile_px=2304, tile_batch=4, n_calibration=32, check=False, parity=True,
                      sets=["synthetic", "emps", "stem", "nffa"], max_images=30, data_root=None)
    assert res["parity"], res
    for s, row in res["parity"].items():
        assert row["loss"] <= 0.01, (name, s, row)
