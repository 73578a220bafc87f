"""Real journal-figure micrographs (EMPS validation papers) through replay → daemon → subscriber.

The frames are RGB PNGs without calibration, with particles from ~20 to several hundred px
across, scale bars and panel letters burnt in: the daemon must pick each frame's working scale
itself and still find the annotated particles.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.subscriber import Subscriber
from nanoscout.training import realdata
from tests.system.conftest import DaemonFactory, nanoscout
from tests.system.test_streaming import _match

pytestmark = pytest.mark.system


def _pick(shared_data: Path, n: int = 8) -> list[realdata.Sample]:
    """The first ``n`` validation images (split order) with 3-150 annotated particles."""
    out = []
    for s in realdata.iter_samples("emps", shared_data):
        assert s.labels is not None
        k = len(np.unique(s.labels)) - 1
        if 3 <= k <= 150:
            out.append(s)
        if len(out) == n:
            break
    return out


def test_real_micrographs_are_found_at_their_own_scale(
    daemon_factory: DaemonFactory,
    shared_data: Path,
) -> None:
    samples = _pick(shared_data)
    files = [shared_data / "emps-train" / "images" / f"{s.id}.png" for s in samples]
    d = daemon_factory("--policy", "lossless")
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        replay = nanoscout("replay", *map(str, files), "--frames-endpoint", d.input, "--mode", "push",
                           stdout=subprocess.PIPE)
        seen = {}
        for msg in sub.messages(timeout=180):
            assert msg.array is not None
            seen[Path(str(msg.header.meta["file"])).stem] = (msg.header, msg.array.copy())
            if len(seen) == len(files):
                break
        out, _ = replay.communicate(timeout=60)
    assert replay.returncode == 0, out
    assert set(seen) == {s.id for s in samples}
    tp = n_det = n_true = 0
    for s in samples:
        header, table = seen[s.id]
        assert header.units == "px" and header.pixel_size_nm is None
        assert header.working_scale is not None and 0.02 <= header.working_scale <= 3.0
        assert s.labels is not None
        ids, area = np.unique(s.labels[s.labels > 0], return_counts=True)
        ecd = dict(zip(ids.tolist(), (2 * np.sqrt(area / np.pi)).tolist(), strict=True))
        a, b, c, _ = _match(table, s.labels, ecd)
        tp, n_det, n_true = tp + a, n_det + b, n_true + c
        big = float(np.median(list(ecd.values())))
        if big > 60:  # large particles: the frame was shrunk before the network saw it
            assert header.working_scale < 0.8, (s.id, big, header.working_scale)
    precision, recall = tp / max(n_det, 1), tp / max(n_true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    print(f"EMPS validation images through the daemon: {n_true} particles, precision "
          f"{precision:.3f} recall {recall:.3f} F1 {f1:.3f}")
    assert n_true >= 50
    assert f1 >= 0.6, (precision, recall)
