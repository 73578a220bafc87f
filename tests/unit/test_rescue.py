"""Keeping a less sure particle that looks like the frame's sure ones
(nanoscout.analysis.instances.rescue_by_population, the card's ``thresholds.rescue``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from pydantic import ValidationError

from nanoscout.analysis.detector import Detector
from nanoscout.analysis.instances import instances_from_logits, rescue_by_population
from nanoscout.analysis.modelcard import Rescue, Thresholds
from tests.unit.test_detector import OracleEngine, _card, _disc, _oracle_logits

RESCUE = Rescue(min_score=0.7, ecd_ratio=2 ** 0.5, min_sure=5)


def _frame(n_sure: int, unsure_radii: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw scores: ``n_sure`` discs of radius 8 scoring 0.95, then discs of the
    given radii scoring 0.8, in label order."""
    lab = np.zeros((200, 400), np.int32)
    radii = [8.0] * n_sure + list(unsure_radii)
    for k, r in enumerate(radii):
        lab[_disc(lab.shape, 40 + 110 * (k // 7), 25 + 55 * (k % 7), r)] = k + 1
    scores = np.array([0.0] + [0.95] * n_sure + [0.8] * len(unsure_radii), np.float32)
    return lab, scores


def test_a_particle_the_size_of_the_sure_ones_is_kept_another_size_is_not() -> None:
    lab, scores = _frame(6, (9.0, 20.0, 4.0))  # ECD ratios 1.1, 2.5, 0.5
    out, s = rescue_by_population(lab, scores, 0.9, RESCUE.min_score, RESCUE.ecd_ratio,
                                  RESCUE.min_sure)
    assert s.tolist() == pytest.approx([0.0] + [0.95] * 6 + [0.8])
    assert out.max() == 7
    assert (out[lab == 7] == 7).all()  # the 9 px disc keeps its place, relabelled in order
    assert (out[(lab == 8) | (lab == 9)] == 0).all()
    assert np.array_equal(out[lab <= 6], lab[lab <= 6])


def test_too_few_sure_particles_rescue_nothing() -> None:
    lab, scores = _frame(4, (8.0,))
    out, s = rescue_by_population(lab, scores, 0.9, RESCUE.min_score, RESCUE.ecd_ratio,
                                  RESCUE.min_sure)
    assert out.max() == 4 and s.size == 5 and (out[lab == 5] == 0).all()


def test_a_frame_without_unsure_particles_is_returned_as_it_is() -> None:
    lab, scores = _frame(6, ())
    out, s = rescue_by_population(lab, scores, 0.9, 0.7, 2.0, 5)
    assert out is lab and s is scores


def test_the_detector_rescues_with_the_cards_cut_only() -> None:
    """A disc of weak foreground (p 0.8, under the cut 0.9) among six sure discs of its size:
    the card's rescue keeps it; an operator's cut is exactly that cut."""
    lab, _ = _frame(6, (8.0,))
    fg, _core = _oracle_logits(lab)
    weak = np.log(0.8 / 0.2)  # logit of p = 0.8
    assert instances_from_logits(np.where(lab == 7, np.float32(weak), fg), _core,
                                 min_score=0.9)[0].max() == 6  # the cut alone drops it

    class WeakEngine(OracleEngine):
        """The truth's logits, particle 7's foreground at p = 0.8."""

        def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().infer(inputs)
            h, w = self.labels.shape
            out["logits"][0, 0, :h, :w][self.labels == 7] = weak
            return out

    card = _card(thresholds=Thresholds(min_score=0.9, rescue=RESCUE))
    found = Detector(WeakEngine(lab), card, scale=1.0).detect(lab.astype(np.float32))
    assert found.n == 7 and found.scores[7] == pytest.approx(0.8, abs=0.02)
    cut = Detector(WeakEngine(lab), card, scale=1.0, min_score=0.9).detect(
        lab.astype(np.float32))
    assert cut.n == 6
    plain = _card(thresholds=Thresholds(min_score=0.9))
    assert Detector(WeakEngine(lab), plain, scale=1.0).detect(lab.astype(np.float32)).n == 6


def test_a_rescue_floor_at_or_above_the_cut_is_refused() -> None:
    with pytest.raises(ValidationError, match="below the cut"):
        Thresholds(min_score=0.7, rescue=RESCUE)
    with pytest.raises(ValidationError):
        Rescue(min_score=0.5, ecd_ratio=1.0)


def test_an_adapted_card_leaves_the_base_cards_rescue_out() -> None:
    """``nanoscout models adapt`` chooses its cut without a rescue, so the card it writes has
    none, also where its cut lies under the base card's rescue floor."""
    pytest.importorskip("torch")
    from nanoscout.analysis.modelcard import ModelCard, shipped_model_dir
    from nanoscout.training.adapt import _card_for

    onnx = shipped_model_dir() / "detector.onnx"
    shipped = ModelCard.load(onnx.with_suffix(".json"))
    assert shipped.thresholds is not None
    base = shipped.model_copy(update={"thresholds": shipped.thresholds.model_copy(
        update={"rescue": RESCUE})})
    for cut in (None, 0.5):
        card = _card_for(base, onnx, None, cut)
        assert card.thresholds is not None and card.thresholds.rescue is None
        ModelCard.model_validate(card.model_dump())  # a valid card, as it is written
    assert _card_for(base, onnx, None, 0.5).thresholds.min_score == 0.5  # type: ignore[union-attr]
