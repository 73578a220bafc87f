"""The dashboard under a crowd and against careless or hostile requests: a real listen backlog,
request timeouts, a bounded number of clients, a Host check and an optional access token."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from nanoscout.clients.dashboard import DashboardServer, DashboardState
from nanoscout.wire.errors import ConfigError
from tests.system.conftest import nanoscout, stop_process, wait_ready

pytestmark = pytest.mark.system

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def page() -> Iterator[tuple[str, int]]:
    """A real ``nanoscout dashboard`` process (no daemon needed: status events flow anyway)."""
    proc = nanoscout("dashboard", "--results", "tcp://127.0.0.1:9", "--port", "0",
                     stdout=subprocess.PIPE)
    try:
        url = urlparse(wait_ready(proc, "dashboard", 60)[0]["dashboard"])
        assert url.hostname is not None and url.port is not None
        yield url.hostname, url.port
    finally:
        stop_process(proc)


def _first_event_s(host: str, port: int, t0: float, out: list[float | None], i: int) -> None:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/events")
        resp = conn.getresponse()
        assert resp.status == 200
        while True:
            line = resp.fp.readline()
            if not line:
                break
            if line.startswith(b"event:"):
                out[i] = time.monotonic() - t0
                break
        conn.close()
    except (OSError, AssertionError):
        out[i] = None


def test_a_hundred_browsers_at_once_all_get_events_within_5_s(page: tuple[str, int]) -> None:
    host, port = page
    n = 100
    got: list[float | None] = [None] * n
    t0 = time.monotonic()
    threads = [threading.Thread(target=_first_event_s, args=(host, port, t0, got, i))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    times = [g for g in got if g is not None]
    assert len(times) == n, f"{n - len(times)} of {n} clients got no event"
    assert max(times) < 5.0, f"slowest first event after {max(times):.2f} s"
    print(f"{n} clients: first events within {max(times):.2f} s (median "
          f"{sorted(times)[n // 2]:.2f} s)")


def test_foreign_host_headers_are_refused(page: tuple[str, int]) -> None:
    host, port = page
    for name, status in (("127.0.0.1", 200), (f"localhost:{port}", 200),
                         ("evil.example", 421), (f"evil.example:{port}", 421)):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/api/snapshot", headers={"Host": name})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == status, name


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    srv = DashboardServer(DashboardState(), port=0, max_clients=4, request_timeout_s=1.0,
                          token=TOKEN).start()
    try:
        yield srv
    finally:
        srv.close()


def _get(srv: DashboardServer, path: str, headers: dict[str, str] | None = None
         ) -> http.client.HTTPResponse:
    url = urlparse(srv.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_the_access_token_guards_every_route(server: DashboardServer) -> None:
    assert _get(server, "/api/snapshot").status == 401
    assert _get(server, "/api/snapshot?token=wrong-token-of-some-length").status == 401
    ok = _get(server, f"/?token={TOKEN}")
    assert ok.status == 200
    cookie = ok.getheader("Set-Cookie") or ""
    assert cookie.startswith("nanoscout_token=") and "HttpOnly" in cookie
    assert _get(server, "/api/snapshot", {"Cookie": cookie.split(";")[0]}).status == 200
    assert _get(server, "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"}).status == 200


def test_idle_half_sent_requests_time_out_and_clients_are_bounded(server: DashboardServer
                                                                   ) -> None:
    url = urlparse(server.url)
    idle = socket.create_connection((url.hostname or "", url.port or 0), timeout=10)
    idle.sendall(b"GET /api/snapshot HTTP/1.1\r\nHost: 127.0.0.1")  # never finished
    t0 = time.monotonic()
    assert idle.recv(100) == b""  # the server gave up on it
    assert time.monotonic() - t0 < 5.0
    idle.close()
    # four open event streams hold the four request slots: a fifth request is turned away
    streams = []
    for _ in range(4):
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        conn.request("GET", "/events", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.fp.readline()
        streams.append(conn)
    busy = _get(server, "/api/snapshot", {"Authorization": f"Bearer {TOKEN}"})
    assert busy.status == 503
    for conn in streams:
        conn.close()


def test_a_non_loopback_page_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        DashboardServer(DashboardState(), host="0.0.0.0", port=0)
    with pytest.raises(ConfigError, match="at least 16"):
        DashboardServer(DashboardState(), port=0, token="short")


@pytest.mark.parametrize("port", [70000, -1])
def test_a_port_beyond_0_65535_is_a_config_error(port: int) -> None:
    """Once an OverflowError traceback (``dashboard --port 70000``): not an OSError."""
    with pytest.raises(ConfigError, match=f"port \\({port}\\) must be within 0..65535"):
        DashboardServer(DashboardState(), port=port)
