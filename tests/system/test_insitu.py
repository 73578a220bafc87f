"""In situ through real processes: ``nanoscout simulate --insitu`` (drift, growth, coalescence,
exact identities in --truth-dir) -> ``nanoscout serve`` (tracking on, the default) -> a
subscriber and the query socket's control requests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.query import request_control
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import DetHeader, StatsHeader
from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system


def test_insitu_stream_is_tracked_and_controlled(daemon_factory: DaemonFactory,
                                                 tmp_path: Path) -> None:
    import motmetrics as mm

    d = daemon_factory("--policy", "lossless", config="[classify]\nenabled = false\n")
    assert d.query is not None  # served without the lens: control requests
    truth_dir = tmp_path / "truth"
    n = 10
    dets: dict[int, tuple[DetHeader, np.ndarray]] = {}
    stats: dict[int, StatsHeader] = {}
    with Subscriber(d.output, topics=("det.", "stats.")) as sub:
        sub.wait_ready()
        sim = nanoscout("simulate", "--frames-endpoint", d.input, "--mode", "push", "--frames",
                        str(n), "--size", "384", "--rate", "0", "--seed", "31", "--insitu",
                        "--drift", "6", "-3", "--growth", "uniform", "--growth-rate", "0.05",
                        "--truth-dir", str(truth_dir), stdout=subprocess.DEVNULL)
        for msg in sub.messages(timeout=240):
            if msg.kind == "det":
                assert msg.array is not None
                dets[msg.header.seq] = (msg.header, msg.array.copy())
            elif msg.kind == "stats":
                stats[msg.header.seq] = msg.header
            if len(dets) == n and len(stats) == n:
                break
        assert sim.wait(60) == 0
        # the dashboard's buttons, over the query socket: applied before the next frame
        assert request_control(d.query, "sim", "reset_statistics").ok
        assert request_control(d.query, "sim", "set_drift_reference").ok
        sim = nanoscout("simulate", "--frames-endpoint", d.input, "--mode", "push", "--frames",
                        "1", "--size", "384", "--rate", "0", "--seed", "31", "--insitu",
                        stdout=subprocess.DEVNULL)
        after = None
        for msg in sub.messages(timeout=120):
            if msg.kind == "stats" and msg.header.seq == 0 and msg.header.source == "sim" \
                    and len(stats) == n:
                after = msg.header
                break
        assert sim.wait(60) == 0
    assert sorted(dets) == list(range(n))
    acc = mm.MOTAccumulator(auto_id=True)
    drift_err = []
    for seq in range(n):
        h, table = dets[seq]
        assert h.drift is not None and h.tracking is not None
        assert (table["track_id"] > 0).all()
        t = np.load(truth_dir / f"sim-{seq:06d}.npz")
        gxy = np.stack([t["x"], t["y"]], 1)
        dist = mm.distances.norm2squared_matrix(gxy, np.stack([table["x"], table["y"]], 1),
                                                max_d2=36.0)
        acc.update(t["ids"].tolist(), table["track_id"].astype(int).tolist(), dist)
        if seq:
            prev = np.load(truth_dir / f"sim-{seq - 1:06d}.npz")["shift_px"]
            true = t["shift_px"] - prev  # rows, cols
            drift_err.append(np.hypot(h.drift.dx_px - true[1], h.drift.dy_px - true[0]))
        json.loads(str(t["events"]))  # the truth lists the events as JSON
    idf1 = mm.metrics.create().compute(acc, metrics=["idf1"], name="s")["idf1"].iloc[0]
    print(f"in situ end to end: IDF1 {idf1:.3f}, drift error max {max(drift_err):.3f} px")
    assert idf1 >= 0.85
    assert max(drift_err) < 0.5
    last = stats[n - 1]
    assert last.unique is not None and last.insitu is not None
    # each particle once: far fewer than the detections of all frames
    assert last.unique.count < 0.5 * last.cumulative.count
    assert after is not None and after.unique is not None
    assert after.cumulative.n_frames == 1 and after.unique.n_frames == 1
