"""The one gap tracker (:mod:`nanoscout.wire.sequence`) as the subscriber SDK feeds it
(:func:`~nanoscout.clients.subscriber.track_gap`), on encoded and decoded messages: a daemon
restart is told from the results' ``daemon_run`` (a heartbeat's ``started_ns``), and what the new
run published before the first message seen is counted. A real socket:
tests/system/test_sdk.py."""

from __future__ import annotations

import pytest

from nanoscout.clients.subscriber import track_gap
from nanoscout.wire.protocol import (
    HealthHeader,
    Message,
    StatsHeader,
    decode_message,
    encode_message,
)
from nanoscout.wire.sequence import Gap, SequenceTracker

#: three daemon runs, named by their start (ns since the epoch)
RUN1, RUN2, RUN3 = 1_765_000_000_000_000_000, 1_765_000_060_000_000_000, 1_765_000_120_000_000_000


def _wire(header: object) -> Message:
    """Encode and decode, as a subscriber receives it."""
    return decode_message([bytes(p) for p in encode_message(header)])  # type: ignore[arg-type]


def stats(topic_seq: int, run: int | None, source: str = "sim") -> Message:
    return _wire(StatsHeader(source=source, seq=topic_seq, t_ns=1, units="px", window={},
                             cumulative={}, topic_seq=topic_seq, daemon_run=run))


def health(topic_seq: int, started_ns: int | None) -> Message:
    return _wire(HealthHeader(
        t_ns=1, uptime_s=1.0, policy="live", engines={}, frames_received=0,
        frames_processed=0, frames_dropped={}, rejected={}, transport_gaps=0, queue_depth=0,
        fps=0.0, latency_ms_p50=None, latency_ms_p99=None, topic_seq=topic_seq,
        started_ns=started_ns))


def test_a_new_daemon_runs_results_before_the_first_one_seen_are_missed() -> None:
    """The old run's topic_seq reached 6; the daemon restarted and the subscriber's first
    message of the new run has topic_seq 5 (0-4 were published while it reconnected). The
    falling number was read as a restart with nothing missing; the new run counts from 0."""
    t = SequenceTracker(max_keys=16)
    assert [track_gap(t, stats(k, RUN1)) for k in range(7)] == [None] * 7
    assert track_gap(t, stats(5, RUN2)) == Gap("stats.sim", 5, 5)
    assert t.missed == {"stats.sim": 5} and t.total == 5
    assert track_gap(t, stats(6, RUN2)) is None
    assert track_gap(t, stats(8, RUN2)) == Gap("stats.sim", 8, 1)  # within the run as before
    # a numbering above the old run's newest is the new run's too: 9 missed, not 2
    assert track_gap(t, stats(9, RUN3)) == Gap("stats.sim", 9, 9)
    assert t.total == 15 and t.last_gap == Gap("stats.sim", 9, 9)
    # another restart whose topic_seq 0 arrives: nothing missing
    assert track_gap(t, stats(0, RUN1 + 1)) is None and t.total == 15


def test_a_subscriber_joining_a_running_daemon_misses_nothing() -> None:
    """The first run seen numbers from wherever it is: its earlier messages were sent before
    the subscriber was there."""
    t = SequenceTracker()
    assert track_gap(t, stats(1000, RUN2)) is None
    assert track_gap(t, stats(1000, RUN2, source="other")) is None
    assert t.total == 0 and t.missed == {}


def test_without_daemon_run_a_falling_number_is_still_a_restart_with_nothing_missed() -> None:
    """Results of a daemon before protocol 1.11 do not name their run: as before."""
    t = SequenceTracker()
    for k in (0, 1, 2, 3, 4):
        assert track_gap(t, stats(k, None)) is None
    assert track_gap(t, stats(2, None)) is None and t.total == 0
    assert track_gap(t, stats(5, None)) == Gap("stats.sim", 5, 2)
    # a 1.11 daemon after it: a new run, from 0
    assert track_gap(t, stats(3, RUN1)) == Gap("stats.sim", 3, 3) and t.total == 5


@pytest.mark.parametrize("first_new", [0, 2])
def test_heartbeats_follow_the_daemon_start(first_new: int) -> None:
    """``health`` names its run by ``started_ns`` (the value results carry as daemon_run)."""
    t = SequenceTracker()
    for k in range(4):
        assert track_gap(t, health(k, RUN1)) is None
    gap = track_gap(t, health(first_new, RUN2))
    assert gap == (None if first_new == 0 else Gap("health", first_new, first_new))


def test_restarts_keep_the_memory_bounded_by_the_key_limit() -> None:
    """The sequence state is one entry per topic, whatever the number of runs seen; the least
    recently seen topic is still forgotten beyond ``max_keys``."""
    t = SequenceTracker(max_keys=3)
    for run in range(1, 201):
        for source in ("a", "b", "c"):
            track_gap(t, stats(1, RUN1 + run, source))
    # every run after the first seen missed its topic_seq 0
    assert len(t._last) == 3 and t.total == 3 * 199
    track_gap(t, stats(0, RUN2, "d"))
    assert "stats.a" not in t and "stats.d" in t and len(t._last) == 3


def test_the_duplicate_window_holds_the_last_numbers_in_bounded_memory() -> None:
    """A lossless daemon remembers the last 4096 frame numbers of up to 4 x max_sources keys
    (256 at the default 64) to recognise resent frames: as a deque and a set of Python ints
    that took about 73 MB (long-run audit); as an int64 ring, 8 bytes a number."""
    import tracemalloc

    small = SequenceTracker(window=8)
    for seq in [*range(20), 7]:  # 7 again at the end: the newest eight are 13..19 and 7
        small.observe("a", seq, resumable=True)
    assert [s for s in range(21) if small.seen("a", s)] == [7, 13, 14, 15, 16, 17, 18, 19]
    assert not small.seen("b", 0)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracker = SequenceTracker(max_keys=256, window=4096)
        for key in range(256):
            for seq in range(4096):
                tracker.observe(f"cam{key}", seq, resumable=True)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tracker.seen("cam255", 0) and tracker.seen("cam0", 4095)
    assert used < 16 * 2**20, f"{used / 2**20:.1f} MiB for 256 keys x 4096 numbers"


def test_a_late_number_of_the_same_run_takes_its_loss_back() -> None:
    """``topic_seq`` 1, 3, 2, 4 of one daemon run: 2 was counted missed before 3, then taken
    for a restart, so 3 was counted missed again before 4 (2 missed for none). A number at or
    below the newest of a named run is late: it takes back its loss where one was counted
    (a Gap of -1), changes nothing otherwise, and never moves the newest back."""
    t = SequenceTracker(holes=4)
    got = [track_gap(t, stats(k, RUN1)) for k in (1, 3, 2, 4)]
    assert got == [None, Gap("stats.sim", 3, 1), Gap("stats.sim", 2, -1), None]
    assert t.total == 0 and t.missed == {"stats.sim": 0}
    assert track_gap(t, stats(2, RUN1)) is None and t.total == 0  # again: nothing to take back
    # a range is split around its late numbers: 5..9 missed, 7 and 5 come late
    assert track_gap(t, stats(10, RUN1)) == Gap("stats.sim", 10, 5)
    assert track_gap(t, stats(7, RUN1)) == Gap("stats.sim", 7, -1)
    assert track_gap(t, stats(5, RUN1)) == Gap("stats.sim", 5, -1)
    assert track_gap(t, stats(11, RUN1)) is None and t.total == 3
    assert t.last_gap == Gap("stats.sim", 10, 5)
    # another run still numbers from 0, its late numbers as well
    assert track_gap(t, stats(2, RUN2)) == Gap("stats.sim", 2, 2) and t.total == 5
    assert track_gap(t, stats(0, RUN2)) == Gap("stats.sim", 0, -1) and t.total == 4


def test_late_numbers_are_remembered_for_the_newest_ranges_only() -> None:
    """Memory is bounded by ``holes`` ranges per key: a number of an older range stays
    counted missed; without ``holes`` (the daemon's frames) nothing is taken back."""
    t = SequenceTracker(holes=2)
    for k in range(0, 20, 2):  # 10 ranges of one missed number: 1, 3, ..., 17
        track_gap(t, stats(k, RUN1))
    assert t.total == 9 and len(t._holes["stats.sim"]) == 2
    assert track_gap(t, stats(1, RUN1)) is None and t.total == 9  # forgotten: stays missed
    assert track_gap(t, stats(17, RUN1)) == Gap("stats.sim", 17, -1) and t.total == 8
    plain = SequenceTracker()
    for k in (1, 3, 2, 4):
        plain.observe("a", k, run=RUN1)
    assert plain.total == 1 and not plain._holes  # 2 stays counted; 3 is not counted twice


def test_without_daemon_run_a_late_number_is_still_a_restart() -> None:
    """Results of a daemon before protocol 1.11 name no run: 1, 3, 2, 4 is read as a restart
    after 3 (documented), whether or not ranges are kept."""
    t = SequenceTracker(holes=4)
    assert [track_gap(t, stats(k, None)) for k in (1, 3, 2, 4)] == [
        None, Gap("stats.sim", 3, 1), None, Gap("stats.sim", 4, 1)]
    assert t.total == 2
