"""Which arithmetic each model runs in, as ``[engine] precision`` asks and the measurements
allow, and the engine that runs it.

``precision = "auto"`` (the default) uses a model's INT8 sibling (``detector.int8.onnx``,
written with its parity by ``nanoscout models quantize``) on the CPU only when the sibling's
card says it passed its accuracy parity against FP32 (no held-out set lost more than 0.01 of
its metric), that it pays (its engine call measured at least 1.1x faster), *and* it was made
from the FP32 file that is there now; otherwise FP32. On a GPU,
"auto" is FP16 under TensorRT (INT8 TensorRT engines are built on request, ``precision =
"int8"``, until their parity is measured on a GPU) and FP32 under ONNX Runtime CUDA.
``"int8"`` asks for INT8 whatever the parity says, but never from a stale sibling.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nanoscout.analysis.modelcard import ModelCard, quantized_sibling, sha256_file
from nanoscout.engines import Engine, create_engine
from nanoscout.wire.errors import ConfigError, ModelCardError

__all__ = ["engine_name", "int8_measures_fp32", "int8_sibling", "load_engine"]

log = logging.getLogger(__name__)


def int8_sibling(model: Path, precision: str) -> Path | None:
    """The INT8 ONNX file to hand the engine factory for ``model`` under ``precision``, or None.

    "auto": the sibling only if it passed its parity and matches ``model``; "int8": the
    sibling if it matches ``model`` (ConfigError if it is stale); other precisions: None.
    """
    if precision not in ("auto", "int8"):
        return None
    sibling = quantized_sibling(model)
    if not sibling.is_file():
        if precision == "auto":
            log.info("no INT8 sibling of %s (nanoscout models quantize): FP32", model.name)
        return None
    try:
        card = ModelCard.load(sibling.with_suffix(".json"))
    except ModelCardError as exc:
        if precision == "int8":
            raise
        log.warning("INT8 sibling of %s unusable (%s): FP32", model.name, exc)
        return None
    q = card.quantization
    if q is None or q.source_sha256 != sha256_file(model):
        what = (f"{sibling.name} was not made from {model.name} as it is now (the weights "
                "changed): run `nanoscout models quantize` again")
        if precision == "int8":
            raise ConfigError(f"precision int8: {what}")
        log.warning("%s; using FP32", what)
        return None
    if precision == "auto" and not q.default:
        losses = {k: v.get("loss") for k, v in q.parity.items()}
        log.info("INT8 sibling of %s is not the default (parity %s, losses %s, max %s; "
                 "speedup %s): FP32", model.name, "passed" if q.passed else "failed", losses,
                 q.max_loss, q.speedup)
        return None
    return sibling


def load_engine(model: Path, *, backend: str, precision: str, threads: int | None,
                device: int = 0, max_shape: tuple[int, int] = (4096, 4096),
                max_batch: int = 1, cache_dir: Path | None = None) -> Engine:
    """The engine for one model as ``[engine]`` asks (see the module docs)."""
    return create_engine(model, backend, threads=threads, precision=precision, device=device,
                         max_shape=max_shape, max_batch=max_batch, cache_dir=cache_dir,
                         int8_model=int8_sibling(model, precision))


def engine_name(engine: Engine) -> str:
    """The backend as results name it: ``onnxruntime-cpu``, ``onnxruntime-cpu/int8``,
    ``tensorrt/fp16`` (the precision shown unless it is FP32)."""
    precision = getattr(engine, "precision", "fp32")
    return engine.name if precision == "fp32" else f"{engine.name}/{precision}"


def int8_measures_fp32(model: Path) -> bool:
    """Whether ``model``'s INT8 sibling has the FP32 model measure the working scale
    (its card's ``quantization.fp32_scale``); False without a readable sibling card."""
    try:
        return ModelCard.load(quantized_sibling(model).with_suffix(".json"),
                              verify_sha256=False).fp32_scale
    except (ModelCardError, OSError):
        return False
