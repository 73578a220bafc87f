"""The field classifier runtime (nanoscout.analysis.classifier) on tiny ONNX models built in tmp_path.

The models are hand-made so every number can be checked: the "classifier" scores three classes
from the frame's mean normalised intensity and its CAM is the 4x4-pooled frame; the "lens"
reports the mean squared normalised intensity as its error. The shipped models are tested in
tests/unit/test_classifier_model.py and tests/unit/test_lens_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import GraphProto, TensorProto, helper, numpy_helper  # noqa: E402

from nanoscout.analysis.classifier import FieldClassifier  # noqa: E402
from nanoscout.analysis.modelcard import ModelCard, sha256_file  # noqa: E402
from nanoscout.analysis.preprocess import fixed_input  # noqa: E402
from nanoscout.engines import Engine, create_engine  # noqa: E402
from nanoscout.wire.errors import EngineFailure, ModelCardError  # noqa: E402

S = 32
CLASSES = ("dark", "bright", "other")
W = np.array([[-4.0, 4.0, 0.0]], np.float32)  # logits = mean * W + B
B = np.array([2.0, -2.0, 0.0], np.float32)
REFERENCE_ERROR = 0.25


def _save(graph: GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _card(path: Path, **fields: object) -> Path:
    base = {
        "name": path.stem, "version": "0.1.0", "framework": "onnx.helper", "opset": 17,
        "onnx_file": path.name, "sha256": sha256_file(path),
        "input": {"name": "image", "size": [S, S]}, "normalization": {},
        "training": {"data": "none (hand-made)", "command": "tests/unit/test_classifier.py"},
        "created": "2026-11-22",
    }
    base.update(fields)
    card = path.with_suffix(".json")
    card.write_text(json.dumps(base), encoding="utf-8")
    return card


def classifier_model(tmp: Path, *, cam_shape: tuple[int, int] = (S // 4, S // 4),
                     n_classes: int = 3, class_maps: int = 0) -> tuple[Path, Path]:
    """image (1,1,S,S) -> probabilities softmax(mean*W+B) (1,3), cam = uint8(255*clip(pool4));
    with ``class_maps`` k > 0 also ``class_maps`` (1, k, h, w): the pooled image k times."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["feat"]),
        helper.make_node("MatMul", ["feat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("AveragePool", ["image"], ["pool"], kernel_shape=[S // cam_shape[0]] * 2,
                         strides=[S // cam_shape[0]] * 2),
        helper.make_node("Squeeze", ["pool", "one"], ["sq"]),
        helper.make_node("Clip", ["sq", "zero", "onef"], ["clip"]),
        helper.make_node("Mul", ["clip", "k255"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["cam"], to=TensorProto.UINT8),
    ]
    outs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, n_classes]),
            helper.make_tensor_value_info("cam", TensorProto.UINT8, [1, *cam_shape])]
    if class_maps:
        nodes.append(helper.make_node("Concat", ["pool"] * class_maps, ["class_maps"], axis=1))
        outs.append(helper.make_tensor_value_info("class_maps", TensorProto.FLOAT,
                                                  [1, class_maps, *cam_shape]))
    graph = helper.make_graph(
        nodes, "toy_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, S, S])],
        outs,
        initializer=[
            numpy_helper.from_array(W[:, :n_classes], "w"),
            numpy_helper.from_array(B[:n_classes], "b"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
            numpy_helper.from_array(np.array(1, np.float32), "onef"),
            numpy_helper.from_array(np.array(255, np.float32), "k255"),
        ],
    )
    onnx_path = _save(graph, tmp / "toy_classifier.onnx")
    outputs = [{"name": "probabilities", "channels": list(CLASSES), "activation": "probability"},
               {"name": "cam", "channels": ["top class"], "activation": "none"}]
    return onnx_path, _card(onnx_path, task="classification", classes=list(CLASSES),
                            outputs=outputs)


def lens_model(tmp: Path) -> tuple[Path, Path]:
    """image -> error = mean(image²) (1,), act_enc1 = 2x2-pooled image."""
    nodes = [
        helper.make_node("Mul", ["image", "image"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["error"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("AveragePool", ["image"], ["act_enc1"], kernel_shape=[2, 2],
                         strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "toy_lens",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, S, S])],
        [helper.make_tensor_value_info("error", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("act_enc1", TensorProto.FLOAT, [1, 1, S // 2, S // 2])],
    )
    path = _save(graph, tmp / "toy_lens.onnx")
    outputs = [{"name": "error", "channels": ["mse"], "activation": "none"},
               {"name": "act_enc1", "channels": ["pooled"], "activation": "none"}]
    novelty = {"reference_error": REFERENCE_ERROR, "n_frames": 10, "data": "hand-made"}
    return path, _card(path, task="autoencoder", outputs=outputs, novelty=novelty)


def _load(onnx_path: Path, card: Path) -> tuple[Engine, ModelCard]:
    return create_engine(onnx_path, "cpu", threads=1), ModelCard.load(card)


@pytest.fixture()
def toy(tmp_path: Path) -> FieldClassifier:
    engine, card = _load(*classifier_model(tmp_path))
    lens, lens_card = _load(*lens_model(tmp_path))
    return FieldClassifier(engine, card, lens=lens, lens_card=lens_card, top_k=2)


def _frame(rng: np.random.Generator, bright_fraction: float) -> np.ndarray:
    """A 128x128 uint16 frame, the left ``bright_fraction`` of its columns bright."""
    img = rng.normal(1000, 20, (128, 128))
    img[:, : int(128 * bright_fraction)] += 3000
    return img.clip(0, 65535).astype(np.uint16)


def test_probabilities_cam_and_novelty_match_the_models(toy: FieldClassifier) -> None:
    rng = np.random.default_rng(1)
    frame = _frame(rng, 0.75)
    c = toy.classify(frame)
    x = fixed_input(frame, (S, S))
    logits = float(x.mean()) * W[0] + B
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    assert c.labels == [CLASSES[i] for i in order[:2]] and c.labels[0] == "bright"
    np.testing.assert_allclose(c.probabilities, p[order[:2]], atol=1e-5)
    assert sum(c.all.values()) == pytest.approx(1.0, abs=1e-5)
    # the CAM covers the whole frame: its bright part is the left three quarters of the columns
    assert c.cam is not None and c.cam.dtype == np.uint8 and c.cam.shape == (S // 4, S // 4)
    assert c.cam[:, :5].min() > 200 and c.cam[:, 7].max() < 30
    assert c.error is not None
    assert c.error == pytest.approx(float((x**2).mean()), rel=1e-5)
    assert c.novelty == pytest.approx(c.error / REFERENCE_ERROR)
    assert set(c.timings_ms) == {"classify", "lens"}
    acts = toy.lens_outputs(frame)
    assert acts["act_enc1"].shape == (1, 1, S // 2, S // 2)


def test_the_cam_of_another_class_needs_the_class_maps(tmp_path: Path) -> None:
    """Without a ``class_maps`` output only the top class has a CAM (another class's is None,
    never the top class's); with it every class's is made from its map as the graph makes
    ``cam``; a ``class_maps`` of the wrong shape is an engine failure naming it."""
    from nanoscout.analysis.classifier import cam_of_map

    frame = _frame(np.random.default_rng(1), 0.75)
    engine, card = _load(*classifier_model(tmp_path))
    c = FieldClassifier(engine, card).classify(frame)
    assert c.labels[0] == "bright" and c.class_maps is None
    assert c.cam_of("bright") is c.cam and c.cam_of("dark") is None
    engine, card = _load(*classifier_model(tmp_path, class_maps=3))
    c = FieldClassifier(engine, card).classify(frame)
    assert c.class_maps is not None and c.class_maps.shape == (3, S // 4, S // 4)
    dark = c.cam_of("dark")
    assert dark is not None and np.array_equal(dark, cam_of_map(c.class_maps[0]))
    assert dark.dtype == np.uint8 and dark.max() == 255  # scaled to its maximum
    assert c.cam_of("bright") is c.cam and c.cam_of("nobody") is None
    assert np.array_equal(cam_of_map(np.full((2, 2), -1.0)), np.zeros((2, 2), np.uint8))
    engine, card = _load(*classifier_model(tmp_path, class_maps=2))
    with pytest.raises(EngineFailure, match=r"'class_maps' has shape \(1, 2, 8, 8\), "
                                            r"expected \(1, 3, 8, 8\)"):
        FieldClassifier(engine, card).classify(frame)


def test_dark_frame_is_dark_and_without_lens_novelty_is_none(tmp_path: Path) -> None:
    engine, card = _load(*classifier_model(tmp_path))
    clf = FieldClassifier(engine, card, top_k=5, cam=False)
    c = clf.classify(_frame(np.random.default_rng(2), 0.05))
    assert c.labels[0] == "dark" and len(c.labels) == 3  # top_k capped at the class count
    assert c.cam is None and c.novelty is None and "lens" not in c.timings_ms
    with pytest.raises(ModelCardError, match="no lens"):
        clf.lens_outputs(np.zeros((8, 8)))


def test_wrong_cards_and_models_are_refused_at_load(tmp_path: Path) -> None:
    engine, card = _load(*classifier_model(tmp_path))
    lens, lens_card = _load(*lens_model(tmp_path))
    with pytest.raises(ModelCardError, match="not 'classification'"):
        FieldClassifier(lens, lens_card)
    with pytest.raises(ModelCardError, match="not 'autoencoder'"):
        FieldClassifier(engine, card, lens=engine, lens_card=card)
    with pytest.raises(ModelCardError, match="both its engine and its model card"):
        FieldClassifier(engine, card, lens=lens)
    # a lens card whose error output the model lacks
    raw = json.loads(lens_card.model_dump_json())
    raw["novelty"]["error_output"] = "mse"
    with pytest.raises(ModelCardError, match="no output 'mse'"):
        FieldClassifier(engine, card, lens=lens, lens_card=ModelCard.model_validate(raw))


def test_a_model_with_the_wrong_class_count_fails_per_frame(tmp_path: Path) -> None:
    onnx_path, card_path = classifier_model(tmp_path, n_classes=2)
    engine, card = _load(onnx_path, card_path)  # card says 3 classes, model gives 2
    clf = FieldClassifier(engine, card)
    with pytest.raises(EngineFailure, match="has 2 values"):  # a frame with contrast: a flat
        clf.classify(_frame(np.random.default_rng(3), 0.5))  # one is not run (BlankFrame)


def test_bad_frames_raise_frame_errors(toy: FieldClassifier) -> None:
    from nanoscout.wire.errors import FrameError

    with pytest.raises(FrameError):
        toy.classify(np.zeros((4, 4, 3)))
    bad = np.ones((64, 64), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(FrameError):
        toy.classify(bad)
