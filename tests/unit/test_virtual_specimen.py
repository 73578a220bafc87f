"""The virtual specimen for stage search: targets, coordinates, stable ids, exact truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoscout.sim.synthetic import TRUTH_DTYPE
from nanoscout.sim.virtual_specimen import (
    TARGET_DTYPE,
    VirtualSpecimen,
    VirtualSpecimenConfig,
)

SMALL = VirtualSpecimenConfig(size_um=(40.0, 40.0), agglomerates=4, large_targets=3,
                              wire_targets=3, seed=7)


@pytest.fixture(scope="module")
def vs() -> VirtualSpecimen:
    return VirtualSpecimen(SMALL)


def _target(vs: VirtualSpecimen, kind: str) -> np.void:
    t = vs.targets
    return t[t["kind"] == kind][0]


def test_targets_as_configured(vs: VirtualSpecimen) -> None:
    t = vs.targets
    assert t.dtype == TARGET_DTYPE
    assert np.sum(t["kind"] == "large") == 3 and np.sum(t["kind"] == "wire") == 3
    assert len(set(t["id"].tolist())) == 6 and t["id"].min() >= 1
    assert t["id"].max() <= vs.n_particles
    large, wire = t[t["kind"] == "large"], t[t["kind"] == "wire"]
    (e0, e1), (l0, l1), (w0, w1) = SMALL.large_ecd_nm, SMALL.wire_length_nm, SMALL.wire_width_nm
    assert np.all((large["ecd_nm"] >= e0 - 1e-3) & (large["ecd_nm"] <= e1 + 1e-3))
    assert np.all((wire["length_nm"] >= l0 - 1e-3) & (wire["length_nm"] <= l1 + 1e-3))
    assert np.all((wire["width_nm"] >= w0 - 1e-3) & (wire["width_nm"] <= w1 + 1e-3))
    # targets stand out: bigger than any ordinary particle (clipped at median e^(4 sigma))
    assert e0 > SMALL.median_diameter_nm * math.exp(4 * SMALL.sigma_log)
    assert np.all(large["length_nm"] >= large["width_nm"])
    xy = np.column_stack([t["x_um"], t["y_um"]])
    d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(t), 1)].min() >= SMALL.target_spacing_um
    assert np.all(np.abs(xy) <= 20.0 - 3.0)
    agg = vs.agglomerate_centres
    assert agg.shape == (4, 2)
    da = np.hypot(*(agg[:, None] - xy[None]).transpose(2, 0, 1))
    assert da.min() >= SMALL.target_spacing_um - 0.05  # centroid vs drawn centre: within 50 nm
    assert vs.n_particles > 500  # 3 % of 1600 µm² at ~0.035 µm² each


def test_deterministic_per_seed(vs: VirtualSpecimen) -> None:
    again = VirtualSpecimen(SMALL)
    np.testing.assert_array_equal(again.targets, vs.targets)
    assert again.n_particles == vs.n_particles
    a = vs.render((1.0, -2.0), 40.0, (96, 128), rng=3)
    b = again.render((1.0, -2.0), 40.0, (96, 128), rng=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.truth, b.truth)
    other = VirtualSpecimen(VirtualSpecimenConfig(**{**SMALL.__dict__, "seed": 8}))
    assert not np.array_equal(other.targets["x_um"], vs.targets["x_um"])


@pytest.mark.parametrize("modality", ["TEM", "STEM", "SEM"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_render_shape_dtype(modality: str, dtype: str) -> None:
    v = VirtualSpecimen(VirtualSpecimenConfig(**{**SMALL.__dict__, "modality": modality}))
    fr = v.render((0.0, 0.0), 50.0, (64, 80), dtype=dtype)  # type: ignore[arg-type]
    assert fr.image.shape == (64, 80) and fr.image.dtype == np.dtype(dtype)
    assert fr.labels.shape == (64, 80) and fr.labels.dtype == np.int32
    assert fr.truth.dtype == TRUTH_DTYPE and len(fr.truth) > 0
    assert fr.modality == modality and fr.pixel_size_nm == 50.0
    assert set(np.unique(fr.labels[fr.labels > 0]).tolist()) == set(fr.truth["id"].tolist())


def test_coordinate_convention(vs: VirtualSpecimen) -> None:
    t = _target(vs, "large")
    shape, p = (200, 300), 20.0  # not square: a swapped row/col would show
    centre = (float(t["x_um"]) - 1.3, float(t["y_um"]) + 0.7)
    row, col = VirtualSpecimen.stage_to_pixel(centre, p, shape, t["x_um"], t["y_um"])
    # the convention, written out
    assert col == pytest.approx(1300.0 / p + (shape[1] - 1) / 2)
    assert row == pytest.approx(-700.0 / p + (shape[0] - 1) / 2)
    assert VirtualSpecimen.pixel_to_stage(centre, p, shape, row, col) == pytest.approx(
        (t["x_um"], t["y_um"]))
    fr = vs.render(centre, p, shape)
    assert fr.labels[round(row), round(col)] == t["id"]
    tr = fr.truth[fr.truth["id"] == t["id"]]
    assert len(tr) == 1 and not tr["border"][0]
    assert abs(float(tr["x"][0]) - col) <= 1.0 and abs(float(tr["y"][0]) - row) <= 1.0


def test_same_particle_same_stage_position(vs: VirtualSpecimen) -> None:
    shape = (256, 256)
    a_c, a_p = (2.0, 3.0), 20.0
    b_c, b_p = (3.5, 2.0), 25.0
    a, b = vs.render(a_c, a_p, shape, rng=1), vs.render(b_c, b_p, shape, rng=2)
    ta, tb = a.truth[~a.truth["border"]], b.truth[~b.truth["border"]]
    common = np.intersect1d(ta["id"], tb["id"])
    assert common.size > 10
    for pid in common:
        ra, rb = ta[ta["id"] == pid][0], tb[tb["id"] == pid][0]
        xa, ya = VirtualSpecimen.pixel_to_stage(a_c, a_p, shape, ra["y"], ra["x"])
        xb, yb = VirtualSpecimen.pixel_to_stage(b_c, b_p, shape, rb["y"], rb["x"])
        assert math.hypot(xa - xb, ya - yb) <= b_p / 1000.0
        assert ra["kind"] == rb["kind"]


def test_outside_specimen_is_bare_support(vs: VirtualSpecimen) -> None:
    fr = vs.render((60.0, 0.0), 40.0, (128, 128))
    assert not fr.labels.any() and len(fr.truth) == 0
    # straddling the edge x = 20 µm: particles only on the specimen side
    shape, p, centre = (128, 256), 40.0, (20.0, 0.0)
    fr = vs.render(centre, p, shape)
    rows, cols = np.nonzero(fr.labels)
    assert rows.size > 0
    x, _ = VirtualSpecimen.pixel_to_stage(centre, p, shape, rows, cols)
    assert np.max(x) <= 20.0 + p / 1000.0


def test_target_sizes_from_labels(vs: VirtualSpecimen) -> None:
    p = 20.0
    for t in vs.targets:
        fr = vs.render((float(t["x_um"]), float(t["y_um"])), p, (256, 256))
        m = fr.labels == t["id"]
        ecd = 2.0 * math.sqrt(m.sum() / math.pi) * p
        assert ecd == pytest.approx(float(t["ecd_nm"]), rel=0.05)
        ys, xs = np.nonzero(m)
        # feret diameters: extents over 180 directions (+1 px for the pixels' own width)
        th = np.deg2rad(np.arange(180.0))
        ext = np.ptp(np.outer(xs, np.cos(th)) + np.outer(ys, np.sin(th)), axis=0) + 1.0
        length, width = float(ext.max()) * p, float(ext.min()) * p
        assert length == pytest.approx(float(t["length_nm"]), rel=0.05, abs=2 * p)
        assert width == pytest.approx(float(t["width_nm"]), rel=0.05, abs=2 * p)


def test_targets_stand_clear(vs: VirtualSpecimen) -> None:
    p = 20.0
    for t in vs.targets:
        fr = vs.render((float(t["x_um"]), float(t["y_um"])), p, (320, 320))
        rows, cols = np.nonzero((fr.labels > 0) & (fr.labels != t["id"]))
        d_nm = np.hypot(rows - 159.5, cols - 159.5) * p
        # others keep a gap of (circumradius + 200 nm) beyond the target's circumcircle
        assert d_nm.min() >= float(t["length_nm"]) + 200.0 - 2 * p


def test_bad_arguments(vs: VirtualSpecimen) -> None:
    with pytest.raises(ValueError, match=r"pixel_size_nm 0"):
        vs.render((0.0, 0.0), 0.0)
    with pytest.raises(ValueError, match=r"pixel_size_nm -5"):
        vs.render((0.0, 0.0), -5.0)
    with pytest.raises(ValueError, match=r"shape \(4, 512\)"):
        vs.render((0.0, 0.0), 20.0, (4, 512))
    with pytest.raises(ValueError, match=r"cannot place 40 targets 8 µm apart"):
        VirtualSpecimen(VirtualSpecimenConfig(size_um=(40.0, 40.0), large_targets=20,
                                              wire_targets=20, agglomerates=0))
    with pytest.raises(ValueError, match=r"size_um \(5.0, 40.0\)"):
        VirtualSpecimenConfig(size_um=(5.0, 40.0))
    with pytest.raises(ValueError, match=r"large_ecd_nm \(1500.0, 1000.0\)"):
        VirtualSpecimenConfig(large_ecd_nm=(1500.0, 1000.0))
