"""The ``nanoscout`` typer application, its global options and the helpers its commands share.

Flag names mean one thing in every command:

=====================  =====================================================================
``--frames-endpoint``  the daemon's frame input (serve binds it; adapters connect to it)
``--results``          the daemon's result publisher (serve binds it; subscribers connect)
``--query``            the daemon's lens query socket (serve binds it; lens/dashboard ask it)
``--control``          the microscope's control socket
``--out``              the file or folder written
=====================  =====================================================================

The old spellings keep working, hidden from the help: ``--connect`` (the endpoint the
command connects to), ``serve --input`` / ``--output``, ``measure --masks``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from nanoscout.cli.logs import EngineSummary, setup_logging
from nanoscout.wire.errors import NanoscoutError
from nanoscout.wire.transport import ClientKeys

__all__ = ["CONTEXT", "EngineLine", "app", "curve_keys", "models_app", "scale_value"]

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="nanoscout", help="Live analysis for electron microscopes: frames over ZeroMQ in, "
    "measured nanoparticles, size statistics and alerts out.", context_settings=CONTEXT,
    no_args_is_help=True, rich_markup_mode="markdown", pretty_exceptions_enable=False,
    add_completion=False)
models_app = typer.Typer(help="Train, export, evaluate and calibrate the models (train and "
                         "export need torch).", context_settings=CONTEXT, no_args_is_help=True,
                         rich_markup_mode="markdown")
app.add_typer(models_app, name="models", rich_help_panel="Models")


class EngineLine:
    """The engine summary of this process's logging (set by the app's callback)."""

    summary: EngineSummary | None = None

    @classmethod
    def print(cls) -> None:
        """Print the one engine line to stderr (once the engines are chosen)."""
        line = cls.summary.line() if cls.summary else None
        if line:
            print(line, file=sys.stderr, flush=True)


def _version(value: bool) -> None:
    if value:
        from nanoscout import __version__

        print(f"nanoscout {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("-v", "--verbose",
                                          help="log everything (DEBUG), including why each "
                                               "engine backend was or was not chosen")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    EngineLine.summary = setup_logging(verbose)


# ------------------------------------------------------------------------------- shared types

ServerKey = Annotated[Path | None, typer.Option(
    "--server-key", help="the daemon's public CURVE certificate (.key), for remote use",
    rich_help_panel="Security")]
ClientKey = Annotated[Path | None, typer.Option(
    "--client-key", help="this client's secret CURVE certificate (.key_secret)",
    rich_help_panel="Security")]
Connect = Annotated[str | None, typer.Option("--connect", hidden=True)]
#: adapters (simulate, replay, microscope): PUSH / PUB / whichever the daemon takes
AdapterMode = Annotated[Literal["auto", "push", "pub"], typer.Option(
    help="push (lossless daemon), pub (live daemon) or auto: whichever the daemon takes; "
         "a mode the daemon refuses is an error within seconds")]
#: adapters: the daemon's result endpoint, for confirmation
AdapterResults = Annotated[str | None, typer.Option(
    "--results", help="the daemon's result endpoint: a lossless run confirms every frame "
    "and exits non-zero naming those never answered",
    show_default="tcp://127.0.0.1:5556 with the default --frames-endpoint")]
ConfirmTimeout = Annotated[float, typer.Option(
    help="at the end, wait for the daemon's answers while they keep coming, at most this "
         "long without one, s")]


def curve_keys(server_key: Path | None, client_key: Path | None) -> ClientKeys | None:
    """The CURVE keys of ``--server-key``/``--client-key`` (both or neither)."""
    if (server_key is None) != (client_key is None):
        raise NanoscoutError("CURVE needs both --server-key and --client-key")
    return None if server_key is None else ClientKeys(server_key, client_key)  # type: ignore[arg-type]


def scale_value(text: str | None) -> float | str | None:
    """``--scale``: a resample factor (working px per frame px) or "auto"."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a number nor 'auto'") from None
