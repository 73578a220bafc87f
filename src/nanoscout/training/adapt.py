"""Adapt the detector to a new specimen from a few annotated frames, on the CPU, in minutes.

``nanoscout models adapt IMAGES... --labels LABELS... --out DIR`` (:func:`adapt`):

1. The base detector (the shipped ``detector.onnx`` or ``--base``) is rebuilt as a trainable
   :class:`~nanoscout.training.unet.ParticleUNet` from its ONNX weights
   (:mod:`nanoscout.training.onnx_weights`) and checked against ONNX Runtime (max |diff| <=
   1e-3) before anything is trained.
2. The annotations are read (:mod:`nanoscout.training.annotations`); boxes and bare points take
   the base model's own outlines where one fits.
3. Hold-out folds: with one image, the image is split in two halves along its long side and the
   second half is held out; with 2-3 images, leave one image out; with more, 3 folds by image
   (round robin). A fold model is fine-tuned on the rest for its share of the time, then the
   base model (as shipped) and the fold model are scored on the held-out part at IoU >= 0.5
   (box IoU for YOLO boxes, mask IoU otherwise; :func:`nanoscout.training.evaluate.score_image`).
   The working scale (the card's automatic per-frame scale aiming at 24 px particles, or at
   16 or 32 px; see :func:`_candidates` for why never a fixed one) and the score cut are chosen
   on those held-out parts (highest pooled F1). The base network competes in that choice on
   the same parts, with its own card's scale and cut as one more candidate: one annotated
   frame can teach the wrong thing (the held-out half says so), and an operator should then
   get the base network, with the scale and cut that fit the specimen, rather than a worse one.
   Ties go to the base network (:func:`_choose`). With ``choice`` "paired" (``--choice
   paired``) only candidates that beat the base card as it is by more than the count noise of
   the difference compete (:func:`beats_by_more_than_noise`); on 13 tuning cases it scored as
   "best" (mean F1 0.738 against 0.739, ``benchmarks/results/adapt_choice_rules.json``), which
   stays the default.
   A fine-tuned network's working scale is measured by the base network (the card's
   ``base_network``, :class:`~nanoscout.analysis.modelcard.BaseNetwork`), in this choice as
   in the card written: fine-tuned on one frame, a network's own coarse passes took support
   and noise for particles on the tuning cases at other magnifications. Where the base network
   finds fewer than half of the annotated particles its measurement is no guide, and there
   each fine-tuned candidate measures itself instead (:data:`SELF_MEASURED`). Each
   fine-tuned candidate measured by the base network also competes with the base network's
   particles merged into its own by score (:data:`MERGED`, card ``base_network.merge``; twice
   the engine time; it wins ties): the base keeps what the fine-tuned network forgot
   (``benchmarks/adapt_base_network.py``).
   The base network measures particle sizes for the base network's own candidates too, with its
   own card (so that the choice is made as the adapted model will run).
   The choice holds where it was made: the base network measures the annotated frames'
   particle sizes, and frames it measures more than a factor :data:`SIZE_BAND` outside them
   are analysed by the base network alone with its own card's scale and cut (card
   ``base_network.particle_px``; ``det.base_network_only``).
   Settings chosen on one 640 px STEM frame of 8 px particles cost the held-out Pd
   material's 2048 px frames of 25-75 px particles most of their recall. A self-measuring
   fine-tuned network keeps its base network beside it for that alone
   (``base_network.measures`` false). A merged model also hands the base network the frames
   where its fine-tuned network alone finds more than :data:`COUNT_MARGIN` times the largest
   ratio of its particles to the base network's on the annotated frames (card
   ``base_network.max_count_ratio``): one fine-tuned on one frame of the STEM tuning material
   broke down on a frame of another support, thousands of particles where the base found 109.
4. If a fine-tuned candidate won, the first fold's model is fine-tuned further on everything
   until the time is up, exported
   (``DIR/detector.onnx``, checked against torch) with its model card (``DIR/detector.json``)
   and the base network beside it (``DIR/base_network.onnx`` + its card): the base card with
   the chosen scale and score cut, and ``training.adaptation`` /
   ``evaluation.adaptation_holdout`` holding the base model and its sha256, the annotated files and
   their sha256, the time taken and the held-out before/after scores. If the base network won,
   ``DIR/detector.onnx`` is a copy of the base model's file, and the card names the choice
   (``training.adaptation.network``: "base"); with a scale or cut other than its card's, the
   base network lies beside it too, for the frames outside the size band.

Training crops (256 px) are cut at a random working scale (median annotated ECD 6-48 px), with
random gamma, contrast, blur, noise and a little inversion, flips and 90-degree rotations
(:func:`nanoscout.training.crops.crop_at_scale`, :func:`~nanoscout.training.crops.photometric`).
BatchNorms stay in eval mode (their folded statistics), and the loss is the training loss
(:func:`nanoscout.training.train.loss_fn`). Guard against forgetting (``guard``): ``mix``
replaces a quarter of the crops by synthetic specimens of the original training generator
(:class:`nanoscout.training.train.Pool`, phase-1 mix), ``freeze`` trains the decoder and head
only, ``head`` only the last decoder level (``up1``) and the output layer, ``none`` neither.
The default is ``freeze`` (:data:`DEFAULT_GUARD`, which says why).
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from nanoscout.analysis.detector import Detector
from nanoscout.analysis.modelcard import (
    COUNT_FLOOR,
    SHIPPED_STEM_MODEL,
    BaseNetwork,
    ModelCard,
    sha256_file,
    shipped_model_dir,
)
from nanoscout.analysis.multiscale import merge_by_score
from nanoscout.analysis.preprocess import check_frame, normalize
from nanoscout.daemon.frame_tiff import read_frame_header
from nanoscout.engines import create_engine
from nanoscout.training.annotations import Annotation, read_annotation, read_image
from nanoscout.training.crops import RealImage, crop_at_scale, photometric
from nanoscout.training.evaluate import score_image, summarize
from nanoscout.training.export import INPUT_NAME, OUTPUT_NAME, export_onnx
from nanoscout.training.onnx_weights import unet_from_onnx
from nanoscout.training.train import Pool, loss_fn, targets_and_weights
from nanoscout.training.unet import ParticleUNet
from nanoscout.wire.errors import ConfigError

__all__ = ["DEFAULT_GUARD", "GUARDS", "OUTPUT_FILES", "AdaptResult", "Part", "adapt",
           "check_out"]

Guard = Literal["mix", "freeze", "head", "none"]
GUARDS: tuple[str, ...] = ("mix", "freeze", "head", "none")
#: chosen by benchmarks/adapt.py on the tuning sets (STEM Pt, two EMPS tuning papers; 2 min
#: each): freeze 0.306, mix 0.300. ``head`` then won the same rule (results/adapt_head.json:
#: 0.440 vs freeze 0.422, and forgot less) but did worse than freeze on the three scored
#: measures in the same conditions (results/adapt_freeze.json: Pd 0.381 vs 0.429, NFFA 0.692
#: vs 0.713, median gain over 14 EMPS papers -0.041 vs -0.003; its mean over those papers was
#: higher, 0.754 vs 0.703, with fewer collapses), so the default stayed freeze and ``head``
#: is an option
DEFAULT_GUARD: Guard = "freeze"
CROP = 256
BATCH = 4
LR = 1e-3
SYNTHETIC_FRACTION = 0.25
TRAIN_DIAMETERS_PX = (6.0, 48.0)
#: crops of small particles may be enlarged this much (the shipped training allows 3)
MAX_UPSAMPLE = 5.0
SCALE_TARGETS_PX = (16.0, 24.0, 32.0)
SCORE_CUTS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
#: the coarse pass of the automatic working scale on the adapted card, px (the shipped cards'
#: 256 found the STEM tuning material's 19-40 px particles on 2048 px frames too coarse:
#: F1 0.39 there; 512: 0.52; 768 and 1024 blew up on some frames; benchmarks/adapt.py notes;
#: measured when a fine-tuned network still measured particle sizes itself). Where the base
#: network measures them, with its own card's passes (every candidate but the self-measuring
#: fine-tuned ones), this does not apply
COARSE_SIDE_PX = 512
#: an adapted card's own settings apply to frames whose particles the base network measures
#: within this factor of the sizes it measured on the annotated frames (BaseNetwork.particle_px;
#: a round factor of two, not tuned: one magnification step either side)
SIZE_BAND = 2.0
#: a merged adapted model's frames where its network alone finds more than this many times
#: the largest ratio, on the annotated frames, of its particles to the base network's are
#: analysed by the base network alone (card ``base_network.max_count_ratio``; a round factor
#: of two, not tuned: the check is there for networks that break down, as one fine-tuned on
#: one frame of the STEM tuning material did on a frame of another support)
COUNT_MARGIN = 2.0
#: share of the training time spent on the hold-out folds
FOLD_SHARE = 0.55
#: seconds kept back at the end for the export and the card
RESERVE_S = 12.0

Progress = Callable[[float, str], None]
#: the two networks a candidate can run: the fine-tuned fold model, or the base as given.
#: Measured with benchmarks/adapt.py (results/adapt_base_competes.json against
#: results/adapt_freeze.json, where the base did not compete): tuning cases 0.398 vs 0.422
#: (Pt 0.353 vs 0.386 with the fine-tuned network chosen both times, i.e. run-to-run noise;
#: cej 0.840 vs 0.879, where the base won the held-out half); scored: Pd 0.425 vs 0.430, NFFA
#: 0.692 vs 0.713 (fine-tuned both times), EMPS median gain 0.000 vs -0.003, mean F1 after
#: 0.814 vs 0.703, papers made worse 4 vs 7 (the collapses 1.0 -> 0.05 and 1.0 -> 0.29 are
#: gone). Kept as the default: a selection that includes the model one already has never
#: hands back one that lost on the held-out annotations. ``--fine-tuned-only`` turns it off.
FINE_TUNED, BASE = "fine-tuned", "base"
#: the fine-tuned network with the base network's particles merged in by score (card
#: ``base_network.merge``): the base keeps what the fine-tuned network forgot, at twice the
#: engine time (benchmarks/adapt_base_network.py, tuning cases)
MERGED = "fine-tuned+base"
#: the fine-tuned network measuring particle sizes for its working scale itself, the
#: fine-tuned candidates' form where the base network finds fewer than half of the annotated
#: particles on the held-out parts (the general detector on HAADF-STEM Pt): the base's
#: measurement is then no guide, even where it happens to fit the held-out half.
#: Elsewhere the held-out parts, at the annotated frames' magnification, cannot tell: there a
#: network fine-tuned on them measures well, and at other magnifications it failed
#: (benchmarks/adapt_base_network.py: chosen on the held-out half in 4 of 9 tuning cases,
#: never better on the other images)
SELF_MEASURED = "fine-tuned-alone"
#: a candidate: (network, working-scale label, score cut)
Key = tuple[str, str, float]
#: how the held-out parts choose among the candidates (:func:`_choose`)
CHOICE_RULES = ("best", "paired")


@dataclass(frozen=True)
class Part:
    """An annotated image (or part of one): raw image, instance labels, boxes (box truth)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray | None


@dataclass
class AdaptResult:
    """What :func:`adapt` did: output paths, choices, scores and times (s)."""

    onnx: Path
    card: Path
    seconds: float
    guard: str
    scale: float | str
    min_score: float
    before: dict[str, Any]
    after: dict[str, Any]
    protocol: str
    steps: int
    #: FINE_TUNED, SELF_MEASURED (measuring its own scale), MERGED (with the base network's
    #: particles), or BASE where the base network won on the held-out parts
    network: str = FINE_TUNED
    #: the base network, written beside the model (:data:`BASE_FILE`), that measures particle
    #: sizes for its working scale and may detect too; None: the model stands alone
    base_network: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _median_ecd(labels: np.ndarray) -> float:
    _, areas = np.unique(labels[labels > 0], return_counts=True)
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else 0.0


def _split_half(p: Part) -> tuple[Part, Part]:
    """Return (first, second) halves of ``p`` along its long side (boxes kept by centre)."""
    h, w = p.image.shape
    horiz = w >= h
    cut = (w if horiz else h) // 2

    def take(lo: int, hi: int, suffix: str) -> Part:
        sl = (slice(None), slice(lo, hi)) if horiz else (slice(lo, hi), slice(None))
        boxes = None
        if p.boxes is not None:
            b = p.boxes.copy()
            ax = (0, 2) if horiz else (1, 3)
            c = (b[:, ax[0]] + b[:, ax[1]]) / 2
            b = b[(c >= lo) & (c < hi)]
            b[:, ax[0]] = np.clip(b[:, ax[0]] - lo, 0, hi - lo)
            b[:, ax[1]] = np.clip(b[:, ax[1]] - lo, 0, hi - lo)
            boxes = b
        return Part(p.name + suffix, p.image[sl], p.labels[sl], boxes)

    return take(0, cut, "[first half]"), take(cut, w if horiz else h, "[second half]")


def _folds(parts: list[Part]) -> tuple[list[tuple[list[Part], list[Part]]], str]:
    """Return [(train parts, held-out parts)] and the protocol in words."""
    if len(parts) == 1:
        a, b = _split_half(parts[0])
        return [([a], [b])], ("one image: trained on its first half, scored on its second half "
                              "(split along the long side)")
    k = min(len(parts), 3)
    groups = [parts[i::k] for i in range(k)]
    folds = [([p for j, g in enumerate(groups) if j != i for p in g], groups[i])
             for i in range(k)]
    what = ("leave-one-image-out" if k == len(parts)
            else f"{k}-fold by image (round robin), as leave-one-out over {len(parts)} images "
                 "would not fit the time")
    return folds, what + "; fold models trained for a share of the time"


class _Sampler:
    """Augmented training crops from annotated parts, optionally mixed with synthetic ones."""

    def __init__(self, parts: list[Part], rng: np.random.Generator, synthetic: float) -> None:
        d_all = [d for d in (_median_ecd(p.labels) for p in parts) if d > 0]
        fallback = float(np.median(d_all)) if d_all else 12.0
        self.items = [RealImage("adapt", p.name, normalize(p.image), p.labels,
                                _median_ecd(p.labels) or fallback) for p in parts]
        n = np.array([max(1, len(np.unique(i.labels)) - 1) for i in self.items], np.float64)
        self.p = np.sqrt(n) / np.sqrt(n).sum()
        self.rng = rng
        self.synthetic = synthetic
        self.pool = Pool(3, rng) if synthetic > 0 else None
        self.calls = 0

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        self.calls += 1
        if self.pool is not None and self.calls % 10 == 0:
            self.pool.refresh()
        for _ in range(n):
            if self.pool is not None and self.rng.random() < self.synthetic:
                stack = self.pool._synthetic()
            else:
                item = self.items[int(self.rng.choice(len(self.items), p=self.p))]
                img, lab, valid = crop_at_scale(item, self.rng, CROP, TRAIN_DIAMETERS_PX,
                                                 MAX_UPSAMPLE)
                x = photometric(img, self.rng, invert_p=0.1)
                fg, core, wt = targets_and_weights(lab)
                stack = np.stack([x, fg, core, wt, valid])
            k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            stack = np.rot90(stack, k, axes=(1, 2))
            if flip:
                stack = stack[:, :, ::-1]
            xs.append(stack[:1].copy())
            ys.append(stack[1:].copy())
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _set_trainable(model: ParticleUNet, guard: str) -> list[nn.Parameter]:
    encoder = (model.stem, model.enc2, model.enc3, model.enc4)
    frozen = {"freeze": encoder, "head": (*encoder, model.up3, model.up2)}.get(guard, ())
    for p in model.parameters():
        p.requires_grad_(True)
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _finetune(model: ParticleUNet, parts: list[Part], seconds: float, guard: str, seed: int,
              lr: float, tick: Callable[[float], None] | None = None,
              steps: int | None = None) -> tuple[int, float]:
    """Fine-tune ``model`` in place for ``seconds`` of wall time, or for ``steps`` optimisation
    steps where given (then the time is no limit); returns (steps, last loss)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sampler = _Sampler(parts, rng, SYNTHETIC_FRACTION if guard == "mix" else 0.0)
    params = _set_trainable(model, guard)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # keep the folded statistics: batches of 4 crops would not estimate them
    t0 = time.perf_counter()
    done, loss_v = 0, math.nan

    def progress() -> float:
        if steps is not None:
            return done / max(steps, 1)
        return (time.perf_counter() - t0) / max(seconds, 1e-6)

    while True:
        frac = progress()
        if frac >= 1.0:
            break
        for g in opt.param_groups:  # warm up over 5 % of the run, then cosine to zero
            g["lr"] = lr * min(1.0, (frac + 0.01) / 0.05) * 0.5 * (1.0 + math.cos(math.pi * frac))
        x, y = sampler.batch(BATCH)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        loss_v = float(loss.item())
        if tick is not None:
            tick(min(1.0, progress()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return done, loss_v


def _export(model: ParticleUNet, path: Path) -> dict[str, float]:
    """:func:`nanoscout.training.export.export_onnx`, without torch's deprecation notices
    about the TorchScript exporter (the one the shipped models were exported with)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return export_onnx(model, path)


def _keep_above(labels: np.ndarray, scores: np.ndarray, cut: float) -> np.ndarray:
    if cut <= 0:
        return labels
    lut = (scores >= cut).astype(np.int32) * np.arange(scores.size, dtype=np.int32)
    lut[0] = 0
    return lut[labels]


def _score(labels: np.ndarray, part: Part) -> dict[str, Any]:
    if part.boxes is not None:
        return score_image(labels, true_boxes=part.boxes)
    return score_image(labels, true_labels=part.labels)


def _card_for(base: ModelCard, onnx: Path, scale: str | None = None,
              min_score: float | None = None) -> ModelCard:
    """Return ``base`` pointing at ``onnx`` (its sha256), with the given working-scale
    candidate and score cut."""
    upd: dict[str, Any] = {"onnx_file": onnx.name, "sha256": sha256_file(onnx)}
    ws, th = base.working_scale, base.thresholds
    assert ws is not None and th is not None
    if scale is not None:
        upd["working_scale"] = _auto_for(ws, scale)
    # the adapted card's cut was chosen without the base card's rescue: it keeps none
    upd["thresholds"] = th.with_cut(min_score)
    return base.model_copy(update=upd)


def _candidate_card(base: ModelCard, onnx: Path, label: str, cut: float | None = None
                    ) -> ModelCard:
    """Return the card of candidate ``onnx`` with working-scale ``label`` (and score ``cut``)
    as the held-out parts score it: ``base``'s, on raw scores, with no base network of its
    own (who measures is given to its Detector, and nothing merges unasked)."""
    raw = base.model_copy(update={"score_calibration": None})
    return _card_for(raw, onnx, None if label == "card" else label, cut).model_copy(
        update={"base_network": None})


def _candidates() -> list[str]:
    """Working-scale candidates: the base card's automatic scale, and automatic scales aiming
    at other working diameters (px). A fixed scale is not offered: it won on the held-out half
    of the one image it was chosen on and failed on the tuning material's other
    magnifications (benchmarks/adapt.py, STEM Pt)."""
    return ["auto"] + [f"auto-{t:g}" for t in SCALE_TARGETS_PX if t != 24.0]


def _auto_for(ws: Any, label: str) -> Any:
    """Return the working-scale section of candidate ``label`` (from the card's ``ws``)."""
    a = ws.auto.model_copy(update={"coarse_side_px": COARSE_SIDE_PX})
    if label == "auto":
        return ws.model_copy(update={"mode": "auto", "auto": a})
    t = float(label.split("-", 1)[1])
    f = t / a.target_diameter_px
    auto = a.model_copy(update={"target_diameter_px": t, "keep_min_px": a.keep_min_px * f,
                                "keep_max_px": a.keep_max_px * f,
                                "reliable_diameter_px": a.reliable_diameter_px * f})
    return ws.model_copy(update={"mode": "auto", "auto": auto})


def _grid_scores(onnx: Path, base: ModelCard, held: list[Part], threads: int,
                 network: str, source: Detector | None, merge: bool = False,
                 measure_self: bool = False) -> dict[Key, list[dict[str, Any]]]:
    """Score the detector ``onnx`` on ``held`` for every (scale candidate, score cut): raw
    per-image scores under keys (``network``, scale label, cut). The base network is also
    scored with the base card's own working scale ("card") and cut. ``source``: the base
    network's detector (raw scores, its own card's scale and cut), which measures the particle
    size for the automatic scale (None: ``onnx`` itself). A fine-tuned ``onnx`` is scored
    measured by ``source`` (keys under ``network``), or with ``measure_self`` by itself
    instead (:data:`SELF_MEASURED`); measured by ``source`` and with ``merge``, also with the
    base network's particles merged into its own (:data:`MERGED`)."""
    engine = create_engine(onnx, "onnxruntime-cpu", threads=threads)
    labels = _candidates() if network == FINE_TUNED else ["card", *_candidates()]
    th = base.thresholds
    assert th is not None
    cuts = SCORE_CUTS if network == FINE_TUNED else tuple(sorted({*SCORE_CUTS, th.min_score}))
    out: dict[Key, list[dict[str, Any]]] = {}
    # the candidates' name and the detector that measures particle sizes for their scale: a
    # fine-tuned network is measured by the base network, or by itself where the base cannot
    # be trusted to measure (``measure_self``), never both
    name, measurer = network, source
    if measure_self and network == FINE_TUNED and source is not None:
        name, measurer = SELF_MEASURED, None
    merged = name == FINE_TUNED and merge and source is not None
    others = [source.detect(p.image) for p in held] if merged else []  # type: ignore[union-attr]
    overlap = base.working_scale.multiscale_overlap  # type: ignore[union-attr]
    try:
        for label in labels:
            det = Detector(engine, _candidate_card(base, onnx, label), min_score=0.0,
                           base_detector=measurer)
            for i, part in enumerate(held):
                found = det.detect(part.image)
                for cut in cuts:
                    mine = _keep_above(found.labels, found.scores, cut)
                    out.setdefault((name, label, cut), []).append(_score(mine, part))
                    if merged:
                        both, _ = merge_by_score(
                            [(mine, found.scores), (others[i].labels, others[i].scores)],
                            overlap)
                        out.setdefault((MERGED, label, cut), []).append(_score(both, part))
    finally:
        engine.close()
    return out


def _choose(grid: dict[Key, list[dict[str, Any]]], card_cut: float, rule: str = "best"
            ) -> tuple[Key, dict[str, Any]]:
    """Return the chosen candidate and its summary (``rule``, :data:`CHOICE_RULES`).

    "best": the highest pooled held-out F1. Ties go to the base network (the fine-tuned one
    must earn its place), then to the fine-tuned one with the base network's particles merged
    in (a tie says the base found nothing more on the held-out parts, not that it will find
    nothing on other frames, where the fine-tuned network forgets:
    benchmarks/adapt_base_network.py), then to one measured by the base network, then to the
    base card as it is (its scale and its cut ``card_cut``), then to the automatic scale the
    card ships with, then to the higher cut.
    "paired": the same, among the candidates that beat the base card as it is by more than
    the count noise of the difference (:func:`beats_by_more_than_noise`), or the base card as
    it is where none does."""
    scored = [(k, summarize(v)) for k, v in grid.items()]

    def rank(kv: tuple[Key, dict[str, Any]]) -> tuple[Any, ...]:
        (network, label, cut), s = kv
        return (s["f1"], network == BASE, network == MERGED, network != SELF_MEASURED,
                label == "card" and cut == card_cut, label in ("card", "auto"), cut)

    if rule == "best":
        return max(scored, key=rank)
    if rule != "paired":
        raise ConfigError(f"choice rule {rule!r} is not one of {', '.join(CHOICE_RULES)}")
    as_shipped = [kv for kv in scored if kv[0] == (BASE, "card", card_cut)]
    if not as_shipped:  # the base network did not compete: the best fine-tuned candidate
        return max(scored, key=rank)
    card = as_shipped[0][1]
    return max([as_shipped[0], *(kv for kv in scored if beats_by_more_than_noise(kv[1], card))],
               key=rank)


def beats_by_more_than_noise(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether pooled counts ``new`` (tp, fp) beat ``old`` on the same particles by more than
    their noise: the net gain (true particles gained minus false ones gained) exceeds the
    standard deviation sqrt(|Δtp| + |Δfp|) those changes would have if each changed particle
    were a coin toss. One particle more found on a held-out half frame is no evidence."""
    d_tp, d_fp = int(new["tp"]) - int(old["tp"]), int(new["fp"]) - int(old["fp"])
    return d_tp - d_fp > math.sqrt(abs(d_tp) + abs(d_fp))


def _verify_base(model: ParticleUNet, base_onnx: Path, image: np.ndarray, threads: int,
                 tmp: Path) -> dict[str, float]:
    """Check the rebuilt base on a crop of ``image`` against the base ONNX model: torch, and
    the rebuild exported again to ONNX (both in ONNX Runtime). Returns both max |diff|;
    raises RuntimeError above 1e-3."""
    x = normalize(image)[:256, :256]
    h, w = (max(16, (s // 16) * 16) for s in x.shape)
    xs = np.zeros((1, 1, h, w), np.float32)
    crop = x[:h, :w]
    xs[0, 0, :crop.shape[0], :crop.shape[1]] = crop
    rebuilt = tmp / "base_rebuilt.onnx"
    _export(model, rebuilt)
    out: dict[str, float] = {}
    engine = create_engine(base_onnx, "onnxruntime-cpu", threads=threads)
    again = create_engine(rebuilt, "onnxruntime-cpu", threads=threads)
    try:
        ref = engine.infer({INPUT_NAME: xs})[OUTPUT_NAME]
        out["reexported_onnx"] = float(np.max(np.abs(again.infer({INPUT_NAME: xs})[OUTPUT_NAME]
                                                     - ref)))
    finally:
        engine.close()
        again.close()
    with torch.no_grad():
        out["torch"] = float(np.max(np.abs(model(torch.from_numpy(xs)).numpy() - ref)))
    for what, diff in out.items():
        if diff > 1e-3:
            raise RuntimeError(f"the rebuild of {base_onnx} ({what}) differs from the base "
                               f"model by {diff:.3g} (> 1e-3)")
    return out


#: the file name of an adapted model's base network (its card beside it, ``.json``)
BASE_FILE = "base_network.onnx"


def _write_base(base_onnx: Path, base_card: ModelCard, out: Path) -> BaseNetwork:
    """Copy the base network ``base_onnx`` (and its card ``base_card``, naming the copy) into
    ``out`` as :data:`BASE_FILE`; returns what the adapted card pins (no merge)."""
    onnx = out / BASE_FILE
    card = base_card.model_copy(update={"onnx_file": onnx.name})
    shutil.copyfile(base_onnx, onnx)
    card.dump(onnx.with_suffix(".json"))
    ModelCard.load(onnx.with_suffix(".json"))  # its sha256 checked against the copy
    return BaseNetwork(onnx_file=onnx.name, sha256=card.sha256)


def _size_band(source: Detector, parts: list[Part]) -> tuple[list[float | None],
                                                           tuple[float, float] | None]:
    """Return (the median particle diameter, frame px, that the base network ``source``
    measures on each annotated image, and the band of sizes the adapted settings apply to:
    the smallest / :data:`SIZE_BAND` to the largest * :data:`SIZE_BAND`, or None where it
    measured no particle on one of them)."""
    sizes = [source.particle_size(normalize(check_frame(p.image))) for p in parts]
    found = [d for d in sizes if d is not None]
    sizes = [None if d is None else round(float(d), 2) for d in sizes]
    if not found or len(found) < len(sizes):
        return sizes, None
    return sizes, (round(min(found) / SIZE_BAND, 2), round(max(found) * SIZE_BAND, 2))


def _count_ratio(onnx: Path, base: ModelCard, scale: str, cut: float, source: Detector,
                 parts: list[Part], threads: int) -> float:
    """Return the card's ``base_network.max_count_ratio`` for a merged adapted model:
    :data:`COUNT_MARGIN` times the largest ratio, over the annotated frames, of the particles
    the adapted network alone finds (its working scale measured by the base network, its score
    cut) to those the base network ``source`` finds with its own card (counted as at least
    :data:`~nanoscout.analysis.modelcard.COUNT_FLOOR`)."""
    engine = create_engine(onnx, "onnxruntime-cpu", threads=threads)
    try:
        det = Detector(engine, _candidate_card(base, onnx, scale, cut), base_detector=source)
        ratios = [det.detect(p.image).n / max(source.detect(p.image).n, COUNT_FLOOR)
                  for p in parts]
    finally:
        engine.close()
    return round(COUNT_MARGIN * max(ratios), 2)


def _fold_tick(say: Progress, start: float, share: float, note: str) -> Callable[[float], None]:
    """Return a callback that reports a fold's progress ``x`` (0..1) as start + share * x."""
    return lambda x: say(start + share * x, note)


def _entry(path: Path) -> dict[str, str]:
    return {"path": str(path), "sha256": sha256_file(path)}


def default_base(images: list[Path]) -> Path:
    """The shipped detector to adapt when none is named: the STEM detector when every image is
    a frame the daemon saved from a STEM stream (its TIFF header's modality; the detector the
    daemon analysed them with), else the general detector."""
    stem = shipped_model_dir() / SHIPPED_STEM_MODEL
    headers = [read_frame_header(p) if p.suffix.lower() in (".tif", ".tiff") else None
               for p in images]
    if images and stem.is_file() and all(h is not None and h.modality == "STEM"
                                         for h in headers):
        return stem
    return shipped_model_dir() / "detector.onnx"


#: the files an adaptation writes into its output folder (or, for the base network's, removes
#: where the adapted model stands alone)
OUTPUT_FILES = ("detector.onnx", "detector.json", BASE_FILE,
                Path(BASE_FILE).with_suffix(".json").name)


def check_out(out: Path, *, overwrite: bool = False) -> None:
    """Raise ConfigError when ``out`` cannot take an adapted model: it is a file, or (without
    ``overwrite``) it holds one of the :data:`OUTPUT_FILES` already. Reads only."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a folder for detector.onnx + "
                          "detector.json")
    taken = [name for name in OUTPUT_FILES if (out / name).exists()]
    if taken and not overwrite:
        raise ConfigError(f"--out {out} holds {', '.join(taken)} already: choose a new folder "
                          "(--overwrite replaces them)")


def _check_not_base(out: Path, bases: list[Path]) -> None:
    """Raise ConfigError when ``out`` is the folder of one of the ``bases`` (ONNX files, their
    cards beside them): the adapted model and its base network would replace them."""
    there = out.resolve()
    for onnx in bases:
        if onnx.resolve().parent == there:
            raise ConfigError(f"--out {out} holds the base model {onnx.name} (and its card): "
                              "choose another folder, the adapted model would replace them")


def adapt(images: list[Path], labels: list[Path], out: Path, *, base: Path | None = None,
          minutes: float = 4.0, guard: str = DEFAULT_GUARD, seed: int = 0, threads: int = 1,
          progress: Progress | None = None, command: str = "",
          base_competes: bool = True, steps: int | None = None,
          choice: str = "best", overwrite: bool = False) -> AdaptResult:
    """Fine-tune the base detector on annotated ``images`` (``labels`` paired in order) and
    write ``out/detector.onnx`` + ``out/detector.json``; returns what was done.

    ``minutes``: wall-time budget of the whole run (reading to card); ``guard``: "mix",
    "freeze", "head" or "none" (module docstring); ``threads``: torch and ONNX Runtime threads;
    ``base_competes``: the base network is a candidate of the held-out choice (module docstring;
    False: the output is always the fine-tuned network); ``steps``: a fixed number of
    optimisation steps instead of the time budget (:data:`FOLD_SHARE` of them for the folds,
    the rest for the final fit), so that the same inputs and seed give the same network on
    any machine, however busy; ``minutes`` is then no limit. ``choice``: how the held-out
    parts choose among the candidates (:data:`CHOICE_RULES`, :func:`_choose`).
    ``overwrite``: replace an adapted model already in ``out`` (:data:`OUTPUT_FILES`); never
    the base model's own folder.
    Raises ConfigError for unpaired or empty inputs, an ``out`` that is a file, holds the base
    model (or its base network) or, without ``overwrite``, an adapted model (all before
    anything is trained or written), ReaderError for unreadable or malformed files (naming
    file and line), ModelCardError for a bad base model.
    """
    t0 = time.perf_counter()
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} label files: give one label "
                          "file per image, in the same order")
    if not images:
        raise ConfigError("no images to adapt on")
    if guard not in GUARDS:
        raise ConfigError(f"guard {guard!r} is not one of {', '.join(GUARDS)}")
    if not minutes > 0:
        raise ConfigError(f"minutes {minutes} must be > 0")
    if choice not in CHOICE_RULES:
        raise ConfigError(f"choice {choice!r} is not one of {', '.join(CHOICE_RULES)}")
    if steps is not None and steps < 10:
        raise ConfigError(f"steps {steps} must be >= 10 (a share of them trains each fold)")
    out = Path(out)
    check_out(out, overwrite=overwrite)
    say = progress or (lambda frac, note: None)
    torch.set_num_threads(threads)
    base_onnx = Path(base) if base is not None else default_base(images)
    base_card = ModelCard.load(base_onnx.with_suffix(".json"))
    # the base network of a fine-tuned one: it measures particle sizes for the working scale
    # (and may detect too); the base itself, or the base network its card names
    root = base_card.load_base_network(base_onnx.with_suffix(".json"))
    root_onnx, root_card = root if root is not None else (base_onnx, base_card)
    # the adapted model and the copy of its base network would replace the base's own files
    _check_not_base(out, [base_onnx, root_onnx])
    source = Detector(create_engine(root_onnx, "onnxruntime-cpu", threads=threads),
                      root_card.model_copy(update={"score_calibration": None}))
    try:
        return _adapt(images, labels, out, base_onnx, base_card, (root_onnx, root_card), source,
                      t0=t0, minutes=minutes, guard=guard, seed=seed, threads=threads, say=say,
                      command=command, base_competes=base_competes, steps=steps,
                      choice=choice)
    finally:
        source.close()


def _adapt(images: list[Path], labels: list[Path], out: Path, base_onnx: Path,
           base_card: ModelCard, root: tuple[Path, ModelCard], source: Detector, *,
           t0: float, minutes: float, guard: str, seed: int, threads: int, say: Progress,
           command: str, base_competes: bool, steps: int | None, choice: str) -> AdaptResult:
    """:func:`adapt` once its arguments are checked and the base network's detector
    ``source`` (of ``root``: its ONNX file and card) is loaded."""
    deadline = t0 + minutes * 60.0
    # a base card that names a base network of its own needs it too
    base_source = source if base_card.base_network is not None else None
    base_engine = create_engine(base_onnx, "onnxruntime-cpu", threads=threads)
    base_det = Detector(base_engine, base_card, base_detector=base_source)
    say(0.0, "reading annotations")
    parts: list[Part] = []
    anns: list[Annotation] = []
    for img_path, lab_path in zip(images, labels, strict=True):
        img = read_image(img_path)
        ann = read_annotation(lab_path, img.shape, img,  # type: ignore[arg-type]
                              predict=lambda a: base_det.detect(a).labels)
        anns.append(ann)
        parts.append(Part(Path(img_path).name, img, ann.labels, ann.boxes))
    if not any(a.n for a in anns):
        raise ConfigError("the label files hold no particles")
    model = unet_from_onnx(base_onnx)
    with tempfile.TemporaryDirectory() as tmpd:
        diff = _verify_base(model, base_onnx, parts[0].image, threads, Path(tmpd))
    folds, protocol = _folds(parts)
    # before: the base model as shipped on the held-out parts
    before_raw = [_score(base_det.detect(p.image).labels, p) for _, held in folds for p in held]
    before = summarize(before_raw)
    base_engine.close()
    # a base that finds fewer than half of the annotated particles cannot be trusted to
    # measure their size for the working scale: then the fine-tuned network measures them
    # itself
    blind = before["recall"] < 0.5
    # the base network competes with the fine-tuned one on the same held-out parts
    grid = (_grid_scores(base_onnx, base_card, [p for _, held in folds for p in held], threads,
                         BASE, source) if base_competes else {})
    train_s = max(5.0, deadline - time.perf_counter() - RESERVE_S)
    # the selection costs roughly a detection per candidate and held-out image: keep time for it
    fold_s = FOLD_SHARE * train_s / len(folds)
    fold_steps = None if steps is None else max(1, round(FOLD_SHARE * steps / len(folds)))
    first: ParticleUNet | None = None
    n_steps = 0
    with tempfile.TemporaryDirectory() as tmpd:
        fold_onnx = Path(tmpd) / "fold.onnx"
        for f, (train_parts, held) in enumerate(folds):
            m = copy.deepcopy(model)
            base_frac = FOLD_SHARE * f / len(folds)
            n, _ = _finetune(m, train_parts, fold_s, guard, seed + f, LR,
                             _fold_tick(say, base_frac, FOLD_SHARE / len(folds),
                                        f"fold {f + 1}/{len(folds)}"), fold_steps)
            n_steps += n
            say(FOLD_SHARE * (f + 1) / len(folds), f"scoring fold {f + 1}")
            _export(m, fold_onnx)
            for key, rows in _grid_scores(fold_onnx, base_card, held, threads, FINE_TUNED,
                                          source, base_competes, blind).items():
                grid.setdefault(key, []).extend(rows)
            if first is None:
                first = m
    d_all = float(np.median([_median_ecd(p.labels) for p in parts
                             if _median_ecd(p.labels) > 0] or [0.0]))
    assert base_card.thresholds is not None
    (network, scale, cut), best = _choose(grid, base_card.thresholds.min_score, choice)
    assert first is not None
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "detector.onnx"
    last_loss = math.nan
    if network != BASE:
        final_s = max(1.0, deadline - time.perf_counter() - RESERVE_S)
        final_steps = None if steps is None else max(1, steps - n_steps)
        n, last_loss = _finetune(first, parts, final_s, guard, seed + 100, LR / 2,
                                 lambda x: say(FOLD_SHARE + (1 - FOLD_SHARE) * x,
                                               "all annotations"), final_steps)
        n_steps += n
        say(1.0, "exporting")
        verify: dict[str, float] | None = _export(first, onnx_path)
    else:  # fine-tuning lost on the held-out parts: the base network, its scale and cut chosen
        say(1.0, "the base network scored higher on the held-out parts: keeping it")
        shutil.copyfile(base_onnx, onnx_path)
        verify = None
    # where the choice was made: frames of other particle sizes go to the base network alone
    # (BaseNetwork.particle_px); a base card kept as it is needs no base network beside it
    as_shipped = network == BASE and scale == "card" \
        and cut == base_card.thresholds.min_score
    with_base = network != SELF_MEASURED and not (as_shipped and base_source is None)
    measured, band = ([], None) if as_shipped else _size_band(source, parts)
    if as_shipped and base_card.base_network is not None:
        band = base_card.base_network.particle_px
    # a network that measures particle sizes itself keeps the base network beside it for the
    # frames outside the band only, where there is one
    with_base = with_base or band is not None
    # a merged network that breaks down on a frame hands it to the base network
    ratio = (_count_ratio(onnx_path, base_card, scale, cut, source, parts, threads)
             if network == MERGED else None)
    seconds = round(time.perf_counter() - t0, 1)
    adaptation = {
        "base_model": {"name": base_card.name, "version": base_card.version,
                       **_entry(base_onnx)},
        "annotated_files": [{"image": _entry(Path(i)), "labels": _entry(Path(lab)),
                             "format": a.kind, "n_particles": a.n,
                             "outlines_from_base_model": a.from_model}
                            for i, lab, a in zip(images, labels, anns, strict=True)],
        "seconds": seconds, "minutes_budget": minutes, "guard": guard, "steps": n_steps,
        "steps_budget": steps,
        "last_loss": round(last_loss, 4), "threads": threads, "seed": seed,
        "base_rebuild_max_abs_diff": diff,
        "onnx_max_abs_diff_vs_torch": None if verify is None else verify["max_abs_diff"],
        "median_annotated_ecd_px": round(d_all, 2), "network": network,
        "particle_px_measured": measured, "particle_px": band, "max_count_ratio": ratio,
        "base_competes": base_competes, "choice": choice,
        "working_scale": scale, "min_score": cut,
    }
    holdout = {
        "data": ("the annotated frames themselves, held out by fold: " + protocol
                 + "; the working scale and score cut were chosen on the same held-out parts, "
                   "so 'after' is optimistic by that choice; the base network competed with "
                   "the fine-tuned one in that choice"),
        "command": command, "iou_threshold": 0.5,
        "truth": "box IoU (YOLO boxes)" if any(a.boxes is not None for a in anns) else "mask IoU",
        "before": before, "after": best,
        "choice": {"network": network, "scale": scale, "min_score": cut,
                   "f1_by_candidate": {f"{k[0]}:{k[1]}@{k[2]:g}": summarize(v)["f1"]
                                       for k, v in sorted(grid.items())}},
    }
    card = _card_for(base_card, onnx_path, None if scale == "card" else scale, cut)
    base_file: Path | None = out / BASE_FILE
    if with_base:
        # the base network measures particle sizes for the working scale, as when chosen,
        # its particles join where the merge won (or where the base card merged them), and
        # it analyses the frames outside the sizes the choice was made on
        inherited = network == BASE and base_card.base_network is not None \
            and base_card.base_network.merge
        pinned = _write_base(*root, out).model_copy(
            update={"merge": network == MERGED or inherited, "particle_px": band,
                    "measures": network != SELF_MEASURED, "max_count_ratio": ratio})
        card = card.model_copy(update={"base_network": pinned})
    else:  # none: a base network left by an earlier run into the same folder goes
        card = card.model_copy(update={"base_network": None})
        for old in (BASE_FILE, Path(BASE_FILE).with_suffix(".json").name):
            (out / old).unlink(missing_ok=True)
        base_file = None
    training = card.training.model_copy(update={
        "data": (f"fine-tuned from {base_card.name} {base_card.version} on {len(images)} "
                 f"annotated frame(s) (training.adaptation), guard against forgetting: {guard}"
                 + ({FINE_TUNED: "",
                     SELF_MEASURED: ("; the fine-tuned network measures particle sizes for "
                                     "its working scale itself (the base network found fewer "
                                     "than half of the annotated particles)"),
                     MERGED: ("; the base network's particles are merged with the fine-tuned "
                              "network's by score (base_network.merge), which scored higher "
                              "on the held-out parts than either alone")}.get(
                     network, "; the fine-tuned network scored lower on the held-out parts "
                              "than the base network, so this is the base network with a "
                              "working scale and score cut chosen on the annotations"))
                 + ". "
                 "Base model training: " + base_card.training.data),
        "command": command, "wall_seconds": seconds, "adaptation": adaptation})
    drop: dict[str, Any] = {}
    if "score_calibration" in type(card).model_fields:  # the base's score -> probability map
        drop["score_calibration"] = None  # was fitted to the base model's scores, not these
    card = card.model_copy(update={
        **drop,
        "name": base_card.name + "-adapted", "version": base_card.version + "+adapted",
        "training": training, "metrics": None,
        "evaluation": {"adaptation_holdout": holdout},
        "timings_ms": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "notes": (base_card.notes + " Adapted with nanoscout models adapt; the base model's "
                  "held-out metrics do not apply to it and are not copied."),
    })
    card_path = card.dump(onnx_path.with_suffix(".json"))
    ModelCard.load(card_path)  # validates the card and its sha256
    return AdaptResult(onnx_path, card_path, seconds, guard, scale, cut, before, best, protocol,
                       n_steps, network, base_file, {"adaptation": adaptation})
