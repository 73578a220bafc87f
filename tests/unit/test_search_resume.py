"""What cannot be resumed is refused before any frame (``nanoscout search --resume``); the
resumed searches themselves run in ``tests/system/test_search_resume.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoscout.clients.search.resume import load_earlier
from nanoscout.clients.search.strategies import Prior, run_search
from nanoscout.wire.errors import ConfigError
from tests.unit.test_search_strategies import TARGETS, FakeSession, as_session, make_cfg


def test_an_adaptive_search_cannot_be_resumed() -> None:
    """Its confirmations are chosen from the whole survey's candidates: refused, no frame."""
    fake = FakeSession(list(TARGETS))
    with pytest.raises(ConfigError, match="adaptive search cannot be resumed.*--strategy raster"):
        run_search("adaptive", as_session(fake), make_cfg(), prior=Prior((), (6.4, 6.4)))
    assert fake.shots == []


def test_a_search_json_without_its_sweep_cannot_be_resumed(tmp_path: Path) -> None:
    """A search.json written before searches could be resumed does not say which tiles were
    imaged: refused, naming the file."""
    path = tmp_path / "search.json"
    path.write_text(json.dumps({
        "search": {"strategy": "raster", "stopped": "interrupted", "frames": 3},
        "area_um": [0, 40, 0, 40], "config": {"overlap_um": 3.0}}), encoding="utf-8")
    (tmp_path / "targets.json").write_text('{"targets": [], "meta": {}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"--resume {path}: it records no sweep"):
        load_earlier(path)
    with pytest.raises(ConfigError, match="cannot read the earlier search"):
        load_earlier(tmp_path / "missing.json")
