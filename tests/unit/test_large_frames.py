"""A 4096² frame through the whole pipeline: tiles batched through the engine, seams invisible,
memory bounded (nanoscout.analysis.tiling, Detector, Pipeline). Speed is the latency
benchmark's business (benchmarks/latency.py --sizes 1024 2048 4096)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Mapping

import numpy as np

from nanoscout.analysis.detector import Detector
from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.engines.base import Engine, TensorSpec
from tests.unit.test_detector import _card

SIDE = 4096


class PixelEngine(Engine):
    """A per-pixel 'network' (foreground = core = bright pixels): its logits do not depend on
    context, so tiled and whole-frame inference agree exactly; records every call's shape."""

    name = "pixel"
    inputs = (TensorSpec("image", (None, 1, None, None), "float32"),)
    outputs = (TensorSpec("logits", (None, 2, None, None), "float32"),)

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["image"]
        self.calls.append(x.shape)
        fg = (x - np.float32(0.5)) * np.float32(20.0)
        return {"logits": np.concatenate([fg, fg], axis=1)}


def _discs(n_side: int = 40, radius: int = 18) -> tuple[np.ndarray, int]:
    """A uint16 4096² frame of n_side² bright discs on a grid (some on tile seams)."""
    img = np.full((SIDE, SIDE), 1000, np.uint16)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = yy * yy + xx * xx <= radius * radius
    step = SIDE // n_side
    for i in range(n_side):
        for j in range(n_side):
            r, c = i * step + step // 2, j * step + step // 2
            img[r - radius:r + radius + 1, c - radius:c + radius + 1][disc] = 3000
    return img, n_side * n_side


def test_a_4096_frame_goes_through_the_pipeline_in_batched_tiles() -> None:
    img, n_true = _discs()
    engine = PixelEngine()
    det = Detector(engine, _card(), scale=1.0, tile_px=2304, tile_margin_px=96, tile_batch=2)
    pipeline = Pipeline(det, model_name="pixel:0", engine_name="pixel")
    frame = Frame.from_image(img, pixel_size_nm=0.5, source="big")
    tracemalloc.start()
    try:
        result = pipeline.process(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # two 2144 px tiles per axis (9.6 % more pixels than the frame), two per engine call
    assert engine.calls == [(2, 1, 2144, 2144)] * 2
    # every disc found once, whole, wherever the seams cut it
    assert len(result.table) == n_true and result.labels.shape == (SIDE, SIDE)
    assert int(result.labels.max()) == n_true
    areas = np.bincount(result.labels.ravel())[1:]
    assert areas.min() == areas.max() == int((np.mgrid[-18:19, -18:19] ** 2).sum(0).__le__(324).sum())
    # memory: what numpy held at once stays within 10 frame-sized float32 maps (64 MiB each:
    # logits 2, a batch of tile logits 1.1, normalised frame 1, labels 1, masks); 406 MiB
    # (6.3 maps) when written
    assert peak < 10 * SIDE * SIDE * 4, f"peak {peak / 2**20:.0f} MiB"


def test_tile_batch_bounds_each_call() -> None:
    img, _ = _discs(8, 10)
    for batch, calls in ((1, [(1, 1, 2144, 2144)] * 4), (4, [(4, 1, 2144, 2144)])):
        engine = PixelEngine()
        Detector(engine, _card(), scale=1.0, tile_px=2304, tile_batch=batch).detect(img)
        assert engine.calls == calls


def test_the_default_tile_follows_the_engine_precision() -> None:
    """An INT8 engine on the CPU takes a 4096² frame in one call (8-bit activations); FP32 and
    GPU engines keep 2304 px tiles; a configured tile_px always wins."""
    from nanoscout.daemon.app import build_detector
    from nanoscout.daemon.config import TILE_PX, TILE_PX_INT8, EngineConfig, ServeConfig

    eng = EngineConfig()
    assert eng.tile_for("onnxruntime-cpu", "int8") == TILE_PX_INT8 >= SIDE + 2 * 96
    assert eng.tile_for("onnxruntime-cpu", "fp32") == TILE_PX
    assert eng.tile_for("tensorrt", "int8") == TILE_PX
    assert EngineConfig(tile_px=1024).tile_for("onnxruntime-cpu", "int8") == 1024
    # ("auto" takes the INT8 sibling only where its parity passed: test_quantize)
    for precision, name, tile in (("int8", "onnxruntime-cpu/int8", TILE_PX_INT8),
                                  ("fp32", "onnxruntime-cpu", TILE_PX)):
        config = ServeConfig.model_validate(
            {"engine": {"backend": "cpu", "threads": 1, "precision": precision}})
        det, engine_name, _ = build_detector(config, config.engine.model_path())
        assert (engine_name, det.tile_px) == (name, tile)
