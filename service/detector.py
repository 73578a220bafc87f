"""The run-time detector: one frame in, particle instance labels out (no torch).

``Detector(engine, card).detect(image)`` normalises the frame (``service.preprocess``), resamples
it by the working-scale factor, pads it to the network stride, runs the engine, brings the
foreground/core logits back to the frame's own pixel grid and turns them into instances
(``service.instances``). Labels are always on the original frame's grid. When the frame was
resampled, the foreground logits are resampled to the whole frame (outlines at full
resolution) but the core logits only at the block centres the post-processing reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.engines.base import Engine
from service.errors import ConfigError, EngineFailure, ModelCardError
from service.instances import block_centres, instances_from_logits
from service.modelcard import ModelCard
from service.preprocess import check_frame, normalize, pad_to_multiple, resize_bilinear

__all__ = ["Detection", "Detector"]


@dataclass
class Detection:
    """Instances found in one frame."""

    labels: np.ndarray  # int32 (H, W) on the original frame's grid, 0 = background, 1..n
    scores: np.ndarray  # float32 (n + 1,), scores[k] = confidence of particle k, scores[0] = 0
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess, engine, postprocess

    @property
    def n(self) -> int:
        """Return the number of particles."""
        return int(self.scores.size - 1)


class Detector:
    """Runs a detection-segmentation model (ONNX via an Engine) described by its model card."""

    def __init__(self, engine: Engine, card: ModelCard, *, scale: float | None = None) -> None:
        if card.task != "detection-segmentation" or card.thresholds is None \
                or card.working_scale is None:
            raise ModelCardError(f"model card {card.name!r} has task {card.task!r}, "
                                 "not a detection-segmentation model with thresholds")
        self.engine = engine
        self.card = card
        self.scale = float(card.working_scale.default_resample if scale is None else scale)
        if not 0.05 <= self.scale <= 8.0:
            raise ConfigError(f"detector scale {self.scale} must be within [0.05, 8]")
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
        self.thresholds = card.thresholds

    def detect(self, image: np.ndarray) -> Detection:
        """Return the particle instances of ``image`` (2-D, any real dtype, finite).

        Raises FrameError for a non-2-D, empty or non-finite frame, EngineFailure when the
        engine output is not what the model card promises.
        """
        t0 = time.perf_counter()
        arr = check_frame(image)
        h, w = arr.shape
        x = normalize(arr)
        if self.scale != 1.0:
            wh = max(1, round(h * self.scale))
            ww = max(1, round(w * self.scale))
            x = resize_bilinear(x, (wh, ww))
        else:
            wh, ww = h, w
        x, _ = pad_to_multiple(x, self.stride)
        t1 = time.perf_counter()
        outputs = self.engine.infer({self.input_name: x[None, None]})
        t2 = time.perf_counter()
        logits = outputs.get(self.output_name)
        if logits is None or logits.ndim != 4 or logits.shape[2:] != x.shape:
            got = None if logits is None else logits.shape
            raise EngineFailure(f"engine output {self.output_name!r} has shape {got}, expected "
                                f"(1, C, {x.shape[0]}, {x.shape[1]})")
        # views, no copies: the post-processing reads the padded output in place
        fg = logits[0, self._fg, :wh, :ww]
        core = logits[0, self._core, :wh, :ww]
        th = self.thresholds
        stride = th.post_stride
        if (wh, ww) != (h, w):
            # after upsampling small particles cover few frame pixels: keep full resolution
            stride = th.post_stride if self.scale <= 1.0 else 1
            fg = resize_bilinear(fg, (h, w))
            # the core is only read at the block centres: resample just those
            core = resize_bilinear(core, (h, w), rows=block_centres(h, stride),
                                   cols=block_centres(w, stride))
        labels, scores = instances_from_logits(
            fg, core, foreground=th.foreground, core=th.core, min_area_px=th.min_area_px,
            min_core_px=th.min_core_px, post_stride=stride, merge_contact=th.merge_contact)
        t3 = time.perf_counter()
        return Detection(labels, scores, {"preprocess": (t1 - t0) * 1e3,
                                          "engine": (t2 - t1) * 1e3,
                                          "postprocess": (t3 - t2) * 1e3})
