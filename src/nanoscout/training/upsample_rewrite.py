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
range, so no rounding changes). Only :mod:`nanoscout.training.quantize` uses it; the shipped
FP32 files (which TensorRT and Triton build from) keep their ``Resize``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rewrite"]


def _is_nearest_2x(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """Whether ``node`` is a Resize that repeats every pixel twice along H and W (NCHW)."""
    from onnx import helper

    if node.op_type != "Resize" or len(node.input) < 3:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("mode", b"nearest") != b"nearest":
        return False
    # with integer scales, asymmetric coordinates and floor rounding, output pixel i reads
    # input pixel i // 2: a plain repetition (other modes shift by half a pixel)
    if attrs.get("coordinate_transformation_mode", b"half_pixel") != b"asymmetric":
        return False
    if attrs.get("nearest_mode", b"round_prefer_floor") != b"floor":
        return False
    scales = constants.get(node.input[2])
    return scales is not None and [float(s) for s in scales] == [1.0, 1.0, 2.0, 2.0]


def rewrite(model: Any) -> int:
    """Rewrite, in place, every 2x nearest ``Resize`` of the ONNX ``model`` (a ``ModelProto``)
    as transposes, concatenations and a reshape; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                 for n in graph.node if n.op_type == "Constant" and n.attribute}
    constants.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
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
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    return done
