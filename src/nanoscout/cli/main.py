"""The ``nanoscout`` command line (typer + rich).

This package is the composition root: besides the protocol and transport it may start the
daemon (:mod:`nanoscout.daemon.app`), run its pipeline offline and call training code. Every
other client module talks to the daemon only over ZeroMQ (import-linter checks this, see
pyproject.toml).

Commands: serve, simulate, replay, tail, record, dashboard, keys, demo (live); measure, report,
lens (offline); microscope, search (stage search); models train / export / eval / calibrate /
train-classifier / eval-classifier / train-lens / eval-lens / calibrate-lens. Flag names mean
the same in every command (:mod:`nanoscout.cli.app`).
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from nanoscout.cli import live, models, offline, swap  # noqa: F401  (they register the commands)
from nanoscout.cli.app import app
from nanoscout.cli.signals import stop_signals
from nanoscout.wire.codec import printable
from nanoscout.wire.errors import NanoscoutError

__all__ = ["app", "check_args", "main"]


def check_args(argv: list[str]) -> None:
    """Parse ``argv`` (a subcommand and its options) without running it.

    Raises :class:`typer.TyperException` (a bad parameter, an unknown option ...) when the
    command line would be refused.
    """
    cmd: Any = typer.main.get_command(app)
    ctx: Any = typer.Context(cmd, info_name="nanoscout")
    args = list(argv)
    while hasattr(cmd, "get_command"):  # a group: global flags (no values), then a command
        i = next((k for k, a in enumerate(args) if not a.startswith("-")), None)
        if i is None:
            raise typer.BadParameter(f"no command in {args!r}")
        bad = [a for a in args[:i] if a not in ("-v", "--verbose")]
        if bad:
            raise typer.BadParameter(f"no such option {bad[0]!r} before the command")
        sub = cmd.get_command(ctx, args[i])
        if sub is None:
            raise typer.BadParameter(f"no such command {args[i]!r}")
        ctx = typer.Context(sub, info_name=args[i], parent=ctx)
        cmd, args = sub, args[i + 1:]
    cmd.make_context(ctx.info_name, args, parent=ctx.parent)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nanoscout`` console script; returns the exit status.

    Bad options exit 2 with typer's message; a :class:`NanoscoutError` prints
    ``nanoscout CMD: error: ...`` and exits 2 too (78, ``EX_CONFIG``, for ``serve``'s
    configuration refused at start-up: ``StartupError``); an action that exits with a message
    (a training module's refusal) prints it and exits 1; Ctrl-C, SIGINT and SIGTERM exit 130
    (:func:`stop_signals`). The message is one :func:`printable` line: it names files and paths
    (a run's part, a file found in a folder) whose names are anyone's text.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with stop_signals():
            app(args=args, prog_name="nanoscout")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        # SystemExit("why"): an action's refusal (the training modules' argument checks), said
        # as Python says it, not swallowed
        print(printable(str(exc.code)), file=sys.stderr)
        return 1
    except NanoscoutError as exc:
        cmd = next((a for a in args if not a.startswith("-")), "")
        print(printable(f"nanoscout {cmd}: error: {exc}"), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    return 0
