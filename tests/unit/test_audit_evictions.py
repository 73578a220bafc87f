"""A frame whose analysis raises still reports the sources it evicted (long-run audit).

The pipeline forgets the least recently seen source when a new one comes beyond
``max_sources``, and reported it only in the frame's :class:`FrameResult`. When that frame's
engine failed (a Triton outage, a lost GPU), the eviction was lost, and the daemon kept the
evicted source's metric series and newest frame for good. Here the shipped detector's real
engine fails because it was closed, as a hot swap closes an engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanoscout.analysis.frame import Frame
from nanoscout.analysis.pipeline import Pipeline
from nanoscout.daemon.app import build_detector, build_pipeline
from nanoscout.daemon.config import ServeConfig, load_config
from nanoscout.sim.synthetic import SpecimenConfig, render
from nanoscout.wire.errors import EngineError

IMAGE = render(SpecimenConfig(shape=(128, 128), pixel_size_nm=0.5), 1).image


def _frame(source: str) -> Frame:
    return Frame.from_image(IMAGE, pixel_size_nm=0.5, source=source)


def _engine_lost(pipe: Pipeline) -> None:
    """The detector's engine goes away (every later frame raises EngineFailure)."""
    pipe.detector.close()


def _engine_back(pipe: Pipeline, config: ServeConfig) -> None:
    """A working detector again (as a hot swap installs one)."""
    det, engine, name = build_detector(config, config.engine.model_path())
    pipe.replace_detector(det, model_name=name, engine_name=engine)


def test_a_failed_frame_leaves_its_evictions_to_take_evicted() -> None:
    config = load_config(None, {"input.max_sources": 2, "classify.enabled": False,
                                "engine.threads": 1})
    pipe = build_pipeline(config)
    assert pipe.process(_frame("a")).evicted == []
    assert pipe.process(_frame("b")).evicted == []
    _engine_lost(pipe)
    for source in ("c", "d"):  # each new source evicts one, then its engine fails
        with pytest.raises(EngineError):
            pipe.process(_frame(source))
    assert pipe.sources == 2 and pipe.evicted_total == 2
    _engine_back(pipe, config)
    # not taken: the next result reports them with its own eviction
    result = pipe.process(_frame("e"))
    assert result.evicted == ["a", "b", "c"] and np.all(result.labels >= 0)
    _engine_lost(pipe)
    with pytest.raises(EngineError):
        pipe.process(_frame("f"))  # evicts d
    assert pipe.take_evicted() == ["d"]
    assert pipe.take_evicted() == []  # reported once
    with pytest.raises(EngineError):
        pipe.process(_frame("g"))  # evicts e
    with pytest.raises(EngineError):
        pipe.process(_frame("e"))  # e is back (evicting f): only f is gone now
    assert pipe.take_evicted() == ["f"]
    assert pipe.knows("e") and pipe.knows("g")
