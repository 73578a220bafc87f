"""Audit of ``nanoscout record`` cut short: after ``kill -9`` the run's provenance still names
the models with their hashes and the rows written; a write that fails (a full disk) is one
line that says what the run holds. A real ``record`` process against a publisher of real
encoded results over ``ipc://``."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from nanoscout.clients.runfile import read_run
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import DetHeader, HealthHeader, encode_message
from tests.conftest import REPO, wait_until
from tests.system.conftest import nanoscout

pytestmark = pytest.mark.system

MODEL = "nanoscout-particle-unet:3.0.0"  # the shipped detector, whose card record reads

HEALTH = encode_message(HealthHeader(
    t_ns=1, uptime_s=1.0, policy="lossless", engines={}, frames_received=0,
    frames_processed=0, frames_dropped={}, rejected={}, transport_gaps=0, queue_depth=0,
    fps=0.0, latency_ms_p50=None, latency_ms_p99=None))


def _det(seq: int) -> list:
    table = empty_table(3)
    table["id"] = [1, 2, 3]
    table["ecd_nm"] = [5.0, 6.0, 7.0]
    return encode_message(DetHeader(source="cam", seq=seq, topic_seq=seq, t_acq_ns=1 + seq,
                                    t_recv_ns=2 + seq, t_done_ns=3 + seq, pixel_size_nm=0.5,
                                    units="nm", n=3, engine="onnxruntime-cpu", model=MODEL,
                                    shape=(64, 64)), table)


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[tuple[str, zmq.Socket]]:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/results"
    pub.bind(endpoint)
    try:
        yield endpoint, pub
    finally:
        pub.close(linger=0)
        ctx.term()


def _recorder(endpoint: str, out: Path, pub: zmq.Socket, *args: str
              ) -> subprocess.Popen[str]:
    rec = nanoscout("record", "--results", endpoint, "--out", str(out), *args,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    meta = out / "_run.json"

    def subscribed() -> bool:
        pub.send_multipart(HEALTH)
        return meta.exists() and "subscribed_utc" in meta.read_text()

    wait_until(subscribed, timeout=60, what="recorder subscribed")
    return rec


def test_kill_9_leaves_the_models_hashes_and_rows_in_the_provenance(
        publisher: tuple[str, zmq.Socket], tmp_path: Path) -> None:
    """The provenance was written at start and at a clean stop only: after ``kill -9`` it
    named no model, so ``nanoscout report`` wrote "no model card was available to the
    recorder: its sizing error is unknown" and no ONNX hash, and it held no row counts."""
    endpoint, pub = publisher
    out = tmp_path / "run.parquet"
    rec = _recorder(endpoint, out, pub, "--batch-frames", "2", "--batch-seconds", "3600")
    try:
        for seq in range(4):
            pub.send_multipart(_det(seq))
        wait_until(lambda: json.loads((out / "_run.json").read_text()).get("rows", {})
                   .get("frames") == 4, timeout=20, what="two batches and their provenance")
    finally:
        rec.send_signal(signal.SIGKILL)
        rec.communicate(timeout=30)
    prov = json.loads((out / "_run.json").read_text())
    assert "stopped_utc" not in prov  # it really was killed
    card = json.loads((REPO / "models" / "weights" / "detector.json").read_text())
    (entry,) = prov["model_provenance"]
    assert entry["model"] == MODEL and entry["sha256"] == card["sha256"]
    assert entry["sizing_error"]
    assert prov["rows"] == {"particles": 12, "frames": 4, "alerts": 0, "stats": 0}
    assert prov["missed_results_total"] == 0 and prov["engines"] == ["onnxruntime-cpu"]
    run = read_run(out)
    assert run.rows(run.frames) == 4 and run.rows(run.particles) == 12


def test_a_write_that_fails_is_one_line_that_says_what_the_run_holds(
        publisher: tuple[str, zmq.Socket], tmp_path: Path) -> None:
    """A full disk (ENOSPC, seen with a 3 MB tmpfs) ended ``record`` in a 40-line pyarrow
    traceback that said neither which run nor what it held."""
    endpoint, pub = publisher
    out = tmp_path / "run.parquet"
    rec = _recorder(endpoint, out, pub, "--batch-frames", "2", "--batch-seconds", "3600")
    try:
        for seq in range(2):
            pub.send_multipart(_det(seq))
        wait_until(lambda: read_run(out).rows(read_run(out).frames) == 2, timeout=30,
                   what="the first batch")
        frames = out / "_frames"
        frames.rename(tmp_path / "frames-aside")
        frames.write_text("the frames table cannot be written now")
        for seq in range(2, 4):
            pub.send_multipart(_det(seq))
        _, err = rec.communicate(timeout=30)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.communicate(timeout=30)
    assert rec.returncode == 2, err
    line = err.strip()
    assert line.startswith("nanoscout record: error: cannot write the run ") and "\n" not in line
    assert "the last 2 frames were not recorded, the run holds 2 frames" in line
    frames.unlink()
    (tmp_path / "frames-aside").rename(frames)
    run = read_run(out)
    assert run.frames["seq"].tolist() == [0, 1]
    assert np.array_equal(np.sort(run.particles["seq"]), [0, 0, 0, 1, 1, 1])
