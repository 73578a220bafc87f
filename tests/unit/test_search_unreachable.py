"""A stage that refuses some places (a soft limit) is not a broken microscope.

The fake session of :mod:`tests.unit.test_search_strategies` moves a real stage first, through
a real :class:`~nanoscout.clients.microscope.control.ControlServer` and
:class:`~nanoscout.clients.microscope.control.ControlClient` over ``ipc://``: a stage with a
soft limit refuses the move (:class:`StageError`, as the ``Stage`` interface says) and the
search sees what a real microscope would answer.

Before: the first refused move ended the whole search with "error" (a soft limit at x = 2 µm
on a -6..6 µm area: 5 frames, 14 % coverage). Now the tile is skipped and the search ends
"incomplete" with it listed; a stage that refuses every move, or a driver that fails, still
stops the search with "error".
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import pytest
import zmq

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import ControlClient, ControlError, ControlServer
from nanoscout.clients.microscope.interfaces import Camera, StageError, StageLimits
from nanoscout.clients.search.geometry import tile_centres
from nanoscout.clients.search.session import FrameResult
from nanoscout.clients.search.strategies import adaptive_search, raster_search
from tests.unit.test_search_strategies import (
    DECOYS,
    HIGH_NM,
    SHAPE,
    TARGETS,
    FakeSession,
    _run_command,
    as_session,
    make_cfg,
)


class SoftLimitStage:
    """A stage whose controller refuses x beyond ``soft_x_um`` (a soft limit inside its
    stated limits), or every move when ``broken`` (a driver that fails)."""

    def __init__(self, soft_x_um: float, broken: str = "") -> None:
        self.limits = StageLimits(-50.0, 90.0, -50.0, 90.0)
        self.soft_x_um, self.broken = soft_x_um, broken
        self._xy = (0.0, 0.0)
        self.moves = 0

    def position(self) -> tuple[float, float]:
        return self._xy

    def move_to(self, x_um: float, y_um: float) -> float:
        if self.broken == "driver":
            raise RuntimeError("stage controller does not answer")
        if self.broken == "all" or x_um > self.soft_x_um:
            raise StageError(f"x = {x_um:.5g} µm is beyond the soft limit {self.soft_x_um:g} µm")
        self.moves += 1
        self._xy = (x_um, y_um)
        return 0.1


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    try:
        yield c
    finally:
        c.term()


@dataclass
class Stage:
    """A real control server in front of ``stage`` and a client for it."""

    stage: SoftLimitStage
    server: ControlServer
    client: ControlClient
    publisher: FramePublisher

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.publisher.close()


def _stage(ctx: zmq.Context, tmp_path: Path, stage: SoftLimitStage) -> Stage:
    publisher = FramePublisher(f"inproc://frames-{uuid.uuid4().hex}", ctx=ctx, source="sim")
    server = ControlServer(f"ipc://{tmp_path}/ctl-{uuid.uuid4().hex[:8]}", stage,
                           cast(Camera, None), publisher, ctx=ctx).start()
    return Stage(stage, server, ControlClient(server.endpoint, timeout=10.0, ctx=ctx), publisher)


@dataclass
class Moves(FakeSession):
    """The fake session whose every frame first moves a real stage through its server."""

    client: ControlClient | None = None

    def frame(self, x_um: float, y_um: float, *a: Any, **kw: Any) -> FrameResult:
        assert self.client is not None
        self.client.move(x_um, y_um)  # raises what a real microscope answers
        return super().frame(x_um, y_um, *a, **kw)


def test_a_soft_limit_skips_the_tiles_beyond_it(ctx: zmq.Context, tmp_path: Path) -> None:
    rig = _stage(ctx, tmp_path, SoftLimitStage(21.0))
    try:
        fake = Moves(list(TARGETS), client=rig.client)
        res = raster_search(as_session(fake), make_cfg())
    finally:
        rig.close()
    cfg = make_cfg()
    tiles = tile_centres(cfg.area, (SHAPE[1] * HIGH_NM / 1e3, SHAPE[0] * HIGH_NM / 1e3),
                         cfg.overlap_um)
    beyond = [(x, y) for x, y in tiles if x > 21.0]
    assert beyond and len(beyond) < len(tiles)
    assert res.error is None and res.stopped == "incomplete", res.summary()
    # every reachable tile was imaged, each once; every tile beyond was asked for once
    assert sorted((s.x, s.y) for s in fake.shots) == sorted(set(tiles) - set(beyond))
    assert rig.stage.moves == len(fake.shots) and rig.server.refused == len(beyond)
    assert res.missed_tiles == beyond and res.unreachable == beyond
    assert 0.5 < res.coverage < 0.75
    found = [(t.x_um, t.y_um) for t in res.targets]
    # the targets a frame at x <= 20 µm (the last tile in reach) sees whole
    assert sorted((round(x, 1), round(y, 1)) for x, y in found) == sorted(
        t for t in TARGETS if t[0] <= 20.0 + 3.2 - 1.5)
    cov = res.summary()["coverage"]
    assert cov["unreachable_tiles"] == [[round(x, 3), round(y, 3)]  # type: ignore[index]
                                        for x, y in beyond]


def test_a_candidate_beyond_a_soft_limit_is_left_unchecked(ctx: zmq.Context,
                                                           tmp_path: Path) -> None:
    """Survey tiles are at x = 12.8 and 27.2 µm: all reachable; the target at x = 33.2 µm and
    the decoy at 30.1 µm are not: each is asked for once and left unchecked."""
    rig = _stage(ctx, tmp_path, SoftLimitStage(29.0))
    try:
        fake = Moves(list(TARGETS), DECOYS, client=rig.client)
        res = adaptive_search(as_session(fake), make_cfg())
    finally:
        rig.close()
    assert res.error is None and res.stopped == "incomplete", res.summary()
    assert res.coverage == 1.0 and res.missed_tiles == []
    out = sorted((round(c.x_um, 1), round(c.y_um, 1)) for c in res.unchecked)
    assert out == [(30.1, 31.7), (33.2, 12.9)]
    assert rig.server.refused == 2 and all(s.x <= 29.0 for s in fake.shots)
    found = sorted((round(t.x_um, 1), round(t.y_um, 1)) for t in res.targets)
    assert found == sorted(t for t in TARGETS if t[0] <= 29.0)


@pytest.mark.parametrize(("broken", "refused", "error"), [
    ("all", 16, "the stage refused 16 moves in a row"),
    ("driver", 1, "move failed: RuntimeError('stage controller does not answer')")])
def test_a_broken_stage_still_stops_the_search(ctx: zmq.Context, tmp_path: Path, broken: str,
                                              refused: int, error: str) -> None:
    rig = _stage(ctx, tmp_path, SoftLimitStage(21.0, broken=broken))
    try:
        fake = Moves(list(TARGETS), client=rig.client)
        res = raster_search(as_session(fake), make_cfg())
    finally:
        rig.close()
    assert res.stopped == "error" and res.frames == 0, res.summary()
    assert res.error is not None and error in res.error
    assert rig.server.refused == refused


def test_a_refusal_in_a_row_is_reset_by_a_move(ctx: zmq.Context, tmp_path: Path) -> None:
    """A soft limit at x = 21 µm cuts off the last 5 tiles of a row and the first 5 of the
    next (the serpentine's turn): 10 refusals in a row, with a move between each such run;
    ``max_refused_in_a_row`` 11 does not stop the search, 10 does."""
    for limit, stopped in ((11, "incomplete"), (10, "error")):
        rig = _stage(ctx, tmp_path, SoftLimitStage(21.0))
        try:
            fake = Moves(list(TARGETS), client=rig.client)
            res = raster_search(as_session(fake), replace(make_cfg(),
                                                          max_refused_in_a_row=limit))
        finally:
            rig.close()
        assert res.stopped == stopped, (limit, res.summary())


def test_the_command_lists_the_tiles_the_stage_refused(
        ctx: zmq.Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    rig = _stage(ctx, tmp_path, SoftLimitStage(21.0))
    try:
        code, out = _run_command(tmp_path, Moves(list(TARGETS), client=rig.client),
                                 monkeypatch)
    finally:
        rig.close()
    assert code == 3  # incomplete (it was 0)
    meta = json.loads((out / "search.json").read_text())["search"]
    assert meta["stopped"] == "incomplete" and meta["error"] is None
    cov = meta["coverage"]
    assert cov["unreachable_tiles"] == cov["missed_tiles"] != []
    assert all(x > 21.0 for x, _ in cov["unreachable_tiles"])
    n = len(cov["missed_tiles"])
    assert f"the stage refused to move to {n} of them" in capsys.readouterr().err


def test_a_refused_move_is_a_control_error(ctx: zmq.Context, tmp_path: Path) -> None:
    """Callers that catch ControlError still catch a refused move."""
    rig = _stage(ctx, tmp_path, SoftLimitStage(21.0))
    try:
        with pytest.raises(ControlError, match=r"refused move: x = 22 µm is beyond the soft"):
            rig.client.move(22.0, 0.0)
        assert rig.client.move(1.0, 0.0).stage == (1.0, 0.0)
    finally:
        rig.close()
