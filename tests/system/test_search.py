"""Stage search end to end: ``nanoscout serve`` + ``nanoscout microscope`` + ``nanoscout search``
as separate processes over loopback ZeroMQ, on a small virtual specimen with known targets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.search import score
from nanoscout.clients.microscope.control import ControlClient
from nanoscout.clients.search.navigator import read_json, read_nav
from tests.conftest import REPO
from tests.system.conftest import nanoscout, wait_ready

pytestmark = pytest.mark.system

SPECIMEN = ["--specimen-um", "40", "40", "--large", "2", "--wires", "2", "--agglomerates", "3",
            "--seed", "3"]
RULES = ["--target-rule", "large", "--target-rule", "wire", "--candidate-rule", "candidate",
         "--candidate-rule", "candidate-long"]


@pytest.fixture
def microscope(daemon_factory: object, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A search daemon and a simulated microscope feeding it; yields (daemon, control, truth)."""
    config = (REPO / "deploy/search.toml").read_text(encoding="utf-8")
    daemon = daemon_factory(config=config)  # type: ignore[operator]
    truth = tmp_path / "truth.json"
    proc = nanoscout("microscope", "--frames-endpoint", daemon.input, "--control", "tcp://127.0.0.1:0",
                     "--truth", str(truth), *SPECIMEN, stdout=subprocess.PIPE)
    try:
        ep, _, pump = wait_ready(proc, "microscope", 60)
        yield daemon, ep["control"], json.loads(truth.read_text(encoding="utf-8"))
    finally:
        proc.terminate()
        proc.wait(30)


def _search(daemon: object, control: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = ["search", "--control", control, "--results", daemon.output,  # type: ignore[attr-defined]
           "--area=-20,20,-20,20", "--out", str(out), *RULES, *extra]
    proc = nanoscout(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_adaptive_search_finds_the_targets_with_fewer_frames_than_the_raster(
        microscope: tuple, tmp_path: Path) -> None:
    daemon, control, truth = microscope
    targets = truth["targets"]
    assert len(targets) == 4

    adaptive = _search(daemon, control, tmp_path / "adaptive", "--strategy", "adaptive")
    assert adaptive.returncode == 0, adaptive.stderr
    found = read_json(tmp_path / "adaptive" / "targets.json")
    s = score(found, targets)
    assert s["found"] >= 3, (s, adaptive.stdout)
    assert s["duplicates"] == 0 and s["false_confirmations"] == 0, (s, adaptive.stdout)

    # the navigator list: the same points in .nav, CSV and JSON, thumbnails on disk
    nav = read_nav(tmp_path / "adaptive" / "targets.nav")
    assert [(round(x, 2), round(y, 2)) for _, x, y in nav] == \
        [(round(t.x_um, 2), round(t.y_um, 2)) for t in found]
    csv_rows = (tmp_path / "adaptive" / "targets.csv").read_text().strip().splitlines()
    assert len(csv_rows) == len(found) + 1
    assert all((tmp_path / "adaptive" / "thumbnails").glob("target-*.png"))
    meta = json.loads((tmp_path / "adaptive" / "search.json").read_text())["search"]
    assert meta["strategy"] == "adaptive" and meta["survey_frames"] >= 1

    raster = _search(daemon, control, tmp_path / "raster", "--strategy", "raster")
    assert raster.returncode == 0, raster.stderr
    r_meta = json.loads((tmp_path / "raster" / "search.json").read_text())["search"]
    r_score = score(read_json(tmp_path / "raster" / "targets.json"), targets)
    assert r_score["duplicates"] == 0, r_score  # overlapping tiles: each target once
    assert r_score["found"] >= 3, r_score
    assert meta["frames"] < r_meta["frames"], (meta, r_meta)


def test_search_refuses_an_area_beyond_the_stage_and_a_budget_stops_it(
        microscope: tuple, tmp_path: Path) -> None:
    daemon, control, _ = microscope
    cmd = ["search", "--control", control, "--results", daemon.output, "--area=-500,500,-20,20",
           "--out", str(tmp_path / "far"), *RULES]
    proc = nanoscout(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "stage limits" in err, err

    done = _search(daemon, control, tmp_path / "budget", "--strategy", "raster",
                   "--budget-frames", "3")
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "budget" / "search.json").read_text())["search"]
    assert meta["frames"] == 3 and meta["stopped"] == "budget: frames"


def test_time_and_dose_budgets_are_never_overshot(microscope: tuple, tmp_path: Path) -> None:
    """The search took the frame that crossed a budget (checked before it, spent after): 3
    frames for 2.5 s (2.73 s) and 4 for 0.1 e/nm² (0.131). Now no frame passes a budget, and
    search.json says spent vs budget and by how much the refused frame would have passed it.

    Raster tiles of 10.24 µm (512 px at 20 nm/px), 5.95 µm apart over 40 × 40 µm: from the
    stage centre 1.01 s (21 µm at 100 µm/s, settle 0.3 s, exposure 0.5 s), then 0.86 s each;
    0.5 e/nm² over 104.9 µm² each, 0.0328 e/nm² of the area's mean."""
    daemon, control, _ = microscope
    timed = _search(daemon, control, tmp_path / "time", "--strategy", "raster",
                    "--budget-s", "2.5")
    assert timed.returncode == 0, timed.stderr
    meta = json.loads((tmp_path / "time" / "search.json").read_text())["search"]
    assert meta["instrument_s"] <= 2.5, meta
    assert meta["frames"] == 2 and meta["stopped"] == "budget: instrument time", meta
    assert meta["budgets"]["instrument_s"] == {"spent": meta["instrument_s"], "budget": 2.5}
    assert "over the budget" in meta["stop_detail"] and meta["stop_detail"] in timed.stdout

    dosed = _search(daemon, control, tmp_path / "dose", "--strategy", "raster",
                    "--budget-dose", "0.1")
    assert dosed.returncode == 0, dosed.stderr
    meta = json.loads((tmp_path / "dose" / "search.json").read_text())["search"]
    assert meta["mean_dose_e_per_nm2"] <= 0.1, meta
    assert meta["frames"] == 3 and meta["stopped"] == "budget: dose", meta
    assert meta["budgets"]["mean_dose_e_per_nm2"] == {"spent": 0.0983, "budget": 0.1}
    assert meta["stop_detail"] == ("dose: 0.0983 of 0.1 e/nm² spent; the next frame "
                                   "(~0.03277 e/nm²) would have made 0.1311 e/nm², 0.03107 "
                                   "e/nm² over the budget"), meta


def test_a_dose_budget_below_one_frame_takes_no_frame(microscope: tuple, tmp_path: Path) -> None:
    """The microscope's status says what a frame costs (0.5 s, 200 e/px), so the search prices
    its first frame before taking it: a dose budget below one frame's dose (0.5 e/nm² over
    104.9 µm², 0.03277 e/nm² of the 40 × 40 µm mean) takes no frame. Before, nothing said what
    a frame cost until the first one came back: it was taken (0.0328 of 0.02 e/nm²)."""
    daemon, control, _ = microscope
    client = ControlClient(control, timeout=30.0)
    try:
        status = client.status()
        dosed = _search(daemon, control, tmp_path / "dose", "--strategy", "raster",
                        "--budget-dose", "0.02")
        assert dosed.returncode == 0, dosed.stderr
        meta = json.loads((tmp_path / "dose" / "search.json").read_text())["search"]
        assert (meta["frames"], meta["stopped"]) == (0, "budget: dose"), meta
        assert meta["budgets"]["mean_dose_e_per_nm2"] == {"spent": 0.0, "budget": 0.02}
        assert meta["stop_detail"] == ("dose: 0 of 0.02 e/nm² spent; the next frame "
                                       "(~0.03277 e/nm²) would have made 0.03277 e/nm², "
                                       "0.01277 e/nm² over the budget"), meta
        assert meta["stop_detail"] in dosed.stdout
        assert client.status().frames == status.frames  # the microscope took no frame
        assert (status.exposure_s, status.dose_e_per_px, status.dose_e_per_nm2) == (0.5, 200.0,
                                                                                   None)
        # the frame the search refused (512 px at 20 nm/px) costs what the status said
        acq = client.acquire(20.0, (512, 512), tag="raster")
        assert acq.exposure_s == status.exposure_s
        assert status.dose_e_per_px is not None
        assert acq.dose_e_per_nm2 == status.dose_e_per_px / 20.0**2 == 0.5
    finally:
        client.close()
