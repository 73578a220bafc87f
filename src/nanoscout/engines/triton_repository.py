"""A Triton Inference Server model repository for nanoscout's ONNX models.

``nanoscout models export-triton --out REPO/`` calls :func:`write_repository`, which writes, for
each ONNX file (the shipped detector, STEM detector, classifier and lens by default)::

    REPO/<stem>/config.pbtxt        platform onnxruntime_onnx (or backend python, see runtime)
    REPO/<stem>/1/model.onnx
    REPO/<stem>_trt/config.pbtxt    platform tensorrt_plan        (only where TensorRT runs)
    REPO/<stem>_trt/1/model.plan

Each ``config.pbtxt`` names the tensors with their types and dims (-1 for dynamic height and
width), and, for models whose batch axis is dynamic (the detectors), ``max_batch_size`` with
``dynamic_batching`` so that requests from several daemons run as one batch; models exported
with a fixed batch of 1 (classifier, lens) get ``max_batch_size: 0`` and no batching, which
Triton requires. ``instance_group`` sets how many copies of each model run, and where
(``KIND_AUTO``: on every GPU Triton sees, else on the CPU). The parameter
``nanoscout_sha256`` carries the ONNX file's SHA-256, which the daemon's Triton engine checks
against its local model card's file.

``runtime="python"`` replaces the ONNX Runtime backend by a Python-backend model
(:mod:`nanoscout.engines.triton_python_model`) that runs the same ONNX file with ONNX Runtime
inside the server: for Triton builds without the onnxruntime backend, such as the server in the
``nvidia-pytriton`` wheel that the tests run.

TensorRT plans are only valid for the GPU and TensorRT version that built them: build them on
the server's GPU model with the TensorRT version of the Triton release that will load them
(e.g. run this command inside the ``tritonserver`` container image's Python). The plan's
optimisation profile spans batch 1..``max_batch_size`` and 16 px..``max_shape`` per side
(the TensorRT backend's :data:`~nanoscout.engines.tensorrt.MIN_SIDE_PX`). Plans are built
with the TensorRT backend's builder settings (:func:`~nanoscout.engines.tensorrt.builder_config`:
``precision="fp32"`` turns TF32 off, as the daemon's own engines do) on GPU ``device``
(default 0).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nanoscout.engines.base import TensorSpec
from nanoscout.engines.triton import SHA256_PARAMETER, file_sha256
from nanoscout.wire.errors import ConfigError, EngineFailure, EngineUnavailable

__all__ = [
    "ExportedModel",
    "build_plan",
    "model_config",
    "write_repository",
]

log = logging.getLogger(__name__)

Runtime = Literal["onnxruntime", "python"]
InstanceKind = Literal["auto", "gpu", "cpu"]

#: numpy dtype name -> Triton data type
_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class ExportedModel:
    """One model written to the repository: its name there, folder, variant and batching."""

    name: str
    folder: Path
    variant: Literal["onnxruntime", "python", "tensorrt"]
    max_batch_size: int
    sha256: str


def _dims(spec: TensorSpec, batched: bool) -> str:
    shape = spec.shape[1:] if batched else spec.shape
    return ", ".join("-1" if d is None else str(d) for d in shape)


def _tensor(spec: TensorSpec, batched: bool) -> str:
    dtype = _TRITON_TYPES.get(spec.dtype)
    if dtype is None:
        raise ConfigError(f"tensor {spec.describe()} has a type Triton config cannot name")
    return f'  {{ name: "{spec.name}" data_type: {dtype} dims: [ {_dims(spec, batched)} ] }}'


def _batched(specs: Sequence[TensorSpec]) -> bool:
    """True when every tensor's first axis is dynamic (a batch axis Triton may fill)."""
    return all(len(s.shape) >= 1 and s.shape[0] is None for s in specs)


def _check_numbers(max_batch_size: int, max_queue_delay_us: int, instances: int,
                   threads: int) -> None:
    if max_batch_size < 1 or instances < 1 or max_queue_delay_us < 0 or threads < 1:
        raise ConfigError(f"max_batch_size ({max_batch_size}), instances ({instances}) and "
                          f"threads ({threads}) must be >= 1, max_queue_delay_us "
                          f"({max_queue_delay_us}) >= 0")


def model_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    variant: Literal["onnxruntime", "python", "tensorrt"],
    sha256: str,
    max_batch_size: int = 8,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: InstanceKind = "auto",
    threads: int = 1,
) -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format).

    ``max_batch_size`` and ``dynamic_batching`` (waiting up to ``max_queue_delay_us`` µs to
    fill a batch) apply only when every tensor has a dynamic batch axis; ``instances`` copies
    run per GPU (or on the CPU) as ``kind`` says. ``threads``: ONNX Runtime intra-op threads
    per instance (the python variant's ``intra_op_threads`` parameter).
    """
    _check_numbers(max_batch_size, max_queue_delay_us, instances, threads)
    batched = _batched([*inputs, *outputs])
    lines = [f'name: "{name}"']
    if variant == "onnxruntime":
        lines.append('platform: "onnxruntime_onnx"')
    elif variant == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append('backend: "python"')
    lines.append(f"max_batch_size: {max_batch_size if batched else 0}")
    lines.append("input [\n" + ",\n".join(_tensor(s, batched) for s in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(s, batched) for s in outputs) + "\n]")
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}")
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_{kind.upper()} }} ]")
    params = {SHA256_PARAMETER: sha256}
    if variant == "python":
        params["intra_op_threads"] = str(threads)
    elif variant == "onnxruntime":
        params["intra_op_thread_count"] = str(threads)  # the onnxruntime backend's own key
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def _specs(onnx: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from nanoscout.engines.onnxrt import OnnxRuntimeEngine

    with OnnxRuntimeEngine(onnx, threads=1) as engine:
        return engine.inputs, engine.outputs


def build_plan(onnx: Path, *, max_batch_size: int, max_shape: tuple[int, int] = (4096, 4096),
               precision: Literal["fp32", "fp16"] = "fp16",
               workspace_bytes: int = 2 << 30, device: int = 0) -> bytes:
    """A serialised TensorRT engine (plan) of ``onnx`` for GPU ``device`` (CUDA index; the
    calling thread's current device is set to it).

    Built with the daemon's TensorRT backend's precision rules
    (:func:`nanoscout.engines.tensorrt.builder_config`: "fp32" with TF32 off, "fp16" with FP16
    kernels allowed) and a workspace of ``workspace_bytes`` bytes. Its optimisation profile
    spans batch 1..``max_batch_size`` on a dynamic first axis and 16 px..``max_shape``
    (height, width) on dynamic last two axes (optimum 1024 px, batch 1). Raises ConfigError
    for a precision other than fp32 / fp16, EngineUnavailable without TensorRT or GPU
    ``device``, EngineFailure when the build fails.
    """
    from nanoscout.engines import tensorrt as nt

    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"a Triton TensorRT plan's precision must be fp32 or fp16, got "
                          f"{precision!r}")
    reason = nt.unavailable_reason(device)
    if reason is not None:
        raise EngineUnavailable(reason)
    # TensorRT builds for the calling thread's current CUDA device
    nt._cuda_check(nt._import_cudart().cudaSetDevice(device), f"cudaSetDevice({device})")
    trt = nt._import_trt()
    logger = nt._trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineFailure(f"TensorRT cannot parse {onnx}: {errors or 'unknown error'}")
    config = nt.builder_config(trt, builder, precision, workspace_bytes)
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = [int(d) for d in tensor.shape]
        if all(d >= 0 for d in shape):
            continue
        dynamic = True
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, d in enumerate(shape):
            if d >= 0:
                continue
            if axis == 0:
                lo[0], opt[0], hi[0] = 1, 1, max_batch_size
            elif axis >= len(shape) - 2:
                top = max_shape[axis - (len(shape) - 2)]
                lo[axis], opt[axis], hi[axis] = nt.MIN_SIDE_PX, min(nt.OPT_SIDE_PX, top), top
            else:
                raise EngineFailure(f"input {tensor.name!r} of {onnx} has a dynamic axis "
                                    f"{axis} (shape {shape}); only batch and height/width may be")
        profile.set_shape(tensor.name, tuple(lo), tuple(opt), tuple(hi))
    # -1: TensorRT found the profile invalid (the build would fail later, less clearly)
    if dynamic and config.add_optimization_profile(profile) < 0:
        raise EngineFailure(f"TensorRT refused the optimisation profile of {onnx}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineFailure(f"TensorRT failed to build a plan for {onnx}; see the TensorRT log")
    return bytes(plan)


def write_repository(
    models: Sequence[Path],
    out: Path,
    *,
    runtime: Runtime = "onnxruntime",
    tensorrt: Literal["auto", "never", "always"] = "auto",
    max_batch_size: int = 8,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    kind: InstanceKind = "auto",
    threads: int = 1,
    max_shape: tuple[int, int] = (4096, 4096),
    precision: Literal["fp32", "fp16"] = "fp16",
    device: int = 0,
) -> list[ExportedModel]:
    """Write a Triton model repository for ``models`` (ONNX files) into ``out``; returns what
    was written. Each model is named after its file's stem; an existing model folder of that
    name is replaced only where this function wrote it (:func:`_is_ours`): any other file or
    folder there is refused. ``tensorrt``: "auto" adds a ``<stem>_trt`` plan variant where
    TensorRT and GPU ``device`` (CUDA index) are present, "always" fails where they are not,
    "never" skips it; plans are built on that GPU (:func:`build_plan`).
    Every option, model file and target folder is checked, and every model's config made,
    before anything in ``out`` is touched: ConfigError for a bad option or target,
    EngineFailure for a missing or unreadable model file.
    """
    if runtime not in ("onnxruntime", "python"):
        raise ConfigError(f"runtime {runtime!r} must be 'onnxruntime' or 'python'")
    if tensorrt not in ("auto", "never", "always"):
        raise ConfigError(f"tensorrt {tensorrt!r} must be auto, never or always")
    _check_numbers(max_batch_size, max_queue_delay_us, instances, threads)
    stems = [Path(m).stem for m in models]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"model file names must differ, got {stems}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a repository folder")
    missing = [str(m) for m in models if not Path(m).is_file()]
    if missing:
        raise EngineFailure(f"model file not found: {', '.join(missing)}")
    trt_reason: str | None = "not asked for"
    if tensorrt != "never":
        from nanoscout.engines.tensorrt import unavailable_reason

        trt_reason = unavailable_reason(device)
        if trt_reason is not None and tensorrt == "always":
            raise EngineUnavailable(f"no TensorRT plans: {trt_reason}")
    for stem in stems:
        _check_replaceable(out / stem)
        if trt_reason is None:
            _check_replaceable(out / f"{stem}_trt")
    # each model's tensors and config, read and made before the repository is touched
    prepared: list[tuple[Path, tuple[TensorSpec, ...], tuple[TensorSpec, ...], str, str]] = []
    for model in map(Path, models):
        inputs, outputs = _specs(model)
        sha = file_sha256(model)
        config = model_config(model.stem, inputs, outputs, variant=runtime, sha256=sha,
                              max_batch_size=max_batch_size,
                              max_queue_delay_us=max_queue_delay_us, instances=instances,
                              kind=kind, threads=threads)
        prepared.append((model, inputs, outputs, sha, config))
    out.mkdir(parents=True, exist_ok=True)
    written: list[ExportedModel] = []
    for model, inputs, outputs, sha, config in prepared:
        batched = _batched([*inputs, *outputs])
        common: dict[str, Any] = dict(sha256=sha, max_batch_size=max_batch_size,
                                      max_queue_delay_us=max_queue_delay_us,
                                      instances=instances, kind=kind, threads=threads)
        folder = _fresh(out / model.stem)
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(model, folder / "1" / "model.onnx")
        if runtime == "python":
            shutil.copyfile(Path(__file__).with_name("triton_python_model.py"),
                            folder / "1" / "model.py")
        (folder / "config.pbtxt").write_text(config, encoding="utf-8")
        written.append(ExportedModel(model.stem, folder, runtime,
                                     max_batch_size if batched else 0, sha))
        if trt_reason is not None:
            log.info("%s: no TensorRT plan (%s)", model.name, trt_reason)
            continue
        t0 = time.perf_counter()
        plan = build_plan(model, max_batch_size=max_batch_size if batched else 1,
                          max_shape=max_shape, precision=precision, device=device)
        name = f"{model.stem}_trt"
        trt_folder = _fresh(out / name)
        (trt_folder / "1").mkdir(parents=True)
        (trt_folder / "1" / "model.plan").write_bytes(plan)
        (trt_folder / "config.pbtxt").write_text(
            model_config(name, inputs, outputs, variant="tensorrt",
                         **{**common, "kind": "gpu"}), encoding="utf-8")
        log.info("%s: TensorRT %s plan built in %.0f s", model.name, precision,
                 time.perf_counter() - t0)
        written.append(ExportedModel(name, trt_folder, "tensorrt",
                                     max_batch_size if batched else 0, sha))
    return written


#: the files :func:`write_repository` puts in a model's version folder
_VERSION_FILES = frozenset({"model.onnx", "model.py", "model.plan"})


def _is_ours(folder: Path) -> bool:
    """Whether ``folder`` is a model folder :func:`write_repository` wrote: a ``config.pbtxt``
    that carries the ``nanoscout_sha256`` parameter, and numbered version folders holding
    nothing but the model files it writes (and the ``__pycache__`` a Python-backend server
    may leave); nothing else."""
    config = folder / "config.pbtxt"
    try:
        if not config.is_file() or f'key: "{SHA256_PARAMETER}"' not in config.read_text(
                encoding="utf-8"):
            return False
        for entry in folder.iterdir():
            if entry.name == "config.pbtxt":
                continue
            if not (entry.is_dir() and not entry.is_symlink() and entry.name.isdigit()):
                return False
            for f in entry.iterdir():
                model_file = f.name in _VERSION_FILES and f.is_file()
                cache = f.name == "__pycache__" and f.is_dir()
                if f.is_symlink() or not (model_file or cache):
                    return False
    except (OSError, UnicodeDecodeError):
        return False
    return True


def _check_replaceable(folder: Path) -> None:
    """Raise ConfigError when ``folder`` exists and is not a model folder this module wrote
    (:func:`_is_ours`): a re-export replaces only its own output, never the user's files."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a model folder: move it away, or choose "
                          "another --out")
    if not _is_ours(folder):
        raise ConfigError(f"{folder} exists and is not a Triton model folder that "
                          "export-triton wrote (config.pbtxt with nanoscout_sha256 and "
                          "numbered version folders only): move it away, or choose another "
                          "--out")


def _fresh(folder: Path) -> Path:
    """``folder``, emptied (a re-export replaces the model, never mixes versions); only a
    model folder this module wrote is removed (:func:`_check_replaceable`)."""
    if folder.exists() or folder.is_symlink():
        _check_replaceable(folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder
