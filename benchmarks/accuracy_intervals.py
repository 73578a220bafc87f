"""95 % intervals of the shipped detectors' held-out F1s, and of past decisions' differences.

::

    python -m benchmarks.accuracy_intervals --out benchmarks/results/accuracy_intervals.json

Reads result files only (nothing is run again). For the shipped detectors' held-out numbers
(``benchmarks/results/accuracy.json``, model and classical baseline, EMPS also without the
specks image) it gives the pooled precision, recall and F1 with their 95 % bootstrap
intervals (:func:`nanoscout.training.intervals.interval`; percentile, and BCa beside it for the
F1 as a check of the method). For past comparisons whose two arms are kept as per-image TP /
FP / FN of the same images, scored against the same truth and run under the same conditions
apart from what was compared, it gives F1_B - F1_A with its paired 95 % interval and the share
of resamples in which B won (:func:`nanoscout.training.intervals.compare`). Results that keep
only set-level numbers, or whose other arm was run under other conditions, are listed under
``not_compared`` with the reason. Resampling unit: each image, or each EMPS paper (its images
are not independent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from nanoscout.training.intervals import (
    CI_METHOD,
    LEVEL,
    N_RESAMPLES,
    SEED,
    compare,
    harness_rows,
    interval,
)

RESULTS = Path("benchmarks/results")
ACC = "accuracy.json"
NOISE = "noise_stress.json"
WA = "weight_averaging.json"
PM = "stem_pseudo_masks.json"
GENERAL_SETS = ("synthetic", "emps", "emps-w/o", "nffa", "msa")
HELDOUT = ("synthetic", "emps", "emps-w/o", "stem", "nffa", "msa")
#: STEM detector 1.2 on held-out Pd without the low-dose smoothing (its card before
#: 2026-12-06 21:28): the A arm of the STEM experiments run before the smoothing shipped
PD_BEFORE_SMOOTHING = ("images", NOISE, ("heldout", "sets", "stem", "images"), "none")
_CTL_SCALES = ("diagnostic, both at the control's working scales (evaluate --scale-from "
               "/work/exp/s41/ctl/detector_stem.onnx; reads no truth): ")

Spec = tuple[Any, ...]


def _h(file: str, name: str) -> Spec:
    return ("harness", file, name)


def _i(file: str, *path: str, arm: str | None = None) -> Spec:
    return ("images", file, path, arm)


#: each past comparison: what it asked, its arms, and per set the (A, B) sources of image rows
COMPARISONS: list[dict[str, Any]] = [
    {"name": "oracle working scale vs the automatic estimate (diagnostic)",
     "a": "shipped detectors, automatic working scale", "b": "each image's true working "
     "scale (evaluate --scale oracle; reads the truth)",
     "claim": "README: the oracle scale moves EMPS 0.629 -> 0.746 and STEM Pd 0.578 -> 0.617, so "
              "STEM, NFFA and msa are limited by the network more than by the scale estimate",
     "sets": {**{s: (_h(ACC, s), _h("accuracy_oracle_scale.json", s)) for s in GENERAL_SETS},
              "stem": (PD_BEFORE_SMOOTHING, _h("accuracy_oracle_scale.json", "stem"))},
     "note": "stem: A is STEM detector 1.2 without the low-dose smoothing (noise_stress.json, "
             "'none'), as in the oracle run (2026-12-06 03:42, before the smoothing shipped)"},
    *[{"name": f"operator's size range within {k}x vs none (diagnostic)",
       "a": "shipped detectors", "b": f"each image told its median size within {k}x of the "
       f"truth (evaluate --size-hint {k}; reads the truth)",
       "claim": "CHANGELOG: held-out EMPS 0.628 -> 0.734 with the truth within 2x"
                if k == 2 else "accuracy_size_hint_k3.json: EMPS 0.628 -> 0.647",
       "sets": {**{s: (_h(ACC, s), _h(f"accuracy_size_hint_k{k}.json", s))
                   for s in ("emps", "emps-w/o", "nffa", "msa")},
                "stem": (PD_BEFORE_SMOOTHING, _h(f"accuracy_size_hint_k{k}.json", "stem"))},
       "note": "stem: A without the low-dose smoothing, as the size-hint runs (2026-12-06 "
               "14:01); emps-tune of these files has no A arm with image rows"}
      for k in (2, 3)],
    {"name": "files without metadata routed by the modality model (cut 0.5) vs each set's "
             "own detector",
     "a": "each set's own detector (frames that say their modality)",
     "b": "every real image routed by the modality model (evaluate --route, cut 0.5)",
     "claim": "CHANGELOG: EMPS validation 0.628 -> 0.625, NFFA and BF-TEM unchanged",
     "sets": {s: (_h(ACC, s), _h("accuracy_routed.json", s))
              for s in ("emps", "emps-w/o", "nffa", "msa")},
     "note": "stem left out: all 7 Pd images were routed to the STEM detector, i.e. the same "
             "detector; its rows predate the low-dose smoothing"},
    {"name": "routing cut 0.9 -> 0.5 on the 48 fresh HAADF renders that chose it (shipped)",
     "a": "p(haadf) >= 0.9 to the STEM detector", "b": "p(haadf) >= 0.5 (ROUTE_MIN_P now)",
     "claim": "routing_cut.json: routed F1 0.650 -> 0.686 on the renders",
     "sets": {"haadf-renders": (("routing", "routing_cut.json", 0.9),
                                ("routing", "routing_cut.json", 0.5))},
     "note": "each render has its own seed: image units; not a held-out set"},
    {"name": "low-dose smoothing in the STEM detector's FP32 card 1.2 (shipped; left out of 1.2.1)",
     "a": "STEM detector 1.2, no smoothing", "b": "smoothing to noise 0.05 (shipped)",
     "claim": "CHANGELOG: held out, Pd 0.578 -> 0.593",
     "sets": {"stem": (PD_BEFORE_SMOOTHING,
                       _i(NOISE, "heldout", "sets", "stem", "images", arm="0.05"))}},
    {"name": "low-dose smoothing in the STEM detector's INT8 card (not shipped)",
     "a": "INT8 sibling, no smoothing", "b": "INT8 sibling, smoothing to 0.05",
     "claim": "CHANGELOG: held-out Pd 0.578 -> 0.565 in the INT8 sibling",
     "sets": {"stem": (_i(NOISE, "heldout", "stem_int8", "none", "images"),
                       _i(NOISE, "heldout", "stem_int8", "0.05", "images"))}},
    {"name": "low-dose smoothing in the general detector's card (not shipped)",
     "a": "general detector 3.0, no smoothing", "b": "smoothing to 0.05",
     "claim": "CHANGELOG: held-out NFFA lost 0.451 -> 0.413",
     "sets": {"nffa": (_i(NOISE, "heldout", "sets", "nffa", "images", arm="none"),
                       _i(NOISE, "heldout", "sets", "nffa", "images", arm="0.05"))},
     "note": "the other general sets changed by < 0.001 and keep no image rows"},
    {"name": "second training cycle of STEM detector 1.2 (G), held-out Pd (not shipped)",
     "a": "STEM detector 1.2", "b": "G: 1.2 plus one more phase 2",
     "claim": "CHANGELOG: held-out Pd 0.578 -> 0.535, all of it on one frame",
     "sets": {"stem": (_i("stem_second_cycle.json", "heldout_pd_once", "1.2", "images"),
                       _i("stem_second_cycle.json", "heldout_pd_once", "G", "images"))}},
    {"name": "STEM weight averaging, full recipe (S43-2), held-out Pd (not shipped)",
     "a": "STEM detector 1.2 (shipped)", "b": "soup of three members, its own scale estimate",
     "claim": "weight_averaging.json: Pd 0.593 -> 0.551 (rule: >= 0.603 to ship)",
     "sets": {"stem": (_i(WA, "question_2_stem_full_recipe", "stem_1.2_shipped", "images"),
                       _i(WA, "question_2_stem_full_recipe", "soup_own_estimate", "images"))}},
    {"name": "32 px of edge context on every network call, STEM 1.2 held-out Pd (not shipped)",
     "a": "STEM 1.2 FP32, no edge context", "b": "input.edge_context_px 32",
     "claim": "CHANGELOG: held-out Pd lost 0.593 -> 0.451",
     "sets": {"stem": (_i("edge_context.json", "S42_3_every_call", "heldout_stem_1.2",
                          "images FP32 none"),
                       _i("edge_context.json", "S42_3_every_call", "heldout_stem_1.2",
                          "images FP32 32"))}},
    {"name": "STEM weight averaging on the tuning material Pt (S43-1): soup A vs its control "
             "member",
     "a": "ctl (one member, never saw Pt)", "b": "soup A (BatchNorms averaged), at ctl's "
     "working scales",
     "claim": "weight_averaging.json: Pt 0.617 -> 0.660 at the same scales (the rule compared "
              "with the best member, 0.643, whose image rows are not kept)",
     "sets": {"stem-tune": (_i(WA, "question_1_stem_tuning", "control_per_image"),
                            _i(WA, "question_1_stem_tuning", "soup_A_batchnorm_averaged",
                               "at_ctl_scales", "images"))}},
    {"name": "S43-1's choice: soup A vs soup B on Pt at ctl's working scales",
     "a": "soup B (BatchNorms recomputed)", "b": "soup A (BatchNorms averaged; chosen)",
     "claim": "weight_averaging.json: A 0.660 against B 0.655, A taken",
     "sets": {"stem-tune": (
         _i(WA, "question_1_stem_tuning", "soup_B_batchnorm_recomputed_200_batches",
            "at_ctl_scales", "images"),
         _i(WA, "question_1_stem_tuning", "soup_A_batchnorm_averaged", "at_ctl_scales",
            "images"))}},
    {"name": "STEM pseudo-masks vs their control on Pt, own scale estimates (not shipped)",
     "a": "control (ellipses)", "b": "pseudo-masks",
     "claim": "CHANGELOG: the masks lost 0.617 -> 0.282 (one frame taken to x3)",
     "sets": {"stem-tune": (_i(PM, "question_1", "control (ellipses)", "images"),
                            _i(PM, "question_1", "pseudo-masks", "images"))}},
    {"name": "STEM pseudo-masks vs their control on Pt, both at the control's working scales",
     "a": "control (ellipses)", "b": "pseudo-masks (evaluate --scale-from the control)",
     "claim": "CHANGELOG: 0.617 -> 0.639 at the control's scales",
     "sets": {"stem-tune": (_i(PM, "question_1", _CTL_SCALES + "control", "images"),
                            _i(PM, "question_1", _CTL_SCALES + "pseudo-masks", "images"))}},
    {"name": "STEM card 1.2.1's working-scale fallback 'nearest', held-out Pd (S46-5)",
     "a": "card 1.2 (fallback 'coarse', low-dose smoothing)",
     "b": "card 1.2 with fallback 'nearest'",
     "claim": "scale_nearest.json: Pd 0.593 -> 0.596",
     "sets": {"stem": (_i("scale_nearest.json", "heldout_images", "fp32", "1.2"),
                       _i("scale_nearest.json", "heldout_images", "fp32",
                          "1.2.1 with smoothing"))}},
    {"name": "STEM card 1.2.1 leaves the low-dose smoothing out, held-out Pd (S46-6)",
     "a": "fallback 'nearest' with the smoothing", "b": "card 1.2.1 (shipped): without it",
     "claim": "scale_nearest.json: Pd 0.596 -> 0.587, within the rule's 0.01",
     "sets": {"stem": (_i("scale_nearest.json", "heldout_images", "fp32",
                          "1.2.1 with smoothing"),
                       _i("scale_nearest.json", "heldout_images", "fp32", "1.2.1"))}},
    {"name": "STEM card 1.2 -> 1.2.1 as shipped, held-out Pd",
     "a": "card 1.2", "b": "card 1.2.1", "claim": "README: Pd 0.593 -> 0.587",
     "sets": {"stem": (_i("scale_nearest.json", "heldout_images", "fp32", "1.2"),
                       _i("scale_nearest.json", "heldout_images", "fp32", "1.2.1"))}},
    {"name": "STEM card 1.2.1's INT8 sibling (fallback 'nearest'; never smoothed), held-out Pd",
     "a": "INT8 sibling, card 1.2", "b": "INT8 sibling, card 1.2.1",
     "claim": "scale_nearest.json: Pd 0.578 -> 0.586",
     "sets": {"stem": (_i("scale_nearest.json", "heldout_images", "int8", "1.2"),
                       _i("scale_nearest.json", "heldout_images", "int8", "1.2.1"))}},
    {"name": "the STEM detector vs the general detector on held-out Pd",
     "a": "general detector 3.0 (its card of 2026-12-05 03:33)",
     "b": "STEM detector (shipped: 1.2's network, card 1.2.1)",
     "claim": "README: Pd 0.587 with the STEM detector, 0.14 with the general detector",
     "sets": {"stem": (_h("accuracy_general_detector_stem.json", "stem"), _h(ACC, "stem"))},
     "note": "the two runs are ten hours of card changes apart (content window of the general "
             "card's estimate, the STEM card's smoothing); the difference is far larger"},
    {"name": "STEM detector 1.2 on the general detector's sets",
     "a": "general detector 3.0 (shipped)", "b": "STEM detector 1.2 (card before the "
     "smoothing)",
     "claim": "stem_detector_on_all.json: the STEM detector is not a detector for every frame",
     "sets": {s: (_h(ACC, s), _h("stem_detector_on_all.json", s)) for s in GENERAL_SETS}},
]

NOT_COMPARED = {
    "accuracy_tta4.json": "per-image rows, but run 2026-11-22 (python -m models.evaluate) with "
                          "the card of then; no run without TTA of that card is kept and the "
                          "shipped card changed since (score calibration, self-consistent scale "
                          "estimate, its content window): a difference against accuracy.json "
                          "would mix TTA with those changes",
    "accuracy_stem_detector_synthetic.json": "the same image rows as stem_detector_on_all.json's "
                                             "synthetic set (compared there)",
    "detector_granular.json": "set-level numbers only (no per-image TP/FP/FN)",
    "detector_second_cycle.json": "set-level numbers only",
    "detector_rescue.json": "set-level numbers only (where_it_lost: three images, not all)",
    "detector_ensemble.json": "set-level numbers only (tuning sets)",
    "detector_candidates.json": "set-level numbers only",
    "weight_averaging.json question_3 (WiSE-FT) and S43-1's other members":
        "set-level numbers only",
    "stem_second_cycle.json proxy_cu": "set-level numbers per score cut only",
}


def _load(file: str, cache: dict[str, Any]) -> Any:
    if file not in cache:
        cache[file] = json.loads((RESULTS / file).read_text())
    return cache[file]


def _rows(spec: Spec, name: str, cache: dict[str, Any]) -> list[dict[str, Any]]:
    """Image rows ``{"id", "group", "model": {tp, fp, fn}}`` of one arm."""
    kind, file = spec[0], spec[1]
    res = _load(file, cache)
    if kind == "harness":
        return harness_rows(res, spec[2])
    if kind == "routing":  # frames at or above the cut to the STEM detector
        return [{"id": f"render{r['k']}", "group": name,
                 "model": r["stem"] if r["p_haadf"] >= spec[2] else r["general"]}
                for r in res["rows"]]
    node = res
    for key in spec[2]:
        node = node[key]
    # the group of an image as the harness gives it (EMPS: its paper), else the set's name
    acc = _load(ACC, cache)["sets"].get(name.removesuffix("-w/o"), {}).get("images", [])
    groups = {r["id"]: r["group"] for r in acc}
    return [{"id": k, "group": groups.get(k, name),
             "model": {c: (v if spec[3] is None else v[spec[3]])[c] for c in ("tp", "fp", "fn")}}
            for k, v in node.items()]


def _source(spec: Spec) -> str:
    if spec[0] == "harness":
        return f"{spec[1]} sets.{spec[2]} (model)"
    if spec[0] == "routing":
        return f"{spec[1]} rows, routed at p(haadf) >= {spec[2]}"
    return f"{spec[1]} " + ".".join(spec[2]) + ("" if spec[3] is None else f".*.{spec[3]}")


def shipped(n_resamples: int, seed: int, cache: dict[str, Any]) -> dict[str, Any]:
    """Intervals of accuracy.json's held-out sets, model and baseline."""
    acc = _load(ACC, cache)
    out: dict[str, Any] = {}
    for name in HELDOUT:
        rows = harness_rows(acc, name)
        block: dict[str, Any] = {"detector": acc["sets"][name.removesuffix("-w/o")]["model"]}
        for method in ("model", "baseline"):
            ci = interval(rows, method, set_name=name, n_resamples=n_resamples, seed=seed)
            bca = interval(rows, method, set_name=name, n_resamples=n_resamples, seed=seed,
                           ci_method="BCa")
            block["unit"], block["n_units"], block["n_images"] = (ci["unit"], ci["n_units"],
                                                                   ci["n_images"])
            block[method] = {k: ci[k] for k in ("f1", "f1_ci95", "precision", "precision_ci95",
                                                "recall", "recall_ci95", "note")}
            block[method]["f1_ci95_bca"] = bca["f1_ci95"]
            if bca["note"]:
                block[method]["bca_note"] = bca["note"]
        out[name] = block
    return out


def comparisons(n_resamples: int, seed: int, cache: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired differences of :data:`COMPARISONS`."""
    out = []
    for c in COMPARISONS:
        entry = {k: c[k] for k in ("name", "a", "b", "claim")}
        if "note" in c:
            entry["note"] = c["note"]
        entry["sets"] = {}
        for name, (sa, sb) in c["sets"].items():
            r = compare(_rows(sa, name, cache), _rows(sb, name, cache), set_name=name,
                        n_resamples=n_resamples, seed=seed)
            entry["sets"][name] = {"a_rows": _source(sa), "b_rows": _source(sb), **r}
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: compute the intervals and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path,
                    default=RESULTS / "accuracy_intervals.json")
    ap.add_argument("--n-resamples", type=int, default=N_RESAMPLES)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    cache: dict[str, Any] = {}
    res: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.accuracy_intervals", *given]),
        "what": __doc__.split("\n")[0],
        "ci": {"level": LEVEL, "method": CI_METHOD, "n_resamples": args.n_resamples,
               "seed": args.seed, "resampler": "scipy.stats.bootstrap(paired=True, "
               "vectorized=True), nanoscout.training.intervals",
               "unit": "each image; each EMPS paper (group = DOI) where a set has more than "
                       "one group with several images; synthetic frames always by image",
               "units": "F1, precision, recall and differences in F1 units (0-1)"},
        "source": str(RESULTS / ACC),
        "shipped": shipped(args.n_resamples, args.seed, cache)}
    res["comparisons"] = comparisons(args.n_resamples, args.seed, cache)
    res["not_compared"] = NOT_COMPARED
    res["seconds"] = round(time.perf_counter() - t0, 1)
    for name, s in res["shipped"].items():
        m = s["model"]
        print(f"{name:9s} F1 {m['f1']:.3f} [{m['f1_ci95'][0]:.3f}, {m['f1_ci95'][1]:.3f}] "
              f"({s['n_units']} {s['unit']}s; BCa [{m['f1_ci95_bca'][0]:.3f}, "
              f"{m['f1_ci95_bca'][1]:.3f}])")
    for c in res["comparisons"]:
        print(c["name"])
        for name, r in c["sets"].items():
            ci = r["delta_ci95"]
            print(f"  {name:14s} {r['f1_a']:.3f} -> {r['f1_b']:.3f}  delta {r['delta']:+.3f} "
                  f"[{ci[0]:+.3f}, {ci[1]:+.3f}]  P(B>A) {r['p_b_better']:.3f}"
                  f"{'  excludes 0' if r['excludes_zero'] else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
