"""Audit: what the dashboard page shows equals what the daemon sent, in real headless Chromium
beside a real daemon fed with synthetic frames (known particles).

* an alert's "value ... vs threshold ..." line carries the unit of the rule's field (nm for an
  ECD, none for an aspect ratio), not the frame's length unit whatever the field;
* on a non-square frame larger than the preview (the preview shrinks it), the drawn outlines
  sit on the detected particles (the daemon's ``det`` table, frame px) and on the dark blobs of
  the picture; a hand-made CAM is drawn the right way round (not transposed or flipped).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.subscriber import Subscriber
from nanoscout.sim.synthetic import SpecimenConfig, render
from nanoscout.wire.protocol import ClassHeader, encode_message
from nanoscout.wire.transport import bind, result_publisher
from tests.browser.test_dashboard import CHROMIUM, LAUNCH_ARGS, _sync_playwright, start_dashboard
from tests.system.conftest import DaemonFactory, stop_process

pytestmark = [pytest.mark.system, pytest.mark.browser]

RULES = """
[preview]
max_rate_hz = 20

[classify]
enabled = false

[[alerts]]
name = "large"
kind = "particle"
severity = "warning"
where = { ecd_nm = { gt = 9 } }
cooldown_s = 0.5

[[alerts]]
name = "elongated"
kind = "particle"
severity = "info"
where = { aspect_ratio = { gt = 1.4 } }
cooldown_s = 0.5

[[alerts]]
name = "big-area"
kind = "particle"
severity = "info"
where = { area_nm2 = { gt = 60 } }
cooldown_s = 0.5
"""

#: a non-square frame larger than the preview's 512 px side: the preview shrinks it
FRAME = render(SpecimenConfig(shape=(600, 1100), pixel_size_nm=0.5, coverage=0.04,
                              agglomerate_fraction=0.0, shape_mix={"ellipse": 1.0}), 3)


@pytest.fixture
def setup(daemon_factory: DaemonFactory) -> Iterator[tuple[str, dict[str, Any], zmq.Socket]]:
    """A daemon fed the same frame 5 times a second, a subscriber keeping its newest
    messages by (kind, seq), a second publisher (hand-made class messages), the dashboard."""
    d = daemon_factory(config=RULES)
    ctx = zmq.Context()
    pub = result_publisher(ctx, hwm=100)
    pub_endpoint = bind(pub, "tcp://127.0.0.1:0")
    dash, url = start_dashboard(d.output, pub_endpoint, query=d.query)
    seen: dict[str, Any] = {"det": {}, "preview": {}, "alert": {}}
    stop = threading.Event()
    sub = Subscriber(d.output, topics=("det.", "alert.", "preview."))
    sub.wait_ready()

    def receive() -> None:
        while not stop.is_set():
            m = sub.recv(0.1)
            if m is not None:
                seen[m.topic.split(".")[0]][m.header.seq if m.topic[0] != "a" else m.header.rule] = m

    def send() -> None:
        with FramePublisher(d.input, mode="auto", source="big") as fp:
            while not stop.wait(0.2):
                fp.send(FRAME.image, pixel_size_nm=0.5)

    threads = [threading.Thread(target=f, daemon=True) for f in (receive, send)]
    for t in threads:
        t.start()
    try:
        yield url, seen, pub
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sub.close()
        stop_process(dash)
        pub.close(linger=0)
        ctx.term()


def _page(p: Any, url: str) -> Any:
    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.wait_for_function("() => /particles$/.test(document.getElementById('frame-caption')"
                           ".textContent)", timeout=30_000)
    return page


def test_alert_values_carry_the_unit_of_their_rules_field(
        setup: tuple[str, dict[str, Any], zmq.Socket]) -> None:
    url, seen, _ = setup
    with _sync_playwright()() as p:
        page = _page(p, url)
        for rule in ("large", "elongated", "big-area"):
            page.wait_for_selector(f"#alerts li:has-text('{rule}')", timeout=20_000)
        lines = page.evaluate(
            "() => Object.fromEntries(Array.from(document.querySelectorAll('#alerts li')).reverse()"
            ".map((li) => [li.querySelector('.a-rule').textContent,"
            " li.querySelectorAll('.a-meta')[1].textContent]))")
    large, elongated, area = seen["alert"]["large"].header, seen["alert"]["elongated"].header, \
        seen["alert"]["big-area"].header
    assert large.units == elongated.units == "nm"
    assert lines["large"].startswith("value ") and lines["large"].endswith(" vs threshold 9 nm"), lines
    assert " nm vs " in lines["large"], lines
    # an aspect ratio has no unit: "1.98 vs threshold 1.40", never "1.98 nm vs 1.40 nm"
    assert "nm" not in lines["elongated"] and lines["elongated"].endswith("vs threshold 1.40"), lines
    assert lines["big-area"].endswith("vs threshold 60 nm²") and " nm² vs " in lines["big-area"], lines
    assert elongated.value > 1.4 and large.value > 9 and area.value > 60


CANVAS = """() => {
  const c = document.getElementById('frame');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const grey = new Array(c.width * c.height), colour = new Array(c.width * c.height);
  for (let i = 0; i < grey.length; i++) {
    const r = d[4 * i], g = d[4 * i + 1], b = d[4 * i + 2];
    grey[i] = (r + g + b) / 3;
    colour[i] = Math.max(Math.abs(r - g), Math.abs(g - b), Math.abs(r - b));
  }
  return { w: c.width, h: c.height, grey, colour,
           caption: document.getElementById('frame-caption').textContent };
}"""


def _canvas(page: Any) -> tuple[np.ndarray, np.ndarray, str]:
    c = page.evaluate(CANVAS)
    shape = (c["h"], c["w"])
    return (np.array(c["grey"], float).reshape(shape), np.array(c["colour"], float).reshape(shape),
            c["caption"])


def test_outlines_and_cam_sit_on_a_shrunk_non_square_frame(
        setup: tuple[str, dict[str, Any], zmq.Socket]) -> None:
    url, seen, pub = setup
    with _sync_playwright()() as p:
        page = _page(p, url)
        page.uncheck("#show-trails")
        page.wait_for_timeout(400)  # one drawn frame (allowed: it reads a picture)
        _, colour, caption = _canvas(page)
        page.uncheck("#show-outlines")
        page.wait_for_timeout(400)
        grey, _, _ = _canvas(page)
        seq = int(caption.split("#", 1)[1].split(" ", 1)[0])
        det, preview = seen["det"][seq], seen["preview"][seq]
        h, w = colour.shape
        rows, cols = preview.header.size
        assert preview.header.scale < 1 and rows != cols and det.header.shape == (600, 1100)
        k = w / cols  # canvas px per preview px
        assert abs(h / rows - k) < 0.02 * k  # the canvas keeps the preview's aspect
        t = det.array[~det.array["border"]]
        assert len(t) > 20
        s = preview.header.scale * k  # canvas px per frame px
        cx, cy = (t["x"] + 0.5) * s, (t["y"] + 0.5) * s
        bb = t["bbox"].astype(float) * s
        errors, dark = [], []
        for i in range(len(t)):
            x0, y0, x1, y1 = (int(np.floor(bb[i, 0])) - 3, int(np.floor(bb[i, 1])) - 3,
                              int(np.ceil(bb[i, 2])) + 3, int(np.ceil(bb[i, 3])) + 3)
            others = np.delete(np.arange(len(t)), i)
            if (x0 < 0 or y0 < 0 or x1 > w or y1 > h or
                    ((bb[others, 0] < x1) & (bb[others, 2] > x0) & (bb[others, 1] < y1)
                     & (bb[others, 3] > y0)).any()):
                continue  # near the edge or another particle: its outline is not alone here
            win = colour[y0:y1, x0:x1] > 60
            yy, xx = np.nonzero(win)
            assert len(xx) > 4, f"no outline drawn around particle {t['id'][i]}"
            errors.append(np.hypot(xx.mean() + x0 + 0.5 - cx[i], yy.mean() + y0 + 0.5 - cy[i]))
            # the picture under it: the particle is darker than its surroundings (TEM)
            r = max(1, int(0.25 * min(bb[i, 2] - bb[i, 0], bb[i, 3] - bb[i, 1])))
            inner = grey[int(cy[i]) - r:int(cy[i]) + r + 1, int(cx[i]) - r:int(cx[i]) + r + 1]
            dark.append(inner.mean() < np.median(grey[y0:y1, x0:x1]))
        assert len(errors) > 10, len(errors)
        assert np.median(errors) < 1.0 and np.quantile(errors, 0.9) < 2.0, sorted(errors)
        assert np.mean(dark) > 0.9, dark

        # a hand-made CAM whose only hot cell is near the top right: drawn there
        heat = np.zeros((12, 20), np.uint8)
        heat[2, 16] = 255

        def message() -> list:
            return encode_message(ClassHeader(
                source="big", seq=seq, t_acq_ns=time.time_ns(), labels=["x"],
                probabilities=[1.0], heatmap_shape=heat.shape), heat)

        deadline = time.monotonic() + 15
        while page.is_disabled("#show-cam"):
            assert time.monotonic() < deadline, "the CAM never arrived"
            pub.send_multipart(message())
            page.wait_for_timeout(200)
        page.check("#show-cam")
        page.wait_for_timeout(400)
        _, colour, _ = _canvas(page)
        yy, xx = np.nonzero(colour > 25)  # the palette's hot end at 60 % over grey
        assert len(xx) > 20
        # cell (row 2, col 16) of 12 x 20 covers frame fraction x 16/20..17/20, y 2/12..3/12
        assert 16 / 20 * w - 2 < np.median(xx) < 17 / 20 * w + 2, np.median(xx) / w
        assert 2 / 12 * h - 2 < np.median(yy) < 3 / 12 * h + 2, np.median(yy) / h


def test_a_source_whose_frames_stopped_is_shown_as_stale(daemon_factory: DaemonFactory) -> None:
    """Two sources; one stops sending while the daemon and the other go on: selected, it is
    shown as stale (an amber line, its picture greyed); the live one is not; it is live again when its
    frames come back."""
    d = daemon_factory(config="[classify]\nenabled = false\n")
    dash, url = start_dashboard(d.output)
    image = FRAME.image[:256, :256]
    sending = {"a": threading.Event(), "b": threading.Event()}
    for e in sending.values():
        e.set()
    stop = threading.Event()

    def send(source: str) -> None:
        with FramePublisher(d.input, mode="auto", source=source) as fp:
            while not stop.wait(0.25):
                if sending[source].is_set():
                    fp.send(image, pixel_size_nm=0.5)

    threads = [threading.Thread(target=send, args=(s,), daemon=True) for s in sending]
    for t in threads:
        t.start()
    banner = ("() => { const b = document.getElementById('source-stale');"
              " return b.hidden ? '' : b.textContent; }")
    try:
        with _sync_playwright()() as p:
            page = _page(p, url)
            page.wait_for_function("() => document.getElementById('source').options.length === 2",
                                   timeout=20_000)
            page.select_option("#source", "b")
            page.wait_for_timeout(500)
            assert page.evaluate(banner) == ""
            sending["b"].clear()
            page.wait_for_function(f"() => ({banner})().startsWith('No frames from b for')",
                                   timeout=10_000)
            assert page.evaluate("() => document.getElementById('frame-panel')"
                                 ".classList.contains('stale-source')")
            assert page.inner_text("#conn") == "daemon connected"
            assert page.evaluate("() => document.getElementById('banner').hidden")
            page.select_option("#source", "a")
            page.wait_for_function(f"() => ({banner})() === ''", timeout=3_000)
            page.select_option("#source", "b")
            sending["b"].set()
            page.wait_for_function(f"() => ({banner})() === ''", timeout=10_000)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        stop_process(dash)
