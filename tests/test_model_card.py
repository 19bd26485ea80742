"""scripts/model_card.py: the verdict against xz and the reused entropy model's line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import model_card


def test_verdict_against_xz():
    assert model_card.verdict(0.90, 1.00) == "yes"  # 10 % fewer bits: clearly
    assert model_card.verdict(1.049, 1.051) == "narrowly"  # below, by less than 5 %
    assert model_card.verdict(1.05, 1.00) == "**no**"


def test_trained_as_unwraps_earlier_reuses():
    first = "Entropy model: 1400 steps (1.5 min), final loss 0.956."
    once = f'Entropy model: reused from `a` (its card: "{first}"). BLT: 3800 of 3800 planned steps.'
    twice = f'Entropy model: reused from `b` (trained as: "{model_card.trained_as(once)}"). BLT: 6400 steps.'
    assert model_card.trained_as(first + " BLT: 2080 of 2100 planned steps.") == first
    assert model_card.trained_as(once) == first
    assert model_card.trained_as(twice) == first
