"""A fake daemon's result socket for client tests: a real pyzmq XPUB on a free loopback port,
the heartbeat it sends, and a wait for a client's subscriptions (the tests then send the
documented wire messages, malformed or not, that a real daemon would not)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import zmq

from nanoscout.wire.protocol import HealthHeader, encode_message

#: the fake daemon's run (its start, ns since the epoch), for tests that name it
RUN = 1_765_000_000_000_000_000


@contextlib.contextmanager
def publisher() -> Iterator[tuple[zmq.Socket, str]]:
    """A fake daemon's result socket (XPUB, verbose: every subscription is seen; no
    high-water mark) on a free loopback port: (socket, endpoint)."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    try:
        yield pub, f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    finally:
        pub.close(linger=0)
        ctx.term()


def health(topic_seq: int, run: int | None = None) -> list:
    """A heartbeat numbered ``topic_seq`` (of the daemon run ``run``, or none named)."""
    return encode_message(HealthHeader(
        t_ns=time.time_ns(), uptime_s=1.0, policy="live", engines={"detector": "onnx/cpu"},
        frames_received=0, frames_processed=0, frames_dropped={}, rejected={},
        transport_gaps=0, queue_depth=0, fps=0.0, latency_ms_p50=None, latency_ms_p99=None,
        topic_seq=topic_seq, started_ns=run))


def wait_subscribed(pub: zmq.Socket, topics: set[bytes], timeout: float = 60.0) -> None:
    """Wait until subscriptions to all of ``topics`` arrived at ``pub``."""
    deadline = time.monotonic() + timeout
    missing = set(topics)
    while missing and time.monotonic() < deadline:
        if pub.poll(200):
            message = pub.recv()
            if message[:1] == b"\x01":
                missing.discard(message[1:])
    if missing:
        raise TimeoutError(f"no subscription to {missing} within {timeout} s")
