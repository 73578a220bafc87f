"""A real daemon classifying a frame far from square: its ``class`` message, class and
novelty alerts and lens query see the frame in views, with heatmaps covering the frame."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nanoscout.clients.subscriber import Subscriber
from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system


def test_an_8_to_1_frame_is_classified_in_views_by_the_daemon(daemon_factory: DaemonFactory
                                                              ) -> None:
    """A 4096x512 field of isolated particles (uint16) was classed charging_saturated (0.50)
    with novelty 3.74 from the whole frame squeezed into 256x256, firing a charging alert and
    a novelty alert; in its 8 views it is isolated_particles (0.90, novelty 0.41), the
    particle alert fires with the class's CAM over the whole frame (16 x 128 cells), and the
    lens query answers the class message's novelty with the views' reconstructions side by
    side."""
    from nanoscout.clients.acquisition.publisher import FramePublisher
    from nanoscout.clients.query import request_lens
    from nanoscout.sim.fields import render_field
    from tests.conftest import wait_until

    field = render_field("isolated_particles", np.random.default_rng(77), shape=(512, 4096))
    image = np.clip(field.image, 0, 65535).astype(np.uint16)
    rules = "".join(f"[[alerts]]\nname = \"{n}\"\nkind = \"{k}\"\n{extra}cooldown_s = 0\n\n"
                    for n, k, extra in (("novel", "novelty", "threshold = 2.0\n"),
                                        ("charging", "class", 'label = "charging_saturated"\n'
                                                              "threshold = 0.45\n"),
                                        ("particles", "class", 'label = "isolated_particles"\n'
                                                               "threshold = 0.8\n")))
    d = daemon_factory("--policy", "lossless", config=f"[classify]\nevery = 1\n\n{rules}")
    assert d.query is not None
    got: dict[str, list[Any]] = {"class": [], "alert": []}
    with Subscriber(d.output, topics=("class.", "alert.", "stats.")) as sub, \
            FramePublisher(d.input, mode="push", source="strip") as pub:
        sub.wait_ready()
        pub.send(image, pixel_size_nm=2.0)
        for msg in sub.messages(timeout=120):
            if msg.kind.value == "stats":
                break
            got[msg.kind.value].append(msg)
    (cls,) = got["class"]
    h = cls.header
    assert h.labels[0] == "isolated_particles" and h.probabilities[0] > 0.8, (
        h.labels, h.probabilities, h.novelty)
    assert h.novelty is not None and h.novelty < 1.0
    assert tuple(h.heatmap_shape) == (16, 128) and cls.array.shape == (16, 128)
    alerts = {m.header.rule: m for m in got["alert"]}
    assert set(alerts) == {"particles"}, {r: m.header.value for r, m in alerts.items()}
    heat = alerts["particles"].heatmap
    assert heat is not None and heat.shape == (16, 128) and np.array_equal(heat, cls.array)

    query = d.query

    def answered() -> Any:  # the worker hands the query server its frame after its messages
        reply, maps = request_lens(query, "strip", ["reconstruction"])
        return (reply, maps) if reply.seq == h.seq else None

    reply, maps = wait_until(answered, timeout=30, what="the lens query of the strip")
    assert reply.novelty == pytest.approx(h.novelty, rel=1e-3)
    assert maps["reconstruction"].shape == (1, 1, 256, 256 * 8)
