"""The recorded-run format (nanoscout.clients.runfile): round trip, crash leftovers, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.runfile import PARTICLE_COLUMNS, RunWriter, read_run
from nanoscout.wire.errors import ConfigError, ReaderError
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import AlertHeader, DetHeader, Stage


def _det(seq: int, n: int, px: float | None = 0.5) -> tuple[DetHeader, np.ndarray]:
    t = empty_table(n)
    t["id"] = np.arange(1, n + 1)
    t["ecd_nm"] = np.linspace(5, 10, n)
    t["bbox"] = np.array([[1, 2, 3, 4]] * n).reshape(n, 4)
    t["shape_class"] = 1
    t["border"][:1] = True
    h = DetHeader(source="cam", seq=seq, t_acq_ns=1_000 + seq, t_recv_ns=2_000 + seq,
                  t_done_ns=3_000_000 + seq, stage_ms={}, pixel_size_nm=px,
                  units="nm" if px else "px", n=n, engine="onnxruntime-cpu", model="m:2",
                  shape=(64, 64), stage=Stage(x_um=1.5, y_um=-2.0), working_scale=0.5)
    return h, t


def _alert(seq: int) -> AlertHeader:
    return AlertHeader(source="cam", seq=seq, t_acq_ns=5, rule="r", kind="particle",
                       severity="warning", value=12.0, threshold=9.0, explanation="a, \"b\"\nc")


@pytest.mark.parametrize("name", ["r.parquet", "r.csv"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    w = RunWriter(tmp_path / name, {"who": "test"})
    for seq in range(3):
        w.add_det(*_det(seq, 4))
    w.add_alert(_alert(1))
    w.flush()
    w.add_det(*_det(3, 0, px=None))
    w.close()
    run = read_run(tmp_path / name)
    assert run.rows(run.frames) == 4 and run.rows(run.particles) == 12
    assert list(run.particles) == list(PARTICLE_COLUMNS)
    assert run.particles["shape_class"][0] == "sphere"
    assert run.particles["border"].sum() == 3
    assert run.particles["bbox_x1"][0] == 3 and run.particles["stage_y_um"][0] == -2.0
    np.testing.assert_allclose(run.particles["ecd_nm"][:4], np.linspace(5, 10, 4), rtol=1e-6)
    assert np.isnan(run.frames["pixel_size_nm"][3]) and run.frames["units"][3] == "px"
    assert run.frames["working_scale"][0] == 0.5 and run.frames["model"][0] == "m:2"
    assert run.alerts["explanation"][0] == "a, \"b\"\nc"
    assert run.provenance == {"who": "test"}
    assert w.counts == {"particles": 12, "frames": 4, "alerts": 1}


def test_csv_crash_leftovers_are_dropped(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    w = RunWriter(out, {})
    w.add_det(*_det(0, 3))
    w.flush()
    # a crash mid-batch: the next batch's particle rows are on disk (one cut mid-line) but its
    # frame row is not
    with open(out, "a") as fh:
        fh.write("cam,1,1001,nm,0.5,1.5,-2.0,1,0,0,1,2,3,4,1,5.0,1,1,1,1,0,1,1,1,1,1,sphere,False\n")
        fh.write("cam,1,1001,nm,0.5")
    run = read_run(out)
    assert run.rows(run.frames) == 1 and run.rows(run.particles) == 3
    assert set(run.particles["seq"].tolist()) == {0}


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RUN.parquet or RUN.csv"):
        RunWriter(tmp_path / "r.txt", {})
    RunWriter(tmp_path / "r.parquet", {}).close()
    with pytest.raises(ConfigError, match="not empty"):
        RunWriter(tmp_path / "r.parquet", {})
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReaderError, match="header"):
        read_run(tmp_path / "x.csv")
    bad = tmp_path / "b.parquet"
    RunWriter(bad, {}).close()
    (bad / "frames" / "part-000001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ReaderError, match="part-000001"):
        read_run(bad)
