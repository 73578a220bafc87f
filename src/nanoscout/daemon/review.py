"""Raw frames for review: the ring of the newest frames and the thread that writes them as TIFF.

:class:`FrameReview` is fed by the daemon's worker (:meth:`FrameReview.offer`, each frame as it
starts analysing it) and keeps them in a :class:`~nanoscout.daemon.frame_ring.FrameRing`
(``[review] frames`` / ``max_bytes``). Frames are written on its own writer thread, never on
the frame path, as calibrated TIFF (:mod:`nanoscout.daemon.frame_tiff`) into ``[review]
directory``:

* :meth:`FrameReview.save_latest`: the newest frame(s) of a source, now (the ``save_frame``
  control request of an operator or the SDK); waits for the files and returns their paths.
* :meth:`FrameReview.on_alert`: a rule with ``save_frames = { before, after }`` fired; the
  frames before it and the one that fired are taken from the ring, the ``after`` frames as
  they come (each source's next frames), then all are written (``<source>-<seq>-<rule>.tif``).

When the worker attached the detector's instance map to a frame (:meth:`FrameReview.keep_labels`,
after analysing it), it is written beside the frame as ``<name>.detections.tif`` (uint16, 0
background, 1..n the detector's particles): the dashboard starts an operator's annotation
from it.

Disk use is bounded: the ``.tif`` files already in the directory count, and a save that would
take it beyond ``max_disk_bytes`` is refused (nothing is deleted: they may be annotated). What
the directory holds is measured (one listing) at the first save, again before a save is refused
when the directory changed since (an operator deleted files: the budget frees up) and at most
every :data:`_RESCAN_S` seconds otherwise (files another program added count); in between,
the files written here are added up, so a busy stream lists the directory rarely. A listing
also removes the temporary files (``.NAME.tif.part``) older than :data:`STALE_PART_S` that a
writer killed mid-write left behind (``leftovers_removed``). Every
file written is counted (``saved``), every failure by reason (``failed``: ``no_frame``,
``disk_budget``, ``queue_full``, ``write_error``); a failure never reaches the frame path.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.rules import SaveFrames
from nanoscout.daemon.config import ReviewConfig
from nanoscout.daemon.frame_ring import FrameRing
from nanoscout.daemon.frame_tiff import frame_file_name, write_frame_tiff, write_label_map
from nanoscout.lograte import LogEvery

__all__ = ["FrameReview", "SaveRefused"]

log = logging.getLogger("nanoscout.review")

#: alert saves waiting for their ``after`` frames, at most (the oldest is written early)
_MAX_PENDING = 64
#: TIFF overhead counted per file on top of the pixels, bytes
_TIFF_OVERHEAD = 16 * 1024
#: what the review directory holds is listed again at least this often, s
_RESCAN_S = 60.0
#: a temporary ``.NAME.tif.part`` this old, s, is a writer's that was killed mid-write (kill
#: -9, a crash, a power cut: no writer of one frame takes this long); the next listing removes it
STALE_PART_S = 600.0
#: a save that would exceed the budget lists the directory again when the last listing is
#: this old, s, even if the directory's mtime did not change (coarse mtimes of network shares)
_RECHECK_S = 5.0


class SaveRefused(ValueError):
    """A save that could not be done (no frame kept, disk budget, queue full, write error);
    the message says which and why."""


@dataclass
class _Job:
    """Frames to write together, and who waits for them."""

    frames: list[Frame]
    suffix: str
    why: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    paths: list[Path] = field(default_factory=list)
    error: str | None = None


@dataclass
class _Pending:
    """An alert save still waiting for ``after`` more frames of ``source``."""

    source: str
    after: int
    job: _Job


class FrameReview:
    """The review ring, the pending alert saves and the TIFF writer thread."""

    def __init__(self, config: ReviewConfig, *, max_sources: int = 64,
                 on_saved: Callable[[int], None] | None = None,
                 on_failed: Callable[[str], None] | None = None) -> None:
        """``on_saved(n)`` / ``on_failed(reason)``: called as files are written / saves fail
        (the daemon's Prometheus counters)."""
        self.config = config
        self.ring = FrameRing(config.frames if config.enabled else 0, config.max_bytes,
                              max_sources)
        self.directory = Path(config.directory)
        self._on_saved = on_saved
        self._on_failed = on_failed
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.queue)
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._disk_used: int | None = None  # bytes of .tif files in the directory (lazy)
        self._scanned_s = 0.0  # monotonic time of the last listing, s
        self._scanned_mtime_ns: int | None = None  # the directory's mtime at that listing
        self._thread: threading.Thread | None = None
        self.saved = 0
        self.failed: dict[str, int] = {}
        #: temporary files of killed writers removed from the directory (STALE_PART_S)
        self.leftovers_removed = 0
        # refusals may come with every alert while the folder is full: one line a minute each
        self._log_every = LogEvery(log)

    # ------------------------------------------------------------------ lifecycle
    def start(self, guard: Callable[[Callable[[], None]], Callable[[], None]] | None = None
              ) -> None:
        """Start the writer thread (``guard`` wraps its loop, as the daemon's threads)."""
        target = self._write_loop if guard is None else guard(self._write_loop)
        self._thread = threading.Thread(target=target, name="nanoscout-review", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write the alert saves still waiting (with the frames they have) and stop the
        writer once its queue is done."""
        with self._lock:
            pending, self._pending = self._pending, []
        for p in pending:
            self._submit(p.job)
        if self._thread is not None:
            try:
                self._jobs.put(None, timeout=timeout)
            except queue.Full:
                log.warning("review writer busy at exit: frames still queued are not written")
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def offer(self, frame: Frame) -> None:
        """Keep ``frame`` as its source's newest (the worker, before analysing it) and hand it
        to the alert saves waiting for that source's next frames."""
        self.ring.add(frame)
        if not self._pending:
            return
        ready: list[_Job] = []
        with self._lock:
            for p in list(self._pending):
                if p.source == frame.source and p.after > 0:
                    p.job.frames.append(frame)
                    p.after -= 1
                    if p.after == 0:
                        self._pending.remove(p)
                        ready.append(p.job)
        for job in ready:
            self._submit(job)

    def keep_labels(self, frame: Frame, labels: np.ndarray) -> None:
        """Attach the detector's instance map of ``frame`` (the worker, once analysed)."""
        if self.ring.frames:
            self.ring.attach(frame, labels)

    def forget(self, source: str) -> None:
        """The daemon evicted ``source``: drop its frames."""
        self.ring.forget(source)

    def on_alert(self, frame: Frame, rule: str, save: SaveFrames) -> None:
        """Rule ``rule`` fired on ``frame`` (offered already): write the ``save.before`` frames
        before it, it, and the ``save.after`` frames that follow, once they came."""
        frames = self.ring.latest(frame.source, save.before + 1)
        if not frames or frames[-1] is not frame:
            frames = [f for f in frames if f.header.seq != frame.header.seq] + [frame]
        h = frame.header
        job = _Job(frames, rule, {"why": "alert", "rule": rule, "source": h.source,
                                  "seq": h.seq, "before": save.before, "after": save.after})
        if save.after == 0:
            self._submit(job)
            return
        with self._lock:
            if len(self._pending) >= _MAX_PENDING:
                early = self._pending.pop(0)
                self._log_every("early", logging.WARNING,
                                f"review: too many alert saves waiting; writing "
                                f"{early.source}#{early.job.why.get('seq', -1)} early")
                self._submit(early.job)
            self._pending.append(_Pending(h.source, save.after, job))

    # ------------------------------------------------------------------ control side
    def save_latest(self, source: str, n: int = 1, *, timeout: float = 30.0) -> list[Path]:
        """Write the newest ``n`` frames kept of ``source`` now and return their paths once
        written; :class:`SaveRefused` (a ValueError) says why nothing was written."""
        frames = self.ring.latest(source, n)
        if not frames:
            self._failed("no_frame")
            kept = self.ring.sources()
            if not self.config.enabled or self.config.frames == 0:
                raise SaveRefused("no raw frames are kept ([review] enabled = false or "
                                  "frames = 0)")
            raise SaveRefused(f"no frame of source {source!r} is kept for review (sources with "
                              f"frames: {kept})")
        job = _Job(frames, "", {"why": "request", "source": source})
        self._submit(job)
        if not job.done.wait(timeout):
            raise SaveRefused(f"the frames of {source!r} were not written within {timeout:g} s")
        if job.error is not None:
            raise SaveRefused(job.error)
        return job.paths

    # ------------------------------------------------------------------ writer
    def _failed(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.failed[reason] = self.failed.get(reason, 0) + n
        if self._on_failed is not None:
            for _ in range(n):
                self._on_failed(reason)

    def _submit(self, job: _Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            job.error = (f"{len(job.frames)} frame(s) not saved: {self.config.queue} saves are "
                         "waiting to be written already ([review] queue)")
            self._failed("queue_full", len(job.frames))
            self._log_every("queue_full", logging.WARNING, f"review: {job.error}")
            job.done.set()

    def _used(self) -> int:
        """Bytes of ``.tif`` files in the directory: counted as written, listed again at the
        first call and every :data:`_RESCAN_S` s (writer thread only)."""
        if self._disk_used is None or time.monotonic() - self._scanned_s > _RESCAN_S:
            return self._rescan()
        return self._disk_used

    def _rescan(self) -> int:
        """Measure what the directory holds now (files deleted or added by others)."""
        d = self.directory
        total, mtime_ns = 0, None
        try:
            mtime_ns = d.stat().st_mtime_ns
            with os.scandir(d) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(".tif.part"):
                        self._remove_stale(entry)
                        continue
                    if not entry.name.lower().endswith(".tif"):
                        continue
                    try:
                        if entry.is_file():
                            total += entry.stat().st_size
                    except OSError:  # deleted between the listing and the stat
                        continue
        except FileNotFoundError:  # not created yet: it holds nothing
            pass
        except OSError as exc:  # keep the count so far rather than refuse every save
            log.warning("review: cannot measure %s: %s", d, exc)
            if self._disk_used is not None:
                total = self._disk_used
        self._disk_used, self._scanned_mtime_ns = total, mtime_ns
        self._scanned_s = time.monotonic()
        return total

    def _remove_stale(self, entry: os.DirEntry[str]) -> None:
        """Remove ``entry``, a temporary TIFF (:func:`write_frame_tiff`'s ``.NAME.tif.part``),
        when it is older than :data:`STALE_PART_S`: its writer was killed mid-write and it
        would hold its bytes, outside the budget, for ever (30 kills of a writer of 4 MP
        frames left 21, 106 MiB). A younger one may be being written (this daemon's writer,
        another's, the dashboard's annotations): it is left."""
        try:
            if time.time() - entry.stat().st_mtime < STALE_PART_S:
                return
            os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove: the next listing sees it
            return
        self.leftovers_removed += 1
        log.info("review: removed %s, left by a writer killed mid-write", entry.path)

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within ``max_disk_bytes``; before saying no, the
        directory is measured again if it changed (or was last measured long ago)."""
        limit = self.config.max_disk_bytes
        if self._used() + size <= limit:
            return True
        try:
            mtime_ns: int | None = self.directory.stat().st_mtime_ns
        except OSError:
            mtime_ns = None
        if (mtime_ns != self._scanned_mtime_ns
                or time.monotonic() - self._scanned_s > _RECHECK_S):
            self._rescan()
        return self._used() + size <= limit

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._write(job)
            except Exception as exc:  # a bug writing one job never ends the daemon
                job.error = f"internal error writing frames: {exc!r}"
                self._failed("write_error", len(job.frames))
                log.warning("review: %s", job.error, exc_info=True)
            finally:
                job.done.set()

    def _write(self, job: _Job) -> None:
        errors: list[str] = []
        for frame in job.frames:
            size = frame.pixels.nbytes + _TIFF_OVERHEAD
            if not self._fits(size):
                errors.append(f"{frame.source}#{frame.header.seq}: the review directory "
                              f"{self.directory} holds {self._used()} bytes; another "
                              f"{size} would exceed [review] max_disk_bytes = "
                              f"{self.config.max_disk_bytes}")
                self._failed("disk_budget")
                continue
            path = self._free_name(frame, job.suffix)
            try:
                write_frame_tiff(frame, path, saved=job.why)
            except OSError as exc:
                errors.append(f"cannot write {path}: {exc}")
                self._failed("write_error")
                continue
            self._disk_used = self._used() + path.stat().st_size
            labels = self.ring.labels(frame)
            if labels is not None:
                try:
                    det = write_label_map(labels, path.with_suffix(".detections.tif"))
                    self._disk_used += det.stat().st_size
                except OSError as exc:
                    log.warning("review: no detections beside %s: %s", path, exc)
            job.paths.append(path)
            with self._lock:
                self.saved += 1
            if self._on_saved is not None:
                self._on_saved(1)
        if errors:
            job.error = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)"
                                                 if len(errors) > 3 else "")
            self._log_every("not_saved", logging.WARNING, f"review: {job.error}")

    def _free_name(self, frame: Frame, suffix: str) -> Path:
        """A path in the directory for ``frame`` that holds no file yet."""
        name = frame_file_name(frame.source, frame.header.seq, suffix)
        path = self.directory / name
        k = 2
        while path.exists() or path.with_suffix(".detections.tif").exists():
            path = self.directory / name.replace(".tif", f"-{k}.tif")
            k += 1
        return path
