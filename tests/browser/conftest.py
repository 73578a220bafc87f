"""Browser tests reuse the system tests' real-daemon fixture, and a fake publisher."""

from collections.abc import Iterator

import pytest
import zmq

from nanoscout.wire.transport import bind, result_publisher
from tests.system.conftest import daemon_factory  # noqa: F401 (a pytest fixture)


@pytest.fixture
def publisher() -> Iterator[tuple[zmq.Socket, str]]:
    """A PUB socket on a free loopback port standing in for a second publisher (a class engine
    of another source) or for a fake daemon: (socket, endpoint)."""
    ctx = zmq.Context()
    sock = result_publisher(ctx, hwm=1000)
    endpoint = bind(sock, "tcp://127.0.0.1:0")
    yield sock, endpoint
    sock.close(linger=0)
    ctx.term()
