"""Adaptation benchmark: adapt on ONE annotated image of a material, score its other images.

::

    nice -n 10 .venv/bin/python -m benchmarks.adapt            # -> benchmarks/results/adapt.json

Issue 18's protocol on ``../shared/data`` (each adaptation is a real ``nanoscout models adapt``
subprocess, timed wall clock, 1 torch / ONNX Runtime thread):

1. **Guard choice, on tuning sets only** (:func:`nanoscout.training.realdata.stem_tuning_names`:
   the STEM tuning material Pt; the EMPS tuning papers of
   :func:`nanoscout.training.realdata.emps_tuning_ids` with >= 2 images, the first
   ``--tune-papers``): each is adapted with ``--guard mix`` and ``--guard freeze``; the guard
   with the higher mean adapted F1 on the tuning material's other images wins (forgetting is
   also recorded: F1 on held-out synthetic frames, base vs adapted).
2. **Scored cases** with the winning guard: the STEM held-out material (Pd; adapt on the first
   image of the split, score the other six; target F1 >= 0.75), NFFA (adapt on the first, score
   the other five; target F1 >= 0.75), and every EMPS validation paper with >= 2 images (adapt on
   its first image, score the rest; per-paper before / after and the median gain).
3. **Every choice of the annotated image** (``--each``): the STEM tuning and held-out
   materials and NFFA adapted on each of their images in turn (cases ``stem/Pd@Pd3``,
   ``nffa@<id>``, ``tune/stem-Pt/freeze@Pt4``: adapt on that image, score the others), because
   which image an operator annotates is not fixed;
   the summary gives the mean, the worst and the best over the choices
   (``summary.each_choice``). The first image's case is the one above.

Labels given to the command: the STEM YOLO files as they are, the EMPS uint16 instance maps as
they are, NFFA as a TIFF instance map of the loader's particles (its PNG masks mark particles 0).
Scoring: :func:`nanoscout.training.evaluate.evaluate_set` (IoU >= 0.5; box IoU for STEM),
shipped detector (its card) vs the adapted one (its card). The base model, adapted and scored
as "before", is the one the daemon gives such frames: the general detector, and for the STEM
cases (tuning and scored) the STEM detector (``--base``; ``results/adapt_stem_base.json``; the
STEM cases of ``results/adapt.json`` were run from the general detector, before this choice).
Nothing is tuned on a scored image.

The run is incremental: every finished case is written at once, and a rerun skips the cases
already in the result file (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

RESULT = Path("benchmarks/results/adapt.json")
#: the base model of the STEM cases: the detector the daemon analyses STEM frames with
STEM_BASE = "detector_stem.onnx"
GUARDS = ("mix", "freeze", "head")


def _detector(onnx: Path) -> Any:
    from nanoscout.analysis.detector import load_detector
    from nanoscout.engines import create_engine

    return load_detector(onnx, lambda p: create_engine(p, "onnxruntime-cpu", threads=1))


def _label_file(sample: Any, tmp: Path) -> tuple[Path, Path]:
    """Return (image path, label path) to hand to the command for ``sample``."""
    from nanoscout.training.realdata import data_root

    root = data_root()
    if sample.set in ("stem", "stem-tune"):
        return (root / "stem-dev" / "images" / f"{sample.id}.jpg",
                root / "stem-dev" / "labels" / f"{sample.id}.txt")
    if sample.set in ("emps", "emps-tune"):
        return (root / "emps-train" / "images" / f"{sample.id}.png",
                root / "emps-train" / "segmaps" / f"{sample.id}.png")
    import tifffile

    lab = tmp / f"{sample.id}.labels.tif"
    tifffile.imwrite(lab, sample.labels.astype(np.uint16))
    return root / "nffa-particles" / "images" / f"{sample.id}.jpg", lab


def _each_choice(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Return ``case`` adapted on each of its other images in turn (key ``<key>@<image id>``;
    the chosen image first, the others in their order)."""
    ss = case["samples"]
    return [{**case, "key": f"{case['key']}@{s.id}", "samples": [s, *ss[:i], *ss[i + 1:]]}
            for i, s in enumerate(ss) if i > 0]


def _cases(tune_papers: int, guards: tuple[str, ...] = GUARDS, each: bool = False
           ) -> list[dict[str, Any]]:
    """Return the cases in run order: {key, kind, set, samples (the first is adapted on)};
    ``each``: also the STEM tuning and held-out materials and NFFA adapted on each other
    image (:func:`_each_choice`)."""
    from nanoscout.training import realdata as rd

    out: list[dict[str, Any]] = []
    sets = rd.available_sets()
    if "stem" in sets:
        tune = [rd.load_stem(n) for n in rd.stem_tuning_names()]
        for g in guards:
            out.append({"key": f"tune/stem-{tune[0].group}/{g}", "kind": "tune", "guard": g,
                        "set": "stem-tune", "samples": tune, "base": STEM_BASE})
            out.extend(_each_choice(out[-1]) if each else [])
    if "emps" in sets:
        dois = dict(rd.emps_index())
        by: dict[str, list[str]] = defaultdict(list)
        for i in rd.emps_tuning_ids():
            by[dois[i]].append(i)
        papers = [d for d in sorted(by) if len(by[d]) >= 2][:tune_papers]
        for d in papers:
            ss = [rd.load_emps(i, None, d) for i in by[d]]
            for g in guards:
                out.append({"key": f"tune/emps/{d}/{g}", "kind": "tune", "guard": g,
                            "set": "emps-tune", "samples": ss})
    if "stem" in sets:
        held = list(rd.iter_samples("stem"))
        for mat in sorted({s.group for s in held}):
            ss = [s for s in held if s.group == mat]
            out.append({"key": f"stem/{mat}", "kind": "scored", "set": "stem", "samples": ss,
                        "target_f1": 0.75, "base": STEM_BASE})
            out.extend(_each_choice(out[-1]) if each else [])
    if "nffa" in sets:
        out.append({"key": "nffa", "kind": "scored", "set": "nffa",
                    "samples": list(rd.iter_samples("nffa")), "target_f1": 0.75})
        out.extend(_each_choice(out[-1]) if each else [])
    if "emps" in sets:
        val = list(rd.iter_samples("emps"))
        by2: dict[str, list[Any]] = defaultdict(list)
        for s in val:
            by2[s.group].append(s)
        for d in sorted(by2):
            if len(by2[d]) >= 2:
                out.append({"key": f"emps/{d}", "kind": "scored", "set": "emps",
                            "samples": by2[d]})
    return out


def _synthetic_f1(onnx: Path, n: int) -> float:
    from nanoscout.training.evaluate import evaluate_set, synthetic_samples

    res = evaluate_set({"m": _detector(onnx)}, synthetic_samples(n))
    return float(res["methods"]["m"]["f1"])


def adapt_on(sample: Any, base_onnx: Path, tmp: Path, guard: str, minutes: float,
             extra: tuple[str, ...] = ()) -> tuple[Path, float, dict[str, Any] | None]:
    """Run ``nanoscout models adapt`` on ``sample`` (a subprocess, 1 thread, output in
    ``tmp``); returns (output folder, wall time s, None) or, when it failed, the error row
    as the third item."""
    img, lab = _label_file(sample, tmp)
    out = tmp / "adapted"
    cmd = [sys.executable, "-m", "nanoscout", "models", "adapt", str(img), "--labels",
           str(lab), "--out", str(out), "--minutes", str(minutes), "--guard", guard,
           "--threads", "1", "--no-progress", "--base", str(base_onnx), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return out, wall, {"error": proc.stderr[-2000:], "command": " ".join(cmd[1:])}
    return out, wall, None


def _without_count_check(adapted: Path, dest: Path) -> Path:
    """Copy the adapted model folder ``adapted`` to ``dest`` with its card's
    ``base_network.max_count_ratio`` removed; returns the copy's ONNX path."""
    import shutil

    shutil.copytree(adapted, dest)
    card_file = dest / "detector.json"
    card = json.loads(card_file.read_text())
    card["base_network"]["max_count_ratio"] = None
    card_file.write_text(json.dumps(card, indent=1))
    return dest / "detector.onnx"


def run_case(case: dict[str, Any], guard: str, minutes: float, base_onnx: Path,
             synthetic_n: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Adapt on the case's first sample (a subprocess), score base and adapted on the rest.
    A case naming its own ``base`` (the STEM cases: the detector the daemon gives STEM frames)
    adapts that model and is scored against it. ``extra``: more options of the command."""
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.training.evaluate import evaluate_set

    if case.get("base"):
        base_onnx = shipped_model_dir() / case["base"]

    first, rest = case["samples"][0], case["samples"][1:]
    with tempfile.TemporaryDirectory() as tmpd:
        out, wall, error = adapt_on(first, base_onnx, Path(tmpd), guard, minutes, extra)
        if error is not None:
            return error
        card = json.loads((out / "detector.json").read_text())
        methods = {"base": _detector(base_onnx), "adapted": _detector(out / "detector.onnx")}
        checked = (card.get("base_network") or {}).get("max_count_ratio") is not None
        if checked:  # the same adapted model without its count check, scored beside it
            methods["unchecked"] = _detector(_without_count_check(out, Path(tmpd) / "unchecked"))
        res = evaluate_set(methods, rest)
        b, a = res["methods"]["base"], res["methods"]["adapted"]
        row: dict[str, Any] = {
            "base": base_onnx.name, "adapt_on": first.id, "image_shape": list(first.image.shape),
            "scored": [s.id for s in rest], "n_scored": len(rest), "guard": guard,
            "minutes_budget": minutes, "adapt_wall_s": round(wall, 1),
            "before": {k: b[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")},
            "after": {k: a[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")},
            "gain_f1": round(a["f1"] - b["f1"], 4),
            "per_image": res["images"],
            "adaptation": {k: card["training"]["adaptation"].get(k) for k in
                           ("network", "choice", "steps", "working_scale", "min_score", "seconds",
                            "median_annotated_ecd_px", "particle_px_measured", "particle_px",
                            "max_count_ratio")},
            "adaptation_holdout": {k: card["evaluation"]["adaptation_holdout"][k]["f1"]
                                   for k in ("before", "after")},
        }
        if checked:
            u = res["methods"]["unchecked"]
            row["after_without_count_check"] = {k: u[k] for k in ("f1", "precision", "recall",
                                                                  "tp", "fp", "fn")}
            row["max_count_ratio"] = card["base_network"]["max_count_ratio"]
            row["frames_to_base_by_count"] = [
                im["id"] for im in res["images"]
                if im["adapted"]["n_pred"] != im["unchecked"]["n_pred"]]
        if "target_f1" in case:
            row["target_f1"] = case["target_f1"]
            row["met"] = a["f1"] >= case["target_f1"]
        if case["kind"] == "tune" and synthetic_n > 0:
            row["synthetic_f1"] = {"base": _synthetic_f1(base_onnx, synthetic_n),
                                   "adapted": _synthetic_f1(out / "detector.onnx", synthetic_n),
                                   "n_frames": synthetic_n}
        return row


def _choose_guard(results: dict[str, Any], guards: tuple[str, ...] = GUARDS
                  ) -> tuple[str | None, dict[str, Any]]:
    per: dict[str, list[float]] = defaultdict(list)
    syn: dict[str, list[float]] = defaultdict(list)
    for key, r in results.items():
        if key.startswith("tune/") and "after" in r:
            per[r["guard"]].append(r["after"]["f1"])
            if "synthetic_f1" in r:
                syn[r["guard"]].append(r["synthetic_f1"]["adapted"])
    if not per or len({len(v) for v in per.values()}) != 1 or set(per) != set(guards):
        return None, {}
    summary = {g: {"mean_adapted_f1_tuning": round(float(np.mean(v)), 4),
                   "mean_adapted_synthetic_f1": round(float(np.mean(syn[g])), 4) if syn[g] else None,
                   "n_cases": len(v)} for g, v in per.items()}
    best = max(guards, key=lambda g: (summary[g]["mean_adapted_f1_tuning"],
                                      summary[g]["mean_adapted_synthetic_f1"] or 0.0))
    return best, summary


def _choice_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Before / after F1 over the choices of the annotated image: mean, worst, best, and the
    choices that met the target (``rows``: case row by the image adapted on)."""
    after = {k: r["after"]["f1"] for k, r in rows.items()}
    before = [r["before"]["f1"] for r in rows.values()]
    gains = [r["gain_f1"] for r in rows.values()]
    return {"n_choices": len(rows), "mean_before_f1": round(float(np.mean(before)), 4),
            "mean_after_f1": round(float(np.mean(list(after.values()))), 4),
            "worst_after": min(after.items(), key=lambda kv: kv[1]),
            "best_after": max(after.items(), key=lambda kv: kv[1]),
            "n_better": int(sum(g > 0 for g in gains)), "n_worse": int(sum(g < 0 for g in gains)),
            "n_met": int(sum(bool(r.get("met")) for r in rows.values())),
            "after_by_choice": after}


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    emps = {k: r for k, r in results.items() if k.startswith("emps/") and "after" in r}
    out: dict[str, Any] = {}
    if emps:
        gains = [r["gain_f1"] for r in emps.values()]
        out["emps_papers"] = {"n_papers": len(emps),
                              "median_gain_f1": round(float(np.median(gains)), 4),
                              "median_before_f1": round(float(np.median(
                                  [r["before"]["f1"] for r in emps.values()])), 4),
                              "median_after_f1": round(float(np.median(
                                  [r["after"]["f1"] for r in emps.values()])), 4),
                              "n_improved": int(sum(g > 0 for g in gains)),
                              "n_worse": int(sum(g < 0 for g in gains))}
    for k, r in results.items():
        if "target_f1" in r:
            out[k] = {"before_f1": r["before"]["f1"], "after_f1": r["after"]["f1"],
                      "target_f1": r["target_f1"], "met": r["met"],
                      "adapt_wall_s": r["adapt_wall_s"], "image_shape": r["image_shape"]}
    choices: dict[str, dict[str, Any]] = defaultdict(dict)
    for k, r in results.items():
        if "after" in r and not k.startswith("emps/"):
            choices[k.split("@", 1)[0]][r["adapt_on"]] = r
    each = {k: _choice_summary(v) for k, v in choices.items() if len(v) > 1}
    if each:
        out["each_choice"] = each
    walls = [r["adapt_wall_s"] for k, r in results.items() if "adapt_wall_s" in r]
    if walls:
        out["adapt_wall_s_max"] = max(walls)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run (or resume) the benchmark and write the result file after every case."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--minutes", type=float, default=4.0,
                    help="adapt budget for STEM and NFFA cases (the command's default)")
    ap.add_argument("--emps-minutes", type=float, default=1.5,
                    help="adapt budget for EMPS cases (figure crops of ~0.3 Mpx)")
    ap.add_argument("--tune-minutes", type=float, default=2.0,
                    help="adapt budget of the guard-choice (tuning) cases")
    ap.add_argument("--tune-papers", type=int, default=2)
    ap.add_argument("--synthetic-n", type=int, default=4,
                    help="held-out synthetic frames for the forgetting check (tuning cases)")
    ap.add_argument("--only", default=None, help="run only case keys starting with this")
    ap.add_argument("--guards", default=",".join(GUARDS),
                    help="guards compared on the tuning cases (comma list)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing result file")
    ap.add_argument("--each", action="store_true",
                    help="also adapt the STEM tuning and held-out materials and NFFA on each "
                         "other image")
    ap.add_argument("--adapt-args", default="",
                    help="more options of `nanoscout models adapt`, e.g. '--steps 500 "
                         "--choice paired'")
    ap.add_argument("--fine-tuned-only", action="store_true",
                    help="adapt with --fine-tuned-only (the base network does not compete)")
    args = ap.parse_args(argv)
    guards = tuple(g for g in args.guards.split(",") if g)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from nanoscout.analysis.modelcard import sha256_file, shipped_model_dir
    from nanoscout.training import realdata as rd
    from nanoscout.training.adapt import DEFAULT_GUARD

    if not rd.available_sets():
        raise SystemExit(f"no real data under {rd.data_root()}: nothing to benchmark")
    base_onnx = shipped_model_dir() / "detector.onnx"
    doc: dict[str, Any] = {}
    if args.out.is_file() and not args.fresh:
        doc = json.loads(args.out.read_text())
    results: dict[str, Any] = doc.get("cases", {})
    doc.update({"benchmark": "benchmarks/adapt.py", "command": "python -m benchmarks.adapt "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, shared; 1 thread",
                "base_model": {"path": str(base_onnx), "sha256": sha256_file(base_onnx)},
                "protocol": __doc__.split("::")[0].strip() + " See the module docstring.",
                "budgets_min": {"stem_nffa": args.minutes, "emps": args.emps_minutes,
                                "tuning": args.tune_minutes}})

    def write() -> None:
        doc["cases"] = results
        guard, gsum = _choose_guard(results, guards)
        doc["guard_choice"] = {"winner": guard, "by_guard": gsum,
                               "rule": "higher mean adapted F1 on the tuning cases' other images"}
        doc["summary"] = _summary(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")

    for case in _cases(args.tune_papers, guards, args.each):
        key = case["key"]
        if key in results and "error" not in results[key]:
            continue
        if args.only and not key.startswith(args.only):
            continue
        if case["kind"] == "tune":
            guard, minutes = case["guard"], args.tune_minutes
        else:
            chosen, _ = _choose_guard(results, guards)
            # no tuning case run (--only): the one guard named, else the command's default
            guard = chosen or (guards[0] if len(guards) == 1 else DEFAULT_GUARD)
            minutes = args.emps_minutes if case["set"] == "emps" else args.minutes
        t0 = time.perf_counter()
        row = run_case(case, guard, minutes, base_onnx, args.synthetic_n,
                       (("--fine-tuned-only",) if args.fine_tuned_only else ())
                       + tuple(args.adapt_args.split()))
        row["case_wall_s"] = round(time.perf_counter() - t0, 1)
        results[key] = row
        write()
        brief = (f"{row['before']['f1']:.3f} -> {row['after']['f1']:.3f} in "
                 f"{row['adapt_wall_s']:.0f} s" if "after" in row else "ERROR " + row["error"][-300:])
        print(f"{key} [{guard}]: {brief}", flush=True)
    write()


if __name__ == "__main__":
    main()
