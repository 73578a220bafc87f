"""The shipped field-of-view classifier (ONNX + card) and the --data folder training mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.classifier import FieldClassifier
from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.preprocess import fixed_input
from nanoscout.sim.fields import FIELD_CLASSES, render_field

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"
CARD = WEIGHTS / "classifier.json"

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def card() -> ModelCard:
    if not CARD.is_file():
        pytest.skip(f"no shipped classifier at {CARD}")
    return ModelCard.load(CARD)


@pytest.fixture(scope="module")
def session(card: ModelCard) -> object:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(card.onnx_path(CARD)), so, providers=["CPUExecutionProvider"])


def test_card_validates(card: ModelCard) -> None:
    assert card.task == "classification"
    assert card.classes == FIELD_CLASSES
    assert card.input.size is not None and card.input.size[0] == card.input.size[1]
    assert [o.name for o in card.outputs] == ["probabilities", "cam", "class_maps"]
    assert card.evaluation["synthetic"]["accuracy"] > 0.5
    assert "1024x1024" in card.timings_ms


def test_outputs_shapes_and_types(card: ModelCard, session: object) -> None:
    assert card.input.size is not None
    s = card.input.size[0]
    x = fixed_input(render_field("blank", np.random.default_rng(1), shape=(300, 400)).image,
                    (s, s))
    p, cam = session.run(["probabilities", "cam"], {"image": x})  # type: ignore[attr-defined]
    assert p.shape == (1, len(FIELD_CLASSES)) and p.dtype == np.float32
    assert p.sum() == pytest.approx(1.0, abs=1e-5) and (p >= 0).all()
    stride = card.input.stride_multiple  # the CAM cell size (nanoscout.training.classifier_net)
    assert cam.dtype == np.uint8 and cam.shape == (1, s // stride, s // stride)


@pytest.mark.parametrize("label", ["blank", "charging_saturated", "film_structure",
                                   "isolated_particles"])
def test_classifies_clear_fresh_fields(card: ModelCard, session: object, label: str) -> None:
    assert card.input.size is not None
    s = card.input.size[0]
    right = 0
    for seed in range(3):  # fresh seeds (training used 2_000_000 + k)
        f = render_field(label, np.random.default_rng(90_000 + seed))
        p, cam = session.run(  # type: ignore[attr-defined]
            ["probabilities", "cam"], {"image": fixed_input(f.image, (s, s))})
        right += FIELD_CLASSES[int(np.argmax(p))] == label
        assert cam.max() in (0, 255)
    assert right >= 2


def _write_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(5)
    for c, label in (("Blank", "blank"), ("Particles", "isolated_particles"),
                     ("Films", "film_structure")):
        d = root / c
        d.mkdir(parents=True)
        for k in range(5):
            img = render_field(label, rng, shape=(96, 128)).image
            u8 = np.clip(img / max(float(img.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
            if k % 2:
                Image.fromarray(np.stack([u8] * 3, -1)).save(d / f"{k}.png")  # RGB
            else:
                Image.fromarray(u8).save(d / f"{k}.jpg")


def test_folder_mode_trains_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train_classifier import main

    _write_folder(tmp_path / "data")
    out = tmp_path / "model"
    rc = main(["--data", str(tmp_path / "data"), "--out", str(out), "--steps", "3",
               "--batch", "4", "--size", "64", "--real-crops", "2", "--no-timing",
               "--threads", "1"])
    assert rc == 0
    card = ModelCard.load(out / "classifier.json")
    assert card.classes == ("Blank", "Films", "Particles")
    assert card.input.size == (64, 64)
    assert card.evaluation["validation"]["n"] == 3
    sess = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    p, cam, maps = sess.run(None, {"image": np.zeros((1, 1, 64, 64), np.float32)})
    assert p.shape == (1, 3) and cam.shape == (1, 4, 4) and cam.dtype == np.uint8  # 64 / 16
    assert maps.shape == (1, 3, 4, 4) and maps.dtype == np.float32  # every class's map
    assert [o.name for o in card.outputs] == ["probabilities", "cam", "class_maps"]


def test_folder_mode_needs_two_classes(tmp_path: Path) -> None:
    from nanoscout.training.train_classifier import load_folder
    from nanoscout.wire.errors import ConfigError

    (tmp_path / "only").mkdir()
    with pytest.raises(ConfigError, match="needs >= 2 sub-folders"):
        load_folder(tmp_path)


def test_folder_mode_needs_an_out_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Without --out, --data would write ./models/weights: from the repository root, over the
    shipped classifier. Refused before anything is read or trained."""
    pytest.importorskip("torch")
    from nanoscout.training.train_classifier import main

    _write_folder(tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as info:
        main(["--data", str(tmp_path / "data"), "--steps", "2", "--size", "64", "--no-timing",
              "--threads", "1"])
    assert info.value.code == 2
    assert "--data needs --out" in capsys.readouterr().err
    assert not any(cwd.iterdir())


def test_images_smaller_than_a_crop_are_kept_whole() -> None:
    """An image side under MIN_CROP_PX cannot be cut: its crops keep that side whole (the
    whole image, for a 4 x 4 one: what the daemon resamples), instead of failing."""
    from nanoscout.training.train_classifier import crops_of

    rng = np.random.default_rng(0)
    tiny = np.arange(16, dtype=np.float32).reshape(4, 4)
    crops = crops_of(tiny, rng, 4, 64)
    assert len(crops) == 4 and all(c.shape == (64, 64) for c in crops)
    assert all(np.array_equal(c, crops[0]) for c in crops)
    strip = rng.random((3, 200)).astype(np.float32)
    crops = crops_of(strip, rng, 5, 64)
    assert len(crops) == 5 and all(c.shape == (64, 64) and np.isfinite(c).all() for c in crops)


def _label_map(rods: int, spheres: int = 6) -> np.ndarray:
    """Instance map 200x200: ``spheres`` separate discs (r 6) and ``rods`` 4x30 px bars."""
    lab = np.zeros((200, 200), np.int32)
    yy, xx = np.mgrid[0:200, 0:200]
    k = 0
    for i in range(spheres):
        k += 1
        lab[(yy - 30 - 25 * i) ** 2 + (xx - 30) ** 2 <= 36] = k
    for i in range(rods):
        k += 1
        lab[40 + 40 * i: 44 + 40 * i, 100:130] = k
    return lab


def test_emps_label_rule_follows_the_contains_rods_definition() -> None:
    from nanoscout.training.field_labels import emps_field_label

    assert emps_field_label(_label_map(rods=0)) == "isolated_particles"
    assert emps_field_label(_label_map(rods=2)) == "rods_wires"  # a few rods among spheres
    assert emps_field_label(_label_map(rods=1)) is None  # one elongated mask may be an artefact
    # a bar cut by the image border is not counted as a rod
    lab = _label_map(rods=0)
    lab[0:4, 150:190] = lab.max() + 1
    assert emps_field_label(lab) == "isolated_particles"


def test_clock_schedule_matches_torch_one_cycle() -> None:
    torch = pytest.importorskip("torch")
    from nanoscout.training.train_classifier import _one_cycle_lr

    steps, lr = 50, 3e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps - 1):
        # torch counts the phases in steps (warm-up ends at step 0.1 * steps - 1)
        want = opt.param_groups[0]["lr"]
        if step in (0, steps // 2, steps - 2):
            got = _one_cycle_lr(lr, step / (steps - 1))
            assert got == pytest.approx(want, rel=0.15, abs=1e-6)
        opt.step()
        sched.step()
    assert _one_cycle_lr(lr, 0.1) == pytest.approx(lr)
    assert _one_cycle_lr(lr, 1.0) == pytest.approx(lr / 25 / 1e4)


def test_lse_pooling_scores_the_map_the_cam_shows(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from nanoscout.training.classifier_net import ExportWrapper, FieldClassifier, export_onnx

    torch.manual_seed(0)
    net = FieldClassifier(3, width=8, pooling="lse").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        f = net.features(x)
        maps = torch.einsum("kc,nchw->nkhw", net.head.weight, f)  # the class maps
        want = torch.log(torch.exp(maps).mean(dim=(2, 3))) + net.head.bias
        got = net(x)
        assert torch.allclose(got, want, atol=1e-5)
        # between the mean (global average pooling) and the maximum of each class map
        mean = maps.mean(dim=(2, 3)) + net.head.bias
        peak = maps.amax(dim=(2, 3)) + net.head.bias
        assert bool((got >= mean - 1e-5).all() and (got <= peak + 1e-5).all())
        # the CAM is the top class's map: its brightest cell is that map's maximum
        _, cam = ExportWrapper(net)(x[:1])
        top = int(torch.argmax(got[0]))
        m = maps[0, top]
        assert float(m.max()) > 0
        assert int(cam[0].flatten()[int(torch.argmax(m))]) == 255
    check = export_onnx(net, tmp_path / "c.onnx", 64)
    assert check["max_abs_diff"] < 1e-4
    mean_net = FieldClassifier(3, width=8, pooling="mean").eval()
    with torch.no_grad():
        f = mean_net.features(x)
        assert torch.allclose(mean_net(x), mean_net.head(f.mean(dim=(2, 3))), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        FieldClassifier(3, pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cam_stride"):
        FieldClassifier(3, cam_stride=12)
    with torch.no_grad():  # class maps at 1/8 of the input (1/16 by default)
        assert FieldClassifier(3, width=8, cam_stride=8).eval().features(x).shape[2:] == (8, 8)
        assert FieldClassifier(3, width=8).eval().features(x).shape[2:] == (4, 4)


def test_evaluation_writes_the_test_split_into_a_copy_of_the_card(tmp_path: Path) -> None:
    import shutil

    from nanoscout.training.evaluate_classifier import SEED_BASES, main

    if not CARD.is_file():
        pytest.skip(f"no shipped classifier at {CARD}")
    model = tmp_path / "classifier.onnx"
    shutil.copy(WEIGHTS / "classifier.onnx", model)
    shutil.copy(CARD, tmp_path / "classifier.json")
    out = tmp_path / "results.json"
    rc = main(["--model", str(model), "--out", str(out), "--n-per-class", "1", "--n-1024", "0",
               "--cam-n", "2", "--no-real", "--workers", "1", "--write-card"])
    assert rc == 0
    card = ModelCard.load(tmp_path / "classifier.json")  # sha256 still matches the ONNX file
    syn = card.evaluation["synthetic"]
    assert syn["n"] == len(FIELD_CLASSES) and "--split test" in syn["command"]
    assert str(SEED_BASES["test"]["synthetic"]) in syn["data"]
    assert card.evaluation["cam"]["n"] == 2 and "synthetic_1024" not in card.evaluation
    assert card.timings_ms["1024x1024"]["runs"] == 30
    assert SEED_BASES["test"]["synthetic"] != SEED_BASES["validation"]["synthetic"]


def test_training_can_continue_from_saved_weights(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from nanoscout.training.classifier_net import FieldClassifier
    from nanoscout.training.train_classifier import train_net

    torch.manual_seed(1)
    start = FieldClassifier(3, width=8)
    torch.save(start.state_dict(), tmp_path / "w.pt")
    x = np.random.default_rng(0).random((6, 64, 64)).astype(np.float16)
    y = np.array([0, 1, 2, 0, 1, 2])
    kw = {"steps": 1, "batch": 3, "lr": 1e-9, "seed": 0, "width": 8, "log_every": 0}
    cont, _ = train_net(x, y, 3, init=tmp_path / "w.pt", **kw)  # type: ignore[arg-type]
    fresh, _ = train_net(x, y, 3, **kw)  # type: ignore[arg-type]
    w0 = start.head.weight.detach()
    assert torch.allclose(cont.head.weight.detach(), w0, atol=1e-6)
    assert not torch.allclose(fresh.head.weight.detach(), w0, atol=1e-3)


# -- frames without contrast (beam blanked, shutter closed, a detector sending zeros) ---------

LENS = WEIGHTS / "lens.json"


@pytest.fixture(scope="module")
def field_classifier(card: ModelCard) -> FieldClassifier:
    """The shipped classifier and lens as the daemon runs them."""
    from nanoscout.engines import create_engine

    lens_card = ModelCard.load(LENS)
    return FieldClassifier(create_engine(card.onnx_path(CARD), "cpu", threads=1), card,
                           lens=create_engine(lens_card.onnx_path(LENS), "cpu", threads=1),
                           lens_card=lens_card)


def _flat(value: float, dtype: type, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    return np.full(shape, value, dtype)


def test_only_frames_without_contrast_are_blank(field_classifier: FieldClassifier) -> None:
    """A flat frame is not classified (the shipped network answers a constant input with
    isolated_particles 0.95 and the lens with novelty 88); noisy and low-contrast frames are."""
    from nanoscout.wire.errors import BlankFrame, Reason

    clf = field_classifier
    hot = _flat(1000, np.uint16)
    hot[100, 100] = 60000  # one hot pixel on a blanked detector
    blank: dict[str, np.ndarray] = {"every pixel 0": _flat(0, np.uint16),
                                    "every pixel 3.5": _flat(3.5, np.float32, (300, 200)),
                                    "pixels 1000 to 60000": hot}
    for named, img in blank.items():
        with pytest.raises(BlankFrame, match=named) as info:
            clf.classify(img)
        assert info.value.reason is Reason.BLANK and "256x256" in str(info.value)
    rng = np.random.default_rng(4)
    contrast: dict[str, np.ndarray] = {
        "pure noise": rng.normal(1000, 20, (512, 512)).astype(np.uint16),
        "one count of noise": (1000 + rng.integers(0, 2, (512, 512))).astype(np.uint16),
        "1e-6 relative noise": (1 + 1e-6 * rng.standard_normal((512, 512))).astype(np.float32),
        "0.001 counts per px": rng.poisson(0.001, (1024, 1024)).astype(np.uint16),
    }
    for what, img in contrast.items():
        c = clf.classify(img)
        assert sum(c.all.values()) == pytest.approx(1.0, abs=1e-5), what
        assert c.novelty is not None and np.isfinite(c.novelty), what


def test_the_pipeline_skips_a_blank_frames_classification(
        field_classifier: FieldClassifier, caplog: pytest.LogCaptureFixture) -> None:
    """A blanked beam: detections (0 particles) and statistics go out, no class message and no
    class / novelty alert (both fired on every blank frame before); the skip is listed with its
    reason and logged once per blank run, at INFO."""
    import logging

    from nanoscout.analysis.detector import load_detector
    from nanoscout.analysis.frame import Frame
    from nanoscout.analysis.pipeline import Pipeline
    from nanoscout.engines import create_engine
    from nanoscout.wire.errors import BlankFrame, Reason
    from nanoscout.wire.headers import Kind

    det = load_detector(WEIGHTS / "detector.onnx", lambda p: create_engine(p, "cpu", threads=1))
    rules = [{"name": "novel", "kind": "novelty", "threshold": 10.0, "cooldown_s": 0},
             {"name": "particles", "kind": "class", "label": "isolated_particles",
              "threshold": 0.9, "cooldown_s": 0}]
    pipe = Pipeline(det, classifier=field_classifier, rules=rules)
    noise = np.random.default_rng(5).normal(1000, 20, (512, 512)).astype(np.uint16)
    frames: list[np.ndarray] = [_flat(0, np.uint16)] * 3 + [noise]
    with caplog.at_level(logging.INFO, logger="nanoscout.analysis.pipeline"):
        results = [pipe.process(Frame.from_image(img, pixel_size_nm=1.0, source="cam", seq=i))
                   for i, img in enumerate(frames)]
    for r in results[:3]:
        assert [m.kind for m in r.messages] == [Kind.DET, Kind.STATS]
        assert r.det.n == 0 and r.classification is None and r.alerts == [] and r.failures == []
        [(stage, exc)] = r.skipped
        assert stage == "classify" and isinstance(exc, BlankFrame) and exc.reason is Reason.BLANK
    last = results[3]
    assert last.skipped == [] and last.classification is not None
    assert Kind.CLASS in [m.kind for m in last.messages]
    # the pipeline's own records (an engine loaded on first use logs from its module)
    logged = [(rec.levelno, rec.getMessage()) for rec in caplog.records
              if rec.name == "nanoscout.analysis.pipeline"]
    assert [lvl for lvl, _ in logged] == [logging.INFO, logging.INFO], logged
    assert "cam#0: blank frame" in logged[0][1] and "until a frame with contrast" in logged[0][1]
    assert "cam#3: contrast again" in logged[1][1] and "(3 blank frame(s)" in logged[1][1]


def test_the_lens_sees_no_blank_frame(field_classifier: FieldClassifier) -> None:
    """``lens_outputs`` (the daemon's lens query socket runs it) applies classify's criterion:
    the shipped lens answered a flat frame with a novelty of 88, an "unusual specimen" signal
    for a frame that holds nothing. A frame with noise still gets its outputs and novelty."""
    from nanoscout.wire.errors import BlankFrame, Reason

    clf = field_classifier
    hot = _flat(1000, np.uint16)
    hot[100, 100] = 60000
    for named, img in {"every pixel 0": _flat(0, np.uint16), "pixels 1000 to 60000": hot}.items():
        with pytest.raises(BlankFrame, match=f"{named}.*the lens's 256x256 input is 0") as info:
            clf.lens_outputs(img)
        assert info.value.reason is Reason.BLANK
    noise = np.random.default_rng(6).normal(1000, 20, (512, 512)).astype(np.uint16)
    _, novelty = clf.novelty_of(clf.lens_outputs(noise))
    assert np.isfinite(novelty) and novelty == pytest.approx(clf.classify(noise).novelty)


# -- the CAM of the class an alert names ------------------------------------------------------


def _cams_from_features(card: ModelCard, x: np.ndarray) -> np.ndarray:
    """Every class's CAM (C, h, w) uint8 of one model input, made here from the shipped
    graph's last feature maps and its head's weights (not from its ``cam`` or ``class_maps``):
    ReLU(sum_c w[k, c] f[c]), / its maximum, x 255, rounded half up."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(card.onnx_path(CARD)))
    head = next(n for n in model.graph.node if n.op_type == "Einsum")
    w_name, f_name = head.input  # "kc,nchw->nkhw": the head's weights, the feature maps
    weights = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == w_name)
    model.graph.output.append(onnx.helper.make_tensor_value_info(f_name, onnx.TensorProto.FLOAT,
                                                                 None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (f,) = sess.run([f_name], {"image": x})
    maps = np.maximum(np.einsum("kc,chw->khw", weights.astype(np.float64), f[0]), 0)
    peak = np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
    return np.clip(np.floor(maps / peak * 255 + 0.5), 0, 255).astype(np.uint8)


def test_the_class_maps_give_the_cam_of_any_class(field_classifier: FieldClassifier,
                                                  card: ModelCard) -> None:
    """``class_maps`` (3.1.1): for the top class, its CAM is exactly the graph's ``cam``; for
    every class, the CAM made from the features and the head's weights."""
    from nanoscout.analysis.classifier import cam_of_map
    from nanoscout.sim.fields import render_rod_among_spheres

    assert card.input.size is not None
    for seed in (21, 22, 26):
        img = render_rod_among_spheres(np.random.default_rng(seed)).image
        c = field_classifier.classify(img)
        assert c.cam is not None and c.class_maps is not None
        assert c.class_maps.shape == (len(FIELD_CLASSES), *c.cam.shape)
        top = FIELD_CLASSES.index(c.labels[0])
        assert np.array_equal(cam_of_map(c.class_maps[top]), c.cam)
        want = _cams_from_features(card, fixed_input(img, card.input.size))
        for k, label in enumerate(FIELD_CLASSES):
            got = c.cam_of(label)
            assert got is not None and got.dtype == np.uint8 and got.shape == c.cam.shape
            # float32 sums in another order: a level at most, where a value lies on a half
            assert np.abs(got.astype(int) - want[k].astype(int)).max() <= 1, label
    assert c.cam_of("no such class") is None


def test_a_class_alert_carries_the_cam_of_its_own_label(field_classifier: FieldClassifier,
                                                        card: ModelCard) -> None:
    """A rare-target rule (``rods_wires > 0.3``) fires on a frame whose top class is
    isolated_particles (one rod among spheres: 0.39 against 0.30). Its alert carried the top
    class's CAM, which peaks off the rod; it now carries the CAM of rods_wires, which peaks on
    the rod. A rule on the top class and a novelty rule keep the top class's CAM."""
    from nanoscout.analysis.detector import load_detector
    from nanoscout.analysis.frame import Frame
    from nanoscout.analysis.pipeline import Pipeline
    from nanoscout.engines import create_engine
    from nanoscout.sim.fields import render_rod_among_spheres
    from nanoscout.training.evaluate_classifier import cam_peak_px
    from nanoscout.wire.headers import Kind

    field = render_rod_among_spheres(np.random.default_rng(21))
    det = load_detector(WEIGHTS / "detector.onnx", lambda p: create_engine(p, "cpu", threads=1))
    rules = [{"name": "needle", "kind": "class", "label": "rods_wires", "threshold": 0.3},
             {"name": "particles", "kind": "class", "label": "isolated_particles",
              "threshold": 0.3},
             {"name": "novel", "kind": "novelty", "threshold": 1e-6}]
    result = Pipeline(det, classifier=field_classifier, rules=rules).process(
        Frame.from_image(field.image, pixel_size_nm=1.0, source="cam", seq=0))
    c = result.classification
    assert c is not None and c.cam is not None and card.input.size is not None
    assert c.labels[0] == "isolated_particles" and c.all["rods_wires"] > 0.3
    (cls,) = [m for m in result.messages if m.kind is Kind.CLASS]
    assert cls.array is not None and np.array_equal(cls.array, c.cam)  # the top class's CAM
    heat = {m.header.rule: m.heatmap for m in result.messages if m.kind is Kind.ALERT}
    assert set(heat) == {"needle", "particles", "novel"}
    want = _cams_from_features(card, fixed_input(field.image, card.input.size))
    needle = heat["needle"]
    assert needle is not None and needle.shape == c.cam.shape
    assert np.abs(needle.astype(int) - want[FIELD_CLASSES.index("rods_wires")]).max() <= 1
    assert np.abs(needle.astype(int) - c.cam.astype(int)).max() > 100  # not the top class's
    # what each explains: the rod's box (grown by half a CAM cell, as the CAM test counts)
    x0, y0, x1, y1 = field.rod_boxes[0]
    gx, gy = 0.5 * 512 / c.cam.shape[1], 0.5 * 512 / c.cam.shape[0]

    def on_the_rod(cam: np.ndarray) -> bool:
        x, y = cam_peak_px(cam, field.image.shape)
        return bool(x0 - gx <= x <= x1 + gx and y0 - gy <= y <= y1 + gy)

    assert on_the_rod(needle) and not on_the_rod(c.cam)
    for rule in ("particles", "novel"):  # the top class's CAM
        got = heat[rule]
        assert got is not None and np.array_equal(got, c.cam), rule
