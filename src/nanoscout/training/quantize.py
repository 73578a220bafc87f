"""``nanoscout models quantize``: INT8 siblings of the shipped models, with their accuracy
parity against FP32 measured on held-out data.

::

    nanoscout models quantize                              # the detectors, parity on all sets
    nanoscout models quantize --models classifier,lens     # measure the small models too
    nanoscout models quantize --models detector --max-images 20
    python -m nanoscout.training.quantize --weights models/weights --out benchmarks/results/int8_parity.json

For each model ``X.onnx`` (by default the detector and the STEM detector; the classifier and
the lens on request, ``--models``) it writes ``X.int8.onnx`` and its card ``X.int8.json``
beside it; the FP32 files are not touched. It also times one engine call of each (FP32 and
INT8): a sibling is used by default only where it is accurate enough *and* pays (at least
1.1x faster; :attr:`~nanoscout.analysis.modelcard.Quantization.default`). Re-run it whenever the
weights change: a sibling whose ``quantization.source_sha256`` no longer matches its FP32 file
is stale and the daemon's ``precision = "auto"`` ignores it.

Quantization: ONNX Runtime static quantization in QDQ format (``quantize_static``):
per-channel signed 8-bit weights, unsigned 8-bit activations, activation ranges from the
calibration inputs of :mod:`nanoscout.training.int8_calibration` (synthetic, rendered from seeds,
never the held-out data) by the 99.999th percentile of their histogram. The detectors quantize
every operator ONNX Runtime can (convolutions, skips, up-samplings) but the convolution that
reads the image and the nodes that compute their outputs (the logits stay float), after their
2x nearest up-samplings are rewritten as concatenations
(:mod:`nanoscout.training.upsample_rewrite`: the same numbers, without ONNX Runtime's slow
channels-last ``Resize``), and their last step, the logits' bilinear 2x up-sampling, is left
to the host (the sibling outputs stride-2 logits; :mod:`nanoscout.analysis.half_logits`); the
classifier and the lens only their convolutions, so the lens's
novelty statistics (powers, logs, means computed in the graph) stay in float.

Parity (:func:`parity`): the FP32 and the INT8 model on the same held-out data, through the
same :class:`~nanoscout.analysis.detector.Detector` / classifier / lens code the daemon runs:

* detector: F1 (IoU >= 0.5) on the held-out synthetic frames (seeds 12345 + i, the harness's
  :func:`~nanoscout.training.evaluate.synthetic_samples`) and on each real set available (EMPS,
  NFFA; :mod:`nanoscout.training.realdata`);
* STEM detector: F1 on the STEM frames among held-out synthetic ones and on the STEM set;
* classifier: top-1 accuracy on fresh synthetic fields (test seeds of
  :mod:`nanoscout.training.evaluate_classifier`);
* lens: novelty AUROC, usual versus novel frames (test seeds of
  :mod:`nanoscout.training.evaluate_lens`).

A model passes when no set loses more than ``--max-loss`` (0.01) of its metric; the card
records every number and ``passed``. Only a passing sibling is used by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.modelcard import (
    ModelCard,
    Quantization,
    quantized_sibling,
    sha256_file,
    shipped_model_dir,
)
from nanoscout.training import upsample_rewrite
from nanoscout.training.int8_calibration import calibration_inputs, describe_calibration
from nanoscout.wire.errors import ConfigError, ModelCardError

__all__ = ["DEFAULT_MODELS", "MAX_LOSS", "MODELS", "check_onnx", "detector_parity",
           "engine_speed", "main", "parity", "quantize_model", "quantize_onnx"]

#: the shipped models, by the stem of their ONNX file
MODELS = ("detector", "detector_stem", "classifier", "lens")
#: the models quantized by default: where INT8 pays. The lens ran slower in INT8 on the 2-core
#: CPU of 2026-12 (14.4 -> 19.5 ms per call, interleaved medians: only its convolutions are
#: quantized, and the quantize/dequantize steps around them cost more than they save; its
#: novelty statistics stay float); quantize it with --models lens to measure again
DEFAULT_MODELS = ("detector", "detector_stem", "classifier")
#: activation-range calibration per model where it is not the 99.999th percentile, and the
#: detectors whose working scale the FP32 model measures (Quantization.fp32_scale), chosen on
#: the tuning sets (2026-12-05, F1 loss against FP32): the STEM detector 1.1 on Pt, entropy
#: 0.006, percentile 0.010 (each measuring its own scale; with the FP32 scale 0.023 / 0.021);
#: the detector on the EMPS tuning papers, entropy with the FP32 scale 0.0018, percentile
#: 0.0033 (0.0038 with the FP32 scale), entropy 0.0058
METHODS = {"detector_stem": "entropy", "detector": "entropy"}
FP32_SCALE = frozenset({"detector"})
#: the largest loss of a metric (F1, accuracy, AUROC) an INT8 sibling may have and pass
MAX_LOSS = 0.01
#: operators quantized in the fixed-input models (their other arithmetic stays float)
_FIXED_INPUT_OPS = ["Conv", "ConvTranspose"]


def quantize_onnx(src: Path, dst: Path, inputs: Iterable[dict[str, np.ndarray]], *,
                  ops: list[str] | None = None, method: str = "percentile") -> str:
    """Write the QDQ INT8 model of ``src`` to ``dst``, calibrated on ``inputs``; returns a
    one-line description of the method. ``ops``: operator types to quantize (None: all)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"calibration method {method!r} is not one of {', '.join(methods)}")
    feed = iter(inputs)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feed, None)

    extra = {"CalibPercentile": 99.999} if method == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="nanoscout-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        source, rewritten, exclude = Path(src), 0, []
        if ops is None:  # the detectors: every operator in INT8
            model = onnx.load(str(src))
            rewritten = upsample_rewrite.rewrite(model)
            # the nodes that compute the outputs stay float: an 8-bit copy of the logits
            # would only round them (and cost a quantize + dequantize of the whole frame);
            # so does the convolution that reads the one-channel image: with 9 taps per
            # output its 8-bit kernel was slower than float (6.2 vs 4.3 ms at 1024², 1 thread,
            # with the quantization of the input and of its output counted)
            outputs = {o.name for o in model.graph.output}
            inputs = {i.name for i in model.graph.input}
            exclude = [n.name for n in model.graph.node if set(n.output) & outputs
                       or (n.op_type == "Conv" and n.input[0] in inputs)]
            source = Path(tmp) / "rewritten.onnx"
            onnx.save(model, str(source))
        # symbolic shape inference cannot resolve the detectors' dynamic height and width
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        op_types_to_quantize=ops, nodes_to_exclude=exclude,
                        extra_options=extra)
    stripped = 0
    if ops is None:
        # the final bilinear up-sampling of the logits (float, after the last dequantization)
        # moves to the host, which needs only its threshold and its block-centre samples
        model = onnx.load(str(dst))
        stripped = upsample_rewrite.strip_output_upsample(model)
        if stripped:
            onnx.save(model, str(dst))
    which = "every quantizable operator" if ops is None else "operators " + ", ".join(ops)
    if exclude:
        which += " but the first convolution and the output nodes (float)"
    if rewritten:
        which += (f"; {rewritten} nearest 2x Resize rewritten as concatenations "
                  "(nanoscout.training.upsample_rewrite)")
    if stripped:
        which += ("; the logits' final bilinear 2x Resize left to the host "
                  "(nanoscout.analysis.half_logits: stride-2 output)")
    return (f"onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, "
            f"{method} calibration{' (99.999th percentile)' if extra else ''}, {which}")


# ------------------------------------------------------------------------------ parity

def _detector_samples(card: ModelCard, sets: list[str], n_synthetic: int,
                      max_images: int | None, data_root: Path | None
                      ) -> dict[str, Iterator[Any]]:
    """Held-out samples per set for a detector (STEM sets for a STEM detector)."""
    from nanoscout.training import realdata
    from nanoscout.training.evaluate import synthetic_samples
    from nanoscout.training.int8_calibration import _modalities

    stem_only = _modalities(card) == ("STEM",)
    avail = realdata.available_sets(data_root)
    out: dict[str, Iterator[Any]] = {}
    for s in sets:
        if s == "synthetic":
            gen = synthetic_samples(n_synthetic)
            out["synthetic-stem" if stem_only else s] = (
                (x for x in gen if x.group == "STEM") if stem_only else gen)
        elif s in avail and (s == "stem") == stem_only:
            out[s] = realdata.iter_samples(s, data_root, max_images)
    return out


def detector_parity(card: ModelCard, engines: dict[str, Any], sets: list[str], *,
                    n_synthetic: int = 20, max_images: int | None = None,
                    data_root: Path | None = None, measured_by: Any = None
                    ) -> dict[str, dict[str, Any]]:
    """F1 of each engine (name -> :class:`~nanoscout.engines.Engine` of the model ``card``
    describes; the first is the reference) on each held-out set the model is for, through the
    daemon's :class:`~nanoscout.analysis.detector.Detector`: ``{set: {metric, n_images, <name>:
    f1, ..., ms_per_image}}``. ``measured_by``: the engine (the first's) whose passes measure
    the working scale for the others (:func:`~nanoscout.analysis.detector.scale_measurer`), as
    the daemon runs a sibling with ``quantization.fp32_scale``; None: each measures its own."""
    from nanoscout.analysis.detector import Detector, scale_measurer
    from nanoscout.training.evaluate import evaluate_set

    first = next(iter(engines.values()))
    dets = {name: Detector(engine, card, base_detector=None if measured_by is None
                           or engine is first else scale_measurer(measured_by, card))
            for name, engine in engines.items()}
    out: dict[str, dict[str, Any]] = {}
    for s, samples in _detector_samples(card, sets, n_synthetic, max_images,
                                        data_root).items():
        res = evaluate_set(dets, samples)
        m = res["methods"]
        out[s] = {"metric": "f1", "n_images": res["n_images"],
                  **{k: m[k]["f1"] for k in dets},
                  "ms_per_image": {k: m[k]["ms_per_image"] for k in dets}}
    return out


def _engine_pair(fp32: Path, int8: Path, threads: int) -> dict[str, Any]:
    """The FP32 model and its INT8 sibling on ONNX Runtime CPU, the sibling loaded as the daemon
    loads it (``precision="int8"``)."""
    from nanoscout.engines import create_engine

    return {"fp32": create_engine(fp32, "onnxruntime-cpu", threads=threads, precision="fp32"),
            "int8": create_engine(fp32, "onnxruntime-cpu", threads=threads, precision="int8",
                                  int8_model=int8)}


def _detector_parity(fp32: Path, int8: Path, card: ModelCard, sets: list[str], *,
                     n_synthetic: int, max_images: int | None, data_root: Path | None,
                     threads: int, fp32_scale: bool = False) -> dict[str, dict[str, Any]]:
    engines = _engine_pair(fp32, int8, threads)
    try:
        return detector_parity(card, engines, sets, n_synthetic=n_synthetic,
                               max_images=max_images, data_root=data_root,
                               measured_by=engines["fp32"] if fp32_scale else None)
    finally:
        for engine in engines.values():
            engine.close()


def _classifier_parity(fp32: Path, int8: Path, card: ModelCard, n_per_class: int,
                       threads: int) -> dict[str, dict[str, Any]]:
    from nanoscout.training.evaluate_classifier import OnnxClassifier, evaluate_synthetic

    assert card.classes is not None and card.input.size is not None
    res = {name: evaluate_synthetic(OnnxClassifier(path, card.classes, card.input.size[0],
                                                   threads), n_per_class, workers=1)
           for name, path in (("fp32", fp32), ("int8", int8))}
    return {"synthetic-fields": {"metric": "accuracy", "n_images": res["fp32"]["n"],
                                 "fp32": res["fp32"]["accuracy"],
                                 "int8": res["int8"]["accuracy"], "data": res["fp32"]["data"]}}


def _lens_parity(fp32_card: Path, int8_card: Path, n_usual: int, n_novel: int
                 ) -> dict[str, dict[str, Any]]:
    from nanoscout.training.evaluate_lens import evaluate

    res = {name: evaluate(path, n_usual=n_usual, n_novel=n_novel, real=False)
           for name, path in (("fp32", fp32_card), ("int8", int8_card))}
    return {"usual-vs-novel": {"metric": "auroc", "n_images": res["fp32"]["n_usual"]
                               + res["fp32"]["n_novel"], "fp32": res["fp32"]["auroc"],
                               "int8": res["int8"]["auroc"]}}


def parity(fp32_card: Path, int8_card: Path, *, sets: list[str], n_synthetic: int = 20,
           max_images: int | None = None, data_root: Path | None = None, threads: int = 2,
           n_per_class: int = 20, n_usual: int = 100, n_novel: int = 20
           ) -> dict[str, dict[str, Any]]:
    """Return per held-out set ``{metric, fp32, int8, loss, ...}`` of an INT8 sibling against
    its FP32 model (see the module docs; ``loss`` = FP32 - INT8, positive when INT8 is worse)."""
    card, sibling = ModelCard.load(fp32_card), ModelCard.load(int8_card)
    fp32, int8 = card.onnx_path(fp32_card), sibling.onnx_path(int8_card)
    if card.task == "detection-segmentation":
        out = _detector_parity(fp32, int8, card, sets, n_synthetic=n_synthetic,
                               max_images=max_images, data_root=data_root, threads=threads,
                               fp32_scale=sibling.fp32_scale)
    elif card.task == "classification":
        out = _classifier_parity(fp32, int8, card, n_per_class, threads)
    else:
        out = _lens_parity(fp32_card, int8_card, n_usual, n_novel)
    for row in out.values():
        a, b = row["fp32"], row["int8"]
        row["loss"] = None if a is None or b is None else round(float(a) - float(b), 4)
    return out


def engine_speed(fp32: Path, int8: Path, card: ModelCard, threads: int, runs: int | None = None
                 ) -> dict[str, Any]:
    """Median time of one engine call (ms), FP32 and INT8, on one input the model really gets:
    a 1024² frame for a detector, the fixed input of the others. The two engines take turns
    (``runs`` calls each: 9 for a detector, 40 for the small models), so a load that comes and
    goes on a shared machine weighs on both alike."""
    x = next(calibration_inputs(card, 1, start=1000))
    if card.task == "detection-segmentation":
        x = {k: np.ascontiguousarray(np.tile(v, (1, 1, 3, 3))[:, :, :1024, :1024])
             for k, v in x.items()}
    n = runs or (9 if card.task == "detection-segmentation" else 40)
    engines = _engine_pair(fp32, int8, threads)
    times: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for e in engines.values():
            e.infer(x)  # the first call allocates
        for _ in range(n):
            for name, e in engines.items():
                t0 = time.perf_counter()
                e.infer(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        for e in engines.values():
            e.close()
    return {"input": list(next(iter(x.values())).shape), "threads": threads, "runs": n,
            **{name: round(float(np.median(t)), 2) for name, t in times.items()}}


# ------------------------------------------------------------------------------ one model

def check_onnx(model: Path) -> None:
    """Raise ModelCardError when ``model`` is not a readable ONNX model (truncated, not ONNX):
    its card's sha256 may match a broken file."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        onnx.load(str(model), load_external_data=False)
    except (DecodeError, OSError) as exc:
        raise ModelCardError(f"cannot load ONNX model {model}: {exc}") from exc


def quantize_model(model: Path, *, n_calibration: int = 32, method: str = "percentile",
                   check: bool = True, sets: list[str] | None = None, n_synthetic: int = 20,
                   max_images: int | None = None, data_root: Path | None = None,
                   threads: int = 2, max_loss: float = MAX_LOSS, command: str = "",
                   fp32_scale: bool = False) -> dict[str, Any]:
    """Quantize one FP32 model (``X.onnx`` with its card ``X.json``) into ``X.int8.onnx`` +
    ``X.int8.json``; with ``check`` measure the parity and record it. ``fp32_scale`` (a
    detector): the FP32 model measures the working scale for the sibling (recorded in its
    card, and so measured in the parity). Returns a summary. Raises ConfigError for
    ``n_calibration`` < 1 and ModelCardError for a bad card or an unreadable ONNX file, before
    anything is written."""
    if n_calibration < 1:
        raise ConfigError(f"n_calibration {n_calibration} (--calibration-frames) must be >= 1")
    card_path = model.with_suffix(".json")
    card = ModelCard.load(card_path)
    check_onnx(model)
    dst = quantized_sibling(model)
    t0 = time.perf_counter()
    ops = None if card.task == "detection-segmentation" else _FIXED_INPUT_OPS
    how = quantize_onnx(model, dst, calibration_inputs(card, n_calibration), ops=ops,
                        method=method)
    quant_s = time.perf_counter() - t0
    q = Quantization(source_onnx=model.name, source_sha256=sha256_file(model), method=how,
                     calibration=describe_calibration(card, n_calibration),
                     command=command or f"nanoscout models quantize --models {model.stem}",
                     max_loss=max_loss, passed=False,
                     fp32_scale=fp32_scale and card.task == "detection-segmentation")
    speed = engine_speed(model, dst, card, threads)
    q = q.model_copy(update={"engine_ms": speed,
                             "speedup": round(speed["fp32"] / speed["int8"], 3)})
    update: dict[str, Any] = {"onnx_file": dst.name, "sha256": sha256_file(dst),
                              "quantization": q, "timings_ms": {}}
    if card.metrics is not None:  # the held-out numbers are the FP32 model's: say so
        update["metrics"] = card.metrics.model_copy(update={
            "model_measured": f"{model.name} (FP32); this INT8 sibling's loss against it: "
                              "quantization.parity"})
    sibling = card.model_copy(update=update)
    dst_card = sibling.dump(dst.with_suffix(".json"))
    summary: dict[str, Any] = {"model": str(model), "int8": str(dst),
                               "int8_bytes": dst.stat().st_size,
                               "fp32_bytes": model.stat().st_size,
                               "quantize_s": round(quant_s, 1), "method": how,
                               "fp32_scale": q.fp32_scale,
                               "engine_ms": speed, "speedup": q.speedup}
    if check:
        t0 = time.perf_counter()
        par = parity(card_path, dst_card, sets=sets or ["synthetic", "emps", "stem", "nffa"],
                     n_synthetic=n_synthetic, max_images=max_images, data_root=data_root,
                     threads=threads)
        passed = bool(par) and all(r["loss"] is not None and r["loss"] <= max_loss
                                   for r in par.values())
        q = q.model_copy(update={"parity": par, "passed": passed})
        sibling.model_copy(update={"quantization": q}).dump(dst_card)
        summary.update(parity=par, passed=passed, parity_s=round(time.perf_counter() - t0, 1),
                       default=q.default)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docs); returns 0, or 1 when a model fails its parity."""
    ap = argparse.ArgumentParser(prog="nanoscout models quantize",
                                 description="INT8 siblings of the shipped models, with "
                                             "their accuracy parity against FP32")
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder of the FP32 models (default: the shipped models/weights)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma list of model stems, of {','.join(MODELS)} (default: "
                         f"{','.join(DEFAULT_MODELS)}, where INT8 pays)")
    ap.add_argument("--calibration-frames", type=int, default=32,
                    help="calibration inputs per model (nanoscout.training.int8_calibration)")
    ap.add_argument("--method", default=None, choices=["percentile", "minmax", "entropy"],
                    help="activation range calibration (default: entropy for the "
                         "detectors, percentile for the others)")
    ap.add_argument("--no-parity", action="store_true", help="skip the parity measurement "
                    "(the sibling is then never chosen by precision = auto)")
    ap.add_argument("--sets", default="synthetic,emps,stem,nffa",
                    help="held-out sets of the detectors' parity (those available)")
    ap.add_argument("--n-synthetic", type=int, default=30,
                    help="held-out synthetic frames (seeds 12345 + i)")
    ap.add_argument("--max-images", type=int, default=None, help="at most this many per real set")
    ap.add_argument("--data-root", type=Path, default=None, help="default ../shared/data")
    ap.add_argument("--max-loss", type=float, default=MAX_LOSS,
                    help="largest metric loss (F1, accuracy, AUROC) that passes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the summary as JSON here")
    args = ap.parse_args(argv)
    weights = args.weights or shipped_model_dir()
    names = [m for m in args.models.split(",") if m]
    if args.calibration_frames < 1:
        ap.error(f"--calibration-frames {args.calibration_frames} must be >= 1")
    unknown = [m for m in names if not (weights / f"{m}.onnx").is_file()]
    if unknown:
        raise SystemExit(f"no {unknown[0]}.onnx in {weights}")
    for name in names:  # every model and card read before a sibling is written
        ModelCard.load(weights / f"{name}.json")
        check_onnx(weights / f"{name}.onnx")
    command = "nanoscout models quantize " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {"command": command.strip(), "weights": str(weights), "models": {}}
    failed = []
    for name in names:
        print(f"[{name}] quantizing ...", flush=True)
        res = quantize_model(weights / f"{name}.onnx", n_calibration=args.calibration_frames,
                             method=args.method or METHODS.get(name, "percentile"),
                             fp32_scale=name in FP32_SCALE, check=not args.no_parity,
                             sets=[s for s in args.sets.split(",") if s],
                             n_synthetic=args.n_synthetic, max_images=args.max_images,
                             data_root=args.data_root, threads=args.threads,
                             max_loss=args.max_loss, command=command.strip())
        report["models"][name] = res
        for s, r in res.get("parity", {}).items():
            print(f"[{name}] {s:>16}: {r['metric']} fp32 {r['fp32']} int8 {r['int8']} "
                  f"loss {r['loss']}", flush=True)
        print(f"[{name}] engine {res['engine_ms']['fp32']} ms fp32, "
              f"{res['engine_ms']['int8']} ms int8: x{res['speedup']}", flush=True)
        if "passed" in res:
            print(f"[{name}] parity {'PASSED' if res['passed'] else 'FAILED'} "
                  f"(max loss {args.max_loss}); used by precision auto: {res['default']}",
                  flush=True)
            if not res["passed"]:
                failed.append(name)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
