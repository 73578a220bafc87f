"""Hot swap under a live stream, through real processes over loopback: ``nanoscout serve``
(lossless) analyses a stream from a FramePublisher while the test swaps the detection model 20
times between the shipped detector and a renamed copy, is refused a truncated file and a wrong
sha256, and reverts. No frame may be lost and every ``det`` must name the model that made it.
Raw frames kept for review are saved on request and around an alert."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.modelcard import sha256_file, shipped_model_dir
from nanoscout.clients.acquisition.publisher import FramePublisher, SendReport
from nanoscout.clients.query import QueryError, revert_model, save_frame, swap_model
from nanoscout.clients.subscriber import Subscriber
from nanoscout.daemon.frame_tiff import read_frame_tiff
from nanoscout.wire.protocol import DetHeader, HealthHeader
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

SIDE = 160
SWAPS = 20


def renamed_copy(directory: Path) -> Path:
    """The shipped detector under another file name, its card renamed to match (same
    weights, same sha256, another model name)."""
    src = shipped_model_dir() / "detector.onnx"
    directory.mkdir(parents=True, exist_ok=True)
    onnx = directory / "renamed.onnx"
    shutil.copyfile(src, onnx)
    card = json.loads(src.with_suffix(".json").read_text(encoding="utf-8"))
    card["onnx_file"] = onnx.name
    card["name"] = card["name"] + "-renamed"
    onnx.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return onnx


def specimen(seq: int) -> np.ndarray:
    """A 160² uint16 frame: noise, and from frame 3 on a field of bright disks."""
    rng = np.random.default_rng(seq)
    img = rng.normal(300.0, 25.0, (SIDE, SIDE))
    if seq >= 3:
        yy, xx = np.mgrid[0:SIDE, 0:SIDE]
        for k in range(9):
            cy, cx = (k // 3 + 0.5) * SIDE / 3 + seq % 3, (k % 3 + 0.5) * SIDE / 3
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (7 + k % 4) ** 2] += 2000.0
    return np.clip(img, 0, 65535).astype(np.uint16)


def test_twenty_hot_swaps_under_a_live_stream_lose_no_frame(daemon_factory: DaemonFactory,
                                                            tmp_path: Path) -> None:
    shipped = shipped_model_dir() / "detector.onnx"
    copy = renamed_copy(tmp_path / "copy")
    sha = sha256_file(shipped)
    assert sha256_file(copy) == sha
    review = tmp_path / "review"
    d = daemon_factory(
        "--policy", "lossless", "--model", str(shipped),
        config=f"""
[classify]
enabled = false
[review]
frames = 4
directory = "{review}"
[[alerts]]
name = "many"
kind = "count"
above = 3
cooldown_s = 3600
save_frames = {{ before = 1, after = 2 }}
""")
    assert d.query is not None
    stop = threading.Event()
    report: list[SendReport] = []
    sent_at: list[int] = []  # frames sent when each swap was confirmed
    with Subscriber(d.output, topics=("det.", "health")) as sub:
        sub.wait_ready(30)
        pub = FramePublisher(d.input, mode="push", source="live", results=d.output,
                             confirm_timeout_s=60)
        first_sent = threading.Event()

        def stream() -> None:
            seq = 0
            while not stop.is_set() or seq < 12:
                pub.send(specimen(seq), pixel_size_nm=0.8)
                seq += 1
                first_sent.set()
            report.append(pub.close())

        sender = threading.Thread(target=stream)
        sender.start()
        try:
            assert first_sent.wait(30)
            expected = {0: "nanoscout-particle-unet:3.0.0"}
            for k in range(SWAPS):
                target = copy if k % 2 == 0 else shipped
                reply = swap_model(d.query, target, sha, timeout=60)
                assert reply.ok and reply.model_generation == k + 1
                expected[k + 1] = reply.model or ""
                sent_at.append(pub.seq)
            assert expected[1].endswith("-renamed:3.0.0") and expected[2] == expected[0]
            # a truncated file (its card says another sha256) and a wrong sha256: refused
            bad = tmp_path / "bad"
            broken = renamed_copy(bad)
            broken.write_bytes(shipped.read_bytes()[:5000])
            with pytest.raises(QueryError, match="model card"):
                swap_model(d.query, broken, sha256_file(broken), timeout=60)
            with pytest.raises(QueryError, match="the request expected"):
                swap_model(d.query, copy, "0" * 64, timeout=60)
            with pytest.raises(QueryError, match="does not exist"):
                swap_model(d.query, tmp_path / "nowhere.onnx", sha, timeout=60)
            reverted = revert_model(d.query, timeout=60)
            assert reverted.model == expected[SWAPS - 1]
            expected[SWAPS + 1] = reverted.model or ""
            sent_at.append(pub.seq)
            saved = save_frame(d.query, "live", 2)
        finally:
            stop.set()
            sender.join(120)
        dets: dict[int, list[DetHeader]] = {}
        health: HealthHeader | None = None
        assert report and report[0].complete, report
        sent = report[0].sent
        for msg in sub.messages(timeout=60):
            if isinstance(msg.header, DetHeader):
                dets.setdefault(msg.header.seq, []).append(msg.header)
            elif isinstance(msg.header, HealthHeader):
                health = msg.header
                if len(dets) == sent and health.frames_processed == sent:
                    break
    # every frame sent was answered exactly once, by a whole model, and the right one
    assert sorted(dets) == list(range(sent)) and all(len(v) == 1 for v in dets.values())
    for seq, (h,) in dets.items():
        assert h.model_generation is not None and h.model_sha256 == sha[:12]
        assert h.model == expected[h.model_generation], (seq, h.model, h.model_generation)
    for k, first in enumerate(sent_at):  # frames sent after a confirmed swap use its model
        late = [dets[s][0].model_generation for s in range(first, sent)]
        assert all(g is not None and g >= k + 1 for g in late), (k, first, late[:5])
    generations = {dets[s][0].model_generation for s in dets}
    print(f"hot swap: {sent} frames, {len(generations)} generations seen, 0 lost")
    assert health is not None and health.model_swaps == SWAPS + 1
    assert health.model_swap_failures == 3 and health.model == expected[SWAPS + 1]
    metrics = d.scrape()
    assert f'nanoscout_model_swaps_total{{action="swap"}} {SWAPS}.0' in metrics
    for step in ("card", "sha256", "resolve"):
        assert f'nanoscout_model_swap_failures_total{{action="swap",step="{step}"}} 1.0' in metrics
    # the operator's save: the newest two raw frames, calibrated, header inside
    assert len(saved.files) == 2
    for f in saved.files:
        pixels, header, why = read_frame_tiff(Path(f))
        assert header.source == "live" and header.pixel_size_nm == 0.8
        assert why["why"] == "request" and pixels.shape == (SIDE, SIDE)
    # the alert fired once: the frame before it, it and the two after it
    alert_files = sorted(review.glob("live-*-many.tif"))
    assert len(alert_files) == 4, alert_files
    seqs = [read_frame_tiff(p)[1].seq for p in alert_files]
    fired = read_frame_tiff(alert_files[0])[2]["seq"]
    assert seqs == [fired - 1, fired, fired + 1, fired + 2]
    assert health.frames_saved == 6 and health.frame_save_failures == 0
