"""Audit (2026-12-07): the dashboard page in real headless Chromium beside a fake daemon (a
real pyzmq socket on loopback) whose messages cannot all be used.

* A daemon of another major protocol version: every message refused by the gateway. The
  snapshot said ``connected: true, messages 90, rejected 90, last_rejection "protocol major
  version 2 ..."``, but the page showed a green "daemon connected" over a page that never
  changed. It now says that the results are refused and why.
* A ``det`` stamped done before its frame arrived (``t_done_ns`` 0): the page showed a latency
  of -1000000000100 ms; it now says the latency is unknown.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import DetHeader, encode_message
from tests.browser.test_dashboard import (
    CHROMIUM,
    LAUNCH_ARGS,
    _publish_until,
    _sync_playwright,
    start_dashboard,
)
from tests.fake_daemon import RUN, health

pytestmark = [pytest.mark.system, pytest.mark.browser]

def _det(topic_seq: int, t_done_ns: int) -> list:
    t = 10**18 + topic_seq * 10**8
    return encode_message(DetHeader(
        source="cam", seq=topic_seq, t_acq_ns=t, t_recv_ns=t + 10**6, t_done_ns=t_done_ns,
        pixel_size_nm=0.5, units="nm", n=0, engine="x", topic_seq=topic_seq, daemon_run=RUN),
        empty_table(0))


def _v2(parts: list) -> list:
    """``parts`` (an encoded message) as a daemon of protocol 2.0 would send it."""
    header = msgpack.unpackb(bytes(parts[1]))
    return [parts[0], msgpack.packb(header | {"v": [2, 0]}), *parts[2:]]


@contextlib.contextmanager
def _page(endpoint: str) -> Iterator[Any]:
    """The dashboard of the results at ``endpoint``, open in headless Chromium."""
    sync_playwright = _sync_playwright()
    dash, url = start_dashboard(endpoint)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            page = browser.new_page()
            page.goto(url)
            yield page
            browser.close()
    finally:
        dash.send_signal(signal.SIGINT)
        dash.wait(30)


def _shown(page: Any, sock: zmq.Socket, make: Any, js: str, timeout: float) -> None:
    """:func:`_publish_until`, failing with what the page showed instead."""
    try:
        _publish_until(page, sock, make, js, timeout)
    except TimeoutError:
        pytest.fail(f"the page showed: pill {page.inner_text('#conn')!r}, banner "
                    f"{page.inner_text('#banner')!r}, latency "
                    f"{page.inner_text('#frame-latency')!r}")


def test_the_page_says_when_every_message_is_refused_and_why(
        publisher: tuple[zmq.Socket, str]) -> None:
    """All of a protocol-2 daemon's messages are refused: the page says so in red, with the
    reason, instead of a green "daemon connected"; once readable results come again the
    pill is "daemon connected" again, without the red banner."""
    sock, endpoint = publisher
    k = iter(range(1, 10**6))
    refused = ("() => { const p = document.getElementById('conn'), b = document.getElementById("
               "'banner'); return p.textContent === 'results refused' && p.classList.contains("
               "'pill-bad') && !b.hidden && b.textContent.includes('protocol major version 2'); }")
    again = ("() => document.getElementById('conn').textContent.startsWith('daemon connected') "
             "&& document.getElementById('banner').hidden")
    with _page(endpoint) as page:
        def v2() -> list:
            n = next(k)
            sock.send_multipart(_v2(health(n, RUN)))
            return _v2(_det(n, 10**18 + n * 10**8 + 5 * 10**6))

        _shown(page, sock, v2, refused, 60)
        assert "cannot be read" in page.inner_text("#banner")
        _shown(page, sock, lambda: health(next(k), RUN), again, 30)


def test_the_page_says_a_latency_is_unknown_rather_than_negative(
        publisher: tuple[zmq.Socket, str]) -> None:
    """A det stamped done at 0, before its frame arrived: the top bar showed a latency of
    -1000000000100 ms; it says "unknown"."""
    sock, endpoint = publisher
    k = iter(range(1, 10**6))
    unknown = "() => document.getElementById('frame-latency').textContent === 'unknown'"
    with _page(endpoint) as page:
        _shown(page, sock, lambda: _det(next(k), 0), unknown, 60)
        assert "-1000000000" not in page.inner_text("body")
