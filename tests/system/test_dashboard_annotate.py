"""The dashboard's model, review and annotation routes over HTTP, against a real daemon: freeze a
live frame (the detector's instances come with it), remove a detection, add it back by a click,
draw an outline, save a frame, run the adaptation in the background with progress, swap to its
model and revert, all under the page's access rules (Host check, token, ``X-Nanoscout``)."""

from __future__ import annotations

import functools
import http.client
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import tifffile

from nanoscout.analysis.modelcard import shipped_model_dir
from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.dashboard import DashboardServer, DashboardState
from nanoscout.clients.dashboard.annotate import (
    AnnotationDesk,
    AnnotationError,
    _Annotation,
    propose_outline,
)
from nanoscout.clients.dashboard.lens import LensView
from nanoscout.clients.query import request_control
from nanoscout.clients.subscriber import Subscriber
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

TOKEN = "correct-horse-battery-staple"
SIDE = 192
#: a stand-in for ``nanoscout models adapt`` (the training half's command): prints progress
#: like a progress bar and writes the shipped detector and its card as DIR/detector.onnx
STAND_IN = """
import json, shutil, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
images = args[:args.index("--labels")]
labels = args[args.index("--labels") + 1:args.index("--out")]
assert len(images) == len(labels) and all(Path(p).is_file() for p in images + labels)
for pct in (10, 50, 100):
    print(f"fine-tuning: {pct}%|####|", end="\\r", flush=True)
out.mkdir(parents=True)
src = Path(sys.argv[0]).parent / "weights"
shutil.copyfile(Path(SHIPPED) / "detector.onnx", out / "detector.onnx")
card = json.loads((Path(SHIPPED) / "detector.json").read_text())
card["name"] += "-adapted"
(out / "detector.json").write_text(json.dumps(card))
print("done")
"""


def disks(seq: int) -> np.ndarray:
    """Noise and nine bright disks of radius 7..10 px on a 3x3 grid."""
    rng = np.random.default_rng(seq)
    img = rng.normal(300.0, 20.0, (SIDE, SIDE))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for k in range(9):
        cy, cx = (k // 3 + 0.5) * SIDE / 3, (k % 3 + 0.5) * SIDE / 3
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (7 + k % 4) ** 2] += 2000.0
    return np.clip(img, 0, 65535).astype(np.uint16)


def test_a_click_proposes_the_particles_outline() -> None:
    img = disks(0).astype(np.float32)
    c = SIDE / 6
    mask = propose_outline(img, c, c)  # the disk of radius 7 at the first grid point
    assert abs(int(mask.sum()) - np.pi * 49) < 0.35 * np.pi * 49
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - c) < 1.5 and abs(xs.mean() - c) < 1.5
    flat = np.full((64, 64), 7.0, np.float32)  # nothing stands out: a small disk
    assert 50 < propose_outline(flat, 30, 30, fallback_radius=6).sum() < 150
    big = np.full((400, 400), 100.0, np.float32)  # a particle larger than the first window
    yy, xx = np.mgrid[0:400, 0:400]
    big[(yy - 200) ** 2 + (xx - 210) ** 2 <= 60 ** 2] = 900.0
    area = int(propose_outline(big, 200, 200).sum())
    assert abs(area - np.pi * 3600) < 0.05 * np.pi * 3600



def test_a_click_in_the_last_half_pixel_of_the_frame_adds_a_particle(tmp_path: Path) -> None:
    """A click at x = 191.9 of a 192 px frame is in the frame: it once rounded to column 192
    and the page's add answered 500 (IndexError)."""
    img = disks(0)
    desk = AnnotationDesk(f"ipc://{tmp_path}/no-daemon")
    ann = _Annotation("f", tmp_path / "f.tif", {}, img, np.zeros(img.shape, np.uint16))
    desk._open[ann.id] = ann
    for k, (x, y) in enumerate(((SIDE - 0.1, 5.0), (5.0, SIDE - 0.4),
                                (SIDE - 0.5, SIDE - 0.5)), start=1):
        assert propose_outline(img, x, y)[int(y), int(x)]
        assert desk.add("f", x, y)["n"] == k
        assert ann.labels[int(y), int(x)] == k
    with pytest.raises(AnnotationError, match="outside"):
        desk.add("f", SIDE, 5.0)


def test_revert_without_an_answering_daemon_ends_within_the_desks_timeout(
        tmp_path: Path) -> None:
    """The page's revert once waited 60 s for a daemon that does not answer."""
    desk = AnnotationDesk(f"ipc://{tmp_path}/no-daemon", timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(AnnotationError, match="no answer"):
        desk.revert()
    assert time.monotonic() - t0 < 5.0


class Page:
    """HTTP requests to the dashboard as its page makes them."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        assert u.hostname is not None and u.port is not None
        self.host, self.port = u.hostname, u.port

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             token: str | None = TOKEN, page: bool = True, host: str | None = None
             ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {"Host": host or f"{self.host}:{self.port}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if page:
            headers["X-Nanoscout"] = "1"
        data = json.dumps(body).encode() if body is not None else b""
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(raw or b"{}")
        except ValueError:
            return resp.status, {"text": raw.decode(errors="replace")}


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    script = tmp_path / "adapt_stand_in.py"
    script.write_text(f"SHIPPED = {str(shipped_model_dir())!r}\n" + STAND_IN, encoding="utf-8")
    return script


@pytest.fixture
def page(daemon_factory: DaemonFactory, tmp_path: Path, stand_in: Path
         ) -> Iterator[tuple[Page, str]]:
    review = tmp_path / "review"
    d = daemon_factory("--policy", "lossless", "--model",
                       str(shipped_model_dir() / "detector.onnx"),
                       config=f'[classify]\nenabled = false\n[review]\ndirectory = "{review}"\n')
    assert d.query is not None
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready(30)
        with FramePublisher(d.input, mode="push", source="cam", results=d.output) as pub:
            for seq in range(3):
                pub.send(disks(seq), pixel_size_nm=0.5)
        assert pub.report.complete
    desk = AnnotationDesk(d.query, adapt_command=[sys.executable, str(stand_in)])
    server = DashboardServer(DashboardState(), port=0, token=TOKEN, desk=desk).start()
    try:
        yield Page(server.url), d.query
    finally:
        server.close()
        desk.close()


def test_freeze_correct_adapt_swap_and_revert_from_the_page(page: tuple[Page, str]) -> None:
    p, _ = page
    # the page's access rules hold for the new routes
    assert p.call("POST", "/api/annotate/freeze?source=cam", token=None)[0] == 401
    assert p.call("POST", "/api/annotate/freeze?source=cam", page=False)[0] == 403
    assert p.call("POST", "/api/annotate/freeze?source=cam", host="evil.example")[0] == 421
    assert p.call("GET", "/api/annotations", token=None)[0] == 401

    status, frozen = p.call("POST", "/api/annotate/freeze?source=cam")
    assert status == 200, frozen
    assert frozen["seq"] == 2 and frozen["pixel_size_nm"] == 0.5 and frozen["image"]
    n0 = frozen["n"]
    assert n0 >= 7, frozen  # the detector's own instances are the start
    labels_file = Path(frozen["labels_file"])
    ann = frozen["id"]
    c = SIDE / 6
    status, removed = p.call("POST", f"/api/annotate/remove?id={ann}&x={c}&y={c}")
    assert status == 200 and removed["n"] == n0 - 1
    status, added = p.call("POST", f"/api/annotate/add?id={ann}&x={c}&y={c}")
    assert status == 200 and added["n"] == n0
    mask = tifffile.imread(labels_file)
    assert mask.dtype == np.uint16 and int(mask.max()) == n0
    k = int(mask[int(c), int(c)])
    assert k and abs(int((mask == k).sum()) - np.pi * 49) < 0.35 * np.pi * 49
    corner = [[2, 2], [12, 2], [12, 12], [2, 12]]
    status, drawn = p.call("POST", f"/api/annotate/draw?id={ann}", {"points": corner})
    assert status == 200 and drawn["n"] == n0 + 1
    assert sorted(np.unique(tifffile.imread(labels_file))) == list(range(n0 + 2))
    # refusals are answered in words
    assert p.call("POST", f"/api/annotate/add?id={ann}&x={c}&y={c}")[1]["error"].startswith(
        "particle")
    assert "outside" in p.call("POST", f"/api/annotate/add?id={ann}&x=-3&y=4")[1]["error"]
    assert p.call("POST", "/api/annotate/add?id=../../etc&x=1&y=1")[0] == 400
    assert p.call("POST", "/api/model/revert")[0] == 400  # nothing swapped yet
    status, saved = p.call("POST", "/api/frame/save?source=cam&frames=2")
    assert status == 200 and len(saved["files"]) == 2

    # adapt in the background (a stand-in for the training command), then swap and revert
    assert p.call("GET", "/api/adapt")[1] == {"state": "none"}
    status, job = p.call("POST", "/api/adapt")
    assert status == 200 and job["state"] == "running"
    assert p.call("POST", "/api/adapt")[0] == 400  # one at a time
    while (st := p.call("GET", "/api/adapt")[1])["state"] == "running":
        pass  # each GET is a round trip; the stand-in ends within a second
    assert st["state"] == "done" and st["progress"] == 1.0 and st["log"][-1] == "done", st
    status, swapped = p.call("POST", "/api/adapt/swap")
    assert status == 200, swapped
    assert swapped["model"].endswith("-adapted:3.0.0") and swapped["model_generation"] == 1
    status, back = p.call("POST", "/api/model/revert")
    assert status == 200 and back["model"] == "nanoscout-particle-unet:3.0.0"
    assert back["model_generation"] == 2
    status, listed = p.call("GET", "/api/annotations")
    assert status == 200 and listed["annotations"][0]["n"] == n0 + 1


def test_bodies_and_names_no_handler_expects_get_a_400_not_a_dropped_connection(
        page: tuple[Page, str]) -> None:
    """Each of these once raised past the handler: the client got no answer at all and the
    dashboard printed a traceback. The page's control and lens routes are served as the
    ``dashboard`` command serves them (over the daemon's query socket)."""
    p, query = page
    _, frozen = p.call("POST", "/api/annotate/freeze?source=cam")
    draw = f"/api/annotate/draw?id={frozen['id']}"
    server = DashboardServer(DashboardState(), port=0, token=TOKEN, lens=LensView(query),
                             control=functools.partial(request_control, query)).start()
    try:
        full = Page(server.url)
        for method, path, body, target in (
                ("POST", "/api/control?source=" + "a" * 5000 + "&action=reset_statistics", b"",
                 full),
                ("GET", "/api/lens?source=%00", b"", full),
                ("POST", draw, b"[" * 100_000 + b"]" * 100_000, p),
                ("POST", draw, b'{"points": [[{}, 1], [2, 3], [4, 5]]}', p),
                ("POST", draw, b'{"points": [[0, 0], [' + b"9" * 400 + b", 0], [0, 5]]}", p)):
            conn = http.client.HTTPConnection(target.host, target.port, timeout=30)
            conn.request(method, path, body=body, headers={
                "Host": f"{target.host}:{target.port}", "Authorization": f"Bearer {TOKEN}",
                "X-Nanoscout": "1"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            conn.close()
            assert resp.status == 400 and answer["error"], (path[:60], resp.status, answer)
    finally:
        server.close()
