"""A stopped stage search taken up again: ``nanoscout search --resume OUT/search.json``.

Real processes over ``ipc://``: a daemon (``nanoscout serve --config deploy/search.toml``), the
search (``nanoscout search``), and the simulated microscope's control server in the test
process, whose camera records where the stage really was at each acquisition (the tiles
imaged, counted independently of what the search says).

Before: an interrupted (130), failed (2) or incomplete search could only be run again whole,
re-imaging (and re-dosing) every tile it had imaged; "incomplete" exited 0, like a search that
covered its area. Now "incomplete" exits 3, and ``--resume`` images only the tiles the earlier
run did not, refuses a search that is not the same one, and writes one merged result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from benchmarks.search import score
from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import ControlServer
from nanoscout.clients.microscope.interfaces import Exposure, StageError
from nanoscout.clients.microscope.simulated import (
    SimulatedMicroscopeOptions,
    SimulatedStage,
    VirtualCamera,
    build,
)
from nanoscout.clients.search.geometry import Area, tile_centres
from nanoscout.clients.search.navigator import read_json
from nanoscout.sim.virtual_specimen import VirtualSpecimenConfig
from tests.system.conftest import DaemonProc, nanoscout
from tests.system.test_search_faults import _start_daemon, _stop

pytestmark = pytest.mark.system

SIZE_PX = 256  # 5.12 µm at 20 nm/px
OVERLAP_UM = 2.5  # at least the longest wire (2.2 µm)
AREA = Area(-4.0, 4.0, -4.0, 4.0)  # 3 x 3 tiles
TILES = tile_centres(AREA, (SIZE_PX * 0.02, SIZE_PX * 0.02), OVERLAP_UM)
#: a large particle at (-3.31, -2.11) µm (first row of tiles) and a wire at (2.41, 0.66) µm
SPECIMEN = replace(VirtualSpecimenConfig(), size_um=(14.0, 14.0), agglomerates=0, seed=3,
                   large_targets=1, wire_targets=1, target_spacing_um=4.0)


class SoftLimit(SimulatedStage):
    """A soft limit at x = ``limit_um`` (None: none): a move beyond it is refused."""

    limit_um: float | None = None

    def move_to(self, x_um: float, y_um: float) -> float:
        if self.limit_um is not None and x_um > self.limit_um:
            raise StageError(f"x = {x_um:.5g} um is beyond the soft limit {self.limit_um:g} um")
        return super().move_to(x_um, y_um)


class Recording(VirtualCamera):
    """Records where the stage really was at each acquisition; sends SIGINT to ``pid`` while
    it takes frame ``interrupt_at`` (1-based), as an operator's Ctrl-C."""

    shots: list[tuple[float, float]]
    pid: int | None = None
    interrupt_at: int = 0

    def acquire(self, pixel_size_nm: float, shape: tuple[int, int]) -> Exposure:
        self.shots.append(self.stage.position())
        if self.pid is not None and len(self.shots) == self.interrupt_at:
            os.kill(self.pid, signal.SIGINT)
        return super().acquire(pixel_size_nm, shape)


@dataclass
class Rig:
    server: ControlServer
    pub: FramePublisher
    stage: SoftLimit
    camera: Recording
    truth: list[dict[str, float]]

    def close(self) -> None:
        self.server.close()
        self.pub.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = _start_daemon(tmp_path_factory.mktemp("resume"), "d")
    try:
        yield d
    finally:
        _stop(d)


@pytest.fixture
def rig(daemon: DaemonProc, tmp_path: Path) -> Iterator[Rig]:
    options = SimulatedMicroscopeOptions(seed=3)
    spec, plain, _ = build(SPECIMEN, options)
    stage = SoftLimit(plain.limits, speed_um_s=options.speed_um_s, settle_s=options.settle_s)
    camera = Recording(spec, stage, options)
    camera.shots = []
    pub = FramePublisher(daemon.input, mode="push", source="stage", confirm_timeout_s=1.0)
    server = ControlServer(f"ipc://{tmp_path}/ctl", stage, camera, pub).start()
    truth = [{k: t[k].item() for k in ("id", "kind", "x_um", "y_um", "length_nm")}
             for t in spec.targets]
    r = Rig(server, pub, stage, camera, truth)
    try:
        yield r
    finally:
        r.close()


def _search(rig: Rig, daemon: DaemonProc, out: Path, *extra: str, area: Area = AREA,
            interrupt_at: int = 0) -> subprocess.CompletedProcess[str]:
    cmd = ["search", "--control", rig.server.endpoint, "--results", daemon.output,
           "--strategy", "raster", f"--area={area.x_min},{area.x_max},{area.y_min},{area.y_max}",
           "--pixel-size", "20", "--size", str(SIZE_PX), "--overlap", str(OVERLAP_UM),
           "--target-rule", "large", "--target-rule", "wire", "--result-timeout", "60",
           "--out", str(out), *extra]
    proc = nanoscout(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rig.camera.pid, rig.camera.interrupt_at = proc.pid, interrupt_at
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        rig.camera.pid = None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _meta(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "search.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _tiles_once(shots: list[tuple[float, float]]) -> None:
    """Every planned tile imaged once, and nothing else."""
    got = sorted((round(x, 6), round(y, 6)) for x, y in shots)
    assert got == sorted((round(x, 6), round(y, 6)) for x, y in TILES), got


def test_an_interrupted_search_resumed_images_every_tile_once(rig: Rig, daemon: DaemonProc,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "found"
    first = _search(rig, daemon, out, interrupt_at=4)
    assert first.returncode == 130, first.stderr
    before = _meta(out)
    assert before["search"]["stopped"] == "interrupted" and before["search"]["frames"] == 4
    assert len(rig.camera.shots) == 4
    earlier = read_json(out / "targets.json")
    earlier_text = (out / "search.json").read_text(encoding="utf-8")

    again = _search(rig, daemon, out, "--resume", str(out / "search.json"))
    assert again.returncode == 0, again.stderr
    _tiles_once(rig.camera.shots)  # 4 + 5: none twice, none left out
    meta = _meta(out)
    s = meta["search"]
    assert s["stopped"] == "done" and s["frames"] == len(TILES) - 4, s
    assert s["coverage"]["area_fraction"] == 1.0 and s["coverage"]["missed_tiles"] == []
    assert meta["runs"] == 2 and meta["total"]["frames"] == len(TILES)
    assert meta["resumed_from"]["path"] == str((out / "search.json").resolve())
    assert meta["resumed_from"]["stopped"] == "interrupted"
    # the earlier search.json is kept beside the new one, as it was
    assert (out / meta["resumed_from"]["kept_as"]).read_text(encoding="utf-8") == earlier_text
    assert len(meta["sweep"]["frames"]) == len(TILES)
    # one list: the earlier targets (same ids, places) and the new ones, each target once
    merged = read_json(out / "targets.json")
    assert [(t.id, t.x_um, t.y_um) for t in merged[:len(earlier)]] == \
        [(t.id, t.x_um, t.y_um) for t in earlier]
    assert [t.id for t in merged] == list(range(1, len(merged) + 1))
    sc = score(merged, rig.truth)
    assert sc["found"] == len(rig.truth) == 2 and sc["duplicates"] == 0, (sc, again.stdout)
    # the large particle lies in the overlap of tiles of both runs: seen again, merged
    assert s["duplicates_merged"] >= 1, s
    assert all((out / "thumbnails" / f"target-{t.id:04d}.png").is_file() for t in merged)


def test_a_resume_of_another_search_is_refused(rig: Rig, daemon: DaemonProc,
                                               tmp_path: Path) -> None:
    out = tmp_path / "found"
    first = _search(rig, daemon, out, "--budget-frames", "2")
    assert first.returncode == 0, first.stderr
    assert _meta(out)["search"]["stopped"] == "budget: frames"
    text = (out / "search.json").read_text(encoding="utf-8")
    for extra, area, what in (((), Area(-4.0, 4.0, -4.0, 3.0), "area_um"),
                              (("--overlap", "2"), AREA, "overlap_um"),
                              (("--target-rule", "other"), AREA, "target_rules")):
        refused = _search(rig, daemon, tmp_path / "other", "--resume", str(out / "search.json"),
                          *extra, area=area)
        assert refused.returncode == 2, refused.stderr
        assert "not the same search" in refused.stderr and what in refused.stderr, \
            refused.stderr
    assert len(rig.camera.shots) == 2  # no frame taken for a refused resume
    assert (out / "search.json").read_text(encoding="utf-8") == text
    assert not (tmp_path / "other" / "search.json").exists()


def test_an_incomplete_search_exits_3_and_resumes_the_missed_tiles(
        rig: Rig, daemon: DaemonProc, tmp_path: Path) -> None:
    rig.stage.limit_um = 1.0  # the tiles at x = 1.44 µm are out of reach
    out = tmp_path / "found"
    first = _search(rig, daemon, out)
    assert first.returncode == 3, first.stderr
    assert "incomplete" in first.stderr
    cov = _meta(out)["search"]["coverage"]
    assert len(cov["unreachable_tiles"]) == 3 and cov["area_fraction"] < 1.0
    assert len(rig.camera.shots) == 6

    # still out of reach: nothing is imaged again, and it is still incomplete
    still = _search(rig, daemon, out, "--resume", str(out / "search.json"))
    assert still.returncode == 3, still.stderr
    assert len(rig.camera.shots) == 6 and _meta(out)["search"]["frames"] == 0

    rig.stage.limit_um = None  # the soft limit is lifted: only the missed tiles are taken
    done = _search(rig, daemon, out, "--resume", str(out / "search.json"))
    assert done.returncode == 0, done.stderr
    _tiles_once(rig.camera.shots)
    meta = _meta(out)
    assert meta["search"]["coverage"]["area_fraction"] == 1.0 and meta["runs"] == 3
    assert meta["total"]["frames"] == len(TILES)
    assert sorted(p.name for p in out.glob("search*.json")) == \
        ["search.json", "search.run1.json", "search.run2.json"]
