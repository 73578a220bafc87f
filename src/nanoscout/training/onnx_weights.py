"""Rebuild a trainable :class:`~nanoscout.training.unet.ParticleUNet` from a shipped ONNX file.

The torch checkpoint of a shipped detector need not ship; its ONNX file holds every weight.
The exporter folded each BatchNorm into the convolution before it (the graph has Conv, Relu,
Add and Resize only), so the ONNX convolutions are taken, in graph order, for the network's
convolutions in execution order; a folded bias goes to the BatchNorm's shift, whose scale is
set to 1, running mean to 0 and running variance to ``1 - eps`` (an exact identity in eval
mode). Fine-tuning keeps the BatchNorms in eval mode, so the network stays exactly the folded
one and the re-exported ONNX folds back the same way.

Used instead of ``onnx2torch`` (a new dependency, whose generic modules would not be the
ParticleUNet the training code fine-tunes and exports): the graph is this project's own, so a
name-free, order-and-shape check is simple and exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from nanoscout.training.unet import ParticleUNet
from nanoscout.wire.errors import ModelCardError

__all__ = ["conv_order", "unet_from_onnx"]


def conv_order(model: nn.Module, side: int = 64) -> list[nn.Conv2d]:
    """Return the model's Conv2d modules in the order a forward pass runs them."""
    seen: list[nn.Conv2d] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: seen.append(mod))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, side, side))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


def unet_from_onnx(path: Path) -> ParticleUNet:
    """Return a ParticleUNet (eval mode) whose output equals the ONNX model at ``path``.

    Raises ModelCardError when the graph is not a ParticleUNet export (conv count or shapes
    differ, naming the first mismatch).
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # onnx raises DecodeError / OSError
        raise ModelCardError(f"cannot load ONNX model {path}: {exc}") from exc
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs or convs[0].input[1] not in init:
        raise ModelCardError(f"{path}: no convolution weights found")
    width = int(init[convs[0].input[1]].shape[0])
    model = ParticleUNet(width)
    order = conv_order(model)
    if len(order) != len(convs):
        raise ModelCardError(f"{path}: {len(convs)} convolutions, a ParticleUNet of width "
                             f"{width} has {len(order)}")
    bn_after = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential) and len(m) >= 2 and isinstance(m[0], nn.Conv2d) \
                and isinstance(m[1], nn.BatchNorm2d):
            bn_after[id(m[0])] = m[1]
    with torch.no_grad():
        for k, (node, conv) in enumerate(zip(convs, order, strict=True)):
            w = init.get(node.input[1])
            if w is None or tuple(w.shape) != tuple(conv.weight.shape):
                got = None if w is None else tuple(w.shape)
                raise ModelCardError(f"{path}: convolution {k} ({node.name}) has weight shape "
                                     f"{got}, the network expects {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(np.array(w, np.float32)))
            bias = init.get(node.input[2]) if len(node.input) > 2 else None
            bn = bn_after.get(id(conv))
            if bn is not None:
                assert bn.running_mean is not None and bn.running_var is not None
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(np.array(bias, np.float32)) if bias is not None
                              else torch.zeros_like(bn.bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif conv.bias is not None:
                if bias is None:
                    raise ModelCardError(f"{path}: convolution {k} ({node.name}) lacks a bias")
                conv.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
            elif bias is not None:
                raise ModelCardError(f"{path}: convolution {k} ({node.name}) has a bias the "
                                     "network has no place for")
    return model.eval()
