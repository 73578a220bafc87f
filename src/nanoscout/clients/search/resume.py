"""Resuming a stage search: ``nanoscout search --resume OUT/search.json``.

A search that was interrupted (exit status 130), stopped by the microscope's failure (2), by a
budget (0) or that ended "incomplete" (3) is taken up again instead of run again: the resumed
run images only the tiles the earlier run did not image (and analyse), so no area is dosed
twice, and writes one result for both runs. What it takes from the earlier run:

* ``search.json``: the search it was (strategy, area, pixel size, frame shape, overlap, target
  rules, minimum separation) — a resumed search must be the same search, else
  :func:`check_same` refuses it, naming every difference — and its sweep (``sweep``: the field
  of view its tiling ended with and every analysed frame, where the microscope said it was,
  at full precision). A ``search.json`` without a sweep (written before searches could be
  resumed) cannot be resumed: what it imaged is not known exactly;
* ``targets.json`` beside it: the targets found, their thumbnails from ``thumbnails/``.

Only a raster search resumes (:func:`~nanoscout.clients.search.strategies.run_search` says
why an adaptive one cannot). Budgets (``--budget-*``) limit what the resumed run spends;
``search.json``'s ``total`` adds up every run's frames, instrument time and mean dose, and
``resumed_from`` names the earlier ``search.json`` (kept beside the new one as
``search.run<N>.json`` when the new one is written over it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.clients.search.geometry import Area, FrameGeometry, tile_centres
from nanoscout.clients.search.navigator import FoundTarget, read_json
from nanoscout.clients.search.strategies import SWEEP_FRAME_COLUMNS, Prior, SearchConfig
from nanoscout.wire.errors import ConfigError

__all__ = ["Earlier", "check_same", "load_earlier"]


@dataclass(frozen=True)
class Earlier:
    """An earlier run of a search, as its ``search.json`` (``path``) and ``targets.json``
    recorded it."""

    path: Path
    meta: dict[str, Any]  # the whole search.json
    strategy: str
    area: Area
    prior: Prior

    @property
    def runs(self) -> int:
        """How many runs the earlier result holds (1 unless it was itself resumed)."""
        return int(self.meta.get("runs", 1))

    def total(self) -> dict[str, float]:
        """Frames, instrument time (s) and mean dose (e/nm²) of every earlier run together."""
        if isinstance(self.meta.get("total"), dict):
            return {k: float(v) for k, v in self.meta["total"].items()}
        s = self.meta["search"]
        return {"frames": float(s["frames"]), "instrument_s": float(s["instrument_s"]),
                "mean_dose_e_per_nm2": float(s["mean_dose_e_per_nm2"])}


def load_earlier(path: Path) -> Earlier:
    """Read the earlier run that ``path`` (its ``search.json``) records, with the targets of
    the ``targets.json`` beside it; :class:`ConfigError` naming the file when it cannot be
    read or cannot be resumed."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume {path}: cannot read the earlier search: {exc}") from exc
    try:
        strategy = str(meta["search"]["strategy"])
        area = Area(*(float(v) for v in meta["area_um"]))
        sweep = meta.get("sweep")
        if not isinstance(sweep, dict):
            raise ConfigError(f"--resume {path}: it records no sweep (written before searches "
                              "could be resumed): which tiles it imaged is not known; run the "
                              "search again")
        if list(sweep["frame_columns"]) != list(SWEEP_FRAME_COLUMNS):
            raise ValueError(f"sweep frame columns {sweep['frame_columns']!r}, expected "
                             f"{list(SWEEP_FRAME_COLUMNS)!r}")
        frames = tuple(_frame(row) for row in sweep["frames"])
        fx, fy = (float(v) for v in sweep["fov_um"])
        overlap = float(meta["config"]["overlap_um"])
        tile_centres(area, (fx, fy), overlap)  # ValueError: not a tiling
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--resume {path}: not a search.json nanoscout search wrote: "
                          f"{type(exc).__name__}: {exc}") from exc
    targets = _targets(path.parent / "targets.json")
    return Earlier(path, meta, strategy, area, Prior(frames, (fx, fy), targets))


def _frame(row: list[Any]) -> FrameGeometry:
    """One frame of the sweep record (:data:`SWEEP_FRAME_COLUMNS`)."""
    x, y, p, rows, cols, a, b, c, d = row
    if not all(math.isfinite(float(v)) for v in row) or float(p) <= 0:
        raise ValueError(f"sweep frame {row!r}: not finite, or a pixel size <= 0")
    return FrameGeometry((float(x), float(y)), float(p), (int(rows), int(cols)),
                         ((float(a), float(b)), (float(c), float(d))))


def _targets(path: Path) -> tuple[FoundTarget, ...]:
    """The targets of ``path`` (a ``targets.json``) with their thumbnails; ConfigError when
    it is missing or malformed (a thumbnail that cannot be read is left out: a nicety)."""
    try:
        targets = read_json(path)
        rows = json.loads(path.read_text(encoding="utf-8"))["targets"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: the earlier search's targets cannot be read: {exc}"
                          ) from exc
    from PIL import Image, UnidentifiedImageError

    out = []
    for t, row in zip(targets, rows, strict=True):
        thumb = None
        if row.get("thumbnail"):
            try:
                with Image.open(path.parent / row["thumbnail"]) as im:
                    thumb = np.asarray(im.convert("L"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError):
                thumb = None
        out.append(replace(t, thumbnail=thumb))
    return tuple(out)


def check_same(earlier: Earlier, strategy: str, cfg: SearchConfig) -> None:
    """:class:`ConfigError` naming every way the new search (``strategy``, ``cfg``) differs
    from the earlier run it would resume: area, pixel size, frame shape, overlap (the tiling),
    strategy, target rules or minimum separation (which targets are one)."""
    old = earlier.meta.get("config", {})
    a = cfg.area
    new = {"strategy": strategy,
           "area_um": [a.x_min, a.x_max, a.y_min, a.y_max],
           "pixel_size_nm": cfg.pixel_size_nm, "shape": list(cfg.shape),
           "overlap_um": cfg.overlap_um, "target_rules": sorted(cfg.target_rules),
           "min_separation_um": cfg.min_separation_um}
    was = {"strategy": earlier.strategy, "area_um": earlier.meta.get("area_um"),
           "pixel_size_nm": old.get("pixel_size_nm"), "shape": old.get("shape"),
           "overlap_um": old.get("overlap_um"),
           "target_rules": sorted(old.get("target_rules", [])),
           "min_separation_um": old.get("min_separation_um", cfg.min_separation_um)}
    diff = [f"{k} {was[k]!r} there, {new[k]!r} here" for k in new if not _same(was[k], new[k])]
    if diff:
        raise ConfigError(f"--resume {earlier.path}: not the same search ({'; '.join(diff)}): "
                          "a resumed search must be the one that was stopped")


def _same(a: object, b: object) -> bool:
    """Equal, floats to within 1e-9 µm/nm (a number read back from JSON is the one written)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-9)
    return a == b
