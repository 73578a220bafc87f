"""A facility engineer's configuration mistakes, as ``nanoscout serve`` and the clients meet them:
refused at start in one line naming the file and key, or read as the engineer meant."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from nanoscout.analysis.modelcard import shipped_model_dir
from tests.conftest import REPO
from tests.system.conftest import nanoscout, start_daemon, stop_process

_FREE_PORTS = ('[output]\nendpoint = "tcp://127.0.0.1:0"\n[query]\nendpoint = "tcp://127.0.0.1:0"\n'
               '[metrics]\nport = 0\n[classify]\nenabled = false\n')


def _refusal(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``nanoscout ARGS`` to its end; a daemon that gets as far as NANOSCOUT-READY is
    stopped and reported as having started (exit status None in the message)."""
    proc = nanoscout(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise AssertionError(f"nanoscout {args[0]} ran on instead of refusing its "
                             "configuration") from None
    return proc.returncode, out, err


def test_a_tcp_port_beyond_65535_is_refused_at_start_naming_file_and_key(tmp_path: Path) -> None:
    # ZeroMQ keeps the port's low 16 bits: the daemon bound tcp://127.0.0.1:4464 for 70000 and
    # printed NANOSCOUT-READY, so the adapters configured with 70000 never reached it
    cfg = tmp_path / "nanoscout.toml"
    cfg.write_text('[input]\nendpoint = "tcp://127.0.0.1:70000"\n' + _FREE_PORTS, encoding="utf-8")
    rc, out, err = _refusal("serve", "--config", str(cfg))
    assert "NANOSCOUT-READY" not in out
    assert rc == 78, err  # EX_CONFIG: serve's configuration refused at start-up
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert str(cfg) in line and "input.endpoint" in line and "0..65535" in line, line


def test_a_malformed_endpoint_flag_is_refused_before_the_models_load(tmp_path: Path) -> None:
    cfg = tmp_path / "nanoscout.toml"
    cfg.write_text('[input]\nendpoint = "tcp://127.0.0.1:0"\n' + _FREE_PORTS, encoding="utf-8")
    rc, _out, err = _refusal("serve", "--config", str(cfg), "--results", "tcp://127.0.0.1:notaport")
    assert rc == 78 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "output.endpoint (from the command line)" in line and "0..65535" in line, line
    assert "INFO" not in err  # refused before any model was loaded (those log at INFO)


def test_a_client_refuses_a_port_beyond_65535(tmp_path: Path) -> None:
    # tail connected to port 4464, reported the daemon UNREACHABLE and exited 0
    rc, _out, err = _refusal("tail", "--results", "tcp://127.0.0.1:70000", "--duration", "1")
    assert rc == 2, err
    assert "port '70000' must be a number within 0..65535" in err.strip().splitlines()[-1]


def test_a_relative_model_path_is_read_beside_the_config_file(tmp_path: Path) -> None:
    # `model = "detector.onnx"` beside the config: read against the daemon's working directory
    # it was "model card detector.json is missing" (or another folder's detector.onnx)
    site = tmp_path / "site"
    site.mkdir()
    for name in ("detector.onnx", "detector.json"):
        shutil.copy(shipped_model_dir() / name, site / name)
    assert not (REPO / "detector.onnx").exists()  # the daemon's working directory
    cfg_text = '[engine]\nmodel = "detector.onnx"\nmodality_models = {}\n[classify]\nenabled = false\n'
    d = start_daemon(site, config=cfg_text, timeout=120)
    try:
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0
