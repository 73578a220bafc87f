"""``nanoscout health`` (the containers' HEALTHCHECK) against a real daemon: it finds the daemon
where the daemon said it is (the ready file, or the config's metrics port), never a fixed port."""

from __future__ import annotations

import subprocess
import urllib.parse
from pathlib import Path

import pytest

from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system


def _health(*args: str) -> tuple[int, str]:
    proc = nanoscout("health", *args, "--timeout", "5", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_health_follows_the_ready_file_and_the_config(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    d = daemon_factory("--ready-file", str(ready))
    code, out = _health("--ready-file", str(ready))
    assert code == 0 and out.startswith("healthy: http://127.0.0.1:"), out
    port = urllib.parse.urlparse(d.metrics).port
    cfg = tmp_path / "metrics.toml"
    cfg.write_text(f"[metrics]\nport = {port}\n", encoding="utf-8")
    code, out = _health("--config", str(cfg))
    assert code == 0, out
    assert d.stop() == 0
    code, out = _health("--ready-file", str(ready))
    assert code == 1 and out.startswith("UNHEALTHY"), out
    code, out = _health("--ready-file", str(tmp_path / "never-written"))
    assert code == 1 and "no ready file" in out


def test_health_without_metrics_asks_the_result_socket(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    daemon_factory("--no-metrics", "--ready-file", str(ready))
    code, out = _health("--ready-file", str(ready))
    assert code == 0 and "health ok" in out, out
