"""The synthetic specimen generator: exact truth, polarity, dtypes, noise, drift, dynamics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from nanoscout.sim.synthetic import (
    KINDS,
    TRUTH_DTYPE,
    Specimen,
    SpecimenConfig,
    render,
)

SMALL = (192, 192)


def _cfg(**kw: object) -> SpecimenConfig:
    base: dict[str, object] = {"shape": SMALL}
    base.update(kw)
    return SpecimenConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("modality", ["TEM", "STEM", "SEM"])
def test_truth_matches_labels(modality: str) -> None:
    fr = render(_cfg(modality=modality, agglomerate_fraction=0.6), 3)
    assert fr.truth.dtype == TRUTH_DTYPE
    assert fr.labels.dtype == np.int32 and fr.labels.shape == SMALL
    counts = np.bincount(fr.labels.ravel())
    ids = fr.truth["id"]
    assert len(ids) > 20
    # every labelled particle has exactly one truth row and vice versa
    assert set(np.unique(fr.labels[fr.labels > 0]).tolist()) == set(ids.tolist())
    np.testing.assert_array_equal(counts[ids], fr.truth["area_px"])
    np.testing.assert_allclose(fr.truth["ecd_nm"],
                               2 * np.sqrt(counts[ids] / np.pi) * fr.pixel_size_nm, rtol=1e-5)
    rows, cols = np.indices(SMALL)
    for r in fr.truth[:10]:
        m = fr.labels == r["id"]
        assert r["y"] == pytest.approx(rows[m].mean(), abs=1e-3)
        assert r["x"] == pytest.approx(cols[m].mean(), abs=1e-3)
        assert r["major_nm"] >= r["minor_nm"] > 0
        touches = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
        assert bool(r["border"]) == bool(touches)
    assert set(fr.truth["kind"].tolist()) <= set(range(len(KINDS)))


def test_touching_particles_are_separate_instances() -> None:
    fr = render(_cfg(agglomerate_fraction=1.0, coverage=0.3), 5)
    lab = fr.labels
    a, b = lab[:, 1:], lab[:, :-1]
    touching = (a > 0) & (b > 0) & (a != b)
    assert touching.sum() > 20, "agglomerated specimen should have touching particles"


@pytest.mark.parametrize(("modality", "sign"), [("TEM", -1), ("STEM", 1), ("SEM", 1)])
def test_polarity(modality: str, sign: int) -> None:
    fr = render(_cfg(modality=modality, dose_e_per_px=None, dtype="float32"), 11)
    img = fr.image.astype(np.float64)
    inside = img[fr.labels > 0].mean()
    outside = img[fr.labels == 0].mean()
    assert sign * (inside - outside) > 0.05 * outside


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_dtypes_and_ranges(dtype: str) -> None:
    fr = render(_cfg(dtype=dtype), 2)
    assert fr.image.dtype == np.dtype(dtype) and fr.image.shape == SMALL
    img = fr.image.astype(np.float64)
    if dtype == "uint8":
        assert 100 < img.max() <= 255
    elif dtype == "uint16":
        # counts in electrons: the bright support sits near the dose (200 e/px)
        assert 120 < np.median(img) < 280
    else:
        assert 0.6 < np.median(img) < 1.4


def test_reproducible_by_seed() -> None:
    a, b, c = render(_cfg(), 7), render(_cfg(), 7), render(_cfg(), 8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("dose", [5.0, 50.0, 1000.0])
def test_poisson_noise_follows_dose(dose: float) -> None:
    cfg = _cfg(coverage=0.0, support_texture=0.0, illumination_gradient=0.0, blur_px=0.0,
               dose_e_per_px=dose, dtype="uint16", shape=(256, 256))
    img = render(cfg, 1).image.astype(np.float64)
    mean, var = img.mean(), img.var()
    assert mean == pytest.approx(dose, rel=0.03)
    assert var == pytest.approx(dose, rel=0.08)  # Poisson: variance equals mean


def test_noiseless_frames_are_identical() -> None:
    sp = Specimen.generate(_cfg(dose_e_per_px=None), 4)
    np.testing.assert_array_equal(sp.acquire(1).image, sp.acquire(2).image)


def test_acquire_new_noise_and_drift() -> None:
    sp = Specimen.generate(_cfg(shape=(1024, 1024)), 9)
    f0 = sp.acquire(np.random.default_rng(0))
    f1 = sp.acquire(np.random.default_rng(1))
    np.testing.assert_array_equal(f0.labels, f1.labels)
    assert not np.array_equal(f0.image, f1.image)
    dy, dx = 3, -5
    f2 = sp.acquire(np.random.default_rng(2), (dy, dx))
    # content moves by +shift: frame-0 pixel (r, c) shows up at (r + dy, c + dx)
    np.testing.assert_array_equal(f2.labels[10 + dy:-10 + dy, 10 + dx:-10 + dx],
                                  f0.labels[10:-10, 10:-10])
    common = set(f0.truth["id"][~f0.truth["border"]]) & set(f2.truth["id"][~f2.truth["border"]])
    t0 = {int(r["id"]): r for r in f0.truth}
    t2 = {int(r["id"]): r for r in f2.truth}
    for k in list(common)[:20]:
        assert t2[k]["x"] - t0[k]["x"] == pytest.approx(dx, abs=1e-3)
        assert t2[k]["y"] - t0[k]["y"] == pytest.approx(dy, abs=1e-3)
        assert t2[k]["area_px"] == t0[k]["area_px"]
    # a sub-pixel shift interpolates the image; labels follow the nearest whole pixel
    f3 = sp.acquire(np.random.default_rng(3), (0.4, 0.0))
    np.testing.assert_array_equal(f3.labels, f0.labels)
    # the periodic specimen: any shift is a valid field of view
    f4 = sp.acquire(np.random.default_rng(4), (12345.0, -9876.0))
    assert f4.truth.size > 100


def test_sizes_follow_the_lognormal() -> None:
    sp = Specimen.generate(_cfg(shape=(512, 512), median_diameter_nm=8.0, sigma_log=0.3), 21)
    d = sp.acquire(0).truth["shape_ecd_nm"]
    assert np.median(d) == pytest.approx(8.0, rel=0.12)
    assert np.std(np.log(d)) == pytest.approx(0.3, rel=0.25)
    fr = render(_cfg(min_diameter_nm=6.0, max_diameter_nm=10.0), 3)
    assert fr.truth["shape_ecd_nm"].min() >= 6.0 - 1e-3
    assert fr.truth["shape_ecd_nm"].max() <= 10.0 + 1e-3


def test_tiny_pixels_and_huge_particles_render() -> None:
    tiny = render(_cfg(pixel_size_nm=5.0), 1)  # 8 nm particles ~ 1.6 px
    assert tiny.image.shape == SMALL
    big = render(_cfg(pixel_size_nm=0.1, median_diameter_nm=8.0), 1)  # 80 px particles
    assert big.truth["ecd_nm"].max() > 5.0


@pytest.mark.parametrize(("field", "value"), [("modality", "XRAY"), ("coverage", 1.5),
                                               ("pixel_size_nm", 0.0), ("dtype", "int8"),
                                               ("shape_mix", {"cube": 1.0})])
def test_bad_config_names_the_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SpecimenConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("modality", ["TEM", "STEM", "SEM"])
def test_support_grains_change_the_image_but_not_the_particles(modality: str) -> None:
    base = SpecimenConfig(modality=modality, shape=(256, 256), pixel_size_nm=1.0,  # type: ignore[arg-type]
                          median_diameter_nm=8.0, coverage=0.05, dose_e_per_px=None)
    flat = render(base, 11)
    grains = render(SpecimenConfig(**{**base.__dict__, "support_grains": 0.5,
                                      "support_grain_nm": 80.0}), 11)
    np.testing.assert_array_equal(flat.labels, grains.labels)  # grains are never particles
    diff = np.abs(grains.image.astype(np.float64) - flat.image.astype(np.float64))
    bg = flat.labels == 0
    # a large part of the background changed (where the grains lie), not all of it
    changed = (diff[bg] > 0.05 * np.ptp(flat.image)).mean()
    assert 0.2 < changed < 0.95, changed
    with pytest.raises(ValueError, match="support_grains"):
        SpecimenConfig(support_grains=1.5)


def test_granular_film_is_support_not_particles() -> None:
    base = SpecimenConfig(modality="SEM", shape=(256, 256), pixel_size_nm=1.0,
                          median_diameter_nm=20.0, coverage=0.1, dose_e_per_px=None)
    flat = render(base, 5)
    film = render(SpecimenConfig(**{**base.__dict__, "support_relief": 0.8,
                                    "support_relief_nm": 8.0}), 5)
    np.testing.assert_array_equal(flat.labels, film.labels)  # grains are never particles
    bg = flat.labels == 0
    diff = np.abs(film.image.astype(np.float64) - flat.image.astype(np.float64))
    assert (diff[bg] > 0.05 * np.ptp(flat.image)).mean() > 0.5  # the whole film is rough
    # the particles keep their smooth tops: inside them (away from the rim) little changes
    core = ndi.binary_erosion(flat.labels > 0, iterations=3)
    assert np.median(diff[core]) < 0.5 * np.median(diff[bg])


def test_granular_film_grains_have_the_asked_size() -> None:
    from nanoscout.sim.synthetic import _granular_relief

    counts = {}
    for size in (6.0, 12.0):
        cfg = SpecimenConfig(modality="SEM", pixel_size_nm=1.0, support_relief=1.0,
                             support_relief_nm=size)
        height, dist, grain_yield = _granular_relief(cfg, np.random.default_rng(2), (240, 240))
        assert height.shape == dist.shape == grain_yield.shape == (240, 240)
        assert height.min() >= 0 and grain_yield.min() >= 0.7 and grain_yield.max() <= 1.3
        # grains are the regions between the crevices (distance 0 to a cell boundary)
        counts[size] = ndi.label(dist > 0)[1]
    # about frame / size^2 grains: a grain twice as wide covers four times the area
    assert 240 * 240 / 6.0**2 * 0.5 < counts[6.0] < 240 * 240 / 6.0**2 * 1.5, counts
    assert 2.5 < counts[6.0] / counts[12.0] < 5.5, counts


@pytest.mark.parametrize(("kw", "match"), [({"support_relief": -0.1}, "support_relief"),
                                           ({"support_relief": 2.5}, "support_relief"),
                                           ({"support_relief_nm": 0.0}, "support_relief_nm"),
                                           ({"support_relief": 0.5, "modality": "TEM"},
                                            "SEM only")])
def test_granular_film_bad_values_are_named(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpecimenConfig(**{"modality": "SEM", **kw})  # type: ignore[arg-type]


def _sha(*arrays: np.ndarray) -> str:
    import hashlib

    m = hashlib.sha256()
    for a in arrays:
        m.update(np.ascontiguousarray(a).tobytes())
    return m.hexdigest()


#: computed before the ``plate`` kind was added (numpy 2.4 / scipy 1.17): default specimens
#: must stay bit-identical for the same seed (images, labels and truth)
_BEFORE_PLATES = {
    "TEM": "2c78f65e3d6ebe171c8179bd7946290aef2e021a8713b3d5059734277355ea80",
    "STEM": "c2fcbd460cc1781d7932f8b8ac7128f84e9b3e4ec028555a8fdf28156c71146b",
    "SEM": "27f77b4afdbe0f3234e605a4a8710de503cb1165711fbe6d80427e1c95a5840c",
}


@pytest.mark.parametrize("modality", ["TEM", "STEM", "SEM"])
def test_default_frames_are_bit_identical_to_before_plates(modality: str) -> None:
    fr = render(SpecimenConfig(shape=SMALL, modality=modality), 7)  # type: ignore[arg-type]
    assert _sha(fr.image, fr.labels, fr.truth) == _BEFORE_PLATES[modality]


def test_plates_are_triangles() -> None:
    from nanoscout.analysis.measure import measure

    assert KINDS.index("plate") == 4
    fr = render(_cfg(shape=(256, 256), shape_mix={"plate": 1.0}, agglomerate_fraction=0.0,
                     median_diameter_nm=15.0), 5)
    assert len(fr.truth) > 10 and set(fr.truth["kind"].tolist()) == {4}
    t = measure(fr.labels, fr.pixel_size_nm)
    big = t[~t["border"] & (t["area_nm2"] / fr.pixel_size_nm**2 > 200)]
    assert len(big) > 3
    # an equilateral triangle: isotropic second moments, area / Feret max² = sqrt(3)/4 = 0.433
    # (pixel corners make Feret max a little longer; a few plates are partly covered)
    assert np.median(big["aspect_ratio"]) < 1.08
    fill = big["area_nm2"] / big["feret_max_nm"] ** 2
    assert np.mean((fill > 0.36) & (fill < 0.47)) >= 0.8, fill


@pytest.mark.parametrize("aligned", [0.0, 1.0])
def test_axis_aligned_rods_lie_along_an_image_axis(aligned: float) -> None:
    from nanoscout.analysis.measure import measure

    fr = render(_cfg(shape=(256, 256), shape_mix={"rod": 1.0}, agglomerate_fraction=0.0,
                     median_diameter_nm=12.0, axis_aligned=aligned), 4)
    t = measure(fr.labels, fr.pixel_size_nm)
    rods = t[~t["border"] & (t["aspect_ratio"] > 2.0)]
    assert len(rods) > 10
    off = np.abs(((rods["orientation_deg"] + 45.0) % 90.0) - 45.0)  # degrees from an axis
    if aligned:
        assert np.all(off < 6.0), off
    else:  # uniform angles: most rods are well away from both axes
        assert np.mean(off > 6.0) > 0.6, off


def test_axis_aligned_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="axis_aligned"):
        SpecimenConfig(axis_aligned=1.5)
