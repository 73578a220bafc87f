"""Hot swap of the daemon's detection model: load, check, probe, switch between two frames.

A ``swap_model`` control request (:class:`~nanoscout.wire.protocol.ControlRequest`) names an
ONNX file with its model card beside it (``NAME.onnx`` + ``NAME.json``, as ``nanoscout models
adapt`` writes them and as the shipped models are), or the card, and the sha256 the client
expects of the ONNX file. :meth:`ModelSwapper.swap` runs on the query socket's thread, never
on the worker's:

1. **resolve**: the ONNX file and its card must both exist, beside each other, and the card
   must name that file and be a ``detection-segmentation`` card;
2. **check**: the file's sha256 must be the one asked for, and the card's (the card is loaded
   with its own sha256 check);
3. **load**: the engine and :class:`~nanoscout.analysis.detector.Detector` as ``[engine]`` says
   (the daemon's ``build`` callable, the same code as at start);
4. **probe**: the new detector analyses a probe frame — the newest raw frame kept for review
   (:mod:`nanoscout.daemon.review`), or a synthetic 256² frame of bright disks when none is
   kept — and must return a label map of the frame's shape and finite scores;
5. **switch**: the loaded model is handed to the worker, which installs it between two frames
   (:meth:`ModelSwapper.install_pending`, then
   :meth:`Pipeline.replace_detector <nanoscout.analysis.pipeline.Pipeline.replace_detector>`):
   no frame is lost and none is analysed half by one model and half by the other. The reply
   is sent once the worker switched.

A swapped-in model analyses every frame, whatever its modality: the detectors of single
modalities the daemon started with (the shipped STEM detector for STEM frames when ``[engine]
model`` is not set) step aside, and come back with a revert to the start. Anything failing on
the way raises :class:`SwapError` with what failed; the model in use is
not touched (a loaded engine is closed again): that is the rollback. ``revert_model`` goes
back to the model before the last swap (a stack of at most ``history`` models is kept loaded,
so a revert needs no load). Swaps and failures are counted for health and Prometheus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanoscout.analysis.detector import Detector
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.modelcard import ModelCard, sha256_file
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.wire.errors import NanoscoutError

__all__ = ["FAILURE_STEPS", "MAX_MODEL_BYTES", "LoadedModel", "ModelSwapper", "SwapError",
           "probe_detector", "resolve_model", "synthetic_probe"]

log = logging.getLogger("nanoscout.hotswap")

#: the steps at which a swap or a revert can fail, by action: the ``step`` label of the
#: daemon's nanoscout_model_swap_failures_total (every pair exists at zero from the start)
FAILURE_STEPS: dict[str, tuple[str, ...]] = {
    "swap": ("resolve", "sha256", "card", "load", "probe", "switch"),
    "revert": ("history", "switch"),
}

#: builds (detector, engine name, "name:version") from an ONNX file, as at start
Build = Callable[[Path], tuple[Detector, str, str]]


class SwapError(NanoscoutError, ValueError):
    """A swap or revert that was refused; the model in use is unchanged. The message says
    which step failed and why."""


@dataclass(frozen=True)
class LoadedModel:
    """A detection model loaded and ready: its detector, engine, card name:version, the ONNX
    file and its sha256 (64 hex); ``modality_detectors``: the detectors of single modalities
    that go with it (those the daemon started with; a swapped-in model has none)."""

    detector: Detector
    engine_name: str
    name: str
    path: Path
    sha256: str
    modality_detectors: dict[str, tuple[Detector, str]] = field(default_factory=dict)

    @property
    def short_sha256(self) -> str:
        """The first 12 hex digits of the sha256 (what ``det.model_sha256`` carries)."""
        return self.sha256[:12]

    def close(self) -> None:
        """Release the engines (a failure to is logged: it must not hide why a swap failed)."""
        for det in (self.detector, *(d for d, _ in self.modality_detectors.values())):
            try:
                det.close()
            except Exception as exc:
                log.warning("closing the engine of %s: %r", self.path, exc)


#: an ONNX file is a protobuf, which cannot exceed 2 GiB: a larger file is not hashed
MAX_MODEL_BYTES = 2**31


def resolve_model(model: str | Path, roots: Sequence[Path] = ()) -> tuple[Path, Path]:
    """(ONNX file, card) of ``model``: an ``.onnx`` file with ``.json`` beside it, or the
    ``.json`` card of one. SwapError naming the missing or mismatched file.

    A name with another suffix is refused before the file system is asked anything, so the
    control socket cannot be used to probe for other files. ``roots``: the folders a model
    must lie in, symbolic links resolved (empty: any folder).
    """
    p = Path(model).expanduser()
    if p.suffix.lower() not in (".onnx", ".json"):
        raise SwapError(f"{str(model)[:200]!r} is not a model: give NAME.onnx (with its card "
                        "NAME.json beside it) or the card NAME.json")
    _check_inside(p, roots)
    if p.suffix.lower() == ".json":
        card_file = p
        if not card_file.is_file():
            raise SwapError(f"model card {card_file} does not exist")
        try:
            card = ModelCard.load(card_file, verify_sha256=False)
        except Exception as exc:
            raise SwapError(f"model card {card_file} is not valid: {exc}") from exc
        onnx = card.onnx_path(card_file)
        if onnx.with_suffix(".json").resolve() != card_file.resolve():
            raise SwapError(f"model card {card_file} names {onnx}, whose card would be "
                            f"{onnx.with_suffix('.json')}: keep NAME.onnx and NAME.json together")
    else:
        onnx, card_file = p, p.with_suffix(".json")
    if not onnx.is_file():
        raise SwapError(f"model file {onnx} does not exist")
    if not card_file.is_file():
        raise SwapError(f"model card {card_file} is missing (every model comes with its card "
                        f"beside it: {onnx.stem}.json)")
    _check_inside(onnx, roots)  # a card's model file may be a link to elsewhere
    if onnx.stat().st_size > MAX_MODEL_BYTES:
        raise SwapError(f"model file {onnx} is larger than an ONNX file can be (2 GiB)")
    return onnx, card_file


def _check_inside(path: Path, roots: Sequence[Path]) -> None:
    """SwapError unless ``path`` (symbolic links resolved) lies in one of ``roots`` (none:
    anywhere)."""
    if roots and not any(path.resolve().is_relative_to(r.expanduser().resolve())
                         for r in roots):
        raise SwapError(f"{path} is not in a model folder of this daemon ([query] model_dirs: "
                        f"{', '.join(str(r) for r in roots)})")


def synthetic_probe(side: int = 256) -> Frame:
    """A synthetic probe frame: dark background, nine bright disks of 6-14 px radius, mild
    noise (uint16), 1 nm per px."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    img = rng.normal(200.0, 20.0, (side, side))
    for k in range(9):
        cy, cx = (k // 3 + 0.5) * side / 3, (k % 3 + 0.5) * side / 3
        r = 6 + k
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 1500.0
    return Frame.from_image(np.clip(img, 0, 65535).astype(np.uint16), pixel_size_nm=1.0,
                            source="probe")


def probe_detector(detector: Detector, frame: Frame | None = None) -> str | None:
    """Run ``detector`` on ``frame`` (None: :func:`synthetic_probe`) and return why it cannot
    serve ("failed on a probe frame ...": it raised; "gave a ... label map / non-finite
    scores ...": its output is not a detection of the frame), or None when it can. A model
    that is no detection model under a detection card fails here rather than on every frame
    it is given (a swap refuses it; ``serve`` does not start with it)."""
    frame = frame if frame is not None else synthetic_probe()
    try:
        det = detector.detect(frame.pixels, pixel_size_nm=frame.header.pixel_size_nm)
    except Exception as exc:
        return f"failed on a probe frame ({frame.source}#{frame.header.seq}): {exc}"
    if det.labels.shape != frame.pixels.shape or not np.isfinite(det.scores).all():
        return (f"gave a {det.labels.shape} label map / non-finite scores on a "
                f"{frame.pixels.shape} probe frame")
    return None


class ModelSwapper:
    """Swaps, reverts and their bookkeeping; the worker installs what it hands over."""

    def __init__(self, pipeline: Pipeline, build: Build | None, current: LoadedModel, *,
                 probe: Callable[[], Frame | None] | None = None, history: int = 4,
                 on_swap: Callable[[str], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None,
                 model_dirs: Sequence[Path] = ()) -> None:
        """``build``: loads a model as at start (None: swaps are refused); ``current``: the
        model the pipeline runs now; ``probe``: the newest raw frame, if any; ``history``:
        models kept loaded for ``revert_model``. ``on_swap(action)`` / ``on_failure(action,
        step)``: counters. ``model_dirs``: the folders swapped-in models must lie in (empty:
        any; :func:`resolve_model`)."""
        self.pipeline = pipeline
        self.build = build
        self.current = current
        self.probe = probe
        self.history = max(1, history)
        self.model_dirs = tuple(model_dirs)
        self._previous: list[LoadedModel] = []
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._lock = threading.Lock()  # one swap or revert at a time
        self._handover = threading.Lock()  # the pending slot, shared with the worker
        self._pending: tuple[LoadedModel, threading.Event] | None = None
        self.swaps = 0
        self.failures = 0
        self.last_swap_ms: float | None = None

    # ------------------------------------------------------------------ control thread
    def swap(self, model: str | Path, sha256: str, *, timeout: float = 30.0) -> LoadedModel:
        """Load, check and probe ``model`` and switch to it (see the module docstring);
        returns the model now serving. SwapError (model unchanged) when anything fails."""
        with self._lock:
            t0 = time.perf_counter()
            step = "resolve"
            loaded: LoadedModel | None = None
            try:
                if self.build is None:
                    raise SwapError("this daemon cannot load models (no model loader)")
                onnx, card_file = resolve_model(model, self.model_dirs)
                step = "sha256"
                digest = sha256_file(onnx)
                if digest != sha256:
                    raise SwapError(f"sha256 of {onnx} is {digest}, the request expected "
                                    f"{sha256}: not swapping")
                step = "card"
                try:
                    card = ModelCard.load(card_file)
                except Exception as exc:
                    raise SwapError(f"model card {card_file}: {exc}") from exc
                if card.task != "detection-segmentation":
                    raise SwapError(f"model card {card_file} is a {card.task!r} model, not a "
                                    "detection-segmentation one")
                try:  # an adapted model's base network, beside it
                    base = card.load_base_network(card_file)
                except Exception as exc:
                    raise SwapError(f"model card {card_file}: {exc}") from exc
                if base is not None:
                    _check_inside(base[0], self.model_dirs)
                step = "load"
                try:
                    detector, engine_name, name = self.build(onnx)
                except Exception as exc:
                    raise SwapError(f"cannot load {onnx}: {exc}") from exc
                loaded = LoadedModel(detector, engine_name, name, onnx, digest)
                step = "probe"
                self._probe(loaded)
                step = "switch"
                self._install(loaded, timeout)
            except Exception as exc:
                if loaded is not None:
                    loaded.close()
                err = exc if isinstance(exc, SwapError) else SwapError(
                    f"swap failed at {step}: {exc!r}")
                self._failed("swap", step, err)
                if err is exc:
                    raise
                raise err from exc
            old = self.current
            self.current = loaded
            self._previous.append(old)
            while len(self._previous) > self.history:
                self._previous.pop(0).close()
            self._done("swap", t0)
            return loaded

    def revert(self, *, timeout: float = 30.0) -> LoadedModel:
        """Go back to the model before the last swap; returns it. SwapError when there is
        none (the model in use is unchanged)."""
        with self._lock:
            t0 = time.perf_counter()
            if not self._previous:
                err = SwapError(f"no earlier model to revert to ({self.current.name} "
                                f"{self.current.short_sha256} has served since start)")
                self._failed("revert", "history", err)
                raise err
            target = self._previous[-1]
            try:
                self._install(target, timeout)
            except SwapError as exc:
                self._failed("revert", "switch", exc)
                raise
            self._previous.pop()
            dropped, self.current = self.current, target
            dropped.close()
            self._done("revert", t0)
            return target

    def _probe(self, loaded: LoadedModel) -> None:
        frame = self.probe() if self.probe is not None else None
        why = probe_detector(loaded.detector, frame)
        if why is not None:
            raise SwapError(f"the new model {why}")

    def _install(self, model: LoadedModel, timeout: float) -> None:
        """Hand ``model`` to the worker and wait until it switched (SwapError after
        ``timeout`` s: then it is taken back, never installed later)."""
        done = threading.Event()
        with self._handover:
            self._pending = (model, done)
        if done.wait(timeout):
            return
        with self._handover:
            if self._pending is not None and self._pending[1] is done:
                self._pending = None
                raise SwapError(f"the worker did not switch within {timeout:g} s (is it "
                                "stopped or stuck on a frame?); the model in use is unchanged")
        # the worker switched just as the wait ended

    def _failed(self, action: str, step: str, why: SwapError) -> None:
        assert step in FAILURE_STEPS[action], (action, step)  # a series that exists at zero
        log.warning("%s refused at step %s (the model in use is unchanged): %s", action, step, why)
        self.failures += 1
        if self._on_failure is not None:
            self._on_failure(action, step)

    def _done(self, action: str, t0: float) -> None:
        self.swaps += 1
        self.last_swap_ms = (time.perf_counter() - t0) * 1e3
        if self._on_swap is not None:
            self._on_swap(action)
        log.info("%s: %s (%s, sha256 %s, generation %d) serves now (%.0f ms)", action,
                 self.current.name, self.current.path, self.current.short_sha256,
                 self.pipeline.model_generation, self.last_swap_ms)

    def close(self) -> None:
        """Release the engines of the models kept for revert (not the one serving: the
        pipeline closes it)."""
        with self._lock:
            for model in self._previous:
                if model.detector is not self.current.detector:
                    model.close()
            self._previous.clear()

    # ------------------------------------------------------------------ worker thread
    def install_pending(self) -> bool:
        """Switch the pipeline to the model handed over, if any (the worker, between two
        frames); True when it switched."""
        if self._pending is None:
            return False
        with self._handover:
            if self._pending is None:
                return False
            model, done = self._pending
            self._pending = None
            self.pipeline.replace_detector(model.detector, model_name=model.name,
                                           engine_name=model.engine_name,
                                           modality_detectors=model.modality_detectors)
            done.set()
        return True
