"""A small CNN that classifies a whole field of view, and its ONNX export with a CAM output.

Training/export only (imports torch). Input ``image``: (N, 1, S, S) float32, the frame made by
``service.preprocess.fixed_input`` (whole frame resampled to S x S, percentile-normalised).

:class:`FieldClassifier`: four stride-2 stages (1/2 .. 1/16 of S), eight 3x3 conv + BatchNorm +
ReLU, the last stage dilated for context, then global average pooling and one linear layer. The
feature maps before the pooling give the class activation map (CAM, Zhou et al. 2016): for
class k, ``sum_c w[k, c] * f[c, y, x]``.

:class:`ExportWrapper` is what goes into the ONNX file. Outputs:

* ``probabilities``: (1, C) float32 softmax over the classes;
* ``cam``: (1, h, w) uint8 (h, w = S / 16): the CAM of the top class (its weights gathered by
  the argmax inside the graph), ReLU, divided by its maximum, x 255, rounded. All zero when the
  map has no positive value.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.unet import _cbr  # the detector's conv + BatchNorm + ReLU block

__all__ = ["CAM_STRIDE", "OPSET", "ExportWrapper", "FieldClassifier", "export_onnx"]

#: the CAM's cell size in model-input pixels (S / CAM_STRIDE cells per side)
CAM_STRIDE = 16
OPSET = 17
INPUT_NAME = "image"
OUTPUTS = ("probabilities", "cam")


class FieldClassifier(nn.Module):
    """Stride-16 CNN encoder, global average pooling, linear head (``n_classes`` logits)."""

    def __init__(self, n_classes: int, width: int = 16) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, int(1.5 * width), 3 * width, 6 * width
        self.width = width
        self.n_classes = n_classes
        self.features = nn.Sequential(
            _cbr(1, c1, stride=2),  # 1/2
            _cbr(c1, c2, stride=2), _cbr(c2, c2),  # 1/4
            _cbr(c2, c3, stride=2), _cbr(c3, c3),  # 1/8
            _cbr(c3, c4, stride=2), _cbr(c4, c4, dilation=2), _cbr(c4, c4),  # 1/16
        )
        self.head = nn.Linear(c4, n_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Return (N, n_classes) logits."""
        f = self.features(image)
        return self.head(f.mean(dim=(2, 3)))


class ExportWrapper(nn.Module):
    """``image`` -> (``probabilities`` (1, C) float32, ``cam`` (1, h, w) uint8 of the top class)."""

    def __init__(self, net: FieldClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(image)
        logits = self.net.head(f.mean(dim=(2, 3)))
        prob = torch.softmax(logits, dim=1)
        top = torch.argmax(logits, dim=1)  # (N,)
        w = torch.index_select(self.net.head.weight, 0, top)  # (N, C_feat)
        cam = torch.relu((w[:, :, None, None] * f).sum(dim=1))  # (N, h, w)
        peak = torch.clamp(cam.amax(dim=(1, 2), keepdim=True), min=1e-12)
        cam8 = torch.clamp(torch.floor(cam / peak * 255.0 + 0.5), 0.0, 255.0).to(torch.uint8)
        return prob, cam8


def export_onnx(net: FieldClassifier, path: Path, size: int) -> dict[str, float]:
    """Write the export wrapper of ``net`` as ONNX for a fixed (1, 1, size, size) input.

    Returns {"max_abs_diff": probabilities ORT vs torch, "cam_max_abs_diff": uint8 levels};
    raises RuntimeError when the probabilities differ by more than 1e-4 or the top class differs.
    """
    import onnxruntime as ort

    wrapper = ExportWrapper(net.eval()).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 1, size, size)
    with warnings.catch_warnings():
        # the TorchScript exporter (as for the detector) is deprecated but still the one that
        # writes this plain fixed-shape graph; its notice is expected
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=list(OUTPUTS), opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst, worst_cam = 0.0, 0.0
    for _ in range(3):
        x = rng.random((1, 1, size, size), dtype=np.float32)
        x = F.avg_pool2d(torch.from_numpy(x), 9, 1, 4).numpy()  # some structure, not white noise
        with torch.no_grad():
            p_ref, c_ref = (t.numpy() for t in wrapper(torch.from_numpy(x)))
        p, c = sess.run(list(OUTPUTS), {INPUT_NAME: x})
        if p.shape != p_ref.shape or c.shape != c_ref.shape or c.dtype != np.uint8:
            raise RuntimeError(f"ONNX outputs {p.shape} {c.shape} {c.dtype} != torch "
                               f"{p_ref.shape} {c_ref.shape} uint8")
        if int(np.argmax(p)) != int(np.argmax(p_ref)):
            raise RuntimeError("ONNX Runtime's top class differs from torch's")
        worst = max(worst, float(np.max(np.abs(p - p_ref))))
        worst_cam = max(worst_cam, float(np.max(np.abs(c.astype(int) - c_ref.astype(int)))))
    if worst > 1e-4:
        raise RuntimeError(f"ONNX Runtime differs from torch by {worst:.3g} (> 1e-4)")
    return {"max_abs_diff": worst, "cam_max_abs_diff": worst_cam}
