"""Morphology clusters (nanoscout.analysis.clusters): online k-means over measured particle tables."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from scipy.special import comb

from nanoscout.analysis.clusters import UNASSIGNED, ClusterConfig, OnlineKMeans
from nanoscout.analysis.measure import measure
from nanoscout.daemon.config import load_config
from nanoscout.sim.synthetic import SpecimenConfig, render
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.particles import PARTICLE_DTYPE, empty_table


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert-Arabie adjusted Rand index of two labellings of the same items."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(table, (ai, bi), 1)
    pairs = comb(table, 2).sum()
    rows = comb(table.sum(axis=1), 2).sum()
    cols = comb(table.sum(axis=0), 2).sum()
    expected = rows * cols / comb(len(a), 2)
    top = 0.5 * (rows + cols)
    return float((pairs - expected) / (top - expected)) if top != expected else 1.0


def test_adjusted_rand_index() -> None:
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([5, 5, 3, 3])) == 1.0
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) < 0


@cache
def population(kind: str, n_frames: int = 4) -> tuple[np.ndarray, ...]:
    """Measured tables (non-border particles of >= 20 px) of frames of one particle kind."""
    median = 45.0 if kind == "big-sphere" else 15.0
    mix = {"sphere": 1.0} if kind == "big-sphere" else {kind: 1.0}
    out = []
    for i in range(n_frames):
        cfg = SpecimenConfig(shape=(384, 384), pixel_size_nm=1.0, median_diameter_nm=median,
                             sigma_log=0.2, coverage=0.1, shape_mix=mix,
                             agglomerate_fraction=0.0, max_diameter_nm=120.0)
        t = measure(render(cfg, 100 + i).labels, 1.0)
        out.append(t[~t["border"] & (t["area_nm2"] >= 20)])
    return tuple(out)


def batches(*kinds: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One shuffled batch per frame index: (table, population index per row)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(len(population(kinds[0]))):
        tables = [population(k)[i] for k in kinds]
        table = np.concatenate(tables)
        truth = np.concatenate([np.full(len(t), j) for j, t in enumerate(tables)])
        order = rng.permutation(len(table))
        out.append((table[order], truth[order]))
    return out


def test_two_populations_are_recovered_with_stable_ids() -> None:
    km = OnlineKMeans(ClusterConfig(k=2, init_n=150, forget=0.01))
    got, want, per_batch = [], [], []
    for table, truth in batches("sphere", "rod") * 3:
        ids = km.update(table)
        assert ids.dtype == np.uint8 and len(ids) == len(table)
        if not km.ready or np.all(ids == UNASSIGNED):
            assert np.all(ids == UNASSIGNED)
            continue
        got.append(ids)
        want.append(truth)
        # the id most spheres get, batch by batch: never relabelled
        per_batch.append(int(np.bincount(ids[truth == 0], minlength=2).argmax()))
    ari = adjusted_rand_index(np.concatenate(want), np.concatenate(got))
    assert ari >= 0.9, ari
    assert len(per_batch) >= 8 and len(set(per_batch)) == 1
    s = km.summary()
    assert s["ready"] and s["k"] == 2 and len(s["items"]) == 2
    by_shape = {it["dominant_shape"]: it for it in s["items"]}
    assert set(by_shape) == {"sphere", "rod"}
    assert by_shape["rod"]["aspect_ratio_mean"] > 2 > by_shape["sphere"]["aspect_ratio_mean"]
    assert abs(sum(it["share"] for it in s["items"]) - 1) < 1e-9
    assert set(by_shape["rod"]["centre"]) == {"log_ecd", "log_aspect_ratio", "roundness",
                                              "solidity", "circularity"}


def test_ids_are_ordered_by_size_and_buffering_gives_255() -> None:
    km = OnlineKMeans(ClusterConfig(k=2, init_n=10_000))
    table = population("sphere")[0]
    assert np.all(km.update(table) == UNASSIGNED)
    s = km.summary()
    assert not s["ready"] and s["buffered"] == len(table) and s["items"] == []
    km = OnlineKMeans(ClusterConfig(k=2, init_n=50))
    km.update(np.concatenate([population("sphere")[0], population("big-sphere")[0]]))
    assert km.centres is not None and km.centres[0, 0] < km.centres[1, 0]


def test_a_third_population_gets_its_own_cluster() -> None:
    km = OnlineKMeans(ClusterConfig(k=3, init_n=150, forget=0.01))
    for table, _ in batches("sphere", "rod") * 2:
        km.update(table)
    before = km.update(batches("sphere", "rod")[0][0])
    assert km.ready
    late = batches("sphere", "rod", "big-sphere") * 2
    for table, _ in late:
        km.update(table)
    table, truth = late[-1]
    ids = km.update(table)
    ari = adjusted_rand_index(truth, ids)
    assert ari >= 0.9, ari
    new_id = int(np.bincount(ids[truth == 2], minlength=3).argmax())
    assert new_id not in {int(np.bincount(ids[truth == j], minlength=3).argmax()) for j in (0, 1)}
    assert len(before) > 0


def test_border_particles_are_assigned_but_not_learnt_and_units_restart() -> None:
    km = OnlineKMeans(ClusterConfig(k=2, init_n=20))
    table = population("sphere")[0].copy()
    table["border"] = True
    assert np.all(km.update(table) == UNASSIGNED) and km.n_seen == 0
    km.update(np.concatenate([population("sphere")[0], population("rod")[0]]))
    assert km.ready
    assert np.all(km.update(table) < 2)
    km.update(empty_table(), units="px")
    assert not km.ready and km.units == "px"
    assert np.all(km.update(empty_table()) == UNASSIGNED)


def test_config_section() -> None:
    assert load_config().clusters == ClusterConfig()
    c = load_config(overrides={"clusters.k": 4, "clusters.forget": 0.0})
    assert c.clusters.k == 4 and c.clusters.forget == 0.0
    with pytest.raises(ConfigError, match="init_n"):
        load_config(overrides={"clusters.k": 5, "clusters.init_n": 3})
    with pytest.raises(ConfigError, match="forget"):
        load_config(overrides={"clusters.forget": 1.0})


def test_cluster_column_follows_the_v11_columns_and_defaults_to_255() -> None:
    # v1.2 appended cluster, v1.4 track_id after it (older columns keep their offsets)
    assert PARTICLE_DTYPE.names is not None and PARTICLE_DTYPE.names[-2:] == ("cluster",
                                                                               "track_id")
    assert np.all(empty_table(3)["cluster"] == UNASSIGNED)


def test_pipeline_assigns_clusters_and_publishes_summaries() -> None:
    from types import SimpleNamespace

    from nanoscout.analysis.frame import Frame
    from nanoscout.analysis.pipeline import Pipeline
    from nanoscout.wire.protocol import FrameHeader, StatsHeader, decode_message, encode_message

    fr = render(SpecimenConfig(shape=(256, 256), pixel_size_nm=1.0, median_diameter_nm=15.0,
                               shape_mix={"sphere": 1.0, "rod": 1.0}), 1)

    class FakeDetector:
        def __init__(self) -> None:
            self.turned: list[bool | None] = []

        def detect(self, pixels: np.ndarray, key: object = None,
                   rotate45: bool | None = None, pixel_size_nm: float | None = None,
                   normalized: np.ndarray | None = None,
                   particle_px: tuple[float, float] | None = None) -> SimpleNamespace:
            self.turned.append(rotate45)
            return SimpleNamespace(labels=fr.labels, scores=None, timings_ms={}, scale=1.0)

    pipe = Pipeline(FakeDetector(), clusters=ClusterConfig(k=2, init_n=30))  # type: ignore[arg-type]
    header = FrameHeader(source="cam", seq=0, t_acq_ns=1, shape=(256, 256), dtype="<u2",
                         pixel_size_nm=1.0)
    image = fr.image.astype(np.uint16)
    result = pipe.process(Frame(header, image, 2))
    assert "clusters" in result.det.stage_ms
    assert np.all(result.table["cluster"][~result.table["border"]] < 2)
    stats = result.messages[-1].header
    assert isinstance(stats, StatsHeader)
    assert stats.clusters is not None and stats.clusters["ready"]
    msg = decode_message(encode_message(stats))
    assert msg.header.clusters == stats.clusters
    off = Pipeline(FakeDetector(), clusters=ClusterConfig(enabled=False))  # type: ignore[arg-type]
    result = off.process(Frame(header, image, 2))
    assert np.all(result.table["cluster"] == UNASSIGNED)
    assert result.messages[-1].header.clusters is None

    # the 45° view is asked for per frame (meta rotate45) only where the daemon allows it
    hint = header.model_copy(update={"meta": {"rotate45": True}})
    for on_request, want in ((True, [True, None]), (False, [None, None])):
        fake = FakeDetector()
        pipe = Pipeline(fake, rotate45_on_request=on_request)  # type: ignore[arg-type]
        pipe.process(Frame(hint, image, 2))
        pipe.process(Frame(header, image, 2))
        assert fake.turned == want


def test_init_n_is_bounded() -> None:
    """init_n = 1e12 was accepted: the buffer grew with every particle until then."""
    with pytest.raises(ConfigError, match="init_n"):
        load_config(overrides={"clusters.init_n": 10**12})
    with pytest.raises(ConfigError, match="k x init_n"):
        load_config(overrides={"clusters.k": 254, "clusters.init_n": 50_000})
    assert load_config(overrides={"clusters.k": 10, "clusters.init_n": 100_000}
                       ).clusters.init_n == 100_000
