"""``nanoscout models adapt``: the ONNX -> torch rebuild is exact, the command writes a model
the detector loads with the adaptation recorded in its card, and on real STEM data the adapted
model beats the shipped one on the material's other images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("torch")

from nanoscout.analysis.detector import Detector, load_detector
from nanoscout.analysis.modelcard import ModelCard, sha256_file, shipped_model_dir
from nanoscout.cli.main import main
from nanoscout.engines import Engine, create_engine
from nanoscout.training.adapt import _choose
from nanoscout.training.adapt import adapt as adapt_run
from nanoscout.wire.errors import ConfigError


def test_onnx_rebuild_matches_onnx_runtime() -> None:
    import torch

    from nanoscout.training.onnx_weights import unet_from_onnx

    for name in ("detector.onnx", "detector_stem.onnx"):
        path = shipped_model_dir() / name
        model = unet_from_onnx(path)
        x = np.random.default_rng(1).random((1, 1, 160, 224), dtype=np.float32)
        engine = create_engine(path, "onnxruntime-cpu", threads=1)
        ref = engine.infer({"image": x})["logits"]
        engine.close()
        with torch.no_grad():
            got = model(torch.from_numpy(x)).numpy()
        assert float(np.max(np.abs(got - ref))) < 1e-4, name


def _engine(path: Path) -> Engine:
    return create_engine(path, "onnxruntime-cpu", threads=1)


def _synthetic_pair(tmp_path: Path, seed: int = 3) -> tuple[Path, Path]:
    from nanoscout.sim.synthetic import SpecimenConfig, render

    cfg = SpecimenConfig(shape=(128, 160), pixel_size_nm=1.0, median_diameter_nm=14.0,
                         coverage=0.2)
    fr = render(cfg, seed)
    img, lab = tmp_path / f"frame{seed}.tif", tmp_path / f"frame{seed}.labels.tif"
    tifffile.imwrite(img, fr.image)
    tifffile.imwrite(lab, fr.labels.astype(np.uint16))
    return img, lab


def test_adapt_command_writes_a_model_the_detector_loads(tmp_path: Path) -> None:
    img, lab = _synthetic_pair(tmp_path)
    out = tmp_path / "adapted"
    assert main(["models", "adapt", str(img), "--labels", str(lab), "--out", str(out),
                 "--minutes", "0.12", "--no-progress"]) == 0
    card = ModelCard.load(out / "detector.json")  # checks the sha256 too
    assert card.name.endswith("-adapted") and card.metrics is None
    ad = card.training.model_extra["adaptation"]  # type: ignore[index]
    base = shipped_model_dir() / "detector.onnx"
    assert ad["base_model"]["sha256"] == sha256_file(base)
    assert ad["annotated_files"][0]["image"]["sha256"] == sha256_file(img)
    assert ad["annotated_files"][0]["labels"]["sha256"] == sha256_file(lab)
    assert ad["annotated_files"][0]["format"] == "mask"
    assert ad["steps"] > 0 and ad["seconds"] < 60
    assert set(ad["base_rebuild_max_abs_diff"]) == {"torch", "reexported_onnx"}
    assert max(ad["base_rebuild_max_abs_diff"].values()) < 1e-3
    hold = card.evaluation["adaptation_holdout"]
    assert "second half" in hold["data"]
    assert 0 <= hold["before"]["f1"] <= 1 and 0 <= hold["after"]["f1"] <= 1
    assert card.thresholds is not None and card.thresholds.min_score == ad["min_score"]
    det = load_detector(out / "detector.onnx", _engine)
    assert det.detect(tifffile.imread(img)).labels.shape == (128, 160)
    json.loads((out / "detector.json").read_text())  # plain JSON for the daemon


def test_a_fixed_step_count_gives_the_same_model_on_a_busy_machine(tmp_path: Path) -> None:
    """--steps replaces the time budget: two runs with the same inputs and seed write the same
    network, however long each took (the time budget, by contrast, trains as many steps as the
    machine manages)."""
    img, lab = _synthetic_pair(tmp_path)
    digests, steps = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["models", "adapt", str(img), "--labels", str(lab), "--out", str(out),
                     "--steps", "24", "--minutes", "0.01", "--fine-tuned-only",
                     "--no-progress"]) == 0
        ad = ModelCard.load(out / "detector.json").training.model_extra["adaptation"]  # type: ignore[index]
        digests.append(sha256_file(out / "detector.onnx"))
        steps.append((ad["steps"], ad["steps_budget"]))
    assert digests[0] == digests[1]
    assert steps == [(24, 24), (24, 24)]  # 0.01 min would not have allowed them
    assert main(["models", "adapt", str(img), "--labels", str(lab), "--out",
                 str(tmp_path / "c"), "--steps", "3"]) == 2


def test_two_images_leave_one_out_with_labels_listed_after_the_option(tmp_path: Path) -> None:
    (i1, l1), (i2, l2) = _synthetic_pair(tmp_path, 4), _synthetic_pair(tmp_path, 5)
    out = tmp_path / "two"
    assert main(["models", "adapt", str(i1), str(i2), "--labels", str(l1), str(l2), "--out",
                 str(out), "--minutes", "0.2", "--no-progress"]) == 0
    card = ModelCard.load(out / "detector.json")
    files = card.training.model_extra["adaptation"]["annotated_files"]  # type: ignore[index]
    assert [(f["image"]["path"], f["labels"]["path"]) for f in files] == \
        [(str(i1), str(l1)), (str(i2), str(l2))]
    assert card.evaluation["adaptation_holdout"]["data"].startswith(
        "the annotated frames themselves, held out by fold: leave-one-image-out")
    assert card.evaluation["adaptation_holdout"]["before"]["n_matched"] > 0


def test_adapt_refuses_unpaired_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nanoscout.training.adapt import adapt

    img, lab = _synthetic_pair(tmp_path)
    with pytest.raises(ConfigError, match="2 images but 1 label files"):
        adapt([img, img], [lab], tmp_path / "o")
    bad = tmp_path / "bad.txt"
    bad.write_text("0 0.5 0.5\n")
    assert main(["models", "adapt", str(img), "--labels", str(bad), "--out",
                 str(tmp_path / "o"), "--minutes", "0.1"]) == 2
    assert "bad.txt:1: expected 5 fields" in capsys.readouterr().err
    assert main(["models", "adapt", str(img), "--labels", str(lab), "--out",
                 str(tmp_path / "o"), "--choice", "cautious"]) == 2
    assert "choice 'cautious' is not one of best, paired" in capsys.readouterr().err


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("the refusal must come before anything is trained or written")


def test_adapt_refuses_an_out_that_would_replace_the_base_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--out the base model's folder (``--out models/weights`` with the default base) would
    replace the base by the adapted model: refused, with or without --overwrite, before any
    training."""
    import shutil

    from nanoscout.training import adapt as adapt_module

    monkeypatch.setattr(adapt_module, "_adapt", _no_training)
    img, lab = _synthetic_pair(tmp_path)
    shipped = shipped_model_dir()
    w = tmp_path / "w"
    w.mkdir()
    for name in ("detector.onnx", "detector.json"):
        shutil.copyfile(shipped / name, w / name)
    before = {p.name: sha256_file(p) for p in w.iterdir()}
    with pytest.raises(ConfigError, match="holds the base model detector.onnx"):
        adapt_run([img], [lab], w, base=w / "detector.onnx", overwrite=True)
    with pytest.raises(ConfigError, match="holds detector.onnx, detector.json already"):
        adapt_run([img], [lab], w, base=w / "detector.onnx")
    # the default base: the shipped detector's own folder
    with pytest.raises(ConfigError, match="holds the base model detector.onnx"):
        adapt_run([img], [lab], shipped, overwrite=True)
    # a base of another name: its folder still holds it and its card
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(shipped / "detector.onnx", other / "mine.onnx")
    card = ModelCard.load(shipped / "detector.json").model_copy(update={"onnx_file": "mine.onnx"})
    card.dump(other / "mine.json")
    with pytest.raises(ConfigError, match="holds the base model mine.onnx"):
        adapt_run([img], [lab], other, base=other / "mine.onnx")
    assert {p.name: sha256_file(p) for p in w.iterdir()} == before
    assert sorted(p.name for p in other.iterdir()) == ["mine.json", "mine.onnx"]


def test_adapt_refuses_an_out_that_is_a_file_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoscout.training import adapt as adapt_module

    monkeypatch.setattr(adapt_module, "_adapt", _no_training)
    img, lab = _synthetic_pair(tmp_path)
    afile = tmp_path / "notes.txt"
    afile.write_text("precious\n")
    assert main(["models", "adapt", str(img), "--labels", str(lab), "--out", str(afile),
                 "--steps", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {afile} is a file" in err and "Traceback" not in err
    assert afile.read_text() == "precious\n"


def test_an_earlier_model_in_out_is_replaced_only_with_overwrite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, lab = _synthetic_pair(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "detector.onnx").write_text("an earlier specimen's model")
    (out / "detector.json").write_text('{"mine": 1}')
    args = ["models", "adapt", str(img), "--labels", str(lab), "--out", str(out), "--steps",
            "10", "--threads", "1", "--no-progress"]
    assert main(args) == 2
    assert "holds detector.onnx, detector.json already: choose a new folder (--overwrite " \
           "replaces them)" in capsys.readouterr().err
    assert (out / "detector.onnx").read_text() == "an earlier specimen's model"
    assert (out / "detector.json").read_text() == '{"mine": 1}'
    assert main([*args, "--overwrite"]) == 0
    card = ModelCard.load(out / "detector.json")  # the new model, its sha256 checked
    assert card.name.endswith("-adapted")


def test_the_base_network_is_kept_when_fine_tuning_loses_on_the_held_out_half(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An operator who annotated only the right half of a frame: the fold model learns from the
    (empty) left half that there is nothing to find and loses on the right half, so the output
    is the base network itself, with a scale and cut chosen on the annotations."""
    img, lab = _synthetic_pair(tmp_path, seed=5)
    labels = tifffile.imread(lab)
    labels[np.isin(labels, np.unique(labels[:, :80]))] = 0  # no particle touches the left half
    assert len(np.unique(labels)) > 5
    tifffile.imwrite(lab, labels)
    res = adapt_run([img], [lab], tmp_path / "out", threads=1, steps=80)
    grid = ModelCard.load(res.card).evaluation["adaptation_holdout"]["choice"]["f1_by_candidate"]
    best = {net: max(v for k, v in grid.items() if k.startswith(net + ":"))
            for net in ("base", "fine-tuned")}
    assert best["base"] > best["fine-tuned"], grid
    assert res.network == "base" and res.after["f1"] == best["base"]
    shipped = sha256_file(shipped_model_dir() / "detector.onnx")
    assert sha256_file(res.onnx) == shipped
    card = ModelCard.load(res.card)
    ad = card.training.model_extra["adaptation"]  # type: ignore[index]
    assert ad["network"] == "base" and "base network" in card.training.data
    # the scale and cut chosen apply around the particle size measured on the annotated frame;
    # elsewhere the base network analyses with its own card, beside the adapted one
    assert res.base_network == tmp_path / "out" / "base_network.onnx"
    assert sha256_file(res.base_network) == shipped
    assert card.base_network is not None and not card.base_network.merge
    (d,) = ad["particle_px_measured"]
    assert card.base_network.particle_px == pytest.approx((d / 2, d * 2), abs=0.01)
    det, shipped_det = load_detector(res.onnx, _engine), load_detector(
        shipped_model_dir() / "detector.onnx", _engine)
    frame = tifffile.imread(img)
    near = det.detect(frame)
    assert not near.outside_range  # measured at the annotated size (rounded in the card):
    assert near.scale == pytest.approx(card.working_scale.auto.factor(d), rel=1e-3)  # type: ignore[union-attr]
    big = np.kron(frame, np.ones((3, 3), frame.dtype))  # particles 3x larger: outside the band
    for key in (None, "stream", "stream"):  # a stream's frames remember it with their scale
        far = det.detect(big, key=key)
        assert far.outside_range
        assert np.array_equal(far.labels, shipped_det.detect(big).labels)
    det.close()
    shipped_det.close()
    # the daemon's pipeline says so in each det (v1.7), naming the adapted model still
    from nanoscout.analysis.frame import Frame
    from nanoscout.daemon.app import build_pipeline
    from nanoscout.daemon.config import ServeConfig

    pipe = build_pipeline(ServeConfig.model_validate(
        {"engine": {"model": str(res.onnx), "backend": "cpu", "threads": 1,
                    "estimate_modality": False}, "classify": {"enabled": False}}))
    try:
        dets = [pipe.process(Frame.from_image(f, pixel_size_nm=None, source="s", seq=k)).det
                for k, f in enumerate((frame, big))]
    finally:
        pipe.close()
    assert [d.base_network_only for d in dets] == [False, True]
    assert {d.model for d in dets} == {f"{card.name}:{card.version}"}
    assert main(["models", "adapt", str(img), "--labels", str(lab), "--out", str(tmp_path / "ft"),
                 "--minutes", "0.2", "--no-progress", "--fine-tuned-only"]) == 0
    ft = ModelCard.load(tmp_path / "ft" / "detector.json")
    assert ft.training.model_extra["adaptation"]["network"] == "fine-tuned"  # type: ignore[index]
    assert ft.base_network is not None and ft.base_network.particle_px is not None
    lo, hi = ft.base_network.particle_px  # the command tells the operator where it applies
    said = capsys.readouterr()
    assert f"measures at {lo:g}-{hi:g} px" in said.out + said.err
    assert not any(k.startswith("base:") for k in
                   ft.evaluation["adaptation_holdout"]["choice"]["f1_by_candidate"])
    # the fine-tuned network's working scale is measured by the base network, copied beside it
    assert ft.base_network is not None
    assert not ft.base_network.merge  # the merge is the base network's: not with --fine-tuned-only
    est_onnx, est_card = ft.load_base_network(tmp_path / "ft" / "detector.json")  # type: ignore[misc]
    assert est_onnx == tmp_path / "ft" / "base_network.onnx"
    assert sha256_file(est_onnx) == sha256_file(shipped_model_dir() / "detector.onnx")
    engine = _engine(tmp_path / "ft" / "detector.onnx")
    with pytest.raises(ConfigError, match="works with its base network base_network.onnx"):
        Detector(engine, ft)
    engine.close()
    det = load_detector(tmp_path / "ft" / "detector.onnx", _engine)
    assert det.base_detector is not None and det.base_detector.card.sha256 == est_card.sha256
    from nanoscout.analysis.preprocess import normalize

    x = normalize(tifffile.imread(img))
    size = det.base_detector.particle_size(x)
    assert size is not None and size > 4
    assert ft.working_scale is not None
    assert det.estimate_scale(x) == ft.working_scale.auto.factor(size)
    det.close()
    from nanoscout.training.evaluate import run_harness  # the accuracy harness loads it too

    harness = run_harness(tmp_path / "ft" / "detector.onnx", None, ["synthetic"], n=1, threads=1)
    assert harness["sets"]["synthetic"]["detector_scale"] == "auto"


def test_choice_prefers_the_base_network_and_its_card_on_a_tie() -> None:
    row = {"tp": 8, "fp": 2, "fn": 2, "ecd_err_pct": [1.0], "ecd_err_nm": [], "ar_pairs": [],
           "roundness_pairs": [], "d50_pred_px": 10.0, "d50_true_px": 10.0}
    worse = {**row, "tp": 6, "fn": 4}
    grid = {("fine-tuned", "auto", 0.5): [row], ("base", "auto-16", 0.3): [row],
            ("base", "card", 0.9): [worse], ("base", "card", 0.95): [worse]}
    assert _choose(grid, 0.9)[0] == ("base", "auto-16", 0.3)
    grid[("base", "card", 0.9)] = [row]  # the base card as it is wins every tie
    assert _choose(grid, 0.9)[0] == ("base", "card", 0.9)
    grid[("fine-tuned", "auto", 0.7)] = [{**row, "fp": 0}]
    assert _choose(grid, 0.9)[0] == ("fine-tuned", "auto", 0.7)
    # on a tie among fine-tuned candidates: with the base network's particles merged in, then
    # measured by the base network
    best = {**row, "fp": 0}
    grid[("fine-tuned+base", "auto", 0.7)] = [best]
    grid[("fine-tuned-alone", "auto", 0.7)] = [best]
    assert _choose(grid, 0.9)[0] == ("fine-tuned+base", "auto", 0.7)
    del grid[("fine-tuned+base", "auto", 0.7)]
    assert _choose(grid, 0.9)[0] == ("fine-tuned", "auto", 0.7)
    grid[("fine-tuned-alone", "auto", 0.7)] = [{**best, "tp": 9, "fn": 1}]
    assert _choose(grid, 0.9)[0] == ("fine-tuned-alone", "auto", 0.7)  # higher F1 wins


def test_the_paired_choice_departs_from_the_shipped_card_only_beyond_the_count_noise() -> None:
    """``--choice paired``: a candidate must beat the base card as it is by more than the
    noise of the count differences (net gain > sqrt(|dtp| + |dfp|)); among those, the best
    F1 as with ``--choice best``; the card as it is where none does."""
    from nanoscout.training.adapt import beats_by_more_than_noise

    def row(tp: int, fp: int, fn: int) -> dict[str, object]:
        return {"tp": tp, "fp": fp, "fn": fn, "ecd_err_pct": [], "ecd_err_nm": [],
                "ar_pairs": [], "roundness_pairs": [], "d50_pred_px": 10.0, "d50_true_px": 10.0}

    card = row(50, 5, 10)
    assert not beats_by_more_than_noise(row(51, 5, 9), card)  # one more found: 1 > 1 fails
    assert beats_by_more_than_noise(row(52, 5, 8), card)  # 2 > sqrt(2)
    assert not beats_by_more_than_noise(row(53, 7, 7), card)  # 3 - 2 = 1 < sqrt(5)
    assert beats_by_more_than_noise(row(50, 0, 10), card)  # 5 false ones gone: 5 > sqrt(5)
    grid = {("base", "card", 0.9): [card], ("base", "auto-16", 0.5): [row(51, 5, 9)],
            ("fine-tuned", "auto", 0.7): [row(52, 6, 8)]}
    assert _choose(grid, 0.9)[0] == ("fine-tuned", "auto", 0.7)  # best: the highest F1
    assert _choose(grid, 0.9, "paired")[0] == ("base", "card", 0.9)  # no departure is evidence
    grid[("fine-tuned", "auto-32", 0.95)] = [row(56, 2, 4)]
    grid[("fine-tuned+base", "auto", 0.9)] = [row(55, 1, 5)]
    assert _choose(grid, 0.9, "paired")[0] == ("fine-tuned", "auto-32", 0.95)
    del grid[("base", "card", 0.9)]  # the base did not compete: best as before
    assert _choose(grid, 0.9, "paired")[0] == _choose(grid, 0.9)[0]
    with pytest.raises(ConfigError, match="choice rule"):
        _choose(grid, 0.9, "cautious")


def test_a_merged_model_may_find_twice_its_annotated_count_ratio_to_the_base() -> None:
    """``base_network.max_count_ratio`` of a merged adapted model: twice the largest ratio, on
    the annotated frames, of the particles its network alone finds (scale measured by the base
    network, its chosen cut) to the base network's own (at least COUNT_FLOOR)."""
    from nanoscout.analysis.modelcard import COUNT_FLOOR
    from nanoscout.sim.synthetic import SpecimenConfig, render
    from nanoscout.training.adapt import COUNT_MARGIN, Part, _card_for, _count_ratio

    weights = shipped_model_dir()
    base_card = ModelCard.load(weights / "detector_stem.json")
    general = ModelCard.load(weights / "detector.json")
    source = Detector(create_engine(weights / "detector.onnx", "onnxruntime-cpu", threads=1),
                      general.model_copy(update={"score_calibration": None}))
    frames = [render(SpecimenConfig(modality="STEM", shape=(320, 320), pixel_size_nm=1.0,
                                    median_diameter_nm=d, coverage=0.15), 3).image
              for d in (8.0, 14.0)]
    parts = [Part(f"f{i}", f, np.zeros(f.shape, np.int32), None) for i, f in enumerate(frames)]
    ratio = _count_ratio(weights / "detector_stem.onnx", base_card, "auto-16", 0.7, source,
                         parts, 1)
    # the same counts, made here: the adapted card as it runs, the base network as it runs
    card = _card_for(base_card.model_copy(update={"score_calibration": None}),
                     weights / "detector_stem.onnx", "auto-16", 0.7).model_copy(
        update={"base_network": None})
    det = Detector(create_engine(weights / "detector_stem.onnx", "onnxruntime-cpu", threads=1),
                   card, base_detector=source)
    counts = [(det.detect(f).n, source.detect(f).n) for f in frames]
    assert all(n > 0 for n, _ in counts)
    assert ratio == round(COUNT_MARGIN * max(n / max(b, COUNT_FLOOR) for n, b in counts), 2)
    det.close()
    source.close()


def test_adapting_on_one_stem_image_beats_the_base_on_the_material(shared_data: Path) -> None:
    """Adapt the general detector on Pt2 (the STEM tuning material, where it finds almost
    nothing) for 300 steps (about 0.8 min here; a fixed count, so that a busy machine trains
    the same network); score the material's other image at the same magnification (Pt4,
    640 px; box IoU >= 0.5). The general detector finds none of them, so it cannot measure
    them for the working scale either: the fine-tuned network measures them itself (or the
    adapted model fails as the base does).

    The material's 2048 px images are at 2-7x other magnifications (benchmarks/adapt.py,
    benchmarks/adapt_base_network.py): this test holds the live use, adapting at the
    magnification one keeps working at.
    """
    import tempfile

    from nanoscout.training import realdata
    from nanoscout.training.adapt import adapt
    from nanoscout.training.evaluate import evaluate_set

    d = shared_data / "stem-dev"
    assert realdata.stem_tuning_names(shared_data)[:2] == ["Pt2", "Pt4"]
    with tempfile.TemporaryDirectory() as tmp:
        res = adapt([d / "images" / "Pt2.jpg"], [d / "labels" / "Pt2.txt"], Path(tmp) / "pt",
                    threads=1, steps=300)
        base = shipped_model_dir() / "detector.onnx"
        methods = {n: load_detector(p, _engine) for n, p in (("base", base), ("adapted", res.onnx))}
        scores = evaluate_set(methods, [realdata.load_stem("Pt4", shared_data)])["methods"]
        card = ModelCard.load(res.card)
    assert scores["base"]["f1"] < 0.3, scores  # the shipped model misses most of them
    assert scores["adapted"]["f1"] > scores["base"]["f1"] + 0.3, scores
    assert res.network == "fine-tuned-alone"
    # it measures its own working scale; the base network beside it only takes the frames
    # outside the particle sizes of Pt2
    assert card.base_network is not None and not card.base_network.measures
    assert card.base_network.particle_px is not None and not card.base_network.merge


def test_frames_saved_from_a_stem_stream_adapt_the_stem_detector(tmp_path: Path) -> None:
    """Without --base, frames the daemon saved from a STEM stream adapt the detector that
    analysed them (the shipped STEM detector); any other image, or a mix, the general one."""
    from nanoscout.analysis.frame import Frame
    from nanoscout.daemon.frame_tiff import write_frame_tiff
    from nanoscout.training.adapt import default_base

    img = np.random.default_rng(0).integers(0, 4000, (64, 80)).astype(np.uint16)
    saved: dict[str, Path] = {}
    for modality in ("STEM", "TEM"):
        frame = Frame.from_image(img, pixel_size_nm=0.5, source="scope", modality=modality)
        saved[modality] = write_frame_tiff(frame, tmp_path / f"{modality}.tif")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, img)
    weights = shipped_model_dir()
    assert default_base([saved["STEM"], saved["STEM"]]) == weights / "detector_stem.onnx"
    for images in ([saved["TEM"]], [saved["STEM"], saved["TEM"]], [plain], [saved["STEM"], plain]):
        assert default_base(images) == weights / "detector.onnx"


@pytest.mark.parametrize(("guard", "trained"), [
    ("none", {"stem", "enc2", "enc3", "enc4", "up3", "up2", "up1", "head"}),
    ("mix", {"stem", "enc2", "enc3", "enc4", "up3", "up2", "up1", "head"}),
    ("freeze", {"up3", "up2", "up1", "head"}),
    ("head", {"up1", "head"}),
])
def test_each_guard_trains_its_share_of_the_network(guard: str, trained: set[str]) -> None:
    from nanoscout.training.adapt import _set_trainable
    from nanoscout.training.unet import ParticleUNet

    model = ParticleUNet(8)
    params = _set_trainable(model, guard)
    named = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert named == trained
    assert len(params) == sum(p.requires_grad for p in model.parameters())
