"""Watch a folder for new image files and hand each one over once, when it is complete.

Microscope software writes files incrementally (header first, pixels later, sometimes the
header again at the end), so a file that merely exists is not ready. A file is handed over when
its size and modification time have stayed the same for ``settle_polls`` consecutive polls,
it is not empty and it can be opened for reading. Portable polling (``os.scandir``/``stat``),
no inotify: it works on network shares and on the Windows PCs that drive microscopes.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from nanoscout.wire.errors import ConfigError

__all__ = ["TEMPORARY_PATTERNS", "watch_folder"]

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


def watch_folder(
    folder: Path,
    *,
    patterns: Sequence[str] = ("*",),
    poll_s: float = 0.25,
    settle_polls: int = 2,
    existing: bool = False,
    stop: threading.Event | None = None,
) -> Iterator[Path]:
    """Yield the path of each new, complete file in ``folder`` (not recursive), once.

    ``patterns`` are shell patterns matched case-insensitively against the file name (microscope
    PCs write ``.DM4`` as often as ``.dm4``); names matching :data:`TEMPORARY_PATTERNS` are
    never yielded. A file is yielded after its (size, mtime) has been seen unchanged on
    ``settle_polls`` consecutive polls after it was first seen, it is not empty, and it opens
    for reading. Files present when iteration starts are ignored unless ``existing`` is True.
    A path is yielded once; if the file is deleted and a file of that name appears again, the
    new one is yielded again.

    Between polls the generator blocks in ``stop.wait(poll_s)`` (``poll_s`` in seconds), so
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
    if not patterns:
        raise ConfigError("patterns must name at least one pattern, got none")
    wanted = tuple(p.lower() for p in patterns)
    # options are checked here, at the call; the generator below only starts on first next()
    return _watch(
        folder, wanted, poll_s, settle_polls, existing, stop if stop is not None else threading.Event()
    )


def _watch(
    folder: Path,
    wanted: tuple[str, ...],
    poll_s: float,
    settle_polls: int,
    existing: bool,
    stop: threading.Event,
) -> Iterator[Path]:
    done: set[Path] = set()  # yielded, or present at start when existing is False
    pending: dict[Path, tuple[_Signature, int]] = {}  # path -> (last signature, unchanged polls)
    first = True
    while not stop.is_set():
        seen = _scan(folder, wanted)
        if first and not existing:
            done.update(seen)
        first = False

        # forget vanished files so that a new file under the same name counts as new
        done.intersection_update(seen)
        for gone in set(pending) - set(seen):
            del pending[gone]

        ready: list[tuple[int, str, Path]] = []
        for path, signature in seen.items():
            if path in done:
                continue
            previous = pending.get(path)
            unchanged = previous[1] + 1 if previous and previous[0] == signature else 0
            pending[path] = (signature, unchanged)
            if unchanged >= settle_polls and signature[0] > 0 and _openable(path):
                ready.append((signature[1], path.name, path))
        for _, _, path in sorted(ready):  # oldest first, as they were written
            done.add(path)
            del pending[path]
            yield path
            if stop.is_set():
                return
        if stop.wait(poll_s):
            return


def _scan(folder: Path, wanted: tuple[str, ...]) -> dict[Path, _Signature]:
    """Return ``{path: (size, mtime_ns)}`` of the regular files in ``folder`` that match."""
    found: dict[Path, _Signature] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        # a network share can drop out for a moment; keep polling rather than die mid-session
        _log.warning("cannot list watch folder %s: %s", folder, exc)
        return found
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
