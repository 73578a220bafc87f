"""Particle confidence through a real daemon over loopback ZeroMQ: the score cut as a
probability, alert rules that read confidences, confidence-weighted statistics; and what the
uncalibrated STEM detector does with all three."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.subscriber import Subscriber
from nanoscout.sim.synthetic import SpecimenConfig, render
from nanoscout.wire.headers import AlertHeader, DetHeader, StatsHeader
from tests.conftest import REPO
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

CONFIG = """
[engine]
min_confidence = 0.8

[stats]
weights = "confidence"

[classify]
enabled = false

[[alerts]]
name = "sure"
kind = "particle"
where = {}
min_confidence = 0.95
cooldown_s = 0

[[alerts]]
name = "real"
kind = "count"
above = 0
count = "expected"
cooldown_s = 0
"""


def _one_frame(sub: Subscriber, pub: FramePublisher, image: np.ndarray, modality: str
               ) -> dict[str, list[Any]]:
    """Send one frame; return its messages by kind, up to its ``stats`` (the last one)."""
    seq = pub.send(image, pixel_size_nm=0.5, modality=modality)
    got: dict[str, list[Any]] = {"det": [], "alert": [], "stats": []}
    for m in sub.messages(timeout=120):
        h = m.header
        if getattr(h, "seq", None) != seq:
            continue
        kind = ("det" if isinstance(h, DetHeader) else "alert" if isinstance(h, AlertHeader)
                else "stats" if isinstance(h, StatsHeader) else None)
        if kind is not None:
            got[kind].append(m)
        if kind == "stats":
            return got
    raise AssertionError(f"no stats message for frame {seq}")


def test_confidence_through_a_daemon(daemon_factory: DaemonFactory) -> None:
    weights = REPO / "models" / "weights"
    if not (weights / "detector_stem.onnx").is_file():
        pytest.skip(f"no shipped STEM detector in {weights}")
    d = daemon_factory("--policy", "lossless", config=CONFIG)
    image = render(SpecimenConfig(shape=(256, 256), pixel_size_nm=0.5), 3).image
    with Subscriber(d.output, topics=("det.", "alert.", "stats.", "health")) as sub, \
            FramePublisher(d.input, source="conf") as pub:
        sub.wait_ready()
        tem = _one_frame(sub, pub, image, "TEM")
        stem = _one_frame(sub, pub, image, "STEM")

    # TEM: the calibrated general detector cut at probability 0.8
    (det,) = tem["det"]
    table = det.array
    assert len(table) > 5 and (table["score"] >= 0.8 - 1e-4).all()
    inside = table[~table["border"]]
    alerts = {m.header.rule: m for m in tem["alert"]}
    if (inside["score"] >= np.float32(0.95)).any():
        sure = alerts.pop("sure")
        assert sure.header.confidence >= 0.95 and (sure.array["score"] >= np.float32(0.95)).all()
    real = alerts.pop("real")
    assert real.header.value == pytest.approx(float(inside["score"].sum()), rel=1e-5)
    assert not alerts
    (stats,) = tem["stats"]
    assert stats.header.weights == "confidence"
    assert stats.header.window.expected_count == pytest.approx(float(inside["score"].sum()),
                                                               rel=1e-5)

    # STEM: the uncalibrated STEM detector keeps its raw cut; the rules that read confidences
    # stay silent and the statistics count every particle once
    (sdet,) = stem["det"]
    assert "stem" in sdet.header.model
    assert not stem["alert"]
    (sstats,) = stem["stats"]
    assert sstats.header.weights == "none"
