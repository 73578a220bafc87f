"""The detectors' 2x nearest-neighbour up-sampling rewritten as copies, for the INT8 sibling.

The U-Net's decoder up-samples with ``Resize`` (nearest, scales 1, 1, 2, 2). In an INT8 model
ONNX Runtime runs the network channels-last (its NHWC transformer) and its ``Resize`` kernel
is slow in that layout: the three up-samplings took ~10 ms of a ~50 ms INT8 engine call at
1024² on the 2-core CPU of 2026-12, about ten times an NCHW up-sampling of the same bytes.

:func:`rewrite` replaces each such ``Resize`` with the same arithmetic as copies::

    x (N, C, H, W) -> Transpose (N, H, W, C) -> Unsqueeze -> Concat (x2 along W)
      -> Unsqueeze -> Concat (x2 along H) -> Reshape (N, 2H, 2W, C) -> Transpose (N, C, 2H, 2W)

The transposes cancel against the ones ONNX Runtime puts around its channels-last
convolutions, and the concatenations become ``QLinearConcat`` byte copies. The output is
identical to the ``Resize`` (FP32: bit for bit; INT8: the inserted tensors take their input's
range, so no rounding changes).

:func:`strip_output_upsample` removes the last step, the 2x *bilinear* up-sampling of the
logits, from the quantized graph: the model then outputs its stride-2 logits (same name), and
the detector computes what it needs at full resolution on the host
(:mod:`nanoscout.analysis.half_logits`: the threshold and the block-centre samples, ~1 ms
where ONNX Runtime's ``Resize`` of both 1024² maps took ~2.9 ms). The quantized arithmetic is
unchanged: the ``Resize`` was float, after the last dequantization.

Only :mod:`nanoscout.training.quantize` uses this module; the shipped FP32 files (which
TensorRT and Triton build from) keep both kinds of ``Resize``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rewrite", "strip_output_upsample"]


def _resize_2x_attrs(node: Any, constants: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """The attributes of ``node`` if it is a Resize with constant scales 1, 1, 2, 2 (NCHW: 2x
    along H and W), else None."""
    from onnx import helper

    if node.op_type != "Resize" or len(node.input) < 3:
        return None
    scales = constants.get(node.input[2])
    if scales is None or [float(s) for s in scales] != [1.0, 1.0, 2.0, 2.0]:
        return None
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_nearest_2x(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """Whether ``node`` is a Resize that repeats every pixel twice along H and W (NCHW)."""
    attrs = _resize_2x_attrs(node, constants)
    if attrs is None or attrs.get("mode", b"nearest") != b"nearest":
        return False
    # with integer scales, asymmetric coordinates and floor rounding, output pixel i reads
    # input pixel i // 2: a plain repetition (other modes shift by half a pixel)
    if attrs.get("coordinate_transformation_mode", b"half_pixel") != b"asymmetric":
        return False
    return attrs.get("nearest_mode", b"round_prefer_floor") == b"floor"


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """The values of ``graph``'s ``Constant`` nodes and initializers, by name."""
    from onnx import numpy_helper

    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                 for n in graph.node if n.op_type == "Constant" and n.attribute}
    constants.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    return constants


def _is_bilinear_2x(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """Whether ``node`` is a Resize that up-samples H and W 2x bilinearly, pixel centres
    aligned and edges clamped (what :mod:`nanoscout.analysis.half_logits` computes)."""
    attrs = _resize_2x_attrs(node, constants)
    return (attrs is not None and attrs.get("mode") == b"linear"
            and attrs.get("exclude_outside", 0) == 0 and attrs.get("antialias", 0) == 0
            and attrs.get("coordinate_transformation_mode", b"half_pixel") == b"half_pixel")


def _keep_used(graph: Any, nodes: list[Any]) -> None:
    """Make ``nodes`` the graph's nodes, less the ``Constant`` nodes and the initializers that
    nothing reads any more."""
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Constant"
                      or any(o in used for o in n.output))
    for i in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(i)


def strip_output_upsample(model: Any) -> int:
    """Remove, in place, the 2x bilinear ``Resize`` that computes a graph output of the ONNX
    ``model``; its input becomes that output, under the output's name (shape: half the
    height and width). Returns how many were removed (0 when the model has none)."""
    from onnx import TensorProto, helper

    graph = model.graph
    constants = _constants(graph)
    outputs = {o.name: o for o in graph.output}
    done = 0
    for node in list(graph.node):
        if not (node.output[0] in outputs and _is_bilinear_2x(node, constants)):
            continue
        name, src = node.output[0], node.input[0]
        if any(src in n.input for n in graph.node if n is not node) or src in outputs:
            continue  # the half-resolution map is read elsewhere too: leave the graph alone
        for n in graph.node:
            n.output[:] = [name if o == src else o for o in n.output]
        graph.node.remove(node)
        old = outputs[name]
        dims = old.type.tensor_type.shape.dim
        shape = [d.dim_value or d.dim_param or None for d in dims][:2] + [None, None] \
            if len(dims) == 4 else None
        graph.output.remove(old)
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        done += 1
    if done:
        _keep_used(graph, list(graph.node))
    return done


def rewrite(model: Any) -> int:
    """Rewrite, in place, every 2x nearest ``Resize`` of the ONNX ``model`` (a ``ModelProto``)
    as transposes, concatenations and a reshape; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = _constants(graph)
    nodes, done = [], 0
    for node in graph.node:
        if not _is_nearest_2x(node, constants):
            nodes.append(node)
            continue
        x, out, p = node.input[0], node.output[0], node.name or f"upsample{done}"
        nodes += [
            helper.make_node("Transpose", [x], [p + "/nhwc"], perm=[0, 2, 3, 1],
                             name=p + "/to_nhwc"),
            helper.make_node("Shape", [p + "/nhwc"], [p + "/shape"], name=p + "/shape"),
            helper.make_node("Mul", [p + "/shape", p + "/x2"], [p + "/shape2"],
                             name=p + "/shape2"),
            helper.make_node("Unsqueeze", [p + "/nhwc", p + "/axis3"], [p + "/w1"],
                             name=p + "/unsqueeze_w"),
            helper.make_node("Concat", [p + "/w1", p + "/w1"], [p + "/w2"], axis=3,
                             name=p + "/repeat_w"),  # N, H, W, 2, C
            helper.make_node("Unsqueeze", [p + "/w2", p + "/axis2"], [p + "/h1"],
                             name=p + "/unsqueeze_h"),
            helper.make_node("Concat", [p + "/h1", p + "/h1"], [p + "/h2"], axis=2,
                             name=p + "/repeat_h"),  # N, H, 2, W, 2, C
            helper.make_node("Reshape", [p + "/h2", p + "/shape2"], [p + "/up"],
                             name=p + "/merge"),  # N, 2H, 2W, C
            helper.make_node("Transpose", [p + "/up"], [out], perm=[0, 3, 1, 2],
                             name=p + "/to_nchw"),
        ]
        graph.initializer.extend([
            numpy_helper.from_array(np.array([1, 2, 2, 1], np.int64), p + "/x2"),
            numpy_helper.from_array(np.array([3], np.int64), p + "/axis3"),
            numpy_helper.from_array(np.array([2], np.int64), p + "/axis2"),
        ])
        done += 1
    _keep_used(graph, nodes)
    return done
