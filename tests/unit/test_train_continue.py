"""``nanoscout models train --init detector.onnx``: training continues from a shipped detector's
exported weights, with its folded BatchNorms frozen (batch statistics would replace the folded
identities and change the network before the first step); ``--cycles``: phase 2 in cycles
that equal continued runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from nanoscout.analysis.modelcard import shipped_model_dir


@pytest.mark.parametrize("frozen", [True, False])
def test_continued_training_starts_from_the_shipped_network(frozen: bool) -> None:
    import torch

    from nanoscout.training.onnx_weights import unet_from_onnx
    from nanoscout.training.train import train

    path = shipped_model_dir() / "detector.onnx"
    x = torch.from_numpy(np.random.default_rng(2).random((1, 1, 128, 128), dtype=np.float32))
    with torch.no_grad():
        ref = unet_from_onnx(path)(x).numpy()
    # one step at a vanishing learning rate: only the BatchNorm mode can change the network
    model, summary = train(1, 2, 16, 2, 7, log_every=1, model=unet_from_onnx(path), lr=1e-12,
                           frozen_norm=frozen)
    with torch.no_grad():
        got = model(x).numpy()
    diff = float(np.max(np.abs(got - ref)))
    if frozen:
        assert diff < 1e-4
    else:  # batch statistics overwrote the folded running statistics
        assert diff > 1e-2
    assert np.isfinite(summary["final_loss"])


@pytest.mark.parametrize("variant", ["general", "stem"])
def test_a_retrained_card_keeps_the_shipped_post_processing(variant: str) -> None:
    """``make train`` writes cards whose working scale and thresholds are the shipped ones
    (the consistency search, the STEM detector's three scales, its cut and its working-scale
    fallback included; neither card smooths low-dose frames since STEM card 1.2.1)."""
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.training.export import VARIANTS, build_card

    path = shipped_model_dir() / VARIANTS[variant].file
    shipped = ModelCard.load(path.with_suffix(".json"))
    card = build_card(path, training={}, metrics=None, timings={}, width=16, variant=variant)
    assert card.working_scale == shipped.working_scale
    assert card.thresholds == shipped.thresholds
    assert card.normalization == shipped.normalization
    assert card.normalization.denoise is None
    assert card.working_scale is not None
    assert card.working_scale.auto.fallback == ("nearest" if variant == "stem" else "coarse")


def test_two_cycles_equal_one_run_continued_on_the_next_seed() -> None:
    """``--cycles 2`` (``finetune``) is what a run continued by ``--init`` with ``--seed`` one
    higher gives: the same data, a warm restart, the same weights; and the cycles do train."""
    import copy

    import torch

    from nanoscout.training.train import build_network, finetune, train

    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = build_network("unet", 8)
    kw: dict[str, Any] = {"log_every": 1, "lr": 1e-3}
    two, summaries = finetune(copy.deepcopy(start), 2, 2, 2, 8, 2, 40, **kw)
    one, _ = train(2, 2, 8, 2, 41, model=copy.deepcopy(start), **kw)
    one.train()
    again, _ = train(2, 2, 8, 2, 42, model=one, **kw)
    assert len(summaries) == 2
    for (name, a), b in zip(two.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moved = [not torch.equal(a, b) for a, b in zip(two.state_dict().values(),
                                                   start.state_dict().values(), strict=True)]
    assert any(moved)
