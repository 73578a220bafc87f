"""The INT8 siblings' up-sampling rewrite (nanoscout.training.upsample_rewrite): the same
numbers as the ``Resize`` it replaces, on a small graph and on the shipped detector, and the
shipped INT8 detector is built with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir  # noqa: E402
from nanoscout.analysis.preprocess import resize_bilinear  # noqa: E402
from nanoscout.training import upsample_rewrite  # noqa: E402
from nanoscout.training.int8_calibration import calibration_inputs  # noqa: E402
from nanoscout.training.quantize import quantize_onnx  # noqa: E402

WEIGHTS = shipped_model_dir()


def _session(model: Any) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _resize_model(mode: str, ctm: str, nearest: str, scales: list[float]) -> Any:
    """x (1, 3, H, W) -> Resize -> y; H and W dynamic."""
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode=mode,
                            coordinate_transformation_mode=ctm, nearest_mode=nearest)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h2", "w2"])],
        [numpy_helper.from_array(np.array(scales, np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_a_nearest_2x_resize_becomes_copies_with_the_same_output() -> None:
    model = _resize_model("nearest", "asymmetric", "floor", [1, 1, 2, 2])
    before = _session(model)
    assert upsample_rewrite.rewrite(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Resize" not in ops and ops.count("Concat") == 2
    after = _session(model)
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 5, 7), (1, 3, 64, 48)]:  # odd sizes and another shape, same graph
        x = rng.normal(size=shape).astype(np.float32)
        y0 = before.run(None, {"x": x})[0]
        y1 = after.run(None, {"x": x})[0]
        assert y1.shape == (1, 3, 2 * shape[2], 2 * shape[3])
        assert np.array_equal(y0, y1)
        assert np.array_equal(y1[:, :, 1::2, 1::2], x)


@pytest.mark.parametrize("mode,ctm,nearest,scales", [
    ("linear", "half_pixel", "floor", [1, 1, 2, 2]),         # the detectors' logits
    ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 2, 2]),  # shifted by half a pixel
    ("nearest", "asymmetric", "floor", [1, 1, 3, 3]),
    ("nearest", "asymmetric", "floor", [1, 2, 2, 2]),
])
def test_other_resizes_are_left_alone(mode: str, ctm: str, nearest: str,
                                      scales: list[float]) -> None:
    model = _resize_model(mode, ctm, nearest, scales)
    assert upsample_rewrite.rewrite(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Resize"]


def test_the_shipped_detector_computes_the_same_logits_after_the_rewrite() -> None:
    path = WEIGHTS / "detector.onnx"
    if not path.is_file():
        pytest.skip(f"no shipped {path}")
    model = onnx.load(str(path))
    before = _session(model)
    assert upsample_rewrite.rewrite(model) == 3  # the decoder's three up-samplings
    x = next(calibration_inputs(ModelCard.load(WEIGHTS / "detector.json"), 1, start=1000))
    x = {k: np.ascontiguousarray(v[:, :, :192, :320]) for k, v in x.items()}
    assert np.array_equal(before.run(None, x)[0], _session(model).run(None, x)[0])


def test_the_int8_detector_has_no_resize_and_outputs_stride_2_logits(tmp_path: Path) -> None:
    """What ``nanoscout models quantize`` writes: the up-samplings as copies, the first
    convolution in float (no quantize of the input), the logits' bilinear up-sampling left to
    the host, and the output, up-sampled, close to FP32's."""
    path = WEIGHTS / "detector.onnx"
    if not path.is_file():
        pytest.skip(f"no shipped {path}")
    card = ModelCard.load(WEIGHTS / "detector.json")
    dst = tmp_path / "detector.int8.onnx"
    how = quantize_onnx(path, dst, calibration_inputs(card, 4))
    assert "3 nearest 2x Resize rewritten" in how and "output nodes (float)" in how
    assert "left to the host" in how
    q = onnx.load(str(dst))
    assert q.graph.output[0].name == card.outputs[0].name
    assert not any(n.op_type == "Resize" for n in q.graph.node)
    # the first convolution reads the float image itself (no QuantizeLinear of the input)
    first = next(n for n in q.graph.node if q.graph.input[0].name in n.input)
    assert first.op_type == "Conv"
    x = next(calibration_inputs(card, 1, start=1000))
    ref = _session(onnx.load(str(path))).run(None, x)[0]
    got = _session(q).run(None, x)[0]
    h, w = ref.shape[2:]
    assert got.dtype == np.float32 and got.shape == (*ref.shape[:2], h // 2, w // 2)
    up = np.stack([resize_bilinear(c, (h, w)) for c in got[0]])[None]
    assert np.mean((up > 0) == (ref > 0)) > 0.99


def test_the_logits_bilinear_upsampling_is_stripped_and_the_host_computes_it() -> None:
    model = _resize_model("linear", "half_pixel", "floor", [1, 1, 2, 2])
    # a graph that computes something before the up-sampling
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"], name="relu"))
    model.graph.node[1].input[0] = "r"
    full = _session(model)
    assert upsample_rewrite.strip_output_upsample(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Relu"]
    assert [o.name for o in model.graph.output] == ["y"]
    assert not model.graph.initializer  # the scales went with their Resize
    half = _session(model)
    x = np.random.default_rng(1).normal(size=(1, 3, 6, 10)).astype(np.float32)
    y_half = half.run(None, {"x": x})[0]
    assert np.array_equal(y_half, np.maximum(x, 0))
    y_full = full.run(None, {"x": x})[0]
    host = np.stack([resize_bilinear(c, (12, 20)) for c in y_half[0]])
    np.testing.assert_allclose(host, y_full[0], atol=1e-6)


@pytest.mark.parametrize("mode,ctm,scales", [
    ("nearest", "asymmetric", [1, 1, 2, 2]),
    ("linear", "align_corners", [1, 1, 2, 2]),
    ("linear", "half_pixel", [1, 1, 4, 4]),
])
def test_other_output_resizes_stay(mode: str, ctm: str, scales: list[float]) -> None:
    model = _resize_model(mode, ctm, "floor", scales)
    assert upsample_rewrite.strip_output_upsample(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Resize"]
