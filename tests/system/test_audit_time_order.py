"""A real daemon under an adapter's broken clock and numbering: frames stamped t_acq_ns = 0 keep
their alerts rate-limited (not silenced after the first), and frame numbers that jump to the
int64 limit leave the daemon running with its gap counts at that limit."""

from __future__ import annotations

import time

import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.subscriber import Subscriber
from nanoscout.sim.synthetic import SpecimenConfig, render
from nanoscout.wire.headers import AlertHeader, DetHeader, HealthHeader
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

INT64_MAX = 2**63 - 1
CONFIG = """
[classify]
enabled = false

[[alerts]]
name = "any"
kind = "count"
above = 0
cooldown_s = 0.5

[[alerts]]
name = "big"
kind = "particle"
where = { ecd_nm = { gt = 0 } }
cooldown_s = 0.5
"""


def test_frames_stamped_at_time_zero_keep_alerting_once_per_cooldown(
        daemon_factory: DaemonFactory) -> None:
    """An adapter that stamps every frame t_acq_ns = 0 (the protocol accepts it): each rule
    fired on the first frame and never again (over 4 s of frames, 1 alert where a clock gave
    4), because the cooldown ran on the frame time alone. It now also ends after cooldown_s of
    the daemon's clock; the rate limit holds on that clock."""
    d = daemon_factory("--policy", "lossless", config=CONFIG)
    image = render(SpecimenConfig(shape=(256, 256)), 1).image
    fired: dict[str, list[int]] = {"any": [], "big": []}
    arrived: dict[int, int] = {}
    with Subscriber(d.output, topics=("det.", "alert.", "stats.")) as sub:
        sub.wait_ready()
        with FramePublisher(d.input, mode="push", source="cam") as pub:
            # frame by frame (each after the previous one's statistics) for at most 60 s
            deadline = time.monotonic() + 60.0
            for seq in range(100_000):
                if time.monotonic() > deadline:
                    break
                pub.send(image, pixel_size_nm=0.5, t_acq_ns=0)
                for msg in sub.messages(timeout=60):
                    h = msg.header
                    if isinstance(h, DetHeader):
                        assert h.t_acq_ns == 0
                        arrived[h.seq] = h.t_recv_ns
                    elif isinstance(h, AlertHeader):
                        fired[h.rule].append(h.seq)
                    elif msg.kind == "stats" and h.seq == seq:
                        break
                if min(len(v) for v in fired.values()) >= 3:
                    break
    for rule, seqs in fired.items():
        assert len(seqs) >= 3 and seqs[0] == 0, (rule, seqs, len(arrived))
        # at most one firing per 0.5 s of arrivals, and each the first frame past it
        gaps = [arrived[b] - arrived[a] for a, b in zip(seqs, seqs[1:], strict=False)]
        assert min(gaps) >= 500_000_000, (rule, gaps)
        for a, b in zip(seqs, seqs[1:], strict=False):
            assert arrived[b - 1] - arrived[a] < 500_000_000, (rule, seqs)


def test_frame_numbers_jumping_to_the_int64_limit_leave_the_daemon_running(
        daemon_factory: DaemonFactory) -> None:
    """Two sources each send frame 0 and then frame 2**63 - 1 (valid numbers): 2**64 - 4
    frames counted as lost, which no health message can carry. The publisher thread raised on
    it and the daemon stopped. The counts now stop at 2**63 - 1."""
    d = daemon_factory("--policy", "lossless", config="[classify]\nenabled = false\n")
    image = render(SpecimenConfig(shape=(128, 128)), 2).image
    with Subscriber(d.output, topics=("health", "det.")) as sub:
        sub.wait_ready()
        for source in ("a", "b"):
            with FramePublisher(d.input, mode="push", source=source) as pub:
                for seq in (0, INT64_MAX):
                    pub.seq = seq
                    pub.send(image, pixel_size_nm=0.5)
        health = None
        for msg in sub.messages(timeout=60):
            if isinstance(msg.header, HealthHeader) and msg.header.frames_processed == 4:
                health = msg.header
                break
        assert health is not None, f"no health message after the 4 frames; exit {d.proc.poll()}"
        assert health.transport_gaps == INT64_MAX
        assert health.transport_gaps_by_source == {"a": INT64_MAX - 1, "b": INT64_MAX - 1}
        # and it goes on analysing
        with FramePublisher(d.input, mode="push", source="c") as pub:
            pub.send(image, pixel_size_nm=0.5)
        for msg in sub.messages(timeout=60):
            if isinstance(msg.header, DetHeader) and msg.header.source == "c":
                break
    assert d.proc.poll() is None
    assert d.stop() == 0
