"""The adaptation benchmark's ``--each`` protocol: every image of a scored material is adapted
on in turn, and the summary reports the mean, the worst and the best over those choices."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from benchmarks.adapt import _each_choice, _summary


def _row(adapt_on: str, before: float, after: float) -> dict[str, Any]:
    return {"adapt_on": adapt_on, "before": {"f1": before}, "after": {"f1": after},
            "gain_f1": round(after - before, 4), "target_f1": 0.75, "met": after >= 0.75,
            "adapt_wall_s": 100.0, "image_shape": [64, 64]}


def test_each_choice_adapts_on_every_other_image_and_scores_the_rest() -> None:
    ss = [SimpleNamespace(id=n) for n in ("a", "b", "c")]
    case = {"key": "stem/Pd", "kind": "scored", "samples": ss, "target_f1": 0.75}
    more = _each_choice(case)
    assert [c["key"] for c in more] == ["stem/Pd@b", "stem/Pd@c"]
    assert [[s.id for s in c["samples"]] for c in more] == [["b", "a", "c"], ["c", "a", "b"]]
    assert all(c["target_f1"] == 0.75 for c in more) and case["key"] == "stem/Pd"


def test_the_summary_gives_mean_worst_and_best_over_the_choices() -> None:
    results = {"stem/Pd": _row("a", 0.6, 0.5), "stem/Pd@b": _row("b", 0.6, 0.8),
               "stem/Pd@c": _row("c", 0.6, 0.6), "nffa": _row("n1", 0.7, 0.7)}
    each = _summary(results)["each_choice"]
    assert list(each) == ["stem/Pd"]  # one choice of NFFA is no spread
    pd = each["stem/Pd"]
    assert pd["n_choices"] == 3 and abs(pd["mean_after_f1"] - 0.6333) < 1e-4
    assert pd["worst_after"] == ("a", 0.5) and pd["best_after"] == ("b", 0.8)
    assert (pd["n_better"], pd["n_worse"], pd["n_met"]) == (1, 1, 1)
