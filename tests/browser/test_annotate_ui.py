"""The dashboard's model and annotation panel in real headless Chromium beside a live daemon:
the model in use is shown, "freeze frame to annotate" opens the newest frame with the detector's
instances, a click removes a detection, a click adds it back with a proposed outline, clicks and
a double-click draw an outline; no console errors. A screenshot goes to tests/artifacts/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nanoscout.analysis.modelcard import shipped_model_dir
from nanoscout.clients.acquisition.publisher import FramePublisher
from tests.browser.test_dashboard import (
    ARTIFACTS,
    CHROMIUM,
    LAUNCH_ARGS,
    _sync_playwright,
    start_dashboard,
)
from tests.system.conftest import DaemonFactory, stop_process
from tests.system.test_dashboard_annotate import SIDE, disks

pytestmark = [pytest.mark.system, pytest.mark.browser]


def _count(text: str) -> tuple[int, int]:
    m = re.search(r"(\d+) particles, (\d+) edits", text)
    assert m is not None, text
    return int(m.group(1)), int(m.group(2))


def test_annotate_a_frozen_frame_in_chromium(daemon_factory: DaemonFactory,
                                            tmp_path: Path) -> None:
    sync_playwright = _sync_playwright()
    d = daemon_factory("--policy", "lossless", "--model",
                       str(shipped_model_dir() / "detector.onnx"),
                       config=f'[classify]\nenabled = false\n[review]\n'
                              f'directory = "{tmp_path / "review"}"\n')
    assert d.query is not None
    dash, url = start_dashboard(d.output, query=d.query)
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.on("console", lambda m: errors.append(f"console: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(url)
            with FramePublisher(d.input, mode="push", source="cam", results=d.output) as pub:
                for seq in range(3):
                    pub.send(disks(seq), pixel_size_nm=0.5)
            page.wait_for_function("() => document.getElementById('frame-seq').textContent"
                                   ".startsWith('#')", timeout=60_000)
            page.wait_for_function("() => document.getElementById('model-line').textContent"
                                   ".includes('generation 0')", timeout=30_000)
            assert "nanoscout-particle-unet:3.0.0" in page.inner_text("#model-line")

            msg = "() => document.getElementById('review-msg').textContent"
            page.click("#ann-freeze")
            page.wait_for_function(f"() => ({msg})().includes('particles')", timeout=30_000)
            n0, _ = _count(page.evaluate(msg))
            assert n0 >= 7
            box = page.locator("#ann-canvas").bounding_box()
            assert box is not None
            at = {"x": box["width"] / 6, "y": box["height"] / 6}  # the first disk's centre

            page.click("#ann-remove")
            page.click("#ann-canvas", position=at)
            page.wait_for_function(f"() => ({msg})().includes('1 edits')", timeout=30_000)
            assert _count(page.evaluate(msg)) == (n0 - 1, 1)
            page.click("#ann-add")
            page.click("#ann-canvas", position=at)
            page.wait_for_function(f"() => ({msg})().includes('2 edits')", timeout=30_000)
            assert _count(page.evaluate(msg)) == (n0, 2)
            page.click("#ann-draw")
            s = box["width"] / SIDE
            for x, y in ((2, 2), (14, 2), (14, 14)):
                page.click("#ann-canvas", position={"x": x * s, "y": y * s})
            page.dblclick("#ann-canvas", position={"x": 2 * s, "y": 14 * s})
            page.wait_for_function(f"() => ({msg})().includes('3 edits')", timeout=30_000)
            assert _count(page.evaluate(msg)) == (n0 + 1, 3)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-annotate.png"), full_page=True)
            browser.close()
    finally:
        stop_process(dash)
    assert not errors, errors
