"""A deeper variant of :class:`nanoscout.training.unet.ParticleUNet` and the one factory that builds either.

Same input, outputs, stride and up-path as ``ParticleUNet`` (so the ONNX graph, the model card
and the run-time detector are unchanged); the coarse levels get more channels and more blocks:

* level 1/2 (stem) and 1/4: as ``ParticleUNet`` (most of the pixels, most of the time), one
  extra block at 1/4;
* level 1/8: 4 x width channels, two extra blocks;
* level 1/16: 8 x width channels (``ParticleUNet``: 6 x), dilations 2, 4, then 1, 2 again:
  a receptive field of several hundred px at working scale, so a particle can be told from a
  support grain or a lump of support of similar brightness by what lies around it.

At width 16 it has 0.88 M parameters (``ParticleUNet``: 0.35 M) and takes about 1.6 x the
engine time at 1024 x 1024 on 2 CPU threads (measured with ONNX Runtime; the budget is 2 x).
"""

from __future__ import annotations

from torch import nn

from nanoscout.training.unet import OUTPUT_CHANNELS, ParticleUNet, _cbr, _Up

__all__ = ["ARCHS", "ParticleUNetDeep", "build_network"]

#: network names accepted by :func:`build_network` (the model checkpoint stores one)
ARCHS = ("unet", "deep")


class ParticleUNetDeep(ParticleUNet):
    """Stride-2 stem, 4 encoder levels with more blocks and channels at 1/8 and 1/16; the same
    module names and :meth:`ParticleUNet.forward` (logits (N, 2, H, W) for images (N, 1, H, W),
    H and W multiples of 32)."""

    def __init__(self, width: int = 16) -> None:
        nn.Module.__init__(self)  # its own levels, not ParticleUNet's
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        self.width = width
        self.stem = nn.Sequential(_cbr(1, c1, stride=2), _cbr(c1, c1))  # 1/2
        self.enc2 = nn.Sequential(_cbr(c1, c2, stride=2), _cbr(c2, c2), _cbr(c2, c2))  # 1/4
        self.enc3 = nn.Sequential(_cbr(c2, c3, stride=2), _cbr(c3, c3), _cbr(c3, c3),
                                  _cbr(c3, c3))  # 1/8
        self.enc4 = nn.Sequential(_cbr(c3, c4, stride=2), _cbr(c4, c4, dilation=2),
                                  _cbr(c4, c4, dilation=4), _cbr(c4, c4),
                                  _cbr(c4, c4, dilation=2))  # 1/16
        self.up3 = _Up(c4, c3, c3)
        self.up2 = _Up(c3, c2, c2)
        self.up1 = _Up(c2, c1, c1)
        self.head = nn.Conv2d(c1, len(OUTPUT_CHANNELS), 1)


def build_network(arch: str, width: int) -> nn.Module:
    """Return a new detector network: ``arch`` "unet" (:class:`ParticleUNet`, detector 3.0) or
    "deep" (:class:`ParticleUNetDeep`); raises ValueError naming an unknown ``arch``."""
    if arch == "unet":
        return ParticleUNet(width)
    if arch == "deep":
        return ParticleUNetDeep(width)
    raise ValueError(f"unknown network arch {arch!r} (known: {', '.join(ARCHS)})")
