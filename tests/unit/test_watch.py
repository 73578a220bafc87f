"""watch_folder: each new file once, only when complete, with a real writer thread.

The watcher and the writer run in lockstep: the watcher blocks in ``stop.wait()`` between polls
(documented behaviour), and the test's stop event meets the writer at a barrier there, so each
poll sees exactly the state the writer left. No fixed sleeps, no timing assumptions.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from nanoscout.clients.acquisition.watch import watch_folder
from nanoscout.wire.errors import ConfigError

TIMEOUT_S = 20.0  # only guards against a hang; nothing waits this long when the code works


class LockstepStop(threading.Event):
    """Stop event whose ``wait`` hands control to a writer thread between two polls."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=TIMEOUT_S)
        self.polls = 0  # completed polls; written by the watcher, read by the writer at a barrier

    def wait(self, timeout: float | None = None) -> bool:
        self.polls += 1
        if not self.is_set():
            self.barrier.wait()  # poll done: the writer may act
            self.barrier.wait()  # the writer is done: next poll
        return self.is_set()


def run_writer(stop: LockstepStop, steps: list[Callable[[], None]]) -> list[BaseException]:
    """Start a thread that runs ``steps[i]`` between poll i+1 and poll i+2, then sets stop."""
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for step in steps:
                stop.barrier.wait()
                step()
                stop.barrier.wait()
            stop.barrier.wait()
            stop.set()
            stop.barrier.wait()
        except BaseException as exc:  # reaches the test through `errors`
            errors.append(exc)
            stop.barrier.abort()

    threading.Thread(target=writer, name="test-writer", daemon=True).start()
    return errors


def test_file_written_in_chunks_is_yielded_once_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "frame_0001.dm4"
    chunks = [b"H" * 100, b"D" * 5000, b"T" * 37]
    state = {"complete": False}

    def append(chunk: bytes, complete: bool = False) -> Callable[[], None]:
        def step() -> None:
            with open(target, "ab") as fh:
                fh.write(chunk)
            state["complete"] = complete

        return step

    def touch_same_size() -> None:
        # a writer that rewrites in place: same size, new mtime, must restart the settling
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def temporaries() -> None:
        for name in ("frame_0002.dm4.tmp", "frame_0003.part", "~lock.dm4", ".hidden.dm4"):
            (tmp_path / name).write_bytes(b"x" * 10)

    def idle() -> None:
        pass

    steps = [
        append(chunks[0]),  # after poll 1 (empty folder)
        temporaries,  # after poll 2 (first sight of the header: unchanged 0 times)
        append(chunks[1]),  # after poll 3 (unchanged once: not settled)
        idle,  # after poll 4 (size changed: 0)
        touch_same_size,  # after poll 5 (unchanged once)
        append(chunks[2], complete=True),  # after poll 6 (mtime changed: 0)
        *[idle] * 6,  # poll 7 sees the final size; polls 8 and 9 unchanged: yielded at poll 9
    ]
    stop = LockstepStop()
    errors = run_writer(stop, steps)

    yielded = []
    for path in watch_folder(tmp_path, patterns=("*.dm4",), poll_s=0.01, settle_polls=2, stop=stop):
        # observed while the writer is parked at the barrier: the state at this poll
        yielded.append((path, stop.polls + 1, state["complete"], path.stat().st_size))

    assert errors == []
    assert yielded == [(target, 9, True, sum(len(c) for c in chunks))]


def test_existing_files_are_ignored_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "old.tif").write_bytes(b"old")
    new = tmp_path / "new.TIF"  # patterns match case-insensitively

    def write_new() -> None:
        new.write_bytes(b"new image")

    for existing, expected in ((False, [new]), (True, [tmp_path / "old.tif", new])):
        if new.exists():
            new.unlink()
        stop = LockstepStop()
        errors = run_writer(stop, [write_new, *[lambda: None] * 4])
        got = list(
            watch_folder(
                tmp_path, patterns=("*.tif",), poll_s=0.01, settle_polls=1, existing=existing, stop=stop
            )
        )
        assert errors == []
        assert sorted(got) == sorted(expected)


def test_empty_and_unmatched_files_are_not_yielded(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mrc"

    def create() -> None:
        empty.touch()
        (tmp_path / "notes.txt").write_text("not wanted")

    def fill() -> None:
        empty.write_bytes(b"M" * 64)

    stop = LockstepStop()
    errors = run_writer(stop, [create, *[lambda: None] * 4, fill, *[lambda: None] * 3])
    got = [
        (p, stop.polls + 1)
        for p in watch_folder(tmp_path, patterns=("*.mrc",), poll_s=0.01, settle_polls=1, stop=stop)
    ]
    assert errors == []
    # fill() runs after poll 6; poll 7 sees the new size, poll 8 sees it unchanged
    assert got == [(empty, 8)]


def test_deleted_and_recreated_file_is_new_again(tmp_path: Path) -> None:
    target = tmp_path / "live.ser"

    def create() -> None:
        target.write_bytes(b"first")

    def delete() -> None:
        target.unlink()

    def recreate() -> None:
        target.write_bytes(b"second!")

    idle = [lambda: None] * 3
    stop = LockstepStop()
    errors = run_writer(stop, [create, *idle, delete, recreate, *idle])
    sizes = [p.stat().st_size for p in watch_folder(tmp_path, poll_s=0.01, settle_polls=1, stop=stop)]
    assert errors == []
    assert sizes == [5, 7]


def test_stop_already_set_yields_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.dm3").write_bytes(b"abc")
    stop = threading.Event()
    stop.set()
    assert list(watch_folder(tmp_path, existing=True, stop=stop)) == []


@pytest.mark.parametrize("kwargs", [{"poll_s": 0.0}, {"settle_polls": 0}, {"patterns": ()},
                                    {"settle_s": -1.0}, {"settle_s": float("nan")}])
def test_bad_options_raise_config_error(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        watch_folder(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_missing_folder_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent"):
        watch_folder(tmp_path / "absent")


def test_a_folder_that_drops_out_for_a_moment_sends_nothing_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failed listing read as an empty folder: the watcher forgot what it had sent and what was
    there at the start, and handed over every file of the folder when it came back."""
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / "old.tif").write_bytes(b"present at start")
    new = folder / "new.tif"

    def write_new() -> None:
        new.write_bytes(b"new image")

    def away() -> None:
        folder.rename(tmp_path / "away")

    def back() -> None:
        (tmp_path / "away").rename(folder)

    idle = [lambda: None] * 3
    stop = LockstepStop()
    errors = run_writer(stop, [write_new, *idle, away, *idle, back, *idle])
    with caplog.at_level("INFO", logger="nanoscout.clients.acquisition.watch"):
        got = list(watch_folder(folder, patterns=("*.tif",), poll_s=0.01, settle_polls=1, stop=stop))
    assert errors == []
    assert got == [new]
    # four failed polls: one warning when listing fails, one line when it works again
    failing = [r for r in caplog.records if "cannot list" in r.getMessage()]
    assert len(failing) == 1 and failing[0].levelname == "WARNING"
    assert len([r for r in caplog.records if "listed again" in r.getMessage()]) == 1


def test_a_file_that_could_not_be_read_is_tried_again_when_it_changes(tmp_path: Path) -> None:
    """A writer that paused longer than the settle time: the truncated file was handed over,
    could not be read, and was never looked at again."""
    target = tmp_path / "slow.tif"

    def append(chunk: bytes) -> Callable[[], None]:
        def step() -> None:
            with open(target, "ab") as fh:
                fh.write(chunk)

        return step

    def touch_same_size() -> None:  # a preallocated file filled in: only the mtime changes
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    idle = [lambda: None] * 3
    stop = LockstepStop()
    errors = run_writer(stop, [append(b"H" * 10), *idle, append(b"D" * 20), *idle,
                               touch_same_size, *idle])
    watch = watch_folder(tmp_path, poll_s=0.01, settle_polls=1, stop=stop)
    sizes = []
    for path in watch:
        sizes.append(path.stat().st_size)
        watch.retry_when_changed(path)  # the consumer could not read it
    assert errors == []
    assert sizes == [10, 30, 30]


def test_a_file_sent_is_handed_over_again_when_its_size_or_only_its_time_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A change of time alone is handed over too (a second image saved under the same name
    has the same size; the consumer tells a touch by content: replay_watch sends nothing)."""
    target = tmp_path / "frame.dm4"

    def write(data: bytes) -> Callable[[], None]:
        def step() -> None:
            target.write_bytes(data)

        return step

    def touch() -> None:
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    idle = [lambda: None] * 3
    stop = LockstepStop()
    errors = run_writer(stop, [write(b"first"), *idle, touch, *idle, write(b"second acquisition"),
                               *idle])
    with caplog.at_level("INFO", logger="nanoscout.clients.acquisition.watch"):
        sizes = [p.stat().st_size for p in watch_folder(tmp_path, poll_s=0.01, settle_polls=1,
                                                        stop=stop)]
    assert errors == []
    assert sizes == [5, 5, 18]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("same size (5 bytes): handing it over again" in m for m in messages) == 1
    assert sum("changed size after it was handed over (5 -> 18 bytes)" in m for m in messages) == 1


def test_settle_s_waits_for_seconds_as_well_as_polls(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoscout.clients.acquisition import watch

    clock = {"s": 100.0}
    monkeypatch.setattr(watch, "_monotonic", lambda: clock["s"])
    target = tmp_path / "a.mrc"

    def create() -> None:
        target.write_bytes(b"M" * 64)

    def tick() -> None:
        clock["s"] += 0.5

    stop = LockstepStop()
    errors = run_writer(stop, [create, *[tick] * 8])
    got = [(p, stop.polls + 1, clock["s"]) for p in
           watch_folder(tmp_path, poll_s=0.01, settle_polls=1, settle_s=1.5, stop=stop)]
    assert errors == []
    # seen first at poll 2 (t = 100 s); unchanged for 1.5 s at poll 5
    assert got == [(target, 5, 101.5)]


def test_files_present_at_start_stay_ignored_when_they_change(tmp_path: Path) -> None:
    old = tmp_path / "old.tif"
    old.write_bytes(b"old")

    def grow() -> None:
        old.write_bytes(b"old, rewritten")

    stop = LockstepStop()
    errors = run_writer(stop, [grow, *[lambda: None] * 3])
    assert list(watch_folder(tmp_path, settle_polls=1, poll_s=0.01, stop=stop)) == []
    assert errors == []
