"""Dashboard gateway state: latest-wins items, det/preview pairing, bounded alerts, gaps,
staleness, clusters, the AI-lens view, and the payloads the browser draws (no sockets; the
HTTP API and the real query socket are tested in tests/browser/test_dashboard.py)."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from nanoscout.clients.dashboard import LensView
from nanoscout.clients.dashboard.gateway import DashboardState, Item, particles_payload
from nanoscout.clients.dashboard.images import thumbnail
from nanoscout.clients.dashboard.lens import TILE_PX
from nanoscout.clients.lens import GAP, LensError, mosaic_from_maps
from nanoscout.clients.query import QueryError
from nanoscout.wire.particles import NO_CLUSTER, empty_table
from nanoscout.wire.protocol import (
    AlertHeader,
    ClassHeader,
    DetHeader,
    HealthHeader,
    LensReply,
    Message,
    PreviewHeader,
    StatsHeader,
    decode_message,
    encode_message,
)

PX_NM = 0.5


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _wire(header: object, *arrays: np.ndarray) -> Message:
    """Encode and decode, as the gateway receives it."""
    return decode_message([bytes(p) for p in encode_message(header, *arrays)])  # type: ignore[arg-type]


def _table(n: int) -> np.ndarray:
    t = empty_table(n)
    for i in range(n):
        t[i]["id"] = i + 1
        t[i]["x"], t[i]["y"] = 100.0 + 50 * i, 200.0
        t[i]["bbox"] = (90 + 50 * i, 190, 111 + 50 * i, 211)
        t[i]["ecd_nm"] = 10.0 + i
        t[i]["major_nm"], t[i]["minor_nm"] = 12.0, 8.0
        t[i]["orientation_deg"] = 30.0
        t[i]["shape_class"] = 1
    return t


def det(seq: int, n: int = 2, source: str = "sim") -> Message:
    h = DetHeader(source=source, seq=seq, t_acq_ns=seq * 10**8, t_recv_ns=seq * 10**8 + 1,
                  t_done_ns=seq * 10**8 + 5 * 10**6, stage_ms={"detect": 3.0},
                  pixel_size_nm=PX_NM, units="nm", n=n, engine="onnxruntime-cpu",
                  shape=(1024, 1024))
    return _wire(h, _table(n))


def preview(seq: int, source: str = "sim", scale: float = 0.5, run: int | None = None
            ) -> Message:
    img = np.tile(np.arange(512, dtype=np.uint8)[None, :], (512, 1))
    h = PreviewHeader(source=source, seq=seq, t_acq_ns=seq * 10**8, shape=(1024, 1024),
                      size=(512, 512), scale=scale, pixel_size_nm=PX_NM, daemon_run=run)
    return _wire(h, img)


def stats(seq: int, d50: float = 9.0, source: str = "sim") -> Message:
    block = {"n_frames": 1, "count": 2, "ecd": {"mean": d50, "sd": 1.0, "d10": 8.0, "d50": d50,
                                                "d90": 11.0, "min": 7.0, "max": 12.0},
             "histograms": {"ecd": {"edges": [1.0, 10.0, 100.0], "counts": [1, 1],
                                    "under": 0, "over": 0}},
             "number_density_per_um2": 120.0}
    h = StatsHeader(source=source, seq=seq, t_ns=seq * 10**8, units="nm", window=block,
                    cumulative=block)
    return _wire(h)


def alert(seq: int, n: int = 1, source: str = "sim", kind: str = "particle") -> Message:
    h = AlertHeader(source=source, seq=seq, t_acq_ns=seq * 10**8, rule="big", kind=kind,
                    severity="warning", value=12.0, threshold=9.0,
                    explanation=f"particle of 12 nm at frame {seq}", n=n)
    return _wire(h, _table(n))


def health(transport_gaps: int = 0) -> Message:
    h = HealthHeader(t_ns=1, uptime_s=3.0, policy="live", engines={"detector": "onnxruntime-cpu"},
                     frames_received=10, frames_processed=8, frames_dropped={"superseded": 2},
                     rejected={}, transport_gaps=transport_gaps, queue_depth=0, fps=4.0,
                     latency_ms_p50=50.0, latency_ms_p99=90.0)
    return _wire(h)


def payload(state: DashboardState, key: str) -> dict:
    item = state.item(key)
    assert item is not None, key
    return json.loads(built(item))


def built(item: Item) -> str:
    """An item's payload, which must have been built."""
    text = item.data()
    assert text is not None, item.key
    return text


def png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return im.size


# ---------------------------------------------------------------------------------------------


def test_latest_wins_and_only_changed_items_are_resent() -> None:
    st = DashboardState()
    for seq in range(5):
        st.ingest(stats(seq, d50=9.0 + seq))
    st.ingest(health())
    items, _ = st.updates({})
    keys = {it.key for it in items}
    assert {"meta", "sources", "stats:sim", "health"} <= keys
    assert payload(st, "stats:sim")["window"]["ecd"]["d50"] == 13.0  # only the newest kept
    sent = {it.key: it.version for it in items}
    assert st.updates(sent)[0] == []  # nothing changed since
    st.ingest(stats(5, d50=20.0))
    changed, _ = st.updates(sent)
    assert [it.key for it in changed] == ["stats:sim"]
    # the time series keeps every stats message (bounded)
    series = payload(st, "stats:sim")["series"]
    assert series["d50"] == [9.0, 10.0, 11.0, 12.0, 13.0, 20.0]
    assert series["t"][-1] == 0.0 and series["t"][0] == pytest.approx(-0.5)


def test_a_frame_an_adapted_model_handed_to_its_base_network_is_marked() -> None:
    """det.base_network_only (protocol 1.7) reaches the top bar's summary; an older daemon's
    det (None) reads as not handed over."""
    st = DashboardState()
    st.ingest(det(0))
    assert payload(st, "det:sim")["base_network_only"] is None
    h = det(1).header.model_copy(update={"base_network_only": True})
    st.ingest(_wire(h, _table(2)))  # over the wire, as the daemon sends it
    assert payload(st, "det:sim")["base_network_only"] is True


def test_what_a_frames_size_range_did_reaches_the_top_bar() -> None:
    """det.size_hint (protocol 1.8) reaches the summary the top bar reads; None without a
    range."""
    st = DashboardState()
    st.ingest(det(0))
    assert payload(st, "det:sim")["size_hint"] is None
    h = det(1).header.model_copy(update={"size_hint": "applied"})
    st.ingest(_wire(h, _table(2)))
    assert payload(st, "det:sim")["size_hint"] == "applied"  # the page: tests/browser


def test_a_frames_noise_and_smoothing_reach_the_top_bar() -> None:
    """det.noise and det.smoothing_px (protocol 1.9) reach the summary the top bar reads; None
    where the model does not measure the noise."""
    st = DashboardState()
    st.ingest(det(0))
    assert payload(st, "det:sim")["noise"] is None
    assert payload(st, "det:sim")["smoothing_px"] is None
    h = det(1).header.model_copy(update={"noise": 0.11, "smoothing_px": 1.3})
    st.ingest(_wire(h, _table(2)))
    got = payload(st, "det:sim")
    assert (got["noise"], got["smoothing_px"]) == (0.11, 1.3)  # the page: tests/browser


def test_series_is_bounded() -> None:
    st = DashboardState(series_len=4)
    for seq in range(10):
        st.ingest(stats(seq))
    assert len(payload(st, "stats:sim")["series"]["t"]) == 4


def test_preview_after_its_det_is_paired() -> None:
    st = DashboardState()
    st.ingest(det(5, n=3))
    st.ingest(det(6, n=2))
    st.ingest(preview(5))
    f = payload(st, "frame:sim")
    assert f["seq"] == 5 and f["det"]["seq"] == 5 and f["det"]["n"] == 3
    assert png_size(f["png"]) == (512, 512)
    # frame px → preview px (scale 0.5), pixel centres; nm → px with the pixel size
    assert f["det"]["x"][0] == pytest.approx((100 + 0.5) * 0.5)
    assert f["det"]["a"][0] == pytest.approx(12.0 / 2 / PX_NM * 0.5)
    assert f["det"]["b"][0] == pytest.approx(8.0 / 2 / PX_NM * 0.5)
    assert f["det"]["bbox"][:4] == [45.0, 95.0, 55.5, 105.5]
    assert f["det"]["angle"][0] == 30.0


def test_preview_before_its_det_waits_for_it() -> None:
    st = DashboardState()
    st.ingest(det(6))
    st.ingest(preview(7))
    assert payload(st, "frame:sim")["det"] is None  # shown at once, particles still to come
    v = st.item("frame:sim").version  # type: ignore[union-attr]
    st.ingest(det(8))  # not its det: the frame stays as it is
    assert st.item("frame:sim").version == v  # type: ignore[union-attr]
    st2 = DashboardState()
    st2.ingest(preview(7))
    st2.ingest(det(7, n=4))
    f = payload(st2, "frame:sim")
    assert f["seq"] == 7 and f["det"]["n"] == 4


def test_newer_preview_replaces_the_frame() -> None:
    st = DashboardState()
    st.ingest(det(1))
    st.ingest(preview(1))
    st.ingest(det(2))
    st.ingest(preview(2))
    assert payload(st, "frame:sim")["seq"] == 2


def test_uncalibrated_axes_stay_in_px() -> None:
    t = _table(1)
    h = DetHeader(source="s", seq=0, t_acq_ns=0, t_recv_ns=0, t_done_ns=0, stage_ms={},
                  pixel_size_nm=None, units="px", n=1, engine="e")
    p = particles_payload(h, t, 0.25)
    assert p["a"][0] == pytest.approx(12.0 / 2 * 0.25)


def test_non_finite_measurements_become_null() -> None:
    t = _table(1)
    t[0]["circularity"] = np.nan
    t[0]["solidity"] = np.inf
    st = DashboardState()
    h = DetHeader(source="sim", seq=0, t_acq_ns=0, t_recv_ns=0, t_done_ns=0, stage_ms={},
                  pixel_size_nm=PX_NM, units="nm", n=1, engine="e")
    st.ingest(_wire(h, t))
    st.ingest(preview(0))
    f = payload(st, "frame:sim")  # strict JSON: NaN would not parse in a browser
    assert f["det"]["circularity"] == [None] and f["det"]["solidity"] == [None]


def test_alerts_are_bounded_and_sent_once() -> None:
    st = DashboardState(max_alerts=3)
    for seq in range(5):
        st.ingest(alert(seq))
    _, alerts = st.updates({}, 0)
    ids = [aid for aid, _ in alerts]
    assert ids == [3, 4, 5]  # the newest three, oldest first
    assert [json.loads(built(it))["seq"] for _, it in alerts] == [2, 3, 4]
    assert [aid for aid, _ in st.updates({}, 4)[1]] == [5]
    assert st.updates({}, 5)[1] == []


def test_alert_thumbnail_is_a_crop_of_its_frames_preview() -> None:
    st = DashboardState()
    st.ingest(preview(3))
    st.ingest(preview(4))
    st.ingest(alert(3))
    a = json.loads(built(st.updates({}, 0)[1][0][1]))
    assert a["rule"] == "big" and a["explanation"].startswith("particle of 12 nm")
    assert a["thumb_note"] == "frame #3"
    assert max(png_size(a["thumb_png"])) == 128
    assert a["particles"][0]["ecd"] == pytest.approx(10.0)
    assert a["particles"][0]["shape_class"] == "sphere"
    # an alert of a frame without preview falls back to the newest one, and says so
    st.ingest(alert(9, kind="count", n=0))
    a = json.loads(built(st.updates({}, 1)[1][0][1]))
    assert a["thumb_note"] == "preview #4 (frame #9 had none)" and a["particles"] == []


def test_alert_without_any_preview_has_no_picture() -> None:
    st = DashboardState()
    st.ingest(alert(1))
    a = json.loads(built(st.updates({}, 0)[1][0][1]))
    assert a["thumb_png"] is None


def test_alert_with_a_heatmap_shows_it() -> None:
    heat = np.zeros((16, 16), np.uint8)
    heat[4:8, 4:8] = 255
    h = AlertHeader(source="sim", seq=2, t_acq_ns=0, rule="odd", kind="class",
                    severity="info", value=0.9, threshold=0.5, explanation="novel field")
    st = DashboardState()
    st.ingest(Message("alert.sim", h, heat))  # a heatmap in place of particle rows
    a = json.loads(built(st.updates({}, 0)[1][0][1]))
    assert a["thumb_note"] == "heatmap" and png_size(a["thumb_png"]) == (128, 128)


@pytest.mark.skipif("heatmap_shape" not in AlertHeader.model_fields,
                    reason="AlertHeader has no heatmap_shape in this protocol version")
def test_alert_with_a_v12_heatmap_after_its_rows() -> None:
    heat = np.full((8, 8), 200, np.uint8)
    h = AlertHeader(source="sim", seq=3, t_acq_ns=0, rule="odd", kind="class",
                    severity="info", value=0.9, threshold=0.5, explanation="novel field",
                    heatmap_shape=(8, 8))  # type: ignore[call-arg]
    st = DashboardState()
    st.ingest(preview(3))
    st.ingest(_wire(h, empty_table(0), heat))
    a = json.loads(built(st.updates({}, 0)[1][0][1]))
    assert a["thumb_note"] == "heatmap over preview #3" and a["heatmap_shape"] == [8, 8]


def test_thumbnail_crops_around_the_boxes() -> None:
    img = np.zeros((200, 300), np.uint8)
    boxes = np.array([[100.0, 50.0, 110.0, 60.0], [0.0, 150.0, 10.0, 160.0]])
    out = thumbnail(img, boxes, side=64)
    assert out.shape == (64, 64, 3)  # a square crop (at least min_crop_px) around the first box
    assert (out[..., 0] > 200).any()  # the outline
    whole = thumbnail(img, None, side=64)
    assert whole.shape == (43, 64, 3)


def test_det_seq_gaps_are_counted_per_source() -> None:
    st = DashboardState()
    for seq in (0, 1, 4, 5, 9):
        st.ingest(det(seq))
    for seq in (0, 1, 2):
        st.ingest(det(seq, source="other"))
    d = payload(st, "det:sim")
    assert (d["missed"], d["gap_events"], d["last_gap_seq"], d["frames"]) == (5, 2, 9, 5)
    assert st.missed("sim") == 5 and st.missed("other") == 0
    assert payload(st, "sources")["sources"] == ["sim", "other"]  # first seen first


def test_results_lost_come_from_topic_seq_when_the_daemon_sends_it() -> None:
    """Frame-seq gaps of a live daemon are superseded frames (policy); only gaps in the
    per-topic result sequence (``topic_seq``) are results lost on the way to the dashboard."""
    st = DashboardState()
    st.ingest(det(0))
    assert payload(st, "det:sim")["lost"] is None  # no topic_seq: loss cannot be told apart

    for seq, topic_seq in ((3, 10), (7, 11), (8, 14)):  # frames 1-2, 4-6 superseded; 2 results lost
        h = det(seq).header.model_copy(update={"topic_seq": topic_seq})
        st.ingest(Message(f"det.{h.source}", h, det(seq).array))
    d = payload(st, "det:sim")
    assert d["lost"] == 2 and d["missed"] == 5


def test_staleness_and_recovery() -> None:
    clock = FakeClock(100.0)
    st = DashboardState(stale_s=3.0, clock=clock)
    assert st.status()["unreachable"] is False  # just started: not yet
    clock.t = 103.5
    s = st.status()
    assert s["unreachable"] is True and s["age_s"] is None  # never heard from the daemon
    st.ingest(health())
    s = st.status()
    assert s["connected"] is True and s["unreachable"] is False and s["age_s"] == 0
    clock.t = 106.0
    assert st.status()["connected"] is True
    clock.t = 106.6
    s = st.status()
    assert s["connected"] is False and s["unreachable"] is True and s["age_s"] == 3.1
    st.reject("garbage")  # an undecodable message still proves the daemon is there
    s = st.status()
    assert s["connected"] is True and s["rejected"] == 1 and s["last_rejection"] == "garbage"


def test_class_message_with_cam() -> None:
    heat = np.linspace(0, 255, 8 * 12).astype(np.uint8).reshape(8, 12)
    h = ClassHeader(source="sim", seq=4, t_acq_ns=0, labels=["sintered", "dispersed"],
                    probabilities=[0.8, 0.2], novelty=0.31, engine="onnxruntime-cpu",
                    heatmap_shape=(8, 12))
    st = DashboardState()
    st.ingest(_wire(h, heat))
    c = payload(st, "class:sim")
    assert c["labels"] == ["sintered", "dispersed"] and c["novelty"] == pytest.approx(0.31)
    assert png_size(c["heatmap_png"]) == (12, 8)
    with Image.open(io.BytesIO(base64.b64decode(c["heatmap_png"]))) as im:
        assert im.mode == "RGBA"
    st.ingest(_wire(ClassHeader(source="sim", seq=5, t_acq_ns=0, labels=["x"],
                                probabilities=[1.0])))
    assert payload(st, "class:sim")["heatmap_png"] is None


def test_wait_wakes_on_change() -> None:
    st = DashboardState()
    v = st.version
    assert st.wait(v, 0.0) is False
    st.ingest(health())
    assert st.wait(v, 0.0) is True


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="max_alerts"):
        DashboardState(max_alerts=0)


def test_payloads_are_strict_json() -> None:
    st = DashboardState()
    st.ingest(det(0))
    st.ingest(preview(0))
    st.ingest(stats(0))
    st.ingest(health())
    items, _ = st.updates({})
    for it in items:
        text = built(it)
        assert "NaN" not in text and "Infinity" not in text
        json.loads(text)
    assert math.isfinite(payload(st, "det:sim")["latency_ms"])


# --------------------------------------------------------------------------- clusters (v1.2)


def test_particles_carry_their_morphology_cluster() -> None:
    t = _table(3)
    t["cluster"] = [0, 2, NO_CLUSTER]
    h = DetHeader(source="sim", seq=0, t_acq_ns=0, t_recv_ns=0, t_done_ns=0, stage_ms={},
                  pixel_size_nm=PX_NM, units="nm", n=3, engine="e")
    assert particles_payload(h, t, 0.5)["cluster"] == [0, 2, 255]
    st = DashboardState()
    assert payload(st, "meta")["no_cluster"] == NO_CLUSTER


def test_stats_keep_the_cluster_summary() -> None:
    clusters = {"k": 2, "ready": True, "n_seen": 40, "units": "nm", "descriptors": ["log_ecd"],
                "items": [{"id": 0, "count": 30, "share": 0.75, "ecd_mean": 8.0,
                           "aspect_ratio_mean": 1.1, "roundness_mean": 0.9,
                           "dominant_shape": "sphere", "centre": {"log_ecd": 2.08}},
                          {"id": 1, "count": 10, "share": 0.25, "ecd_mean": float("nan"),
                           "aspect_ratio_mean": 3.2, "roundness_mean": 0.4,
                           "dominant_shape": "rod", "centre": {"log_ecd": 2.9}}]}
    block = {"n_frames": 1, "count": 2, "ecd": {"d50": 9.0}}
    h = StatsHeader(source="sim", seq=1, t_ns=1, units="nm", window=block, cumulative=block,
                    clusters=clusters)
    st = DashboardState()
    st.ingest(_wire(h))
    got = payload(st, "stats:sim")["clusters"]
    assert [c["dominant_shape"] for c in got["items"]] == ["sphere", "rod"]
    assert got["items"][1]["ecd_mean"] is None  # strict JSON


# --------------------------------------------------------------------------- AI lens


def _acts(channels: int = 6, side: int = 8) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1, channels, side, side)).astype(np.float16)


class FakeDaemon:
    """Stands in for ``request_lens``: answers from a dict, records the requests."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[list[str]] = []
        self.arrays = {"act_enc1": _acts(6), "act_code": _acts(20, 4),
                       "reconstruction": np.full((1, 1, 16, 16), 0.5, np.float16)}

    def __call__(self, endpoint: str, source: str, outputs: list[str], *, timeout: float,
                 curve: object = None) -> tuple[LensReply, dict[str, np.ndarray]]:
        assert timeout <= 3.0
        self.calls.append(list(outputs))
        if self.error is not None:
            raise self.error
        reply = LensReply(source=source, seq=41, t_acq_ns=5, outputs=outputs,
                          shapes=[list(self.arrays[o].shape) for o in outputs],
                          available=["error", "reconstruction", "act_enc1", "act_code"],
                          novelty=0.37)
        return reply, {o: self.arrays[o] for o in outputs}


def test_mosaic_from_maps_tiles_and_scales() -> None:
    m = mosaic_from_maps(_acts(6), 16, 32)
    assert m.dtype == np.uint8 and m.shape == (2 * 32 + GAP, 4 * 32 + 3 * GAP)
    assert m[:32, :32].min() == 0 and m[:32, :32].max() == 255  # each map its own min..max
    one = mosaic_from_maps(np.full((1, 1, 4, 4), 0.5), 1, 8, lo=0.0, hi=1.0)
    assert one.shape == (8, 8) and (one == 128).all()
    with pytest.raises(LensError, match="2 dimensions"):
        mosaic_from_maps(np.zeros(3), 4, 8)


def test_lens_view_picks_the_first_activation_and_remembers_the_layers() -> None:
    fake = FakeDaemon()
    view = LensView("tcp://x", timeout=1.0, max_maps=4, request=fake)
    d = view.view("sim")
    assert fake.calls == [[], ["act_enc1"]]  # the list of outputs once, then the maps
    assert (d["layer"], d["seq"], d["novelty"], d["channels"], d["shown"]) == ("act_enc1", 41, 0.37, 6, 4)
    assert d["layers"] == ["reconstruction", "act_enc1", "act_code"]  # "error" is no picture
    w, h = png_size(d["png"])
    assert (h, w) == (TILE_PX, 4 * TILE_PX + 3 * GAP)
    d = view.view("sim", "reconstruction")
    assert fake.calls[-1] == ["reconstruction"] and png_size(d["png"]) == (2 * TILE_PX,) * 2
    view.view("sim")
    assert fake.calls[-1] == ["act_enc1"]  # the known list is reused
    with pytest.raises(QueryError, match="unknown lens layer 'error'"):
        view.view("sim", "error")


def _tracked_det(seq: int, drift_x: float, ids: list[int], field: int = 0,
                 run: int | None = None, topic_seq: int | None = None,
                 t_acq_s: int | None = None) -> Message:
    """A tracked det acquired at ``t_acq_s`` (s; default ``seq``)."""
    from nanoscout.wire.headers import FrameDrift, Tracking

    t = _table(len(ids))
    t["track_id"] = ids
    t["x"] += drift_x  # the content drifts right by drift_x px per frame
    t_ns = (seq if t_acq_s is None else t_acq_s) * 10**9
    h = DetHeader(source="sim", seq=seq, t_acq_ns=t_ns, t_recv_ns=t_ns + 1,
                  t_done_ns=t_ns + 5, pixel_size_nm=PX_NM, units="nm", n=len(ids),
                  engine="e", shape=(1024, 1024),
                  drift=FrameDrift(field=field, x_px=drift_x, y_px=0.0, method="particles"),
                  tracking=Tracking(active=len(ids), total=len(ids)), daemon_run=run,
                  topic_seq=topic_seq)
    return _wire(h, t)


def test_trails_follow_each_track_on_the_specimen_and_history_is_per_track() -> None:
    state = DashboardState()
    for k in range(4):
        state.ingest(_tracked_det(k, 5.0 * k, [7, 9]))
    state.ingest(preview(3, scale=0.5))
    det = payload(state, "frame:sim")["det"]
    assert det["track_id"] == [7, 9] and det["drift"]["x_px"] == 15.0
    # a static particle on a drifting specimen: its trail is one point repeated, in this
    # frame's coordinates (the drift taken out)
    trail = det["trails"][0]
    assert len(trail) == 8
    assert trail[0::2] == pytest.approx([det["x"][0]] * 4, abs=0.05)
    assert trail[1::2] == pytest.approx([det["y"][0]] * 4, abs=0.05)
    h = state.track_history("sim", 9)
    assert h["seq"] == [0, 1, 2, 3] and h["t_s"] == [-3.0, -2.0, -1.0, 0.0]
    assert h["ecd"] == [11.0] * 4 and h["units"] == "nm"
    assert state.track_history("sim", 1234)["seq"] == []
    assert state.track_history("nobody", 9)["seq"] == []
    # another field of view: no trail from the old one
    state.ingest(_tracked_det(4, 0.0, [7, 9], field=1))
    state.ingest(preview(4, scale=0.5))
    assert payload(state, "frame:sim")["det"]["trails"] == [[], []]


def test_a_restarted_daemons_tracks_start_fresh_on_the_page() -> None:
    """A restarted daemon numbers its tracks and fields from 1 again: its track 9 is another
    particle. Keyed by track id alone, the hover box listed the old run's frames of track 9
    with the new run's, and the trail joined the old run's positions (same field 0) to it."""
    run1, run2 = 1_765_000_000_000_000_000, 1_765_000_060_000_000_000
    state = DashboardState()
    for k in range(4):  # the first run: topic_seq 0-3
        state.ingest(_tracked_det(k, 5.0 * k, [7, 9], run=run1, topic_seq=k))
    assert state.track_history("sim", 9)["seq"] == [0, 1, 2, 3]
    # the daemon restarts; its det topic_seq 0 and 1 (frames 4, 5) are lost while the
    # dashboard reconnects; the new run's track 9 lies 300 px right of the old run's
    for k, topic_seq in ((6, 2), (7, 3)):
        state.ingest(_tracked_det(k, 300.0 + (k - 6), [7, 9], run=run2, topic_seq=topic_seq))
    h = state.track_history("sim", 9)
    assert h["seq"] == [6, 7] and h["daemon_run"] == run2
    assert h["x"] == [450.0, 451.0] and h["t_s"] == [-1.0, 0.0]
    state.ingest(preview(7, scale=0.5, run=run2))
    det = payload(state, "frame:sim")["det"]
    assert [len(trail) for trail in det["trails"]] == [4, 4]  # frames 6 and 7 only
    assert det["trails"][1][0::2] == pytest.approx([det["x"][1]] * 2, abs=0.06)
    # the new run's messages before the first one seen are counted as lost
    assert payload(state, "det:sim")["lost"] == 2


def test_a_restarted_adapters_session_is_not_mixed_with_its_earlier_one() -> None:
    """An adapter restarted under the same daemon run numbers its frames from 0 again. Kept by
    seq in insertion order, the new session's frames took the places of the old one's of the
    same numbers: the hover box listed seq 0, 1, 2 (new), 3, 4, 5 (old) and measured its times
    from the old session's last frame (the new session's newest frame 97 s in its future)."""
    run = 1_765_000_000_000_000_000
    state = DashboardState()
    for k in range(6):  # the first session: frames 0-5 acquired at 0-5 s
        state.ingest(_tracked_det(k, 0.0, [7, 9], run=run, topic_seq=k))
    # the adapter restarts 100 s later; the same daemon run goes on (topic_seq too)
    for k in range(3):
        state.ingest(_tracked_det(k, 40.0 + k, [9], run=run, topic_seq=6 + k, t_acq_s=100 + k))
    h = state.track_history("sim", 9)
    assert h["seq"] == [0, 1, 2] and h["t_s"] == [-2.0, -1.0, 0.0]
    assert h["x"] == [140.0, 141.0, 142.0] and h["daemon_run"] == run
    assert state.track_history("sim", 7)["seq"] == []  # the earlier session's track only
    state.ingest(preview(2, scale=0.5, run=run))
    det = payload(state, "frame:sim")["det"]
    assert det["track_id"] == [9] and len(det["trails"][0]) == 6  # frames 0-2 of this session
    # a restart is no loss: 6 frames, then 3, none missing
    summary = payload(state, "det:sim")
    assert summary["missed"] == 0 and summary["frames"] == 9 and summary["lost"] == 0


def test_a_restarted_daemons_frame_is_not_shown_as_the_new_runs() -> None:
    """The page draws the last ``frame`` item it got until another comes: after a restart the
    earlier run's picture and particles stood as the new run's frame (beside its det's seq and
    count) until the new run's first preview. Now the frame item has no picture till then."""
    run1, run2 = 1_765_000_000_000_000_000, 1_765_000_060_000_000_000
    state = DashboardState()
    state.ingest(_tracked_det(0, 0.0, [7, 9], run=run1))
    assert state.item("frame:sim") is None  # a first run: no frame shown, nothing to replace
    state.ingest(_tracked_det(3, 0.0, [7, 9], run=run1))
    state.ingest(preview(3, run=run1))
    old = payload(state, "frame:sim")
    assert old["png"] and old["seq"] == 3 and old["det"]["track_id"] == [7, 9]
    item = state.item("frame:sim")
    assert item is not None
    # the daemon restarts; the new run's first det comes before its preview
    state.ingest(_tracked_det(0, 0.0, [1], run=run2))
    now = state.item("frame:sim")
    assert now is not None and now.version > item.version  # sent to the page again
    frame = payload(state, "frame:sim")
    assert frame["png"] is None and frame["det"] is None and frame["daemon_run"] == run2
    assert frame["note"] == "the daemon restarted: waiting for its first preview"
    # the new run's results of the same run leave it as it is; its preview is shown
    state.ingest(stats(0))
    assert payload(state, "frame:sim")["png"] is None
    state.ingest(preview(0, run=run2))
    frame = payload(state, "frame:sim")
    assert frame["png"] and frame["seq"] == 0 and frame["det"]["track_id"] == [1]


def test_stats_carry_the_unique_and_insitu_blocks() -> None:
    from nanoscout.wire.headers import InSitu, UniqueStats

    block = json.loads(json.dumps(stats(1).header.window.model_dump()))
    h = StatsHeader(source="sim", seq=1, t_ns=1, units="nm", window=block, cumulative=block,
                    unique=UniqueStats(count=5, fields=1, ecd_d50_ci=(8.0, 10.0)),
                    insitu=InSitu(d50=9.0, coalescences=2))
    state = DashboardState()
    state.ingest(_wire(h))
    p = payload(state, "stats:sim")
    assert p["unique"]["count"] == 5 and p["unique"]["ecd_d50_ci"] == [8.0, 10.0]
    assert p["insitu"]["coalescences"] == 2


# ------------------------------------------------- one bad message never blinds the dashboard


def _alert_with_boxes(seq: int, boxes: list[tuple[int, int, int, int]],
                      source: str = "sim") -> Message:
    t = _table(len(boxes))
    t["bbox"] = boxes
    h = AlertHeader(source=source, seq=seq, t_acq_ns=seq * 10**8, rule="big", kind="particle",
                    severity="warning", value=12.0, threshold=9.0,
                    explanation=f"swapped box at frame {seq}", n=len(boxes))
    return _wire(h, t)


def test_thumbnail_puts_swapped_corners_in_order_and_skips_empty_boxes() -> None:
    img = np.zeros((200, 300), np.uint8)
    inverted = thumbnail(img, np.array([[110.0, 60.0, 100.0, 50.0]]), side=64)
    ordered = thumbnail(img, np.array([[100.0, 50.0, 110.0, 60.0]]), side=64)
    assert np.array_equal(inverted, ordered) and (ordered[..., 0] > 200).any()
    # zero width, a non-finite corner: drawn nowhere, and the crop is the whole picture
    for bad in ([[100.0, 50.0, 100.0, 60.0]], [[math.nan, 50.0, 110.0, 60.0]],
                [[100.0, 50.0, math.inf, 60.0]]):
        out = thumbnail(img, np.array(bad), side=64)
        assert out.shape == (43, 64, 3) and not out.any(), bad
    # an empty focused box does not stop the others being outlined
    out = thumbnail(img, np.array([[5.0, 5.0, 5.0, 5.0], [100.0, 50.0, 110.0, 60.0]]), side=64)
    assert out.shape == (43, 64, 3) and (out[..., 0] > 100).any()


def test_an_alert_with_swapped_bbox_corners_is_shown_with_its_picture() -> None:
    st = DashboardState()
    st.ingest(preview(1))
    st.ingest(_alert_with_boxes(1, [(160, 260, 110, 190)]))  # x1 < x0 and y1 < y0
    st.ingest(alert(1))
    (_, bad), (_, good) = st.updates({}, 0)[1]
    a = json.loads(bad.data() or "")
    assert a["thumb_note"] == "frame #1" and max(png_size(a["thumb_png"])) == 128
    assert good.data() is not None and st.payload_errors == 0


def _unshowable_stats(seq: int, source: str = "bad") -> Message:
    """A stats message whose JSON form cannot be built (binary bytes in an unknown block
    field: model_dump(mode="json") raises)."""
    h = stats(seq, source=source).header
    assert isinstance(h, StatsHeader)
    bad = h.model_copy(update={"window": h.window.model_copy(update={"junk": b"\xff\xfe"})})
    with pytest.raises(UnicodeDecodeError):  # the premise: no JSON form of this header
        bad.model_dump(mode="json")
    return Message(f"stats.{source}", bad, None)


def test_a_message_whose_payload_cannot_be_built_costs_only_its_own_item() -> None:
    st = DashboardState()
    st.ingest(det(1))
    st.ingest(_unshowable_stats(1))
    for seq in range(3):
        st.ingest(alert(seq))
    st.ingest(stats(2))
    items, alerts = st.updates({}, 0)
    texts = {it.key: it.data() for it in items}
    assert texts["stats:bad"] is None  # this item only
    assert all(t is not None for k, t in texts.items() if k != "stats:bad")
    assert [json.loads(it.data() or "")["seq"] for _, it in alerts] == [0, 1, 2]
    assert json.loads(texts["stats:sim"] or "")["seq"] == 2
    # counted once, however often it is asked for, and said in the status
    assert st.item("stats:bad").data() is None  # type: ignore[union-attr]
    s = st.status()
    assert s["payload_errors"] == 1 and "stats:bad" in s["last_payload_error"]
    assert "UnicodeDecodeError" in s["last_payload_error"]
    # a newer message of the same source is shown again
    st.ingest(stats(3, source="bad"))
    assert json.loads(payload_text(st, "stats:bad"))["seq"] == 3


def payload_text(state: DashboardState, key: str) -> str:
    item = state.item(key)
    assert item is not None, key
    text = item.data()
    assert text is not None, item.error
    return text


def test_sources_are_bounded_least_recently_seen_forgotten_with_their_items() -> None:
    st = DashboardState(max_sources=3)
    for name in ("a", "b", "c"):
        st.ingest(stats(1, source=name))
        st.ingest(det(1, source=name))
    st.ingest(stats(2, source="a"))  # a seen again: b is now the least recently seen
    st.ingest(stats(1, source="d"))
    assert st.sources == ["a", "c", "d"]  # kept ones in the order first seen
    assert st.item("stats:b") is None and st.item("det:b") is None
    assert st.item("stats:a") is not None and st.item("det:c") is not None
    assert json.loads(payload_text(st, "sources")) == {"sources": ["a", "c", "d"]}
    assert st.status()["sources_evicted"] == 1
    st.ingest(stats(5, source="b"))  # a forgotten source comes back as a new one (c goes)
    assert st.sources == ["a", "d", "b"] and st.status()["sources_evicted"] == 2
    with pytest.raises(ValueError, match="max_sources"):
        DashboardState(max_sources=0)


def test_many_new_sources_take_bounded_memory_and_linear_time() -> None:
    import time

    st = DashboardState(max_sources=64)
    msgs = [stats(1, source=f"s{i}") for i in range(20_000)]
    t0 = time.perf_counter()
    for m in msgs:
        st.ingest(m)
    spent = time.perf_counter() - t0
    items, _ = st.updates({})
    assert len(st.sources) == 64 and st.sources[-1] == "s19999"
    assert len(items) <= 64 + 3  # a stats item per kept source, meta, sources (no health)
    assert st.status()["sources_evicted"] == 20_000 - 64
    assert json.loads(payload_text(st, "sources"))["sources"] == st.sources
    # quadratic (a copy of every name per new source) took seconds; linear is ~0.1 s
    assert spent < 5.0, spent
