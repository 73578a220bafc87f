"""A napari reader plugin for ``NAME.labels.tif`` (written by ``nanoscout measure``).

napari finds it through the ``napari.manifest`` entry point (``nanoscout/clients/napari.yaml``);
it needs nothing from napari to import. ``napari run.labels.tif`` (or drag and drop) then shows
the image and the instance labels as two layers whose ``scale`` is the pixel size in nm, so
napari's scale bar and measurements are in nm (px for uncalibrated images).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LayerData", "get_reader", "read_labels_tiff"]

#: napari's layer data tuple: (data, layer keyword arguments, layer type)
LayerData = tuple[np.ndarray, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: :func:`read_labels_tiff` for ``*.labels.tif`` paths, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(str(p).lower().endswith(".labels.tif") for p in paths):
        return read_labels_tiff
    return None


def read_labels_tiff(path: str | list[str]) -> list[LayerData]:
    """Image and labels layers of each ``NAME.labels.tif`` in ``path`` (scale: nm per px)."""
    import tifffile

    layers: list[LayerData] = []
    for p in [path] if isinstance(path, str) else path:
        with tifffile.TiffFile(p) as tf:
            data = tf.asarray()
            ij = tf.imagej_metadata or {}
            props = json.loads((ij.get("Properties") or {}).get("nanoscout", "{}"))
        px = props.get("pixel_size_nm")
        scale = (float(px), float(px)) if px else (1.0, 1.0)
        names = props.get("channels") or (["image", "labels"] if data.ndim == 3 else ["labels"])
        planes = list(data) if data.ndim == 3 else [data]
        stem = Path(p).name[: -len(".labels.tif")]
        meta = {"nanoscout": props, "unit": "nm" if px else "px"}
        for name, plane in zip(names, planes, strict=True):
            kwargs = {"name": f"{stem} {name}", "scale": scale, "metadata": meta}
            layers.append((plane, kwargs, "labels" if name == "labels" else "image"))
    return layers
