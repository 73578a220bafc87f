"""Spreadsheet-safe text cells (nanoscout.clients.spreadsheet): OWASP's quote, reversible, the
same for one cell (csv module) and for a pyarrow table (the run's CSV tables)."""

from __future__ import annotations

import csv
import io

import pyarrow as pa
import pyarrow.csv as pacsv

from nanoscout.clients.spreadsheet import (
    cell_text,
    plain_text_columns,
    text_cell,
    text_cells,
    text_columns,
)

TEXTS = ["=1+1", "+1", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\t=1", "\r=1", "'=1", "''+x",
         "'plain", "plain", "", "a=b", " =1", "-", "{\"a\": -1}", "µm=1"]
QUOTED = {"=1+1", "+1", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\t=1", "\r=1", "'=1", "''+x",
          "-"}


def test_text_cell_quotes_formula_starts_only_and_reverses() -> None:
    for t in TEXTS:
        cell = text_cell(t)
        assert cell == ("'" + t if t in QUOTED else t), t
        assert cell_text(cell) == t, t


def test_text_cells_leave_numbers_numbers() -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(text_cells(["-1", -1.5, -2, None, "=x"]))
    assert buf.getvalue() == "'-1,-1.5,-2,,'=x\n"


def test_table_columns_match_the_cells_and_read_back_exactly() -> None:
    n = len(TEXTS)
    table = pa.table({"s": pa.array([*TEXTS, None], pa.string()),
                      "x": pa.array([-1.5] * n + [None], pa.float64()),
                      "i": pa.array(list(range(-n, 0)) + [0], pa.int64())})
    safe = text_columns(table)
    assert safe.column("s").to_pylist() == [*map(text_cell, TEXTS), None]
    assert safe.column("x").equals(table.column("x"))
    assert safe.column("i").equals(table.column("i"))
    buf = io.BytesIO()
    pacsv.write_csv(safe, buf)
    rows = list(csv.reader(io.StringIO(buf.getvalue().decode(), newline="")))
    assert rows[1] == [text_cell(TEXTS[0]), "-1.5", str(-n)]  # numbers stay numbers
    back = pacsv.read_csv(io.BytesIO(buf.getvalue()),
                          parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(
                              column_types={"s": pa.string()}, strings_can_be_null=False,
                              quoted_strings_can_be_null=False))
    assert plain_text_columns(back).column("s").to_pylist()[:n] == TEXTS
