"""``nanoscout measure FILES... --ray``: the daemon's pipeline over an archive, on Ray.

One Ray actor per worker slot (a CPU, or a GPU with ``gpus_per_worker``) builds the pipeline
once (:func:`nanoscout.daemon.app.build_pipeline`, the same configuration as ``nanoscout
measure``) and then measures one file per task: it reads the file itself, in the worker
(:func:`nanoscout.clients.acquisition.readers.read_images`: vendor formats need a path, and
the driver never holds pixels), runs every image through the pipeline and writes the file's
two Parquet parts (:mod:`nanoscout.batch.parts`, partitioned by input folder). The driver only
hands out paths, at most one in flight per actor, and draws a progress bar.

Crash safety: actors restart after their process dies (``max_restarts``) and the file they held
is retried (``max_task_retries`` times, then reported as failed and left for the next run);
parts are written atomically, so a killed worker neither loses nor duplicates a file. A run
started again on the same ``out`` skips every file that is done.

Why actors and not Ray Data: the unit of work, of output and of resumption is one input file,
read by path; Ray Data's readers yield bytes or rows and ``write_parquet`` names its files per
block, so neither exactness after a crash nor skipping done files would come for free.

With no address, a local Ray is started on this machine (``num_cpus`` slots, default all
cores) and stopped at the end; an address (``auto``, ``ray://host:10001``) joins a cluster,
whose workers need nanoscout installed and the input and output paths mounted alike.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.classifier import Classification
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.batch.parts import (
    FileResult,
    ImageRow,
    clean_temporary,
    done_files,
    write_file_result,
)
from nanoscout.clients.acquisition.readers import (
    ImageRecord,
    frame_modality,
    read_images,
    wire_array,
)
from nanoscout.clients.progress import Bar
from nanoscout.clients.progress import progress as progress_bar
from nanoscout.daemon.config import ServeConfig
from nanoscout.wire.errors import ConfigError, NanoscoutError, ReaderError

__all__ = ["RayReport", "analyse_image", "measure_file", "measure_on_ray", "worker_config"]

log = logging.getLogger("nanoscout.batch")

RAY_MISSING = "Ray is not installed: pip install 'nanoscout[ray]'"


def analyse_image(pipeline: Pipeline, rec: ImageRecord, pixel_size_nm: float | None,
                  modality: str | None = None
                  ) -> tuple[np.ndarray, str, Classification | None]:
    """The one call into the pipeline: (particle table, units "nm" or "px", classification or
    None) of one image, as ``nanoscout measure`` analyses it (an offline frame; the modality
    from ``modality``, else from the file when it names one the frame header knows).

    Kept alone so that a change of the pipeline's entry point changes one place here.
    """
    # float16 and 64-bit integer pixels converted without loss, as `measure` converts them
    frame = Frame.from_image(wire_array(rec.data), pixel_size_nm=pixel_size_nm, source="ray",
                             modality=frame_modality(rec, modality))
    result = pipeline.process(frame)
    return result.table, result.det.units, result.classification


def measure_file(pipeline: Pipeline, path: Path, pixel_size_nm: float | None = None,
                 file: str | None = None, modality: str | None = None) -> FileResult:
    """Every image of one file measured (and classified, when the pipeline classifies).

    ``pixel_size_nm`` overrides the file's calibration, ``modality`` its kind of image;
    ``file`` is the name written in the
    output (default ``str(path)``). An unreadable file or image is recorded with its error,
    never raised: one bad file must not stop an archive.
    """
    result = FileResult(file if file is not None else str(path))
    try:
        records = read_images(path)
    except ReaderError as exc:
        result.error = str(exc)
        return result
    for rec in records:
        px = pixel_size_nm if pixel_size_nm is not None else rec.pixel_size_nm
        units = "nm" if px else "px"
        try:
            table, units, c = analyse_image(pipeline, rec, px, modality)
        # ValueError: pydantic's, a frame header field; MemoryError: one image too large for
        # this worker. Both skip the image, as `measure` skips it, not the whole file
        except (NanoscoutError, ValueError, MemoryError) as exc:
            why = " ".join(str(exc).split()) or type(exc).__name__
            result.images.append(ImageRow(rec.index, units, px, None, error=why))
            continue
        row = ImageRow(rec.index, units, px, table)
        if c is not None:
            row.top_class, row.probability = c.labels[0], float(c.probabilities[0])
            row.novelty = None if c.novelty is None else float(c.novelty)
        result.images.append(row)
    return result


def worker_config(config: ServeConfig, cpus_per_worker: int) -> ServeConfig:
    """What each actor runs: ``config`` with ``cpus_per_worker`` engine threads and no
    morphology clusters (an online k-means over one ordered stream: files measured in parallel
    have no order, so its ``cluster`` column is left unassigned, 255)."""
    eng = config.engine.model_copy(update={"threads": cpus_per_worker})
    clusters = config.clusters.model_copy(update={"enabled": False})
    return config.model_copy(update={"engine": eng, "clusters": clusters})


class _Worker:
    """A Ray actor: one pipeline, one file per call (see the module docstring)."""

    def __init__(self, config: ServeConfig, out: str, pixel_size_nm: float | None,
                 modality: str | None = None) -> None:
        from nanoscout.daemon.app import build_pipeline

        self.pipeline = build_pipeline(config, offline=True)
        self.out = Path(out)
        self.pixel_size_nm = pixel_size_nm
        self.modality = modality

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def measure(self, path: str) -> dict[str, Any]:
        """Measure one file and write its parts; returns a short summary."""
        t0 = time.perf_counter()
        result = measure_file(self.pipeline, Path(path), self.pixel_size_nm, file=path,
                              modality=self.modality)
        write_file_result(self.out, result)
        # "images": those measured; "errors": the file's, else each image's it could not
        # measure (counted as `measure` counts its skipped)
        errors = [result.error] if result.error else [
            f"[{im.index}] {im.error}" for im in result.images if im.error]
        return {"file": path, "images": sum(im.table is not None for im in result.images),
                "particles": result.particles, "error": result.error, "errors": errors,
                "pid": os.getpid(), "seconds": time.perf_counter() - t0}


@dataclass
class RayReport:
    """What :func:`measure_on_ray` did: files measured now, skipped as done, failed.

    ``images``: images measured; ``unreadable``: (file, why) for each file that could not be
    read and each image that could not be measured (what ``measure`` counts as skipped).
    """

    measured: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0
    particles: int = 0
    workers: int = 0
    seconds: float = 0.0
    worker_pids: list[int] = field(default_factory=list)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(RAY_MISSING) from exc
    return ray


def measure_on_ray(
    paths: Sequence[Path],
    config: ServeConfig,
    out: Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
    pixel_size_nm: float | None = None,
    modality: str | None = None,
    max_task_retries: int = 2,
    on_started: Callable[[RayReport], None] | None = None,
    on_file: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = False,
) -> RayReport:
    """Measure ``paths`` (files, in order) on Ray into ``out`` (see :mod:`nanoscout.batch.parts`).

    ``address``: a running cluster (None: start a local Ray with ``num_cpus`` slots, or use the
    one this process already started). ``workers``: actors (default: the cluster's CPUs //
    ``cpus_per_worker``, or its GPUs // ``gpus_per_worker``); each runs ONNX Runtime with
    ``cpus_per_worker`` threads. ``on_started`` gets the report once the actors are up (their
    pids in ``worker_pids``); ``on_file`` gets each finished file's summary. ``progress``: a
    progress bar on stderr (None: when stderr is a terminal).
    """
    ray = _import_ray()
    if cpus_per_worker < 1 or gpus_per_worker < 0 or max_task_retries < 0:
        raise ConfigError(f"cpus_per_worker ({cpus_per_worker}) must be >= 1, gpus_per_worker "
                          f"({gpus_per_worker}) and max_task_retries ({max_task_retries}) >= 0")
    t0 = time.perf_counter()
    report = RayReport()
    files = [str(p) for p in paths]
    if len(set(files)) != len(files):
        raise ConfigError("the same file is listed twice")
    out.mkdir(parents=True, exist_ok=True)
    removed = clean_temporary(out)
    if removed:
        log.info("removed %d temporary part(s) a killed worker left in %s", removed, out)
    done = done_files(out, files)
    report.skipped_done = [f for f in files if f in done]
    todo = [f for f in files if f not in done]
    if not todo:
        report.seconds = time.perf_counter() - t0
        return report

    started_here = not ray.is_initialized()
    if started_here:
        try:
            # "local" always starts a new Ray here: None would join whatever cluster
            # `ray start` last left on this machine (/tmp/ray/ray_current_cluster)
            ray.init(address=address or "local", num_cpus=num_cpus if address is None else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise ConfigError(f"cannot start or reach {where}: {exc}") from exc
    try:
        resources = ray.cluster_resources()
        if workers is None:
            workers = (int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker
                       else int(resources.get("CPU", 1) // cpus_per_worker))
        workers = max(1, min(workers, len(todo)))
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                           max_restarts=-1, max_task_retries=max_task_retries)(_Worker)
        actors = [actor.remote(worker_config(config, cpus_per_worker), str(out.absolute()),
                               pixel_size_nm, modality)
                  for _ in range(workers)]
        report.workers = workers
        report.worker_pids = ray.get([a.pid.remote() for a in actors])
        if on_started is not None:
            on_started(report)
        with progress_bar("measuring on Ray", total=len(files), enabled=progress) as bar:
            bar.advance(len(done))
            _run(ray, actors, todo, report, on_file, bar)
        # every task has returned: a temporary part left now is a killed worker's, whose file
        # was measured again by the retry (or is listed as failed)
        removed = clean_temporary(out)
        if removed:
            log.info("removed %d temporary part(s) of killed workers in %s", removed, out)
    finally:
        if started_here:
            ray.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


def _run(ray: Any, actors: list[Any], todo: list[str], report: RayReport,
         on_file: Callable[[dict[str, Any]], None] | None, bar: Bar) -> None:
    """Hand out files, one in flight per actor, until all are done or failed."""
    pending = list(reversed(todo))
    running: dict[Any, tuple[Any, str]] = {}

    def submit(a: Any) -> None:
        if pending:
            path = pending.pop()
            running[a.measure.remote(path)] = (a, path)

    for a in actors:
        submit(a)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        a, path = running.pop(ref)
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the actor died more often than retried
            # a task's own error is its cause (the error's text starts with ray's coloured
            # banner, not the cause)
            cause = getattr(exc, "cause", None) or exc
            report.failed.append((path, f"{type(cause).__name__}: {cause}".splitlines()[0]))
            log.error("%s failed on Ray (left for the next run): %s", path, exc)
        else:
            report.measured.append(path)
            report.images += summary["images"]
            report.particles += summary["particles"]
            report.unreadable += [(path, why) for why in summary["errors"]]
            if on_file is not None:
                on_file(summary)
        bar.advance(note=Path(path).name)
        submit(a)
