"""The vectorised frame linker (nanoscout.analysis.linking) against trackpy's online Linker,
whose rule it implements: the same tracks on random scenes with motion, crowding, births,
deaths and gaps."""

from __future__ import annotations

import numpy as np
import pytest

from nanoscout.analysis.linking import FrameLinker

trackpy_linking = pytest.importorskip("trackpy.linking.linking")


def _scene(seed: int, frames: int, n: int, side: float, step: float, gap_p: float,
           churn: int) -> list[np.ndarray]:
    """Positions per frame: ``n`` particles random-walking by ``step`` px in a ``side`` px
    field, each missed on a frame with probability ``gap_p``, ``churn`` replaced per frame."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, side, (n, 2))
    out = []
    for _ in range(frames):
        pos += rng.normal(0, step, pos.shape)
        gone = rng.choice(n, churn, replace=False)
        pos[gone] = rng.uniform(0, side, (churn, 2))
        seen = rng.random(n) >= gap_p
        out.append(pos[seen][rng.permutation(int(seen.sum()))].copy())
    return out


def _canonical(ids_per_frame: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Each observation's track, named by the track's first observation (frame, index)."""
    first: dict[int, tuple[int, int]] = {}
    out = []
    for f, ids in enumerate(ids_per_frame):
        out.append([first.setdefault(int(t), (f, i)) for i, t in enumerate(ids)])
    return out


def _trackpy(frames: list[np.ndarray], reach: float, memory: int) -> list[list[int]]:
    lk = trackpy_linking.Linker(reach, memory=memory)
    out = []
    for t, pos in enumerate(frames):
        if t == 0:
            lk.init_level(pos, t)
        else:
            lk.next_level(pos, t)
        out.append(lk.particle_ids)
    return out


def _ours(frames: list[np.ndarray], reach: float, memory: int) -> list[list[int]]:
    lk = FrameLinker(memory)
    return [lk.link(pos, reach).tolist() for pos in frames]


@pytest.mark.parametrize(("seed", "n", "side", "step", "reach", "memory", "gap_p", "churn"), [
    (0, 300, 1000.0, 1.0, 6.0, 0, 0.0, 0),    # a live stream: small steps, nothing ambiguous
    (1, 300, 1000.0, 1.5, 6.0, 2, 0.1, 5),    # gaps closed by the memory, births and deaths
    (2, 400, 300.0, 2.5, 8.0, 1, 0.05, 10),   # crowded: subnetworks of several tracks
    (3, 200, 220.0, 2.5, 7.0, 3, 0.2, 8),     # very crowded, long gaps
])
def test_the_tracks_are_trackpys(seed: int, n: int, side: float, step: float, reach: float,
                                 memory: int, gap_p: float, churn: int) -> None:
    frames = _scene(seed, 12, n, side, step, gap_p, churn)
    ours = _canonical(_ours(frames, reach, memory))
    theirs = _canonical(_trackpy(frames, reach, memory))
    assert ours == theirs
    # the scene exercises what it claims: some links continue tracks, some start new ones
    continued = sum(t[0] < f for f, frame in enumerate(ours) for t in frame)
    assert 0 < continued < sum(len(f) for f in frames)


def test_a_subnetwork_takes_the_least_sum_of_squared_steps_not_the_nearest_pair() -> None:
    lk = FrameLinker()
    a = lk.link(np.array([[0.0, 0.0], [2.0, 0.0]]), 3.0)
    b = lk.link(np.array([[1.2, 0.0], [4.1, 0.0]]), 3.0)
    # the nearest pair first (2 -> 1.2: 0.64) would leave 0 with nothing in reach (null: 9);
    # linking 0 -> 1.2 (1.44) and 2 -> 4.1 (4.41) costs 5.85
    assert b.tolist() == a.tolist()


def test_a_pile_up_trackpy_refuses_is_linked() -> None:
    """trackpy gives up on a subnetwork of more than 30 tracks (SubnetOversizeException); the
    assignment has no such limit."""
    rng = np.random.default_rng(4)
    first = rng.uniform(0, 40, (60, 2))
    second = first + rng.normal(0, 1.5, first.shape)
    with pytest.raises(Exception, match="sub net contains"):
        _trackpy([first, second], 8.0, 0)
    lk = FrameLinker()
    a = lk.link(first, 8.0)
    b = lk.link(second, 8.0)
    assert len(set(b.tolist())) == 60 and np.mean(a == b) > 0.8


def test_memory_keeps_a_missed_track_for_that_many_frames() -> None:
    for memory in (0, 1, 2):
        kept = []
        for gap in range(memory + 3):  # the second particle is missed on `gap` frames
            lk = FrameLinker(memory)
            first = lk.link(np.array([[10.0, 10.0], [50.0, 50.0]]), 4.0)
            for _ in range(gap):
                lk.link(np.array([[10.0, 10.0]]), 4.0)
            back = lk.link(np.array([[10.0, 10.0], [51.0, 50.0]]), 4.0)
            kept.append(bool(back[1] == first[1]))
        assert kept == [True] * (memory + 1) + [False] * 2, (memory, kept)


def test_empty_frames_and_bad_input() -> None:
    lk = FrameLinker(1)
    assert lk.link(np.zeros((0, 2)), 3.0).shape == (0,)
    assert lk.link(np.array([[1.0, 1.0]]), 3.0).tolist() == [0]
    assert lk.link(np.array([[1.5, 1.0], [9.0, 9.0]]), 3.0).tolist() == [0, 1]
    assert lk.tracks == 2
    with pytest.raises(ValueError, match="search_range"):
        lk.link(np.array([[1.0, 1.0]]), 0.0)
    with pytest.raises(ValueError, match="memory"):
        FrameLinker(-1)
    lk.reset()
    assert lk.link(np.array([[1.0, 1.0]]), 3.0).tolist() == [0]
