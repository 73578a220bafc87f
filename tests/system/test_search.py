"""Stage search end to end: ``nanoscout serve`` + ``nanoscout microscope`` + ``nanoscout search``
as separate processes over loopback ZeroMQ, on a small virtual specimen with known targets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.search import score
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
