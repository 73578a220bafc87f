"""A napari reader plugin for ``NAME.labels.tif`` (written by ``nanoscout measure``).

napari finds it through the ``napari.manifest`` entry point (``nanoscout/clients/napari.yaml``);
it needs nothing from napari to import. ``napari run.labels.tif`` (or drag and drop) then shows
the image and the instance labels as two layers whose ``scale`` is the pixel size in nm, so
napari's scale bar and measurements are in nm (px for uncalibrated images).

napari's reader contract: :func:`get_reader` returns None for a file it cannot read (napari then
tries another reader), so it claims only ImageJ TIFFs that carry nanoscout's ``Properties``; a
claimed file that turns out damaged raises :class:`~nanoscout.wire.errors.ReaderError` naming
the file and what is wrong, never a raw error of tifffile or json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.wire.errors import ReaderError

__all__ = ["LayerData", "get_reader", "read_labels_tiff"]

#: napari's layer data tuple: (data, layer keyword arguments, layer type)
LayerData = tuple[np.ndarray, dict[str, Any], str]

_SUFFIX = ".labels.tif"


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: :func:`read_labels_tiff` when every path is a ``*.labels.tif``
    that nanoscout wrote (an ImageJ TIFF with nanoscout's properties: only its header is
    read), else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(_written_by_nanoscout(str(p)) for p in paths):
        return read_labels_tiff
    return None


def read_labels_tiff(path: str | list[str]) -> list[LayerData]:
    """Image and labels layers of each ``NAME.labels.tif`` in ``path`` (scale: nm per px).

    Raises ReaderError, naming the file, when one cannot be read or is not a label TIFF as
    nanoscout writes it (missing, truncated, foreign planes, damaged properties)."""
    layers: list[LayerData] = []
    for p in [path] if isinstance(path, str) else path:
        layers.extend(_read_one(str(p)))
    return layers


def _written_by_nanoscout(p: str) -> bool:
    if not p.lower().endswith(_SUFFIX):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            ij = tf.imagej_metadata
    except Exception:  # missing, not a TIFF, damaged: not ours to read
        return False
    props = ij.get("Properties") if isinstance(ij, dict) else None
    return isinstance(props, dict) and "nanoscout" in props


def _read_one(p: str) -> list[LayerData]:
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            data = tf.asarray()
            ij = tf.imagej_metadata or {}
    except Exception as exc:  # tifffile raises many kinds (OSError, TiffFileError, ValueError)
        raise ReaderError(f"{p}: cannot read it as a TIFF ({type(exc).__name__}: {exc})") from exc
    props = _properties(p, ij)
    px = props.get("pixel_size_nm")
    if px is not None:
        try:
            px = float(px)
        except (TypeError, ValueError):
            px = math.nan
        if not (math.isfinite(px) and px >= 0):
            raise ReaderError(f"{p}: pixel_size_nm {props.get('pixel_size_nm')!r} is not a "
                              "pixel size in nm")
    scale = (px, px) if px else (1.0, 1.0)
    if data.ndim not in (2, 3):
        raise ReaderError(f"{p}: a {data.shape} array, not a label image or an image and "
                          "label stack")
    planes = list(data) if data.ndim == 3 else [data]
    names = props.get("channels") or (["image", "labels"] if data.ndim == 3 else ["labels"])
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
            or len(names) != len(planes)):
        raise ReaderError(f"{p}: {len(planes)} plane(s) of {data.shape[-2:]} px, but channels "
                          f"{names!r}")
    stem = Path(p).name[: -len(_SUFFIX)]
    meta = {"nanoscout": props, "unit": "nm" if px else "px"}
    layers: list[LayerData] = []
    for name, plane in zip(names, planes, strict=True):
        kwargs = {"name": f"{stem} {name}", "scale": scale, "metadata": meta}
        layers.append((plane, kwargs, "labels" if name == "labels" else "image"))
    return layers


def _properties(p: str, ij: dict[str, Any]) -> dict[str, Any]:
    """nanoscout's JSON properties of an ImageJ TIFF ({} when it has none)."""
    raw = (ij.get("Properties") or {}).get("nanoscout", "{}")
    try:
        props = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ReaderError(f"{p}: nanoscout properties are not JSON ({exc}): {str(raw)[:80]!r}"
                          ) from exc
    if not isinstance(props, dict):
        raise ReaderError(f"{p}: nanoscout properties are a {type(props).__name__}, not a "
                          f"JSON object: {str(raw)[:80]!r}")
    return props
