"""``nanoscout measure FILES... --ray [--ray-address ADDRESS] --out FOLDER``: the archive on Ray.

The command's body; the work is in :mod:`nanoscout.batch.ray_measure`, the output layout in
:mod:`nanoscout.batch.parts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nanoscout.daemon.config import ServeConfig
from nanoscout.wire.errors import NanoscoutError

__all__ = ["run_on_ray"]


def run_on_ray(files: Sequence[Path], out: Path, config: ServeConfig, *, address: str | None,
               workers: int | None, cpus_per_worker: int, gpus_per_worker: float,
               pixel_size_nm: float | None, progress: bool | None,
               modality: str | None = None,
               model_cards: Mapping[str, Mapping[str, Any]] | None = None) -> int:
    """Run ``measure --ray``; returns the exit code: 0 when every file was measured (or was
    done already), 1 otherwise. ``address`` None starts a local Ray. ``model_cards``: for the
    provenance (``OUT/_run.json``), as ``measure`` takes them."""
    from nanoscout.batch.offline import expand
    from nanoscout.batch.ray_measure import measure_on_ray
    from nanoscout.wire.codec import printable

    if out.suffix.lower() in (".csv", ".parquet"):
        raise NanoscoutError(f"with --ray, --out is a folder of Parquet parts, not {out}")
    # each file once (a folder and a link to it, a file inside a folder given: one file)
    listed = expand(files, lambda message: print(printable(message)))
    report = measure_on_ray(listed, config, out, address=address,
                            workers=workers, cpus_per_worker=cpus_per_worker,
                            gpus_per_worker=gpus_per_worker, pixel_size_nm=pixel_size_nm,
                            modality=modality, progress=progress, model_cards=model_cards)
    print(f"measured {len(report.measured)} files ({report.images} images, {report.particles} "
          f"particles) on {report.workers} Ray workers in {report.seconds:.1f} s -> {out}; "
          f"skipped {len(report.skipped_done)} done, {len(report.unreadable)} unreadable, "
          f"{len(report.failed)} failed")
    for path, why in report.failed:
        print(printable(f"failed: {path}: {why}"))
    return 1 if report.failed or not (report.measured or report.skipped_done) else 0
