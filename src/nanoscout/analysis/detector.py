"""The run-time detector: one frame in, particle instance labels out (no torch).

``Detector(engine, card).detect(image)`` normalises the frame (``nanoscout.analysis.preprocess``),
smooths it where its noise is high and the card says so (:mod:`nanoscout.analysis.denoise`), picks the
working scale (fixed, or estimated by coarse-to-fine passes on a thumbnail and a bounded window,
see :meth:`Detector.estimate_scale`; a stream reuses it until its content changes,
:mod:`nanoscout.analysis.autoscale`), resamples the frame to it, pads it to the network stride,
runs the engine (tile by tile, tiles batched, for frames larger than ``tile_px``,
:mod:`nanoscout.analysis.tiling`), brings the foreground/core logits back
to the frame's own pixel grid and turns them into instances (``nanoscout.analysis.instances``). Labels are
always on the original frame's grid. When the frame was resampled, the foreground logits are
resampled to the whole frame (outlines at full resolution) but the core logits only at the
block centres the post-processing reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nanoscout.analysis import denoise
from nanoscout.analysis.autoscale import (
    DEFAULT_TOLERANCE,
    DEFAULT_WINDOW_PX,
    ScaleMemo,
    content_centre,
    hinted_diameter,
    pass_window,
)
from nanoscout.analysis.instances import (
    block_centres,
    instances_from_half_logits,
    instances_from_logits,
    rescue_by_population,
)
from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.multiscale import merge_by_score
from nanoscout.analysis.preprocess import (
    check_frame,
    normalize,
    pad_to_multiple,
    resample,
    resize_bilinear,
)
from nanoscout.analysis.tiling import infer_tiled
from nanoscout.engines.base import Engine
from nanoscout.wire.errors import ConfigError, EngineFailure, ModelCardError

__all__ = ["Detection", "Detector", "base_detector_for", "load_detector", "scale_measurer"]

#: the 45° view is ignored this close to the frame's edges (px at working scale)
_TURN_MARGIN_PX = 32

#: mirror images of test-time augmentation: none, left-right, up-down, both (image axes)
_TTA_AXES: tuple[tuple[int, ...], ...] = ((), (1,), (0,), (0, 1))


@dataclass
class Detection:
    """Instances found in one frame."""

    labels: np.ndarray  # int32 (H, W) on the original frame's grid, 0 = background, 1..n
    #: float32 (n + 1,), scores[k] = confidence of particle k, scores[0] = 0: the probability
    #: that it is a real particle where the card has a ``score_calibration``, else the raw score
    scores: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess, engine, postprocess
    scale: float = 1.0  # working-scale resample factor used (working px per frame px)
    #: True when ``scores`` are calibrated probabilities (the card has a score_calibration)
    calibrated: bool = False
    #: True when the base network alone analysed the frame, with its own card's scale and cut:
    #: the particle size it measured lies outside the sizes an adapted card's settings were
    #: chosen on (``base_network.particle_px``, :meth:`~nanoscout.analysis.modelcard.BaseNetwork.covers`),
    #: or the adapted network found far more particles than it (``base_network.max_count_ratio``,
    #: :meth:`~nanoscout.analysis.modelcard.BaseNetwork.broke_down`)
    outside_range: bool = False
    #: what the operator's particle size range (``detect(particle_px=...)``) did to the
    #: automatic estimate: "agreed" (the estimate lay in it), "applied" (the range replaced it:
    #: :func:`~nanoscout.analysis.autoscale.hinted_diameter`); None: no range, or a fixed or
    #: preset scale (nothing estimated)
    size_hint: str | None = None
    #: the frame's white noise, a fraction of its normalised range
    #: (:func:`~nanoscout.analysis.denoise.noise_sigma`); None: the card does not smooth
    #: low-dose frames (``normalization.denoise``), so it is not measured
    noise: float | None = None
    #: the Gaussian the frame was smoothed by before the network, standard deviation in frame
    #: px (0: not smoothed; :func:`~nanoscout.analysis.denoise.smoothing_px`)
    smoothing_px: float = 0.0
    #: whether two neighbouring working-scale estimation passes agreed on the particles' size
    #: in frame px (True), or none did and the card's fallback chose the scale (False); None:
    #: no particle found, nothing estimated (fixed or preset scale) or a card without the
    #: consistency check (``working_scale.auto.consistency``). A diagnostic of the estimate,
    #: not of the result: passes can agree on specks or grains, and on the held-out sets the
    #: frames whose passes agreed were no more accurate than the others
    #: (``benchmarks/results/scale_agreement.json``)
    scale_agreed: bool | None = None

    @property
    def n(self) -> int:
        """Return the number of particles."""
        return int(self.scores.size - 1)


def _particle_range(value: object) -> tuple[float, float]:
    """Return an operator's particle size range as two floats (lo, hi), px; ConfigError
    unless 0 < lo <= hi, both finite."""
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[attr-defined]
        hinted_diameter(None, (lo, hi))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"particle size range {value!r}: needs 0 < lo <= hi px, both "
                          "finite") from exc
    return lo, hi


_Found = tuple[float | None, float, np.ndarray, bool]


def _hinted(found: _Found, particle_px: tuple[float, float] | None) -> tuple[_Found, str | None]:
    """``found`` (:meth:`Detector._search`: diameter px, factor, logits, wholeness) with its
    diameter put through the operator's range ``particle_px``
    (:func:`~nanoscout.analysis.autoscale.hinted_diameter`), and what the range did (None
    without one)."""
    if particle_px is None:
        return found, None
    size, hint = hinted_diameter(found[0], particle_px)
    return (size, *found[1:]), hint


def _area_weighted_median(ecd: np.ndarray, cap_rank: int | None = None,
                          cap_ratio: float = 1.0) -> float:
    """Return the ECD (px) of the particle holding the median particle pixel (0 if none).

    Weighting by area makes the estimate follow the particles that fill the frame, not a swarm
    of tiny detections on a textured support or on the particles' own surface. ``cap_rank``
    = k: a detection wider than ``cap_ratio`` x the k-th largest weighs as one of that width
    (nothing is capped when there are fewer than k), so fewer than k outsized objects (a
    support grain, a thick region, a large agglomerate taken for one particle) cannot hold the
    median pixel; None: no cap.
    """
    if ecd.size == 0:
        return 0.0
    d = np.sort(ecd)
    w = d * d
    if cap_rank is not None and d.size >= cap_rank:
        w = np.minimum(w, w[d.size - cap_rank] * cap_ratio * cap_ratio)
    c = np.cumsum(w)
    return float(d[np.searchsorted(c, 0.5 * c[-1])])


#: an estimation pass at this fraction of full size or more is run at full size instead
_FULL_PASS = 0.75


class Detector:
    """Runs a detection-segmentation model (ONNX via an Engine) described by its model card."""

    def __init__(self, engine: Engine, card: ModelCard, *,
                 scale: float | Literal["auto"] | None = None, auto_every: int = 1,
                 tile_px: int = 2048, tile_margin_px: int = 96, tta: int = 1,
                 merge_convex: float | None = None, min_score: float | None = None,
                 min_confidence: float | None = None, rotate45: bool = False,
                 scale_presets: tuple[tuple[float, float], ...] = (), tile_batch: int = 1,
                 estimate_window_px: int = DEFAULT_WINDOW_PX,
                 scale_tolerance: float | None = DEFAULT_TOLERANCE,
                 multiscale: bool | None = None, base_detector: Detector | None = None,
                 denoise: bool | None = None) -> None:
        """``scale``: working px per frame px, "auto" (estimated per frame), or None for the
        card's choice. ``auto_every``: with "auto" and a ``key`` passed to :meth:`detect`,
        re-estimate at least every n-th frame of that key, and whenever the frame shape or
        the content changes (a signature distance above ``scale_tolerance``; None: shape
        and age only; :class:`~nanoscout.analysis.autoscale.ScaleMemo`).
        ``estimate_window_px``: a finer estimation pass looks at a window of at most this
        many working px per side, where the first pass found the most foreground
        (:func:`~nanoscout.analysis.autoscale.pass_window`,
        :func:`~nanoscout.analysis.autoscale.content_centre`).
        ``tile_px`` / ``tile_margin_px``: largest side sent to the engine in one call, and
        the context dropped at each tile seam (px at working scale); ``tile_batch``: tiles
        sent in one engine call (bounds its memory). ``tta``: average the
        logits over 1, 2 or 4 mirror images (test-time augmentation; engine time x ``tta``,
        for offline measurement rather than live streams). ``merge_convex``: overrides the
        card's solidity ratio for merging fragments of one convex particle (None: keep it);
        ``min_score`` overrides the card's particle score cut (None: keep it), on the raw
        score, and leaves out the card's ``thresholds.rescue`` (an operator's cut is exactly
        that cut; so does ``min_confidence``).
        ``min_confidence`` (in (0, 1), exclusive with ``min_score``) keeps the
        particles that are real with at least this probability: it needs a card with a
        ``score_calibration`` (ConfigError otherwise: raw scores are not probabilities) and
        becomes the raw cut :meth:`~nanoscout.analysis.modelcard.ScoreCalibration.raw_cut`
        (the inverse of the card's monotone calibration at ``min_confidence``), so that
        every particle reported has a calibrated score >= ``min_confidence``.
        ``rotate45``: also run the engine on the frame turned by 45° and keep the larger of the
        two logits, turned back (a long straight particle lying along an image axis looks like
        a burnt-in scale bar to the shipped model; turned, it does not). About 3x the engine
        time. ``scale_presets``: (pixel size nm, working scale) pairs: a frame whose pixel size
        is within 2 % of a preset's gets that scale, no estimate (known magnifications).
        ``multiscale``: also analyse each frame at the card's ``working_scale.multiscale``
        multiples of its working scale and merge the instances by score
        (:mod:`~nanoscout.analysis.multiscale`); None: as the card says, False: never.
        ``base_detector``: the detector of the card's ``base_network`` (an adapted model's base
        network, :class:`~nanoscout.analysis.modelcard.BaseNetwork`; build both with
        :func:`load_detector`), on raw scores (no calibration): it measures the particle size
        for the automatic scale (this card's ``auto`` turns its measurement into the factor)
        and, when the card says ``merge``, detects on every frame too, its particles merged
        with this network's by score; a frame whose measured size the card's
        ``base_network.particle_px`` does not cover it analyses alone, with its own card's
        scale and cut (:attr:`Detection.outside_range`). A card that names a base network needs
        it unless the scale is fixed and nothing is merged (ConfigError).
        ``denoise``: smooth a frame whose noise is high before anything else, as the card's
        ``normalization.denoise`` says (:mod:`~nanoscout.analysis.denoise`; None: as the card
        says, False: never).
        """
        if card.task != "detection-segmentation" or card.thresholds is None \
                or card.working_scale is None:
            raise ModelCardError(f"model card {card.name!r} has task {card.task!r}, "
                                 "not a detection-segmentation model with thresholds")
        self.engine = engine
        self.card = card
        ws = card.working_scale
        if scale is None:
            scale = "auto" if ws.mode == "auto" else ws.default_resample
        self.auto = scale == "auto"
        base = card.base_network
        #: whether the base network's particles join this network's (card base_network.merge)
        self.merge_base = base is not None and base.merge
        if base is not None and base_detector is None and (self.auto or self.merge_base):
            raise ConfigError(
                f"model card {card.name!r} works with its base network {base.onnx_file}: load "
                "the detector with nanoscout.analysis.detector.load_detector (or give "
                "base_detector)")
        if self.merge_base and base_detector is not None \
                and base_detector.card.score_calibration is not None:
            raise ConfigError("the base detector's particles are merged by raw score: build it "
                              "from a card without score_calibration")
        #: the base network's detector: it measures particle sizes for the automatic scale,
        #: and detects too where the card merges (None: this network does it all)
        self.base_detector = base_detector
        self.scale = 1.0 if scale == "auto" else float(scale)
        if not 0.02 <= self.scale <= 8.0:
            raise ConfigError(f"detector scale {self.scale} must be within [0.02, 8]")
        if auto_every < 1:
            raise ConfigError(f"auto_every {auto_every} must be >= 1")
        if tile_batch < 1 or estimate_window_px < 32:
            raise ConfigError(f"tile_batch {tile_batch} must be >= 1 and estimate_window_px "
                              f"{estimate_window_px} >= 32")
        if scale_tolerance is not None and not scale_tolerance > 0:
            raise ConfigError(f"scale_tolerance {scale_tolerance} must be > 0 or None")
        if tta not in (1, 2, 4):
            raise ConfigError(f"tta {tta} must be 1, 2 or 4")
        self.tta = tta
        self.rotate45 = rotate45
        for p, f in scale_presets:
            if not (p > 0 and 0.02 <= f <= 8.0):
                raise ConfigError(f"scale preset ({p}, {f}) needs a pixel size > 0 nm and a "
                                  "scale within [0.02, 8]")
        self.scale_presets = tuple(scale_presets)
        self.auto_every = auto_every
        self._memo = ScaleMemo(auto_every, scale_tolerance)
        self.tile_batch = tile_batch
        self.estimate_window_px = estimate_window_px
        self._pass_engine_s = 0.0  # engine time of the last estimation pass, s
        #: the confident ECDs (px at the pass) of the last estimation pass
        self._pass_ecd: np.ndarray = np.zeros(0)
        self._agreed: bool | None = None  # whether the last search's passes agreed
        self.input_name = card.input.name
        out = card.outputs[0]
        self.output_name = out.name
        try:
            self._fg = out.channels.index("foreground")
            self._core = out.channels.index("core")
        except ValueError as exc:
            raise ModelCardError(f"outputs[0].channels {out.channels} must name 'foreground' "
                                 "and 'core'") from exc
        names = [t.name for t in getattr(engine, "inputs", ())]
        if names and self.input_name not in names:
            raise ModelCardError(f"model card input {self.input_name!r} is not an engine input "
                                 f"({names})")
        self.stride = card.input.stride_multiple
        #: working px of mirror image around each network input (card input.edge_context_px)
        self.edge_context_px = card.input.edge_context_px
        self.thresholds = card.thresholds
        if merge_convex is not None:
            self.thresholds = self.thresholds.model_copy(update={"merge_convex": merge_convex})
        cal = card.score_calibration
        #: the confidence cut asked for (None: the cut is on the raw score)
        self.min_confidence = min_confidence
        if min_confidence is not None:
            if min_score is not None:
                raise ConfigError(f"min_score {min_score} and min_confidence {min_confidence} "
                                  "are two particle cuts: give one")
            if cal is None:
                raise ConfigError(
                    f"min_confidence {min_confidence}: model card {card.name!r} has no "
                    "score_calibration, so its scores are not probabilities (calibrate it: "
                    "nanoscout models calibrate; or cut on the raw score: min_score)")
            try:
                min_score = cal.raw_cut(min_confidence)
            except ValueError as exc:
                raise ConfigError(f"min_confidence of model card {card.name!r}: {exc}") from exc
        if min_score is not None:
            if not 0.0 <= min_score < 1.0:
                raise ConfigError(f"min_score {min_score} must be within [0, 1)")
            self.thresholds = self.thresholds.with_cut(min_score)
        if tile_px % self.stride or tile_px <= 2 * tile_margin_px or tile_margin_px < 0:
            raise ConfigError(f"tile_px {tile_px} must be a multiple of the network stride "
                              f"{self.stride} and more than twice tile_margin_px "
                              f"{tile_margin_px}")
        self.tile_px = tile_px
        self.tile_margin_px = tile_margin_px
        #: True when the reported scores are probabilities (the card has a score_calibration)
        self.calibrated = cal is not None
        self.multiscale = ws.multiscale if multiscale is not False else ()
        #: how low-dose frames are smoothed (None: never)
        self.denoise = card.normalization.denoise if denoise is not False else None
        # the factors an extra scale may take: the resample range, capped by the card
        self._multiscale_range = (ws.auto.min_resample, ws.auto.max_resample
                                  if ws.multiscale_max_factor is None
                                  else min(ws.auto.max_resample, ws.multiscale_max_factor))
        self.multiscale_overlap = ws.multiscale_overlap
        self._calibration = (None if cal is None else
                             (np.asarray(cal.scores, np.float32),
                              np.asarray(cal.probabilities, np.float32)))

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        """Return the (b, C, h, w) logits of a (b, h, w) stack of tiles (one engine call), or
        (b, C, h / 2, w / 2) from a model that leaves its last 2x up-sampling to the host
        (:mod:`~nanoscout.analysis.half_logits`; the CPU's INT8 siblings)."""
        b, h, w = tiles.shape
        out = self.engine.infer({self.input_name: tiles[:, None]}).get(self.output_name)
        grids = [(h, w)] + ([(h // 2, w // 2)] if h % 2 == 0 and w % 2 == 0 else [])
        if out is None or out.ndim != 4 or out.shape[0] != b or out.shape[2:] not in grids:
            got = None if out is None else out.shape
            raise EngineFailure(f"engine output {self.output_name!r} has shape {got}, "
                                f"expected ({b}, C, {h}, {w})")
        return out

    @staticmethod
    def _full(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Return (1, C, H, W) logits on the ``shape`` grid: half-resolution ones up-sampled
        2x the way the models' own last step does it (bilinear, pixel centres aligned)."""
        if logits.shape[2:] == shape:
            return logits
        return np.stack([resize_bilinear(c, shape) for c in logits[0]])[None]

    def _logits(self, x: np.ndarray, tta: int = 1, rotate45: bool = False) -> np.ndarray:
        """Return the (1, C, H, W) logits of ``x`` (H, W multiples of the stride), tiled, or
        (1, C, H / 2, W / 2) from a model that leaves its last up-sampling to the host (not with
        ``rotate45``); with ``tta`` > 1 the mean over that many mirror images (none,
        left-right, up-down, both), each mirrored back. With ``edge_context_px`` m, the network
        sees ``x`` with m px of its mirror image on every side, and that border is cut off."""
        m = self.edge_context_px
        if not m:
            return self._network_logits(x, tta, rotate45)
        h, w = x.shape
        out = self._network_logits(np.pad(x, m, mode="reflect"), tta, rotate45)
        r = (h + 2 * m) // out.shape[2]  # 2: half-resolution logits (m is a stride multiple)
        return out[:, :, m // r:(m + h) // r, m // r:(m + w) // r]

    def _network_logits(self, x: np.ndarray, tta: int, rotate45: bool) -> np.ndarray:
        """:meth:`_logits` without the edge context."""

        def run(tiles: np.ndarray) -> np.ndarray:
            # the sum of mirror images accumulates in a copy, never in the engine's output
            acc = self._infer(tiles).astype(np.float32, copy=tta > 1)
            for axes in _TTA_AXES[1:tta]:
                acc += np.flip(self._infer(np.ascontiguousarray(
                    np.flip(tiles, tuple(a + 1 for a in axes)))), tuple(a + 2 for a in axes))
            if tta > 1:
                acc /= np.float32(tta)
            return acc

        out = infer_tiled(run, x, self.tile_px, self.tile_margin_px, self.stride,
                          self.tile_batch)
        if rotate45:
            # the larger logit: a particle either view sees is kept (a mean would lose a wire
            # along the axes of either view)
            out = self._full(out, x.shape)
            np.maximum(out, self._turned_logits(x, run), out=out)
        return out

    def _turned_logits(self, x: np.ndarray, run: Callable[[np.ndarray], np.ndarray]
                       ) -> np.ndarray:
        """Logits of ``x`` turned by 45° about its centre, turned back onto ``x``'s grid
        (bilinear both ways; the corners the turned frame adds are filled with the median)."""
        from scipy import ndimage as ndi

        h, w = x.shape
        r = np.sqrt(0.5)  # cos 45° = sin 45°
        side = int(np.ceil((h + w) * r)) + 2
        turn = np.array([[r, -r], [r, r]])  # (row, col) rotation
        cx = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        cr = np.array([(side - 1) / 2.0, (side - 1) / 2.0])
        xr = ndi.affine_transform(x, turn.T, offset=cx - turn.T @ cr, output_shape=(side, side),
                                  order=1, mode="constant", cval=float(np.median(x[::4, ::4])))
        xr, _ = pad_to_multiple(xr.astype(np.float32), self.stride)
        lr = self._full(infer_tiled(run, xr, self.tile_px, self.tile_margin_px, self.stride,
                                    self.tile_batch), xr.shape)
        back = np.empty((1, lr.shape[1], h, w), np.float32)
        for k in range(lr.shape[1]):
            back[0, k] = ndi.affine_transform(lr[0, k], turn, offset=cr - turn @ cx,
                                              output_shape=(h, w), order=1, mode="nearest")
        # near the frame's edges the turned view saw the frame's own border (a straight edge
        # against the fill) and takes it for a particle: there the plain view alone counts
        m = min(_TURN_MARGIN_PX, h // 4, w // 4)
        if m > 0:
            back[..., :m, :] = back[..., -m:, :] = np.float32(-1e4)
            back[..., :, :m] = back[..., :, -m:] = np.float32(-1e4)
        return back

    def close(self) -> None:
        """Release the engine, and the base network's."""
        try:
            self.engine.close()
        finally:
            if self.base_detector is not None:
                self.base_detector.close()

    def estimate_scale(self, x: np.ndarray) -> float:
        """Return the working-scale factor for a normalised frame ``x`` (coarse-to-fine passes).

        Pass at factor s: shrink the frame (longest side ``coarse_side_px`` first; a finer pass
        sees only a window of at most ``estimate_window_px`` working px per side, centred where
        the first pass found the most foreground, so no pass costs more than one such engine
        call and an empty middle of the frame does not blind it), find the
        particles, take the area-weighted median ECD d of those with score >= ``min_score``
        (the size of the particle holding the median particle pixel). Once d reaches
        ``reliable_diameter_px`` (the particles are resolved), or at full size, the frame's
        median particle is D = d / s px. A D within [``keep_min_px``, ``keep_max_px``] keeps
        factor 1 (no resampling: cheapest and sharpest); otherwise the factor is
        ``target_diameter_px`` / D within [``min_resample``, ``max_resample``]. A frame with no
        particles at any level keeps factor 1. A card with ``consistency`` looks for two
        passes that agree first, and its ``fallback`` says which pass decides when none do;
        with ``recentre`` a finer pass that finds nothing in its window looks again at the
        frame's centre (:class:`~nanoscout.analysis.modelcard.AutoScale`).
        """
        return self._estimate(x)[0]

    def _pass(self, x: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the network on ``x`` resampled by ``s``; return (logits, ECD px, scores)."""
        h, w = x.shape
        wh, ww = max(self.stride, round(h * s)), max(self.stride, round(w * s))
        xs, _ = pad_to_multiple(resample(x, (wh, ww)) if (wh, ww) != (h, w) else x, self.stride)
        t0 = time.perf_counter()
        # the estimate sees no edge context: it measures the frame as the network sees it bare
        logits = self._full(self._network_logits(xs, 1, False), xs.shape)
        self._pass_engine_s = time.perf_counter() - t0
        _, area, scores = self._pass_instances(logits, wh, ww)
        return logits, 2.0 * np.sqrt(area[1:] / np.pi), scores[1:]

    def _pass_instances(self, logits: np.ndarray, wh: int, ww: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The instances of an estimation pass's logits over its ``wh`` x ``ww`` working px:
        (label map, area px per label, score per label; index 0 the background)."""
        th = self.thresholds
        labels, scores = instances_from_logits(
            logits[0, self._fg, :wh, :ww], logits[0, self._core, :wh, :ww],
            foreground=th.foreground, core=th.core, min_area_px=th.min_area_px,
            min_core_px=th.min_core_px, post_stride=1, merge_contact=th.merge_contact)
        return labels, np.bincount(labels.ravel(), minlength=scores.size).astype(np.float64), scores

    def _window_pass(self, x: np.ndarray, s: float, centre: tuple[float, float] | None = None
                     ) -> tuple[np.ndarray, bool, float, int]:
        """Run the pass at factor ``s`` on its window (:func:`pass_window` around ``centre``,
        frame px; None: the frame's centre); return (logits, whether the window is the whole
        frame, area-weighted median ECD px at the pass of the confident detections of at least
        ``min_pass_ecd_px``, their number)."""
        a = self.card.working_scale.auto  # type: ignore[union-attr]
        h, w = x.shape
        rows, cols = pass_window((h, w), s, self.estimate_window_px, centre)
        whole = rows.stop - rows.start == h and cols.stop - cols.start == w
        logits, ecd, scores = self._pass(x if whole else x[rows, cols], s)
        keep = ecd[(scores >= a.min_score) & (ecd >= a.min_pass_ecd_px)]
        self._pass_ecd = keep  # for a search that tries the capped median first
        rank = a.weight_cap_rank if a.weight_cap_mode == "always" else None
        return logits, whole, _area_weighted_median(keep, rank, a.weight_cap_ratio), int(keep.size)

    def _densest(self, logits: np.ndarray, s: float, window: tuple[slice, slice]
                 ) -> tuple[float, float] | None:
        """Where the pass at factor ``s`` over frame ``window`` found the most foreground
        ((row, col) frame px, or None: :func:`content_centre`)."""
        rows, cols = window
        wh, ww = (max(self.stride, round((sl.stop - sl.start) * s)) for sl in (rows, cols))
        a = self.card.working_scale.auto  # type: ignore[union-attr]
        if a.window_centre == "particles":
            return content_centre(self._particle_density(logits, wh, ww), s,
                                  (rows.start, cols.start))
        fg = logits[0, self._fg, :wh, :ww].astype(np.float32)
        # the logistic function as tanh: no overflow for logits of any size
        return content_centre(0.5 + 0.5 * np.tanh(0.5 * fg), s, (rows.start, cols.start))

    def _particle_density(self, logits: np.ndarray, wh: int, ww: int) -> np.ndarray:
        """Each confident detection of a pass (score >= ``min_score``, ECD >=
        ``min_pass_ecd_px``) as a unit mass spread over its pixels (``window_centre =
        "particles"``): a support grain weighs as one particle, not as its area."""
        a = self.card.working_scale.auto  # type: ignore[union-attr]
        labels, area, scores = self._pass_instances(logits, wh, ww)
        ecd = 2.0 * np.sqrt(area / np.pi)
        mass = np.where((scores >= a.min_score) & (ecd >= a.min_pass_ecd_px) & (area > 0),
                        1.0 / np.maximum(area, 1.0), 0.0)
        mass[0] = 0.0  # background
        return mass[labels].astype(np.float32)

    def particle_size(self, x: np.ndarray) -> float | None:
        """Return the median particle diameter (frame px, area-weighted) that the estimation
        passes of :meth:`estimate_scale` measure on a normalised frame ``x``, or None where
        they find no particle."""
        return self._search(x)[0]

    def _estimate(self, x: np.ndarray, particle_px: tuple[float, float] | None = None
                  ) -> tuple[float, np.ndarray | None, bool, str | None, bool | None]:
        """Return (factor, logits of the pass at that factor or None, whether this card's own
        settings cover the frame: :meth:`~nanoscout.analysis.modelcard.BaseNetwork.covers`,
        what ``particle_px`` did: :attr:`Detection.size_hint`, whether the passes agreed:
        :attr:`Detection.scale_agreed`) for :meth:`detect`. A frame
        they do not cover gets the base network's own factor and pass: the base network
        analyses it. ``particle_px``: the operator's range for the median particle diameter
        (frame px), which overrules a measurement outside it
        (:func:`~nanoscout.analysis.autoscale.hinted_diameter`)."""
        base, other = self.card.base_network, self.base_detector
        theirs, hint = (None, None) if other is None else _hinted(other._search(x), particle_px)
        if theirs is not None and base is not None and not base.covers(theirs[0]):
            assert other is not None
            return (*other._measured(theirs), False, hint, other._agreed)
        if theirs is not None and (base is None or base.measures):
            assert other is not None
            big = theirs[0]  # another network measures, this card decides
            return (1.0 if big is None else self._factor(big)), None, True, hint, other._agreed
        ours, hint = _hinted(self._search(x), particle_px)
        return (*self._measured(ours), True, hint, self._agreed)

    def _measured(self, found: tuple[float | None, float, np.ndarray, bool]
                  ) -> tuple[float, np.ndarray | None]:
        """Return (factor, logits of the pass at that factor or None) of this detector for
        what its :meth:`_search` found."""
        big, s, logits, whole = found
        factor = 1.0 if big is None else self._factor(big)
        # only a pass over the whole frame at the chosen factor can double as its inference
        return factor, (logits if factor == s and whole else None)

    def _search(self, x: np.ndarray) -> tuple[float | None, float, np.ndarray, bool]:
        """Return (median particle diameter in frame px or None, and the factor, logits and
        wholeness of the pass that measured it) by the passes of :meth:`estimate_scale`;
        whether two passes agreed on it is left in ``_agreed`` (:attr:`Detection.scale_agreed`)."""
        a = self.card.working_scale.auto  # type: ignore[union-attr]
        self._agreed = None
        passes: dict[float, tuple[tuple[np.ndarray, bool, float, int], float]] = {}
        kept: dict[float, np.ndarray] = {}  # each pass's confident ECDs (weight_cap_mode)
        h, w = x.shape
        s0 = min(1.0, a.coarse_side_px / max(h, w))  # the first pass of both searches below
        centre: tuple[float, float] | None = None  # where the finer passes look

        def window_pass(s: float) -> tuple[np.ndarray, bool, float, int]:
            # the consistency search and the fallback below share their passes (the coarse
            # one at least): each factor runs once per frame; a pass taken again keeps its
            # own engine time for a reused inference
            nonlocal centre
            if s not in passes:
                passes[s] = (self._window_pass(x, s, centre), self._pass_engine_s)
                kept[s] = self._pass_ecd
                if s == s0:  # the finer passes look where the first found the most
                    centre = self._densest(passes[s][0][0], s, pass_window(
                        (h, w), s, self.estimate_window_px))
                elif a.recentre and passes[s][0][3] == 0 and pass_window(
                        (h, w), s, self.estimate_window_px, centre) != pass_window(
                        (h, w), s, self.estimate_window_px):
                    # nothing where the most foreground was (a lump of a thick support?):
                    # the frame's centre instead, if particles are found there
                    again = (self._window_pass(x, s), self._pass_engine_s)
                    if again[0][3] > 0:
                        passes[s], kept[s] = again, self._pass_ecd
            found, self._pass_engine_s = passes[s]
            return found

        def capped_pass(s: float) -> tuple[np.ndarray, bool, float, int]:
            logits, whole, _, n = window_pass(s)
            return logits, whole, _area_weighted_median(kept[s], a.weight_cap_rank,
                                                        a.weight_cap_ratio), n

        window_pass(s0)
        if a.consistency is not None:
            found = None
            if a.weight_cap_rank is not None and a.weight_cap_mode == "consistent":
                # a grain beside the particles is a real object too, and keeps its size from
                # pass to pass: the capped medians (the particles) are asked first
                found = self._search_consistent(x, a.consistency, capped_pass)
            if found is None:
                found = self._search_consistent(x, a.consistency, window_pass)
            self._agreed = found is not None
            if found is not None:
                return found
            if a.fallback == "finest":  # the finest pass that counted enough particles
                for s in sorted(passes, reverse=True):
                    logits, whole, d, n = window_pass(s)
                    if d > 0 and n >= a.consistent_min_count:
                        return d / s, s, logits, whole
            elif a.fallback == "nearest":  # the two neighbouring passes that agree best
                near = self._nearest_pair(sorted(passes), window_pass)
                if near is not None:
                    return near
            elif a.fallback == "median":  # every qualifying pass is one measurement
                sizes = {s: d / s for s, ((_, _, d, n), _) in passes.items()
                         if a.measures(d, n)}
                if sizes:
                    median = float(np.exp(np.median(np.log(list(sizes.values())))))
                    s = min(sizes, key=lambda k: abs(np.log(sizes[k] / median)))
                    logits, whole, _, _ = window_pass(s)
                    return median, s, logits, whole
        s = s0
        while True:
            logits, whole, d, _ = window_pass(s)
            if d >= a.reliable_diameter_px or (s >= 1.0 and d > 0):
                return d / s, s, logits, whole
            if s >= 1.0:
                self._agreed = None  # no particle at any pass: nothing to agree on
                return None, s, logits, whole
            s = min(1.0, s * (8.0 if d == 0 else float(np.clip(
                1.5 * a.reliable_diameter_px / d, 2.0, 8.0))))
            if s >= _FULL_PASS:  # nearly full size costs as much: take the pass the frame
                s = 1.0          # can reuse when it keeps factor 1 (the common case)

    def _search_consistent(
        self, x: np.ndarray, ratio: float,
        window_pass: Callable[[float], tuple[np.ndarray, bool, float, int]],
    ) -> tuple[float, float, np.ndarray, bool] | None:
        """The self-consistent particle size (see :class:`~nanoscout.analysis.modelcard.AutoScale`):
        (diameter in frame px, and the factor, logits and wholeness of the pass that measured
        it), or None when no two neighbouring passes agree.
        ``window_pass(s)``: :meth:`_window_pass` of ``x`` at factor ``s``."""
        a = self.card.working_scale.auto  # type: ignore[union-attr]
        s = min(1.0, a.coarse_side_px / max(x.shape))
        prev: tuple[float, np.ndarray, bool, float] | None = None  # s, logits, whole, d
        while s <= a.max_resample * (1.0 + 1e-6):
            logits, whole, d, n = window_pass(s)
            if prev is not None and d > 0:
                ps, plog, pwhole, pd = prev
                if abs(np.log((d / s) / (pd / ps))) <= np.log(ratio):
                    return pd / ps, ps, plog, pwhole
            prev = (s, logits, whole, d) if a.measures(d, n) else None
            s *= 2.0
        return None

    def _nearest_pair(
        self, factors: list[float],
        window_pass: Callable[[float], tuple[np.ndarray, bool, float, int]],
    ) -> tuple[float, float, np.ndarray, bool] | None:
        """``fallback = "nearest"``: of the neighbouring passes at ``factors`` (increasing,
        all run) whose coarser one counts as a measurement
        (:meth:`~nanoscout.analysis.modelcard.AutoScale.measures`), the
        pair whose particle sizes in frame px are closest, if within ``nearest_ratio``:
        (diameter in frame px, and the factor, logits and wholeness of the coarser pass), else
        None."""
        a = self.card.working_scale.auto  # type: ignore[union-attr]
        best: tuple[float, float, np.ndarray, bool] | None = None
        best_gap = float(np.log(a.nearest_ratio))
        for ps, s in zip(factors, factors[1:]):
            plog, pwhole, pd, pn = window_pass(ps)
            d = window_pass(s)[2]
            if not (a.measures(pd, pn) and d > 0):
                continue
            gap = abs(float(np.log((d / s) / (pd / ps))))
            if gap <= best_gap:
                best, best_gap = (pd / ps, ps, plog, pwhole), gap
        return best

    def _factor(self, big: float) -> float:
        """Return the resample factor for a frame whose median particle is ``big`` px."""
        return self.card.working_scale.auto.factor(big)  # type: ignore[union-attr]

    def _preset(self, pixel_size_nm: float | None) -> float | None:
        """The preset working scale for this pixel size (within 2 %), or None."""
        if pixel_size_nm is None or not pixel_size_nm > 0:
            return None
        for p, f in self.scale_presets:
            if abs(pixel_size_nm / p - 1.0) <= 0.02:
                return f
        return None

    def _scale_for(self, x: np.ndarray, key: object,
                   particle_px: tuple[float, float] | None = None
                   ) -> tuple[float, np.ndarray | None, bool, str | None, bool | None]:
        """Return (factor, reusable logits or None, covered, size hint outcome, whether the
        passes agreed: :meth:`_estimate`) for frame ``x`` of stream ``key``."""
        if not self.auto:
            return self.scale, None, True, None, None
        if key is None:
            return self._estimate(x, particle_px)
        if particle_px is not None:  # another range is another stream's estimate
            key = (key, particle_px)
        sig = self._memo.signature(x)
        scale = self._memo.lookup(key, x.shape, sig)
        if scale is not None:
            return (scale, None, self._memo.covered(key), self._memo.size_hint(key),
                    self._memo.agreed(key))
        scale, logits, covered, hint, agreed = self._estimate(x, particle_px)
        self._memo.store(key, x.shape, sig, scale, covered, hint, agreed)
        return scale, logits, covered, hint, agreed

    def detect(self, image: np.ndarray, key: object = None, rotate45: bool | None = None,
               pixel_size_nm: float | None = None, normalized: np.ndarray | None = None,
               particle_px: tuple[float, float] | None = None) -> Detection:
        """Return the particle instances of ``image`` (2-D, any real dtype, finite).

        ``key`` (e.g. source and pixel size) lets an automatic working scale be reused for
        ``auto_every`` frames of the same stream. Raises FrameError for a non-2-D, empty or
        non-finite frame, EngineFailure when the engine output is not what the model card
        promises. ``rotate45``: this frame's choice of the 45° view (None: the detector's).
        ``pixel_size_nm`` selects a scale preset, if one matches. ``normalized``: ``image``
        already through :func:`~nanoscout.analysis.preprocess.normalize` (not modified here).
        ``particle_px``: the operator's range (lo, hi) for the frame's median particle
        diameter, frame px: an automatic estimate outside it is moved to its nearest end
        (:attr:`Detection.size_hint`; a fixed or preset scale is kept). Raises
        ConfigError unless 0 < lo <= hi, both finite.
        """
        t0 = time.perf_counter()
        if particle_px is not None:
            particle_px = _particle_range(particle_px)
        arr = check_frame(image)
        x = normalize(arr) if normalized is None else normalized
        noise, width = self._noise(x)
        x = denoise.smooth(x, width)
        ts = time.perf_counter()
        preset = self._preset(pixel_size_nm)
        scale, logits, covered, hint, agreed = ((preset, None, True, None, None)
                                                if preset is not None
                                                else self._scale_for(x, key, particle_px))
        ts = time.perf_counter() - ts
        turn = self.rotate45 if rotate45 is None else rotate45
        # outside the sizes the card was adapted on the base network analyses, at its factor
        analyst = self if covered else self.base_detector
        assert analyst is not None
        found = analyst._analyse(image, x, scale, logits, turn, key, pixel_size_nm, t0, ts,
                                 outside_range=not covered, particle_px=particle_px)
        found.size_hint, found.scale_agreed = hint, agreed
        found.noise, found.smoothing_px = noise, width
        return found

    def _noise(self, x: np.ndarray) -> tuple[float | None, float]:
        """Return (white noise of the normalised frame ``x`` or None where the card does not
        smooth, the width of the Gaussian it gets: frame px, 0 for none): see
        :attr:`Detection.noise`."""
        if self.denoise is None:
            return None, 0.0
        sigma = denoise.noise_sigma(x)
        return sigma, denoise.smoothing_px(sigma, self.denoise.target, self.denoise.max_px)

    def _analyse(self, image: np.ndarray, x: np.ndarray, scale: float,
                 logits: np.ndarray | None, turn: bool, key: object,
                 pixel_size_nm: float | None, t0: float, ts: float,
                 outside_range: bool = False,
                 particle_px: tuple[float, float] | None = None) -> Detection:
        """:meth:`detect` once the working scale is known: ``x`` the normalised ``image``,
        ``logits`` a reusable estimation pass at ``scale`` or None, ``t0`` when the call began
        and ``ts`` the seconds its scale took; ``particle_px`` goes to a merged base network."""
        h, w = x.shape
        labels, scores, engine_s, post_s, reused_s = self._instances(x, h, w, scale, logits, turn)
        if self.multiscale:
            maps = [(labels, scores)]
            for factor in self._multiscale_factors(h, w, scale):
                more = self._instances(x, h, w, factor, None, turn)
                maps.append(more[:2])
                engine_s += more[2]
                post_s += more[3]
            if len(maps) > 1:
                t1 = time.perf_counter()
                labels, scores = merge_by_score(maps, self.multiscale_overlap)
                post_s += time.perf_counter() - t1
        if self.merge_base:  # the base network's particles join, by raw score
            assert self.base_detector is not None and self.card.base_network is not None
            other = self.base_detector.detect(image, key=key, rotate45=turn,
                                              pixel_size_nm=pixel_size_nm, normalized=x,
                                              particle_px=particle_px)
            t1 = time.perf_counter()
            ms = other.timings_ms
            ts += ms["scale"] / 1e3
            engine_s += ms["engine"] / 1e3
            if self.card.base_network.broke_down(int(scores.size - 1), other.n):
                # far more particles than the base network finds: this network broke down
                # here, and the base network's own analysis (raw scores) is the frame's
                labels, scores, scale = other.labels, other.scores, other.scale
                outside_range = True
            else:
                labels, scores = merge_by_score([(labels, scores), (other.labels, other.scores)],
                                                self.multiscale_overlap)
            post_s += time.perf_counter() - t1 + ms["postprocess"] / 1e3
        t1 = time.perf_counter()
        # a frame the base network analysed alone keeps its raw scores
        calibration = None if outside_range else self._calibration
        if calibration is not None and scores.size > 1:
            # the cut is on the raw score; what is reported is the probability
            scores = scores.copy()
            scores[1:] = np.interp(scores[1:], *calibration)
        post_s += time.perf_counter() - t1
        ts -= reused_s
        total = time.perf_counter() - t0
        return Detection(labels, scores, {"preprocess": (total - ts - engine_s - post_s) * 1e3,
                                          "scale": ts * 1e3,
                                          "engine": engine_s * 1e3,
                                          "postprocess": post_s * 1e3}, scale,
                         calibration is not None, outside_range)

    def _multiscale_factors(self, h: int, w: int, scale: float) -> list[float]:
        """The extra working scales of a frame (``multiscale`` multiples of ``scale``, within
        the card's resample range and at most its ``multiscale_max_factor``; none whose frame
        would be under 64 px)."""
        lo, hi = self._multiscale_range
        out = []
        for r in self.multiscale:
            f = min(max(scale * r, lo), hi)
            # a finer (coarser) extra scale capped to or past the chosen one is no extra scale
            if (f - scale) * (r - 1.0) > 0 and max(h, w) * f >= 64 and f not in out:
                out.append(f)
        return out

    def _instances(self, x: np.ndarray, h: int, w: int, scale: float,
                   logits: np.ndarray | None, turn: bool
                   ) -> tuple[np.ndarray, np.ndarray, float, float, float]:
        """Return (labels, raw scores, engine s, post-processing s, reused estimation-pass
        engine s) of the normalized frame ``x`` (``h`` x ``w``) at working scale ``scale``;
        ``logits``: an estimation pass's logits at that scale to reuse, if any."""
        if scale != 1.0:
            wh = max(1, round(h * scale))
            ww = max(1, round(w * scale))
        else:
            wh, ww = h, w
        reuse = (logits is not None and self.tta == 1 and not turn
                 and not self.edge_context_px  # an estimation pass had no edge context
                 and logits.shape[2] >= wh
                 and logits.shape[3] >= ww)
        # a reused estimation pass is the frame's inference: count its engine time as such
        reused_s = self._pass_engine_s if reuse else 0.0
        t1 = time.perf_counter()
        if not reuse or logits is None:
            if scale != 1.0:
                x = resample(x, (wh, ww))
            x, _ = pad_to_multiple(x, self.stride)
            t1 = time.perf_counter()
            logits = self._logits(x, self.tta, turn)
        t2 = time.perf_counter()
        th = self.thresholds
        rescue = th.rescue
        rules: dict[str, Any] = dict(
            foreground=th.foreground, core=th.core, min_area_px=th.min_area_px,
            min_core_px=th.min_core_px, merge_contact=th.merge_contact,
            min_score=th.min_score if rescue is None else rescue.min_score,
            merge_convex=th.merge_convex)
        r = x.shape[0] // logits.shape[2] if not reuse else 1
        fg, core = logits[0, self._fg], logits[0, self._core]
        if r == 2 and (wh, ww) == (h, w) and th.post_stride == 2 and h % 2 == 0 and w % 2 == 0:
            # the live default: thresholds and centre samples straight from half resolution
            labels, scores = instances_from_half_logits(fg, core, (h, w), **rules)
        else:
            labels, scores = self._full_instances(fg, core, h, w, wh, ww, r, scale, rules)
        if rescue is not None:
            labels, scores = rescue_by_population(labels, scores, th.min_score,
                                                  rescue.min_score, rescue.ecd_ratio,
                                                  rescue.min_sure)
        return labels, scores, t2 - t1 + reused_s, time.perf_counter() - t2, reused_s

    def _full_instances(self, fg: np.ndarray, core: np.ndarray, h: int, w: int, wh: int,
                        ww: int, r: int, scale: float, rules: dict[str, Any]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The instances of a frame's logits (``fg``, ``core``: the engine's grid, ``r`` px of
        the working grid ``wh`` x ``ww`` per engine px) brought to the frame's ``h`` x ``w``
        grid first, where the half-resolution shortcut does not apply."""
        th = self.thresholds
        stride = th.post_stride
        if r != 1 or (wh, ww) != (h, w):
            # after upsampling small particles cover few frame pixels: keep full resolution
            stride = th.post_stride if scale <= 1.0 else 1
            # one interpolation from the engine's grid to the frame's: the working grid is the
            # top-left wh x ww of the padded map, at 1 / r of its px
            span = (wh / r, ww / r)
            fg, core = fg[:-(-wh // r), :-(-ww // r)], core[:-(-wh // r), :-(-ww // r)]
            fg = resize_bilinear(fg, (h, w), span=span)
            # the core is only read at the block centres: resample just those
            core = resize_bilinear(core, (h, w), rows=block_centres(h, stride),
                                   cols=block_centres(w, stride), span=span)
        else:
            # views, no copies: the post-processing reads the padded output in place
            fg, core = fg[:wh, :ww], core[:wh, :ww]
        return instances_from_logits(fg, core, post_stride=stride, **rules)


def scale_measurer(engine: Engine, card: ModelCard, **options: Any) -> Detector:
    """Return a detector of ``engine`` and ``card`` on raw scores with an automatic scale, to
    be another :class:`Detector`'s ``base_detector``: it measures the working scale and that
    detector's card decides the factor (and merges its particles only where its card's
    ``base_network.merge`` says so). Used for an adapted model's base network
    (:func:`base_detector_for`) and for the FP32 model of an INT8 sibling whose card's
    ``quantization.fp32_scale`` asks for it. ``options``: its :class:`Detector` options (tile
    sizes, ``estimate_window_px``)."""
    return Detector(engine, card.model_copy(update={"score_calibration": None}), scale="auto",
                    **options)


def base_detector_for(card: ModelCard, card_file: Path, engine_for: Callable[[Path], Engine],
                      **options: Any) -> Detector | None:
    """Return the detector of ``card``'s base network (``base_network``,
    :meth:`~nanoscout.analysis.modelcard.ModelCard.load_base_network`; ``card_file``: where
    the card lies), its engine made by ``engine_for(path)``, on raw scores (its card's
    calibration left out: merged particles compete by raw score); None when the card names
    none. ``options``: :class:`Detector` options of the base (tile sizes). Raises
    ModelCardError for a missing or invalid base network."""
    found = card.load_base_network(card_file)
    if found is None:
        return None
    onnx, base = found
    engine = engine_for(onnx)
    try:
        return scale_measurer(engine, base, **options)
    except BaseException:
        engine.close()
        raise


def load_detector(onnx: Path, engine_for: Callable[[Path], Engine], **options: Any) -> Detector:
    """Return the detector of the ONNX file ``onnx`` (its card beside it, ``.json``, sha256
    checked), its engine made by ``engine_for(path)``; a card that names a base network gets
    its detector (:func:`base_detector_for`, engine made the same way). ``options``: the other
    :class:`Detector` options (the base shares ``tile_px``, ``tile_margin_px``, ``tile_batch``,
    ``estimate_window_px`` and ``tta``). Raises ModelCardError for a missing or invalid card or
    base network."""
    card_file = Path(onnx).with_suffix(".json")
    card = ModelCard.load(card_file)
    shared = {k: v for k, v in options.items()
              if k in ("tile_px", "tile_margin_px", "tile_batch", "estimate_window_px", "tta")}
    base = base_detector_for(card, card_file, engine_for, **shared)
    try:
        engine = engine_for(Path(onnx))
    except BaseException:
        if base is not None:
            base.close()
        raise
    try:
        return Detector(engine, card, base_detector=base, **options)
    except BaseException:
        engine.close()
        if base is not None:
            base.close()
        raise
