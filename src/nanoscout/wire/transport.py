"""ZeroMQ socket plumbing shared by the daemon and the clients: creation, binding, endpoints.

Encoding lives in :mod:`nanoscout.wire.protocol`; this module only moves bytes. Every socket is
created with ``linger=0`` so that closing never blocks on a peer that vanished.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq

from nanoscout.wire.errors import ConfigError

Policy = Literal["live", "lossless"]

#: default endpoints (loopback only; remote use needs CURVE, see README)
DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_QUERY_ENDPOINT = "tcp://127.0.0.1:5557"  # REP: AI-lens feature maps on request


def _endpoint_problem(endpoint: str) -> str | None:
    """Why ZeroMQ would not read ``endpoint`` as written, or None (see :func:`check_endpoint`)."""
    scheme, sep, address = endpoint.partition("://")
    if not sep or not scheme or not address:
        return "not TRANSPORT://ADDRESS, e.g. tcp://127.0.0.1:5555"
    if scheme != "tcp":
        return None
    host, colon, port = address.rpartition(":")
    if ";" in host:  # "tcp://source-interface;host:port"
        host = host.rsplit(";", 1)[1]
    if not colon or not host:
        return "needs tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555"
    if port != "*" and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        return f"port {port!r} must be a number within 0..65535 (0 or * = any free port when binding)"
    return None


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if ZeroMQ would read it as written, else raise :class:`ConfigError`
    saying why.

    A ``tcp://`` endpoint needs a host and a port within 0..65535 (or ``*``): ZeroMQ itself
    takes any number and keeps its low 16 bits, so ``tcp://127.0.0.1:70000`` bound or
    connected port 4464 without a word. Other transports (``ipc://``, ``inproc://``, ``ws://``
    ...) need ``scheme://`` and an address; ZeroMQ checks the rest when binding.
    """
    problem = _endpoint_problem(endpoint)
    if problem:
        raise ConfigError(f"endpoint {endpoint!r}: {problem}")
    return endpoint


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind ``sock``; port ``0`` or ``*`` picks a free port. Returns the endpoint actually bound.

    A malformed endpoint (:func:`check_endpoint`) is a :class:`ConfigError`."""
    problem = _endpoint_problem(endpoint)
    if problem:
        raise ConfigError(f"cannot bind {endpoint!r}: {problem}")
    if endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] == "0":
        endpoint = endpoint.rsplit(":", 1)[0] + ":*"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {endpoint!r}: {exc}") from exc
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect ``sock`` to ``endpoint`` (ZeroMQ reconnects by itself if the peer restarts).

    A malformed endpoint (:func:`check_endpoint`) is a :class:`ConfigError`."""
    problem = _endpoint_problem(endpoint)
    if problem:
        raise ConfigError(f"cannot connect to {endpoint!r}: {problem}")
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot connect to {endpoint!r}: {exc}") from exc


def frame_input_socket(ctx: zmq.Context, policy: Policy, *, hwm: int) -> zmq.Socket:
    """The daemon's frame input: PULL for ``lossless`` (back-pressure), SUB for ``live`` (fan-in)."""
    if policy == "lossless":
        sock = ctx.socket(zmq.PULL)
    else:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"frame")
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def frame_output_socket(ctx: zmq.Context, mode: Literal["push", "pub"], *, hwm: int) -> zmq.Socket:
    """An adapter's frame output: PUSH (matches a ``lossless`` daemon) or PUB (``live``)."""
    if mode not in ("push", "pub"):
        raise ConfigError(f"frame output mode {mode!r} must be 'push' or 'pub'")
    sock = ctx.socket(zmq.PUSH if mode == "push" else zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def result_publisher(ctx: zmq.Context, *, hwm: int) -> zmq.Socket:
    """The daemon's result PUB socket. A slow subscriber loses messages, never blocks the daemon."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def result_subscriber(
    ctx: zmq.Context, topics: tuple[str, ...], *, hwm: int = 10_000, reconnect_ms: int = 200
) -> zmq.Socket:
    """A SUB socket subscribed to each topic prefix (``""`` = everything)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    for topic in topics or ("",):
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    return sock


def mode_for_policy(policy: Policy) -> Literal["push", "pub"]:
    """The adapter socket mode that matches a daemon policy."""
    return "push" if policy == "lossless" else "pub"


# ---------------------------------------------------------------------------------------------
# CURVE: authenticated, encrypted ZeroMQ for use beyond loopback


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for anything else (``0.0.0.0``,
    ``*``, interface names, other addresses)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or "*" (all interfaces)


def is_loopback(endpoint: str) -> bool:
    """True for ``inproc://`` and ``ipc://`` endpoints and TCP endpoints on loopback
    (:func:`is_loopback_host`); False for every other transport (``tipc://``, ``ws://``,
    ``pgm://`` ...), which can reach other hosts."""
    if endpoint.startswith(("inproc://", "ipc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    if ";" in host:  # "tcp://source-interface;host:port": the address after the semicolon
        host = host.rsplit(";", 1)[1]
    return is_loopback_host(host)


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE certificate {path}: {exc}") from exc
    if secret and secret_key is None:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE identity: the daemon's public certificate and the client's own secret one."""

    server_public: Path
    client_secret: Path

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client (call before connect)."""
        server_public, _ = _load(self.server_public, secret=False)
        public, secret = _load(self.client_secret, secret=True)
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret


class CurveServer:
    """CURVE on the daemon's sockets; only clients whose public certificates lie in
    ``authorized`` may connect (checked by a ZAP authenticator thread)."""

    def __init__(self, ctx: zmq.Context, secret_file: Path, authorized: Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        if not authorized.is_dir():
            raise ConfigError(f"CURVE authorized-keys folder {authorized} does not exist")
        self._public, self._secret = _load(secret_file, secret=True)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(authorized))

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (call before bind)."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.curve_server = True

    def stop(self) -> None:
        """Stop the authenticator thread."""
        self._auth.stop()


def create_keys(folder: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new CURVE key pair ``name.key`` (public, mode 0644 less the umask) and
    ``name.key_secret`` (mode 0600) into ``folder`` (created if missing); returns both paths.

    Raises ConfigError, naming the path, when ``folder`` cannot be created or written, when
    ``name`` is not a plain file name, or when either file exists already and ``overwrite`` is
    False (replacing a deployed pair loses that identity).
    """
    import zmq.auth

    if not name or name in (".", "..") or Path(name).name != name or "\0" in name:
        raise ConfigError(f"key name {name!r} must be a plain file name (no folder)")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"key folder {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a missing or read-only parent, /proc ...
        raise ConfigError(f"cannot create the key folder {folder}: {exc.strerror or exc}"
                          ) from exc
    if not overwrite:
        there = [str(p) for p in (public, secret) if p.exists() or p.is_symlink()]
        if there:
            raise ConfigError(f"{' and '.join(there)} exist{'s' if len(there) == 1 else ''}: "
                              "a key pair is there already (--overwrite replaces it; the "
                              "identity deployed with it is then lost)")
    # pyzmq opens the files with the umask's mode (0644 under umask 022) and chmods nothing.
    # The pair is written into a fresh folder that only we can enter (mkdtemp: mode 0700) under
    # umask 077, so the secret key is 0600 from its first byte and never visible elsewhere;
    # it is then renamed into place (same file system: atomic). The umask is process-wide:
    # `keys` runs no other thread that creates files meanwhile.
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-keys-", dir=folder))
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {folder}: {exc.strerror or exc}") from exc
    try:
        umask = os.umask(0o077)
        try:
            tmp_public, tmp_secret = map(Path, zmq.auth.create_certificates(str(tmp), name))
        finally:
            os.umask(umask)
        tmp_secret.chmod(0o600)
        tmp_public.chmod(0o644 & ~umask)  # what any other file of the user gets
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {folder}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return public, secret
