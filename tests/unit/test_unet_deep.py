"""The deeper detector network and the network factory (nanoscout.training.unet_deep)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from nanoscout.training.unet import ParticleUNet  # noqa: E402
from nanoscout.training.unet_deep import ParticleUNetDeep, build_network  # noqa: E402


def test_deep_network_keeps_the_detector_interface() -> None:
    net = build_network("deep", 8).eval()
    assert isinstance(net, ParticleUNetDeep)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 64, 96))
    assert out.shape == (1, 2, 64, 96)
    assert isinstance(build_network("unet", 8), ParticleUNet)
    n_deep = sum(p.numel() for p in build_network("deep", 16).parameters())
    n_unet = sum(p.numel() for p in build_network("unet", 16).parameters())
    assert 2.0 < n_deep / n_unet < 3.0
    with pytest.raises(ValueError, match="unknown network arch"):
        build_network("resnet", 16)
