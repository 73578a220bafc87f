"""Triton Inference Server backend: the model runs on a (shared) Triton server, over gRPC.

The daemon keeps everything but the network call: scale, tiling, instances, measurement,
statistics and alerts stay in the daemon; :meth:`TritonEngine.infer` sends the preprocessed
tensor to the server and returns its outputs. Many daemons (one per microscope) share one
server, whose dynamic batching and instance groups spread their requests over its GPUs.
``nanoscout models export-triton`` writes the model repository such a server loads.

Transport
---------
gRPC (``tritonclient[grpc]``, imported lazily). When the server runs on this host
(``shared_memory = "auto"`` and a loopback URL, or ``"system"``) tensors travel through POSIX
shared memory regions registered with the server instead of the gRPC message: one input region
and one output region per engine, grown (never shrunk) as tensors grow. The first request of
each new input shape sends its outputs over gRPC to learn their sizes; later requests of that
shape read the outputs from shared memory. A server that cannot map the regions (a container
without ``--ipc=host``) makes ``"auto"`` fall back to plain gRPC, with a log line and the
transport named in :meth:`TritonEngine.state`; ``"system"`` then fails instead.

Failure
-------
Construction waits up to ``connect_timeout_s`` for the server to be live and the model ready,
then raises :class:`~nanoscout.wire.errors.EngineUnavailable` naming the URL and model. A
request that fails (server down, ``timeout_s`` exceeded, model unloaded) raises
:class:`~nanoscout.wire.errors.EngineFailure`, which the daemon counts as an
``engine_failure`` drop; :meth:`TritonEngine.state` says since when the server has been failing
and why (the daemon's health message shows it). :class:`~nanoscout.engines.fallback.FallbackEngine`
adds a local engine for the time the server is gone.

Model identity
--------------
The daemon reads thresholds and channel names from the model card beside its local ONNX file,
so the server must serve the same weights. ``export-triton`` writes the ONNX file's SHA-256 into
each model's ``config.pbtxt`` (parameter ``nanoscout_sha256``); an engine given
``expected_sha256`` refuses a server model whose digest differs, and logs a warning when the
server's configuration carries none.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nanoscout.engines.base import Engine, TensorSpec, check_inputs
from nanoscout.wire.errors import ConfigError, EngineFailure, EngineUnavailable

__all__ = [
    "SHA256_PARAMETER",
    "TRITON_MISSING",
    "TritonEngine",
    "TritonOptions",
    "file_sha256",
    "is_local_url",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

TRITON_MISSING = "tritonclient is not installed: pip install 'nanoscout[triton]' (tritonclient[grpc])"
#: the config.pbtxt parameter that carries the served ONNX file's SHA-256 (export-triton)
SHA256_PARAMETER = "nanoscout_sha256"

_LOOPBACK_HOSTS = frozenset({"localhost", "::1", "[::1]", "ip6-localhost"})
#: regions are allocated in multiples of this (bytes), so slightly larger frames reuse them
_REGION_ALIGN = 1 << 20
_region_ids = itertools.count()

SharedMemory = Literal["auto", "system", "off"]

#: tritonclient's own channel options (unbounded messages, its keepalive defaults) plus a short
#: reconnection backoff: gRPC's default (1 s growing to 120 s) would keep failing requests for
#: minutes after a server restart; this retries the connection at most every 2 s
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class TritonOptions:
    """Where the model is served and how long to wait for it.

    ``url``: the server's gRPC endpoint, ``host:port`` (default port 8001). ``model``: the
    model's name in the server's repository; ``version``: "" for the server's choice.
    ``timeout_s``: the longest one request may take (s) before it counts as failed.
    ``connect_timeout_s``: how long construction waits for the server and model to be ready (s).
    ``shared_memory``: "auto" (system shared memory when ``url`` is on loopback), "system" or
    "off". ``expected_sha256``: the local ONNX file's digest, checked against the server's
    ``nanoscout_sha256`` parameter (None: not checked).
    """

    url: str
    model: str
    version: str = ""
    timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    shared_memory: SharedMemory = "auto"
    expected_sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.url or "://" in self.url and not self.url.startswith("grpc://"):
            raise ConfigError(f"triton url {self.url!r} must be host:port (the gRPC endpoint)")
        if not self.model:
            raise ConfigError("triton model name must not be empty")
        if not self.timeout_s > 0 or not self.connect_timeout_s >= 0:
            raise ConfigError(f"triton timeout_s ({self.timeout_s}) must be > 0 and "
                              f"connect_timeout_s ({self.connect_timeout_s}) >= 0")
        if self.shared_memory not in ("auto", "system", "off"):
            raise ConfigError(f"triton shared_memory {self.shared_memory!r} must be auto, "
                              "system or off")

    @property
    def target(self) -> str:
        """``host:port`` as gRPC wants it (a ``grpc://`` prefix removed)."""
        return self.url.removeprefix("grpc://")


def is_local_url(url: str) -> bool:
    """True when a ``host:port`` URL names this host by a loopback address."""
    host = url.removeprefix("grpc://").rsplit(":", 1)[0].lower()
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex (the identity of an ONNX model on both sides)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_client() -> tuple[Any, Any, Any]:
    """Returns (tritonclient.grpc, tritonclient.utils, tritonclient.utils.shared_memory)."""
    try:
        import tritonclient.grpc as grpc
        import tritonclient.utils as utils
        import tritonclient.utils.shared_memory as shm
    except ImportError as exc:
        raise EngineUnavailable(TRITON_MISSING) from exc
    return grpc, utils, shm


def unavailable_reason() -> str | None:
    """Returns why the Triton client cannot be used here (one line), or None if it can."""
    try:
        _import_client()
    except EngineUnavailable as exc:
        return str(exc)
    return None


def _message(exc: BaseException) -> str:
    """The text of a tritonclient error (its ``message()``), else ``str(exc)``."""
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    return f"{status}: {text}" if status else str(text)


def _align(nbytes: int) -> int:
    return max(_REGION_ALIGN, -(-nbytes // _REGION_ALIGN) * _REGION_ALIGN)


class _Region:
    """One system shared memory region registered with the server, grown on demand."""

    def __init__(self, engine: TritonEngine, role: str) -> None:
        self._engine = engine
        self._role = role
        self.name = ""
        self.handle: Any = None
        self.nbytes = 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.release()
        size = _align(nbytes)
        n = next(_region_ids)
        self.name = f"nanoscout-{os.getpid()}-{n}-{self._role}"
        key = f"/nanoscout_{os.getpid()}_{n}_{self._role}"
        shm = self._engine._shm
        self.handle = shm.create_shared_memory_region(self.name, key, size)
        self.nbytes = size
        try:
            self._engine._client.register_system_shared_memory(
                self.name, key, size, client_timeout=self._engine.options.timeout_s)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self._engine._client.unregister_system_shared_memory(
                self.name, client_timeout=self._engine.options.timeout_s)
        except Exception as exc:  # the server may be gone: the local region still goes
            log.debug("could not unregister shared memory %s: %s", self.name, _message(exc))
        try:
            self._engine._shm.destroy_shared_memory_region(self.handle)
        except Exception as exc:
            log.warning("could not destroy shared memory region %s: %s", self.name, exc)
        self.handle = None
        self.nbytes = 0


class TritonEngine(Engine):
    """One model on a Triton Inference Server, called over gRPC (see the module docstring).

    ``inputs`` / ``outputs`` come from the server's model metadata (batch axis included, as in
    the ONNX model). ``transport`` is ``"system-shm"`` or ``"grpc"``.
    """

    name = "triton"

    def __init__(self, options: TritonOptions) -> None:
        self.options = options
        grpc, utils, shm = _import_client()
        self._grpc, self._utils, self._shm = grpc, utils, shm
        self._lock = threading.Lock()
        self._client: Any = None
        self.failures = 0
        self.requests = 0
        self.failing_since: float | None = None  # time.time() of the first failure in a row
        self.last_failure: str | None = None
        try:
            self._client = grpc.InferenceServerClient(options.target,
                                                      channel_args=_CHANNEL_ARGS)
        except Exception as exc:
            raise EngineUnavailable(f"cannot create a Triton gRPC client for {options.url}: "
                                    f"{_message(exc)}") from exc
        self._wait_ready()
        self._read_metadata()
        self._check_identity()
        self._in = _Region(self, "in")
        self._out = _Region(self, "out")
        #: output bytes per output name, learnt per input-shape signature
        self._out_sizes: dict[tuple[tuple[int, ...], ...], dict[str, int]] = {}
        self.transport = "grpc"
        self._reregister = False
        if options.shared_memory == "system" or (options.shared_memory == "auto"
                                                 and is_local_url(options.url)):
            self._try_shared_memory()
        log.info("Triton model %s at %s ready (%s; inputs %s)", options.model, options.url,
                 self.transport, ", ".join(s.describe() for s in self.inputs))

    # ------------------------------------------------------------------ set-up
    def _where(self) -> str:
        version = f" version {self.options.version}" if self.options.version else ""
        return f"Triton model {self.options.model!r}{version} at {self.options.url}"

    def _wait_ready(self) -> None:
        opts = self.options
        deadline = time.monotonic() + opts.connect_timeout_s
        wait = threading.Event()
        last = "no answer"
        while True:
            try:
                step = max(0.5, min(2.0, opts.connect_timeout_s))
                if not self._client.is_server_live(client_timeout=step):
                    last = "server not live"
                elif not self._client.is_model_ready(opts.model, opts.version,
                                                     client_timeout=step):
                    last = "server live, model not ready (not in the repository, or failed to load)"
                else:
                    return
            except Exception as exc:
                last = _message(exc)
            if time.monotonic() >= deadline:
                self._close_client()
                raise EngineUnavailable(f"{self._where()} is not ready after "
                                        f"{opts.connect_timeout_s:g} s: {last}")
            wait.wait(0.2)  # the server has no readiness notification: poll it

    def _read_metadata(self) -> None:
        opts = self.options
        try:
            meta = self._client.get_model_metadata(opts.model, opts.version, as_json=True,
                                                   client_timeout=opts.timeout_s)
            self._config = self._client.get_model_config(
                opts.model, opts.version, as_json=True, client_timeout=opts.timeout_s
            ).get("config", {})
        except Exception as exc:
            self._close_client()
            raise EngineUnavailable(f"{self._where()}: cannot read its metadata: "
                                    f"{_message(exc)}") from exc
        self._triton_dtypes: dict[str, str] = {}

        def spec(node: Mapping[str, Any]) -> TensorSpec:
            name = str(node["name"])
            datatype = str(node["datatype"])
            self._triton_dtypes[name] = datatype
            np_dtype = self._utils.triton_to_np_dtype(datatype)
            dtype = np.dtype(np_dtype).name if np_dtype is not None else datatype.lower()
            shape = tuple(None if int(d) < 0 else int(d) for d in node.get("shape", []))
            return TensorSpec(name, shape, dtype)

        self.inputs = tuple(spec(n) for n in meta.get("inputs", []))
        self.outputs = tuple(spec(n) for n in meta.get("outputs", []))
        if not self.inputs or not self.outputs:
            self._close_client()
            raise EngineUnavailable(f"{self._where()}: metadata lists no inputs or outputs")
        self._output_names = [s.name for s in self.outputs]

    def _check_identity(self) -> None:
        want = self.options.expected_sha256
        if want is None:
            return
        params = self._config.get("parameters", {}) or {}
        served = (params.get(SHA256_PARAMETER) or {}).get("string_value")
        if served is None:
            log.warning("%s has no %s parameter: cannot check that it serves the same weights "
                        "as the local model card (write the repository with nanoscout models "
                        "export-triton)", self._where(), SHA256_PARAMETER)
        elif served.lower() != want.lower():
            self._close_client()
            raise EngineFailure(
                f"{self._where()} serves ONNX weights with sha256 {served[:12]}..., but the "
                f"local model card belongs to {want[:12]}...: re-export the repository "
                "(nanoscout models export-triton) or point the daemon at the matching model"
            )

    def _try_shared_memory(self) -> None:
        try:
            self._in.ensure(1)
            self._out.ensure(1)
        except Exception as exc:
            self._in.release()
            self._out.release()
            why = _message(exc)
            if self.options.shared_memory == "system":
                self._close_client()
                raise EngineUnavailable(f"{self._where()}: system shared memory does not work "
                                        f"({why}); is the server on this host, with /dev/shm "
                                        "shared (--ipc=host)? Use shared_memory = 'off'") from exc
            log.warning("%s: system shared memory does not work (%s); sending tensors over "
                        "gRPC", self._where(), why)
            return
        self.transport = "system-shm"

    # ------------------------------------------------------------------ inference
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on the server; returns every output by name (host arrays)."""
        feeds = check_inputs(self.inputs, inputs)
        with self._lock:
            if self._client is None:
                raise EngineFailure(f"{self._where()}: engine is closed")
            self.requests += 1
            try:
                if self._reregister:
                    self._register_again()
                out = self._infer(feeds)
            except EngineFailure as exc:
                self.failures += 1
                if self.failing_since is None:
                    self.failing_since = time.time()
                self.last_failure = str(exc)
                # a restarted server has forgotten our shared memory regions: register them
                # again before the next request
                self._reregister = self.transport == "system-shm"
                raise
            self.failing_since = None
            return out

    def _register_again(self) -> None:
        # at least one region's worth (a failed attempt left them released); _infer grows them
        sizes = (max(self._in.nbytes, 1), max(self._out.nbytes, 1))
        try:
            self._in.release()
            self._out.release()
            self._in.ensure(sizes[0])
            self._out.ensure(sizes[1])
        except Exception as exc:
            raise EngineFailure(f"{self._where()}: cannot register shared memory again: "
                                f"{_message(exc)}") from exc
        self._reregister = False
        log.info("%s: shared memory registered again", self._where())

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grpc, opts = self._grpc, self.options
        key = tuple(v.shape for v in feeds.values())
        shm = self.transport == "system-shm"
        sizes = self._out_sizes.get(key) if shm else None
        try:
            requests = []
            offset = 0
            if shm:
                self._in.ensure(sum(v.nbytes for v in feeds.values()))
            for name, value in feeds.items():
                item = grpc.InferInput(name, list(value.shape), self._triton_dtypes[name])
                if shm:
                    self._shm.set_shared_memory_region(self._in.handle, [value], offset=offset)
                    item.set_shared_memory(self._in.name, value.nbytes, offset=offset)
                    offset += value.nbytes
                else:
                    item.set_data_from_numpy(value)
                requests.append(item)
            wanted = []
            if sizes is not None:
                self._out.ensure(sum(sizes.values()))
            offset = 0
            for name in self._output_names:
                o = grpc.InferRequestedOutput(name)
                if sizes is not None:
                    o.set_shared_memory(self._out.name, sizes[name], offset=offset)
                    offset += sizes[name]
                wanted.append(o)
            result = self._client.infer(opts.model, requests, model_version=opts.version,
                                        outputs=wanted, client_timeout=opts.timeout_s)
        except EngineFailure:
            raise
        except Exception as exc:  # InferenceServerException, grpc errors, OSError from shm
            shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in feeds.items())
            raise EngineFailure(f"{self._where()} failed on ({shapes}) within "
                                f"{opts.timeout_s:g} s: {_message(exc)}") from exc
        out: dict[str, np.ndarray] = {}
        offset = 0
        learnt: dict[str, int] = {}
        for name in self._output_names:
            if sizes is not None:
                meta = result.get_output(name)
                shape = [int(d) for d in meta.shape]
                dtype = self._utils.triton_to_np_dtype(meta.datatype)
                view = self._shm.get_contents_as_numpy(self._out.handle, dtype, shape,
                                                       offset=offset)
                out[name] = np.array(view, copy=True)  # the region is reused next request
                offset += sizes[name]
            else:
                arr = result.as_numpy(name)
                if arr is None:
                    raise EngineFailure(f"{self._where()} returned no output {name!r}")
                out[name] = arr
                learnt[name] = int(arr.nbytes)
        if shm and sizes is None:
            if len(self._out_sizes) > 64:  # many shapes (tiles of odd frames): forget the oldest
                self._out_sizes.pop(next(iter(self._out_sizes)))
            self._out_sizes[key] = learnt
        return out

    # ------------------------------------------------------------------ state
    def state(self) -> str:
        """One line for the health message: server, model, transport, and whether (since
        when, why) requests are failing."""
        where = f"{self.options.url} {self.options.model} ({self.transport})"
        if self._client is None:
            return f"{where}: closed"
        if self.failing_since is None:
            return f"{where}: ok, {self.requests} requests, {self.failures} failed"
        since = time.strftime("%H:%M:%S", time.localtime(self.failing_since))
        return f"{where}: FAILING since {since}, {self.failures} failed: {self.last_failure}"

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                log.debug("closing the Triton client of %s: %s", self.options.url, exc)

    def close(self) -> None:
        """Unregister and free the shared memory regions, close the channel. Idempotent."""
        with self._lock:
            if self._client is None:
                return
            for region in (getattr(self, "_in", None), getattr(self, "_out", None)):
                if region is not None:
                    region.release()
            self._close_client()
