"""The AI lens's "usual" frames: what a facility images every day, rendered reproducibly.

Shared by training (:mod:`nanoscout.training.train_lens`) and evaluation
(:mod:`nanoscout.training.evaluate_lens`): fields of isolated and touching spheres, ellipses and
faceted particles (no rods or wires) in BF-TEM, HAADF-STEM and SEM contrast, with
``FIELDS_FRACTION`` of them taken from :mod:`nanoscout.sim.fields`.
"""

from __future__ import annotations

import math

import numpy as np

from nanoscout.analysis.preprocess import fixed_input
from nanoscout.sim import fields
from nanoscout.sim.synthetic import Specimen, SpecimenConfig
from nanoscout.training.lens_net import SIZE

__all__ = ["FIELDS_FRACTION", "SHAPES", "USUAL_DATA", "USUAL_FIELD_CLASSES", "inputs_of",
           "usual_config", "usual_frame", "usual_frames"]

#: nanoscout.sim.fields classes that count as usual frames
USUAL_FIELD_CLASSES: tuple[str, ...] = ("isolated_particles", "agglomerated_particles")
#: fraction of usual frames drawn from nanoscout.sim.fields (when it is importable)
FIELDS_FRACTION = 0.3
#: frame shapes (rows, cols) of usual frames; fixed_input squeezes each to S x S
SHAPES: tuple[tuple[int, int], ...] = ((512, 512), (512, 512), (384, 512), (512, 384),
                                       (640, 640))

USUAL_DATA = (
    "usual particle fields rendered by nanoscout.sim.synthetic (nanoscout.training.lens_data.usual_frame): "
    "TEM (dark on bright), HAADF-STEM (bright on dark), SEM in equal parts; frames 384-640 px; "
    "spheres / ellipses / faceted (no rods); lognormal ECD median 6-70 px in the frame "
    "(sigma_log 0.1-0.45); coverage 3-40 %, 0-70 % agglomerated; dose 20-3000 e/px (10 % "
    "noiseless); blur 0.3-1.8 px; illumination gradient 0-40 %; support texture 0-15 %; 25 % "
    "on support grains; Fresnel fringes in some TEM; uint8 / uint16 / float32"
)


def usual_config(rng: np.random.Generator, shape: tuple[int, int]) -> SpecimenConfig:
    """Return a random usual-field specimen configuration (1 nm per px: lengths in frame px)."""
    modality = str(rng.choice(["TEM", "STEM", "SEM"]))
    median = float(np.exp(rng.uniform(math.log(6.0), math.log(70.0))))
    mix = rng.dirichlet([3.0, 1.0, 1.5])
    dose = None if rng.random() < 0.1 else float(np.exp(rng.uniform(math.log(20), math.log(3000))))
    grains = float(rng.uniform(0.2, 0.6)) if rng.random() < 0.25 else 0.0
    return SpecimenConfig(
        modality=modality,  # type: ignore[arg-type]
        shape=shape,
        pixel_size_nm=1.0,
        median_diameter_nm=median,
        sigma_log=float(rng.uniform(0.1, 0.45)),
        min_diameter_nm=3.0,
        max_diameter_nm=160.0,
        coverage=float(rng.uniform(0.03, 0.4)),
        shape_mix={"sphere": float(mix[0]), "ellipse": float(mix[1]), "faceted": float(mix[2])},
        agglomerate_fraction=float(rng.uniform(0.0, 0.7)),
        dose_e_per_px=dose,
        blur_px=float(rng.uniform(0.3, 1.8)),
        illumination_gradient=float(rng.uniform(0.0, 0.4)),
        support_texture=float(rng.uniform(0.0, 0.15)),
        support_grains=grains,
        support_grain_nm=float(median * rng.uniform(4.0, 12.0)),
        contrast=float(rng.uniform(0.15, 0.8)),
        fringe=float(rng.uniform(0.0, 0.5)) if modality == "TEM" and rng.random() < 0.3 else 0.0,
        dtype=str(rng.choice(["uint8", "uint16", "float32"])),  # type: ignore[arg-type]
    )


def usual_frame(seed: int, *, use_fields: bool = True) -> tuple[np.ndarray, str]:
    """Return (raw frame, source) of one usual frame drawn with ``seed`` (reproducible).

    ``source`` is ``"synthetic"`` or ``"fields:<class>"``. Raw means as acquired (counts,
    8-bit, float), before any normalisation.
    """
    rng = np.random.default_rng(seed)
    if use_fields and rng.random() < FIELDS_FRACTION:
        label = str(rng.choice(USUAL_FIELD_CLASSES))
        return np.asarray(fields.render_field(label, rng).image), f"fields:{label}"
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cfg = usual_config(rng, shape)
    return Specimen.generate(cfg, rng).acquire(rng).image, "synthetic"


def usual_frames(seeds: range | list[int], *, use_fields: bool = True
                 ) -> tuple[list[np.ndarray], list[str]]:
    """Return the raw usual frames of ``seeds`` and their sources."""
    frames, sources = [], []
    for s in seeds:
        img, src = usual_frame(int(s), use_fields=use_fields)
        frames.append(img)
        sources.append(src)
    return frames, sources


def inputs_of(frames: list[np.ndarray], size: int = SIZE) -> np.ndarray:
    """Return the (N, 1, size, size) float32 network inputs (``fixed_input``) of raw frames."""
    return np.concatenate([fixed_input(f, (size, size)) for f in frames]).astype(np.float32)
