"""The offline commands: measure, report, lens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from nanoscout.cli.app import CONTEXT, EngineLine, app, scale_value
from nanoscout.wire.errors import NanoscoutError

_PASS_THROUGH = {**CONTEXT, "allow_extra_args": True, "ignore_unknown_options": True,
                 "help_option_names": []}


@app.command(rich_help_panel="Offline")
def measure(
    files: Annotated[list[Path], typer.Argument(help="image files or folders (TIFF, DM3/4, "
                                                     "EMI/SER, MRC, EMD, PNG, JPEG; a folder's "
                                                     "own files, not its sub-folders'); a "
                                                     "file two paths reach is measured once")],
    out: Annotated[Path, typer.Option(help="RUN.parquet (a folder pandas reads as the "
                                           "particle table) or RUN.csv: the run format of "
                                           "`record`, so `report` takes it")],
    outputs: Annotated[Path | None, typer.Option(
        help="folder for NAME.labels.tif (ImageJ hyperstack, nm), NAME.rois.zip (ImageJ ROI "
             "set) and NAME.overlay.png (outlines + scale bar) per image")] = None,
    pixel_size: Annotated[float | None, typer.Option(
        help="override every file's calibration, nm/px", show_default="from each file")] = None,
    particle_size_nm: Annotated[tuple[float, float] | None, typer.Option(
        metavar="LOW HIGH",
        help="the range the images' median particle diameter lies in, nm: a working-scale "
             "estimate outside it (specks, support lumps or a grain texture taken for the "
             "particles) is moved to its nearest end; for calibrated images",
        show_default="the estimate alone")] = None,
    particle_size_px: Annotated[tuple[float, float] | None, typer.Option(
        metavar="LOW HIGH",
        help="the same in pixels, used where no range in nm can be (images without a "
             "calibration: PNG, JPEG, figure crops)",
        show_default="the estimate alone")] = None,
    modality: Annotated[Literal["TEM", "STEM", "SEM"] | None, typer.Option(
        help="what kind of images these are (STEM: the STEM detector analyses them); it "
             "overrides the files' metadata and the estimate for files that do not say (PNG, "
             "JPEG, plain TIFF)",
        show_default="from each file's metadata, else estimated from the image by the "
                     "modality model (HAADF-STEM: the STEM detector)")] = None,
    config: Annotated[Path | None, typer.Option(help="daemon TOML configuration (engine, "
                                                     "alert rules, statistics)")] = None,
    backend: Annotated[str | None, typer.Option(
        help="auto | tensorrt | onnxruntime-cuda | onnxruntime-cpu | triton",
        show_default="auto")] = None,
    triton_url: Annotated[str | None, typer.Option(
        "--triton-url", help="with --backend triton: the Triton server's gRPC host:port",
        show_default="127.0.0.1:8001")] = None,
    model: Annotated[Path | None, typer.Option(help="ONNX detector (model card beside it)",
                                               show_default="the shipped detector")] = None,
    scale: Annotated[str | None, typer.Option(help="working px per frame px, or 'auto'",
                                              show_default="the model card's")] = None,
    tta: Annotated[Literal["1", "2", "4"] | None, typer.Option(
        help="average over 1, 2 or 4 mirror images (slower, a little more accurate)",
        show_default="1")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace a run already at --out (only a nanoscout run is deleted)")
    ] = False,
    track: Annotated[bool, typer.Option(
        "--track", help="the files are one ordered image sequence (or stacks / series, each "
                        "plane a frame): correct drift, track particles (track_id, tracks "
                        "table, growth, coalescence, unique statistics)")] = False,
    frame_interval: Annotated[float, typer.Option(
        help="seconds between frames of a --track sequence (rates are per s)")] = 1.0,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="draw a progress bar",
        show_default="on a terminal")] = None,
    masks: Annotated[Path | None, typer.Option("--masks", hidden=True)] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", rich_help_panel="Ray",
        help="run on Ray: one pipeline actor per CPU (or GPU) slot; --out is then a folder of "
             "Parquet parts partitioned by input folder, and files done are skipped when the "
             "command runs again. Without --ray-address a local Ray starts here")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="with --ray: a Ray cluster to join (auto, host:6379, ray://host:10001)",
        rich_help_panel="Ray", show_default="a local Ray on this machine")] = None,
    workers: Annotated[int | None, typer.Option(
        help="with --ray: pipeline actors", rich_help_panel="Ray",
        show_default="one per CPU, or per GPU slot")] = None,
    cpus_per_worker: Annotated[int, typer.Option(
        help="with --ray: CPUs (ONNX Runtime threads) per actor", rich_help_panel="Ray")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(
        help="with --ray: GPUs per actor, whole or a fraction (1 with --backend cuda; 0.5: two "
             "actors share a GPU)",
        rich_help_panel="Ray")] = 0.0,
) -> None:
    """Measure particles in image files offline, with the daemon's pipeline."""
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.batch.offline import check_options, measure_files
    from nanoscout.clients.acquisition.replay import check_overrides
    from nanoscout.clients.progress import progress as progress_bar
    from nanoscout.clients.provenance import load_cards
    from nanoscout.clients.runfile import delete_run
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import load_config

    overrides = {"engine.backend": backend, "engine.triton.url": triton_url,
                 "engine.model": model, "engine.scale": scale_value(scale),
                 "engine.tta": int(tta) if tta else None,
                 "engine.particle_size_nm": particle_size_nm,
                 "engine.particle_size_px": particle_size_px}
    if ray_address is not None and not ray:
        raise NanoscoutError("--ray-address needs --ray")
    cards = load_cards(shipped_model_dir())  # the provenance's models: sha256, sizing error
    if model is not None:
        cards.update(load_cards(Path(model).parent))
    if ray:
        from nanoscout.cli.measure_ray import run_on_ray

        if outputs or masks:
            raise NanoscoutError("--outputs is not supported with --ray")
        check_overrides(pixel_size, modality)  # before a cluster is started
        code = run_on_ray(files, out, load_config(config, overrides), address=ray_address,
                          workers=workers, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker, pixel_size_nm=pixel_size,
                          progress=progress, modality=modality, model_cards=cards)
        if code:
            raise typer.Exit(code)
        return
    # before anything is deleted, loaded or written: a bad option leaves no half-written run
    check_options(out, outputs=outputs or masks, pixel_size_nm=pixel_size, modality=modality)
    if overwrite:
        delete_run(out)
    cfg = load_config(config, overrides)
    pipeline = build_pipeline(cfg, offline=True, track=track)
    EngineLine.print()
    try:
        with progress_bar("measuring", enabled=progress) as bar:
            report = measure_files(files, pipeline, out, outputs=outputs or masks,
                                   pixel_size_nm=pixel_size, modality=modality, bar=bar,
                                   config=cfg.model_dump(mode="json"), model_cards=cards,
                                   track=track, frame_interval_s=frame_interval)
    finally:
        pipeline.close()
    print(f"measured {report.images} images, {report.particles} particles, {report.alerts} "
          f"alerts -> {out}; skipped {len(report.skipped)}"
          + (f"; {len(report.outputs)} files in {outputs or masks}" if report.outputs else ""))
    if report.images == 0:
        raise typer.Exit(1)


@app.command(rich_help_panel="Offline")
def report(
    run: Annotated[Path, typer.Argument(help="RUN.parquet or RUN.csv from `record` or `measure`")],
    out: Annotated[Path | None, typer.Option(help="report HTML",
                                             show_default="<run stem>_report.html beside the run")] = None,
    figures: Annotated[str, typer.Option(
        help="figure formats, comma-separated: png (300 dpi), svg, pdf")] = "png,svg,pdf",
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="draw a progress bar",
        show_default="on a terminal")] = None,
) -> None:
    """HTML size-distribution report of a run: methods, statistics with CIs, lognormal fit and
    its goodness of fit, figures (PNG 300 dpi, SVG, PDF)."""
    from nanoscout.clients.progress import progress as progress_bar
    from nanoscout.clients.report import build_report

    formats = tuple(f.strip().lower() for f in figures.split(",") if f.strip())
    _check_formats(formats)
    target = out or run.with_name(run.stem + "_report.html")
    with progress_bar("report", enabled=progress) as bar:
        written = build_report(run, target, formats=formats, bar=bar)
    print(written)


@app.command(rich_help_panel="Offline", context_settings=_PASS_THROUGH, add_help_option=False)
def lens(ctx: typer.Context) -> None:
    """AI lens: a frame's autoencoder feature maps as a PNG mosaic (IMAGE --layer NAME --out
    PNG, or --query ENDPOINT --source S for a live frame; `nanoscout lens --help`)."""
    from nanoscout.batch.lens import main as lens_main

    code = int(lens_main(list(ctx.args)) or 0)
    if code:
        raise typer.Exit(code)


def _check_formats(formats: tuple[str, ...]) -> None:
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise NanoscoutError(f"figure formats must be png, svg or pdf, got {', '.join(bad)}")


__all__ = ["lens", "measure", "report"]
