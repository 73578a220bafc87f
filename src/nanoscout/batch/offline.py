"""``nanoscout measure``: the daemon's pipeline run offline on image files.

Writes a run in the format of ``nanoscout record`` (:mod:`nanoscout.clients.runfile`), so
``nanoscout report`` and any Parquet/CSV reader take it as they take a recording:

* ``OUT.parquet`` (a folder ``pd.read_parquet`` opens as the particle table) or ``OUT.csv``
  (+ ``.frames.csv``, ``.alerts.csv``, ``.stats.csv``, ``.json``): one particle row per
  particle with its file and image index, unit-honest lengths (``ecd_px`` always, ``ecd_nm``
  NaN for uncalibrated images), one frame row per image, the rolling statistics after each
  image (with the morphology clusters) and every alert the configured rules fire;
* provenance (``_run.json`` / ``OUT.json``): software versions, the whole analysis
  configuration, the models with their hashes and the sizing error their cards report.

Calibrated and uncalibrated images are two sources (``measure`` and ``measure-px``), so sizes
in nm and px are never pooled in statistics; each image is analysed alone (its own working
scale: build the pipeline with ``build_pipeline(config, offline=True)``). Each image's acquisition
time is its file's modification time. A TIA acquisition (``.emi`` + ``_N.ser``) is measured once.

With ``outputs=DIR``, per image (names keep the file's suffix: ``test-1.dm3.*``,
``test-1.dm4.*``): ``NAME.labels.tif`` (ImageJ hyperstack: image + instance labels, nm
resolution; napari opens it with nanoscout's reader plugin), ``NAME.rois.zip`` (ImageJ ROI set)
and ``NAME.overlay.png`` (outlines + scale bar); see :mod:`nanoscout.clients.outputs`.
When the pipeline has a field-of-view classifier, ``OUT.classes.csv`` gets one row per image.

With ``track=True`` (``measure --track``) the files are one ordered image sequence (or
multi-frame files: a TIFF stack, a DM4/EMD series, each plane a frame, in order): the pipeline
must have been built with tracking (``build_pipeline(config, offline=True, track=True)``), the
frames get times ``frame_interval_s`` apart from the first file's modification time, and the
run carries every particle's ``track_id``, each frame's drift and events, the unique and
in-situ statistics and, at close, the tracks table (the report's in-situ section reads them).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable
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
)
from nanoscout.clients.outputs import (
    UniqueNames,
    write_label_tiff,
    write_overlay_png,
    write_rois,
)
from nanoscout.clients.progress import Bar
from nanoscout.clients.provenance import model_entries, software
from nanoscout.clients.runfile import RunWriter
from nanoscout.wire.errors import ConfigError, NanoscoutError, ReaderError
from nanoscout.wire.protocol import StatsHeader

__all__ = ["MeasureReport", "expand", "measure_files"]

#: source names of calibrated (nm) and uncalibrated (px) images
SOURCE_NM, SOURCE_PX = "measure", "measure-px"


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


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their supported image files (sorted); a TIA
    ``name_N.ser`` is dropped when its ``name.emi`` is listed (one acquisition, one entry)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in SUPPORTED_SUFFIXES))
        else:
            out.append(p)
    return drop_tia_companions(out)


def _meta(path: Path, index: int, meta: dict[str, Any]) -> dict[str, Any]:
    small = {k: v for k, v in meta.items()
             if isinstance(v, str | int | float) and not isinstance(v, bool)
             and (not isinstance(v, str) or len(v) <= 200)}
    return {**small, "file": str(path), "index": index}


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
) -> MeasureReport:
    """Measure every image of ``paths`` and write a run to ``out`` (``.parquet``/``.csv``).

    ``outputs``: folder for the per-image label TIFFs, ROI sets and overlays (None: none).
    ``pixel_size_nm`` (nm/px) overrides every file's calibration, ``modality`` ("TEM", "STEM",
    "SEM") every file's kind of image (which detector analyses it). ``bar``: a progress bar
    advanced once per file. ``config`` and ``model_cards`` go into the provenance. ``track``:
    the images are one ordered sequence, ``frame_interval_s`` apart (s); the pipeline tracks
    (raises ConfigError when it was built without tracking).
    """
    if track and pipeline.tracking is None:
        raise ConfigError("measure --track needs a pipeline with tracking "
                          "(build_pipeline(config, offline=True, track=True))")
    if not frame_interval_s > 0:
        raise ConfigError(f"frame interval {frame_interval_s!r} s must be > 0")
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ConfigError(f"output {out} must end in .csv or .parquet")
    files = expand(paths)
    if bar is not None:
        bar.total(len(files))
        log = bar.log
    prov: dict[str, Any] = {"command": "nanoscout measure", "files": [str(p) for p in files],
                            "software": software(), "config": config or {},
                            "pixel_size_override_nm": pixel_size_nm, "track": track,
                            "frame_interval_s": frame_interval_s if track else None,
                            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    writer = RunWriter(out, prov)
    report = MeasureReport()
    names = UniqueNames()
    models: set[str] = set()
    class_rows: list[list[object]] = []
    seq = {SOURCE_NM: 0, SOURCE_PX: 0}
    t0_ns: int | None = None
    for path in files:
        try:
            records = read_images(path)
        except ReaderError as exc:
            report.skipped.append((path, str(exc)))
            log(f"skipped {path}: {exc}")
            if bar is not None:
                bar.advance()
            continue
        try:
            t_acq_ns = path.stat().st_mtime_ns
        except OSError:
            t_acq_ns = time.time_ns()
        t0_ns = t_acq_ns if t0_ns is None else t0_ns
        for rec in records:
            px = pixel_size_nm if pixel_size_nm is not None else rec.pixel_size_nm
            if px is None:
                report.uncalibrated.append(path)
                log(f"{path}: no calibration, lengths in px (use --pixel-size to set one)")
            source = SOURCE_NM if px else SOURCE_PX
            if track:  # a sequence: frame k at t0 + k intervals
                t_acq_ns = t0_ns + round(seq[source] * frame_interval_s * 1e9)
            try:
                frame = Frame.from_image(
                    rec.data, pixel_size_nm=px, source=source, seq=seq[source],
                    t_acq_ns=t_acq_ns, meta=_meta(path, rec.index, rec.meta),
                    modality=frame_modality(rec, modality))
                result = pipeline.process(frame)
            except NanoscoutError as exc:
                report.skipped.append((path, str(exc)))
                log(f"skipped {path}[{rec.index}]: {exc}")
                continue
            except MemoryError as exc:  # one image too large for this machine: the run goes on
                why = f"not enough memory to analyse a {rec.data.shape} image ({exc})"
                report.skipped.append((path, why))
                log(f"skipped {path}[{rec.index}]: {why}")
                continue
            seq[source] += 1
            det, table, labels = result.det, result.table, result.labels
            writer.add_det(det, table)
            stats = result.messages[-1].header
            if isinstance(stats, StatsHeader):
                writer.add_stats(stats)
            for ah in result.alerts:
                writer.add_alert(ah)
            report.alerts += len(result.alerts)
            models.add(det.model)
            name = names(path, rec.index, len(records))
            if outputs is not None:
                info = {"file": str(path), "index": rec.index, "modality": rec.modality}
                report.outputs += [
                    write_label_tiff(labels, outputs / f"{name}.labels.tif", image=rec.data,
                                     pixel_size_nm=px, properties=info),
                    write_rois(labels, table, outputs / f"{name}.rois.zip"),
                    write_overlay_png(rec.data, labels, outputs / f"{name}.overlay.png",
                                      pixel_size_nm=px,
                                      border_ids=table["id"][table["border"]].tolist()),
                ]
            report.images += 1
            report.particles += len(table)
            what = ""
            for stage, error in result.failures:  # the measurements stand without these
                log(f"{path}[{rec.index}]: {stage} failed: {error}")
            c = result.classification
            if c is not None:
                class_rows.append([str(path), rec.index, c.labels[0],
                                   round(c.probabilities[0], 4),
                                   None if c.novelty is None else round(c.novelty, 4),
                                   *(round(v, 4) for v in c.all.values())])
                what = f"; {c.labels[0]} ({c.probabilities[0]:.2f})"
                assert pipeline.classifier is not None
                models.add(pipeline.classifier.name)
            log(f"{path}[{rec.index}]: {len(table)} particles ({det.units}){what}")
        writer.flush()
        if bar is not None:
            bar.advance(note=path.name)
    writer.close()
    prov.update({"stopped_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "rows": dict(writer.counts), "models": sorted(models),
                 "engines": [pipeline.engine_name],
                 "model_provenance": model_entries(sorted(models), model_cards or {}),
                 "skipped": [[str(p), why] for p, why in report.skipped],
                 "uncalibrated": sorted({str(p) for p in report.uncalibrated})})
    writer.write_provenance(prov)
    if pipeline.classifier is not None:
        report.classes = out.with_suffix(".classes.csv")
        with report.classes.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "index", "top_class", "probability", "novelty",
                        *(f"p_{c}" for c in pipeline.classifier.classes)])
            w.writerows(class_rows)
    return report
