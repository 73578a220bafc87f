"""Dashboard HTTP server: the page, its static files, and server-sent events.

Routes (GET, and one POST):

``/``                   the page (``static/index.html``)
``/static/<name>``      ``dashboard.js``, ``dashboard.css`` (a fixed list; nothing else is served)
``/events``             ``text/event-stream``: each client loop sends only the items that changed
                        since its last send, at most ``max_rate_hz`` batches per second, plus a
                        ``status`` event once per second (or at once when the daemon's
                        reachability flips), which doubles as the keep-alive
``/api/snapshot``       every current item as one JSON object (debugging, scripts)
``/api/lens``           ``?source=S&layer=L``: the AI lens's feature maps of ``S``'s newest
                        frame as a PNG mosaic in JSON (:meth:`LensView.view`), asked of the
                        daemon's query socket on demand; ``layer`` may be left out (the first
                        ``act_*``). 503 with ``{"error": why}`` when the daemon does not answer
                        within the lens timeout (<= 3 s by default), refuses, or the dashboard
                        has no query endpoint; 400 without ``source``
``/api/track``          ``?source=S&id=N``: the recent history of tracked particle ``N`` (its
                        ECD, position and shape per frame; the hover box's sparkline) in the
                        source's current daemon run (``daemon_run``; a restarted daemon's
                        track ``N`` is another particle, and the earlier run's is forgotten)
``/api/control``        POST ``?source=S&action=reset_statistics|set_drift_reference``, or
                        ``action=set_particle_size&low=L&high=H`` (nm; neither: none again):
                        the page's buttons, sent to the daemon's query socket (a
                        :class:`~nanoscout.wire.protocol.ControlRequest`); only with the page's
                        ``X-Nanoscout: 1`` header (no cross-site request forgery); 503 when
                        the daemon does not answer or refuses, or without a query endpoint

Model, review and annotation (v1.5 daemons; POST under the same ``X-Nanoscout: 1``, host and
token rules; 503 without a query endpoint, 400 with ``{"error": why}`` when refused;
:class:`~nanoscout.clients.dashboard.annotate.AnnotationDesk`):

``/api/model/revert``        POST: the daemon goes back to the model before its last swap
``/api/frame/save``          POST ``?source=S[&frames=N]``: the daemon writes S's newest raw
                             frame(s) as calibrated TIFF (``files`` in the answer)
``/api/annotate/freeze``     POST ``?source=S``: save S's newest frame and open it for
                             annotation from the detector's instances (picture + outlines)
``/api/annotate/add``        POST ``?id=I&x=X&y=Y``: add the particle at frame px (X, Y), its
                             outline proposed by a local threshold around the click
``/api/annotate/remove``     POST ``?id=I&x=X&y=Y``: remove the particle under the click
``/api/annotate/draw``       POST ``?id=I``, body ``{"points": [[x, y], ...]}``: add a drawn
                             outline
``/api/annotations``         GET: the open annotations (their frame and mask files)
``/api/adapt``               POST ``[?ids=I,J]``: run ``nanoscout models adapt`` on the
                             annotations in the background; GET: its state and progress
``/api/adapt/swap``          POST: hot-swap the daemon to the adapted model

A slow browser never slows the gateway: it is simply sent fewer, newer versions of each item.
An item whose payload cannot be built is left out of the snapshot and the event stream (and
counted in the status's ``payload_errors``); every other item is still sent.

Hardened like every listening socket of nanoscout: a real listen backlog, a timeout on every
request's socket (an idle half-sent request does not hold a thread), at most ``max_clients``
requests at once (more get 503 at once), a ``Host`` header check against the allowed host
names (DNS rebinding), and an optional access token (``Authorization: Bearer TOKEN``, or
``?token=TOKEN`` once, which sets a cookie for the page and its event stream). Serving a
non-loopback address requires a token (or, knowingly, ``allow_insecure_remote``).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from nanoscout.clients.dashboard.annotate import AnnotationDesk, AnnotationError
from nanoscout.clients.dashboard.gateway import DEFAULT_MAX_SOURCES, DashboardState, Gateway
from nanoscout.clients.dashboard.lens import LensView
from nanoscout.clients.query import CONTROL_ACTIONS, request_control
from nanoscout.stopping import StopEvent
from nanoscout.wire.errors import ConfigError, NanoscoutError
from nanoscout.wire.transport import ClientKeys, is_loopback_host

__all__ = ["TOKEN_COOKIE", "DashboardServer", "allowed_names", "run_dashboard"]

log = logging.getLogger("nanoscout.dashboard")

_STATIC: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _static(name: str) -> bytes:
    return (resources.files("nanoscout.clients.dashboard") / "static" / name).read_bytes()


#: the cookie that carries the access token after ``?token=`` (page and event stream)
TOKEN_COOKIE = "nanoscout_token"


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    _set_cookie: str | None = None

    def setup(self) -> None:
        super().setup()
        # reading the request and writing an answer: never wait longer than this, s
        self.connection.settimeout(self.server.request_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _allowed(self) -> bool:
        """Host header and access token checks; answers the refusal itself."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.allowed_hosts:
            self._send(f"host {host[:80]!r} is not served here (allowed: "
                       f"{', '.join(sorted(self.server.names))})\n".encode(),
                       "text/plain; charset=utf-8", HTTPStatus.MISDIRECTED_REQUEST)
            return False
        token = self.server.token
        if token is None:
            return True
        query = parse_qs(self.path.partition("?")[2])
        given = (query.get("token") or [""])[-1]
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            given = given or auth[len("Bearer "):].strip()
        cookie = SimpleCookie(self.headers.get("Cookie") or "")
        if not given and TOKEN_COOKIE in cookie:
            given = cookie[TOKEN_COOKIE].value
        if given and hmac.compare_digest(given.encode(), token.encode()):
            self._set_cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            return True
        self._send(b"a valid access token is needed (?token=... or Authorization: Bearer)\n",
                   "text/plain; charset=utf-8", HTTPStatus.UNAUTHORIZED)
        return False

    def do_GET(self) -> None:
        self._safely(self._get)

    def do_POST(self) -> None:
        """``/api/control?source=S&action=A``: a control request to the daemon (reset the
        source's statistics, set its drift reference now), and the desk's routes. Only with
        the page's own header ``X-Nanoscout: 1`` (a form on another site cannot send it: no
        cross-site request forgery), under the page's host and token rules."""
        self._safely(self._post)

    def _safely(self, handle: Callable[[], None]) -> None:
        """Run one request's handler; a failure it did not answer itself becomes a 500 with
        a JSON error (and a log line with the traceback), never a dropped connection."""
        try:
            handle()
        except OSError:  # the client went away: nobody to answer
            raise
        except Exception as exc:
            log.warning("%s %s failed", self.command, self.path[:200], exc_info=True)
            self.close_connection = True
            self._json({"error": f"internal error: {type(exc).__name__}"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _get(self) -> None:
        self._set_cookie = None
        if not self._allowed():
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(_static("index.html"), _STATIC["index.html"])
        elif path.startswith("/static/") and path[len("/static/"):] in _STATIC:
            name = path[len("/static/"):]
            self._send(_static(name), _STATIC[name])
        elif path == "/events":
            self._events()
        elif path == "/api/snapshot":
            self._send(self._snapshot().encode(), "application/json")
        elif path == "/api/lens":
            self._lens(self.path.partition("?")[2])
        elif path == "/api/track":
            self._track(self.path.partition("?")[2])
        elif path in ("/api/annotations", "/api/adapt"):
            self._desk(path, {}, b"")
        elif path == "/favicon.ico":
            self._send(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
        else:
            self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

    def _post(self) -> None:
        self._set_cookie = None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            self._json({"error": f"a request body is 0..{_MAX_BODY} bytes"},
                       HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        body = self.rfile.read(length) if length else b""
        if not self._allowed():
            return
        path, _, query = self.path.partition("?")
        if path != "/api/control" and path not in _DESK_POST:
            self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)
            return
        if self.headers.get("X-Nanoscout") != "1":
            self._json({"error": "control requests come from the dashboard page only"},
                       HTTPStatus.FORBIDDEN)
            return
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        if path != "/api/control":
            self._desk(path, args, body)
            return
        control = self.server.control
        if control is None:
            self._json({"error": "no daemon query socket: start the dashboard with --query "
                                 "(the daemon's query endpoint)"},
                       HTTPStatus.SERVICE_UNAVAILABLE)
            return
        source, action = args.get("source", ""), args.get("action", "")
        if not source or action not in CONTROL_ACTIONS:
            self._json({"error": "need source=NAME and action=" + ", ".join(CONTROL_ACTIONS)},
                       HTTPStatus.BAD_REQUEST)
            return
        size: tuple[float, float] | None = None
        if action == "set_particle_size" and (args.get("low") or args.get("high")):
            try:
                size = (float(args.get("low", "")), float(args.get("high", "")))
            except ValueError:
                self._json({"error": "set_particle_size needs low and high, numbers in nm "
                                     "(or neither, to clear the range)"},
                           HTTPStatus.BAD_REQUEST)
                return
        try:
            control(source, action, particle_size_nm=size)
        except NanoscoutError as exc:
            self._json({"error": str(exc)}, HTTPStatus.SERVICE_UNAVAILABLE)
            return
        except ValueError as exc:  # e.g. a source name the protocol does not allow
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
            return
        log.info("control request from the page: %s for %s", action, source)
        self._json({"ok": True, "source": source, "action": action})

    def _desk(self, path: str, args: dict[str, str], body: bytes) -> None:
        """The model, review and annotation routes (see the module docstring)."""
        desk = self.server.desk
        if desk is None:
            self._json({"error": "no daemon query socket: start the dashboard with --query "
                                 "(the daemon's query endpoint)"},
                       HTTPStatus.SERVICE_UNAVAILABLE)
            return
        try:
            out: Any
            if path == "/api/annotations":
                out = {"annotations": desk.annotations()}
            elif path == "/api/adapt" and self.command == "GET":
                out = desk.adapt_status()
            elif path == "/api/adapt":
                ids = [i for i in args.get("ids", "").split(",") if i]
                out = desk.adapt(ids)
            elif path == "/api/adapt/swap":
                out = desk.swap_adapted()
            elif path == "/api/model/revert":
                out = desk.revert()
            elif path == "/api/frame/save":
                out = desk.save(_arg(args, "source"), int(args.get("frames") or 1))
            elif path == "/api/annotate/freeze":
                out = desk.freeze(_arg(args, "source"))
            elif path == "/api/annotate/draw":
                points = json.loads(body or b"{}").get("points")
                if not isinstance(points, list):
                    raise AnnotationError('the body must be {"points": [[x, y], ...]}')
                out = desk.draw(_arg(args, "id"), points)
            else:
                x, y = float(_arg(args, "x")), float(_arg(args, "y"))
                edit = desk.add if path == "/api/annotate/add" else desk.remove
                out = edit(_arg(args, "id"), x, y)
        except (AnnotationError, ValueError, AttributeError, TypeError, OverflowError,
                RecursionError) as exc:  # whatever a body can hold: a 400 naming it
            log.info("%s: %s", path, exc)
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
            return
        if self.command == "POST":
            log.info("dashboard request: %s %s", path, {k: v[:40] for k, v in args.items()})
        self._json(out)

    def _track(self, query: str) -> None:
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            track_id = int(args.get("id", ""))
        except ValueError:
            self._json({"error": "which track? (/api/track?source=NAME&id=N)"},
                       HTTPStatus.BAD_REQUEST)
            return
        self._json(self.server.state.track_history(args.get("source", ""), track_id))

    def _send(self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        if self._set_cookie:
            self.send_header("Set-Cookie", self._set_cookie)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body and status != HTTPStatus.NO_CONTENT:
            self.wfile.write(body)

    def _json(self, obj: dict[str, Any], status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(obj, allow_nan=False).encode(), "application/json", status)

    def _lens(self, query: str) -> None:
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        lens = self.server.lens
        source = args.get("source", "")
        if lens is None:
            self._json({"error": "no AI lens: this dashboard was started without --query "
                                 "(the daemon's query endpoint)"}, HTTPStatus.SERVICE_UNAVAILABLE)
        elif not source:
            self._json({"error": "which source? (/api/lens?source=NAME&layer=act_enc2)"},
                       HTTPStatus.BAD_REQUEST)
        else:
            try:
                view = lens.view(source, args.get("layer") or None)
            except NanoscoutError as exc:
                log.info("lens view of %s: %s", source, exc)
                self._json({"error": str(exc), "endpoint": lens.endpoint},
                           HTTPStatus.SERVICE_UNAVAILABLE)
            except ValueError as exc:  # e.g. a source name the protocol does not allow
                self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
            else:
                self._json(view)

    def _snapshot(self) -> str:
        state = self.server.state
        items, alerts = state.updates({}, 0)
        # an item without a payload (Item.data() None: logged and counted) is left out
        texts = [(it.key, it.data()) for it in items]
        parts = [f'"{key}":{text}' for key, text in texts if text is not None]
        shown = (it.data() for _, it in alerts)
        parts.append(f'"alerts":[{",".join(t for t in shown if t is not None)}]')
        parts.append(f'"status":{json.dumps(state.status())}')
        return "{" + ",".join(parts) + "}"

    def _events(self) -> None:
        state = self.server.state
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        period = 1.0 / self.server.max_rate_hz
        sent: dict[str, int] = {}
        last_alert = 0
        last_status = -1e9
        was_connected: bool | None = None
        out = self.wfile
        try:
            out.write(b"retry: 1000\n\n")
            while not self.server.stopping.is_set():
                t0 = time.monotonic()
                version = state.version
                items, alerts = state.updates(sent, last_alert)
                chunks = []
                # an item without a payload (logged and counted) is skipped, not retried
                for it in items:
                    text = it.data()
                    if text is not None:
                        chunks.append(f"event: {it.event}\ndata: {text}\n\n")
                    sent[it.key] = it.version
                for aid, it in alerts:
                    text = it.data()
                    if text is not None:
                        chunks.append(f"event: alert\ndata: {text}\n\n")
                    last_alert = aid
                connected = state.connected()
                if connected != was_connected or t0 - last_status >= 1.0:
                    chunks.append(f"event: status\ndata: {json.dumps(state.status())}\n\n")
                    last_status, was_connected = t0, connected
                if chunks:
                    out.write("".join(chunks).encode())
                    out.flush()
                # at most max_rate_hz sends; wake early for news, and in time for the status
                spent = time.monotonic() - t0
                if spent < period:
                    self.server.stopping.wait(period - spent)
                state.wait(version, max(0.0, min(1.0, last_status + 1.0 - time.monotonic())))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the browser went away, or stopped reading


#: largest POST body (a drawn outline), bytes
_MAX_BODY = 256 * 1024
#: POST routes of the annotation desk
_DESK_POST = frozenset({"/api/model/revert", "/api/frame/save", "/api/annotate/freeze",
                        "/api/annotate/add", "/api/annotate/remove", "/api/annotate/draw",
                        "/api/adapt", "/api/adapt/swap"})


def _arg(args: dict[str, str], name: str) -> str:
    value = args.get(name, "")
    if not value:
        raise AnnotationError(f"the request needs {name}=...")
    return value


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 37\r\nRetry-After: 2\r\nConnection: close\r\n\r\n"
         b"too many dashboard clients; try later\n")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512  # the listen backlog: a crowd connecting at once is not refused

    def __init__(self, addr: tuple[str, int], state: DashboardState, max_rate_hz: float,
                 lens: LensView | None, *, max_clients: int, request_timeout_s: float,
                 names: set[str], token: str | None,
                 control: Callable[..., Any] | None = None,
                 desk: AnnotationDesk | None = None) -> None:
        self.state = state
        self.desk = desk
        self.max_rate_hz = max_rate_hz
        self.lens = lens
        self.control = control
        self.stopping = threading.Event()
        self.request_timeout_s = request_timeout_s
        self.token = token
        self._slots = threading.BoundedSemaphore(max_clients)
        super().__init__(addr, _Handler)
        port = self.server_address[1]
        self.names = names
        self.allowed_hosts = {n for name in names for n in (name, f"{name}:{port}")}

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per request, at most ``max_clients`` at once; beyond: 503 at once."""
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def allowed_names(host: str, extra: Iterable[str] = ()) -> set[str]:
    """Host names the page may be asked for under (lower case, IPv6 in brackets): loopback
    names, the served address, the machine's name when serving all interfaces, ``extra``."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    bare = host.strip("[]").lower()
    names.add(f"[{bare}]" if ":" in bare else bare)
    if bare in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    names |= {e.strip().lower() for e in extra if e.strip()}
    return names


class DashboardServer:
    """The HTTP + SSE server over a :class:`DashboardState`; ``port`` 0 picks a free port;
    ``lens`` answers ``/api/lens`` (None: 503, no query endpoint).

    ``max_clients``: requests served at once (each event stream holds one);
    ``request_timeout_s``: socket timeout of a request, s; ``allow_hosts``: more host names the
    page may be asked for (see :func:`allowed_names`); ``token``: the access token, or None.
    A non-loopback ``host`` needs a token unless ``allow_insecure_remote``. ``control``:
    sends (source, action) to the daemon's query socket for ``/api/control`` (None: 503);
    ``desk``: answers the model, review and annotation routes (None: 503).
    """

    def __init__(self, state: DashboardState, *, host: str = "127.0.0.1", port: int = 8080,
                 max_rate_hz: float = 10.0, lens: LensView | None = None,
                 max_clients: int = 256, request_timeout_s: float = 10.0,
                 allow_hosts: Iterable[str] = (), token: str | None = None,
                 allow_insecure_remote: bool = False,
                 control: Callable[..., Any] | None = None,
                 desk: AnnotationDesk | None = None) -> None:
        if max_rate_hz <= 0:
            raise ConfigError(f"max_rate_hz ({max_rate_hz}) must be > 0")
        if not 0 <= port <= 65535:  # socket's OverflowError is no OSError
            raise ConfigError(f"port ({port}) must be within 0..65535 (0: any free port)")
        if max_clients < 1 or request_timeout_s <= 0:
            raise ConfigError(f"max_clients ({max_clients}) must be >= 1 and "
                              f"request_timeout_s ({request_timeout_s}) > 0")
        if token is not None and len(token) < 16:
            raise ConfigError("the dashboard access token must have at least 16 characters")
        if not (is_loopback_host(host) or token is not None or allow_insecure_remote):
            raise ConfigError(
                f"the dashboard on {host} would be reachable from other machines without "
                "authentication: give an access token (--token-file) or, knowingly, "
                "--allow-insecure-remote")
        try:
            self._httpd = _HTTPServer((host, port), state, max_rate_hz, lens,
                                      max_clients=max_clients,
                                      request_timeout_s=request_timeout_s,
                                      names=allowed_names(host, allow_hosts), token=token,
                                      control=control, desk=desk)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc}") from exc
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the page is, e.g. ``http://127.0.0.1:8080/``."""
        host, port = self._httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes | bytearray) else str(host)
        return f"http://{'[' + name + ']' if ':' in name else name}:{port}/"

    def start(self) -> DashboardServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="dashboard-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, end the event streams and close the listening socket."""
        self._httpd.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()


def run_dashboard(endpoints: Sequence[str], *, host: str = "127.0.0.1", port: int = 8080,
                  curve: ClientKeys | None = None, stale_s: float = 3.0,
                  max_rate_hz: float = 10.0, query: str | None = None,
                  lens_timeout: float = 2.5, duration: float | None = None,
                  on_ready: Callable[[str], None] | None = None,
                  stop: threading.Event | None = None, allow_hosts: Iterable[str] = (),
                  token: str | None = None, allow_insecure_remote: bool = False,
                  max_clients: int = 256, max_sources: int = DEFAULT_MAX_SOURCES) -> int:
    """Subscribe to ``endpoints`` and serve the dashboard until interrupted (SIGINT/SIGTERM
    from the main thread, ``stop`` set, or ``duration`` s passed); ``on_ready(url)`` is called
    once the page can be loaded. ``query``: the daemon's query socket for the AI-lens view
    (asked on demand, ``lens_timeout`` s at most; None: no lens view). Returns 0; raises if
    the receiving thread fails. ``allow_hosts``, ``token``, ``allow_insecure_remote``,
    ``max_clients``: see :class:`DashboardServer`; ``max_sources``: sources kept, the least
    recently seen forgotten beyond (see :class:`DashboardState`)."""
    if not is_loopback_host(host) and token is None and allow_insecure_remote:
        log.warning("the dashboard has no authentication; %s makes it reachable from other "
                    "machines", host)
    stop = stop or threading.Event()
    signalled = StopEvent()  # what SIGINT / SIGTERM set, without a lock (nanoscout.stopping)
    signalled.on_signals()
    state = DashboardState(endpoints=endpoints, stale_s=stale_s, query=query,
                           max_sources=max_sources)
    lens = None if query is None else LensView(query, timeout=lens_timeout, curve=curve)
    control = None if query is None else functools.partial(
        request_control, query, timeout=lens_timeout, curve=curve)
    desk = None if query is None else AnnotationDesk(query, curve=curve,
                                                     timeout=max(10.0, lens_timeout))
    gateway = Gateway(endpoints, state=state, curve=curve).start()
    try:
        server = DashboardServer(state, host=host, port=port, max_rate_hz=max_rate_hz,
                                 lens=lens, allow_hosts=allow_hosts, token=token,
                                 allow_insecure_remote=allow_insecure_remote,
                                 max_clients=max_clients, control=control, desk=desk).start()
    except BaseException:
        gateway.close()
        raise
    t_end = None if duration is None else time.monotonic() + duration
    try:
        if on_ready is not None:
            on_ready(server.url)
        while not (signalled.wait(0.2) or stop.is_set()):
            gateway.check()
            if t_end is not None and time.monotonic() >= t_end:
                break
    finally:
        server.close()
        gateway.close()
        if desk is not None:
            desk.close()
    return 0
