"""In-situ dynamics benchmark: drift, tracking, growth, coalescence, unique statistics, cost.

Usage::

    python benchmarks/insitu.py --out benchmarks/results/insitu.json
    python benchmarks/insitu.py --frames 12 --size 512 --out /tmp/insitu.json   # quick look

Simulated E-TEM series (:class:`nanoscout.sim.insitu.InSituSeries`, exact truth: identities,
drift, coalescences) go through the daemon's own pipeline in this process
(:func:`nanoscout.daemon.app.build_pipeline` with the shipped detector on ONNX Runtime CPU,
tracking on, as ``nanoscout serve`` builds it), one frame at a time. Two drift speeds: the
field drifts 5 % of its width in 2 frames and in 5 frames. Scored against the truth:

* ``idf1`` / ``mota`` (py-motmetrics): truth particles (ids, centroids) against the
  published ``track_id`` rows, matched within half the median particle diameter;
* ``drift_error_px``: |published frame-to-frame shift - true shift| (max and rms over frames);
* ``growth_rate``: every particle grows at the same true rate (uniform growth), so the error
  is that of the median of the tracks' fitted dECD/dt (``stats.insitu.growth_rate_d50``) and,
  per track, the median relative error of tracks of at least 10 sized observations;
* ``coalescence``: a true merge whose product lies inside the field counts as found when the
  tracker published a merge within ``--event-frames`` frames and half a diameter (+3 px) of
  it (positions compared on the specimen, through the true drift); precision likewise. A
  merge is published once the absorbed track has stayed away for the gap allowance, so
  merges of the last ``max_gap_frames + 1`` frames are not scored (not yet decidable);
* ``static``: one specimen imaged 50 times (new shot noise, no drift, no dynamics) against one
  frame of it: the unique statistics' N, D50 and its 95 % interval must agree. The detector
  itself finds a few particles more or fewer on each exposure, so N passes when it lies
  within the range of the 50 single frames' N, and the D50 interval's ends within 1 %;
* ``cost``: per frame, drift + tracking (+ the unique statistics) against the engine time and
  the whole detection, medians over all scored frames of the 1024² runs, measured in this run;
* ``real_frames``: identity stability on real in-situ TEM frames (``../shared/data/
  msa-tem-train``, 20 BF-TEM frames of particles sintering at 800 °C, from different moments:
  not a sequence): each frame becomes a 30-frame pseudo-video (a random-walk drift of 1.5 px
  rms per frame, sub-pixel, and new noise), analysed by the real detector; no identity
  explosion means unique particles close to the per-frame count (skipped without the data).

It writes the numbers, the targets and pass/fail, the machine and the exact command to
``--out``. What it cannot check: real in-situ video (no labelled one exists here).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nanoscout.analysis.frame import Frame  # noqa: E402
from nanoscout.analysis.pipeline import Pipeline  # noqa: E402
from nanoscout.daemon.app import build_pipeline  # noqa: E402
from nanoscout.daemon.config import load_config  # noqa: E402
from nanoscout.sim.insitu import InSituSeries  # noqa: E402
from nanoscout.sim.synthetic import Specimen, SpecimenConfig  # noqa: E402
from nanoscout.wire.protocol import DetHeader, StatsHeader  # noqa: E402

TARGETS = {"idf1": 0.90, "growth_rate_rel_error": 0.10, "coalescence_recall": 0.90,
           "drift_error_px": 0.5, "cost_ratio_engine": 0.10}
PIXEL_SIZE_NM = 0.5
GROWTH_NM_PER_FRAME = 0.03  # radius: dECD/dt = 0.06 nm per frame
FRAME_S = 1.0


def _pipeline(threads: int) -> Pipeline:
    cfg = load_config(overrides={"engine.threads": threads, "classify.enabled": False,
                                 "preview.enabled": False})
    return build_pipeline(cfg)


def _run_series(pipe: Pipeline, frames: list[Any], source: str) -> list[tuple[Any, Any, Any]]:
    out = []
    for k, f in enumerate(frames):
        fr = Frame.from_image(f.image, pixel_size_nm=PIXEL_SIZE_NM, source=source, seq=k,
                              modality="TEM", t_acq_ns=int(1e12 + f.t_s * 1e9))
        res = pipe.process(fr)
        det = res.det
        stats = res.messages[-1].header
        assert isinstance(stats, StatsHeader)
        out.append((det, res.table.copy(), stats))
    return out


def _mot(frames: list[Any], results: list[tuple[Any, Any, Any]], max_d_px: float
         ) -> dict[str, Any]:
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    for f, (_det, table, _st) in zip(frames, results, strict=True):
        gt = f.truth
        gxy = np.stack([gt["x"], gt["y"]], 1).astype(np.float64)
        hxy = np.stack([table["x"], table["y"]], 1).astype(np.float64)
        d = mm.distances.norm2squared_matrix(gxy, hxy, max_d2=max_d_px**2)
        acc.update(gt["id"].tolist(), table["track_id"].astype(np.int64).tolist(), d)
    mh = mm.metrics.create()
    summ = mh.compute(acc, metrics=["idf1", "idp", "idr", "mota", "num_switches",
                                    "num_fragmentations", "num_unique_objects",
                                    "num_false_positives", "num_misses"], name="s")
    row = summ.loc["s"]
    return {k: (float(row[k]) if "num" not in k else int(row[k])) for k in summ.columns}


def _drift(frames: list[Any], results: list[tuple[Any, Any, Any]]) -> dict[str, Any]:
    errs = []
    for k in range(1, len(frames)):
        det: DetHeader = results[k][0]
        assert det.drift is not None
        true_dy = frames[k].shift_px[0] - frames[k - 1].shift_px[0]
        true_dx = frames[k].shift_px[1] - frames[k - 1].shift_px[1]
        errs.append(math.hypot(det.drift.dx_px - true_dx, det.drift.dy_px - true_dy))
    last: DetHeader = results[-1][0]
    assert last.drift is not None
    cum = math.hypot(last.drift.x_px - frames[-1].shift_px[1],
                     last.drift.y_px - frames[-1].shift_px[0])
    e = np.asarray(errs)
    return {"frame_to_frame_max_px": float(e.max()), "frame_to_frame_rms_px": float(
        np.sqrt((e**2).mean())), "cumulative_after_last_frame_px": cum,
        "new_fields": int(sum(r[0].drift.new_field for r in results[1:]))}


def _coalescence(frames: list[Any], results: list[tuple[Any, Any, Any]], diam_px: float,
                 window: int, max_gap: int) -> dict[str, Any]:
    h, w = frames[0].image.shape
    last = len(frames) - max_gap - 1  # merges from here on are not decided yet
    truth = []  # (frame, x_spec, y_spec)
    for f in frames[:last]:
        for e in f.events:
            if e.kind != "merge":
                continue
            # only products inside the field (a tracker cannot see the others)
            if not (diam_px <= e.x < w - diam_px and diam_px <= e.y < h - diam_px):
                continue
            truth.append((f.index, e.x - f.shift_px[1], e.y - f.shift_px[0]))
    found = []
    for k, (det, _t, _s) in enumerate(results):
        assert det.tracking is not None
        for e in det.tracking.events:
            if e.kind == "merge" and (e.seq is None or e.seq < last):
                # published on frame k, happened on frame e.seq
                found.append((k if e.seq is None else int(e.seq),
                              e.x - frames[k].shift_px[1], e.y - frames[k].shift_px[0]))
    reach = 0.5 * diam_px + 3.0
    used: set[int] = set()
    hit = 0
    for ft, xt, yt in truth:
        for j, (fk, xk, yk) in enumerate(found):
            if j in used or abs(fk - ft) > window or math.hypot(xk - xt, yk - yt) > reach:
                continue
            used.add(j)
            hit += 1
            break
    return {"true_in_field": len(truth), "found": hit, "published": len(found),
            "recall": hit / len(truth) if truth else None,
            "precision": len(used) / len(found) if found else None}


def _growth(pipe: Pipeline, source: str, frames: list[Any], results: list[tuple[Any, Any, Any]]
            ) -> dict[str, Any]:
    true_rate = 2.0 * GROWTH_NM_PER_FRAME / FRAME_S  # nm/s of the ECD
    st: StatsHeader = results[-1][2]
    assert st.insitu is not None
    med = st.insitu.growth_rate_d50
    tracker = pipe._sources[source].tracker  # the benchmark looks inside
    assert tracker is not None
    _ids, rates, _se = tracker.growth_rates("nm")
    reg = tracker._reg
    k = _ids - reg.base
    long = reg.n_sized[k] >= 10
    rel = np.abs(rates[long] - true_rate) / true_rate
    return {"true_nm_per_s": true_rate, "median_of_tracks_nm_per_s": med,
            "rel_error_of_median": None if med is None else abs(med - true_rate) / true_rate,
            "tracks_scored": int(long.sum()),
            "per_track_median_rel_error": float(np.median(rel)) if rel.size else None,
            "per_track_p90_rel_error": float(np.quantile(rel, 0.9)) if rel.size else None,
            "lsw": None if st.insitu.lsw is None else st.insitu.lsw.model_dump()}


def _cost(results: list[tuple[Any, Any, Any]]) -> dict[str, Any]:
    eng, det_ms, track, unique = [], [], [], []
    for det, _t, st in results[1:]:
        s = det.stage_ms
        eng.append(s.get("engine", math.nan))
        det_ms.append(sum(s.get(k, 0.0) for k in ("preprocess", "engine", "postprocess",
                                                   "measure")))
        track.append(s.get("drift", 0.0) + s.get("track", 0.0))
        unique.append(st.stage_ms.get("unique", 0.0))
    e, d, t, u = (float(np.median(x)) for x in (eng, det_ms, track, unique))
    return {"engine_ms_p50": e, "detection_ms_p50": d, "drift_plus_track_ms_p50": t,
            "unique_stats_ms_p50": u, "ratio_to_engine": t / e,
            "ratio_to_engine_with_unique_stats": (t + u) / e, "ratio_to_detection": t / d}


def scenario(name: str, frames_per_5pct: float, n: int, size: int, seed: int, threads: int,
             window: int) -> tuple[dict[str, Any], list[tuple[Any, Any, Any]]]:
    """One drifting, growing, coalescing series through the pipeline, scored."""
    step = 0.05 * size / frames_per_5pct
    th = math.radians(30.0 + 70.0 * seed)
    cfg = SpecimenConfig(shape=(size, size), pixel_size_nm=PIXEL_SIZE_NM,
                         drift_px_per_frame=(step * math.sin(th), step * math.cos(th)),
                         agglomerate_fraction=0.15, coverage=0.12)
    series = InSituSeries(cfg, seed, n_frames=n, growth="uniform",
                          growth_nm_per_frame=GROWTH_NM_PER_FRAME,
                          diffusion_nm_per_frame=0.15, directed_fraction=0.1,
                          directed_nm_per_frame=0.3, appear_per_frame=1.0,
                          drift_jitter_px=0.5, frame_interval_s=FRAME_S)
    t0 = time.perf_counter()
    frames = list(series)
    render_s = time.perf_counter() - t0
    pipe = _pipeline(threads)
    t0 = time.perf_counter()
    results = _run_series(pipe, frames, name)
    run_s = time.perf_counter() - t0
    diam_px = float(np.median(frames[0].truth["ecd_nm"])) / PIXEL_SIZE_NM
    out = {"frames_per_5pct_drift": frames_per_5pct, "drift_px_per_frame": round(step, 3),
           "frames": n, "size": size, "seed": seed, "render_s": round(render_s, 1),
           "pipeline_s": round(run_s, 1),
           "particles_per_frame_p50": float(np.median([len(r[1]) for r in results])),
           "truth_particles_per_frame_p50": float(np.median([len(f.truth) for f in frames])),
           "mot": _mot(frames, results, 0.5 * diam_px),
           "drift": _drift(frames, results),
           "growth": _growth(pipe, name, frames, results),
           "coalescence": _coalescence(frames, results, diam_px, window,
                                       pipe.tracking.max_gap_frames if pipe.tracking else 0),
           "cost": _cost(results)}
    unique = results[-1][2].unique
    last: dict[str, Any] | None = None if unique is None else unique.model_dump()
    out["unique_last"] = None if last is None else {
        k: last[k] for k in ("count", "tracks_total", "fields", "ecd", "ecd_d50_ci")}
    pipe.close()
    return out, results


def static_field(size: int, n: int, seed: int, threads: int) -> dict[str, Any]:
    """A static specimen imaged ``n`` times against one frame of it."""
    cfg = SpecimenConfig(shape=(size, size), pixel_size_nm=PIXEL_SIZE_NM)
    spec = Specimen.generate(cfg, seed)
    rng = np.random.default_rng(seed)
    images = [spec.acquire(rng).image for _ in range(n)]
    single_n: list[int] = []

    def run(imgs: list[np.ndarray]) -> StatsHeader:
        pipe = _pipeline(threads)
        st = None
        for k, img in enumerate(imgs):
            res = pipe.process(Frame.from_image(img, pixel_size_nm=PIXEL_SIZE_NM,
                                                source="static", seq=k, t_acq_ns=k * 10**9))
            st = res.messages[-1].header
            if len(imgs) > 1:
                single_n.append(int(np.count_nonzero(~res.table["border"])))
        pipe.close()
        assert isinstance(st, StatsHeader)
        return st

    one, many = run(images[:1]), run(images)
    assert one.unique is not None and many.unique is not None

    def block(st: StatsHeader) -> dict[str, Any]:
        u = st.unique
        assert u is not None
        return {"unique_count": u.count, "unique_d50": u.ecd.d50, "unique_d50_ci": u.ecd_d50_ci,
                "unique_mean_ci": u.ecd_mean_ci, "tracks_total": u.tracks_total,
                "per_frame_cumulative_count": st.cumulative.count,
                "per_frame_cumulative_d50": st.cumulative.ecd.d50}

    a, b = block(one), block(many)
    n_rel = abs(b["unique_count"] - a["unique_count"]) / max(a["unique_count"], 1)
    d50_rel = abs(b["unique_d50"] - a["unique_d50"]) / a["unique_d50"]
    ci_w = (a["unique_d50_ci"][1] - a["unique_d50_ci"][0], b["unique_d50_ci"][1]
            - b["unique_d50_ci"][0])
    ends = max(abs(b["unique_d50_ci"][i] - a["unique_d50_ci"][i]) / a["unique_d50_ci"][i]
               for i in (0, 1))
    return {"frames": n, "one_frame": a, "all_frames": b, "count_rel_diff": n_rel,
            "single_frame_count_range": (min(single_n), max(single_n)),
            "count_within_single_frame_range": min(single_n) <= b["unique_count"]
            <= max(single_n),
            "d50_rel_diff": d50_rel, "d50_ci_width_one_vs_all": ci_w,
            "d50_ci_width_rel_diff": abs(ci_w[1] - ci_w[0]) / ci_w[0],
            "d50_ci_ends_max_rel_diff": ends,
            "per_frame_cumulative_count_all_frames": b["per_frame_cumulative_count"]}


def real_frames(n_frames: int, threads: int) -> dict[str, Any] | None:
    """Identity stability on real frames made into pseudo-videos (see the module docstring)."""
    from PIL import Image
    from scipy import ndimage as ndi

    folder = REPO.parent / "shared" / "data" / "msa-tem-train" / "images"
    files = sorted(folder.glob("image_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        return None
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    pipe = _pipeline(threads)
    for path in files:
        img = np.asarray(Image.open(path).convert("L")).astype(np.float32)
        drift = np.zeros(2)
        counts, totals = [], []
        st = None
        for t in range(n_frames):
            drift += rng.normal(0.0, 1.5, 2)
            fr = ndi.shift(img, drift, order=1, mode="reflect") \
                + rng.normal(0.0, 0.05 * float(img.std()), img.shape)
            res = pipe.process(Frame.from_image(np.clip(fr, 0, 255).astype(np.uint8),
                                                pixel_size_nm=None, source=path.stem, seq=t,
                                                t_acq_ns=t * 10**9))
            counts.append(int(np.count_nonzero(~res.table["border"])))
            totals.append(len(res.table))
            st = res.messages[-1].header
        assert isinstance(st, StatsHeader) and st.unique is not None
        rows.append({"image": path.name, "per_frame_non_border_p50": float(np.median(counts)),
                     "per_frame_all_max": max(totals), "unique": st.unique.count,
                     "tracks_total": st.unique.tracks_total, "fields": st.unique.fields,
                     "per_frame_cumulative_count": st.cumulative.count})
    pipe.close()
    uniq = sum(r["unique"] for r in rows)
    per = sum(r["per_frame_non_border_p50"] for r in rows)
    tracks = sum(r["tracks_total"] for r in rows)
    allmax = sum(r["per_frame_all_max"] for r in rows)
    return {"frames_per_video": n_frames, "videos": len(rows),
            "unique_over_per_frame": uniq / per if per else None,
            "tracks_over_max_detections": tracks / allmax if allmax else None,
            "new_fields": sum(r["fields"] - 1 for r in rows), "per_video": rows}


def _machine() -> dict[str, Any]:
    import onnxruntime

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "git_commit": commit, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write the JSON to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/insitu.json"))
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--static-frames", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--event-frames", type=int, default=3,
                    help="frames a published merge may lie from the true one")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "nanoscout in-situ dynamics (drift, tracking, growth, coalescence, "
                     "unique statistics, live cost)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(), "targets": TARGETS,
        "config": {"frames": args.frames, "size": args.size, "pixel_size_nm": PIXEL_SIZE_NM,
                   "growth_nm_per_frame_radius": GROWTH_NM_PER_FRAME,
                   "frame_interval_s": FRAME_S, "event_frames": args.event_frames,
                   "detector": "shipped, onnxruntime-cpu", "threads": args.threads},
        "scenarios": {}}
    for i, (name, per) in enumerate((("drift_5pct_in_2_frames", 2.0),
                                     ("drift_5pct_in_5_frames", 5.0))):
        print(f"scenario {name} ...", flush=True)
        out, _ = scenario(name, per, args.frames, args.size, i + 1, args.threads,
                          args.event_frames)
        report["scenarios"][name] = out
        print(json.dumps({k: out[k] for k in ("mot", "drift", "coalescence")}, indent=1),
              flush=True)
    print("static field ...", flush=True)
    report["static"] = static_field(args.size, args.static_frames, 7, args.threads)
    print("real frames as pseudo-videos ...", flush=True)
    report["real_frames"] = real_frames(30, args.threads)
    sc = list(report["scenarios"].values())
    worst = {
        "idf1": min(s["mot"]["idf1"] for s in sc),
        "growth_rate_rel_error": max(s["growth"]["rel_error_of_median"] or math.inf
                                     for s in sc),
        "coalescence_recall": min(s["coalescence"]["recall"] or 0.0 for s in sc),
        "drift_error_px": max(s["drift"]["frame_to_frame_max_px"] for s in sc),
        "cost_ratio_engine": max(s["cost"]["ratio_to_engine"] for s in sc),
    }
    report["worst"] = worst
    report["pass"] = {
        "idf1": worst["idf1"] >= TARGETS["idf1"],
        "growth_rate_rel_error": worst["growth_rate_rel_error"] <= TARGETS[
            "growth_rate_rel_error"],
        "coalescence_recall": worst["coalescence_recall"] >= TARGETS["coalescence_recall"],
        "drift_error_px": worst["drift_error_px"] < TARGETS["drift_error_px"],
        "cost_ratio_engine": worst["cost_ratio_engine"] <= TARGETS["cost_ratio_engine"],
        "static_n_within_single_frame_range": report["static"][
            "count_within_single_frame_range"],
        "static_d50_ci_within_1pct": report["static"]["d50_ci_ends_max_rel_diff"] <= 0.01,
    }
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=float) + "\n", encoding="utf-8")
    print(json.dumps({"worst": worst, "pass": report["pass"],
                      "static": {k: report["static"][k] for k in
                                 ("count_rel_diff", "single_frame_count_range",
                                  "d50_rel_diff", "d50_ci_ends_max_rel_diff")}},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
