"""The engine interface: one method, ``infer``, over a frozen spec of named tensors.

Backends (ONNX Runtime, TensorRT) implement :class:`Engine`; the pipeline and the tests only
ever see this interface, so a test can swap in any object with the same method.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from nanoscout.wire.errors import EngineFailure, Reason


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a model.

    ``shape`` holds ints for fixed axes and ``None`` for dynamic ones (batch, height, width);
    ``dtype`` is a numpy dtype string such as ``"float32"``.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        """Returns the spec as text for error messages, e.g. ``image: float32[?, 1, ?, ?]``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass(frozen=True)
class CalibrationSet:
    """Inputs an INT8 TensorRT build calibrates its activation ranges on.

    ``name`` identifies the set (what it is and how many inputs: a changed name recalibrates);
    ``inputs`` is called once per calibration and yields ``{input name: array}`` dicts, each one
    batch of the shape the engine is calibrated at.
    """

    name: str
    inputs: Callable[[], Iterable[Mapping[str, np.ndarray]]]


class Engine(abc.ABC):
    """A loaded model that maps named numpy arrays to named numpy arrays."""

    #: backend name as reported in results and metrics, e.g. ``"onnxruntime-cpu"``
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: why the factory skipped other backends before choosing this one (``backend="auto"``)
    selection_notes: tuple[str, ...] = ()
    #: the arithmetic the engine runs: "fp32", "fp16" (TensorRT) or "int8"
    precision: str = "fp32"

    @abc.abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once; returns every output by name (host numpy arrays)."""

    def close(self) -> None:  # noqa: B027 (optional hook: not every backend holds resources)
        """Release runtime resources (sessions, device buffers). Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:
        # e.g. "bfloat16": numpy has no such dtype, so it cannot be checked here
        return None


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check named arrays against an engine's input specs before they reach the runtime.

    Returns the arrays by name, C-contiguous (copied only where they were not). Raises
    :class:`~nanoscout.wire.errors.EngineFailure` naming the input and the expected spec when a name is
    unknown or missing, or when rank, a fixed axis or the dtype does not match.
    """
    expected = ", ".join(s.describe() for s in specs)
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise EngineFailure(f"unknown input {unknown[0]!r}: the model takes {expected}",
                            reason=Reason.BAD_INPUT)
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise EngineFailure(
                f"missing input {spec.name!r}: the model takes {expected}", reason=Reason.BAD_INPUT
            )
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise EngineFailure(
                f"input {spec.name!r} is a {type(value).__name__}, not a numpy array "
                f"(expected {spec.describe()})",
                reason=Reason.BAD_INPUT,
            )
        if value.ndim != len(spec.shape):
            raise EngineFailure(
                f"input {spec.name!r} has rank {value.ndim} (shape {value.shape}), "
                f"expected rank {len(spec.shape)}: {spec.describe()}",
                reason=Reason.BAD_INPUT,
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape, strict=True)):
            if want is not None and got != want:
                raise EngineFailure(
                    f"input {spec.name!r} has size {got} on axis {axis} (shape {value.shape}), "
                    f"expected {want}: {spec.describe()}",
                    reason=Reason.BAD_INPUT,
                )
        want_dtype = _numpy_dtype(spec.dtype)
        if want_dtype is not None and value.dtype != want_dtype:
            raise EngineFailure(
                f"input {spec.name!r} has dtype {value.dtype.str} ({value.dtype}), "
                f"expected {spec.describe()}",
                reason=Reason.BAD_INPUT,
            )
        checked[spec.name] = np.ascontiguousarray(value)
    return checked
