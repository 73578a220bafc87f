"""Bootstrap intervals of the harness's pooled F1 and paired comparisons
(``nanoscout.training.intervals``, ``nanoscout.training.compare``), on real harness results."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nanoscout.training.compare import main as compare_main
from nanoscout.training.evaluate import SYNTHETIC_SETS
from nanoscout.training.intervals import (
    STRATA_SETS,
    add_intervals,
    compare,
    harness_rows,
    interval,
    resampling_unit,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FAST = 999  # resamples: enough for the properties tested, quick


@pytest.fixture(scope="module")
def accuracy() -> dict[str, Any]:
    """The shipped detectors' held-out harness result (88 EMPS images of 65 papers, ...)."""
    result: dict[str, Any] = json.loads((RESULTS / "accuracy.json").read_text())
    return result


def test_the_interval_holds_the_harness_f1_and_emps_resamples_papers(
        accuracy: dict[str, Any]) -> None:
    for name in ("synthetic", "emps", "emps-w/o", "stem", "nffa", "msa"):
        rows = harness_rows(accuracy, name)
        block = accuracy["sets"][name.removesuffix("-w/o")]
        if name.endswith("-w/o"):
            block = block["without"]
        for method in ("model", "baseline"):
            ci = interval(rows, method, set_name=name, n_resamples=FAST)
            assert ci["f1"] == block["methods"][method]["f1"]  # summarize's number
            assert ci["precision"] == block["methods"][method]["precision"]
            lo, hi = ci["f1_ci95"]
            assert lo <= ci["f1"] <= hi and lo < hi
    emps = harness_rows(accuracy, "emps")
    ci = interval(emps, set_name="emps", n_resamples=FAST)
    assert ci["unit"] == "paper" and ci["n_images"] == 88
    assert ci["n_units"] == len({r["group"] for r in emps}) == 65
    # one paper holds the specks image: its presence or absence in a draw swings F1 widely
    assert ci["f1_ci95"][1] - ci["f1_ci95"][0] > 0.3
    assert interval(harness_rows(accuracy, "stem"), set_name="stem")["unit"] == "image"


def test_a_papers_images_move_together(accuracy: dict[str, Any]) -> None:
    """Each EMPS image twice, in its paper: the same papers, the same interval. The same
    copies as independent images (a group each) would narrow it: 176 units, not 65."""
    emps = harness_rows(accuracy, "emps")
    twice = emps + [{**r, "id": r["id"] + "-copy"} for r in emps]
    once = interval(emps, set_name="emps", n_resamples=FAST)
    doubled = interval(twice, set_name="emps", n_resamples=FAST)
    assert doubled["n_units"] == once["n_units"] == 65
    assert doubled["f1_ci95"] == once["f1_ci95"]
    alone = [{**r, "group": r["id"]} for r in twice]
    independent = interval(alone, set_name="emps", n_resamples=FAST)
    assert independent["unit"] == "image" and independent["n_units"] == 176
    width = [c["f1_ci95"][1] - c["f1_ci95"][0] for c in (once, independent)]
    assert width[1] < 0.9 * width[0]


def test_synthetic_frames_are_resampled_one_by_one(accuracy: dict[str, Any]) -> None:
    rows = harness_rows(accuracy, "synthetic")
    assert len({r["group"] for r in rows}) == 3  # TEM, STEM, SEM: several frames each
    assert resampling_unit(rows, "synthetic") == "image"
    assert resampling_unit(rows, "nffa") == "group"  # the same rows in a set of clusters
    assert set(STRATA_SETS) == set(SYNTHETIC_SETS)


def test_identical_results_differ_by_exactly_zero(accuracy: dict[str, Any]) -> None:
    for name in ("emps", "stem", "msa"):
        rows = harness_rows(accuracy, name)
        c = compare(rows, copy.deepcopy(rows), set_name=name, n_resamples=FAST)
        assert c["delta"] == 0 and c["delta_ci95"] == [0.0, 0.0]
        assert c["p_b_better"] == 0 and c["p_tie"] == 1 and c["excludes_zero"] is False
        assert c["n_images_differing"] == 0
    # BCa cannot be formed on a difference that never varies: the percentile one is given
    c = compare(rows, rows, set_name="msa", n_resamples=FAST, ci_method="BCa")
    assert c["delta_ci95"] == [0.0, 0.0] and c["ci_method"] == "percentile"
    assert "percentile" in c["note"]


def _better(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each image one more particle found and a third fewer false ones (truth unchanged)."""
    out = copy.deepcopy(rows)
    for r in out:
        m = r["model"]
        found = 1 if m["fn"] else 0
        m["tp"], m["fn"], m["fp"] = m["tp"] + found, m["fn"] - found, m["fp"] * 2 // 3
    return out


def test_a_result_better_on_every_image_has_a_positive_interval(
        accuracy: dict[str, Any]) -> None:
    for name in ("emps", "stem", "nffa"):
        rows = harness_rows(accuracy, name)
        c = compare(rows, _better(rows), set_name=name, n_resamples=FAST)
        assert c["delta"] > 0 and c["delta_ci95"][0] > 0 and c["excludes_zero"] is True
        assert c["p_b_better"] == 1.0
        assert c["delta_ci95"][0] <= c["delta"] <= c["delta_ci95"][1]
        back = compare(_better(rows), rows, set_name=name, n_resamples=FAST)
        assert back["delta_ci95"] == [-c["delta_ci95"][1], -c["delta_ci95"][0]]


def test_different_images_or_truth_are_refused(accuracy: dict[str, Any]) -> None:
    rows = harness_rows(accuracy, "stem")
    with pytest.raises(ValueError, match=f"only in A: {rows[-1]['id']}"):
        compare(rows, rows[:-1], set_name="stem")
    other = copy.deepcopy(rows)
    other[0]["model"]["fn"] += 1
    with pytest.raises(ValueError, match="same truth"):
        compare(rows, other, set_name="stem")
    with pytest.raises(ValueError, match="twice"):
        compare(rows + rows[:1], rows + rows[:1], set_name="stem")
    # the same images in another order are the same images
    assert compare(rows, rows[::-1], set_name="stem", n_resamples=FAST)["delta"] == 0


def test_one_unit_gives_no_interval_and_says_why(accuracy: dict[str, Any]) -> None:
    rows = harness_rows(accuracy, "msa")[:1]
    ci = interval(rows, set_name="msa")
    assert ci["f1_ci95"] is None and "1 resampling unit" in ci["note"]
    assert compare(rows, rows, set_name="msa")["delta_ci95"] is None


def test_harness_sets_get_intervals_and_the_table_shows_them() -> None:
    """A real evaluate_set run (the classical baseline on three held-out synthetic frames)."""
    from nanoscout.training.baseline import BaselineDetector
    from nanoscout.training.evaluate import evaluate_set, format_table, synthetic_samples

    out = evaluate_set({"baseline": BaselineDetector()}, synthetic_samples(3),
                       leave_out=("seed12345",))
    before = copy.deepcopy(out)
    add_intervals(out, "synthetic", n_resamples=FAST)
    assert out["ci_unit"] == "image" and out["ci_n_units"] == 3
    m = out["methods"]["baseline"]
    assert m["f1_ci95"][0] <= m["f1"] <= m["f1_ci95"][1]
    assert {k: v for k, v in m.items() if "ci95" not in k} == before["methods"]["baseline"]
    assert out["without"]["ci_n_units"] == 2
    assert out["without"]["methods"]["baseline"]["f1_ci95"] is not None
    table = format_table({"sets": {"synthetic": out}})
    lo, hi = m["f1_ci95"]
    assert f"{lo:.3f}-{hi:.3f}" in table


def test_the_harness_writes_f1_ci95(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from nanoscout.analysis.modelcard import shipped_model_dir
    from nanoscout.training.evaluate import main

    if not (shipped_model_dir() / "detector.onnx").is_file():
        pytest.skip("no shipped detector")
    out = tmp_path / "a.json"
    main(["--sets", "synthetic", "--n", "2", "--threads", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    s = res["sets"]["synthetic"]
    assert s["ci_unit"] == "image" and s["ci_n_units"] == 2
    assert res["ci"]["n_resamples"] == 9999 and res["ci"]["method"] == "percentile"
    for m in s["methods"].values():
        assert m["f1_ci95"][0] <= m["f1"] <= m["f1_ci95"][1]


def test_compare_command_prints_and_writes_the_paired_difference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    compare_main([str(RESULTS / "accuracy.json"), str(RESULTS / "accuracy_oracle_scale.json"),
                  "--sets", "emps,emps-w/o,msa", "--n-resamples", str(FAST),
                  "--out", str(out)])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["sets"]) == ["emps", "emps-w/o", "msa"]
    emps = res["sets"]["emps"]
    assert emps["unit"] == "paper" and (emps["f1_a"], emps["f1_b"]) == (0.6282, 0.7458)
    assert emps["delta_ci95"][0] <= emps["delta"] <= emps["delta_ci95"][1]
    assert any(line.split()[:3] == ["emps", "65", "papers"] for line in text.splitlines())
    # one file, two methods: the model against the classical baseline
    compare_main([str(RESULTS / "accuracy.json")] * 2 + [
        "--sets", "msa", "--method", "baseline", "--method-b", "model", "--n-resamples",
        str(FAST)])
    assert "+0.781" in capsys.readouterr().out


def _fail(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        compare_main(args)
    message = str(exc.value.code)
    assert "\n" not in message
    return message


def test_compare_command_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    acc = str(RESULTS / "accuracy.json")
    assert "no such file" in _fail([acc, str(tmp_path / "none.json")])
    (tmp_path / "bad.json").write_text("{")
    assert "not JSON" in _fail([str(tmp_path / "bad.json"), acc])
    assert "not a result of the accuracy harness" in _fail([acc, str(RESULTS / "latency.json")])
    assert "no set 'emps-tune'" in _fail([acc, acc, "--sets", "emps-tune"])
    res = json.loads((RESULTS / "accuracy.json").read_text())
    res["sets"]["stem"]["images"].pop()
    (tmp_path / "short.json").write_text(json.dumps(res))
    message = _fail([acc, str(tmp_path / "short.json"), "--sets", "stem"])
    assert "do not hold the same images" in message and "stem" in message


def test_compare_command_exits_1_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nanoscout.training.compare",
                           str(RESULTS / "accuracy.json"), str(tmp_path / "missing.json")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"{tmp_path / 'missing.json'}: no such file"]
