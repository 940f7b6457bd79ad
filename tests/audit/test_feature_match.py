"""audit.match_features: the audit's features that carry a concept shown by example."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_anatomy.audit.feature_match import FeatureMatch, example_effects, pick_features
from lightning_anatomy.models.tiny import build_tiny_tokenizer

HOOK = "blocks.0.hook_resid_post"


class OneHotLens:
    """A lens whose SAE feature i fires with value 1 on token id i (so effects are countable by hand)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {HOOK: torch.nn.functional.one_hot(ids, self.width).float()}


def test_example_effect_is_cohens_d_of_the_per_text_max():
    tok = build_tiny_tokenizer()
    marker = tok("!", add_special_tokens=False)["input_ids"][0]
    with_ = ["ab!", "cd!", "ef", "gh!"]  # the marker in three texts of four
    without = ["ab", "cd", "ef", "gh"]
    effects = example_effects(OneHotLens(len(tok)), tok, with_, without, batch_size=3)[HOOK]
    a = np.array([1.0, 1.0, 0.0, 1.0])  # per-text max of the marker's feature
    b = np.zeros(4)
    d = (a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert effects[marker] == pytest.approx(d)
    letter = tok("a", add_special_tokens=False)["input_ids"][0]
    assert effects[letter] == pytest.approx(0.0)  # on both sides alike
    with pytest.raises(ValueError, match="with_texts has 1 text"):
        example_effects(OneHotLens(len(tok)), tok, ["x"], without)


def _table(passes: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"hook": [HOOK] * 4, "feature": [10, 11, 12, 13], "rank": [1, 2, 3, 4],
                         "delta": [3.0, -2.0, 1.5, 1.0], "passes": passes, "label": ["x", "", "fires on 'Sure'", "y"]})


def test_pick_keeps_strong_effects_strongest_first_among_the_top_candidates():
    effects = {HOOK: np.zeros(20)}
    effects[HOOK][[10, 11, 12, 13]] = [0.2, 0.9, 3.0, 5.0]
    match = pick_features(_table([True] * 4), effects, candidates=3, min_effect=0.5, max_features=3)
    assert match.features == [(HOOK, 12), (HOOK, 11)]  # 13 is not among the 3 best-ranked
    assert [c["feature"] for c in match.candidates] == [10, 11, 12]
    assert match.candidates[2] == {"hook": HOOK, "feature": 12, "audit_rank": 3, "delta": 1.5,
                                   "label": "fires on 'Sure'", "effect": 3.0}
    assert match.concepts() == {"f12": (HOOK, 12), "f11": (HOOK, 11)}
    assert pick_features(_table([True] * 4), effects, candidates=4, max_features=1).features == [(HOOK, 13)]


def test_pick_prefers_passing_features_and_falls_back_to_the_strongest():
    effects = {HOOK: np.zeros(20)}
    effects[HOOK][[10, 11, 12, 13]] = [0.2, 0.1, 0.3, 0.4]
    only_two_pass = pick_features(_table([False, True, True, False]), effects, min_effect=0.5)
    assert [c["feature"] for c in only_two_pass.candidates] == [11, 12]
    assert only_two_pass.features == [(HOOK, 12)]  # none reaches 0.5: the strongest candidate
    with pytest.raises(ValueError, match="concept table is empty"):
        pick_features(_table([False] * 4).iloc[:0], effects)
    assert isinstance(only_two_pass, FeatureMatch)
