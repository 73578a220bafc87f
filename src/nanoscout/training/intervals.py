"""Bootstrap confidence intervals of the accuracy harness's pooled F1, and paired comparisons.

The harness (:mod:`nanoscout.training.evaluate`) pools a set's particles: F1 = 2 TP / (2 TP +
FP + FN) over all of its images, so one image with thousands of false particles moves it far.
How far would it move on another draw of images like these? Here the *images* (or groups of
images that are not independent) are drawn again, with replacement, and the pooled F1 is
computed on each draw (:func:`scipy.stats.bootstrap`, ``paired=True``: one draw of units for
TP, FP and FN together, and for both arms of a comparison).

Resampling unit (:func:`resampling_unit`): the rows of one ``group`` are one unit when the set
has more than one group holding several images: the EMPS papers (``group`` = DOI), whose
images share a microscope, a specimen and an annotator. Otherwise each image is a unit (STEM
Pd: one material; NFFA, ``msa``: one group). The synthetic sets (:data:`STRATA_SETS`) are
always resampled by image: their group is the modality of frames rendered each from its own
seed, a stratum and not a cluster. An interval says how much the pooled number depends on
*which* of such images were drawn; with 5-7 images of one material or one in-situ series it
does not cover what another material or series would give, and a bootstrap over that few
units is known to be too narrow. Particles inside an image are not resampled: an image's
TP / FP / FN are taken as they are.

Percentile intervals (:data:`CI_METHOD`) rather than BCa: most held-out sets have 5-7 units,
where BCa's acceleration (a jackknife over those 5-7 values) and bias correction are
themselves noisy and where it degenerates (NaN) when the two arms of a comparison agree on
every image; one method for every set keeps the intervals comparable. ``ci_method="BCa"``
is available (a report of the sensitivity) and falls back to the percentile interval, saying
so in ``note``, where scipy cannot form it.

Numbers: F1, precision, recall and their bounds in [0, 1] (not %); ``delta`` = F1_B - F1_A in
F1 units; ``p_b_better`` the fraction of resamples in which F1_B > F1_A.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["CI_METHOD", "LEVEL", "N_RESAMPLES", "SEED", "STRATA_SETS", "UNIT_NOUNS",
           "add_intervals", "compare", "harness_rows", "interval", "resampling_unit"]

#: resamples per interval (about 10-30 ms for 65 units here)
N_RESAMPLES = 9999
#: seed of the resampling: the same rows give the same interval
SEED = 17
#: two-sided confidence level of every interval
LEVEL = 0.95
CI_METHOD = "percentile"
#: sets whose ``group`` is a stratum of independent frames (the modality), never a cluster:
#: :data:`nanoscout.training.evaluate.SYNTHETIC_SETS`
STRATA_SETS = ("synthetic", "synthetic-tune", "granular-tune", "agglomerate-tune")
#: what a group is, per set (the name before ``:`` or ``-w/o``); others: "group"
UNIT_NOUNS = {"emps": "paper", "emps-tune": "paper", "stem": "material",
              "stem-tune": "material"}

Rows = Sequence[dict[str, Any]]


def _set_kind(name: str) -> str:
    return name.split(":", 1)[0].removesuffix("-w/o")


def resampling_unit(rows: Rows, set_name: str = "") -> str:
    """Return what one resampling unit of ``rows`` (harness image rows) is: ``"image"``, or
    the set's noun for its groups (``"paper"`` for EMPS, ``"material"`` for STEM, else
    ``"group"``) when more than one group holds several images and the set is not one of
    :data:`STRATA_SETS`."""
    kind = _set_kind(set_name)
    if kind in STRATA_SETS:
        return "image"
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[str(r.get("group"))] = sizes.get(str(r.get("group")), 0) + 1
    if sum(1 for n in sizes.values() if n > 1) > 1:
        return UNIT_NOUNS.get(kind, "group")
    return "image"


def _counts(rows: Rows, method: str, where: str) -> np.ndarray:
    """(n_rows, 3) int64 array of TP, FP, FN of ``method`` per row."""
    out = np.zeros((len(rows), 3), np.int64)
    for i, r in enumerate(rows):
        m = r.get(method)
        if not isinstance(m, dict) or not all(k in m for k in ("tp", "fp", "fn")):
            have = sorted(k for k, v in r.items() if isinstance(v, dict) and "tp" in v)
            raise ValueError(f"{where}: image {r.get('id')!r} has no tp/fp/fn of method "
                             f"{method!r} (methods: {', '.join(have) or 'none'})")
        out[i] = (m["tp"], m["fp"], m["fn"])
    return out


def _units(rows: Rows, unit: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Sum each (n_rows, 3) array of ``arrays`` per unit: list of (n_units, 3) arrays."""
    if unit == "image":
        return arrays
    keys = [str(r.get("group")) for r in rows]
    order = list(dict.fromkeys(keys))
    index = np.array([order.index(k) for k in keys], np.int64)
    out = []
    for a in arrays:
        s = np.zeros((len(order), 3), np.int64)
        np.add.at(s, index, a)
        out.append(s)
    return out


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pooled (precision, recall, F1) along ``axis``, stacked first, with the conventions of
    :func:`nanoscout.training.evaluate.summarize` (nothing predicted and nothing true: 1)."""
    t, f, n = tp.sum(axis=axis), fp.sum(axis=axis), fn.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(t + f > 0, t / (t + f), np.where(t + n == 0, 1.0, 0.0))
        rec = np.where(t + n > 0, t / (t + n), 1.0)
        f1 = np.where(2 * t + f + n > 0, 2 * t / (2 * t + f + n), 1.0)
    return np.stack([prec, rec, f1]).astype(np.float64)


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Any, n_resamples: int, seed: int,
               ci_method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
    """(low, high, bootstrap distribution, note) of a vector statistic over paired units."""
    from scipy.stats import bootstrap

    # scipy >= 1.15 takes ``rng``; ``random_state`` is its older name for the same seed
    seed_kw = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"

    def run(method: str) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a degenerate BCa interval is refused, not kept
            return bootstrap(data, statistic, n_resamples=n_resamples, paired=True,
                             vectorized=True, confidence_level=LEVEL, method=method,
                             **{seed_kw: seed})

    note = None
    try:
        res = run(ci_method)
        lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(
            res.confidence_interval.high)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ValueError("non-finite bounds")
    except (ValueError, RuntimeWarning, UserWarning) as exc:
        if ci_method == "percentile":
            raise
        note = f"{ci_method} interval not formed ({exc}); percentile interval instead"
        res = run("percentile")
        lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(
            res.confidence_interval.high)
    return lo, hi, np.atleast_2d(res.bootstrap_distribution), note


def _r(x: float) -> float:
    return round(float(x), 4)


def interval(rows: Rows, method: str = "model", *, set_name: str = "",
             n_resamples: int = N_RESAMPLES, seed: int = SEED,
             ci_method: str = CI_METHOD) -> dict[str, Any]:
    """Return the pooled precision, recall and F1 of ``method`` over ``rows`` (harness image
    rows: ``{"id", "group", method: {"tp", "fp", "fn", ...}}``) with their 95 % intervals.

    Keys: ``precision``, ``recall``, ``f1`` (the point values, as the harness's ``summarize``
    gives them, rounded to 4 places); ``precision_ci95``, ``recall_ci95``, ``f1_ci95``: [low,
    high] or None; ``unit`` (:func:`resampling_unit`), ``n_units``, ``n_images``,
    ``ci_method`` and ``note`` (why there is no interval, or that BCa fell back; else None).
    Raises ValueError when a row lacks ``method``'s counts.
    """
    c = _counts(rows, method, set_name or "rows")
    unit = resampling_unit(rows, set_name)
    (u,) = _units(rows, unit, [c])
    point = _prf(u[:, 0], u[:, 1], u[:, 2]) if len(u) else np.array([1.0, 1.0, 1.0])
    out: dict[str, Any] = {"precision": _r(point[0]), "recall": _r(point[1]),
                           "f1": _r(point[2]), "precision_ci95": None, "recall_ci95": None,
                           "f1_ci95": None, "unit": unit, "n_units": len(u),
                           "n_images": len(rows), "ci_method": ci_method, "note": None}
    if len(u) < 2:
        out["note"] = (f"{len(u)} resampling unit{'' if len(u) == 1 else 's'} "
                       f"({unit}): no interval")
        return out
    lo, hi, _, note = _bootstrap((u[:, 0], u[:, 1], u[:, 2]), _prf, n_resamples, seed,
                                 ci_method)
    for k, name in enumerate(("precision", "recall", "f1")):
        out[f"{name}_ci95"] = [_r(lo[k]), _r(hi[k])]
    if note:
        out["ci_method"], out["note"] = "percentile", note
    return out


def _aligned(rows_a: Rows, rows_b: Rows, where: str) -> list[dict[str, Any]]:
    """``rows_b`` in the order of ``rows_a``'s ids; ValueError unless both hold the same
    images (ids, each once) with the same groups."""
    def ids(rows: Rows, side: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            key = str(r.get("id"))
            if key in out:
                raise ValueError(f"{where}: image {key!r} appears twice in {side}")
            out[key] = dict(r)
        return out

    a, b = ids(rows_a, "A"), ids(rows_b, "B")
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(
            f"{where}: A and B do not hold the same images ({len(a)} vs {len(b)}; only in A: "
            f"{', '.join(only_a[:5]) or 'none'}{' ...' if len(only_a) > 5 else ''}; only in "
            f"B: {', '.join(only_b[:5]) or 'none'}{' ...' if len(only_b) > 5 else ''})")
    for k, r in a.items():
        if str(r.get("group")) != str(b[k].get("group")):
            raise ValueError(f"{where}: image {k!r} is in group {r.get('group')!r} in A and "
                             f"{b[k].get('group')!r} in B")
    return [b[k] for k in a]


def compare(rows_a: Rows, rows_b: Rows, method_a: str = "model", method_b: str | None = None,
            *, set_name: str = "", n_resamples: int = N_RESAMPLES, seed: int = SEED,
            ci_method: str = CI_METHOD) -> dict[str, Any]:
    """Return the paired difference F1_B - F1_A of ``method_b`` on ``rows_b`` and ``method_a``
    on ``rows_a`` (default: the same method), both harness image rows of the same images.

    Both arms are resampled with the same units (paired), so what the images share cancels.
    Keys: ``f1_a``, ``f1_b``, ``delta`` (F1 units, 4 places); ``delta_ci95``: [low, high] or
    None; ``p_b_better`` / ``p_tie``: fractions of resamples with F1_B > F1_A / equal (None
    without an interval); ``excludes_zero`` (the interval lies wholly above or below 0; None
    without one); ``unit``, ``n_units``, ``n_images``, ``n_images_differing`` (images whose
    TP/FP/FN differ between the arms), ``ci_method``, ``note``.

    Raises ValueError when the two row lists do not hold the same image ids (each once) in the
    same groups, when an image's true particles (TP + FN) differ between A and B (not the same
    truth), or when a row lacks a method's counts.
    """
    method_b = method_a if method_b is None else method_b
    where = set_name or "rows"
    rows_b = _aligned(rows_a, rows_b, where)
    ca, cb = _counts(rows_a, method_a, where), _counts(rows_b, method_b, where)
    for r, x, y in zip(rows_a, ca, cb, strict=True):
        if x[0] + x[2] != y[0] + y[2]:
            raise ValueError(f"{where}: image {r.get('id')!r} has {x[0] + x[2]} true particles "
                             f"in A and {y[0] + y[2]} in B: not scored against the same truth")
    unit = resampling_unit(rows_a, set_name)
    ua, ub = _units(rows_a, unit, [ca, cb])

    def delta(tpa: np.ndarray, fpa: np.ndarray, fna: np.ndarray, tpb: np.ndarray,
              fpb: np.ndarray, fnb: np.ndarray, axis: int = -1) -> np.ndarray:
        return _prf(tpb, fpb, fnb, axis)[2] - _prf(tpa, fpa, fna, axis)[2]

    f1a = float(_prf(ua[:, 0], ua[:, 1], ua[:, 2])[2]) if len(ua) else 1.0
    f1b = float(_prf(ub[:, 0], ub[:, 1], ub[:, 2])[2]) if len(ub) else 1.0
    out: dict[str, Any] = {
        "f1_a": _r(f1a), "f1_b": _r(f1b), "delta": _r(f1b - f1a), "delta_ci95": None,
        "p_b_better": None, "p_tie": None, "excludes_zero": None, "unit": unit,
        "n_units": len(ua), "n_images": len(rows_a),
        "n_images_differing": int(np.any(ca != cb, axis=1).sum()), "ci_method": ci_method,
        "note": None}
    if len(ua) < 2:
        out["note"] = (f"{len(ua)} resampling unit{'' if len(ua) == 1 else 's'} "
                       f"({unit}): no interval")
        return out
    data = (ua[:, 0], ua[:, 1], ua[:, 2], ub[:, 0], ub[:, 1], ub[:, 2])
    lo, hi, dist, note = _bootstrap(data, delta, n_resamples, seed, ci_method)
    d = dist[0]
    low, high = _r(lo[0]), _r(hi[0])
    out["delta_ci95"] = [low, high]
    out["p_b_better"] = _r(np.mean(d > 1e-12))
    out["p_tie"] = _r(np.mean(np.abs(d) <= 1e-12))
    out["excludes_zero"] = low > 0 or high < 0  # as the rounded bounds read
    if note:
        out["ci_method"], out["note"] = "percentile", note
    return out


def harness_rows(res: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Return the image rows of set ``name`` of a harness result ``res`` (``res["sets"]``);
    ``NAME-w/o``: the rows of ``NAME`` without its ``without`` ids (the EMPS specks image).
    Raises KeyError naming the sets there are when ``name`` is not one of them."""
    sets = res.get("sets") or {}
    base = name.removesuffix("-w/o")
    avail = sorted([s for s, v in sets.items() if isinstance(v, dict) and v.get("images")]
                   + [f"{s}-w/o" for s, v in sets.items()
                      if isinstance(v, dict) and v.get("images") and "without" in v])
    if name not in avail:
        raise KeyError(f"no set {name!r} with image rows (sets: {', '.join(avail) or 'none'})")
    rows = list(sets[base]["images"])
    if name != base:
        left = set(sets[base]["without"]["ids"])
        rows = [r for r in rows if r["id"] not in left]
    return rows


def add_intervals(set_result: dict[str, Any], set_name: str, *,
                  n_resamples: int = N_RESAMPLES, seed: int = SEED) -> None:
    """Add intervals to one set of a harness result (:func:`evaluate_set`'s output), in place:
    ``ci_unit`` and ``ci_n_units`` on the set; ``f1_ci95``, ``precision_ci95`` and
    ``recall_ci95`` ([low, high] or None) on each method, and ``f1_ci95_note`` where there is
    no interval; the same in ``without``. Existing keys are left as they are."""
    def fill(block: dict[str, Any], rows: Rows) -> None:
        unit = n_units = None
        for method, m in block["methods"].items():
            ci = interval(rows, method, set_name=set_name, n_resamples=n_resamples, seed=seed)
            unit, n_units = ci["unit"], ci["n_units"]
            for k in ("f1_ci95", "precision_ci95", "recall_ci95"):
                m[k] = ci[k]
            if ci["f1_ci95"] is None:
                m["f1_ci95_note"] = ci["note"]
        block["ci_unit"], block["ci_n_units"] = unit, n_units

    rows = set_result.get("images", [])
    fill(set_result, rows)
    if "without" in set_result:
        left = set(set_result["without"]["ids"])
        fill(set_result["without"], [r for r in rows if r["id"] not in left])
