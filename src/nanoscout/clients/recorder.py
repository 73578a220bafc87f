"""``nanoscout record``: write every particle, frame and alert the daemon publishes to disk.

Subscribes to ``det.`` and ``alert.`` (one source prefix or all), queues rows and flushes them
as one crash-safe batch (:mod:`nanoscout.clients.runfile`) every ``batch_frames`` frames or
``batch_seconds`` s, whichever comes first, and on stop (SIGINT / SIGTERM, ``frames`` or
``duration`` reached). After ``kill -9`` the run is readable and lacks at most the rows queued
since the last flush. Results the subscriber missed (sequence gaps, e.g. when the recorder
could not keep up) are counted in the provenance, never silently.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nanoscout.clients.runfile import RunWriter
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import AlertHeader, DetHeader
from nanoscout.wire.transport import ClientKeys

__all__ = ["record"]

log = logging.getLogger("nanoscout.record")


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def record(endpoint: str, out: Path, *, source: str = "", frames: int | None = None,
           duration: float | None = None, batch_frames: int = 20, batch_seconds: float = 2.0,
           curve: ClientKeys | None = None, stop: threading.Event | None = None,
           ready_timeout: float = 30.0) -> dict[str, Any]:
    """Record results from the daemon at ``endpoint`` into ``out``; returns the provenance.

    ``source``: record only sources starting with this ('' = all). ``frames``: stop after this
    many ``det`` messages; ``duration``: after this many seconds; ``stop``: an event that ends
    the recording (signals set it when called from the main thread).
    """
    if batch_frames < 1 or batch_seconds <= 0:
        raise ValueError("batch_frames must be >= 1 and batch_seconds > 0")
    stop = stop or threading.Event()
    prov: dict[str, Any] = {
        "format": "nanoscout-run/1", "endpoint": endpoint, "source_prefix": source,
        "command": " ".join(sys.argv), "started_utc": _now(),
        "batch_frames": batch_frames, "batch_seconds": batch_seconds}
    writer = RunWriter(out, prov)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    n_det = 0
    models: set[str] = set()
    engines: set[str] = set()
    t_start = time.monotonic()
    last_flush = t_start
    with Subscriber(endpoint, topics=(f"det.{source}", f"alert.{source}"), curve=curve) as sub:
        sub.wait_ready(ready_timeout)
        prov["daemon_policy"] = sub.last_health.policy if sub.last_health else None
        prov["subscribed_utc"] = _now()  # from here on nothing the daemon publishes is missed
        writer.write_provenance(prov)
        while not stop.is_set():
            if frames is not None and n_det >= frames:
                break
            if duration is not None and time.monotonic() - t_start >= duration:
                break
            msg = sub.recv(timeout=0.2)
            if msg is not None and msg.kind == "det" and msg.array is not None:
                header = msg.header
                assert isinstance(header, DetHeader)
                writer.add_det(header, msg.array)
                models.add(header.model)
                engines.add(header.engine)
                n_det += 1
            elif msg is not None and msg.kind == "alert":
                assert isinstance(msg.header, AlertHeader)
                writer.add_alert(msg.header)
            if writer.pending_frames >= batch_frames or (
                    writer.pending and time.monotonic() - last_flush >= batch_seconds):
                writer.flush()
                last_flush = time.monotonic()
        writer.flush()
        prov.update({"stopped_utc": _now(), "rows": dict(writer.counts),
                     "missed_results": dict(sub.missed), "rejected_messages": sub.rejected,
                     "models": sorted(models), "engines": sorted(engines)})
        writer.write_provenance(prov)
    log.info("recorded %d frames, %d particles, %d alerts to %s (missed %s)",
             writer.counts["frames"], writer.counts["particles"], writer.counts["alerts"], out,
             prov["missed_results"] or "none")
    return prov
