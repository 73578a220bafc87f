"""Loaders and deterministic held-out splits of the real microscope data in ``../shared/data``.

Four sets, each with its own kind of ground truth (see ``../shared/data/README.md``):

* ``emps``: EMPS crops (RGB PNG, read as 8-bit grey) with ``segmaps/<id>.png`` uint16 instance
  maps. Split **by source paper**: a DOI is a validation paper when the first 8 bytes of
  sha256(DOI), read as an unsigned big-endian integer, fall below ``fraction * 2**64``
  (``fraction`` = 0.25), so every image of a paper lands on the same side and adding papers
  never moves an existing one.
* ``stem``: HAADF-STEM / BF-TEM JPGs with YOLO boxes (``class cx cy w h``, normalised to the
  image size). Split **by material**: the material of an image is its file stem up to the first
  digit or underscore, with a trailing ``C`` (carbon support, "PtC" = Pt/C) dropped, so
  Pt2, PtC1 and Pt_carbon1 are all "Pt", Cu_silica1 is "Cu" and PtW3 is "PtW". The materials are
  ordered by sha256 of their name and the first ``ceil(fraction * n_materials)`` are held out.
* ``msa``: BF-TEM frames (512 px RGBA PNG, grey in the colour channels) of supported particles
  sintering in situ, with RGBA binary masks (channel 0 > 127 = particle); instances are the
  8-connected components (touching particles can share one blob, as annotated). Split **by
  frame**: the first ``MSA_HELDOUT`` frames in sha256(file name) order are the held-out BF-TEM
  test set, the others training frames (the frames are crops of different fields of view).
* ``nffa``: SEM images with a binary (0/1) mask. In these masks the *particles are 0* and the
  support 1 (checked by eye; in all six the 1-phase covers 63-99.8 % of the image); the loader
  takes the minority value as particle, which gives exactly that. Instances are the
  8-connected components of the particle phase (touching particles count as one instance). The six images
  were never used for training, so all of them are evaluation images (no split file).

The splits are written to ``models/splits/{emps,stem}.json`` (committed) by
``python -m nanoscout.training.realdata --write-splits``; training code must drop every image listed as
validation there (:func:`load_split`). No set carries a pixel size: lengths are in px.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from nanoscout.wire.errors import ConfigError, ReaderError

__all__ = ["REAL_SETS", "SPLITS_DIR", "EmpsSplit", "MsaSplit", "Sample", "StemSplit", "available_sets",
           "data_root", "emps_index", "emps_split", "emps_tuning_ids", "is_validation_doi",
           "iter_samples", "load_emps", "load_msa", "load_nffa", "load_split", "load_stem",
           "msa_names", "msa_split", "nffa_names", "stem_material", "stem_material_names",
           "stem_names", "stem_split", "stem_tuning_names", "write_splits"]

REAL_SETS = ("emps", "stem", "nffa", "msa")
#: ``models/splits`` of the source checkout (training runs from a checkout)
SPLITS_DIR = Path(__file__).resolve().parents[3] / "models" / "splits"
VALIDATION_FRACTION = 0.25
_SET_DIRS = {"emps": "emps-train", "stem": "stem-dev", "nffa": "nffa-particles",
             "msa": "msa-tem-train"}
#: frames of the BF-TEM (msa) set held out as its test set
MSA_HELDOUT = 5


@dataclass(frozen=True)
class Sample:
    """One evaluation image with its ground truth.

    ``image``: 2-D uint8 grey image. ``labels``: int32 instance map (0 = background) or None
    when only boxes exist. ``boxes``: float64 (N, 4) true boxes (x0, y0, x1, y1) in px, pixel
    edges (x1/y1 exclusive), or None. ``group``: the split unit (DOI or material).
    """

    set: str
    id: str
    image: np.ndarray
    labels: np.ndarray | None
    boxes: np.ndarray | None
    pixel_size_nm: float | None
    group: str


def data_root() -> Path:
    """Return ``<repo>/../shared/data`` (may not exist)."""
    return Path(__file__).resolve().parents[4] / "shared" / "data"


def available_sets(root: Path | None = None) -> list[str]:
    """Return the real sets whose folder exists under ``root``."""
    root = data_root() if root is None else root
    return [s for s in REAL_SETS if (root / _SET_DIRS[s]).is_dir()]


def _set_dir(name: str, root: Path | None) -> Path:
    root = data_root() if root is None else root
    d = root / _SET_DIRS[name]
    if not d.is_dir():
        raise ConfigError(f"data set {name!r} not found at {d}")
    return d


def _read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except OSError as exc:
        raise ReaderError(f"cannot read image {path}: {exc}") from exc


def _hash_unit(text: str) -> float:
    """Return sha256(text) mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


# ------------------------------------------------------------------ EMPS


def emps_index(root: Path | None = None) -> list[tuple[str, str]]:
    """Return [(image id, DOI)] of every EMPS image, in metadata.csv order."""
    d = _set_dir("emps", root)
    with open(d / "metadata.csv", newline="") as fh:
        rows = [(r["filename"].removesuffix(".png"), r["doi"].strip())
                for r in csv.DictReader(fh)]
    if not rows:
        raise ConfigError(f"no rows in {d / 'metadata.csv'}")
    return rows


def is_validation_doi(doi: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Return True when the paper ``doi`` belongs to the validation split."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction {fraction} must be within (0, 1)")
    return _hash_unit(doi) < fraction


class EmpsSplit(TypedDict):
    """The EMPS split as :func:`emps_split` returns it and ``models/splits/emps.json`` holds it."""

    set: str
    rule: str
    fraction: float
    n_papers: int
    validation_dois: list[str]
    validation: list[str]
    train: list[str]


def emps_split(root: Path | None = None, fraction: float = VALIDATION_FRACTION
               ) -> EmpsSplit:
    """Return the EMPS split: train/validation image ids and validation DOIs (sorted lists)."""
    rows = emps_index(root)
    val = sorted(i for i, doi in rows if is_validation_doi(doi, fraction))
    train = sorted(i for i, doi in rows if not is_validation_doi(doi, fraction))
    dois = sorted({doi for _, doi in rows if is_validation_doi(doi, fraction)})
    return {"set": "emps", "rule": f"validation paper: sha256(doi)[:8] / 2**64 < {fraction}",
            "fraction": fraction, "n_papers": len({d for _, d in rows}),
            "validation_dois": dois, "validation": val, "train": train}


def emps_tuning_ids(root: Path | None = None, upper: float = 0.33) -> list[str]:
    """Return EMPS *training* image ids of the papers with sha256(DOI) unit in [0.25, upper).

    A tuning subset carved out of the training papers: experiments leave it out of training
    and choose settings on it, so the validation papers are never looked at while tuning.
    """
    return sorted(i for i, doi in emps_index(root)
                  if VALIDATION_FRACTION <= _hash_unit(doi) < upper)


def load_emps(image_id: str, root: Path | None = None, doi: str = "") -> Sample:
    """Return one EMPS image (uint8 grey) with its int32 instance map (lengths in px)."""
    d = _set_dir("emps", root)
    img = _read_grey(d / "images" / f"{image_id}.png")
    from PIL import Image

    with Image.open(d / "segmaps" / f"{image_id}.png") as im:
        labels = np.asarray(im).astype(np.int32)
    if labels.shape != img.shape:
        raise ReaderError(f"EMPS {image_id}: segmap {labels.shape} != image {img.shape}")
    return Sample("emps", image_id, img, labels, None, None, doi)


# ------------------------------------------------------------------ STEM


def stem_names(root: Path | None = None) -> list[str]:
    """Return the sorted STEM image names (file stems that have a label file)."""
    d = _set_dir("stem", root)
    return sorted(p.stem for p in (d / "images").glob("*.jpg") if (d / "labels" / f"{p.stem}.txt")
                  .is_file())


def stem_material(name: str) -> str:
    """Return the material of a STEM image name (rule in the module docstring)."""
    m = re.match(r"[A-Za-z]+", name)
    if m is None:
        raise ConfigError(f"STEM image name {name!r} does not start with a material")
    mat = m.group(0)
    if len(mat) > 2 and mat.endswith("C"):  # "PtC": Pt on carbon support
        mat = mat[:-1]
    return mat


class StemSplit(TypedDict):
    """The STEM split as :func:`stem_split` returns it and ``models/splits/stem.json`` holds it."""

    set: str
    rule: str
    fraction: float
    materials: list[str]
    validation_materials: list[str]
    validation: list[str]
    train: list[str]


def stem_split(root: Path | None = None, fraction: float = VALIDATION_FRACTION
               ) -> StemSplit:
    """Return the STEM split: held-out materials and train/validation image names."""
    names = stem_names(root)
    mats = sorted({stem_material(n) for n in names})
    k = max(1, math.ceil(fraction * len(mats)))
    held = sorted(sorted(mats, key=lambda m: hashlib.sha256(m.encode()).hexdigest())[:k])
    return {"set": "stem",
            "rule": ("material = name up to first digit/underscore, trailing 'C' (carbon "
                     "support) dropped; hold out the first ceil(fraction * n) materials ordered "
                     "by sha256(material)"),
            "fraction": fraction, "materials": mats, "validation_materials": held,
            "validation": [n for n in names if stem_material(n) in held],
            "train": [n for n in names if stem_material(n) not in held]}


def stem_tuning_names(root: Path | None = None) -> list[str]:
    """Return the STEM *training* images of the tuning material: the first training material in
    the split's sha256 order (the one after the held-out materials).

    Like :func:`emps_tuning_ids`: experiments leave it out of training (``nanoscout.training.train
    --stem-tuning-holdout``) and compare recipes on it, so the held-out material is never looked
    at while choosing.
    """
    split = load_split("stem")
    held: set[str] = set(split["validation_materials"])  # type: ignore[call-overload]
    train: list[str] = list(split["train"])  # type: ignore[call-overload]
    mats = sorted({stem_material(n) for n in train} - held,
                  key=lambda m: hashlib.sha256(m.encode()).hexdigest())
    if not mats:
        raise ConfigError("the STEM split has no training material to tune on")
    return stem_material_names(mats[0], root)


def stem_material_names(material: str, root: Path | None = None) -> list[str]:
    """Return the STEM *training* images of one training material (``Cu``, ``Pt``, ``PtW``).

    Cross-material experiments keep it out of training (``nanoscout.training.train
    --stem-holdout Cu``) and score on it (``evaluate --sets stem-tune:Cu``); the held-out
    materials are refused, so they stay unseen while choosing.
    """
    split = load_split("stem")
    train: list[str] = list(split["train"])  # type: ignore[call-overload]
    known = sorted({stem_material(n) for n in train})
    if material not in known:
        raise ConfigError(f"{material!r} is not a STEM training material "
                          f"(training materials: {', '.join(known)})")
    names = set(stem_names(root))
    return [n for n in train if stem_material(n) == material and n in names]


def load_stem(name: str, root: Path | None = None) -> Sample:
    """Return one STEM image (uint8 grey) with its true boxes (x0, y0, x1, y1) in px."""
    d = _set_dir("stem", root)
    img = _read_grey(d / "images" / f"{name}.jpg")
    rows = np.loadtxt(d / "labels" / f"{name}.txt", ndmin=2)
    h, w = img.shape
    if rows.size == 0:
        boxes = np.zeros((0, 4))
    else:
        if rows.shape[1] != 5:
            raise ReaderError(f"STEM labels {name}: expected 5 columns, got {rows.shape[1]}")
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return Sample("stem", name, img, None, boxes, None, stem_material(name))


# ------------------------------------------------------------------ NFFA


def nffa_names(root: Path | None = None) -> list[str]:
    """Return the sorted NFFA image names that have a mask."""
    d = _set_dir("nffa", root)
    return sorted(p.stem for p in (d / "images").glob("*.jpg")
                  if (d / "masks" / f"{p.stem}.png").is_file())


def load_nffa(name: str, root: Path | None = None) -> Sample:
    """Return one NFFA image (uint8 grey) with int32 instances: 8-connected particle components."""
    from PIL import Image
    from scipy import ndimage

    d = _set_dir("nffa", root)
    img = _read_grey(d / "images" / f"{name}.jpg")
    with Image.open(d / "masks" / f"{name}.png") as im:
        ones = np.asarray(im) > 0
    # particles are the minority phase (value 0 in every shipped mask, see module docstring)
    mask = ~ones if ones.mean() > 0.5 else ones
    if mask.shape != img.shape:
        raise ReaderError(f"NFFA {name}: mask {mask.shape} != image {img.shape}")
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return Sample("nffa", name, img, labels.astype(np.int32), None, None, "nffa")


# ------------------------------------------------------------------ MSA BF-TEM


def msa_names(root: Path | None = None) -> list[str]:
    """Return the sorted BF-TEM frame names ("image_<k>") that have a label file."""
    d = _set_dir("msa", root)
    return sorted(p.stem for p in (d / "images").glob("image_*.png")
                  if (d / "labels" / p.name.replace("image_", "label_")).is_file())


class MsaSplit(TypedDict):
    """The BF-TEM split as :func:`msa_split` returns it and ``models/splits/msa.json`` holds it."""

    set: str
    rule: str
    validation: list[str]
    train: list[str]


def msa_split(root: Path | None = None, n_heldout: int = MSA_HELDOUT) -> MsaSplit:
    """Return the BF-TEM split: the first ``n_heldout`` frames in sha256(name) order are the
    held-out test frames, the rest train."""
    names = msa_names(root)
    order = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    held = sorted(order[:n_heldout])
    return {"set": "msa", "rule": f"held out: the first {n_heldout} frames in sha256(name) order",
            "validation": held, "train": [n for n in names if n not in held]}


def load_msa(name: str, root: Path | None = None) -> Sample:
    """Return one BF-TEM frame (uint8 grey) with int32 instances (8-connected mask blobs)."""
    from PIL import Image
    from scipy import ndimage

    d = _set_dir("msa", root)
    img = _read_grey(d / "images" / f"{name}.png")
    with Image.open(d / "labels" / f"{name.replace('image_', 'label_')}.png") as im:
        mask = np.asarray(im)[..., 0] > 127
    if mask.shape != img.shape:
        raise ReaderError(f"msa {name}: mask {mask.shape} != image {img.shape}")
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return Sample("msa", name, img, labels.astype(np.int32), None, None, "msa")


# ------------------------------------------------------------------ splits


def write_splits(root: Path | None = None, out_dir: Path = SPLITS_DIR) -> list[Path]:
    """Write ``emps.json``, ``stem.json`` and ``msa.json`` split files; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, split in (("emps", emps_split(root)), ("stem", stem_split(root)),
                        ("msa", msa_split(root))):
        p = out_dir / f"{name}.json"
        p.write_text(json.dumps(split, indent=1) + "\n")
        paths.append(p)
    return paths


def load_split(name: str, splits_dir: Path = SPLITS_DIR) -> dict[str, Any]:
    """Return the committed split of ``name`` ("emps", "stem" or "msa")."""
    p = splits_dir / f"{name}.json"
    if not p.is_file():
        raise ConfigError(f"split file {p} is missing (python -m nanoscout.training.realdata --write-splits)")
    return json.loads(p.read_text())


def iter_samples(name: str, root: Path | None = None, max_images: int | None = None
                 ) -> Iterator[Sample]:
    """Yield the evaluation samples of real set ``name`` (validation part of its split).

    The image lists come from the committed split files, so evaluation and training agree
    even if the data folder grows.
    """
    if name == "emps":
        dois = dict(emps_index(root))
        ids: list[str] = list(load_split("emps")["validation"])  # type: ignore[arg-type]
        gen: Iterator[Sample] = (load_emps(i, root, dois.get(i, "")) for i in ids[:max_images])
    elif name == "emps-tune":
        dois = dict(emps_index(root))
        tune = emps_tuning_ids(root)
        gen = (load_emps(i, root, dois.get(i, "")) for i in tune[:max_images])
    elif name == "stem":
        names: list[str] = list(load_split("stem")["validation"])  # type: ignore[arg-type]
        gen = (load_stem(n, root) for n in names[:max_images])
    elif name == "stem-tune":
        gen = (load_stem(n, root) for n in stem_tuning_names(root)[:max_images])
    elif name.startswith("stem-tune:"):
        material = name.split(":", 1)[1]
        gen = (load_stem(n, root) for n in stem_material_names(material, root)[:max_images])
    elif name == "nffa":
        gen = (load_nffa(n, root) for n in nffa_names(root)[:max_images])
    elif name == "msa":
        held: list[str] = list(load_split("msa")["validation"])
        gen = (load_msa(n, root) for n in held[:max_images])
    elif name == "msa-tune":  # the training split, which no shipped detector trains on
        train: list[str] = list(load_split("msa")["train"])
        gen = (load_msa(n, root) for n in train[:max_images])
    else:
        raise ConfigError(f"unknown real data set {name!r} (known: {', '.join(REAL_SETS)})")
    yield from gen


def main(argv: list[str] | None = None) -> None:
    """Command line: print (or with --write-splits write) the EMPS and STEM splits."""
    ap = argparse.ArgumentParser(description="real-data splits")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--write-splits", action="store_true")
    args = ap.parse_args(argv)
    if args.write_splits:
        for p in write_splits(args.root):
            print(f"wrote {p}")
    for s in (emps_split(args.root), stem_split(args.root)):
        brief = {k: (len(v) if isinstance(v, list) and k in ("train", "validation") else v)
                 for k, v in s.items() if k != "validation_dois"}
        print(json.dumps(brief))


if __name__ == "__main__":
    main()
