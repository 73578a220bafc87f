"""The particle table as flat, unit-honest columns, a pyarrow Table or a pandas DataFrame.

The wire's particle table (:data:`nanoscout.wire.particles.PARTICLE_DTYPE`) keeps lengths in
fields named ``*_nm`` that hold pixels when the frame is uncalibrated (the ``det`` header's
``units`` says which), and a 4-wide ``bbox`` field that pandas cannot take
(``pd.DataFrame(msg.array)`` raises). :func:`particle_columns` turns it into flat columns whose
names say their unit, always:

* ``area_px2, ecd_px, feret_max_px, feret_min_px, major_px, minor_px``: pixels, always filled;
* ``area_nm2, ecd_nm, feret_max_nm, feret_min_nm, major_nm, minor_nm``: nanometres, NaN when
  the frame has no pixel size (never pixels under an ``_nm`` name);
* ``bbox_x0, bbox_y0, bbox_x1, bbox_y1`` (px, x1/y1 exclusive), ``x, y`` (centroid, px);
* ``shape_class`` as its name (``"sphere"``, ...), the other fields as they are.

pyarrow and pandas are imported only when :func:`to_arrow` / :func:`to_pandas` are called.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from nanoscout.wire.particles import PARTICLE_DTYPE, SHAPE_CLASSES

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["BBOX_COLUMNS", "LENGTH_FIELDS", "PARTICLE_TABLE_COLUMNS", "html_table",
           "particle_columns", "to_arrow", "to_pandas"]

#: wire fields that are lengths (nm, or px when uncalibrated): stem, power of the length unit
LENGTH_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("area_nm2", "area", 2), ("ecd_nm", "ecd", 1), ("feret_max_nm", "feret_max", 1),
    ("feret_min_nm", "feret_min", 1), ("major_nm", "major", 1), ("minor_nm", "minor", 1))
BBOX_COLUMNS: tuple[str, ...] = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
_LENGTH = {wire: (stem, power) for wire, stem, power in LENGTH_FIELDS}


def _unit_name(stem: str, power: int, unit: str) -> str:
    return f"{stem}_{unit}{power if power > 1 else ''}"


def _column_names() -> tuple[str, ...]:
    names: list[str] = []
    for f in PARTICLE_DTYPE.names or ():
        if f == "bbox":
            names.extend(BBOX_COLUMNS)
        elif f in _LENGTH:
            stem, power = _LENGTH[f]
            names.extend((_unit_name(stem, power, "px"), _unit_name(stem, power, "nm")))
        else:
            names.append(f)
    return tuple(names)


#: the columns of :func:`particle_columns`, in order
PARTICLE_TABLE_COLUMNS: tuple[str, ...] = _column_names()


def _check_units(units: str, pixel_size_nm: float | None) -> float | None:
    if units not in ("nm", "px"):
        raise ValueError(f"units must be 'nm' or 'px', got {units!r}")
    if units == "nm":
        if pixel_size_nm is None or not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
            raise ValueError(f"a table in nm needs a positive pixel size, got {pixel_size_nm!r}")
        return float(pixel_size_nm)
    return None


def particle_columns(table: np.ndarray, units: str = "nm",
                     pixel_size_nm: float | None = None) -> dict[str, np.ndarray]:
    """The particle ``table`` as flat columns named by unit (see the module docstring).

    ``units`` and ``pixel_size_nm`` (nm/px) are the ``det`` header's. Raises ValueError when
    ``table`` is not a particle table or the units and pixel size disagree.
    """
    if table.dtype != PARTICLE_DTYPE:
        raise ValueError(f"not a particle table: dtype {table.dtype} (expected PARTICLE_DTYPE)")
    px = _check_units(units, pixel_size_nm)
    n = len(table)
    out: dict[str, np.ndarray] = {}
    for f in PARTICLE_DTYPE.names or ():
        if f == "bbox":
            for k, name in enumerate(BBOX_COLUMNS):
                out[name] = np.ascontiguousarray(table["bbox"][:, k], dtype=np.int32)
        elif f in _LENGTH:
            stem, power = _LENGTH[f]
            v = table[f].astype(np.float64)
            if px is None:
                out[_unit_name(stem, power, "px")] = v
                out[_unit_name(stem, power, "nm")] = np.full(n, np.nan)
            else:
                out[_unit_name(stem, power, "px")] = v / px**power
                out[_unit_name(stem, power, "nm")] = v
        elif f == "shape_class":
            codes = table[f].astype(np.int64).tolist()
            out[f] = np.array([SHAPE_CLASSES[i] if i < len(SHAPE_CLASSES) else str(i)
                               for i in codes], dtype=object)
        else:
            out[f] = table[f]
    return out


def to_arrow(table: np.ndarray, units: str = "nm", pixel_size_nm: float | None = None,
             extra: dict[str, Any] | None = None) -> pa.Table:
    """The particle ``table`` as a pyarrow Table of :func:`particle_columns`.

    ``extra``: constant columns put first (e.g. ``{"source": "cam", "seq": 7}``).
    """
    import pyarrow as pa

    cols = particle_columns(table, units, pixel_size_nm)
    n = len(table)
    arrays: dict[str, Any] = {k: pa.array([v] * n) for k, v in (extra or {}).items()}
    for k, v in cols.items():
        arrays[k] = pa.array(v.tolist() if v.dtype == object else v)
    return pa.table(arrays)


def to_pandas(table: np.ndarray, units: str = "nm", pixel_size_nm: float | None = None,
              extra: dict[str, Any] | None = None) -> pd.DataFrame:
    """The particle ``table`` as a pandas DataFrame of :func:`particle_columns`."""
    import pandas as pd

    cols: dict[str, Any] = {k: [v] * len(table) for k, v in (extra or {}).items()}
    cols.update(particle_columns(table, units, pixel_size_nm))
    return pd.DataFrame(cols)


def html_table(columns: dict[str, Any], *, max_rows: int = 10, caption: str = "") -> str:
    """A small HTML table of the first ``max_rows`` rows of ``columns`` (notebook display)."""
    import html

    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in names)

    def cell(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "NaN" if not math.isfinite(float(v)) else f"{float(v):.4g}"
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(columns[c][i])}</td>" for c in names) + "</tr>"
                   for i in range(min(n, max_rows)))
    more = f"<p>… {n - max_rows} more rows</p>" if n > max_rows else ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


# ---------------------------------------------------------------------------------------------
# the hooks behind Message.to_arrow / to_pandas / _repr_html_


def _message_table(msg: Any) -> tuple[np.ndarray, str, float | None, dict[str, Any]]:
    h = msg.header
    if msg.array is None or msg.array.dtype != PARTICLE_DTYPE:
        raise ValueError(f"a {msg.kind} message carries no particle table (only det and alert do)")
    units = getattr(h, "units", "nm")
    px = getattr(h, "pixel_size_nm", None)
    if units == "nm" and px is None:  # an alert header has no pixel size: lengths stay nm
        px = math.nan
    extra = {"source": h.source, "seq": h.seq}
    return msg.array, units, px, extra


def message_to_arrow(msg: Any) -> pa.Table:
    """A det/alert message's particle rows as a pyarrow Table (``source, seq`` first)."""
    table, units, px, extra = _message_table(msg)
    if px is not None and math.isnan(px):
        return _alert_arrow(table, extra)
    return to_arrow(table, units, px, extra)


def message_to_pandas(msg: Any) -> pd.DataFrame:
    """A det/alert message's particle rows as a pandas DataFrame (``source, seq`` first)."""
    return message_to_arrow(msg).to_pandas()


def _alert_arrow(table: np.ndarray, extra: dict[str, Any]) -> pa.Table:
    # an alert in nm without the frame's pixel size: nm columns filled, px columns NaN
    import pyarrow as pa

    t = to_arrow(table, "px", None, extra)
    cols = {name: t.column(name) for name in t.column_names}
    for wire, stem, power in LENGTH_FIELDS:
        cols[_unit_name(stem, power, "nm")] = pa.array(table[wire].astype(np.float64))
        cols[_unit_name(stem, power, "px")] = pa.array(np.full(len(table), np.nan))
    return pa.table(cols)


def message_html(msg: Any) -> str:
    """Notebook display of a message: its header fields and, for det/alert, the first rows."""
    import html

    h = msg.header
    fields = {k: v for k, v in h.model_dump().items() if k not in ("window", "cumulative")}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))[:200]}</td></tr>"
                   for k, v in fields.items())
    out = f"<div><b>{html.escape(msg.topic)}</b><table>{rows}</table>"
    if msg.array is not None and msg.array.dtype == PARTICLE_DTYPE and len(msg.array):
        t = message_to_arrow(msg)
        out += html_table({c: t.column(c).to_pylist() for c in t.column_names},
                          caption=f"{len(msg.array)} particles")
    return out + "</div>"
