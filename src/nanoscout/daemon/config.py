"""Typed configuration of the daemon: one TOML file plus command-line overrides.

This is the only module that reads configuration files; everything else receives a
:class:`ServeConfig`. Example (every key optional)::

    [input]
    endpoint = "tcp://127.0.0.1:5555"
    policy = "live"            # or "lossless"
    max_frame_bytes = 268435456

    [output]
    endpoint = "tcp://127.0.0.1:5556"

    [engine]
    backend = "auto"           # tensorrt | onnxruntime-cuda | onnxruntime-cpu | triton
    model = "detector-v2.onnx" # relative paths of files read: beside this file

    [engine.triton]            # only with backend = "triton"
    url = "127.0.0.1:8001"
    fallback = "onnxruntime-cpu"

    [metrics]
    port = 9108

    [stats]
    window_frames = 50

    [clusters]                 # morphology clusters (online k-means), per source
    k = 3

    [tracking]                 # drift correction, particle identities, in-situ statistics
    enabled = true
    max_gap_frames = 2         # a particle missed on up to 2 frames keeps its identity
    min_track_frames = 3       # a track counts in the unique statistics from 3 frames

    [review]                   # raw frames kept for review, saved as calibrated TIFF
    frames = 8                 # the newest 8 frames of each source ...
    max_bytes = 268435456      # ... within 256 MiB for all sources together
    directory = "review"       # where saved frames go (control "save_frame", alert rules)

    [[alerts]]
    name = "big-particle"
    kind = "particle"
    severity = "warning"
    where = { ecd_nm = { gt = 50 } }
    save_frames = { before = 2, after = 2 }   # write the raw frames around each firing
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nanoscout.analysis.alerts import parse_rules
from nanoscout.analysis.clusters import ClusterConfig
from nanoscout.analysis.modelcard import SHIPPED_STEM_MODEL, shipped_model_dir
from nanoscout.analysis.preview import PreviewConfig
from nanoscout.analysis.stats import StatsConfig
from nanoscout.analysis.tracking import TrackingConfig
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.protocol import Modality, ParticleSizeNm, ParticleSizePx
from nanoscout.wire.transport import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_QUERY_ENDPOINT,
    DEFAULT_RESULT_ENDPOINT,
    Policy,
    check_endpoint,
    is_loopback,
    is_loopback_host,
)

#: the detector's default largest tile side (px at working scale): one engine call's activations
#: stay bounded (a 4096² frame: 2 x 2 tiles of 2144 px)
TILE_PX = 2304
#: the default for an INT8 engine on the CPU: its activations are 8-bit, a quarter of the bytes,
#: so a 4096² frame goes through in one call (no seams, no 9.6 % overlap: engine time grows with
#: the pixel count). It costs memory: detecting a 4096² frame peaked at 1.42 GB RSS in one call
#: against 1.21 GB in 2 x 2 INT8 tiles (FP32 tiles: 1.31 GB), a lossless daemon fed 4096²
#: frames at 2.40 GB against 1.80 GB (2026-12-05, benchmarks/latency.py); set tile_px = 2304
#: where memory is tighter than time
TILE_PX_INT8 = 4608
#: the longest a configured time the daemon waits on may be, s (a day: far below
#: ``threading.TIMEOUT_MAX``, beyond which a wait raises OverflowError)
MAX_WAIT_S = 86_400.0


#: the sections' pydantic settings. ``strict``: TOML has real types, so a value of another
#: type is a mistake to name, not to convert: ``drain_s = "5"``, ``enabled = "no"`` (read as
#: false), ``cam = 0``, ``queue_size = 2.5`` (read as 2: "2.0" was taken too) were accepted.
#: An integer stays a valid float. TOML arrays (lists) become tuples by :data:`TomlTuple`, and
#: path strings paths by :data:`TomlPath`: strict pydantic takes neither. inf / nan are valid
#: TOML floats: a health interval of inf sent one health message and never another, a drain of
#: inf crashed the shutdown
SECTION_CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _as_path(value: Any) -> Any:
    return Path(value) if isinstance(value, str) else value


#: a tuple field given as a TOML array (its items stay strict)
TomlTuple = BeforeValidator(_as_tuple)
#: a file or folder given as a TOML string (a number, a boolean ... stays an error)
TomlPath = Annotated[Path, BeforeValidator(_as_path)]


class _Section(BaseModel):
    model_config = SECTION_CONFIG


def _endpoint(value: str) -> str:
    """A field validator's check of a ZeroMQ endpoint (:func:`check_endpoint`): ZeroMQ keeps a
    TCP port's low 16 bits, so ``tcp://127.0.0.1:70000`` bound port 4464."""
    try:
        return check_endpoint(value)
    except ConfigError as exc:  # pydantic reports ValueErrors with the key's location
        raise ValueError(str(exc)) from exc


class InputConfig(_Section):
    """Frame input, bounded in frames, bytes and sources.

    ``queue_size`` / ``queue_bytes``: frames accepted but not yet analysed (lossless; the
    receiver stops reading when either is reached, and the adapter's ``send`` blocks).
    ``buffer_bytes``: what ZeroMQ may hold before the daemon reads it (its high-water mark is
    ``buffer_bytes // max_frame_bytes`` frames, at least 1, at most ``hwm``). ``max_sources``:
    sources whose state (statistics, clusters, sequence numbers, metric labels) is kept; the
    least recently seen one is forgotten beyond it (``sources_evicted_total``).
    ``drain_s``: on SIGINT/SIGTERM, how long the daemon keeps reading frames that are still
    arriving before it stops, s (lossless: they are analysed; live: counted as ``shutdown``;
    at most :data:`MAX_WAIT_S`).
    """

    endpoint: str = DEFAULT_FRAME_ENDPOINT
    policy: Policy = "live"
    queue_size: int = Field(16, ge=1, le=10_000)
    queue_bytes: int = Field(1 << 30, ge=1)
    hwm: int = Field(50, ge=1)
    buffer_bytes: int = Field(1 << 30, ge=1)
    max_frame_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_sources: int = Field(64, ge=1, le=100_000)
    drain_s: float = Field(30.0, ge=0, le=MAX_WAIT_S)

    _endpoint = field_validator("endpoint")(_endpoint)

    def receive_hwm(self) -> int:
        """ZeroMQ receive high-water mark (frames) that keeps ``buffer_bytes`` the bound."""
        return max(1, min(self.hwm, self.buffer_bytes // self.max_frame_bytes))


class OutputConfig(_Section):
    """Result PUB socket."""

    endpoint: str = DEFAULT_RESULT_ENDPOINT
    hwm: int = Field(2000, ge=1)

    _endpoint = field_validator("endpoint")(_endpoint)


class TritonConfig(_Section):
    """``[engine.triton]``: the Triton Inference Server that runs the models when
    ``backend = "triton"`` (``nanoscout models export-triton`` writes its repository).

    The local ONNX files (``engine.model``, ``classify.model`` ...) stay the reference: their
    model cards give thresholds and channel names, and their SHA-256 must match the served
    model's (``check_sha256``). ``models`` maps a local file's stem to the model's name on the
    server (default: the stem itself, as export-triton names them: detector, detector_stem,
    classifier, lens). ``timeout_s``: the longest one request may take, s;
    ``connect_timeout_s``: how long start-up waits for the server and models, s.
    ``shared_memory``: "auto" = system shared memory when ``url`` is on loopback.
    ``fallback``: a local backend (e.g. "onnxruntime-cpu") that serves while the server is
    down or slow, retried after ``retry_s``; None = no fallback: such frames are dropped and
    counted as ``engine_failure``.
    """

    url: str = "127.0.0.1:8001"
    models: dict[str, str] = Field(default_factory=dict)
    version: str = ""
    timeout_s: float = Field(10.0, gt=0, le=MAX_WAIT_S)
    connect_timeout_s: float = Field(10.0, ge=0, le=MAX_WAIT_S)
    shared_memory: Literal["auto", "system", "off"] = "auto"
    fallback: str | None = None
    retry_s: float = Field(5.0, ge=0, le=MAX_WAIT_S)
    check_sha256: bool = True

    @field_validator("fallback")
    @classmethod
    def _local_backend(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from nanoscout.engines import resolve_backend

        try:
            name = resolve_backend(v)
        except ConfigError as exc:  # pydantic reports ValueErrors with the key's location
            raise ValueError(str(exc)) from exc
        if name == "triton":
            raise ValueError("fallback must be a local backend, not 'triton'")
        return name

    def model_name(self, onnx: Path) -> str:
        """The server's name for the model whose local file is ``onnx``."""
        return self.models.get(onnx.stem, onnx.stem)


class EngineConfig(_Section):
    """Detection engine: backend name, ONNX model (+ its ``.json`` model card beside it)."""

    backend: str = "auto"
    #: the Triton server, for ``backend = "triton"``
    triton: TritonConfig = TritonConfig()
    model: TomlPath | None = None
    threads: int | None = Field(None, ge=1)
    #: "auto": the fastest precision measured to keep accuracy (CPU: a model's INT8 sibling
    #: when its parity passed, else FP32; TensorRT: FP16; ONNX Runtime CUDA: FP32), or
    #: "fp32", "fp16" (TensorRT), "int8" (nanoscout.daemon.precision)
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    #: GPU index of the CUDA provider and TensorRT (several GPUs: deploy/README.md)
    device: int = Field(0, ge=0)
    #: TensorRT plans and INT8 calibration caches (None: ~/.cache/nanoscout/trt)
    cache_dir: TomlPath | None = None
    #: working px per frame px; "auto" estimates it (coarse pass), None = the model card's
    scale: float | Literal["auto"] | None = Field(None)
    #: with "auto": re-estimate a stream's scale at least every n-th frame (and on a new frame
    #: shape, and when its content changes: ``scale_tolerance``)
    auto_scale_every: int = Field(50, ge=1)
    #: with "auto": re-estimate when a frame's content signature (spectrum shape) moved more
    #: than this from the frame last estimated (nanoscout.analysis.autoscale); None: never
    scale_tolerance: float | None = Field(0.15, gt=0)
    #: largest side (px at working scale) sent to the engine at once; larger frames are tiled.
    #: None: :data:`TILE_PX` (2304 px), or :data:`TILE_PX_INT8` (4608 px: a 4096² frame in one
    #: call) for an INT8 engine on the CPU, whose activations take a quarter of the bytes
    tile_px: int | None = Field(None, ge=64)
    tile_margin_px: int = Field(96, ge=0)
    #: analyse frames at the model card's extra working scales too (``working_scale.multiscale``,
    #: the STEM detector's 0.71x and 1.41x its chosen scale: 3.5x its engine time), instances
    #: merged by score; None: as the card says, false: the chosen scale only (faster live)
    multiscale: bool | None = None
    #: tiles per engine call (bounds its memory); None: 1 on the CPU, 4 on a GPU
    tile_batch: int | None = Field(None, ge=1, le=64)
    #: test-time augmentation: mean logits over 1, 2 or 4 mirror images (engine time x tta)
    tta: Literal[1, 2, 4] = 1
    #: the detector's particle score cut, replacing the model card's (``thresholds.min_score``):
    #: lower it where recall matters more than precision (a stage search, whose confirmation
    #: frame supplies the precision), raise it for precision; None = the card's. The cut is on
    #: the network's raw score even where the card has a ``score_calibration`` (whose
    #: probabilities are what the particle tables then report as ``score``); a card's
    #: ``thresholds.rescue`` does not apply below it (nor below ``min_confidence``'s cut)
    score_cut: float | None = Field(None, ge=0, lt=1)
    #: keep the particles that are real with at least this probability, instead of a raw
    #: ``score_cut`` (give one of the two): mapped through the inverse of the model card's
    #: ``score_calibration`` to the raw cut the detector applies
    #: (:meth:`~nanoscout.analysis.modelcard.ScoreCalibration.raw_cut`), so every particle
    #: reported has a ``score`` (its calibrated probability) of at least this. A model named
    #: here (``model``, ``modality_models``) without a calibration is a start-up error; the
    #: shipped STEM detector that ``modality_models = None`` adds for STEM frames has none and
    #: keeps its card's raw cut (logged at start-up). None: the raw cut
    min_confidence: float | None = Field(None, gt=0, lt=1)
    #: merge instance fragments whose union is about as convex as they are (solidity ratio,
    #: e.g. 0.97): large particles and long wires among much smaller ones; None = the card's
    merge_convex: float | None = Field(None, gt=0, le=1)
    #: also infer on frames turned by 45° (long particles along an image axis; ~3x the engine
    #: time): "always", "never", or "on-request" for frames whose meta has ``rotate45 = true``
    #: (a stage search asks for it on its high-magnification frames)
    rotate45: Literal["never", "always", "on-request"] = "never"
    #: known magnifications: [[pixel size nm, working scale], ...]; a frame within 2 % of a
    #: preset's pixel size gets its scale (no estimate), others follow ``scale``
    scale_presets: list[Annotated[tuple[float, float], TomlTuple]] = Field(default_factory=list)
    #: [low, high] nm: the range the median particle diameter of frames lies in, for frames
    #: whose header names none (``particle_size_nm``, protocol v1.8): an automatic working-scale
    #: estimate outside it (specks, support lumps or a grain texture taken for the particles)
    #: is moved to its nearest end (``det.size_hint``); frames without a pixel size cannot use
    #: it. None: the estimate alone
    particle_size_nm: Annotated[ParticleSizeNm | None, TomlTuple] = None
    #: [low, high] frame px: the same where no range in nm can be used (frames without a pixel
    #: size: figure crops, PNG or JPEG files; or no range in nm). None: the estimate alone
    particle_size_px: Annotated[ParticleSizePx | None, TomlTuple] = None
    #: detectors for the frames of one modality (the frame header's ``modality``), e.g.
    #: ``{STEM = "models/weights/detector_stem.onnx"}``; frames of other modalities (or none)
    #: use ``model``. None = the shipped STEM detector for STEM frames when ``model`` is the
    #: shipped one too; {} = one detector for every frame
    modality_models: dict[Modality, TomlPath] | None = None
    #: frames that carry no modality (PNG, JPEG, plain TIFF; a stream whose adapter does not
    #: say) are given one by the shipped modality model (``modality.onnx``, on the CPU, about
    #: as much time as the field classifier): "STEM" when it finds them HAADF-STEM, so that the
    #: STEM detector analyses them (``nanoscout.analysis.modality``); a live stream's every 10th
    #: frame (per source) and at each new pixel size or frame shape, each image of ``measure``.
    #: Only where a modality has its own detector (``modality_models``)
    estimate_modality: bool = True

    @model_validator(mode="before")
    @classmethod
    def _merged_min_score(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_score" in data:
            raise ValueError("engine.min_score was merged into engine.score_cut (one particle "
                             "score cut, replacing the model card's): use score_cut")
        if isinstance(data, dict) and data.get("score_cut") is not None \
                and data.get("min_confidence") is not None:
            raise ValueError(f"engine.score_cut {data['score_cut']} (raw score) and "
                             f"engine.min_confidence {data['min_confidence']} (probability) are "
                             "two particle cuts: give one")
        return data

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from nanoscout.engines import resolve_backend

        try:  # before any model loads: a misspelt backend was found after the cards were read
            resolve_backend(v)
        except ConfigError as exc:  # pydantic reports ValueErrors with the key's location
            raise ValueError(str(exc)) from exc
        return v

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_integer(cls, v: Any) -> Any:
        # a Literal compares by equality: true and 2.0 were taken as 1 and 2
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"expected 1, 2 or 4 (an integer), got {v!r}")
        return v

    @model_validator(mode="after")
    def _tiles_have_interiors(self) -> EngineConfig:
        # each tile keeps only its interior, tile_margin_px from a cut edge: the detector
        # refused a tile of at most twice the margin after its engine had loaded
        tile = self.tile_px if self.tile_px is not None else TILE_PX
        if tile <= 2 * self.tile_margin_px:
            raise ValueError(f"engine.tile_px {tile}{'' if self.tile_px else ' (the default)'} "
                             f"must be more than twice engine.tile_margin_px "
                             f"{self.tile_margin_px}")
        return self

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float | int) and not 0.02 <= v <= 8.0:
            raise ValueError(f"scale {v} must be within [0.02, 8] or 'auto'")
        return v

    def model_path(self) -> Path:
        """The ONNX file to load (the shipped detector unless configured)."""
        return self.model if self.model is not None else shipped_model_dir() / "detector.onnx"

    def tile_for(self, engine_name: str, precision: str) -> int:
        """The largest tile side (px) for an engine ``engine_name`` running in ``precision``:
        ``tile_px``, or its default (:data:`TILE_PX`; :data:`TILE_PX_INT8` for INT8 on the
        CPU)."""
        if self.tile_px is not None:
            return self.tile_px
        return TILE_PX_INT8 if (engine_name, precision) == ("onnxruntime-cpu", "int8") else TILE_PX

    def modality_model_paths(self) -> dict[str, Path]:
        """Modality -> ONNX file of the detector for that modality's frames (see
        ``modality_models``)."""
        if self.modality_models is not None:
            return {str(k): v for k, v in self.modality_models.items()}
        stem = shipped_model_dir() / SHIPPED_STEM_MODEL
        return {"STEM": stem} if self.model is None and stem.is_file() else {}


class ClassifyConfig(_Section):
    """Field-of-view classification (``class.<source>`` topic) with CAM and the AI-lens novelty.

    ``every``: classify every n-th frame of each source (1 = every frame). ``model`` / ``lens``:
    ONNX files with their ``.json`` cards (default: the shipped ``classifier.onnx`` /
    ``lens.onnx``); ``lens_enabled = false`` skips the novelty score. Backend and threads are
    the detection engine's (``[engine]``).
    """

    enabled: bool = True
    every: int = Field(1, ge=1)
    model: TomlPath | None = None
    lens_enabled: bool = True
    lens: TomlPath | None = None
    top_k: int = Field(3, ge=1, le=64)
    cam: bool = True
    #: GPU index of the classifier and lens (None: ``[engine] device``)
    device: int | None = Field(None, ge=0)

    def model_path(self) -> Path:
        """The classifier ONNX file to load."""
        return self.model if self.model is not None else shipped_model_dir() / "classifier.onnx"

    def lens_path(self) -> Path:
        """The lens (autoencoder) ONNX file to load."""
        return self.lens if self.lens is not None else shipped_model_dir() / "lens.onnx"


class QueryConfig(_Section):
    """Query socket (REP): the AI lens's feature maps of a source's newest frame on request
    (``nanoscout lens --connect``, when the lens is loaded) and control requests (reset a
    source's statistics, set its drift reference: the dashboard's buttons; save frames; swap
    and revert the detection model). ``model_dirs``: the folders a hot-swapped model must lie
    in (symbolic links resolved; empty: any folder the daemon can read). A deployment whose
    query socket other users can reach names its model and adaptation folders here."""

    enabled: bool = True
    endpoint: str = DEFAULT_QUERY_ENDPOINT
    model_dirs: list[TomlPath] = Field(default_factory=list)

    _endpoint = field_validator("endpoint")(_endpoint)


class ReviewConfig(_Section):
    """``[review]``: the newest raw frames of each source, kept in memory for review and
    written as calibrated TIFF on request (:mod:`nanoscout.daemon.review`).

    ``frames``: frames kept per source (0: none, saving is refused); ``max_bytes``: the pixels
    kept for all sources together, bytes (the oldest frames go first). ``directory``: where
    saved frames are written (created when needed); ``max_disk_bytes``: the most that saved
    frames may fill there, bytes (a save beyond it is refused and counted, nothing is
    deleted); ``queue``: frames waiting to be written, at most (more are refused, counted)."""

    enabled: bool = True
    frames: int = Field(8, ge=0, le=1024)
    max_bytes: int = Field(256 * 2**20, ge=0)
    directory: TomlPath = Path("review")
    max_disk_bytes: int = Field(4 * 2**30, ge=0)
    queue: int = Field(64, ge=1, le=4096)


class MetricsConfig(_Section):
    """Prometheus HTTP endpoint; ``port = 0`` picks a free port, ``enabled = false`` turns it off.

    Like every listening socket it stays on loopback unless ``allow_remote = true`` (metrics
    have no authentication: serve them to a remote Prometheus knowingly, behind a firewall).

    The ``alert_*`` values are this deployment's thresholds for the Prometheus alert rules
    (deploy/nanoscout-rules.yml): the daemon exports them as ``nanoscout_alert_threshold``
    and the rules compare against them, so one rule file serves a CPU box and a GPU node.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    allow_remote: bool = False
    alert_latency_p99_s: float = Field(0.3, gt=0)  # NanoscoutLatencyHigh, s
    alert_queue_depth: int = Field(8, ge=1)  # NanoscoutLosslessBacklog, frames waiting
    alert_superseded_ratio: float = Field(0.5, gt=0, le=1)  # NanoscoutLiveSkippingMostFrames

    def thresholds(self) -> dict[str, float]:
        """The alert thresholds by their ``nanoscout_alert_threshold{name}`` label."""
        return {"latency_p99_seconds": self.alert_latency_p99_s,
                "queue_depth": float(self.alert_queue_depth),
                "superseded_ratio": self.alert_superseded_ratio}


class HealthConfig(_Section):
    """``health`` topic period, s (at most :data:`MAX_WAIT_S`)."""

    interval_s: float = Field(1.0, gt=0, le=MAX_WAIT_S)


class SecurityConfig(_Section):
    """ZeroMQ CURVE. Off by default, which is only allowed on loopback endpoints: binding any
    other address needs ``curve = true`` (or, knowingly, ``allow_insecure_remote = true``)."""

    curve: bool = False
    server_secret_key: TomlPath | None = None  # the daemon's ``.key_secret`` (nanoscout keys)
    authorized_keys: TomlPath | None = None  # folder of the clients' public ``.key`` files
    allow_insecure_remote: bool = False

    @model_validator(mode="after")
    def _complete(self) -> SecurityConfig:
        if self.curve and (self.server_secret_key is None or self.authorized_keys is None):
            raise ValueError("curve = true needs server_secret_key and authorized_keys")
        return self


class ServeConfig(_Section):
    """Everything ``nanoscout serve`` needs."""

    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    engine: EngineConfig = EngineConfig()
    metrics: MetricsConfig = MetricsConfig()
    health: HealthConfig = HealthConfig()
    preview: PreviewConfig = PreviewConfig()
    classify: ClassifyConfig = ClassifyConfig()
    query: QueryConfig = QueryConfig()
    stats: StatsConfig = StatsConfig()
    clusters: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    security: SecurityConfig = SecurityConfig()
    review: ReviewConfig = ReviewConfig()
    alerts: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _remote_needs_curve(self) -> ServeConfig:
        sec = self.security
        for name, ep in (("input", self.input.endpoint), ("output", self.output.endpoint),
                         ("query", self.query.endpoint)):
            if not (is_loopback(ep) or sec.curve or sec.allow_insecure_remote):
                raise ValueError(
                    f"{name}.endpoint {ep} is not on loopback: turn on [security] curve "
                    "(nanoscout keys) or set allow_insecure_remote = true"
                )
        m = self.metrics
        if m.enabled and not (is_loopback_host(m.host) or m.allow_remote
                              or sec.allow_insecure_remote):
            raise ValueError(
                f"metrics.host {m.host!r} is not on loopback: the metrics have no "
                "authentication; set [metrics] allow_remote = true to serve them knowingly"
            )
        return self

    @field_validator("alerts")
    @classmethod
    def _rules(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        parse_rules(value)  # raises ConfigError naming the bad rule
        return value


#: keys naming files or folders the daemon reads: a relative path written in the config file
#: is relative to the file's folder, as an engineer reading the file takes it (they were read
#: against the daemon's working directory: a config beside its own detector.onnx, started
#: from a folder holding another one, loaded the other). ``[review] directory`` and
#: ``[engine] cache_dir``, which the daemon writes, stay relative to its working directory
#: (systemd's WorkingDirectory=/var/lib/nanoscout)
_READ_PATHS = ("engine.model", "engine.modality_models", "classify.model", "classify.lens",
               "query.model_dirs", "security.server_secret_key", "security.authorized_keys")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def _beside(folder: Path, value: Any) -> Any:
    """``value`` (a path string, or a list / table of them) with each relative path made
    relative to ``folder``; anything else (a wrong type) is left for validation to name."""
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(folder / value)
    if isinstance(value, list):
        return [_beside(folder, v) for v in value]
    if isinstance(value, dict):
        return {k: _beside(folder, v) for k, v in value.items()}
    return value


def _resolve_read_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of :data:`_READ_PATHS` in the file's ``data`` relative to
    ``folder`` (the config file's), in place."""
    for dotted in _READ_PATHS:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _beside(folder, node[leaf])


#: what a TOML reader calls the Python types a TOML file gives
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}


def _given(value: Any) -> str:
    """``value`` as a refusal names it: its repr and its TOML type."""
    kind = _TOML_TYPES.get(type(value), f"a {type(value).__name__}")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{shown} ({kind})"


def _expected(error: Any) -> str:
    """What a type error of pydantic's says the value should have been."""
    if error["type"] in ("path_type", "is_instance_of"):
        return "a path (a string)"
    return str(error["msg"]).removeprefix("Input should be ")


def _union_member(part: Any) -> bool:
    """True for the part of an error's location that names a member of a union type
    (``float``, ``literal['auto']``, ``function-before[...]``), not a key."""
    return isinstance(part, str) and (part in ("float", "int", "str", "bool", "none")
                                      or "[" in part)


def _problems(errors: list[Any], from_flags: set[str]) -> list[str]:
    """pydantic's errors as ``key: message`` (one per key: a union's members' errors joined),
    the key marked when a command-line flag set it (an option's mistake is not the file's). A
    value of the wrong type is named with its type and the type expected."""
    by_key: dict[str, list[Any]] = {}
    for e in errors:
        key = ".".join(str(p) for p in e["loc"] if not _union_member(p))
        by_key.setdefault(key, []).append(e)
    out = []
    for key, errs in by_key.items():
        typed = [e for e in errs if e["type"].endswith("_type") or e["type"] in (
            "is_instance_of", "literal_error")]
        if typed and len(typed) == len(errs):
            msg = (f"expected {' or '.join(dict.fromkeys(_expected(e) for e in typed))}, "
                   f"got {_given(errs[0]['input'])}")
        else:
            msg = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in errs)
            inp = errs[0].get("input")
            if errs[0]["type"] != "value_error" and isinstance(inp, int | float | str):
                msg += f" (got {_given(inp)})"  # a range: the value given
        if not key:
            out.append(msg)
            continue
        flag = next((k for k in from_flags if key == k or key.startswith(k + ".")), None)
        out.append(f"{key} (from the command line): {msg}" if flag else f"{key}: {msg}")
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read the TOML file (if any), apply ``{"input.policy": "lossless", ...}`` overrides
    (``None`` values are ignored), validate, and return the config.

    Relative paths the file gives for files the daemon reads (:data:`_READ_PATHS`: models,
    keys, model folders) are relative to the file's folder; those of overrides (command-line
    flags) to the working directory.

    Raises :class:`ConfigError` naming the file, the key and the problem (a key set by an
    override is named as coming from the command line).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        _resolve_read_paths(data, p.absolute().parent)
    from_flags: set[str] = set()
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key, value)
            from_flags.add(key)
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problems(exc.errors(), from_flags)[:5])
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {problems}") from exc
