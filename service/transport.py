"""ZeroMQ socket plumbing shared by the daemon and the clients: creation, binding, endpoints.

Encoding lives in :mod:`service.protocol`; this module only moves bytes. Every socket is
created with ``linger=0`` so that closing never blocks on a peer that vanished.
"""

from __future__ import annotations

from typing import Literal

import zmq

from service.errors import ConfigError

Policy = Literal["live", "lossless"]

#: default endpoints (loopback only; remote use needs CURVE, see README)
DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:5556"


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind ``sock``; port ``0`` or ``*`` picks a free port. Returns the endpoint actually bound."""
    if endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] == "0":
        endpoint = endpoint.rsplit(":", 1)[0] + ":*"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {endpoint!r}: {exc}") from exc
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect ``sock`` to ``endpoint`` (ZeroMQ reconnects by itself if the peer restarts)."""
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
