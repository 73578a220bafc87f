"""Simulator → daemon → subscriber, as separate processes over loopback ZeroMQ."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import HealthHeader, Message
from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system


def _simulate(endpoint: str, *args: str) -> subprocess.Popen[str]:
    return nanoscout("simulate", "--frames-endpoint", endpoint, *args, stdout=subprocess.DEVNULL)


def _final_health(sub: Subscriber, until: Callable[[HealthHeader], bool], timeout: float = 60.0
                  ) -> HealthHeader:
    """Read messages until a health message satisfies ``until``; returns it."""
    for msg in sub.messages(timeout=timeout):
        if msg.kind == "health" and until(msg.header):
            return msg.header  # type: ignore[return-value]
    raise AssertionError(f"no health message satisfied the condition; last: {sub.last_health}")


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two boxes (x0, y0, x1, y1), exclusive ends."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _match(
    table: np.ndarray,
    labels: np.ndarray,
    true_ecd: dict[int, float],
) -> tuple[int, int, int, list[float]]:
    """Match detections to truth one-to-one: the detection's centroid lies in the true particle
    and their bounding boxes overlap with IoU ≥ 0.5. Particles touching the border are left out.

    Returns (true positives, detections, true particles, relative ECD errors of matches).
    """
    h, w = labels.shape
    border_ids = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    boxes = {k + 1: (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
             for k, sl in enumerate(ndimage.find_objects(labels)) if sl is not None}
    truth_ids = set(boxes) - border_ids
    dets = table[~table["border"]]
    used: set[int] = set()
    errors = []
    for row in dets:
        x, y = int(round(float(row["x"]))), int(round(float(row["y"])))
        k = int(labels[min(max(y, 0), h - 1), min(max(x, 0), w - 1)])
        if k in truth_ids and k not in used and _box_iou(tuple(row["bbox"]), boxes[k]) >= 0.5:
            used.add(k)
            errors.append(abs(float(row["ecd_nm"]) - true_ecd[k]) / true_ecd[k])
    return len(used), len(dets), len(truth_ids), errors


def test_detections_match_ground_truth(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """Held-out simulator frames (seed never used in training): F1 ≥ 0.9, median |ECD error| ≤ 7 %.

    The shipped detector was fine-tuned on real EMPS outlines, which are drawn around the whole
    blurred edge: on exact synthetic truth its TEM/SEM outlines come out ~5 % wide (model card,
    ``metrics.per_modality``). Measured 6.3 % here (2.8 % before the real-data fine-tuning).
    """
    d = daemon_factory("--policy", "lossless")
    truth_dir = tmp_path / "truth"
    n = 12
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        sim = _simulate(d.input, "--mode", "push", "--frames", str(n), "--size", "512", "--rate", "0",
                        "--seed", "987654", "--fields", "6", "--dwell", "2", "--truth-dir", str(truth_dir))
        tables = {}
        for msg in sub.messages(timeout=180):
            assert msg.array is not None
            tables[msg.header.seq] = msg.array.copy()
            if len(tables) == n:
                break
        assert sim.wait(60) == 0
    assert sorted(tables) == list(range(n))
    tp = n_det = n_true = 0
    errors: list[float] = []
    for seq, table in tables.items():
        truth = np.load(truth_dir / f"sim-{seq:06d}.npz")
        ecd = dict(zip(truth["ids"].tolist(), truth["ecd_nm"].tolist(), strict=True))
        a, b, c, e = _match(table, truth["labels"], ecd)
        tp, n_det, n_true, errors = tp + a, n_det + b, n_true + c, errors + e
    precision, recall = tp / n_det, tp / n_true
    f1 = 2 * precision * recall / (precision + recall)
    assert n_true > 200
    print(f"end-to-end: precision {precision:.3f} recall {recall:.3f} F1 {f1:.3f} "
          f"median |ECD error| {np.median(errors):.2%} over {n_true} particles")
    assert f1 >= 0.9, f"F1 {f1:.3f} (precision {precision:.3f}, recall {recall:.3f})"
    assert float(np.median(errors)) <= 0.07, f"median |ECD error| {np.median(errors):.3%}"


def test_lossless_delivers_every_frame_in_order(daemon_factory: DaemonFactory) -> None:
    # delivery, not analysis, is under test: 500 frames without the classifier keep it short
    d = daemon_factory("--policy", "lossless", "--queue-size", "4",
                       config="[classify]\nenabled = false\n")
    n = 500
    with Subscriber(d.output, topics=("det.", "health")) as sub:
        sub.wait_ready()
        sim = _simulate(d.input, "--mode", "push", "--frames", str(n), "--size", "256", "--rate", "0",
                        "--fields", "3")
        seqs = []
        for msg in sub.messages(timeout=240):
            if msg.kind == "det":
                seqs.append(msg.header.seq)
                if len(seqs) == n:
                    break
        assert sim.wait(60) == 0
        health = _final_health(sub, lambda h: h.frames_processed == n)
    assert seqs == list(range(n))
    assert sub.missed == {}
    assert health.frames_received == n
    assert health.frames_dropped == {} and health.transport_gaps == 0


def test_live_overload_drops_superseded_and_bounds_latency(daemon_factory: DaemonFactory) -> None:
    """Frames arrive faster than they can be analysed: the newest wins, each skip is counted."""
    d = daemon_factory("--policy", "live")
    n = 80
    with Subscriber(d.output, topics=("det.", "health")) as sub:
        sub.wait_ready()
        sim = _simulate(d.input, "--mode", "pub", "--frames", str(n), "--size", "1024", "--rate", "0",
                        "--fields", "2", "--dwell", "40")
        latencies = []
        for msg in sub.messages(timeout=120, idle=10):
            if msg.kind == "det":
                latencies.append(msg.header.latency_ms)
            if sim.poll() is not None and msg.kind == "health" and msg.header.queue_depth == 0:
                h = msg.header
                if h.frames_received == h.frames_processed + h.frames_dropped.get("superseded", 0):
                    break
        assert sim.wait(60) == 0
        health = sub.last_health
    assert health is not None
    superseded = health.frames_dropped.get("superseded", 0)
    assert superseded > 0, f"no frame superseded: {health}"
    assert health.frames_received == health.frames_processed + superseded
    # the daemon never works on a backlog: latency stays near one frame's analysis time,
    # however many frames were offered
    assert len(latencies) >= 5
    assert np.percentile(latencies, 90) < 2000, latencies


def test_previews_are_rate_limited_and_match_the_detections(daemon_factory: DaemonFactory) -> None:
    """preview.<source>: ≤ max_rate_hz per source, the first frame always, det coordinates ×
    scale land on dark (TEM) particles of the picture."""
    d = daemon_factory("--policy", "lossless",
                       config="[preview]\nmax_rate_hz = 4.0\nmax_side_px = 256\n")
    n = 30
    with Subscriber(d.output, topics=("det.", "preview.")) as sub:
        sub.wait_ready()
        t0 = time.monotonic()
        sim = _simulate(d.input, "--mode", "push", "--frames", str(n), "--size", "512",
                        "--rate", "0", "--seed", "31")
        dets: dict[int, Message[Any]] = {}
        previews: dict[int, Message[Any]] = {}
        for msg in sub.messages(timeout=120):
            (dets if msg.kind == "det" else previews)[msg.header.seq] = msg
            if len(dets) == n:
                break
        elapsed = time.monotonic() - t0
        for msg in sub.messages(timeout=1.0):  # a preview trails its det
            if msg.kind == "preview":
                previews[msg.header.seq] = msg
        assert sim.wait(60) == 0
    assert 0 in previews
    assert 2 <= len(previews) <= 4.0 * elapsed + 1, (len(previews), elapsed)
    for seq, p in previews.items():
        h = p.header
        assert h.size == (256, 256) and h.scale == pytest.approx(0.5) and h.shape == (512, 512)
        table = dets[seq].array
        assert table is not None and p.array is not None
        inner = table[~table["border"]]
        ys = np.clip((inner["y"] * h.scale).astype(int), 0, 255)
        xs = np.clip((inner["x"] * h.scale).astype(int), 0, 255)
        # particles are darker than the picture's median in bright-field TEM
        assert np.median(p.array[ys, xs]) < np.median(p.array) - 10


def test_stem_frames_are_analysed_by_the_stem_detector(daemon_factory: DaemonFactory) -> None:
    weights = Path(__file__).resolve().parents[2] / "models" / "weights"
    if not (weights / "detector_stem.onnx").is_file():
        pytest.skip(f"no shipped STEM detector in {weights}")
    names = {}
    for f in ("detector.json", "detector_stem.json", "modality.json"):
        card = json.loads((weights / f).read_text())
        names[f] = f"{card['name']}:{card['version']}"
    d = daemon_factory("--policy", "lossless", config="[classify]\nenabled = false\n")
    models: dict[str, set[str]] = {"stem-cam": set(), "tem-cam": set()}
    with Subscriber(d.output, topics=("det.", "health")) as sub:
        sub.wait_ready()
        sims = [_simulate(d.input, "--mode", "push", "--frames", "3", "--size", "256",
                          "--rate", "0", "--modality", mod, "--source", src)
                for mod, src in (("STEM", "stem-cam"), ("TEM", "tem-cam"))]
        seen = 0
        for msg in sub.messages(timeout=120):
            if msg.kind == "det":
                models[msg.header.source].add(msg.header.model)
                seen += 1
                if seen == 6:
                    break
        assert all(s.wait(60) == 0 for s in sims)
        health = _final_health(sub, lambda h: h.frames_processed == 6)
    assert models == {"stem-cam": {names["detector_stem.json"]},
                      "tem-cam": {names["detector.json"]}}
    assert health.engines["model"] == names["detector.json"]
    assert health.engines["model_STEM"] == names["detector_stem.json"]
    assert health.engines["modality"] == names["modality.json"]  # for frames that do not say
