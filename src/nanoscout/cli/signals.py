"""How a command stops on SIGINT and SIGTERM.

:func:`stop_signals` (around every command, :func:`nanoscout.cli.main.main`): both signals
raise KeyboardInterrupt, as Ctrl-C does, so the command's cleanup runs. :func:`stop_event`
(around a loop that can watch an event, such as the simulator's): the first signal only sets
the event, so the loop ends between two frames and nothing is interrupted half-way; a second
signal raises KeyboardInterrupt, for a loop blocked where it does not look.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from nanoscout.stopping import StopEvent

__all__ = ["stop_event", "stop_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _restore(before: dict[signal.Signals, Any]) -> None:
    """Put back the handlers of ``before`` (signal -> handler, as ``getsignal`` gave them)."""
    for sig, handler in before.items():
        if handler is not None:  # None: set outside Python, cannot be put back
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stop_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM stop a command as Ctrl-C does.

    Both raise KeyboardInterrupt in the main thread, so the command's cleanup runs (a
    publisher sends what it holds and reports). Two cases need this:
    - a parent that left SIGINT ignored: every child of a background job in a
      non-interactive shell starts so, and ``kill -INT`` would never stop it;
    - SIGTERM, which would end the process without cleanup.

    Commands with handlers of their own (serve, dashboard, record, microscope, simulate:
    :func:`stop_event`) install them over these. The previous handlers come back at the end.
    In a thread other than the main one (which cannot set handlers) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    if before[signal.SIGINT] == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if before[signal.SIGTERM] == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        _restore(before)


@contextmanager
def stop_event() -> Iterator[StopEvent]:
    """While the block runs, SIGINT or SIGTERM sets the event it yields; a second one raises
    KeyboardInterrupt. The previous handlers come back at the end.

    A KeyboardInterrupt raised by the first signal could land anywhere, even in code that
    reports and swallows it (a finaliser): a simulator went on streaming after one. A set
    event is seen where the loop looks for it. Outside the main thread the event is only
    set by the caller.
    """
    event = StopEvent()  # the handler takes no lock (nanoscout.stopping)
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if event.is_set():
            _interrupt(signum, frame)
        event.request(signum)

    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, handler)
    try:
        yield event
    finally:
        _restore(before)
