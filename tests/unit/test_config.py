"""Typed configuration: TOML file + overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoscout.daemon.config import ServeConfig, load_config
from nanoscout.wire.errors import ConfigError


def test_defaults_are_loopback_and_live() -> None:
    cfg = load_config()
    assert cfg == ServeConfig()
    assert cfg.input.endpoint.startswith("tcp://127.0.0.1:")
    assert cfg.output.endpoint.startswith("tcp://127.0.0.1:")
    assert cfg.input.policy == "live"
    assert cfg.engine.model_path().name == "detector.onnx"


def test_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text('[input]\npolicy = "lossless"\nqueue_size = 3\n[engine]\nbackend = "cpu"\n')
    cfg = load_config(f, {"input.queue_size": 9, "metrics.port": None, "output.hwm": 5})
    assert cfg.input.policy == "lossless"
    assert cfg.input.queue_size == 9  # override wins
    assert cfg.metrics.port == 9108  # None overrides are ignored
    assert cfg.output.hwm == 5
    assert cfg.engine.backend == "cpu"
    assert cfg.engine.particle_size_nm is None  # the estimate alone
    f.write_text("[engine]\nparticle_size_nm = [2, 10.5]\n")
    assert load_config(f).engine.particle_size_nm == (2.0, 10.5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[input]\npolicy = "sometimes"\n', "input.policy"),
        ("[input]\nqueue_size = 0\n", "input.queue_size"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[input\n", "not valid TOML"),
        ("[engine]\nscale = -1\n", "engine.scale"),
        ("[engine]\nparticle_size_nm = [10, 2]\n", "engine.particle_size_nm"),
        ("[engine]\nparticle_size_nm = [0, 2]\n", "engine.particle_size_nm"),
        ("[engine]\nparticle_size_nm = [2]\n", "engine.particle_size_nm"),
        ("[engine]\nparticle_size_px = [40, 4]\n", "engine.particle_size_px"),
        # inf / nan are TOML floats: a health interval of inf sent one health message only,
        # a drain of inf crashed the shutdown (OverflowError)
        ("[health]\ninterval_s = inf\n", "health.interval_s: Input should be a finite"),
        ("[health]\ninterval_s = nan\n", "health.interval_s: Input should be a finite"),
        ("[health]\ninterval_s = 1e12\n", "health.interval_s: Input should be less"),
        ("[input]\ndrain_s = inf\n", "input.drain_s: Input should be a finite"),
        ("[input]\ndrain_s = 1e10\n", "input.drain_s: Input should be less"),
        ("[engine.triton]\ntimeout_s = inf\n", "engine.triton.timeout_s"),
        ("[engine.triton]\nconnect_timeout_s = 1e300\n", "engine.triton.connect_timeout_s"),
        ("[engine.triton]\nretry_s = inf\n", "engine.triton.retry_s"),
        ("[engine]\nscale_tolerance = inf\n", "engine.scale_tolerance"),
        ("[engine]\nscale_presets = [[0.5, nan]]\n", "engine.scale_presets"),
        ("[metrics]\nalert_latency_p99_s = inf\n", "metrics.alert_latency_p99_s"),
        ("[stats]\nwindow_seconds = inf\n", "stats.window_seconds"),
        ("[tracking]\nmax_step_px = nan\n", "tracking.max_step_px"),
        ("[[alerts]]\nname = 'n'\nkind = 'count'\nabove = nan\n", "above"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """Once a UnicodeDecodeError traceback from ``serve --config`` and ``health --config``."""
    f = tmp_path / "latin1.toml"
    f.write_bytes(b"[input]\npolicy = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match="config file .*latin1.toml is not UTF-8 text"):
        load_config(f)


def test_the_health_interval_and_drain_take_finite_times_up_to_a_day() -> None:
    cfg = load_config(None, {"health.interval_s": 86_400.0, "input.drain_s": 0.0})
    assert cfg.health.interval_s == 86_400.0 and cfg.input.drain_s == 0.0
    with pytest.raises(ConfigError, match="health.interval_s"):
        load_config(None, {"health.interval_s": float("inf")})  # --health-interval inf


def test_remote_endpoint_without_curve_is_refused() -> None:
    with pytest.raises(ConfigError, match="not on loopback"):
        load_config(None, {"input.endpoint": "tcp://0.0.0.0:5555"})
    cfg = load_config(None, {"input.endpoint": "tcp://0.0.0.0:5555", "security.allow_insecure_remote": True})
    assert cfg.security.allow_insecure_remote


@pytest.mark.parametrize("endpoint", ["tipc://{5560,0,0}", "ws://0.0.0.0:5555",
                                      "tcp://eth0:5555", "tcp://*:5555", "pgm://eth0;239.1.1.1:5555",
                                      "tcp://127.0.0.1;10.0.0.5:5555"])
def test_every_transport_that_reaches_other_hosts_is_remote(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="not on loopback"):
        load_config(None, {"output.endpoint": endpoint})


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:0", "tcp://[::1]:5", "tcp://localhost:5",
                                      "ipc:///tmp/x", "inproc://x",
                                      "tcp://10.0.0.5;127.0.0.1:5555"])
def test_loopback_and_local_transports_need_nothing(endpoint: str) -> None:
    assert load_config(None, {"output.endpoint": endpoint}).output.endpoint == endpoint


def test_metrics_off_loopback_need_allow_remote() -> None:
    with pytest.raises(ConfigError, match="metrics.host '0.0.0.0' is not on loopback"):
        load_config(None, {"metrics.host": "0.0.0.0"})
    assert load_config(None, {"metrics.host": "0.0.0.0", "metrics.allow_remote": True})
    assert load_config(None, {"metrics.host": "0.0.0.0", "metrics.enabled": False})


def test_input_bounds_and_the_merged_score_cut() -> None:
    cfg = load_config(None, {"input.max_frame_bytes": 1 << 20, "input.buffer_bytes": 8 << 20})
    assert cfg.input.receive_hwm() == 8  # the byte budget, not the message count, binds
    assert load_config(None, {"input.max_frame_bytes": 1 << 30}).input.receive_hwm() == 1
    with pytest.raises(ConfigError, match="merged into engine.score_cut"):
        load_config(None, {"engine.min_score": 0.5})
    with pytest.raises(ConfigError, match="two particle cuts"):
        load_config(None, {"engine.score_cut": 0.5, "engine.min_confidence": 0.8})
    with pytest.raises(ConfigError, match="min_confidence"):
        load_config(None, {"engine.min_confidence": 1.0})  # a probability below 1
    assert load_config(None, {"engine.min_confidence": 0.8}).engine.min_confidence == 0.8


def test_stem_frames_get_the_shipped_stem_detector_unless_configured(tmp_path: Path) -> None:
    shipped = load_config().engine
    stem = shipped.model_path().parent / "detector_stem.onnx"
    if not stem.is_file():
        pytest.skip(f"no shipped STEM detector at {stem} (python -m nanoscout.training.train --variant stem)")
    assert shipped.modality_model_paths() == {"STEM": stem}
    own = tmp_path / "mine.onnx"
    # a model of one's own replaces the shipped set: no STEM detector slipped in beside it
    assert load_config(None, {"engine.model": own}).engine.modality_model_paths() == {}
    f = tmp_path / "m.toml"
    f.write_text(f'[engine]\nmodel = "{own}"\nmodality_models = {{STEM = "{stem}"}}\n')
    assert load_config(f).engine.modality_model_paths() == {"STEM": stem}
    f.write_text("[engine]\nmodality_models = {}\n")
    assert load_config(f).engine.modality_model_paths() == {}
    f.write_text('[engine]\nmodality_models = {XRAY = "x.onnx"}\n')
    with pytest.raises(ConfigError, match="modality_models"):
        load_config(f)


def test_min_confidence_reaches_the_detectors(caplog: pytest.LogCaptureFixture) -> None:
    """The calibrated general detector cuts at the probability; the shipped STEM detector,
    uncalibrated, keeps its card's raw cut when it came by default (logged) and is an error
    when named."""
    pytest.importorskip("onnxruntime")
    from nanoscout.daemon.app import build_detector

    cfg = load_config(None, {"engine.min_confidence": 0.8})
    stem = cfg.engine.modality_model_paths().get("STEM")
    if stem is None:
        pytest.skip("no shipped STEM detector")
    det, _, _ = build_detector(cfg, cfg.engine.model_path())
    assert det.min_confidence == 0.8 and det.calibrated
    with caplog.at_level("WARNING", logger="nanoscout"):
        sdet, _, _ = build_detector(cfg, stem)
    assert sdet.min_confidence is None and not sdet.calibrated
    assert sdet.thresholds == sdet.card.thresholds
    assert "no score_calibration" in caplog.text
    named = load_config(None, {"engine.min_confidence": 0.8,
                               "engine.modality_models": {"STEM": str(stem)}})
    with pytest.raises(ConfigError, match="has no score_calibration"):
        build_detector(named, stem)
