"""Train the particle detector on synthetic specimens, export it to ONNX and write its model card.

One reproducible command (fixed seeds, CPU, 2 threads)::

    python -m nanoscout.training.train --out models/weights

Data are generated on the fly by :mod:`nanoscout.sim.synthetic`: a pool of specimens (all three
modalities, particle diameters ~4-90 px, sphere/ellipse/rod/faceted, isolated to heavily
agglomerated, dose 15-3000 e/px or noiseless, blur, illumination gradients, support texture,
Fresnel fringes, uint8/uint16/float32) is refreshed by one new specimen every second step (in a data
process), and every training crop is a fresh acquisition (new noise, random window of the periodic
specimen, random flip / 90-degree rotation). Training specimens use seeds 1_000_000 + k; the
held-out evaluation uses seeds below 1_000_000 (``nanoscout.training.evaluate``), so the two never
share a specimen.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from nanoscout.analysis.preprocess import normalize
from nanoscout.clients.progress import track
from nanoscout.sim.overlays import burn_in
from nanoscout.sim.sem_render import random_config as sem_random_config
from nanoscout.sim.sem_render import render as sem_render
from nanoscout.sim.synthetic import KINDS, Specimen, SpecimenConfig
from nanoscout.training.boxloss import boxes_from_labels, projection_loss
from nanoscout.training.crops import (
    RealImage,
    crop_at_scale,
    load_real_training,
    low_dose,
    photometric,
    support_crystals,
    thick_support,
)
from nanoscout.training.export import VARIANTS, export_onnx, write_card
from nanoscout.training.haadf import acquire as haadf_acquire
from nanoscout.training.unet import CORE_FRACTION
from nanoscout.training.unet_deep import ARCHS, build_network

TRAIN_SEED_BASE = 1_000_000
CROP = 256
NECK_WEIGHT = 5.0
NECK_RADIUS = 4.0
#: phase 2: probability that a synthetic crop gets burnt-in annotations (scale bar, text,
#: data bar); half of it for real crops, which often carry their own
OVERLAY_P = 0.3
#: phase 2: probability that a synthetic specimen is rods / wires lying mostly along an axis
AXIS_RODS_P = 0.2
#: phase 2, ``low_dose_p``: counts in the brightest pixels of a real crop taken to a low dose,
#: drawn log-uniform (the Poisson noise of nanoscout.training.crops.low_dose)
LOW_DOSE_COUNTS = (10.0, 300.0)
#: seeds of the pre-rendered HAADF training specimens (nanoscout.training.haadf), and their default number
HAADF_SEED_BASE = 3_000_000
HAADF_FRAMES = 2400
#: box-supervised crops: at most this many boxes per crop enter the projection loss
MAX_BOXES = 24
#: weight of the projection loss (``nanoscout.training.boxloss``) against the per-pixel losses
BOX_WEIGHT = 1.0


class HaadfCache:
    """Pre-rendered HAADF-STEM specimens (``python -m nanoscout.training.haadf --cache DIR``): noiseless
    signals and exact labels, loaded from every ``haadf_*.npz`` shard in a folder."""

    def __init__(self, folder: Path, limit: int | None = None) -> None:
        sigs, labs = [], []
        for path in sorted(Path(folder).glob("haadf_*.npz"), key=lambda p: p.stem):
            if path.name.endswith(".tmp.npz"):
                continue
            with np.load(path) as z:
                sigs.append(z["signal"])
                labs.append(z["labels"])
        if not sigs:
            raise FileNotFoundError(f"no haadf_*.npz shards in {folder}")
        self.signal = np.concatenate(sigs)[:limit]
        self.labels = np.concatenate(labs)[:limit]

    def __len__(self) -> int:
        return len(self.signal)

    def crop(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (signal float32, labels int32) of a random ``size`` crop of a random frame."""
        k = int(rng.integers(len(self.signal)))
        h, w = self.signal.shape[1:]
        r0 = int(rng.integers(0, h - size + 1))
        c0 = int(rng.integers(0, w - size + 1))
        return (self.signal[k, r0:r0 + size, c0:c0 + size].astype(np.float32),
                self.labels[k, r0:r0 + size, c0:c0 + size].astype(np.int32))


def random_config(rng: np.random.Generator, shape: tuple[int, int] = (CROP, CROP)
                  ) -> SpecimenConfig:
    """Return a random training specimen configuration (pixel size 1 nm: diameters in px)."""
    modality = str(rng.choice(["TEM", "STEM", "SEM"]))
    median = float(np.exp(rng.uniform(math.log(5.0), math.log(45.0))))
    mix = rng.dirichlet([3.0, 1.0, 0.5, 1.0])
    dose = None if rng.random() < 0.1 else float(np.exp(rng.uniform(math.log(15), math.log(3000))))
    coverage = 0.0 if rng.random() < 0.04 else float(rng.uniform(0.03, 0.4))
    return SpecimenConfig(
        modality=modality,  # type: ignore[arg-type]
        shape=shape,
        pixel_size_nm=1.0,
        median_diameter_nm=median,
        sigma_log=float(rng.uniform(0.08, 0.45)),
        min_diameter_nm=3.0,
        max_diameter_nm=100.0,
        coverage=coverage,
        # the first four kinds: plates (KINDS[4]) are not in the training mix
        shape_mix=dict(zip(KINDS[:4], mix.tolist(), strict=True)),
        agglomerate_fraction=float(rng.uniform(0.0, 0.75)),
        dose_e_per_px=dose,
        blur_px=float(rng.uniform(0.3, 2.0)),
        illumination_gradient=float(rng.uniform(0.0, 0.5)),
        support_texture=float(rng.uniform(0.0, 0.15)),
        contrast=float(rng.uniform(0.12, 0.8)),
        fringe=float(rng.uniform(0.0, 0.6)) if rng.random() < 0.3 else 0.0,
        dtype=str(rng.choice(["uint8", "uint16", "float32"])),  # type: ignore[arg-type]
    )


def targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (foreground, core) float32 maps of an instance label map.

    Core: inner distance (to background or to a touching neighbour) at least CORE_FRACTION of
    the particle's largest inner distance, and at least 1 px.
    """
    fg, core, _ = targets_and_weights(labels)
    return fg, core


def targets_and_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (foreground, core, neck weight) float32 maps of an instance label map.

    The neck weight is NECK_WEIGHT within NECK_RADIUS px of a contact between two particles and
    1 elsewhere: a core that bridges a contact merges two particles, so it costs more.
    """
    fg = labels > 0
    inner = fg.copy()
    # pixels next to a different particle count as outline, so touching cores stay apart
    dh = (labels[:, 1:] != labels[:, :-1]) & fg[:, 1:] & fg[:, :-1]
    dv = (labels[1:, :] != labels[:-1, :]) & fg[1:, :] & fg[:-1, :]
    inner[:, 1:] &= ~dh
    inner[:, :-1] &= ~dh
    inner[1:, :] &= ~dv
    inner[:-1, :] &= ~dv
    dist = ndi.distance_transform_edt(inner)
    ids = np.unique(labels[fg])
    lut = np.zeros(int(labels.max()) + 1, np.float64)
    if ids.size:
        lut[ids] = ndi.maximum(dist, labels, ids)
    core = (dist >= np.maximum(CORE_FRACTION * lut[labels], 1.0)) & inner
    contact = np.zeros_like(fg)
    contact[:, 1:] |= dh
    contact[:, :-1] |= dh
    contact[1:, :] |= dv
    contact[:-1, :] |= dv
    weight = np.ones(labels.shape, np.float32)
    if contact.any():
        near = ndi.distance_transform_edt(~contact) <= NECK_RADIUS
        weight[near] = NECK_WEIGHT
    return fg.astype(np.float32), core.astype(np.float32), weight


class Pool:
    """Training crops: synthetic specimens mixed with crops of the real training images.

    A pool of synthetic specimens is refreshed with one new specimen every few steps; each
    synthetic crop is a fresh acquisition. With probability ``real_fraction`` a crop comes from
    the real training images instead (:mod:`nanoscout.training.crops`). Targets per crop: (foreground, core,
    neck weight, valid) with valid = 0 on padding.
    """

    def __init__(self, size: int, rng: np.random.Generator, real: list[RealImage] | None = None,
                 real_fraction: float = 0.0, stem_share: float | None = None,
                 haadf: HaadfCache | None = None, haadf_share: float = 0.0,
                 sem_share: float = 0.0, granular_share: float = 0.0) -> None:
        """``stem_share``: share of the real crops cut from STEM images (None: as the
        sqrt(particle count) weights fall, about a fifth). ``haadf``: pre-rendered HAADF-STEM
        specimens (:mod:`nanoscout.training.haadf`); ``haadf_share`` of the synthetic crops come from them,
        ``sem_share`` from SEM specimens rendered on the fly (:mod:`nanoscout.sim.sem_render`).
        ``granular_share``: share of the synthetic SEM specimens lying on a granular film
        (unlabelled grains as large as the particles or smaller, ``SpecimenConfig.support_relief``)."""
        if not 0.0 <= granular_share <= 1.0:
            raise ValueError(f"granular_share {granular_share} must be within [0, 1]")
        self.rng = rng
        self.sem_share = sem_share
        self.granular_share = granular_share
        #: HAADF crops: particles smaller than this (px) are left unlabelled, and burnt-in
        #: annotations are painted as on the other synthetic crops (set by DataOptions)
        self.haadf_min_area = 0.0
        self.haadf_overlays = False
        #: share of the real crops laid on a thick, uneven support first (set by DataOptions)
        self.support_p = 0.0
        #: share of the real crops taken to a low dose (crops.low_dose; set by DataOptions).
        #: Its own generator, spawned from ``rng`` without drawing from it: every crop is the
        #: one a run without the option cuts, some with shot noise on top
        self.low_dose_p = 0.0
        self._dose_rng = rng.spawn(1)[0]
        #: share of the real crops given unlabelled support crystals (crops.support_crystals;
        #: set by DataOptions), with its own generator as the low dose has
        self.grains_p = 0.0
        self._grains_rng = rng.spawn(1)[0]
        self.haadf = haadf
        self.haadf_share = haadf_share if haadf is not None else 0.0
        self.counter = 0
        self.real = real or []  # empty in phase 1, which stays as first shipped
        self.items: list[Specimen] = [self._new() for _ in range(size)]
        self.real_fraction = real_fraction if self.real else 0.0
        # sample real images with weight ~ sqrt(particle count): dense images teach more,
        # but a single image must not dominate
        n = np.array([max(1, len(np.unique(r.labels)) - 1) for r in self.real], np.float64)
        self.real_p = np.sqrt(n) / np.sqrt(n).sum() if self.real else None
        if self.real_p is not None and stem_share is not None:
            if not 0.0 <= stem_share <= 1.0:
                raise ValueError(f"stem_share {stem_share} must be within [0, 1]")
            stem = np.array([r.set == "stem" for r in self.real])
            if stem.all() or not stem.any():
                raise ValueError("stem_share needs both STEM and other real training images")
            p = self.real_p
            p[stem] *= stem_share / p[stem].sum()
            p[~stem] *= (1.0 - stem_share) / p[~stem].sum()

    def _new(self) -> Specimen:
        seed = TRAIN_SEED_BASE + self.counter
        self.counter += 1
        srng = np.random.default_rng(seed)
        cfg = random_config(srng)
        if self.granular_share > 0 and cfg.modality == "SEM":
            # seeded apart from the specimen, so the other specimens stay as without the option
            frng = np.random.default_rng([seed, 4])
            if frng.random() < self.granular_share:
                cfg = replace(cfg, support_relief=float(frng.uniform(0.3, 1.0)),
                              support_relief_nm=float(cfg.median_diameter_nm
                                                      * frng.uniform(0.25, 1.0)))
        if self.real:
            # phase 2: a quarter of the specimens are supported catalysts (small particles on
            # large unlabelled support grains); seeded separately, so phase 1 stays as shipped
            grng = np.random.default_rng([seed, 2])
            if grng.random() < 0.25:
                cfg = replace(cfg, support_grains=float(grng.uniform(0.2, 0.7)),
                              support_grain_nm=float(cfg.median_diameter_nm
                                                     * grng.uniform(4.0, 15.0)))
            # a fifth are rod / wire specimens whose rods mostly lie along an image axis, so
            # that a straight particle is not mistaken for a burnt-in scale bar
            rrng = np.random.default_rng([seed, 3])
            if rrng.random() < AXIS_RODS_P:
                cfg = replace(cfg, shape_mix={"rod": 0.6, "ellipse": 0.15, "sphere": 0.25},
                              axis_aligned=float(rrng.uniform(0.5, 1.0)))
        return Specimen.generate(cfg, srng)

    def refresh(self) -> None:
        """Replace one specimen of the pool, picked at random, with a new one."""
        self.items[int(self.rng.integers(len(self.items)))] = self._new()

    def _synthetic(self) -> np.ndarray:
        sp = self.items[int(self.rng.integers(len(self.items)))]
        # re-acquire with a new dose / dtype too: same geometry, different imaging
        if self.rng.random() < 0.5:
            dose = float(np.exp(self.rng.uniform(math.log(15), math.log(3000))))
            sp.cfg = replace(sp.cfg, dose_e_per_px=dose,
                             dtype=self.rng.choice(["uint8", "uint16", "float32"]).item())
        shift = (self.rng.uniform(0, sp.canvas[0]), self.rng.uniform(0, sp.canvas[1]))
        shift = (float(round(shift[0])), float(round(shift[1])))
        fr = sp.acquire(self.rng, shift)
        x = normalize(fr.image)
        if self.real and self.rng.random() < 0.1:  # phase 2 only
            x = np.clip(1.0 - x, -0.5, 1.5)
        fg, core, wt = targets_and_weights(fr.labels)
        stack = np.stack([x, fg, core, wt, np.ones_like(x)])
        if self.real and self.rng.random() < OVERLAY_P:
            burn_in(stack[0], stack[1:], self.rng)
        return stack

    def _real(self) -> np.ndarray:
        item = self.real[int(self.rng.choice(len(self.real), p=self.real_p))]
        img, lab, valid = crop_at_scale(item, self.rng, CROP)
        if self.support_p > 0 and self.rng.random() < self.support_p:
            img = thick_support(img, lab, self.rng)
        if self.grains_p > 0 and self._grains_rng.random() < self.grains_p:
            img = support_crystals(img, lab, self._grains_rng)
        if self.low_dose_p > 0 and self._dose_rng.random() < self.low_dose_p:
            dose = float(np.exp(self._dose_rng.uniform(*np.log(LOW_DOSE_COUNTS))))
            img = normalize(low_dose(img, dose, self._dose_rng))
        x = photometric(img, self.rng)
        fg, core, wt = targets_and_weights(lab)
        # box-only truth: the label map's instances give the boxes (projection loss)
        boxlab = lab.astype(np.float32) if item.ignore is not None else np.zeros_like(x)
        stack = np.stack([x, fg, core, wt, valid, boxlab])
        if self.rng.random() < OVERLAY_P / 2:
            burn_in(stack[0], stack[1:5], self.rng)
        return stack

    def _haadf(self) -> np.ndarray:
        assert self.haadf is not None
        sig, lab = self.haadf.crop(self.rng, CROP)
        img, lab = haadf_acquire(sig, lab, self.rng)
        if self.haadf_min_area > 0:
            # specks below the smallest size annotators mark stay in the image, unlabelled
            area = np.bincount(lab.ravel())
            small = np.flatnonzero(area < self.haadf_min_area)
            small = small[small > 0]
            if small.size:
                lab = np.where(np.isin(lab, small), 0, lab)
        x = normalize(img)
        fg, core, wt = targets_and_weights(lab)
        stack = np.stack([x, fg, core, wt, np.ones_like(x), np.zeros_like(x)])
        if self.haadf_overlays and self.rng.random() < OVERLAY_P:
            burn_in(stack[0], stack[1:5], self.rng)
        return stack

    def _sem(self) -> np.ndarray:
        seed = int(self.rng.integers(2**62))
        img, lab = sem_render(sem_random_config(np.random.default_rng(seed), (CROP, CROP)),
                              seed)
        x = normalize(img)
        fg, core, wt = targets_and_weights(lab)
        stack = np.stack([x, fg, core, wt, np.ones_like(x), np.zeros_like(x)])
        if self.rng.random() < OVERLAY_P:
            burn_in(stack[0], stack[1:5], self.rng)
        return stack

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (x, y, boxes): inputs (n, 1, S, S), targets (n, 4, S, S) and the boxes of
        box-supervised crops as (K, 5) int64 rows (crop index, r0, c0, r1, c1)."""
        xs, ys, boxes = [], [], []
        for i in range(n):
            real = self.real_fraction > 0 and self.rng.random() < self.real_fraction
            if real:
                stack = self._real()
            elif self.haadf_share > 0 and self.rng.random() < self.haadf_share:
                stack = self._haadf()
            elif self.sem_share > 0 and self.rng.random() < self.sem_share:
                stack = self._sem()
            else:
                stack = self._synthetic()
                stack = np.concatenate([stack, np.zeros_like(stack[:1])])
            k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            stack = np.rot90(stack, k, axes=(1, 2))
            if flip:
                stack = stack[:, :, ::-1]
            xs.append(stack[:1].copy())
            ys.append(stack[1:5].copy())
            if stack[5].any():
                b = boxes_from_labels(stack[5].astype(np.int32))
                if len(b) > MAX_BOXES:
                    b = b[self.rng.choice(len(b), MAX_BOXES, replace=False)]
                boxes.append(np.concatenate([np.full((len(b), 1), i, np.int64), b], 1))
        bx = np.concatenate(boxes) if boxes else np.zeros((0, 5), np.int64)
        return np.stack(xs), np.stack(ys), bx


def _dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits) * valid
    inter = (p * target).sum(dim=(1, 2))
    return 1.0 - ((2.0 * inter + 1.0) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)).mean()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE + 0.5 soft Dice on each output (foreground, core); core BCE weighted at contacts.

    ``y`` holds (foreground, core, neck weight, valid) along dim 1; pixels with valid = 0
    (padding around a small real crop) do not count.
    """
    valid = y[:, 3]
    n_valid = valid.sum().clamp(min=1.0)
    fg_bce = (F.binary_cross_entropy_with_logits(logits[:, 0], y[:, 0], reduction="none")
              * valid).sum() / n_valid
    fg = fg_bce + 0.5 * _dice(logits[:, 0], y[:, 0], valid)
    w = y[:, 2] * valid
    core_bce = (F.binary_cross_entropy_with_logits(logits[:, 1], y[:, 1], reduction="none")
                * w).sum() / w.sum().clamp(min=1.0)
    return fg + core_bce + 0.5 * _dice(logits[:, 1], y[:, 1], valid)


def _producer(queue: mp.Queue, pool_size: int, seed: int, steps: int, batch: int,
              refresh_every: int, real_fraction: float, real_exclude: tuple[str, ...],
              stem_share: float | None, data: DataOptions) -> None:
    """Data process: fills ``queue`` with (x, y, boxes) numpy batches in a fixed, seeded order."""
    rng = np.random.default_rng(seed)
    real = (load_real_training(data.real_sets, exclude=set(real_exclude), box_ring=data.box_ring,
                               stem_masks=data.stem_masks)
            if real_fraction > 0 else [])
    cache = HaadfCache(data.haadf_cache, data.haadf_frames) \
        if data.haadf_cache is not None and data.haadf_share > 0 else None
    pool = Pool(pool_size, rng, real, real_fraction, stem_share, cache, data.haadf_share,
                data.sem_share, data.granular_share)
    pool.haadf_min_area = math.pi * (data.haadf_min_ecd / 2.0) ** 2
    pool.support_p = data.support_p
    pool.low_dose_p = data.low_dose_p
    pool.grains_p = data.grains_p
    pool.haadf_overlays = data.haadf_overlays
    for step in track(range(steps), "training"):
        if step % refresh_every == 0:
            pool.refresh()
        queue.put(pool.batch(batch))


@dataclass(frozen=True)
class DataOptions:
    """Data beyond detector 3.0's: which real sets, box supervision, HAADF crops (phase 2), and
    granular SEM films (``granular_share``, the one option phase 1 takes too)."""

    real_sets: tuple[str, ...] = ("emps", "stem")
    box_ring: float | None = None  # STEM boxes: inner-ellipse share trusted (None: ellipses)
    haadf_cache: Path | None = None
    haadf_share: float = 0.0  # share of the synthetic crops from the HAADF cache
    haadf_frames: int | None = None  # use only the first this many cached frames
    sem_share: float = 0.0  # share of the remaining synthetic crops from nanoscout.sim.sem_render
    haadf_min_ecd: float = 0.0  # HAADF particles below this ECD (px) are left unlabelled
    haadf_overlays: bool = False  # burnt-in annotations on HAADF crops too
    support_p: float = 0.0  # share of the real crops laid on a thick support (crops.thick_support)
    granular_share: float = 0.0  # share of the synthetic SEM specimens on a granular film (Pool)
    low_dose_p: float = 0.0  # share of the real crops taken to a low dose (crops.low_dose)
    stem_masks: Path | None = None  # STEM pseudo-masks refined by a detector (pseudo_masks)
    grains_p: float = 0.0  # share of the real crops given support crystals (crops.support_crystals)


def _next_batch(queue: mp.Queue, producer: mp.process.BaseProcess
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the next batch; raises RuntimeError when the data process has died."""
    while True:
        try:
            return queue.get(timeout=5.0)
        except Empty:
            if not producer.is_alive():
                raise RuntimeError(f"data process exited with code {producer.exitcode} "
                                   "before producing all batches") from None


def train(steps: int, batch: int, width: int, pool_size: int, seed: int,
          log_every: int = 50, real_fraction: float = 0.0, real_exclude: tuple[str, ...] = (),
          model: torch.nn.Module | None = None, lr: float = 4e-3, stem_share: float | None = None,
          arch: str = "unet", data: DataOptions | None = None, frozen_norm: bool = False
          ) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train a detector network; returns the model (eval mode) and a summary (seconds, last loss).

    ``model``: the network to continue from (fine-tuning phase); None starts a new one.
    ``frozen_norm``: keep the BatchNorms in eval mode (their statistics fixed), as a network
    rebuilt from an exported ONNX file needs (its BatchNorms are folded into identities).
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # one producer process generates the data while this one trains: the order of the batches
    # is fixed by the seed, so the run stays reproducible
    queue: mp.Queue = mp.get_context("fork").Queue(maxsize=6)
    producer = mp.get_context("fork").Process(
        target=_producer, args=(queue, pool_size, seed, steps, batch, 2, real_fraction, real_exclude,
                                stem_share, data or DataOptions()),
        daemon=True)
    producer.start()
    if model is None:
        model = build_network(arch, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    model.train()
    if frozen_norm:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    running = 0.0
    t_data = t_step = 0.0
    for step in track(range(steps), "training"):
        a = time.perf_counter()
        xn, yn, bn = _next_batch(queue, producer)
        x, y = torch.from_numpy(xn), torch.from_numpy(yn)
        b = time.perf_counter()
        logits = model(x)
        loss = loss_fn(logits, y)
        if bn.size:
            loss = loss + BOX_WEIGHT * projection_loss(logits[:, 0], torch.from_numpy(bn))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        c = time.perf_counter()
        t_data += b - a
        t_step += c - b
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"wait-data {t_data:.0f}s net {t_step:.0f}s elapsed {time.perf_counter() - t0:.0f}s",
                  flush=True)
    producer.join(timeout=60)
    model.eval()
    return model, {"train_seconds": time.perf_counter() - t0, "final_loss": running,
                   "data_seconds": t_data, "net_seconds": t_step}


def finetune(model: torch.nn.Module, cycles: int, steps: int, batch: int, width: int,
             pool_size: int, seed: int, **options: Any
             ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Phase 2 as ``cycles`` cycles of :func:`train` from ``model``, each a warm restart (a
    fresh AdamW and cosine schedule over ``steps`` steps); cycle k (1, 2, ...) draws its data
    with seed ``seed + k``, so two cycles equal one run continued by ``--init`` with ``--seed``
    one higher. ``options``: :func:`train`'s. Returns the model and each cycle's summary."""
    summaries = []
    for k in range(1, cycles + 1):
        model.train()
        model, summary = train(steps, batch, width, pool_size, seed + k, model=model, **options)
        summaries.append(summary)
    return model, summaries


def real_exclusions(emps_tuning: bool, stem_tuning: bool, stem_holdout: str = "",
                    root: Path | None = None) -> tuple[str, ...]:
    """Return the real training images phase 2 leaves out: the EMPS tuning papers' images
    (``emps_tuning``), the STEM tuning material's (``stem_tuning``) and those of the STEM
    training materials named in ``stem_holdout`` (comma list, e.g. "Cu": a recipe scored on a
    material it never saw, ``evaluate --sets stem-tune:Cu``). Unknown materials raise
    ConfigError."""
    from nanoscout.training.realdata import emps_tuning_ids, stem_material_names, stem_tuning_names

    out: tuple[str, ...] = tuple(emps_tuning_ids(root)) if emps_tuning else ()
    if stem_tuning:
        out += tuple(stem_tuning_names(root))
    for material in (m.strip() for m in stem_holdout.split(",") if m.strip()):
        out += tuple(stem_material_names(material, root))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train (two phases), export ONNX, evaluate held-out frames, write the card.

    Phase 1 (``--steps``): synthetic specimens only, from a new network. Phase 2
    (``--finetune-steps``): crops of the real training images (share ``--real-fraction``)
    mixed with synthetic ones, at a lower learning rate, in ``--cycles`` warm-restarted cycles
    (:func:`finetune`). ``--init CHECKPOINT`` skips phase 1 and fine-tunes that checkpoint (its
    phase-1 record is kept in the card).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models/weights"))
    ap.add_argument("--steps", type=int, default=2400, help="phase 1 (synthetic) steps")
    ap.add_argument("--finetune-steps", type=int, default=None,
                    help="phase 2 (real + synthetic) steps; 0 skips phase 2; default: the "
                         "variant's")
    ap.add_argument("--cycles", dest="finetune_cycles", type=int, default=None,
                    help="phase 2 as this many cycles, each a warm restart on the next data "
                         "seed; default: the variant's")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=16,
                    help="base channel width (16: same ONNX Runtime time as 12 on this CPU)")
    ap.add_argument("--arch", choices=ARCHS, default=None,
                    help="network: unet (detector 3.0's) or deep (nanoscout.training.unet_deep); default: "
                         "the variant's")
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--seed", type=int, default=20250101)
    ap.add_argument("--eval-n", type=int, default=20)
    ap.add_argument("--eval-seed", type=int, default=12345)
    ap.add_argument("--no-real-eval", action="store_true",
                    help="card without the held-out real-data metrics (for tuning runs)")
    ap.add_argument("--no-timing", action="store_true",
                    help="card without engine timings (runs that are not shipped as they are)")
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/detector.pt"))
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="general",
                    help="which shipped detector: general (detector.onnx) or the STEM one "
                         "(detector_stem.onnx); sets the phase-2 mix (nanoscout.training.export.VARIANTS)")
    ap.add_argument("--real-fraction", type=float, default=None,
                    help="phase 2: share of crops cut from the real training images "
                         "(default: the variant's, 0.7 general)")
    ap.add_argument("--stem-share", type=float, default=None,
                    help="phase 2: share of the real crops cut from STEM training images "
                         "(default: the variant's; general: sqrt(particle count) weights, "
                         "about 0.19)")
    ap.add_argument("--no-tuning-holdout", action="store_true",
                    help="also train on the EMPS tuning papers (default: keep them out)")
    ap.add_argument("--stem-tuning-holdout", action=argparse.BooleanOptionalAction,
                    default=None,
                    help="keep the STEM tuning material (Pt) out of training, or train on it "
                         "too (default: the variant's)")
    ap.add_argument("--stem-holdout", default="",
                    help="phase 2: further STEM training materials kept out of training "
                         "(comma list, e.g. Cu), so a recipe can be scored on one it never saw "
                         "(evaluate --sets stem-tune:Cu)")
    ap.add_argument("--real-sets", default=None,
                    help="phase 2: real training sets (comma list of emps, stem, msa); "
                         "default: the variant's")
    ap.add_argument("--box-ring", type=float, default=None,
                    help="phase 2: box supervision for STEM boxes (nanoscout.training.boxloss): trust the "
                         "inner ellipse of this share of the half-axes, leave the ring to the "
                         "box, add the projection loss; 0: inscribed ellipses as masks; "
                         "default: the variant's")
    ap.add_argument("--haadf-cache", type=Path, default=Path("runs/cache/haadf"),
                    help="phase 2: folder of pre-rendered HAADF specimens (nanoscout.training.haadf)")
    ap.add_argument("--haadf-share", type=float, default=None,
                    help="phase 2: share of the synthetic crops taken from --haadf-cache "
                         "(default: the variant's)")
    ap.add_argument("--haadf-frames", type=int, default=None,
                    help="phase 2: use only the first N cached HAADF frames (reproducibility)")
    ap.add_argument("--sem-share", type=float, default=None,
                    help="phase 2: share of the other synthetic crops rendered as SEM "
                         "agglomerates of faceted particles (nanoscout.sim.sem_render); default: "
                         "the variant's")
    ap.add_argument("--haadf-min-ecd", type=float, default=None,
                    help="phase 2: HAADF particles smaller than this ECD (px) stay unlabelled "
                         "(default: the variant's)")
    ap.add_argument("--haadf-overlays", action="store_true", default=None,
                    help="phase 2: burnt-in annotations on HAADF crops too (default: the "
                         "variant's)")
    ap.add_argument("--support-p", type=float, default=None,
                    help="phase 2: share of the real crops laid on a thick, uneven support "
                         "first, which leaves their particles faint (nanoscout.training.crops."
                         "thick_support); default: the variant's")
    ap.add_argument("--granular-share", type=float, default=None,
                    help="both phases: share of the synthetic SEM specimens lying on a granular "
                         "film whose unlabelled grains are 0.25-1x the particles' size "
                         "(nanoscout.sim.synthetic support_relief); default: the variant's")
    ap.add_argument("--low-dose-p", type=float, default=None,
                    help="phase 2: share of the real crops taken to a low dose first (Poisson "
                         f"noise, {LOW_DOSE_COUNTS[0]:g}-{LOW_DOSE_COUNTS[1]:g} counts in the "
                         "brightest pixels, log-uniform: nanoscout.training.crops.low_dose); "
                         "default: the variant's")
    ap.add_argument("--grains-p", type=float, default=None,
                    help="phase 2: share of the real crops given one to three unlabelled support "
                         "crystals 2-8x their particles' size (nanoscout.training.crops."
                         "support_crystals); default: the variant's")
    ap.add_argument("--stem-masks", type=Path, default=None,
                    help="phase 2: a folder of STEM pseudo-masks refined by a detector, taken "
                         "instead of the boxes' inscribed ellipses (python -m nanoscout.training."
                         "pseudo_masks); default: the ellipses")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (2: the shipped runs; 1 when runs share the CPU)")
    ap.add_argument("--init", type=Path, default=None,
                    help="skip phase 1: fine-tune this phase-1 checkpoint (.pt), or continue "
                         "from an exported detector (.onnx, detector 3.0's network; its "
                         "BatchNorms stay frozen)")
    ap.add_argument("--lr", type=float, default=4e-3, help="phase 1 peak learning rate")
    ap.add_argument("--finetune-lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    variant = VARIANTS[args.variant]
    if args.real_fraction is None:
        args.real_fraction = variant.real_fraction
    if args.stem_share is None:
        args.stem_share = variant.stem_share
    for name in ("arch", "box_ring", "haadf_share", "haadf_frames", "sem_share",
                 "finetune_steps", "finetune_cycles", "stem_tuning_holdout", "haadf_min_ecd",
                 "haadf_overlays", "support_p", "granular_share", "low_dose_p", "grains_p"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(variant, name))
    if args.finetune_cycles < 1:
        raise SystemExit(f"--cycles {args.finetune_cycles}: at least 1")
    if not 0.0 <= args.granular_share <= 1.0:  # before the data process would fail on it
        raise SystemExit(f"--granular-share {args.granular_share}: a share within [0, 1]")
    if not 0.0 <= args.low_dose_p <= 1.0:
        raise SystemExit(f"--low-dose-p {args.low_dose_p}: a share within [0, 1]")
    if not 0.0 <= args.grains_p <= 1.0:
        raise SystemExit(f"--grains-p {args.grains_p}: a share within [0, 1]")
    if args.stem_masks is not None and not (args.stem_masks / "index.json").is_file():
        raise SystemExit(f"--stem-masks {args.stem_masks}: no pseudo-masks there (no index.json; "
                         "python -m nanoscout.training.pseudo_masks writes them)")
    if args.real_sets is None:
        args.real_sets = ",".join(variant.train_sets)
    if args.box_ring == 0:
        args.box_ring = None
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    phases: dict[str, object] = {}
    from_onnx = args.init is not None and args.init.suffix == ".onnx"
    if args.init is None:
        model, summary = train(args.steps, args.batch, args.width, args.pool, args.seed,
                               lr=args.lr, arch=args.arch,
                               data=DataOptions(granular_share=args.granular_share))
        phases["synthetic"] = {"steps": args.steps, "lr": args.lr,
                               "granular_share": args.granular_share,
                               **{k: round(v, 4) for k, v in summary.items()}}
    elif from_onnx:
        from nanoscout.analysis.modelcard import sha256_file
        from nanoscout.training.onnx_weights import unet_from_onnx

        model = unet_from_onnx(args.init)
        if args.arch != "unet" or model.width != args.width:
            raise SystemExit(f"--init {args.init} is unet width {model.width}, not "
                             f"{args.arch} width {args.width}")
        phases["synthetic"] = {"from_onnx": str(args.init), "sha256": sha256_file(args.init)}
    else:
        ck = torch.load(args.init, map_location="cpu", weights_only=False)
        if int(ck["width"]) != args.width or ck.get("arch", "unet") != args.arch:
            raise SystemExit(f"--init {args.init} is {ck.get('arch', 'unet')} width "
                             f"{ck['width']}, not {args.arch} width {args.width}")
        model = build_network(args.arch, args.width)
        model.load_state_dict(ck["state_dict"])
        phases["synthetic"] = {"from_checkpoint": str(args.init),
                               **ck.get("training", {}).get("phases", {}).get(
                                   "synthetic", ck.get("training", {}))}
    if args.finetune_steps > 0:
        data = DataOptions(tuple(x for x in args.real_sets.split(",") if x), args.box_ring,
                           args.haadf_cache, args.haadf_share, args.haadf_frames,
                           args.sem_share, args.haadf_min_ecd, bool(args.haadf_overlays),
                           args.support_p, args.granular_share, args.low_dose_p,
                           args.stem_masks, args.grains_p)
        if data.haadf_cache is not None and data.haadf_share > 0:
            # one command: render the HAADF specimens first where the cache lacks them
            # (shards already there are kept; seeds HAADF_SEED_BASE + k)
            from nanoscout.training.haadf import write_cache

            write_cache(data.haadf_cache, HAADF_SEED_BASE, data.haadf_frames or HAADF_FRAMES)
        exclude = real_exclusions(not args.no_tuning_holdout, bool(args.stem_tuning_holdout),
                                  args.stem_holdout)
        model, cycles = finetune(model, args.finetune_cycles, args.finetune_steps, args.batch,
                                 args.width, args.pool, args.seed,
                                 real_fraction=args.real_fraction, real_exclude=exclude,
                                 lr=args.finetune_lr, stem_share=args.stem_share, data=data,
                                 frozen_norm=from_onnx)
        summary = {**cycles[-1], "train_seconds": sum(c["train_seconds"] for c in cycles)}
        phases["real"] = {"steps": args.finetune_steps, "cycles": args.finetune_cycles,
                          "lr": args.finetune_lr,
                          "real_fraction": args.real_fraction, "stem_share": args.stem_share,
                          "real_sets": list(data.real_sets), "box_ring": data.box_ring,
                          "haadf_share": data.haadf_share, "haadf_frames": data.haadf_frames,
                          "sem_share": data.sem_share, "haadf_min_ecd": data.haadf_min_ecd,
                          "haadf_overlays": data.haadf_overlays, "support_p": data.support_p,
                          "granular_share": data.granular_share,
                          "low_dose_p": data.low_dose_p, "grains_p": data.grains_p,
                          "stem_masks": None if data.stem_masks is None else str(data.stem_masks),
                          "excluded_tuning_images": len(exclude),
                          "stem_holdout": args.stem_holdout,
                          **{k: round(v, 4) for k, v in summary.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / variant.file
    verify = export_onnx(model, onnx_path)
    print(f"exported {onnx_path}: ORT vs torch max |diff| {verify['max_abs_diff']:.2e}", flush=True)
    total = time.perf_counter() - t0
    training = {
        "command": " ".join(["python -m nanoscout.training.train",
                             *(sys.argv[1:] if argv is None else argv)]),
        "variant": args.variant,
        "args": {k: str(v) for k, v in vars(args).items()},
        "wall_seconds": round(total, 1),
        "onnx_max_abs_diff_vs_torch": verify["max_abs_diff"],
        "phases": phases,
    }
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "width": args.width, "arch": args.arch,
                "training": training},
               args.checkpoint)
    card_path = write_card(onnx_path, training=training, width=args.width,
                           eval_n=args.eval_n, eval_seed=args.eval_seed,
                           real=not args.no_real_eval, timing=not args.no_timing,
                           variant=args.variant)
    print(json.dumps(json.loads(card_path.read_text())["metrics"], indent=1), flush=True)


if __name__ == "__main__":
    main()
