"""A real Triton Inference Server on this CPU, from the ``nvidia-pytriton`` wheel.

The wheel ships the ``tritonserver`` binary (Triton 2.51 in pytriton 0.7) with a single
backend, ``python``; it has no ONNX Runtime backend, so the tests serve the models through a
repository written with ``export-triton --runtime python`` (ONNX Runtime inside the server's
Python stub). The wheel pins ``numpy<2``, so it lives in its own virtual environment,
``.venv-triton`` beside the repository's ``.venv`` (``make triton-env``, which ``.ci/run``
calls), with ``onnxruntime`` for the stub.

The stub embeds the venv's interpreter: ``LD_LIBRARY_PATH`` must reach that interpreter's
``libpython`` (its ``LIBDIR``) before any other copy, and the wheel's own libraries
(``nvidia_pytriton.libs``); ``PATH`` starts with the venv's ``bin`` so the stub picks the venv's
site-packages (this is what pytriton itself does). The server binds loopback only, gRPC on a
free port, HTTP and metrics off; readiness is its "Started GRPCInferenceService" log line.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRITON_VENV = REPO / ".venv-triton"
_READY = "Started GRPCInferenceService at "


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel's server lives in a venv, and what its stub needs."""

    venv: Path
    server: Path  # pytriton/tritonserver (bin/, backends/, python_backend_stubs/)
    libs: Path  # nvidia_pytriton.libs
    python_libdir: Path  # the venv interpreter's LIBDIR (libpython3.X.so)
    python_version: str  # "3.11"


def find_dist(venv: Path = TRITON_VENV) -> TritonDist | str:
    """The server in ``venv``, or the reason it cannot run here (one line)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return (f"no Triton server: {venv} does not exist (make triton-env creates it: "
                "nvidia-pytriton + onnxruntime in their own venv)")
    probe = (
        "import importlib.util, json, sys, sysconfig, pathlib\n"
        "spec = importlib.util.find_spec('pytriton')\n"
        "root = pathlib.Path(list(spec.submodule_search_locations)[0]) if spec else None\n"
        "print(json.dumps({'root': str(root) if root else None,\n"
        "  'libdir': sysconfig.get_config_var('LIBDIR'),\n"
        "  'version': f'{sys.version_info[0]}.{sys.version_info[1]}',\n"
        "  'ort': importlib.util.find_spec('onnxruntime') is not None}))\n"
    )
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no Triton server: {python} does not run ({exc})"
    info = json.loads(out)
    if info["root"] is None:
        return f"no Triton server: nvidia-pytriton is not installed in {venv}"
    if not info["ort"]:
        return f"no Triton server: onnxruntime is not installed in {venv} (the stub needs it)"
    root = Path(info["root"])
    dist = TritonDist(venv, root / "tritonserver", root.parent / "nvidia_pytriton.libs",
                      Path(info["libdir"]), info["version"])
    stub = dist.server / "python_backend_stubs" / dist.python_version / "triton_python_backend_stub"
    if not stub.exists():
        return f"no Triton server: pytriton has no Python stub for Python {dist.python_version}"
    try:
        check = subprocess.run([str(dist.server / "bin" / "tritonserver"), "--help"],
                               capture_output=True, text=True, timeout=60, env=server_env(dist))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no Triton server: the wheel's tritonserver does not start here ({exc})"
    if "--model-repository" not in check.stdout + check.stderr:
        tail = (check.stderr or check.stdout).strip().splitlines()[-1:]  # e.g. GLIBC_2.35 not found
        return f"no Triton server: the wheel's tritonserver does not run here: {tail}"
    return dist


def server_env(dist: TritonDist) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(dist.python_libdir), str(dist.libs)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{dist.venv / 'bin'}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (Triton cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TritonServer:
    """A running server: its process, gRPC ``host:port`` and log file."""

    proc: subprocess.Popen[str]
    url: str
    log: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT (Triton unloads models, ends its Python stubs and exits), SIGKILL to the
        whole process group after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                self._kill_group()  # a stub that outlived the server
                return code
        self._kill_group()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to the server and its Python stubs: gone at once, as in a crash."""
        self._kill_group()
        self.proc.wait()

    def _kill_group(self) -> None:
        # the server runs in its own session (start_triton), so its group holds exactly it and
        # the stub processes it started; a SIGKILLed server would otherwise orphan them
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_triton(dist: TritonDist, repository: Path, workdir: Path, *,
                 port: int | None = None, timeout: float = 180.0) -> TritonServer:
    """Start ``tritonserver`` on ``repository`` (gRPC on ``port``, default a free one);
    returns once gRPC is up and the models have loaded (Triton starts its endpoints after
    loading). Raises RuntimeError with the log's tail when it exits first, TimeoutError when
    it is not ready in ``timeout`` s."""
    backends = workdir / "backends"
    if not backends.exists():
        shutil.copytree(dist.server / "backends", backends)
        shutil.copy(dist.server / "python_backend_stubs" / dist.python_version /
                    "triton_python_backend_stub", backends / "python")
    port = free_port() if port is None else port
    log_path = workdir / f"tritonserver-{port}-{time.monotonic_ns()}.log"
    cmd = [str(dist.server / "bin" / "tritonserver"), "--model-repository", str(repository),
           "--backend-directory", str(backends), "--grpc-address", "127.0.0.1",
           "--grpc-port", str(port), "--allow-http", "false", "--allow-metrics", "false",
           "--allow-gpu-metrics", "false", "--log-verbose", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=server_env(dist), cwd=workdir, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with proc.stdout, log_path.open("w", encoding="utf-8") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    server = TritonServer(proc, f"127.0.0.1:{port}", log_path, lines)
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            server.kill()
            raise TimeoutError(f"tritonserver not ready within {timeout} s; log {log_path}") \
                from None
        if line == "":
            code = proc.wait()
            tail = "".join(log_path.read_text(encoding="utf-8").splitlines(True)[-15:])
            raise RuntimeError(f"tritonserver exited with {code} before it was ready:\n{tail}")
        if _READY in line:
            return server
