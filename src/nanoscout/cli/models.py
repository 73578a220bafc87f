"""``nanoscout models ACTION ARGS...``: each action hands its arguments, unchanged, to the
``main(argv)`` of its module in :mod:`nanoscout.training` (``nanoscout models train --help``
shows that module's own options)."""

from __future__ import annotations

import sys
from collections.abc import Callable

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


def _evaluate_lens() -> Main:
    from nanoscout.training.evaluate_lens import main
    return main


def _calibrate() -> Main:
    from nanoscout.training.score_calibration import main
    return main


def _calibrate_lens() -> Main:
    from nanoscout.training.calibrate_lens import main
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
    "calibrate": (_calibrate, "fit a detector's score calibration on named tuning sets into its "
                              "card (--model M --sets emps-tune,synthetic-tune; no torch)"),
    "calibrate-lens": (_calibrate_lens, "rebuild the AI lens's novelty reference on your own "
                                        "frames (FRAMES... --out DIR; no torch)"),
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
