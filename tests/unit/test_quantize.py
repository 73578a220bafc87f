"""INT8 siblings (nanoscout.training.quantize, .calibration) and the precision the daemon picks
for them (nanoscout.daemon.precision): real ONNX Runtime quantization of real models."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from nanoscout.analysis.modelcard import (
    ModelCard,
    quantized_sibling,
    sha256_file,
    shipped_model_dir,
)
from nanoscout.daemon.app import build_detector
from nanoscout.daemon.config import load_config
from nanoscout.daemon.precision import engine_name, int8_sibling, load_engine
from nanoscout.engines import create_engine
from nanoscout.training.int8_calibration import CALIBRATION_SEED_BASE, calibration_inputs
from nanoscout.training.quantize import parity, quantize_model, quantize_onnx
from nanoscout.wire.errors import ConfigError
from tests.unit.test_engines import (  # noqa: F401 (fake_gpu: a fixture)
    FakeGpu,
    conv_sigmoid_model,
    fake_gpu,
    reference,
)

WEIGHTS = shipped_model_dir()


def _copy(name: str, dst: Path) -> Path:
    src = WEIGHTS / f"{name}.onnx"
    if not src.is_file():
        pytest.skip(f"no shipped {src}")
    shutil.copy(src, dst / src.name)
    shutil.copy(src.with_suffix(".json"), dst / f"{name}.json")
    return dst / src.name


def test_calibration_inputs_are_the_models_inputs_and_reproducible() -> None:
    det = ModelCard.load(WEIGHTS / "detector.json")
    stem = ModelCard.load(WEIGHTS / "detector_stem.json")
    clf = ModelCard.load(WEIGHTS / "classifier.json")
    a, b = list(calibration_inputs(det, 3)), list(calibration_inputs(det, 3))
    assert [x["image"].shape for x in a] == [(1, 1, 384, 384)] * 3
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert a[0]["image"].dtype == np.float32 and -0.5 <= a[0]["image"].min() < a[0]["image"].max() <= 1.5
    # the STEM detector calibrates on STEM frames only: they differ from the mixed set's
    assert not np.array_equal(next(calibration_inputs(stem, 2))["image"], a[0]["image"]) \
        or not np.array_equal(list(calibration_inputs(stem, 2))[1]["image"], a[1]["image"])
    assert next(calibration_inputs(clf, 1))["image"].shape == (1, 1, 256, 256)
    assert CALIBRATION_SEED_BASE == 700_000  # disjoint from held-out 12345+, tuning 500000+
    with pytest.raises(ValueError, match="calibration frames"):
        next(calibration_inputs(det, 0))


def test_quantize_onnx_keeps_a_convolution_close(tmp_path: Path) -> None:
    fp32 = conv_sigmoid_model(tmp_path / "conv.onnx")
    rng = np.random.default_rng(0)
    inputs = [{"image": rng.normal(size=(1, 1, 32, 32)).astype(np.float32)} for _ in range(8)]
    how = quantize_onnx(fp32, tmp_path / "conv.int8.onnx", iter(inputs))
    assert "QDQ" in how and "percentile" in how
    x = rng.normal(size=(1, 1, 40, 24)).astype(np.float32)
    with create_engine(tmp_path / "conv.int8.onnx", "cpu", threads=1) as q:
        got = q.infer({"image": x})["logits"]
    want = reference(x)[0]
    # 8-bit activations over about +-4: steps of ~0.03, a few of them in a 3x3 sum
    assert np.abs(got - want).max() < 0.15 and np.abs(got - want).mean() < 0.03
    with pytest.raises(ValueError, match="calibration method"):
        quantize_onnx(fp32, tmp_path / "x.onnx", iter(inputs), method="magic")


def test_a_sibling_is_used_by_default_only_after_passing_its_parity(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _copy("detector", tmp_path)
    assert int8_sibling(model, "auto") is None  # none yet
    res = quantize_model(model, n_calibration=4, check=False)
    sibling = quantized_sibling(model)
    assert res["int8"] == str(sibling) and sibling.is_file() and res["int8_bytes"] < res["fp32_bytes"]
    card = ModelCard.load(sibling.with_suffix(".json"))
    q = card.quantization
    assert q is not None and q.source_sha256 == sha256_file(model) and not q.passed
    assert (card.name, card.version, card.onnx_file) == ("nanoscout-particle-unet", "3.0.0",
                                                         "detector.int8.onnx")
    # not measured: "auto" keeps FP32, "int8" takes it anyway
    assert int8_sibling(model, "auto") is None
    assert int8_sibling(model, "int8") == sibling
    assert int8_sibling(model, "fp32") is None
    # measured (a few frames only: the shipped sibling is measured on every held-out set)
    par = parity(model.with_suffix(".json"), sibling.with_suffix(".json"), sets=["synthetic"],
                 n_synthetic=3)
    row = par["synthetic"]
    assert row["metric"] == "f1" and row["n_images"] == 3
    assert row["loss"] == pytest.approx(row["fp32"] - row["int8"], abs=1e-4)
    assert set(q.engine_ms) >= {"fp32", "int8", "input"} and q.speedup is not None
    # accurate enough but slower: not the default
    slow = card.model_copy(update={"quantization": q.model_copy(
        update={"parity": par, "passed": True, "speedup": 0.6})})
    slow.dump(sibling.with_suffix(".json"))
    assert int8_sibling(model, "auto") is None
    passed = card.model_copy(update={"quantization": q.model_copy(
        update={"parity": par, "passed": True, "speedup": 2.0})})
    passed.dump(sibling.with_suffix(".json"))
    assert int8_sibling(model, "auto") == sibling
    engine = load_engine(model, backend="cpu", precision="auto", threads=1)
    assert engine.precision == "int8" and engine_name(engine) == "onnxruntime-cpu/int8"
    # the weights change: the sibling is stale and never chosen
    with model.open("ab") as f:
        f.write(b"\0")
    with caplog.at_level(logging.WARNING, "nanoscout.daemon.precision"):
        assert int8_sibling(model, "auto") is None
    assert "nanoscout models quantize" in caplog.text
    with pytest.raises(ConfigError, match="was not made from detector.onnx"):
        int8_sibling(model, "int8")


def test_the_default_precision_follows_the_shipped_measurement() -> None:
    """The shipped INT8 siblings: made from the shipped FP32 files, their parity and speed
    recorded; the daemon's default ("auto") runs a detector in INT8 exactly when its parity
    passed (no held-out set lost more than 0.01 F1) and it is at least 1.1x faster."""
    for name in ("detector", "detector_stem", "classifier"):
        sibling = quantized_sibling(WEIGHTS / f"{name}.onnx")
        if not sibling.is_file():
            pytest.skip(f"no shipped INT8 sibling {sibling} (nanoscout models quantize)")
        q = ModelCard.load(sibling.with_suffix(".json")).quantization
        assert q is not None and q.source_sha256 == sha256_file(WEIGHTS / f"{name}.onnx"), name
        assert q.parity, f"{name}: the parity was not measured"
        assert q.passed == all(r["loss"] <= q.max_loss for r in q.parity.values()), name
        assert q.max_loss == 0.01 and q.speedup is not None
        assert q.default == (q.passed and q.speedup >= 1.1)
    cfg = load_config(None, {"engine.backend": "cpu", "engine.threads": 1})
    q = ModelCard.load(quantized_sibling(WEIGHTS / "detector.onnx").with_suffix(".json")).quantization
    assert q is not None
    det, name, _ = build_detector(cfg, cfg.engine.model_path())
    assert det.engine.precision == ("int8" if q.default else "fp32")
    assert name == ("onnxruntime-cpu/int8" if q.default else "onnxruntime-cpu")
    # a sibling whose parity was measured with the FP32 model measuring the scale runs so
    measurer = det.base_detector
    if q.default and q.fp32_scale:
        assert measurer is not None and measurer.engine.precision == "fp32"
        assert not det.merge_base and measurer.card.score_calibration is None
    else:
        assert measurer is None
    det.close()
    fp32 = load_config(None, {"engine.backend": "cpu", "engine.precision": "fp32"})
    det32, name32, _ = build_detector(fp32, fp32.engine.model_path())
    assert det32.engine.precision == "fp32" and name32 == "onnxruntime-cpu"


def test_the_fp32_model_measures_the_scale_for_its_int8_sibling(shared_data: Path) -> None:
    """``quantization.fp32_scale``: the INT8 sibling analyses the frame at the factor the FP32
    model's estimation passes choose (an EMPS validation crop of five ~80 px particles, where
    8-bit passes agreed on a texture at 1.5x and 3x: factor 3.0, 434 false particles) and no
    estimation pass runs on the INT8 engine."""
    from nanoscout.analysis.detector import Detector, scale_measurer
    from nanoscout.training.realdata import emps_index, load_emps

    sibling = quantized_sibling(WEIGHTS / "detector.onnx")
    if not sibling.is_file():
        pytest.skip(f"no shipped INT8 sibling {sibling} (nanoscout models quantize)")
    card = ModelCard.load(WEIGHTS / "detector.json")
    sample = load_emps("3692286ecf", shared_data, dict(emps_index(shared_data))["3692286ecf"])
    fp32 = create_engine(WEIGHTS / "detector.onnx", "onnxruntime-cpu", threads=1,
                         precision="fp32")
    int8 = create_engine(WEIGHTS / "detector.onnx", "onnxruntime-cpu", threads=1,
                         precision="int8", int8_model=sibling)
    reference = Detector(fp32, card).detect(sample.image)
    measured = Detector(int8, card, base_detector=scale_measurer(fp32, card))
    calls: list[tuple[int, ...]] = []
    infer = int8.infer

    def counting(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(next(iter(inputs.values())).shape)
        return infer(inputs)

    int8.infer = counting  # type: ignore[method-assign]
    found = measured.detect(sample.image)
    assert found.scale == reference.scale < 1.0  # the particles are large: shrunk
    # the INT8 engine ran only the analysis at that factor, no estimation pass
    h, w = sample.image.shape
    assert len(calls) == 1 and calls[0][2:] == tuple(-(-round(n * found.scale) // 16) * 16
                                                    for n in (h, w)), calls
    assert abs(found.n - reference.n) <= 2
    fp32.close()
    int8.close()


def test_quantize_command_writes_a_summary(tmp_path: Path) -> None:
    from nanoscout.training.quantize import main

    _copy("classifier", tmp_path)
    out = tmp_path / "parity.json"
    assert main(["--weights", str(tmp_path), "--models", "classifier", "--no-parity",
                 "--calibration-frames", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"classifier"} and "parity" not in report["models"]["classifier"]
    card = ModelCard.load(tmp_path / "classifier.int8.json")
    assert card.quantization is not None and "Conv" in card.quantization.method
    with pytest.raises(SystemExit, match="no lens.onnx"):
        main(["--weights", str(tmp_path), "--models", "lens"])


def test_a_truncated_model_or_no_calibration_frames_are_refused_before_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated ONNX file whose card's sha256 matches it, and --calibration-frames 0, are
    said in one line (exit 2), and no sibling is written."""
    import hashlib

    from nanoscout.cli.main import main as cli
    from nanoscout.wire.errors import ModelCardError

    src = _copy("classifier", tmp_path)
    src.write_bytes(src.read_bytes()[:30_000])
    card = json.loads(src.with_suffix(".json").read_text())
    card["sha256"] = hashlib.sha256(src.read_bytes()).hexdigest()
    src.with_suffix(".json").write_text(json.dumps(card))
    args = ["models", "quantize", "--weights", str(tmp_path), "--models", "classifier",
            "--no-parity", "--threads", "1"]
    assert cli([*args, "--calibration-frames", "2"]) == 2
    err = capsys.readouterr().err
    assert f"cannot load ONNX model {src}" in err and "Traceback" not in err
    with pytest.raises(ModelCardError, match="cannot load ONNX model"):
        quantize_model(src, n_calibration=2, check=False)
    _copy("classifier", tmp_path)
    assert cli([*args, "--calibration-frames", "0"]) == 2
    assert "--calibration-frames 0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="n_calibration 0"):
        quantize_model(src, n_calibration=0, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.json", "classifier.onnx"]


def test_build_engines_calibrates_the_shipped_detector_on_a_stand_in_gpu(
        fake_gpu: FakeGpu, tmp_path: Path) -> None:  # noqa: F811 (the imported fixture)
    """``nanoscout models build-engines --precision int8`` against the stand-in TensorRT of
    test_engines (host memory, ONNX Runtime underneath): the calibrator gets the detector's
    calibration inputs, the plan is built for tiles of tile_px in batches, and --check
    compares with ONNX Runtime CPU."""
    from nanoscout.training.build_engines import main

    builds, _ = fake_gpu
    out = tmp_path / "engines.json"
    assert main(["--models", "detector,classifier", "--precision", "int8", "--cache-dir",
                 str(tmp_path / "trt"), "--calibration-frames", "3", "--check",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    det, clf = report["models"]["detector"], report["models"]["classifier"]
    assert det["precision"] == "int8" and det["calibrated_batches"] == 3
    assert det["max_shape"] == [2304, 2304] and det["max_batch"] == 4
    assert builds[0]["profile"]["image"] == [[1, 1, 16, 16], [4, 1, 1024, 1024], [4, 1, 2304, 2304]]
    assert builds[0]["calibration_profile"] == {"image": [[1, 1, 384, 384]] * 3}
    assert Path(det["calibration_cache"]).parent == tmp_path / "trt"
    # the stand-in runs the FP32 model: the check sees no difference
    assert set(det["check_vs_onnxruntime_cpu_fp32"]["max_abs_diff"].values()) == {0.0}
    assert det["check_vs_onnxruntime_cpu_fp32"]["foreground_disagreement"] == 0.0
    assert clf["max_shape"] == [256, 256] and clf["max_batch"] == 1


@pytest.mark.parametrize(("name", "precision", "measured_by"),
                         [("detector", "int8", "cpu_fp32"), ("detector", "fp16", "tensorrt"),
                          ("detector_stem", "int8", "tensorrt")])
def test_build_engines_parity_measures_the_scale_as_the_daemon_does(
        fake_gpu: FakeGpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        name: str, precision: str, measured_by: str) -> None:
    """The daemon's INT8 detector has the FP32 model measure its working scale where its
    sibling's card says so (``quantization.fp32_scale``: the general detector, not the STEM
    one), whatever the backend; ``build-engines --parity`` must measure that configuration,
    not the INT8 engine measuring its own."""
    from nanoscout.training import build_engines

    seen: list[object] = []

    def fake_parity(card: ModelCard, engines: Mapping[str, object], sets: list[str], *,
                    measured_by: object = None, **kw: object) -> dict[str, dict[str, object]]:
        seen.append(measured_by)
        assert list(engines) == ["cpu_fp32", "tensorrt"]
        return {"synthetic": {"cpu_fp32": 0.9, "tensorrt": 0.9}}

    monkeypatch.setattr(build_engines, "detector_parity", fake_parity)
    res = build_engines.build_model(
        WEIGHTS / f"{name}.onnx", precision=precision, device=0, cache_dir=tmp_path,
        tile_px=256, tile_batch=1, n_calibration=1, check=False, parity=True,
        sets=["synthetic"], max_images=1, data_root=None)
    assert res["scale_measured_by"] == measured_by and res["passed"]
    assert (seen[0] is None) == (measured_by == "tensorrt")
    assert seen[0] is None or getattr(seen[0], "name", None) == "onnxruntime-cpu"


def test_the_daemon_batches_tiles_only_on_a_local_gpu(fake_gpu: FakeGpu,  # noqa: F811
                                                      tmp_path: Path) -> None:
    """``tile_batch`` unset: 4 tiles per engine call under TensorRT (the plan's profile is
    built for that batch), 1 on the CPU; an explicit value is kept."""
    from nanoscout.daemon.app import build_detector
    from nanoscout.daemon.config import load_config

    builds, _ = fake_gpu
    model = WEIGHTS / "detector.onnx"

    def detector(**overrides: object) -> tuple[int, str]:
        cfg = load_config(None, {"engine.threads": 1, "engine.precision": "fp16",
                                 "engine.cache_dir": tmp_path, **overrides})
        det, name, _ = build_detector(cfg, model)
        det.engine.close()
        return det.tile_batch, name

    assert detector(**{"engine.backend": "tensorrt"}) == (4, "tensorrt/fp16")
    assert builds[-1]["profile"]["image"][2] == [4, 1, 2304, 2304]
    assert detector(**{"engine.backend": "cpu"}) == (1, "onnxruntime-cpu")
    assert detector(**{"engine.backend": "cpu", "engine.tile_batch": 3})[0] == 3
