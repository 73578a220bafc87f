"""The one-sentence explanations that alerts carry, and the short numbers in them."""

from __future__ import annotations

import math

import numpy as np

from nanoscout.analysis.rules import ParticleRule
from nanoscout.wire.particles import SHAPE_CLASSES

__all__ = ["explain_particles", "number"]

_OP_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "="}
_LABELS = {
    "ecd_nm": "ECD",
    "area_nm2": "area",
    "feret_max_nm": "Feret max",
    "feret_min_nm": "Feret min",
    "major_nm": "major axis",
    "minor_nm": "minor axis",
    "orientation_deg": "orientation",
    "aspect_ratio": "aspect ratio",
    "x": "x",
    "y": "y",
}



def number(v: float) -> str:
    """A short human number: 63.2, 50, 0.00123, 1234."""
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _unit(fname: str, units: str) -> str:
    if fname.endswith("_nm2"):
        return f" {units}²"
    if fname.endswith("_nm"):
        return f" {units}"
    if fname.endswith("_deg"):
        return "°"
    return ""


def explain_particles(
    rule: ParticleRule, hits: np.ndarray, order: np.ndarray, n_new: int, units: str,
    confidence: float | None = None,
) -> str:
    """Return the sentence an alert of ``rule`` carries: the first hit's values, how many matched.

    ``hits`` are the matching rows, ``order`` indexes them (the first is the one described),
    ``n_new`` counts the new ones; ``units`` is the length unit of the ``*_nm`` fields ("nm",
    or "px" when uncalibrated); ``confidence``: the probability that the described particle
    is real (a calibrated detector's score), None when the scores are raw.
    """
    row = hits[order[0]]
    parts = []
    for fname, op, value in rule.conditions:
        if fname == "shape_class":
            parts.append(f"shape {SHAPE_CLASSES[int(row['shape_class'])]}")
            continue
        u = _unit(fname, units)
        label = _LABELS.get(fname, fname.replace("_", " "))
        parts.append(f"{label} {number(row[fname])}{u} {_OP_TEXT[op]} {number(value)}{u}")
    name = f"particle {int(row['id'])}"
    if confidence is not None:
        name += f" (confidence {confidence:.2f})"
    what = f"{name} has " + " and ".join(parts) if parts else f"{name} matches"
    if len(hits) == 1:
        return f"{what} (rule {rule.name})"
    return f"{len(hits)} particles match ({n_new} new); {what} (rule {rule.name})"
