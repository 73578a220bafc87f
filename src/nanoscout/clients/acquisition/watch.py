"""Watch a folder for new image files and hand each one over once, when it is complete.

Microscope software writes files incrementally (header first, pixels later, sometimes the
header again at the end), so a file that merely exists is not ready. A file is handed over when
its size and modification time have stayed the same for ``settle_polls`` consecutive polls (and
at least ``settle_s`` seconds), it is not empty and it can be opened for reading. Portable
polling (``os.scandir``/``stat``), no inotify: it works on network shares and on the Windows
PCs that drive microscopes.

What happens to a file after it was handed over (:class:`FolderWatch` says it in full): a file
that changes after it was handed over (its size or its modification time) is handed over again
once it settles: the consumer could not read it (:meth:`FolderWatch.retry_when_changed`), or it
is a new acquisition written under the same name (the same size when the image has the same
shape and type), or the rest of a file written in place or a stack that grew. The consumer
tells these apart by content (``replay_watch`` sends only the images it has not sent). A
listing that fails (a network share dropping out for a moment) changes nothing the watcher
remembers: it is logged once, and once more when listing works again.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanoscout.wire.errors import ConfigError

__all__ = ["TEMPORARY_PATTERNS", "FolderWatch", "watch_folder"]

_log = logging.getLogger(__name__)

TEMPORARY_PATTERNS: tuple[str, ...] = (
    ".*",  # dotfiles: editors' and sync tools' scratch files
    "~*",  # Office/GMS lock and backup files
    "*~",
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.swp",
    "*.lock",
)
"""File-name patterns that are never handed over: names writers use before the final rename."""

_Signature = tuple[int, int]  # (size in bytes, mtime in ns)
_monotonic = time.monotonic  # the settle clock, s; a name of its own so tests can drive it


def watch_folder(
    folder: Path,
    *,
    patterns: Sequence[str] = ("*",),
    poll_s: float = 0.25,
    settle_polls: int = 2,
    settle_s: float = 0.0,
    existing: bool = False,
    stop: threading.Event | None = None,
) -> FolderWatch:
    """Return a :class:`FolderWatch`: an iterator over each new, complete file in ``folder``.

    ``patterns`` are shell patterns matched case-insensitively against the file name (microscope
    PCs write ``.DM4`` as often as ``.dm4``); names matching :data:`TEMPORARY_PATTERNS` are
    never yielded. A file is yielded after its (size, mtime) has been seen unchanged on
    ``settle_polls`` consecutive polls after it was first seen and for at least ``settle_s``
    seconds (monotonic clock, from the poll that first saw that size and mtime; 0 leaves only
    the polls), it is not empty, and it opens for reading: raise ``settle_s`` for a writer that
    pauses longer than ``settle_polls * poll_s`` between chunks. Files present when iteration
    starts are ignored, even when they change later, unless ``existing`` is True. A path is
    yielded again each time it changes and settles again (:class:`FolderWatch`); if the file
    is deleted and a file of that name appears again, the new one is yielded again.

    Between polls the iterator blocks in ``stop.wait(poll_s)`` (``poll_s`` in seconds), so
    setting ``stop`` ends the iteration within one poll; without ``stop`` it runs forever.
    Raises ConfigError when ``folder`` is not a directory or an option is out of range.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"watch folder {str(folder)!r} is not a directory")
    if not poll_s > 0:
        raise ConfigError(f"poll_s must be > 0 s, got {poll_s!r}")
    if settle_polls < 1:
        raise ConfigError(f"settle_polls must be >= 1, got {settle_polls!r}")
    if not settle_s >= 0:  # also refuses NaN
        raise ConfigError(f"settle_s must be >= 0 s, got {settle_s!r}")
    if not patterns:
        raise ConfigError("patterns must name at least one pattern, got none")
    wanted = tuple(p.lower() for p in patterns)
    # options are checked here, at the call; the generator below only starts on first next()
    return FolderWatch(
        folder, wanted, poll_s, settle_polls, settle_s, existing,
        stop if stop is not None else threading.Event(),
    )


@dataclass
class _Pending:
    signature: _Signature
    unchanged: int  # consecutive polls that saw ``signature``
    since_s: float  # monotonic time of the first poll that saw ``signature``, s


class FolderWatch(Iterator[Path]):
    """The iterator :func:`watch_folder` returns, and what it does once a file was handed over.

    - The consumer could not read a yielded file (truncated: a writer that paused longer than
      the settle time): it calls :meth:`retry_when_changed`, and the file is yielded again once
      its size or mtime changes and it settles again. Until then it is not yielded again.
    - A yielded file that changes size (a new acquisition under the same name, a stack that
      grew by a frame) is logged as a warning and yielded again once it settles.
    - A yielded file whose mtime changes but not its size is logged and yielded again once it
      settles: microscope software that saves each new image under one name writes the same
      number of bytes each time, and a writer that preallocates a file fills it in place. It
      may also be a touch (a backup or virus scanner, a header rewritten in place): the
      consumer compares content (before, such a change was never yielded: a second image
      saved under the same name was never sent, nor the rest of a file filled in place).
    - A failed listing of the folder leaves everything the watcher remembers (what was yielded,
      what was present at the start, what is settling) unchanged, so that the files are not new
      when the folder comes back; the first failure is logged as a warning and the recovery
      once, and polling goes on at ``poll_s``.
    """

    def __init__(self, folder: Path, wanted: tuple[str, ...], poll_s: float, settle_polls: int,
                 settle_s: float, existing: bool, stop: threading.Event) -> None:
        self.folder = folder
        self._wanted, self._poll_s, self._stop = wanted, poll_s, stop
        self._settle_polls, self._settle_s, self._existing = settle_polls, settle_s, existing
        # yielded path -> its signature when yielded (last logged, for an mtime-only change);
        # None for a file present at the start that is never yielded
        self._done: dict[Path, _Signature | None] = {}
        self._retry: set[Path] = set()  # yielded, unreadable: yield again when it changes
        self._pending: dict[Path, _Pending] = {}
        self._it = self._watch()

    def __iter__(self) -> FolderWatch:
        return self

    def __next__(self) -> Path:
        return next(self._it)

    def retry_when_changed(self, path: Path) -> None:
        """Yield ``path`` (already yielded) again once its size or mtime changes and it settles
        again: the consumer could not read it, most likely because it was not complete yet."""
        if path in self._done:
            self._retry.add(path)

    def _watch(self) -> Iterator[Path]:
        first = True
        failing_since: float | None = None  # monotonic s of the first failed listing in a row
        while not self._stop.is_set():
            try:
                seen = _scan(self.folder, self._wanted)
            except OSError as exc:
                # a network share can drop out for a moment: remember everything and keep
                # polling; once per outage, not once per poll
                if failing_since is None:
                    failing_since = _monotonic()
                    _log.warning("cannot list watch folder %s: %s; polling on every %g s",
                                 self.folder, exc, self._poll_s)
                if self._stop.wait(self._poll_s):
                    return
                continue
            if failing_since is not None:
                _log.info("watch folder %s can be listed again after %.1f s",
                          self.folder, _monotonic() - failing_since)
                failing_since = None
            if first and not self._existing:
                self._done.update(dict.fromkeys(seen))
            first = False
            yield from self._poll(seen)
            if self._stop.is_set() or self._stop.wait(self._poll_s):
                return

    def _poll(self, seen: dict[Path, _Signature]) -> Iterator[Path]:
        # forget vanished files so that a new file under the same name counts as new
        for gone in [p for p in self._done if p not in seen]:
            del self._done[gone]
            self._retry.discard(gone)
        for gone in [p for p in self._pending if p not in seen]:
            del self._pending[gone]

        now = _monotonic()
        ready: list[tuple[int, str, Path]] = []
        for path, signature in seen.items():
            if path in self._done and not self._changed_since_yielded(path, signature):
                continue
            previous = self._pending.get(path)
            if previous is not None and previous.signature == signature:
                previous.unchanged += 1
            else:
                previous = self._pending[path] = _Pending(signature, 0, now)
            if (previous.unchanged >= self._settle_polls
                    and now - previous.since_s >= self._settle_s
                    and signature[0] > 0 and _openable(path)):
                ready.append((signature[1], path.name, path))
        for _, _, path in sorted(ready):  # oldest first, as they were written
            self._done[path] = self._pending.pop(path).signature
            self._retry.discard(path)
            yield path
            if self._stop.is_set():
                return

    def _changed_since_yielded(self, path: Path, signature: _Signature) -> bool:
        """True when the done file ``path`` is to settle and be yielded again (see the class)."""
        before = self._done[path]
        if before is None or before == signature:  # present at the start, or unchanged
            return False
        if path in self._retry:
            _log.info("%s changed after it could not be read; trying again once it settles", path)
        elif before[0] != signature[0]:
            _log.warning("%s changed size after it was handed over (%d -> %d bytes): handing it "
                         "over again once it settles",
                         path, before[0], signature[0])
        else:
            _log.info("%s was modified after it was handed over, same size (%d bytes): handing "
                      "it over again once it settles", path, signature[0])
        del self._done[path]
        self._retry.discard(path)
        return True


def _scan(folder: Path, wanted: tuple[str, ...]) -> dict[Path, _Signature]:
    """Return ``{path: (size, mtime_ns)}`` of the regular files in ``folder`` that match.

    Raises OSError when the folder cannot be listed (an empty dict means an empty folder)."""
    found: dict[Path, _Signature] = {}
    with os.scandir(folder) as it:
        entries = list(it)
    for entry in entries:
        name = entry.name.lower()
        if any(fnmatch.fnmatchcase(name, t) for t in TEMPORARY_PATTERNS):
            continue
        if not any(fnmatch.fnmatchcase(name, w) for w in wanted):
            continue
        try:
            if not entry.is_file():
                continue
            st = entry.stat()
        except OSError:  # deleted between listing and stat
            continue
        found[Path(entry.path)] = (st.st_size, st.st_mtime_ns)
    return found


def _openable(path: Path) -> bool:
    """True when the file can be opened and read (Windows writers often hold an exclusive lock)."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError:
        return False
    return True
