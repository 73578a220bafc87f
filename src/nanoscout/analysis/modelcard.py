"""The model card: what an ONNX file expects, what it returns and how well it did.

A model is an ONNX file plus a JSON card next to it (``detector.onnx`` + ``detector.json``).
The daemon reads only the card and the ONNX file, never Python training code. :meth:`ModelCard.load`
validates the card and (by default) checks the ONNX file's sha256, raising
:class:`~nanoscout.wire.errors.ModelCardError` with the field or file at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nanoscout.wire.errors import ModelCardError

__all__ = [
    "AutoScale",
    "BaseNetwork",
    "Denoise",
    "HeldOutMetrics",
    "InputSpec",
    "ModelCard",
    "NoveltyReference",
    "Normalization",
    "OutputSpec",
    "Rescue",
    "ScoreCalibration",
    "Quantization",
    "Thresholds",
    "TrainingInfo",
    "WorkingScale",
    "quantized_sibling",
    "repository_root",
    "sha256_file",
    "shipped_model_dir",
]

#: the shipped detector for STEM frames (in :func:`shipped_model_dir`), used when present
SHIPPED_STEM_MODEL = "detector_stem.onnx"


def repository_root() -> Path | None:
    """The source checkout this package runs from (``<repo>/src/nanoscout``), or None when it
    was installed from a wheel."""
    repo = Path(__file__).resolve().parents[3]
    return repo if (repo / "pyproject.toml").is_file() and (repo / "models").is_dir() else None


def shipped_model_dir() -> Path:
    """Folder of the shipped weights and model cards.

    ``$NANOSCOUT_WEIGHTS`` if set; else ``models/weights`` of the source checkout; else the
    copy a wheel installs under ``<prefix>/share/nanoscout/weights``.
    """
    env = os.environ.get("NANOSCOUT_WEIGHTS")
    if env:
        return Path(env)
    repo = repository_root()
    if repo is not None:
        return repo / "models" / "weights"
    installed = Path(sys.prefix) / "share" / "nanoscout" / "weights"
    if installed.is_dir():
        return installed
    raise ModelCardError(
        "no shipped weights found: not a source checkout and nothing under "
        f"{installed}; set NANOSCOUT_WEIGHTS to the folder of detector.onnx + detector.json"
    )

SCHEMA_VERSION = 1
#: an INT8 sibling is used by default only when at least this much faster than FP32
MIN_SPEEDUP = 1.1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """The single image input: (1, channels, H, W), H and W multiples of ``stride_multiple``."""

    name: str
    channels: int = Field(1, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    stride_multiple: int = Field(16, ge=1)
    #: fixed (H, W) the frame is resampled to (area average) before inference; None: the
    #: model takes any H, W that are multiples of ``stride_multiple`` (detection)
    size: tuple[Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)]] | None = None
    #: working px of the frame's own mirror image added on every side before the network
    #: analyses the frame, cut from its output (the overlap-tile strategy of the U-Net paper):
    #: a particle cut by the frame's edge is seen whole, with its mirror image, instead of
    #: against the network's zero padding; the working-scale estimation passes go without it;
    #: a multiple of ``stride_multiple``; 0: none (cards before 2026-12-06)
    edge_context_px: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _edge_context(self) -> InputSpec:
        if self.edge_context_px % self.stride_multiple:
            raise ValueError(f"edge_context_px {self.edge_context_px} must be a multiple of "
                             f"stride_multiple {self.stride_multiple}")
        return self


class Denoise(_Strict):
    """Smoothing of low-dose frames before the network (:mod:`nanoscout.analysis.denoise`).

    A frame whose white noise (:func:`~nanoscout.analysis.denoise.noise_sigma`, a fraction of
    the normalised frame's range) exceeds ``target`` is smoothed by the Gaussian that brings
    it down to about ``target`` (:func:`~nanoscout.analysis.denoise.smoothing_px`), at most
    ``max_px`` frame px wide; other frames are analysed as they are.
    """

    target: float = Field(gt=0, lt=1)
    max_px: float = Field(2.0, gt=0, le=8)


class Normalization(_Strict):
    """Per-frame robust scaling: percentile lo -> 0, hi -> 1, then clipped; then, with
    ``denoise``, smoothing of a frame whose noise is high (None: never)."""

    method: Literal["percentile"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    clip: tuple[float, float] = (-0.5, 1.5)
    subsample: int = Field(4, ge=1)
    polarity: str = "as acquired (trained on dark-on-bright and bright-on-dark)"
    denoise: Denoise | None = None


class OutputSpec(_Strict):
    """One output tensor; ``channels`` names its channels in order."""

    name: str
    channels: tuple[str, ...]
    activation: Literal["logits", "probability", "none"] = "logits"
    resolution: str = "input"
    meaning: str = ""


class AutoScale(_Strict):
    """How the detector picks each frame's working scale (``nanoscout.analysis.detector``).

    A coarse pass runs the network on the frame shrunk to ``coarse_side_px`` (longest side),
    then on finer versions until the detected particles' median ECD is at least
    ``reliable_diameter_px``. A frame whose median particle is ``keep_min_px`` to
    ``keep_max_px`` across is left as it is; others are resampled so that median becomes
    ``target_diameter_px``, within [``min_resample``, ``max_resample``].

    ``consistency`` (a ratio > 1; None: the passes above, as before issue 17) chooses the scale
    by self-consistency instead: passes at factors s, 2s, 4s, ... (s from ``coarse_side_px``,
    up to ``max_resample``); the first pass whose area-weighted median ECD d (of its detections
    of at least ``min_pass_ecd_px`` and ``min_score``) lies within ``consistent_px``, that
    counts at least ``consistent_min_count`` of them, and whose particle size in frame px
    (d / s) agrees within that ratio with the next finer pass's sets the frame's particle size.
    Real particles keep their size in frame px when the scale doubles; support grain, noise and
    texture responses keep their size in working px (so theirs halves), and a whole support
    lump is seen only by a few coarse passes, as a few particles. When no pass agrees with its
    neighbour, the passes above decide (``fallback = "coarse"``), or, with ``fallback =
    "finest"``, the finest of the consistency search's passes that counts at least
    ``consistent_min_count`` confident particles sets it (a coarse pass over a thick, lumpy
    support sees the lumps as particles and would otherwise decide; when no pass counts that
    many, the passes above decide), or, with ``fallback = "median"``, the median particle size
    in frame px (d / s) over all of the consistency search's passes whose d lies within
    ``consistent_px`` and that count at least ``consistent_min_count`` confident particles
    (each such pass is one measurement, and a pass that follows lumps, grain or noise is one
    outlier among them; when no pass qualifies, the passes above decide), or, with ``fallback
    = "nearest"``, the neighbouring pair of the consistency search's passes (the coarser one
    qualifying as there) whose sizes in frame px are closest, if within ``nearest_ratio``
    (the coarser pass sets it; otherwise the passes above decide).
    ``min_pass_ecd_px`` applies to them too. With
    ``recentre``, a finer pass whose window (centred where the coarse pass found the most
    foreground) holds no confident particle looks again at the frame's centre and counts
    that pass if it found any: on a thick support the most foreground can be a lump.
    ``weight_cap_rank`` = k: in a pass's area-weighted median, a confident detection wider
    than ``weight_cap_ratio`` x the pass's k-th largest weighs as one of that width, so that
    fewer than k outsized objects (a support grain, a thick region, a large agglomerate taken
    for one particle) cannot hold the median pixel; None: no cap (the shipped cards). With
    ``weight_cap_mode = "consistent"`` the consistency search asks the capped medians first and
    the uncapped ones only when no two capped passes agree (a grain is a real object and keeps
    its size from pass to pass too; texture and noise responses do not); ``"always"``: every
    median is capped. Measured and not shipped (``benchmarks/results/scale_grains.json``): a
    cap cannot tell a grain from a frame's few real particles beside many small detections
    (EMPS figure crops of 4-8 large particles lost their scale to it), and on the STEM
    detector's training frames the caps that mended frames with support grains also moved
    frames without them. ``window_centre``: where the finer passes' windows centre,
    ``"foreground"`` (where the first pass found the most foreground: every shipped card) or
    ``"particles"`` (where it found the most confident detections, each one unit whatever its
    area, so that a support grain weighs as one particle). Measured and not shipped
    (``benchmarks/results/scale_window_centre.json``): on the STEM detector's training frames
    it mended frames with support grains and thick supports but moved 4096 px frames, pooled
    +0.005 against the +0.01 asked; on the EMPS tuning papers it lost 0.02.
    """

    target_diameter_px: float = Field(24.0, gt=0)
    keep_min_px: float = Field(12.0, gt=0)
    keep_max_px: float = Field(40.0, gt=0)
    reliable_diameter_px: float = Field(10.0, gt=0)
    coarse_side_px: int = Field(192, ge=32)
    min_resample: float = Field(0.02, gt=0)
    max_resample: float = Field(3.0, gt=0)
    min_score: float = Field(0.5, ge=0, lt=1)
    consistency: float | None = Field(None, gt=1)
    consistent_px: tuple[float, float] = (8.0, 64.0)
    consistent_min_count: int = Field(1, ge=1)
    min_pass_ecd_px: float = Field(0.0, ge=0)
    fallback: Literal["coarse", "finest", "median", "nearest"] = "coarse"
    nearest_ratio: float = Field(1.5, gt=1)
    recentre: bool = False
    weight_cap_rank: int | None = Field(None, ge=1)
    weight_cap_ratio: float = Field(1.0, ge=1.0)
    weight_cap_mode: Literal["always", "consistent"] = "always"
    window_centre: Literal["foreground", "particles"] = "foreground"

    @model_validator(mode="after")
    def _range(self) -> AutoScale:
        lo, hi = self.consistent_px
        if not 0 < lo < hi:
            raise ValueError(f"consistent_px {self.consistent_px} must be 0 < low < high")
        return self

    def measures(self, d: float, n: int) -> bool:
        """Whether an estimation pass whose median ECD is ``d`` (px at the pass) over ``n``
        confident detections counts as a measurement of the particle size: ``d`` within
        ``consistent_px`` and ``n`` at least ``consistent_min_count``."""
        lo, hi = self.consistent_px
        return lo <= d <= hi and n >= self.consistent_min_count

    def factor(self, diameter_px: float) -> float:
        """Return the resample factor for a frame whose median particle is ``diameter_px``
        across (frame px): 1 within the keep range, else the factor that makes it
        ``target_diameter_px``, within [``min_resample``, ``max_resample``]."""
        if self.keep_min_px <= diameter_px <= self.keep_max_px:
            return 1.0
        return float(np.clip(self.target_diameter_px / diameter_px, self.min_resample,
                             self.max_resample))


#: the base network's particle count below which :meth:`BaseNetwork.broke_down` counts this
#: many: a frame where it finds a handful leaves the adapted network room to find what it
#: was taught to (a round number, not tuned)
COUNT_FLOOR = 10


class BaseNetwork(_Strict):
    """An adapted model's base network (``nanoscout models adapt``), beside its card: it
    measures each frame's particle size for the automatic working scale and, with ``merge``,
    its particles join the adapted network's.

    Fine-tuned on a few annotated frames, a network still outlines particles like the ones it
    was shown, but its coarse estimation passes (particles a few px across, other
    magnifications) are no longer what the base network learnt from thousands of frames: it
    took support and noise for particles on tuning cases
    (``benchmarks/adapt_base_network.py``).
    So the base network, with its own card, gives the median particle diameter in frame px,
    and this card's ``auto`` turns that into the factor (its own target diameter).
    ``merge``: the base network also detects on each frame (with its own card's scale and score
    cut) and the two networks' particles compete by raw score, each particle kept once by its
    most confident outline (``nanoscout.analysis.multiscale``, this card's
    ``multiscale_overlap``): the base keeps what it found where the fine-tuned network forgot
    it. Twice the engine time. ``onnx_file``: a file name in the card's folder, its card beside
    it (same stem, ``.json``), pinned by ``sha256``.

    ``particle_px``: (smallest, largest) median particle diameter, frame px, that the base
    network may measure on a frame for this card's network, scale and cut to apply: the
    sizes it measured on the annotated frames, widened by a factor of two each way
    (``nanoscout models adapt``). A frame measured outside is analysed by the base network
    alone, with its own card's scale and score cut, on raw scores
    (:attr:`~nanoscout.analysis.detector.Detection.outside_range`); one where it finds no
    particle is not (the base network would find none there either). Settings chosen on
    frames of one magnification did not carry over to others (adapting on one 640 px STEM
    frame of 8 px particles and scoring 2048 px frames of 25-75 px ones,
    ``benchmarks/results/adapt_base_network_cases.json``). None: they apply to every frame.
    ``measures``: False where the adapted network measures particle sizes for its working
    scale itself (the base network found fewer than half of the annotated particles); the
    base network then only measures for ``particle_px`` and analyses the frames outside it.
    ``max_count_ratio`` (with ``merge``, where the base network detects on every frame): a
    frame where the adapted network alone finds more than this many times the particles the
    base network finds there (counted as at least :data:`COUNT_FLOOR`) is analysed by the base
    network alone, as a frame outside ``particle_px``: the adapted network broke down there.
    ``nanoscout models adapt`` writes twice the largest such ratio on the annotated frames.
    An adapted model fine-tuned on one STEM frame reported 9843 particles on a frame of another
    support where the base network found 109 (``benchmarks/results/adapt_base_network_cases.json``,
    tuning case Pt). None: no such check.
    """

    onnx_file: str = Field(pattern=r"^[^/\\]+\.onnx$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    merge: bool = False
    particle_px: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = None
    measures: bool = True
    max_count_ratio: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BaseNetwork:
        if self.particle_px is not None and self.particle_px[0] > self.particle_px[1]:
            raise ValueError(f"particle_px {self.particle_px} must be (smallest, largest)")
        if not self.measures and (self.merge or self.particle_px is None):
            raise ValueError("a base network that does not measure is there for the frames "
                             "outside particle_px only: it needs particle_px and no merge")
        if self.max_count_ratio is not None and not self.merge:
            raise ValueError("max_count_ratio compares with the base network's particles on "
                             "each frame: it needs merge")
        return self

    def broke_down(self, n_adapted: int, n_base: int) -> bool:
        """Whether the adapted network's ``n_adapted`` particles on a frame are more than
        ``max_count_ratio`` times the base network's ``n_base`` there (at least
        :data:`COUNT_FLOOR`): then the base network analyses the frame alone."""
        return self.max_count_ratio is not None \
            and n_adapted > self.max_count_ratio * max(n_base, COUNT_FLOOR)

    def covers(self, diameter_px: float | None) -> bool:
        """Whether a frame whose particles the base network measured at ``diameter_px``
        (frame px; None: it found none, and would find none alone) is one this card's own
        settings apply to."""
        if self.particle_px is None or diameter_px is None:
            return True
        lo, hi = self.particle_px
        return lo <= diameter_px <= hi


class WorkingScale(_Strict):
    """Particle sizes (ECD, px at working scale) the model was trained for.

    ``mode = "auto"``: the detector estimates a resample factor per frame (``auto``);
    ``"fixed"``: it resamples every frame by ``default_resample``.
    """

    diameter_px_min: float = Field(gt=0)
    diameter_px_max: float = Field(gt=0)
    default_resample: float = Field(1.0, gt=0)
    mode: Literal["fixed", "auto"] = "fixed"
    auto: AutoScale = AutoScale()
    #: multiples of the chosen working scale at which each frame is analysed too, instances of
    #: all scales merged by score (``nanoscout.analysis.multiscale``); () = the chosen scale only.
    #: Engine time grows by the sum of their squares (0.71 and 1.41: x3.5)
    multiscale: tuple[float, ...] = ()
    #: the largest resample factor of an extra scale (a factor above it is capped to it; a
    #: finer scale capped to or below the chosen one is skipped). 1.0: an extra pass never upsamples
    #: beyond the frame's own pixels, so a frame analysed at its full resolution or finer gets
    #: no extra pass, and a downsampled one gets its detail back. None: the resample range's.
    multiscale_max_factor: float | None = Field(None, gt=0)
    #: the largest fraction of an instance's pixels that more confident instances (of any
    #: scale) may already hold for it to be kept
    multiscale_overlap: float = Field(0.2, ge=0, lt=1)
    note: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> WorkingScale:
        if any(not 0.1 <= r <= 10.0 for r in self.multiscale):
            raise ValueError(f"multiscale factors {self.multiscale} must be within [0.1, 10]")
        if self.diameter_px_min >= self.diameter_px_max:
            raise ValueError(
                f"diameter_px_min {self.diameter_px_min} must be < diameter_px_max "
                f"{self.diameter_px_max}"
            )
        return self


class Rescue(_Strict):
    """Keep a particle the network is less sure of when it looks like the frame's sure ones
    (:func:`nanoscout.analysis.instances.rescue_by_population`).

    A specimen is a population: a faint particle of the same size as the many clear ones
    around it is most likely one more of them, while a blob of another size is not. A particle
    whose raw score lies in [``min_score``, the card's cut) is kept when the frame (the whole
    frame, at one working scale) has at least ``min_sure`` particles at or above the cut and
    its equivalent circular diameter lies within a factor ``ecd_ratio`` of their median ECD.
    It applies with the card's own cut only: an operator's ``score_cut`` or
    ``min_confidence`` is exactly that cut.
    """

    #: the lowest raw score a rescued particle may have (0..1, below the card's cut)
    min_score: float = Field(gt=0, lt=1)
    #: how far (a factor, > 1) a rescued particle's ECD may lie from the sure ones' median
    ecd_ratio: float = Field(gt=1)
    #: sure particles (at or above the cut) a frame needs for any rescue
    min_sure: int = Field(5, ge=1)


class Thresholds(_Strict):
    """Post-processing parameters (nanoscout.analysis.instances)."""

    foreground: float = Field(0.5, gt=0, lt=1)
    core: float = Field(0.5, gt=0, lt=1)
    min_area_px: int = Field(4, ge=0)
    min_core_px: int = Field(1, ge=1)
    post_stride: int = Field(2, ge=1, le=4)
    #: merge neighbours whose contact exceeds this x the smaller's ECD (None: never merge)
    merge_contact: float | None = Field(1.6, gt=0)
    #: merge neighbours whose union's solidity is at least this x their own (fragments of
    #: one convex particle whose core broke up, e.g. 0.97; None: never)
    merge_convex: float | None = Field(None, gt=0, le=1)
    #: drop particles whose score (confidence, 0..1) is below this
    min_score: float = Field(0.0, ge=0, lt=1)
    #: keep some particles below ``min_score`` that look like the frame's sure ones (None: no)
    rescue: Rescue | None = None

    def with_cut(self, min_score: float | None = None) -> Thresholds:
        """Return these thresholds with an operator's cut (None: the card's own): exactly that
        cut, without ``rescue``, which belongs to the cut it was chosen with."""
        update: dict[str, Any] = {"rescue": None}
        if min_score is not None:
            update["min_score"] = float(min_score)
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _rescue_below_cut(self) -> Thresholds:
        if self.rescue is not None and self.rescue.min_score >= self.min_score:
            raise ValueError(f"rescue.min_score {self.rescue.min_score} must be below the cut "
                             f"min_score {self.min_score}")
        return self


class ScoreCalibration(_Strict):
    """Maps a particle's raw score (``nanoscout.analysis.instances``: mean foreground probability over
    its interior) to the probability that it is a real particle, by linear interpolation
    between knots (``scores`` increasing, ``probabilities`` non-decreasing, both in [0, 1]),
    fitted on tuning data named in ``data`` (isotonic regression,
    ``nanoscout.training.score_calibration``)."""

    scores: tuple[float, ...] = Field(min_length=2)
    probabilities: tuple[float, ...] = Field(min_length=2)
    data: str = ""

    @model_validator(mode="after")
    def _monotone(self) -> ScoreCalibration:
        s, p = self.scores, self.probabilities
        if len(s) != len(p):
            raise ValueError(f"score_calibration has {len(s)} scores but {len(p)} probabilities")
        if any(b <= a for a, b in zip(s, s[1:], strict=False)):
            raise ValueError(f"score_calibration scores {s} must increase")
        if any(b < a for a, b in zip(p, p[1:], strict=False)):
            raise ValueError(f"score_calibration probabilities {p} must not decrease")
        if min(s + p) < 0 or max(s + p) > 1:
            raise ValueError("score_calibration scores and probabilities must lie in [0, 1]")
        return self

    def probability(self, raw: float) -> float:
        """The calibrated probability (0..1) of a particle whose raw score is ``raw``."""
        return float(np.interp(raw, self.scores, self.probabilities))

    def raw_cut(self, confidence: float) -> float:
        """The lowest raw score whose calibrated probability is at least ``confidence``.

        The calibration is continuous and non-decreasing (linear between its knots), so the
        raw scores it maps to ``confidence`` or more form the interval [cut, 1]: a raw score
        cut at ``cut`` keeps exactly the particles that are real with probability
        ``>= confidence`` (within float rounding). Found on the first knot segment that
        reaches ``confidence``, by inverting its line; a flat segment gives its left knot.
        Raises ValueError for a ``confidence`` outside (0, 1) or above the highest probability
        of the calibration (no particle could reach it).
        """
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence {confidence} must be within (0, 1)")
        s, p = self.scores, self.probabilities
        if confidence > p[-1]:
            raise ValueError(f"confidence {confidence} is above the calibration's highest "
                             f"probability {p[-1]} (no particle could reach it)")
        if confidence <= p[0]:
            return 0.0  # below its first knot the calibration holds p[0]: every score reaches it
        i = next(k for k in range(1, len(p)) if p[k] >= confidence)
        # p[i - 1] < confidence <= p[i]: a rising segment, inverted linearly
        f = (confidence - p[i - 1]) / (p[i] - p[i - 1])
        return float(s[i - 1] + f * (s[i] - s[i - 1]))


class TrainingInfo(_Strict):
    """How the model was trained: the data, the command and its wall time (s)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str
    command: str
    wall_seconds: float | None = None
    seeds: str = ""


class HeldOutMetrics(_Strict):
    """Detection quality on held-out data: precision, recall, F1 (0..1) and ECD errors."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str
    command: str
    n_frames: int = Field(ge=0)
    iou_threshold: float = 0.5
    precision: float = Field(ge=0, le=1)
    recall: float = Field(ge=0, le=1)
    f1: float = Field(ge=0, le=1)
    median_abs_ecd_error_pct: float | None = None
    ecd_mae_nm: float | None = None
    #: the same model on held-out real data: set name -> {data, command, metrics...}
    real: dict[str, dict[str, Any]] = Field(default_factory=dict)


class NoveltyReference(_Strict):
    """How an autoencoder's per-frame error becomes a novelty score (``task="autoencoder"``).

    ``novelty = error / reference_error``: 1.0 is the ``reference_quantile`` of the errors of
    ``n_frames`` usual frames the model was calibrated on (``data``), so novelty > 1 means more
    unusual than that fraction of usual frames. ``error_output`` names the ONNX output holding
    the per-frame error: a distance from usual frames that the model defines (its output's
    ``meaning`` says which: a pixel reconstruction error, or a distance of feature statistics).
    """

    error_output: str = "error"
    reference_error: float = Field(gt=0)
    reference_quantile: float = Field(0.99, gt=0, lt=1)
    quantiles: dict[str, float] = Field(default_factory=dict)
    n_frames: int = Field(ge=1)
    data: str


class Quantization(_Strict):
    """How a quantized sibling of a model (``detector.int8.onnx`` + ``detector.int8.json``, its
    card otherwise a copy of the FP32 one) was made, and what it costs in accuracy.

    ``source_sha256``: the FP32 ONNX file it was made from (a sibling whose source no longer
    matches is stale and never chosen automatically). ``parity``: per held-out set, the metric
    of the FP32 and the quantized model (``{"metric", "fp32", "int8", "loss"}``);
    ``passed``: every loss is at most ``max_loss``. ``engine_ms``: the median time of one
    engine call, FP32 and INT8, measured when it was made (``{"fp32", "int8", "input"}``) and
    ``speedup`` = FP32 / INT8 time. The daemon's ``precision = "auto"`` uses the sibling when it
    passed and pays (``speedup`` at least :data:`MIN_SPEEDUP`; ``nanoscout models quantize``).
    ``fp32_scale``: the FP32 model measures each frame's working scale (its estimation
    passes) and the sibling analyses the frame at it, the parity measured so: the 8-bit passes
    can agree on a texture where the FP32 ones do not (one EMPS image: factor 3.0 against
    0.30).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    precision: Literal["int8"] = "int8"
    source_onnx: str
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    method: str
    calibration: str
    command: str
    max_loss: float = Field(0.01, ge=0)
    parity: dict[str, dict[str, Any]] = Field(default_factory=dict)
    passed: bool = False
    engine_ms: dict[str, Any] = Field(default_factory=dict)
    speedup: float | None = None
    fp32_scale: bool = False

    @property
    def default(self) -> bool:
        """Whether ``precision = "auto"`` may use the sibling: accurate enough and faster."""
        return self.passed and self.speedup is not None and self.speedup >= MIN_SPEEDUP


class ModelCard(_Strict):
    """A model card as stored in JSON next to its ONNX file."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    task: Literal["detection-segmentation", "classification", "autoencoder"]
    framework: str
    opset: int = Field(ge=7)
    onnx_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: InputSpec
    normalization: Normalization
    outputs: tuple[OutputSpec, ...] = Field(min_length=1)
    working_scale: WorkingScale | None = None
    thresholds: Thresholds | None = None
    #: raw particle score -> probability of a real particle (None: scores are reported raw)
    score_calibration: ScoreCalibration | None = None
    #: an adapted model's base network, beside it (None: the model stands alone)
    base_network: BaseNetwork | None = None
    classes: tuple[str, ...] | None = None
    training: TrainingInfo
    metrics: HeldOutMetrics | None = None
    #: held-out results of classification / autoencoder models: name -> {data, command, ...}
    evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    novelty: NoveltyReference | None = None
    #: set on a quantized sibling's card only (``nanoscout models quantize``)
    quantization: Quantization | None = None
    timings_ms: dict[str, Any] = Field(default_factory=dict)
    created: str
    notes: str = ""

    @model_validator(mode="after")
    def _task_fields(self) -> ModelCard:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        if self.task == "detection-segmentation":
            if self.working_scale is None or self.thresholds is None:
                raise ValueError("a detection-segmentation card needs working_scale and thresholds")
            if "foreground" not in self.outputs[0].channels:
                raise ValueError(
                    f"outputs[0].channels {self.outputs[0].channels} lacks 'foreground'"
                )
        if self.base_network is not None and self.task != "detection-segmentation":
            raise ValueError("only a detection-segmentation card can name a base_network")
        if self.task == "classification" and not self.classes:
            raise ValueError("a classification card needs classes")
        if self.task == "autoencoder" and self.novelty is None:
            raise ValueError("an autoencoder card needs novelty (its reference error)")
        if self.task in ("classification", "autoencoder") and self.input.size is None:
            raise ValueError(f"a {self.task} card needs input.size (the fixed H, W)")
        return self

    @classmethod
    def load(cls, path: str | Path, *, verify_sha256: bool = True) -> ModelCard:
        """Return the validated card at ``path``; raises ModelCardError naming the problem.

        With ``verify_sha256`` the ONNX file named by the card (relative to the card) must exist
        and hash to ``sha256``.
        """
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelCardError(f"model card not found: {p}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelCardError(f"model card {p} is not readable JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelCardError(
                f"model card {p} must hold a JSON object, got {type(raw).__name__}"
            )
        try:
            card = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or '<card>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ModelCardError(f"model card {p} is invalid: {problems}") from exc
        if verify_sha256:
            onnx = card.onnx_path(p)
            if not onnx.is_file():
                raise ModelCardError(f"model card {p} names onnx_file {card.onnx_file!r}, "
                                     f"which does not exist at {onnx}")
            digest = sha256_file(onnx)
            if digest != card.sha256:
                raise ModelCardError(f"sha256 of {onnx} is {digest}, model card {p} says "
                                     f"{card.sha256}")
        return card

    def onnx_path(self, card_path: str | Path) -> Path:
        """Return the ONNX file's path, resolved relative to the card's folder."""
        return Path(card_path).parent / self.onnx_file

    @property
    def fp32_scale(self) -> bool:
        """Whether this card is a quantized sibling's whose FP32 model measures the working
        scale (:attr:`Quantization.fp32_scale`)."""
        return self.quantization is not None and self.quantization.fp32_scale

    def load_base_network(self, card_path: str | Path) -> tuple[Path, ModelCard] | None:
        """Return (ONNX path, validated card) of this model's base network
        (:class:`BaseNetwork`), or None when it names none. Raises ModelCardError when the
        base network's files are missing, its card is invalid or its sha256 is not the pinned
        one, or it names a base network of its own."""
        base = self.base_network
        if base is None:
            return None
        onnx = Path(card_path).parent / base.onnx_file
        card = ModelCard.load(onnx.with_suffix(".json"))
        if card.onnx_path(onnx.with_suffix(".json")) != onnx:
            raise ModelCardError(f"base network card {onnx.with_suffix('.json')} names "
                                 f"onnx_file {card.onnx_file!r}, not {onnx.name!r}")
        if card.sha256 != base.sha256:
            raise ModelCardError(f"base network {onnx} has sha256 {card.sha256}, model card "
                                 f"{card_path} pins {base.sha256}")
        if card.task != "detection-segmentation" or card.base_network is not None:
            raise ModelCardError(f"base network {onnx} must be a detection model without a "
                                 "base network of its own")
        return onnx, card

    def dump(self, path: str | Path) -> Path:
        """Write the card as indented JSON; returns the path."""
        p = Path(path)
        p.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        return p


def sha256_file(path: str | Path) -> str:
    """Return the lowercase hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_sibling(model: str | Path, precision: str = "int8") -> Path:
    """The quantized sibling of an ONNX file: ``detector.onnx`` -> ``detector.int8.onnx``
    (its card: ``detector.int8.json``; ``nanoscout models quantize`` writes both)."""
    p = Path(model)
    return p.with_name(f"{p.stem}.{precision}{p.suffix or '.onnx'}")
