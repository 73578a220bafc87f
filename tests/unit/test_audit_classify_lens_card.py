"""Audit of the offline AI lens (``nanoscout lens``): it reads its card as the daemon does.

Before, ``batch.lens`` parsed the card with its own loose checks: a card whose
``novelty.reference_error`` is 0 ended in a ZeroDivisionError traceback, one with a negative
reference printed a negative novelty with exit status 0, where the daemon refuses both cards
(``ModelCard.load``). Real shipped lens, real onnxruntime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.modelcard import ModelCard

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
CARD = WEIGHTS / "lens.json"

pytest.importorskip("onnxruntime")


def _frame() -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:200, 0:300]
    img = 1000.0 + 20.0 * rng.standard_normal((200, 300))
    for cy, cx in ((50, 60), (120, 200), (150, 80)):
        img += 800.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2)
    return img.clip(0, 65535).astype(np.uint16)


def _card_with_reference(tmp_path: Path, reference: float) -> Path:
    raw = json.loads(CARD.read_text(encoding="utf-8"))
    raw["novelty"]["reference_error"] = reference
    shutil.copy(WEIGHTS / raw["onnx_file"], tmp_path / raw["onnx_file"])
    path = tmp_path / "lens.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    from PIL import Image

    if not CARD.is_file():
        pytest.skip(f"no shipped lens at {CARD}")
    path = tmp_path / "frame.png"
    Image.fromarray(_frame()).save(path)
    return path


@pytest.mark.parametrize("reference", [0.0, -0.2])
def test_a_card_the_daemon_refuses_is_refused_offline(
        tmp_path: Path, image_file: Path, reference: float,
        capsys: pytest.CaptureFixture[str]) -> None:
    from nanoscout.batch.lens import main

    card = _card_with_reference(tmp_path, reference)
    out = tmp_path / "maps.png"
    assert main([str(image_file), "--card", str(card), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "reference_error" in err
    assert not out.exists()


def test_offline_novelty_is_the_daemons(image_file: Path) -> None:
    """The same frame gives the same error and novelty offline and in the daemon's
    classifier (``FieldClassifier.novelty_of``), twice."""
    from nanoscout.analysis.classifier import FieldClassifier
    from nanoscout.batch.lens import run_lens
    from nanoscout.engines import create_engine

    frame = _frame()
    card = ModelCard.load(WEIGHTS / "classifier.json")
    lens_card = ModelCard.load(CARD)
    clf = FieldClassifier(
        create_engine(card.onnx_path(WEIGHTS / "classifier.json"), "cpu", threads=1), card,
        lens=create_engine(lens_card.onnx_path(CARD), "cpu", threads=1), lens_card=lens_card)
    daemon = clf.classify(frame)
    first, second = run_lens(CARD, frame), run_lens(CARD, frame)
    assert first.novelty == second.novelty
    assert daemon.error == pytest.approx(first.error, rel=1e-6)
    assert daemon.novelty == pytest.approx(first.novelty, rel=1e-6) and first.novelty > 0
