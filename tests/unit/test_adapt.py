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

from nanoscout.analysis.detector import Detector
from nanoscout.analysis.modelcard import ModelCard, sha256_file, shipped_model_dir
from nanoscout.cli.main import main
from nanoscout.engines import create_engine
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
    det = Detector(create_engine(out / "detector.onnx", "onnxruntime-cpu", threads=1), card)
    assert det.detect(tifffile.imread(img)).labels.shape == (128, 160)
    json.loads((out / "detector.json").read_text())  # plain JSON for the daemon


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


def test_the_base_network_is_kept_when_fine_tuning_loses_on_the_held_out_half(
        tmp_path: Path) -> None:
    """An operator who annotated only the right half of a frame: the fold model learns from the
    (empty) left half that there is nothing to find and loses on the right half, so the output
    is the base network itself, with a scale and cut chosen on the annotations."""
    img, lab = _synthetic_pair(tmp_path, seed=5)
    labels = tifffile.imread(lab)
    labels[np.isin(labels, np.unique(labels[:, :80]))] = 0  # no particle touches the left half
    assert len(np.unique(labels)) > 5
    tifffile.imwrite(lab, labels)
    res = adapt_run([img], [lab], tmp_path / "out", minutes=0.4, threads=1)
    grid = ModelCard.load(res.card).evaluation["adaptation_holdout"]["choice"]["f1_by_candidate"]
    best = {net: max(v for k, v in grid.items() if k.startswith(net + ":"))
            for net in ("base", "fine-tuned")}
    assert best["base"] > best["fine-tuned"], grid
    assert res.network == "base" and res.after["f1"] == best["base"]
    assert sha256_file(res.onnx) == sha256_file(shipped_model_dir() / "detector.onnx")
    card = ModelCard.load(res.card)
    assert card.training.model_extra["adaptation"]["network"] == "base"  # type: ignore[index]
    assert "base network" in card.training.data
    assert main(["models", "adapt", str(img), "--labels", str(lab), "--out", str(tmp_path / "ft"),
                 "--minutes", "0.2", "--no-progress", "--fine-tuned-only"]) == 0
    ft = ModelCard.load(tmp_path / "ft" / "detector.json")
    assert ft.training.model_extra["adaptation"]["network"] == "fine-tuned"  # type: ignore[index]
    assert not any(k.startswith("base:") for k in
                   ft.evaluation["adaptation_holdout"]["choice"]["f1_by_candidate"])


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


def test_adapting_on_one_stem_image_beats_the_base_on_the_material(shared_data: Path) -> None:
    """Adapt on Pt2 (the STEM tuning material, where the shipped model is weak) for 0.7 min;
    score the material's other image at the same magnification (Pt4, 640 px; box IoU >= 0.5).

    The material's 2048 px images are at 2-7x other magnifications, where the automatic
    working scale of the adapted model misjudges some frames (benchmarks/adapt.py): this test
    holds the live use, adapting at the magnification one keeps working at.
    """
    import tempfile

    from nanoscout.training import realdata
    from nanoscout.training.adapt import adapt
    from nanoscout.training.evaluate import evaluate_set

    d = shared_data / "stem-dev"
    assert realdata.stem_tuning_names(shared_data)[:2] == ["Pt2", "Pt4"]
    with tempfile.TemporaryDirectory() as tmp:
        res = adapt([d / "images" / "Pt2.jpg"], [d / "labels" / "Pt2.txt"], Path(tmp) / "pt",
                    minutes=0.7, threads=1)
        base = shipped_model_dir() / "detector.onnx"
        methods = {n: Detector(create_engine(p, "onnxruntime-cpu", threads=1),
                               ModelCard.load(p.with_suffix(".json")))
                   for n, p in (("base", base), ("adapted", res.onnx))}
        scores = evaluate_set(methods, [realdata.load_stem("Pt4", shared_data)])["methods"]
    assert scores["base"]["f1"] < 0.3, scores  # the shipped model misses most of them
    assert scores["adapted"]["f1"] > scores["base"]["f1"] + 0.3, scores


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
