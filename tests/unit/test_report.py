"""``nanoscout.clients.report``: the HTML report of a recorded run, built from real runs on disk."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoscout.clients.report import build_report, group_stats, main
from nanoscout.clients.runfile import RunWriter
from nanoscout.wire.errors import ReaderError
from nanoscout.wire.particles import empty_table
from nanoscout.wire.protocol import AlertHeader, DetHeader, Stage

MEDIAN_NM, SIGMA = 8.0, 0.3
FRAMES, PER_FRAME, BORDER_PER_FRAME = 20, 60, 5
T0_NS = 1_700_000_000_000_000_000
FRAME_NS = 500_000_000  # 0.5 s between frames


def _header(seq: int, n: int, *, source: str = "cam-1", units: str = "nm",
            pixel_size_nm: float | None = 0.5) -> DetHeader:
    t = T0_NS + seq * FRAME_NS
    return DetHeader(source=source, seq=seq, t_acq_ns=t, t_recv_ns=t + 1_000_000,
                     t_done_ns=t + 20_000_000, stage_ms={"engine": 5.0},
                     pixel_size_nm=pixel_size_nm, units=units, n=n, engine="onnx-cpu",
                     model="unet-v2", shape=(512, 768), modality="TEM",
                     stage=Stage(x_um=1.0, y_um=2.0), working_scale=0.5,
                     base_network_only=seq % 5 == 0,  # 4 of 20 went to the base network
                     # v1.8: 10 frames named a particle size range; it replaced 3 estimates
                     size_hint=None if seq >= 10 else "applied" if seq < 3 else "agreed",
                     # v1.9: noise measured on frames 5..19, the last 4 smoothed
                     noise=None if seq < 5 else 0.1 if seq >= 16 else 0.02,
                     smoothing_px=None if seq < 5 else 1.6 if seq >= 16 else 0.0,
                     # v1.10: 18 frames estimated, 3 of them without agreeing passes
                     scale_agreed=None if seq < 2 else seq not in (4, 9, 13))


def _table(rng: np.random.Generator, n_inner: int, n_border: int) -> np.ndarray:
    t = empty_table(n_inner + n_border)
    t["id"] = np.arange(1, len(t) + 1)
    t["ecd_nm"][:n_inner] = rng.lognormal(np.log(MEDIAN_NM), SIGMA, n_inner)
    # border particles are huge: any leak into the statistics moves D50 and the fit far away
    t["ecd_nm"][n_inner:] = 500.0
    t["border"][n_inner:] = True
    t["area_nm2"] = np.pi * (t["ecd_nm"] / 2) ** 2
    t["aspect_ratio"] = 1.0 + rng.exponential(0.2, len(t))
    t["roundness"] = 1.0 / t["aspect_ratio"]
    return t


def _write_run(out: Path, *, explanation: str = "D50 <b>jumped</b> & stayed") -> np.ndarray:
    """A 20-frame run flushed in 2 batches with one alert; returns the non-border ECDs."""
    rng = np.random.default_rng(7)
    w = RunWriter(out, {"format": "nanoscout-run/1", "note": "<script>x</script>"})
    inner = []
    for seq in range(FRAMES):
        t = _table(rng, PER_FRAME, BORDER_PER_FRAME)
        inner.append(t["ecd_nm"][~t["border"]])
        w.add_det(_header(seq, len(t)), t)
        if seq == FRAMES // 2 - 1:
            w.flush()
    w.add_alert(AlertHeader(source="cam-1", seq=12, t_acq_ns=T0_NS + 12 * FRAME_NS,
                            rule="d50-jump", kind="drift", severity="warning", value=9.5,
                            threshold=9.0, explanation=explanation))
    w.close()
    return np.concatenate(inner).astype(np.float64)


def _cell(text: str, cls: str) -> list[tuple[float, float, float]]:
    pat = rf'class="{cls}">([\d.]+) <span class="ci">\[([\d.]+), ([\d.]+)\]</span>'
    return [(float(a), float(b), float(c)) for a, b, c in re.findall(pat, text)]


@pytest.mark.parametrize("name", ["r.parquet", "r.csv"])
def test_report_of_a_recorded_run(tmp_path: Path, name: str) -> None:
    ecd = _write_run(tmp_path / name)
    out = build_report(tmp_path / name, tmp_path / "rep.html")
    assert out == tmp_path / "rep.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text

    # every figure referenced exists beside the report and is a real PNG
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 3
    for src in srcs:
        assert src.startswith("rep_files/")
        png = tmp_path / src
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    # border particles are excluded from N and counted separately
    assert re.findall(r'class="n">(\d+)<', text) == [str(FRAMES * PER_FRAME)]
    assert re.findall(r'class="n-border">(\d+)<', text) == [str(FRAMES * BORDER_PER_FRAME)]
    assert re.findall(r'class="n-frames">(\d+)<', text) == [str(FRAMES)]
    assert re.findall(r'class="per-frame">([\d.]+)<', text) == [f"{PER_FRAME:.2f}"]  # 4 significant digits

    # the lognormal fit recovers the true median, and matches the MLE on the non-border ECDs
    medians = [float(m) for m in re.findall(r'class="lognormal-median">([\d.]+)<', text)]
    sigmas = [float(s) for s in re.findall(r'class="lognormal-sigma">([\d.]+)<', text)]
    assert len(medians) == 1 and abs(medians[0] - MEDIAN_NM) / MEDIAN_NM < 0.10
    assert medians[0] == pytest.approx(np.exp(np.log(ecd).mean()), rel=1e-3)
    assert sigmas[0] == pytest.approx(SIGMA, abs=0.03)

    # D50 lies inside its bootstrap interval, which is narrow and around the sample median
    ((d50, lo, hi),) = _cell(text, "d50")
    assert d50 == pytest.approx(float(np.median(ecd)), rel=1e-3)
    assert lo <= d50 <= hi and lo < hi and (hi - lo) / d50 < 0.1
    ((d10, _, _),) = _cell(text, "d10")
    ((d90, _, _),) = _cell(text, "d90")
    assert d10 < d50 < d90 < 50  # a border particle (500 nm) would show in D90

    # data strings are escaped, provenance included
    assert "D50 &lt;b&gt;jumped&lt;/b&gt; &amp; stayed" in text
    assert "<b>jumped" not in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text
    assert "unet-v2" in text and "onnx-cpu" in text and "512 × 768" in text
    assert "0.5000 nm/px" in text and "9.500 s" in text  # 20 frames 0.5 s apart
    assert "frames analysed by an adapted model" in text  # protocol 1.7's base_network_only
    assert f"4 of {FRAMES} (their particles lie outside" in text
    assert (f"named by 10 of {FRAMES} frames: the estimate lay in it on 7, was moved into it "
            "on 3; not used on 0") in text
    assert (f"noise measured on 15 of {FRAMES} frames (white noise 0.0200 – 0.100 of the "
            "normalised range); 4 smoothed before the network, Gaussian 1.60 – 1.60 px") in text
    assert ("two estimation passes agreed on 15 of 18 estimated frames; on 3 none did and the "
            "model's fallback chose it") in text


def test_empty_run_says_so(tmp_path: Path) -> None:
    run = tmp_path / "empty.parquet"
    RunWriter(run, {"format": "nanoscout-run/1"}).close()
    text = build_report(run, tmp_path / "e.html").read_text(encoding="utf-8")
    assert "This run contains no particles" in text
    assert "<img" not in text and "No alerts were recorded." in text


def test_frames_without_particles_say_so(tmp_path: Path) -> None:
    run = tmp_path / "blank.csv"
    w = RunWriter(run, {})
    for seq in range(3):
        w.add_det(_header(seq, 0), empty_table(0))
    w.close()
    text = build_report(run, tmp_path / "b.html").read_text(encoding="utf-8")
    assert "This run contains no particles" in text and "<img" not in text
    assert "unet-v2" in text  # frames still described
    assert "low-dose smoothing" not in text  # no frame's noise was measured
    # frames 0 and 1 had nothing estimated, frame 2's passes agreed
    assert "two estimation passes agreed on 1 of 1 estimated frames; on 0 none did" in text


def test_nm_and_px_are_not_pooled(tmp_path: Path) -> None:
    run = tmp_path / "mixed.parquet"
    rng = np.random.default_rng(1)
    w = RunWriter(run, {})
    for seq in range(4):
        w.add_det(_header(seq, 30), _table(rng, 30, 0))
        # the same particles measured on an uncalibrated camera: 2 px per nm
        t = _table(rng, 20, 0)
        t["ecd_nm"] *= 2
        w.add_det(_header(seq, 20, source="cam-2", units="px", pixel_size_nm=None), t)
    w.close()
    text = build_report(run, tmp_path / "m.html").read_text(encoding="utf-8")
    assert re.findall(r'class="units">(\w+)<', text) == ["nm", "px"]
    assert re.findall(r'class="n">(\d+)<', text) == ["120", "80"]
    (nm, _, _), (px, _, _) = _cell(text, "d50")
    assert 6 < nm < 10 and 12 < px < 20
    assert "uncalibrated (px)" in text
    assert len(re.findall(r'<img src="m_files/g\d_\w+\.png"', text)) == 6


def test_group_stats_border_free_numbers() -> None:
    d = np.array([1.0, 2.0, 3.0, 4.0, np.nan, -1.0, 0.0])
    st = group_stats("s", "nm", d)
    assert st.n == 4 and st.mean == pytest.approx(2.5) and st.d50 == pytest.approx(2.5)
    assert st.lognormal_median == pytest.approx(24 ** 0.25)
    assert st.ci["mean"][0] < 2.5 < st.ci["mean"][1]
    one = group_stats("s", "nm", np.array([5.0]))
    assert one.n == 1 and np.isnan(one.ci["d50"][0]) and np.isnan(one.sd)


def test_cli_default_out_and_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run.csv")
    assert main([str(tmp_path / "run.csv")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run_report.html")
    assert (tmp_path / "run_report.html").is_file()
    assert main([str(tmp_path / "missing.parquet")]) == 2
    assert "missing" in capsys.readouterr().err


def test_an_out_that_is_a_folder_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Once an IsADirectoryError traceback that left ``DIR.tmp`` and ``DIR_files/`` behind."""
    _write_run(tmp_path / "run.csv")
    folder = tmp_path / "reports"
    folder.mkdir()
    before = sorted(tmp_path.iterdir())
    assert main([str(tmp_path / "run.csv"), "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoscout report: error: --out ") and "is a folder" in err, err
    assert sorted(tmp_path.iterdir()) == before and not any(folder.iterdir())


def test_a_foreign_parquet_among_the_frames_parts_is_named(tmp_path: Path) -> None:
    """Its rows read as nulls: once ``ValueError: cannot convert float NaN to integer``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "r.parquet"
    _write_run(run)
    foreign = run / "_frames" / "part-999999.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), foreign)
    with pytest.raises(ReaderError, match=f"{foreign}: 3 of {FRAMES + 3} frames rows have no "
                                          "acquisition time"):
        build_report(run, tmp_path / "rep.html")
    assert not (tmp_path / "rep.html").exists()


def test_methods_fit_quality_and_vector_figures(tmp_path: Path) -> None:
    from xml.etree import ElementTree

    from nanoscout.clients.provenance import load_cards, model_entries
    from nanoscout.clients.report import FIGURE_DPI, fit_quality
    from tests.conftest import REPO

    cards = load_cards(REPO / "models" / "weights")
    rng = np.random.default_rng(7)
    w = RunWriter(tmp_path / "r.parquet", {
        "software": {"nanoscout": "9.9.9", "python": "3.11.7"},
        "model_provenance": model_entries(["nanoscout-particle-unet:3.0.0"], cards)})
    for seq in range(FRAMES):
        w.add_det(_header(seq, PER_FRAME + BORDER_PER_FRAME),
                  _table(rng, PER_FRAME, BORDER_PER_FRAME))
    w.close()
    out = build_report(tmp_path / "r.parquet", tmp_path / "rep.html")
    text = out.read_text(encoding="utf-8")
    methods = re.search(r'<p class="methods">(.*?)</p>', text, re.DOTALL).group(1)  # type: ignore[union-attr]
    assert "nanoscout 9.9.9" in methods and "nanoscout-particle-unet version 3.0.0" in methods
    card = cards["nanoscout-particle-unet:3.0.0"]
    assert card["sha256"][:12] in methods
    assert "3.6 % on held-out synthetic frames" in methods  # the card's sizing error
    sizing = card["sizing_error"]  # the card's held-out EMPS numbers (3.14 %, D50 3.91 %)
    assert f"{sizing['emps_median_abs_ecd_error_pct']:.1f} % on the EMPS validation images" \
        in methods and f"D50 error {sizing['emps_d50_error_pct']:.1f} %" in methods
    assert f"{FRAMES * BORDER_PER_FRAME} particles touching the frame edge" in methods
    # goodness of fit, shown with both tests' statistics and p-values
    ks_p = float(re.search(r'class="ks-pvalue">([\d.]+)<', text).group(1))  # type: ignore[union-attr]
    ad_p = float(re.search(r'class="ad-pvalue">([\d.]+)<', text).group(1))  # type: ignore[union-attr]
    assert 0 < ks_p <= 1 and 0 < ad_p <= 1 and "Goodness of fit on 1200 diameters" in text
    # lognormal samples pass at the 5 % level (a true model fails 5 % of the time by design:
    # 10 samples, at least 8 pass), a bimodal mixture is rejected, tiny samples are not tested
    passed = 0
    for seed in range(10):
        q = fit_quality(np.random.default_rng(seed).lognormal(np.log(8), 0.3, 1200))
        passed += q is not None and min(q.ks_pvalue, q.ad_pvalue) > 0.05
    assert passed >= 8, passed
    bimodal = np.concatenate([rng.lognormal(np.log(5), 0.1, 600), rng.lognormal(np.log(20), 0.1, 600)])
    fq = fit_quality(bimodal)
    assert fq is not None and fq.ks_pvalue < 0.01 and fq.ad_pvalue < 0.01 and fq.n == 1200
    assert fit_quality(np.array([1.0, 2.0, 3.0])) is None
    # figures: 300 dpi PNG shown, SVG and PDF linked beside each
    files = tmp_path / "rep_files"
    for stem in ("g0_ecd", "g0_shape", "g0_time"):
        with Image.open(files / f"{stem}.png") as im:
            assert round(im.info["dpi"][0]) == FIGURE_DPI and im.size[0] >= 1900
        assert ElementTree.parse(files / f"{stem}.svg").getroot().tag.endswith("svg")
        assert (files / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        assert f'href="rep_files/{stem}.svg"' in text and f'href="rep_files/{stem}.pdf"' in text


def test_a_recording_cut_short_says_so(tmp_path: Path) -> None:
    """A recorder killed mid-run leaves no stopped_utc: the report showed nothing of it."""
    for name, extra, want in (
            ("cut.parquet", {}, "not stopped cleanly"),
            ("clean.parquet", {"stopped_utc": "2026-12-07T08:00:00Z"},
             "stopped cleanly at 2026-12-07T08:00:00Z")):
        w = RunWriter(tmp_path / name, {"subscribed_utc": "2026-12-07T07:59:00Z",
                                        "missed_results": {"cam-1": 2},
                                        "missed_results_total": 2, "rejected_messages": 1,
                                        **extra})
        w.add_det(_header(0, 0), empty_table(0))
        w.flush()
        text = build_report(tmp_path / name, tmp_path / f"{name}.html").read_text()
        assert want in text and "2 missed" in text and "1 refused" in text
        assert ("not stopped cleanly" in text) == (name == "cut.parquet")
    # a run that is no recording (measure) has no such rows
    _write_run(tmp_path / "m.parquet")
    assert "stopped cleanly" not in build_report(tmp_path / "m.parquet",
                                                  tmp_path / "m.html").read_text()


@pytest.mark.parametrize("name", ["r.parquet", "r.csv"])
def test_tracks_of_two_daemon_runs_are_never_joined(tmp_path: Path, name: str) -> None:
    """A recording across a daemon restart: both daemon processes numbered their tracks from 1
    and the adapter its frames from 0. The tracks table and the report once took the two runs'
    track 1 for one particle (10 observations, a growth rate mixing both); each
    ``(daemon_run, track_id)`` is now its own track, and the report says how many runs."""
    from nanoscout.clients.runfile import read_run

    runs = (T0_NS, T0_NS + 60 * 10**9)  # the daemons' start times: a minute apart
    growth = {runs[0]: 0.2, runs[1]: -0.1}  # nm/s: the first run's particles grow, the others shrink
    w = RunWriter(tmp_path / name, {"subscribed_utc": "x"})
    for run in runs:
        for seq in range(5):
            t_ns = run + 10**9 + seq * FRAME_NS
            table = empty_table(3)
            table["id"] = table["track_id"] = [1, 2, 3]
            table["x"], table["y"] = [50.0, 150.0, 250.0], [60.0, 60.0, 60.0]
            table["ecd_nm"] = 10.0 + np.array([0.0, 2.0, 4.0]) + growth[run] * seq * FRAME_NS / 1e9
            table["area_nm2"] = np.pi * (table["ecd_nm"] / 2) ** 2
            w.add_det(DetHeader(source="cam-1", seq=seq, t_acq_ns=t_ns, t_recv_ns=t_ns + 1,
                                t_done_ns=t_ns + 2, pixel_size_nm=0.5, units="nm", n=3,
                                engine="onnx-cpu", model="unet-v2", daemon_run=run), table)
    w.close()
    tr = read_run(tmp_path / name).tracks
    assert tr["n_frames"].tolist() == [5] * 6  # joined: three tracks of 10 observations
    assert sorted(zip(tr["daemon_run"].tolist(), tr["track_id"].tolist(), strict=True)) == [
        (r, i) for r in runs for i in (1, 2, 3)]
    for run, rate in growth.items():
        mine = tr["daemon_run"] == run
        assert np.allclose(tr["growth_per_s"][mine], rate)
        assert (tr["t_first_ns"][mine] > run).all() and (tr["t_last_ns"][mine] < run + 10**10).all()

    text = build_report(tmp_path / name, tmp_path / "rep.html", formats=("png",)).read_text()
    assert '<span class="n-daemon-runs">2</span> daemon runs' in text
    assert '<span class="n-tracks">6</span> tracks from <span class="n-track-runs">2</span>' in text
    # six particles, each counted once; 30 detections
    assert re.findall(r'class="n">(\d+)<', text) == ["6", "30"]
