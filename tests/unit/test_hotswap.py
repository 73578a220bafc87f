"""The hot swap's steps with real models (the shipped detector, copies of it, broken files):
resolving the file and its card, the sha256 and card checks, a file that does not load, a probe
that fails, the handover to the worker (between two frames, or refused when no worker takes it)
and revert; and the control messages of protocol 1.5."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.modelcard import ModelCard, sha256_file, shipped_model_dir
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.daemon.app import build_detector, serve
from nanoscout.daemon.config import ServeConfig
from nanoscout.daemon.hotswap import (
    LoadedModel,
    ModelSwapper,
    SwapError,
    resolve_model,
    synthetic_probe,
)
from nanoscout.wire.errors import EngineError
from nanoscout.wire.protocol import (
    ControlReply,
    ControlRequest,
    DetHeader,
    decode_message,
    encode_message,
)

SHIPPED = shipped_model_dir() / "detector.onnx"
SHA = sha256_file(SHIPPED)
CONFIG = ServeConfig.model_validate({"engine": {"threads": 1}})


def _copy(directory: Path, name: str = "copy", *, card_sha: str | None = None,
          onnx_bytes: bytes | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx = directory / f"{name}.onnx"
    if onnx_bytes is None:
        shutil.copyfile(SHIPPED, onnx)
    else:
        onnx.write_bytes(onnx_bytes)
    card = json.loads(SHIPPED.with_suffix(".json").read_text(encoding="utf-8"))
    card.update(onnx_file=onnx.name, name=f"{card['name']}-{name}")
    if card_sha is not None:
        card["sha256"] = card_sha
    onnx.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return onnx


def _swapper(**kw: object) -> tuple[ModelSwapper, Pipeline]:
    det, engine, name = build_detector(CONFIG, SHIPPED)
    pipeline = Pipeline(det, engine_name=engine, model_name=name)
    started = LoadedModel(det, engine, name, SHIPPED, SHA)
    return ModelSwapper(pipeline, lambda p: build_detector(CONFIG, p), started,
                        **kw), pipeline  # type: ignore[arg-type]


class _Worker:
    """The daemon worker's part: install what is handed over, between 'frames'."""

    def __init__(self, swapper: ModelSwapper) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(swapper,))
        self.thread.start()

    def _run(self, swapper: ModelSwapper) -> None:
        while not self.stop.wait(0.005):
            swapper.install_pending()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def test_resolve_finds_the_file_and_its_card(tmp_path: Path) -> None:
    onnx = _copy(tmp_path)
    assert resolve_model(onnx) == (onnx, onnx.with_suffix(".json"))
    assert resolve_model(onnx.with_suffix(".json")) == (onnx, onnx.with_suffix(".json"))
    with pytest.raises(SwapError, match="does not exist"):
        resolve_model(tmp_path / "nothing.onnx")
    onnx.with_suffix(".json").unlink()
    with pytest.raises(SwapError, match="card .* is missing"):
        resolve_model(onnx)
    other = _copy(tmp_path / "b", "b")
    shutil.copyfile(other.with_suffix(".json"), tmp_path / "b" / "elsewhere.json")
    with pytest.raises(SwapError, match="keep NAME.onnx and NAME.json together"):
        resolve_model(tmp_path / "b" / "elsewhere.json")


def test_resolve_asks_nothing_of_other_files_and_keeps_to_the_model_folders(tmp_path: Path
                                                                              ) -> None:
    """The control socket cannot probe for files that are no model, nor hash them: a name
    without .onnx / .json is refused before the file system is asked (the same answer for a
    file that exists and one that does not), and with ``model_dirs`` a model elsewhere,
    through a symbolic link too, is refused."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    (tmp_path / "secret.json").write_text("{}")
    answers = set()
    for name in (secret, tmp_path / "absent", tmp_path / ".." / ".." / "etc" / "shadow"):
        with pytest.raises(SwapError, match="is not a model") as err:
            resolve_model(name)
        answers.add(str(err.value).split("'")[-1])
    assert len(answers) == 1
    inside = _copy(tmp_path / "models")
    outside = _copy(tmp_path / "elsewhere", "b")
    roots = [tmp_path / "models"]
    assert resolve_model(inside, roots)[0] == inside
    with pytest.raises(SwapError, match=r"not in a model folder .*model_dirs"):
        resolve_model(outside, roots)
    link = tmp_path / "models" / "link.onnx"
    link.symlink_to(outside)
    with pytest.raises(SwapError, match="not in a model folder"):
        resolve_model(link, roots)
    (tmp_path / "models" / "b.onnx").symlink_to(outside)  # its card inside, the model not
    shutil.copyfile(outside.with_suffix(".json"), tmp_path / "models" / "b.json")
    with pytest.raises(SwapError, match="not in a model folder"):
        resolve_model(tmp_path / "models" / "b.json", roots)


def test_a_swap_switches_between_frames_and_revert_goes_back(tmp_path: Path) -> None:
    swaps: list[str] = []
    swapper, pipeline = _swapper(on_swap=swaps.append)
    worker = _Worker(swapper)
    try:
        copy = _copy(tmp_path)
        loaded = swapper.swap(copy, SHA)
        assert pipeline.detector is loaded.detector and pipeline.model_generation == 1
        assert pipeline.model_name == "nanoscout-particle-unet-copy:3.0.0"
        result = pipeline.process(synthetic_probe())
        assert result.det.model == pipeline.model_name and result.det.model_sha256 == SHA[:12]
        assert result.det.model_generation == 1
        back = swapper.revert()
        assert back.path == SHIPPED and pipeline.model_name == "nanoscout-particle-unet:3.0.0"
        assert pipeline.model_generation == 2 and swaps == ["swap", "revert"]
        with pytest.raises(SwapError, match="no earlier model"):
            swapper.revert()
    finally:
        worker.close()


@pytest.mark.parametrize("case, step", [
    ("wrong sha256", "sha256"), ("card of another file", "card"), ("truncated, card agrees", "load"),
])
def test_a_broken_model_is_refused_and_the_old_one_serves(tmp_path: Path, case: str,
                                                          step: str) -> None:
    failures: list[tuple[str, str]] = []
    swapper, pipeline = _swapper(on_failure=lambda a, s: failures.append((a, s)))
    before = pipeline.detector
    worker = _Worker(swapper)
    try:
        if case == "wrong sha256":
            model, sha, match = _copy(tmp_path), "1" * 64, "the request expected"
        elif case == "card of another file":
            model = _copy(tmp_path, onnx_bytes=SHIPPED.read_bytes()[:4096])
            sha, match = sha256_file(model), "model card"
        else:
            broken = SHIPPED.read_bytes()[:4096]
            import hashlib
            digest = hashlib.sha256(broken).hexdigest()
            model = _copy(tmp_path, onnx_bytes=broken, card_sha=digest)
            sha, match = digest, "cannot load"
        with pytest.raises(SwapError, match=match):
            swapper.swap(model, sha)
        assert pipeline.detector is before and pipeline.model_generation == 0
        assert failures == [("swap", step)] and swapper.failures == 1 and swapper.swaps == 0
    finally:
        worker.close()


def test_a_model_failing_its_probe_is_refused(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def detect(self, *a: object, **kw: object) -> object:
            raise RuntimeError("no particles for you")

    def probe() -> Frame:
        return Frame.from_image(np.zeros((32, 32), np.uint16), pixel_size_nm=1.0)

    swapper, pipeline = _swapper(probe=probe)
    real = swapper.build
    assert real is not None
    swapper.build = lambda p: (Broken(), *real(p)[1:])  # type: ignore[assignment,return-value]
    with pytest.raises(SwapError, match="failed on a probe frame .*no particles for you"):
        swapper.swap(_copy(tmp_path), SHA)
    assert pipeline.model_generation == 0
    # the daemon's log says so too (the refusal was only counted and answered)
    assert "swap refused at step probe" in caplog.text and "no particles for you" in caplog.text


def test_serve_does_not_start_with_a_model_that_fails_its_probe(tmp_path: Path) -> None:
    """The field classifier's network under a detection card (its sha256 made to match) was
    loaded at start, the daemon said READY and dropped every frame as ``engine_failure``;
    start-up now probes each detection model as a swap does, and refuses."""
    onnx = _copy(tmp_path, onnx_bytes=(shipped_model_dir() / "classifier.onnx").read_bytes())
    onnx.with_suffix(".json").write_text(json.dumps(
        {**json.loads(onnx.with_suffix(".json").read_text(encoding="utf-8")),
         "sha256": sha256_file(onnx)}), encoding="utf-8")
    config = ServeConfig.model_validate({"engine": {"threads": 1, "model": str(onnx)},
                                         "metrics": {"enabled": False}})
    ready: list[object] = []
    with pytest.raises(EngineError, match=f"{onnx} failed on a probe frame .*not starting"):
        serve(config, on_ready=ready.append)
    assert ready == []


def test_without_a_worker_the_swap_times_out_and_is_taken_back(tmp_path: Path) -> None:
    swapper, pipeline = _swapper()
    with pytest.raises(SwapError, match="did not switch within 0.2 s"):
        swapper.swap(_copy(tmp_path), SHA, timeout=0.2)
    assert not swapper.install_pending()  # never installed later
    assert pipeline.model_generation == 0 and swapper.current.path == SHIPPED


def test_control_messages_of_protocol_1_5() -> None:
    req = ControlRequest(action="swap_model", model="/m/detector.onnx", sha256=SHA)
    back = decode_message(encode_message(req)).header
    assert back == req and back.source is None
    with pytest.raises(ValidationError, match="needs model"):
        ControlRequest(action="swap_model", model="/m/detector.onnx")
    with pytest.raises(ValidationError, match="64 lowercase hex"):
        ControlRequest(action="swap_model", model="m.onnx", sha256="ABC")
    with pytest.raises(ValidationError, match="save_frame needs a source"):
        ControlRequest(action="save_frame")
    assert ControlRequest(action="save_frame", source="cam", frames=3).frames == 3
    reply = ControlReply(source="", action="revert_model", ok=True, model="m:1",
                         model_sha256=SHA[:12], model_generation=2, files=[])
    assert decode_message(encode_message(reply)).header == reply
    # a v1.4 det (no model_sha256 / model_generation) still reads
    old = DetHeader(source="cam", seq=1, t_recv_ns=1, t_done_ns=2, pixel_size_nm=None,
                    units="px", n=0, engine="cpu", model="m:1", v=(1, 4))
    msg = decode_message(encode_message(old, np.zeros(0, dtype=_particle_dtype())))
    assert msg.header.model_sha256 is None and msg.header.model_generation is None


def _particle_dtype() -> np.dtype:
    from nanoscout.wire.protocol import PARTICLE_DTYPE
    return PARTICLE_DTYPE


def test_a_swapped_in_model_analyses_every_modality_until_reverted(tmp_path: Path) -> None:
    det, engine, name = build_detector(CONFIG, SHIPPED)
    stem_path = shipped_model_dir() / "detector_stem.onnx"
    stem, _, stem_name = build_detector(CONFIG, stem_path)
    pipeline = Pipeline(det, engine_name=engine, model_name=name,
                        modality_detectors={"STEM": (stem, stem_name)})
    started = LoadedModel(det, engine, name, SHIPPED, SHA, {"STEM": (stem, stem_name)})
    swapper = ModelSwapper(pipeline, lambda p: build_detector(CONFIG, p), started)
    frame = Frame.from_image(synthetic_probe().pixels, pixel_size_nm=1.0, modality="STEM")
    assert pipeline.process(frame).det.model_sha256 == sha256_file(stem_path)[:12]
    worker = _Worker(swapper)
    try:
        swapper.swap(_copy(tmp_path), SHA)
        after = pipeline.process(frame).det
        assert after.model == "nanoscout-particle-unet-copy:3.0.0" and after.model_sha256 == SHA[:12]
        swapper.revert()
        assert pipeline.process(frame).det.model == stem_name
    finally:
        worker.close()
        swapper.close()
        pipeline.close()


def _adapted(directory: Path) -> Path:
    """A model whose card names a base network (as ``models adapt`` writes): the shipped
    network, its working scale measured by the shipped STEM network copied beside it."""
    stem = shipped_model_dir() / "detector_stem.onnx"
    est = directory / "base_network.onnx"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stem, est)
    est_card = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    est_card["onnx_file"] = est.name
    est.with_suffix(".json").write_text(json.dumps(est_card), encoding="utf-8")
    onnx = _copy(directory, "adapted")
    card = json.loads(onnx.with_suffix(".json").read_text(encoding="utf-8"))
    card["base_network"] = {"onnx_file": est.name, "sha256": est_card["sha256"]}
    onnx.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return onnx


def test_a_model_with_a_base_network_swaps_in_with_it(tmp_path: Path) -> None:
    """The swapped-in detector measures particle sizes with the base network its card names;
    a base network that is not what the card pins, or that lies outside the model folders, is
    refused at the card step with the old model serving."""
    failures: list[tuple[str, str]] = []
    swapper, pipeline = _swapper(on_failure=lambda a, s: failures.append((a, s)))
    worker = _Worker(swapper)
    try:
        onnx = _adapted(tmp_path / "ok")
        loaded = swapper.swap(onnx, SHA)
        source = pipeline.detector.base_detector
        assert pipeline.detector is loaded.detector and source is not None
        assert source.card.name == ModelCard.load(
            shipped_model_dir() / "detector_stem.json").name
        assert pipeline.process(synthetic_probe()).det.model_generation == 1
        bad = _adapted(tmp_path / "bad")
        with open(bad.parent / "base_network.onnx", "ab") as f:
            f.write(b"\0")
        with pytest.raises(SwapError, match="model card .*sha256 of .*base_network.onnx"):
            swapper.swap(bad, SHA)
        assert failures == [("swap", "card")] and pipeline.detector is loaded.detector
    finally:
        worker.close()
    roots = [tmp_path / "models"]
    inside = _adapted(tmp_path / "models")
    (tmp_path / "models" / "base_network.onnx").unlink()
    (tmp_path / "models" / "base_network.onnx").symlink_to(
        tmp_path / "ok" / "base_network.onnx")
    swapper, pipeline = _swapper(model_dirs=roots)
    worker = _Worker(swapper)
    try:
        with pytest.raises(SwapError, match="base_network.onnx is not in a model folder"):
            swapper.swap(inside, SHA)
    finally:
        worker.close()
