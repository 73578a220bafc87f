"""``nanoscout measure``: the daemon's pipeline run offline on image files.

Writes one row per particle (CSV or Parquet, by the output suffix) with the file, image index,
calibration and every measurement; optionally one 16-bit instance-label PNG per image (named
after the input) so the segmentation can be checked or reused in other tools. When the pipeline
has a field-of-view classifier, ``OUT.classes.csv`` gets one row per image: the top class, its
probability, the novelty score and every class's probability.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.clients.acquisition.readers import SUPPORTED_SUFFIXES, read_images
from nanoscout.wire.errors import NanoscoutError, ReaderError
from nanoscout.wire.particles import PARTICLE_DTYPE, SHAPE_CLASSES

_BBOX = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")

#: output columns: provenance first, then every particle field (bbox split into four)
COLUMNS: tuple[str, ...] = (
    "file",
    "index",
    "units",
    "pixel_size_nm",
    *(c for name in PARTICLE_DTYPE.names or () for c in (_BBOX if name == "bbox" else (name,))),
)


@dataclass
class MeasureReport:
    """What ``measure_files`` did: images measured, particles written, files skipped (with why)."""

    images: int = 0
    particles: int = 0
    classes: Path | None = None  # the per-image classification CSV, when written
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    uncalibrated: list[Path] = field(default_factory=list)


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their supported image files (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in SUPPORTED_SUFFIXES))
        else:
            out.append(p)
    return out


def _rows(path: Path, index: int, units: str, pixel_size_nm: float | None, table: np.ndarray) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    n = len(table)
    cols["file"] = [str(path)] * n
    cols["index"] = [index] * n
    cols["units"] = [units] * n
    cols["pixel_size_nm"] = [pixel_size_nm] * n
    for name in PARTICLE_DTYPE.names or ():
        if name == "bbox":
            for k, c in enumerate(_BBOX):
                cols[c] = table["bbox"][:, k].tolist()
        elif name == "shape_class":
            cols[name] = [SHAPE_CLASSES[i] for i in table[name]]
        else:
            cols[name] = table[name].tolist()
    return cols


def write_labels(labels: np.ndarray, path: Path) -> None:
    """Save an instance map as a 16-bit PNG (0 = background); refuses more than 65535 particles."""
    from PIL import Image

    top = int(labels.max(initial=0))
    if top > 65535:
        raise NanoscoutError(f"{top} particles do not fit a 16-bit label image ({path})")
    Image.fromarray(labels.astype(np.uint16)).save(path)


def measure_files(
    paths: Iterable[Path],
    pipeline: Pipeline,
    out: Path,
    *,
    masks: Path | None = None,
    pixel_size_nm: float | None = None,
    source: str = "measure",
    log: Callable[[str], None] = print,
) -> MeasureReport:
    """Measure every image of ``paths`` and write the particle table to ``out`` (.csv/.parquet).

    The images form one stream, ``source``, for the statistics; each is analysed alone (its
    own working scale: build the pipeline with ``build_pipeline(config, offline=True)``)."""
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise NanoscoutError(f"output {out} must end in .csv or .parquet")
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    report = MeasureReport()
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    class_rows: list[list[object]] = []
    for path in expand(paths):
        try:
            records = read_images(path)
        except ReaderError as exc:
            report.skipped.append((path, str(exc)))
            log(f"skipped {path}: {exc}")
            continue
        for rec in records:
            px = pixel_size_nm if pixel_size_nm is not None else rec.pixel_size_nm
            if px is None:
                report.uncalibrated.append(path)
                log(f"{path}: no calibration, lengths in px (use --pixel-size to set one)")
            try:
                frame = Frame.from_image(rec.data, pixel_size_nm=px, source=source,
                                         seq=report.images, modality=rec.modality,
                                         meta={"file": path.name[-1024:], "index": rec.index})
                result = pipeline.process(frame)
            except NanoscoutError as exc:
                report.skipped.append((path, str(exc)))
                log(f"skipped {path}[{rec.index}]: {exc}")
                continue
            units = frame.units
            for k, v in _rows(path, rec.index, units, px, result.table).items():
                columns[k].extend(v)
            if masks is not None:
                name = path.stem if len(records) == 1 else f"{path.stem}_{rec.index}"
                write_labels(result.labels, masks / f"{name}.png")
            report.images += 1
            report.particles += len(result.table)
            what = ""
            for stage, error in result.failures:  # the measurements stand without these
                log(f"{path}[{rec.index}]: {stage} failed: {error}")
            c = result.classification
            if c is not None:
                class_rows.append([str(path), rec.index, c.labels[0], round(c.probabilities[0], 4),
                                   None if c.novelty is None else round(c.novelty, 4),
                                   *(round(v, 4) for v in c.all.values())])
                what = f"; {c.labels[0]} ({c.probabilities[0]:.2f})"
            log(f"{path}[{rec.index}]: {len(result.table)} particles ({units}){what}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        with out.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            names = list(columns)
            w.writerow(names)
            w.writerows(zip(*(columns[n] for n in names), strict=True))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), out)
    if pipeline.classifier is not None:
        report.classes = out.with_suffix(".classes.csv")
        with report.classes.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "index", "top_class", "probability", "novelty",
                        *(f"p_{c}" for c in pipeline.classifier.classes)])
            w.writerows(class_rows)
    return report
