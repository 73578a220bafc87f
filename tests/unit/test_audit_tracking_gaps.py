"""Audit of the tracker on frames that are not a clean stream: empty frames (a blanked beam)
longer than the gap allowance, particle rows without a position, and a clock set back."""

from __future__ import annotations

import numpy as np
import pytest

from nanoscout.analysis.measure import measure
from nanoscout.analysis.preprocess import normalize
from nanoscout.analysis.tracking import SourceTracker, TrackingConfig
from nanoscout.sim.insitu import InSituSeries
from nanoscout.sim.synthetic import Specimen, SpecimenConfig

PX = 0.5


def _static() -> tuple[np.ndarray, np.ndarray]:
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=PX, coverage=0.1)
    fr = Specimen.generate(cfg, 2).acquire(np.random.default_rng(0))
    return measure(fr.labels, PX), normalize(fr.image)


def test_empty_frames_count_in_the_gap_allowance() -> None:
    """A particle missed on more frames than ``max_gap_frames`` ends its track, whether the
    frames it was missed on had other particles or none: it comes back as a new track (no
    re-identification here), and the tracks alive are counted as alive."""
    t, img = _static()
    tr = SourceTracker(TrackingConfig(max_gap_frames=2, reidentify_frames=0))
    ups, tables = [], []
    for k in range(8):
        table = t.copy() if k in (0, 1, 6, 7) else t[:0].copy()
        ups.append(tr.update(table, image=img, t_ns=k * 10**9, seq=k, pixel_size_nm=PX,
                             stage=None))
        tables.append(table)
    n = len(t)
    assert ups[4].tracking["ended"] == n  # missed on frames 2, 3, 4: given up on frame 4
    assert ups[6].tracking["started"] == n
    assert not set(tables[6]["track_id"].tolist()) & set(tables[0]["track_id"].tolist())
    assert ups[7].tracking["active"] == n
    # with re-identification (the default) they take their identities back, alive again
    tr = SourceTracker(TrackingConfig(max_gap_frames=2))
    for k in range(8):
        table = t.copy() if k in (0, 1, 6, 7) else t[:0].copy()
        u = tr.update(table, image=img, t_ns=k * 10**9, seq=k, pixel_size_nm=PX, stage=None)
    assert table["track_id"].tolist() == tables[0]["track_id"].tolist()
    assert u.tracking["active"] == n and u.tracking["started"] == 0


def test_a_row_without_a_position_gets_no_track_and_spoils_nothing() -> None:
    t, img = _static()
    tr = SourceTracker(TrackingConfig())
    tables = []
    for k in range(4):
        table = t.copy()
        if k == 1:
            table["x"][0] = np.nan
            table["ecd_nm"][1] = np.nan
        tr.update(table, image=img, t_ns=k * 10**9, seq=k, pixel_size_nm=PX, stage=None)
        tables.append(table)
    assert tables[1]["track_id"][:2].tolist() == [0, 0]
    assert tables[1]["track_id"][2:].tolist() == tables[0]["track_id"][2:].tolist()
    # the particles of those rows keep their identities on the next frames
    assert tables[3]["track_id"].tolist() == tables[0]["track_id"].tolist()


def test_a_clock_set_back_starts_a_new_field_and_rates_use_its_time() -> None:
    cfg = SpecimenConfig(shape=(256, 256), pixel_size_nm=PX, coverage=0.12,
                         drift_px_per_frame=(1.0, -2.0))
    frames = list(InSituSeries(cfg, 3, n_frames=16, growth="uniform", growth_nm_per_frame=0.04,
                               diffusion_nm_per_frame=0.1, coalesce=False))
    tr = SourceTracker(TrackingConfig())
    for k, f in enumerate(frames):
        t_s = 3600.0 + k if k < 8 else float(k - 8)  # the source restarted its clock
        u = tr.update(measure(f.labels, PX), image=normalize(f.image), t_ns=int(t_s * 1e9),
                      seq=k, pixel_size_nm=PX, stage=None)
        if k == 8:
            assert u.drift["new_field"] and "before the field's first frame" in u.drift["reason"]
    _ids, rates, _se = tr.growth_rates("nm")
    # uniform growth 0.04 nm of radius per frame, 1 s apart: dECD/dt = 0.08 nm/s
    assert np.median(rates[np.isfinite(rates)]) == pytest.approx(0.08, rel=0.15)
    assert tr.insitu("nm", int(7e9))["t_s"] == pytest.approx(7.0)
