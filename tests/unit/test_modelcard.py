"""Model cards: the shipped card validates; broken cards fail naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoscout.analysis.modelcard import ModelCard, sha256_file
from nanoscout.wire.errors import ModelCardError

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"


def _minimal(onnx_name: str = "m.onnx", sha: str = "0" * 64) -> dict[str, object]:
    return {
        "name": "t", "version": "1", "task": "detection-segmentation", "framework": "x",
        "opset": 17, "onnx_file": onnx_name, "sha256": sha,
        "input": {"name": "image", "stride_multiple": 16},
        "normalization": {},
        "outputs": [{"name": "logits", "channels": ["foreground", "core"]}],
        "working_scale": {"diameter_px_min": 4, "diameter_px_max": 80},
        "thresholds": {},
        "training": {"data": "synthetic", "command": "python -m nanoscout.training.train"},
        "created": "2025-01-01T00:00:00+00:00",
    }


def _write(tmp_path: Path, card: dict[str, object], payload: bytes = b"onnx") -> Path:
    (tmp_path / "m.onnx").write_bytes(payload)
    p = tmp_path / "m.json"
    p.write_text(json.dumps(card))
    return p


@pytest.mark.parametrize("name", ["detector.json", "detector_stem.json"])
def test_shipped_card_is_valid_and_matches_its_onnx(name: str) -> None:
    path = WEIGHTS / name
    if not path.is_file():
        pytest.skip(f"no shipped model card at {path} (run python -m nanoscout.training.train)")
    card = ModelCard.load(path)
    assert card.task == "detection-segmentation"
    assert card.opset >= 17 and card.input.channels == 1 and card.input.dtype == "float32"
    assert card.outputs[0].channels == ("foreground", "core")
    assert card.working_scale is not None and card.thresholds is not None
    assert card.metrics is not None and card.metrics.f1 >= 0.9, card.metrics
    assert card.metrics.median_abs_ecd_error_pct is not None
    assert card.metrics.median_abs_ecd_error_pct <= 5.0
    # one training command that fits this 2-core machine: both phases within an hour
    assert card.training.wall_seconds is not None and card.training.wall_seconds < 60 * 60
    assert {"512x512", "1024x1024", "2048x2048"} <= set(card.timings_ms)
    assert card.sha256 == sha256_file(card.onnx_path(path))
    if name == "detector_stem.json":  # its own command, and held-out numbers on STEM only
        assert card.training.command.endswith("--variant stem --out models/weights")
        assert set(card.metrics.real) == {"stem"} and card.name.endswith("-stem")


def test_round_trip(tmp_path: Path) -> None:
    payload = b"not really onnx"
    import hashlib

    p = _write(tmp_path, _minimal(sha=hashlib.sha256(payload).hexdigest()), payload)
    card = ModelCard.load(p)
    assert card.thresholds is not None and card.thresholds.post_stride == 2
    out = card.dump(tmp_path / "copy.json")
    assert ModelCard.load(out) == card


def test_sha_mismatch_and_missing_onnx(tmp_path: Path) -> None:
    p = _write(tmp_path, _minimal())
    with pytest.raises(ModelCardError, match="sha256 of"):
        ModelCard.load(p)
    assert ModelCard.load(p, verify_sha256=False).name == "t"
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(ModelCardError, match="does not exist"):
        ModelCard.load(p)


@pytest.mark.parametrize(("change", "named"), [
    ({"task": "painting"}, "task"),
    ({"opset": 3}, "opset"),
    ({"sha256": "xyz"}, "sha256"),
    ({"thresholds": None}, "working_scale and thresholds"),
    ({"outputs": [{"name": "logits", "channels": ["mask"]}]}, "foreground"),
    ({"working_scale": {"diameter_px_min": 90, "diameter_px_max": 80}}, "diameter_px_min"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_cards_name_the_field(tmp_path: Path, change: dict[str, object],
                                      named: str) -> None:
    card = _minimal()
    card.update(change)
    with pytest.raises(ModelCardError, match=named):
        ModelCard.load(_write(tmp_path, card), verify_sha256=False)


def test_missing_field_and_bad_files(tmp_path: Path) -> None:
    card = _minimal()
    del card["input"]
    with pytest.raises(ModelCardError, match="input"):
        ModelCard.load(_write(tmp_path, card), verify_sha256=False)
    with pytest.raises(ModelCardError, match="not found"):
        ModelCard.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelCardError, match="not readable JSON"):
        ModelCard.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ModelCardError, match="JSON object"):
        ModelCard.load(bad)


def test_a_base_network_is_a_pinned_detection_model_beside_the_card(tmp_path: Path) -> None:
    """``base_network`` (an adapted model's): a bare file name in the card's folder, its own
    card beside it, pinned by sha256; no chains."""
    import hashlib

    def write(name: str, payload: bytes, base: dict[str, str] | None = None) -> Path:
        card = _minimal(f"{name}.onnx", hashlib.sha256(payload).hexdigest())
        if base is not None:
            card["base_network"] = base
        (tmp_path / f"{name}.onnx").write_bytes(payload)
        (tmp_path / f"{name}.json").write_text(json.dumps(card))
        return tmp_path / f"{name}.json"

    base_sha = hashlib.sha256(b"base").hexdigest()
    write("base", b"base")
    main = ModelCard.load(write("m", b"adapted", {"onnx_file": "base.onnx", "sha256": base_sha}))
    onnx, est = main.load_base_network(tmp_path / "m.json")  # type: ignore[misc]
    assert onnx == tmp_path / "base.onnx" and est.sha256 == base_sha
    assert ModelCard.load(tmp_path / "base.json").load_base_network(tmp_path / "base.json") is None
    pinned_elsewhere = ModelCard.load(write("p", b"p", {"onnx_file": "base.onnx",
                                                         "sha256": "1" * 64}))
    with pytest.raises(ModelCardError, match="pins 1111"):
        pinned_elsewhere.load_base_network(tmp_path / "p.json")
    (tmp_path / "base.onnx").write_bytes(b"changed")  # no longer what its card says
    with pytest.raises(ModelCardError, match="sha256 of"):
        main.load_base_network(tmp_path / "m.json")
    write("base", b"base", {"onnx_file": "m.onnx", "sha256": main.sha256})  # a chain
    with pytest.raises(ModelCardError, match="without a base network of its own"):
        main.load_base_network(tmp_path / "m.json")
    for bad in ("../base.onnx", "sub/base.onnx", "base.json"):
        with pytest.raises(ModelCardError, match="base_network.onnx_file"):
            write("q", b"q", {"onnx_file": bad, "sha256": base_sha})
            ModelCard.load(tmp_path / "q.json")
    (tmp_path / "base.onnx").unlink()
    with pytest.raises(ModelCardError, match="does not exist"):
        main.load_base_network(tmp_path / "m.json")


def test_an_adapted_cards_size_band_covers_the_sizes_between_its_ends() -> None:
    from nanoscout.analysis.modelcard import BaseNetwork

    sha = "0" * 64
    assert BaseNetwork(onnx_file="b.onnx", sha256=sha).covers(None)  # no band: every frame
    band = BaseNetwork(onnx_file="b.onnx", sha256=sha, particle_px=(6.0, 24.0))
    assert [band.covers(d) for d in (5.9, 6.0, 12.0, 24.0, 24.1, None)] == \
        [False, True, True, True, False, True]  # None: the base found no particle
    with pytest.raises(ValueError, match="smallest, largest"):
        BaseNetwork(onnx_file="b.onnx", sha256=sha, particle_px=(24.0, 6.0))
    with pytest.raises(ValueError):
        BaseNetwork(onnx_file="b.onnx", sha256=sha, particle_px=(0.0, 6.0))
