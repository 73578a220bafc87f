"""Composition of the daemon from a :class:`~nanoscout.daemon.config.ServeConfig`: engine + model card →
detector → pipeline → daemon, and the blocking ``serve`` entry point with signal handling."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from nanoscout.analysis.alerts import check_class_labels, check_rule_inputs, parse_rules
from nanoscout.analysis.classifier import FieldClassifier
from nanoscout.analysis.detector import Detector, base_detector_for, scale_measurer
from nanoscout.analysis.modality import ModalityEstimator
from nanoscout.analysis.modelcard import ModelCard
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.daemon import collector
from nanoscout.daemon.config import TILE_PX, ServeConfig
from nanoscout.daemon.daemon import Daemon, Endpoints
from nanoscout.daemon.engine_setup import make_engine
from nanoscout.daemon.hotswap import probe_detector
from nanoscout.daemon.precision import engine_name, int8_measures_fp32
from nanoscout.engines import Engine, resolve_backend
from nanoscout.stopping import StopEvent
from nanoscout.wire.errors import EngineError, ModelCardError

log = logging.getLogger("nanoscout")


def card_path(model: Path) -> Path:
    """The model card that belongs to an ONNX file: same name, ``.json``."""
    return model.with_suffix(".json")


def load_card(model: Path) -> ModelCard:
    """The validated model card of an ONNX file (its sha256 checked)."""
    card_file = card_path(model)
    if not card_file.exists():
        raise ModelCardError(f"model card {card_file} is missing (every model ships with one)")
    return ModelCard.load(card_file)


def build_classifier(config: ServeConfig) -> FieldClassifier | None:
    """Load the field-of-view classifier (and the lens) as ``[classify]`` says, or None."""
    cc = config.classify
    check_rule_inputs(parse_rules(config.alerts), classifier=cc.enabled,
                      lens=cc.enabled and cc.lens_enabled)
    if not cc.enabled:
        return None
    eng = config.engine

    def load(model: Path) -> tuple[ModelCard, Engine]:
        card = load_card(model)
        size = card.input.size or (256, 256)
        return card, make_engine(eng, model, device=cc.device,
                                 max_shape=(int(size[0]), int(size[1])))

    card, engine = load(cc.model_path())
    lens_card = lens = None
    if cc.lens_enabled:
        lens_card, lens = load(cc.lens_path())
    classifier = FieldClassifier(engine, card, lens=lens, lens_card=lens_card, top_k=cc.top_k,
                                 cam=cc.cam)
    check_class_labels(parse_rules(config.alerts), classifier.classes)
    return classifier


def build_detector(config: ServeConfig, model: Path) -> tuple[Detector, str, str]:
    """Load one detection model as ``[engine]`` says; returns (detector, engine name,
    model name:version)."""
    eng = config.engine
    card = load_card(model)
    confidence = eng.min_confidence
    if (confidence is not None and card.score_calibration is None
            and eng.modality_models is None
            and model == eng.modality_model_paths().get("STEM")):
        # the shipped STEM detector, added for STEM frames without being asked for, has no
        # calibration: it keeps its card's raw cut (an explicitly named model gets the error)
        log.warning("min_confidence %s: the STEM detector %s has no score_calibration; its "
                    "frames keep the card's raw score cut %s (set [engine] modality_models "
                    "= {} to analyse every frame with %s)", confidence, model,
                    card.thresholds.min_score if card.thresholds else None, eng.model_path())
        confidence = None
    # every engine call of the detector is at most one batch of tiles of tile_px (a TensorRT
    # plan is built for that shape: the default tile of a GPU engine)
    batch = eng.tile_batch or 4
    plan_tile = eng.tile_px or TILE_PX
    engine = make_engine(eng, model, max_shape=(plan_tile, plan_tile), max_batch=batch)
    if eng.tile_batch is None and engine.name not in ("tensorrt", "onnxruntime-cuda"):
        batch = 1  # batches pay on a local GPU; on the CPU they cost memory (Triton batches itself)
    tile = eng.tile_for(engine.name, getattr(engine, "precision", "fp32"))
    base = None
    try:
        base = _base_detector(config, card, model, tile, batch)
        if base is None and getattr(engine, "precision", "fp32") == "int8" \
                and int8_measures_fp32(model):
            # the sibling analyses, the FP32 model measures the working scale (its parity
            # was measured so: quantization.fp32_scale)
            fp32 = make_engine(eng.model_copy(update={"precision": "fp32"}), model,
                               max_shape=(plan_tile, plan_tile), max_batch=batch)
            try:
                base = scale_measurer(fp32, card, tile_px=tile,
                                      tile_margin_px=eng.tile_margin_px, tile_batch=batch)
            except BaseException:
                fp32.close()
                raise
        detector = Detector(engine, _analysis_card(engine, model, card), scale=eng.scale,
                            auto_every=eng.auto_scale_every,
                            tile_px=tile, tile_margin_px=eng.tile_margin_px,
                            tta=eng.tta, merge_convex=eng.merge_convex, min_score=eng.score_cut,
                            min_confidence=confidence,
                            rotate45=eng.rotate45 == "always",
                            scale_presets=tuple(eng.scale_presets), tile_batch=batch,
                            scale_tolerance=eng.scale_tolerance, multiscale=eng.multiscale,
                            base_detector=base)
    except BaseException:
        engine.close()
        if base is not None:
            base.close()
        raise
    return detector, engine_name(engine), f"{card.name}:{card.version}"


#: the card fields that say how a network's output is analysed (not which file it is)
_ANALYSIS_FIELDS = ("normalization", "working_scale", "thresholds", "score_calibration")


def _analysis_card(engine: Engine, model: Path, card: ModelCard) -> ModelCard:
    """``card`` (the served model's: its name, version and sha256 name the frames and
    identify the model to hot swaps) with the analysis settings of its INT8 sibling's own
    card where ONNX Runtime runs the sibling (``engine.model_path``): the sibling's parity and
    held-out numbers were measured with those (the STEM sibling's card leaves out the FP32
    card's low-dose smoothing). TensorRT builds its INT8 engine from ``model`` itself, and an
    FP32 engine runs ``model``: ``card`` as it is."""
    ran = getattr(engine, "model_path", None)
    if ran is None or Path(ran) == model:
        return card
    sibling = load_card(Path(ran))
    return card.model_copy(update={k: getattr(sibling, k) for k in _ANALYSIS_FIELDS})


def _base_detector(config: ServeConfig, card: ModelCard, model: Path, tile_px: int,
                   batch: int) -> Detector | None:
    """The detector of ``model``'s base network when its card names one (an adapted model's,
    :class:`~nanoscout.analysis.modelcard.BaseNetwork`: it measures particle sizes for the
    working scale, and may detect too), on an engine as ``[engine]`` says (a local one where
    the backend is Triton, whose server does not hold it); None when the card names none."""
    eng = config.engine
    if resolve_backend(eng.backend) == "triton":
        eng = eng.model_copy(update={"backend": eng.triton.fallback or "onnxruntime-cpu"})
    plan_tile = eng.tile_px or TILE_PX
    return base_detector_for(
        card, card_path(model),
        lambda onnx: make_engine(eng, onnx, max_shape=(plan_tile, plan_tile), max_batch=batch),
        tile_px=tile_px, tile_margin_px=eng.tile_margin_px, tile_batch=batch, tta=eng.tta)


def build_pipeline(config: ServeConfig, *, offline: bool = False, track: bool = False
                   ) -> Pipeline:
    """Load the detection models with the configured backend and assemble the pipeline.

    ``offline``: for image files (``nanoscout measure``): no previews, and every image gets its
    own working scale; independent images are not tracked unless ``track`` (an ordered
    sequence: ``measure --track``)."""
    detector, engine_name, model_name = build_detector(config, config.engine.model_path())
    by_modality = {}
    for modality, path in config.engine.modality_model_paths().items():
        det, _, name = build_detector(config, path)
        by_modality[modality] = (det, name)
    return Pipeline(
        detector,
        stats_config=config.stats,
        rules=config.alerts,
        engine_name=engine_name,
        model_name=model_name,
        classifier=build_classifier(config),
        classify_every=config.classify.every,
        clusters=config.clusters,
        preview=None if offline else config.preview,
        max_sources=config.input.max_sources,
        stream_scale=not offline,
        rotate45_on_request=config.engine.rotate45 == "on-request",
        modality_detectors=by_modality,
        modality_estimator=(ModalityEstimator.shipped()
                            if by_modality and config.engine.estimate_modality else None),
        tracking=config.tracking if (track or not offline) else None,
        particle_size_nm=config.engine.particle_size_nm,
        particle_size_px=config.engine.particle_size_px,
    )


def _probe_detectors(config: ServeConfig, pipeline: Pipeline) -> None:
    """Raise EngineError unless every detection model of ``pipeline`` detects on a probe frame
    (as a hot swap checks a new one): a model that is no detector under a detection card
    would otherwise be READY and drop every frame (``engine_failure``)."""
    models = [(config.engine.model_path(), pipeline.detector)]
    paths = config.engine.modality_model_paths()
    models += [(paths[m], det) for m, (det, _) in pipeline.modality_detectors.items()]
    for path, detector in models:
        why = probe_detector(detector)
        if why is not None:
            raise EngineError(f"detection model {path} {why}: not starting with it")


def serve(
    config: ServeConfig,
    *,
    on_ready: Callable[[Endpoints], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the daemon until SIGINT/SIGTERM (or ``stop``); lossless mode drains before exiting.

    ``on_ready`` receives the bound endpoints once the daemon accepts frames.
    """
    pipeline = build_pipeline(config)
    try:
        _probe_detectors(config, pipeline)
    except BaseException:
        pipeline.close()
        raise
    # the hot swap loads new detection models exactly as the daemon loaded its own
    daemon = Daemon(config, pipeline, build=lambda model: build_detector(config, model))
    daemon.metrics.set_thresholds(config.metrics.thresholds())
    stop = stop or threading.Event()
    # SIGINT / SIGTERM only record the request (nanoscout.stopping: a handler that set an
    # event the main thread waits on could deadlock); the loop below acts on it
    signalled = StopEvent()
    if signalled.on_signals():
        # the daemon's own process: start-up's objects frozen, full collections rare (see the
        # module); a daemon run in a thread of another program leaves that program's
        # collector as it is
        collector.settle()
    endpoints = daemon.start()
    if on_ready is not None:
        on_ready(endpoints)
    try:
        while not (signalled.wait(0.2) or stop.is_set()):
            daemon.maybe_raise()
            if not daemon.running():
                break
        if signalled.signal is not None:
            log.info("signal %d: stopping (policy %s)", signalled.signal, config.input.policy)
    finally:
        daemon.close(timeout=120)
        pipeline.close()
    log.info(
        "stopped: %d frames received, %d processed, dropped %s, rejected %s",
        daemon.received, daemon.processed, daemon.dropped, daemon.rejected,
    )


def ready_line(endpoints: Endpoints) -> str:
    """The machine-readable readiness line printed by ``nanoscout serve``."""
    return "NANOSCOUT-READY " + json.dumps(
        {"input": endpoints.input, "output": endpoints.output, "metrics": endpoints.metrics_url,
         "query": endpoints.query}
    )
