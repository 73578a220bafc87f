"""Log lines that cannot flood the log: for events that may come with every frame for hours
(frames lost in transport on a live link that drops them, each frame of an engine outage,
each save refused while the review folder is full, a flood of malformed messages). The events
themselves are counted in full in health and Prometheus; these only bound the log."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["LogEvery", "RateLimitedLog"]


class RateLimitedLog:
    """Warns on the first five occurrences of each reason, then on every 100th, numbering
    them (``reason (#n): message``). One thread (the caller's)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._n: dict[str, int] = {}

    def __call__(self, reason: str, message: str, *, exc_info: bool = False) -> None:
        """Count one occurrence of ``reason``; warn with ``message`` if it is one to log."""
        n = self._n[reason] = self._n.get(reason, 0) + 1
        if n <= 5 or n % 100 == 0:
            self._log.warning("%s (#%d): %s", reason, n, message, exc_info=exc_info)


class LogEvery:
    """At most one log line every ``every_s`` seconds for each kind of event (a fixed set of
    kinds, never a source name), saying how many were not logged since the previous line.
    Any thread."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self._log = logger
        self.every_s = every_s
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._lock = threading.Lock()

    def due(self, kind: str) -> int | None:
        """Whether a ``kind`` line may go out now: the number of ``kind`` events not logged
        since the last such line, or None (one went out in the last ``every_s`` seconds: this
        event is counted for the next line), for callers that word their own line."""
        now = time.monotonic()
        with self._lock:
            last = self._logged_at.get(kind)
            if last is not None and now - last < self.every_s:
                self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
                return None
            self._logged_at[kind] = now
            return self._unlogged.pop(kind, 0)

    def __call__(self, kind: str, level: int, message: str) -> None:
        """Log ``message`` at ``level`` unless a ``kind`` line went out in the last
        ``every_s`` seconds (then count it for the next line)."""
        since = self.due(kind)
        if since is not None:
            self._log.log(level, "%s (%d more such events not logged since the last such "
                          "line; at most one line every %g s)", message, since, self.every_s)
