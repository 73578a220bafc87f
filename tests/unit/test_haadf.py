"""HAADF-STEM specimens from atoms (nanoscout.training.haadf): exact labels, determinism, probe,
acquisition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ase", reason="ase (the train extra) is not installed")

from nanoscout.training import haadf


def _cfg(**kw: object) -> haadf.HaadfConfig:
    base = dict(shape=(128, 128), pixel_nm=0.25, median_diameter_nm=3.0, sigma_log=0.2,
                coverage=0.1, support_kind="none", film_nm=0.0, texture=0.0, min_excess=0.0)
    base.update(kw)
    return haadf.HaadfConfig(**base)  # type: ignore[arg-type]


def test_cluster_geometry_sizes_and_cache() -> None:
    for shape in ("octahedron", "decahedron", "icosahedron", "facets", "rounded"):
        pos = haadf.cluster_geometry(shape, 10, 3)
        assert pos.dtype == np.float32 and pos.shape[1] == 3 and len(pos) > 50
        extent = float(np.ptp(pos, axis=0).max())
        assert 5.0 < extent < 20.0, (shape, extent)  # ~10 lattice constants across
        assert np.abs(pos.mean(0)).max() < 1e-3
    assert haadf.cluster_geometry("octahedron", 10, 3) is haadf.cluster_geometry("octahedron", 10, 3)
    with pytest.raises(ValueError):
        haadf.cluster_geometry("cube", 5, 0)


def test_labels_are_exactly_the_projected_particles() -> None:
    """Every labelled pixel lies under a particle's atoms (no support: the signal outside the
    labels is probe tail only), and the atoms of each particle project into its label."""
    cfg = _cfg(defocus_nm=0.0, cs_mm=0.001, source_fwhm_nm=0.0, semiangle_mrad=25.0)
    sig, lab = haadf.render_specimen(cfg, 7)
    n = int(lab.max())
    assert n >= 5 and set(np.unique(lab).tolist()) == set(range(n + 1))
    # nearly all signal lies on labelled pixels or right next to them (probe tail, splat)
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(lab > 0, iterations=1)
    assert sig[~near].sum() < 0.02 * sig.sum()
    # every particle is brighter than empty space
    means = ndi.mean(sig, lab, np.arange(1, n + 1))
    assert np.min(means) > 20 * max(float(sig[~near].mean()), 1e-6)


def test_hull_mask_of_a_square_of_points() -> None:
    pts = np.array([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 20.0]])
    m, (r0, c0) = haadf.hull_mask(pts, (40, 40), 0.0)
    full = np.zeros((40, 40), bool)
    full[r0:r0 + m.shape[0], c0:c0 + m.shape[1]] = m
    # pixel centres k + 0.5 within [10, 20]: pixels 10..19
    assert full.sum() == 100 and full[10:20, 10:20].all()
    grown, (r0, c0) = haadf.hull_mask(pts, (40, 40), 1.0)
    assert grown.sum() > 100 + 4 * 10  # one more pixel ring on each side, corners rounded


def test_render_is_deterministic_in_the_seed() -> None:
    cfg = haadf.random_config(np.random.default_rng(5), (96, 96))
    a = haadf.render(cfg, 11)
    b = haadf.render(cfg, 11)
    c = haadf.render(cfg, 12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_random_configs_render_with_supports_and_modes() -> None:
    kinds, modes = set(), set()
    for k in range(12):
        rng = np.random.default_rng(3_000_000 + k)
        cfg = haadf.random_config(rng, (96, 96))
        kinds.add(cfg.support_kind)
        modes.add(cfg.mode)
        sig, lab = haadf.render_specimen(cfg, rng)
        assert sig.shape == lab.shape == (96, 96)
        assert sig.dtype == np.float32 and lab.dtype == np.int32 and np.isfinite(sig).all()
    assert len(kinds) >= 2


def test_probe_width_follows_the_aperture() -> None:
    """A wider aperture gives a narrower probe; at 0.01 nm/px the 200 kV, 25 mrad probe's
    FWHM is about 0.5 lambda / alpha (~0.05 nm) plus the source size."""
    def fwhm(k: np.ndarray, px: float) -> float:
        row = k[k.shape[0] // 2]
        return float((row >= row.max() / 2).sum()) * px

    narrow = haadf.probe_intensity(0.01, semiangle_mrad=30.0, source_fwhm_nm=0.0, radius_px=40)
    wide = haadf.probe_intensity(0.01, semiangle_mrad=10.0, source_fwhm_nm=0.0, radius_px=40)
    assert narrow.sum() == pytest.approx(1.0, abs=1e-5)
    assert fwhm(narrow, 0.01) < fwhm(wide, 0.01)
    assert 0.02 <= fwhm(narrow, 0.01) <= 0.08
    coarse = haadf.probe_intensity(0.5)
    assert coarse[coarse.shape[0] // 2, coarse.shape[1] // 2] > 0.9  # a point at 0.5 nm/px


def test_probe_matches_abtem() -> None:
    """Our probe intensity against abTEM's for one setting (skipped without abtem)."""
    abtem = pytest.importorskip("abtem", reason="abtem (the train extra) is not installed")
    px = 0.01  # nm; abTEM works in Angstrom
    for defocus_nm in (0.0, 3.0):
        ours = haadf.probe_intensity(px, 200.0, 20.0, defocus_nm=defocus_nm, cs_mm=0.0,
                                     source_fwhm_nm=0.0, radius_px=40)
        probe = abtem.Probe(energy=200e3, semiangle_cutoff=20.0, extent=80.0,
                            sampling=10 * px, defocus=10 * defocus_nm)
        ref = np.asarray(probe.build().intensity().compute().array, np.float64)
        c = np.unravel_index(np.argmax(ref), ref.shape)
        ref = np.roll(ref, (ref.shape[0] // 2 - c[0], ref.shape[1] // 2 - c[1]), (0, 1))
        m = ref.shape[0] // 2
        ref = ref[m - 40:m + 41, m - 40:m + 41]
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.98, defocus_nm


def test_acquire_moves_labels_with_the_pixels_and_sets_dtype() -> None:
    sig = np.zeros((64, 64), np.float32)
    lab = np.zeros((64, 64), np.int32)
    sig[20:30, 20:30] = 1.0
    lab[20:30, 20:30] = 1
    rng = np.random.default_rng(0)
    for dtype in ("uint8", "uint16", "float32"):
        img, out = haadf.acquire(sig, lab, rng, dose=1e5, jitter_px=1.5, drift=0.05,
                                 jpeg_quality=0, dtype=dtype)
        assert img.dtype == np.dtype(dtype) and out.dtype == np.int32
        x = img.astype(np.float64)
        assert x[out == 1].mean() > x[out == 0].mean() + 0.5 * (x.max() - x.min())
        assert (out == 1).sum() == 100  # whole-pixel shifts keep the area
    img, _ = haadf.acquire(sig, lab, rng, jpeg_quality=50, dtype="uint8")
    assert img.dtype == np.uint8


def test_write_cache_shards(tmp_path: Path) -> None:
    paths = haadf.write_cache(tmp_path, 3_000_000, 3, shape=(64, 64), shard=2)
    assert [p.name for p in paths] == ["haadf_3000000.npz", "haadf_3000002.npz"]
    with np.load(paths[0]) as z:
        assert z["signal"].shape == (2, 64, 64) and z["signal"].dtype == np.float16
        assert z["labels"].dtype == np.uint16 and z["seeds"].tolist() == [3_000_000, 3_000_001]
