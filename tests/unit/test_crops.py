"""Training data from real images and burnt-in annotations.

Covers nanoscout.training.crops and nanoscout.sim.overlays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from nanoscout.sim.overlays import burn_in
from nanoscout.training import realdata
from nanoscout.training.crops import (
    RealImage,
    crop_at_scale,
    ellipse_labels,
    load_real_training,
    photometric,
    thick_support,
)


def test_ellipse_labels_fill_their_boxes() -> None:
    boxes = np.array([[10.0, 20.0, 50.0, 40.0], [60.0, 60.0, 70.0, 90.0], [45, 25, 55, 35]])
    lab = ellipse_labels((100, 100), boxes)
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}
    # the biggest box is drawn first, so the small overlapping one stays whole
    for k, (x0, y0, x1, y1) in zip((1, 2, 3), boxes, strict=True):
        ys, xs = np.nonzero(lab == k)
        if k != 1:
            assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
    area_big = (lab == 1).sum() + ((lab == 3) & _ellipse_mask((100, 100), boxes[0])).sum()
    assert area_big == pytest.approx(np.pi * 20 * 10, rel=0.05)


def _ellipse_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    return ellipse_labels(shape, box[None]) > 0


def test_crop_at_scale_brings_particles_to_the_working_size() -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((600, 600), np.int32)
    yy, xx = np.indices(lab.shape)
    k = 0
    for cy in range(60, 600, 150):
        for cx in range(60, 600, 150):
            k += 1
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 45 ** 2] = k  # ECD 90 px
    img = np.where(lab > 0, 0.2, 0.8).astype(np.float32)
    item = RealImage("emps", "discs", img, lab, 90.0)
    for _ in range(5):
        x, y, valid = crop_at_scale(item, rng, 128, diameter_range=(20.0, 20.0))
        assert x.shape == y.shape == valid.shape == (128, 128)
        _, area = np.unique(y[y > 0], return_counts=True)
        whole = area[area > 0.8 * area.max()]
        assert np.median(2 * np.sqrt(whole / np.pi)) == pytest.approx(20.0, rel=0.1)
        # the 600 px image at scale 2/9 is 133 px: nearly the whole crop is image
        assert valid.mean() > 0.9
        # image and labels stay registered: particle pixels are dark
        assert x[y > 0].mean() < 0.35 and x[(y == 0) & (valid > 0)].mean() > 0.65
    small = RealImage("emps", "tiny", img[:100, :100], lab[:100, :100], 90.0)
    x, y, valid = crop_at_scale(small, rng, 128, diameter_range=(20.0, 20.0))
    assert 0 < valid.mean() < 0.1 and not (y[valid == 0]).any()


def test_photometric_keeps_range_and_shape() -> None:
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for _ in range(20):
        y = photometric(x, rng)
        assert y.shape == x.shape and y.dtype == np.float32
        assert y.min() >= -0.5 and y.max() <= 1.5


def test_a_thick_support_leaves_the_particles_faint_on_a_lumpy_background() -> None:
    rng = np.random.default_rng(4)
    lab = np.zeros((128, 128), np.int32)
    yy, xx = np.indices(lab.shape)
    for k, (cy, cx) in enumerate(((30, 30), (30, 95), (95, 30), (95, 95)), start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 8 ** 2] = k
    bright = np.where(lab > 0, 1.0, 0.0).astype(np.float32)  # HAADF: bright particles
    for x in (bright, 1.0 - bright):  # and bright field: dark particles
        dark = x[lab > 0].mean() < x[lab == 0].mean()
        contrast, lumps = [], []
        for _ in range(20):
            y = thick_support(x, lab, rng)
            assert y.shape == x.shape and y.dtype == np.float32
            # normalised as the detector normalises a frame
            assert np.percentile(y, 0.5) == pytest.approx(0.0, abs=0.05)
            assert np.percentile(y, 99.5) == pytest.approx(1.0, abs=0.05)
            # the support: the background is no longer flat
            lumps.append(float(y[lab == 0].std()))
            # each particle still stands out from the support right around it, by less
            ring = (ndi.binary_dilation(lab > 0, iterations=4) & (lab == 0))
            step = float(y[lab > 0].mean() - y[ring].mean())
            assert (step < 0) == dark
            contrast.append(abs(step))
        assert min(lumps) > 0.02 and max(contrast) < 0.95 and np.median(contrast) < 0.6


def test_burn_in_paints_annotations_and_clears_targets_under_them() -> None:
    rng = np.random.default_rng(2)
    painted = 0
    for _ in range(10):
        x = np.full((256, 256), 0.5, np.float32)
        t = np.ones((4, 256, 256), np.float32)
        mask = burn_in(x, t, rng)
        assert mask.any()
        painted += int(mask.sum())
        assert (t[0][mask] == 0).all() and (t[1][mask] == 0).all()
        assert (t[2:] == 1).all()  # weights and validity untouched
        assert (x[mask] != 0.5).all() and (x[~mask] == 0.5).all()
    assert painted > 10 * 100


def test_real_training_never_reads_a_validation_image(shared_data: Path) -> None:
    tune = set(realdata.emps_tuning_ids(shared_data))
    items = load_real_training(("emps", "stem"), shared_data, exclude=tune)
    ids = {(r.set, r.id) for r in items}
    val = {("emps", i) for i in realdata.load_split("emps")["validation"]}
    val |= {("stem", i) for i in realdata.load_split("stem")["validation"]}
    assert ids and not ids & val
    assert not {i for s, i in ids if s == "emps"} & tune
    assert tune and not tune & set(realdata.load_split("emps")["validation"])
    held = set(realdata.load_split("stem")["validation_materials"])
    assert not {realdata.stem_material(i) for s, i in ids if s == "stem"} & held
    assert all(r.image.dtype == np.float32 and r.labels.shape == r.image.shape for r in items)


def test_bf_tem_training_frames_leave_the_held_out_frames_out(shared_data: Path) -> None:
    items = load_real_training(("msa",), shared_data)
    split = realdata.load_split("msa")
    assert sorted(r.id for r in items) == sorted(split["train"])
    assert not {r.id for r in items} & set(split["validation"])
    assert all(r.set == "msa" and r.labels.max() > 0 and r.median_ecd_px > 0 for r in items)


def test_stem_tuning_material_is_one_training_material(shared_data: Path) -> None:
    tune = realdata.stem_tuning_names(shared_data)
    split = realdata.load_split("stem")
    mats = {realdata.stem_material(n) for n in tune}
    assert tune and len(mats) == 1 and set(tune) <= set(split["train"])  # type: ignore[arg-type]
    assert not mats & set(split["validation_materials"])  # type: ignore[arg-type]
    # every image of that material, and the rule picks the same one on every call
    assert tune == [n for n in split["train"] if realdata.stem_material(n) in mats]  # type: ignore[union-attr]
    items = load_real_training(("stem",), shared_data, exclude=set(tune))
    assert items and not {r.id for r in items} & set(tune)


def test_pool_draws_the_asked_share_of_stem_crops() -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train import Pool

    lab = np.zeros((64, 64), np.int32)
    lab[10:20, 10:20], lab[30:40, 30:40] = 1, 2
    img = np.where(lab > 0, 0.2, 0.8).astype(np.float32)
    real = [RealImage("emps", f"e{i}", img, lab, 11.0) for i in range(9)]
    real.append(RealImage("stem", "s0", img, lab, 11.0))
    default = Pool(1, np.random.default_rng(0), real, 1.0)
    assert default.real_p is not None and default.real_p[-1] == pytest.approx(0.1)
    pool = Pool(1, np.random.default_rng(0), real, 1.0, stem_share=0.5)
    assert pool.real_p is not None and pool.real_p.sum() == pytest.approx(1.0)
    assert pool.real_p[-1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="stem_share"):
        Pool(1, np.random.default_rng(0), real, 1.0, stem_share=1.5)
    with pytest.raises(ValueError, match="both STEM and other"):
        Pool(1, np.random.default_rng(0), real[:9], 1.0, stem_share=0.5)


def test_pool_mixes_sem_and_haadf_crops_and_returns_boxes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from nanoscout.training.boxloss import ring_mask
    from nanoscout.training.train import HaadfCache, Pool

    # a cache shard in nanoscout.training.haadf.write_cache's format (rendering real specimens
    # takes seconds each; test_haadf covers that): bright discs on a dim support
    yy, xx = np.mgrid[:256, :256]
    sig = np.full((2, 256, 256), 0.1, np.float32)
    labs = np.zeros((2, 256, 256), np.uint16)
    for k, (r, c) in enumerate([(60, 60), (128, 200), (200, 90)], start=1):
        disc = (yy - r) ** 2 + (xx - c) ** 2 <= 12**2
        sig[:, disc], labs[:, disc] = 1.0, k
    np.savez_compressed(tmp_path / "haadf_3000000.npz", signal=sig.astype(np.float16),
                        labels=labs, seeds=np.array([3_000_000, 3_000_001]))
    cache = HaadfCache(tmp_path)
    assert len(cache) == 2 and len(HaadfCache(tmp_path, 1)) == 1
    boxes = np.array([[10.0, 10.0, 30.0, 26.0], [40.0, 40.0, 60.0, 60.0]])
    lab = ellipse_labels((64, 64), boxes)
    img = np.where(lab > 0, 0.8, 0.2).astype(np.float32)
    stem = RealImage("stem", "s", img, lab, 18.0, ring_mask((64, 64), boxes))
    pool = Pool(1, np.random.default_rng(0), [stem], real_fraction=1.0)
    x, y, b = pool.batch(2)
    assert x.shape == (2, 1, 256, 256) and y.shape == (2, 4, 256, 256)
    assert b.shape[1] == 5 and len(b) >= 2 and set(b[:, 0].tolist()) <= {0, 1}
    # the ring between box and inner ellipse is not valid; the crop's boxes are not empty
    assert (y[:, 3] == 0).any() and (b[:, 3] > b[:, 1]).all() and (b[:, 4] > b[:, 2]).all()
    synth = Pool(1, np.random.default_rng(1), None, 0.0, haadf=cache, haadf_share=0.5,
                 sem_share=1.0)
    x, y, b = synth.batch(4)
    assert len(b) == 0 and np.isfinite(x).all() and y[:, 0].any()


def test_pool_lays_the_asked_share_of_sem_specimens_on_a_granular_film() -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train import Pool

    plain = Pool(30, np.random.default_rng(0))
    film = Pool(30, np.random.default_rng(0), granular_share=1.0)
    for a, b in zip(plain.items, film.items, strict=True):
        if a.cfg.modality == "SEM":
            assert b.cfg.support_relief > 0
            assert 0.25 <= b.cfg.support_relief_nm / b.cfg.median_diameter_nm <= 1.0
        else:  # drawn apart from the specimen: the other specimens stay as they were
            assert b.cfg == a.cfg and b.cfg.support_relief == 0
    assert any(a.cfg.modality == "SEM" for a in plain.items)
    half = Pool(30, np.random.default_rng(0), granular_share=0.5)
    n = sum(s.cfg.support_relief > 0 for s in half.items)
    assert 0 < n < sum(s.cfg.modality == "SEM" for s in half.items)
    with pytest.raises(ValueError, match="granular_share"):
        Pool(1, np.random.default_rng(0), granular_share=1.5)


def test_train_refuses_a_granular_share_outside_zero_to_one(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train import main

    with pytest.raises(SystemExit, match="--granular-share 1.5"):
        main(["--granular-share", "1.5", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any training or writing


def _four_discs(value: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """A 300 px image of four discs (value ``value``, 28 px across) on 0.1, and its labels."""
    yy, xx = np.mgrid[:300, :300]
    lab = np.zeros((300, 300), np.int32)
    for k, (r, c) in enumerate([(60, 60), (150, 200), (230, 90), (100, 250)], start=1):
        lab[(yy - r) ** 2 + (xx - c) ** 2 <= 14**2] = k
    return np.where(lab > 0, value, 0.1).astype(np.float32), lab


def _real_batch(item: RealImage, option: str, p: float) -> tuple[np.ndarray, np.ndarray]:
    """12 real crops of ``item`` from a seeded pool with its ``option`` (a share) at ``p``:
    (images, truth)."""
    pytest.importorskip("torch")
    from nanoscout.training.train import Pool

    pool = Pool(1, np.random.default_rng(0), [item], real_fraction=1.0)
    setattr(pool, option, p)
    x, y, _ = pool.batch(12)
    return x[:, 0], y


def test_pool_takes_the_asked_share_of_real_crops_to_a_low_dose_and_cuts_the_same_crops() -> None:
    img, lab = _four_discs()
    (x0, y0), (x1, y1), (xh, _) = (_real_batch(RealImage("emps", "e", img, lab, 31.6),
                                               "low_dose_p", p) for p in (0.0, 1.0, 0.5))
    np.testing.assert_array_equal(y0, y1)  # the same crops, the same truth
    # every crop got its own shot noise over the same picture
    assert all(float(np.abs(a - b).mean()) > 1e-3 for a, b in zip(x1, x0, strict=True))
    assert np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x1, x0, strict=True)
                    ]) > 0.5
    half = sum(not np.array_equal(a, b) for a, b in zip(xh, x0, strict=True))
    assert 0 < half < 12


def test_train_refuses_a_low_dose_share_outside_zero_to_one(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train import main

    with pytest.raises(SystemExit, match="--low-dose-p -0.1"):
        main(["--low-dose-p", "-0.1", "--out", str(tmp_path), "--steps", "1"])


def test_support_crystals_add_large_objects_of_the_particles_polarity() -> None:
    from nanoscout.training.crops import support_crystals

    for value in (0.9, 0.0):  # bright particles (HAADF) and dark ones (bright field)
        img, lab = _four_discs(value)
        out = support_crystals(img, lab, np.random.default_rng(3))
        assert out.shape == img.shape and out.dtype == np.float32 and np.isfinite(out).all()
        # the flat background (no particle there) is now of two levels: bare and crystal
        bare = float(np.median(out[lab == 0]))
        crystal = (np.abs(out - bare) > 0.05) & (lab == 0)
        # objects 3-10 particle diameters (28 px) across: at least a 42 px one's area
        assert crystal.sum() > np.pi * 21**2 * 0.5
        # added as the particles' contrast: brighter on a HAADF frame, darker in bright field
        delta = float(np.mean(out[crystal])) - bare
        assert (delta > 0) == (value > 0.1)


def test_pool_gives_the_asked_share_of_real_crops_support_crystals_and_cuts_the_same_crops() -> None:
    img, lab = _four_discs()
    (x0, y0), (x1, y1), (xh, _) = (_real_batch(RealImage("stem", "s", img, lab, 31.6),
                                               "grains_p", p) for p in (0.0, 1.0, 0.5))
    np.testing.assert_array_equal(y0, y1)  # the same crops, the same truth: crystals unlabelled
    assert all(not np.array_equal(a, b) for a, b in zip(x1, x0, strict=True))
    half = sum(not np.array_equal(a, b) for a, b in zip(xh, x0, strict=True))
    assert 0 < half < 12


def test_train_refuses_a_grains_share_outside_zero_to_one(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train import main

    with pytest.raises(SystemExit, match="--grains-p 2"):
        main(["--grains-p", "2", "--out", str(tmp_path), "--steps", "1"])
    assert not any(tmp_path.iterdir())
