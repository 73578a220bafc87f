"""Raw frames kept for review: the ring's bounds, the TIFF files (read back with tifffile),
safe file names, the writer's disk budget and the alert saves around a firing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.rules import SaveFrames
from nanoscout.clients.acquisition.readers import read_image
from nanoscout.daemon.config import ReviewConfig
from nanoscout.daemon.frame_ring import FrameRing
from nanoscout.daemon.frame_tiff import frame_file_name, read_frame_tiff, write_frame_tiff
from nanoscout.daemon.review import FrameReview, SaveRefused


def _frame(source: str, seq: int, side: int = 16, dtype: str = "uint16",
           pixel_size_nm: float | None = 0.5) -> Frame:
    img = (np.arange(side * side).reshape(side, side) % 251 + seq).astype(dtype)
    return Frame.from_image(img, pixel_size_nm=pixel_size_nm, source=source, seq=seq,
                            modality="TEM", stage=None, meta={"detector": "BF", "n": seq},
                            t_acq_ns=1_000 + seq)


def test_the_ring_keeps_the_newest_frames_per_source() -> None:
    ring = FrameRing(frames=3, max_bytes=1 << 30)
    for seq in range(10):
        ring.add(_frame("a", seq))
        ring.add(_frame("b", 100 + seq))
    assert [f.header.seq for f in ring.latest("a", 10)] == [7, 8, 9]
    assert [f.header.seq for f in ring.latest("b", 2)] == [108, 109]
    assert ring.latest("nobody") == []
    assert len(ring) == 6 and ring.nbytes == 6 * 16 * 16 * 2
    newest = ring.newest()
    assert newest is not None and newest.header.seq == 109
    ring.forget("a")
    assert ring.latest("a") == [] and len(ring) == 3 and ring.nbytes == 3 * 512


def test_the_ring_stays_within_its_bytes_over_all_sources() -> None:
    one = 16 * 16 * 2
    ring = FrameRing(frames=8, max_bytes=5 * one)
    for seq in range(4):
        ring.add(_frame("a", seq))
    for seq in range(4):
        ring.add(_frame("b", seq))
    assert ring.nbytes == 5 * one and len(ring) == 5
    # the oldest frames went first, whichever source they came from
    assert [f.header.seq for f in ring.latest("a", 8)] == [3]
    assert [f.header.seq for f in ring.latest("b", 8)] == [0, 1, 2, 3]
    big = _frame("c", 0, side=64)
    ring.add(big)  # larger than the whole budget: not kept, counted
    assert ring.too_large == 1 and ring.latest("c") == [] and ring.nbytes == 5 * one


def test_the_ring_bounds_its_sources_and_can_be_off() -> None:
    ring = FrameRing(frames=2, max_bytes=1 << 30, max_sources=2)
    for name in ("a", "b", "c"):
        ring.add(_frame(name, 0))
    assert ring.sources() == ["b", "c"]
    off = FrameRing(frames=0, max_bytes=1 << 30)
    off.add(_frame("a", 0))
    assert len(off) == 0
    with pytest.raises(ValueError, match="max_sources"):
        FrameRing(frames=-1, max_bytes=0)


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float64", "int32"])
def test_a_frame_tiff_is_calibrated_and_carries_its_header(tmp_path: Path, dtype: str) -> None:
    frame = _frame("cam-1", 42, side=24, dtype=dtype)
    path = write_frame_tiff(frame, tmp_path / "f.tif", saved={"why": "test"})
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        ij = tf.imagej_metadata
        assert ij is not None and ij["unit"] == "micron"
        xres = page.tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1000 / 0.5, rel=1e-6)  # pixels per µm
        data = tf.asarray()
    np.testing.assert_allclose(data, frame.pixels)  # float32 for types ImageJ lacks
    pixels, header, saved = read_frame_tiff(path)
    assert header == frame.header and header.meta == {"detector": "BF", "n": 42}
    assert saved == {"why": "test"}
    assert json.loads(ij["Properties"]["nanoscout_frame"])["seq"] == 42


def test_a_frame_float32_cannot_hold_is_saved_as_the_frame_the_daemon_analysed(
        tmp_path: Path) -> None:
    """uint32 / int32 counts on an offset beyond 2**24 and float64 frames of a tiny range or
    on a large offset were written as plain float32: 2-3 grey levels or one (a flat file, 0
    particles where the daemon had found 38). They are stored as (pixel - offset) / scale now:
    the shipped pipeline finds the same particles in the file, read as ``measure`` reads it,
    as in the frame, and read_frame_tiff gives the frame's own values back."""
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import ServeConfig
    from nanoscout.sim.synthetic import SpecimenConfig, render

    image = render(SpecimenConfig(shape=(256, 256), dose_e_per_px=None, dtype="float32"),
                   3).image.astype(np.float64)
    unit = (image - image.min()) / (image.max() - image.min())
    frames = {"uint32": (np.round(unit * 200) + 2**32 - 300).astype(np.uint32),
              "int32": (np.round(unit * 200) - 2**31 + 5).astype(">i4"),
              "tiny": unit * 1e-300,
              "offset": unit * 10.0 + 1e9}
    pipe = build_pipeline(ServeConfig.model_validate({"classify": {"enabled": False}}),
                          offline=True)
    try:
        for name, pixels in frames.items():
            frame = Frame.from_image(pixels, pixel_size_nm=0.5, source=name)
            live = pipe.process(frame).table
            path = write_frame_tiff(frame, tmp_path / f"{name}.tif")
            record = read_image(path)
            assert record.pixel_size_nm == pytest.approx(0.5)
            saved = pipe.process(Frame.from_image(record.data, pixel_size_nm=0.5,
                                                  source=name)).table
            # the file's pixels differ from the frame's by float32 rounding, which can move
            # the INT8 detector's quantised input by a step: the same particles within that
            assert len(live) > 20 and abs(len(saved) - len(live)) <= 1, (name, len(saved))
            assert np.median(saved["ecd_nm"]) == pytest.approx(np.median(live["ecd_nm"]),
                                                               rel=0.02), name
            back, header, _ = read_frame_tiff(path)
            assert back.dtype == pixels.dtype and header == frame.header
            if pixels.dtype.kind in "iu":
                np.testing.assert_array_equal(back, pixels)
            else:
                span = float(pixels.max() - pixels.min())
                np.testing.assert_allclose(back, pixels, rtol=0, atol=span * 2.0**-23)
    finally:
        pipe.close()


@pytest.mark.parametrize("pixel_size_nm", [0.37, 0.0123, 85.0, 2500.0])
def test_the_project_reader_reads_a_frame_tiff_calibrated(tmp_path: Path,
                                                         pixel_size_nm: float) -> None:
    frame = _frame("cam", 3, side=20, pixel_size_nm=pixel_size_nm)
    record = read_image(write_frame_tiff(frame, tmp_path / "f.tif"))
    assert record.pixel_size_nm == pytest.approx(pixel_size_nm, rel=1e-6)
    np.testing.assert_array_equal(record.data, frame.pixels)


def test_an_uncalibrated_frame_is_written_in_pixels(tmp_path: Path) -> None:
    frame = _frame("cam", 1, pixel_size_nm=None)
    path = write_frame_tiff(frame, tmp_path / "u.tif")
    with tifffile.TiffFile(path) as tf:
        assert tf.imagej_metadata is not None and tf.imagej_metadata["unit"] == "pixel"
    assert read_frame_tiff(path)[1].pixel_size_nm is None


def test_file_names_cannot_leave_the_directory() -> None:
    assert frame_file_name("cam-1", 7) == "cam-1-000000007.tif"
    assert frame_file_name("../../etc/passwd", 1) == "etc_passwd-000000001.tif"
    assert frame_file_name("a:b.c", 2, suffix="big/../rule") == "a_b_c-000000002-big_rule.tif"
    assert frame_file_name("..", 3) == "source-000000003.tif"
    for name in (frame_file_name("../x", 1, "../y"), frame_file_name("/abs", 1)):
        assert "/" not in name and ".." not in name


def _review(tmp_path: Path, **kw: int) -> tuple[FrameReview, list[str]]:
    failures: list[str] = []
    cfg = ReviewConfig(directory=tmp_path / "review", **kw)  # type: ignore[arg-type]
    review = FrameReview(cfg, on_failed=failures.append)
    review.start()
    return review, failures


def test_saving_the_newest_frames_writes_them_and_counts(tmp_path: Path) -> None:
    review, failures = _review(tmp_path, frames=4)
    try:
        for seq in range(6):
            review.offer(_frame("cam..1", seq))
        paths = review.save_latest("cam..1", 2)
        assert [p.name for p in paths] == ["cam_1-000000004.tif", "cam_1-000000005.tif"]
        assert all(p.parent == tmp_path / "review" for p in paths)
        assert read_frame_tiff(paths[1])[1].seq == 5
        again = review.save_latest("cam..1")  # the same frame again: a new name
        assert again[0].name == "cam_1-000000005-2.tif"
        with pytest.raises(SaveRefused, match="no frame of source 'other'"):
            review.save_latest("other")
        assert review.saved == 3 and failures == ["no_frame"]
    finally:
        review.close()


def test_the_disk_budget_refuses_saves_and_deletes_nothing(tmp_path: Path) -> None:
    review, failures = _review(tmp_path, frames=4, max_disk_bytes=30_000)
    try:
        review.offer(_frame("cam", 0, side=64))  # 8 KiB of pixels + overhead
        first = review.save_latest("cam")
        review.offer(_frame("cam", 1, side=64))
        with pytest.raises(SaveRefused, match="max_disk_bytes"):
            review.save_latest("cam")
        assert first[0].is_file() and failures == ["disk_budget"] and review.saved == 1
    finally:
        review.close()


def test_refused_saves_are_counted_each_and_logged_once_a_minute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While the review folder is full, every alert's save is refused: each one was its own
    WARNING line (long-run audit: 252 lines for 256 refusals). Each is still counted and
    answered; the log says it once, with how many it left out."""
    review, failures = _review(tmp_path, frames=4, max_disk_bytes=30_000)
    try:
        review.offer(_frame("cam", 0, side=64))
        review.save_latest("cam")
        caplog.set_level("WARNING", logger="nanoscout.review")
        for seq in range(1, 21):
            review.offer(_frame("cam", seq, side=64))
            with pytest.raises(SaveRefused, match="max_disk_bytes"):
                review.save_latest("cam")
        assert failures == ["disk_budget"] * 20 and review.saved == 1
        lines = [r.getMessage() for r in caplog.records if r.name == "nanoscout.review"]
        assert len(lines) == 1 and "max_disk_bytes" in lines[0], lines
    finally:
        review.close()


def test_deleting_saved_files_frees_the_disk_budget(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory was measured once and then only added to: after an operator deleted the
    saved frames, every save was still refused until the daemon restarted."""
    from nanoscout.daemon import review as review_module

    review, failures = _review(tmp_path, frames=4, max_disk_bytes=30_000)
    try:
        review.offer(_frame("cam", 0, side=64))
        first = review.save_latest("cam")
        review.offer(_frame("cam", 1, side=64))
        with pytest.raises(SaveRefused, match="max_disk_bytes"):
            review.save_latest("cam")
        for path in first[0].parent.glob("*.tif"):
            path.unlink()
        # the next save must see it at once, not after a minute; and even when the deletion
        # left the directory's mtime as it was (a coarse clock), after _RECHECK_S
        second = review.save_latest("cam")
        assert second[0].is_file() and review.saved == 2
        review.offer(_frame("cam", 2, side=64))
        with pytest.raises(SaveRefused, match="max_disk_bytes"):
            review.save_latest("cam")
        st = second[0].parent.stat()
        second[0].unlink()
        os.utime(second[0].parent, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(SaveRefused, match="max_disk_bytes"):  # measured < _RECHECK_S ago
            review.save_latest("cam")
        monkeypatch.setattr(review_module, "_RECHECK_S", 0.0)
        assert review.save_latest("cam")[0].is_file()
        assert failures == ["disk_budget"] * 3 and review.saved == 3
    finally:
        review.close()


def test_files_another_program_adds_count_within_a_minute(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoscout.daemon import review as review_module

    review, _ = _review(tmp_path, frames=4, max_disk_bytes=60_000)
    try:
        review.offer(_frame("cam", 0, side=64))
        directory = review.save_latest("cam")[0].parent
        (directory / "annotation.labels.tif").write_bytes(b"\0" * 40_000)
        review.offer(_frame("cam", 1, side=64))
        assert review.save_latest("cam")  # counted as written: the annotation not seen yet
        monkeypatch.setattr(review_module, "_RESCAN_S", 0.0)
        review.offer(_frame("cam", 2, side=64))
        with pytest.raises(SaveRefused, match=r"holds \d+ bytes"):
            review.save_latest("cam")
    finally:
        review.close()


def test_an_alert_saves_the_frames_before_and_after_it(tmp_path: Path) -> None:
    review, _ = _review(tmp_path, frames=8)
    try:
        for seq in range(5):
            review.offer(_frame("cam", seq))
        fired = _frame("cam", 5)
        review.offer(fired)
        review.on_alert(fired, "big-particle", SaveFrames(before=2, after=2))
        review.offer(_frame("other", 0))  # another source's frames do not count
        review.offer(_frame("cam", 6))
        assert review.saved == 0  # still waiting for its second frame after
        review.offer(_frame("cam", 7))
        review.close()  # the writer finishes its queue
        names = sorted(p.name for p in (tmp_path / "review").iterdir())
        assert names == [f"cam-00000000{s}-big-particle.tif" for s in range(3, 8)]
        _, header, saved = read_frame_tiff(tmp_path / "review" / names[0])
        assert header.seq == 3 and saved["rule"] == "big-particle" and saved["seq"] == 5
    finally:
        review.close()


def test_a_saved_frame_comes_with_the_detectors_instances(tmp_path: Path) -> None:
    one = 16 * 16 * 2
    review, _ = _review(tmp_path, frames=4, max_bytes=4 * one)
    try:
        frame = _frame("cam", 0)
        review.offer(frame)
        labels = np.zeros((16, 16), np.int32)
        labels[2:5, 2:5], labels[8:12, 9:14] = 1, 2
        review.keep_labels(frame, labels)
        assert review.ring.nbytes == 2 * one  # the uint16 map counts in the bytes
        review.keep_labels(_frame("cam", 1), labels)  # a frame not kept: nothing attached
        (path,) = review.save_latest("cam")
        det = path.with_suffix(".detections.tif")
        np.testing.assert_array_equal(tifffile.imread(det), labels)
        for seq in range(1, 4):  # the bytes bound pushes the oldest frame and its map out
            review.offer(_frame("cam", seq))
        assert review.ring.nbytes == 3 * one and review.ring.latest("cam", 9)[0].header.seq == 1
    finally:
        review.close()
