"""The Triton engine against a real Triton Inference Server on the CPU.

The server is the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel, run from its own
venv (``.venv-triton``, made by ``make triton-env``; see ``tests/triton_server.py``). That build
has only the Python backend, so the repository is written with ``export-triton --runtime
python``: the same ONNX files, run by ONNX Runtime inside the server's Python stub. The tests
skip, saying why, where the venv is missing or the wheel's binary cannot run (glibc).

* the particles (and classifications) of real frames are identical through the server, over
  gRPC and over system shared memory, to the in-process ONNX Runtime engine;
* two daemons share one server, and both are served;
* a server that dies gives counted ``engine_failure`` drops and a FAILING health state, or,
  with a fallback configured, frames analysed by the local engine and a FALLBACK state.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import FrameResult, Pipeline
from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.acquisition.readers import ImageRecord, read_images
from nanoscout.clients.query import QueryError, request_lens
from nanoscout.clients.subscriber import Subscriber
from nanoscout.daemon.app import build_pipeline
from nanoscout.daemon.config import load_config
from nanoscout.wire.protocol import DetHeader, HealthHeader, encode_frame, frame_header
from tests.system.conftest import DaemonProc, nanoscout, start_daemon
from tests.triton_server import TritonDist, TritonServer, find_dist, start_triton

pytestmark = pytest.mark.system

tritonclient = pytest.importorskip("tritonclient.grpc",
                                   reason="tritonclient is not installed (pip install "
                                          "'nanoscout[triton]')")

#: the daemon configuration that makes its results comparable frame by frame with an offline
#: pipeline: the working scale estimated on every frame, no morphology clusters
_COMPARABLE = """
[engine]
auto_scale_every = 1
[clusters]
enabled = false
"""


def _triton_config(url: str, **triton: object) -> str:
    lines = [f'url = "{url}"', *(f"{k} = {v!r}".replace("'", '"') for k, v in triton.items())]
    return _COMPARABLE.replace("[engine]\n", '[engine]\nbackend = "triton"\n') + \
        "[engine.triton]\n" + "\n".join(lines) + "\n"


def _local(**overrides: object) -> Pipeline:
    """The in-process reference: ONNX Runtime on the CPU, one thread, FP32 (as the server's
    stub: the server runs the FP32 files, not their INT8 siblings)."""
    return build_pipeline(load_config(None, {"engine.backend": "cpu", "engine.threads": 1,
                                             "engine.precision": "fp32", **overrides}),
                          offline=True)


def _analyse(pipeline: Pipeline, rec: ImageRecord, modality: str | None) -> FrameResult:
    return pipeline.process(Frame.from_image(rec.data, pixel_size_nm=rec.pixel_size_nm,
                                             modality=modality))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python-runtime model repository of the four shipped models, via the CLI."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    out = subprocess.run([sys.executable, "-m", "nanoscout", "models", "export-triton", "--out",
                          str(repo), "--runtime", "python"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert {"detector:", "detector_stem:", "classifier:", "lens:"} <= \
        {line.split()[0] for line in out.splitlines() if line}
    return repo


def srv_dist() -> TritonDist:
    """The wheel's server, or a skip that says why it cannot run here."""
    dist = find_dist()
    if isinstance(dist, str):
        pytest.skip(dist)
    return dist


def _start(repository: Path, workdir: Path) -> TritonServer:
    workdir.mkdir(parents=True, exist_ok=True)
    return start_triton(srv_dist(), repository, workdir)


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """One server for the module (the failure test starts its own)."""
    srv = _start(repository, tmp_path_factory.mktemp("triton-server"))
    yield srv
    srv.stop()


Frames = list[tuple[ImageRecord, str | None]]


@pytest.fixture(scope="module")
def frames(shared_data: Path) -> Frames:
    """Real frames: EMPS TEM/SEM crops, BF-TEM frames, a DM4 HAADF file, and STEM images
    sent as STEM (so the STEM detector runs on the server too)."""
    paths = sorted((shared_data / "emps-train" / "images").iterdir())[:6]
    paths += sorted((shared_data / "msa-tem-train" / "images").iterdir())[:2]
    paths.append(shared_data / "instrument-files" / "dm" / "JEOL_HAADF_nanoparticles.dm4")
    out: list[tuple[ImageRecord, str | None]] = [(read_images(p)[0], None) for p in paths]
    stem = sorted((shared_data / "stem-dev" / "images").iterdir())
    out += [(read_images(p)[0], "STEM") for p in (stem[0], stem[-1])]
    return out


@pytest.mark.parametrize("shared_memory", ["off", "auto"])
def test_particles_identical_to_the_local_engine(server: TritonServer, frames: Frames, shared_memory: str
                                                 ) -> None:
    local = _local()
    remote = build_pipeline(load_config(None, {
        "engine.backend": "triton", "engine.triton.url": server.url,
        "engine.triton.shared_memory": shared_memory}), offline=True)
    try:
        transport = remote.detector.engine.transport  # type: ignore[attr-defined]
        assert transport == ("grpc" if shared_memory == "off" else "system-shm")
        assert remote.engine_name == "triton"
        assert remote.classifier is not None and local.classifier is not None
        for rec, modality in frames:
            a, b = _analyse(local, rec, modality), _analyse(remote, rec, modality)
            assert a.model == b.model
            assert len(a.table) == len(b.table) > 0, rec.path
            assert a.table.tobytes() == b.table.tobytes(), rec.path  # every field, bit for bit
            assert np.array_equal(a.labels, b.labels)
            ca, cb = a.classification, b.classification
            assert ca is not None and cb is not None
            assert ca.all == cb.all and ca.novelty == cb.novelty
        states = remote.detector.engine.state()  # type: ignore[attr-defined]
        assert ": ok," in states and "0 failed" in states
    finally:
        local.close()
        remote.close()


def _start_daemon(tmp_path: Path, name: str, config: str, *args: str) -> DaemonProc:
    from tests.system.conftest import start_daemon

    folder = tmp_path / name
    folder.mkdir()
    return start_daemon(folder, "--policy", "lossless", *args, config=config)


def _untracked(table: np.ndarray) -> np.ndarray:
    """``table`` with ``track_id`` zeroed: the daemon tracks particles across a source's frames
    (the in-process pipeline does not), every other field must match bit for bit."""
    out = table.copy()
    out["track_id"] = 0
    return out


def _results(d: DaemonProc, frames: Frames, source: str) -> dict[int, np.ndarray]:
    """Send ``frames`` to ``d``; returns seq -> particle table of each ``det``, ``track_id``
    zeroed (:func:`_untracked`)."""
    tables: dict[int, np.ndarray] = {}
    with Subscriber(d.output, topics=("det.",)) as sub:
        sub.wait_ready(30)
        with FramePublisher(d.input, mode="push", source=source) as pub:
            for rec, modality in frames:
                pub.send(rec.data, pixel_size_nm=rec.pixel_size_nm, modality=modality)
            for msg in sub.messages(timeout=180):
                assert isinstance(msg.header, DetHeader) and msg.array is not None
                tables[msg.header.seq] = _untracked(msg.array)
                if len(tables) == len(frames):
                    break
    return tables


def _first_served(d: DaemonProc, frame: tuple[ImageRecord, str | None], source: str,
                  attempts: int = 20) -> np.ndarray:
    """Send ``frame`` once at a time until ``d`` publishes its ``det`` (each failed attempt
    is a counted drop, seen in health); returns that particle table. The client reconnects
    to a restarted server within its 2 s reconnection backoff."""
    rec, modality = frame
    with Subscriber(d.output, topics=("det.", "health")) as sub, \
            FramePublisher(d.input, mode="push", source=source) as pub:
        dropped = sub.wait_ready(30).frames_dropped.get("engine_failure", 0)
        for _ in range(attempts):
            seq = pub.send(rec.data, pixel_size_nm=rec.pixel_size_nm, modality=modality)
            for msg in sub.messages(timeout=60):
                if isinstance(msg.header, DetHeader) and msg.header.source == source:
                    assert msg.header.seq == seq and msg.array is not None
                    return _untracked(msg.array)
                if isinstance(msg.header, HealthHeader):
                    n = msg.header.frames_dropped.get("engine_failure", 0)
                    if n > dropped:
                        dropped = n
                        break  # this attempt was dropped: the next one
    raise AssertionError(f"{d.output}: no frame served in {attempts} attempts")


def _health(d: DaemonProc, until: Callable[[HealthHeader], bool], timeout: float = 60.0) -> HealthHeader:
    """The first health message of ``d`` for which ``until(health)`` holds."""
    deadline = time.monotonic() + timeout
    with Subscriber(d.output, topics=("health",)) as sub:
        while time.monotonic() < deadline:
            msg = sub.recv(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and until(msg.header):
                return msg.header  # type: ignore[return-value]
    raise TimeoutError(f"no health message of {d.output} met the condition in {timeout} s")


def _stop(*daemons: DaemonProc) -> None:
    for d in daemons:
        d.stop()
        if d.pump is not None:
            d.pump.join(30)


def test_two_daemons_share_one_server(server: TritonServer, frames: Frames, tmp_path: Path) -> None:
    client = tritonclient.InferenceServerClient(server.url)

    def served() -> int:
        stats = client.get_inference_statistics("detector", as_json=True)
        return sum(int(m["inference_stats"]["success"].get("count", 0))
                   for m in stats["model_stats"])

    before = served()
    config = _triton_config(server.url)
    a = _start_daemon(tmp_path, "a", config)
    b = _start_daemon(tmp_path, "b", config)
    try:
        local = _local(**{"clusters.enabled": False})
        sent = [f for f in frames if f[1] is None][:4]
        got_a = _results(a, sent, "scope-a")
        got_b = _results(b, sent, "scope-b")
        for seq, (rec, modality) in enumerate(sent):
            want = _analyse(local, rec, modality).table
            assert got_a[seq].tobytes() == got_b[seq].tobytes() == want.tobytes(), rec.path
        # every detector request of both daemons went to this server (estimation passes too)
        assert served() - before >= 2 * len(sent)
        for d in (a, b):
            h = _health(d, lambda h: h.frames_processed == len(sent))
            assert h.engines["detector"] == "triton"
            assert server.url in h.engines["detector_state"]
            assert ": ok," in h.engines["detector_state"], h.engines
            assert "engine_failure" not in h.frames_dropped
        local.close()
    finally:
        _stop(a, b)
        client.close()


def test_server_down_drops_counted_or_falls_back(repository: Path, frames: Frames, tmp_path: Path
                                                 ) -> None:
    srv = _start(repository, tmp_path / "server")
    plain = fallback = None
    try:
        plain = _start_daemon(tmp_path, "plain", _triton_config(srv.url, timeout_s=5.0))
        fallback = _start_daemon(tmp_path, "fallback", _triton_config(
            srv.url, timeout_s=5.0, fallback="onnxruntime-cpu", retry_s=60.0))
        one = [f for f in frames if f[1] is None][:1]
        assert len(_results(plain, one, "s")) == 1
        assert len(_results(fallback, one, "s")) == 1
        srv.kill()  # gone at once, as in a crash

        with Subscriber(plain.output, topics=("det.",)) as sub, \
                FramePublisher(plain.input, mode="push", source="s", first_seq=1) as pub:
            sub.wait_ready(30)
            for rec, modality in one * 3:
                pub.send(rec.data, pixel_size_nm=rec.pixel_size_nm, modality=modality)
            h = _health(plain, lambda h: h.frames_dropped.get("engine_failure", 0) == 3)
            assert sub.recv(timeout=0) is None  # no det for a dropped frame
        assert h.frames_processed == 1
        assert "FAILING since" in h.engines["detector_state"], h.engines
        assert h.last_error is not None and srv.url in h.last_error

        local = _local(**{"clusters.enabled": False})
        want = _analyse(local, *one[0]).table
        local.close()
        got = _results(fallback, one * 2, "t")
        assert all(t.tobytes() == want.tobytes() for t in got.values())
        h = _health(fallback, lambda h: h.frames_processed == 3)
        assert h.frames_dropped.get("engine_failure", 0) == 0
        assert h.engines["detector_state"].startswith("FALLBACK to the local onnxruntime-cpu"), \
            h.engines

        # the server comes back on its port: the plain daemon is served again (its shared
        # memory regions registered anew with the new server process)
        srv = start_triton(srv_dist(), repository, tmp_path / "server",
                           port=int(srv.url.rsplit(":", 1)[1]))
        table = _first_served(plain, one[0], "u")
        assert table.tobytes() == want.tobytes()
        h = _health(plain, lambda h: h.frames_processed == 2)
        assert ": ok," in h.engines["detector_state"], h.engines
        assert "(system-shm)" in h.engines["detector_state"]
    finally:
        _stop(*(d for d in (plain, fallback) if d is not None))
        srv.kill()


def test_an_outage_forgets_the_sources_its_frames_evict(repository: Path, frames: Frames,
                                                       tmp_path: Path) -> None:
    """More sources than ``input.max_sources`` during a server outage: the failing frame of
    each new source evicts the least recently seen one from the pipeline. The eviction was
    lost with the frame: evicted sources kept their Prometheus series and their newest frame
    on the query socket for good (300 names of 512² float32 frames: 203 → 799 MB RSS and 302
    series at ``max_sources = 2``; ``nanoscout_sources_evicted_total`` 0 where health said
    300), and every dropped frame was an ERROR line. Now they are forgotten as after an
    analysed frame, and the failures make one line a minute."""
    srv = _start(repository, tmp_path / "server")
    log = tmp_path / "daemon.log"
    folder = tmp_path / "daemon"
    folder.mkdir()
    config = _triton_config(srv.url, timeout_s=5.0) + "[input]\nmax_sources = 2\n"
    d = start_daemon(folder, "--policy", "lossless", config=config, log=log)
    assert d.query is not None
    names = [f"scan{k:02d}" for k in range(20)]
    try:
        one = [f for f in frames if f[1] is None][:1]
        rec = one[0][0]
        assert len(_results(d, one, "camA")) == len(_results(d, one, "camB")) == 1
        reply, _ = request_lens(d.query, "camA", [])  # its newest frame is kept for the lens
        assert reply.seq == 0
        srv.kill()  # gone at once, as in a crash
        with FramePublisher(d.input, mode="push", source="x") as pub:
            for name in names:  # 20 new sources, one frame each: every frame fails
                fh = frame_header(rec.data, source=name, seq=0, t_acq_ns=time.time_ns(),
                                  pixel_size_nm=rec.pixel_size_nm)
                pub.send_raw([bytes(p) for p in encode_frame(fh, rec.data)])
        h = _health(d, lambda h: h.frames_dropped.get("engine_failure", 0) == len(names))
        assert h.frames_processed == 2 and h.sources == 2 and h.sources_evicted == len(names)
        text = d.scrape()
        received = {line.split('"')[1] for line in text.splitlines()
                    if line.startswith('nanoscout_frames_received_total{source="')}
        assert received == set(names[-2:])  # the pipeline's two sources, no others
        assert f"nanoscout_sources_evicted_total {float(len(names))}" in text.splitlines()
        with pytest.raises(QueryError, match=r"no frame of source 'camA'") as err:
            request_lens(d.query, "camA", [])
        assert str(names[-2:]) in str(err.value)  # the lens keeps the pipeline's sources only
        assert d.stop() == 0
    finally:
        _stop(d)
        srv.kill()
    failures = [line for line in log.read_text(encoding="utf-8").splitlines()
                if " dropped: " in line]
    assert len(failures) == 1 and "at most one line every 60 s" in failures[0], failures[:3]


def test_daemon_without_a_server_says_so(tmp_path: Path) -> None:
    from tests.triton_server import free_port

    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(_triton_config(url, connect_timeout_s=1.0), encoding="utf-8")
    proc = nanoscout("serve", "--config", str(cfg), "--input", "tcp://127.0.0.1:0", "--output",
                     "tcp://127.0.0.1:0", "--no-metrics", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"Triton model 'detector' at {url} is not ready after 1 s" in err


def test_onnxruntime_repository_parses_and_needs_only_its_backend(tmp_path: Path) -> None:
    """The production variant (platform onnxruntime_onnx) cannot run on the wheel's server,
    which has no ONNX Runtime backend; but Triton parses every config.pbtxt of it, and the
    missing backend is the only error it reports."""
    dist = srv_dist()
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "nanoscout", "models", "export-triton", "--out",
                    str(repo)], capture_output=True, text=True, timeout=300, check=True)
    with pytest.raises(RuntimeError, match="failed to load all models"):
        start_triton(dist, repo, tmp_path)
    log = next(tmp_path.glob("tritonserver-*.log")).read_text(encoding="utf-8")
    # "CudaDriverHelper has not been initialized": no GPU here, logged as an error at start
    errors = [ln for ln in log.splitlines() if ln.startswith("E") and "CudaDriver" not in ln]
    missing = "unable to find backend library for backend 'onnxruntime'"
    failed = {ln.split("failed to load '")[1].split("'")[0] for ln in errors if missing in ln}
    assert failed == {"detector", "detector_stem", "classifier", "lens"}
    assert all(missing in ln for ln in errors), errors
