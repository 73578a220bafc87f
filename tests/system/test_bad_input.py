"""Bad input over the wire: each message is rejected and counted, the daemon keeps serving."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.query import request_control
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import Buffer, encode_frame, frame_header, pack_header
from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system


def _metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus exposition text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "{}")[1:-1].split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0


def _frame(arr: np.ndarray, seq: int, **kw: Any) -> list[Buffer]:
    h = frame_header(arr, source="bad", seq=seq, t_acq_ns=time.time_ns(),
                     pixel_size_nm=kw.pop("px", 0.5), **kw)
    return encode_frame(h, arr)


def test_bad_messages_are_counted_and_the_daemon_survives(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--policy", "lossless", "--max-frame-bytes", str(1 << 20))
    good = np.full((128, 128), 1000, np.uint16)
    header = frame_header(good, source="bad", seq=0, t_acq_ns=1, pixel_size_nm=0.5)
    raw_header = header.model_dump(mode="json")

    def with_header(**changes: object) -> bytes:
        return msgpack.packb({**raw_header, **changes})

    bad_messages: dict[str, list[list[Buffer]]] = {
        "parts": [[b"garbage bytes"], [b"frame", pack_header(header)]],
        "malformed": [[b"frame", b"\xc1\xff\x00 not msgpack", good.tobytes()]],
        "version": [[b"frame", with_header(v=[2, 0]), good.tobytes()]],
        "length": [[b"frame", pack_header(header), good.tobytes()[:-2]]],
        "header": [
            [b"frame", with_header(dtype="c8"), good.tobytes()],  # unsupported dtype
            [b"frame", with_header(pixel_size_nm=-1.0), good.tobytes()],  # absurd calibration
            [b"frame", with_header(shape=[0, 128]), b""],  # negative/zero handled below too
            # a particle size range upside down
            [b"frame", with_header(particle_size_nm=[10.0, 2.0]), good.tobytes()],
        ],
        "oversized": [_frame(np.zeros((1024, 1024), np.uint16), 1)],
        "topic": [[b"frames-of-something", pack_header(header), good.tobytes()]],
    }
    nan = np.full((64, 64), 1.0, np.float32)
    nan[3, 4] = np.nan

    with Subscriber(d.output, topics=("det.", "health")) as sub:
        sub.wait_ready()
        ctx: zmq.Context = zmq.Context.instance()
        with FramePublisher(d.input, mode="push", source="bad", ctx=ctx) as pub:
            for msgs in bad_messages.values():
                for parts in msgs:
                    pub.send_raw([bytes(p) for p in parts])
            pub.send(nan, pixel_size_nm=0.5)  # NaN pixels
            seq_good = pub.send(good, pixel_size_nm=0.5)
            for msg in sub.messages(timeout=60):
                if msg.kind == "det" and msg.header.seq == seq_good:
                    break
            else:
                raise AssertionError("the good frame after the bad ones was not processed")
            health = None
            for msg in sub.messages(timeout=30):
                if msg.kind == "health" and msg.header.frames_processed >= 1:
                    health = msg.header
                    break
    assert health is not None
    rejected = health.rejected
    assert rejected.get("parts") == 2
    assert rejected.get("malformed") == 1
    assert rejected.get("version") == 1
    assert rejected.get("length") == 1
    assert rejected.get("oversized") == 1
    assert rejected.get("topic") == 1
    assert rejected.get("nonfinite") == 1
    # shape [0, 128] is a zero-size frame: rejected either as header or as empty
    assert rejected.get("header", 0) + rejected.get("empty", 0) == 4
    assert health.frames_processed == 1 and health.frames_received == 1
    assert health.last_error
    # the NaN frame (seq 0) was refused and its number taken: seq 1 follows it without a gap
    assert health.transport_gaps == 0

    text = d.scrape()
    assert _metric(text, "nanoscout_messages_rejected_total", reason="parts") == 2
    assert _metric(text, "nanoscout_messages_rejected_total", reason="oversized") == 1
    assert _metric(text, "nanoscout_messages_rejected_total", reason="nonfinite") == 1
    assert _metric(text, "nanoscout_frames_received_total", source="bad") == 1
    assert _metric(text, "nanoscout_frames_processed_total", source="bad") == 1
    assert _metric(text, "nanoscout_transport_gaps_total", source="bad") == 0
    assert _metric(text, "nanoscout_latency_seconds_count") == 1
    assert d.stop(signal.SIGTERM) == 0


def test_a_refused_frame_is_answered_and_not_lost_in_transport(
        daemon_factory: DaemonFactory) -> None:
    """A frame whose header was read but whose pixels were refused (NaN, a value beyond the
    pixel range) got no answer, so its adapter waited for it and kept it for a resend, and it
    was counted as lost in transport too once the next frame came. Now the adapter hears
    that it was dropped and why, and the numbering has no gap. A frame stamped 0 (an adapter
    clock that disagrees) held the latency percentiles at decades; its latency is now
    measured from its arrival and the frame counted."""
    d = daemon_factory("--policy", "lossless")
    good = np.random.default_rng(1).integers(900, 1100, (128, 128)).astype(np.float32)
    nan, huge = good.copy(), good.copy()
    nan[10, 10], huge[0, 0] = np.nan, 1e38
    with Subscriber(d.output, topics=("health",)) as sub:
        sub.wait_ready()
        with FramePublisher(d.input, mode="push", source="cam", results=d.output,
                            confirm_timeout_s=60) as pub:
            for img in (good, nan, huge, good):
                pub.send(img, pixel_size_nm=0.5)
            pub.send(good, pixel_size_nm=0.5, t_acq_ns=0)
            report = pub.close()
        health = None
        for msg in sub.messages(timeout=30):
            if msg.kind == "health" and msg.header.frames_processed >= 3:
                health = msg.header
                break
    assert report.sent == 5 and report.confirmed == 3 and report.unconfirmed == []
    assert report.dropped == {1: "nonfinite", 2: "pixel_range"}
    assert health is not None and health.transport_gaps == 0
    assert health.latency_ms_p99 is not None and health.latency_ms_p99 < 600_000
    text = d.scrape()
    assert _metric(text, "nanoscout_transport_gaps_total", source="cam") == 0
    assert _metric(text, "nanoscout_messages_rejected_total", reason="nonfinite") == 1
    assert _metric(text, "nanoscout_messages_rejected_total", reason="pixel_range") == 1
    assert _metric(text, "nanoscout_frames_clock_skew_total") == 1
    assert _metric(text, "nanoscout_latency_seconds_count") == 3
    assert _metric(text, "nanoscout_latency_seconds_sum") < 600


def test_a_burst_of_new_sources_keeps_the_metric_series_bounded(
        daemon_factory: DaemonFactory) -> None:
    """Live policy: frames of sources beyond ``input.max_sources`` are evicted from the queue
    before analysis, yet every name kept its Prometheus series (a burst of 2000 names made a
    1.6 MB /metrics page). A source none of whose frames was analysed keeps no series now."""
    d = daemon_factory("--policy", "live", config="[input]\nmax_sources = 4\n")
    img = np.random.default_rng(2).integers(0, 4000, (64, 64)).astype(np.uint16)
    with Subscriber(d.output, topics=("health",)) as sub:
        sub.wait_ready()
        with FramePublisher(d.input, mode="pub", source="s0") as pub:
            for k in range(300):
                h = frame_header(img, source=f"s{k}", seq=0, t_acq_ns=time.time_ns(),
                                 pixel_size_nm=0.5)
                pub.send_raw([bytes(p) for p in encode_frame(h, img)])
            health, last = None, -1
            for msg in sub.messages(timeout=60):
                if msg.kind != "health" or msg.header.frames_received == 0:
                    continue
                # settled: nothing queued and nothing new received since the last report
                if msg.header.queue_depth == 0 and msg.header.frames_received == last:
                    health = msg.header
                    break
                last = msg.header.frames_received
    assert health is not None, "the burst did not settle"
    assert health.frames_dropped.get("evicted", 0) > 0
    text = d.scrape()
    series = {line.split('"')[1] for line in text.splitlines()
              if line.startswith("nanoscout_frames_received_total{")}
    assert 1 <= len(series) <= 4, sorted(series)


def test_no_query_message_ends_the_daemon_and_refusals_are_counted(
        daemon_factory: DaemonFactory) -> None:
    """One class message with an impossible heatmap shape on the query socket ended the whole
    daemon; a request over 64 KiB hung its REQ client; a swap to a file that is no model told
    whether it existed. Now each is answered in words and counted, and frames keep flowing."""
    d = daemon_factory("--policy", "lossless")
    assert d.query is not None
    bad_heat = {"v": [1, 6], "source": "x", "seq": 0, "t_acq_ns": 0, "labels": [],
                "probabilities": [], "heatmap_shape": [-2, -3]}
    swap = {"v": [1, 6], "action": "swap_model", "model": "/etc/shadow", "sha256": "0" * 64}
    ctx: zmq.Context = zmq.Context.instance()
    errors = []
    for parts in ([b"class.x", msgpack.packb(bad_heat), b"\x00" * 6],
                  [b"lens_request.x", b"\x80" * 70_000],
                  [b"control_request", msgpack.packb(swap)]):
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 20_000)
        req.connect(d.query)
        try:
            req.send_multipart(parts)
            errors.append(msgpack.unpackb(req.recv_multipart()[1])["error"])
        finally:
            req.close()
    assert "heatmap_shape" in errors[0] and "exceeds 65536" in errors[1], errors
    assert "is not a model" in errors[2], errors
    good = np.full((128, 128), 1000, np.uint16)
    with Subscriber(d.output, topics=("det.",)) as sub, \
            FramePublisher(d.input, mode="push", source="after", ctx=ctx) as pub:
        sub.wait_ready()
        seq = pub.send(good, pixel_size_nm=0.5)
        assert any(m.header.seq == seq for m in sub.messages(timeout=60)), "no det after"
    text = d.scrape()
    assert _metric(text, "nanoscout_query_requests_total", outcome="refused") == 3
    assert _metric(text, "nanoscout_model_swap_failures_total", action="swap",
                   step="resolve") == 1
    assert d.proc.poll() is None and d.stop(signal.SIGTERM) == 0


def test_vanished_subscriber_does_not_disturb_the_daemon(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--policy", "lossless")
    frame = np.full((96, 96), 500, np.uint16)
    ctx = zmq.Context()
    with (
        Subscriber(d.output, topics=("det.",), ctx=ctx) as keeper,
        FramePublisher(d.input, source="v", ctx=ctx) as pub,
    ):
        keeper.wait_ready()
        gone = Subscriber(d.output, topics=("det.",), ctx=ctx)
        gone.wait_ready()
        pub.send(frame, pixel_size_nm=1.0)
        assert gone.recv(timeout=30) is not None
        gone.close()  # vanishes without a word
        for _ in range(5):
            pub.send(frame, pixel_size_nm=1.0)
        seqs = []
        for m in keeper.messages(timeout=60):
            seqs.append(m.header.seq)
            if len(seqs) == 6:
                break
    ctx.term()
    assert seqs[:6] == list(range(6))
    assert d.proc.poll() is None


def test_sigterm_in_lossless_mode_answers_every_frame_in_flight(daemon_factory: DaemonFactory) -> None:
    # a drain long enough for a slow machine: every frame in flight is read and answered
    d = daemon_factory("--policy", "lossless", "--queue-size", "8",
                       config="[input]\ndrain_s = 300\n")
    frame = np.random.default_rng(0).integers(0, 4000, (1024, 1024)).astype(np.uint16)
    with Subscriber(d.output, topics=("det.", "health")) as sub, \
            FramePublisher(d.input, source="term", results=d.output) as pub:
        sub.wait_ready()
        for _ in range(40):
            pub.send(frame, pixel_size_nm=0.5)
        # stop the daemon while frames wait in its queue and in the sockets' buffers
        dets, last = 0, None
        for msg in sub.messages(timeout=60):
            dets += msg.kind == "det"
            if msg.kind == "health" and msg.header.frames_received >= 8:
                break
        d.proc.send_signal(signal.SIGTERM)
        for msg in sub.messages(timeout=600, idle=120):
            if msg.kind == "det":
                dets += 1
            elif msg.kind == "health":
                last = msg.header
                if last.frames_processed >= 40:
                    break
        report = pub.close()
        code = d.proc.wait(60)
    assert code == 0
    assert last is not None and dets < 40 + 1
    assert last.frames_dropped == {}
    # every frame taken off the wire after the signal was answered, none left unanswered
    assert last.frames_received == last.frames_processed == 40 == dets
    assert report.sent == 40 and report.confirmed == 40 and report.unconfirmed == []


def test_a_frames_particle_size_range_is_used_reported_and_counted(
        daemon_factory: DaemonFactory) -> None:
    """Frames that name the range of their median particle diameter (protocol 1.8): 8 px
    particles at 1 nm/px with a range of 60-120 nm get the range's working scale ("applied"), a
    range around them keeps the estimate ("agreed"), a frame without a pixel size cannot use
    one ("uncalibrated"); each ``det`` says which, and Prometheus counts them."""
    from nanoscout.sim.synthetic import Specimen, SpecimenConfig

    d = daemon_factory("--policy", "lossless")
    cfg = SpecimenConfig(modality="TEM", shape=(512, 512), median_diameter_nm=8.0,
                         pixel_size_nm=1.0, sigma_log=0.15)
    image = Specimen.generate(cfg, 22).acquire(np.random.default_rng(6)).image
    sends = [(1.0, (60.0, 120.0)), (1.0, (5.0, 12.0)), (None, (60.0, 120.0)), (1.0, None)]
    dets: dict[int, Any] = {}
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        with FramePublisher(d.input, mode="push", source="hint") as pub:
            for px, size in sends:
                pub.send(image, pixel_size_nm=px, particle_size_nm=size)
            for msg in sub.messages(timeout=120):
                dets[msg.header.seq] = msg.header
                if len(dets) == len(sends):
                    break
    assert [dets[k].size_hint for k in range(4)] == ["applied", "agreed", "uncalibrated", None]
    assert dets[0].working_scale < 1.0 < dets[1].working_scale  # 60 px against 8 px
    assert dets[0].n < dets[1].n
    # the operator gives the source a range over the query socket (the dashboard's form):
    # its next frame without one uses it; cleared, the estimate alone again
    assert d.query is not None
    cli = nanoscout("particle-size", "hint", "60", "120", "--query", d.query,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = cli.communicate(timeout=60)
    assert cli.returncode == 0 and json.loads(out)["action"] == "set_particle_size", out
    cli = nanoscout("particle-size", "hint", "60", "--query", d.query,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = cli.communicate(timeout=60)
    assert cli.returncode == 2 and "LOW and HIGH" in out, out
    with pytest.raises(ValueError, match="low <= high"):
        request_control(d.query, "hint", "set_particle_size", particle_size_nm=(9.0, 3.0))
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        with FramePublisher(d.input, mode="push", source="hint") as pub:
            pub.seq = 4
            pub.send(image, pixel_size_nm=1.0)
            got = [next(iter(sub.messages(timeout=120))).header]
            # cleared only once that frame is out: a control request does not wait for the
            # frames queued before it
            request_control(d.query, "hint", "set_particle_size")  # none again
            pub.send(image, pixel_size_nm=1.0)
            got.append(next(iter(sub.messages(timeout=120))).header)
    assert [h.size_hint for h in got] == ["applied", None]
    assert got[0].working_scale == dets[0].working_scale
    text = d.scrape()
    for outcome, n in (("applied", 2), ("agreed", 1), ("uncalibrated", 1), ("unused", 0)):
        assert _metric(text, "nanoscout_frames_size_hint_total", outcome=outcome) == n, outcome
    assert d.stop(signal.SIGTERM) == 0
