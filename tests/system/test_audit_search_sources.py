"""Audit of the stage search's frame matching and its option checks, against a real daemon
(``nanoscout serve --config deploy/search.toml``) over ``ipc://``.

* Two microscopes feed one daemon, sources ``stage`` and ``stage2``. The search of ``stage``
  subscribes to the topic prefixes ``det.stage``, ``alert.stage``, ... which ZeroMQ also
  matches for ``det.stage2``; both publishers number their frames from 0. The results of
  ``stage2``'s frame 0 (a wire target) must not become those of ``stage``'s frame 0 (a bare
  specimen): a target that is not there, at the wrong stage position.
* An ``--overlap`` as wide as the field of view is a configuration error (exit 2, a one-line
  message), not a traceback.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import ControlClient, ControlServer
from nanoscout.clients.microscope.simulated import SimulatedMicroscopeOptions, build
from nanoscout.clients.search.session import SearchSession
from nanoscout.clients.search.strategies import SearchConfig, TargetBook
from nanoscout.sim.virtual_specimen import VirtualSpecimenConfig
from tests.conftest import REPO
from tests.system.conftest import DaemonProc, nanoscout, wait_ready

pytestmark = pytest.mark.system

SHAPE = (256, 256)
PIXEL_NM = 20.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    """The search daemon on ipc:// endpoints under ``tmp_path``."""
    proc = nanoscout("serve", "--config", str(REPO / "deploy/search.toml"),
                     "--frames-endpoint", f"ipc://{tmp_path}/in", "--results",
                     f"ipc://{tmp_path}/out", "--query", f"ipc://{tmp_path}/q", "--no-metrics",
                     stdout=subprocess.PIPE)
    try:
        ep, lines, pump = wait_ready(proc, "daemon", 120)
        yield DaemonProc(proc, ep["input"], ep["output"], None, lines, pump)
    finally:
        proc.terminate()
        proc.wait(30)


def _microscope(tmp_path: Path, daemon: DaemonProc, source: str, cfg: VirtualSpecimenConfig
                ) -> tuple[FramePublisher, ControlServer, ControlClient, object]:
    spec, stage, camera = build(cfg, SimulatedMicroscopeOptions(seed=cfg.seed))
    pub = FramePublisher(daemon.input, mode="push", source=source)
    server = ControlServer(f"ipc://{tmp_path}/ctl-{source}", stage, camera, pub).start()
    return pub, server, ControlClient(server.endpoint, timeout=60.0), spec


def test_a_frame_takes_only_its_own_sources_results(daemon: DaemonProc, tmp_path: Path
                                                    ) -> None:
    small = replace(VirtualSpecimenConfig(), size_um=(30.0, 30.0), agglomerates=0, seed=3)
    # "stage": no target anywhere; "stage2": one wire
    parts = [_microscope(tmp_path, daemon, "stage", replace(small, large_targets=0,
                                                             wire_targets=0)),
             _microscope(tmp_path, daemon, "stage2", replace(small, large_targets=0,
                                                              wire_targets=1))]
    (_, _, ctl_a, _), (_, _, ctl_b, spec_b) = parts
    session = SearchSession(ctl_a, daemon.output, result_timeout_s=60.0)
    try:
        wire = spec_b.targets[0]  # type: ignore[attr-defined]
        # stage2's frame 0 on its wire, then stage's frame 0 on bare specimen
        ctl_b.move(float(wire["x_um"]), float(wire["y_um"]))
        b = ctl_b.acquire(PIXEL_NM, SHAPE, tag="confirm", meta={"rotate45": True})
        assert b.seq == 0 and b.source == "stage2"
        res = session.frame(-8.0, -8.0, PIXEL_NM, SHAPE, "confirm", {"rotate45": True})
        assert res.seq == 0 and res.error is None, res.error
        sources = {m.header.source for m in res.alerts}  # type: ignore[attr-defined]
        assert sources <= {"stage"}, f"frame stage#0 took alerts of {sources}"
        assert res.classification is None or res.classification.source == "stage"
        cfg = SearchConfig(area=session.limits, target_rules=("large", "wire"))  # type: ignore[arg-type]
        assert TargetBook(cfg, session).offer(res) == []  # nothing on stage's bare specimen
    finally:
        session.close()
        for pub, server, ctl, _ in parts:
            ctl.close()
            server.close()
            pub.close()


def test_an_overlap_as_wide_as_the_field_of_view_is_a_configuration_error(
        daemon: DaemonProc, tmp_path: Path) -> None:
    small = replace(VirtualSpecimenConfig(), size_um=(30.0, 30.0), agglomerates=0, seed=3,
                    large_targets=0, wire_targets=0)
    pub, server, ctl, _ = _microscope(tmp_path, daemon, "stage", small)
    try:
        proc = nanoscout("search", "--control", server.endpoint, "--results", daemon.output,
                         "--strategy", "raster", "--area=-10,10,-10,10", "--size", "256",
                         "--overlap", "6", "--target-rule", "large",
                         "--out", str(tmp_path / "found"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and "--overlap 6" in err, err
        assert server.answered == 1  # the status only: no stage move, no frame
    finally:
        ctl.close()
        server.close()
        pub.close()
