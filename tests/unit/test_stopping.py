"""``nanoscout.stopping.StopEvent``: a stop request a signal handler makes without a lock, so a
main loop waiting on it cannot deadlock (the dashboard hung so on SIGINT)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

from nanoscout.stopping import POLL_S, StopEvent


def test_a_request_or_a_set_from_another_thread_ends_the_wait() -> None:
    ev = StopEvent()
    t0 = time.monotonic()
    assert ev.wait(0.12) is False and time.monotonic() - t0 >= 0.12
    ev.request(2)
    assert ev.is_set() and ev.wait(10.0) and ev.signal == 2
    ev.request(15)
    assert ev.signal == 2  # the first request is kept
    ev.clear()
    assert not ev.is_set() and ev.signal is None
    threading.Timer(0.05, ev.set).start()
    t0 = time.monotonic()
    assert ev.wait(10.0) and time.monotonic() - t0 < 0.05 + POLL_S + 1.0


FLOOD = textwrap.dedent("""
    import os, signal, sys, time
    from nanoscout.stopping import StopEvent
    ev = StopEvent()
    signal.signal(signal.SIGUSR1, ev.request)
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # signals as fast as they can be sent
        try:
            while True:
                os.kill(parent, signal.SIGUSR1)
        except ProcessLookupError:
            os._exit(0)
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 3.0:
        if ev.wait(0.00001):
            ev.clear()
            n += 1
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    print(n)
""")


def test_a_main_loop_waiting_on_it_survives_a_flood_of_signals() -> None:
    """With ``threading.Event`` and a handler calling ``set()`` this loop deadlocked within
    seconds here (the handler ran inside ``Event.wait`` and waited for its own lock)."""
    out = subprocess.run([sys.executable, "-c", FLOOD], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) > 10  # the requests arrived and were seen
