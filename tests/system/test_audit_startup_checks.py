"""``nanoscout serve`` with a configuration that cannot work on this machine: refused before any
model loads (no INFO line: the models log at INFO as they load), in one line naming the setting
and the file, exit status 78 (EX_CONFIG, which the systemd unit does not restart)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanoscout.analysis.modelcard import shipped_model_dir
from tests.system.conftest import nanoscout, stop_process

_FREE = {"input": 'endpoint = "tcp://127.0.0.1:0"', "output": 'endpoint = "tcp://127.0.0.1:0"',
         "query": 'endpoint = "tcp://127.0.0.1:0"', "metrics": "port = 0"}


def _config(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    """A config file with every port free (port 0) but for the sections ``extra`` gives."""
    sections = {**_FREE, **(extra or {})}
    cfg = tmp_path / "nanoscout.toml"
    cfg.write_text("".join(f"[{k}]\n{v}\n" for k, v in sections.items()), encoding="utf-8")
    return cfg


def _refused(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``nanoscout serve ARGS`` to its end; returns (exit status, its last stderr line).
    A daemon that gets as far as NANOSCOUT-READY is stopped and the test fails."""
    proc = nanoscout("serve", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise AssertionError("nanoscout serve started instead of refusing its configuration"
                             ) from None
    assert "NANOSCOUT-READY" not in out
    assert "Traceback" not in err, err
    assert " INFO " not in err, err  # refused before any model was loaded
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return proc.returncode, lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback TCP port another program listens on (another daemon on this PC)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(("section", "key", "value"), [
    ("input", "input.endpoint", 'endpoint = "tcp://127.0.0.1:{port}"'),
    ("output", "output.endpoint", 'endpoint = "tcp://127.0.0.1:{port}"'),
    ("query", "query.endpoint", 'endpoint = "tcp://127.0.0.1:{port}"'),
    ("metrics", "metrics.port", "port = {port}"),
])
def test_a_port_in_use_is_refused_before_the_models_load(
        tmp_path: Path, taken_port: int, section: str, key: str, value: str) -> None:
    # the daemon loaded its four models (seconds), then failed to bind naming only the address
    cfg = _config(tmp_path, {section: value.format(port=taken_port)})
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert str(cfg) in line and key in line and str(taken_port) in line, line
    assert "in use" in line, line


def test_an_ipc_path_another_daemon_listens_on_is_refused_before_the_models_load(
        tmp_path: Path) -> None:
    # ZeroMQ's second bind of one ipc:// path succeeds and takes the first one's frames
    import zmq

    path = tmp_path / "frames.ipc"
    ctx = zmq.Context()
    first = ctx.socket(zmq.PULL)  # the frame input of a daemon already running
    first.bind(f"ipc://{path}")
    try:
        cfg = _config(tmp_path, {"input": f'endpoint = "ipc://{path}"'})
        rc, line = _refused("--config", str(cfg))
        assert rc == 78, line
        assert "input.endpoint" in line and str(path) in line and "listens" in line, line
    finally:
        first.close(0)
        ctx.term()


def test_a_stale_ipc_file_is_not_taken_for_a_daemon(tmp_path: Path) -> None:
    from nanoscout.daemon.preflight import _ipc_in_use

    path = tmp_path / "stale.ipc"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a killed daemon's file
        s.bind(str(path))
    assert path.exists()
    assert _ipc_in_use(f"ipc://{path}") is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "live.ipc"))
        s.listen()
        assert _ipc_in_use(f"ipc://{tmp_path / 'live.ipc'}") is not None
    assert _ipc_in_use("tcp://127.0.0.1:5555") is None


def test_one_port_given_to_two_settings_is_refused_before_the_models_load(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path, {"input": f'endpoint = "tcp://127.0.0.1:{port}"',
                             "query": f'endpoint = "tcp://127.0.0.1:{port}"'})
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert "query.endpoint" in line and "input.endpoint" in line and str(cfg) in line, line


def test_a_tile_no_larger_than_its_margins_is_refused_before_the_models_load(
        tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"engine": "tile_px = 128\ntile_margin_px = 96"})
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert "engine.tile_px 128" in line and "tile_margin_px 96" in line and str(cfg) in line


def test_a_tile_off_the_network_stride_is_refused_before_the_models_load(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"engine": "tile_px = 1000"})  # the shipped detectors' stride: 16
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert "engine.tile_px 1000" in line and "stride 16" in line and str(cfg) in line, line


def test_a_missing_classifier_is_refused_before_the_detectors_load(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"classify": 'model = "nowhere/classifier.onnx"'})
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert "classify.model" in line and str(tmp_path / "nowhere" / "classifier.onnx") in line


def test_a_review_folder_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    # the daemon started and served; the first saved frame (an alert, a save request) failed
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    review = tmp_path / "a-file" / "review"
    cfg = _config(tmp_path, {"review": f'directory = "{review}"'})
    rc, line = _refused("--config", str(cfg), timeout=30)
    assert rc == 78, line
    assert "review.directory" in line and str(review) in line, line


def test_a_ready_file_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    ready = tmp_path / "a-file" / "ready"
    rc, line = _refused("--config", str(_config(tmp_path)), "--ready-file", str(ready),
                        timeout=30)
    assert rc == 78, line
    assert "--ready-file" in line and str(ready.parent) in line, line


def test_a_value_of_the_wrong_type_is_refused_with_exit_78(tmp_path: Path) -> None:
    # enabled = "no" was read as false, queue_size = 2.5 as 2
    cfg = _config(tmp_path, {"classify": 'enabled = "no"'})
    rc, line = _refused("--config", str(cfg), timeout=30)
    assert rc == 78, line
    assert str(cfg) in line and "classify.enabled" in line and "'no' (a string)" in line, line
    assert "boolean" in line, line


def test_min_confidence_for_an_uncalibrated_detector_is_refused_before_it_loads(
        tmp_path: Path) -> None:
    # the detector refused it once its engine had loaded
    cfg = _config(tmp_path, {"engine": "min_confidence = 0.5\nmodel = "
                             f'"{shipped_model_dir() / "detector_stem.onnx"}"'})
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert "engine.min_confidence 0.5" in line and "score_calibration" in line, line


@pytest.mark.parametrize(("classify", "label", "needle"), [
    ("enabled = true", "rod_wires", "unknown class label 'rod_wires'"),  # the card: rods_wires
    ("enabled = false", "rods_wires", "needs the classifier"),
])
def test_an_alert_rule_the_classifier_cannot_serve_is_refused_before_the_models_load(
        tmp_path: Path, classify: str, label: str, needle: str) -> None:
    # found once the detectors (and the classifier) had loaded
    cfg = _config(tmp_path, {"classify": classify})
    with cfg.open("a", encoding="utf-8") as f:
        f.write(f'[[alerts]]\nname = "wires"\nkind = "class"\nlabel = "{label}"\n'
                "threshold = 0.5\n")
    rc, line = _refused("--config", str(cfg))
    assert rc == 78, line
    assert "alert rule 'wires'" in line and needle in line and str(cfg) in line, line
