"""Text cells of the CSV files nanoscout writes, made safe to open in a spreadsheet.

Operators open the CSV outputs (``measure`` / ``record`` runs ``RUN.csv``, ``RUN.*.csv``,
``RUN.classes.csv``, the stage search's ``targets.csv``) in Excel or LibreOffice, which evaluate
a cell that begins with ``=``, ``+``, ``-`` or ``@`` as a formula, and treat a leading tab or
carriage return the same way (OWASP "CSV Injection",
https://owasp.org/www-community/attacks/CSV_Injection). Text cells hold text from outside:
file names and paths, frame header strings, class labels, alert rules. A file named
``=HYPERLINK("http:evil","open").tif`` would become a link in the operator's spreadsheet,
``=cmd|' /C calc'!A0`` a command (after a warning the operator may click through).

Following OWASP, :func:`text_cell` writes such a text cell with a single quote in front
(``'=HYPERLINK(...)``): every spreadsheet shows it as text. Numbers are never text cells
(``-1.5`` stays the number -1.5): only ``str`` values and string columns are changed.

The quote is reversible: a text that begins with quotes and then one of those characters gets
one quote more (``'=x`` is written ``''=x``), and :func:`cell_text` / :func:`plain_text_columns`
take one away, so a run read back (:func:`nanoscout.clients.runfile.read_run`) holds exactly the
text that was written. Parquet and JSON outputs are not spreadsheets: they hold the text as it
is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["FORMULA_START", "cell_text", "plain_text_columns", "text_cell", "text_cells",
           "text_columns"]

#: the first characters that make a spreadsheet read a cell as a formula (OWASP)
FORMULA_START = "=+-@\t\r"
#: a text cell to quote: quotes (written by an earlier quoting, or the text's own), then one of
#: :data:`FORMULA_START`; the same pattern in RE2 syntax (pyarrow) and Python's
_QUOTE = "^'*[=+\\-@\\t\\r]"
_QUOTED = "^'+[=+\\-@\\t\\r]"
_QUOTE_RE = re.compile(_QUOTE)
_QUOTED_RE = re.compile(_QUOTED)


def text_cell(text: str) -> str:
    """``text`` as a CSV cell that no spreadsheet evaluates: with a ``'`` in front when it
    begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (or with quotes and then
    one of those); unchanged otherwise."""
    return "'" + text if _QUOTE_RE.match(text) else text


def cell_text(cell: str) -> str:
    """The text a cell written by :func:`text_cell` holds (its added ``'`` taken away)."""
    return cell[1:] if _QUOTED_RE.match(cell) else cell


def text_cells(row: Iterable[object]) -> list[object]:
    """One CSV row for :func:`csv.writer`: each ``str`` value through :func:`text_cell`, every
    other value (numbers, None) as it is."""
    return [text_cell(v) if isinstance(v, str) else v for v in row]


def _map_strings(table: pa.Table, pattern: str, quote: bool) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    for i, f in enumerate(table.schema):
        if not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
            continue
        col = table.column(i)
        hit = pc.match_substring_regex(col, pattern)
        if not pc.any(hit).as_py():
            continue
        changed = (pc.binary_join_element_wise("'", col, "") if quote
                   else pc.utf8_slice_codeunits(col, 1))
        table = table.set_column(i, f, pc.if_else(hit, changed, col))
    return table


def text_columns(table: pa.Table) -> pa.Table:
    """``table`` with every string column's cells through :func:`text_cell` (for
    ``pyarrow.csv.write_csv``); numeric, boolean and time columns unchanged."""
    return _map_strings(table, _QUOTE, quote=True)


def plain_text_columns(table: pa.Table) -> pa.Table:
    """``table`` (read from a CSV written with :func:`text_columns`) with every string
    column's cells through :func:`cell_text`: the text that was written."""
    return _map_strings(table, _QUOTED, quote=False)
