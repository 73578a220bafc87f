"""The routing-cut benchmark: the routed pipeline takes each frame's detector by its p(haadf)
and the cut, and a real run renders fresh HAADF frames, scores both shipped detectors on them
and reads p(haadf) of the tuning frames that must stay with the general detector."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.routing_cut import main, summarize


def _row(p: float, general: tuple[int, int, int], stem: tuple[int, int, int]) -> dict:
    keys = ("tp", "fp", "fn")
    return {"p_haadf": p, "general": dict(zip(keys, general)), "stem": dict(zip(keys, stem))}


def test_the_cut_decides_which_detector_counts() -> None:
    rows = [_row(0.95, (5, 0, 5), (10, 0, 0)),   # sure: the STEM detector finds all
            _row(0.6, (10, 0, 0), (0, 0, 10)),   # unsure: only the general one finds them
            _row(0.1, (4, 4, 0), (4, 0, 0))]
    s = summarize(rows, cuts=(0.5, 0.9))
    at_05, at_09 = s["routed_at_cut"]["0.5"], s["routed_at_cut"]["0.9"]
    assert (at_05["to_stem"], at_09["to_stem"]) == (2, 1)
    assert (at_05["tp"], at_05["fp"], at_05["fn"]) == (14, 4, 10)  # stem, stem, general
    assert (at_09["tp"], at_09["fp"], at_09["fn"]) == (24, 4, 0)   # stem, general, general
    assert at_09["f1"] == round(48 / 52, 4) > at_05["f1"] == round(28 / 42, 4)
    bands = s["by_p_haadf"]
    assert bands["[0.5, 0.7)"]["general"]["tp"] == 10 and bands["[0.5, 0.7)"]["stem"]["tp"] == 0
    assert bands["[0.9, 1.0]"]["stem"]["n_frames"] == 1
    assert bands["[0.7, 0.9)"]["general"] == {"n_frames": 0, "tp": 0, "fp": 0, "fn": 0, "f1": 0.0}


def test_a_real_run_scores_both_detectors_on_fresh_renders(shared_data: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "cut.json"
    main(["--n", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 2
    for row in res["rows"]:
        assert 0.0 <= row["p_haadf"] <= 1.0 and row["n_true"] > 0
        for det in ("general", "stem"):
            # every required particle (>= 12 px) is found or missed, once
            assert 0 < row[det]["tp"] + row[det]["fn"] <= row["n_true"]
    assert sum(r["stem"]["tp"] for r in res["rows"]) > 0
    # the EMPS tuning papers and the Pt bright-field frames, none of them HAADF
    assert len(res["not_haadf_p"]) >= 20 + 4
    assert res["not_haadf_max_p"] < res["route_min_p"]
