"""The virtual microscope's acquisition sequence (no sockets)."""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np

from nanoscout.clients.acquisition.simulator import SimulatorOptions, frames


def _opts(**kw: Any) -> SimulatorOptions:
    return SimulatorOptions(endpoint="inproc://unused", shape=(64, 64), fields=4, dwell=2, **kw)


def test_stage_rasters_serpentine_and_dwells() -> None:
    stages = [stage for _, stage in islice(frames(_opts(field_um=3.0)), 9)]
    assert stages == [(0, 0), (0, 0), (3, 0), (3, 0), (3, 3), (3, 3), (0, 3), (0, 3), (0, 0)]


def test_each_frame_is_a_new_exposure_of_the_same_field() -> None:
    (a, _), (b, _), (c, _) = islice(frames(_opts()), 3)
    np.testing.assert_array_equal(a.labels, b.labels)  # same field: same particles
    assert not np.array_equal(a.image, b.image)  # new shot noise
    assert not np.array_equal(a.labels, c.labels)  # next field


def test_drift_moves_the_specimen_while_dwelling() -> None:
    (a, _), (b, _) = islice(frames(_opts(drift_px_per_frame=(0.0, 3.0), dose_e_per_px=None)), 2)
    assert not np.array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.labels[:, :-3], b.labels[:, 3:])  # content moved 3 px right


def test_same_seed_same_stream() -> None:
    x = [f.image for f, _ in islice(frames(_opts(seed=5)), 3)]
    y = [f.image for f, _ in islice(frames(_opts(seed=5)), 3)]
    for p, q in zip(x, y, strict=True):
        np.testing.assert_array_equal(p, q)
