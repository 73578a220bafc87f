"""Readers on real instrument files (shapes, dtypes, calibration, modality) and file replay."""

from __future__ import annotations

import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import tifffile
from PIL import Image

from nanoscout.clients.acquisition.readers import (
    SUPPORTED_SUFFIXES,
    calibration_to_nm,
    read_image,
    read_images,
)
from nanoscout.clients.acquisition.replay import replay_files, replay_watch
from nanoscout.wire.errors import ConfigError, ReaderError

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
INSTRUMENT = DATA / "instrument-files"
needs_data = pytest.mark.skipif(
    not INSTRUMENT.is_dir(),
    reason=f"shared microscope data not found at {INSTRUMENT.resolve()} (shared/data/README.md)",
)

# The table in shared/data/README.md: file, shape, dtype, pixel size (nm) or None, modality.
# Modality is what the file's own tags say; None where they say nothing.
TABLE: list[tuple[str, tuple[int, int], str, float | None, str | None]] = [
    ("dm/JEOL_HAADF_nanoparticles.dm4", (112, 112), "float32", 1.249, "STEM"),
    ("dm/test_STEM_image.dm3", (68, 68), "uint32", 0.24854, "STEM"),
    ("dm/Fei_HAADF_UK_location.dm3", (4, 16), "uint16", 5.51, "STEM"),
    ("dm/test-1.dm3", (2, 2), "int16", None, None),
    ("dm/test-1.dm4", (2, 2), "int16", None, None),
    ("tia/128x128-TEM_search.emi", (128, 128), "int32", 5.26121, "TEM"),
    ("tia/128x128-TEM_search_1.ser", (128, 128), "int32", 5.26121, None),
    ("emd/example_image.emd", (3, 3), "int32", None, None),
    ("mrc/HAADFscan.mrc", (16, 16), "uint16", 5.67913, None),
    ("tiff/test_tiff_Zeiss_SEM_512pix.tif", (384, 512), "uint8", 11.649976, "SEM"),
    ("tiff/test_tiff_Zeiss_SEM_1k.tif", (768, 1024), "uint8", 2614.514, "SEM"),
    ("tiff/FEI-Helios-Ebeam-8bits.tif", (471, 512), "uint8", 3372.4, "SEM"),
    ("tiff/FEI-Helios-Ebeam-16bits.tif", (471, 512), "uint16", 3372.4, "SEM"),
    ("tiff/test_loading_image_saved_with_DM.tif", (68, 68), "int32", 168.6747, None),
    ("tiff/test_loading_image_saved_with_imageJ.tif", (68, 68), "float32", 168.6747, None),
]


@needs_data
def test_table_covers_every_instrument_file() -> None:
    on_disk = {
        p.relative_to(INSTRUMENT).as_posix()
        for p in INSTRUMENT.rglob("*")
        if p.suffix.lower() in SUPPORTED_SUFFIXES
    }
    assert on_disk == {row[0] for row in TABLE}


@needs_data
@pytest.mark.parametrize(
    ("name", "shape", "dtype", "pixel_nm", "modality"), TABLE, ids=[row[0] for row in TABLE]
)
def test_instrument_file(
    name: str, shape: tuple[int, int], dtype: str, pixel_nm: float | None, modality: str | None
) -> None:
    records = read_images(INSTRUMENT / name)
    assert len(records) == 1
    rec = records[0]
    assert rec.data.shape == shape
    assert rec.data.dtype == np.dtype(dtype)
    assert rec.data.flags.c_contiguous and rec.data.dtype.isnative
    assert not isinstance(rec.data, np.memmap)
    assert rec.index == 0
    assert rec.path == INSTRUMENT / name
    assert rec.modality == modality
    if pixel_nm is None:
        assert rec.pixel_size_nm is None
        assert "no calibration" in rec.calibration_note
    else:
        assert rec.pixel_size_nm is not None
        assert rec.pixel_size_nm == pytest.approx(pixel_nm, rel=1e-3)
    assert float(np.abs(rec.data).max()) > 0  # real pixels, not an empty buffer
    msgpack.packb(rec.meta)  # small and encodable as frame meta
    assert all(isinstance(v, str | int | float) for v in rec.meta.values())


@needs_data
def test_vendor_metadata_is_kept() -> None:
    jeol = read_image(INSTRUMENT / "dm/JEOL_HAADF_nanoparticles.dm4")
    assert jeol.source_format == "dm4"
    assert jeol.meta["voltage_kv"] == pytest.approx(80.0)
    assert jeol.meta["magnification"] == pytest.approx(250_000)
    assert jeol.meta["scale_unit"] == "µm"
    assert "µm" in jeol.calibration_note and "DM tags" in jeol.calibration_note
    zeiss = read_image(INSTRUMENT / "tiff/test_tiff_Zeiss_SEM_512pix.tif")
    assert zeiss.source_format == "tiff"
    assert zeiss.meta["magnification"] == pytest.approx(50_000)
    assert zeiss.meta["detector"] == "InLens"


@needs_data
def test_tiff_pixels_match_an_independent_reader() -> None:
    for name in ("tiff/FEI-Helios-Ebeam-16bits.tif", "tiff/test_loading_image_saved_with_DM.tif"):
        rec = read_image(INSTRUMENT / name)
        np.testing.assert_array_equal(rec.data, tifffile.imread(INSTRUMENT / name))


@pytest.mark.skipif(
    not (DATA / "emps-train").is_dir() or not (DATA / "stem-dev").is_dir(),
    reason=f"shared emps-train/stem-dev data not found under {DATA.resolve()}",
)
def test_png_and_jpg_read_as_grey_2d() -> None:
    png = sorted((DATA / "emps-train" / "images").glob("*.png"))[0]
    jpg = sorted((DATA / "stem-dev" / "images").glob("*.jpg"))[0]
    for path, fmt in ((png, "png"), (jpg, "jpeg")):
        rec = read_image(path)
        assert rec.data.ndim == 2 and rec.data.dtype == np.uint8
        assert rec.pixel_size_nm is None and rec.modality is None
        assert rec.source_format == fmt
        with Image.open(path) as im:  # the README's way of reading the ground truth
            np.testing.assert_array_equal(rec.data, np.asarray(im.convert("L")))


def test_rgb_png_becomes_601_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[1, :, 1] = 255
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    rec = read_image(tmp_path / "c.png")
    expected = np.rint(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    assert rec.data.dtype == np.uint8 and rec.data.shape == (4, 5)
    assert np.abs(rec.data.astype(int) - expected).max() <= 1


def test_rgb_tiff_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[..., 1] = 100
    rgb[2:4, :, 2] = 250
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    rec = read_image(tmp_path / "c.tif")
    expected = np.rint(rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114)
    assert rec.data.shape == (6, 7) and rec.data.dtype == np.uint8
    assert np.abs(rec.data.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_planar_rgb_tiff_becomes_luminance(tmp_path: Path, dtype: type) -> None:
    """Colour samples in separate planes (PlanarConfiguration 2), two pages: rosettasciio
    cannot read them ("The last dimension size of the array must be 3 or 4"); each page
    becomes the same luminance as an interleaved RGB file, uncalibrated, saying why."""
    rng = np.random.default_rng(3)
    pages: np.ndarray = (rng.random((2, 3, 6, 7)) * np.iinfo(dtype).max).astype(dtype)
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        for page in pages:
            tw.write(page, photometric="rgb", planarconfig="separate")
    records = read_images(tmp_path / "p.tif")
    assert [r.index for r in records] == [0, 1]
    for page, rec in zip(pages, records, strict=True):
        expected = np.rint(page[0] * 0.299 + page[1] * 0.587 + page[2] * 0.114)
        assert rec.data.shape == (6, 7) and rec.data.dtype == dtype
        assert np.abs(rec.data.astype(np.int64) - expected).max() <= 1
        assert rec.pixel_size_nm is None and "separate colour planes" in rec.calibration_note
    # the same pixels interleaved take rosettasciio's path and give the same grey image
    tifffile.imwrite(tmp_path / "c.tif", np.moveaxis(pages[0], 0, -1), photometric="rgb")
    assert np.abs(read_image(tmp_path / "c.tif").data.astype(np.int64)
                  - records[0].data.astype(np.int64)).max() <= 1


def test_stack_gives_one_record_per_plane(tmp_path: Path) -> None:
    stack = np.arange(3 * 8 * 9, dtype=np.uint16).reshape(3, 8, 9)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    records = read_images(tmp_path / "s.tif")
    assert [r.index for r in records] == [0, 1, 2]
    for plane, rec in zip(stack, records, strict=True):
        np.testing.assert_array_equal(rec.data, plane)
        assert rec.data.flags.c_contiguous


def test_big_endian_data_comes_back_native(tmp_path: Path) -> None:
    data = np.arange(12, dtype=">u2").reshape(3, 4)
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">")
    rec = read_image(tmp_path / "be.tif")
    assert rec.data.dtype.isnative and rec.data.dtype == np.uint16
    np.testing.assert_array_equal(rec.data, data)


@pytest.mark.parametrize(
    ("scale", "units", "expected"),
    [
        (0.00125, "µm", 1.25),
        (0.00125, "μm", 1.25),  # greek mu
        (0.00125, "um", 1.25),
        (2.5, "Å", 0.25),
        (2.5, "\u212b", 0.25),  # angstrom sign
        (3.3724e-06, "m", 3372.4),
        (0.002, "mm", 2000.0),
        (0.7, "nm", 0.7),
        (1.0, "", None),
        (1.0, "<undefined>", None),
        (1.0, None, None),
        (0.5, "", None),  # a scale without unit is not a calibration
        (0.0, "nm", None),
        (-1.0, "nm", None),
        (float("nan"), "nm", None),
        (float("inf"), "nm", None),
        (1e-6, "nm", None),  # below 1e-4 nm/px
        (5.0, "m", None),  # 5e9 nm/px
        (0.1, "1/nm", None),  # diffraction
        (0.1, "furlong", None),
    ],
)
def test_calibration_to_nm(scale: float, units: str | None, expected: float | None) -> None:
    nm, note = calibration_to_nm(scale, units)
    if expected is None:
        assert nm is None
        assert note  # says why
    else:
        assert nm == pytest.approx(expected, rel=1e-9)


def test_absurd_calibration_note_names_the_value() -> None:
    nm, note = calibration_to_nm(5.0, "m")
    assert nm is None and "absurd" in note and "5" in note


@needs_data
@pytest.mark.parametrize(
    ("name", "fraction"),
    [
        ("dm/JEOL_HAADF_nanoparticles.dm4", 0.5),
        ("mrc/HAADFscan.mrc", 0.9),
        ("tiff/test_tiff_Zeiss_SEM_512pix.tif", 0.9),
        # directory at the end: tifffile only logs the damage and returns pixels without tags
        ("tiff/FEI-Helios-Ebeam-8bits.tif", 0.99),
        ("tiff/FEI-Helios-Ebeam-8bits.tif", 0.5),
    ],
)
def test_truncated_copy_raises_reader_error(tmp_path: Path, name: str, fraction: float) -> None:
    src = INSTRUMENT / name
    blob = src.read_bytes()
    bad = tmp_path / src.name
    bad.write_bytes(blob[: int(len(blob) * fraction)])
    with pytest.raises(ReaderError) as info:
        read_images(bad)
    assert src.name in str(info.value)


@pytest.mark.parametrize("suffix", [".dm3", ".dm4", ".tif", ".mrc", ".emd", ".ser", ".png"])
def test_garbage_raises_reader_error(tmp_path: Path, suffix: str) -> None:
    bad = tmp_path / f"garbage{suffix}"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ReaderError) as info:
        read_images(bad)
    assert "garbage" in str(info.value)
    assert info.value.__cause__ is not None or "no 2-D image" in str(info.value)


def test_a_header_giving_a_side_of_0_is_a_reader_error(tmp_path: Path) -> None:
    """A bit flip that zeroes an MRC's ``nx`` was read as a 16 x 0 image and sent on."""
    raw = bytearray((INSTRUMENT / "mrc/HAADFscan.mrc").read_bytes())
    raw[0:4] = (0).to_bytes(4, "little")  # nx
    bad = tmp_path / "nx0.mrc"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ReaderError, match=r"nx0\.mrc: an image of 16 x 0 px holds no pixel"):
        read_images(bad)


def test_unknown_and_missing_files_raise(tmp_path: Path) -> None:
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(ReaderError, match=r"unsupported file type '\.xyz'"):
        read_images(tmp_path / "notes.xyz")
    with pytest.raises(ReaderError, match="no such file"):
        read_images(tmp_path / "absent.dm4")


# ---------------------------------------------------------------------------------------------
# replay


@dataclass
class FakePublisher:
    calls: list[dict[str, Any]] = field(default_factory=list)

    def send(self, image: np.ndarray, **kwargs: Any) -> int:
        self.calls.append({"image": image, **kwargs})
        return len(self.calls) - 1


@needs_data
def test_replay_sends_files_and_skips_a_corrupt_one(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.dm3"
    corrupt.write_bytes(b"\0" * 100)
    paths = [
        INSTRUMENT / "dm/JEOL_HAADF_nanoparticles.dm4",
        corrupt,
        INSTRUMENT / "dm/test-1.dm3",
        INSTRUMENT / "tiff/test_tiff_Zeiss_SEM_512pix.tif",
    ]
    pub, lines = FakePublisher(), list[str]()
    report = replay_files(paths, pub, log=lines.append)

    assert report.sent == 3
    assert [c["meta"] for c in pub.calls] == [
        {"file": "JEOL_HAADF_nanoparticles.dm4", "index": 0},
        {"file": "test-1.dm3", "index": 0},
        {"file": "test_tiff_Zeiss_SEM_512pix.tif", "index": 0},
    ]
    assert pub.calls[0]["pixel_size_nm"] == pytest.approx(1.249, rel=1e-3)
    assert pub.calls[0]["modality"] == "STEM"
    assert pub.calls[0]["magnification"] == pytest.approx(250_000)
    assert pub.calls[1]["pixel_size_nm"] is None
    assert pub.calls[2]["pixel_size_nm"] == pytest.approx(11.649976, rel=1e-3)
    assert pub.calls[2]["modality"] == "SEM"
    assert pub.calls[2]["image"].shape == (384, 512)
    assert [p for p, _ in report.skipped] == [corrupt]
    assert "broken.dm3" in report.skipped[0][1]
    assert report.uncalibrated == [INSTRUMENT / "dm/test-1.dm3"]
    assert any("skipped" in line and "broken.dm3" in line for line in lines)
    assert any("UNCALIBRATED" in line and "test-1.dm3" in line for line in lines)


@needs_data
def test_replay_override_loop_and_directory_expansion(tmp_path: Path) -> None:
    pub = FakePublisher()
    report = replay_files(
        [INSTRUMENT / "dm", INSTRUMENT / "tia", tmp_path / "absent.tif"],
        pub,
        loop=2,
        pixel_size_nm=2.0,
        modality="TEM",
        log=lambda _: None,
        particle_size_nm=(3.0, 12.0),
        particle_size_px=(6.0, 24.0),
    )
    dm_names = sorted(p.name for p in (INSTRUMENT / "dm").iterdir())
    # the .emi reads its .ser, so the .ser alone is not sent a second time
    one_pass = [*dm_names, "128x128-TEM_search.emi"]
    assert [c["meta"]["file"] for c in pub.calls] == one_pass * 2
    assert report.sent == 2 * len(one_pass)
    assert all(c["pixel_size_nm"] == 2.0 and c["modality"] == "TEM" for c in pub.calls)
    assert all(c["particle_size_nm"] == (3.0, 12.0) and c["particle_size_px"] == (6.0, 24.0)
               for c in pub.calls)
    assert report.uncalibrated == []
    assert report.skipped == [(tmp_path / "absent.tif", "no such file or directory")]


def test_replay_rejects_bad_options() -> None:
    pub = FakePublisher()
    for kwargs in (
        {"rate_hz": 0.0},
        {"rate_hz": math.nan},
        {"loop": 0},
        {"pixel_size_nm": -1.0},
        {"pixel_size_nm": math.inf},
        {"modality": "XRAY"},
        {"particle_size_nm": (12.0, 3.0)},
        {"particle_size_nm": (0.0, 3.0)},
        {"particle_size_px": (30.0, 3.0)},
    ):
        with pytest.raises(ConfigError):
            replay_files([], pub, log=lambda _: None, **kwargs)
    assert pub.calls == []


def test_replay_makes_frames_the_protocol_carries(tmp_path: Path) -> None:
    small = np.arange(20, dtype=np.int64).reshape(4, 5)
    large = small * 2**40
    tifffile.imwrite(tmp_path / "a_small.tif", small)
    tifffile.imwrite(tmp_path / "b_large.tif", large)
    tifffile.imwrite(tmp_path / "c_half.tif", small.astype(np.float16))
    pub = FakePublisher()
    replay_files([tmp_path], pub, log=lambda _: None)
    assert [c["image"].dtype for c in pub.calls] == [np.int32, np.float64, np.float32]
    np.testing.assert_array_equal(pub.calls[0]["image"], small)
    np.testing.assert_array_equal(pub.calls[1]["image"], large.astype(np.float64))


class _StopAfterPolls(threading.Event):
    """A stop event for watch_folder that ends the watch after ``n`` polls, without waiting."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.polls = n, 0

    def wait(self, timeout: float | None = None) -> bool:
        self.polls += 1
        if self.polls >= self.n:
            self.set()
        return self.is_set()


@needs_data
def test_replay_watch_sends_new_files_and_skips_bad_ones(tmp_path: Path) -> None:
    shutil.copy(INSTRUMENT / "mrc/HAADFscan.mrc", tmp_path / "a.mrc")
    (tmp_path / "b.dm4").write_bytes(b"not a dm4 file")
    (tmp_path / "c.txt").write_text("not an image")  # not matched by the default patterns
    pub, lines = FakePublisher(), list[str]()
    report = replay_watch(
        tmp_path, pub, existing=True, settle_polls=1, poll_s=0.01, stop=_StopAfterPolls(4), log=lines.append
    )
    assert report.sent == 1
    assert pub.calls[0]["meta"] == {"file": "a.mrc", "index": 0}
    assert pub.calls[0]["pixel_size_nm"] == pytest.approx(5.67913, rel=1e-3)
    assert [p.name for p, _ in report.skipped] == ["b.dm4"]


def test_replay_watch_reads_a_truncated_file_again_when_it_is_completed(tmp_path: Path) -> None:
    """A writer that paused longer than the settle time: the truncated file was skipped and its
    rest, written later, never sent."""
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = buf.getvalue()
    target = tmp_path / "slow.tif"

    class WriteAtPolls(_StopAfterPolls):
        def wait(self, timeout: float | None = None) -> bool:
            if self.polls == 1:
                target.write_bytes(data[:100])  # the header, then a long pause
            elif self.polls == 4:
                target.write_bytes(data)
            return super().wait(timeout)

    pub, lines = FakePublisher(), list[str]()
    report = replay_watch(tmp_path, pub, settle_polls=1, poll_s=0.01, stop=WriteAtPolls(8),
                          log=lines.append)
    assert report.sent == 1 and report.skipped == []
    assert pub.calls[0]["meta"] == {"file": "slow.tif", "index": 0}
    assert any("will try slow.tif again if it changes" in line for line in lines)


def test_replay_watch_sends_nothing_for_a_touched_file(tmp_path: Path) -> None:
    """The watch hands over a file whose time alone changed (a new image under the same name
    has the same size): a touch, same pixels, sends nothing and is counted."""
    target = tmp_path / "frame.tif"

    class TouchAtPolls(_StopAfterPolls):
        def wait(self, timeout: float | None = None) -> bool:
            if self.polls == 1:
                tifffile.imwrite(target, np.arange(64, dtype=np.uint16).reshape(8, 8))
            elif self.polls == 4:
                st = target.stat()
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            return super().wait(timeout)

    pub, lines = FakePublisher(), list[str]()
    report = replay_watch(tmp_path, pub, settle_polls=1, poll_s=0.01, stop=TouchAtPolls(8),
                          log=lines.append)
    assert (report.sent, report.unchanged, report.skipped) == (1, 1, [])
    assert any("frame.tif changed, but its 1 image(s) were sent before: none sent again" in line
               for line in lines), lines


def test_an_image_too_large_is_refused_before_it_is_decoded(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A small compressed file can declare a huge image (a 1.6 MB TIFF of 40000 x 40000 px
    took 22 GB of memory): TIFF and Pillow formats are refused on their declared size."""
    from nanoscout.clients.acquisition import readers

    big = tmp_path / "big.tif"
    tifffile.imwrite(big, np.zeros((300, 200), np.uint8), compression="zlib")
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 200), np.uint8)).save(png)
    decoded: list[str] = []
    monkeypatch.setattr(readers, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    monkeypatch.setattr(readers, "_read_rsciio", lambda p, fmt: decoded.append(fmt))
    for path in (big, png):
        with pytest.raises(ReaderError, match=r"300 x 200 px is larger than the 59999 px"):
            read_images(path)
    assert decoded == []  # the TIFF reader was never called
    monkeypatch.setattr(readers, "MAX_IMAGE_PIXELS", 300 * 200)
    assert read_images(png)[0].data.shape == (300, 200)


@pytest.mark.parametrize(("unit", "px_per_unit"), [
    # ImageJ writes non-ASCII characters escaped: \u00B5m is µm, \u00C5 is Å
    ("micron", 500.0), ("um", 500.0), ("\\u00B5m", 500.0), ("nm", 0.5), ("nanometer", 0.5),
    ("A", 0.05), ("\\u00C5", 0.05), ("mm", 5e5), ("cm", 5e6), ("pm", 5e-4)])
def test_imagej_tiff_is_calibrated_in_any_length_unit(tmp_path: Path, unit: str,
                                                      px_per_unit: float) -> None:
    """rosettasciio keeps ImageJ's unit only when it is "micron": Fiji's nm, um, A ... (and
    nanoscout's own NAME.labels.tif, in nm) read as uncalibrated."""
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), imagej=True,
                     resolution=(px_per_unit, px_per_unit), metadata={"unit": unit})
    rec = read_image(path)
    assert rec.pixel_size_nm == pytest.approx(2.0)
    assert "per px" in rec.calibration_note


def test_imagej_tiff_without_a_length_unit_says_so(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), imagej=True, resolution=(0.5, 0.5),
                     metadata={"unit": "furlong"})
    rec = read_image(path)
    assert rec.pixel_size_nm is None and "unknown length unit 'furlong'" in rec.calibration_note
    assert calibration_to_nm(2.0, None, "TIFF tags")[1] == (
        "no calibration (scale 2 per px with no length unit in the TIFF tags)")


def test_replay_sends_a_name_that_is_not_utf8_in_printable_form(tmp_path: Path) -> None:
    """A Latin-1 file name reached the wire as a surrogate escape, which msgpack refused: the
    watcher died and later files were never sent."""
    import os

    from nanoscout.wire.codec import pack_header
    from nanoscout.wire.protocol import frame_header

    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", os.fsdecode(os.fsencode(tmp_path) + b"/lat\xe9in.png"))
    pub, lines = FakePublisher(), list[str]()
    report = replay_watch(tmp_path, pub, existing=True, settle_polls=1, poll_s=0.01,
                          stop=_StopAfterPolls(4), log=lines.append)
    assert report.sent == 2 and not report.skipped
    assert sorted(c["meta"]["file"] for c in pub.calls) == ["a.png", "lat\\xe9in.png"]
    for c in pub.calls:
        pack_header(frame_header(c["image"], source="s", seq=0, t_acq_ns=1,
                                 pixel_size_nm=None, meta=c["meta"]))
    "\n".join(lines).encode("utf-8")  # every line printable on a strict UTF-8 terminal


@needs_data
def test_an_emi_without_its_ser_says_where_the_pixels_are(tmp_path: Path) -> None:
    """A TIA ``.emi`` copied without its ``_1.ser`` was "no 2-D image (empty file)"."""
    emi = tmp_path / "128x128-TEM_search.emi"
    shutil.copyfile(DATA / "instrument-files" / "tia" / emi.name, emi)
    with pytest.raises(ReaderError, match=r"no 128x128-TEM_search_<n>\.ser beside it"):
        read_images(emi)
