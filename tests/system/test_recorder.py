"""``nanoscout record`` beside a live daemon: complete, crash-safe, and reportable."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.clients.runfile import Run, read_run
from nanoscout.clients.subscriber import Subscriber
from tests.conftest import wait_until
from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system

#: a rule that fires on most frames, so alerts are recorded too
ALERTS = """
[[alerts]]
name = "big-one"
kind = "particle"
severity = "warning"
where = { ecd_nm = { gt = 9 } }
cooldown_s = 0.0
"""


def _start_recorder(output: str, out: Path, *args: str) -> subprocess.Popen[str]:
    rec = nanoscout("record", "--results", output, "--out", str(out), *args,
                    stdout=subprocess.PIPE)
    meta = out / "_run.json" if out.suffix == ".parquet" else out.with_suffix(".json")
    wait_until(lambda: meta.exists() and "subscribed_utc" in meta.read_text(), timeout=60,
               what="recorder subscribed")
    return rec


def test_recorded_run_holds_every_particle_the_subscriber_saw(daemon_factory: DaemonFactory, tmp_path: Path
                                                               ) -> None:
    d = daemon_factory("--policy", "lossless", config=ALERTS)
    out = tmp_path / "run.parquet"
    n = 12
    with Subscriber(d.output, topics=("det.", "alert.")) as sub:
        sub.wait_ready()
        rec = _start_recorder(d.output, out, "--frames", str(n), "--batch-frames", "5",
                              "--rois", str(tmp_path / "rois"))
        sim = nanoscout("simulate", "--frames-endpoint", d.input, "--mode", "push", "--frames", str(n),
                        "--size", "384", "--rate", "0", "--seed", "4242",
                        stdout=subprocess.DEVNULL)
        seen: dict[int, int] = {}
        alerts = 0
        for msg in sub.messages(timeout=120):
            if msg.kind == "det":
                seen[msg.header.seq] = msg.header.n  # type: ignore[attr-defined]
            else:
                alerts += 1
            if len(seen) == n:
                break
        assert sim.wait(60) == 0
        stdout, _ = rec.communicate(timeout=60)
    assert rec.returncode == 0, stdout
    run = read_run(out)
    assert sorted(run.frames["seq"].tolist()) == list(range(n))
    assert run.rows(run.particles) == sum(seen.values()) > 100
    # per frame, too, and every particle row belongs to a recorded frame
    per_frame = dict(zip(*np.unique(run.particles["seq"], return_counts=True), strict=True))
    assert {int(k): int(v) for k, v in per_frame.items()} == {k: v for k, v in seen.items() if v}
    assert run.rows(run.alerts) >= 1 and alerts >= 1
    assert set(run.alerts["rule"].tolist()) == {"big-one"}
    assert (run.particles["units"] == "nm").all()
    assert np.allclose(run.particles["pixel_size_nm"], 0.5)
    assert np.isfinite(run.particles["stage_x_um"]).all()
    assert len(list(out.glob("part-*.parquet"))) >= 3  # batches of 5 frames
    prov = json.loads((out / "_run.json").read_text())
    assert prov["rows"]["particles"] == run.rows(run.particles)
    assert prov["missed_results"] == {} and prov["daemon_policy"] == "lossless"
    assert "recorded 12 frames" in stdout
    # provenance: software, options, and the model with its hash and card's sizing error
    assert prov["format"] == "nanoscout-run/2" and prov["software"]["nanoscout"]
    assert prov["config"]["batch_frames"] == 5
    (det_model,) = [m for m in prov["model_provenance"] if "unet" in m["model"]]
    assert len(det_model["sha256"]) == 64 and det_model["sizing_error"]
    # pandas reads the run root; statistics with clusters after every frame; ImageJ ROI sets
    import pandas as pd
    import roifile

    df = pd.read_parquet(out)
    assert len(df) == run.rows(run.particles) and str(df["t_acq"].dtype) == "datetime64[ns, UTC]"
    stats = pd.read_parquet(out / "_stats")
    # --frames N records the Nth frame's statistics too (the daemon publishes them after its
    # detections: the recorder once stopped on the detections and lost them)
    assert sorted(stats["seq"].tolist()) == list(range(n))
    assert (stats["window_ecd_d50"] > 0).all()
    assert stats["clusters"].str.contains('"k"').any()
    # a clean stop writes the tracks table, as read_run computes it
    tracks = pd.read_parquet(out / "_tracks")
    assert len(tracks) == run.rows(run.tracks) > 0 and prov["rows"]["tracks"] == len(tracks)
    rois = sorted((tmp_path / "rois").glob("*.rois.zip"))
    assert len(rois) == n
    first = int(run.frames["n"][np.argmin(run.frames["seq"])])
    roi_set = roifile.roiread(rois[0])
    assert isinstance(roi_set, list) and len(roi_set) == first

    report = tmp_path / "run_report.html"
    proc = nanoscout("report", str(out), "--out", str(report), stdout=subprocess.PIPE)
    rep_out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rep_out
    html = report.read_text()
    assert "big-one" in html and "D50" in html and ".png" in html


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_daemon_restart_mid_recording_never_joins_the_tracks_of_two_runs(tmp_path: Path
                                                                          ) -> None:
    """A restarted daemon numbers its tracks (and fields) from 1 again: the recording once
    put the new run's track 1 and the old run's track 1 under one id, and the tracks table and
    the report took them for one particle. Each row now names its daemon run."""
    from nanoscout.clients.report import build_report
    from tests.system.conftest import start_daemon

    n1, n2 = 6, 6
    args = ("--policy", "lossless", "--results", f"tcp://127.0.0.1:{_free_port()}")
    config = "[classify]\nenabled = false\n"
    out = tmp_path / "run.parquet"
    first = start_daemon(tmp_path, *args, config=config)
    procs = [first.proc]
    try:
        rec = _start_recorder(first.output, out, "--frames", str(n1 + n2), "--batch-frames", "4")
        procs.append(rec)
        sim = nanoscout("simulate", "--frames-endpoint", first.input, "--mode", "push",
                        "--frames", str(n1), "--size", "384", "--rate", "0", "--seed", "31",
                        "--insitu", stdout=subprocess.DEVNULL)
        assert sim.wait(120) == 0  # every frame answered
        assert first.stop() == 0  # publishes what it analysed, then exits
        t_restart = time.time_ns()
        second = start_daemon(tmp_path, *args, config=config)  # the same result endpoint
        procs.append(second.proc)
        # frames until the recorder has its n2 from the new daemon (it reconnects by itself)
        sim = nanoscout("simulate", "--frames-endpoint", second.input, "--mode", "push",
                        "--size", "384", "--rate", "4", "--seed", "32", "--insitu",
                        stdout=subprocess.DEVNULL)
        procs.append(sim)
        stdout, _ = rec.communicate(timeout=240)
        assert rec.returncode == 0, stdout
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
    run = read_run(out)
    f, p, t = run.frames, run.particles, run.tracks
    before = f["t_acq_ns"] < t_restart
    assert int(before.sum()) == n1 and int((~before).sum()) == n2
    # both daemons numbered their tracks from 1: the ids overlap, the particles do not
    ids = p["track_id"][p["track_id"] > 0]
    early = p["t_acq_ns"][p["track_id"] > 0] < t_restart
    assert set(ids[early].tolist()) & set(ids[~early].tolist())
    # no track spans the restart, and the tracks table has one row per (run, track)
    assert Run.rows(t) > 0
    assert not ((t["t_first_ns"] < t_restart) & (t["t_last_ns"] > t_restart)).any()
    runs = p["daemon_run"][p["track_id"] > 0]
    assert Run.rows(t) == len({(int(r), int(i)) for r, i in zip(runs, ids, strict=True)})
    assert int(t["n_frames"].max()) <= max(n1, n2)
    # every row names its daemon run: the old one's before the restart, the new one's after
    (old,) = set(f["daemon_run"][before].tolist())
    (new,) = set(f["daemon_run"][~before].tolist())
    assert 0 < old < t_restart < new
    assert set(t["daemon_run"].tolist()) == {old, new}
    assert set(run.stats["daemon_run"].tolist()) == {old, new}
    assert json.loads((out / "_run.json").read_text())["daemon_runs"] == [old, new]
    html = build_report(out, tmp_path / "report.html", formats=("png",)).read_text()
    assert '<span class="n-daemon-runs">2</span> daemon runs' in html


@pytest.mark.parametrize("name", ["run.parquet", "run.csv"])
def test_kill_9_leaves_a_readable_run(daemon_factory: DaemonFactory, tmp_path: Path, name: str) -> None:
    d = daemon_factory("--policy", "lossless")
    out = tmp_path / name
    rec = _start_recorder(d.output, out, "--batch-frames", "2", "--batch-seconds", "0.3")
    sim = nanoscout("simulate", "--frames-endpoint", d.input, "--mode", "push", "--size", "256",
                    "--rate", "20", "--seed", "7", stdout=subprocess.DEVNULL)
    try:
        meta = out / "_run.json" if out.suffix == ".parquet" else out.with_suffix(".json")
        # wait until a few batches are on disk, then kill the recorder without warning
        wait_until(lambda: read_run(out).rows(read_run(out).frames) >= 6, timeout=90,
                   what="six recorded frames")
        rec.send_signal(signal.SIGKILL)
        rec.communicate(timeout=10)
        time.sleep(0.2)  # allowed: let the simulator keep sending after the kill
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(30)
    run = read_run(out)
    frames = set(run.frames["seq"].tolist())
    assert len(frames) >= 6
    # whole batches only: every particle row's frame was written with it
    assert set(run.particles["seq"].tolist()) <= frames
    assert "stopped_utc" not in json.loads(meta.read_text())  # it really was killed
    if out.suffix == ".parquet":
        assert not list(out.rglob("part-*.parquet.tmp"))  # no torn part counted


def test_no_daemon_or_bad_options_are_one_line_errors_and_leave_no_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``record`` once waited 30 s whatever ``--duration`` said, ended in a TimeoutError
    traceback and left an empty RUN.parquet that refused the retry; a garbage endpoint left one
    too, and ``--batch-frames 0`` was a ValueError traceback."""
    from nanoscout.cli.main import main

    out = tmp_path / "run.parquet"
    nobody = f"ipc://{tmp_path}/no-daemon"
    for args, said in ((["--results", nobody, "--duration", "0.5"], "no health message from"),
                       (["--results", "garbage", "--duration", "0.5"], "garbage"),
                       (["--results", nobody, "--batch-frames", "0"], "batch_frames (0)")):
        t0 = time.monotonic()
        assert main(["record", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("nanoscout record: error: ") and said in err, err
        assert "\n" not in err and time.monotonic() - t0 < 10
        assert not out.exists()


def test_a_message_the_run_cannot_store_costs_itself_not_the_recording(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A message the writer refused (an unstorable row) once ended ``record`` and lost the
    queued batch: it is counted in ``rejected_messages`` with a logged reason, and everything
    before and after it is recorded."""
    from nanoscout.clients.runfile import RunWriter
    from nanoscout.wire.errors import ProtocolError
    from nanoscout.wire.particles import empty_table
    from nanoscout.wire.protocol import AlertHeader, DetHeader, StatsHeader, encode_message

    add_stats = RunWriter.add_stats

    def refuse_bad(self: RunWriter, header: StatsHeader) -> None:
        if header.source == "bad":
            raise ProtocolError(f"stats {header.source}#{header.seq} cannot be stored: test")
        add_stats(self, header)

    monkeypatch.setattr(RunWriter, "add_stats", refuse_bad)
    table = empty_table(2)
    table["id"] = [1, 2]

    def det(seq: int) -> list:
        return encode_message(DetHeader(source="cam", seq=seq, t_acq_ns=1, t_recv_ns=2,
                                        t_done_ns=3, pixel_size_nm=0.5, units="nm", n=2,
                                        engine="e"), table)

    def stats(source: str, seq: int) -> list:
        return encode_message(StatsHeader(source=source, seq=seq, t_ns=5, units="nm",
                                          window={"count": 2}, cumulative={"count": 2}))

    alert = encode_message(AlertHeader(source="cam", seq=1, rule="r", kind="particle",
                                       severity="info", value=1.0, threshold=0.0,
                                       explanation="x"), empty_table(0))
    prov, _ = _record_from(tmp_path, [det(0), stats("cam", 0), stats("bad", 0), alert, det(1),
                                      stats("cam", 1), stats("bad", 1), det(2), stats("cam", 2)],
                           frames=3, batch_frames=100)
    out = tmp_path / "run.parquet"
    assert prov["rejected_messages"] == 2 and prov["rows"]["frames"] == 3
    run = read_run(out)
    assert run.frames["seq"].tolist() == [0, 1, 2] and run.rows(run.particles) == 6
    # frames=3 stops after the third frame's statistics (it once stopped on its detections)
    assert run.stats["source"].tolist() == ["cam"] * 3 and run.rows(run.alerts) == 1
    assert prov["last_frame_stats"] is True
    assert "stats bad#1 cannot be stored: test" in caplog.text


def _record_from(tmp_path: Path, messages: list[list], **kw: Any) -> tuple[dict, float]:
    """``record(**kw)`` into ``tmp_path/run.parquet`` from a stand-in daemon (an XPUB socket)
    that publishes ``messages`` once the recorder has subscribed; returns the provenance and
    the seconds from the last message sent to ``record``'s return."""
    import threading

    import zmq

    from nanoscout.clients.recorder import record
    from nanoscout.wire.protocol import HealthHeader, encode_message

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    out = tmp_path / "run.parquet"
    result: list[tuple[dict, float]] = []
    stop = threading.Event()
    worker = threading.Thread(target=lambda: result.append((record(
        f"tcp://127.0.0.1:{port}", out, stop=stop, ready_timeout=60, **kw), time.monotonic())))
    health = encode_message(HealthHeader(
        t_ns=1, uptime_s=1.0, policy="lossless", engines={}, frames_received=0,
        frames_processed=0, frames_dropped={}, rejected={}, transport_gaps=0, queue_depth=0,
        fps=0.0, latency_ms_p50=None, latency_ms_p99=None))
    try:
        worker.start()

        def subscribed() -> bool:
            pub.send_multipart(health)
            meta = out / "_run.json"
            return meta.exists() and "subscribed_utc" in meta.read_text()

        wait_until(subscribed, timeout=60, what="recorder subscribed")
        for parts in messages:
            pub.send_multipart(parts)
        sent = time.monotonic()
        worker.join(60)
    finally:
        stop.set()
        worker.join(10)
        pub.close(linger=0)
        ctx.term()
    assert result, "record() did not return"
    return result[0][0], result[0][1] - sent


@pytest.mark.parametrize("then", ["nothing", "the next frame"])
def test_the_last_frames_statistics_are_awaited_for_a_bounded_time(tmp_path: Path,
                                                                   then: str) -> None:
    """``frames=2`` and the second frame's statistics never come (the daemon died, or its
    summary failed): the recorder, which once stopped on the second frame's detections and
    lost its alert, waits for the rest of the frame at most ``frame_end_timeout`` s or until
    the next frame's results, records nothing of that next frame, and says so."""
    from nanoscout.wire.particles import empty_table
    from nanoscout.wire.protocol import AlertHeader, DetHeader, StatsHeader, encode_message

    def det(seq: int) -> list:
        return encode_message(DetHeader(source="cam", seq=seq, t_acq_ns=1 + seq, t_recv_ns=2,
                                        t_done_ns=3, pixel_size_nm=0.5, units="nm", n=0,
                                        engine="e"), empty_table(0))

    def stats(seq: int) -> list:
        return encode_message(StatsHeader(source="cam", seq=seq, t_ns=5, units="nm",
                                          window={"count": 0}, cumulative={"count": 0}))

    alert = encode_message(AlertHeader(source="cam", seq=1, rule="r", kind="count",
                                       severity="info", value=0.0, threshold=1.0,
                                       explanation="x"), empty_table(0))
    messages = [det(0), stats(0), det(1), alert]
    if then == "the next frame":
        messages += [det(2), stats(2)]
    prov, waited = _record_from(tmp_path, messages, frames=2, frame_end_timeout=3.0)
    run = read_run(tmp_path / "run.parquet")
    assert run.frames["seq"].tolist() == [0, 1] and run.stats["seq"].tolist() == [0]
    assert run.alerts["seq"].tolist() == [1]  # the second frame's alert came before its stats
    assert prov["last_frame_stats"] is False and prov["stopped_utc"]
    if then == "nothing":
        # it waited (det 1 arrived a moment before the last message was sent), and not for ever:
        # a daemon that is gone does not hang the recorder
        assert 2.5 <= waited < 30
    else:
        assert waited < 3.0  # the next frame's det ended the wait
