"""A compact U-Net for particle detection and separation (training/export only: imports torch).

Input ``image``: (N, 1, H, W) float32, the frame normalised per frame to ~[0, 1] (see
``nanoscout.analysis.preprocess.normalize``), H and W multiples of :data:`STRIDE`.
Output ``logits``: (N, 2, H, W) float32 logits at the input resolution:

* channel 0 ``foreground``: the pixel belongs to a particle;
* channel 1 ``core``: the pixel lies in the particle's core (distance to the particle's own
  outline >= ``CORE_FRACTION`` of its largest inner distance). Cores of touching particles are
  disjoint, so they seed the split of touching particles in post-processing.

The network works at half resolution inside (a stride-2 stem) and upsamples its two output
logits bilinearly, which keeps a 1024x1024 frame well inside the CPU budget while the loss,
computed at full resolution, teaches it sub-pixel outlines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: input height and width must be multiples of this
STRIDE = 16
#: a pixel is "core" when its inner distance is at least this fraction of the particle's maximum
CORE_FRACTION = 0.5
OUTPUT_CHANNELS = ("foreground", "core")


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    """Upsample the coarse path x2 and add a 1x1 projection to the skip (cheaper than concat)."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cskip, 1, bias=False)
        self.conv = _cbr(cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.proj(x), scale_factor=2.0, mode="nearest")
        return self.conv(x + skip)


class ParticleUNet(nn.Module):
    """Stride-2 stem, 4 encoder levels (1/2 .. 1/16), additive skips, 2 logits at full res."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 6 * width
        self.width = width
        self.stem = nn.Sequential(_cbr(1, c1, stride=2), _cbr(c1, c1))  # 1/2
        self.enc2 = nn.Sequential(_cbr(c1, c2, stride=2), _cbr(c2, c2))  # 1/4
        self.enc3 = nn.Sequential(_cbr(c2, c3, stride=2), _cbr(c3, c3))  # 1/8
        self.enc4 = nn.Sequential(_cbr(c3, c4, stride=2), _cbr(c4, c4, dilation=2),
                                  _cbr(c4, c4, dilation=4))  # 1/16, wide context for big particles
        self.up3 = _Up(c4, c3, c3)
        self.up2 = _Up(c3, c2, c2)
        self.up1 = _Up(c2, c1, c1)
        self.head = nn.Conv2d(c1, len(OUTPUT_CHANNELS), 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Return the 2 logit maps (N, 2, H, W) at the input's resolution."""
        s1 = self.stem(image)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        x = self.enc4(s3)
        x = self.up3(x, s3)
        x = self.up2(x, s2)
        x = self.up1(x, s1)
        return F.interpolate(self.head(x), scale_factor=2.0, mode="bilinear", align_corners=False)
