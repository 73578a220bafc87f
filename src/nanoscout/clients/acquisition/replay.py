"""File-replay adapter: send real microscope files to the daemon as frames.

``replay_files`` sends a list of files (directories expand to their supported files) at an
optional fixed rate; ``replay_watch`` sends each new file that appears in a folder. Both read
with :mod:`nanoscout.clients.acquisition.readers`, send every 2-D image of every file through a
publisher (``nanoscout.clients.acquisition.publisher.FramePublisher`` or anything with the same ``send``),
and never stop on a bad file: it is logged, listed in the report and skipped. Frames whose file
carries no calibration are sent with ``pixel_size_nm=None`` (the daemon then measures in pixels
and says so) and listed as uncalibrated, unless a pixel size is given to override the file.
A file name that is not valid UTF-8 is sent in the printable form of
:func:`nanoscout.wire.codec.wire_text` (``lat\\xe9in.png``); what is logged is
:func:`nanoscout.wire.codec.printable` text (that, and a newline, carriage return or terminal
escape in a name or its metadata as ``\\n``, ``\\r``, ``\\x1b``: never a forged line).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nanoscout.clients.acquisition.readers import (
    MAX_PIXEL_NM,
    MIN_PIXEL_NM,
    SUPPORTED_SUFFIXES,
    ImageRecord,
    drop_tia_companions,
    read_images,
    wire_array,
)
from nanoscout.clients.acquisition.watch import watch_folder
from nanoscout.wire.codec import printable, wire_text
from nanoscout.wire.errors import ConfigError, ReaderError
from nanoscout.wire.protocol import check_particle_size_nm, check_particle_size_px

__all__ = ["DEFAULT_PATTERNS", "MODALITIES", "ReplayReport", "check_overrides", "replay_files",
           "replay_watch"]

MODALITIES = frozenset({"TEM", "STEM", "SEM"})
DEFAULT_PATTERNS: tuple[str, ...] = tuple(sorted(f"*{s}" for s in SUPPORTED_SUFFIXES))
"""Watch patterns matching every file type the readers support."""
#: the files ``replay_watch`` remembers the images of (16 bytes an image), the most recently
#: read: a file that changes after it was sent sends only images it did not send before
WATCH_DIGEST_FILES = 4096


class Publisher(Protocol):
    """What the replay needs from ``FramePublisher``: ``send`` returns the sequence number."""

    def send(
        self,
        image: np.ndarray,
        *,
        pixel_size_nm: float | None,
        modality: str | None = None,
        stage: tuple[float, float] | None = None,
        magnification: float | None = None,
        meta: dict[str, Any] | None = None,
        t_acq_ns: int | None = None,
        particle_size_nm: tuple[float, float] | None = None,
        particle_size_px: tuple[float, float] | None = None,
    ) -> int: ...


@dataclass
class ReplayReport:
    """What a replay did: frames sent, files skipped with the reason, uncalibrated files, and
    (``replay_watch``) images of a changed file not sent again because they were sent before."""

    sent: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    uncalibrated: list[Path] = field(default_factory=list)
    unchanged: int = 0


def replay_files(
    paths: Iterable[Path | str],
    publisher: Publisher,
    *,
    rate_hz: float | None = None,
    loop: int = 1,
    pixel_size_nm: float | None = None,
    modality: str | None = None,
    log: Callable[[str], None] = print,
    particle_size_nm: tuple[float, float] | None = None,
    particle_size_px: tuple[float, float] | None = None,
) -> ReplayReport:
    """Send every image of every file in ``paths``, ``loop`` times; return a ReplayReport.

    Directories expand to their supported files, sorted by name, not recursively; a TIA
    ``.ser`` file is left out when its ``.emi`` companion is listed (the ``.emi`` reads it).
    ``rate_hz`` (frames per second) paces frames on a monotonic schedule without cumulative
    drift; None sends as fast as the publisher takes them. ``pixel_size_nm`` (nm/px) and
    ``modality`` override what the files say; ``particle_size_nm`` (low, high), nm, and
    ``particle_size_px`` (px, for files without a calibration) go in every frame header (the
    range the median particle diameter lies in, which guides the daemon's working scale).
    Unreadable files are logged, reported in
    ``skipped`` once and not retried on later loops. Raises ConfigError on bad options;
    errors from the publisher (a closed socket) propagate.
    """
    check_overrides(pixel_size_nm, modality, particle_size_nm, particle_size_px)
    if rate_hz is not None and not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ConfigError(f"rate_hz must be a positive frame rate (Hz), got {rate_hz!r}")
    if loop < 1:
        raise ConfigError(f"loop must be >= 1, got {loop!r}")

    log = _printable(log)
    report = ReplayReport()
    files = _expand(paths, report, log)
    pacer = _Pacer(rate_hz)
    bad: set[Path] = {p for p, _ in report.skipped}
    for _ in range(loop):
        for path in files:
            if path in bad:
                continue
            if not _send_file(path, publisher, report, pixel_size_nm, modality, log, pacer,
                              (particle_size_nm, particle_size_px)):
                bad.add(path)
    log(
        f"replay done: {report.sent} frames sent, {len(report.skipped)} files skipped, "
        f"{len(report.uncalibrated)} uncalibrated"
    )
    return report


def replay_watch(
    folder: Path | str,
    publisher: Publisher,
    *,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    pixel_size_nm: float | None = None,
    modality: str | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
    existing: bool = False,
    poll_s: float = 0.25,
    settle_polls: int = 2,
    settle_s: float = 0.0,
    particle_size_nm: tuple[float, float] | None = None,
    particle_size_px: tuple[float, float] | None = None,
) -> ReplayReport:
    """Send each new complete file that appears in ``folder`` until ``stop`` is set.

    Completeness, ``patterns``, ``existing``, ``poll_s`` (s), ``settle_polls`` and ``settle_s``
    (s) are those of :func:`nanoscout.clients.acquisition.watch.watch_folder`. A file that
    changes after it was sent (its size or its modification time) is read again once it
    settles, and of its images only those that differ from the image of the same index sent
    from it before are sent (counted in ``unchanged`` otherwise): a stack that grew sends its
    new frames, a new image saved under the same name is sent, a touched file sends nothing. TIA
    ``.emi`` files are skipped here: the pixels and calibration are in the ``.ser`` files
    written next to them, which are sent. ``particle_size_nm`` and ``particle_size_px`` as for
    :func:`replay_files`. A file that cannot be read is logged and skipped, and tried again
    when it changes (a writer that paused longer than the settle time leaves it truncated);
    once it is sent it leaves ``skipped``. Returns the ReplayReport when ``stop`` is set.
    """
    check_overrides(pixel_size_nm, modality, particle_size_nm, particle_size_px)
    log = _printable(log)
    report = ReplayReport()
    pacer = _Pacer(None)
    # per file, the digest of each image sent, by index; the most recently read last
    sent: dict[Path, list[bytes]] = {}
    log(f"watching {folder} for {', '.join(patterns)}")
    watch = watch_folder(
        Path(folder),
        patterns=patterns,
        poll_s=poll_s,
        settle_polls=settle_polls,
        settle_s=settle_s,
        existing=existing,
        stop=stop,
    )
    for path in watch:
        if path.suffix.lower() == ".emi":
            continue
        sent[path] = sent.pop(path, [])
        if len(sent) > WATCH_DIGEST_FILES:
            del sent[next(iter(sent))]
        if _send_file(path, publisher, report, pixel_size_nm, modality, log, pacer,
                      (particle_size_nm, particle_size_px), sent[path]):
            report.skipped = [s for s in report.skipped if s[0] != path]
        else:
            watch.retry_when_changed(path)
            log(f"  will try {path.name} again if it changes")
    return report


def check_overrides(pixel_size_nm: float | None, modality: str | None = None,
                    particle_size_nm: tuple[float, float] | None = None,
                    particle_size_px: tuple[float, float] | None = None) -> None:
    """Raise ConfigError, naming the value, for a ``pixel_size_nm`` override (nm/px) that is
    not finite or outside the frame protocol's range, an unknown ``modality``, or an impossible
    particle size range (nm, px); the check ``replay`` and ``measure`` make before any work."""
    if pixel_size_nm is not None and not (
        math.isfinite(pixel_size_nm) and MIN_PIXEL_NM <= pixel_size_nm <= MAX_PIXEL_NM
    ):
        raise ConfigError(
            f"pixel_size_nm override must be within {MIN_PIXEL_NM:g}.."
            f"{MAX_PIXEL_NM:g} nm, got {pixel_size_nm!r}"
        )
    if modality is not None and modality not in MODALITIES:
        raise ConfigError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    try:
        if particle_size_nm is not None:
            check_particle_size_nm(particle_size_nm)
        if particle_size_px is not None:
            check_particle_size_px(particle_size_px)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _expand(paths: Iterable[Path | str], report: ReplayReport, log: Callable[[str], None]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(
                    (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES),
                    key=lambda p: p.name,
                )
            )
        elif path.exists():
            files.append(path)
        else:
            _skip(report, path, "no such file or directory", log)
    return drop_tia_companions(files)


def _send_file(
    path: Path,
    publisher: Publisher,
    report: ReplayReport,
    pixel_size_nm: float | None,
    modality: str | None,
    log: Callable[[str], None],
    pacer: _Pacer,
    sizes: tuple[tuple[float, float] | None, tuple[float, float] | None] = (None, None),
    sent_before: list[bytes] | None = None,
) -> bool:
    """Send every image of one file; return False (and report it) when it cannot be read.
    ``sizes``: the (nm, px) particle size ranges every frame names. ``sent_before``: the
    digests of the images sent from this file before, by index (the watch's): an image equal
    to the one sent at its index is not sent again (counted in ``report.unchanged``), and the
    list becomes this read's digests."""
    try:
        records = read_images(path)
        frames = [wire_array(r.data) for r in records]
    except ReaderError as exc:
        _skip(report, path, str(exc), log)
        return False
    digests = [_digest(frame) for frame in frames] if sent_before is not None else []
    repeated = 0
    for k, (record, frame) in enumerate(zip(records, frames, strict=True)):
        if sent_before is not None and k < len(sent_before) and sent_before[k] == digests[k]:
            repeated += 1
            continue
        pixel = pixel_size_nm if pixel_size_nm is not None else record.pixel_size_nm
        pacer.wait()
        publisher.send(
            frame,
            pixel_size_nm=pixel,
            modality=modality or record.modality,
            magnification=_magnification(record),
            meta={"file": wire_text(path.name), "index": record.index},
            particle_size_nm=sizes[0],
            particle_size_px=sizes[1],
        )
        report.sent += 1
        if pixel is None and path not in report.uncalibrated:
            report.uncalibrated.append(path)
    if sent_before is not None:
        sent_before[:] = digests
    report.unchanged += repeated
    first = records[0]
    if pixel_size_nm is not None:
        calibration = f"{pixel_size_nm:g} nm/px (override; file: {first.calibration_note})"
    elif first.pixel_size_nm is None:
        calibration = f"UNCALIBRATED, sizes will be in px: {first.calibration_note}"
    else:
        calibration = f"{first.pixel_size_nm:.6g} nm/px ({first.calibration_note})"
    if repeated == len(records):
        log(f"{path.name} changed, but its {repeated} image(s) were sent before: none sent again")
        return True
    again = f" ({repeated} sent before, not again)" if repeated else ""
    log(
        f"sent {path.name}: {len(records) - repeated} image(s){again} {first.data.shape} "
        f"{first.data.dtype} {modality or first.modality or 'modality unknown'}, {calibration}"
    )
    return True


def _digest(frame: np.ndarray) -> bytes:
    """A digest of an image's pixels, shape and dtype (16 bytes): what tells a file's image
    already sent from a new one written under the same name."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{frame.shape}{frame.dtype.str}".encode())
    h.update(np.ascontiguousarray(frame).data)
    return h.digest()


def _magnification(record: ImageRecord) -> float | None:
    value = record.meta.get("magnification")
    return float(value) if isinstance(value, int | float) else None


def _printable(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` for messages that name files and carry their metadata (anyone's text): each is
    logged as :func:`~nanoscout.wire.codec.printable` escapes, so a file name cannot forge,
    overwrite or restyle a line of the output."""
    return lambda message: log(printable(message))


def _skip(report: ReplayReport, path: Path, reason: str, log: Callable[[str], None]) -> None:
    report.skipped.append((path, reason))
    log(f"skipped {path}: {reason}")


class _Pacer:
    """Wait until frame k's slot, ``t0 + k / rate``, on the monotonic clock.

    Slots are computed from the start, not from the previous frame, so sleep overshoot does not
    add up over a long replay. When sending falls behind by more than a frame (a slow file, a
    publisher pushing back), the schedule restarts from now instead of bursting to catch up.
    """

    def __init__(self, rate_hz: float | None) -> None:
        self.period_s = 1.0 / rate_hz if rate_hz else 0.0
        self.start_s: float | None = None
        self.count = 0

    def wait(self) -> None:
        if self.period_s == 0.0:
            return
        now = time.monotonic()
        if self.start_s is None:
            self.start_s = now
        due = self.start_s + self.count * self.period_s
        if now - due > self.period_s:
            self.start_s, self.count, due = now, 0, now
        if due > now:
            time.sleep(due - now)
        self.count += 1
