"""The live commands: serve, simulate, replay, tail, record, dashboard, microscope, search,
demo, keys."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import typer

from nanoscout.cli.app import (
    AdapterMode,
    AdapterResults,
    ClientKey,
    ConfirmTimeout,
    Connect,
    EngineLine,
    ServerKey,
    app,
    curve_keys,
    scale_value,
)
from nanoscout.cli.signals import stop_event
from nanoscout.wire.errors import ConfigError, NanoscoutError, StartupError
from nanoscout.wire.headers import MAX_SIDE_PX, PIXEL_SIZE_RANGE_NM
from nanoscout.wire.transport import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_QUERY_ENDPOINT,
    DEFAULT_RESULT_ENDPOINT,
    create_keys,
)

_CFG = "the --config file's, else "
_FRAMES_EP = "the daemon's frame input (ZeroMQ endpoint)"
_RESULTS_EP = "the daemon's result publisher (ZeroMQ endpoint)"
Modality = Literal["TEM", "STEM", "SEM"]
#: the longest wait an option may ask for, s: a day, as the daemon's ``config.MAX_WAIT_S`` (not
#: imported: the command line starts without the daemon's modules; an infinite
#: ``health --timeout`` overflowed the socket timeouts)
_MAX_WAIT_S = 86_400.0


@app.command(rich_help_panel="Live")
def serve(
    config: Annotated[Path | None, typer.Option(help="TOML configuration file "
                                                     "(deploy/nanoscout.example.toml)")] = None,
    frames_endpoint: Annotated[str | None, typer.Option(
        "--frames-endpoint", help="frame endpoint to bind (port 0 = any free port)",
        show_default=_CFG + DEFAULT_FRAME_ENDPOINT)] = None,
    results: Annotated[str | None, typer.Option(
        "--results", help="result endpoint to bind (PUB)",
        show_default=_CFG + DEFAULT_RESULT_ENDPOINT)] = None,
    query: Annotated[str | None, typer.Option(
        "--query", help="lens query endpoint to bind (REP)",
        show_default=_CFG + DEFAULT_QUERY_ENDPOINT)] = None,
    policy: Annotated[Literal["live", "lossless"] | None, typer.Option(
        help="live: newest frame wins (SUB input); lossless: every frame, back-pressure "
             "(PULL input)", show_default=_CFG + "live")] = None,
    backend: Annotated[str | None, typer.Option(
        help="auto | tensorrt | onnxruntime-cuda | onnxruntime-cpu | triton (the models on a "
             "Triton Inference Server, [engine.triton])",
        show_default=_CFG + "auto")] = None,
    triton_url: Annotated[str | None, typer.Option(
        "--triton-url", help="with --backend triton: the Triton server's gRPC endpoint, "
                             "host:port", show_default=_CFG + "127.0.0.1:8001")] = None,
    model: Annotated[Path | None, typer.Option(
        help="ONNX detector (its model card .json beside it)",
        show_default=_CFG + "the shipped models/weights/detector.onnx")] = None,
    threads: Annotated[int | None, typer.Option(help="engine CPU threads",
                                                show_default=_CFG + "all cores")] = None,
    precision: Annotated[Literal["auto", "fp32", "fp16", "int8"] | None, typer.Option(
        help="engine arithmetic; auto = INT8 on the CPU where its accuracy parity passed, "
             "FP16 under TensorRT", show_default=_CFG + "auto")] = None,
    device: Annotated[int | None, typer.Option(
        help="GPU index (CUDA provider, TensorRT)", show_default=_CFG + "0")] = None,
    scale: Annotated[str | None, typer.Option(
        help="working px per frame px, or 'auto'", show_default=_CFG + "the model card's")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Prometheus /metrics HTTP port (0 = any free port)", show_default=_CFG + "9108")] = None,
    no_metrics: Annotated[bool, typer.Option("--no-metrics", help="serve no metrics")] = False,
    max_frame_bytes: Annotated[int | None, typer.Option(
        help="largest accepted frame, bytes", show_default=_CFG + "the config default")] = None,
    queue_size: Annotated[int | None, typer.Option(
        help="accepted frames waiting (lossless), frames", show_default=_CFG + "the default")] = None,
    health_interval: Annotated[float | None, typer.Option(
        help="seconds between health messages", show_default=_CFG + "1.0")] = None,
    ready_file: Annotated[Path | None, typer.Option(
        help="also write the NANOSCOUT-READY line (bound endpoints) to this file; "
             "`nanoscout health` reads it", envvar="NANOSCOUT_READY_FILE")] = None,
    input_: Annotated[str | None, typer.Option("--input", hidden=True)] = None,
    output: Annotated[str | None, typer.Option("--output", hidden=True)] = None,
) -> None:
    """Run the inference daemon (prints NANOSCOUT-READY {json} once it accepts frames).

    A configuration that cannot work (a wrong value, a port in use, a model file missing, a
    folder it cannot write: nanoscout.daemon.preflight) is refused before any model loads, in
    one line naming the setting and the file, exit status 78 (EX_CONFIG)."""
    from nanoscout.daemon.app import ready_line
    from nanoscout.daemon.app import serve as run_serve
    from nanoscout.daemon.config import load_config
    from nanoscout.daemon.preflight import check_startup

    overrides = {
        "input.endpoint": frames_endpoint or input_, "input.policy": policy,
        "input.max_frame_bytes": max_frame_bytes, "input.queue_size": queue_size,
        "output.endpoint": results or output, "query.endpoint": query,
        "engine.backend": backend, "engine.triton.url": triton_url, "engine.model": model,
        "engine.threads": threads, "engine.precision": precision, "engine.device": device,
        "engine.scale": scale_value(scale), "metrics.port": metrics_port,
        "health.interval_s": health_interval,
    }
    if no_metrics:
        overrides["metrics.enabled"] = False
    # before any model loads (seconds): one line naming the setting and the file, exit 78
    # (EX_CONFIG: the systemd unit does not restart it)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc
    check_startup(cfg, config_file=config, ready_file=ready_file)

    def ready(endpoints: object) -> None:
        EngineLine.print()
        line = ready_line(endpoints)  # type: ignore[arg-type]
        print(line, flush=True)
        url = getattr(endpoints, "metrics_url", None)
        if url:
            print(f"metrics: {url}", flush=True)
        if ready_file:
            ready_file.write_text(line + "\n", encoding="utf-8")

    run_serve(cfg, on_ready=ready)


def _check_number(value: float, flag: str, *, low: float | None = None,
                  high: float | None = None, low_open: bool = False) -> None:
    """Raise typer.BadParameter naming ``flag`` unless ``value`` is finite and within
    ``low``..``high`` (``low`` excluded when ``low_open``)."""
    ok = math.isfinite(value) and (high is None or value <= high) and (
        low is None or (value > low if low_open else value >= low))
    if not ok:
        rng = (f" {'>' if low_open else '>='} {low:g}" if low is not None else "") + (
            f"{' and' if low is not None else ''} <= {high:g}" if high is not None else "")
        raise typer.BadParameter(f"{value!r} is not a finite number{rng}", param_hint=f"'{flag}'")


@app.command(rich_help_panel="Live")
def simulate(
    frames_endpoint: Annotated[str, typer.Option(
        "--frames-endpoint", help=_FRAMES_EP)] = DEFAULT_FRAME_ENDPOINT,
    mode: AdapterMode = "auto",
    results: AdapterResults = None,
    confirm_timeout: ConfirmTimeout = 30.0,
    source: Annotated[str, typer.Option(help="source name in every frame header")] = "sim",
    rate: Annotated[float, typer.Option(help="frames per second, Hz (0 = as fast as accepted)")] = 5.0,
    frames: Annotated[int | None, typer.Option(help="stop after N frames", min=0,
                                               show_default="run until interrupted")] = None,
    size: Annotated[int, typer.Option(help="frame rows, px", min=8, max=MAX_SIDE_PX)] = 1024,
    width: Annotated[int | None, typer.Option(help="frame columns, px", min=8, max=MAX_SIDE_PX,
                                              show_default="--size")] = None,
    dtype: Annotated[Literal["uint8", "uint16", "float32"], typer.Option(
        help="pixel type")] = "uint16",
    pixel_size: Annotated[float, typer.Option(help="pixel size, nm/px")] = 0.5,
    modality: Annotated[Modality, typer.Option(help="imaging mode")] = "TEM",
    diameter: Annotated[float, typer.Option(help="median particle diameter, nm")] = 8.0,
    dose: Annotated[float, typer.Option(help="electrons per px (0 = noiseless)")] = 200.0,
    support_grains: Annotated[float, typer.Option(
        help="supported catalyst: area fraction (0-0.9) of large support grains")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed of the specimen", min=0)] = 0,
    fields: Annotated[int, typer.Option(help="fields of view on the virtual stage", min=1)] = 4,
    dwell: Annotated[int, typer.Option(help="frames per field of view", min=1)] = 5,
    drift: Annotated[tuple[float, float], typer.Option(
        help="specimen drift while dwelling (--insitu: all along), px/frame (x y)")
    ] = (0.0, 0.0),
    insitu: Annotated[bool, typer.Option(
        help="E-TEM: one field watched while its particles drift, move, grow, coalesce and "
             "appear (identities in --truth-dir)")] = False,
    growth: Annotated[Literal["ripening", "uniform", "none"], typer.Option(
        help="--insitu growth law: Ostwald ripening, the same growth for all, or none")
    ] = "ripening",
    growth_rate: Annotated[float, typer.Option(
        help="--insitu growth of the radius, nm per frame")] = 0.02,
    appear: Annotated[float, typer.Option(
        help="--insitu nucleation: mean new particles in 1 of the frames (Poisson)")] = 0.0,
    truth_dir: Annotated[Path | None, typer.Option(help="write ground truth per frame here (.npz)")] = None,
    uncalibrated: Annotated[bool, typer.Option(help="send frames without a pixel size")] = False,
    server_key: ServerKey = None, client_key: ClientKey = None, connect: Connect = None,
) -> None:
    """Virtual microscope: stream synthetic frames to the daemon."""
    from nanoscout.clients.acquisition.simulator import SimulatorOptions, run_simulator

    # before a socket is opened or a frame drawn (SimulatorOptions checks the rest)
    _check_number(rate, "--rate", low=0.0)
    _check_number(pixel_size, "--pixel-size", low=PIXEL_SIZE_RANGE_NM[0],
                  high=PIXEL_SIZE_RANGE_NM[1])
    _check_number(diameter, "--diameter", low=0.0, low_open=True)
    _check_number(dose, "--dose", low=0.0)
    _check_number(support_grains, "--support-grains", low=0.0, high=0.9)
    for value in drift:
        _check_number(value, "--drift")
    _check_number(growth_rate, "--growth-rate")
    _check_number(appear, "--appear", low=0.0)
    _check_number(confirm_timeout, "--confirm-timeout", low=0.0)
    opts = SimulatorOptions(
        endpoint=connect or frames_endpoint, mode=mode, results=results,
        confirm_timeout_s=confirm_timeout, source=source,
        rate_hz=rate or None, frames=frames, shape=(size, size if width is None else width),
        dtype=dtype, pixel_size_nm=pixel_size,
        modality=modality, median_diameter_nm=diameter, dose_e_per_px=dose or None,
        support_grains=support_grains, seed=seed, fields=fields, dwell=dwell,
        drift_px_per_frame=(drift[1], drift[0]), insitu=insitu, growth=growth,
        growth_nm_per_frame=growth_rate, appear_per_frame=appear, truth_dir=truth_dir,
        calibrated=not uncalibrated, curve=curve_keys(server_key, client_key))
    with stop_event() as stop:  # a signal ends the stream between two frames
        report = run_simulator(opts, stop=stop)
    if stop.is_set():
        raise typer.Exit(130)  # stopped by SIGINT / SIGTERM, as Ctrl-C exits
    if not report.complete:
        raise typer.Exit(1)


@app.command(rich_help_panel="Live")
def replay(
    files: Annotated[list[Path] | None, typer.Argument(
        help="image files or folders (TIFF, DM3/4, EMI/SER, MRC, EMD, PNG, JPEG)")] = None,
    frames_endpoint: Annotated[str, typer.Option(
        "--frames-endpoint", help=_FRAMES_EP)] = DEFAULT_FRAME_ENDPOINT,
    mode: AdapterMode = "auto",
    results: AdapterResults = None,
    confirm_timeout: ConfirmTimeout = 30.0,
    source: Annotated[str, typer.Option(help="source name in every frame header")] = "replay",
    rate: Annotated[float, typer.Option(help="frames per second, Hz (0 = as fast as accepted)")] = 0.0,
    loop: Annotated[int, typer.Option(help="send the files this many times")] = 1,
    pixel_size: Annotated[float | None, typer.Option(
        help="override the files' calibration, nm/px", show_default="from each file")] = None,
    modality: Annotated[Modality | None, typer.Option(help="override the "
                                                 "imaging mode", show_default="from each file")] = None,
    particle_size_nm: Annotated[tuple[float, float] | None, typer.Option(
        metavar="LOW HIGH",
        help="the range the median particle diameter lies in, nm, in every frame header: the "
             "daemon keeps a working-scale estimate inside it and moves one outside it to "
             "its nearest end", show_default="none")] = None,
    particle_size_px: Annotated[tuple[float, float] | None, typer.Option(
        metavar="LOW HIGH", help="the same in pixels, used where no range in nm can be (files "
                                 "without a calibration)",
        show_default="none")] = None,
    watch: Annotated[Path | None, typer.Option(help="publish each new file written to this folder")] = None,
    pattern: Annotated[list[str] | None, typer.Option(help="glob for --watch (repeatable)",
                                                      show_default="every supported type")] = None,
    server_key: ServerKey = None, client_key: ClientKey = None, connect: Connect = None,
) -> None:
    """Publish image files (or each new file of a watched folder) to the daemon.

    A file that cannot be read is skipped and named; the command exits 1 when nothing at all
    was sent (every file skipped) or a frame was not confirmed, and 130 when --watch is
    stopped by Ctrl-C / SIGINT / SIGTERM (after its summary line)."""
    from nanoscout.clients.acquisition.publisher import FramePublisher
    from nanoscout.clients.acquisition.replay import ReplayReport, replay_files, replay_watch

    # before a socket is opened
    if watch is not None and files:
        raise NanoscoutError(f"give FILES or --watch, not both (--watch {watch} would ignore "
                             f"{len(files)} file{'s' if len(files) > 1 else ''})")
    if watch is None and not files:
        raise NanoscoutError("nothing to send: give FILES or --watch FOLDER")
    if watch is not None and not watch.is_dir():
        raise NanoscoutError(f"--watch {watch} is not a folder")
    endpoint = connect or frames_endpoint
    pub = FramePublisher(endpoint, mode=mode, source=source, results=results,
                         confirm_timeout_s=confirm_timeout,
                         curve=curve_keys(server_key, client_key), log_line=print)
    report = ReplayReport()
    interrupted = False
    try:
        if watch:
            # the first signal ends the watch between two files, so the summary is printed
            with stop_event() as stop:
                report = replay_watch(watch, pub, patterns=tuple(pattern or ["*"]),
                                      pixel_size_nm=pixel_size, modality=modality, stop=stop,
                                      particle_size_nm=particle_size_nm,
                                      particle_size_px=particle_size_px)
            interrupted = stop.is_set()
        else:
            report = replay_files(files or [], pub, rate_hz=rate or None, loop=loop,
                                  pixel_size_nm=pixel_size, modality=modality,
                                  particle_size_nm=particle_size_nm,
                                  particle_size_px=particle_size_px)
    finally:
        sent = pub.close()
    print(f"replay: {sent.describe()}; skipped {len(report.skipped)} files, "
          f"{len(report.uncalibrated)} uncalibrated")
    if interrupted:
        raise typer.Exit(130)  # stopped by SIGINT / SIGTERM, as Ctrl-C exits
    if not watch and report.sent == 0:
        why = (f"{len(report.skipped)} files skipped, none sent" if report.skipped
               else "no supported image file in FILES")
        print(f"replay: error: nothing sent: {why}", file=sys.stderr)
        raise typer.Exit(1)
    if not sent.complete:
        raise typer.Exit(1)


@app.command(rich_help_panel="Live")
def tail(
    results: Annotated[str, typer.Option("--results", help=_RESULTS_EP)] = DEFAULT_RESULT_ENDPOINT,
    duration: Annotated[float | None, typer.Option(help="seconds to run",
                                                   show_default="until interrupted")] = None,
    server_key: ServerKey = None, client_key: ClientKey = None, connect: Connect = None,
) -> None:
    """Live table of the daemon's results, as wide as the terminal."""
    from nanoscout.clients.tail import run_tail

    run_tail(connect or results, duration=duration, curve=curve_keys(server_key, client_key))


@app.command(rich_help_panel="Live")
def record(
    out: Annotated[Path, typer.Option(help="RUN.parquet (a folder pandas reads as the particle "
                                           "table) or RUN.csv; {utc} in the name becomes the "
                                           "start time (services: one run per start)")],
    results: Annotated[str, typer.Option("--results", help=_RESULTS_EP)] = DEFAULT_RESULT_ENDPOINT,
    source: Annotated[str, typer.Option(help="only sources starting with this",
                                        show_default="all")] = "",
    frames: Annotated[int | None, typer.Option(  # 10 s: recorder.FRAME_END_TIMEOUT_S
        help="stop after N frames, each with its alerts and statistics (the last one's "
             "awaited at most 10 s)")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after S seconds")] = None,
    batch_frames: Annotated[int, typer.Option(help="flush every N frames")] = 20,
    batch_seconds: Annotated[float, typer.Option(help="... or every S seconds")] = 2.0,
    rois: Annotated[Path | None, typer.Option(
        help="also write each frame's particles as an ImageJ ROI set (fitted ellipses) here")] = None,
    server_key: ServerKey = None, client_key: ClientKey = None, connect: Connect = None,
) -> None:
    """Write every particle, frame, statistic and alert the daemon publishes to disk."""
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.clients.provenance import load_cards
    from nanoscout.clients.recorder import record as run_record

    if "{utc}" in str(out):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = Path(str(out).replace("{utc}", stamp))
    prov = run_record(connect or results, out, source=source, frames=frames, duration=duration,
                      batch_frames=batch_frames, batch_seconds=batch_seconds,
                      curve=curve_keys(server_key, client_key),
                      model_cards=load_cards(shipped_model_dir()), rois=rois)
    rows = prov["rows"]
    refused = prov["rejected_messages"]
    print(f"recorded {rows['frames']} frames, {rows['particles']} particles, {rows['alerts']} "
          f"alerts to {out}; missed results: {prov['missed_results'] or 'none'}"
          + (f"; refused messages: {refused}" if refused else ""))


@app.command(rich_help_panel="Live")
def dashboard(
    results: Annotated[list[str] | None, typer.Option(
        "--results", help=_RESULTS_EP + "; repeat to add publishers, e.g. a separate classifier",
        show_default=DEFAULT_RESULT_ENDPOINT)] = None,
    host: Annotated[str, typer.Option(
        help="address the page is served on; a non-loopback one needs --token-file")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0 = any free port)", min=0,
                                      max=65535)] = 8080,
    query: Annotated[str | None, typer.Option(
        help="the daemon's query endpoint for the AI-lens view",
        show_default=f"{DEFAULT_QUERY_ENDPOINT} without --results, else none")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        help="another host name the page may be asked for (repeatable)",
        show_default="loopback names and --host")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="file holding the access token (>= 16 characters; or set "
             "NANOSCOUT_DASHBOARD_TOKEN); open the page once with ?token=TOKEN",
        show_default="no token")] = None,
    allow_insecure_remote: Annotated[bool, typer.Option(
        help="serve a non-loopback --host without a token (knowingly)")] = False,
    max_clients: Annotated[int, typer.Option(
        help="requests served at once (each open page holds one); more get 503")] = 256,
    max_sources: Annotated[int, typer.Option(
        help="sources shown at most; the least recently seen one is forgotten beyond",
        min=1, max=100_000)] = 64,
    server_key: ServerKey = None, client_key: ClientKey = None,
    connect: Annotated[list[str] | None, typer.Option("--connect", hidden=True)] = None,
) -> None:
    """Live web page of the daemon's results (scale bar, zoom, contrast, trends, alerts)."""
    from nanoscout.clients.dashboard import run_dashboard

    given = [*(results or []), *(connect or [])]
    endpoints = given or [DEFAULT_RESULT_ENDPOINT]
    q = query or (None if given else DEFAULT_QUERY_ENDPOINT)

    def ready(url: str) -> None:
        print(f"dashboard: {url}", flush=True)
        print("NANOSCOUT-READY " + json.dumps({"dashboard": url, "results": endpoints,
                                               "query": q}), flush=True)

    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise NanoscoutError(f"cannot read the token file {token_file}: {exc}") from exc
    token = token or os.environ.get("NANOSCOUT_DASHBOARD_TOKEN") or None
    code = run_dashboard(endpoints, host=host, port=port, curve=curve_keys(server_key, client_key),
                         query=q, on_ready=ready, allow_hosts=allow_host or (), token=token,
                         allow_insecure_remote=allow_insecure_remote, max_clients=max_clients,
                         max_sources=max_sources)
    if code:
        raise typer.Exit(code)


@app.command(rich_help_panel="Live")
def health(
    ready_file: Annotated[Path | None, typer.Option(
        help="the daemon's --ready-file", envvar="NANOSCOUT_READY_FILE",
        show_default="$NANOSCOUT_READY_FILE")] = None,
    config: Annotated[Path | None, typer.Option(
        help="the daemon's TOML configuration (its [metrics] host and port), when there is "
             "no ready file", show_default="the built-in defaults")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 4.0,
) -> None:
    """Exit 0 if the local daemon answers (for container HEALTHCHECKs and monitors), else 1."""
    from nanoscout.clients.healthcheck import check_endpoints, check_ready_file, metrics_url

    _check_number(timeout, "--timeout", low=0.0, low_open=True, high=_MAX_WAIT_S)
    if ready_file is not None:
        ok, what = check_ready_file(ready_file, timeout)
    else:
        from nanoscout.daemon.config import load_config

        cfg = load_config(config, {})
        url = metrics_url(cfg.metrics.host, cfg.metrics.port) if cfg.metrics.enabled else None
        ok, what = check_endpoints(url, None if url else cfg.output.endpoint, timeout)
    print(("healthy: " if ok else "UNHEALTHY: ") + what)
    if not ok:
        raise typer.Exit(1)


@app.command(rich_help_panel="Live")
def keys(
    folder: Annotated[Path, typer.Argument(help="where to write NAME.key and NAME.key_secret")],
    name: Annotated[str, typer.Option(help="file name of the pair")] = "nanoscout",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace a pair already at FOLDER/NAME (the identity deployed "
                            "with it is lost)")] = False,
) -> None:
    """Create a CURVE key pair for remote use (the secret key readable by its owner only)."""
    public, secret = create_keys(folder, name, overwrite=overwrite)
    print(f"public key: {public} (give it to the other side)\nsecret key: {secret} (keep it here)")


@app.command(rich_help_panel="Live")
def demo(
    duration: Annotated[float, typer.Option(help="seconds to run")] = 30.0,
    forever: Annotated[bool, typer.Option(help="run until Ctrl-C")] = False,
    size: Annotated[int, typer.Option(help="frame side, px", min=8, max=8192)] = 1024,
    rate: Annotated[float, typer.Option(help="frames per second, Hz (0: as fast as taken)")] = 5.0,
    policy: Annotated[Literal["live", "lossless"], typer.Option(
        help="the daemon's delivery policy")] = "live",
    config: Annotated[Path | None, typer.Option(help="daemon configuration",
                                                show_default="built-in demo rules")] = None,
) -> None:
    """Simulator -> daemon -> live table, on the CPU."""
    from nanoscout.cli.demo import run_demo

    _check_number(duration, "--duration", low=0.0, low_open=True)
    _check_number(rate, "--rate", low=0.0)

    code = run_demo(duration=None if forever else duration, size=size, rate_hz=rate,
                    policy=policy, config=config)
    if code:
        raise typer.Exit(code)


# --------------------------------------------------------------- microscope and stage search

@app.command(rich_help_panel="Stage search")
def microscope(
    frames_endpoint: Annotated[str, typer.Option(
        "--frames-endpoint", help=_FRAMES_EP)] = DEFAULT_FRAME_ENDPOINT,
    mode: Annotated[Literal["auto", "push", "pub"], typer.Option(
        help="push (lossless daemon: a search wants every frame), pub (live daemon) or auto: "
             "whichever the daemon takes")] = "auto",
    source: Annotated[str, typer.Option(help="source name in every frame header")] = "stage",
    control: Annotated[str, typer.Option(help="control endpoint to bind (REP; port 0 = any)")] = "tcp://127.0.0.1:5558",
    specimen_um: Annotated[tuple[float, float], typer.Option(
        help="virtual specimen size W H, µm")] = (200.0, 200.0),
    seed: Annotated[int, typer.Option(help="draws the specimen")] = 0,
    large: Annotated[int, typer.Option(help="rare large particles (targets)", min=0)] = 12,
    wires: Annotated[int, typer.Option(help="rare long wires (targets)", min=0)] = 12,
    agglomerates: Annotated[int, typer.Option(
        help="agglomerates (look like targets from afar)", min=0)] = 30,
    diameter: Annotated[float, typer.Option(help="median diameter of ordinary particles, nm")] = 200.0,
    coverage: Annotated[float, typer.Option(help="area fraction of ordinary particles")] = 0.03,
    modality: Annotated[Modality, typer.Option(help="imaging mode")] = "TEM",
    dose: Annotated[float, typer.Option(help="electrons per px per frame (0 = none)")] = 200.0,
    exposure: Annotated[float, typer.Option(help="modelled exposure per frame, s")] = 0.5,
    speed: Annotated[float, typer.Option(help="modelled stage speed, µm/s")] = 100.0,
    settle: Annotated[float, typer.Option(help="modelled settle time per move, s")] = 0.3,
    real_time: Annotated[bool, typer.Option(help="really wait the modelled times")] = False,
    truth: Annotated[Path | None, typer.Option(help="write the specimen's truth (JSON) here")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace a --truth file that exists and is not an earlier run's "
        "truth (which is replaced anyway)")] = False,
    server_key: ServerKey = None, client_key: ClientKey = None, connect: Connect = None,
) -> None:
    """Simulated microscope for stage search: virtual specimen, stage and camera behind a
    control socket."""
    from nanoscout.clients.microscope.command import run

    args = argparse.Namespace(
        connect=connect or frames_endpoint, mode=mode, source=source, control=control,
        specimen_um=specimen_um, seed=seed, large=large, wires=wires, agglomerates=agglomerates,
        diameter=diameter, coverage=coverage, modality=modality, dose=dose, exposure=exposure,
        speed=speed, settle=settle, real_time=real_time, truth=truth, overwrite=overwrite)
    code = run(args, curve_keys(server_key, client_key))
    if code:
        raise typer.Exit(code)


def _area(text: str | None) -> object:
    if text is None:
        return None
    from nanoscout.clients.search.geometry import Area

    try:
        return Area.parse(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command(rich_help_panel="Stage search")
def search(
    target_rule: Annotated[list[str], typer.Option(help="alert rule that confirms a target (repeatable)")],
    out: Annotated[Path, typer.Option(help="folder for targets.csv/.json/.nav, thumbnails, search.json")],
    control: Annotated[str, typer.Option(help="the microscope's control socket")] = "tcp://127.0.0.1:5558",
    results: Annotated[str, typer.Option("--results", help=_RESULTS_EP)] = DEFAULT_RESULT_ENDPOINT,
    strategy: Annotated[Literal["raster", "adaptive"], typer.Option(
        help="tile everything, or survey then visit candidates")] = "adaptive",
    area: Annotated[str | None, typer.Option(
        help="x_min,x_max,y_min,y_max in µm (write --area=-50,50,-50,50 when it starts with a minus)",
        show_default="the stage limits")] = None,
    candidate_rule: Annotated[list[str] | None, typer.Option(
        help="alert rule that only nominates candidates in the survey (repeatable)")] = None,
    pixel_size: Annotated[float, typer.Option(
        help="high magnification (raster, confirmation), nm/px")] = 20.0,
    survey_pixel_size: Annotated[float, typer.Option(help="survey magnification, nm/px")] = 80.0,
    size: Annotated[int, typer.Option(help="frame side, px", min=8, max=MAX_SIDE_PX)] = 512,
    overlap: Annotated[float, typer.Option(help="tile overlap, µm (at least the largest target)")] = 3.0,
    budget_frames: Annotated[int | None, typer.Option(help="take at most N frames")] = None,
    budget_s: Annotated[float | None, typer.Option(
        help="at most S s of instrument time: no frame is started that would end past it")] = None,
    budget_dose: Annotated[float | None, typer.Option(
        help="at most this mean dose, e/nm²: no frame is taken that would pass it")] = None,
    min_separation: Annotated[float, typer.Option(
        help="confirmations closer than this are one target, µm")] = 1.0,
    result_timeout: Annotated[float, typer.Option(help=(
        "wait for a frame's results, s (microscope commands wait max(30, this): a stage move "
        "may take long; clients.search.command.CONTROL_TIMEOUT_S)"))] = 30.0,
    resume: Annotated[Path | None, typer.Option(
        help="the search.json of an earlier run of this same raster search (interrupted, "
             "stopped, incomplete): image only the tiles it did not, write one result for both "
             "runs")] = None,
    server_key: ServerKey = None, client_key: ClientKey = None, connect: Connect = None,
) -> None:
    """Automated stage search: find rare targets, write a navigator list.

    Exit status: 0 the search ran to its end (or its budget); 2 the microscope failed (what was
    found is written) or a bad option; 3 incomplete: tiles or candidates never imaged and
    analysed (search.json lists them; --resume takes a raster search up again); 130
    interrupted (SIGINT/SIGTERM; what was found is written).
    """
    from nanoscout.clients.search.command import run

    # before the microscope is asked anything (its first answer may take 30 s)
    for value, flag in ((pixel_size, "--pixel-size"), (survey_pixel_size, "--survey-pixel-size")):
        _check_number(value, flag, low=PIXEL_SIZE_RANGE_NM[0], high=PIXEL_SIZE_RANGE_NM[1])
    _check_number(overlap, "--overlap", low=0.0)
    _check_number(min_separation, "--min-separation", low=0.0)
    _check_number(result_timeout, "--result-timeout", low=0.0, low_open=True, high=_MAX_WAIT_S)
    for budget, flag in ((budget_s, "--budget-s"), (budget_dose, "--budget-dose")):
        if budget is not None:
            _check_number(budget, flag, low=0.0, low_open=True)
    if budget_frames is not None and budget_frames < 1:
        raise typer.BadParameter(f"{budget_frames} must be >= 1", param_hint="'--budget-frames'")

    args = argparse.Namespace(
        control=control, connect=connect or results, strategy=strategy, area=_area(area),
        target_rule=target_rule, candidate_rule=candidate_rule or [], pixel_size=pixel_size,
        survey_pixel_size=survey_pixel_size, size=size, overlap=overlap,
        budget_frames=budget_frames, budget_s=budget_s, budget_dose=budget_dose,
        min_separation=min_separation, result_timeout=result_timeout, out=out, resume=resume)
    code = run(args, curve_keys(server_key, client_key))
    if code:
        raise typer.Exit(code)
