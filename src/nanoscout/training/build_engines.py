"""``nanoscout models build-engines``: build the TensorRT engines of the shipped models on this
GPU (and INT8-calibrate them), check them against ONNX Runtime on the CPU, and optionally
measure the detectors' accuracy parity.

::

    nanoscout models build-engines                                  # FP16, every shipped model, GPU 0
    nanoscout models build-engines --precision int8 --parity        # INT8: calibrate, then F1 parity
    nanoscout models build-engines --device 1 --cache-dir /var/cache/nanoscout/trt

Each model is built exactly as the daemon builds it (``nanoscout.daemon.precision`` →
``create_engine(..., "tensorrt")``): the detectors with ``max_shape`` = ``--tile-px`` and
batches of up to ``--tile-batch`` tiles, the classifier and the lens at their fixed input size.
Plans land in the engine cache (``--cache-dir``, default ``~/.cache/nanoscout/trt``), where
the daemon finds them. With ``--precision int8`` the entropy calibrator runs on the synthetic
calibration inputs of :mod:`nanoscout.training.int8_calibration` (the same ONNX Runtime's INT8
siblings were calibrated on) and TensorRT writes its calibration cache beside the plans; the
daemon then builds INT8 plans for other shapes from that cache without calibration data. A
calibration that fails (an input missing, of another shape, a CUDA copy) fails that model's
build, with no calibration cache left, instead of ending the calibration early in silence.

``--check``: the largest output difference against ONNX Runtime CPU (FP32) on calibration-like
inputs, and for the detectors the share of pixels whose foreground decision differs.
``--parity``: the detectors' F1 on the held-out sets (as ``nanoscout models quantize``
measures the CPU's INT8), TensorRT against ONNX Runtime CPU FP32. As in the daemon, an INT8
detector whose sibling's card has ``quantization.fp32_scale`` (the general detector) has its
working scale measured by the FP32 model (``scale_measured_by`` in the result). Needs an
NVIDIA GPU with TensorRT 10 (``pip install 'nanoscout[tensorrt]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
from nanoscout.daemon.precision import int8_measures_fp32
from nanoscout.training.int8_calibration import calibration_inputs, describe_calibration
from nanoscout.training.quantize import MAX_LOSS, MODELS, detector_parity

__all__ = ["build_model", "main"]


def _check(card: ModelCard, engine: Any, reference: Any, n: int = 4) -> dict[str, Any]:
    """Largest output difference (and the detectors' foreground disagreement) of ``engine``
    against ``reference`` on calibration-like inputs the calibration did not see."""
    diffs: dict[str, float] = {}
    flips: list[float] = []
    # inputs after the calibration's own (it uses the first 32, or --calibration-frames)
    for inputs in calibration_inputs(card, n, start=1000):
        got, want = engine.infer(inputs), reference.infer(inputs)
        for name, w in want.items():
            g = got[name].astype(np.float64)
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(g - w).max()))
        if card.task == "detection-segmentation":
            out = card.outputs[0]
            fg = out.channels.index("foreground")
            flips.append(float(np.mean((got[out.name][0, fg] > 0) != (want[out.name][0, fg] > 0))))
    res: dict[str, Any] = {"max_abs_diff": {k: round(v, 5) for k, v in diffs.items()}}
    if flips:
        res["foreground_disagreement"] = round(float(np.mean(flips)), 6)
    return res


def build_model(model: Path, *, precision: str, device: int, cache_dir: Path | None,
                tile_px: int, tile_batch: int, n_calibration: int, check: bool,
                parity: bool, sets: list[str], max_images: int | None,
                data_root: Path | None) -> dict[str, Any]:
    """Build one model's TensorRT engine as the daemon would; returns what happened."""
    from nanoscout.engines import CalibrationSet, create_engine

    card = ModelCard.load(model.with_suffix(".json"))
    if card.task == "detection-segmentation":
        max_shape, max_batch = (tile_px, tile_px), tile_batch
    else:
        assert card.input.size is not None
        max_shape, max_batch = (int(card.input.size[0]), int(card.input.size[1])), 1
    calib = None
    if precision == "int8":
        calib = CalibrationSet(describe_calibration(card, n_calibration),
                               lambda: calibration_inputs(card, n_calibration))
    t0 = time.perf_counter()
    engine = create_engine(model, "tensorrt", precision=precision, device=device,
                           cache_dir=cache_dir, max_shape=max_shape, max_batch=max_batch,
                           calibration=calib)
    gpu = getattr(engine, "gpu", None)
    res: dict[str, Any] = {
        "model": str(model), "precision": engine.precision,
        "built": bool(getattr(engine, "built", False)),
        "build_s": round(float(getattr(engine, "build_s", 0.0)), 1),
        "load_s": round(time.perf_counter() - t0, 1),
        "plan": str(getattr(engine, "plan_path", "")), "max_shape": list(max_shape),
        "max_batch": max_batch, "device": device, "gpu": None if gpu is None else gpu.name}
    if precision == "int8":
        res["calibration_cache"] = str(getattr(engine, "calibration_path", ""))
        res["calibrated_batches"] = getattr(engine, "calibrated_batches", None)
    try:
        if check or parity:
            reference = create_engine(model, "onnxruntime-cpu", precision="fp32")
            if check:
                res["check_vs_onnxruntime_cpu_fp32"] = _check(card, engine, reference)
            if parity and card.task == "detection-segmentation":
                # the daemon's INT8 detector (any backend) has the FP32 model measure its
                # working scale where the sibling's card says so (daemon.app.build_detector)
                measurer = reference if precision == "int8" and int8_measures_fp32(model) \
                    else None
                par = detector_parity(card, {"cpu_fp32": reference, "tensorrt": engine}, sets,
                                      max_images=max_images, data_root=data_root,
                                      measured_by=measurer)
                res["scale_measured_by"] = "tensorrt" if measurer is None else "cpu_fp32"
                for row in par.values():
                    row["loss"] = round(float(row["cpu_fp32"]) - float(row["tensorrt"]), 4)
                res["parity"] = par
                res["passed"] = all(r["loss"] <= MAX_LOSS for r in par.values())
            reference.close()
    finally:
        engine.close()
    return res


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docs); 0, or 1 when a model could not be built or failed
    its parity."""
    ap = argparse.ArgumentParser(prog="nanoscout models build-engines",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--weights", type=Path, default=None, help="default: the shipped weights")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of model stems")
    ap.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16")
    ap.add_argument("--device", type=int, default=0, help="GPU index")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="engine cache (default ~/.cache/nanoscout/trt, as the daemon's)")
    ap.add_argument("--tile-px", type=int, default=2304, help="the daemon's engine.tile_px")
    ap.add_argument("--tile-batch", type=int, default=4, help="the daemon's engine.tile_batch")
    ap.add_argument("--calibration-frames", type=int, default=32)
    ap.add_argument("--check", action="store_true", help="compare with ONNX Runtime CPU")
    ap.add_argument("--parity", action="store_true", help="detectors' held-out F1 parity")
    ap.add_argument("--sets", default="synthetic,emps,stem,nffa")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    weights = args.weights or shipped_model_dir()
    report: dict[str, Any] = {"command": "nanoscout models build-engines " + " ".join(
        sys.argv[1:] if argv is None else argv), "models": {}, "errors": []}
    for name in [m for m in args.models.split(",") if m]:
        print(f"[{name}] building TensorRT {args.precision} ...", flush=True)
        try:
            res = build_model(weights / f"{name}.onnx", precision=args.precision,
                              device=args.device, cache_dir=args.cache_dir,
                              tile_px=args.tile_px, tile_batch=args.tile_batch,
                              n_calibration=args.calibration_frames, check=args.check,
                              parity=args.parity, sets=[s for s in args.sets.split(",") if s],
                              max_images=args.max_images, data_root=args.data_root)
        except Exception as exc:  # reported per model: the others are still built
            report["errors"].append(f"{name}: {exc!r}")
            print(f"[{name}] FAILED: {exc}", flush=True)
            continue
        report["models"][name] = res
        print(f"[{name}] {json.dumps(res)}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    failed = report["errors"] or [n for n, r in report["models"].items()
                                  if r.get("passed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
