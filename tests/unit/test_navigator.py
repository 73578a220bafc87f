"""Navigator lists (nanoscout.clients.search.navigator): CSV, JSON, SerialEM .nav and PNG thumbnails."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.acquisition.readers import read_image
from nanoscout.clients.search.navigator import (
    NAV_MAP_ID_BASE,
    FoundTarget,
    nav_note,
    read_json,
    read_nav,
    write_csv,
    write_json,
    write_nav,
    write_navigator,
    write_thumbnails,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_target(i: int = 1, **kw: object) -> FoundTarget:
    base: dict[str, object] = dict(
        id=i, rule="big_particle", label="gold rod", x_um=-1234.5678 + 10.25 * i,
        y_um=987.6543 - 3.5 * i, confidence=0.875, value=61.25, threshold=50.0, units="nm",
        ecd_nm=61.25, feret_max_nm=80.5, aspect_ratio=1.75, source="cam0", seq=40 + i,
        pixel_size_nm=0.52, frame_index=3 * i, t_s=12.5 * i,
        thumbnail=np.arange(24 * 32, dtype=np.uint8).reshape(24, 32),
    )
    base.update(kw)
    return FoundTarget(**base)  # type: ignore[arg-type]


@pytest.fixture
def targets() -> list[FoundTarget]:
    return [
        make_target(1),
        make_target(2, ecd_nm=None, feret_max_nm=None, aspect_ratio=None, units="px",
                    label="odd = label\nwith [brackets]", thumbnail=None),
        make_target(3, confidence=1.0, x_um=0.0, y_um=-0.0004,
                    thumbnail=np.full((7, 5), 200, np.uint8)),
    ]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and chunk order."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ------------------------------------------------------------------------------------- CSV
def test_csv_round_trip(tmp_path: Path, targets: list[FoundTarget]) -> None:
    path = write_csv(targets, tmp_path / "t.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert list(rows[0])[:5] == ["id", "label", "rule", "x_um", "y_um"]
    for t, row in zip(targets, rows):
        assert int(row["id"]) == t.id
        assert float(row["x_um"]) == pytest.approx(t.x_um, abs=1e-3)
        assert float(row["y_um"]) == pytest.approx(t.y_um, abs=1e-3)
        assert float(row["confidence"]) == t.confidence
        assert row["label"] == t.label  # CSV quoting keeps "=", brackets and the newline
        assert row["units"] == t.units
    assert rows[0]["thumbnail"] == "thumbnails/target-0001.png"
    assert rows[1]["thumbnail"] == "" and rows[1]["ecd_nm"] == "" and rows[1]["aspect_ratio"] == ""
    assert float(rows[0]["ecd_nm"]) == 61.25


def test_csv_text_cells_that_look_like_formulas_are_written_as_text(tmp_path: Path) -> None:
    """A label, rule or source that begins with =, +, -, @, a tab or a carriage return was
    written as it is: a spreadsheet opening targets.csv ran it as a formula (OWASP CSV
    injection). Such a text cell gets a ' in front; numbers, negative ones too, stay numbers."""
    t = make_target(1, label='=HYPERLINK("http://evil.example","open")', rule="@SUM(1+1)",
                    source="+cmd|' /C calc'!A0", x_um=-12.5, value=-3.25)
    tab = make_target(2, label="\t=1+1", rule="-2+3", source="'=quoted")
    path = write_csv([t, tab], tmp_path / "t.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["label"] == "'" + t.label
    assert rows[0]["rule"] == "'@SUM(1+1)"
    assert rows[0]["source"] == "'+cmd|' /C calc'!A0"
    assert rows[1]["label"] == "'\t=1+1" and rows[1]["rule"] == "'-2+3"
    assert rows[1]["source"] == "''=quoted"  # one quote more: read back, the text is exact
    assert rows[0]["x_um"] == "-12.5" and rows[0]["value"] == "-3.25"  # numbers, not text
    assert rows[0]["units"] == "nm" and rows[0]["thumbnail"] == "thumbnails/target-0001.png"


# ------------------------------------------------------------------------------------ JSON
def test_json_round_trip(tmp_path: Path, targets: list[FoundTarget]) -> None:
    meta = {"strategy": "spiral", "step_um": 2.5, "rules": ["big_particle"]}
    path = write_json(targets, tmp_path / "t.json", meta=meta)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["meta"] == meta
    assert [d["thumbnail"] for d in doc["targets"]] == [
        "thumbnails/target-0001.png", None, "thumbnails/target-0003.png"]
    back = read_json(path)
    assert back == targets  # thumbnails are not compared (and not loaded)
    assert all(t.thumbnail is None for t in back)
    for a, b in zip(back, targets):
        assert abs(a.x_um - b.x_um) < 1e-3 and abs(a.y_um - b.y_um) < 1e-3


def test_json_rejects_non_finite_meta(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta"):
        write_json([make_target()], tmp_path / "t.json", meta={"step_um": math.nan})
    assert not (tmp_path / "t.json").exists()


def test_read_json_names_the_bad_field(tmp_path: Path) -> None:
    path = write_json([make_target()], tmp_path / "t.json")
    doc = json.loads(path.read_text())
    doc["targets"][0]["x_um"] = "far away"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"targets\[0\]: x_um"):
        read_json(path)
    del doc["targets"][0]["y_um"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="lacks y_um"):
        read_json(path)


# ------------------------------------------------------------------------------------- .nav
def test_nav_round_trip(tmp_path: Path, targets: list[FoundTarget]) -> None:
    path = write_nav(targets, tmp_path / "t.nav")
    text = path.read_text(encoding="ascii")
    assert text.startswith("AdocVersion = 2.00\n")
    items = read_nav(path)
    assert len(items) == 3
    for t, (note, x, y) in zip(targets, items):
        assert x == pytest.approx(t.x_um, abs=1e-3)
        assert y == pytest.approx(t.y_um, abs=1e-3)
        assert note == nav_note(t)
    assert items[0][0] == "gold rod conf 0.88"
    # one point item per target, with the keys SerialEM needs, and unique MapIDs
    sections = text.split("[Item = ")[1:]
    for t, sec in zip(targets, sections):
        keys = dict(line.split(" = ", 1) for line in sec.splitlines()[1:] if line)
        assert sec.startswith(f"{t.id}]")
        assert keys["Type"] == "0" and keys["NumPts"] == "1" and keys["Regis"] == "1"
        assert keys["MapID"] == str(NAV_MAP_ID_BASE + t.id)
        assert keys["StageXYZ"].split()[2] == "0.000"
        assert float(keys["PtsX"]) == pytest.approx(t.x_um, abs=1e-3)


def test_nav_note_is_sanitised(tmp_path: Path) -> None:
    t = make_target(label="a = b\r\n[Item = 9]\tµm " + "x" * 100, confidence=0.5)
    note = nav_note(t)
    assert not set(note) & set("=[]\r\n\t")
    assert note.startswith("a b Item 9 ")
    assert note.endswith(" conf 0.50") and len(note) <= 60
    assert nav_note(make_target(label=" = \n")) == "target conf 0.88"
    path = write_nav([t], tmp_path / "t.nav")
    lines = path.read_text(encoding="ascii").splitlines()
    assert sum(line.startswith("[") for line in lines) == 1  # the note opened no section
    assert [line for line in lines if line.startswith("Note = ")] == [
        "Note = " + note.replace("µ", "?")]
    assert read_nav(path)[0][1] == pytest.approx(t.x_um, abs=1e-3)


def test_read_nav_reads_a_serialem_style_file(tmp_path: Path) -> None:
    path = tmp_path / "sem.nav"
    path.write_text(
        "AdocVersion = 2.00\r\nLastSavedAs = C:\\data\\sem.nav\r\n\r\n"
        "[Item = 1-A]\r\nColor = 0\r\nStageXYZ = 12.345 -67.891 3.2\r\nNumPts = 1\r\n"
        "Regis = 1\r\nType = 0\r\nNote = hole\r\nPtsX = 12.345\r\nPtsY = -67.891\r\n\r\n"
        "[Item = 2]\r\nType = 0\r\nPtsX = 1.5\r\nPtsY = 2.5\r\n")
    assert read_nav(path) == [("hole", 12.345, -67.891), ("2", 1.5, 2.5)]
    path.write_text("AdocVersion = 2.00\n[Item = 1]\nnonsense line\n")
    with pytest.raises(ValueError, match=":3: not 'key = value'"):
        read_nav(path)
    path.write_text("AdocVersion = 2.00\n[Item = 7]\nType = 0\n")
    with pytest.raises(ValueError, match="item '7' has no readable position"):
        read_nav(path)


# ------------------------------------------------------------------------------- thumbnails
def test_thumbnails_are_valid_pngs(tmp_path: Path, targets: list[FoundTarget]) -> None:
    names = write_thumbnails(targets, tmp_path / "thumbnails")
    assert names == {1: "thumbnails/target-0001.png", 3: "thumbnails/target-0003.png"}
    for t in (targets[0], targets[2]):
        assert t.thumbnail is not None
        file = tmp_path / names[t.id]
        h, w = t.thumbnail.shape
        assert png_size(file.read_bytes()) == (w, h)
        np.testing.assert_array_equal(read_image(file).data, t.thumbnail)
    assert sorted(p.name for p in (tmp_path / "thumbnails").iterdir()) == [
        "target-0001.png", "target-0003.png"]


def test_write_navigator_writes_everything(tmp_path: Path, targets: list[FoundTarget]) -> None:
    out = write_navigator(targets, tmp_path / "run1", meta={"specimen": "grid 3"})
    assert set(out) == {"csv", "json", "nav", "thumbnails"}
    assert out["csv"] == tmp_path / "run1" / "targets.csv"
    assert out["nav"].suffix == ".nav" and out["json"].suffix == ".json"
    doc = json.loads(out["json"].read_text())
    for d in doc["targets"]:
        if d["thumbnail"] is not None:  # every reference resolves, relative to the list files
            assert (out["json"].parent / d["thumbnail"]).read_bytes()[:8] == PNG_SIGNATURE
    assert doc["meta"] == {"specimen": "grid 3"}
    assert [(round(x, 3), round(y, 3)) for _, x, y in read_nav(out["nav"])] == [
        (round(t.x_um, 3), round(t.y_um, 3)) for t in targets]
    assert not [p for p in (tmp_path / "run1").iterdir() if p.name.endswith(".tmp")]
    other = write_navigator(targets[:1], tmp_path / "run2", stem="grid3")
    assert other["nav"].name == "grid3.nav"
    with pytest.raises(ValueError, match="stem"):
        write_navigator(targets, tmp_path, stem="a/b")


def test_empty_list_writes_valid_empty_files(tmp_path: Path) -> None:
    out = write_navigator([], tmp_path)
    with out["csv"].open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 1 and rows[0][0] == "id" and "x_um" in rows[0]
    assert json.loads(out["json"].read_text()) == {"targets": [], "meta": {}}
    assert read_json(out["json"]) == []
    assert out["nav"].read_text().startswith("AdocVersion = 2.00\n")
    assert read_nav(out["nav"]) == []
    assert out["thumbnails"].is_dir() and not list(out["thumbnails"].iterdir())


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("change", "message"), [
    ({"x_um": math.nan}, r"target 5: x_um must be a finite number"),
    ({"y_um": math.inf}, r"target 5: y_um must be a finite number"),
    ({"confidence": 1.5}, r"target 5: confidence must be in 0\.\.1"),
    ({"ecd_nm": math.nan}, r"target 5: ecd_nm must be a finite number or None"),
    ({"units": "µm"}, r"target 5: units must be one of"),
    ({"pixel_size_nm": 0.0}, r"target 5: pixel_size_nm must be > 0"),
    ({"seq": -1}, r"target 5: seq must be an int >= 0"),
    ({"thumbnail": np.zeros((4, 4), np.float32)}, r"target 5: thumbnail must be .*float32"),
    ({"thumbnail": np.zeros((4, 4, 3), np.uint8)}, r"target 5: thumbnail must be .*\(4, 4, 3\)"),
    ({"id": 0}, r"target id must be an int >= 1, got 0"),
])
def test_bad_target_raises(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_target(5, **change)


def test_bad_list_raises_before_writing(tmp_path: Path) -> None:
    t = make_target(4)
    with pytest.raises(ValueError, match="target id 4 appears more than once"):
        write_navigator([t, dataclasses.replace(t, x_um=1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"targets\[1\] is a tuple"):
        write_nav([t, (1.0, 2.0)], tmp_path / "t.nav")  # type: ignore[list-item]
    assert not (tmp_path / "t.nav").exists()
