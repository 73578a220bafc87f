"""Alert rules (nanoscout.analysis.alerts): every rule kind, rate limiting, de-duplication, bad config."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from nanoscout.analysis.alerts import (
    Alert,
    AlertEngine,
    CountRule,
    ParticleRule,
    check_class_labels,
    check_rule_inputs,
    parse_rules,
)
from nanoscout.wire.errors import ConfigError, FrameError
from nanoscout.wire.headers import Stage, Units
from nanoscout.wire.particles import SHAPE_CLASSES, empty_table

S = 1_000_000_000  # ns per s


def particles(*rows: dict[str, Any]) -> np.ndarray:
    """A particle table; each row gives a few fields, the rest are plausible defaults."""
    t = empty_table(len(rows))
    for i, row in enumerate(rows):
        t["id"][i] = i + 1
        t["x"][i], t["y"][i] = 100.0 + 50 * i, 100.0
        t["ecd_nm"][i] = 10.0
        t["aspect_ratio"][i] = 1.0
        t["shape_class"][i] = SHAPE_CLASSES.index("sphere")
        for k, v in row.items():
            t[k][i] = SHAPE_CLASSES.index(v) if k == "shape_class" else v
        x, y = t["x"][i], t["y"][i]
        t["bbox"][i] = (int(x) - 5, int(y) - 5, int(x) + 6, int(y) + 6)
    return t


def run(
    engine: AlertEngine,
    table: np.ndarray,
    *,
    t_ns: int = 0,
    stage: tuple[float, float] | None = (0.0, 0.0),
    stats: dict[str, Any] | None = None,
    units: Units = "nm",
    source: str = "cam",
    pixel_size_nm: float | None = 1.0,
) -> list[Alert]:
    return engine.evaluate(
        source=source,
        t_ns=t_ns,
        stage=None if stage is None else Stage(x_um=stage[0], y_um=stage[1]),
        table=table,
        stats=stats,
        units=units,
        pixel_size_nm=pixel_size_nm,
    )


BIG = {"name": "big", "kind": "particle", "where": {"ecd_nm": {"gt": 50}}}


def test_particle_rule_fires_with_value_threshold_and_explanation() -> None:
    engine = AlertEngine(parse_rules([BIG]))
    assert run(engine, particles({"ecd_nm": 20}, {"ecd_nm": 49.9})) == []
    (alert,) = run(engine, particles({"ecd_nm": 20}, {"ecd_nm": 63.2}), t_ns=1)
    assert alert.rule == "big" and alert.kind == "particle" and alert.severity == "warning"
    assert alert.value == pytest.approx(63.2, rel=1e-6) and alert.threshold == 50.0
    assert alert.explanation == "particle 2 has ECD 63.2 nm > 50 nm (rule big)"
    assert alert.particles["id"].tolist() == [2]


def test_particle_rule_several_conditions_shape_class_and_ordering() -> None:
    rule = {
        "name": "rods",
        "kind": "particle",
        "severity": "critical",
        "where": {"aspect_ratio": {"gt": 3, "le": 10}, "shape_class": {"eq": "rod"}},
    }
    engine = AlertEngine(parse_rules([rule]))
    table = particles(
        {"aspect_ratio": 4.0, "shape_class": "rod"},
        {"aspect_ratio": 5.0, "shape_class": "faceted"},  # wrong class
        {"aspect_ratio": 12.0, "shape_class": "rod"},  # fails le 10
        {"aspect_ratio": 6.0, "shape_class": "rod"},
    )
    (alert,) = run(engine, table)
    assert alert.severity == "critical"
    assert alert.particles["id"].tolist() == [4, 1]  # most extreme first
    assert alert.value == 6.0 and alert.threshold == 3.0
    assert "2 particles match" in alert.explanation
    assert "particle 4 has aspect ratio 6 > 3 and aspect ratio 6 <= 10 and shape rod" in (
        alert.explanation
    )


def test_particle_rule_min_count_border_and_cap() -> None:
    engine = AlertEngine(
        parse_rules([{"name": "many", "kind": "particle", "where": {}, "min_count": 3}])
    )
    assert run(engine, particles({}, {}, {"border": True})) == []  # border excluded: 2 < 3
    engine = AlertEngine(
        parse_rules(
            [
                {
                    "name": "many",
                    "kind": "particle",
                    "where": {},
                    "min_count": 3,
                    "include_border": True,
                }
            ]
        )
    )
    (alert,) = run(engine, particles({}, {}, {"border": True}))
    assert alert.value == 3 and alert.threshold == 3
    engine = AlertEngine(parse_rules([BIG]))
    big = particles(*[{"ecd_nm": 60 + i, "x": 30.0 * i} for i in range(30)])
    (alert,) = run(engine, big)
    assert len(alert.particles) == 20
    assert alert.particles["ecd_nm"][0] == 89.0


def test_lt_rule_reports_smallest() -> None:
    engine = AlertEngine(
        parse_rules([{"name": "tiny", "kind": "particle", "where": {"area_nm2": {"lt": 5}}}])
    )
    (alert,) = run(engine, particles({"area_nm2": 4.0}, {"area_nm2": 2.5}, {"area_nm2": 9.0}))
    assert alert.value == 2.5 and alert.particles["id"].tolist() == [2, 1]
    assert "area 2.5 nm² < 5 nm²" in alert.explanation


def test_deduplication_same_particle_same_stage() -> None:
    engine = AlertEngine(parse_rules([BIG]))
    table = particles({"ecd_nm": 60.0, "x": 200.0, "y": 200.0})
    assert len(run(engine, table, t_ns=0)) == 1
    # the same particle, slightly moved (drift), 1 s later at the same stage: suppressed
    moved = particles({"ecd_nm": 60.0, "x": 230.0, "y": 210.0})
    assert run(engine, moved, t_ns=1 * S) == []
    assert engine.suppressed["big"] == 1
    # a new particle far away in the same frame: fires, listing the new one first
    both = particles({"ecd_nm": 60.0, "x": 230.0, "y": 210.0}, {"ecd_nm": 55.0, "x": 600.0})
    (alert,) = run(engine, both, t_ns=2 * S)
    assert alert.particles["id"].tolist() == [2, 1]
    assert alert.value == 55.0  # the new particle's, which the explanation names
    assert "(1 new); particle 2 has ECD 55 nm > 50 nm" in alert.explanation
    # the stage moved: the same frame position is another particle
    assert len(run(engine, moved, t_ns=3 * S, stage=(5.0, 0.0))) == 1
    # after the cooldown (5 s) the memory expires and the particle is reported again
    assert len(run(engine, moved, t_ns=8 * S)) == 1
    assert engine.suppressed["big"] == 1


def test_deduplication_radius_and_pixel_size() -> None:
    rule = dict(BIG, dedup_radius_nm=20.0)
    engine = AlertEngine(parse_rules([rule]))
    run(engine, particles({"ecd_nm": 60.0, "x": 100.0}), pixel_size_nm=2.0)
    # 15 px = 30 nm away: outside 20 nm (but inside the 60 nm ECD): a new particle
    assert len(run(engine, particles({"ecd_nm": 60.0, "x": 115.0}), t_ns=1, pixel_size_nm=2.0)) == 1
    # 8 px = 16 nm from the last one: duplicate
    assert run(engine, particles({"ecd_nm": 60.0, "x": 123.0}), t_ns=2, pixel_size_nm=2.0) == []


def test_deduplication_without_pixel_size_uses_bounding_boxes() -> None:
    engine = AlertEngine(parse_rules([BIG]))
    run(engine, particles({"ecd_nm": 60.0, "x": 100.0}), pixel_size_nm=None)
    assert run(engine, particles({"ecd_nm": 60.0, "x": 104.0}), t_ns=1, pixel_size_nm=None) == []
    assert (
        len(run(engine, particles({"ecd_nm": 60.0, "x": 120.0}), t_ns=2, pixel_size_nm=None)) == 1
    )


def test_sources_are_independent() -> None:
    engine = AlertEngine(parse_rules([BIG]))
    table = particles({"ecd_nm": 60.0})
    assert len(run(engine, table, source="a")) == 1
    assert len(run(engine, table, source="b")) == 1
    assert run(engine, table, source="a", t_ns=1) == []


def test_count_rule_above_below_and_rate_limit() -> None:
    rules = parse_rules(
        [
            {"name": "crowded", "kind": "count", "above": 2, "cooldown_s": 2},
            {"name": "empty", "kind": "count", "below": 1, "severity": "info"},
        ]
    )
    engine = AlertEngine(rules)
    assert run(engine, particles({}, {})) == []
    (alert,) = run(engine, particles({}, {}, {}), t_ns=0)
    assert (alert.rule, alert.value, alert.threshold) == ("crowded", 3.0, 2.0)
    assert alert.explanation == "frame has 3 particles > 2 (rule crowded)"
    assert len(alert.particles) == 0
    assert run(engine, particles({}, {}, {}), t_ns=1 * S) == []  # inside the 2 s cooldown
    assert engine.suppressed == {"crowded": 1, "empty": 0}
    assert len(run(engine, particles({}, {}, {}), t_ns=2 * S)) == 1
    # a source whose clock restarts (time goes backwards) starts a fresh cooldown
    assert len(run(engine, particles({}, {}, {}), t_ns=0)) == 1
    assert engine.suppressed["crowded"] == 1
    # border particles do not count by default
    (alert,) = run(engine, particles({"border": True}), t_ns=3 * S)
    assert alert.rule == "empty" and alert.value == 0.0


def _stats(change: float | None, complete: bool = True) -> dict[str, Any]:
    return {
        "units": "nm",
        "drift": {
            "reference_d50": 10.0,
            "window_d50": None if change is None else 10.0 * (1 + change / 100),
            "change_pct": change,
            "reference_complete": complete,
        },
    }


def test_d50_drift_rule() -> None:
    engine = AlertEngine(
        parse_rules(
            [
                {"name": "sinter", "kind": "d50_drift", "pct": 10},
                {"name": "shrink", "kind": "d50_drift", "pct": 5, "direction": "shrink"},
            ]
        )
    )
    empty = empty_table()
    assert run(engine, empty, stats=None) == []
    assert run(engine, empty, stats=_stats(50.0, complete=False)) == []
    assert run(engine, empty, stats=_stats(9.0)) == []
    (alert,) = run(engine, empty, stats=_stats(25.0), t_ns=1)
    assert alert.rule == "sinter" and alert.value == pytest.approx(25.0) and alert.threshold == 10
    assert "window D50 12.5 nm is 25.0 % above the reference D50 10 nm" in alert.explanation
    assert run(engine, empty, stats=_stats(30.0), t_ns=2) == []  # cooldown
    assert engine.suppressed["sinter"] == 1
    fired = run(engine, empty, stats=_stats(-20.0), t_ns=10 * S)
    assert [(a.rule, a.threshold) for a in fired] == [("sinter", -10.0), ("shrink", -5.0)]


def test_uncalibrated_frames_skip_nm_rules_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    rules = [BIG, {"name": "elongated", "kind": "particle", "where": {"aspect_ratio": {"gt": 3}}}]
    engine = AlertEngine(parse_rules(rules))
    table = particles({"ecd_nm": 80.0, "aspect_ratio": 4.0})
    with caplog.at_level(logging.WARNING, logger="nanoscout.analysis.alerts"):
        fired = run(engine, table, units="px", pixel_size_nm=None)
        fired += run(engine, table, units="px", pixel_size_nm=None, t_ns=10 * S)
    assert [a.rule for a in fired] == ["elongated", "elongated"]
    assert engine.skipped_uncalibrated == {"big": 2, "elongated": 0}
    assert sum("big" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ({"name": "r", "kind": "particle", "where": {"ecd": {"gt": 1}}}, "'ecd'"),
        ({"name": "r", "kind": "particle", "where": {"ecd_nm": {"more": 1}}}, "'more'"),
        ({"name": "r", "kind": "particle", "where": {"ecd_nm": {"gt": "big"}}}, "ecd_nm.gt"),
        ({"name": "r", "kind": "particle", "where": {"shape_class": {"eq": "cube"}}}, "'cube'"),
        ({"name": "r", "kind": "particle", "where": {"shape_class": {"gt": "rod"}}}, "'gt'"),
        ({"name": "r", "kind": "particle", "where": {"bbox": {"gt": 1}}}, "'bbox'"),
        ({"name": "r", "kind": "particle", "where": {}, "colour": "red"}, "colour"),
        ({"name": "r", "kind": "teleport"}, "teleport"),
        ({"name": "r"}, "kind"),
        ({"name": "r", "kind": "count"}, "above"),
        ({"name": "r", "kind": "d50_drift", "pct": -1}, "pct"),
        ({"name": "r", "kind": "count", "above": 1, "severity": "panic"}, "severity"),
        ({"name": "r", "kind": "count", "above": 1, "cooldown_s": -1}, "cooldown_s"),
        # numbers are finite everywhere, as in ``where``
        ({"name": "r", "kind": "particle", "where": {"ecd_nm": {"gt": math.inf}}}, "finite"),
        ({"name": "r", "kind": "count", "above": math.nan}, "above: Input should be a finite"),
        ({"name": "r", "kind": "count", "below": -math.inf}, "below: Input should be a finite"),
        ({"name": "r", "kind": "d50_drift", "pct": math.inf}, "pct: Input should be a finite"),
        ({"name": "r", "kind": "growth_rate", "above": math.nan}, "above: Input should be a"),
        ({"name": "r", "kind": "novelty", "threshold": math.inf}, "threshold: Input should be"),
    ],
)
def test_bad_rules_raise_config_error_naming_the_problem(rule: dict[str, Any], needle: str) -> None:
    good = {"name": "ok", "kind": "count", "above": 5}
    with pytest.raises(ConfigError, match=r"alert rule 1 \('r'\)") as info:
        parse_rules([good, rule])
    assert needle in str(info.value)


def test_duplicate_names_and_non_table_rules() -> None:
    with pytest.raises(ConfigError, match="'big' is used twice"):
        parse_rules([BIG, BIG])
    with pytest.raises(ConfigError, match="alert rule 0"):
        parse_rules(["big"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="twice"):
        AlertEngine([CountRule(name="x", above=1), ParticleRule(name="x", where={})])


# --------------------------------------------------------------------------- shape + size


def test_shape_class_with_size_condition_long_rod() -> None:
    rule = {"name": "long-rod", "kind": "particle",
            "where": {"shape_class": {"eq": "rod"}, "feret_max_nm": {"gt": 50}}}
    eng = AlertEngine(parse_rules([rule]))
    assert run(eng, particles({"shape_class": "rod", "feret_max_nm": 40.0})) == []
    assert run(eng, particles({"shape_class": "sphere", "feret_max_nm": 60.0})) == []
    (alert,) = run(eng, particles({"shape_class": "rod", "feret_max_nm": 60.0}))
    assert alert.value == 60.0 and alert.threshold == 50.0
    assert "shape rod" in alert.explanation and "Feret max 60 nm > 50 nm" in alert.explanation


def test_cluster_column_can_be_tested() -> None:
    eng = AlertEngine(parse_rules([{"name": "c2", "kind": "particle",
                                    "where": {"cluster": {"eq": 2}}}]))
    assert run(eng, particles({"cluster": 1})) == []
    assert len(run(eng, particles({"cluster": 2}))) == 1


# --------------------------------------------------------------------------- class / novelty

CLASSES = ["spheres", "rods_wires", "empty"]
WIRES = {"name": "wires", "kind": "class", "label": "rods_wires", "threshold": 0.9,
         "severity": "critical", "cooldown_s": 5}
NEW = {"name": "new", "kind": "novelty", "threshold": 3.0, "severity": "info"}


def classify(engine: AlertEngine, probs: list[float], novelty: float | None = None,
             t_ns: int = 0, heat: np.ndarray | None = None, source: str = "cam") -> list[Alert]:
    return engine.evaluate_class(source=source, t_ns=t_ns, labels=CLASSES, probabilities=probs,
                                 novelty=novelty, heatmap=heat)


def test_class_rule_fires_above_threshold_with_heatmap_and_explanation() -> None:
    eng = AlertEngine(parse_rules([WIRES]))
    heat = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert classify(eng, [0.15, 0.85, 0.0], heat=heat) == []
    assert classify(eng, [0.1, 0.9, 0.0], heat=heat) == []  # not strictly above
    (al,) = classify(eng, [0.04, 0.95, 0.01], heat=heat)
    assert al.kind == "class" and al.severity == "critical" and al.rule == "wires"
    assert al.value == pytest.approx(0.95) and al.threshold == 0.9
    assert al.heatmap is heat and len(al.particles) == 0
    assert "rods_wires" in al.explanation and "0.950" in al.explanation
    assert "0.9" in al.explanation and "wires" in al.explanation
    # particle-frame evaluation ignores class rules, and class evaluation ignores frame rules
    assert run(eng, particles({})) == []


def test_a_class_alert_is_explained_by_its_own_labels_cam() -> None:
    """A class rule fires on p(label) > threshold whether or not the label is the top class:
    its alert carries that label's CAM (asked of ``cam_of`` only for a rule that fires past its
    cooldown), never the top class's, which explains another class; a novelty alert keeps the
    top class's."""
    needle = {**WIRES, "name": "needle", "threshold": 0.3}
    eng = AlertEngine(parse_rules([needle, NEW]))
    top, own = np.zeros((3, 4), np.uint8), np.full((3, 4), 7, np.uint8)
    asked: list[str] = []

    def cam_of(label: str) -> np.ndarray:
        asked.append(label)
        return own

    def run_class(t_ns: int) -> list[Alert]:
        return eng.evaluate_class(source="cam", t_ns=t_ns, labels=CLASSES,
                                  probabilities=[0.6, 0.35, 0.05], novelty=4.0, heatmap=top,
                                  cam_of=cam_of)

    assert asked == []
    al, nov = run_class(0)  # rods_wires 0.35 > 0.3, the top class is spheres (0.6)
    assert al.rule == "needle" and al.heatmap is own and asked == ["rods_wires"]
    assert nov.rule == "new" and nov.heatmap is top
    assert run_class(S) == [] and asked == ["rods_wires"]  # suppressed: no CAM made
    # no cam_of (a classifier without class maps): no heatmap rather than the top class's
    (al,) = classify(AlertEngine(parse_rules([needle])), [0.6, 0.35, 0.05], heat=top)
    assert al.heatmap is None


def test_class_and_novelty_rules_have_cooldowns_per_source() -> None:
    eng = AlertEngine(parse_rules([WIRES, NEW]))
    p = [0.0, 0.99, 0.01]
    assert [a.rule for a in classify(eng, p, novelty=4.0)] == ["wires", "new"]
    assert classify(eng, p, novelty=4.0, t_ns=2 * S) == []
    assert eng.suppressed == {"wires": 1, "new": 1}
    assert len(classify(eng, p, novelty=4.0, t_ns=2 * S, source="other")) == 2
    assert len(classify(eng, p, novelty=4.0, t_ns=6 * S)) == 2


def test_novelty_rule() -> None:
    eng = AlertEngine(parse_rules([NEW]))
    assert classify(eng, [0.5, 0.3, 0.2], novelty=None) == []  # no lens: no novelty
    assert classify(eng, [0.5, 0.3, 0.2], novelty=2.9) == []
    (al,) = classify(eng, [0.5, 0.3, 0.2], novelty=3.5)
    assert al.kind == "novelty" and al.value == 3.5 and al.threshold == 3.0
    assert "novelty 3.5 > 3" in al.explanation and al.heatmap is None


def test_class_rule_label_absent_from_the_frame_does_not_fire() -> None:
    eng = AlertEngine(parse_rules([WIRES]))
    assert eng.evaluate_class(source="c", t_ns=0, labels=["spheres"],
                              probabilities=[1.0], novelty=None, heatmap=None) == []
    with pytest.raises(FrameError, match="2 class labels but 1"):
        eng.evaluate_class(source="c", t_ns=0, labels=["a", "b"],
                           probabilities=[1.0], novelty=None, heatmap=None)


def test_check_class_labels_names_rule_and_known_classes() -> None:
    rules = parse_rules([WIRES, NEW, BIG])
    check_class_labels(rules, CLASSES)
    bad = parse_rules([{**WIRES, "label": "nanowires"}])
    with pytest.raises(ConfigError) as exc:
        check_class_labels(bad, CLASSES)
    msg = str(exc.value)
    assert "'wires'" in msg and "'nanowires'" in msg and "spheres, rods_wires, empty" in msg


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ({"name": "r", "kind": "class", "threshold": 0.5}, "label"),
        ({"name": "r", "kind": "class", "label": "x", "threshold": 1.5}, "threshold"),
        ({"name": "r", "kind": "novelty"}, "threshold"),
        ({"name": "r", "kind": "novelty", "threshold": -1}, "threshold"),
        ({"name": "r", "kind": "class", "label": "x", "threshold": 0.5, "where": {}}, "where"),
    ],
)
def test_bad_class_and_novelty_rules(rule: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_rules([rule])


# ------------------------------------------------------------------ confidence


def test_min_confidence_keeps_unconvincing_particles_out() -> None:
    rule = {"name": "big", "kind": "particle", "where": {"ecd_nm": {"gt": 50}},
            "min_confidence": 0.8, "cooldown_s": 0}
    engine = AlertEngine(parse_rules([rule]))
    table = particles({"ecd_nm": 70, "score": 0.6}, {"ecd_nm": 60, "score": 0.9})
    (alert,) = engine.evaluate(source="cam", t_ns=0, stage=None, table=table, stats=None,
                               units="nm", pixel_size_nm=1.0, calibrated=True)
    # the larger particle is too uncertain: the one described is the probable one
    assert alert.particles["id"].tolist() == [2]
    assert alert.confidence == pytest.approx(0.9)
    assert alert.explanation == "particle 2 (confidence 0.90) has ECD 60 nm > 50 nm (rule big)"
    unsure = particles({"ecd_nm": 70, "score": 0.6})
    assert engine.evaluate(source="cam", t_ns=1, stage=None, table=unsure, stats=None,
                           units="nm", pixel_size_nm=1.0, calibrated=True) == []


def test_rules_that_read_confidences_skip_raw_scores(caplog: pytest.LogCaptureFixture) -> None:
    rules = parse_rules([
        {"name": "sure", "kind": "particle", "where": {}, "min_confidence": 0.5},
        {"name": "expected", "kind": "count", "above": 0.5, "count": "expected"},
        {"name": "plain", "kind": "count", "above": 0.5},
    ])
    engine = AlertEngine(rules)
    table = particles({"score": 0.99})
    with caplog.at_level(logging.WARNING):
        fired = run(engine, table) + run(engine, table, t_ns=10 * S)
    assert [a.rule for a in fired] == ["plain", "plain"]  # raw scores are no probabilities
    assert engine.skipped_raw_scores == {"sure": 2, "expected": 2, "plain": 0}
    assert caplog.text.count("reads particle confidences") == 2  # once per rule and source


def test_count_rules_can_count_expected_particles() -> None:
    rules = parse_rules([
        {"name": "real-crowd", "kind": "count", "above": 2.5, "count": "expected"},
        {"name": "vanishing", "kind": "count_drop", "pct": 40, "window_frames": 2,
         "count": "expected", "cooldown_s": 0},
    ])
    engine = AlertEngine(rules)

    def frame(t: int, *scores: float) -> list[Alert]:
        return engine.evaluate(source="cam", t_ns=t * S, stage=None,
                               table=particles(*({"score": s} for s in scores)), stats=None,
                               units="nm", pixel_size_nm=1.0, calibrated=True)

    # four detections, but only 2.2 real particles expected: no crowd
    assert frame(0, 0.9, 0.9, 0.2, 0.2) == []
    assert frame(1, 0.9, 0.9, 0.2, 0.2) == []
    (crowd,) = frame(2, 0.9, 0.9, 0.9, 0.2)
    assert crowd.rule == "real-crowd" and crowd.value == pytest.approx(2.9)
    assert crowd.confidence == pytest.approx(2.9 / 4, abs=1e-4)
    assert crowd.explanation == "frame has 2.9 expected particles > 2.5 (rule real-crowd)"
    # as many detections as before, but fewer probable ones: 1.0 < 60 % of the median 2.2-2.9
    (drop,) = frame(3, 0.3, 0.3, 0.2, 0.2)
    assert drop.rule == "vanishing" and drop.value < -40
    (plain,) = parse_rules([{"name": "c", "kind": "count", "above": 1}])
    assert isinstance(plain, CountRule) and plain.count == "particles"
    with pytest.raises(ConfigError, match="count"):
        parse_rules([{"name": "c", "kind": "count", "above": 1, "count": "probable"}])
    with pytest.raises(ConfigError, match="min_confidence"):
        parse_rules([{"name": "p", "kind": "particle", "where": {}, "min_confidence": 1.5}])


def test_a_class_or_novelty_rule_without_its_input_is_refused_at_start() -> None:
    """With the classifier (or the AI lens) switched off such a rule could never fire; the
    daemon started and stayed silent."""
    from nanoscout.daemon.app import build_classifier
    from nanoscout.daemon.config import ServeConfig

    rules = parse_rules([WIRES, NEW, BIG])
    check_rule_inputs(rules, classifier=True, lens=True)
    with pytest.raises(ConfigError, match="'wires' \\(class\\) needs the classifier.*'new'"):
        check_rule_inputs(rules, classifier=False, lens=False)
    with pytest.raises(ConfigError, match="'new' \\(novelty\\) needs the AI lens") as exc:
        check_rule_inputs(rules, classifier=True, lens=False)
    assert "wires" not in str(exc.value)
    check_rule_inputs(parse_rules([BIG]), classifier=False, lens=False)
    cfg = ServeConfig.model_validate({"classify": {"enabled": False}, "alerts": [WIRES]})
    with pytest.raises(ConfigError, match="could never fire"):
        build_classifier(cfg)
    assert build_classifier(ServeConfig.model_validate({"classify": {"enabled": False},
                                                        "alerts": [BIG]})) is None
