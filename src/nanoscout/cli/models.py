"""``nanoscout models ACTION ARGS...``: each action hands its arguments, unchanged, to the
``main(argv)`` of its module in :mod:`nanoscout.training` (``nanoscout models train --help``
shows that module's own options)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from nanoscout.cli.app import CONTEXT, models_app
from nanoscout.wire.errors import NanoscoutError

Main = Callable[[list[str] | None], int | None]


# each loader imports its module only when its action runs (training needs torch); plain
# imports, so the layer contracts see them
def _train() -> Main:
    from nanoscout.training.train import main
    return main


def _export() -> Main:
    from nanoscout.training.export import main
    return main


def _evaluate() -> Main:
    from nanoscout.training.evaluate import main
    return main


def _train_classifier() -> Main:
    from nanoscout.training.train_classifier import main
    return main


def _evaluate_classifier() -> Main:
    from nanoscout.training.evaluate_classifier import main
    return main


def _train_lens() -> Main:
    from nanoscout.training.train_lens import main
    return main


def _train_modality() -> Main:
    from nanoscout.training.train_modality import main
    return main


def _evaluate_lens() -> Main:
    from nanoscout.training.evaluate_lens import main
    return main


def _calibrate() -> Main:
    from nanoscout.training.score_calibration import main
    return main


def _calibrate_lens() -> Main:
    from nanoscout.training.calibrate_lens import main
    return main


def _ensemble() -> Main:
    from nanoscout.training.ensemble import main
    return main


def _soup() -> Main:
    from nanoscout.training.soup import main
    return main


def _quantize() -> Main:
    from nanoscout.training.quantize import main
    return main


def _build_engines() -> Main:
    from nanoscout.training.build_engines import main
    return main


def _export_triton() -> Main:
    from nanoscout.cli.export_triton import main
    return main


#: action -> (loader of its main(argv), one-line help)
ACTIONS: dict[str, tuple[Callable[[], Main], str]] = {
    "train": (_train, "retrain the particle detector (torch; ~50 min on 2 cores)"),
    "export": (_export, "export a trained detector to ONNX + model card (torch)"),
    "eval": (_evaluate, "accuracy of the detector on held-out synthetic and real images"),
    "train-classifier": (_train_classifier, "train the field-of-view classifier (torch)"),
    "eval-classifier": (_evaluate_classifier, "held-out accuracy, CAM test, engine time"),
    "train-lens": (_train_lens, "train the AI-lens autoencoder (torch)"),
    "eval-lens": (_evaluate_lens, "novelty of held-out usual and novel frames"),
    "train-modality": (_train_modality, "train the modality model that sends HAADF-STEM images "
                                        "without metadata to the STEM detector (torch)"),
    "calibrate": (_calibrate, "fit a detector's score calibration on named tuning sets into its "
                              "card (--model M --sets emps-tune,synthetic-tune; no torch)"),
    "calibrate-lens": (_calibrate_lens, "rebuild the AI lens's novelty reference on your own "
                                        "frames (FRAMES... --out DIR; no torch)"),
    "ensemble": (_ensemble, "one detector whose logits are the mean of several detectors' "
                            "(MEMBER.onnx... --out FILE; onnx, no torch)"),
    "soup": (_soup, "one detector whose weights are the mean of fine-tuned runs of one start "
                    "(--members A.pt B.pt ... --out DIR, or a three-member recipe; torch)"),
    "quantize": (_quantize, "INT8 siblings of the shipped models with their accuracy parity "
                            "against FP32 (ONNX Runtime; no torch)"),
    "build-engines": (_build_engines, "build (and INT8-calibrate) the TensorRT engines of the "
                                      "shipped models on this GPU"),
    "export-triton": (_export_triton, "a Triton Inference Server model repository of the "
                                      "shipped models (--out REPO; no torch)"),
}
_PASS_THROUGH = {**CONTEXT, "allow_extra_args": True, "ignore_unknown_options": True,
                 "help_option_names": []}


def _make(action: str, load: Callable[[], Main], doc: str) -> None:
    def command(ctx: typer.Context) -> None:
        try:
            main = load()
        except ModuleNotFoundError as exc:
            if exc.name == "torch":
                raise NanoscoutError(
                    "training and export need PyTorch: pip install torch==2.13.0 && "
                    "pip install -e '.[train]'") from exc
            raise
        sys.argv[0] = f"nanoscout models {action}"  # argparse's prog in the action's --help
        code = int(main(list(ctx.args)) or 0)
        if code:
            raise typer.Exit(code)

    command.__doc__ = doc + f" (arguments: `nanoscout models {action} --help`)"
    models_app.command(action, context_settings=_PASS_THROUGH, add_help_option=False)(command)


for _action, (_load, _doc) in ACTIONS.items():
    _make(_action, _load, _doc)


@models_app.command("adapt")
def adapt(
    images: Annotated[list[Path], typer.Argument(help="annotated frames (TIFF, PNG, JPEG)")],
    labels: Annotated[list[Path], typer.Option(
        "--labels", help="one label file per image, same order, after the images (--labels "
                         "L1 L2 ... or --labels repeated): .png/.tif masks, .txt YOLO boxes, "
                         ".csv points x,y[,diameter], .zip/.roi ImageJ ROI sets")],
    out: Annotated[Path, typer.Option(help="folder for detector.onnx + detector.json")],
    base: Annotated[Path | None, typer.Option(help="ONNX detector to adapt (card beside it)",
                                              show_default="the shipped detector; its STEM "
                                              "detector for frames the daemon saved from STEM "
                                              "streams")] = None,
    minutes: Annotated[float, typer.Option(help="wall-time budget of the whole run, min")] = 4.0,
    guard: Annotated[str, typer.Option(
        help="guard against forgetting: freeze (encoder frozen), head (only the last decoder "
             "level and the output layer train), mix (a quarter synthetic crops of the original "
             "training generator) or none")] = "freeze",
    threads: Annotated[int, typer.Option(
        help="torch and ONNX Runtime threads (2 threads on a busy 2-core machine run slower)")] = 1,
    seed: Annotated[int, typer.Option(help="random seed of the fine-tuning")] = 0,
    steps: Annotated[int | None, typer.Option(
        min=10, help="a fixed number of optimisation steps instead of the time budget: the same "
                     "inputs and seed give the same model on any machine (--minutes is then no "
                     "limit)", show_default="as many as --minutes allows")] = None,
    base_competes: Annotated[bool, typer.Option(
        "--base-competes/--fine-tuned-only",
        help="the base network competes with the fine-tuned one on the held-out part of the "
             "annotations, and is kept (with a scale and cut chosen there) when it scores at "
             "least as well")] = True,
    choice: Annotated[str, typer.Option(
        help="how the held-out part of the annotations chooses network, scale and cut: best "
             "(highest F1) or paired (only what beats the base model as shipped by more than "
             "the count noise of the difference)")] = "best",
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="draw a progress bar",
        show_default="on a terminal")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace an adapted model already at --out (its detector.onnx, "
                            "detector.json and base network; never the base model's own "
                            "folder)")] = False,
) -> None:
    """Fine-tune the detector on a few annotated frames of a new specimen (torch, CPU)."""
    try:
        from nanoscout.training.adapt import MERGED
        from nanoscout.training.adapt import adapt as run_adapt
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            raise NanoscoutError("adapt needs PyTorch: pip install torch==2.13.0 && "
                                 "pip install -e '.[train]'") from exc
        raise
    from nanoscout.analysis.modelcard import COUNT_FLOOR
    from nanoscout.clients.progress import progress as bar_for

    # click gives an option one value: `IMAGES... --labels L1 L2` arrives as images
    # [I1, I2, L2] and labels [L1]; the labels are the last half of everything given
    given = [*images, *labels]
    if len(labels) < len(images) and len(given) % 2 == 0:
        n = len(given) // 2
        images, labels = images[:n], [*labels, *images[n:]]

    command = "nanoscout models adapt " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    with bar_for("adapting", total=100, enabled=progress) as bar:
        done = [0.0]

        def tick(frac: float, note: str) -> None:
            step = max(0.0, 100.0 * frac - done[0])
            done[0] += step
            bar.advance(step, note)

        res = run_adapt(list(images), list(labels), out, base=base, minutes=minutes,
                        guard=guard, seed=seed, threads=threads, progress=tick, command=command,
                        base_competes=base_competes, steps=steps, choice=choice,
                        overwrite=overwrite)
        b, a = res.before, res.after
        also = ("" if res.base_network is None else
                f" (with its base network {res.base_network}"
                + (", whose particles join its own)" if res.network == MERGED else ")"))
        bar.log(f"wrote {res.onnx} and {res.card}{also} in {res.seconds:.0f} s ({res.steps} "
                f"steps, guard {res.guard}, network {res.network}, scale {res.scale}, "
                f"score cut {res.min_score})")
        bar.log(f"held-out F1 {b['f1']:.3f} -> {a['f1']:.3f} (P {b['precision']:.3f} -> "
                f"{a['precision']:.3f}, R {b['recall']:.3f} -> {a['recall']:.3f}); "
                f"{res.protocol}")
        band = res.extra["adaptation"].get("particle_px")
        if band is not None:
            bar.log(f"these settings apply to frames whose particles the base network measures "
                    f"at {band[0]:g}-{band[1]:g} px; it analyses the others alone, with its own "
                    "card (det.base_network_only)")
        ratio = res.extra["adaptation"].get("max_count_ratio")
        if ratio is not None:
            bar.log(f"a frame where the fine-tuned network finds more than {ratio:g} times the "
                    f"base network's particles (at least {COUNT_FLOOR}) is analysed by the base "
                    "network alone (det.base_network_only)")
