"""Paired comparison of two accuracy-harness results on the same images.

::

    python -m nanoscout.training.compare A.json B.json [--sets emps,stem] [--method model]
                                         [--method-b baseline] [--out F.json]

A and B are JSON files written by ``python -m nanoscout.training.evaluate --sets ...`` (one
file twice compares two methods of one run: ``A.json A.json --method baseline --method-b
model``). Per set it prints F1 of A and of B, the difference F1_B - F1_A, its 95 % bootstrap
interval (images, or EMPS papers, resampled together for both: paired), the fraction of
resamples in which B beat A (and in which they tied: resamples of only the images where both
found the same), and whether the interval excludes 0
(:func:`nanoscout.training.intervals.compare`). ``SET-w/o`` names a set without its
``without`` images (``emps-w/o``). Default: every set both files hold with image rows.

A set whose images differ between the files, a missing or unreadable file, a file that is
not a harness result and an unknown set or method are refused with one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nanoscout.training.intervals import (
    CI_METHOD,
    LEVEL,
    N_RESAMPLES,
    SEED,
    compare,
    harness_rows,
)

__all__ = ["RUN_KEYS", "compare_files", "format_comparison", "load_result", "main"]

#: the harness's run settings that a comparison reports when A and B differ in them (the model
#: card's post-processing is not among them: the harness does not record its hash)
RUN_KEYS = ("model", "model_sha256", "stem_model", "route", "min_score", "tta", "rotate45",
            "size_hint", "scale_from", "iou_threshold", "min_true_area_px", "max_images")


def load_result(path: Path) -> dict[str, Any]:
    """Return the harness result in ``path``; SystemExit with one line when it is missing, not
    JSON or not a harness result (no ``sets`` holding per-image rows)."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise SystemExit(f"{path}: no such file") from exc
    except OSError as exc:
        raise SystemExit(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        res = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path}: not JSON ({exc})") from exc
    sets = res.get("sets") if isinstance(res, dict) else None
    if not isinstance(sets, dict) or not any(
            isinstance(v, dict) and isinstance(v.get("images"), list) and v["images"]
            for v in sets.values()):
        raise SystemExit(f"{path}: not a result of the accuracy harness (no 'sets' with "
                         "per-image rows; python -m nanoscout.training.evaluate --sets ... "
                         "writes one)")
    return res


def _sets_with_rows(res: dict[str, Any]) -> list[str]:
    return [s for s, v in res["sets"].items() if isinstance(v, dict) and v.get("images")]


def compare_files(a: Path, b: Path, sets: list[str] | None = None, method: str = "model",
                  method_b: str | None = None, *, n_resamples: int = N_RESAMPLES,
                  seed: int = SEED) -> dict[str, Any]:
    """Return {"a", "b", "method_a", "method_b", "runs_differ_in" (:data:`RUN_KEYS` whose
    values differ: [A's, B's]), "ci", "sets": {set: comparison}} for the
    harness results in files ``a`` and ``b`` (comparison: :func:`nanoscout.training.intervals.
    compare`, F1 units). ``sets`` None: the sets both hold with image rows, in A's order.
    SystemExit with one line for a bad file, an unknown set or method, or images that differ."""
    ra, rb = load_result(a), load_result(b)
    method_b = method if method_b is None else method_b
    if sets is None:
        sets = [s for s in _sets_with_rows(ra) if s in _sets_with_rows(rb)]
        if not sets:
            raise SystemExit(f"{a} and {b} share no set with image rows "
                             f"({a.name}: {', '.join(_sets_with_rows(ra))}; "
                             f"{b.name}: {', '.join(_sets_with_rows(rb))})")
    out: dict[str, Any] = {
        "a": str(a), "b": str(b), "method_a": method, "method_b": method_b,
        "runs_differ_in": {k: [ra.get(k), rb.get(k)] for k in RUN_KEYS
                           if ra.get(k) != rb.get(k)},
        "ci": {"level": LEVEL, "method": CI_METHOD, "n_resamples": n_resamples, "seed": seed},
        "sets": {}}
    for name in sets:
        rows = []
        for path, res in ((a, ra), (b, rb)):
            try:
                rows.append(harness_rows(res, name))
            except KeyError as exc:
                raise SystemExit(f"{path}: {exc.args[0]}") from exc
        try:
            out["sets"][name] = compare(rows[0], rows[1], method, method_b, set_name=name,
                                        n_resamples=n_resamples, seed=seed)
        except ValueError as exc:
            raise SystemExit(f"{a} vs {b}: {exc}") from exc
    return out


def format_comparison(res: dict[str, Any]) -> str:
    """Return a text table of :func:`compare_files`' result: one line per set."""
    width = max([10, *(len(s) + 2 for s in res["sets"])])
    lines = [f"A = {res['a']} ({res['method_a']}), B = {res['b']} ({res['method_b']}); "
             f"{res['ci']['method']} bootstrap, {res['ci']['n_resamples']} resamples, "
             f"seed {res['ci']['seed']}",
             f"{'set':{width}s}{'unit':>16s}{'F1 A':>8s}{'F1 B':>8s}{'delta':>9s}"
             f"{'95% interval':>20s}{'P(B>A)':>8s}{'ties':>7s}  excludes 0"]
    if res.get("runs_differ_in"):
        lines.insert(1, "runs differ in: " + "; ".join(
            f"{k} {va} vs {vb}" for k, (va, vb) in res["runs_differ_in"].items()))
    for name, c in res["sets"].items():
        unit = f"{c['n_units']} {c['unit']}{'s' if c['n_units'] != 1 else ''}"
        ci = c["delta_ci95"]
        span = "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
        p = "-" if c["p_b_better"] is None else f"{c['p_b_better']:.3f}"
        ties = "-" if c["p_tie"] is None else f"{c['p_tie']:.2f}"
        excl = ("- (" + c["note"] + ")" if c["excludes_zero"] is None
                else "yes" if c["excludes_zero"] else "no")
        lines.append(f"{name:{width}s}{unit:>16s}{c['f1_a']:8.3f}{c['f1_b']:8.3f}"
                     f"{c['delta']:+9.3f}{span:>20s}{p:>8s}{ties:>7s}  {excl}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: compare two harness results set by set; print a table, write JSON."""
    ap = argparse.ArgumentParser(
        description="paired bootstrap comparison of two accuracy-harness results "
                    "(F1_B - F1_A on the same images)")
    ap.add_argument("a", type=Path, help="harness JSON of A (python -m nanoscout.training."
                                         "evaluate --sets ... --out A.json)")
    ap.add_argument("b", type=Path, help="harness JSON of B, on the same images")
    ap.add_argument("--sets", default=None,
                    help="comma list of sets, e.g. emps,stem or emps-w/o (EMPS without the "
                         "specks image); default: every set both files hold")
    ap.add_argument("--method", default="model",
                    help="method of A (and of B unless --method-b): model or baseline")
    ap.add_argument("--method-b", default=None, help="method of B (default: --method)")
    ap.add_argument("--n-resamples", type=int, default=N_RESAMPLES)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.n_resamples < 100:
        raise SystemExit(f"--n-resamples {args.n_resamples}: at least 100")
    sets = None if args.sets is None else [s for s in args.sets.split(",") if s]
    if sets == []:
        raise SystemExit("--sets names no set")
    res = compare_files(args.a, args.b, sets, args.method, args.method_b,
                        n_resamples=args.n_resamples, seed=args.seed)
    res = {"command": " ".join(["python -m nanoscout.training.compare",
                                *(sys.argv[1:] if argv is None else argv)]), **res}
    print(format_comparison(res))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
