"""Client of the daemon's query socket: the AI lens's feature maps of a live frame, and control
requests (reset a source's statistics, set its drift reference now; v1.5: save the newest raw
frames of a source as TIFF, hot-swap the detection model, revert it).

>>> reply, maps = request_lens(QUERY, "sim", ["act_enc2"])  # QUERY: e.g. tcp://127.0.0.1:5557
>>> reply.source, maps["act_enc2"].ndim, maps["act_enc2"].dtype  # (1, channels, rows, cols)
('sim', 4, dtype('float16'))
>>> request_control(QUERY, "sim", "reset_statistics").ok  # the source's statistics start again
True

>>> save_frame(QUERY, "sim").files  # doctest: +SKIP
['review/sim-000000042.tif']
>>> swap_model(QUERY, "adapted/detector.onnx").model_generation  # doctest: +SKIP
1
>>> revert_model(QUERY).model_generation  # back to the model before  # doctest: +SKIP
2

One REQ socket per call, with a timeout: a daemon that is gone gives a :class:`QueryError`
after ``timeout`` s instead of a hang. The daemon's own refusals (unknown source or output, no
lens loaded) come back as a QueryError carrying its words.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from pydantic import ValidationError

from nanoscout.wire.errors import NanoscoutError, ProtocolError
from nanoscout.wire.protocol import (
    ControlReply,
    ControlRequest,
    Header,
    LensReply,
    LensRequest,
    Message,
    decode_message,
    encode_message,
)
from nanoscout.wire.transport import ClientKeys, connect

__all__ = ["CONTROL_ACTIONS", "QueryError", "local_sha256", "request_control", "request_lens",
           "revert_model", "save_frame", "swap_model"]

#: what a control request may ask (:class:`~nanoscout.wire.protocol.ControlRequest`)
CONTROL_ACTIONS: tuple[str, ...] = ("reset_statistics", "set_drift_reference",
                                    "set_particle_size")


class QueryError(NanoscoutError):
    """The daemon did not answer, or answered with an error."""


def _ask(endpoint: str, request: Header, *, timeout: float, curve: ClientKeys | None
         ) -> Message[Any]:
    """Send one request on a fresh REQ socket and decode the answer (QueryError on a timeout
    or a malformed answer)."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    ms = max(1, int(timeout * 1000))
    sock.setsockopt(zmq.RCVTIMEO, ms)
    sock.setsockopt(zmq.SNDTIMEO, ms)
    if curve is not None:
        curve.apply(sock)
    try:
        connect(sock, endpoint)
        sock.send_multipart(encode_message(request))
        parts = sock.recv_multipart(copy=False)
    except zmq.Again:
        raise QueryError(f"no answer from the daemon's query socket {endpoint} within "
                         f"{timeout:g} s (is it running, with its query socket enabled?)"
                         ) from None
    finally:
        sock.close(linger=0)
    try:
        return decode_message(parts)
    except ProtocolError as exc:
        raise QueryError(f"malformed answer from {endpoint}: {exc}") from exc


def request_control(endpoint: str, source: str, action: str, *, timeout: float = 10.0,
                    curve: ClientKeys | None = None,
                    particle_size_nm: tuple[float, float] | None = None) -> ControlReply:
    """Ask the daemon to ``reset_statistics`` or ``set_drift_reference`` of ``source`` (applied
    before its next frame), or to ``set_particle_size``: give it ``particle_size_nm`` (low,
    high median particle diameter, nm; None: none again); returns the reply, raises QueryError
    when refused and ValueError naming an unknown action or an impossible range."""
    if action not in CONTROL_ACTIONS:
        raise ValueError(f"unknown control action {action!r}; known: "
                         f"{', '.join(CONTROL_ACTIONS)}")
    try:
        request = ControlRequest(source=source, action=action,  # type: ignore[arg-type]
                                 particle_size_nm=particle_size_nm)
    except ValidationError as exc:
        raise ValueError(f"{action} for {source!r}: {exc.errors()[0]['msg']}") from None
    return _control(endpoint, request, timeout=timeout, curve=curve)


def _request(**fields: Any) -> ControlRequest:
    """The control request of ``fields``; ValueError naming the action and the bad field."""
    try:
        return ControlRequest(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{fields['action']}: {where}: {err['msg']}") from None


def _control(endpoint: str, request: ControlRequest, *, timeout: float,
             curve: ClientKeys | None) -> ControlReply:
    """Send ``request``; its reply, or QueryError when the daemon refuses or answers otherwise."""
    msg = _ask(endpoint, request, timeout=timeout, curve=curve)
    reply = msg.header
    if not isinstance(reply, ControlReply):
        raise QueryError(f"expected a control reply from {endpoint}, got {msg.kind}")
    if not reply.ok:
        raise QueryError(f"the daemon says: {reply.error}")
    return reply


def local_sha256(model: str | Path) -> str:
    """The sha256 of the ONNX file of ``model`` (an ``.onnx`` file, or its ``.json`` card, whose
    ``onnx_file`` names it) on this machine; QueryError when it is not here."""
    p = Path(model)
    if p.suffix.lower() == ".json":
        try:
            p = p.parent / str(json.loads(p.read_text(encoding="utf-8"))["onnx_file"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QueryError(f"cannot read the ONNX file's name from the card {model}: "
                             f"{exc}") from exc
    if not p.is_file():
        raise QueryError(f"{p} is not a file here: give the sha256 of the model on the "
                         "daemon's host")
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_frame(endpoint: str, source: str, frames: int = 1, *, timeout: float = 30.0,
               curve: ClientKeys | None = None) -> ControlReply:
    """Ask the daemon to write the newest ``frames`` raw frames of ``source`` it keeps for
    review as calibrated TIFF; the reply's ``files`` are their paths on the daemon's host.
    QueryError when refused (no frame kept, disk budget of ``[review]``); ValueError naming
    an impossible ``frames`` (< 1) before anything is sent."""
    return _control(endpoint, _request(source=source, action="save_frame", frames=frames),
                    timeout=timeout, curve=curve)


def swap_model(endpoint: str, model: str | Path, sha256: str | None = None, *,
               timeout: float = 120.0, curve: ClientKeys | None = None) -> ControlReply:
    """Ask the daemon to hot-swap its detection model to ``model`` (an ONNX file with its card
    beside it, or the card, as the daemon's host sees the path); ``sha256``: the ONNX file's
    expected sha256 (None: the sha256 of the file at that path on this machine, which must
    then exist here). Returns once the daemon serves the new model (the reply names it);
    QueryError with the daemon's words when it refused and kept its model; ValueError naming a
    malformed ``sha256`` before anything is sent."""
    if sha256 is None:
        sha256 = local_sha256(model)
    return _control(endpoint, _request(action="swap_model", model=str(model), sha256=sha256),
                    timeout=timeout, curve=curve)


def revert_model(endpoint: str, *, timeout: float = 60.0, curve: ClientKeys | None = None
                 ) -> ControlReply:
    """Ask the daemon to go back to the detection model before its last swap; QueryError when
    there is none."""
    return _control(endpoint, ControlRequest(action="revert_model"), timeout=timeout,
                    curve=curve)


def request_lens(endpoint: str, source: str, outputs: list[str], *, timeout: float = 10.0,
                 curve: ClientKeys | None = None) -> tuple[LensReply, dict[str, np.ndarray]]:
    """Ask for the lens ``outputs`` of ``source``'s newest frame; returns (reply, name → array)
    with every name asked for.

    An empty ``outputs`` asks only which outputs exist (``reply.available``). QueryError when
    the daemon does not answer, refuses, or answers for another source or without an output
    asked for (a reply that does not match the request is never handed on).
    """
    msg = _ask(endpoint, LensRequest(source=source, outputs=outputs), timeout=timeout,
               curve=curve)
    reply = msg.header
    if not isinstance(reply, LensReply):
        raise QueryError(f"expected a lens reply from {endpoint}, got {msg.kind}")
    if reply.error:
        raise QueryError(f"the daemon says: {reply.error} (available: {reply.available})")
    maps = dict(zip(reply.outputs, msg.extra, strict=True))  # as many: LensReply checks it
    missing = [o for o in outputs if o not in maps]
    if reply.source != source or missing:
        raise QueryError(f"the reply from {endpoint} does not answer the request for "
                         f"{outputs} of {source!r}: it is of {reply.source!r} with "
                         f"{reply.outputs}")
    return reply, maps
