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


def test_bad_options_are_refused_before_the_lens_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--min-frames 0, an --out or --json that cannot be written: one line, exit 2, and no lens
    written; a --json in a folder that does not exist yet gets its folder."""
    from PIL import Image

    from nanoscout.training.calibrate_lens import main as calibrate

    empty, one = tmp_path / "empty", tmp_path / "one"
    empty.mkdir()
    one.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((96, 96)) * 255).astype(np.uint8)).save(one / "f.png")
    out = tmp_path / "lens-out"
    assert calibrate([str(empty), "--out", str(out), "--min-frames", "0"]) == 2
    assert "--min-frames must be >= 1, got 0" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert calibrate([str(one), "--out", str(afile), "--min-frames", "1"]) == 2
    assert f"--out {afile}: {afile} is a file, not a folder" in capsys.readouterr().err
    assert calibrate([str(one), "--out", str(out), "--min-frames", "1", "--json",
                      str(afile / "s.json")]) == 2
    assert f"--json {afile / 's.json'}: {afile} is a file" in capsys.readouterr().err
    assert calibrate([str(one), "--out", str(out), "--min-frames", "1", "--json",
                      str(one)]) == 2
    assert f"--json {one} is a folder" in capsys.readouterr().err
    assert afile.read_text() == "x" and not out.exists()
    summary = tmp_path / "new" / "s.json"
    assert calibrate([str(one), "--out", str(out), "--min-frames", "1", "--json",
                      str(summary)]) == 0
    assert json.loads(summary.read_text())["frames"] == 1
    ModelCard.load(out / "lens.json")
