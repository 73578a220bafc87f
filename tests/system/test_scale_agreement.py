"""Whether the working-scale estimate was agreed by its passes, through a real daemon."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from tests.system.conftest import DaemonFactory, send_and_collect

pytestmark = pytest.mark.system


def test_each_det_says_whether_two_estimation_passes_agreed_on_its_scale(
        daemon_factory: DaemonFactory) -> None:
    """The CPU default (the INT8 general detector, its FP32 network measuring the scale): a
    TEM frame of particles gets ``det.scale_agreed`` true, a frame of pure noise (the passes
    find grains whose size follows the pass) false, a blank frame none (nothing found, nothing
    to agree on)."""
    from nanoscout.sim.synthetic import Specimen, SpecimenConfig

    d = daemon_factory("--policy", "lossless")
    rng = np.random.default_rng(0)
    cfg = SpecimenConfig(modality="TEM", shape=(512, 512), median_diameter_nm=8.0,
                         pixel_size_nm=0.5)
    kw = {"pixel_size_nm": 0.5, "modality": "TEM"}
    dets = send_and_collect(d, [("a", Specimen.generate(cfg, 41).acquire(rng).image, kw),
                                ("a", rng.normal(100.0, 10.0, (512, 512)).astype(np.float32), kw),
                                ("b", np.full((512, 512), 7, np.uint16), kw)])
    particles, noise, blank = dets[("a", 0)], dets[("a", 1)], dets[("b", 0)]
    assert particles.scale_agreed is True and particles.n > 50
    assert noise.scale_agreed is False
    assert blank.scale_agreed is None and blank.n == 0
    assert d.stop(signal.SIGTERM) == 0
