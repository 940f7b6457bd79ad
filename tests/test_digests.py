"""`digests.callable_digest`: a callable's cache identity follows its code and what it closes over."""

from __future__ import annotations

import torch

from lightning_anatomy.digests import callable_digest


def _scorer(threshold):
    def score(row_id, side, ids):
        return [float(i > threshold) for i in ids]
    return score


def _other_body(threshold):
    def score(row_id, side, ids):
        return [float(i >= threshold) for i in ids]
    return score


class _Scorer:
    def __init__(self, weights):
        self.weights = weights

    def __call__(self, row_id, side, ids):
        return [float(self.weights[i % len(self.weights)]) for i in ids]


def test_same_code_and_closure_same_digest_across_calls():
    assert callable_digest(_scorer(3)) == callable_digest(_scorer(3))
    assert callable_digest(_Scorer(torch.ones(4))) == callable_digest(_Scorer(torch.ones(4)))
    assert callable_digest(_scorer(3)).startswith(f"{__name__}._scorer.<locals>.score:")


def test_an_edited_body_or_another_closure_misses():
    same_name = _other_body(3)
    same_name.__qualname__ = _scorer(3).__qualname__  # a renamed copy: only the code tells them apart
    assert callable_digest(same_name) != callable_digest(_scorer(3))
    assert callable_digest(_scorer(4)) != callable_digest(_scorer(3))
    assert callable_digest(_Scorer(torch.zeros(4))) != callable_digest(_Scorer(torch.ones(4)))


def test_a_closure_that_holds_itself_terminates():
    def outer():
        def rec(n):
            return 0 if n == 0 else rec(n - 1)
        return rec

    assert callable_digest(outer()) == callable_digest(outer())
    assert callable_digest(len).startswith("builtins.len:")


def test_a_callable_object_that_holds_itself_terminates():
    scorer = _Scorer(torch.ones(2))
    scorer.again = scorer  # an attribute cycle through a callable object
    assert callable_digest(scorer) == callable_digest(scorer)
