"""Triton without a server: the repository writer, the configuration, the fallback logic, and
the errors of a client whose server is not there (a real closed port).

The tests against a real Triton server are in tests/system/test_triton.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.modelcard import shipped_model_dir
from nanoscout.daemon.config import load_config
from nanoscout.daemon.engine_setup import make_engine
from nanoscout.engines import TensorSpec, available_backends, create_engine
from nanoscout.engines.base import Engine
from nanoscout.engines.fallback import FallbackEngine
from nanoscout.engines.triton import TritonOptions, file_sha256, is_local_url
from nanoscout.engines.triton_repository import model_config, write_repository
from nanoscout.wire.errors import ConfigError, EngineFailure, EngineUnavailable, Reason
from tests.triton_server import free_port

WEIGHTS = shipped_model_dir()
IMAGE = TensorSpec("image", (None, 1, None, None), "float32")
LOGITS = TensorSpec("logits", (None, 2, None, None), "float32")


def test_repository_holds_every_shipped_model(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "nanoscout", "models", "export-triton", "--out",
                          str(tmp_path), "--instances", "2"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    for stem in ("detector", "detector_stem", "classifier", "lens"):
        folder = tmp_path / stem
        onnx = WEIGHTS / f"{stem}.onnx"
        assert (folder / "1" / "model.onnx").read_bytes() == onnx.read_bytes()
        config = (folder / "config.pbtxt").read_text(encoding="utf-8")
        assert f'name: "{stem}"' in config and 'platform: "onnxruntime_onnx"' in config
        assert "instance_group [ { count: 2 kind: KIND_AUTO } ]" in config
        assert f'string_value: "{file_sha256(onnx)}"' in config
        assert f"{stem}: onnxruntime" in out
    if available_backends()["tensorrt"] != "available":
        assert "no TensorRT plans: TensorRT is not installed" in out
        assert not list(tmp_path.glob("*_trt"))


def test_detector_config_batches_dynamic_frames() -> None:
    text = model_config("detector", [IMAGE], [LOGITS], variant="onnxruntime", sha256="ab")
    assert "max_batch_size: 8" in text
    assert '{ name: "image" data_type: TYPE_FP32 dims: [ 1, -1, -1 ] }' in text
    assert '{ name: "logits" data_type: TYPE_FP32 dims: [ 2, -1, -1 ] }' in text
    assert "dynamic_batching { max_queue_delay_microseconds: 2000 }" in text


def test_fixed_batch_model_gets_no_batching() -> None:
    fixed_in = TensorSpec("image", (1, 1, 256, 256), "float32")
    fixed_out = TensorSpec("cam", (1, 16, 16), "uint8")
    text = model_config("classifier", [fixed_in], [fixed_out], variant="tensorrt", sha256="ab",
                        kind="gpu")
    assert "max_batch_size: 0" in text and "dynamic_batching" not in text
    assert 'platform: "tensorrt_plan"' in text and "kind: KIND_GPU" in text
    assert "dims: [ 1, 1, 256, 256 ]" in text and "TYPE_UINT8 dims: [ 1, 16, 16 ]" in text


def test_python_runtime_ships_the_model_file(tmp_path: Path) -> None:
    written = write_repository([WEIGHTS / "lens.onnx"], tmp_path, runtime="python",
                               tensorrt="never", threads=2)
    assert [(m.name, m.variant, m.max_batch_size) for m in written] == [("lens", "python", 0)]
    config = (tmp_path / "lens" / "config.pbtxt").read_text(encoding="utf-8")
    assert 'backend: "python"' in config and 'key: "intra_op_threads"' in config
    assert "class TritonPythonModel" in (tmp_path / "lens" / "1" / "model.py").read_text()


def test_tensorrt_always_fails_without_tensorrt(tmp_path: Path) -> None:
    if available_backends()["tensorrt"] == "available":
        pytest.skip("TensorRT runs here")
    with pytest.raises(EngineUnavailable, match="no TensorRT plans: TensorRT is not installed"):
        write_repository([WEIGHTS / "lens.onnx"], tmp_path, tensorrt="always")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_batch_size": 0}, "max_batch_size (0)"),
    ({"instances": 0}, "instances (0)"),
])
def test_bad_repository_options(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        model_config("d", [IMAGE], [LOGITS], variant="onnxruntime", sha256="ab", **kwargs)
    assert needle in str(info.value)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("kwargs", [{"instances": 0}, {"max_batch_size": 0}, {"threads": 0},
                                    {"max_queue_delay_us": -1}])
def test_a_bad_option_leaves_the_repository_as_it_was(tmp_path: Path, kwargs: dict) -> None:
    repo = tmp_path / "repo"
    write_repository([WEIGHTS / "lens.onnx"], repo, tensorrt="never")
    before = _tree(repo)
    with pytest.raises(ConfigError, match=r"must be >= 1"):
        write_repository([WEIGHTS / "lens.onnx"], repo, tensorrt="never", **kwargs)
    # a missing second model is found before the first is written
    with pytest.raises(EngineFailure, match="model file not found: .*nosuch.onnx"):
        write_repository([WEIGHTS / "lens.onnx", tmp_path / "nosuch.onnx"], repo,
                         tensorrt="never", runtime="python")
    assert _tree(repo) == before


def test_only_model_folders_it_wrote_are_replaced(tmp_path: Path) -> None:
    """A re-export replaces the model folders export-triton wrote (a Python-backend server's
    __pycache__ in them included); a folder or file of the model's name that it did not
    write, or an --out that is a file, is refused and left as it was."""
    lens = WEIGHTS / "lens.onnx"
    repo = tmp_path / "repo"
    write_repository([lens], repo, tensorrt="never", runtime="python")
    (repo / "lens" / "1" / "__pycache__").mkdir()
    (repo / "lens" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    [m] = write_repository([lens], repo, tensorrt="never")
    assert m.folder == repo / "lens" and _tree(repo) == {
        "lens/1/model.onnx": lens.read_bytes(),
        "lens/config.pbtxt": (repo / "lens" / "config.pbtxt").read_bytes()}
    work = tmp_path / "work"
    (work / "lens").mkdir(parents=True)
    (work / "lens" / "notes.txt").write_text("my lens notes")
    (work / "detector").write_text("x")
    with pytest.raises(ConfigError, match="lens exists and is not a Triton model folder"):
        write_repository([lens], work, tensorrt="never")
    with pytest.raises(ConfigError, match="detector exists and is not a model folder"):
        write_repository([WEIGHTS / "detector.onnx"], work, tensorrt="never")
    # a config.pbtxt of someone else's, and a file of the user's beside the model
    (work / "lens" / "config.pbtxt").write_text('name: "lens"\n')
    with pytest.raises(ConfigError, match="not a Triton model folder"):
        write_repository([lens], work, tensorrt="never")
    (repo / "lens" / "1" / "README").write_text("mine")
    with pytest.raises(ConfigError, match="not a Triton model folder"):
        write_repository([lens], repo, tensorrt="never")
    assert (repo / "lens" / "1" / "README").read_text() == "mine"
    assert _tree(work) == {"detector": b"x", "lens/config.pbtxt": b'name: "lens"\n',
                           "lens/notes.txt": b"my lens notes"}
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a repository folder"):
        write_repository([lens], afile, tensorrt="never")
    assert afile.read_text() == "x"


def test_export_triton_help_says_what_it_replaces() -> None:
    from nanoscout.cli.export_triton import parser

    text = " ".join(parser().format_help().split())
    assert "a model folder of the same name that this command wrote there before is " \
           "replaced" in text


def test_triton_config_section() -> None:
    cfg = load_config(None, {"engine.backend": "triton", "engine.triton.url": "gpu1:8001",
                             "engine.triton.fallback": "cpu",
                             "engine.triton.models": {"detector": "nanoscout_det"}})
    tc = cfg.engine.triton
    assert tc.fallback == "onnxruntime-cpu"  # the alias resolved
    assert tc.model_name(WEIGHTS / "detector.onnx") == "nanoscout_det"
    assert tc.model_name(WEIGHTS / "lens.onnx") == "lens"
    assert tc.shared_memory == "auto" and tc.timeout_s == 10.0


@pytest.mark.parametrize(("fallback", "needle"), [
    ("triton", "fallback must be a local backend"),
    ("openvino", "unknown engine backend 'openvino'"),
])
def test_bad_fallback_is_refused(fallback: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"engine.triton.fallback": fallback})
    assert "engine.triton.fallback" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"url": "http://host:8000"}, "'http://host:8000' must be host:port"),
    ({"timeout_s": 0}, "timeout_s (0)"),
    ({"model": ""}, "model name must not be empty"),
    ({"shared_memory": "cuda"}, "'cuda' must be auto, system or off"),
])
def test_bad_triton_options(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        TritonOptions(**{"url": "127.0.0.1:8001", "model": "detector", **kwargs})
    assert needle in str(info.value)


@pytest.mark.parametrize(("url", "local"), [("127.0.0.1:8001", True), ("localhost:1", True),
                                            ("grpc://127.0.0.5:9", True),
                                            ("triton.lab:8001", False), ("10.0.0.2:8001", False)])
def test_local_url(url: str, local: bool) -> None:
    assert is_local_url(url) is local


def test_no_server_is_unavailable_naming_the_url() -> None:
    url = f"127.0.0.1:{free_port()}"  # closed: nothing listens there
    with pytest.raises(EngineUnavailable) as info:
        create_engine(WEIGHTS / "detector.onnx", "triton",
                      triton=TritonOptions(url, "detector", connect_timeout_s=0.5))
    assert re.search(rf"Triton model 'detector' at {url} is not ready after 0.5 s", str(info.value))


def test_triton_backend_needs_options() -> None:
    with pytest.raises(ConfigError, match=r"\[engine.triton\]"):
        create_engine(WEIGHTS / "detector.onnx", "triton")


def test_fallback_at_start_serves_locally_and_says_why() -> None:
    url = f"127.0.0.1:{free_port()}"
    cfg = load_config(None, {"engine.backend": "triton", "engine.threads": 1,
                             "engine.triton.url": url, "engine.triton.fallback": "cpu",
                             "engine.triton.connect_timeout_s": 0.2})
    engine = make_engine(cfg.engine, WEIGHTS / "detector.onnx")
    local = create_engine(WEIGHTS / "detector.onnx", "cpu", threads=1)
    x = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)
    try:
        assert engine.name == "triton"
        np.testing.assert_array_equal(engine.infer({"image": x})["logits"],
                                      local.infer({"image": x})["logits"])
        state = engine.state()  # type: ignore[attr-defined]
        assert state.startswith("FALLBACK to the local onnxruntime-cpu since ")
        assert f"{url} detector: not connected" in state
    finally:
        engine.close()
        local.close()


@pytest.mark.parametrize(("precision", "expected"), [("auto", "fp32"), ("int8", "int8")])
def test_fallback_runs_the_servers_fp32_file_unless_told_otherwise(precision: str,
                                                                   expected: str) -> None:
    """The server runs the FP32 files: under precision auto the local fallback does too (the
    same particles whichever engine serves); an explicit precision is honoured."""
    cfg = load_config(None, {"engine.backend": "triton", "engine.threads": 1,
                             "engine.precision": precision,
                             "engine.triton.url": f"127.0.0.1:{free_port()}",
                             "engine.triton.fallback": "cpu",
                             "engine.triton.connect_timeout_s": 0.2})
    engine = make_engine(cfg.engine, WEIGHTS / "detector.onnx")
    try:
        assert isinstance(engine, FallbackEngine)
        assert (engine.fallback.name, engine.fallback.precision) == ("onnxruntime-cpu", expected)
    finally:
        engine.close()


class _Double(Engine):
    """A test double of an engine: returns ``value`` or raises ``error`` (httpx MockTransport
    style; the real remote engine is tested against a real server in tests/system)."""

    def __init__(self, name: str, value: float, error: EngineFailure | None = None) -> None:
        self.name, self.value, self.error = name, value, error
        self.inputs, self.outputs = (IMAGE,), (LOGITS,)
        self.calls = 0

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"logits": np.full((1, 2, 4, 4), self.value, np.float32)}


X = {"image": np.zeros((1, 1, 4, 4), np.float32)}


def test_fallback_serves_while_the_primary_fails_then_retries() -> None:
    primary = _Double("triton", 1.0, EngineFailure("server unreachable"))
    local = _Double("onnxruntime-cpu", 2.0)
    engine = FallbackEngine(primary, local, retry_s=3600)
    assert engine.infer(X)["logits"][0, 0, 0, 0] == 2.0
    assert engine.infer(X)["logits"][0, 0, 0, 0] == 2.0
    assert primary.calls == 1  # not asked again within retry_s
    assert engine.served == {"primary": 0, "fallback": 2} and engine.fallbacks == 1
    assert engine.state().startswith("FALLBACK to the local onnxruntime-cpu since ")

    engine.retry_s = 0.0
    engine._down_until = 0.0  # the retry time has come
    primary.error = None
    assert engine.infer(X)["logits"][0, 0, 0, 0] == 1.0
    assert not engine.state().startswith("FALLBACK")


def test_fallback_never_hides_bad_input() -> None:
    primary = _Double("triton", 1.0, EngineFailure("wrong rank", reason=Reason.BAD_INPUT))
    engine = FallbackEngine(primary, _Double("onnxruntime-cpu", 2.0))
    with pytest.raises(EngineFailure, match="wrong rank"):
        engine.infer(X)
    assert engine.fallbacks == 0


def test_fallback_must_run_the_same_model() -> None:
    other = _Double("onnxruntime-cpu", 2.0)
    other.outputs = (TensorSpec("probabilities", (1, 8), "float32"),)
    with pytest.raises(ConfigError, match="does not run the same model"):
        FallbackEngine(_Double("triton", 1.0), other)
