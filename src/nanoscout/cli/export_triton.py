"""``nanoscout models export-triton``: a Triton model repository of the shipped models.

No torch needed: the ONNX files are copied as they ship, their tensors read with ONNX Runtime
(:func:`nanoscout.engines.triton_repository.write_repository` says what is written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoscout.analysis.modelcard import SHIPPED_STEM_MODEL, shipped_model_dir
from nanoscout.engines.triton_repository import write_repository

#: the shipped models a repository holds by default (file names in the shipped model folder)
SHIPPED_MODELS = ("detector.onnx", SHIPPED_STEM_MODEL, "classifier.onnx", "lens.onnx")


def _shape(text: str) -> tuple[int, int]:
    """``--max-shape 4096`` or ``4096x2048`` (height x width, px)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or HxW in px") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 32:
        raise argparse.ArgumentTypeError(f"{text!r} must be N or HxW, each at least 32 px")
    return values[0], values[1]


def parser() -> argparse.ArgumentParser:
    """The arguments of ``nanoscout models export-triton``."""
    p = argparse.ArgumentParser(
        prog="nanoscout models export-triton",
        description="write a Triton Inference Server model repository (ONNX + config.pbtxt, "
                    "and TensorRT plans where TensorRT runs) for the shipped models")
    p.add_argument("--out", type=Path, required=True,
                   help="the repository folder; a model folder of the same name that this "
                        "command wrote there before is replaced, any other file or folder "
                        "of that name is refused")
    p.add_argument("--models", type=Path, nargs="+",
                   help="ONNX files (default: the shipped detector, STEM detector, classifier "
                        "and lens)")
    p.add_argument("--runtime", choices=["onnxruntime", "python"], default="onnxruntime",
                   help="onnxruntime = Triton's ONNX Runtime backend; python = a Python-backend "
                        "model running ONNX Runtime, for servers without it (pytriton's)")
    p.add_argument("--tensorrt", choices=["auto", "never", "always"], default="auto",
                   help="also write <model>_trt with a TensorRT plan built on this GPU")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="largest batch the server forms from concurrent requests")
    p.add_argument("--queue-delay-us", type=int, default=2000,
                   help="how long the server waits to fill a batch, µs")
    p.add_argument("--instances", type=int, default=1, help="model copies per GPU (or CPU)")
    p.add_argument("--kind", choices=["auto", "gpu", "cpu"], default="auto",
                   help="where instances run (auto: every GPU, else the CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads per instance")
    p.add_argument("--max-shape", type=_shape, default=(4096, 4096),
                   help="largest frame side(s) a TensorRT plan accepts, px (N or HxW)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16",
                   help="TensorRT plan precision")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the repository; prints one line per model written."""
    args = parser().parse_args(argv)
    models = args.models or [shipped_model_dir() / name for name in SHIPPED_MODELS]
    written = write_repository(
        models, args.out, runtime=args.runtime, tensorrt=args.tensorrt,
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.queue_delay_us,
        instances=args.instances, kind=args.kind, threads=args.threads,
        max_shape=args.max_shape, precision=args.precision)
    for m in written:
        batching = f"max_batch_size {m.max_batch_size}" if m.max_batch_size else "no batching"
        print(f"{m.name}: {m.variant}, {batching}, sha256 {m.sha256[:12]} -> {m.folder}")
    if not any(m.variant == "tensorrt" for m in written) and args.tensorrt != "never":
        from nanoscout.engines.tensorrt import unavailable_reason

        print(f"no TensorRT plans: {unavailable_reason() or 'not built'}")
    return 0
