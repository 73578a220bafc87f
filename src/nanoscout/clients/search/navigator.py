"""Navigator lists: the targets a stage search confirmed, as CSV, JSON and a SerialEM ``.nav``.

:func:`write_navigator` writes one list in every format into a folder::

    OUT/targets.csv                 one row per target, a header row
    OUT/targets.json                {"targets": [...], "meta": {...}}
    OUT/targets.nav                 SerialEM navigator, one point item per target
    OUT/thumbnails/target-0001.png  grey crop around each target that has one

Stage coordinates are µm throughout (``x_um``, ``y_um``, SerialEM's ``StageXYZ``); the alert's
``value`` and ``threshold`` are in ``units`` (nm, or px on an uncalibrated frame). CSV and JSON
name each thumbnail by its path relative to the list files (``thumbnails/target-0001.png``), or
leave it empty/null when the target has none. Every file is written to a temporary name and
renamed into place, so a reader (SerialEM, a spreadsheet) never sees half a list while a search
rewrites it.

The ``.nav`` format is SerialEM's text navigator file, an IMOD "autodoc": global
``key = value`` lines (``AdocVersion = 2.00`` first), then one ``[Item = label]`` section per
item whose lines are ``key = value``. A point is ``Type = 0`` with ``NumPts = 1``, its stage
position in ``StageXYZ = x y z`` (µm) and the same x, y in ``PtsX``/``PtsY``, ``Regis`` (the
registration, 1 by default), ``Color`` (0 is red), a free-text ``Note`` and a ``MapID`` that must
be unique within the file. Source: SerialEM help, "File Formats and Other Documentation" →
"Navigator Files" / "Importing Externally Defined Navigator Items"
(https://bio3d.colorado.edu/SerialEM/hlp/html/about_formats.htm), checked against point items
written by open-source SerialEM tools (e.g. PySerialEM, https://pypi.org/project/pyserialem).
A value runs to the end of its line, so a note must hold no newline; the notes written here are
also kept free of ``=``, ``[``, ``]`` and control characters, which autodoc readers treat as
syntax.

Every malformed input raises ValueError naming the target id (or row) and the field.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.clients.spreadsheet import text_cell

__all__ = [
    "NAV_COLOR",
    "NAV_MAP_ID_BASE",
    "THUMBNAIL_DIR",
    "FoundTarget",
    "nav_note",
    "read_json",
    "read_nav",
    "thumbnail_name",
    "write_csv",
    "write_json",
    "write_nav",
    "write_navigator",
    "write_thumbnails",
]

#: folder beside the list files that holds the thumbnails
THUMBNAIL_DIR = "thumbnails"
#: SerialEM colour index of the points written (0 = red)
NAV_COLOR = 0
#: MapID of target ``id`` is ``NAV_MAP_ID_BASE + id``: unique within a file, and far from the
#: small ids of hand-made items in case a user merges the list into an existing navigator
NAV_MAP_ID_BASE = 700_000
#: longest note written to a .nav item, characters
_NOTE_MAX = 60

_UNITS = ("nm", "px")
_NOTE_BAD = re.compile(r"[\x00-\x1f\x7f=\[\]]+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class FoundTarget:
    """One confirmed target, in stage coordinates (µm).

    ``id`` counts targets from 1 in order of discovery. ``value`` and ``threshold`` are the
    confirming alert's measurement and limit in ``units`` ("nm", or "px" on an uncalibrated
    frame); ``ecd_nm``, ``feret_max_nm`` (nm) and ``aspect_ratio`` are None when not measured.
    ``source``/``seq`` name the frame that confirmed it, ``pixel_size_nm`` is that frame's pixel
    size (nm/px), ``frame_index`` how many frames the search had used by then and ``t_s`` the
    seconds since the search started. ``thumbnail`` is a uint8 (h, w) crop around the target.

    Raises ValueError naming the id and the field on a non-finite number, a confidence outside
    0..1, unknown units or a thumbnail that is not a non-empty uint8 2-D array.
    """

    id: int
    rule: str
    label: str
    x_um: float
    y_um: float
    confidence: float
    value: float
    threshold: float
    units: str
    ecd_nm: float | None
    feret_max_nm: float | None
    aspect_ratio: float | None
    source: str
    seq: int
    pixel_size_nm: float
    frame_index: int
    t_s: float
    instrument_s: float = 0.0  # instrument time (stage moves + exposures) by then, s
    thumbnail: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_target(self)


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _check_target(t: FoundTarget) -> None:
    """Raise ValueError naming ``t.id`` and the field when ``t`` breaks an invariant."""
    if not _is_int(t.id) or t.id < 1:
        raise ValueError(f"target id must be an int >= 1, got {t.id!r}")
    who = f"target {t.id}"
    for name in ("rule", "label", "source", "units"):
        if not isinstance(getattr(t, name), str):
            raise ValueError(f"{who}: {name} must be a str, got {getattr(t, name)!r}")
    if t.units not in _UNITS:
        raise ValueError(f"{who}: units must be one of {_UNITS}, got {t.units!r}")
    for name in ("x_um", "y_um", "confidence", "value", "threshold", "pixel_size_nm", "t_s",
                 "instrument_s"):
        v = getattr(t, name)
        if not _is_number(v) or not math.isfinite(v):
            raise ValueError(f"{who}: {name} must be a finite number, got {v!r}")
    for name in ("ecd_nm", "feret_max_nm", "aspect_ratio"):
        v = getattr(t, name)
        if v is not None and (not _is_number(v) or not math.isfinite(v)):
            raise ValueError(f"{who}: {name} must be a finite number or None, got {v!r}")
    if not 0.0 <= t.confidence <= 1.0:
        raise ValueError(f"{who}: confidence must be in 0..1, got {t.confidence!r}")
    if t.pixel_size_nm <= 0:
        raise ValueError(f"{who}: pixel_size_nm must be > 0, got {t.pixel_size_nm!r}")
    for name in ("seq", "frame_index"):
        v = getattr(t, name)
        if not _is_int(v) or v < 0:
            raise ValueError(f"{who}: {name} must be an int >= 0, got {v!r}")
    th = t.thumbnail
    if th is not None and (not isinstance(th, np.ndarray) or th.dtype != np.uint8
                           or th.ndim != 2 or th.size == 0):
        desc = f"{th.dtype} {th.shape}" if isinstance(th, np.ndarray) else type(th).__name__
        raise ValueError(f"{who}: thumbnail must be a non-empty uint8 (h, w) array, got {desc}")


def _checked(targets: Iterable[FoundTarget]) -> list[FoundTarget]:
    """The targets as a list; raises ValueError on a non-target or a repeated id."""
    out = list(targets)
    seen: set[int] = set()
    for i, t in enumerate(out):
        if not isinstance(t, FoundTarget):
            raise ValueError(f"targets[{i}] is a {type(t).__name__}, not a FoundTarget")
        if t.id in seen:
            raise ValueError(f"target id {t.id} appears more than once (targets[{i}])")
        seen.add(t.id)
    return out


def thumbnail_name(target_id: int) -> str:
    """The thumbnail's path relative to the list files: ``thumbnails/target-0001.png``."""
    return f"{THUMBNAIL_DIR}/target-{int(target_id):04d}.png"


def _thumb_refs(targets: Sequence[FoundTarget],
                thumbnails: Mapping[int, str] | None) -> dict[int, str | None]:
    """id -> thumbnail reference: ``thumbnails[id]`` when given, else the conventional name
    for targets that have a thumbnail, else None."""
    if thumbnails is not None:
        return {t.id: thumbnails.get(t.id) for t in targets}
    return {t.id: thumbnail_name(t.id) if t.thumbnail is not None else None for t in targets}


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place; returns path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------- rows
_COLUMNS = ("id", "label", "rule", "x_um", "y_um", "confidence", "value", "threshold", "units",
            "ecd_nm", "feret_max_nm", "aspect_ratio", "source", "seq", "pixel_size_nm",
            "frame_index", "t_s", "instrument_s", "thumbnail")
_INT_FIELDS = ("id", "seq", "frame_index")
_FLOAT_FIELDS = ("x_um", "y_um", "confidence", "value", "threshold", "pixel_size_nm", "t_s",
                 "instrument_s")
_OPT_FLOAT_FIELDS = ("ecd_nm", "feret_max_nm", "aspect_ratio")
_STR_FIELDS = ("label", "rule", "units", "source")


def _row(t: FoundTarget, thumb: str | None) -> dict[str, Any]:
    """Plain Python values (int, float, str, None) for one target, in column order."""
    row: dict[str, Any] = {}
    for name in _COLUMNS:
        if name == "thumbnail":
            row[name] = thumb
        elif name in _INT_FIELDS:
            row[name] = int(getattr(t, name))
        elif name in _STR_FIELDS:
            row[name] = getattr(t, name)
        else:
            v = getattr(t, name)
            row[name] = None if v is None else float(v)
    return row


def write_csv(targets: Iterable[FoundTarget], path: Path, *,
              thumbnails: Mapping[int, str] | None = None) -> Path:
    """Write one row per target under a header row to ``path``; returns ``path``.

    Columns: ``id, label, rule, x_um, y_um`` (stage, µm), ``confidence`` (0..1), ``value,
    threshold, units``, ``ecd_nm, feret_max_nm, aspect_ratio`` (empty when not measured),
    ``source, seq, pixel_size_nm, frame_index, t_s, instrument_s`` and ``thumbnail``: the PNG's path relative
    to the CSV (``thumbnails`` maps id -> name; by default :func:`thumbnail_name` for targets
    with a thumbnail), empty when none. Floats are written with full precision; a text cell
    that a spreadsheet would evaluate as a formula (a label ``=...``) gets a ``'`` in front
    (:func:`nanoscout.clients.spreadsheet.text_cell`).
    """
    ts = _checked(targets)
    refs = _thumb_refs(ts, thumbnails)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_COLUMNS)
    for t in ts:
        row = _row(t, refs[t.id])
        # floats become their repr here: numbers, never text cells
        w.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float)
                    else text_cell(row[c]) if isinstance(row[c], str) else row[c]
                    for c in _COLUMNS])
    return _atomic_write(path, buf.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------------------- JSON
def write_json(targets: Iterable[FoundTarget], path: Path, *,
               meta: Mapping[str, Any] | None = None,
               thumbnails: Mapping[int, str] | None = None) -> Path:
    """Write ``{"targets": [...], "meta": {...}}`` to ``path``; returns ``path``.

    Each target is an object with the CSV's columns (missing measurements null, ``thumbnail``
    the PNG's path relative to the JSON file or null). ``meta`` is copied as is (e.g. the
    search's settings); it must be plain JSON with finite floats, else ValueError.
    """
    ts = _checked(targets)
    refs = _thumb_refs(ts, thumbnails)
    doc = {"targets": [_row(t, refs[t.id]) for t in ts], "meta": dict(meta or {})}
    try:
        text = json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not plain JSON with finite numbers: {exc}") from exc
    return _atomic_write(path, (text + "\n").encode("utf-8"))


def read_json(path: Path) -> list[FoundTarget]:
    """Read the targets of a file :func:`write_json` wrote (thumbnails are not loaded: None).

    Raises ValueError naming the file and the target on a missing or mistyped field.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), list):
        raise ValueError(f"{path}: expected an object with a 'targets' list")
    out: list[FoundTarget] = []
    for i, item in enumerate(doc["targets"]):
        where = f"{path}: targets[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not an object")
        missing = [c for c in _COLUMNS if c != "thumbnail" and c not in item]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        kw: dict[str, Any] = {}
        for name in _INT_FIELDS:
            v = item[name]
            if not _is_int(v):
                raise ValueError(f"{where}: {name} must be an int, got {v!r}")
            kw[name] = int(v)
        for name in _FLOAT_FIELDS + _OPT_FLOAT_FIELDS:
            v = item[name]
            if v is None and name in _OPT_FLOAT_FIELDS:
                kw[name] = None
            elif _is_number(v):
                kw[name] = float(v)
            else:
                raise ValueError(f"{where}: {name} must be a number, got {v!r}")
        for name in _STR_FIELDS:
            kw[name] = item[name]
        try:
            out.append(FoundTarget(**kw))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return _checked(out)


# ----------------------------------------------------------------------------------------- .nav
def nav_note(t: FoundTarget) -> str:
    """The short ``.nav`` note of a target: ``"<label> conf 0.93"``, without ``=``, brackets,
    newlines or other control characters, at most 60 characters."""
    label = _SPACES.sub(" ", _NOTE_BAD.sub(" ", t.label)).strip() or "target"
    tail = f" conf {t.confidence:.2f}"
    return label[:_NOTE_MAX - len(tail)].rstrip() + tail


def write_nav(targets: Iterable[FoundTarget], path: Path) -> Path:
    """Write a SerialEM navigator file (autodoc text) to ``path``; returns ``path``.

    One point item per target, ``[Item = <id>]``, at ``StageXYZ = x y 0`` (µm, 1 nm
    resolution; z is 0: the search does not know the height) with the note of
    :func:`nav_note` and ``MapID = NAV_MAP_ID_BASE + id``. An empty list gives a file with
    the header only, which SerialEM opens as an empty navigator.
    """
    ts = _checked(targets)
    lines = ["AdocVersion = 2.00", f"LastSavedAs = {Path(path).name}", ""]
    for t in ts:
        x, y = f"{float(t.x_um):.3f}", f"{float(t.y_um):.3f}"
        lines += [
            f"[Item = {t.id}]",
            f"Color = {NAV_COLOR}",
            f"StageXYZ = {x} {y} 0.000",
            "NumPts = 1",
            "Regis = 1",
            "Type = 0",
            f"Note = {nav_note(t)}",
            f"MapID = {NAV_MAP_ID_BASE + t.id}",
            f"PtsX = {x}",
            f"PtsY = {y}",
            "",
        ]
    # autodoc readers are ASCII-minded: a non-ASCII character in a label becomes "?"
    return _atomic_write(path, "\n".join(lines).encode("ascii", errors="replace"))


def read_nav(path: Path) -> list[tuple[str, float, float]]:
    """The items of a ``.nav`` file as ``(note, x_um, y_um)``, in file order.

    A tiny autodoc parser for checking the files :func:`write_nav` writes: the note falls back
    to the item's label when it has no ``Note``; the position is ``StageXYZ`` (µm), or
    ``PtsX``/``PtsY`` when an item lacks it. Raises ValueError naming the line on a line that
    is neither a section header nor ``key = value``, or an item without a position.
    """
    path = Path(path)
    items: list[tuple[str, dict[str, str]]] = []
    for no, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            kind, _, name = line[1:-1].partition("=")
            if kind.strip() == "Item":
                items.append((name.strip(), {}))
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise ValueError(f"{path}:{no}: not 'key = value': {line!r}")
        if items:
            items[-1][1][key.strip()] = value.strip()
    out: list[tuple[str, float, float]] = []
    for name, kv in items:
        try:
            if "StageXYZ" in kv:
                x, y = (float(v) for v in kv["StageXYZ"].split()[:2])
            else:
                x, y = float(kv["PtsX"].split()[0]), float(kv["PtsY"].split()[0])
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: item {name!r} has no readable position "
                             f"(StageXYZ or PtsX/PtsY)") from exc
        out.append((kv.get("Note", name), x, y))
    return out


# ----------------------------------------------------------------------------------- thumbnails
def write_thumbnails(targets: Iterable[FoundTarget], folder: Path) -> dict[int, str]:
    """Write a PNG per target that has a thumbnail into ``folder`` (created if missing).

    Returns id -> the PNG's path relative to ``folder``'s parent, where the list files go
    (``thumbnails/target-0001.png`` for the default folder name); targets without a thumbnail
    are left out.
    """
    # the project's one PNG encoder; imported here so reading lists never loads the dashboard
    from nanoscout.clients.dashboard.images import png_b64

    ts = _checked(targets)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    for t in ts:
        if t.thumbnail is None:
            continue
        file = f"target-{t.id:04d}.png"
        _atomic_write(folder / file, base64.b64decode(png_b64(t.thumbnail)))
        names[t.id] = f"{folder.name}/{file}"
    return names


def write_navigator(targets: Iterable[FoundTarget], out_dir: Path, *, stem: str = "targets",
                    meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the list in every format into ``out_dir`` (created if missing).

    Returns ``{"csv": out_dir/<stem>.csv, "json": ….json, "nav": ….nav, "thumbnails":
    out_dir/thumbnails}``; CSV and JSON name each thumbnail relative to ``out_dir``.
    """
    if not stem or "/" in stem or "\\" in stem:
        raise ValueError(f"stem must be a plain file name, got {stem!r}")
    ts = _checked(targets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = out_dir / THUMBNAIL_DIR
    names = write_thumbnails(ts, thumbs)
    return {
        "csv": write_csv(ts, out_dir / f"{stem}.csv", thumbnails=names),
        "json": write_json(ts, out_dir / f"{stem}.json", meta=meta, thumbnails=names),
        "nav": write_nav(ts, out_dir / f"{stem}.nav"),
        "thumbnails": thumbs,
    }
