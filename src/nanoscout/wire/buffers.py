"""The raw buffers that follow a header on the wire, declared per header class.

Each header class lists its buffers (``Header.buffers``); :mod:`nanoscout.wire.codec` encodes
and decodes every message from that table. A spec reads what it needs from the header (a row
count, a shape, a dtype), says how many buffers the header announces (0 for an optional
heatmap that is absent, one per map for the lens), checks an array before it is sent and turns
a received buffer into a read-only numpy view without copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from nanoscout.wire.errors import PayloadError, Reason
from nanoscout.wire.particles import PARTICLE_DTYPE

__all__ = ["Buffer", "BufferSpec", "Float16Maps", "Heatmap", "Picture", "Pixels", "Slot", "Table"]

Buffer = bytes | memoryview
#: where a decoded buffer lands on a Message: ``array`` (the main payload), ``heatmap`` or
#: ``extra`` (a tuple, for a variable number of arrays)
Slot = Literal["array", "heatmap", "extra"]


class BufferSpec(Protocol):
    """One kind of buffer of a header."""

    @property
    def slot(self) -> Slot:
        """Where the decoded array lands on a Message."""

    def count(self, header: Any) -> int:
        """How many buffers of this kind ``header`` announces."""

    def describe(self, header: Any) -> str:
        """What ``header`` announces, in words (for error messages)."""

    def encode(self, header: Any, array: np.ndarray, index: int) -> memoryview:
        """Check ``array`` against the header and return its bytes (no copy when contiguous)."""

    def decode(self, header: Any, buf: Buffer, index: int) -> np.ndarray:
        """Return the received bytes as a read-only array the header describes."""


def _bytes_of(array: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], what: str) -> memoryview:
    if array.dtype != dtype or tuple(array.shape) != tuple(shape):
        raise PayloadError(f"{what} must be {dtype} of shape {tuple(shape)}, got {array.dtype} "
                           f"{tuple(array.shape)}", reason=Reason.SHAPE)
    return np.ascontiguousarray(array).data.cast("B")


def _view(buf: Buffer, dtype: np.dtype, shape: tuple[int, ...], what: str, field: str
          ) -> np.ndarray:
    if any(n < 0 for n in shape):  # the header models bound their shapes; this is the last line
        raise PayloadError(f"{what} has a negative side in {field}", reason=Reason.SHAPE)
    mv = memoryview(buf)
    want = math.prod(shape) * dtype.itemsize
    if mv.nbytes != want:
        raise PayloadError(f"{what} is {mv.nbytes} bytes but header announces {want} (it does "
                           f"not match {field})", reason=Reason.LENGTH)
    return np.frombuffer(mv, dtype=dtype).reshape(shape)


@dataclass(frozen=True)
class Pixels:
    """A frame's pixels: the header's ``shape`` and ``dtype``, C order."""

    slot: Slot = "array"

    def count(self, header: Any) -> int:
        """Return how many buffers of this kind ``header`` announces."""
        return 1

    def describe(self, header: Any) -> str:
        """Return what ``header`` announces, in words."""
        return f"the pixels ({header.dtype}, shape {tuple(header.shape)})"

    def encode(self, header: Any, array: np.ndarray, index: int) -> memoryview:
        """Check ``array`` against ``header`` and return its bytes."""
        if array.size == 0:
            raise PayloadError(f"zero-size frame (shape {array.shape})", reason=Reason.EMPTY)
        if tuple(array.shape) != tuple(header.shape):
            raise PayloadError(f"array shape {array.shape} does not match header shape "
                               f"{header.shape}", reason=Reason.SHAPE)
        if array.dtype.str != header.dtype:
            raise PayloadError(f"array dtype {array.dtype.str} does not match header dtype "
                               f"{header.dtype}", reason=Reason.DTYPE)
        return np.ascontiguousarray(array).data.cast("B")

    def decode(self, header: Any, buf: Buffer, index: int) -> np.ndarray:
        """Return ``buf`` as the read-only array ``header`` describes."""
        return _view(buf, np.dtype(header.dtype), tuple(header.shape), "payload",
                     f"shape {tuple(header.shape)} of {header.dtype}")


@dataclass(frozen=True)
class Table:
    """A particle table (:data:`~nanoscout.wire.particles.PARTICLE_DTYPE`) of ``header.<rows>``
    rows."""

    rows: str
    slot: Slot = "array"

    def count(self, header: Any) -> int:
        """Return how many buffers of this kind ``header`` announces."""
        return 1

    def describe(self, header: Any) -> str:
        """Return what ``header`` announces, in words."""
        return f"one particle table ({self.rows}={getattr(header, self.rows)})"

    def encode(self, header: Any, array: np.ndarray, index: int) -> memoryview:
        """Check ``array`` against ``header`` and return its bytes."""
        if array.dtype != PARTICLE_DTYPE:
            raise PayloadError(f"particle table has dtype {array.dtype}, expected "
                               "PARTICLE_DTYPE", reason=Reason.DTYPE)
        n = getattr(header, self.rows)
        if len(array) != n:
            raise PayloadError(f"header {self.rows}={n} but the table has {len(array)} rows",
                               reason=Reason.LENGTH)
        return np.ascontiguousarray(array).data.cast("B")

    def decode(self, header: Any, buf: Buffer, index: int) -> np.ndarray:
        """Return ``buf`` as the read-only array ``header`` describes."""
        n = getattr(header, self.rows)
        return _view(buf, PARTICLE_DTYPE, (n,), "particle table", f"{self.rows}={n}")


@dataclass(frozen=True)
class Heatmap:
    """An optional uint8 heatmap of shape ``header.<shape>`` (absent when that is None)."""

    shape: str
    slot: Slot = "heatmap"

    def count(self, header: Any) -> int:
        """Return how many buffers of this kind ``header`` announces."""
        return 0 if getattr(header, self.shape) is None else 1

    def describe(self, header: Any) -> str:
        """Return what ``header`` announces, in words."""
        shape = getattr(header, self.shape)
        return "no heatmap" if shape is None else f"a heatmap of shape {tuple(shape)}"

    def encode(self, header: Any, array: np.ndarray, index: int) -> memoryview:
        """Check ``array`` against ``header`` and return its bytes."""
        return _bytes_of(array, np.dtype(np.uint8), tuple(getattr(header, self.shape)), "heatmap")

    def decode(self, header: Any, buf: Buffer, index: int) -> np.ndarray:
        """Return ``buf`` as the read-only array ``header`` describes."""
        shape = tuple(getattr(header, self.shape))
        return _view(buf, np.dtype(np.uint8), shape, "heatmap", f"{self.shape} {shape}")


@dataclass(frozen=True)
class Picture:
    """A uint8 picture of ``header.<size>`` (rows, cols)."""

    size: str
    slot: Slot = "array"

    def count(self, header: Any) -> int:
        """Return how many buffers of this kind ``header`` announces."""
        return 1

    def describe(self, header: Any) -> str:
        """Return what ``header`` announces, in words."""
        return f"one uint8 image of size {tuple(getattr(header, self.size))}"

    def encode(self, header: Any, array: np.ndarray, index: int) -> memoryview:
        """Check ``array`` against ``header`` and return its bytes."""
        return _bytes_of(array, np.dtype(np.uint8), tuple(getattr(header, self.size)),
                         "uint8 image")

    def decode(self, header: Any, buf: Buffer, index: int) -> np.ndarray:
        """Return ``buf`` as the read-only array ``header`` describes."""
        size = tuple(getattr(header, self.size))
        return _view(buf, np.dtype(np.uint8), size, "image", f"{self.size} {size}")


@dataclass(frozen=True)
class Float16Maps:
    """One little-endian float16 array per shape in ``header.<shapes>``."""

    shapes: str
    slot: Slot = "extra"

    def count(self, header: Any) -> int:
        """Return how many buffers of this kind ``header`` announces."""
        return len(getattr(header, self.shapes))

    def describe(self, header: Any) -> str:
        """Return what ``header`` announces, in words."""
        return f"one array per shape {getattr(header, self.shapes)}"

    def encode(self, header: Any, array: np.ndarray, index: int) -> memoryview:
        """Check ``array`` against ``header`` and return its bytes."""
        shape = tuple(getattr(header, self.shapes)[index])
        if tuple(array.shape) != shape:
            raise PayloadError(f"map {index} has shape {tuple(array.shape)}, the header says "
                               f"{shape}", reason=Reason.SHAPE)
        return np.ascontiguousarray(array, dtype="<f2").data.cast("B")

    def decode(self, header: Any, buf: Buffer, index: int) -> np.ndarray:
        """Return ``buf`` as the read-only array ``header`` describes."""
        shape = tuple(getattr(header, self.shapes)[index])
        return _view(buf, np.dtype("<f2"), shape, f"lens output {index}", f"shape {shape}")
