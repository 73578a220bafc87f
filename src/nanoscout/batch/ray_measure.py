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
started again on the same ``out`` skips every file that is done; one started while another
writes into ``out`` is refused (:func:`nanoscout.batch.parts.output_lock`). A worker's write
that fails fails its file (``failed``); where it failed for a reason every later write shares
(:data:`OUTPUT_FULL`: no space left, a quota reached, a read-only file system) the driver hands
out no more files, lets those in flight end, and ends the run in one NanoscoutError that says
how many files it measured, failed and did not start (``not_started``, measured by the next
run), as a failed write of the driver's own (``_run.json``) ends it. A file that fails for its
own reason (unreadable, corrupt, its part's name taken) fails alone and the run goes on.

Provenance: the driver writes ``OUT/_run.json`` (:func:`nanoscout.batch.parts.write_provenance`),
the record ``nanoscout measure`` writes (:func:`nanoscout.batch.offline.measure_provenance` and
:func:`~nanoscout.batch.offline.measure_outcome`: software, the configuration the workers run,
the overrides, the models with their sha256 and sizing error, skipped and uncalibrated files),
plus ``ray`` (``address``: the GCS address, ``host:port``, of the cluster the work ran on, as
Ray reports it; ``address_requested``: the caller's ``address``, None for a local Ray;
``started_here``: whether this call started Ray, False where the caller had already joined a
cluster, whose address is then the one recorded whatever was asked; workers, CPUs and GPUs per
worker, retries, the cluster's resources, the number of partitions), ``failed`` and
``done_before`` (files an earlier run measured); a
run started again on ``out`` keeps the earlier runs' records under ``earlier_runs``, so which
models made which parts stays known. It is written once the workers are up and again at the
end; a run with nothing to do leaves it as it was.

Why actors and not Ray Data: the unit of work, of output and of resumption is one input file,
read by path; Ray Data's readers yield bytes or rows and ``write_parquet`` names its files per
block, so neither exactness after a crash nor skipping done files would come for free.

With no address, a local Ray is started on this machine (``num_cpus`` slots, default all
cores) and stopped at the end; an address (``auto``, ``ray://host:10001``) joins a cluster,
whose workers need nanoscout installed and the input and output paths mounted alike.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.classifier import Classification
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.batch.offline import measure_outcome, measure_provenance
from nanoscout.batch.parts import (
    PROVENANCE,
    FileResult,
    ImageRow,
    clean_temporary,
    done_files,
    earlier_runs,
    output_lock,
    partition_folder,
    write_file_result,
    write_provenance,
)
from nanoscout.clients.acquisition.readers import (
    ImageRecord,
    frame_modality,
    read_images,
    wire_array,
)
from nanoscout.clients.progress import Bar
from nanoscout.clients.progress import progress as progress_bar
from nanoscout.clients.provenance import model_name
from nanoscout.daemon.config import ServeConfig
from nanoscout.wire.codec import wire_text
from nanoscout.wire.errors import ConfigError, NanoscoutError, ReaderError

__all__ = ["OUTPUT_FULL", "RayReport", "analyse_image", "measure_file", "measure_on_ray",
           "worker_config"]

log = logging.getLogger("nanoscout.batch")

RAY_MISSING = "Ray is not installed: pip install 'nanoscout[ray]'"

#: errnos of a worker's failed write that every later write into the output would meet too
#: (no space left, a disk quota reached, a read-only file system): the run stops handing out
#: files (in the audit a full disk had 76 of 100 files analysed in vain before the run ended)
OUTPUT_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def analyse_image(pipeline: Pipeline, rec: ImageRecord, pixel_size_nm: float | None,
                  modality: str | None = None
                  ) -> tuple[np.ndarray, str, Classification | None, list[str]]:
    """The one call into the pipeline: (particle table, units "nm" or "px", classification or
    None, the models that analysed it) of one image, as ``nanoscout measure`` analyses it (an
    offline frame; the modality from ``modality``, else from the file when it names one the
    frame header knows). Models are named as the provenance names them
    (:func:`~nanoscout.clients.provenance.model_name`: the detector's ``name:version@SHA12``,
    then the classifier's, when it classified the image).

    Kept alone so that a change of the pipeline's entry point changes one place here.
    """
    # float16 and 64-bit integer pixels converted without loss, as `measure` converts them
    frame = Frame.from_image(wire_array(rec.data), pixel_size_nm=pixel_size_nm, source="ray",
                             modality=frame_modality(rec, modality))
    result = pipeline.process(frame)
    models = [model_name(result.det.model, result.det.model_sha256)]
    if result.classification is not None and pipeline.classifier is not None:
        models.append(pipeline.classifier.name)
    return result.table, result.det.units, result.classification, models


def measure_file(pipeline: Pipeline, path: Path, pixel_size_nm: float | None = None,
                 file: str | None = None, modality: str | None = None) -> FileResult:
    """Every image of one file measured (and classified, when the pipeline classifies).

    ``pixel_size_nm`` overrides the file's calibration, ``modality`` its kind of image;
    ``file`` is the name written in the
    output (default ``str(path)``). An unreadable file or image is recorded with its error,
    never raised: one bad file must not stop an archive. The result's ``models`` name the
    models that measured its images.
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
            table, units, c, models = analyse_image(pipeline, rec, px, modality)
        # ValueError: pydantic's, a frame header field; MemoryError: one image too large for
        # this worker. Both skip the image, as `measure` skips it, not the whole file
        except (NanoscoutError, ValueError, MemoryError) as exc:
            why = " ".join(str(exc).split()) or type(exc).__name__
            result.images.append(ImageRow(rec.index, units, px, None, error=why))
            continue
        result.models.update(models)
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
        """Measure one file and write its parts; returns a short summary (with what the
        provenance needs: the models and engine that measured it, the rows written, whether
        an image had no calibration)."""
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
                "image_rows": max(1, len(result.images)),  # a file not read: one row
                "models": sorted(result.models), "engine": self.pipeline.engine_name,
                "uncalibrated": any(im.units == "px" for im in result.images),
                "pid": os.getpid(), "seconds": time.perf_counter() - t0}


@dataclass
class RayReport:
    """What :func:`measure_on_ray` did: files measured now, skipped as done, failed, and not
    started (``not_started``: the output could take no more, :data:`OUTPUT_FULL`).

    ``images``: images measured; ``unreadable``: (file, why) for each file that could not be
    read and each image that could not be measured (what ``measure`` counts as skipped);
    ``uncalibrated``: files with an image in px; ``models`` and ``engines``: those that
    measured; ``image_rows``: rows written to the images table; ``provenance``: the
    ``_run.json`` written (None: nothing was measured, it was left as it was).
    """

    measured: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    not_started: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0
    particles: int = 0
    workers: int = 0
    seconds: float = 0.0
    worker_pids: list[int] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    engines: set[str] = field(default_factory=set)
    image_rows: int = 0
    provenance: Path | None = None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(RAY_MISSING) from exc
    return ray


def _cluster_address(ray: Any) -> str | None:
    """The GCS address (``host:port``) of the Ray cluster this process is connected to, as Ray
    reports it (:meth:`ray.runtime_context.RuntimeContext.gcs_address`; through a Ray client
    too), or None when Ray cannot say (logged)."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except (AttributeError, ConnectionError, RuntimeError) as exc:
        log.warning("Ray does not report the address of its cluster (%s): _run.json records "
                    "none", exc)
        return None


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
    model_cards: Mapping[str, Mapping[str, Any]] | None = None,
) -> RayReport:
    """Measure ``paths`` (files, in order) on Ray into ``out`` (see :mod:`nanoscout.batch.parts`).

    ``address``: a running cluster (None: start a local Ray with ``num_cpus`` slots). Where this
    process has already initialised Ray, the work runs on that cluster whatever ``address``
    says (a warning names both when one was given), and the provenance records that cluster's
    address. ``workers``: actors (default: the cluster's CPUs //
    ``cpus_per_worker``, or its GPUs // ``gpus_per_worker``); each runs ONNX Runtime with
    ``cpus_per_worker`` threads. ``on_started`` gets the report once the actors are up (their
    pids in ``worker_pids``); ``on_file`` gets each finished file's summary. ``progress``: a
    progress bar on stderr (None: when stderr is a terminal). ``model_cards``: card summaries
    (:func:`nanoscout.clients.provenance.load_cards`) for the provenance's models (their
    sha256 and sizing error), written to ``out/_run.json`` (see the module docstring).

    Raises ConfigError, before anything is measured, when a file is listed twice or another run
    is writing into ``out`` (its host and pid named), and NanoscoutError, saying how many files
    this run measured, failed and did not start, when the driver cannot write into ``out`` (a
    full disk, a read-only folder) or a worker's write failed for a reason every later write
    would meet (:data:`OUTPUT_FULL`; the files in flight end first, no new one is started).
    """
    if cpus_per_worker < 1 or gpus_per_worker < 0 or max_task_retries < 0:
        raise ConfigError(f"cpus_per_worker ({cpus_per_worker}) must be >= 1, gpus_per_worker "
                          f"({gpus_per_worker}) and max_task_retries ({max_task_retries}) >= 0")
    t0 = time.perf_counter()
    report = RayReport()
    files = [str(p) for p in paths]
    twice = [f for f, n in Counter(files).items() if n > 1]
    if twice:
        raise ConfigError(f"{twice[0]} is listed twice"
                          + (f" ({len(twice) - 1} more files too)" if len(twice) > 1 else ""))
    earlier_runs(out)  # before anything starts: a folder not ours is refused
    ray = _import_ray()
    with _driver_write(out, report):
        out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # one run into `out` at a time: another one is refused
        earlier = earlier_runs(out)  # read under the lock: a run that ended meanwhile is in it
        with _driver_write(out, report):
            removed = clean_temporary(out)
        if removed:
            log.info("removed %d temporary file(s) a killed worker or driver left in %s", removed,
                     out)
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
                ray.init(address=address or "local",
                         num_cpus=num_cpus if address is None else None,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise ConfigError(f"cannot start or reach {where}: {exc}") from exc
        actors: list[Any] = []
        try:
            cluster = _cluster_address(ray)
            if address is not None and not started_here:
                log.warning("Ray was already initialised in this process: measuring on the "
                            "cluster it joined (GCS %s); the address %s is not used", cluster,
                            address)
            resources = ray.cluster_resources()
            if workers is None:
                workers = (int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker
                           else int(resources.get("CPU", 1) // cpus_per_worker))
            workers = max(1, min(workers, len(todo)))
            actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                               max_restarts=-1, max_task_retries=max_task_retries)(_Worker)
            run_config = worker_config(config, cpus_per_worker)
            actors += [actor.remote(run_config, str(out.absolute()), pixel_size_nm, modality)
                       for _ in range(workers)]
            report.workers = workers
            report.worker_pids = ray.get([a.pid.remote() for a in actors])
            # paths as the parts' `file` column names them (a name not UTF-8: escapes)
            record = measure_provenance("nanoscout measure --ray", map(wire_text, files),
                                        config=run_config.model_dump(mode="json"),
                                        pixel_size_nm=pixel_size_nm, modality=modality)
            record["ray"] = {
                # the cluster the work ran on: the address asked for is not it where the
                # caller had joined one already (it is ignored then), nor is "local" an address
                "address": cluster, "address_requested": address, "started_here": started_here,
                "workers": workers,
                "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
                "max_task_retries": max_task_retries,
                "cluster_resources": {k: resources[k] for k in ("CPU", "GPU") if k in resources},
                # one partition folder per input folder (folder=... under particles/, images/)
                "partitions": len({partition_folder(Path(f).absolute().parent) for f in files})}
            # what one commit of the run holds, as measure's record says it: here one file's
            # parts each (they mark the file done for a resumed run); no time bound
            record.update(batch_files=1, batch_s=None)
            record["done_before"] = [wire_text(f) for f in report.skipped_done]
            record["earlier_runs"] = earlier
            with _driver_write(out, report):
                report.provenance = write_provenance(out, record)
            if on_started is not None:
                on_started(report)
            with progress_bar("measuring on Ray", total=len(files), enabled=progress) as bar:
                bar.advance(len(done))
                full = _run(ray, actors, todo, report, on_file, bar)
            if full is not None:
                # `_run.json` keeps the record written at the start (a write now would most
                # likely fail too); temporary parts are removed where the folder lets us
                with contextlib.suppress(OSError):
                    clean_temporary(out)
                raise NanoscoutError(_stopped(out, report, full)) from full
            record.update(measure_outcome(
                rows={"particles": report.particles, "images": report.image_rows},
                models=report.models, engines=sorted(report.engines), model_cards=model_cards,
                skipped=[(wire_text(f), why) for f, why in report.unreadable],
                uncalibrated=map(wire_text, report.uncalibrated)))
            record["failed"] = [[wire_text(f), why] for f, why in report.failed]
            with _driver_write(out, report):
                write_provenance(out, record)
                # every task has returned: a temporary part left now is a killed worker's,
                # whose file was measured again by the retry (or is listed as failed)
                removed = clean_temporary(out)
            if removed:
                log.info("removed %d temporary part(s) of killed workers in %s", removed, out)
        finally:
            # an error's traceback holds `actors`: their slots would stay taken on a cluster
            # this call joined (a notebook keeps the last traceback) until it is dropped
            for a in actors:
                with contextlib.suppress(ray.exceptions.RayError, ConnectionError, ValueError):
                    ray.kill(a)  # never hides the error that ends the run
            if started_here:
                ray.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _driver_write(out: Path, report: RayReport) -> Iterator[None]:
    """The driver's own writes into ``out`` (its folder, ``_run.json``, temporary parts
    removed): one that fails (a full disk, a folder made read-only) becomes one
    NanoscoutError that says what the run did and what ``out`` holds. A worker's write that
    fails fails its file only (``failed``)."""
    try:
        yield
    except OSError as exc:
        raise NanoscoutError(_stopped(out, report, exc)) from exc


def _stopped(out: Path, report: RayReport, exc: OSError) -> str:
    """The one line a run that cannot write into ``out`` ends with: why, and how many files it
    measured, failed and did not start (the last two are measured by a run started again)."""
    not_started = (f", {len(report.not_started)} not started (a run started again measures "
                   "these and the failed)" if report.not_started else "")
    why = os.strerror(exc.errno) if exc.errno else exc.strerror or exc  # pyarrow's is long
    return (f"cannot write {out}: {why}; this run measured {len(report.measured)} "
            f"files (their parts are written: a run started again skips them) and "
            f"{len(report.failed)} failed{not_started}; {out / PROVENANCE} does not record this "
            "run's outcome")


def _run(ray: Any, actors: list[Any], todo: list[str], report: RayReport,
         on_file: Callable[[dict[str, Any]], None] | None, bar: Bar) -> OSError | None:
    """Hand out files, one in flight per actor, until all are done or failed; returns None, or
    the first worker's write error of :data:`OUTPUT_FULL`, after which no file was handed out
    (the files in flight ended; those never started are in ``report.not_started``)."""
    pending = list(reversed(todo))
    running: dict[Any, tuple[Any, str]] = {}
    full: OSError | None = None

    def submit(a: Any) -> None:
        if pending and full is None:
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
            if full is None and isinstance(cause, OSError) and cause.errno in OUTPUT_FULL:
                full = cause
                log.error("the output takes no more (%s): no more files handed out, %d not "
                          "started", os.strerror(cause.errno), len(pending))
        else:
            report.measured.append(path)
            report.images += summary["images"]
            report.particles += summary["particles"]
            report.unreadable += [(path, why) for why in summary["errors"]]
            report.image_rows += summary["image_rows"]
            report.models.update(summary["models"])
            report.engines.add(summary["engine"])
            if summary["uncalibrated"]:
                report.uncalibrated.append(path)
            if on_file is not None:
                on_file(summary)
        bar.advance(note=Path(path).name)
        submit(a)
    report.not_started = list(reversed(pending)) if full is not None else []
    return full
