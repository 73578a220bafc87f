"""Score calibration fitting (nanoscout.training.score_calibration): isotonic regression and its knots."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from nanoscout.training.score_calibration import isotonic, knots


def test_isotonic_pools_violators() -> None:
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    xs, fit = isotonic(x, y)
    assert np.array_equal(xs, x)
    assert fit.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert (np.diff(fit) >= 0).all()


def test_knots_span_the_unit_interval_and_reproduce_a_calibrated_score() -> None:
    rng = np.random.default_rng(0)
    s = rng.random(20000)
    hit = (rng.random(s.size) < s ** 2).astype(float)  # P(hit | s) = s^2
    xs, fit = isotonic(s, hit)
    kx, ky = knots(xs, fit, max_knots=16)
    assert kx[0] == 0.0 and kx[-1] == 1.0 and len(kx) <= 18
    assert all(b > a for a, b in zip(kx, kx[1:], strict=False))
    assert all(b >= a for a, b in zip(ky, ky[1:], strict=False))
    for q in (0.3, 0.6, 0.9):
        assert np.interp(q, kx, ky) == pytest.approx(q * q, abs=0.08)


def test_calibration_refuses_held_out_sets() -> None:

    from nanoscout.training.score_calibration import fit_calibration

    with pytest.raises(SystemExit, match="tuning sets only"):
        fit_calibration(Path("x.onnx"), ["emps"])


def test_calibrate_writes_a_monotone_map_into_a_copy_of_the_shipped_card(tmp_path: Path) -> None:
    """The command on one synthetic tuning frame: knots in [0, 1], data named, cut untouched."""
    from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
    from nanoscout.training.score_calibration import main

    for name in ("detector.onnx", "detector.json"):
        shutil.copy(shipped_model_dir() / name, tmp_path / name)
    before = ModelCard.load(tmp_path / "detector.json")
    main(["--model", str(tmp_path / "detector.onnx"), "--sets", "synthetic-tune",
          "--max-images", "1", "--threads", "1"])
    after = ModelCard.load(tmp_path / "detector.json")
    cal = after.score_calibration
    assert cal is not None and "synthetic-tune" in cal.data
    assert cal.scores[0] == 0.0 and cal.scores[-1] == 1.0
    assert all(b >= a for a, b in zip(cal.probabilities, cal.probabilities[1:], strict=False))
    assert after.thresholds == before.thresholds and after.sha256 == before.sha256
