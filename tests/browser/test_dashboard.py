"""``nanoscout dashboard`` in real headless Chromium beside a live daemon and simulator.

The page must show frames with particles (a scale bar, zoom, pan and display contrast),
statistics (a D50 trend whose axis does not magnify noise), morphology clusters (table, colouring,
hover), alerts (a particle one with its crop, a novelty one with its CAM), the daemon's own
field-of-view classification with a working CAM overlay, the AI lens's feature maps asked of
the daemon's query socket, no console errors, a red banner once the daemon is gone (the
lens then says it got no answer), and an amber one only for real loss (not for frames a live
daemon supersedes). A second publisher adds a hand-made class message of a
second source (the source selector). Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from nanoscout.clients.dashboard import DashboardServer, DashboardState, LensView
from nanoscout.clients.query import QueryError
from nanoscout.wire.protocol import (
    ClassHeader,
    ControlReply,
    ControlRequest,
    HealthHeader,
    LensRequest,
    StatsHeader,
    decode_message,
    encode_message,
)
from tests.conftest import REPO
from tests.system.conftest import DaemonFactory, nanoscout, wait_ready
from tests.unit.test_dashboard import FakeDaemon, payload

pytestmark = [pytest.mark.system, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

#: rules that surely fire on the simulator's 8 nm particles (one per particle, one per count)
#: and on every classified frame (novelty > 1e-6, explained by the class activation map)
DAEMON_CONFIG = """
[preview]
max_rate_hz = 4

[[alerts]]
name = "large-particle"
kind = "particle"
severity = "warning"
where = { ecd_nm = { gt = 9 } }
cooldown_s = 2.0

[[alerts]]
name = "crowded"
kind = "count"
severity = "info"
above = 1
cooldown_s = 3.0

[[alerts]]
name = "unusual-field"
kind = "novelty"
severity = "info"
threshold = 1e-6
cooldown_s = 3.0
"""

#: the shipped classifier's classes (what the daemon's class messages must name)
CLASSES: list[str] = json.loads(
    (REPO / "models" / "weights" / "classifier.json").read_text(encoding="utf-8"))["classes"]


def _sync_playwright() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Python playwright is not installed (pip install -e '.[dev]')")
    return sync_playwright


def start_dashboard(*endpoints: str, query: str | None = None, timeout: float = 60.0
                    ) -> tuple[subprocess.Popen[str], str]:
    """``nanoscout dashboard`` on a free port; returns the process and the page URL."""
    args = [a for ep in endpoints for a in ("--results", ep)]
    if query is not None:
        args += ["--query", query]
    proc = nanoscout("dashboard", *args, "--port", "0", stdout=subprocess.PIPE)
    ready, _lines, _pump = wait_ready(proc, "dashboard", timeout)
    return proc, ready["dashboard"]


def _class_message(seq: int, source: str = "sim") -> list:
    yy, xx = np.mgrid[0:24, 0:32]
    heat = (255 * np.exp(-((xx - 22) ** 2 + (yy - 8) ** 2) / 40.0)).astype(np.uint8)
    h = ClassHeader(source=source, seq=seq, t_acq_ns=time.time_ns(),
                    labels=["sintered-test", "dispersed", "agglomerated"],
                    probabilities=[0.71, 0.22, 0.07], novelty=0.42, engine="hand-made",
                    heatmap_shape=(24, 32))
    return encode_message(h, heat)


def _health_message(dropped: dict[str, int] | None = None, transport_gaps: int = 0) -> list:
    return encode_message(HealthHeader(
        t_ns=time.time_ns(), uptime_s=1.0, policy="live", engines={"detector": "test"},
        frames_received=0, frames_processed=0, frames_dropped=dropped or {}, rejected={},
        transport_gaps=transport_gaps, queue_depth=0, fps=0.0, latency_ms_p50=None,
        latency_ms_p99=None,
        transport_gaps_by_source={"sim": transport_gaps} if transport_gaps else {}))


def _publish_until(page: Any, sock: zmq.Socket, make: Any, js: str, timeout: float) -> None:
    """Publish ``make()`` every 0.25 s until ``js`` is true in the page (PUB/SUB joins late)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + timeout
    while True:
        sock.send_multipart(make())
        try:
            page.wait_for_function(js, timeout=250)
            return
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed: {js}") from None


CANVAS_SPREAD = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, s = 0, s2 = 0;
  for (let i = 0; i < d.length; i += 4 * 7) { const v = d[i] + d[i+1] + d[i+2]; n++; s += v; s2 += v * v; }
  const m = s / n; return Math.sqrt(Math.max(0, s2 / n - m * m));
}"""

TEXT = "(id) => document.getElementById(id).textContent"

#: per cent of the frame canvas's pixels with |R - B| > 30: 0 for a grey micrograph, > 0 where
#: the CAM's palette is drawn (a peaked CAM may colour only a few of its cells)
CANVAS_COLOUR = """() => {
  const c = document.getElementById('frame');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, k = 0;
  for (let i = 0; i < d.length; i += 4 * 5) { k += Math.abs(d[i] - d[i+2]) > 30 ? 1 : 0; n++; }
  return 100 * k / n;
}"""


def _is_expected_503(text: str) -> bool:
    """Chromium logs a 503 answer as a console error; the lens's 503 is what the test wants."""
    return "status of 503" in text


def test_dashboard_in_chromium(
    daemon_factory: DaemonFactory, publisher: tuple[zmq.Socket, str]
) -> None:
    sync_playwright = _sync_playwright()
    pub, pub_endpoint = publisher
    d = daemon_factory("--policy", "live", config=DAEMON_CONFIG)
    assert d.query is not None, "the daemon serves no query socket"
    dash, url = start_dashboard(d.output, pub_endpoint, query=d.query)
    sim = nanoscout("simulate", "--frames-endpoint", d.input, "--mode", "pub", "--size", "384",
                    "--rate", "4", "--seed", "11", "--dwell", "3", stdout=subprocess.DEVNULL)
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("console", lambda m: errors.append(f"console: {m.text}")
                    if m.type == "error" and not _is_expected_503(m.text) else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(url)
            assert page.title() == "nanoscout dashboard"

            # frames: the counter rises and the canvas shows a picture
            page.wait_for_function("() => document.getElementById('frame-seq').textContent"
                                   ".startsWith('#')", timeout=120_000)
            seq0 = int(page.evaluate(TEXT, "frame-seq")[1:])
            page.wait_for_function(
                f"() => parseInt(document.getElementById('frame-seq').textContent.slice(1)) > {seq0}",
                timeout=60_000)
            page.wait_for_function("() => document.getElementById('frame-empty').hidden",
                                   timeout=60_000)
            assert page.evaluate(CANVAS_SPREAD, "frame") > 10  # not blank, not flat
            page.wait_for_function("() => /particles$/.test(document.getElementById("
                                   "'frame-caption').textContent)", timeout=60_000)

            # statistics and histogram, updating
            page.wait_for_function(
                "() => { const r = document.querySelector('#stats-table tbody tr td:nth-child(3)');"
                " return r && parseInt(r.textContent) > 0; }", timeout=60_000)
            n0 = int(page.evaluate(
                "() => document.querySelector('#stats-table tbody tr td:nth-child(3)').textContent"))
            page.wait_for_function(
                "() => parseInt(document.querySelector('#stats-table tbody tr td:nth-child(3)')"
                f".textContent) > {n0}", timeout=60_000)
            table = page.inner_text("#stats-table")
            assert "D50 (nm)" in table and "density (per µm²)" in table
            assert page.evaluate(CANVAS_SPREAD, "histogram") > 1

            # an alert with its explanation and picture
            page.wait_for_selector("#alerts li img", timeout=60_000)
            first = page.inner_text("#alerts li")
            assert "large-particle" in first or "crowded" in first

            # health
            page.wait_for_function("() => document.getElementById('health').textContent"
                                   ".includes('latency p50')", timeout=30_000)
            assert "onnxruntime" in page.inner_text("#health")

            # the daemon's own classification, with its CAM on the frame
            page.wait_for_function(
                "(names) => names.some((n) => document.getElementById('class-body')"
                ".textContent.includes(n))", arg=CLASSES, timeout=60_000)
            meta = page.inner_text("#class-body .cls-meta")
            assert "novelty" in meta and "CAM" in meta and "no CAM" not in meta, meta
            page.wait_for_function("() => !document.getElementById('show-cam').disabled",
                                   timeout=30_000)
            page.uncheck("#show-outlines")
            page.wait_for_timeout(300)  # a drawn frame (allowed: it compares two pictures)
            grey = page.evaluate(CANVAS_COLOUR)
            page.check("#show-cam")
            page.wait_for_timeout(300)
            coloured = page.evaluate(CANVAS_COLOUR)
            assert grey < 0.1 and coloured > 0.5, (grey, coloured)  # the overlay is drawn
            page.uncheck("#show-cam")
            page.check("#show-outlines")

            # a novelty alert explained by its class activation map
            page.wait_for_selector("#alerts li:has-text('unusual-field') img", timeout=60_000)
            novel = page.inner_text("#alerts li:has-text('unusual-field')")
            assert "heatmap" in novel and "novelty" in novel.lower(), novel

            # morphology clusters: the table under the statistics, colouring, legend
            page.wait_for_selector("#clusters-table tbody tr", timeout=90_000)
            rows = page.inner_text("#clusters-table")
            assert "ECD (nm)" in rows and "shape" in rows, rows
            page.click("#colour-cluster")
            page.wait_for_function("() => document.getElementById('legend-text').textContent"
                                   ".includes('cluster ')", timeout=10_000)

            # the AI lens: asked on demand, feature maps with seq and novelty
            page.click("#lens-go")
            page.wait_for_selector("#lens-img:not([hidden])", timeout=30_000)
            caption = page.inner_text("#lens-caption")
            assert caption.startswith("sim #") and "act_" in caption and "novelty" in caption, caption
            layers = page.eval_on_selector_all("#lens-layer option", "os => os.map(o => o.value)")
            assert "reconstruction" in layers and any(v.startswith("act_") for v in layers), layers
            page.select_option("#lens-layer", "reconstruction")
            page.wait_for_function("() => document.getElementById('lens-caption').textContent"
                                   ".includes('reconstruction')", timeout=30_000)
            act = "act_enc2" if "act_enc2" in layers else next(v for v in layers if v != "reconstruction")
            page.select_option("#lens-layer", act)
            page.wait_for_function(f"() => document.getElementById('lens-caption').textContent"
                                   f".includes('{act} ·')", timeout=30_000)
            assert " maps (" in page.inner_text("#lens-caption")

            # a second source from the second publisher: listed, not forced on the operator
            _publish_until(page, pub, lambda: _class_message(1, source="other"),
                           "() => document.getElementById('source').options.length === 2",
                           timeout=15)
            assert page.input_value("#source") == "sim"  # the first seen stays selected
            page.select_option("#source", "other")
            page.wait_for_function("() => !document.getElementById('frame-empty').hidden",
                                   timeout=5_000)  # no preview from 'other'
            assert "sintered-test" in page.inner_text("#class-body")
            assert "novelty 0.42" in page.inner_text("#class-body")
            page.select_option("#source", "sim")
            page.wait_for_function("() => document.getElementById('frame-empty').hidden",
                                   timeout=5_000)
            page.click("#lens-go")  # the selector change cleared the view of 'sim'
            page.wait_for_selector("#lens-img:not([hidden])", timeout=30_000)

            # hover over a particle: its measurements and cluster
            _hover_a_particle(page, url)

            # the operator's view of the frame: scale bar, zoom, pan, contrast; D50 axis span
            _check_view_controls(page)

            page.wait_for_timeout(300)  # let the last events draw (allowed: a screenshot)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            page.mouse.move(0, 0)
            page.check("#show-cam")
            page.click("#colour-class")
            page.wait_for_timeout(300)
            page.screenshot(path=str(ARTIFACTS / "dashboard-cam.png"), full_page=True)
            assert not page.is_visible("#banner")

            # the operator gives 'sim' a particle size range: the daemon takes it from the next
            # frame (the simulator's particles are ~8 nm, so 60-120 nm moves the scale), and
            # the top bar says so; cleared, the estimate alone again
            page.fill("#size-low", "60")
            page.fill("#size-high", "120")
            page.click("#size-set")
            page.wait_for_function("() => document.getElementById('control-msg').textContent"
                                   ".includes('60–120 nm')", timeout=15_000)
            page.wait_for_function(
                "() => { const e = document.getElementById('frame-size-hint');"
                " return !e.hidden && e.textContent === 'scale from the size range'; }",
                timeout=60_000)
            page.click("#size-clear")
            page.wait_for_function("() => document.getElementById('control-msg').textContent"
                                   ".includes('no size range of its own')", timeout=15_000)
            page.wait_for_function("() => document.getElementById('frame-size-hint').hidden",
                                   timeout=60_000)
            page.fill("#size-low", "")
            page.click("#size-set")  # nothing to send: the page says what it needs
            assert "give the low" in page.inner_text("#control-msg")

            # the daemon goes away: red banner within a few seconds
            assert d.stop() == 0
            page.wait_for_function(
                "() => { const b = document.getElementById('banner');"
                " return !b.hidden && b.textContent.includes('Daemon unreachable'); }",
                timeout=15_000)
            # ... and the lens says so instead of hanging
            t0 = time.monotonic()
            page.click("#lens-go")
            page.wait_for_function("() => document.getElementById('lens-msg').textContent"
                                   ".includes('AI lens unavailable')", timeout=10_000)
            assert time.monotonic() - t0 < 6.0
            assert "no answer" in page.inner_text("#lens-msg")
            page.screenshot(path=str(ARTIFACTS / "dashboard-unreachable.png"))
            # ... and it recovers when messages come back
            _publish_until(page, pub, _health_message,
                           "() => document.getElementById('banner').hidden", timeout=15)
            # superseded frames in live mode are policy: no loss banner, only a note in health
            _publish_until(page, pub, lambda: _health_message({"superseded": 40}),
                           "() => document.getElementById('health').textContent"
                           ".includes('superseded 40')", timeout=15)
            assert "live policy" in page.inner_text("#health")
            assert not page.is_visible("#gaps")
            # real loss (frames lost between the adapter and the daemon) raises it
            _publish_until(page, pub, lambda: _health_message({"superseded": 40}, 3),
                           "() => !document.getElementById('gaps').hidden", timeout=15)
            assert "transport gaps (sim): 3" in page.inner_text("#gaps")
            assert "superseded" not in page.inner_text("#gaps")
            assert errors == [], errors
            browser.close()
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(30)
        if dash.poll() is None:
            dash.send_signal(signal.SIGINT)
        assert dash.wait(30) == 0


VIEW = "() => document.getElementById('frame').dataset.view.split(',').map(Number)"
BAR = """() => { const b = document.getElementById('scalebar');
  return [Number(b.dataset.length), parseFloat(b.querySelector('i').style.width),
          b.querySelector('span').textContent, !b.hidden]; }"""


def _check_view_controls(page: Any) -> None:
    """Scale bar in nm that follows the zoom, zoom by button and wheel, pan by drag, reset by
    double-click, display contrast, and a D50 axis that does not magnify noise."""
    page.mouse.move(0, 0)
    length, width, label, shown = page.evaluate(BAR)
    assert shown and label.endswith(" nm") and 40 <= width <= 260, (length, width, label)
    nm_per_css = length / width
    page.click("#zoom-in")
    page.click("#zoom-in")
    # both clicks handled (x1.5 each): the view's zoom is 2.25
    page.wait_for_function("() => Number(document.getElementById('frame').dataset.view"
                           ".split(',')[0]) > 2.2")
    z, x0, y0 = page.evaluate(VIEW)
    assert z == pytest.approx(2.25, rel=1e-3)
    length, width, label, _ = page.evaluate(BAR)
    assert length / width == pytest.approx(nm_per_css / 2.25, rel=0.02), label  # follows zoom
    box = page.locator("#frame").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx - 80, cy - 60, steps=4)
    page.mouse.up()
    z2, x1, y1 = page.evaluate(VIEW)
    assert z2 == z and x1 > x0 and y1 > y0  # dragged left/up: the view moved right/down
    page.mouse.wheel(0, -120)
    page.wait_for_function(f"() => Number(document.getElementById('frame').dataset.view"
                           f".split(',')[0]) > {z}")
    page.dblclick("#frame")
    page.wait_for_function("() => document.getElementById('zoom-level').textContent === '1.0×'")
    # display contrast: a wider grey spread, then back
    page.uncheck("#show-outlines")
    page.wait_for_timeout(300)  # allowed: compares two drawn pictures
    plain = page.evaluate(CANVAS_SPREAD, "frame")
    page.evaluate("() => { const c = document.getElementById('contrast'); c.value = '300';"
                  " c.dispatchEvent(new Event('input')); }")
    page.wait_for_timeout(300)  # allowed: compares two drawn pictures
    strong = page.evaluate(CANVAS_SPREAD, "frame")
    assert strong > 1.3 * plain, (plain, strong)
    page.click("#contrast-reset")
    page.check("#show-outlines")
    # the D50 trend axis spans at least 20 % of the level (no magnified noise)
    lo, hi = page.evaluate("() => document.getElementById('series').dataset.d50Axis"
                           ".split(',').map(Number)")
    assert hi - lo >= 0.2 * (hi + lo) / 2 * 0.99, (lo, hi)


def _hover_a_particle(page: Any, url: str) -> None:
    """Move the mouse onto a particle of the shown frame until the hover box appears."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator("#frame").bounding_box()
    for _ in range(20):
        snap = json.loads(page.evaluate("(u) => fetch(u).then(r => r.text())",
                                        url + "api/snapshot"))
        frame = snap.get("frame:sim") or {}
        det = frame.get("det") or {}
        if det.get("x"):
            rows, cols = frame["size"]
            i = int(np.argmax(det["a"]))
            x = box["x"] + det["x"][i] / cols * box["width"]
            y = box["y"] + det["y"][i] / rows * box["height"]
            page.mouse.move(x + 1, y)
            page.mouse.move(x, y)
            try:
                page.wait_for_selector("#tooltip:not([hidden])", timeout=500)
            except PlaywrightTimeout:
                continue  # a newer frame came in between: try its particles
            text = page.inner_text("#tooltip")
            assert "ECD" in text and "roundness" in text and "nm" in text and "cluster" in text
            return
    raise AssertionError("no hover box over any particle")


def _hand_made_dets(source: str) -> tuple[list[int], Any]:
    """(seq of every det made so far, det(**fields)): det returns a function that builds the
    next empty ``det`` of ``source`` with those header fields, for :func:`_publish_until`."""
    from nanoscout.wire.particles import empty_table
    from nanoscout.wire.protocol import DetHeader

    sent: list[int] = []

    def det(**fields: Any) -> Any:
        def make() -> list:
            t = time.time_ns()
            sent.append(len(sent))
            h = DetHeader(source=source, seq=sent[-1], t_acq_ns=t, t_recv_ns=t, t_done_ns=t,
                          stage_ms={}, pixel_size_nm=1.0, units="nm", n=0, engine="hand-made",
                          working_scale=1.0, **fields)
            return encode_message(h, empty_table(0))
        return make

    return sent, det


def _top_bar_badge(publisher: tuple[zmq.Socket, str], badge: str, source: str,
                   shown: list[tuple[dict[str, Any], str, str]],
                   quiet: list[dict[str, Any]]) -> None:
    """Publish dets of ``source`` into a dashboard and see the top bar's ``badge`` element
    show (text, words of its explanation) for each of ``shown``'s header fields, then hide
    for each of ``quiet``'s."""
    sync_playwright = _sync_playwright()
    sock, endpoint = publisher
    dash, url = start_dashboard(endpoint)
    sent, det = _hand_made_dets(source)
    visible = ("() => {{ const e = document.getElementById({!r}); return !e.hidden"
               " && e.textContent === {!r} && e.title.includes({!r}); }}")
    hidden = ("() => document.getElementById({!r}).hidden && "
              "document.getElementById('frame-seq').textContent === '#' + {}")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            page = browser.new_page()
            page.goto(url)
            for i, (fields, text, why) in enumerate(shown):
                _publish_until(page, sock, det(**fields), visible.format(badge, text, why),
                               60 if i == 0 else 30)
            for fields in quiet:
                sock.send_multipart(det(**fields)())
                page.wait_for_function(hidden.format(badge, sent[-1]), timeout=30_000)
            browser.close()
    finally:
        dash.send_signal(signal.SIGINT)
        dash.wait(30)


def test_the_top_bar_says_what_a_frames_size_range_did(
        publisher: tuple[zmq.Socket, str]) -> None:
    """det.size_hint (protocol 1.8) in the top bar: "applied" and the two ways a range goes
    unused are shown with their explanation; "agreed" and a frame without a range show nothing."""
    _top_bar_badge(publisher, "frame-size-hint", "hinted", [
        ({"size_hint": "applied"}, "scale from the size range", "outside the particle size range"),
        ({"size_hint": "uncalibrated"}, "size range unused", "no pixel size"),
        ({"size_hint": "unused"}, "size range unused", "fixed or preset")],
        [{"size_hint": "agreed"}, {"size_hint": None}])


def test_the_top_bar_says_when_a_low_dose_frame_was_smoothed(
        publisher: tuple[zmq.Socket, str]) -> None:
    """det.smoothing_px (protocol 1.9) in the top bar: a smoothed frame shows its width and,
    in the explanation, its noise; a frame left as it was (0) or not measured (None) shows
    nothing."""
    _top_bar_badge(publisher, "frame-smoothed", "dosed", [
        ({"noise": 0.11, "smoothing_px": 1.3}, "low dose: smoothed 1.3 px", "(0.110 of its")],
        [{"noise": 0.02, "smoothing_px": 0.0}, {"noise": None, "smoothing_px": None}])


def test_a_restarted_daemons_old_frame_is_not_shown_as_the_new_runs(
        publisher: tuple[zmq.Socket, str]) -> None:
    """A daemon restarts (another ``daemon_run``): from the new run's first result the page
    shows the placeholder saying so, not the earlier run's picture, until the new run's first
    preview (the earlier run's frame stood under the new run's numbers until then)."""
    from nanoscout.wire.protocol import PreviewHeader

    sync_playwright = _sync_playwright()
    sock, endpoint = publisher
    run1, run2 = 1_765_000_000_000_000_000, 1_765_000_060_000_000_000
    _sent, det = _hand_made_dets("restarted")
    picture = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))

    def preview(seq: int, run: int) -> Any:
        h = PreviewHeader(source="restarted", seq=seq, t_acq_ns=time.time_ns(), shape=(64, 64),
                          size=(64, 64), scale=1.0, pixel_size_nm=1.0, daemon_run=run)
        return lambda: encode_message(h, picture)

    empty = ("() => {{ const e = document.getElementById('frame-empty');"
             " return !e.hidden && e.textContent.includes({!r}); }}")
    shown = ("() => document.getElementById('frame-empty').hidden && document.getElementById("
             "'frame-caption').textContent.startsWith({!r})")
    dash, url = start_dashboard(endpoint)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            page = browser.new_page()
            page.goto(url)
            _publish_until(page, sock, preview(3, run1), shown.format("restarted #3 "), 60)
            assert page.evaluate(CANVAS_SPREAD, "frame") > 10  # the picture is drawn
            _publish_until(page, sock, det(daemon_run=run2),
                           empty.format("the daemon restarted"), 30)
            assert page.inner_text("#frame-caption") == ""
            _publish_until(page, sock, preview(0, run2), shown.format("restarted #0 "), 30)
            browser.close()
    finally:
        dash.send_signal(signal.SIGINT)
        dash.wait(30)


def test_event_stream_sends_only_changes_at_a_bounded_rate() -> None:
    """200 stats/s into the gateway state: a browser gets ~10 batches/s, the newest each time."""
    state = DashboardState(endpoints=["tcp://127.0.0.1:1"])
    server = DashboardServer(state, port=0, max_rate_hz=10.0).start()
    stop = threading.Event()

    def feed() -> None:
        seq = 0
        block = {"n_frames": 1, "count": 1, "ecd": {"d50": 1.0}}
        while not stop.wait(0.005):
            h = StatsHeader(source="fast", seq=seq, t_ns=seq, units="nm", window=block,
                            cumulative=block)
            state.ingest(decode_message([bytes(x) for x in encode_message(h)]))
            seq += 1

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        host, port = server.url.split("//")[1].rstrip("/").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/events")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        t_end = time.monotonic() + 2.0
        text = b""
        while time.monotonic() < t_end:
            text += resp.read1(65536)
        conn.close()
        events = text.decode().count("event: stats\n")
        assert 8 <= events <= 25, events  # 2 s at <= 10 batches/s, not 400 messages
        assert "event: meta\n" in text.decode() and "event: status\n" in text.decode()
        seqs = [json.loads(line[6:])["seq"] for line in text.decode().splitlines()
                if line.startswith('data: {"v"')]
        assert seqs == sorted(seqs) and seqs[-1] - seqs[0] > 100  # newest each time

        for path, status in (("/", 200), ("/static/dashboard.js", 200),
                             ("/static/dashboard.css", 200), ("/static/../gateway.py", 404),
                             ("/nothing", 404)):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", path)
            r = conn.getresponse()
            assert r.status == status, path
            r.read()
            conn.close()
    finally:
        stop.set()
        feeder.join(5)
        server.close()


def test_an_item_that_cannot_be_built_leaves_the_snapshot_and_event_stream_working() -> None:
    """An alert with swapped bbox corners and a stats message whose JSON form cannot be built:
    /api/snapshot still answers 200 and /events keeps sending everything else."""
    from tests.unit.test_dashboard import (
        _alert_with_boxes,
        _unshowable_stats,
        alert,
        preview,
        stats,
    )

    state = DashboardState(endpoints=["tcp://127.0.0.1:1"])
    state.ingest(preview(1, source="bad"))
    state.ingest(_alert_with_boxes(1, [(60, 60, 10, 10)], source="bad"))
    state.ingest(_unshowable_stats(1))
    state.ingest(alert(2))
    state.ingest(stats(2))
    server = DashboardServer(state, port=0, max_rate_hz=10.0).start()
    try:
        status, snap = _get(server.url, "/api/snapshot")
        assert status == 200
        assert "stats:bad" not in snap and snap["stats:sim"]["seq"] == 2
        assert [a["seq"] for a in snap["alerts"]] == [1, 2]
        assert snap["alerts"][0]["thumb_png"] is not None
        assert snap["status"]["payload_errors"] == 1
        host, port = server.url.split("//")[1].rstrip("/").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/events")
        resp = conn.getresponse()
        t_end = time.monotonic() + 1.5
        text = b""
        while time.monotonic() < t_end and text.count(b"event: status\n") < 2:
            text += resp.read1(65536)
        conn.close()
        events = [line[7:] for line in text.decode().splitlines() if line.startswith("event: ")]
        assert events.count("alert") == 2 and events.count("stats") == 1, events
        assert events.count("status") >= 2, events  # the stream lives on
        assert {"meta", "sources"} <= set(events), events
    finally:
        server.close()


# ------------------------------------------------------- the AI-lens HTTP API, no browser


def _get(url: str, path: str) -> tuple[int, dict]:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_lens_endpoint_answers_or_says_why_not() -> None:
    st = DashboardState(query="tcp://x")
    ok = DashboardServer(st, port=0, lens=LensView("tcp://x", request=FakeDaemon())).start()
    down = DashboardServer(st, port=0, lens=LensView("tcp://x", request=FakeDaemon(
        QueryError("no answer from the daemon's query socket tcp://x within 2.5 s")))).start()
    none = DashboardServer(DashboardState(), port=0).start()
    try:
        status, d = _get(ok.url, "/api/lens?source=sim&layer=act_code")
        assert status == 200 and d["layer"] == "act_code" and d["shown"] == 16
        assert _get(ok.url, "/api/lens")[0] == 400
        status, d = _get(down.url, "/api/lens?source=sim")
        assert status == 503 and "no answer from the daemon's query socket" in d["error"]
        status, d = _get(none.url, "/api/lens?source=sim")
        assert status == 503 and "--query" in d["error"]
        assert payload(st, "meta")["query"] == "tcp://x"
    finally:
        for s in (ok, down, none):
            s.close()


def test_lens_of_a_silent_daemon_times_out(tmp_path: Path) -> None:
    """Nothing listens: the real REQ client gives up within its timeout, and says so."""
    view = LensView(f"ipc://{tmp_path}/nobody", timeout=0.3)
    server = DashboardServer(DashboardState(), port=0, lens=view).start()
    try:
        t0 = time.monotonic()
        status, d = _get(server.url, "/api/lens?source=sim&layer=act_enc1")
        assert time.monotonic() - t0 < 3.0
        assert status == 503 and "within 0.3 s" in d["error"]
    finally:
        server.close()


def test_lens_over_a_real_rep_socket(tmp_path: Path) -> None:
    """request_lens -> REP socket -> the mosaic: float16 maps survive the wire."""
    ctx: zmq.Context = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/query"
    rep.bind(endpoint)
    fake = FakeDaemon()

    def serve() -> None:
        for _ in range(2):
            req = decode_message(rep.recv_multipart())
            assert isinstance(req.header, LensRequest)
            reply, arrays = fake(endpoint, req.header.source, req.header.outputs, timeout=1.0)
            rep.send_multipart(encode_message(reply, *arrays.values()))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        d = LensView(endpoint, timeout=2.0).view("sim")
        assert d["layer"] == "act_enc1" and d["channels"] == 6 and d["map_shape"] == [8, 8]
    finally:
        t.join(5)
        rep.close(linger=0)


def _post(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_control_buttons_reach_the_daemons_query_socket_and_track_history_answers(
        tmp_path: Path) -> None:
    """POST /api/control -> request_control -> a real REP query server (the daemon's) ->
    the pipeline's request handler; a page of another site cannot send it."""
    import functools

    from nanoscout.clients.query import request_control
    from nanoscout.daemon.query import LensServer
    from tests.unit.test_dashboard import _tracked_det

    seen: list[tuple[str, str]] = []
    sizes: list[tuple[float, float] | None] = []

    def control(req: ControlRequest) -> ControlReply:
        seen.append((req.source or "", req.action))
        if req.action == "set_particle_size":
            sizes.append(req.particle_size_nm)
        return ControlReply(source=req.source or "", action=req.action, ok=True)

    srv = LensServer(zmq.Context.instance(), None, control=control)
    endpoint = srv.start(f"ipc://{tmp_path}/query", lambda fn: fn)
    state = DashboardState(query=endpoint)
    for k in range(3):
        state.ingest(_tracked_det(k, 2.0 * k, [4, 5]))
    server = DashboardServer(state, port=0, control=functools.partial(
        request_control, endpoint, timeout=2.0)).start()
    none = DashboardServer(DashboardState(), port=0).start()
    try:
        ok = {"X-Nanoscout": "1"}
        status, d = _post(server.url, "/api/control?source=sim&action=reset_statistics", ok)
        assert status == 200 and d["ok"]
        status, _ = _post(server.url, "/api/control?source=sim&action=set_drift_reference", ok)
        assert status == 200 and seen == [("sim", "reset_statistics"),
                                          ("sim", "set_drift_reference")]
        # a particle size range in nm, then none again; ranges the protocol refuses
        path = "/api/control?source=sim&action=set_particle_size"
        assert _post(server.url, path + "&low=2&high=10.5", ok)[0] == 200
        assert _post(server.url, path, ok)[0] == 200
        assert sizes == [(2.0, 10.5), None]
        for bad in ("&low=10&high=2", "&low=2", "&low=x&high=3", "&low=0&high=3"):
            status, d = _post(server.url, path + bad, ok)
            assert status == 400 and d["error"], bad
        del seen[2:]
        # no page header: a form on another site; a bad action; no query endpoint
        assert _post(server.url, "/api/control?source=sim&action=reset_statistics")[0] == 403
        assert _post(server.url, "/api/control?source=sim&action=explode", ok)[0] == 400
        status, d = _post(none.url, "/api/control?source=sim&action=reset_statistics", ok)
        assert status == 503 and "--query" in d["error"]
        assert len(seen) == 2
        status, h = _get(server.url, "/api/track?source=sim&id=5")
        assert status == 200 and h["seq"] == [0, 1, 2] and h["track_id"] == 5
        assert _get(server.url, "/api/track?source=sim")[0] == 400
        # a restarted daemon (another daemon_run) numbers its tracks from 1 again: its
        # track 5 is another particle, the earlier frames are not its history
        state.ingest(_tracked_det(3, 0.0, [5], run=1_765_000_000_000_000_000))
        status, h = _get(server.url, "/api/track?source=sim&id=5")
        assert status == 200 and h["seq"] == [3]
        assert h["daemon_run"] == 1_765_000_000_000_000_000
    finally:
        server.close()
        none.close()
        srv.stop()
