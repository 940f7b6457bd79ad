"""The batch contract between the data, `DPOModule` and the callbacks.

`collate_pairs` builds it; callbacks may add the optional keys before a step (e.g.
`RewardShaping` sets `margin_offset`). Chosen and rejected share one forward: the sequence
tensors hold `2B` rows, the `B` chosen completions first, then the `B` rejected ones of the same
pairs in the same order; the per-pair tensors hold `B` rows.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class PreferenceBatch(TypedDict, total=False):
    """One batch of preference pairs (`B` pairs; `T` the longest prompt + completion).

    Always present (from `collate_pairs`):

    - `input_ids` (long `[2B, T]`): prompt + completion tokens, right-padded with the pad id;
      rows `:B` hold the chosen completions, rows `B:` the rejected ones.
    - `attention_mask` (long `[2B, T]`): 1 on real tokens, 0 on padding.
    - `completion_mask` (bool `[2B, T]`): True on completion tokens, the only ones scored.
    - `prompt_mask` (bool `[2B, T]`): True on prompt tokens.
    - `row_ids` (long `[B]`): the pairs' stable row ids (keys of the precomputed reference table,
      of per-pair concept scores, of token filters).
    - `weights` (float32 `[B]`): per-pair loss weights (1.0 unless the data says otherwise).

    Optional (added by callbacks or by the caller; `DPOModule` honours them):

    - `margin_offset` (float `[B]`): added inside the preference loss, `-log σ(β·Δθ + offset)`
      (reward shaping; callbacks add to an existing offset rather than replace it).
    - `ref_chosen_logps`, `ref_rejected_logps` (float `[B]`): reference log-probs that replace the
      reference forward (both or neither).
    - `loss_mask` (bool `[2B, T]`): the completion tokens that enter the sequence log-probs of
      policy and reference (token filtering: `collate_pairs` sets it from the pairs' masks);
      absent: `completion_mask`.
    - `ref_input_ids`, `ref_attention_mask`, `ref_completion_mask` (`[2B, T_ref]`, + `ref_loss_mask`
      with `loss_mask`): the sequences the reference scores when some pair has its own reference
      prompt (inoculation prompting); absent: the reference scores `input_ids`. See `reference_view`.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_mask: Tensor
    row_ids: Tensor
    weights: Tensor
    margin_offset: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    loss_mask: Tensor
    ref_input_ids: Tensor
    ref_attention_mask: Tensor
    ref_completion_mask: Tensor
    ref_loss_mask: Tensor


REQUIRED_KEYS = ("input_ids", "attention_mask", "completion_mask", "prompt_mask", "row_ids", "weights")
OPTIONAL_KEYS = ("margin_offset", "ref_chosen_logps", "ref_rejected_logps", "loss_mask", "ref_input_ids",
                 "ref_attention_mask", "ref_completion_mask", "ref_loss_mask")
REFERENCE_KEYS = {"ref_input_ids": "input_ids", "ref_attention_mask": "attention_mask",
                  "ref_completion_mask": "completion_mask", "ref_loss_mask": "loss_mask"}


def scored_mask(batch: PreferenceBatch) -> Tensor:
    """The completion tokens that enter the sequence log-probs: `loss_mask`, else `completion_mask`."""
    mask = batch.get("loss_mask")
    return batch["completion_mask"] if mask is None else mask


def reference_view(batch: PreferenceBatch) -> PreferenceBatch:
    """The batch as the reference model scores it: the `ref_*` sequences in place of the policy's
    where the batch has them (a per-pair reference prompt), else the batch itself."""
    if "ref_input_ids" not in batch:
        return batch
    view = {k: v for k, v in batch.items() if k not in REFERENCE_KEYS.values() and k not in REFERENCE_KEYS}
    view.update({plain: batch[ref] for ref, plain in REFERENCE_KEYS.items() if ref in batch})
    view["prompt_mask"] = view["attention_mask"].bool() & ~view["completion_mask"]
    return view  # type: ignore[return-value]


__all__ = ["OPTIONAL_KEYS", "PreferenceBatch", "REFERENCE_KEYS", "REQUIRED_KEYS", "reference_view", "scored_mask"]
