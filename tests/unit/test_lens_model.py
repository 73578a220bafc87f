"""The AI lens: shipped ONNX + card, novelty ordering, the k-NN head, seed splits, the offline
mosaic, a tiny training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.preprocess import fixed_input

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
CARD = WEIGHTS / "lens.json"
_DIVISOR = {"input": 1, "input/2": 2, "input/4": 4, "input/16": 16, "frame": 0}


@pytest.fixture(scope="module")
def card() -> ModelCard:
    if not CARD.is_file():
        pytest.skip(f"no shipped lens card at {CARD} (python -m nanoscout.training.train_lens)")
    return ModelCard.load(CARD)


@pytest.fixture(scope="module")
def session(card: ModelCard):  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(card.onnx_path(CARD)), so,
                                providers=["CPUExecutionProvider"])


def _novelty(card: ModelCard, session, frame: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    assert card.input.size is not None and card.novelty is not None
    x = fixed_input(frame, card.input.size)
    err = session.run([card.novelty.error_output], {card.input.name: x})[0]
    assert err.shape == (1,) and err.dtype == np.float32
    return float(err[0]) / card.novelty.reference_error


def test_card_validates(card: ModelCard) -> None:
    assert card.task == "autoencoder" and card.input.size == (256, 256)
    assert card.novelty is not None and card.novelty.reference_quantile == 0.99
    assert card.novelty.reference_error > 0 and card.novelty.n_frames >= 100
    assert {"p50", "p90", "p99"} <= set(card.novelty.quantiles)
    assert card.training.wall_seconds is not None and card.training.wall_seconds < 15 * 60
    assert "novelty_auroc" in card.evaluation and card.timings_ms


def test_onnx_outputs_match_the_card(card: ModelCard, session) -> None:  # type: ignore[no-untyped-def]
    assert card.input.size is not None
    h, w = card.input.size
    names = [o.name for o in card.outputs]
    assert names[:3] == ["error", "mse", "reconstruction"]
    assert {"act_enc1", "act_enc2", "act_code"} <= set(names)
    assert [o.name for o in session.get_outputs()] == names
    x = np.random.default_rng(0).random((1, 1, h, w), dtype=np.float32)
    got = dict(zip(names, session.run(names, {card.input.name: x})))
    for spec in card.outputs:
        arr = got[spec.name]
        assert arr.dtype == np.float32 and np.isfinite(arr).all(), spec.name
        d = _DIVISOR[spec.resolution]
        if d == 0:
            assert arr.shape == (1,)
        else:
            assert arr.ndim == 4 and arr.shape[0] == 1 and arr.shape[2:] == (h // d, w // d)
    rec = got["reconstruction"]
    assert rec.shape == (1, 1, h, w)
    assert np.isclose(got["mse"][0], np.mean((rec - x) ** 2), rtol=1e-4)
    assert got["error"][0] >= 0


def test_usual_frames_score_below_blank_saturated_and_film(card, session) -> None:  # type: ignore[no-untyped-def]
    """Medians of a few frames: single frames are ordered only as often as the AUROC says."""
    fields = pytest.importorskip("nanoscout.sim.fields")
    from nanoscout.training.lens_data import usual_frame

    usual = np.median([_novelty(card, session, usual_frame(9_000_000 + k, use_fields=False)[0])
                       for k in range(6)])
    assert usual < 1.0
    # not rods_wires: with 1-3 rods among particles in half its frames (AUROC 0.69) six
    # frames do not order reliably
    for j, label in enumerate(("blank", "charging_saturated", "film_structure", "out_of_focus")):
        rng = np.random.default_rng(9_100_000 + j)
        nov = np.median([_novelty(card, session, fields.render_field(label, rng).image)
                         for _ in range(6)])
        assert nov > usual, (label, nov, usual)


def test_clients_lens_writes_the_mosaic(card: ModelCard, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from nanoscout.batch.lens import main, render_activations
    from nanoscout.clients.lens import mosaic_shape
    from nanoscout.training.lens_data import usual_frame

    frame = usual_frame(9_000_010, use_fields=False)[0]
    lo, hi = np.percentile(frame, (0.5, 99.5))
    png = tmp_path / "frame.png"
    Image.fromarray(np.clip((frame - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)).save(png)
    out = tmp_path / "maps.png"
    assert main([str(png), "--layer", "act_enc2", "--out", str(out), "--card", str(CARD)]) == 0
    with Image.open(out) as im:
        assert (im.height, im.width) == mosaic_shape(16)
        assert im.mode == "L"
    code = render_activations(CARD, frame, "act_code", max_maps=16)
    n_code = 8 if code.shape == mosaic_shape(8) else 16
    assert code.dtype == np.uint8 and code.shape == mosaic_shape(n_code)
    assert main([str(png), "--layer", "nope", "--out", str(out), "--card", str(CARD)]) == 2


def test_the_offline_lens_names_a_blank_image_and_writes_nothing(
        card: ModelCard, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``nanoscout lens`` on a frame without contrast (a blanked beam's PNG) printed a novelty
    of 88 and wrote the mosaic; it now answers it as it answers a frame with NaN pixels: the
    image named on stderr, no PNG, exit status 2 (the daemon's criterion: no class, no
    novelty)."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from nanoscout.batch.lens import main, run_lens
    from nanoscout.wire.errors import BlankFrame

    png, out = tmp_path / "blanked.png", tmp_path / "maps.png"
    Image.fromarray(np.full((300, 400), 17, np.uint8)).save(png)
    assert main([str(png), "--out", str(out), "--card", str(CARD)]) == 2
    err = capsys.readouterr().err
    assert f"nanoscout lens: {png} (image 0): blank frame (300x400 uint8, every pixel 17)" in err
    assert "the lens's 256x256 input is 0" in err
    assert not out.exists()
    with pytest.raises(BlankFrame, match="every pixel 0"):
        run_lens(CARD, np.zeros((64, 64), np.float32))


def test_training_a_few_steps_exports_a_loadable_card(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from nanoscout.training.train_lens import main

    rc = main(["--out", str(tmp_path), "--n-train", "3", "--steps", "2", "--batch", "2",
               "--crop", "64", "--n-calib", "3", "--eval-usual", "0"])
    assert rc == 0
    card = ModelCard.load(tmp_path / "lens.json")
    assert card.task == "autoencoder" and card.novelty is not None
    assert card.novelty.n_frames == 3 and card.novelty.reference_error > 0


def test_knn_head_is_zero_on_a_bank_frame_and_grows_away_from_it() -> None:
    torch = pytest.importorskip("torch")
    from nanoscout.training.lens_net import (
        N_FEATURES,
        LensAE,
        LensExport,
        fit_feature_bank,
        frame_features,
    )

    torch.manual_seed(0)
    ae = LensAE().eval()
    x = torch.rand(3, 1, 256, 256)
    with torch.no_grad():
        feats = frame_features(ae, x)
        assert feats.shape == (3, N_FEATURES) and torch.isfinite(feats).all()
        mean, scale, bank = fit_feature_bank(feats)
        lens = LensExport(ae, mean, scale, bank, k=1).eval()
        on_bank = lens(x[:1])[0]
        blank = lens(torch.full((1, 1, 256, 256), 0.5))[0]
    assert on_bank.shape == (1,) and float(on_bank[0]) < 1e-4
    assert float(blank[0]) > 10 * float(on_bank[0]) + 1e-3


def test_seed_splits_are_disjoint() -> None:
    from nanoscout.training.evaluate_lens import SPLITS
    from nanoscout.training.train_lens import CALIB_SEED_BASE, TRAIN_SEED_BASE

    # usual seeds use base + k (k < 500 000), novel ones base + 1000 * kind + k
    bases = sorted([TRAIN_SEED_BASE, CALIB_SEED_BASE, *(b for pair in SPLITS.values()
                                                         for b in pair)])
    assert len(set(bases)) == len(bases)
    assert all(b - a >= 500_000 for a, b in zip(bases, bases[1:]))
    assert set(SPLITS) == {"test", "validation"}


def test_card_reports_the_test_split(card: ModelCard) -> None:
    import json

    summary = card.evaluation["novelty_auroc"]
    results = json.loads((WEIGHTS.parents[1] / summary["results_file"]).read_text())
    assert results.get("split", "test") == "test" and results["sha256"] == card.sha256
    assert summary["auroc"] == results["auroc"]


@pytest.mark.parametrize("name", ["maps.unknownext", "maps"])
def test_lens_refuses_an_out_name_pillow_cannot_write_before_any_work(
        tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--out x.unknownext`` ended in Pillow's ValueError traceback after the lens had run."""
    from nanoscout.batch.lens import main

    with pytest.raises(SystemExit) as exc:  # the image is never read: it does not exist
        main([str(tmp_path / "absent.png"), "--out", str(tmp_path / name)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nanoscout lens: error: --out" in err and "NAME.png" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())
