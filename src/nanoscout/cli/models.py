"""``nanoscout models ACTION ARGS...``: each action hands its arguments, unchanged, to the
``main(argv)`` of its module in :mod:`nanoscout.training` (``nanoscout models train --help``
shows that module's own options)."""

from __future__ import annotations

import importlib
import sys

import typer

from nanoscout.cli.app import CONTEXT, models_app
from nanoscout.wire.errors import NanoscoutError

#: action -> (module of nanoscout.training, one-line help)
ACTIONS: dict[str, tuple[str, str]] = {
    "train": ("train", "retrain the particle detector (torch; ~50 min on 2 cores)"),
    "export": ("export", "export a trained detector to ONNX + model card (torch)"),
    "eval": ("evaluate", "accuracy of the detector on held-out synthetic and real images"),
    "train-classifier": ("train_classifier", "train the field-of-view classifier (torch)"),
    "eval-classifier": ("evaluate_classifier", "held-out accuracy, CAM test, engine time"),
    "train-lens": ("train_lens", "train the AI-lens autoencoder (torch)"),
    "eval-lens": ("evaluate_lens", "novelty of held-out usual and novel frames"),
    "calibrate-lens": ("calibrate_lens", "rebuild the AI lens's novelty reference on your own "
                                         "frames (FRAMES... --out DIR; no torch)"),
}
_PASS_THROUGH = {**CONTEXT, "allow_extra_args": True, "ignore_unknown_options": True,
                 "help_option_names": []}


def _make(action: str, module: str, doc: str) -> None:
    def command(ctx: typer.Context) -> None:
        try:
            main = importlib.import_module(f"nanoscout.training.{module}").main
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


for _action, (_module, _doc) in ACTIONS.items():
    _make(_action, _module, _doc)
