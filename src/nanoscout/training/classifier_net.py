"""A small CNN that classifies a whole field of view, and its ONNX export with a CAM output.

Training/export only (imports torch). Input ``image``: (N, 1, S, S) float32, the frame made by
``nanoscout.analysis.preprocess.fixed_input`` (whole frame resampled to S x S, percentile-normalised).

:class:`FieldClassifier`: eight conv + BatchNorm + ReLU layers; stride-2 stages down to 1/16
(default) or 1/8 of S made with centred 4x4 stride-2 convs (so that map cell (i, j) is centred
on the middle of the input block it stands for), the last stage dilated for context, and a
linear head applied at every cell of the last feature maps, which gives each class a map
``m_k(y, x) = sum_c w[k, c] * f[c, y, x]`` (the class activation map, CAM, Zhou et al. 2016).
The class score pools that map:

* ``pooling="lse"`` (default): log-mean-exp, ``b_k + log(mean_yx exp(m_k(y, x)))``. Between the
  mean and the maximum: a class that shows everywhere (a film, blur, a blank frame) still scores
  by its mean, while one rod in a field of spheres can carry its class by the few cells that
  see it, so the score and the CAM's peak come from the same place (Pinheiro & Collobert 2015).
* ``pooling="mean"``: global average pooling (the CAM paper's form, used up to version 2).

:class:`ExportWrapper` is what goes into the ONNX file. Outputs:

* ``probabilities``: (1, C) float32 softmax over the classes;
* ``cam``: (1, h, w) uint8 (h, w = S / cam_stride): the CAM of the top class (its weights
  gathered by the argmax inside the graph), ReLU, divided by its maximum, x 255, rounded. All zero when the
  map has no positive value.
* ``class_maps`` (with ``class_maps=True``, the field-of-view classifier since card 3.1.1):
  (1, C, h, w) float32, every class's map ``m_k`` before the ReLU, from which the host makes
  the CAM of any class as ``cam`` is made (:func:`nanoscout.analysis.classifier.cam_of_map`):
  an alert on a class that is not the top one is explained by its own map.

:func:`expose_class_maps` gives a file exported before ``class_maps`` existed that output: its
graph computes the maps already (the log-mean-exp pooling reads them), so only the output is
added; the shipped classifier 3.1.1 is 3.1.0 so changed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nanoscout.engines import create_engine
from nanoscout.training.unet import _cbr  # the detector's conv + BatchNorm + ReLU block

__all__ = ["CAM_STRIDE", "CLASS_MAPS", "OPSET", "ExportWrapper", "FieldClassifier",
           "expose_class_maps", "export_onnx"]

#: the CAM's default cell size in model-input pixels (S / cam_stride cells per side)
CAM_STRIDE = 16
OPSET = 17
INPUT_NAME = "image"
OUTPUTS = ("probabilities", "cam")
#: the optional third output: every class's map, (1, C, h, w) float32
CLASS_MAPS = "class_maps"
#: the head's weights (C, C_feat) in an exported graph
HEAD_WEIGHT = "net.head.weight"


Pooling = Literal["lse", "mean"]


def _down(cin: int, cout: int) -> nn.Sequential:
    """Halve the resolution with a 4x4 stride-2 conv (padding 1) + BN + ReLU: output cell i is
    centred on input coordinate 2 i + 0.5, the centre of the two pixels it replaces (a 3x3
    stride-2 conv centres it on 2 i, half a pixel off, which adds up to half a CAM cell after
    four stages)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FieldClassifier(nn.Module):
    """CNN encoder down to 1/``cam_stride``, per-cell linear head, class maps pooled to
    ``n_classes`` logits.

    ``cam_stride`` 8: three centred stride-2 stages, then a stage at 1/8 with dilations 2, 4, 2
    for context; 16: four stride-2 stages, the last dilated once.
    """

    def __init__(self, n_classes: int, width: int = 16, pooling: Pooling = "lse",
                 cam_stride: int = CAM_STRIDE) -> None:
        super().__init__()
        if pooling not in ("lse", "mean"):
            raise ValueError(f"pooling {pooling!r} is not 'lse' or 'mean'")
        if cam_stride not in (8, 16):
            raise ValueError(f"cam_stride {cam_stride} is not 8 or 16")
        c1, c2, c3, c4 = width, int(1.5 * width), 3 * width, 6 * width
        self.width = width
        self.n_classes = n_classes
        self.pooling: Pooling = pooling
        self.cam_stride = cam_stride
        last = [_cbr(c3, c4, dilation=2), _cbr(c4, c4, dilation=4), _cbr(c4, c4, dilation=2)] \
            if cam_stride == 8 else [_down(c3, c4), _cbr(c4, c4, dilation=2), _cbr(c4, c4)]
        self.features = nn.Sequential(
            _down(1, c1),  # 1/2
            _down(c1, c2), _cbr(c2, c2),  # 1/4
            _down(c2, c3), _cbr(c3, c3),  # 1/8
            *last,  # 1/8 or 1/16
        )
        self.head = nn.Linear(c4, n_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Return (N, n_classes) logits."""
        return self.logits(self.features(image))

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """Return (N, n_classes) logits of the last feature maps ``f`` (N, C_feat, h, w)."""
        if self.pooling == "mean":
            return self.head(f.mean(dim=(2, 3)))
        maps = torch.einsum("kc,nchw->nkhw", self.head.weight, f).flatten(2)  # (N, K, h*w)
        lme = torch.logsumexp(maps, dim=2) - math.log(maps.shape[2])
        return lme + self.head.bias


class ExportWrapper(nn.Module):
    """``image`` -> (``probabilities`` (1, C) float32, ``cam`` (1, h, w) uint8 of the top class
    [, ``class_maps`` (1, C, h, w) float32 with ``class_maps``])."""

    def __init__(self, net: FieldClassifier, class_maps: bool = False) -> None:
        super().__init__()
        self.net = net
        self.class_maps = class_maps

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (probabilities (N, C) float32, class activation map (N, h, w) uint8 [, every
        class's map before the ReLU (N, C, h, w) float32])."""
        f = self.net.features(image)
        logits = self.net.logits(f)
        prob = torch.softmax(logits, dim=1)
        top = torch.argmax(logits, dim=1)  # (N,)
        w = torch.index_select(self.net.head.weight, 0, top)  # (N, C_feat)
        cam = torch.relu((w[:, :, None, None] * f).sum(dim=1))  # (N, h, w)
        peak = torch.clamp(cam.amax(dim=(1, 2), keepdim=True), min=1e-12)
        cam8 = torch.clamp(torch.floor(cam / peak * 255.0 + 0.5), 0.0, 255.0).to(torch.uint8)
        if self.class_maps:
            return prob, cam8, torch.einsum("kc,nchw->nkhw", self.net.head.weight, f)
        return prob, cam8


def export_onnx(net: FieldClassifier, path: Path, size: int, *, class_maps: bool = False
                ) -> dict[str, float]:
    """Write the export wrapper of ``net`` as ONNX for a fixed (1, 1, size, size) input, with
    the ``class_maps`` output when ``class_maps``.

    Returns {"max_abs_diff": probabilities ORT vs torch, "cam_max_abs_diff": uint8 levels
    [, "class_maps_max_abs_diff"]}; raises RuntimeError when the probabilities differ by more
    than 1e-4, the class maps by more than 1e-3, or the top class differs.
    """

    wrapper = ExportWrapper(net.eval(), class_maps).eval()
    names = [*OUTPUTS, CLASS_MAPS] if class_maps else list(OUTPUTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, size, size)
    with warnings.catch_warnings():
        # the TorchScript exporter (as for the detector) is deprecated but still the one that
        # writes this plain fixed-shape graph; its notice is expected
        warnings.simplefilter("ignore", DeprecationWarning)
        # the fixed input size makes the log-mean-exp's cell count a constant, as it should be
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=names, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    engine = create_engine(path, "onnxruntime-cpu", threads=2)
    rng = np.random.default_rng(0)
    worst, worst_cam, worst_maps = 0.0, 0.0, 0.0
    for _ in range(3):
        x = rng.random((1, 1, size, size), dtype=np.float32)
        x = F.avg_pool2d(torch.from_numpy(x), 9, 1, 4).numpy()  # some structure, not white noise
        with torch.no_grad():
            p_ref, c_ref, *m_ref = (t.numpy() for t in wrapper(torch.from_numpy(x)))
        out = engine.infer({INPUT_NAME: x})
        if class_maps:
            m = out[CLASS_MAPS]
            if m.shape != m_ref[0].shape:
                raise RuntimeError(f"ONNX {CLASS_MAPS} {m.shape} != torch {m_ref[0].shape}")
            worst_maps = max(worst_maps, float(np.max(np.abs(m - m_ref[0]))))
        p, c = out[OUTPUTS[0]], out[OUTPUTS[1]]
        if p.shape != p_ref.shape or c.shape != c_ref.shape or c.dtype != np.uint8:
            raise RuntimeError(f"ONNX outputs {p.shape} {c.shape} {c.dtype} != torch "
                               f"{p_ref.shape} {c_ref.shape} uint8")
        if int(np.argmax(p)) != int(np.argmax(p_ref)):
            raise RuntimeError("ONNX Runtime's top class differs from torch's")
        worst = max(worst, float(np.max(np.abs(p - p_ref))))
        worst_cam = max(worst_cam, float(np.max(np.abs(c.astype(int) - c_ref.astype(int)))))
    if worst > 1e-4:
        raise RuntimeError(f"ONNX Runtime differs from torch by {worst:.3g} (> 1e-4)")
    if worst_maps > 1e-3:
        raise RuntimeError(f"ONNX Runtime's {CLASS_MAPS} differ from torch's by "
                           f"{worst_maps:.3g} (> 1e-3)")
    check = {"max_abs_diff": worst, "cam_max_abs_diff": worst_cam}
    if class_maps:
        check["class_maps_max_abs_diff"] = worst_maps
    return check


def expose_class_maps(src: Path, dst: Path) -> None:
    """Write the classifier ONNX file ``src``, exported without ``class_maps``, to ``dst`` with
    that output: the head's Einsum over the last feature maps (the maps the log-mean-exp
    pooling reads) renamed ``class_maps`` and listed as a graph output, (1, C, h, w) float32
    (h, w those of ``cam``). Every node, weight and other output is left as it was, so
    ``probabilities`` and ``cam`` are bit-identical. Works on an INT8 sibling too (its head
    stays float). Raises ValueError naming the file when its graph has not exactly one Einsum
    of ``net.head.weight`` (a ``pooling="mean"`` export: export it again with
    ``class_maps=True``) or already has the output."""
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    if any(o.name == CLASS_MAPS for o in g.output):
        raise ValueError(f"{src} has a {CLASS_MAPS!r} output already")
    heads = [n for n in g.node if n.op_type == "Einsum" and HEAD_WEIGHT in n.input]
    weights = [t for t in g.initializer if t.name == HEAD_WEIGHT]
    cams = [o for o in g.output if o.name == OUTPUTS[1]]
    if len(heads) != 1 or len(weights) != 1 or len(cams) != 1:
        raise ValueError(f"{src}: {len(heads)} Einsum node(s) of {HEAD_WEIGHT!r}, "
                         f"{len(weights)} such weight(s), {len(cams)} {OUTPUTS[1]!r} output(s); "
                         "expected one of each")
    old = heads[0].output[0]
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = CLASS_MAPS
    heads[0].output[0] = CLASS_MAPS
    _, h, w = (d.dim_value for d in cams[0].type.tensor_type.shape.dim)
    g.output.append(onnx.helper.make_tensor_value_info(
        CLASS_MAPS, onnx.TensorProto.FLOAT, [1, int(weights[0].dims[0]), h, w]))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
