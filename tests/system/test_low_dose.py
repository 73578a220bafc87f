"""Low-dose frames through a real daemon: measured, smoothed where the card says so, reported."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.system.conftest import DaemonFactory, send_and_collect
from tests.system.test_bad_input import _metric

pytestmark = pytest.mark.system


def test_a_low_dose_stem_frame_is_smoothed_and_its_noise_reported(
        daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """A STEM detector whose FP32 card smooths low-dose frames (protocol 1.9; the shipped STEM
    network with the smoothing of its card 1.2, which card 1.2.1 left out; the daemon runs
    FP32 here): a STEM frame as acquired and the same specimen at 10 counts a pixel both get
    ``det.noise``, only the noisy one ``det.smoothing_px`` > 0; a TEM frame, analysed by the
    general detector (no smoothing in its card), gets neither. Prometheus counts the smoothed
    frame and shows the newest noise of each source."""
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.sim.synthetic import Specimen, SpecimenConfig
    from nanoscout.training.crops import low_dose

    models = tmp_path / "models"
    models.mkdir()
    for name in ("detector_stem.onnx", "detector_stem.json"):
        shutil.copy(shipped_model_dir() / name, models / name)
    card = json.loads((models / "detector_stem.json").read_text())
    card["normalization"]["denoise"] = {"target": 0.05, "max_px": 2.0}
    (models / "detector_stem.json").write_text(json.dumps(card))
    d = daemon_factory("--policy", "lossless", config=(
        '[engine]\nprecision = "fp32"\n'
        f'modality_models = {{STEM = "{models / "detector_stem.onnx"}"}}\n'))
    cfg = SpecimenConfig(modality="STEM", shape=(512, 512), median_diameter_nm=8.0,
                         pixel_size_nm=0.5, dose_e_per_px=None)
    clean = Specimen.generate(cfg, 41).acquire(np.random.default_rng(1)).image
    noisy = low_dose(clean, 10.0, np.random.default_rng(2))
    sends = [("stem", clean, {"pixel_size_nm": 0.5, "modality": "STEM"}),
             ("stem", noisy, {"pixel_size_nm": 0.5, "modality": "STEM"}),
             ("tem", noisy, {"pixel_size_nm": 0.5, "modality": "TEM"})]
    dets = send_and_collect(d, sends)
    quiet, loud, tem = dets[("stem", 0)], dets[("stem", 1)], dets[("tem", 0)]
    assert quiet.model.startswith("nanoscout-particle-unet-stem")
    assert quiet.noise is not None and loud.noise is not None and loud.noise > 0.05 > quiet.noise
    assert quiet.smoothing_px == 0.0 and 0.0 < loud.smoothing_px <= 2.0
    assert tem.noise is None and tem.smoothing_px is None and tem.n >= 0
    # a frame is counted just after its results are out: wait until all three are

    def counted() -> str | None:
        text = d.scrape()
        done = sum(_metric(text, "nanoscout_frames_processed_total", source=s)
                   for s in ("stem", "tem"))
        return text if done == len(sends) else None

    text = wait_until(counted, timeout=30, interval=0.05, what="all three frames counted")
    assert _metric(text, "nanoscout_frames_smoothed_total", source="stem") == 1
    assert _metric(text, "nanoscout_frames_smoothed_total", source="tem") == 0
    assert _metric(text, "nanoscout_frame_noise", source="stem") == pytest.approx(loud.noise,
                                                                                rel=1e-6)
    assert d.stop(signal.SIGTERM) == 0
