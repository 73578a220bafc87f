"""The dashboard's AI-lens view: the daemon's query socket asked on demand, answered as a PNG.

:class:`LensView` is asked by the HTTP server when a browser presses "AI lens" (never per
frame). It sends one :class:`~nanoscout.wire.protocol.LensRequest` for the newest frame of a source
and turns the chosen output into a mosaic (:func:`nanoscout.clients.lens.mosaic_from_maps`):

* ``act_*`` (the encoder's activations, (1, channels, rows, cols)): the first ``max_maps``
  channels, four per row, each scaled to its own min..max, in the heatmap palette;
* ``reconstruction`` ((1, 1, S, S), normalised intensity): one grey tile, 0..1 -> black..white.

The request function is injectable (``request``, default :func:`nanoscout.clients.query.request_lens`),
so the server can be tested without a daemon. A daemon that does not answer within
``timeout`` s, or that refuses, raises :class:`~nanoscout.clients.query.QueryError` with its reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from nanoscout.clients.dashboard.images import colorize, png_b64
from nanoscout.clients.lens import COLUMNS, GAP, mosaic_from_maps
from nanoscout.clients.query import QueryError, request_lens
from nanoscout.wire.protocol import LensReply
from nanoscout.wire.transport import ClientKeys

__all__ = ["LensView", "RequestLens", "shown_outputs"]

#: ``request_lens(endpoint, source, outputs, timeout=..., curve=...) -> (reply, arrays)``
RequestLens = Callable[..., tuple[LensReply, dict[str, np.ndarray]]]

#: tile side of the dashboard's mosaic, px (activations; a lone reconstruction gets twice that)
TILE_PX = 112


def shown_outputs(available: list[str]) -> list[str]:
    """The outputs the page offers, in the daemon's order: ``act_*`` and ``reconstruction``
    (the novelty error and texture statistics are numbers, not pictures)."""
    return [o for o in available if o.startswith("act_") or o == "reconstruction"]


class LensView:
    """Asks the daemon's query socket at ``endpoint`` for lens outputs (thread-safe)."""

    def __init__(self, endpoint: str, *, timeout: float = 2.5, curve: ClientKeys | None = None,
                 max_maps: int = 16, request: RequestLens = request_lens) -> None:
        if not 0 < timeout <= 10:
            raise ValueError(f"lens timeout ({timeout}) must be in (0, 10] s")
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_maps = max_maps
        self._curve = curve
        self._request = request
        self._lock = threading.Lock()
        self._available: list[str] = []  # the daemon's outputs, from its last reply

    def _ask(self, source: str, outputs: list[str]) -> tuple[LensReply, dict[str, np.ndarray]]:
        reply, arrays = self._request(self.endpoint, source, outputs, timeout=self.timeout,
                                      curve=self._curve)
        with self._lock:
            self._available = list(reply.available)
        return reply, arrays

    def view(self, source: str, layer: str | None = None) -> dict[str, Any]:
        """The lens's view of ``source``'s newest frame as a JSON-ready dict: ``source``,
        ``seq``, ``t_acq_ns``, ``novelty`` (None without a novelty score), ``layer``,
        ``layers`` (what the page may choose), ``channels`` (maps in the layer), ``shown``
        (maps drawn), ``map_shape`` [rows, cols] (lens px) and ``png`` (base64). ``layer``
        None picks the first ``act_*`` output. Raises QueryError (no answer within the
        timeout, or the daemon's refusal)."""
        with self._lock:
            known = list(self._available)
        if not layer:
            if not known:  # one cheap request (no lens run) for the list of outputs
                known = list(self._ask(source, [])[0].available)
            layers = shown_outputs(known)
            if not layers:
                raise QueryError(f"the daemon's lens at {self.endpoint} offers no feature maps "
                                 f"(outputs: {known})")
            layer = next((o for o in layers if o.startswith("act_")), layers[0])
        elif known and layer not in shown_outputs(known):
            raise QueryError(f"unknown lens layer {layer!r} (choose one of "
                             f"{', '.join(shown_outputs(known))})")
        reply, arrays = self._ask(source, [layer])
        if layer not in arrays:
            raise QueryError(f"the daemon's reply has no {layer!r} (it sent {sorted(arrays)})")
        maps = np.asarray(arrays[layer], dtype=np.float32)
        if maps.ndim < 2 or maps.size == 0:
            raise QueryError(f"lens output {layer!r} has no picture (shape {maps.shape})")
        stack = maps.reshape(-1, maps.shape[-2], maps.shape[-1])
        if layer == "reconstruction":
            picture = mosaic_from_maps(stack, 1, 2 * TILE_PX, lo=0.0, hi=1.0)
        else:
            n = min(len(stack), self.max_maps)
            picture = _palette(mosaic_from_maps(stack, n, TILE_PX), n, TILE_PX)
        return {"source": reply.source, "seq": reply.seq, "t_acq_ns": reply.t_acq_ns,
                "novelty": reply.novelty, "layer": layer,
                "layers": shown_outputs(list(reply.available)), "channels": len(stack),
                "shown": min(len(stack), self.max_maps if layer != "reconstruction" else 1),
                "map_shape": list(stack.shape[1:]), "png": png_b64(picture)}


def _palette(mosaic: np.ndarray, n_tiles: int, tile: int) -> np.ndarray:
    """A grey :func:`mosaic_from_maps` of ``n_tiles`` tiles in the heatmap palette, its
    separators and empty places a dark neutral grey (uint8 RGB)."""
    columns = min(COLUMNS, n_tiles)
    inside = np.zeros(mosaic.shape, bool)
    for k in range(n_tiles):
        r, c = divmod(k, columns)
        inside[r * (tile + GAP): r * (tile + GAP) + tile, c * (tile + GAP): c * (tile + GAP) + tile] = True
    rgb = colorize(mosaic)
    rgb[~inside] = 48
    return rgb
