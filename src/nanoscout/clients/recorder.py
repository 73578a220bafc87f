"""``nanoscout record``: write every particle, frame and alert the daemon publishes to disk.

Subscribes to ``det.``, ``alert.`` and ``stats.`` (one source prefix or all), queues rows and
flushes them as one crash-safe batch (:mod:`nanoscout.clients.runfile`) every ``batch_frames``
frames or ``batch_seconds`` s, whichever comes first, and on stop (SIGINT / SIGTERM, ``frames``
or ``duration`` reached; on a signal or ``stop`` the messages already received are read first,
for at most :data:`STOP_DRAIN_S` s). ``frames`` counts ``det`` messages; after the last one the
recorder reads on until that frame's ``stats`` (the frame's last message: its alerts come before it)
has arrived, at most :data:`FRAME_END_TIMEOUT_S` s, so the run holds every frame's statistics
and a daemon that died cannot hold it up. After ``kill -9`` the run is readable and lacks at
most the rows queued since the last flush. Results the subscriber missed (sequence gaps, e.g.
when the recorder could not keep up) are counted in the provenance, never silently; so are
messages it could not decode or store (``rejected_messages``, by reason in
``rejected_by_reason``; the undecodable ones logged by the subscriber, at most one line per
reason a minute, those it could not store up to :data:`LOGGED_REJECTIONS`, and their number
said in the last line): one such message costs itself, never the recording or its batch; a
message that came twice is recorded once (``duplicate_messages``, :class:`Subscriber`). A
daemon of another major protocol version, all of whose messages are refused, is named as
such (before, its recording ended "missed results: none" and, at the start, "is it running?").
The provenance also names the software, the recorder's options and every model seen in the
results with its card's hash and sizing error (:mod:`nanoscout.clients.provenance`; cards from
``model_cards``).

Every row names the daemon run that made it (``daemon_run``, protocol 1.11: the daemon's start
time in ns): a daemon restarted while the recorder records numbers its tracks and fields from 1
again, and the run keeps the two apart; the provenance lists the runs seen
(``daemon_runs``, the first :data:`MAX_DAEMON_RUNS`), and a restart is logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nanoscout.clients.outputs import write_ellipse_rois
from nanoscout.clients.provenance import model_entries, model_name, software
from nanoscout.clients.runfile import RunWriter
from nanoscout.clients.subscriber import Subscriber
from nanoscout.stopping import StopEvent
from nanoscout.wire.errors import ConfigError, NanoscoutError, ProtocolError
from nanoscout.wire.protocol import AlertHeader, DetHeader, HealthHeader, Message, StatsHeader
from nanoscout.wire.transport import ClientKeys

__all__ = ["record"]

log = logging.getLogger("nanoscout.record")


#: the longest the wait for the daemon's first health message goes without a look at the
#: stop requests, s
_READY_POLL_S = 0.2
#: messages the run cannot store are logged with their reason up to this many times (a broken
#: publisher must not flood the log); all are counted in ``rejected_messages``
LOGGED_REJECTIONS = 20
#: after the last frame ``frames`` asks for, the longest wait for the rest of that frame's
#: messages (its ``stats`` last), s
FRAME_END_TIMEOUT_S = 10.0
#: on a stop (signal, ``stop`` event), the longest the recorder goes on reading the messages its
#: socket had already received, s
STOP_DRAIN_S = 2.0
#: daemon runs the provenance lists (``daemon_runs``) and the log names, at most: a publisher
#: that names ever new runs must not grow them without bound (the rows keep every run)
MAX_DAEMON_RUNS = 100


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _utc(ns: int) -> str:
    """A time in ns since the epoch as ISO 8601 (UTC, ms)."""
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def _wait_ready(sub: Subscriber, timeout: float, stopped: Callable[[], bool]) -> HealthHeader:
    """The daemon's first health message, waited for at most ``timeout`` s in short slices (a
    stop request ends the wait); NanoscoutError naming the endpoint when none came, and the
    messages that came but were refused (a daemon of another major protocol version is
    there: it is not said to be missing)."""
    deadline = time.monotonic() + timeout
    while not stopped():
        try:
            return sub.wait_ready(min(_READY_POLL_S, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() >= deadline:
                refused = sub.refused()
                why = ("(is it running, and is this its result endpoint?)" if refused is None
                       else f"({refused})")
                raise NanoscoutError(
                    f"no health message from the daemon at {sub.endpoint} within {timeout:g} s "
                    f"{why}; nothing recorded") from None
    raise NanoscoutError(f"stopped before the daemon at {sub.endpoint} answered; nothing "
                         "recorded")


def _add(writer: RunWriter, msg: Message[Any], rois: Path | None) -> DetHeader | None:
    """Queue one message's rows in ``writer`` (and its ROI set into ``rois``); returns the
    header of a ``det`` (None for the other kinds). ProtocolError when the run cannot store
    it: then nothing of it is queued."""
    if msg.kind == "det" and msg.array is not None:
        header = msg.header
        assert isinstance(header, DetHeader)
        writer.add_det(header, msg.array)
        if rois is not None:
            name = f"{header.source}-{header.seq:06d}.rois.zip"
            write_ellipse_rois(msg.array, rois / name, units=header.units,
                               pixel_size_nm=header.pixel_size_nm)
        return header
    if msg.kind == "alert":
        assert isinstance(msg.header, AlertHeader)
        writer.add_alert(msg.header)
    elif msg.kind == "stats":
        assert isinstance(msg.header, StatsHeader)
        writer.add_stats(msg.header)
    return None


def _commit(writer: RunWriter, out: Path, provenance: Callable[[], dict[str, Any]],
            close: bool = False) -> dict[str, Any]:
    """Write the queued batch (``close``: and then the tracks table,
    :meth:`RunWriter.close`), then the provenance ``provenance()`` makes after it; returns
    that provenance. A write that fails (a full disk, a folder taken away) becomes one
    NanoscoutError that says what is lost and what the run holds."""
    try:
        if close:
            writer.close()
        else:
            writer.flush()
        prov = provenance()
        writer.write_provenance(prov)
    except OSError as exc:
        raise NanoscoutError(
            f"cannot write the run {out}: {exc.strerror or exc}; the last "
            f"{writer.pending_frames} frames were not recorded, the run holds "
            f"{writer.counts['frames']} frames in whole batches") from exc
    return prov


def _progress(prov: dict[str, Any], writer: RunWriter, sub: Subscriber, unstorable: int,
              models: set[str], engines: set[str], runs: list[int],
              model_cards: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``prov`` with the rows written so far, the results missed and rejected, the models
    and engines seen (with their cards' provenance) and the daemon runs seen (start times, ns
    since the epoch, in the order first seen)."""
    return {**prov, "rows": dict(writer.counts), "missed_results": dict(sub.missed),
            "missed_results_total": sub.missed_total,
            "rejected_messages": sub.rejected + unstorable,
            "rejected_by_reason": {**sub.rejected_by_reason,
                                   **({"unstorable": unstorable} if unstorable else {})},
            "duplicate_messages": sub.duplicates,
            "models": sorted(models), "engines": sorted(engines),
            "model_provenance": model_entries(sorted(models), model_cards or {}),
            "daemon_runs": list(runs)}


def _frame_of(msg: Message[Any]) -> tuple[str, int, int | None] | None:
    """The frame a result message belongs to: (source, seq, daemon_run); None for a message
    of no frame."""
    h = msg.header
    if not isinstance(h, DetHeader | AlertHeader | StatsHeader):
        return None
    return h.source, h.seq, h.daemon_run


def record(endpoint: str, out: Path, *, source: str = "", frames: int | None = None,
           duration: float | None = None, batch_frames: int = 20, batch_seconds: float = 2.0,
           curve: ClientKeys | None = None, stop: threading.Event | None = None,
           ready_timeout: float = 30.0,
           model_cards: Mapping[str, Mapping[str, Any]] | None = None,
           rois: Path | None = None,
           frame_end_timeout: float = FRAME_END_TIMEOUT_S) -> dict[str, Any]:
    """Record results from the daemon at ``endpoint`` into ``out``; returns the provenance.

    ``source``: record only sources starting with this ('' = all). ``frames``: stop after this
    many ``det`` messages and the rest of the last one's frame: its alerts and its ``stats``,
    awaited at most ``frame_end_timeout`` s (a message of another frame ends the wait too: the
    daemon publishes a frame's messages together; the provenance's ``last_frame_stats`` says
    whether the stats came, and a warning names the frame when not). ``duration``: stop after
    this many seconds; ``stop``: an event that ends the recording (signals set it when called
    from the main thread). ``model_cards``: card summaries by ``name:version``
    (:func:`nanoscout.clients.provenance.load_cards`) for the provenance of the models the
    daemon names. ``rois``: a folder for one ImageJ ROI set per frame
    (``SOURCE-SEQ.rois.zip``, the fitted ellipses in frame px; Fiji's ROI Manager).

    The run is created once the daemon answered (its first health message, awaited at most
    ``ready_timeout`` s, or ``duration`` s when shorter): a daemon that is not there raises
    :class:`NanoscoutError` and leaves nothing on disk; bad batch or wait options raise
    ConfigError.
    """
    if batch_frames < 1 or not (math.isfinite(batch_seconds) and batch_seconds > 0):
        raise ConfigError(f"batch_frames ({batch_frames}) must be >= 1 and batch_seconds "
                          f"({batch_seconds}) a number > 0")
    if not (math.isfinite(frame_end_timeout) and frame_end_timeout >= 0):
        raise ConfigError(f"frame_end_timeout ({frame_end_timeout}) must be a number of s >= 0")
    stop = stop or threading.Event()
    prov: dict[str, Any] = {
        "endpoint": endpoint, "source_prefix": source,
        "command": " ".join(sys.argv), "started_utc": _now(),
        "batch_frames": batch_frames, "batch_seconds": batch_seconds,
        "software": software(),
        "config": {"endpoint": endpoint, "source": source, "frames": frames,
                   "duration_s": duration, "batch_frames": batch_frames,
                   "batch_seconds": batch_seconds, "curve": curve is not None}}
    signalled = StopEvent()  # what SIGINT / SIGTERM set, without a lock (nanoscout.stopping)
    signalled.on_signals()
    n_det = 0
    unstorable = 0  # messages decoded but refused by the run writer
    models: set[str] = set()
    engines: set[str] = set()
    runs: list[int] = []  # daemon runs seen, in order (protocol 1.11)
    # after the last frame ``frames`` asks for: that frame, and when to stop waiting for its
    # stats (monotonic s)
    last_frame: tuple[str, int, int | None] | None = None
    last_frame_deadline = 0.0
    t_start = time.monotonic()
    last_flush = t_start
    topics = (f"det.{source}", f"alert.{source}", f"stats.{source}")
    with Subscriber(endpoint, topics=topics, curve=curve) as sub:
        wait = ready_timeout if duration is None else min(ready_timeout, max(0.0, duration))
        health = _wait_ready(sub, wait, lambda: stop.is_set() or signalled.is_set())
        prov["daemon_policy"] = health.policy
        prov["subscribed_utc"] = _now()  # from here on nothing the daemon publishes is missed
        writer = RunWriter(out, prov)  # only now: a daemon not there leaves no empty run

        def progress() -> dict[str, Any]:
            return _progress(prov, writer, sub, unstorable, models, engines, runs, model_cards)

        drain_until: float | None = None  # after a stop: read what had come, until then
        while True:
            stopping = stop.is_set() or signalled.is_set()
            if stopping:
                # what the socket had received before the stop is recorded (or counted as
                # rejected), for at most STOP_DRAIN_S s: a flood cannot hold the stop up
                drain_until = drain_until or time.monotonic() + STOP_DRAIN_S
                if time.monotonic() >= drain_until or not sub.waiting():
                    break
            if frames is not None and n_det >= frames and last_frame is None:
                break  # frames=0
            if duration is not None and time.monotonic() - t_start >= duration:
                break
            wait = 0.0 if stopping else 0.2
            if last_frame is not None:
                wait = min(wait, last_frame_deadline - time.monotonic())
                if wait <= 0:
                    log.warning("frame %s#%d: no statistics within %g s of its detections "
                                "(has the daemon stopped?); recorded without them",
                                last_frame[0], last_frame[1], frame_end_timeout)
                    prov["last_frame_stats"] = False
                    break
            msg = sub.recv(timeout=wait)
            if msg is not None and last_frame is not None and _frame_of(msg) != last_frame:
                # the daemon publishes one frame's messages together, stats last: the last
                # frame is over without them, and nothing of the next one is recorded
                log.warning("frame %s#%d: its statistics were not published before the next "
                            "frame's results; recorded without them", *last_frame[:2])
                prov["last_frame_stats"] = False
                break
            if msg is not None:
                run = getattr(msg.header, "daemon_run", None)
                if run is not None and run not in runs and len(runs) < MAX_DAEMON_RUNS:
                    if runs:
                        log.warning("results from a new daemon run (started %s) from here "
                                    "on: the daemon restarted; its track ids start again",
                                    _utc(run))
                    runs.append(run)
                try:
                    det = _add(writer, msg, rois)
                except ProtocolError as exc:
                    unstorable += 1
                    if unstorable <= LOGGED_REJECTIONS:
                        log.warning("not recorded (rejected message %d%s): %s", unstorable,
                                    ", the last one logged" if unstorable == LOGGED_REJECTIONS
                                    else "", exc)
                    det = None
                if det is not None:
                    models.add(model_name(det.model, det.model_sha256))
                    engines.add(det.engine)
                    n_det += 1
                    if frames is not None and n_det >= frames:
                        last_frame = (det.source, det.seq, det.daemon_run)
                        last_frame_deadline = time.monotonic() + frame_end_timeout
                elif last_frame is not None and msg.kind == "stats":
                    prov["last_frame_stats"] = True  # stored or refused: the frame is over
                    last_frame = None
                    break
            if writer.pending_frames >= batch_frames or (
                    writer.pending and time.monotonic() - last_flush >= batch_seconds):
                # with the provenance as of this batch: a run cut later (kill -9) still names
                # its models with their hashes, its rows and what was missed
                _commit(writer, out, progress)
                last_flush = time.monotonic()
        # a clean stop writes the tracks table too (read_run computes it for a cut run)
        prov = _commit(writer, out, lambda: {**progress(), "stopped_utc": _now()}, close=True)
        writer.release()  # written whole: its temporary files may be cleaned from now on
    log.info("recorded %d frames, %d particles, %d alerts to %s (missed %s)",
             writer.counts["frames"], writer.counts["particles"], writer.counts["alerts"], out,
             prov["missed_results"] or "none")
    if prov["rejected_messages"]:
        log.warning("%d messages were not recorded (%s): %s", prov["rejected_messages"],
                    ", ".join(f"{r} {n}" for r, n in prov["rejected_by_reason"].items()),
                    sub.last_rejection or "see the lines above")
    if sub.duplicates:
        log.warning("%d messages came again and were recorded once", sub.duplicates)
    return prov
