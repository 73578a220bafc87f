"""Field-of-view classification with its explanations: class probabilities, the class
activation map (CAM) of the top class (and of any other class, on request), and the "AI lens"
novelty score.

Two fixed-input models, each an ONNX file plus a model card (``nanoscout.analysis.modelcard``):

* the **classifier** (card task ``classification``): outputs ``probabilities`` (1, C), softmax
  over the card's ``classes``, and ``cam`` (1, h, w) uint8, the CAM of the top class computed
  inside the graph (ReLU, scaled to its maximum = 255) at feature resolution; optionally
  ``class_maps`` (1, C, h, w) float32, every class's map before the ReLU (the shipped
  classifier since 3.1.1), from which :meth:`Classification.cam_of` makes the CAM of any
  class the same way (:func:`cam_of_map`), only for the classes asked (an alert on a class
  that is not the top one is explained by its own map, not the top class's);
* the **lens** (optional, card task ``autoencoder``): a convolutional autoencoder whose
  per-frame novelty error (the card's ``novelty.error_output``; for the shipped lens not the
  pixel reconstruction error but the k-NN distance of the frame's texture statistics to those
  of usual training frames, computed in the graph), divided by the card's
  ``novelty.reference_error`` (a high quantile of the errors of usual frames), is the novelty
  score: 1.0 = as unusual as the reference quantile of usual frames. Its other outputs
  (``act_*`` activations, ``reconstruction``) are returned by
  :meth:`FieldClassifier.lens_outputs` on request.

Both see the frame through :func:`nanoscout.analysis.preprocess.fixed_input`: the whole frame resampled to
the card's ``input.size`` and percentile-normalised, exactly as in training. The CAM covers the
whole frame (row r of an h-row heatmap spans frame rows r·H/h to (r+1)·H/h).

**Views of frames far from square.** Both models were trained on whole fields of view close to
square: the classifier on square synthetic fields (particles 1.6-10 % of the side) and real
images up to about 4:3, the lens on frames of 1:1 to 4:3. Squeezed whole into the square input,
an 8:1 strip's particles became 32 x 4 times smaller, needles 8 times thinner across (an
8192x1024 field of isolated particles was classed ``rods_wires``, of support film ``blank``). A
frame whose long side exceeds :data:`MAX_VIEW_ASPECT` times its short side is therefore cut
along its long side into :func:`view_count` equal, adjacent views (as close to square as a whole
number of them gets, at most :data:`MAX_VIEWS` of them: per frame at most that many runs of each
model; a 3:2 frame takes 2, 8:1 takes 8), each made into an input as a whole frame is
(:func:`nanoscout.analysis.preprocess.fixed_views`). The frame's probabilities are the mean of
its views' (every view one field of view of equal area: a class seen in one view of n keeps 1/n
of its weight); its class maps are the views' maps side by side, so the CAM and ``class_maps``
cover the whole frame as above (an h x (n·w) heatmap for a wide frame), with one scale for all
views (the CAM is made from the top class's stitched map). Without ``class_maps`` the views' own
CAMs are put side by side (each scaled to its own maximum; a view whose top class is not the
frame's shows 0). The lens's error is the mean of its views' errors (the reference error is that
of one usual frame; 8:1 strips of usual particle fields measure below 1 this way, 3.6-4.2
squeezed), its spatial outputs (reconstruction, ``act_*``) the views' side by side. A view
without contrast is left out (its heatmap cells 0); a frame all of whose views lack it is a
blank frame. Square frames and frames up to 4:3 are seen whole, as before.

A frame without contrast (beam blanked, shutter closed, a detector sending zeros) carries
nothing to classify and nothing for the lens. :func:`model_input`, the one check on every path
to either model (:meth:`FieldClassifier.classify`; :meth:`FieldClassifier.lens_outputs`, so the
daemon's lens query socket; the offline ``nanoscout lens``), raises
:class:`~nanoscout.wire.errors.BlankFrame` before a model runs when the model's input holds one
value (``classify`` checks the lens's input as well as its own, so neither model runs).
``fixed_input`` maps the 0.5th / 99.5th percentiles of the resampled frame to 0 / 1 and a zero
span between them to all zeros, so this is exactly the case where the models would see the same
all-zero input whatever the frame (the shipped ones answer it with ``isolated_particles`` at
0.95 and a novelty of 88): a frame whose pixels are all equal, or all equal but for outliers
too few to move those percentiles (a hot pixel, a few stray counts: under ~0.5 % of the
resampled pixels). A frame with noise or texture over more than that (a camera's read noise, a
pure-noise frame, ±1 count, a 1e-6 relative contrast) has a span above 0 and is classified.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.preprocess import fixed_input, fixed_views
from nanoscout.engines.base import Engine
from nanoscout.wire.errors import BlankFrame, EngineFailure, ModelCardError

#: output names the classifier card must declare
PROBABILITIES = "probabilities"
CAM = "cam"
#: the classifier's optional output of every class's map, (1, C, h, w) float32
CLASS_MAPS = "class_maps"
#: the widest view (long side / short side) the models see whole: their training frames
#: reached 4:3 (module docstring)
MAX_VIEW_ASPECT = 4.0 / 3.0
#: the most views of one frame (each one run of the classifier and one of the lens)
MAX_VIEWS = 8


def view_count(shape: tuple[int, ...], max_aspect: float = MAX_VIEW_ASPECT,
               max_views: int = MAX_VIEWS) -> int:
    """Return how many equal, adjacent views along its long side a frame of ``shape`` (rows,
    cols, px) is cut into for the fixed-size models: 1 for a frame up to ``max_aspect`` (long
    / short side), else the number n (floor or ceil of the aspect) whose views are closest to
    square, at most ``max_views`` (3:2 and 1.8:1 take 2, 4:1 takes 4, 8:1 takes 8; a 1.4:1
    frame stays whole, as 2 views would be 1:1.43)."""
    h, w = int(shape[0]), int(shape[1])
    aspect = max(h, w) / max(min(h, w), 1)
    if aspect <= max_aspect:
        return 1
    lo = max(1, math.floor(aspect))
    n = min((lo, lo + 1), key=lambda k: max(aspect / k, k / aspect))
    return max(1, min(int(max_views), n))


def _stitch(maps: list[np.ndarray], wide: bool) -> np.ndarray:
    """The views' (..., h, w) maps side by side in frame order: along the last axis for a
    wide frame, the one before it for a tall one."""
    return np.concatenate(maps, axis=-1 if wide else -2)


def cam_of_map(class_map: np.ndarray) -> np.ndarray:
    """Return the uint8 (h, w) CAM of one class's map (h, w; float, before the ReLU), as the
    classifier's graph makes its ``cam``: ReLU, divided by the map's maximum, x 255, rounded
    half up; all 0 when nothing is positive. Unitless levels 0..255."""
    m = np.maximum(np.asarray(class_map, dtype=np.float32), np.float32(0))
    peak = max(float(m.max(initial=0.0)), 1e-12)
    return np.clip(np.floor(m / np.float32(peak) * np.float32(255) + np.float32(0.5)),
                   0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Classification:
    """One frame classified.

    ``labels``/``probabilities``: the top-k classes, most probable first. ``all`` holds every
    class's probability (alert rules may name any class). ``cam``: uint8 (h, w) heatmap of the
    top class over the whole frame, or None. ``novelty``: the lens's error / its reference
    error (None without a lens); ``error``: the raw error (as the lens card's output defines).
    ``timings_ms``: ``classify`` and ``lens`` stage times, ms. ``class_maps``: every class's
    map before the ReLU, (C, h, w) float32 in the card's class order (the order of ``all``),
    or None (a model without the output, or CAMs off): :meth:`cam_of` reads it.
    """

    labels: list[str]
    probabilities: list[float]
    all: dict[str, float]
    cam: np.ndarray | None
    novelty: float | None
    error: float | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    class_maps: np.ndarray | None = field(default=None, repr=False, compare=False)

    def cam_of(self, label: str) -> np.ndarray | None:
        """Return the uint8 (h, w) CAM of class ``label`` over the whole frame: ``cam`` for the
        top class, else made from its map (:func:`cam_of_map`, computed on each call: ask only
        for the classes needed); None without CAMs, for a class not in ``all``, or for a class
        other than the top one when the model has no ``class_maps`` output (the top class's
        map does not explain another class)."""
        if self.cam is not None and self.labels and label == self.labels[0]:
            return self.cam
        if self.class_maps is None or label not in self.all:
            return None
        return cam_of_map(self.class_maps[list(self.all).index(label)])


def _size(card: ModelCard, task: str) -> tuple[int, int]:
    if card.task != task:
        raise ModelCardError(f"model card {card.name!r} has task {card.task!r}, not {task!r}")
    if card.input.size is None:
        raise ModelCardError(f"model card {card.name!r} lacks input.size")
    return int(card.input.size[0]), int(card.input.size[1])


def _check_engine(engine: Engine, card: ModelCard, outputs: tuple[str, ...]) -> None:
    ins = [t.name for t in getattr(engine, "inputs", ())]
    if ins and card.input.name not in ins:
        raise ModelCardError(f"model card {card.name!r}: input {card.input.name!r} is not an "
                             f"engine input ({ins})")
    outs = [t.name for t in getattr(engine, "outputs", ())]
    missing = [o for o in outputs if outs and o not in outs]
    if missing:
        raise ModelCardError(f"model card {card.name!r}: the model has no output {missing[0]!r} "
                             f"(it has {outs})")


def _blank(pixels: np.ndarray, size: tuple[int, int], model: str) -> BlankFrame:
    arr = np.asarray(pixels)
    lo, hi = arr.min(), arr.max()
    values = f"every pixel {lo}" if lo == hi else f"pixels {lo} to {hi}"
    return BlankFrame(f"blank frame ({arr.shape[0]}x{arr.shape[1]} {arr.dtype}, {values}): "
                      f"its 0.5-99.5 percentile span at the {model}'s {size[0]}x{size[1]} "
                      f"input is 0, no contrast for the {model}")


def model_views(pixels: np.ndarray, size: tuple[int, int], model: str = "classifier"
                ) -> tuple[list[np.ndarray | None], bool]:
    """Return ([(1, 1, rows, cols) float32 input, or None for a view without contrast], wide)
    for the :func:`view_count` views of one frame (2-D, any real dtype) along its long side
    (columns when ``wide``), in frame order; one view (:func:`model_input`) for a frame up to
    4:3. ``size``: the model's input (rows, cols), px. Raises BlankFrame when every view
    lacks contrast, FrameError for a frame the preprocessing refuses."""
    arr = np.asarray(pixels)
    n = view_count(arr.shape) if arr.ndim == 2 else 1
    if n == 1:
        return [model_input(pixels, size, model)], True
    xs = fixed_views(arr, size, n)
    views: list[np.ndarray | None] = [
        None if float(x.max()) == float(x.min()) else x[None] for x in xs]
    if all(v is None for v in views):
        raise _blank(arr, size, model)
    return views, arr.shape[1] >= arr.shape[0]


def model_input(pixels: np.ndarray, size: tuple[int, int], model: str = "classifier"
                ) -> np.ndarray:
    """Return the (1, 1, rows, cols) float32 input of a fixed-size model (the classifier, the
    lens) for one frame (2-D, any real dtype): :func:`~nanoscout.analysis.preprocess.fixed_input`,
    normalised intensity, 0..1. ``size``: the model's input (rows, cols), px; ``model``: its
    name in the error. Raises BlankFrame, naming the frame's shape, dtype and pixel values,
    when that input holds one value (a frame without contrast: module docstring), and
    FrameError for a frame ``fixed_input`` refuses."""
    x = fixed_input(pixels, size)
    if float(x.max()) == float(x.min()):
        raise _blank(pixels, size, model)
    return x


class FieldClassifier:
    """Runs the classifier (and, when given, the lens) on whole frames."""

    def __init__(self, engine: Engine, card: ModelCard, *, lens: Engine | None = None,
                 lens_card: ModelCard | None = None, top_k: int = 3, cam: bool = True) -> None:
        """``top_k``: classes listed per frame (≥ 1); ``cam``: return the CAM heatmap."""
        self.size = _size(card, "classification")
        self.classes: tuple[str, ...] = tuple(card.classes or ())
        _check_engine(engine, card, (PROBABILITIES, CAM))
        if (lens is None) != (lens_card is None):
            raise ModelCardError("the lens needs both its engine and its model card")
        self.lens_size: tuple[int, int] | None = None
        if lens is not None and lens_card is not None:
            self.lens_size = _size(lens_card, "autoencoder")
            assert lens_card.novelty is not None  # the card validator guarantees it
            _check_engine(lens, lens_card, (lens_card.novelty.error_output,))
        if top_k < 1:
            raise ModelCardError(f"top_k {top_k} must be >= 1")
        self.engine, self.card = engine, card
        self.lens, self.lens_card = lens, lens_card
        self.top_k = min(top_k, len(self.classes))
        self.cam = cam

    @property
    def name(self) -> str:
        """``name:version`` of the classifier (and lens) models."""
        text = f"{self.card.name}:{self.card.version}"
        if self.lens_card is not None:
            text += f"+{self.lens_card.name}:{self.lens_card.version}"
        return text

    def classify(self, pixels: np.ndarray) -> Classification:
        """Classify one frame (2-D, any real dtype); raises BlankFrame for a frame without
        contrast at the classifier's or the lens's input, before either model runs (module
        docstring), FrameError / EngineFailure. A frame far from square is classified by
        views (module docstring): at most :data:`MAX_VIEWS` runs of each model."""
        t0 = time.perf_counter()
        views = model_views(pixels, self.size)
        lens_views = None
        if self.lens_size is not None:
            # both models usually take the same input size: prepare the frame once
            lens_views = views if self.lens_size == self.size else model_views(
                pixels, self.lens_size, "lens")
        runs = [None if x is None else self._run_view(x) for x in views[0]]
        done = [r for r in runs if r is not None]
        probs = np.mean([r[0] for r in done], axis=0)
        order = np.argsort(-probs, kind="stable")[: self.top_k]
        heat = maps = None
        if self.cam and len(runs) == 1:
            heat, maps = done[0][1], done[0][2]
        elif self.cam:
            heat, maps = self._stitched_cam(runs, int(order[0]), views[1])
        t1 = time.perf_counter()
        timings = {"classify": (t1 - t0) * 1e3}
        novelty = error = None
        if self.lens is not None:
            out = self.lens_outputs(pixels, lens_views)
            error, novelty = self.novelty_of(out)
            timings["lens"] = (time.perf_counter() - t1) * 1e3
        return Classification(
            labels=[self.classes[i] for i in order],
            probabilities=[round(float(probs[i]), 6) for i in order],
            all={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            cam=heat,
            novelty=novelty,
            error=error,
            timings_ms=timings,
            class_maps=maps,
        )

    def _run_view(self, x: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(probabilities (C,) float64, CAM uint8 (h, w) or None, class maps (C, h, w)
        float32 or None) of one model input; raises EngineFailure for outputs of the wrong
        shape or non-finite probabilities."""
        out = self.engine.infer({self.card.input.name: x})
        probs = np.asarray(out.get(PROBABILITIES), dtype=np.float64).reshape(-1)
        if probs.size != len(self.classes) or not np.isfinite(probs).all():
            raise EngineFailure(f"classifier output {PROBABILITIES!r} has {probs.size} values "
                                f"(finite: {bool(np.isfinite(probs).all())}), expected "
                                f"{len(self.classes)} finite probabilities")
        heat = maps = None
        if self.cam:
            raw = out.get(CAM)
            if raw is None or raw.ndim != 3 or raw.shape[0] != 1:
                got = None if raw is None else raw.shape
                raise EngineFailure(f"classifier output {CAM!r} has shape {got}, expected "
                                    "(1, h, w)")
            heat = np.ascontiguousarray(raw[0], dtype=np.uint8)
            raw_maps = out.get(CLASS_MAPS)  # optional: a model before it has none
            if raw_maps is not None:
                want = (1, len(self.classes), *heat.shape)
                if raw_maps.shape != want:
                    raise EngineFailure(f"classifier output {CLASS_MAPS!r} has shape "
                                        f"{raw_maps.shape}, expected {want} (one map per "
                                        f"class, the size of {CAM!r})")
                maps = np.asarray(raw_maps[0], dtype=np.float32)
        return probs, heat, maps

    def _stitched_cam(self, runs: list[tuple[np.ndarray, np.ndarray | None,
                                             np.ndarray | None] | None],
                      top: int, wide: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(CAM uint8, class maps (C, h, n·w) float32 or None) of a frame seen in views: the
        views' maps side by side (0 for a view without contrast), the CAM of class ``top``
        made from them with one scale; without ``class_maps`` the views' CAMs side by side,
        0 where a view's top class is not ``top`` (module docstring)."""
        done = [r for r in runs if r is not None]
        cam_shape = done[0][1].shape if done[0][1] is not None else (0, 0)
        if all(r[2] is not None for r in done):
            blank_maps = np.zeros((len(self.classes), *cam_shape), np.float32)
            maps = _stitch([blank_maps if r is None or r[2] is None else r[2] for r in runs],
                           wide)
            return cam_of_map(maps[top]), maps
        zero = np.zeros(cam_shape, np.uint8)
        cams = [r[1] if r is not None and r[1] is not None and int(np.argmax(r[0])) == top
                else zero for r in runs]
        return np.ascontiguousarray(_stitch(cams, wide)), None

    def novelty_of(self, outputs: dict[str, np.ndarray]) -> tuple[float, float]:
        """(error, novelty) from the lens's outputs of one frame (:meth:`lens_outputs`);
        raises EngineFailure unless the error output is one finite value >= 0."""
        if self.lens_card is None or self.lens_card.novelty is None:
            raise ModelCardError("no lens model is loaded ([classify] lens)")
        ref = self.lens_card.novelty
        err = np.asarray(outputs.get(ref.error_output), dtype=np.float64).reshape(-1)
        if err.size != 1 or not np.isfinite(err[0]) or err[0] < 0:
            raise EngineFailure(f"lens output {ref.error_output!r} must be one finite error "
                                f">= 0, got {err[:4]}")
        return float(err[0]), float(err[0]) / ref.reference_error

    def lens_outputs(self, pixels: np.ndarray,
                     views: tuple[list[np.ndarray | None], bool] | None = None
                     ) -> dict[str, np.ndarray]:
        """Every output of the lens for one frame (error, reconstruction, ``act_*`` maps);
        raises BlankFrame for a frame without contrast at the lens's input (:func:`model_input`:
        the lens would answer any such frame alike, with a novelty of ~88). A frame far from
        square is seen in views (module docstring): outputs of one value per input (the
        error) are the mean over the views with contrast, the others, (1, ..., h, w), the
        views' side by side along the frame's long side (0 for a view without contrast), so
        they cover the whole frame. ``views``: the frame already prepared (and checked) by
        :func:`model_views` at the lens's input size."""
        if self.lens is None or self.lens_size is None or self.lens_card is None:
            raise ModelCardError("no lens model is loaded ([classify] lens)")
        if views is None:
            views = model_views(pixels, self.lens_size, "lens")
        xs, wide = views
        return merge_views([None if x is None else self.lens.infer({self.lens_card.input.name: x})
                            for x in xs], wide)


def merge_views(outs: list[dict[str, np.ndarray] | None], wide: bool) -> dict[str, np.ndarray]:
    """Return one frame's model outputs from its views' (:func:`model_views` order; None for
    a view without contrast, at least one not None): outputs of fewer than 3 dimensions (an
    error, one value per input) are the mean over the views that ran, the others (1, ..., h,
    w) the views' side by side along the frame's long side (columns when ``wide``; 0 for a
    view that did not run). One view: its outputs as they are."""
    done = [o for o in outs if o is not None]
    if len(outs) == 1:
        return done[0]
    merged: dict[str, np.ndarray] = {}
    for name, first in done[0].items():
        arr = np.asarray(first)
        if arr.ndim < 3:
            merged[name] = np.mean([np.asarray(o[name], np.float64) for o in done],
                                   axis=0).astype(arr.dtype)
            continue
        merged[name] = _stitch([np.zeros_like(arr) if o is None else np.asarray(o[name])
                                for o in outs], wide)
    return merged
