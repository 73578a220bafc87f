"""``nanoscout health``: is the local daemon alive? For container HEALTHCHECKs and monitors.

The daemon's address comes from where the daemon itself wrote it, never from a hard-coded
port: its ``--ready-file`` (``NANOSCOUT_READY_FILE`` in the container; the ``NANOSCOUT-READY``
JSON line with the bound endpoints, port 0 included) or, without one, its TOML configuration.
Alive means: ``/metrics`` answers, or (metrics off) a ``health`` message arrives on the result
socket, within the check's timeout: the whole answer, not each read of it (an endpoint that
trickles bytes is not alive), of which at most :data:`MAX_METRICS_BYTES` are read.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from nanoscout.wire.errors import NanoscoutError

__all__ = ["MAX_METRICS_BYTES", "check_endpoints", "check_ready_file", "metrics_url"]

#: the most of a ``/metrics`` answer read, bytes (a daemon's is tens of kB): the rest is not
#: waited for
MAX_METRICS_BYTES = 4 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024


def metrics_url(host: str, port: int) -> str:
    """The URL to probe a metrics server bound to ``host:port`` from this host."""
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"http://{host}:{port}/metrics"


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET ``url``: (HTTP status, the body's first :data:`MAX_METRICS_BYTES` bytes), all of it
    (connection, headers, body) within ``timeout`` s. TimeoutError when it takes longer;
    otherwise what urllib raises.

    urllib's own timeout bounds each read, not the answer; so the request runs in a daemon
    thread that is waited for at most ``timeout`` s, and that stops reading at the deadline
    (it ends at most one read, ``timeout`` s, after it)."""
    deadline = time.monotonic() + timeout
    result: list[tuple[int, bytes] | Exception] = []

    def fetch() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                body = bytearray()
                while len(body) < MAX_METRICS_BYTES:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"no complete answer within {timeout:g} s")
                    chunk = r.read1(min(_CHUNK_BYTES, MAX_METRICS_BYTES - len(body)))
                    if not chunk:
                        break
                    body += chunk
                result.append((r.status, bytes(body)))
        except Exception as exc:  # handed to the caller below
            result.append(exc)

    worker = threading.Thread(target=fetch, name="nanoscout-health-get", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if not result:
        raise TimeoutError(f"no complete answer within {timeout:g} s")
    got = result[0]
    if isinstance(got, Exception):
        raise got
    return got


def check_endpoints(metrics: str | None, results: str | None, timeout: float = 4.0
                    ) -> tuple[bool, str]:
    """(alive, what was seen): GET ``metrics`` (a URL), else wait for a health message on
    ``results`` (a ZeroMQ endpoint), at most ``timeout`` s either way. Never raises for what
    the two say: an address that is not one (a URL without a scheme, a malformed endpoint) is
    not alive either."""
    if metrics:
        try:
            status, body = _get(metrics, timeout)
        except (urllib.error.URLError, OSError, ValueError,  # ValueError: not a URL
                http.client.HTTPException) as exc:  # e.g. not HTTP at all
            return False, f"{metrics}: {exc}"
        ok = status == 200 and b"nanoscout_" in body
        return ok, f"{metrics}: {'ok' if ok else 'answers, but not with nanoscout metrics'}"
    if results:
        from nanoscout.clients.subscriber import Subscriber

        try:
            with Subscriber(results, topics=("health",)) as sub:
                h = sub.wait_ready(timeout)
        except (TimeoutError, NanoscoutError) as exc:
            return False, str(exc)
        return True, f"{results}: health ok ({h.frames_processed} frames processed)"
    return False, "neither a metrics URL nor a result endpoint to check"


def check_ready_file(path: Path, timeout: float = 4.0) -> tuple[bool, str]:
    """Check the daemon whose ``--ready-file`` is ``path``: (alive, what was seen), never an
    exception for what the file holds (not alive, saying why, when it is not the daemon's
    ``NANOSCOUT-READY`` line with a JSON object whose ``metrics`` and ``output`` are strings)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        return False, f"no ready file {path} ({exc.strerror}): the daemon is not (yet) serving"
    except UnicodeDecodeError:
        return False, f"{path} is not UTF-8 text, so not a NANOSCOUT-READY line"
    if not text.startswith("NANOSCOUT-READY "):
        return False, f"{path} is not a NANOSCOUT-READY line"
    try:
        ep = json.loads(text.split(" ", 1)[1])
    except ValueError as exc:
        return False, f"{path}: bad JSON ({exc})"
    if not isinstance(ep, dict):
        return False, f"{path}: the NANOSCOUT-READY JSON is a {type(ep).__name__}, not an object"
    for key in ("metrics", "output"):
        if not isinstance(ep.get(key), str | None):
            return False, f"{path}: {key!r} is {ep[key]!r}, not an address"
    return check_endpoints(ep.get("metrics"), ep.get("output"), timeout)
