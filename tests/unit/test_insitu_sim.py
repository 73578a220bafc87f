"""The in-situ series simulator: persistent identities, events and drift as its truth says."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from nanoscout.sim.insitu import InSituSeries
from nanoscout.sim.synthetic import SpecimenConfig


def _cfg(**kw: object) -> SpecimenConfig:
    base = dict(shape=(160, 160), pixel_size_nm=0.5, median_diameter_nm=8.0, coverage=0.3,
                agglomerate_fraction=0.5)
    base.update(kw)
    return SpecimenConfig(**base)  # type: ignore[arg-type]


def test_in_situ_series_ripens_and_coalesces() -> None:
    series = InSituSeries(_cfg(), 5, growth_nm_per_frame=0.15, diffusion_nm_per_frame=0.5,
                          n_frames=12)
    frames = list(series)
    assert len(frames) == 12
    first, last = frames[0].truth, frames[-1].truth
    assert len(last) < len(first)
    assert np.median(last["shape_ecd_nm"]) > np.median(first["shape_ecd_nm"])
    for fr in frames:
        counts = np.bincount(fr.labels.ravel())
        np.testing.assert_array_equal(counts[fr.truth["id"]], fr.truth["area_px"])


def test_identities_persist_and_merges_keep_the_larger_parent() -> None:
    series = InSituSeries(_cfg(), 5, growth_nm_per_frame=0.15, diffusion_nm_per_frame=0.5,
                          n_frames=12)
    n_start = len(series.ids)
    frames = list(series)
    merges = [e for f in frames for e in f.events if e.kind == "merge"]
    assert merges, "a crowded, agglomerated field must coalesce within 12 frames"
    ever = set()
    for f in frames:
        ever |= set(f.truth["id"].tolist())
    for f in frames[1:]:
        for e in f.events:
            if e.kind == "merge":
                big, small = e.parents
                assert e.children == (big,)
                # the smaller parent never comes back
                later = [g for g in frames if g.index >= f.index]
                assert all(small not in g.truth["id"] for g in later)
    # without appearances no new id is ever made: a merge keeps its larger parent's
    assert max(ever) <= n_start


def test_appearance_and_uniform_growth_are_in_the_truth() -> None:
    series = InSituSeries(_cfg(coverage=0.05, agglomerate_fraction=0.0), 2, n_frames=8,
                          growth="uniform", growth_nm_per_frame=0.1, appear_per_frame=2.0,
                          coalesce=False, diffusion_nm_per_frame=0.0, frame_interval_s=0.5)
    frames = list(series)
    appear = [e for f in frames for e in f.events if e.kind == "appear"]
    assert len(appear) >= 5
    for f in frames:
        for e in f.events:
            if e.kind == "appear":
                assert e.children[0] not in frames[f.index - 1].truth["id"]
    assert frames[3].t_s == pytest.approx(1.5)
    # every particle present throughout grew by 2 x 0.1 nm per frame in diameter
    a, b = frames[0].truth, frames[-1].truth
    common = np.intersect1d(a["id"][~a["border"]], b["id"][~b["border"]])
    ia = {int(i): k for k, i in enumerate(a["id"])}
    ib = {int(i): k for k, i in enumerate(b["id"])}
    grow = [b["shape_ecd_nm"][ib[i]] - a["shape_ecd_nm"][ia[i]] for i in common.tolist()]
    assert np.allclose(grow, 7 * 0.2, atol=1e-3)


def test_drift_moves_the_content_by_the_truth_shift() -> None:
    cfg = _cfg(shape=(128, 128), coverage=0.1, drift_px_per_frame=(2.0, -3.0),
               dose_e_per_px=None)
    series = InSituSeries(cfg, 3, n_frames=3, coalesce=False, diffusion_nm_per_frame=0.0,
                          growth="none")
    f0, _f1, f2 = list(series)
    assert f2.shift_px == pytest.approx((4.0, -6.0))
    # a particle inside both frames moved by the drift (whole-pixel labels)
    common = np.intersect1d(f0.truth["id"][~f0.truth["border"]],
                            f2.truth["id"][~f2.truth["border"]])
    assert common.size > 3
    for i in common.tolist():
        r0 = f0.truth[f0.truth["id"] == i][0]
        r2 = f2.truth[f2.truth["id"] == i][0]
        assert (r2["y"] - r0["y"], r2["x"] - r0["x"]) == pytest.approx((4.0, -6.0), abs=1e-3)


def test_same_seed_same_series_and_the_support_stays() -> None:
    def sha(seed: int) -> str:
        m = hashlib.sha256()
        for f in InSituSeries(_cfg(shape=(96, 96)), seed, n_frames=3):
            for a in (f.image, f.labels, f.truth):
                m.update(np.ascontiguousarray(a).tobytes())
        return m.hexdigest()

    assert sha(4) == sha(4) != sha(5)
    # the support film is the specimen's: without noise, motion and sintering necks (which
    # relax) two frames are identical
    cfg = _cfg(shape=(96, 96), dose_e_per_px=None, shape_mix={"sphere": 1.0})
    a, b = list(InSituSeries(cfg, 1, n_frames=2, coalesce=False, growth="none",
                             diffusion_nm_per_frame=0.0))
    np.testing.assert_array_equal(a.image, b.image)


def test_bad_dynamics_name_the_value() -> None:
    with pytest.raises(ValueError, match="growth"):
        InSituSeries(_cfg(), 0, growth="shrink")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="directed_fraction"):
        InSituSeries(_cfg(), 0, directed_fraction=2.0)
