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


@pytest.mark.parametrize(("content", "said"), [
    (b"NANOSCOUT-READY [1, 2]\n", "is a list, not an object"),
    (b'NANOSCOUT-READY {"metrics": "notaurl"}\n', "notaurl: unknown url type"),
    (b'NANOSCOUT-READY {"metrics": null, "output": 7}\n', "'output' is 7, not an address"),
    (b'NANOSCOUT-READY {"metrics": null, "output": "garbage"}\n', "cannot connect to"),
    (b'NANOSCOUT-READY {"met\xff', "not UTF-8 text"),
])
def test_a_ready_file_that_is_not_the_daemons_is_unhealthy_with_a_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, said: str) -> None:
    """Each once raised (AttributeError, ValueError, TypeError, UnicodeDecodeError) instead of
    exiting 1 = unhealthy."""
    from nanoscout.cli.main import main

    ready = tmp_path / "ready"
    ready.write_bytes(content)
    assert main(["health", "--ready-file", str(ready), "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("UNHEALTHY: ") and said in out and "\n" not in out, out


def test_health_without_metrics_asks_the_result_socket(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    daemon_factory("--no-metrics", "--ready-file", str(ready))
    code, out = _health("--ready-file", str(ready))
    assert code == 0 and "health ok" in out, out


def test_a_metrics_endpoint_that_trickles_is_unhealthy_within_the_timeout() -> None:
    """``health --timeout 2`` once waited forever on a /metrics that sends a byte a second
    (urllib's timeout bounds each read, not the answer)."""
    import socket
    import threading
    import time

    from nanoscout.clients.healthcheck import check_endpoints

    srv = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def drip() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 100000000\r\n\r\nnanoscout_up 1\n")
            while not done.wait(0.2):  # a byte every 0.2 s: each read well within the timeout
                conn.sendall(b"#")

    server = threading.Thread(target=drip, daemon=True)
    server.start()
    try:
        t0 = time.monotonic()
        ok, what = check_endpoints(f"http://127.0.0.1:{srv.getsockname()[1]}/metrics", None,
                                   timeout=1.0)
        elapsed = time.monotonic() - t0
    finally:
        done.set()
        server.join(10)
        srv.close()
    assert not ok and "no complete answer within 1 s" in what, what
    assert elapsed < 2.0, elapsed
