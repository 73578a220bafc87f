"""What kind of image a frame is, for the frames that do not say: HAADF-STEM or not.

A frame's modality chooses its detector (the STEM detector for STEM frames, the general one
for the rest; ``[engine] modality_models``). Live frames carry it in their header, and
instrument files in their metadata; a PNG, JPEG or plain TIFF carries nothing, and was
analysed by the general detector, which misses most particles of HAADF-STEM frames (held-out
Pd: F1 0.14 against the STEM detector's 0.58). The modality model (``models/weights/
modality.onnx``, trained by :mod:`nanoscout.training.train_modality`) looks at the whole frame
resampled to :data:`INPUT_SIDE` px (:func:`~nanoscout.analysis.preprocess.fixed_input`) and
gives p(haadf); a frame with p(haadf) >= :data:`ROUTE_MIN_P` is analysed as "STEM".

A wrong "STEM" costs much on the frames a user brings most (figure crops, SEM: the STEM
detector scores 0.41 and 0.20 there, the general one 0.63 and 0.43), so the cut was first 0.9,
fixed before any held-out result of the model. A missed one costs as much: on fresh physics
HAADF renders the model is unsure of (``python -m benchmarks.routing_cut``, 48 frames of
512 x 512), the STEM detector beat the general one on the 9 frames with 0.5 <= p < 0.9
(pooled F1 0.686 against 0.609; not on the 6 with 0.7 <= p < 0.9, 0.634 against 0.713), and
no tuning frame that is not HAADF (EMPS tuning papers, the Pt bright-field frames) reaches
p 0.32. By a rule fixed before those results (``benchmarks/results/routing_cut.json``) the
cut is 0.5; the held-out sets then gated it once (routed: Pd 0.526 -> 0.578, EMPS validation
0.628 -> 0.625, NFFA and BF-TEM unchanged; ``benchmarks/results/accuracy_routed.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.analysis.preprocess import fixed_input
from nanoscout.engines.base import Engine
from nanoscout.wire.errors import ModelCardError

__all__ = ["CLASSES", "INPUT_SIDE", "MODEL_FILE", "ROUTE_MIN_P", "ModalityEstimator", "modality_of"]

#: the model's classes, in its output order
CLASSES: tuple[str, ...] = ("other", "haadf")
#: side of the model input, px (the whole frame resampled to INPUT_SIDE x INPUT_SIDE)
INPUT_SIDE = 384
#: the shipped model's file name in ``models/weights``
MODEL_FILE = "modality.onnx"
#: p(haadf) from which a frame without a modality is analysed as "STEM" (0.9 before
#: 2026-12-06; the module docstring says why)
ROUTE_MIN_P = 0.5


def modality_of(p_haadf: float) -> str | None:
    """Return the modality a frame of probability ``p_haadf`` (0..1) of being HAADF-STEM is
    analysed as: "STEM" from :data:`ROUTE_MIN_P` on, else None (the general detector)."""
    return "STEM" if p_haadf >= ROUTE_MIN_P else None


class ModalityEstimator:
    """The modality model on an engine: frame -> p(haadf) -> "STEM" or None."""

    def __init__(self, engine: Engine, card: ModelCard) -> None:
        """``card``: the model's card (task "classification", classes :data:`CLASSES`, a fixed
        input size); raises ModelCardError otherwise."""
        if card.task != "classification" or card.classes != CLASSES or card.input.size is None:
            raise ModelCardError(f"{card.name} is not a modality model (task classification, "
                                 f"classes {CLASSES}, a fixed input size)")
        self.engine = engine
        self.card = card
        self.size = card.input.size
        self.name = f"{card.name}:{card.version}"

    @classmethod
    def from_onnx(cls, onnx: Path, backend: str = "onnxruntime-cpu",
                  threads: int = 1) -> ModalityEstimator:
        """Return the estimator of ``onnx`` (its card beside it, sha256 checked)."""
        from nanoscout.engines import create_engine

        card = ModelCard.load(onnx.with_suffix(".json"))
        return cls(create_engine(onnx, backend, threads=threads), card)

    @classmethod
    def shipped(cls, threads: int = 1) -> ModalityEstimator | None:
        """Return the shipped estimator, or None where ``models/weights`` lacks it."""
        onnx = shipped_model_dir() / MODEL_FILE
        return cls.from_onnx(onnx, threads=threads) if onnx.is_file() else None

    def p_haadf(self, frame: np.ndarray) -> float:
        """Return the probability (0..1) that ``frame`` (2-D, any dtype) is HAADF-STEM."""
        x = fixed_input(frame, self.size)
        p = self.engine.infer({"image": x})["probabilities"]
        return float(np.asarray(p).reshape(-1)[CLASSES.index("haadf")])

    def estimate(self, frame: np.ndarray) -> str | None:
        """Return "STEM" when the frame looks like HAADF-STEM (p >= :data:`ROUTE_MIN_P`),
        else None (the general detector's frames)."""
        return modality_of(self.p_haadf(frame))

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()
