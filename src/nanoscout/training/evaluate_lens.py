"""Held-out evaluation of the AI lens: does its novelty score separate usual from novel frames?

::

    python -m nanoscout.training.evaluate_lens --card models/weights/lens.json

writes ``benchmarks/results/lens.json`` and the card's ``evaluation`` block. Every frame is
rendered fresh from seeds neither training nor calibration used (:data:`SPLITS`: the default
"test" seeds below are for reporting only; ``--split validation`` uses seeds 5 000 000 + k and
5 500 000 + 1000 * kind + k, on which every design choice was made), turned into the network input
by ``nanoscout.analysis.preprocess.fixed_input`` and scored by the shipped ONNX file with ONNX Runtime:
``novelty = error / card.novelty.reference_error``.

* usual (held out): :func:`nanoscout.training.lens_data.usual_frame` with seeds ``USUAL_SEED_BASE + k``
  (a fifth from ``nanoscout.sim.fields`` isolated / agglomerated particle fields);
* novel, per kind: ``nanoscout.sim.fields.render_field`` of rods_wires (its rod- and wire-dominated
  fields, ``rods="dominated"``), film_structure, out_of_focus, charging_saturated and blank
  (seeds ``NOVEL_SEED_BASE + 1000 * kind + k``), plus ``contamination``
  (:func:`contamination_frame`: usual fields under large soft hydrocarbon-contamination blobs or
  an SEM scan-contamination rectangle; written here because ``nanoscout.sim.fields`` has no such
  class). Reported on their own and not counted as novel frames: ``empty_support`` (a support
  without particles: whether that is unusual is a matter of taste) and ``rods_needles`` (1-3
  rods among ordinary particles, ``rods="needles"``: a needle in a usual frame, which the
  particle shape rules and the classifier's rods_wires class are there to find; a frame-level
  score cannot, and this one does not).

AUROC is the probability that a random novel frame scores above a random usual frame (ties
count half), computed exactly from ranks. Real images (``../shared/data``, never trained on)
are scored too and summarised per set; they have no novelty labels, so only their score
distribution is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

from nanoscout.analysis.modelcard import ModelCard
from nanoscout.engines import create_engine
from nanoscout.sim import fields
from nanoscout.sim.synthetic import Specimen
from nanoscout.training.lens_data import (
    SHAPES,
    USUAL_FIELD_CLASSES,
    inputs_of,
    usual_config,
    usual_frame,
)

__all__ = ["NOVEL_FIELD_CLASSES", "auroc", "contamination_frame", "evaluate", "main",
           "novel_frame", "real_scores", "score_frames", "write_results"]

USUAL_SEED_BASE = 4_000_000
NOVEL_SEED_BASE = 4_500_000
#: (usual, novel) seed bases per split: every design choice (features, k, bank) was made on
#: "validation"; "test" (the default, what the card and benchmarks/results/lens.json report)
#: was used for nothing else. Training uses 3 000 000 + k, calibration 3 500 000 + k.
SPLITS: dict[str, tuple[int, int]] = {"test": (USUAL_SEED_BASE, NOVEL_SEED_BASE),
                                      "validation": (5_000_000, 5_500_000)}
#: nanoscout.sim.fields classes that count as novel
NOVEL_FIELD_CLASSES: tuple[str, ...] = ("rods_wires", "film_structure", "out_of_focus",
                                        "charging_saturated", "blank")
#: novel kinds rendered here
OWN_KINDS: tuple[str, ...] = ("contamination",)
RESULTS = Path("benchmarks/results/lens.json")


def auroc(usual: np.ndarray, novel: np.ndarray) -> float:
    """Return P(novel score > usual score) + 0.5 P(equal), from the pooled ranks."""
    u, n = np.asarray(usual, np.float64), np.asarray(novel, np.float64)
    if u.size == 0 or n.size == 0:
        raise ValueError(f"auroc needs both sets non-empty (usual {u.size}, novel {n.size})")
    ranks = _ranks(np.concatenate([u, n]))
    r_novel = float(ranks[u.size:].sum())
    return (r_novel - n.size * (n.size + 1) / 2.0) / (n.size * u.size)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of ``a`` with ties given their mean rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(a.size, np.float64)
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and s[j + 1] == s[i]:
            j += 1
        ranks[order[i: j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def contamination_frame(rng: np.random.Generator) -> np.ndarray:
    """Return a raw usual particle field under contamination (same dtype as the frame).

    TEM / STEM: 1-4 soft-edged blobs (radius 12-35 % of the frame, a hydrocarbon build-up)
    that absorb (TEM: intensity x (1 - s)) or scatter (HAADF: + s x the frame's 99th
    percentile), s = 0.3-0.8. SEM: a darker rectangle where an earlier, higher-magnification
    scan deposited carbon (intensity x (1 - s)), s = 0.3-0.7.
    """
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cfg = usual_config(rng, shape)
    raw = Specimen.generate(cfg, rng).acquire(rng).image
    img = raw.astype(np.float64)
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros((h, w))
    if cfg.modality == "SEM":
        rh, rw = rng.uniform(0.25, 0.6) * h, rng.uniform(0.25, 0.6) * w
        y0, x0 = rng.uniform(0, h - rh), rng.uniform(0, w - rw)
        box = ((yy >= y0) & (yy < y0 + rh) & (xx >= x0) & (xx < x0 + rw)).astype(np.float64)
        field = ndi.gaussian_filter(box, 2.0) * rng.uniform(0.3, 0.7)
        img *= 1.0 - field
    else:
        side = min(h, w)
        for _ in range(int(rng.integers(1, 5))):
            r = rng.uniform(0.12, 0.35) * side
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            d = np.hypot(yy - cy, xx - cx) / r
            field = np.maximum(field, np.clip(1.5 * (1.0 - d), 0.0, 1.0) ** 0.7)
        s = rng.uniform(0.3, 0.8)
        if cfg.modality == "TEM":
            img *= 1.0 - s * field
        else:
            img += s * field * float(np.percentile(img, 99))
    if raw.dtype.kind == "u":
        top = float(np.iinfo(raw.dtype).max)
        return np.clip(np.rint(img), 0, top).astype(raw.dtype)
    return img.astype(raw.dtype)


def novel_frame(kind: str, seed: int) -> np.ndarray:
    """Return the raw frame of novel ``kind`` drawn with ``seed`` (reproducible)."""
    rng = np.random.default_rng(seed)
    if kind == "contamination":
        return contamination_frame(rng)
    if kind in ("rods_wires", "rods_needles"):
        rods: Literal["dominated", "needles"] = "dominated" if kind == "rods_wires" else "needles"
        return np.asarray(fields.render_field("rods_wires", rng, rods=rods).image)
    return np.asarray(fields.render_field(kind, rng).image)


def score_frames(card_path: Path, frames: list[np.ndarray]) -> np.ndarray:
    """Return the novelty (error / reference_error) of each raw frame, via ONNX Runtime."""
    card = ModelCard.load(card_path)
    assert card.novelty is not None and card.input.size is not None
    x = inputs_of(frames, card.input.size[0])
    with create_engine(card.onnx_path(card_path), "onnxruntime-cpu", threads=2) as engine:
        err = np.array([float(engine.infer({card.input.name: x[i: i + 1]})
                              [card.novelty.error_output].reshape(-1)[0])
                        for i in range(len(x))])
    return err / card.novelty.reference_error


def _summary(nov: np.ndarray) -> dict[str, Any]:
    return {"n": int(nov.size), "median": round(float(np.median(nov)), 3),
            "p10": round(float(np.quantile(nov, 0.1)), 3),
            "p90": round(float(np.quantile(nov, 0.9)), 3),
            "fraction_above_1": round(float(np.mean(nov > 1.0)), 3)}


def real_scores(card_path: Path, max_per_set: int | None = None) -> dict[str, dict[str, Any]]:
    """Return novelty summaries of every real image found under ../shared/data, per set.

    The lens never saw a real image, so every image is held out; there are no novelty labels.
    """
    from nanoscout.training import realdata

    out: dict[str, dict[str, Any]] = {}
    sets = realdata.available_sets()
    loaders = {
        "emps": lambda: [realdata.load_emps(i) for i, _ in realdata.emps_index()[:max_per_set]],
        "stem": lambda: [realdata.load_stem(n) for n in realdata.stem_names()[:max_per_set]],
        "nffa": lambda: [realdata.load_nffa(n) for n in realdata.nffa_names()[:max_per_set]],
    }
    notes = {
        "emps": "EMPS training crops (TEM/SEM figure crops of particle fields from papers, "
                "8-bit grey, many with burnt-in scale bars and labels)",
        "stem": "stem-dev HAADF-STEM / BF-TEM images of supported metal catalysts (Pt, Pd, "
                "Cu, PtW on carbon / silica), 640 or 2048 px JPG",
        "nffa": "NFFA-Europe SEM particle images, 1024x768 with the SEM data bar",
    }
    for name in sets:
        if name not in loaders:
            continue
        t0 = time.perf_counter()
        samples = loaders[name]()
        nov = score_frames(card_path, [s.image for s in samples])
        order = np.argsort(nov)
        out[name] = {"data": notes[name], **_summary(nov),
                     "lowest": [[samples[i].id, round(float(nov[i]), 2)] for i in order[:3]],
                     "highest": [[samples[i].id, round(float(nov[i]), 2)] for i in order[-3:]],
                     "seconds": round(time.perf_counter() - t0, 1)}
    return out


def evaluate(card_path: Path, *, n_usual: int = 200, n_novel: int = 40,
             real: bool = True, split: str = "test") -> dict[str, Any]:
    """Return the held-out evaluation of the lens at ``card_path`` (see the module doc).

    ``split`` picks the seeds (:data:`SPLITS`): "test" for reporting, "validation" for choices.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    usual_base, novel_base = SPLITS[split]
    t0 = time.perf_counter()
    kinds = NOVEL_FIELD_CLASSES + OWN_KINDS
    usual, sources = [], []
    for s in range(usual_base, usual_base + n_usual):
        img, src = usual_frame(s)
        usual.append(img)
        sources.append(src)
    nov_usual = score_frames(card_path, usual)
    del usual
    per_kind: dict[str, dict[str, Any]] = {}
    all_novel: list[np.ndarray] = []
    extra = ("empty_support", "rods_needles") if fields is not None else ()
    for k, kind in enumerate(kinds + extra):
        base = novel_base + 1000 * k
        frames = [novel_frame(kind, base + j) for j in range(n_novel)]
        nov = score_frames(card_path, frames)
        per_kind[kind] = {"auroc": round(auroc(nov_usual, nov), 4), **_summary(nov),
                          "seeds": f"{base}..{base + n_novel - 1}",
                          "counted_as_novel": kind in kinds}
        if kind in kinds:
            all_novel.append(nov)
        print(f"{kind:>20}: AUROC {per_kind[kind]['auroc']:.3f} median novelty "
              f"{per_kind[kind]['median']}", flush=True)
    novel = np.concatenate(all_novel)
    src_arr = np.array(sources)
    by_source = {src: _summary(nov_usual[src_arr == src]) for src in sorted(set(sources))}
    card = ModelCard.load(card_path)
    assert card.novelty is not None
    res: dict[str, Any] = {
        "model": str(card_path),
        "sha256": card.sha256,
        "command": f"python -m nanoscout.training.evaluate_lens --card {card_path} --n-usual {n_usual} "
                   f"--n-novel {n_novel}" + (f" --split {split}" if split != "test" else ""),
        "split": split,
        "reference_error": card.novelty.reference_error,
        "auroc": round(auroc(nov_usual, novel), 4),
        "target_auroc": 0.9,
        "n_usual": n_usual,
        "n_novel": int(novel.size),
        "usual": {"data": f"held-out usual frames ({split} split), seeds {usual_base}.."
                          f"{usual_base + n_usual - 1} (nanoscout.training.lens_data.usual_frame; "
                          f"training {3_000_000} + k, calibration {3_500_000} + k)",
                  **_summary(nov_usual), "by_source": by_source},
        "per_kind": per_kind,
        "novel_sources": {"nanoscout.sim.fields": list(NOVEL_FIELD_CLASSES),
                          "nanoscout.training.evaluate_lens": list(OWN_KINDS)},
        "usual_sources": {"nanoscout.sim.synthetic": "usual_frame",
                          "nanoscout.sim.fields": list(USUAL_FIELD_CLASSES)},
    }
    if real:
        res["real"] = real_scores(card_path)
        for name, r in res["real"].items():
            print(f"real {name}: median novelty {r['median']} p90 {r['p90']} "
                  f"above 1: {r['fraction_above_1']}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"overall AUROC {res['auroc']:.4f} ({n_usual} usual vs {novel.size} novel)", flush=True)
    return res


def write_results(results: dict[str, Any], card_path: Path | None = None,
                  out: Path = RESULTS) -> Path:
    """Write ``results`` as JSON to ``out``; with ``card_path`` also store a summary in the
    card's ``evaluation`` block (the ONNX file is unchanged, so its sha256 still holds)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if card_path is not None:
        card = ModelCard.load(card_path)
        summary = {
            "data": results["usual"]["data"] + "; novel: " + ", ".join(
                f"{k} ({v['n']})" for k, v in results["per_kind"].items()
                if v["counted_as_novel"]),
            "command": results["command"],
            "auroc": results["auroc"],
            "n_usual": results["n_usual"], "n_novel": results["n_novel"],
            "per_kind_auroc": {k: v["auroc"] for k, v in results["per_kind"].items()},
            "usual_novelty_median": results["usual"]["median"],
            "usual_fraction_above_1": results["usual"]["fraction_above_1"],
            "results_file": str(out),
        }
        evaluation = {"novelty_auroc": summary}
        if "real" in results:
            evaluation["real_images"] = {
                "data": "novelty of real images (never trained on), no labels",
                "command": results["command"],
                **{k: {kk: v[kk] for kk in ("n", "median", "p10", "p90", "fraction_above_1")}
                   for k, v in results["real"].items()}}
        card.model_copy(update={"evaluation": evaluation}).dump(card_path)
        ModelCard.load(card_path)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate a lens card and write benchmarks/results/lens.json."""
    ap = argparse.ArgumentParser(description="held-out novelty AUROC of the AI lens")
    ap.add_argument("--card", type=Path, default=Path("models/weights/lens.json"))
    ap.add_argument("--n-usual", type=int, default=200)
    ap.add_argument("--n-novel", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results JSON (default {RESULTS}; required with --split validation)")
    ap.add_argument("--split", choices=sorted(SPLITS), default="test",
                    help="seeds: validation (for choices) or test (for reporting)")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--no-card", action="store_true", help="do not update the card")
    args = ap.parse_args(argv)
    if args.split != "test" and args.out is None:
        ap.error(f"--split {args.split} needs --out: {RESULTS} and the card report the test "
                 "split")
    out = RESULTS if args.out is None else args.out
    update_card = not args.no_card and args.split == "test"
    res = evaluate(args.card, n_usual=args.n_usual, n_novel=args.n_novel, real=not args.no_real,
                   split=args.split)
    write_results(res, args.card if update_card else None, out)
    print(f"wrote {out}")
    return 0 if math.isfinite(res["auroc"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
