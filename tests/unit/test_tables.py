"""The particle table in pandas/pyarrow (nanoscout.wire.tables and the Message hooks):
``msg.to_pandas()`` works where ``pd.DataFrame(msg.array)`` cannot, lengths say their unit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import (
    AlertHeader,
    DetHeader,
    Message,
    StatsHeader,
    decode_message,
    encode_message,
)
from nanoscout.wire.tables import PARTICLE_TABLE_COLUMNS, particle_columns, to_arrow


def _table(n: int = 3) -> np.ndarray:
    t = empty_table(n)
    t["id"] = np.arange(1, n + 1)
    t["ecd_nm"] = [4.0, 6.0, 8.0][:n]
    t["area_nm2"] = np.pi * (t["ecd_nm"] / 2) ** 2
    t["bbox"] = [[1, 2, 3, 4]] * n
    t["shape_class"] = 2
    return t


def _det(px: float | None) -> Message:
    h = DetHeader(source="cam", seq=7, t_acq_ns=1, t_recv_ns=2, t_done_ns=3, stage_ms={},
                  pixel_size_nm=px, units="nm" if px else "px", n=3, engine="e")
    return decode_message(encode_message(h, _table()))


def test_pandas_cannot_take_the_wire_table_but_to_pandas_can() -> None:
    msg = _det(0.5)
    with pytest.raises((ValueError, TypeError)):
        pd.DataFrame(msg.array)  # the 4-wide bbox field
    df = msg.to_pandas()
    assert list(df.columns) == ["source", "seq", *PARTICLE_TABLE_COLUMNS]
    assert df["bbox_x1"].tolist() == [3, 3, 3] and df["shape_class"].iloc[0] == "rod"
    np.testing.assert_allclose(df["ecd_nm"], [4, 6, 8])
    np.testing.assert_allclose(df["ecd_px"], [8, 12, 16])
    np.testing.assert_allclose(df["area_px2"], df["area_nm2"] / 0.25, rtol=1e-6)
    t = msg.to_arrow()
    assert isinstance(t, pa.Table) and t.num_rows == 3 and t.column("seq").to_pylist() == [7] * 3


def test_uncalibrated_lengths_never_sit_under_nm_names() -> None:
    df = _det(None).to_pandas()
    assert df["ecd_nm"].isna().all() and df["feret_max_nm"].isna().all()
    np.testing.assert_allclose(df["ecd_px"], [4, 6, 8])


def test_alert_rows_and_refusals() -> None:
    ah = AlertHeader(source="cam", seq=1, t_acq_ns=1, rule="big", kind="particle",
                     severity="warning", value=8, threshold=7, explanation="x", n=1)
    alert = decode_message(encode_message(ah, _table(1)))
    df = alert.to_pandas()
    assert df["ecd_nm"].tolist() == [4.0] and df["ecd_px"].isna().all()
    stats = Message("stats.cam", StatsHeader(source="cam", seq=1, t_ns=1, units="nm", window={},
                                             cumulative={}))
    with pytest.raises(ValueError, match="no particle table"):
        stats.to_pandas()
    with pytest.raises(ValueError, match="positive pixel size"):
        particle_columns(_table(), "nm", None)
    with pytest.raises(ValueError, match="not a particle table"):
        to_arrow(np.zeros(3))


def test_notebook_display() -> None:
    html = _det(0.5)._repr_html_()
    assert "<table>" in html and "det.cam" in html and "3 particles" in html and "ecd_nm" in html
