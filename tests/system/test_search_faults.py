"""Stage search against a misbehaving microscope and daemon: a real daemon (``nanoscout serve
--config deploy/search.toml``) over ``ipc://``, the simulated microscope's control server with a
stage or camera that does what real ones do.

* A stage with backlash lands every second move 2 µm off; a stage with a mechanical stop short
  of its stated limits never gets past x = 0. The search counted every frame's tile as searched
  wherever the frame landed: the raster said "done" with 1.5 % (backlash) and 34 % (the stop) of
  the area never imaged. Now a frame off its tile is taken again, and tiles still not imaged
  make the search "incomplete", with the share of the area imaged and the missed tiles.
* A camera with discrete magnifications gives 16 nm/px when 20 nm/px is asked for: the tiles,
  planned for the larger field, left 12.6 % of the area unimaged ("done"). Now the rest of the
  area is tiled with the field the camera gives.
* A stage with a soft limit at x = 2 µm refuses the moves beyond it: the first refusal ended
  the whole search ("error", 14 % coverage of a -6..6 µm area). Now the tiles it refuses are
  skipped, the rest is imaged and the search ends "incomplete" with them listed.
* The daemon crashes after the 3rd frame: the search went on taking every tile twice with
  nothing to analyse it and said "done" (44 frames without results over 8 x 8 µm). Now it stops
  ("error") after ``max_failed_in_a_row`` (4) frames without results.

The area imaged is checked independently of the search: from where the simulated stage really
was, and the pixel size the camera really used, at each acquisition.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import ControlClient, ControlServer
from nanoscout.clients.microscope.interfaces import Exposure, StageError
from nanoscout.clients.microscope.simulated import (
    SimulatedMicroscopeOptions,
    SimulatedStage,
    VirtualCamera,
    build,
)
from nanoscout.clients.search.geometry import Area
from nanoscout.clients.search.navigator import FoundTarget
from nanoscout.clients.search.session import FrameResult, SearchSession
from nanoscout.clients.search.strategies import SearchConfig, SearchResult, run_search
from nanoscout.sim.virtual_specimen import VirtualSpecimenConfig
from tests.conftest import REPO
from tests.system.conftest import DaemonProc, nanoscout, wait_ready

pytestmark = pytest.mark.system

SHAPE = (128, 128)  # 2.56 µm at 20 nm/px
AREA = Area(-4.0, 4.0, -4.0, 4.0)


def _start_daemon(tmp_path: Path, name: str) -> DaemonProc:
    proc = nanoscout("serve", "--config", str(REPO / "deploy/search.toml"),
                     "--frames-endpoint", f"ipc://{tmp_path}/{name}-in", "--results",
                     f"ipc://{tmp_path}/{name}-out", "--query", f"ipc://{tmp_path}/{name}-q",
                     "--no-metrics", stdout=subprocess.PIPE)
    ep, lines, pump = wait_ready(proc, "daemon", 120)
    return DaemonProc(proc, ep["input"], ep["output"], None, lines, pump)


def _stop(daemon: DaemonProc) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.terminate()
    daemon.proc.wait(30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One search daemon for the tests that keep it running."""
    d = _start_daemon(tmp_path_factory.mktemp("faults"), "d")
    try:
        yield d
    finally:
        _stop(d)


@dataclass
class Truth:
    """Where each frame really was: (stage x, y µm, pixel size nm) at each acquisition."""

    frames: list[tuple[float, float, float]] = field(default_factory=list)

    def imaged(self, area: Area, shape: tuple[int, int], step_um: float = 0.02) -> float:
        """Share of ``area`` inside at least one frame, on a grid of ``step_um``."""
        xs = np.arange(area.x_min + step_um / 2, area.x_max, step_um)
        ys = np.arange(area.y_min + step_um / 2, area.y_max, step_um)
        x, y = np.meshgrid(xs, ys)
        hit = np.zeros(x.shape, bool)
        for cx, cy, p in self.frames:
            hx, hy = shape[1] * p / 2e3, shape[0] * p / 2e3
            hit |= (np.abs(x - cx) <= hx) & (np.abs(y - cy) <= hy)
        return float(hit.mean())


class Backlash(SimulatedStage):
    """Every second move lands ``off_um`` further along x (and says where it is)."""

    off_um = 2.0
    moves = 0

    def move_to(self, x_um: float, y_um: float) -> float:
        self.moves += 1
        return super().move_to(x_um + (self.off_um if self.moves % 2 == 0 else 0.0), y_um)


class Stop(SimulatedStage):
    """A mechanical stop at x = ``stop_um``, short of the stated limits: a move past it ends
    there (and the stage says where it is)."""

    stop_um = 0.0

    def move_to(self, x_um: float, y_um: float) -> float:
        return super().move_to(min(x_um, self.stop_um), y_um)


class SoftLimit(SimulatedStage):
    """A controller's soft limit at x = ``limit_um``, inside the stated limits: a move beyond
    it is refused (``StageError``, as the ``Stage`` interface says), without moving."""

    limit_um = 2.0

    def move_to(self, x_um: float, y_um: float) -> float:
        if x_um > self.limit_um:
            raise StageError(f"x = {x_um:.5g} um is beyond the soft limit {self.limit_um:g} um")
        return super().move_to(x_um, y_um)


class Truthful(VirtualCamera):
    """Records where each frame really was; with ``pixel_sizes_nm`` set, gives the nearest of
    those discrete pixel sizes (magnifications) instead of the one asked for."""

    truth: Truth
    pixel_sizes_nm: tuple[float, ...] = ()

    def acquire(self, pixel_size_nm: float, shape: tuple[int, int]) -> Exposure:
        if self.pixel_sizes_nm:
            pixel_size_nm = min(self.pixel_sizes_nm, key=lambda p: abs(p - pixel_size_nm))
        x, y = self.stage.position()
        self.truth.frames.append((x, y, pixel_size_nm))
        return super().acquire(pixel_size_nm, shape)


@dataclass
class Rig:
    """A microscope (stage and camera of the given classes) feeding ``daemon``."""

    server: ControlServer
    client: ControlClient
    pub: FramePublisher
    truth: Truth

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.pub.close()


def _rig(tmp_path: Path, daemon: DaemonProc, stage_cls: type[SimulatedStage],
         pixel_sizes_nm: tuple[float, ...] = ()) -> Rig:
    cfg = replace(VirtualSpecimenConfig(), size_um=(30.0, 30.0), agglomerates=0, seed=3,
                  large_targets=0, wire_targets=0)
    options = SimulatedMicroscopeOptions(seed=3)
    spec, plain, _ = build(cfg, options)
    stage = stage_cls(plain.limits, speed_um_s=options.speed_um_s, settle_s=options.settle_s)
    camera = Truthful(spec, stage, options)
    camera.truth, camera.pixel_sizes_nm = Truth(), pixel_sizes_nm
    # close() gives queued frames 1 s (a dead daemon takes none)
    pub = FramePublisher(daemon.input, mode="push", source="stage", confirm_timeout_s=1.0)
    server = ControlServer(f"ipc://{tmp_path}/ctl", stage, camera, pub).start()
    return Rig(server, ControlClient(server.endpoint, timeout=60.0), pub, camera.truth)


def _raster(rig: Rig, daemon: DaemonProc, result_timeout_s: float = 60.0,
            progress: object = None) -> SearchResult:
    session = SearchSession(rig.client, daemon.output, result_timeout_s=result_timeout_s)
    try:
        cfg = SearchConfig(area=AREA, target_rules=("large", "wire"), pixel_size_nm=20.0,
                           shape=SHAPE, overlap_um=1.0, rotate45_high_mag=False)
        return run_search("raster", session, cfg, progress)  # type: ignore[arg-type]
    finally:
        session.close()


def test_a_frame_off_its_tile_is_taken_again(daemon: DaemonProc, tmp_path: Path) -> None:
    rig = _rig(tmp_path, daemon, Backlash)
    shown: list[FrameResult] = []
    try:
        res = _raster(rig, daemon, progress=lambda r, new: shown.append(r))
    finally:
        rig.close()
    assert res.error is None and res.failed_frames == 0
    # the frames off their tiles were analysed too: each is shown, and its targets kept
    assert [r.seq for r in shown] == sorted({r.seq for r in shown}) and len(shown) == res.frames
    # the retake landed: every part of the area was really imaged, and the search says so
    assert rig.truth.imaged(AREA, SHAPE) == 1.0, res.summary()
    assert res.stopped == "done" and res.coverage == 1.0 and res.missed_tiles == []
    assert res.off_target_frames == res.frames - res.tiles > 0
    assert res.summary()["coverage"] == {"area_fraction": 1.0, "tiles": res.tiles,
                                         "missed_tiles": [], "unreachable_tiles": []}


def test_a_stage_that_cannot_get_there_makes_the_search_incomplete(
        daemon: DaemonProc, tmp_path: Path) -> None:
    rig = _rig(tmp_path, daemon, Stop)
    try:
        res = _raster(rig, daemon)
    finally:
        rig.close()
    imaged = rig.truth.imaged(AREA, SHAPE)
    assert 0.6 < imaged < 0.75  # x beyond 0 + 1.28 µm was never imaged
    assert res.stopped == "incomplete", res.summary()
    assert res.coverage == pytest.approx(imaged, abs=0.02)
    # the missed tiles are those beyond the stop, and only those
    assert res.missed_tiles and all(x > Stop.stop_um for x, _ in res.missed_tiles)
    assert res.summary()["coverage"]["missed_tiles"] == [  # type: ignore[index]
        [round(x, 3), round(y, 3)] for x, y in res.missed_tiles]


def test_tiles_beyond_a_soft_limit_are_skipped_and_listed(
        daemon: DaemonProc, tmp_path: Path) -> None:
    rig = _rig(tmp_path, daemon, SoftLimit)
    try:
        res = _raster(rig, daemon)
    finally:
        rig.close()
    assert res.error is None and res.stopped == "incomplete", res.summary()
    # every frame was taken in reach, and all the area in reach was imaged
    assert rig.truth.frames and all(x <= SoftLimit.limit_um for x, _, _ in rig.truth.frames)
    imaged = rig.truth.imaged(AREA, SHAPE)
    assert 0.75 < imaged < 0.9  # x up to 1.36 + 1.28 µm of -4..4
    assert res.coverage == pytest.approx(imaged, abs=0.02)
    assert res.missed_tiles and res.missed_tiles == res.unreachable
    assert all(x > SoftLimit.limit_um for x, _ in res.missed_tiles)
    assert rig.server.refused == len(res.missed_tiles)  # each asked for once
    cov = res.summary()["coverage"]
    assert cov["unreachable_tiles"] == cov["missed_tiles"]  # type: ignore[index]


def test_a_smaller_field_than_asked_is_tiled_with(daemon: DaemonProc, tmp_path: Path) -> None:
    rig = _rig(tmp_path, daemon, SimulatedStage, pixel_sizes_nm=(16.0, 40.0))
    try:
        res = _raster(rig, daemon)
    finally:
        rig.close()
    assert {p for _, _, p in rig.truth.frames} == {16.0}
    assert rig.truth.imaged(AREA, SHAPE) == 1.0, res.summary()
    assert res.stopped == "done" and res.coverage == 1.0


def test_the_search_stops_when_the_daemon_is_gone(tmp_path: Path) -> None:
    gone = _start_daemon(tmp_path, "gone")
    rig = _rig(tmp_path, gone, SimulatedStage)
    taken: list[FrameResult] = []

    def progress(res: FrameResult, new: list[FoundTarget]) -> None:
        taken.append(res)
        if len(taken) == 3:
            gone.proc.kill()  # it crashes
            gone.proc.wait(30)

    try:
        res = _raster(rig, gone, result_timeout_s=1.0, progress=progress)
    finally:
        rig.close()
        _stop(gone)
    assert all(r.error is None for r in taken[:3])
    # 4 frames without results (two tiles, each taken twice), then the search stops
    assert res.stopped == "error" and res.frames == 3 + 4, res.summary()
    assert res.error is not None and "no results from the daemon for 4 frames" in res.error
    assert res.coverage < 0.3 and res.missed_tiles == []  # stopped before the sweep's end
