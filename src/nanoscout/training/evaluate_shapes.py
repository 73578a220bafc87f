"""Accuracy of the per-particle shape classes (:func:`nanoscout.analysis.measure.classify_shapes`).

::

    python -m nanoscout.training.evaluate_shapes             # exact truth label maps, 3 pixel sizes
    python -m nanoscout.training.evaluate_shapes --detector  # also on the shipped detector's instances

Synthetic specimens of one kind each (plus agglomerated spheres) are rendered at several pixel
sizes; each truth label map goes through the real :func:`nanoscout.analysis.measure.measure` path and the
measured ``shape_class`` is compared with the class the truth kind should get:

============================  ==============  ==================================================
truth                         expected class  why
============================  ==============  ==================================================
sphere                        sphere
ellipse (aspect 1.2-2)        sphere          a smooth spheroid seen in projection: no corners,
                                              not a rod (its elongation is in ``aspect_ratio``)
rod (capsule, aspect 2-5)     rod
faceted, 4/5/6/8 sides        faceted         projected cubes, octahedra, decahedra, ...
faceted with 3 sides          plate           a triangular projection is a (nano)plate's
plate (triangle)              plate
touching group of >= 2        agglomerate     the truth particles of one 8-connected group of
                                              foreground pixels, merged into one instance
============================  ==============  ==================================================

Particles touching the frame edge and those below the classifier's minimum area are left out.
With ``--detector`` the frames go through the shipped ONNX detector (CPU) instead; each
predicted instance matched to a truth instance of the merged map (IoU >= 0.5) is scored
against that instance's expected class.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from nanoscout.analysis.measure import MIN_CLASSIFIED_AREA_PX, measure
from nanoscout.analysis.modelcard import shipped_model_dir
from nanoscout.sim.synthetic import KINDS, Specimen, SpecimenConfig
from nanoscout.wire.particles import SHAPE_CLASSES

__all__ = ["ShapeSample", "confusion", "expected_classes", "format_confusion", "merge_touching",
           "shape_samples"]

_C = {name: i for i, name in enumerate(SHAPE_CLASSES)}
#: expected shape class of each synthetic kind (faceted triangles: see expected_classes)
KIND_CLASS: dict[str, str] = {"sphere": "sphere", "ellipse": "sphere", "rod": "rod",
                              "faceted": "faceted", "plate": "plate"}
#: one specimen per entry: (name, shape mix, agglomerate fraction, coverage)
SCENES: tuple[tuple[str, dict[str, float], float, float], ...] = (
    ("sphere", {"sphere": 1.0}, 0.0, 0.08),
    ("ellipse", {"ellipse": 1.0}, 0.0, 0.08),
    ("rod", {"rod": 1.0}, 0.0, 0.08),
    ("faceted", {"faceted": 1.0}, 0.0, 0.08),
    ("plate", {"plate": 1.0}, 0.0, 0.08),
    ("agglomerated", {"sphere": 0.7, "faceted": 0.3}, 1.0, 0.2),
)
PIXEL_SIZES_NM: tuple[float, ...] = (0.5, 1.0, 2.0)  # median ECD 20 nm: ~40, 20, 10 px


@dataclass
class ShapeSample:
    """One frame: its image, the merged truth label map and each label's expected class."""

    name: str
    pixel_size_nm: float
    image: np.ndarray
    labels: np.ndarray  # int32, touching truth particles merged into one label
    expected: np.ndarray  # uint8 index into SHAPE_CLASSES, by label value (0 unused)


def expected_classes(spec: Specimen, truth_ids: np.ndarray) -> np.ndarray:
    """Return the expected SHAPE_CLASSES index of the truth particles ``truth_ids``.

    Triangular ``faceted`` particles and ``plate`` particles are ``plate``; the rest follow
    :data:`KIND_CLASS` (the module docstring says why).
    """
    g = spec.geometry
    idx = truth_ids.astype(np.int64) - 1
    names = [KINDS[int(k)] for k in g.kind[idx]]
    out = np.array([_C[KIND_CLASS[n]] for n in names], dtype=np.uint8)
    out[(g.kind[idx] == KINDS.index("faceted")) & (g.nsides[idx] == 3)] = _C["plate"]
    return out


def merge_touching(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge truth particles whose pixels touch (8-connected) into one label.

    Returns (merged int32 label map, per merged label the number of truth particles, per merged
    label one of its truth ids); index 0 of both arrays is unused.
    """
    groups, n = ndi.label(labels > 0, structure=np.ones((3, 3), bool))
    fg = labels > 0
    pairs = np.unique(np.stack([groups[fg], labels[fg]]), axis=1)
    members = np.bincount(pairs[0], minlength=n + 1)
    one_id = np.zeros(n + 1, np.int64)
    one_id[pairs[0]] = pairs[1]
    return groups.astype(np.int32), members, one_id


def shape_samples(pixel_sizes: tuple[float, ...] = PIXEL_SIZES_NM, seeds: int = 2,
                  shape: tuple[int, int] = (512, 512), modality: str = "TEM",
                  seed0: int = 4242) -> Iterator[ShapeSample]:
    """Yield the evaluation frames (every scene x pixel size x seed), deterministic."""
    for si, (name, mix, agg, cov) in enumerate(SCENES):
        for px in pixel_sizes:
            for k in range(seeds):
                cfg = SpecimenConfig(modality=modality, shape=shape,  # type: ignore[arg-type]
                                     pixel_size_nm=px, median_diameter_nm=20.0, sigma_log=0.25,
                                     coverage=cov, shape_mix=mix, agglomerate_fraction=agg,
                                     max_diameter_nm=80.0)
                rng = np.random.default_rng([seed0, si, int(px * 1000), k])
                spec = Specimen.generate(cfg, rng)
                fr = spec.acquire(rng)
                merged, members, one_id = merge_touching(fr.labels)
                expected = np.zeros(members.size, np.uint8)
                single = members == 1
                single[0] = False
                expected[single] = expected_classes(spec, one_id[single])
                expected[members >= 2] = _C["agglomerate"]
                yield ShapeSample(name, px, fr.image, merged, expected)


def confusion(expected: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Return the confusion matrix (rows = expected, cols = predicted) over SHAPE_CLASSES."""
    k = len(SHAPE_CLASSES)
    return np.bincount(expected.astype(np.int64) * k + predicted, minlength=k * k).reshape(k, k)


def format_confusion(cm: np.ndarray) -> str:
    """The confusion matrix as a text table with per-class recall and overall accuracy."""
    names = [n[:11] for n in SHAPE_CLASSES]
    lines = ["expected \\ measured " + " ".join(f"{n:>11}" for n in names) + "   recall"]
    for i, n in enumerate(names):
        tot = int(cm[i].sum())
        if tot == 0:
            continue
        row = " ".join(f"{int(v):>11}" for v in cm[i])
        lines.append(f"{n:>19} {row}   {cm[i, i] / tot:6.1%}")
    done = cm[1:].sum()
    lines.append(f"accuracy {np.trace(cm) / max(done, 1):.1%} over {int(done)} particles")
    return "\n".join(lines)


def _score(sample: ShapeSample, pred_labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(expected, predicted) classes of the scored particles of one sample."""
    truth = measure(sample.labels, sample.pixel_size_nm)
    ok = ~truth["border"] & (truth["area_nm2"] / sample.pixel_size_nm**2
                            >= MIN_CLASSIFIED_AREA_PX)
    if pred_labels is None:
        return sample.expected[truth["id"][ok]], truth["shape_class"][ok]
    from nanoscout.training.evaluate import match_instances

    pred = measure(pred_labels, sample.pixel_size_nm)
    pairs, _, _ = match_instances(pred_labels, sample.labels)
    t_ok = set(truth["id"][ok].tolist())
    keep = np.array([int(t) in t_ok for t in pairs["true"]], bool)
    pairs = pairs[keep]
    cls = pred["shape_class"][np.searchsorted(pred["id"], pairs["pred"])]
    return sample.expected[pairs["true"]], cls


def run(detector: bool = False, seeds: int = 2, threads: int = 2, seed0: int = 4242
        ) -> dict[str, Any]:
    """Confusion matrices per pixel size and in total, on truth labels (and detections)."""
    det = None
    if detector:
        from nanoscout.analysis.detector import Detector
        from nanoscout.analysis.modelcard import ModelCard
        from nanoscout.engines import create_engine

        model = shipped_model_dir() / "detector.onnx"
        det = Detector(create_engine(model, "onnxruntime-cpu", threads=threads),
                       ModelCard.load(model.with_suffix(".json")))
    k = len(SHAPE_CLASSES)
    out: dict[str, Any] = {"classes": list(SHAPE_CLASSES), "truth": {}, "detector": {}}
    tot = {"truth": np.zeros((k, k), np.int64), "detector": np.zeros((k, k), np.int64)}
    for s in shape_samples(seeds=seeds, seed0=seed0):
        key = f"{s.pixel_size_nm:g} nm/px"
        runs: list[tuple[str, np.ndarray | None]] = [("truth", None)]
        if det is not None:
            runs.append(("detector", det.detect(s.image).labels))
        for which, pred in runs:
            cm = confusion(*_score(s, pred))
            tot[which] += cm
            prev = out[which].get(key)
            out[which][key] = cm if prev is None else prev + cm
    for which in ("truth", "detector"):
        if out[which]:
            out[which]["all"] = tot[which]
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: print the shape-class confusion matrices (and write JSON with --out)."""
    ap = argparse.ArgumentParser(description="shape-class accuracy on synthetic frames")
    ap.add_argument("--detector", action="store_true", help="also score detector instances")
    ap.add_argument("--seeds", type=int, default=2, help="frames per scene and pixel size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=4242,
                    help="4242 = the frames the thresholds were tuned on; any other is held out")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    res = run(args.detector, args.seeds, args.threads, args.seed)
    for which in ("truth", "detector"):
        for key, cm in res[which].items():
            print(f"\n[{which} instances, {key}]")
            print(format_confusion(cm))
    if args.out is not None:
        js = {w: {k: v.tolist() for k, v in res[w].items()} for w in ("truth", "detector")}
        args.out.write_text(json.dumps({"classes": res["classes"], **js}, indent=1) + "\n")


if __name__ == "__main__":
    main()
