"""A stop request that a signal handler can make without a deadlock.

A Python signal handler runs in the main thread between two bytecodes, also while that thread
is inside ``threading.Event.wait`` and holds the event's internal lock. A handler that calls
``Event.set`` there waits for that lock forever: the dashboard hung so on SIGINT (seen in CI,
2026-12-06: ``Event.wait`` → ``Condition.__exit__`` → handler → ``Event.set`` →
``Condition.__enter__``). :class:`StopEvent` is an event whose handler side
(:meth:`StopEvent.request`) only assigns an attribute, and whose :meth:`~StopEvent.wait`
sleeps in short steps instead of holding a lock, so a main loop can wait on it while signals
arrive. Other threads may still :meth:`~threading.Event.set` it.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

__all__ = ["POLL_S", "StopEvent"]

#: the longest a :meth:`StopEvent.wait` sleeps between two looks, s
POLL_S = 0.05


class StopEvent(threading.Event):
    """A :class:`threading.Event` that signal handlers may set through :meth:`request`."""

    def __init__(self) -> None:
        super().__init__()
        #: the signal number of the first request, None before any
        self.signal: int | None = None

    def request(self, signum: int, frame: FrameType | None = None) -> None:
        """Signal-handler side: ask to stop (no lock taken; usable as a handler itself)."""
        if self.signal is None:
            self.signal = signum

    def on_signals(self) -> bool:
        """Make SIGINT and SIGTERM :meth:`request` a stop; returns False, installing nothing,
        outside the main thread (where Python cannot install signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request)
        return True

    def is_set(self) -> bool:
        """Whether a stop was requested (by a signal) or set (by any thread)."""
        return self.signal is not None or super().is_set()

    def clear(self) -> None:
        """Forget both the request and the flag."""
        self.signal = None
        super().clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once stopped, False after ``timeout`` s (None: wait for ever), sleeping
        at most :data:`POLL_S` at a time (a signal handler can run meanwhile)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = POLL_S if end is None else end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, POLL_S))
        return True
