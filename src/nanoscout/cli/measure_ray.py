"""``nanoscout measure FILES... --ray [ADDRESS] --out FOLDER``: the archive on a Ray cluster.

The arguments it adds to ``measure`` and the command itself; the work is in
:mod:`nanoscout.batch.ray_measure`, the output layout in :mod:`nanoscout.batch.parts`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_ray_arguments", "run_on_ray"]


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker``."""
    g = p.add_argument_group("Ray (an archive on a cluster; --out is then a folder of Parquet "
                             "parts partitioned by input folder, resumable)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray: a cluster address (auto, ray://host:10001) or nothing to "
                        "start a local Ray on this machine")
    g.add_argument("--workers", type=int,
                   help="pipeline actors (default: one per CPU, or per GPU slot)")
    g.add_argument("--cpus-per-worker", type=int, default=1,
                   help="CPUs (ONNX Runtime threads) per actor")
    g.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per actor (e.g. 1 with --backend cuda)")


def run_on_ray(args: argparse.Namespace) -> int:
    """Run ``measure --ray``; exit code 0 when every file was measured, 1 otherwise."""
    from nanoscout.batch.offline import expand
    from nanoscout.batch.ray_measure import measure_on_ray
    from nanoscout.daemon.config import load_config
    from nanoscout.wire.errors import NanoscoutError

    if args.out.suffix.lower() in (".csv", ".parquet"):
        raise NanoscoutError(f"with --ray, --out is a folder (Parquet parts), not {args.out}")
    if args.masks is not None:
        raise NanoscoutError("--masks is not supported with --ray")
    config = load_config(args.config, {"engine.backend": args.backend, "engine.model": args.model,
                                       "engine.triton.url": args.triton_url,
                                       "engine.scale": args.scale, "engine.tta": args.tta})
    files = expand(args.files)
    report = measure_on_ray(files, config, args.out, address=args.ray or None,
                            workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                            gpus_per_worker=args.gpus_per_worker,
                            pixel_size_nm=args.pixel_size)
    print(f"measured {len(report.measured)} files ({report.images} images, {report.particles} "
          f"particles) on {report.workers} Ray workers in {report.seconds:.1f} s -> {args.out}; "
          f"skipped {len(report.skipped_done)} done, {len(report.unreadable)} unreadable, "
          f"{len(report.failed)} failed")
    for path, why in report.failed:
        print(f"failed: {path}: {why}")
    return 1 if report.failed or not (report.measured or report.skipped_done) else 0
