"""measure --track on a TIFF stack -> a run with track ids, the tracks table and the in-situ
statistics -> the report's per-particle statistics and in-situ section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from nanoscout.analysis.pipeline import Pipeline
from nanoscout.analysis.tracking import TrackingConfig
from nanoscout.batch.offline import measure_files
from nanoscout.clients.report import build_report
from nanoscout.clients.report_insitu import field_start_s
from nanoscout.clients.runfile import read_run
from nanoscout.sim.insitu import InSituSeries
from nanoscout.sim.synthetic import SpecimenConfig
from nanoscout.wire.errors import ConfigError
from tests.unit.test_tracking import TruthDetector


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_measure_track_writes_tracks_and_the_report_counts_each_particle_once(
        tmp_path: Path, suffix: str) -> None:
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=0.5, coverage=0.12,
                         drift_px_per_frame=(2.0, 3.0))
    frames = list(InSituSeries(cfg, 8, n_frames=8, growth="uniform", growth_nm_per_frame=0.05,
                               diffusion_nm_per_frame=0.1))
    stack = tmp_path / "series.tif"
    tifffile.imwrite(stack, np.stack([f.image for f in frames]))
    pipe = Pipeline(TruthDetector([f.labels for f in frames]),  # type: ignore[arg-type]
                    tracking=TrackingConfig())
    out = tmp_path / f"run{suffix}"
    rep = measure_files([stack], pipe, out, pixel_size_nm=0.5, track=True,
                        frame_interval_s=2.0, log=lambda _s: None)
    assert rep.images == 8
    run = read_run(out)
    p, t = run.particles, run.tracks
    assert (p["track_id"] > 0).all()
    assert Run_rows(t) == len(np.unique(p["track_id"]))
    # frames are 2 s apart; the tracks' growth rate: dECD/dt = 2 * 0.05 nm per 2 s
    assert np.diff(run.frames["t_acq_ns"]).tolist() == [2 * 10**9] * 7
    long = t["n_sized"] >= 6
    assert np.median(t["growth_per_s"][long]) == pytest.approx(0.05, rel=0.15)
    assert np.isfinite(run.frames["drift_x_px"]).all()
    html = build_report(out, tmp_path / "r.html", formats=("png",)).read_text()
    assert "per particle (tracks)" in html and "per detection" in html
    assert "In situ" in html and 'class="lsw-k"' in html
    n_tracks_counted = int(html.split('class="basis">per particle (tracks)</td><td class="n">')[1]
                           .split("<")[0])
    assert n_tracks_counted < 0.5 * int((~p["border"]).sum())


def Run_rows(t: dict) -> int:
    return len(next(iter(t.values())))


def test_measure_track_needs_a_tracking_pipeline(tmp_path: Path) -> None:
    pipe = Pipeline(TruthDetector([]))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--track needs a pipeline with tracking"):
        measure_files([tmp_path], pipe, tmp_path / "r.parquet", track=True)


def test_the_ripening_fit_is_drawn_from_its_own_field_of_view(tmp_path: Path) -> None:
    """Two fields (the second stack another frame size: a new field): the daemon's LSW fit in
    the last stats counts time from the second field's first frame, and the report says so
    (it drew the fit from the run's first frame, 16 s early)."""
    stacks, truth = [], []
    for k, side in enumerate((256, 224)):
        cfg = SpecimenConfig(shape=(side, side), pixel_size_nm=0.5, coverage=0.12)
        frames = list(InSituSeries(cfg, 40 + k, n_frames=8, growth="uniform",
                                   growth_nm_per_frame=0.05))
        stacks.append(tmp_path / f"field{k}.tif")
        tifffile.imwrite(stacks[-1], np.stack([f.image for f in frames]))
        truth += [f.labels for f in frames]
    pipe = Pipeline(TruthDetector(truth), tracking=TrackingConfig())  # type: ignore[arg-type]
    out = tmp_path / "run.parquet"
    measure_files(stacks, pipe, out, pixel_size_nm=0.5, track=True, frame_interval_s=2.0,
                  log=lambda _s: None)
    run = read_run(out)
    assert sorted(set(run.frames["field"].tolist())) == [0, 1]
    t0 = int(run.frames["t_acq_ns"].min())
    last = float(run.frames["t_acq_ns"].max())
    assert field_start_s(run, str(run.frames["source"][0]), last, t0) == 16.0
    html = build_report(out, tmp_path / "r.html", formats=("png",)).read_text()
    assert float(html.split('class="lsw-t0">')[1].split("<")[0]) == 16.0
