"""The daemon runs an INT8 sibling (ONNX Runtime, precision "auto") with the analysis settings
of the sibling's own card, under the served model's identity: it ran the sibling with the FP32
card's, and the STEM sibling got the FP32 card's low-dose smoothing, which its own card (the
one its parity and held-out numbers were measured with) leaves out."""

from __future__ import annotations

import pytest

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.daemon.app import build_detector
from nanoscout.daemon.config import ServeConfig

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("stem", ["detector", "detector_stem"])
def test_an_int8_sibling_runs_with_its_own_cards_analysis_settings(stem: str) -> None:
    model = shipped_model_dir() / f"{stem}.onnx"
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
        if stem == "detector_stem":  # the difference this is about
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
