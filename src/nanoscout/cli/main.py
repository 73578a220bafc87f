"""The ``nanoscout`` command line.

This module is the composition root: besides the protocol and transport it may start the
daemon (:mod:`nanoscout.daemon.app`) and run its pipeline offline. Every other client module talks to
the daemon only over ZeroMQ (import-linter checks this, see pyproject.toml).

Subcommands: serve, simulate, microscope, search, replay, tail, record, report, measure, demo,
keys, lens, models
(train / export / eval of the detector, train-/eval-classifier, train-/eval-lens; export-triton
writes a Triton model repository of the shipped models).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoscout.wire.errors import NanoscoutError
from nanoscout.wire.transport import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_QUERY_ENDPOINT,
    DEFAULT_RESULT_ENDPOINT,
    ClientKeys,
    create_keys,
)


def _serve(args: argparse.Namespace) -> int:
    from nanoscout.daemon.app import ready_line, serve
    from nanoscout.daemon.config import load_config

    overrides: dict[str, Any] = {
        "input.endpoint": args.input,
        "input.policy": args.policy,
        "input.max_frame_bytes": args.max_frame_bytes,
        "input.queue_size": args.queue_size,
        "output.endpoint": args.output,
        "query.endpoint": args.query,
        "engine.backend": args.backend,
        "engine.triton.url": args.triton_url,
        "engine.model": args.model,
        "engine.threads": args.threads,
        "engine.scale": args.scale,
        "metrics.port": args.metrics_port,
        "health.interval_s": args.health_interval,
    }
    if args.no_metrics:
        overrides["metrics.enabled"] = False
    config = load_config(args.config, overrides)

    def ready(endpoints: Any) -> None:
        line = ready_line(endpoints)
        print(line, flush=True)
        if endpoints.metrics_url:
            print(f"metrics: {endpoints.metrics_url}", flush=True)
        if args.ready_file:
            Path(args.ready_file).write_text(line + "\n", encoding="utf-8")

    serve(config, on_ready=ready)
    return 0


def _curve(args: argparse.Namespace) -> ClientKeys | None:
    if (args.server_key is None) != (args.client_key is None):
        raise NanoscoutError("CURVE needs both --server-key and --client-key")
    return None if args.server_key is None else ClientKeys(args.server_key, args.client_key)


def _add_curve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-key", type=Path, help="the daemon's public CURVE certificate (.key)")
    p.add_argument("--client-key", type=Path, help="this client's secret CURVE certificate (.key_secret)")


def _keys(args: argparse.Namespace) -> int:
    public, secret = create_keys(args.folder, args.name)
    print(f"public key: {public} (give it to the other side)\nsecret key: {secret} (keep it here)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from nanoscout.clients.acquisition.simulator import SimulatorOptions, run_simulator

    opts = SimulatorOptions(
        endpoint=args.connect,
        mode=args.mode,
        source=args.source,
        rate_hz=args.rate or None,
        frames=args.frames,
        shape=(args.size, args.width or args.size),
        dtype=args.dtype,
        pixel_size_nm=args.pixel_size,
        modality=args.modality,
        median_diameter_nm=args.diameter,
        dose_e_per_px=args.dose or None,
        support_grains=args.support_grains,
        seed=args.seed,
        fields=args.fields,
        dwell=args.dwell,
        drift_px_per_frame=(args.drift[1], args.drift[0]),
        insitu=args.insitu,
        truth_dir=args.truth_dir,
        calibrated=not args.uncalibrated,
        curve=_curve(args),
    )
    run_simulator(opts)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from nanoscout.clients.acquisition.publisher import FramePublisher
    from nanoscout.clients.acquisition.replay import replay_files, replay_watch

    with FramePublisher(args.connect, mode=args.mode, source=args.source, curve=_curve(args)) as pub:
        if args.watch:
            stop = threading.Event()
            try:
                report = replay_watch(
                    args.watch, pub, patterns=tuple(args.pattern or ["*"]),
                    pixel_size_nm=args.pixel_size, modality=args.modality, stop=stop,
                )
            except KeyboardInterrupt:
                stop.set()
                return 0
        else:
            report = replay_files(
                args.files, pub, rate_hz=args.rate or None, loop=args.loop,
                pixel_size_nm=args.pixel_size, modality=args.modality,
            )
        pub.close(linger_ms=10_000 if args.mode == "push" else 0)
    print(f"replay: sent {report.sent} frames, skipped {len(report.skipped)} files, "
          f"{len(report.uncalibrated)} uncalibrated")
    return 0


def _tail(args: argparse.Namespace) -> int:
    from nanoscout.clients.tail import run_tail

    run_tail(args.connect, duration=args.duration, curve=_curve(args))
    return 0


def _record(args: argparse.Namespace) -> int:
    from nanoscout.clients.recorder import record

    prov = record(args.connect, args.out, source=args.source, frames=args.frames,
                  duration=args.duration, batch_frames=args.batch_frames,
                  batch_seconds=args.batch_seconds, curve=_curve(args))
    rows = prov["rows"]
    print(f"recorded {rows['frames']} frames, {rows['particles']} particles, {rows['alerts']} "
          f"alerts to {args.out}; missed results: {prov['missed_results'] or 'none'}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    import json

    from nanoscout.clients.dashboard import run_dashboard

    endpoints = args.connect or [DEFAULT_RESULT_ENDPOINT]
    # a dashboard of the local daemon's defaults also gets its default query socket
    query = args.query or (None if args.connect else DEFAULT_QUERY_ENDPOINT)

    def ready(url: str) -> None:
        print(f"dashboard: {url}", flush=True)
        print("NANOSCOUT-READY " + json.dumps({"dashboard": url, "results": endpoints,
                                               "query": query}), flush=True)

    return run_dashboard(endpoints, host=args.host, port=args.port, curve=_curve(args),
                         query=query, on_ready=ready)


def _report(args: argparse.Namespace) -> int:
    from nanoscout.clients.report import main as report_main

    return int(report_main([str(args.run), *(["--out", str(args.out)] if args.out else [])])
               or 0)


def _measure(args: argparse.Namespace) -> int:
    from nanoscout.batch.offline import measure_files
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import load_config

    if args.ray is not None:
        from nanoscout.cli.measure_ray import run_on_ray

        return run_on_ray(args)
    config = load_config(args.config, {"engine.backend": args.backend, "engine.model": args.model,
                                       "engine.triton.url": args.triton_url,
                                       "engine.scale": args.scale,
                                       "engine.tta": args.tta})
    pipeline = build_pipeline(config)
    report = measure_files(args.files, pipeline, args.out, masks=args.masks, pixel_size_nm=args.pixel_size)
    print(f"measured {report.images} images, {report.particles} particles -> {args.out}; "
          f"skipped {len(report.skipped)}")
    return 1 if report.images == 0 else 0


def _microscope(args: argparse.Namespace) -> int:
    from nanoscout.clients.microscope.command import run

    return run(args, _curve(args))


def _search(args: argparse.Namespace) -> int:
    from nanoscout.clients.search.command import run

    return run(args, _curve(args))


def _demo(args: argparse.Namespace) -> int:
    from nanoscout.cli.demo import run_demo

    return run_demo(duration=None if args.forever else args.duration, size=args.size,
                    rate_hz=args.rate, policy=args.policy, config=args.config)


def _model_action(action: str) -> Any:
    """The ``main(argv)`` of ``nanoscout models ACTION`` (imported here: training needs torch)."""
    main: Callable[[list[str] | None], int | None]
    if action == "train":
        from nanoscout.training.train import main
    elif action == "export":
        from nanoscout.training.export import main
    elif action == "eval":
        from nanoscout.training.evaluate import main
    elif action == "train-classifier":
        from nanoscout.training.train_classifier import main
    elif action == "eval-classifier":
        from nanoscout.training.evaluate_classifier import main
    elif action == "train-lens":
        from nanoscout.training.train_lens import main
    elif action == "eval-lens":
        from nanoscout.training.evaluate_lens import main
    elif action == "export-triton":  # no torch: the shipped ONNX files as they are
        from nanoscout.cli.export_triton import main
    else:
        raise NanoscoutError(f"unknown models action {action!r}")
    return main


#: ``nanoscout models ACTION`` choices
_MODEL_ACTIONS = ("train", "export", "eval", "train-classifier", "eval-classifier", "train-lens",
                  "eval-lens", "export-triton")


def _lens(args: argparse.Namespace) -> int:
    from nanoscout.batch.lens import main as lens_main

    return int(lens_main(args.rest) or 0)


def _models(args: argparse.Namespace) -> int:
    try:
        action_main = _model_action(args.action)
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            raise NanoscoutError(
                "training and export need PyTorch: pip install torch==2.13.0 && pip install -e '.[train]'"
            ) from exc
        raise
    sys.argv[0] = f"nanoscout models {args.action}"  # argparse's prog in the action's --help
    return int(action_main(args.rest) or 0)


def _scale_arg(text: str) -> float | str:
    """``--scale``: a resample factor (working px per frame px) or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``nanoscout``."""
    p = argparse.ArgumentParser(prog="nanoscout", description="live analysis for electron microscopes")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the inference daemon")
    s.add_argument("--config", type=Path, help="TOML configuration file")
    s.add_argument("--input", help=f"frame endpoint to bind (default {DEFAULT_FRAME_ENDPOINT}; port 0 = any)")
    s.add_argument("--output", help=f"result endpoint to bind (default {DEFAULT_RESULT_ENDPOINT})")
    s.add_argument("--query", help="lens query endpoint to bind (REP; default "
                   "tcp://127.0.0.1:5557)")
    s.add_argument("--policy", choices=["live", "lossless"])
    s.add_argument("--backend",
                   help="auto | tensorrt | onnxruntime-cuda | onnxruntime-cpu | triton")
    s.add_argument("--triton-url", help="with --backend triton: the Triton server's gRPC "
                   "endpoint, host:port (default [engine.triton] url, 127.0.0.1:8001)")
    s.add_argument("--model", type=Path, help="ONNX detector (model card beside it, .json)")
    s.add_argument("--threads", type=int, help="engine CPU threads")
    s.add_argument("--scale", type=_scale_arg,
                   help="working px per frame px, or 'auto' (default: the model card's)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (0 = any free port)")
    s.add_argument("--no-metrics", action="store_true")
    s.add_argument("--max-frame-bytes", type=int)
    s.add_argument("--queue-size", type=int)
    s.add_argument("--health-interval", type=float)
    s.add_argument("--ready-file", type=Path, help="also write the readiness line to this file")
    s.set_defaults(func=_serve)

    s = sub.add_parser("simulate", help="virtual microscope: stream synthetic frames")
    s.add_argument("--connect", default=DEFAULT_FRAME_ENDPOINT)
    s.add_argument("--mode", choices=["push", "pub"], default="pub", help="push for a lossless daemon")
    s.add_argument("--source", default="sim")
    s.add_argument("--rate", type=float, default=5.0, help="frames/s (0 = as fast as accepted)")
    s.add_argument("--frames", type=int, help="stop after N frames (default: run until interrupted)")
    s.add_argument("--size", type=int, default=1024, help="frame rows, px")
    s.add_argument("--width", type=int, help="frame columns, px (default = size)")
    s.add_argument("--dtype", choices=["uint8", "uint16", "float32"], default="uint16")
    s.add_argument("--pixel-size", type=float, default=0.5, help="nm/px")
    s.add_argument("--modality", choices=["TEM", "STEM", "SEM"], default="TEM")
    s.add_argument("--diameter", type=float, default=8.0, help="median particle diameter, nm")
    s.add_argument("--dose", type=float, default=200.0, help="electrons/px (0 = noiseless)")
    s.add_argument("--support-grains", type=float, default=0.0,
                   help="supported catalyst: area fraction (0-0.9) of large support grains")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fields", type=int, default=4, help="fields of view on the virtual stage")
    s.add_argument("--dwell", type=int, default=5, help="frames per field of view")
    s.add_argument("--drift", type=float, nargs=2, default=(0.0, 0.0), metavar=("X", "Y"),
                   help="specimen drift while dwelling, px/frame (x, y)")
    s.add_argument("--insitu", action="store_true", help="E-TEM: particles grow and coalesce")
    s.add_argument("--truth-dir", type=Path, help="write ground truth per frame here (.npz)")
    s.add_argument("--uncalibrated", action="store_true", help="send frames without pixel size")
    _add_curve(s)
    s.set_defaults(func=_simulate)

    s = sub.add_parser("replay", help="publish image files (or a watched folder) to the daemon")
    s.add_argument("files", nargs="*", type=Path)
    s.add_argument("--connect", default=DEFAULT_FRAME_ENDPOINT)
    s.add_argument("--mode", choices=["push", "pub"], default="push")
    s.add_argument("--source", default="replay")
    s.add_argument("--rate", type=float, default=0.0, help="frames/s (0 = as fast as accepted)")
    s.add_argument("--loop", type=int, default=1)
    s.add_argument("--pixel-size", type=float, help="override the file calibration, nm/px")
    s.add_argument("--modality", choices=["TEM", "STEM", "SEM"])
    s.add_argument("--watch", type=Path, help="publish new files written to this folder")
    s.add_argument("--pattern", action="append", help="glob for --watch (repeatable)")
    _add_curve(s)
    s.set_defaults(func=_replay)

    s = sub.add_parser("tail", help="live table of the daemon's results")
    s.add_argument("--connect", default=DEFAULT_RESULT_ENDPOINT)
    s.add_argument("--duration", type=float, help="seconds (default: until interrupted)")
    _add_curve(s)
    s.set_defaults(func=_tail)

    s = sub.add_parser("record", help="write every particle, frame and alert to disk")
    s.add_argument("--connect", default=DEFAULT_RESULT_ENDPOINT)
    s.add_argument("--out", type=Path, required=True,
                   help="RUN.parquet (a folder of crash-safe parts) or RUN.csv")
    s.add_argument("--source", default="", help="only sources starting with this")
    s.add_argument("--frames", type=int, help="stop after N frames")
    s.add_argument("--duration", type=float, help="stop after S seconds")
    s.add_argument("--batch-frames", type=int, default=20, help="flush every N frames")
    s.add_argument("--batch-seconds", type=float, default=2.0, help="... or every S seconds")
    _add_curve(s)
    s.set_defaults(func=_record)

    s = sub.add_parser("dashboard", help="live web page of the daemon's results (browser)")
    s.add_argument("--connect", "--results", dest="connect", action="append",
                   help=f"result endpoint (default {DEFAULT_RESULT_ENDPOINT}); repeat to add "
                        "more publishers, e.g. a separate classifier")
    s.add_argument("--host", default="127.0.0.1", help="address the web page is served on")
    s.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free port)")
    s.add_argument("--query", help="the daemon's query endpoint for the AI-lens view (default "
                                   f"{DEFAULT_QUERY_ENDPOINT} without --connect, else none)")
    _add_curve(s)
    s.set_defaults(func=_dashboard)

    s = sub.add_parser("report", help="HTML size-distribution report of a recorded run")
    s.add_argument("run", type=Path, help="RUN.parquet or RUN.csv from nanoscout record")
    s.add_argument("--out", type=Path, help="report.html (default: beside the run)")
    s.set_defaults(func=_report)

    s = sub.add_parser("keys", help="create a CURVE key pair for remote use")
    s.add_argument("folder", type=Path)
    s.add_argument("--name", default="nanoscout")
    s.set_defaults(func=_keys)

    s = sub.add_parser("measure", help="measure particles in image files offline")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True, help="particles.csv or particles.parquet")
    s.add_argument("--masks", type=Path, help="write 16-bit instance-label PNGs here")
    s.add_argument("--pixel-size", type=float, help="override the file calibration, nm/px")
    s.add_argument("--config", type=Path)
    s.add_argument("--backend", help="as for serve (triton: the models run on a Triton server)")
    s.add_argument("--triton-url", help="with --backend triton: the server's gRPC host:port")
    s.add_argument("--model", type=Path)
    s.add_argument("--scale", type=_scale_arg,
                   help="working px per frame px, or 'auto' (default: the model card's)")
    s.add_argument("--tta", type=int, choices=[1, 2, 4],
                   help="average over 1, 2 or 4 mirror images (slower, a little more accurate)")
    from nanoscout.cli.measure_ray import add_ray_arguments

    add_ray_arguments(s)
    s.set_defaults(func=_measure)

    s = sub.add_parser("demo", help="simulator → daemon → live table, on the CPU")
    s.add_argument("--duration", type=float, default=30.0, help="seconds")
    s.add_argument("--forever", action="store_true")
    s.add_argument("--size", type=int, default=1024)
    s.add_argument("--rate", type=float, default=5.0)
    s.add_argument("--policy", choices=["live", "lossless"], default="live")
    s.add_argument("--config", type=Path, help="daemon configuration (default deploy/demo.toml)")
    s.set_defaults(func=_demo)

    from nanoscout.clients.microscope.command import add_arguments as microscope_arguments
    from nanoscout.clients.search.command import add_arguments as search_arguments

    s = sub.add_parser("microscope", help="simulated microscope for stage search: virtual "
                       "specimen, stage and camera behind a control socket")
    microscope_arguments(s)
    _add_curve(s)
    s.set_defaults(func=_microscope)

    s = sub.add_parser("search", help="automated stage search: find rare targets, write a "
                       "navigator list")
    search_arguments(s)
    _add_curve(s)
    s.set_defaults(func=_search)

    s = sub.add_parser("lens", help="AI lens: a frame's autoencoder feature maps as a PNG mosaic")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="IMAGE --layer NAME --out PNG (see --help)")
    s.set_defaults(func=_lens)

    s = sub.add_parser("models", help="train / export / evaluate models (train and export need torch)")
    s.add_argument("action", choices=_MODEL_ACTIONS)
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the action (see --help)")
    s.set_defaults(func=_models)
    return p


def _lens_first(argv: list[str]) -> list[str]:
    """``lens`` takes its own options (``--connect`` ...), which argparse's REMAINDER cannot
    take first: hand argparse only ``lens`` and let :func:`main` pass the rest on."""
    if "lens" in argv and all(a.startswith("-") for a in argv[: argv.index("lens")]):
        return argv[: argv.index("lens") + 1]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nanoscout`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(_lens_first(argv))
    if args.cmd == "lens":  # everything after "lens" is its own, in order
        args.rest = argv[argv.index("lens") + 1:]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except NanoscoutError as exc:
        print(f"nanoscout {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
