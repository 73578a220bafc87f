"""``nanoscout models swap`` / ``models revert`` / ``save-frame`` / ``particle-size``: the
running daemon's control requests from the shell (hot swap of the detection model, raw frames
saved for review, a source's particle size range).

Each prints the daemon's reply as one JSON line (the model serving after it, the files
written) and exits non-zero with the daemon's words when it refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nanoscout.cli.app import ClientKey, ServerKey, app, curve_keys, models_app
from nanoscout.wire.protocol import ControlReply
from nanoscout.wire.transport import DEFAULT_QUERY_ENDPOINT

__all__ = ["particle_size", "revert", "save_frame", "swap"]

Query = Annotated[str, typer.Option("--query", help="the daemon's query endpoint (REP)")]


def _print(reply: ControlReply) -> None:
    print(json.dumps({"action": reply.action, "model": reply.model,
                      "model_sha256": reply.model_sha256,
                      "model_generation": reply.model_generation, "files": reply.files,
                      "elapsed_ms": reply.elapsed_ms}), flush=True)


@models_app.command("swap")
def swap(
    model: Annotated[Path, typer.Argument(help="the ONNX detector (its .json card beside it) "
                                               "or its card, as the daemon's host sees it")],
    sha256: Annotated[str | None, typer.Option(
        help="the ONNX file's expected sha256 (default: the file's here)")] = None,
    query: Query = DEFAULT_QUERY_ENDPOINT,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the switch")] = 120.0,
    server_key: ServerKey = None,
    client_key: ClientKey = None,
) -> None:
    """Hot-swap the running daemon's detection model (checked, probed, switched between two
    frames; the daemon keeps its model when anything fails)."""
    from nanoscout.clients.query import swap_model

    try:
        reply = swap_model(query, model, sha256, timeout=timeout,
                           curve=curve_keys(server_key, client_key))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _print(reply)


@models_app.command("revert")
def revert(
    query: Query = DEFAULT_QUERY_ENDPOINT,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the switch")] = 60.0,
    server_key: ServerKey = None,
    client_key: ClientKey = None,
) -> None:
    """Put the running daemon back on the detection model it used before its last swap."""
    from nanoscout.clients.query import revert_model

    _print(revert_model(query, timeout=timeout, curve=curve_keys(server_key, client_key)))


@app.command("save-frame", rich_help_panel="Live")
def save_frame(
    source: Annotated[str, typer.Argument(help="the source whose newest raw frames to save")],
    frames: Annotated[int, typer.Option(help="how many of its newest frames")] = 1,
    query: Query = DEFAULT_QUERY_ENDPOINT,
    server_key: ServerKey = None,
    client_key: ClientKey = None,
) -> None:
    """Have the running daemon write the newest raw frame(s) of SOURCE as calibrated TIFF
    (into its ``[review] directory``)."""
    from nanoscout.clients.query import save_frame as ask

    try:
        reply = ask(query, source, frames, curve=curve_keys(server_key, client_key))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _print(reply)


@app.command("particle-size", rich_help_panel="Live")
def particle_size(
    source: Annotated[str, typer.Argument(help="the source whose frames the range is for")],
    low: Annotated[float | None, typer.Argument(help="smallest median diameter, nm")] = None,
    high: Annotated[float | None, typer.Argument(help="largest median diameter, nm")] = None,
    query: Query = DEFAULT_QUERY_ENDPOINT,
    server_key: ServerKey = None,
    client_key: ClientKey = None,
) -> None:
    """Tell the running daemon the range LOW HIGH (nm) that SOURCE's median particle diameter
    lies in, from its next frame on (for its frames that name none): a working-scale estimate
    outside it moves to its nearest end. Without LOW HIGH: no range of its own again."""
    from nanoscout.clients.query import request_control

    if (low is None) != (high is None):
        raise typer.BadParameter("give LOW and HIGH, or neither (to clear the range)")
    size = None if low is None or high is None else (low, high)
    try:
        reply = request_control(query, source, "set_particle_size", particle_size_nm=size,
                                curve=curve_keys(server_key, client_key))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _print(reply)
