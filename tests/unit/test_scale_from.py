"""The accuracy harness's ``--scale-from``: one network measures the working scale for every
scored detector, so candidates compare at the same scales."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoscout.analysis.detector import Detector, scale_measurer
from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.analysis.preprocess import normalize
from nanoscout.engines import create_engine
from nanoscout.training.evaluate import main, run_harness, tuning_samples

GENERAL = shipped_model_dir() / "detector.onnx"
STEM = shipped_model_dir() / "detector_stem.onnx"


@pytest.fixture(scope="module", autouse=True)
def _shipped() -> None:
    pytest.importorskip("onnxruntime")
    for path in (GENERAL, STEM):
        if not path.is_file():
            pytest.skip(f"no shipped model at {path}")


def _scales(res: dict, name: str = "synthetic") -> list[float]:
    return [row["model"]["scale"] for row in res["sets"][name]["images"]]


def test_a_detector_measuring_its_own_scale_scores_as_it_does_alone() -> None:
    alone = run_harness(GENERAL, None, ["synthetic"], n=3, threads=2)
    measured = run_harness(GENERAL, None, ["synthetic"], n=3, threads=2, scale_from=GENERAL)
    assert measured["scale_from"] == str(GENERAL) and alone["scale_from"] is None
    assert _scales(measured) == _scales(alone)
    assert measured["sets"]["synthetic"]["methods"]["model"]["f1"] == \
        alone["sets"]["synthetic"]["methods"]["model"]["f1"]


def test_another_network_measures_and_the_scored_card_decides_the_factor() -> None:
    """The STEM detector's network measures the particle size, the general card turns it
    into the factor; the general detector's own estimate is not used (synthetic tuning
    frames: particles of 4-200 px, so most are resampled)."""
    res = run_harness(GENERAL, None, ["synthetic-tune"], max_images=4, threads=2,
                      scale_from=STEM)
    assert "--scale-from" in res["sets"]["synthetic-tune"]["note"]
    card = ModelCard.load(GENERAL.with_suffix(".json"))
    assert card.working_scale is not None and card.working_scale.auto is not None
    auto = card.working_scale.auto
    stem = scale_measurer(create_engine(STEM, "onnxruntime-cpu", threads=2),
                          ModelCard.load(STEM.with_suffix(".json")))
    own = Detector(create_engine(GENERAL, "onnxruntime-cpu", threads=2), card, scale="auto")
    expected, theirs = [], []
    for s in tuning_samples(4):
        x = normalize(s.image)
        size = stem.particle_size(x)
        expected.append(round(1.0 if size is None else auto.factor(size), 4))
        theirs.append(round(own.estimate_scale(x), 4))
    assert _scales(res, "synthetic-tune") == expected
    assert expected != theirs  # the two networks measure these frames differently


def test_scale_from_needs_the_automatic_scale(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--scale-from needs the automatic scale"):
        main(["--model", str(GENERAL), "--sets", "synthetic", "--n", "1", "--scale", "oracle",
              "--scale-from", str(GENERAL), "--out", str(tmp_path / "r.json")])


def test_int8_scores_the_siblings_of_both_detectors(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``--precision int8`` scores the INT8 siblings of --model and of an explicit
    --stem-model (the STEM detector stayed FP32 when named, while 'auto' took its sibling); a
    sibling named itself is kept, and a missing one is a clear error."""
    from nanoscout.training import evaluate

    seen: dict[str, object] = {}

    def harness(model: Path, card: object, sets: object, **kw: object) -> dict:
        seen.update(model=model, stem_model=kw["stem_model"])
        return {"sets": {}, "targets": {}}

    monkeypatch.setattr(evaluate, "run_harness", harness)
    monkeypatch.setattr(evaluate, "format_table", lambda res: "")
    out = str(tmp_path / "r.json")
    for stem in (str(STEM), str(STEM.with_name("detector_stem.int8.onnx")), "auto"):
        seen.clear()
        main(["--model", str(GENERAL), "--sets", "stem", "--stem-model", stem,
              "--precision", "int8", "--out", out])
        assert seen == {"model": GENERAL.with_name("detector.int8.onnx"),
                        "stem_model": STEM.with_name("detector_stem.int8.onnx")}, stem
    lone = tmp_path / "detector_stem.onnx"
    lone.write_bytes(STEM.read_bytes())
    with pytest.raises(SystemExit, match="no INT8 sibling .*detector_stem.int8.onnx"):
        main(["--model", str(GENERAL), "--sets", "stem", "--stem-model", str(lone),
              "--precision", "int8", "--out", out])
