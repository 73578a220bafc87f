"""Real instrument files: replayed to a running daemon, and measured offline."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.clients.subscriber import Subscriber
from tests.system.conftest import DaemonFactory, nanoscout

pytestmark = pytest.mark.system

#: pixel sizes (nm) from ../shared/data/README.md; None = no calibration in the file
EXPECTED_NM = {
    "JEOL_HAADF_nanoparticles.dm4": 1.249,
    "test_STEM_image.dm3": 0.24854,
    "Fei_HAADF_UK_location.dm3": 5.51,
    "test-1.dm3": None,
    "test-1.dm4": None,
    "128x128-TEM_search.emi": 5.26121,
    "example_image.emd": None,
    "HAADFscan.mrc": 5.67913,
    "test_tiff_Zeiss_SEM_512pix.tif": 11.649976,
    "test_tiff_Zeiss_SEM_1k.tif": 2614.514,
    "FEI-Helios-Ebeam-8bits.tif": 3372.4,
    "FEI-Helios-Ebeam-16bits.tif": 3372.4,
    "test_loading_image_saved_with_DM.tif": 168.6747,
    "test_loading_image_saved_with_imageJ.tif": 168.6747,
}


def _instrument_files(root: Path) -> list[Path]:
    base = root / "instrument-files"
    files = [p for p in base.rglob("*") if p.name in EXPECTED_NM]
    assert len(files) == len(EXPECTED_NM), sorted(p.name for p in files)
    return sorted(files)


def test_replayed_instrument_files_keep_their_calibration(
    daemon_factory: DaemonFactory,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    files = _instrument_files(shared_data)
    corrupt = tmp_path / "corrupt.dm3"
    corrupt.write_bytes(files[0].read_bytes()[:300])  # truncated mid-header
    d = daemon_factory("--policy", "lossless")
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready()
        replay = nanoscout("replay", *map(str, files), str(corrupt), "--frames-endpoint", d.input,
                           "--mode", "push", stdout=subprocess.PIPE)
        seen = {}
        for msg in sub.messages(timeout=120):
            seen[msg.header.meta["file"]] = msg.header
            if len(seen) == len(files):
                break
        out, _ = replay.communicate(timeout=60)
    assert replay.returncode == 0
    assert "corrupt.dm3" in out  # reported and skipped
    assert set(seen) == set(EXPECTED_NM)
    for name, expected in EXPECTED_NM.items():
        h = seen[name]
        if expected is None:
            assert h.pixel_size_nm is None and h.units == "px", name
        else:
            assert h.units == "nm", name
            assert h.pixel_size_nm == pytest.approx(expected, rel=1e-3), name


def test_measure_writes_a_run_and_files_fiji_and_napari_open(shared_data: Path,
                                                              tmp_path: Path) -> None:
    """Every instrument file once (TIA .emi + .ser as one), unique names for test-1.dm3 and
    test-1.dm4, a run pandas/report read, label TIFFs tifffile reads with the nm calibration,
    ROI sets roifile reads, overlays, and napari layers with the scale in nm."""
    import pandas as pd
    import roifile
    import tifffile

    from nanoscout.clients.napari_reader import get_reader

    folders = sorted(p for p in (shared_data / "instrument-files").iterdir() if p.is_dir())
    jpg = sorted((shared_data / "stem-dev" / "images").iterdir())[0]
    out = tmp_path / "run.parquet"
    files = tmp_path / "outputs"
    proc = nanoscout("measure", *map(str, folders), str(jpg), "--out", str(out),
                     "--outputs", str(files), stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout

    df = pd.read_parquet(out)  # the run folder is the particle table
    frames = pd.read_parquet(out / "_frames")
    names = sorted(Path(f).name for f in frames["file"])
    assert names == sorted([*EXPECTED_NM, jpg.name])  # each acquisition measured once
    assert (frames["file"].map(lambda f: Path(f).name) == "128x128-TEM_search.emi").sum() == 1
    for name, expected in EXPECTED_NM.items():
        row = frames[frames["file"].map(lambda f, n=name: Path(f).name == n)].iloc[0]
        if expected is None:
            assert row["units"] == "px" and np.isnan(row["pixel_size_nm"]), name
        else:
            assert row["pixel_size_nm"] == pytest.approx(expected, rel=1e-3), name
    # unit-honest: px columns always, nm columns NaN where uncalibrated
    assert len(df) > 10 and (df["ecd_px"] > 0).all()
    assert df.loc[df["units"] == "px", "ecd_nm"].isna().all()
    nm = df[df["units"] == "nm"]
    np.testing.assert_allclose(nm["ecd_nm"], nm["ecd_px"] * nm["pixel_size_nm"], rtol=1e-5)
    assert str(df["t_acq"].dtype) == "datetime64[ns, UTC]"
    assert len(pd.read_parquet(out / "_stats")) == len(frames)

    # one set of outputs per image, names keep the suffix: test-1.dm3 and test-1.dm4 differ
    for stem in ("test-1.dm3", "test-1.dm4", "128x128-TEM_search.emi", jpg.name):
        for ext in (".labels.tif", ".rois.zip", ".overlay.png"):
            assert (files / f"{stem}{ext}").is_file(), stem + ext
    dm4 = files / "JEOL_HAADF_nanoparticles.dm4.labels.tif"
    with tifffile.TiffFile(dm4) as tf:
        assert tf.is_imagej and tf.series[0].axes == "CYX"
        ij = tf.imagej_metadata
        assert ij is not None and ij["unit"] == "nm"
        num, den = tf.pages.first.tags["XResolution"].value
        assert den / num == pytest.approx(1.249, rel=1e-3)  # nm per px
        labels = tf.asarray()[1]
    mine = df[df["file"].str.endswith("JEOL_HAADF_nanoparticles.dm4")]
    assert set(np.unique(labels)) - {0} == set(mine["id"].tolist()) and len(mine) > 0
    rois = roifile.roiread(files / "JEOL_HAADF_nanoparticles.dm4.rois.zip")
    assert isinstance(rois, list)  # a ROI set (.zip) reads as a list
    assert sorted(int(r.name) for r in rois) == sorted(mine["id"].tolist())
    with Image.open(files / "JEOL_HAADF_nanoparticles.dm4.overlay.png") as im:
        assert im.mode == "RGB" and im.size == (labels.shape[1], labels.shape[0])
    layers = get_reader(str(dm4))(str(dm4))  # type: ignore[misc]
    assert [t for _, _, t in layers] == ["image", "labels"]
    assert layers[1][1]["scale"] == pytest.approx((1.249, 1.249), rel=1e-3)
    np.testing.assert_array_equal(layers[1][0], labels)

    report = tmp_path / "report.html"
    proc = nanoscout("report", str(out), "--out", str(report), stdout=subprocess.PIPE)
    rep_out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, rep_out
    html = report.read_text()
    assert "nanoscout-particle-unet" in html and "Kolmogorov-Smirnov" in html


def test_corrupt_file_in_measure_is_skipped_with_a_reason(shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    good = shared_data / "instrument-files" / "dm" / "JEOL_HAADF_nanoparticles.dm4"
    out = tmp_path / "p.parquet"
    proc = nanoscout("measure", str(bad), str(good), "--out", str(out), stdout=subprocess.PIPE)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert "skipped" in stdout and "broken.tif" in stdout
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert set(table.column("file").to_pylist()) == {str(good)}
    prov = json.loads((out / "_run.json").read_text())
    assert [Path(p).name for p, _why in prov["skipped"]] == ["broken.tif"]


def test_a_small_file_declaring_a_huge_image_is_skipped_unread(tmp_path: Path) -> None:
    """A 1.6 MB tiled TIFF of 40000 x 40000 px (1.6 GB decoded) took 22 GB of memory and
    ended the run: now it is skipped on its declared size, in seconds, under a memory cap,
    and the next file is measured."""
    import resource

    import tifffile

    bomb = tmp_path / "bomb.tif"
    tile = np.zeros((1024, 1024), np.uint8)
    tifffile.imwrite(bomb, (tile for _ in range(40 * 40)), shape=(40000, 40000), dtype=np.uint8,
                     tile=(1024, 1024), compression="zlib")
    assert bomb.stat().st_size < 4 << 20
    good = tmp_path / "good.png"
    Image.fromarray(np.full((128, 128), 60, np.uint8)).save(good)

    def cap() -> None:  # far below what decoding the bomb would take
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    out = tmp_path / "run.csv"
    proc = nanoscout("measure", str(bomb), str(good), "--out", str(out), "--no-progress",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=cap)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "Traceback" not in stdout
    assert "40000 x 40000 px is larger than" in stdout and "measured 1 images" in stdout


def test_images_without_metadata_get_the_detector_of_what_they_look_like(
        shared_data: Path, tmp_path: Path) -> None:
    """A HAADF-STEM JPEG (the STEM tuning material) says nothing of its kind: the modality
    model sends it to the STEM detector, and an EMPS TEM figure crop to the general one;
    `--modality` overrides the estimate."""
    import pandas as pd

    from nanoscout.training.realdata import emps_tuning_ids

    jpg = shared_data / "stem-dev" / "images" / "Pt2.jpg"
    png = shared_data / "emps-train" / "images" / f"{emps_tuning_ids(shared_data)[0]}.png"
    models: dict[str, set[str]] = {}
    for key, files, flag in (("haadf", [jpg], []), ("haadf-as-TEM", [jpg], ["--modality", "TEM"]),
                             ("emps", [png], []), ("emps-as-STEM", [png], ["--modality", "STEM"])):
        out = tmp_path / f"{key}.parquet"
        proc = nanoscout("measure", *map(str, files), "--out", str(out), *flag,
                         stdout=subprocess.PIPE)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout
        models[key] = set(pd.read_parquet(out / "_frames")["model"])
    general, stem = (f"{c.name}:{c.version}" for c in (
        ModelCard.load(shipped_model_dir() / f"{n}.json") for n in ("detector", "detector_stem")))
    assert general.startswith("nanoscout-particle-unet:") and "-stem:" in stem
    assert models == {"haadf": {stem}, "haadf-as-TEM": {general}, "emps": {general},
                      "emps-as-STEM": {stem}}


def test_measure_with_a_particle_size_range_takes_its_scale_where_the_estimate_follows_specks(
        shared_data: Path, tmp_path: Path) -> None:
    """EMPS image 43be4d0a2c: 23 annotated particles of ~36 px on a support strewn with ~2000
    bright specks of 3-6 px, which the automatic scale follows (x3). Told that the particles
    are 18-72 nm at 1 nm/px, or 18-72 px without a calibration, `measure` analyses the image
    for 18 px particles (the range's nearest end), the run says so (frames ``size_hint``, the
    report) and fewer specks are counted; without a
    pixel size the range cannot be used, and the image is measured as without one."""
    import pandas as pd

    from nanoscout.training.evaluate import EMPS_SPECKS_IMAGE

    png = shared_data / "emps-train" / "images" / f"{EMPS_SPECKS_IMAGE}.png"
    runs: dict[str, pd.DataFrame] = {}
    for key, flags in (("estimate", ["--pixel-size", "1"]),
                       ("range", ["--pixel-size", "1", "--particle-size-nm", "18", "72"]),
                       ("uncalibrated", ["--particle-size-nm", "18", "72"]),
                       ("px", ["--particle-size-px", "18", "72"])):
        out = tmp_path / f"{key}.parquet"
        proc = nanoscout("measure", str(png), "--out", str(out), "--no-progress", *flags,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout
        runs[key] = pd.read_parquet(out / "_frames")
    est, rng, bare = (runs[k].iloc[0] for k in ("estimate", "range", "uncalibrated"))
    assert (est["size_hint"], rng["size_hint"], bare["size_hint"]) == (
        "", "applied", "uncalibrated")
    auto = ModelCard.load(shipped_model_dir() / "detector.json").working_scale.auto  # type: ignore[union-attr]
    assert auto is not None and auto.factor(18.0) == 1.0  # within the card's keep range
    assert est["working_scale"] > 2.0 and rng["working_scale"] == 1.0
    assert rng["n"] < 0.7 * est["n"]
    assert bare["working_scale"] == est["working_scale"] and bare["n"] == est["n"]
    px = runs["px"].iloc[0]
    assert px["size_hint"] == "applied" and px["units"] == "px" and px["n"] == rng["n"]
    prov = json.loads((tmp_path / "range.parquet" / "_run.json").read_text())
    assert prov["config"]["engine"]["particle_size_nm"] == [18.0, 72.0]
    proc = nanoscout("report", str(tmp_path / "range.parquet"), "--figures", "png",
                     "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    html = (tmp_path / "range_report.html").read_text()
    assert "operator&#x27;s particle size range" in html  # the key, escaped
    assert "was moved into it on 1" in html


def _dots(size: int = 128) -> np.ndarray:
    """A uint8 image of bright disks of 12 px on a dark background."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 40, np.uint8)
    for cy in range(16, size, 32):
        for cx in range(16, size, 32):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 200
    return img


def test_measure_takes_any_pixel_type_path_length_and_file_name(tmp_path: Path) -> None:
    """float16 / int64 / uint64 TIFFs, a path over the 1024 characters a frame header's meta
    string holds, and a Latin-1 file name each ended the batch with a traceback (the good
    files lost); an image whose outputs cannot be written lost the run. All are measured
    now, with every file's full path (as UTF-8 text) in the run."""
    import os

    import pandas as pd
    import tifffile

    dots = _dots()
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(dots).save(folder / "a.png")
    tifffile.imwrite(folder / "f16.tif", dots.astype(np.float16))
    tifffile.imwrite(folder / "i64.tif", dots.astype(np.int64) * 2**40)  # beyond int32
    tifffile.imwrite(folder / "u64.tif", dots.astype(np.uint64))
    Image.fromarray(dots).save(os.fsencode(folder) + b"/lat\xe9in1.png")
    deep = tmp_path.joinpath(*["d" * 200] * 6)  # each name within NAME_MAX, the path not
    deep.mkdir(parents=True)
    long_png = deep / "long.png"
    Image.fromarray(dots).save(long_png)
    assert len(str(long_png)) > 1024
    outputs = tmp_path / "outs"
    (outputs / "a.png.labels.tif").mkdir(parents=True)  # a.png's label TIFF cannot be written
    out = tmp_path / "run.parquet"
    proc = nanoscout("measure", str(folder), str(long_png), "--out", str(out), "--outputs",
                     str(outputs), "--no-progress", stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    assert "Traceback" not in stdout and "measured 6 images" in stdout, stdout
    assert "a.png[0]: outputs not written" in stdout
    frames = pd.read_parquet(out / "_frames")
    assert sorted(frames["file"]) == sorted(
        [str(folder / n) for n in ("a.png", "f16.tif", "i64.tif", "u64.tif", "lat\\xe9in1.png")]
        + [str(long_png)])
    metas = [json.loads(m)["file"] for m in frames["meta"]]
    assert max(len(m) for m in metas) == 1024 and any(m.endswith("long.png") for m in metas)
    assert (frames["n"] > 0).all()
    assert os.path.exists(os.fsencode(outputs) + b"/lat\xe9in1.png.overlay.png")  # its name


def test_measure_refuses_bad_options_before_writing_or_replacing_anything(
        tmp_path: Path) -> None:
    """--pixel-size 0 / nan / inf / 1e9 and --outputs naming a file gave a traceback after the
    run had started (a half-written run, a user's file in the way); an existing RUN.json or
    RUN.classes.csv was silently replaced; --overwrite deleted a user's results.csv."""
    png = tmp_path / "a.png"
    Image.fromarray(_dots()).save(png)
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    mine = {"results.json": '{"my": "config"}\n', "results.classes.csv": "my,own\n1,2\n",
            "run1.classes.csv": "my,own\n1,2\n"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    cases = [(["--pixel-size", v, "--out", str(tmp_path / "ps.parquet")], "pixel_size_nm")
             for v in ("0", "-1", "nan", "inf", "1e9")]
    cases += [(["--outputs", str(afile), "--out", str(tmp_path / "o.parquet")], "is a file"),
              (["--out", str(tmp_path / "results.csv")], "results.json exists"),
              (["--out", str(tmp_path / "run1.parquet")], "run1.classes.csv exists")]
    (tmp_path / "user.csv").write_text("sample,notes\nA,precious\n")
    cases += [(["--out", str(tmp_path / "user.csv"), "--overwrite"], "not a nanoscout run")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, needle in cases:
        proc = nanoscout("measure", str(png), *args, "--no-progress", stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, stdout)
        assert "Traceback" not in stdout and needle in stdout, (args, stdout)
        assert "nanoscout measure: error:" in stdout.splitlines()[-1], stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for name, text in mine.items():
        assert (tmp_path / name).read_text() == text
    assert (tmp_path / "user.csv").read_text() == "sample,notes\nA,precious\n"
