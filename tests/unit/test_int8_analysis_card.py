"""The daemon runs an INT8 sibling (ONNX Runtime, precision "auto") with the analysis settings
of the sibling's own card, under the served model's identity: it ran the sibling with the FP32
card's, and the STEM sibling got the FP32 card 1.2's low-dose smoothing, which its own card (the
one its parity and held-out numbers were measured with) left out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.daemon.app import build_detector
from nanoscout.daemon.config import ServeConfig

pytest.importorskip("onnxruntime")


def _smoothing_fp32_card(tmp_path: Path) -> Path:
    """The shipped STEM detector and its sibling in ``tmp_path``, the FP32 card smoothing
    low-dose frames as card 1.2 did (1.2.1 smooths in neither card)."""
    for name in ("detector_stem.onnx", "detector_stem.json", "detector_stem.int8.onnx",
                 "detector_stem.int8.json"):
        shutil.copy(shipped_model_dir() / name, tmp_path / name)
    card = json.loads((tmp_path / "detector_stem.json").read_text())
    card["normalization"]["denoise"] = {"target": 0.05, "max_px": 2.0}
    (tmp_path / "detector_stem.json").write_text(json.dumps(card))
    return tmp_path / "detector_stem.onnx"


@pytest.mark.parametrize("stem", ["detector", "detector_stem", "smoothing"])
def test_an_int8_sibling_runs_with_its_own_cards_analysis_settings(stem: str,
                                                                   tmp_path: Path) -> None:
    model = (_smoothing_fp32_card(tmp_path) if stem == "smoothing"
             else shipped_model_dir() / f"{stem}.onnx")
    stem = model.stem
    served = ModelCard.load(model.with_suffix(".json"))
    sibling = ModelCard.load(model.with_name(f"{stem}.int8.json"))
    det, engine, name = build_detector(ServeConfig.model_validate({"engine": {"threads": 1}}),
                                       model)
    try:
        assert engine.endswith("/int8")  # the shipped siblings passed their parity and pay
        # the served model's identity: hot swaps and det.model_sha256 name it
        assert det.card.sha256 == served.sha256 and name == f"{served.name}:{served.version}"
        for field in ("normalization", "working_scale", "thresholds", "score_calibration"):
            assert getattr(det.card, field) == getattr(sibling, field)
        if served.normalization != sibling.normalization:  # the difference this is about
            assert served.normalization.denoise is not None
            assert det.card.normalization.denoise is None and det.denoise is None
        fp32, _, _ = build_detector(ServeConfig.model_validate(
            {"engine": {"threads": 1, "precision": "fp32"}}), model)
        try:
            assert fp32.card == served
        finally:
            fp32.close()
    finally:
        det.close()
