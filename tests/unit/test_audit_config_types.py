"""TOML has real types: a configuration value of another type is refused, naming the key, the
value given and the type expected, never converted (``"0.5"`` for a float, ``"no"`` or 0 for a
bool, 2.5 for an int); arrays, paths and the command line's typed overrides still load."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoscout.daemon.config import ServeConfig, load_config
from nanoscout.wire.errors import ConfigError


def _load(tmp_path: Path, text: str, overrides: dict[str, object] | None = None
          ) -> ServeConfig:
    f = tmp_path / "nanoscout.toml"
    f.write_text(text, encoding="utf-8")
    return load_config(f, overrides)


@pytest.mark.parametrize(("text", "key", "given", "expected"), [
    ('[engine]\nscore_cut = "0.5"', "engine.score_cut", "'0.5' (a string)", "number"),
    ('[input]\ndrain_s = "5"', "input.drain_s", "'5' (a string)", "number"),
    ('[engine]\nscale = "0.5"', "engine.scale", "'0.5' (a string)", "number or 'auto'"),
    ("[input]\nqueue_size = 2.5", "input.queue_size", "2.5 (a float)", "integer"),
    ("[engine]\ntile_px = 512.0", "engine.tile_px", "512.0 (a float)", "integer"),
    ('[metrics]\nport = "9108"', "metrics.port", "'9108' (a string)", "integer"),
    ('[classify]\nenabled = "no"', "classify.enabled", "'no' (a string)", "boolean"),
    ("[classify]\ncam = 0", "classify.cam", "0 (an integer)", "boolean"),
    ('[engine]\nmultiscale = "yes"', "engine.multiscale", "'yes' (a string)", "boolean"),
    ("[metrics]\nallow_remote = 1", "metrics.allow_remote", "1 (an integer)", "boolean"),
    ('[stats]\nwindow_frames = "50"', "stats.window_frames", "'50' (a string)", "integer"),
    ("[tracking]\nenabled = 1", "tracking.enabled", "1 (an integer)", "boolean"),
    ("[clusters]\nk = 3.0", "clusters.k", "3.0 (a float)", "integer"),
    ('[preview]\nmax_rate_hz = "2"', "preview.max_rate_hz", "'2' (a string)", "number"),
    ("[review]\ndirectory = 5", "review.directory", "5 (an integer)", "path"),
    ("[engine]\nbackend = 3", "engine.backend", "3 (an integer)", "string"),
    ("[engine]\ntta = true", "engine.tta", "True", "1, 2 or 4"),
    ('[engine]\nscale_presets = [[0.5, "1.0"]]', "engine.scale_presets.0.1", "'1.0' (a string)",
     "number"),
    ('[engine]\nparticle_size_nm = [2, "20"]', "engine.particle_size_nm.1", "'20' (a string)",
     "number"),
    ('[stats]\necd_range_nm = [1, "100"]', "stats.ecd_range_nm.1", "'100' (a string)", "number"),
])
def test_a_value_of_another_type_is_refused_naming_key_value_and_type(
        tmp_path: Path, text: str, key: str, given: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    msg = str(exc.value)
    assert str(tmp_path / "nanoscout.toml") in msg and f"{key}: " in msg, msg
    assert given in msg and expected in msg, msg


def test_arrays_paths_integers_for_floats_and_typed_overrides_still_load(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[input]\ndrain_s = 5\n[engine]\nscale = 1\n'
                          'scale_presets = [[0.5, 1], [2.0, 0.25]]\nparticle_size_nm = [2, 20.5]\n'
                          'model = "det.onnx"\nmodality_models = {STEM = "stem.onnx"}\n'
                          '[query]\nmodel_dirs = ["models"]\n[review]\ndirectory = "rev"\n'
                          '[stats]\necd_range_nm = [1, 100]\n',
                # as the command line gives them: typer has converted each flag to its type
                {"engine.threads": 2, "engine.scale": 0.5, "input.policy": "lossless",
                 "metrics.enabled": False, "health.interval_s": 2.0,
                 "engine.particle_size_px": (4.0, 40.0), "engine.tta": 2})
    assert cfg.input.drain_s == 5.0 and isinstance(cfg.input.drain_s, float)
    eng = cfg.engine
    assert eng.scale_presets == [(0.5, 1.0), (2.0, 0.25)]
    assert eng.particle_size_nm == (2.0, 20.5) and eng.particle_size_px == (4.0, 40.0)
    assert eng.model == tmp_path / "det.onnx" and eng.modality_models == {
        "STEM": tmp_path / "stem.onnx"}
    assert eng.threads == 2 and eng.scale == 0.5 and eng.tta == 2
    assert cfg.query.model_dirs == [tmp_path / "models"]
    assert cfg.review.directory == Path("rev")
    assert cfg.stats.ecd_range_nm == (1.0, 100.0)
    assert cfg.metrics.enabled is False and cfg.input.policy == "lossless"


def test_a_wrong_type_from_an_override_is_named_as_the_command_line_s(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine\.threads \(from the command line\): expected "
                                          r"a valid integer, got '4' \(a string\)"):
        _load(tmp_path, "", {"engine.threads": "4"})


def test_a_tile_no_larger_than_its_margins_is_a_configuration_error(tmp_path: Path) -> None:
    # the detector refused it after its engine had loaded; the default tile (2304) counts too
    with pytest.raises(ConfigError, match=r"engine\.tile_px 128 must be more than twice "
                                          r"engine\.tile_margin_px 96"):
        _load(tmp_path, "[engine]\ntile_px = 128\n")
    with pytest.raises(ConfigError, match=r"engine\.tile_px 2304 \(the default\)"):
        _load(tmp_path, "[engine]\ntile_margin_px = 1152\n")


def test_a_misspelt_backend_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"engine\.backend: unknown engine backend 'onnx'"):
        _load(tmp_path, '[engine]\nbackend = "onnx"\n')
