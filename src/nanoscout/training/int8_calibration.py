"""Calibration inputs for INT8 engines: synthetic frames from :mod:`nanoscout.sim`, made into
exactly the tensors each shipped model receives at run time.

One definition serves both INT8 paths: ONNX Runtime static quantization
(:mod:`nanoscout.training.quantize`) and the TensorRT entropy calibrator
(:mod:`nanoscout.engines.tensorrt`, fed by ``nanoscout models build-engines``). Nothing is
stored: the frames are rendered again, bit for bit, from their seeds.

Seeds ``CALIBRATION_SEED_BASE + k`` (700000 + k) are disjoint from the held-out frames the
accuracy parity is measured on (12345 + i for the detector; the classifier's and lens's test
seeds, 5200000 + and 4000000 +), from the detector's tuning frames (500000 + i) and from its
training specimens (1000000 + k).

* **detectors** (``detection-segmentation``): square 384² TEM / STEM / SEM frames (the STEM
  detector: STEM only) at the working scale the detector resamples to: median particle ECD
  6-40 px, coverage 3-40 %, 0-60 % agglomerated, dose 30-3000 e/px (some noiseless), blur,
  support texture, support grains in a fifth, Fresnel fringes in some TEM frames, uint8 /
  uint16 / float32; normalised by :func:`~nanoscout.analysis.preprocess.normalize`:
  ``(1, 1, 384, 384)`` float32.
* **classifier and lens** (fixed input): fields of every class of
  :func:`nanoscout.sim.fields.render_field` in turn (512² and 1024²), through
  :func:`~nanoscout.analysis.preprocess.fixed_input`: ``(1, 1, S, S)`` float32.

Every input of one model has the same shape: TensorRT calibrates at one fixed shape, the first
input's, and its backend refuses a calibration batch of another.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.preprocess import fixed_input, normalize
from nanoscout.sim.synthetic import Specimen, SpecimenConfig

__all__ = ["CALIBRATION_SEED_BASE", "DETECTOR_SIDE_PX", "calibration_inputs",
           "describe_calibration"]

CALIBRATION_SEED_BASE = 700_000
#: side of the detector's calibration frames, px at working scale
DETECTOR_SIDE_PX = 384


def _detector_frame(k: int, modalities: tuple[str, ...]) -> np.ndarray:
    rng = np.random.default_rng([CALIBRATION_SEED_BASE + k, 21])
    modality = modalities[k % len(modalities)]
    px_nm = 0.5
    ecd_px = math.exp(rng.uniform(math.log(6.0), math.log(40.0)))
    dose = None if rng.random() < 0.1 else float(math.exp(rng.uniform(math.log(30), math.log(3000))))
    cfg = SpecimenConfig(
        modality=modality,  # type: ignore[arg-type]
        shape=(DETECTOR_SIDE_PX, DETECTOR_SIDE_PX), pixel_size_nm=px_nm,
        median_diameter_nm=ecd_px * px_nm, sigma_log=float(rng.uniform(0.08, 0.45)),
        coverage=float(rng.uniform(0.03, 0.4)),
        agglomerate_fraction=float(rng.uniform(0.0, 0.6)), dose_e_per_px=dose,
        blur_px=float(rng.uniform(0.3, 2.0)),
        illumination_gradient=float(rng.uniform(0.0, 0.4)),
        support_texture=float(rng.uniform(0.0, 0.12)),
        support_grains=0.25 if rng.random() < 0.2 else 0.0,
        fringe=float(rng.uniform(0.0, 0.5)) if modality == "TEM" and rng.random() < 0.3 else 0.0,
        dtype=("uint8", "uint16", "float32")[k % 3],  # type: ignore[arg-type]
    )
    frame = Specimen.generate(cfg, rng).acquire(rng)
    return normalize(frame.image)[None, None]


def _field_frame(k: int, size: tuple[int, int]) -> np.ndarray:
    from nanoscout.sim.fields import FIELD_CLASSES, render_field

    rng = np.random.default_rng([CALIBRATION_SEED_BASE + k, 22])
    side = 1024 if k % 4 == 3 else 512
    field = render_field(FIELD_CLASSES[k % len(FIELD_CLASSES)], rng, shape=(side, side))
    return fixed_input(field.image, size)


def _modalities(card: ModelCard) -> tuple[str, ...]:
    """The modalities a detector sees: STEM only for a STEM detector (its card's name or
    training data says so), else all three."""
    text = f"{card.name} {card.onnx_file}".lower()
    return ("STEM",) if "stem" in text else ("TEM", "STEM", "SEM")


def calibration_inputs(card: ModelCard, n: int = 32, start: int = 0
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``n`` calibration inputs of the model ``card`` describes: ``{input name: (1, 1,
    H, W) float32}``, the same every time (see the module docs). ``start``: skip that many
    (inputs of the same kind that the calibration did not see, for checks)."""
    if n < 1 or start < 0:
        raise ValueError(f"n {n} calibration frames must be >= 1 (start {start} >= 0)")
    for k in range(start, start + n):
        if card.task == "detection-segmentation":
            x = _detector_frame(k, _modalities(card))
        else:
            assert card.input.size is not None  # the card validator guarantees it
            x = _field_frame(k, (int(card.input.size[0]), int(card.input.size[1])))
        yield {card.input.name: np.ascontiguousarray(x, dtype=np.float32)}


def describe_calibration(card: ModelCard, n: int) -> str:
    """One line saying what :func:`calibration_inputs` feeds this model (for its card)."""
    seeds = f"seeds {CALIBRATION_SEED_BASE}..{CALIBRATION_SEED_BASE + n - 1}"
    if card.task == "detection-segmentation":
        return (f"{n} synthetic {'/'.join(_modalities(card))} frames of "
                f"{DETECTOR_SIDE_PX}x{DETECTOR_SIDE_PX} px at working scale (median ECD 6-40 px), "
                f"nanoscout.training.int8_calibration, {seeds}")
    return (f"{n} synthetic fields of every class (nanoscout.sim.fields.render_field, 512² and "
            f"1024²) through fixed_input, nanoscout.training.int8_calibration, {seeds}")
