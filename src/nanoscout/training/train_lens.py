"""Train the AI-lens autoencoder on usual particle fields, calibrate its novelty, export it.

One reproducible command (fixed seeds, CPU, one torch thread)::

    python -m nanoscout.training.train_lens --out models/weights

Steps: (1) render the usual training frames (:func:`usual_frame`, seeds
``TRAIN_SEED_BASE + k``) and turn each into the network input exactly as the daemon does,
``nanoscout.analysis.preprocess.fixed_input(frame, (S, S))``; (2) train
:class:`nanoscout.training.lens_net.LensAE` on random crops of those inputs (the network is fully
convolutional, so crops train the same weights 4x cheaper than whole inputs; flips and 90-degree
rotations); (3) compute the training frames' texture statistics
(:func:`nanoscout.training.lens_net.frame_features`), keep them standardised as the k-NN bank
(:func:`nanoscout.training.lens_net.fit_feature_bank`) and export ``lens.onnx``
(:class:`nanoscout.training.lens_net.LensExport`), checking ONNX Runtime against torch;
(4) calibrate the novelty reference with ONNX Runtime on separate usual frames (seeds
``CALIB_SEED_BASE + k``): reference error = their 99th percentile; (5) evaluate on held-out usual
and novel frames (:mod:`nanoscout.training.evaluate_lens`), time the engine and write ``lens.json``.

"Usual" means what a facility images every day: fields of isolated and touching spheres,
ellipses and faceted particles (no rods or wires), BF-TEM dark on bright, HAADF-STEM bright on
dark and SEM, particle sizes, densities, doses, blur, supports (flat film or support grains)
and stored dtypes in wide ranges. Isolated and agglomerated particle fields of
``nanoscout.sim.fields`` are mixed in (30 % of the frames; :mod:`nanoscout.training.lens_data`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoscout.analysis.preprocess import fixed_input
from nanoscout.clients.progress import track
from nanoscout.engines import Engine, create_engine
from nanoscout.training.lens_data import (
    USUAL_DATA,
    USUAL_FIELD_CLASSES,
    inputs_of,
    usual_frames,
)
from nanoscout.training.lens_net import (
    ACTIVATIONS,
    CODE_CHANNELS,
    INPUT_NAME,
    K_NEIGHBOURS,
    N_FEATURES,
    OUTPUT_NAMES,
    SIZE,
    LensAE,
    LensExport,
    fit_feature_bank,
    frame_features,
)

__all__ = [
    "CALIB_SEED_BASE",
    "TRAIN_SEED_BASE",
    "build_card",
    "calibrate",
    "export_onnx",
    "fit_features",
    "frame_errors",
    "main",
    "train",
]

TRAIN_SEED_BASE = 3_000_000
CALIB_SEED_BASE = 3_500_000
OPSET = 17
MODEL_NAME = "nanoscout-ai-lens"
MODEL_VERSION = "2.0.0"
#: views of each training frame whose features enter the k-NN bank (identity, quarter turn,
#: mirror, half turn; inputs are (N, 1, S, S))
BANK_TRANSFORMS: tuple[Any, ...] = (
    lambda a: a,
    lambda a: np.rot90(a, 1, (2, 3)),
    lambda a: a[..., ::-1],
    lambda a: np.rot90(a, 2, (2, 3)),
)
def train(x: np.ndarray, *, steps: int, batch: int = 16, crop: int = 128, lr: float = 2e-3,
          seed: int = 20250301, code_channels: int = CODE_CHANNELS, log_every: int = 200
          ) -> tuple[LensAE, dict[str, Any]]:
    """Train a LensAE on inputs ``x`` (N, 1, S, S); returns (model in eval mode, stats).

    Each step takes ``batch`` random ``crop`` x ``crop`` windows with random flips and
    90-degree rotations; Adam with a cosine learning-rate decay; loss = mean squared error.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = LensAE(code_channels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    n, _, h, w = x.shape
    crop = min(crop, h, w)
    t0 = time.perf_counter()
    losses: list[float] = []
    model.train()
    for step in track(range(steps), "training the lens"):
        idx = rng.integers(n, size=batch)
        ys = rng.integers(0, h - crop + 1, size=batch) // 16 * 16
        xs = rng.integers(0, w - crop + 1, size=batch) // 16 * 16
        b = np.empty((batch, 1, crop, crop), np.float32)
        for j in range(batch):
            c = x[idx[j], 0, ys[j]: ys[j] + crop, xs[j]: xs[j] + crop]
            c = np.rot90(c, int(rng.integers(4)))
            b[j, 0] = c[:, ::-1] if rng.random() < 0.5 else c
        xb = torch.from_numpy(b)
        loss = torch.mean((model(xb) - xb) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.5f} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    return model, {"steps": steps, "batch": batch, "crop": crop, "lr": lr, "seed": seed,
                   "train_seconds": round(time.perf_counter() - t0, 1),
                   "final_loss": round(float(np.mean(losses[-100:])), 6)}


def fit_features(model: LensAE, x: np.ndarray, batch: int = 32
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (mean, scale, bank) of the feature statistics of inputs ``x`` (training frames).

    See :func:`nanoscout.training.lens_net.fit_feature_bank`: every training frame, as it is and turned by
    each of :data:`BANK_TRANSFORMS`, becomes a row of the bank (4 N rows): a denser bank of
    usual frames (on validation frames the 4x bank raised the AUROC by ~0.01, as did 900
    instead of 450 frames).
    """
    feats = []
    with torch.no_grad():
        for turn in BANK_TRANSFORMS:
            for i in range(0, len(x), batch):
                xb = np.ascontiguousarray(turn(x[i: i + batch]))
                feats.append(frame_features(model, torch.from_numpy(xb)))
    return fit_feature_bank(torch.cat(feats))


def export_onnx(wrapper: LensExport, path: Path, size: int = SIZE) -> dict[str, float]:
    """Write the lens as ONNX with a fixed (1, 1, size, size) input; returns ORT vs torch diff.

    Raises RuntimeError when an output's shape differs from torch or a value by more than 1e-3
    (relative to the output's magnitude where that exceeds 1).
    """
    wrapper = wrapper.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in torch 2.9+ but still the one that writes a
        # plain opset-17 graph here (same choice as models/export.py)
        warnings.simplefilter("ignore", DeprecationWarning)
        # the feature head turns fixed shapes and index tables into graph constants on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (torch.zeros(1, 1, size, size),), str(path),
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    x = np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
    with _engine(path) as engine:
        outputs = engine.infer({INPUT_NAME: x})
    got = [outputs[name] for name in OUTPUT_NAMES]
    worst = 0.0
    for name, r, g in zip(OUTPUT_NAMES, ref, got):
        if r.shape != g.shape:
            raise RuntimeError(f"ONNX output {name} shape {g.shape} != torch {r.shape}")
        worst = max(worst, float(np.max(np.abs(r - g)) / max(1.0, float(np.max(np.abs(r))))))
    if worst > 1e-3:
        raise RuntimeError(f"ONNX Runtime differs from torch by {worst:.3g} (> 1e-3)")
    return {"max_abs_diff": worst}


def _engine(path: Path, threads: int = 2) -> Engine:
    return create_engine(path, "onnxruntime-cpu", threads=threads)


def frame_errors(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """Return the ONNX ``error`` output (k-NN distance² per feature) of each input in ``x``."""
    with _engine(onnx_path) as engine:
        return np.array([float(engine.infer({INPUT_NAME: x[i: i + 1]})["error"][0])
                         for i in range(len(x))], np.float64)


def calibrate(onnx_path: Path, n: int, *, seed_base: int = CALIB_SEED_BASE,
              quantile: float = 0.99) -> dict[str, Any]:
    """Return the novelty reference (card ``novelty`` fields) from ``n`` usual frames.

    The errors come from ONNX Runtime on ``fixed_input`` of freshly rendered usual frames
    (seeds ``seed_base + k``), never from training frames.
    """
    frames, sources = usual_frames(range(seed_base, seed_base + n))
    err = frame_errors(onnx_path, inputs_of(frames))
    ref = float(np.quantile(err, quantile))
    return {
        "error_output": "error",
        "reference_error": ref,
        "reference_quantile": quantile,
        "quantiles": {f"p{q}": round(float(np.quantile(err, q / 100)), 7) for q in (50, 90, 99)},
        "n_frames": n,
        "data": (f"{n} usual frames, seeds {seed_base}..{seed_base + n - 1} (training used "
                 f"{TRAIN_SEED_BASE} + k), rendered as the training frames: " + USUAL_DATA
                 + f"; {sum(s != 'synthetic' for s in sources)} of them from nanoscout.sim.fields "
                 f"{'/'.join(USUAL_FIELD_CLASSES)}"),
    }


def time_engine(onnx_path: Path, size: int = SIZE, repeats: int = 50) -> dict[str, Any]:
    """Return ONNX Runtime CPU timings (ms, 2 threads) of one frame, and of fixed_input."""
    engine = _engine(onnx_path)
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 60000, (1024, 1024)).astype(np.uint16)
    x = fixed_input(frame, (size, size))
    for _ in range(5):
        engine.infer({INPUT_NAME: x})
    eng, prep = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.infer({INPUT_NAME: x})
        eng.append(time.perf_counter() - t)
        t = time.perf_counter()
        fixed_input(frame, (size, size))
        prep.append(time.perf_counter() - t)
    return {f"{size}x{size}": {
        "engine_all_outputs": round(1e3 * float(np.median(eng)), 2),
        "engine_all_outputs_min": round(1e3 * float(np.min(eng)), 2),
        "preprocess_1024x1024_uint16": round(1e3 * float(np.median(prep)), 2),
        "runtime": "onnxruntime CPU, 2 intra-op threads, medians of "
                   f"{repeats} runs on {platform.machine()}",
    }}


def build_card(onnx_path: Path, *, training: dict[str, Any], novelty: dict[str, Any],
               evaluation: dict[str, dict[str, Any]], timings: dict[str, Any],
               size: int = SIZE, code_channels: int = CODE_CHANNELS) -> Any:
    """Return the ModelCard of the lens at ``onnx_path`` (sha256 computed from the file)."""
    from nanoscout.analysis.modelcard import (
        InputSpec,
        ModelCard,
        Normalization,
        NoveltyReference,
        OutputSpec,
        TrainingInfo,
        sha256_file,
    )
    from nanoscout.analysis.preprocess import NORM_CLIP, NORM_PERCENTILES, NORM_SUBSAMPLE

    outputs = [
        OutputSpec(name="error", channels=("novelty_error",), activation="none",
                   resolution="frame",
                   meaning=f"(1,) novelty error: mean squared distance per feature from the "
                           f"frame's {N_FEATURES} standardised texture statistics (orientation "
                           "/ coherence and intensity moments of the input at 4 scales, "
                           "local-window coherence and background statistics, channel "
                           "correlations of enc1 on the input pooled 2x and 4x; squashed "
                           "2 asinh(z / 2)) to its "
                           f"{K_NEIGHBOURS} nearest rows of a bank of the usual training frames "
                           "in 4 orientations (k-NN in the graph); novelty = error / "
                           "novelty.reference_error"),
        OutputSpec(name="mse", channels=("mse",), activation="none", resolution="frame",
                   meaning="(1,) plain mean over pixels of (reconstruction - image)², "
                           "normalised intensity units² (a weak novelty score on its own: it "
                           "mostly measures detail and noise)"),
        OutputSpec(name="reconstruction", channels=("image",), activation="none",
                   resolution="input",
                   meaning="(1, 1, S, S) the autoencoder's reconstruction of the input, "
                           "normalised intensity; (reconstruction - image)² is the error map"),
    ]
    for name, meaning in ACTIVATIONS.items():
        res = {"act_enc1": "input/2", "act_enc2": "input/4", "act_code": "input/16"}[name]
        outputs.append(OutputSpec(name=name, channels=(), activation="none", resolution=res,
                                  meaning=f"(1, c, h, w) {meaning}"))
    return ModelCard(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        task="autoencoder",
        framework=f"pytorch {torch.__version__} -> onnx (torch.onnx.export, TorchScript exporter)",
        opset=OPSET,
        onnx_file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        input=InputSpec(name=INPUT_NAME, channels=1, dtype="float32", stride_multiple=16,
                        size=(size, size)),
        normalization=Normalization(percentiles=NORM_PERCENTILES, clip=NORM_CLIP,
                                    subsample=NORM_SUBSAMPLE,
                                    polarity="as acquired (trained on dark-on-bright, "
                                             "bright-on-dark and SEM frames)"),
        outputs=tuple(outputs),
        training=TrainingInfo(**training),
        evaluation=evaluation,
        novelty=NoveltyReference(**novelty),
        timings_ms=timings,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        notes=(f"Novelty error = mean squared distance per feature to the {K_NEIGHBOURS} "
               "nearest bank rows (usual training frames in 4 orientations) in a space of "
               "per-frame texture statistics "
               "(models/lens.py says why, not the plain MSE). "
               f"Convolutional autoencoder: 4 stride-2 3x3 ReLU conv stages (16, 32, 32, "
               f"{code_channels} channels; the code is linear, {size // 16}x{size // 16}), "
               "decoder of 4 stride-2 transposed convolutions (32, 32, 16, 8) and a linear 3x3 "
               "output conv. Input: the whole frame resampled to S x S (aspect ratio not kept) "
               "and normalised, nanoscout.analysis.preprocess.fixed_input. Novelty = error / "
               "reference_error; it says how unlike the usual training fields a frame is, not "
               "what is wrong with it."),
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: train, export, calibrate, evaluate and write lens.onnx + lens.json."""
    ap = argparse.ArgumentParser(description="train the AI-lens autoencoder and export it")
    ap.add_argument("--out", type=Path, default=Path("models/weights"))
    ap.add_argument("--n-train", type=int, default=900, help="usual training frames")
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--code-channels", type=int, default=CODE_CHANNELS)
    ap.add_argument("--n-calib", type=int, default=250, help="usual calibration frames")
    ap.add_argument("--eval-usual", type=int, default=200,
                    help="held-out usual frames for the evaluation (0: skip the evaluation)")
    ap.add_argument("--eval-novel", type=int, default=40, help="held-out frames per novel kind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=20250301)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    frames, sources = usual_frames(range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + args.n_train))
    x = inputs_of(frames)
    del frames
    data_s = time.perf_counter() - t0
    print(f"{len(x)} usual training frames in {data_s:.0f} s "
          f"({sum(s != 'synthetic' for s in sources)} from nanoscout.sim.fields)", flush=True)
    model, stats = train(x, steps=args.steps, batch=args.batch, crop=args.crop, lr=args.lr,
                         seed=args.seed, code_channels=args.code_channels)
    mean, scale, bank = fit_features(model, x)
    onnx_path = args.out / "lens.onnx"
    verify = export_onnx(LensExport(model, mean, scale, bank), onnx_path)
    print(f"exported {onnx_path}: ORT vs torch max |diff| {verify['max_abs_diff']:.2e}")
    t0 = time.perf_counter()
    novelty = calibrate(onnx_path, args.n_calib)
    calib_s = time.perf_counter() - t0
    print(f"calibration: reference error {novelty['reference_error']:.6f} "
          f"quantiles {novelty['quantiles']}", flush=True)
    wall = time.perf_counter() - t_start
    command = "python -m nanoscout.training.train_lens " + " ".join(argv if argv is not None else
                                                        __import__("sys").argv[1:])
    training = {
        "data": USUAL_DATA + f"; {args.n_train} frames ({sum(s != 'synthetic' for s in sources)}"
                f" from nanoscout.sim.fields {'/'.join(USUAL_FIELD_CLASSES)}), each through "
                "nanoscout.analysis.preprocess.fixed_input; random 128 px crops, flips, 90-degree turns",
        "command": command.strip(),
        "wall_seconds": round(wall, 1),
        "seeds": f"training frames {TRAIN_SEED_BASE} + k; calibration {CALIB_SEED_BASE} + k; "
                 f"torch/numpy seed {args.seed}",
        "machine": f"{platform.machine()} CPU, torch threads {args.threads}",
        "data_seconds": round(data_s, 1),
        "calibration_seconds": round(calib_s, 1),
        "code_channels": args.code_channels,
        "onnx_max_abs_diff_vs_torch": verify["max_abs_diff"],
        **stats,
    }
    card_path = onnx_path.with_suffix(".json")
    timings = time_engine(onnx_path)
    card = build_card(onnx_path, training=training, novelty=novelty, evaluation={},
                      timings=timings, code_channels=args.code_channels)
    card.dump(card_path)
    if args.eval_usual > 0:
        from nanoscout.training.evaluate_lens import evaluate, write_results

        results = evaluate(card_path, n_usual=args.eval_usual, n_novel=args.eval_novel)
        write_results(results, card_path)
    print(json.dumps(json.loads(card_path.read_text())["timings_ms"]))
    print(f"done in {time.perf_counter() - t_start:.0f} s (training command "
          f"{training['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
