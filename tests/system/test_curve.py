"""CURVE: only clients whose public keys the daemon holds may send frames or read results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher, PublishError
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.transport import ClientKeys, create_keys
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system


def test_authorised_clients_work_and_strangers_are_refused(
    daemon_factory: DaemonFactory,
    tmp_path: Path,
) -> None:
    server_pub, server_secret = create_keys(tmp_path / "server", "daemon")
    authorised = tmp_path / "authorised"
    create_keys(authorised, "operator")
    _, stranger_secret = create_keys(tmp_path / "elsewhere", "stranger")
    config = (
        "[security]\ncurve = true\n"
        f'server_secret_key = "{server_secret}"\nauthorized_keys = "{authorised}"\n'
    )
    d = daemon_factory("--policy", "lossless", config=config)
    friend = ClientKeys(server_pub, authorised / "operator.key_secret")
    stranger = ClientKeys(server_pub, stranger_secret)
    frame = np.full((64, 64), 100, np.uint16)

    with Subscriber(d.output, topics=("det.", "health"), curve=friend) as sub:
        sub.wait_ready()
        with Subscriber(d.output, topics=("health",), curve=stranger) as spy, \
                pytest.raises(TimeoutError):
            spy.wait_ready(timeout=2.0)
        # a stranger's adapter is refused at the handshake, and says so
        with pytest.raises(PublishError, match="refused this client's CURVE key"):
            FramePublisher(d.input, source="intruder", curve=stranger, connect_timeout_s=5)
        with FramePublisher(d.input, source="friend", curve=friend) as good:
            good.send(frame, pixel_size_nm=1.0)
            dets = []
            for msg in sub.messages(timeout=60):
                if msg.kind == "det":
                    dets.append(msg.header.source)
                    break
        health = sub.wait_ready()
    assert dets == ["friend"]
    assert health.frames_received == 1  # the stranger's frame never got in
