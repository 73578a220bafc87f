"""The recorded-run format (nanoscout.clients.runfile): round trip, one-line pandas/pyarrow
reading, real timestamps, unit-honest lengths, crash leftovers, the first format, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoscout.clients.runfile import PARTICLE_COLUMNS, RunWriter, read_run
from nanoscout.wire.errors import ConfigError, ReaderError
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import AlertHeader, DetHeader, Stage, StatsHeader

T0 = 1_700_000_000_000_000_000  # ns since the epoch: 2023-11-14T22:13:20Z


def _det(seq: int, n: int, px: float | None = 0.5) -> tuple[DetHeader, np.ndarray]:
    t = empty_table(n)
    t["id"] = np.arange(1, n + 1)
    t["ecd_nm"] = np.linspace(5, 10, n)
    t["area_nm2"] = np.pi * (t["ecd_nm"] / 2) ** 2
    t["bbox"] = np.array([[1, 2, 3, 4]] * n).reshape(n, 4)
    t["shape_class"] = 1
    t["border"][:1] = True
    h = DetHeader(source="cam", seq=seq, t_acq_ns=T0 + seq, t_recv_ns=T0 + 2_000 + seq,
                  t_done_ns=T0 + 3_000_000 + seq, stage_ms={}, pixel_size_nm=px,
                  units="nm" if px else "px", n=n, engine="onnxruntime-cpu", model="m:2",
                  shape=(64, 64), stage=Stage(x_um=1.5, y_um=-2.0), working_scale=0.5,
                  meta={"file": f"img-{seq}.dm4", "index": 0, "voltage_kv": 200.0},
                  # v1.7: frame 1 went to an adapted model's base network; frame 0 from v1.6
                  base_network_only=None if seq == 0 else seq == 1,
                  # v1.8: frame 2 named a particle size range whose middle set its scale
                  size_hint="applied" if seq == 2 else None,
                  # v1.9: frame 1 was measured and smoothed, frame 2 measured and not
                  noise={1: 0.09, 2: 0.02}.get(seq), smoothing_px={1: 1.4, 2: 0.0}.get(seq),
                  # v1.10: frame 1's scale was agreed by two passes, frame 2's was not
                  scale_agreed={1: True, 2: False}.get(seq))
    return h, t


def _alert(seq: int) -> AlertHeader:
    return AlertHeader(source="cam", seq=seq, t_acq_ns=T0 + 5, rule="r", kind="particle",
                       severity="warning", value=12.0, threshold=9.0, explanation="a, \"b\"\nc")


def _stats(seq: int) -> StatsHeader:
    return StatsHeader(source="cam", seq=seq, t_ns=T0 + 10, units="nm",
                       window={"n_frames": 2, "count": 7, "ecd": {"d10": 5.0, "d50": 7.5,
                                                                   "d90": 9.5, "mean": 7.4}},
                       cumulative={"count": 9, "ecd": {"d50": 7.0}},
                       clusters={"k": 2, "clusters": [{"id": 0, "share": 0.5}]})


def _write(out: Path) -> RunWriter:
    w = RunWriter(out, {"who": "test"})
    for seq in range(3):
        w.add_det(*_det(seq, 4))
    w.add_alert(_alert(1))
    w.add_stats(_stats(2))
    w.flush()
    w.add_det(*_det(3, 2, px=None))
    w.close()
    return w


@pytest.mark.parametrize("name", ["r.parquet", "r.csv"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    w = _write(tmp_path / name)
    run = read_run(tmp_path / name)
    assert run.rows(run.frames) == 4 and run.rows(run.particles) == 14
    assert run.to_arrow().column_names == list(PARTICLE_COLUMNS)
    assert run.particles["shape_class"][0] == "sphere"
    assert run.particles["border"].sum() == 4
    assert run.particles["bbox_x1"][0] == 3 and run.particles["stage_y_um"][0] == -2.0
    np.testing.assert_allclose(run.particles["ecd_nm"][:4], np.linspace(5, 10, 4), rtol=1e-6)
    np.testing.assert_allclose(run.particles["ecd_px"][:4], np.linspace(5, 10, 4) / 0.5, rtol=1e-6)
    assert np.isnan(run.frames["pixel_size_nm"][3]) and run.frames["units"][3] == "px"
    assert run.frames["working_scale"][0] == 0.5 and run.frames["model"][0] == "m:2"
    assert run.to_pandas("frames")["base_network_only"].tolist()[:3] == [None, True, False]
    assert run.to_pandas("frames")["size_hint"].tolist()[:3] == ["", "", "applied"]
    # v1.9: NaN where the noise was not measured (frame 0: a card without denoise)
    np.testing.assert_allclose(run.frames["noise"][:3], [np.nan, 0.09, 0.02])
    np.testing.assert_allclose(run.frames["smoothing_px"][:3], [np.nan, 1.4, 0.0])
    assert run.to_pandas("frames")["scale_agreed"].tolist()[:3] == [None, True, False]
    assert run.alerts["explanation"][0] == "a, \"b\"\nc"
    assert {k: v for k, v in run.provenance.items() if k != "format"} == {"who": "test"}
    assert run.provenance["format"] == "nanoscout-run/2"
    assert w.counts == {"particles": 14, "frames": 4, "alerts": 1, "stats": 1, "tracks": 0}
    # frame metadata is kept: the file name and the frame's whole meta map
    assert run.frames["file"].tolist()[:2] == ["img-0.dm4", "img-1.dm4"]
    assert json.loads(run.frames["meta"][0])["voltage_kv"] == 200.0
    assert run.particles["file"][0] == "img-0.dm4"
    # statistics and clusters after each frame
    assert run.stats["window_ecd_d50"][0] == 7.5 and run.stats["cumulative_count"][0] == 9
    assert json.loads(run.stats["clusters"][0])["k"] == 2


@pytest.mark.parametrize("name", ["r.parquet", "r.csv"])
def test_times_are_timestamps_and_lengths_say_their_unit(tmp_path: Path, name: str) -> None:
    _write(tmp_path / name)
    df = read_run(tmp_path / name).to_pandas()
    assert str(df["t_acq"].dtype) == "datetime64[ns, UTC]"
    assert df["t_acq"].iloc[0] == pd.Timestamp("2023-11-14T22:13:20", tz="UTC")
    frames = read_run(tmp_path / name).to_pandas("frames")
    assert (frames["t_done"] - frames["t_acq"]).iloc[0] == pd.Timedelta(3, "ms")
    # the uncalibrated frame: pixels under _px names, NaN under _nm names (never pixels)
    px = df[df["units"] == "px"]
    assert len(px) == 2 and px["ecd_nm"].isna().all() and px["area_nm2"].isna().all()
    np.testing.assert_allclose(px["ecd_px"], [5.0, 10.0], rtol=1e-6)


def test_pandas_and_pyarrow_read_the_run_root_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    _write(out)
    df = pd.read_parquet(out)  # the run folder itself is the particle table
    assert len(df) == 14 and {"ecd_nm", "ecd_px", "t_acq", "file"} <= set(df.columns)
    assert pq.read_table(out).num_rows == 14
    assert len(pd.read_parquet(out / "_frames")) == 4
    assert len(pd.read_parquet(out / "_alerts")) == 1
    assert len(pd.read_parquet(out / "_stats")) == 1
    assert json.loads((out / "_run.json").read_text())["who"] == "test"


def test_csv_crash_leftovers_are_dropped(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    w = RunWriter(out, {})
    w.add_det(*_det(0, 3))
    w.flush()
    # a crash mid-batch: the next batch's particle rows are on disk (one cut mid-line) but its
    # frame row is not
    line = out.read_text().splitlines()[1].replace('"cam",0,', '"cam",1,', 1)
    with open(out, "a") as fh:
        fh.write(line + "\n")
        fh.write(line[:25])
    run = read_run(out)
    assert run.rows(run.frames) == 1 and run.rows(run.particles) == 3
    assert set(run.particles["seq"].tolist()) == {0}


def test_runs_of_the_first_format_still_read(tmp_path: Path) -> None:
    """nanoscout-run/1: particles/ frames/ alerts/ run.json, ns integers, px under *_nm."""
    out = tmp_path / "old.parquet"
    for t in ("particles", "frames", "alerts"):
        (out / t).mkdir(parents=True)
    pq.write_table(pa.table({"source": ["a", "b"], "seq": [0, 0], "t_acq_ns": [T0, T0],
                             "units": ["nm", "px"], "pixel_size_nm": [0.5, float("nan")],
                             "ecd_nm": [4.0, 9.0], "area_nm2": [12.0, 60.0],
                             "border": [False, False]}), out / "particles" / "part-000001.parquet")
    pq.write_table(pa.table({"source": ["a", "b"], "seq": [0, 0], "t_acq_ns": [T0, T0],
                             "units": ["nm", "px"], "model": ["m", "m"]}),
                   out / "frames" / "part-000001.parquet")
    (out / "run.json").write_text('{"format": "nanoscout-run/1"}')
    run = read_run(out)
    df = run.to_pandas()
    assert str(df["t_acq"].dtype) == "datetime64[ns, UTC]"
    assert df["ecd_px"].tolist() == [8.0, 9.0]
    assert df["ecd_nm"].iloc[0] == 4.0 and np.isnan(df["ecd_nm"].iloc[1])
    assert run.provenance["format"] == "nanoscout-run/1"


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
    (bad / "_frames" / "part-000001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ReaderError, match="part-000001"):
        read_run(bad)


def test_notebook_display_and_provenance_helpers(tmp_path: Path) -> None:
    from nanoscout.clients.provenance import load_cards, model_entries, software
    from tests.conftest import REPO

    _write(tmp_path / "r.parquet")
    html = read_run(tmp_path / "r.parquet")._repr_html_()
    assert "14 particles" in html and "4 frames" in html and "<table>" in html
    cards = load_cards(REPO / "models" / "weights")
    assert {"nanoscout-particle-unet:3.0.0", "nanoscout-ai-lens:2.0.0"} <= set(cards)
    entries = model_entries(["nanoscout-field-classifier:3.1.1+nanoscout-ai-lens:2.0.0",
                             "unknown:1"], cards)
    assert [e["model"] for e in entries] == ["nanoscout-field-classifier:3.1.1",
                                            "nanoscout-ai-lens:2.0.0", "unknown:1"]
    assert len(entries[0]["sha256"]) == 64 and entries[2]["card"] is None
    sw = software()
    assert sw["nanoscout"] and "numpy" in sw["libraries"] and "pyarrow" in sw["libraries"]


def test_provenance_names_the_file_that_ran_not_its_namesake() -> None:
    """The INT8 sibling shares its FP32 card's name and version: the provenance named the FP32
    file's hash and sizing error for frames the INT8 file analysed (det.model_sha256 e295f6...)."""
    import json

    from nanoscout.clients.provenance import load_cards, model_entries, model_name
    from tests.conftest import REPO

    weights = REPO / "models" / "weights"
    cards = load_cards(weights)
    for file in ("detector.json", "detector.int8.json"):
        card = json.loads((weights / file).read_text())
        name = model_name(f"{card['name']}:{card['version']}", card["sha256"][:12])
        (entry,) = model_entries([name], cards)
        assert entry["card"] == file and entry["sha256"] == card["sha256"]
    (entry,) = model_entries([model_name("nanoscout-particle-unet:3.0.0", "0123456789ab")], cards)
    assert entry == {"model": "nanoscout-particle-unet:3.0.0", "sha256_prefix": "0123456789ab",
                     "card": None}
    assert model_name("m:1", None) == "m:1"


def test_delete_run_deletes_only_runs(tmp_path: Path) -> None:
    from nanoscout.clients.runfile import delete_run

    for name in ("r.parquet", "r.csv"):
        _write(tmp_path / name)
        assert delete_run(tmp_path / name) and not (tmp_path / name).exists()
        assert not delete_run(tmp_path / name)
    assert not list(tmp_path.iterdir())
    other = tmp_path / "photos.parquet"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a nanoscout run"):
        delete_run(other)
    assert (other / "keep.jpg").exists()


def test_delete_run_refuses_a_csv_and_json_that_are_not_a_run(tmp_path: Path) -> None:
    """``measure --overwrite --out results.csv`` deleted a user's results.csv and results.json."""
    from nanoscout.clients.runfile import delete_run

    user_csv, user_json = tmp_path / "results.csv", tmp_path / "results.json"
    user_csv.write_text("sample,notes\nA,precious lab data\n")
    user_json.write_text('{"my": "instrument config"}\n')
    with pytest.raises(ConfigError, match="not a nanoscout run: not deleting it"):
        delete_run(user_csv)
    user_csv.unlink()  # a user's JSON alone beside the name is not deleted either
    with pytest.raises(ConfigError, match="not a nanoscout run"):
        delete_run(user_csv)
    assert user_json.read_text() == '{"my": "instrument config"}\n'


def test_delete_run_takes_its_classes_table_and_no_one_elses(tmp_path: Path) -> None:
    from nanoscout.clients.runfile import CLASS_COLUMNS, classes_path, delete_run

    for name in ("r.parquet", "r.csv"):
        _write(tmp_path / name)
        classes_path(tmp_path / name).write_text(",".join(CLASS_COLUMNS) + ",p_a\n")
        assert delete_run(tmp_path / name)
        assert not list(tmp_path.iterdir())
    _write(tmp_path / "r.parquet")
    foreign = classes_path(tmp_path / "r.parquet")
    foreign.write_text("my,own,classes\n1,2,3\n")
    with pytest.raises(ConfigError, match="not a nanoscout classification table"):
        delete_run(tmp_path / "r.parquet")
    assert (tmp_path / "r.parquet" / "_run.json").exists()  # nothing deleted
    assert foreign.read_text() == "my,own,classes\n1,2,3\n"


@pytest.mark.parametrize(("run", "existing"), [("results.csv", "results.json"),
                                                ("results.csv", "results.classes.csv"),
                                                ("run1.parquet", "run1.classes.csv")])
def test_a_new_run_refuses_any_file_it_would_write(tmp_path: Path, run: str,
                                                    existing: str) -> None:
    """measure replaced a user's RUN.json and RUN.classes.csv without --overwrite."""
    (tmp_path / existing).write_text("mine\n")
    with pytest.raises(ConfigError, match=f"{existing} exists: choose a new run name"):
        RunWriter(tmp_path / run, {})
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_text() == "mine\n"


def test_the_run_records_the_file_its_writer_is_given_as_utf8_text(tmp_path: Path) -> None:
    """A path longer than a meta string holds, and a name that is not UTF-8 (which pyarrow
    refused, losing the whole batch)."""
    out = tmp_path / "r.parquet"
    w = RunWriter(out, {})
    long_path = "/data/" + "d" * 1500 + "/img.tif"
    h, t = _det(0, 2)
    w.add_det(h, t, file=long_path)
    h, t = _det(1, 1)
    w.add_det(h.model_copy(update={"meta": {"file": "lat\udce9in.png", "index": 0}}), t)
    w.close()
    run = read_run(out)
    assert list(run.frames["file"]) == [long_path, "lat\\xe9in.png"]
    assert list(run.particles["file"]) == [long_path] * 2 + ["lat\\xe9in.png"]


@pytest.mark.parametrize("name", ["r.parquet", "r.csv"])
def test_a_message_the_run_cannot_store_is_refused_alone_and_the_batch_is_kept(
        tmp_path: Path, name: str) -> None:
    """Headers that once reached the writer (``model_construct``: what decode refuses now) raised
    at flush: an int64 overflow lost the whole batch and left its alerts written without their
    frames; an nm table without a pixel size or bytes in ``meta`` ended the recording. The
    writer refuses each at add, queueing nothing of it, and writes everything else."""
    from nanoscout.wire.errors import ProtocolError

    out = tmp_path / name
    w = RunWriter(out, {})
    w.add_det(*_det(0, 3))
    w.add_alert(_alert(0))
    good_stats = _stats(0)
    hostile: list[tuple[str, object, str]] = [
        ("add_stats", good_stats.model_copy(update={"t_ns": 2**64 - 1}), "stats cam#0"),
    ]
    h, t = _det(1, 3)
    hostile += [
        ("add_det", (h.model_copy(update={"pixel_size_nm": None}), t), "det cam#1"),
        ("add_det", (h.model_copy(update={"pixel_size_nm": -2.0}), t), "det cam#1"),
        ("add_det", (h.model_copy(update={"meta": {"blob": b"\xff\x00"}}), t), "det cam#1"),
        ("add_det", (h.model_copy(update={"shape": (2**64 - 1, 5)}), t), "det cam#1"),
        ("add_alert", _alert(1).model_copy(update={"t_acq_ns": 2**64 - 1}), "alert cam#1"),
    ]
    for method, arg, what in hostile:
        pending = w.pending
        with pytest.raises(ProtocolError, match=f"{what} cannot be stored"):
            getattr(w, method)(*(arg if isinstance(arg, tuple) else (arg,)))
        assert w.pending == pending  # nothing of it queued
    w.add_stats(good_stats)
    w.add_det(*_det(2, 2))
    w.flush()
    run = read_run(out)
    assert run.frames["seq"].tolist() == [0, 2] and run.rows(run.particles) == 5
    assert run.rows(run.alerts) == 1 and run.rows(run.stats) == 1


def test_a_batch_is_written_whole_or_not_at_all(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a table of a batch fail to build, nothing of the batch is written (no alerts
    whose frames are missing) and it stays queued for the next flush."""
    import nanoscout.clients.runfile as runfile

    out = tmp_path / "r.parquet"
    w = RunWriter(out, {})
    w.add_det(*_det(0, 3))
    w.add_alert(_alert(0))
    w.add_stats(_stats(0))
    join = runfile._joined

    def failing(tables: list[pa.Table]) -> pa.Table:
        if tables[0].schema == runfile.schema("stats"):
            raise OverflowError("Python int too large to convert to C long")
        return join(tables)

    monkeypatch.setattr(runfile, "_joined", failing)
    with pytest.raises(OverflowError):
        w.flush()
    assert not list(out.rglob("part-*.parquet")) and w.pending_frames == 1
    monkeypatch.setattr(runfile, "_joined", join)
    w.flush()
    run = read_run(out)
    assert run.rows(run.frames) == 1 and run.rows(run.alerts) == 1 and run.rows(run.stats) == 1
    assert run.rows(run.particles) == 3
