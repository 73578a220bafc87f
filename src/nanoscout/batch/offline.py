"""``nanoscout measure``: the daemon's pipeline run offline on image files.

Writes a run in the format of ``nanoscout record`` (:mod:`nanoscout.clients.runfile`), so
``nanoscout report`` and any Parquet/CSV reader take it as they take a recording:

* ``OUT.parquet`` (a folder ``pd.read_parquet`` opens as the particle table) or ``OUT.csv``
  (+ ``.frames.csv``, ``.alerts.csv``, ``.stats.csv``, ``.json``): one particle row per
  particle with its file and image index, unit-honest lengths (``ecd_px`` always, ``ecd_nm``
  NaN for uncalibrated images), one frame row per image, the rolling statistics after each
  image (with the morphology clusters) and every alert the configured rules fire;
* provenance (``_run.json`` / ``OUT.json``): software versions, the whole analysis
  configuration and the overrides, the models with their hashes and the sizing error their
  cards report (:func:`measure_provenance`, :func:`measure_outcome`: ``measure --ray`` writes
  the same record).

Calibrated and uncalibrated images are two sources (``measure`` and ``measure-px``), so sizes
in nm and px are never pooled in statistics; each image is analysed alone (its own working
scale: build the pipeline with ``build_pipeline(config, offline=True)``). Each image's acquisition
time is its file's modification time. A TIA acquisition (``.emi`` + ``_N.ser``) is measured once.
Pixels in a dtype the frame protocol does not carry (float16, 64-bit integers) are converted
without loss of value as ``replay`` converts them
(:func:`~nanoscout.clients.acquisition.readers.wire_array`).

Bad input loses nothing: an image that cannot be read, converted or analysed is skipped with a
one-line reason (in the log and the provenance's ``skipped``), and the other images are
measured and written; options (``--pixel-size``, ``--modality``, ``--outputs``) are checked
before anything is written (:func:`check_options`). Each file is measured once, whatever paths
reach it (a folder and a link to it, a file given beside its folder: :func:`expand`, which
also logs a folder's sub-folders, whose files are not measured). A write of the run that
fails (a full disk, an output folder made read-only) ends the measurement in one
NanoscoutError that says where it stopped and what the run holds (whole files); such a run's
provenance, like that of one killed, has no ``stopped_utc``, and ``nanoscout report`` says it
did not finish.

The run is committed in batches of whole files (:class:`~nanoscout.clients.runfile.RunWriter`
writes one part per table and batch): the first file alone, then twice as many files each time
up to :data:`BATCH_FILES`, and sooner when a batch has taken :data:`BATCH_S` s of analysis, and
at the end. A 1000-file run is 21 batches (64 Parquet parts with the tracks table, not
3001), and a write that fails or a ``kill -9`` loses at most the files of the batch being
gathered: the run holds the files before it, whole, and the error names the first file it does
not hold. Ctrl-C or SIGTERM commits the batch's whole files first (the interrupted file's rows
are dropped, :meth:`~nanoscout.clients.runfile.RunWriter.take_back`) and exits 130; either
way the run's provenance has no ``stopped_utc``.

Each image's ``file`` in the run is its full path, as text (a name that is not valid UTF-8 in
the printable form of :func:`nanoscout.wire.codec.wire_text`, ``lat\\xe9in.png``); the frame header's
``meta["file"]`` holds at most :data:`META_FILE_CHARS` characters of it (a longer path keeps
its end: ``"…"`` and the last 1023 characters), the protocol's bound on a ``meta`` string.
The lines printed name files as :func:`nanoscout.wire.codec.printable` text (a newline,
carriage return or terminal escape in a name as ``\\n``, ``\\r``, ``\\x1b``: no forged line).

With ``outputs=DIR``, per image (names keep the file's suffix: ``test-1.dm3.*``,
``test-1.dm4.*``): ``NAME.labels.tif`` (ImageJ hyperstack: image + instance labels, nm
resolution; napari opens it with nanoscout's reader plugin), ``NAME.rois.zip`` (ImageJ ROI set)
and ``NAME.overlay.png`` (outlines + scale bar); see :mod:`nanoscout.clients.outputs`.
When the pipeline has a field-of-view classifier, ``OUT.classes.csv`` gets one row per image
it classified (a text cell that a spreadsheet would run as a formula, a file named ``=...``,
with a ``'`` in front: :func:`nanoscout.clients.spreadsheet.text_cell`): a blank image (no
contrast, :class:`~nanoscout.wire.errors.BlankFrame`) gets none, and the log says so.

With ``track=True`` (``measure --track``) the files are one ordered image sequence (or
multi-frame files: a TIFF stack, a DM4/EMD series, each plane a frame, in order): the pipeline
must have been built with tracking (``build_pipeline(config, offline=True, track=True)``), the
frames get times ``frame_interval_s`` apart from the first file's modification time, and the
run carries every particle's ``track_id``, each frame's drift and events, the unique and
in-situ statistics and, at close, the tracks table (the report's in-situ section reads them).
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.clients.acquisition.readers import (
    SUPPORTED_SUFFIXES,
    drop_tia_companions,
    frame_modality,
    read_images,
    wire_array,
)
from nanoscout.clients.acquisition.replay import check_overrides
from nanoscout.clients.outputs import (
    UniqueNames,
    write_label_tiff,
    write_overlay_png,
    write_rois,
)
from nanoscout.clients.progress import Bar
from nanoscout.clients.provenance import model_entries, model_name, software
from nanoscout.clients.runfile import CLASS_COLUMNS, RunWriter, classes_path
from nanoscout.clients.spreadsheet import text_cells
from nanoscout.wire.codec import printable, wire_text
from nanoscout.wire.errors import ConfigError, NanoscoutError, ReaderError
from nanoscout.wire.protocol import StatsHeader

__all__ = ["BATCH_FILES", "BATCH_S", "META_FILE_CHARS", "MeasureReport", "check_options",
           "expand", "measure_files", "measure_outcome", "measure_provenance"]

#: source names of calibrated (nm) and uncalibrated (px) images
SOURCE_NM, SOURCE_PX = "measure", "measure-px"
#: the most characters of a file's path a frame header's ``meta["file"]`` holds (the protocol's
#: bound on a ``meta`` string)
META_FILE_CHARS = 1024
#: the most files one commit of the run holds. Each commit is one Parquet part per table, and
#: reading a run back (its close, ``report``) costs per part: 64 make a 1000-file run 63 parts
#: (``read_run`` 0.05 s, benchmarks/run_parts.py) instead of 3000 (2.5 s), while a crash or a
#: full disk costs at most 64 files' analysis (their rows wait in memory until the commit)
BATCH_FILES = 64
#: the most analysis time (s) one commit holds, so that large or slow images (a few seconds
#: each) are committed at least this often whatever :data:`BATCH_FILES` says: a crash costs at
#: most this much analysis
BATCH_S = 30.0


@dataclass
class MeasureReport:
    """What ``measure_files`` did: images measured, particles written, files skipped (with why)."""

    images: int = 0
    particles: int = 0
    alerts: int = 0
    classes: Path | None = None  # the per-image classification CSV, when written
    outputs: list[Path] = field(default_factory=list)  # label TIFFs, ROI sets, overlays
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    uncalibrated: list[Path] = field(default_factory=list)


def expand(paths: Iterable[Path], log: Callable[[str], None] | None = None) -> list[Path]:
    """Files as given, folders expanded to their supported image files (sorted, not those of
    their sub-folders), each file once; a TIA ``name_N.ser`` is dropped when its ``name.emi``
    is listed (one acquisition, one entry).

    A file met again under another path (a folder given twice, a file inside a folder given,
    a symbolic or hard link to a file listed before: the same device and inode) is dropped, so
    that no image is measured, and counted in the statistics, twice; ``log`` gets one line per
    file dropped and one per folder whose sub-folders hold files not measured (how many
    sub-folders)."""
    out: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    for p in paths:
        if not p.is_dir():
            listed = [p]
        else:
            entries = sorted(p.iterdir())
            listed = [f for f in entries if f.suffix.lower() in SUPPORTED_SUFFIXES]
            subs = sum(1 for f in entries if f.suffix.lower() not in SUPPORTED_SUFFIXES
                       and f.is_dir())
            if subs and log is not None:
                log(f"{p}: its {subs} sub-folder(s) are not measured (measure takes the files of "
                    f"each folder given, not of its sub-folders: give them too, e.g. {p}/*/)")
        for f in listed:
            try:
                st = f.stat()
            except OSError:  # missing or unreadable: kept, to be skipped with its reason
                out.append(f)
                continue
            first = seen.setdefault((st.st_dev, st.st_ino), f)
            if first is f:
                out.append(f)
            elif log is not None:
                log(f"{f} is the same file as {first}, listed before: measured once")
    return drop_tia_companions(out)


def check_options(out: Path, *, outputs: Path | None = None,
                  pixel_size_nm: float | None = None, modality: str | None = None) -> None:
    """Raise ConfigError, naming the value, for options ``measure`` cannot run with: ``out``
    not ``.csv``/``.parquet``, ``outputs`` an existing file (it must be a folder), a
    ``pixel_size_nm`` override (nm/px) or ``modality`` ``replay`` would refuse too
    (:func:`~nanoscout.clients.acquisition.replay.check_overrides`). Checked before anything
    is written or deleted."""
    if out.suffix not in (".csv", ".parquet"):  # as RunWriter and delete_run name them
        raise ConfigError(f"output {out} must end in .csv or .parquet")
    if outputs is not None and outputs.exists() and not outputs.is_dir():
        raise ConfigError(f"--outputs {outputs} is a file: give a folder for the per-image "
                          "outputs")
    check_overrides(pixel_size_nm, modality)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def measure_provenance(command: str, files: Iterable[str], *, config: Mapping[str, Any] | None,
                       pixel_size_nm: float | None, modality: str | None, track: bool = False,
                       frame_interval_s: float = 1.0) -> dict[str, Any]:
    """The provenance record of a measurement as it starts: ``command``, ``files`` (as the
    run names them), software versions, the analysis ``config``, the overrides
    (``pixel_size_override_nm`` in nm/px, ``modality_override``), ``track`` and
    ``frame_interval_s`` (s; None unless tracking) and ``started_utc`` (ISO 8601)."""
    return {"command": command, "files": list(files), "software": software(),
            "config": dict(config or {}), "pixel_size_override_nm": pixel_size_nm,
            "modality_override": modality, "track": track,
            "frame_interval_s": frame_interval_s if track else None, "started_utc": _utc_now()}


def measure_outcome(*, rows: Mapping[str, int], models: Iterable[str], engines: Iterable[str],
                    model_cards: Mapping[str, Mapping[str, Any]] | None,
                    skipped: Iterable[tuple[str, str]], uncalibrated: Iterable[str]
                    ) -> dict[str, Any]:
    """What a measurement adds to its provenance record when it ends: ``stopped_utc``, the
    ``rows`` written per table, the ``models`` that measured (provenance names:
    :func:`~nanoscout.clients.provenance.model_name`) with their cards' provenance
    (``model_provenance``: sha256, sizing error; :func:`~nanoscout.clients.provenance.model_entries`),
    the ``engines``, the ``skipped`` files or images as ``[file, why]`` and the
    ``uncalibrated`` files (lengths in px)."""
    names = sorted(set(models))
    return {"stopped_utc": _utc_now(), "rows": dict(rows), "models": names,
            "engines": list(engines), "model_provenance": model_entries(names, model_cards or {}),
            "skipped": [[file, why] for file, why in skipped],
            "uncalibrated": sorted(set(uncalibrated))}


def _label(path: Path) -> str:
    """``path`` as text the run and the frame header can carry (see the module docstring)."""
    return wire_text(os.fsdecode(path))


def _meta(label: str, index: int, meta: dict[str, Any]) -> dict[str, Any]:
    small = {k: v for k, v in meta.items()
             if isinstance(v, str | int | float) and not isinstance(v, bool)
             and (not isinstance(v, str) or len(v) <= 200)}
    if len(label) > META_FILE_CHARS:  # the end of a path names the file
        label = "…" + label[-(META_FILE_CHARS - 1):]
    return {**small, "file": label, "index": index}


def _printable(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` for messages that name files: a name is anyone's text, so each message is
    logged as :func:`~nanoscout.wire.codec.printable` escapes (bytes that are not UTF-8, which
    a strict UTF-8 terminal refuses, as ``\\xe9``; a newline, carriage return or terminal
    escape as ``\\n``, ``\\r``, ``\\x1b``: a file name cannot forge or overwrite a line)."""
    return lambda message: log(printable(message))


def _unwritable(out: Path, exc: OSError, holds: str) -> NanoscoutError:
    """A write of the run ``out`` that failed (a full disk, an output folder made read-only)
    as one error that says why and what the run holds (``holds``)."""
    return NanoscoutError(f"cannot write the run {out}: {exc.strerror or exc}; {holds}")


def _one_line(exc: Exception) -> str:
    """A failure as one line: a pydantic ValidationError's first error (field: message)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or exc.title
        return f"frame header field {loc}: {first['msg']}"
    return " ".join(str(exc).split()) or type(exc).__name__


def measure_files(
    paths: Iterable[Path],
    pipeline: Pipeline,
    out: Path,
    *,
    outputs: Path | None = None,
    pixel_size_nm: float | None = None,
    modality: str | None = None,
    log: Callable[[str], None] = print,
    bar: Bar | None = None,
    config: dict[str, Any] | None = None,
    model_cards: dict[str, dict[str, Any]] | None = None,
    track: bool = False,
    frame_interval_s: float = 1.0,
    batch_files: int = BATCH_FILES,
    batch_s: float = BATCH_S,
) -> MeasureReport:
    """Measure every image of ``paths`` and write a run to ``out`` (``.parquet``/``.csv``).

    ``outputs``: folder for the per-image label TIFFs, ROI sets and overlays (None: none).
    ``pixel_size_nm`` (nm/px) overrides every file's calibration, ``modality`` ("TEM", "STEM",
    "SEM") every file's kind of image (which detector analyses it). ``bar``: a progress bar
    advanced once per file. ``config`` and ``model_cards`` go into the provenance. ``track``:
    the images are one ordered sequence, ``frame_interval_s`` apart (s); the pipeline tracks
    (raises ConfigError when it was built without tracking). ``batch_files`` (files) and
    ``batch_s`` (s): the most files, and analysis time, one commit of the run holds (the first
    commit holds the first file alone, each next one twice as many up to ``batch_files``; 1:
    one commit per file, as before 0.2.0); both are recorded in the provenance.
    """
    if track and pipeline.tracking is None:
        raise ConfigError("measure --track needs a pipeline with tracking "
                          "(build_pipeline(config, offline=True, track=True))")
    if not frame_interval_s > 0:
        raise ConfigError(f"frame interval {frame_interval_s!r} s must be > 0")
    if batch_files < 1 or not batch_s > 0:
        raise ConfigError(f"batch of {batch_files!r} files / {batch_s!r} s: a batch must hold "
                          ">= 1 file and last > 0 s")
    check_options(out, outputs=outputs, pixel_size_nm=pixel_size_nm, modality=modality)
    log = _printable(bar.log if bar is not None else log)
    files = expand(paths, log)
    if bar is not None:
        bar.total(len(files))
    prov = measure_provenance("nanoscout measure", [_label(p) for p in files], config=config,
                              pixel_size_nm=pixel_size_nm, modality=modality, track=track,
                              frame_interval_s=frame_interval_s)
    prov.update(batch_files=batch_files, batch_s=batch_s)
    try:
        writer = RunWriter(out, prov)
    except OSError as exc:
        raise _unwritable(out, exc, "nothing was measured") from exc
    report = MeasureReport()
    names = UniqueNames()
    models: set[str] = set()
    class_rows: list[list[object]] = []
    seq = {SOURCE_NM: 0, SOURCE_PX: 0}
    t0_ns: int | None = None
    # the batch being gathered: files[first:i + 1], begun at `since` (monotonic s), committed
    # when it holds `batch` files (1, 2, 4 ... batch_files: an output that cannot be written
    # fails on the first file, not after a whole batch) or has taken batch_s s
    first, batch, since = 0, 1, time.monotonic()
    mark = writer.mark()
    try:
        for i, path in enumerate(files):
            mark = writer.mark()  # the rows of the files before this one
            label = _label(path)
            t_acq_ns = 0
            try:
                records = read_images(path)
            except ReaderError as exc:
                records = []
                report.skipped.append((path, wire_text(str(exc))))
                log(f"skipped {label}: {exc}")
            else:
                try:
                    t_acq_ns = path.stat().st_mtime_ns
                except OSError:
                    t_acq_ns = time.time_ns()
                t0_ns = t_acq_ns if t0_ns is None else t0_ns
            for rec in records:
                px = pixel_size_nm if pixel_size_nm is not None else rec.pixel_size_nm
                if px is None:
                    report.uncalibrated.append(path)
                    # the reader's note says why: none in the file, or one it refused as absurd
                    why = rec.calibration_note or "no calibration"
                    if not why.startswith("no calibration"):
                        why = f"no calibration ({why})"
                    log(f"{label}: {why}, lengths in px (use --pixel-size to set one)")
                source = SOURCE_NM if px else SOURCE_PX
                if track:  # a sequence: frame k at t0 + k intervals
                    assert t0_ns is not None
                    t_acq_ns = t0_ns + round(seq[source] * frame_interval_s * 1e9)
                try:
                    frame = Frame.from_image(
                        wire_array(rec.data), pixel_size_nm=px, source=source, seq=seq[source],
                        t_acq_ns=t_acq_ns, meta=_meta(label, rec.index, rec.meta),
                        modality=frame_modality(rec, modality))
                except (NanoscoutError, ValueError) as exc:  # ValueError: pydantic's, a header field
                    why = wire_text(_one_line(exc))
                    report.skipped.append((path, why))
                    log(f"skipped {label}[{rec.index}]: {why}")
                    continue
                try:
                    result = pipeline.process(frame)
                except NanoscoutError as exc:
                    report.skipped.append((path, wire_text(str(exc))))
                    log(f"skipped {label}[{rec.index}]: {exc}")
                    continue
                except MemoryError as exc:  # one image too large for this machine: the run goes on
                    why = f"not enough memory to analyse a {rec.data.shape} image ({exc})"
                    report.skipped.append((path, why))
                    log(f"skipped {label}[{rec.index}]: {why}")
                    continue
                seq[source] += 1
                det, table, labels = result.det, result.table, result.labels
                writer.add_det(det, table, file=label)
                stats = result.messages[-1].header
                if isinstance(stats, StatsHeader):
                    writer.add_stats(stats)
                for ah in result.alerts:
                    writer.add_alert(ah)
                report.alerts += len(result.alerts)
                models.add(model_name(det.model, det.model_sha256))
                name = names(path, rec.index, len(records))
                if outputs is not None:
                    info = {"file": label, "index": rec.index, "modality": rec.modality}
                    try:
                        report.outputs += [
                            write_label_tiff(labels, outputs / f"{name}.labels.tif", image=rec.data,
                                             pixel_size_nm=px, properties=info),
                            write_rois(labels, table, outputs / f"{name}.rois.zip"),
                            write_overlay_png(rec.data, labels, outputs / f"{name}.overlay.png",
                                              pixel_size_nm=px,
                                              border_ids=table["id"][table["border"]].tolist()),
                        ]
                    except (OSError, NanoscoutError) as exc:  # the measurements stand without them
                        log(f"{label}[{rec.index}]: outputs not written to {outputs}: {exc}")
                report.images += 1
                report.particles += len(table)
                what = ""
                for stage, error in result.failures:  # the measurements stand without these
                    log(f"{label}[{rec.index}]: {stage} failed: {error}")
                for stage, error in result.skipped:  # on purpose: a blank image is not classified
                    log(f"{label}[{rec.index}]: {stage} skipped: {error}")
                c = result.classification
                if c is not None:
                    class_rows.append([label, rec.index, c.labels[0],
                                       round(c.probabilities[0], 4),
                                       None if c.novelty is None else round(c.novelty, 4),
                                       *(round(v, 4) for v in c.all.values())])
                    what = f"; {c.labels[0]} ({c.probabilities[0]:.2f})"
                    assert pipeline.classifier is not None
                    models.add(pipeline.classifier.name)
                log(f"{label}[{rec.index}]: {len(table)} particles ({det.units}){what}")
            if i + 1 == len(files) or i + 1 - first >= batch or time.monotonic() - since >= batch_s:
                try:
                    writer.flush()
                except OSError as exc:  # the batch is lost whole: the run stops before its first file
                    raise _unwritable(out, exc, (
                        f"measuring stopped at {_label(files[first])} (file {first + 1} of "
                        f"{len(files)}): the run holds the {writer.counts['frames']} images measured "
                        "before it, in whole files, and its provenance does not say it finished "
                        "(nanoscout report marks it unfinished)")) from exc
                first, batch, since = i + 1, min(2 * batch, batch_files), time.monotonic()
            if bar is not None:
                bar.advance(note=wire_text(path.name) if records else None)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM (nanoscout.cli.signals): the batch's whole files are committed,
        # the interrupted file's rows dropped; the run stays unfinished (no stopped_utc)
        writer.take_back(mark)
        with contextlib.suppress(OSError):
            writer.flush()
        log(f"interrupted: the run {out} holds the {writer.counts['frames']} images of the "
            "files measured before the interrupted one, whole; it is not finished")
        raise
    try:
        writer.close()
        prov.update(measure_outcome(
            rows=writer.counts, models=models, engines=[pipeline.engine_name],
            model_cards=model_cards, skipped=[(_label(p), why) for p, why in report.skipped],
            uncalibrated=[_label(p) for p in report.uncalibrated]))
        writer.write_provenance(prov)
    except OSError as exc:
        raise _unwritable(out, exc, (
            f"every file was measured and the run holds their {writer.counts['frames']} "
            "images, but not its tracks table or the end of its provenance (nanoscout report "
            "marks it unfinished)")) from exc
    if pipeline.classifier is not None:
        report.classes = classes_path(out)  # RunWriter refused a run where one was
        try:
            with report.classes.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow([*CLASS_COLUMNS, *(f"p_{c}" for c in pipeline.classifier.classes)])
                w.writerows(text_cells(row) for row in class_rows)
        except OSError as exc:
            raise _unwritable(out, exc, f"the run is whole, its classification table "
                                        f"{report.classes} is not") from exc
    return report
