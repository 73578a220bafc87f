"""SEM specimens of faceted, agglomerated particles (nanoscout.sim.sem_render)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoscout.sim import sem_render as sem


def test_a_lone_sphere_is_labelled_as_its_disc_and_shows_a_bright_rim() -> None:
    cfg = sem.SemConfig(shape=(96, 96), median_diameter_px=30.0, sigma_log=0.0, coverage=0.01,
                        shape_mix=(1, 0, 0, 0, 0, 0, 0, 0), agglomeration=0.0,
                        detector="inlens", blur_px=0.0, dose=1e4, line_noise=0.0,
                        substrate_texture=0.0, dtype="uint16")
    for seed in range(6):
        img, lab = sem.render(cfg, seed)
        if lab.max() == 1 and not (lab[0].any() or lab[-1].any() or lab[:, 0].any()
                                   or lab[:, -1].any()):
            break
    else:
        pytest.fail("no seed placed one whole sphere in the frame")
    assert (lab == 1).sum() == pytest.approx(math.pi * 15 ** 2, rel=0.08)
    x = img.astype(float)
    from scipy import ndimage as ndi

    inner = ndi.binary_erosion(lab == 1, iterations=6)
    rim = (lab == 1) & ~ndi.binary_erosion(lab == 1, iterations=2)
    assert x[rim].mean() > x[inner].mean() > x[lab == 0].mean()


def test_labels_are_the_visible_parts_and_render_is_deterministic() -> None:
    rng = np.random.default_rng(4)
    cfg = sem.random_config(rng, (128, 128))
    a = sem.render(cfg, 9)
    b = sem.render(cfg, 9)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    img, lab = a
    n = int(lab.max())
    assert set(np.unique(lab).tolist()) == set(range(n + 1))  # 1..n, no gaps
    assert img.dtype in (np.uint8, np.uint16) and img.shape == lab.shape == (128, 128)


@pytest.mark.parametrize("kind", ["cube", "octahedron", "bipyramid", "platelet", "rod",
                                  "truncated_cube"])
def test_solids_are_closed_and_about_their_size(kind: str) -> None:
    rng = np.random.default_rng(1)
    planes = sem.solid_planes(kind, 20.0, rng)
    assert np.allclose(np.linalg.norm(planes[:, :3], axis=1), 1.0)
    assert (planes[:, 3] > 0).all()  # the centre is inside
    # bounded: every direction meets a face
    dirs = rng.normal(size=(200, 3))
    assert (np.max(dirs @ planes[:, :3].T, axis=1) > 0).all()
    with pytest.raises(ValueError, match="not a polyhedron"):
        sem.solid_planes("sphere", 10.0, rng)
