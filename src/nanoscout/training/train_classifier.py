"""Train the field-of-view classifier, export it to ONNX and write its model card.

Two modes (fixed seeds, CPU, 2 torch threads)::

    python -m nanoscout.training.train_classifier --out models/weights
    python -m nanoscout.training.train_classifier --data FOLDER --out runs/my_classifier

*Synthetic* (default): the classes of :data:`nanoscout.sim.fields.FIELD_CLASSES`. Training fields are
rendered by :func:`nanoscout.sim.fields.render_field` with seeds ``TRAIN_SEED_BASE + k`` (class
``k % 8``), in two worker processes, and cached in memory as the model input (float16), made by
``nanoscout.analysis.preprocess.fixed_input`` exactly as the daemon makes it. Crops of the real
training data are added where a class can be derived honestly
(:func:`nanoscout.training.field_labels.emps_field_label`):

* EMPS training papers (``models/splits/emps.json`` ``train``, minus the tuning papers of
  ``nanoscout.training.realdata.emps_tuning_ids``), under the "field contains rods" definition of
  ``rods_wires``: a particle is rod-like when its mask's aspect ratio (second moments) is >= 3
  and it does not touch the image border (cut particles look elongated). ``rods_wires`` when
  >= 2 particles are rod-like (a single one may be a segmentation artefact, e.g. three merged
  spheres in a row: such images are not used); with no rod-like particle,
  ``isolated_particles`` when <= 20 % of the particles touch another one (instance masks
  dilated by 2 px meet another instance), ``agglomerated_particles`` when >= 60 % do; images
  with fewer than 3 particles (>= 12 px) or in between are not used.
* STEM training materials (``models/splits/stem.json`` ``train``): ``isolated_particles``.

*Folder* (``--data``): one sub-folder per class (PNG/JPG/TIF, RGB read as grey); classes are the
sub-folder names (sorted); a stratified split keeps ``--val-fraction`` of every class for
validation (at least one image per class when the class has two or more).

Both modes cache a few random crops (60-100 % of the side) of every image, train with random
flips / 90-degree rotations, export ``classifier.onnx`` (:mod:`nanoscout.training.classifier_net`) and write
``classifier.json``, a :class:`nanoscout.analysis.modelcard.ModelCard` with the held-out evaluation
(:mod:`nanoscout.training.evaluate_classifier`) and the engine time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from nanoscout.analysis.preprocess import fixed_input
from nanoscout.clients.progress import track
from nanoscout.sim.fields import FIELD_CLASSES, render_field
from nanoscout.training.field_labels import emps_field_label
from nanoscout.wire.errors import ConfigError

__all__ = ["TRAIN_SEED_BASE", "load_folder", "main", "real_training_images",
           "synthetic_inputs"]

#: where the synthetic mode writes without --out: the shipped classifier's folder (relative
#: to the repository root, where it is built)
SYNTHETIC_OUT = Path("models/weights")
#: synthetic training fields use seeds TRAIN_SEED_BASE + k (evaluation uses other bases)
TRAIN_SEED_BASE = 2_000_000
#: ... and the 1024 x 1024 training fields TRAIN_SEED_BASE_1024 + k
TRAIN_SEED_BASE_1024 = 2_600_000
#: ... and the extra needle-kind rods_wires fields TRAIN_SEED_BASE_NEEDLES + k
TRAIN_SEED_BASE_NEEDLES = 2_800_000
#: part of the --cache file name: bump it whenever models/fields.py changes what it renders
#: (v2: rods_wires = "the field contains rods or wires")
FIELDS_VERSION = "v2"
SIZE = 256
MODEL_NAME = "nanoscout-field-classifier"
MODEL_VERSION = "3.0.0"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ------------------------------------------------------------------------------- data


def _render_one(job: tuple[int, int, int, tuple[int, int], str]) -> tuple[int, np.ndarray]:
    seed, cls, size, shape, rods = job
    f = render_field(FIELD_CLASSES[cls], np.random.default_rng(seed), shape=shape,
                     rods=cast(Any, rods))
    return cls, fixed_input(f.image, (size, size))[0, 0].astype(np.float16)


def synthetic_inputs(n_per_class: int, seed_base: int, size: int = SIZE,
                     shape: tuple[int, int] = (512, 512), workers: int = 2,
                     needles: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return (inputs float16 (N, S, S), class indices int64 (N,)) of rendered fields.

    Field k has seed ``seed_base + k`` and class ``k % len(FIELD_CLASSES)``; with ``needles``
    all ``n_per_class`` fields are ``rods_wires`` of the needle kind (1-3 rods among particles).
    """
    n_cls = len(FIELD_CLASSES)
    if needles:
        rods = FIELD_CLASSES.index("rods_wires")
        jobs = [(seed_base + k, rods, size, shape, "needles") for k in range(n_per_class)]
    else:
        jobs = [(seed_base + k, k % n_cls, size, shape, "any")
                for k in range(n_per_class * n_cls)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            out = pool.map(_render_one, jobs, chunksize=8)
    else:
        out = [_render_one(j) for j in jobs]
    x = np.stack([o[1] for o in out]) if out else np.zeros((0, size, size), np.float16)
    return x, np.array([o[0] for o in out], np.int64)


def real_training_images() -> tuple[list[tuple[np.ndarray, str, str]], dict[str, Any]]:
    """Return ([(grey uint8 image, class, id)], summary) from the real *training* splits only.

    Empty (with the reason in the summary) when ../shared/data is missing.
    """
    from nanoscout.training.realdata import (
        available_sets,
        emps_index,
        emps_tuning_ids,
        load_emps,
        load_split,
        load_stem,
    )

    out: list[tuple[np.ndarray, str, str]] = []
    sets = available_sets()
    summary: dict[str, Any] = {"sets": sets}
    if "emps" in sets:
        split = load_split("emps")
        val, tune = set(cast(list[str], split["validation"])), set(emps_tuning_ids())
        ids = [i for i in cast(list[str], split["train"]) if i not in tune]
        if val & set(ids):
            raise ConfigError("EMPS split lists ids as both train and validation")
        dois = dict(emps_index())
        counts: dict[str, int] = {}
        for i in ids:
            s = load_emps(i, doi=dois.get(i, ""))
            assert s.labels is not None
            lab = emps_field_label(s.labels)
            if lab is not None:
                out.append((s.image, lab, f"emps/{i}"))
                counts[lab] = counts.get(lab, 0) + 1
        summary["emps"] = {"candidates": len(ids), "excluded_tuning": len(tune), "used": counts}
    if "stem" in sets:
        names = list(cast(list[str], load_split("stem")["train"]))
        for nm in names:
            out.append((load_stem(nm).image, "isolated_particles", f"stem/{nm}"))
        summary["stem"] = {"used": {"isolated_particles": len(names)}}
    return out, summary


def _grey(path: Path) -> np.ndarray:
    """Return an image file as a 2-D array (RGB -> luminance; TIFF via tifffile when possible)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            arr = np.asarray(tifffile.imread(path))
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                np.float32)
            if arr.ndim == 2:
                return arr
        except (ImportError, ValueError, OSError):
            pass
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I", "F"):
                return np.asarray(im)
            return np.asarray(im.convert("L"))
    except OSError as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from exc


def load_folder(folder: Path) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...], list[str]]:
    """Return (grey images, class indices, class names, file names) of a class-per-folder tree.

    Raises ConfigError naming the folder when it has fewer than two class folders with images.
    """
    if not folder.is_dir():
        raise ConfigError(f"--data folder {folder} does not exist")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir())))
    if len(classes) < 2:
        raise ConfigError(f"--data folder {folder} needs >= 2 sub-folders with images "
                          f"({', '.join(IMAGE_SUFFIXES)}), found {list(classes)}")
    images, labels, names = [], [], []
    for k, c in enumerate(classes):
        for p in sorted((folder / c).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_grey(p))
                labels.append(k)
                names.append(f"{c}/{p.name}")
    return images, np.array(labels, np.int64), classes, names


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train indices, validation indices): ``fraction`` of every class held out
    (rounded, at least one when the class has two or more images)."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for k in np.unique(y):
        idx = rng.permutation(np.nonzero(y == k)[0])
        n_val = min(max(round(fraction * idx.size), 1 if idx.size >= 2 else 0), idx.size - 1)
        va.extend(idx[:n_val].tolist())
        tr.extend(idx[n_val:].tolist())
    return np.array(sorted(tr), np.int64), np.array(sorted(va), np.int64)


#: the smallest side of a random crop, px (an image side shorter than this is never cut)
MIN_CROP_PX = 8


def crops_of(image: np.ndarray, rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """Return ``n`` model inputs (float16 S x S) of ``image``: the whole image, then random
    crops of 60-100 % of its sides, each at least :data:`MIN_CROP_PX` px. A side shorter than
    that (a tiny image) is kept whole rather than padded or skipped: its crops are what the
    daemon would see of such a frame (:func:`~nanoscout.analysis.preprocess.fixed_input`
    resamples it whole), with no invented pixels and no image dropped from the split."""
    out = [fixed_input(image, (size, size))[0, 0].astype(np.float16)]
    h, w = image.shape
    for _ in range(n - 1):
        f = rng.uniform(0.6, 1.0)
        ch = min(h, max(MIN_CROP_PX, int(h * f)))
        cw = min(w, max(MIN_CROP_PX, int(w * f)))
        r0, c0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(fixed_input(image[r0:r0 + ch, c0:c0 + cw], (size, size))[0, 0]
                   .astype(np.float16))
    return out


# ------------------------------------------------------------------------------- training


def _one_cycle_lr(lr: float, progress: float, pct_start: float = 0.1) -> float:
    """Return the learning rate at ``progress`` (0..1) of a one-cycle schedule peaking at
    ``lr`` (cosine warm-up from lr/25 over ``pct_start``, cosine decay to lr/1e4), as
    torch's OneCycleLR with its defaults."""
    lo, end = lr / 25.0, lr / 25.0 / 1e4
    if progress < pct_start:
        t = progress / pct_start
        return lo + (lr - lo) * 0.5 * (1.0 - math.cos(math.pi * t))
    t = min((progress - pct_start) / (1.0 - pct_start), 1.0)
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def train_net(x: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int, batch: int,
              lr: float, seed: int, width: int, pooling: str = "lse", cam_stride: int = 16,
              log_every: int = 100, max_seconds: float | None = None,
              init: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Train a FieldClassifier on cached inputs with flips / rotations; returns (net, stats).

    With ``max_seconds`` (s) the one-cycle schedule runs on max(step / steps, elapsed /
    max_seconds), so training ends within that wall time on a loaded machine (``steps`` is then
    an upper bound; the steps done are in the stats).
    """
    import torch
    import torch.nn.functional as F

    from nanoscout.training.classifier_net import FieldClassifier

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = FieldClassifier(n_classes, width, cast(Any, pooling), cam_stride)
    if init is not None:  # continue from saved weights (same architecture)
        net.load_state_dict(torch.load(init, map_location="cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    # classes are balanced by sampling (real crops make them uneven)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    p = 1.0 / np.maximum(counts[y], 1.0)
    p /= p.sum()
    net.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    done = 0
    for step in track(range(steps), "training the classifier"):
        progress = step / max(steps, 1)
        if max_seconds is not None:
            progress = max(progress, (time.perf_counter() - t0) / max_seconds)
            if progress >= 1.0:
                break
        for g in opt.param_groups:
            g["lr"] = _one_cycle_lr(lr, progress)
        idx = rng.choice(len(y), size=min(batch, len(y)), p=p)
        xb = torch.from_numpy(x[idx].astype(np.float32))[:, None]
        k = int(rng.integers(0, 4))
        xb = torch.rot90(xb, k, dims=(2, 3))
        if rng.random() < 0.5:
            xb = torch.flip(xb, dims=(3,))
        yb = torch.from_numpy(y[idx])
        loss = F.cross_entropy(net(xb), yb, label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = step + 1
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    net.eval()
    final_loss = round(float(np.mean(losses[-50:])), 4) if losses else None
    return net, {"pooling": pooling, "cam_stride": cam_stride, "steps": done,
                 "max_steps": steps, "max_train_seconds": max_seconds, "batch": batch, "lr": lr,
                 "final_loss": final_loss, "train_seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------- card


def build_card(onnx_path: Path, *, classes: tuple[str, ...], size: int, training: dict[str, Any],
               evaluation: dict[str, dict[str, Any]], timings: dict[str, Any], width: int,
               cam_stride: int, notes: str = "") -> Any:
    """Return the ModelCard of a classifier ONNX file (sha256 computed from the file)."""
    import torch

    from nanoscout.analysis.modelcard import (
        InputSpec,
        ModelCard,
        Normalization,
        OutputSpec,
        TrainingInfo,
        sha256_file,
    )
    from nanoscout.analysis.preprocess import NORM_CLIP, NORM_PERCENTILES, NORM_SUBSAMPLE
    from nanoscout.training.classifier_net import OPSET

    h = size // cam_stride
    pool_words = {"lse": "log-mean-exp (between mean and max: a class seen in a few cells, "
                  "e.g. one rod, scores from those cells)",
                  "mean": "global averaging"}[str(training.get("pooling", "mean"))]
    return ModelCard(
        name=MODEL_NAME, version=MODEL_VERSION, task="classification",
        framework=f"pytorch {torch.__version__} -> onnx (torch.onnx.export, TorchScript exporter)",
        opset=OPSET, onnx_file=onnx_path.name, sha256=sha256_file(onnx_path),
        input=InputSpec(name="image", channels=1, dtype="float32", stride_multiple=cam_stride,
                        size=(size, size)),
        normalization=Normalization(percentiles=NORM_PERCENTILES, clip=NORM_CLIP,
                                    subsample=NORM_SUBSAMPLE),
        outputs=(
            OutputSpec(name="probabilities", channels=classes, activation="probability",
                       resolution="(1, C)",
                       meaning="softmax over `classes`, in the card's order; sums to 1"),
            OutputSpec(name="cam", channels=("top_class_activation",), activation="none",
                       resolution=f"(1, {h}, {h}) = input / {cam_stride}",
                       meaning=("uint8 class activation map of the top class: its head weights "
                                "gathered by argmax inside the graph, weighted sum of the last "
                                "feature maps, ReLU, divided by the map's maximum, x255 "
                                "(all 0 when nothing is positive). Cell (i, j) covers frame "
                                f"rows [i, i+1) x H/{h} and cols [j, j+1) x W/{h}; the frame "
                                "was resampled whole (aspect not kept)")),
            OutputSpec(name="class_maps", channels=classes, activation="none",
                       resolution=f"(1, C, {h}, {h}) = input / {cam_stride}",
                       meaning=("float32 map of every class before the ReLU, in the card's "
                                "class order: the head's weights of the class times the last "
                                "feature maps, summed over the features. The CAM of any class "
                                "is its map made as `cam` is (nanoscout.analysis.classifier."
                                "cam_of_map); cells as `cam`'s")),
        ),
        classes=classes,
        training=TrainingInfo(**training),
        evaluation=evaluation,
        timings_ms=timings,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        notes=notes or (
            f"Small CNN (8 conv + BN + ReLU layers in 4 stride-2 stages, base width "
            f"{width}, centred 4x4 stride-2 downsampling, last stage dilated; features at "
            f"input/{cam_stride}), a linear head at "
            f"every cell giving one map per class, pooled to the class score by {pool_words}; "
            "the CAM (the top class's map) is computed inside the graph. Input: the whole frame "
            f"resampled to {size}x{size} and percentile-normalised "
            "(nanoscout.analysis.preprocess.fixed_input). " + CLASS_MEANINGS),
    )


def export_and_card(net: Any, out: Path, *, classes: tuple[str, ...], size: int,
                    training: dict[str, Any], evaluation: dict[str, dict[str, Any]],
                    timing: bool = True, notes: str = "") -> Path:
    """Export ``net`` to ``out/classifier.onnx``, time it and write ``out/classifier.json``."""
    from nanoscout.training.classifier_net import export_onnx
    from nanoscout.training.evaluate_classifier import OnnxClassifier, time_engine

    onnx_path = out / "classifier.onnx"
    check = export_onnx(net, onnx_path, size, class_maps=True)
    training = {**training, "onnx_max_abs_diff_vs_torch": check["max_abs_diff"]}
    timings: dict[str, Any] = {}
    if timing:
        timings = time_engine(OnnxClassifier(onnx_path, classes, size))
    card = build_card(onnx_path, classes=classes, size=size, training=training,
                      evaluation=evaluation, timings=timings, width=net.width,
                      cam_stride=net.cam_stride, notes=notes)
    return card.dump(out / "classifier.json")


# ------------------------------------------------------------------------------- main


CLASS_MEANINGS = (
    "Class meanings (models/fields.py): rods_wires = the field CONTAINS rods or wires, from "
    "fields dominated by wires down to a single rod among particles (alert on "
    "p(rods_wires)); isolated_particles / agglomerated_particles = particle fields WITHOUT rods "
    "(spheres, ellipses of aspect < 2, faceted), < 8 % resp. >= 80 % of particles touching; "
    "empty_support = support film only; film_structure = continuous / cracked / porous film or "
    "large grains; out_of_focus = strong defocus blur; charging_saturated = clipped-white "
    "regions, scan streaks, strong gradients; blank = flat illumination and noise only.")

SYNTHETIC_DATA = (
    "synthetic fields of view from models/fields.py (render_field, 512x512 with seeds "
    f"{TRAIN_SEED_BASE} + k and 1024x1024 with seeds {TRAIN_SEED_BASE_1024} + k, class k % 8; "
    f"extra needle-kind rods_wires fields, 1-3 rods among particles, seeds "
    f"{TRAIN_SEED_BASE_NEEDLES} + k), "
    "all nuisances random per field (TEM / HAADF-STEM / "
    "SEM, random inversion, particle ECD 1.6-10 % of the side, coverage, dose 20-3000 e/px, "
    "blur, gradient, support texture, 8-bit quantisation), each reduced to the model input by "
    "nanoscout.analysis.preprocess.fixed_input; plus crops (whole image + random 60-100 % crops) of real "
    "training images with an honestly derivable class: EMPS training papers minus the tuning "
    "papers (rods_wires: >= 2 rod-like particles, aspect >= 3 and not cut by the border; with "
    "no rod-like particle, isolated: <= 20 % of particles touching, agglomerated: >= 60 % "
    "touching; one rod-like particle or in between: unused) and the STEM training materials "
    "(isolated_particles). No validation paper, tuning paper or held-out material is read.")


def _cached_fields(cache_dir: Path | None, n_per_class: int, seed_base: int, size: int,
                   shape: tuple[int, int], workers: int, needles: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Return :func:`synthetic_inputs`, kept in / reused from ``cache_dir`` when given."""
    n = n_per_class * (1 if needles else len(FIELD_CLASSES))
    print(f"rendering {n} training fields of {shape[0]}x{shape[1]}"
          f"{' (needles)' if needles else ''} ...", flush=True)
    tag = ("" if shape == (512, 512) else f"_{shape[0]}") + ("_needles" if needles else "")
    cache = cache_dir / f"fields_{FIELDS_VERSION}_{n_per_class}_{size}_{seed_base}{tag}.npz" \
        if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            print(f"  loaded {cache}", flush=True)
            return z["x"], z["y"]
    xs, ys = synthetic_inputs(n_per_class, seed_base, size, shape=shape, workers=workers,
                              needles=needles)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=xs, y=ys)
    return xs, ys


def _synthetic_main(args: argparse.Namespace, t_start: float, argv: list[str]) -> int:
    import torch

    from nanoscout.training.evaluate_classifier import OnnxClassifier, evaluate_all

    t0 = time.perf_counter()
    xs, ys = _cached_fields(args.cache, args.n_per_class, TRAIN_SEED_BASE, args.size,
                            (512, 512), args.workers)
    if args.n_1024_per_class:
        x2, y2 = _cached_fields(args.cache, args.n_1024_per_class, TRAIN_SEED_BASE_1024,
                                args.size, (1024, 1024), args.workers)
        xs, ys = np.concatenate([xs, x2]), np.concatenate([ys, y2])
    if args.extra_needles:
        x3, y3 = _cached_fields(args.cache, args.extra_needles, TRAIN_SEED_BASE_NEEDLES,
                                args.size, (512, 512), args.workers, needles=True)
        xs, ys = np.concatenate([xs, x3]), np.concatenate([ys, y3])
    data_s = time.perf_counter() - t0
    print(f"  {len(ys)} fields in {data_s:.0f} s", flush=True)
    real_summary: dict[str, Any] = {"used": False}
    if not args.no_real:
        rng = np.random.default_rng(args.seed + 1)
        items, real_summary = real_training_images()
        cls_index = {c: k for k, c in enumerate(FIELD_CLASSES)}
        rx, ry = [], []
        for img, lab, _ in items:
            for c in crops_of(img, rng, args.real_crops, args.size):
                rx.append(c)
                ry.append(cls_index[lab])
        if rx:
            xs = np.concatenate([xs, np.stack(rx)])
            ys = np.concatenate([ys, np.array(ry, np.int64)])
        real_summary["images"] = len(items)
        real_summary["crops_per_image"] = args.real_crops
        print(f"  real training images: {json.dumps(real_summary)}", flush=True)
    net, stats = train_net(xs, ys, len(FIELD_CLASSES), steps=args.steps, batch=args.batch,
                           lr=args.lr, seed=args.seed, width=args.width,
                           pooling=args.pooling, cam_stride=args.cam_stride,
                           max_seconds=None if args.max_minutes is None
                           else 60.0 * args.max_minutes, init=args.init)
    args.out.mkdir(parents=True, exist_ok=True)
    # the trained weights, for fine-tuning or re-export (not shipped: the ONNX file is)
    torch.save(net.state_dict(), args.out / "classifier.pt")
    training = {
        "data": SYNTHETIC_DATA,
        "command": "python -m nanoscout.training.train_classifier " + " ".join(argv),
        "seeds": f"training fields {TRAIN_SEED_BASE} + k; torch/numpy seed {args.seed}",
        "machine": f"{platform.machine()} CPU, torch threads {args.threads}",
        "width": args.width, "n_synthetic": int(args.n_per_class * len(FIELD_CLASSES)),
        "n_synthetic_1024": int(args.n_1024_per_class * len(FIELD_CLASSES)),
        "n_synthetic_extra_needles": int(args.extra_needles),
        "real": real_summary, "data_seconds": round(data_s, 1), **stats,
    }
    # first a card without evaluation (the evaluation loads the exported file through it)
    card_path = export_and_card(net, args.out, classes=FIELD_CLASSES, size=args.size,
                                training={**training, "wall_seconds": None}, evaluation={},
                                timing=False)
    clf = OnnxClassifier(args.out / "classifier.onnx", FIELD_CLASSES, args.size)
    results = evaluate_all(clf, n_per_class=args.eval_n, cam_n=args.cam_n, n_1024=args.eval_n_1024,
                           real=not args.no_real_eval, workers=args.workers,
                           split=args.eval_split)
    training["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    evaluation = {k: v for k, v in results.items() if k != "engine_ms"}
    card_path = export_and_card(net, args.out, classes=FIELD_CLASSES, size=args.size,
                                training=training, evaluation=evaluation)
    if args.results is not None:
        results["card"] = str(card_path)
        results["engine_ms"] = json.loads(card_path.read_text())["timings_ms"]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k].get("accuracy", results[k].get("hit_rate"))
                      for k in results if isinstance(results[k], dict)}, indent=1))
    print(f"wrote {card_path} ({training['wall_seconds']} s)")
    return 0


def _folder_main(args: argparse.Namespace, t_start: float, argv: list[str]) -> int:
    from nanoscout.training.evaluate_classifier import OnnxClassifier, evaluate_images

    images, y, classes, names = load_folder(args.data)
    tr, va = stratified_split(y, args.val_fraction, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    xs, ys = [], []
    for i in tr:
        for c in crops_of(images[i], rng, args.real_crops, args.size):
            xs.append(c)
            ys.append(int(y[i]))
    print(f"{len(classes)} classes {list(classes)}: {len(tr)} training / {len(va)} validation "
          f"images", flush=True)
    net, stats = train_net(np.stack(xs), np.array(ys, np.int64), len(classes), steps=args.steps,
                           batch=args.batch, lr=args.lr, seed=args.seed, width=args.width,
                           pooling=args.pooling, cam_stride=args.cam_stride)
    args.out.mkdir(parents=True, exist_ok=True)
    training = {
        "data": (f"folder {args.data}: one sub-folder per class ({', '.join(classes)}); "
                 f"stratified split, {args.val_fraction:.0%} of every class held out "
                 f"(seed {args.seed}); {args.real_crops} crops per training image"),
        "command": "python -m nanoscout.training.train_classifier " + " ".join(argv),
        "seeds": f"split and torch/numpy seed {args.seed}",
        "machine": f"{platform.machine()} CPU, torch threads {args.threads}",
        "width": args.width, "n_train_images": int(len(tr)), "n_val_images": int(len(va)),
        **stats,
    }
    export_and_card(net, args.out, classes=classes, size=args.size,
                    training={**training, "wall_seconds": None}, evaluation={}, timing=False)
    clf = OnnxClassifier(args.out / "classifier.onnx", classes, args.size)
    evaluation = {"validation": {
        "data": f"the held-out {len(va)} images of the stratified split",
        "command": "python -m nanoscout.training.train_classifier " + " ".join(argv),
        **evaluate_images(clf, [images[i] for i in va], y[va], [names[i] for i in va])}}
    training["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    card_path = export_and_card(net, args.out, classes=classes, size=args.size,
                                training=training, evaluation=evaluation,
                                timing=not args.no_timing)
    print(f"validation accuracy {evaluation['validation']['accuracy']}; wrote {card_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: train, export and evaluate the field classifier; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m nanoscout.training.train_classifier",
                                 description="train the field-of-view classifier")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for classifier.onnx + classifier.json (default: "
                         f"{SYNTHETIC_OUT} in the synthetic mode, which builds the shipped "
                         "model; required with --data)")
    ap.add_argument("--data", type=Path, default=None,
                    help="folder with one sub-folder of images per class (facility mode)")
    ap.add_argument("--size", type=int, default=SIZE, help="model input side S (px)")
    ap.add_argument("--n-per-class", type=int, default=700,
                    help="synthetic 512x512 training fields per class")
    ap.add_argument("--n-1024-per-class", type=int, default=80,
                    help="synthetic 1024x1024 training fields per class (seeds "
                         f"{TRAIN_SEED_BASE_1024} + k)")
    ap.add_argument("--pooling", choices=("lse", "mean"), default="lse",
                    help="class-map pooling (nanoscout.training.classifier_net)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these saved weights (classifier.pt of an earlier run)")
    ap.add_argument("--cam-stride", type=int, choices=(8, 16), default=16,
                    help="feature (and CAM cell) stride in model-input px")
    ap.add_argument("--extra-needles", type=int, default=700,
                    help="extra 512x512 rods_wires fields of the needle kind (1-3 rods among "
                         f"particles; seeds {TRAIN_SEED_BASE_NEEDLES} + k)")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="end training after this wall time (schedule follows the clock; "
                         "--steps is then an upper bound)")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=20250301)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="processes rendering fields")
    ap.add_argument("--real-crops", type=int, default=3, help="cached crops per real image")
    ap.add_argument("--no-real", action="store_true", help="synthetic fields only")
    ap.add_argument("--no-real-eval", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--eval-split", choices=("test", "validation"), default="test",
                    help="evaluation seeds of nanoscout.training.evaluate_classifier (validation while "
                         "choosing settings; test for the model that ships)")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out synthetic fields per class")
    ap.add_argument("--eval-n-1024", type=int, default=10,
                    help="held-out 1024x1024 synthetic fields per class")
    ap.add_argument("--cam-n", type=int, default=200, help="held-out rod-among-spheres fields")
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder to keep the rendered training inputs in (reused when present)")
    ap.add_argument("--results", type=Path, default=None,
                    help="also write the evaluation JSON here (benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.out is None:
        if args.data is not None:  # the default is the shipped classifier's folder
            ap.error(f"--data needs --out (a folder for classifier.onnx + classifier.json; "
                     f"the default {SYNTHETIC_OUT} holds the shipped classifier)")
        args.out = SYNTHETIC_OUT
    if args.size % 16 or args.size < 64:
        raise ConfigError(f"--size {args.size} must be a multiple of 16 and >= 64")
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.data is not None:
        return _folder_main(args, t_start, argv)
    return _synthetic_main(args, t_start, argv)


if __name__ == "__main__":
    raise SystemExit(main())
