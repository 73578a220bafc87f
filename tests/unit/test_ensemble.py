"""Mean-logit ensembles (nanoscout.training.ensemble): the graph's logits are the mean of its
members' on the same input, the card loads and runs in the detector, and members that do not
fit are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from nanoscout.analysis.detector import load_detector  # noqa: E402
from nanoscout.analysis.modelcard import ModelCard, sha256_file, shipped_model_dir  # noqa: E402
from nanoscout.engines import create_engine  # noqa: E402
from nanoscout.sim.synthetic import Specimen, SpecimenConfig  # noqa: E402
from nanoscout.training import ensemble  # noqa: E402

WEIGHTS = shipped_model_dir()
GENERAL, STEM = WEIGHTS / "detector.onnx", WEIGHTS / "detector_stem.onnx"


def _engine(path: Path) -> Any:
    return create_engine(path, "onnxruntime-cpu", threads=1)


def _run(path: Path, x: np.ndarray) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def test_the_logits_are_the_mean_of_the_members(tmp_path: Path) -> None:
    out = tmp_path / "two.onnx"
    assert ensemble.main([str(GENERAL), str(STEM), "--out", str(out)]) == 0
    x = np.random.default_rng(3).random((1, 1, 192, 160), dtype=np.float32)
    a, b, mean = _run(GENERAL, x), _run(STEM, x), _run(out, x)
    assert mean.shape == a.shape
    assert np.abs(a - b).max() > 1.0  # two different networks, so the test can tell
    np.testing.assert_allclose(mean, (a + b) / 2, atol=1e-4)


def test_the_card_pins_the_file_lists_the_members_and_drops_the_calibration(
        tmp_path: Path) -> None:
    out = tmp_path / "detector_accurate.onnx"
    ensemble.main([str(GENERAL), str(STEM), "--out", str(out), "--name", "accurate",
                   "--version", "2.5"])
    card = ModelCard.load(out.with_suffix(".json"))  # sha256 checked
    first = ModelCard.load(GENERAL.with_suffix(".json"))
    assert (card.name, card.version, card.onnx_file) == ("accurate", "2.5", out.name)
    assert card.sha256 == sha256_file(out)
    assert first.score_calibration is not None and card.score_calibration is None
    assert card.thresholds == first.thresholds and card.working_scale == first.working_scale
    assert first.metrics is not None and card.metrics is None  # the first's, not the mean's
    assert card.timings_ms == {} and card.quantization is None
    members = card.training.model_dump()["ensemble"]["members"]
    assert [m["sha256"] for m in members] == [sha256_file(GENERAL), sha256_file(STEM)]


def test_an_ensemble_of_one_network_twice_detects_what_it_detects(tmp_path: Path) -> None:
    out = tmp_path / "twice.onnx"
    ensemble.main([str(GENERAL), str(GENERAL), "--out", str(out)])
    frame = Specimen.generate(SpecimenConfig(shape=(384, 384), coverage=0.15), 4242
                              ).acquire(np.random.default_rng(4242)).image
    one = load_detector(GENERAL, _engine).detect(frame, pixel_size_nm=0.5)
    two = load_detector(out, _engine).detect(frame, pixel_size_nm=0.5)
    assert one.labels.max() > 5
    np.testing.assert_array_equal(two.labels, one.labels)
    assert two.calibrated is False and one.calibrated is True


def test_members_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two"):
        ensemble.mean_logits_graph([GENERAL])
    odd = tmp_path / "odd.onnx"
    node = helper.make_node("Identity", ["image"], ["probabilities"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 1, 8, 8])])
    onnx.save(helper.make_model(graph), str(odd))
    with pytest.raises(ValueError, match="'logits' only"):
        ensemble.mean_logits_graph([GENERAL, odd])


def test_an_adapted_card_or_none_cannot_lead_and_the_command_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lead = tmp_path / "adapted.onnx"
    lead.write_bytes(GENERAL.read_bytes())
    card = json.loads(GENERAL.with_suffix(".json").read_text())
    card["base_network"] = {"onnx_file": "detector.onnx", "sha256": card["sha256"]}
    lead.with_suffix(".json").write_text(json.dumps(card))
    out = tmp_path / "e.onnx"
    assert ensemble.main([str(lead), str(GENERAL), "--out", str(out)]) == 2
    assert "base_network" in capsys.readouterr().err and not out.exists()
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(GENERAL.read_bytes())
    assert ensemble.main([str(bare), str(GENERAL), "--out", str(out)]) == 2
    assert "no model card" in capsys.readouterr().err and not out.exists()


def test_an_out_that_would_replace_a_member_or_its_card_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out a member (or a name whose card is a member's card) would overwrite that member and
    pin the ensemble's own sha256 as the member's: refused, nothing written."""
    for name in ("a.onnx", "a.json", "b.onnx", "b.json"):
        (tmp_path / name).write_bytes((GENERAL if name.startswith("a") else STEM)
                                      .with_suffix(Path(name).suffix).read_bytes())
    before = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b, tmp_path / "b.other", tmp_path / "sub" / ".." / "a.onnx"):
        assert ensemble.main([str(a), str(b), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "(a member or its card): name a new file" in err, err
    assert {p.name: sha256_file(p) for p in tmp_path.iterdir()} == before


def test_bad_members_cards_and_outs_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.onnx"
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(GENERAL.read_bytes()[:100_000])
    assert ensemble.main([str(GENERAL), str(trunc), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{trunc}: not a readable ONNX model" in err and "Traceback" not in err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(GENERAL.read_bytes())
    bad.with_suffix(".json").write_text('{"name": "x"}')
    assert ensemble.main([str(bad), str(STEM), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"model card {bad.with_suffix('.json')} is invalid: version: Field required" in err
    assert len(err.strip().splitlines()) == 1
    folder = tmp_path / "adir"
    folder.mkdir()
    assert ensemble.main([str(GENERAL), str(STEM), "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "bad.json", "bad.onnx",
                                                          "trunc.onnx"]
    assert not any(folder.iterdir())
