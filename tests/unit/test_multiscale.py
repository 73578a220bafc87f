"""Instances at several working scales merged by score (nanoscout.analysis.multiscale), and the
STEM detector that uses it on a real HAADF-STEM tuning image."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.detector import Detector
from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.analysis.multiscale import merge_by_score
from nanoscout.engines import Engine, create_engine
from nanoscout.training import realdata
from nanoscout.training.evaluate import score_image


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_the_most_confident_outline_wins_and_unseen_particles_are_added() -> None:
    shape = (64, 64)
    a = np.zeros(shape, np.int32)
    a[_disc(shape, (16, 16), 6)] = 1  # seen by both maps, better by b
    a[_disc(shape, (48, 48), 5)] = 2  # seen by a only
    b = np.zeros(shape, np.int32)
    b[_disc(shape, (16, 17), 7)] = 1
    b[_disc(shape, (16, 48), 4)] = 2  # seen by b only
    labels, scores = merge_by_score([(a, np.array([0, 0.8, 0.95], np.float32)),
                                     (b, np.array([0, 0.9, 0.7], np.float32))])
    assert labels.dtype == np.int32 and scores.dtype == np.float32
    assert scores.tolist() == pytest.approx([0.0, 0.95, 0.9, 0.7])  # in order of score
    assert labels.max() == 3 and set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.array_equal(labels == 1, a == 2)
    assert np.array_equal(labels == 2, b == 1)  # a's weaker outline of it is dropped
    assert np.array_equal(labels == 3, b == 2)


def test_a_partly_covered_instance_keeps_only_its_free_pixels() -> None:
    shape = (40, 40)
    a = np.zeros(shape, np.int32)
    a[10:20, 10:20] = 1
    b = np.zeros(shape, np.int32)
    b[10:20, 18:28] = 1  # 20 % of it under a
    for overlap, kept in ((0.2, True), (0.19, False)):
        labels, scores = merge_by_score([(a, np.array([0, 0.9])), (b, np.array([0, 0.5]))],
                                        overlap)
        assert bool(labels.max() == 2) == kept
        if kept:
            assert np.count_nonzero(labels == 2) == 80 and (labels[10:20, 10:20] == 1).all()


def test_bad_maps_are_refused() -> None:
    a = np.zeros((8, 8), np.int32)
    a[2:4, 2:4] = 3
    with pytest.raises(ValueError, match="no label maps"):
        merge_by_score([])
    with pytest.raises(ValueError, match="shape"):
        merge_by_score([(a, np.zeros(4)), (np.zeros((8, 9), np.int32), np.zeros(1))])
    with pytest.raises(ValueError, match="label 3 but 2 scores"):
        merge_by_score([(a, np.zeros(2))])
    with pytest.raises(ValueError, match="max_overlap"):
        merge_by_score([(a, np.zeros(4))], 1.0)


def test_the_stem_detector_finds_more_particles_at_three_scales(shared_data: Path) -> None:
    """On a real HAADF-STEM image of a material the network never trained on (held-out Pd; the
    card's scales were chosen on Pt, which version 1.2 trains on): more true particles, no more
    false ones per true one gained, and one engine pass per scale."""
    model = shipped_model_dir() / "detector_stem.onnx"
    card = ModelCard.load(model.with_suffix(".json"))
    assert card.working_scale is not None and card.working_scale.multiscale
    engine = create_engine(model, "onnxruntime-cpu", threads=1)
    sample = next(s for s in realdata.iter_samples("stem", shared_data) if s.id == "Pd1")
    calls: list[tuple[int, ...]] = []
    infer = engine.infer

    def counted(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(next(iter(inputs.values())).shape)
        return infer(inputs)

    engine.infer = counted  # type: ignore[method-assign]

    def counts(multiscale: bool) -> tuple[dict[str, int], list[tuple[int, ...]], float]:
        calls.clear()
        t0 = time.perf_counter()
        d = Detector(engine, card, multiscale=multiscale).detect(sample.image)
        wall_ms = (time.perf_counter() - t0) * 1e3
        # every stage counted once: the stage times are positive and add up to the call
        assert min(d.timings_ms.values()) >= 0.0
        assert sum(d.timings_ms.values()) == pytest.approx(wall_ms, rel=0.1)
        r = score_image(d.labels, true_labels=sample.labels, true_boxes=sample.boxes)
        assert d.n == int(d.labels.max()) == len(d.scores) - 1
        return r, list(calls), d.scale

    one, one_calls, scale = counts(False)
    three, three_calls, _ = counts(True)
    assert three["tp"] >= one["tp"] + 10
    assert three["fp"] - one["fp"] <= (three["tp"] - one["tp"]) // 2
    # the extra scales were really run: one engine call each, at 0.71x and 1.41x the frame's
    # working size (counted, not timed: engine times move with whatever else the cores run)
    assert three_calls[:len(one_calls)] == one_calls and len(three_calls) == len(one_calls) + 2
    h = sample.image.shape[0]
    extra = sorted(c[-2] for c in three_calls[len(one_calls):])
    for got, r in zip(extra, (0.7071, 1.4142)):
        assert abs(got - h * scale * r) <= card.input.stride_multiple, (extra, scale)


def _merged_model(folder: Path, **extra: object) -> Path:
    """Write the general detector as an adapted model whose card merges the shipped STEM
    detector as its base network (``extra``: more ``base_network`` fields) into ``folder``;
    returns its ONNX path."""
    import json
    import shutil

    weights = shipped_model_dir()
    shutil.copyfile(weights / "detector_stem.onnx", folder / "base.onnx")
    base_card = json.loads((weights / "detector_stem.json").read_text())
    (folder / "base.json").write_text(json.dumps({**base_card, "onnx_file": "base.onnx"}))
    shutil.copyfile(weights / "detector.onnx", folder / "m.onnx")
    card = json.loads((weights / "detector.json").read_text())
    card.update(onnx_file="m.onnx", score_calibration=None,
                base_network={"onnx_file": "base.onnx", "sha256": base_card["sha256"],
                              "merge": True, **extra})
    (folder / "m.json").write_text(json.dumps(card))
    return folder / "m.onnx"


def _stem_frame() -> np.ndarray:
    from nanoscout.sim.synthetic import SpecimenConfig, render

    return render(SpecimenConfig(modality="STEM", shape=(384, 384), pixel_size_nm=1.0,
                                 median_diameter_nm=12.0, coverage=0.2), 5).image


def test_a_card_that_merges_its_base_network_keeps_both_networks_particles(tmp_path: Path
                                                                            ) -> None:
    """``base_network.merge`` (an adapted model, ``models adapt``): the base network detects
    on the frame too and its particles join by raw score; each particle is kept once, every
    stage's time is counted, and a calibrated base detector is refused (its scores are no raw
    scores)."""
    from nanoscout.analysis.detector import load_detector
    from nanoscout.wire.errors import ConfigError

    weights = shipped_model_dir()
    image = _stem_frame()

    def engine(p: Path) -> Engine:
        return create_engine(p, "onnxruntime-cpu", threads=1)

    merged = load_detector(_merged_model(tmp_path), engine)
    assert merged.merge_base and merged.base_detector is not None
    alone = Detector(merged.engine, ModelCard.load(tmp_path / "m.json").model_copy(
        update={"base_network": None}))
    t0 = time.perf_counter()
    both = merged.detect(image)
    wall_ms = (time.perf_counter() - t0) * 1e3
    own, base = alone.detect(image), merged.base_detector.detect(image)
    assert own.n > 10 and base.n > 10
    # the merge adds to either network's particles; where an outline of one overlaps two of
    # the other, the more confident side is kept, so the count may fall below the larger one
    assert min(own.n, base.n) < both.n <= own.n + base.n
    assert both.n == int(both.labels.max()) == len(both.scores) - 1
    assert sum(both.timings_ms.values()) == pytest.approx(wall_ms, rel=0.1)
    assert both.timings_ms["engine"] > 1.5 * own.timings_ms["engine"]  # both networks ran
    calibrated = Detector(merged.base_detector.engine, ModelCard.load(weights / "detector.json"))
    with pytest.raises(ConfigError, match="merged by raw score"):
        Detector(merged.engine, merged.card, base_detector=calibrated)
    merged.close()


def test_a_merged_card_hands_the_base_network_a_frame_where_its_network_finds_far_more(
        tmp_path: Path) -> None:
    """``base_network.max_count_ratio``: where the adapted network alone finds more than that
    many times the base network's particles (at least COUNT_FLOOR), the base network's own
    analysis is the frame's (``outside_range``, det.base_network_only); below it the two merge
    as before. The card refuses the check without merge (there is no base count to compare)."""
    from nanoscout.analysis.detector import load_detector
    from nanoscout.analysis.modelcard import COUNT_FLOOR, BaseNetwork

    image = _stem_frame()

    def detector(ratio: float) -> Detector:
        return load_detector(_merged_model(tmp_path, max_count_ratio=ratio),
                             lambda p: create_engine(p, "onnxruntime-cpu", threads=1))

    loose = detector(1000.0)
    alone = Detector(loose.engine, loose.card.model_copy(update={"base_network": None}))
    assert loose.base_detector is not None
    own, base = alone.detect(image), loose.base_detector.detect(image)
    ratio = own.n / max(base.n, COUNT_FLOOR)
    assert own.n > COUNT_FLOOR and ratio > 0.2
    merged = loose.detect(image)
    assert not merged.outside_range and merged.n > min(own.n, base.n)
    loose.close()
    strict = detector(0.9 * ratio)
    t0 = time.perf_counter()
    handed = strict.detect(image)
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert handed.outside_range and not handed.calibrated
    assert handed.n == base.n and np.array_equal(handed.labels, base.labels)
    assert sum(handed.timings_ms.values()) == pytest.approx(wall_ms, rel=0.1)
    strict.close()
    sha = "0" * 64
    with pytest.raises(ValueError, match="needs merge"):
        BaseNetwork(onnx_file="b.onnx", sha256=sha, max_count_ratio=2.0)
    check = BaseNetwork(onnx_file="b.onnx", sha256=sha, merge=True, max_count_ratio=2.0)
    assert [check.broke_down(n, b) for n, b in ((20, 0), (21, 0), (40, 20), (41, 20))] == \
        [False, True, False, True]
    assert not BaseNetwork(onnx_file="b.onnx", sha256=sha, merge=True).broke_down(10**6, 0)


def test_an_extra_finer_scale_stops_at_the_frames_own_pixels() -> None:
    """``multiscale_max_factor``: a finer extra scale is capped at the frame's own resolution
    (1.0), and skipped where the cap leaves it no finer than the chosen scale; coarser extra
    scales stay; without the cap only the resample range bounds them."""
    model = shipped_model_dir() / "detector.onnx"
    card = ModelCard.load(model.with_suffix(".json"))
    assert card.working_scale is not None
    engine = create_engine(model, "onnxruntime-cpu", threads=1)

    def factors(cap: float | None, scale: float) -> list[float]:
        ws = card.working_scale.model_copy(update={"multiscale": (0.5, 2.0),  # type: ignore[union-attr]
                                                   "multiscale_max_factor": cap})
        det = Detector(engine, card.model_copy(update={"working_scale": ws}))
        return [round(f, 3) for f in det._multiscale_factors(1024, 1024, scale)]

    assert factors(1.0, 0.3) == [0.15, 0.6]
    assert factors(1.0, 0.8) == [0.4, 1.0]   # 1.6 capped to the frame's pixels
    assert factors(1.0, 1.0) == [0.5]        # nothing finer than the frame itself
    assert factors(1.0, 1.6) == [0.8]        # 3.2 would be finer; capped, it is not
    assert factors(None, 1.0) == [0.5, 2.0]
    assert factors(None, 2.0) == [1.0, 3.0]  # 4.0 capped to the resample range (3.0)
    engine.close()
