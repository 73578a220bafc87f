"""FramePublisher: the one place where adapters turn a numpy image into a ``frame`` message."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal

import numpy as np
import zmq

from nanoscout.wire.protocol import MetaValue, encode_frame, frame_header
from nanoscout.wire.transport import ClientKeys, connect, frame_output_socket


class FramePublisher:
    """Connects to the daemon's frame input and sends frames with increasing ``seq``.

    ``mode="push"`` matches a ``lossless`` daemon (send blocks when the daemon is behind:
    back-pressure); ``mode="pub"`` matches a ``live`` daemon (frames beyond the high-water mark
    are dropped by ZeroMQ).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        mode: Literal["push", "pub"] = "push",
        source: str = "replay",
        hwm: int = 100,
        ctx: zmq.Context | None = None,
        first_seq: int = 0,
        curve: ClientKeys | None = None,
    ) -> None:
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = frame_output_socket(self._ctx, mode, hwm=hwm)
        if curve is not None:
            curve.apply(self._sock)
        connect(self._sock, endpoint)
        self.endpoint = endpoint
        self.mode = mode
        self.source = source
        self.seq = first_seq

    def send(
        self,
        image: np.ndarray,
        *,
        pixel_size_nm: float | None,
        modality: str | None = None,
        stage: tuple[float, float] | None = None,
        magnification: float | None = None,
        meta: Mapping[str, MetaValue] | None = None,
        t_acq_ns: int | None = None,
    ) -> int:
        """Send one 2-D image (stage in µm, pixel size in nm); returns the ``seq`` it was given."""
        seq = self.seq
        header = frame_header(
            image,
            source=self.source,
            seq=seq,
            t_acq_ns=time.time_ns() if t_acq_ns is None else t_acq_ns,
            pixel_size_nm=pixel_size_nm,
            modality=modality,
            stage=stage,
            magnification=magnification,
            meta=meta,
        )
        self._sock.send_multipart(encode_frame(header, image), copy=False)
        self.seq += 1
        return seq

    def send_raw(self, parts: list[bytes]) -> None:
        """Send arbitrary multipart bytes (for fault-injection tests and tools)."""
        self._sock.send_multipart(parts)

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket (and the context if this publisher created it).

        ``linger_ms`` > 0 keeps trying to deliver queued frames that long (lossless runs).
        """
        self._sock.close(linger=linger_ms)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
