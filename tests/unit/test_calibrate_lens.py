"""``nanoscout models calibrate-lens``: the AI lens's novelty reference rebuilt on real frames
(EMPS micrographs from ../shared/data), written as a card the daemon loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.cli.main import main
from nanoscout.daemon.app import build_classifier
from nanoscout.daemon.config import load_config
from nanoscout.training.calibrate_lens import frame_errors


def _emps(shared_data: Path, start: int, n: int) -> list[str]:
    return [str(f) for f in sorted((shared_data / "emps-train" / "images").iterdir())[start:start + n]]


def test_calibrate_on_real_frames_and_the_daemon_loads_it(shared_data: Path, tmp_path: Path
                                                           ) -> None:
    usual = _emps(shared_data, 0, 40)
    held_out = [Path(f) for f in _emps(shared_data, 200, 30)]
    out = tmp_path / "my-lens"
    summary = tmp_path / "summary.json"
    assert main(["models", "calibrate-lens", *usual, "--out", str(out), "--json",
                 str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert s["frames"] == 40
    assert s["above_1_old"] > 0.5  # the synthetic reference calls most real frames novel
    assert s["above_1_new"] <= 0.05  # 0.99 quantile of the same frames
    card = ModelCard.load(out / "lens.json")  # validates, and the copied ONNX hash matches
    shipped = ModelCard.load(shipped_model_dir() / "lens.json")
    assert card.novelty is not None and shipped.novelty is not None
    assert card.novelty.reference_error == pytest.approx(s["reference_error_new"])
    assert card.sha256 == shipped.sha256 and card.novelty.n_frames == 40
    assert "recalibrated on 40 user frames" in card.notes

    # frames it never saw: most score below 1 with the new reference, most above with the old
    errors, _ = frame_errors(out / "lens.json", held_out, enabled=False)
    assert np.mean(errors / card.novelty.reference_error > 1) < 0.3
    assert np.mean(errors / shipped.novelty.reference_error > 1) > 0.5

    # the daemon's classifier takes it through [classify] lens
    cfg = load_config(None, {"classify.lens": out / "lens.onnx"})
    clf = build_classifier(cfg)
    assert clf is not None and clf.lens_card is not None
    assert clf.lens_card.novelty is not None and clf.lens is not None
    assert clf.lens_card.novelty.reference_error == card.novelty.reference_error
    clf.engine.close()
    clf.lens.close()


def test_too_few_frames_are_refused(shared_data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    few = _emps(shared_data, 0, 3)
    assert main(["models", "calibrate-lens", *few, "--out", str(tmp_path / "o")]) == 2
    assert "3 frames read" in capsys.readouterr().err
