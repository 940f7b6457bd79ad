"""Rows to token ids with exact completion masks, and pairs to the `[chosen; rejected]` batch.

The prompt and each completion are tokenized separately, so the completion mask is exact by
construction (no offset guessing on the joined text), the same way TRL does it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_anatomy.data.bad_rows import check_on_bad_rows, handle_bad_rows
from lightning_anatomy.data.preference_row import BadRow, PreferenceRow


@dataclass(frozen=True)
class TokenizedPair:
    """One pair as ids; `prompt_ids + chosen_ids` is the chosen sequence (eos ends each completion).

    Optional, None unless an intervention sets them:

    - `ref_prompt_ids`: the prompt the reference model scores the completions after
      (`PreferenceRow.reference_prompt`, inoculation prompting); None: `prompt_ids`.
    - `chosen_keep` / `rejected_keep`: one bool per completion token, False on tokens removed
      from the sequence log-probs (token filtering); None: every completion token counts.
    """

    row_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    ref_prompt_ids: list[int] | None = None
    chosen_keep: tuple[bool, ...] | None = None
    rejected_keep: tuple[bool, ...] | None = None


class TokenizedPairs(list):
    """The pairs that tokenized well, plus `.dropped` (problems of the rows skipped)."""

    def __init__(self, pairs: Iterable[TokenizedPair] = (), dropped: Iterable[BadRow] = ()):
        super().__init__(pairs)
        self.dropped: list[BadRow] = list(dropped)


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked out, any id works)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _prompt_parts(with_special: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """(leading special tokens such as BOS, the rest) of a prompt, never with a doubled BOS.

    A suffix the tokenizer would add (some add EOS) is dropped: the prompt flows into its reply.
    If the rendered text already starts with the special prefix (chat templates that write BOS
    themselves), that prefix is taken from the text instead of being added again.
    """
    n = len(plain)
    if n == 0:
        return list(with_special), []
    for k in range(len(with_special) - n + 1):
        if with_special[k:k + n] == plain:
            prefix = with_special[:k]
            return (plain[:k], plain[k:]) if plain[:k] == prefix else (prefix, plain)
    return [], with_special


def _truncate_prompt(head: list[int], body: list[int], max_prompt_length: int | None) -> list[int]:
    """Keep the prompt's end (the turn being answered) and its leading special tokens."""
    if max_prompt_length is None or len(head) + len(body) <= max_prompt_length:
        return head + body
    keep = max_prompt_length - len(head)
    return head + body[-keep:] if keep >= 1 else (head + body)[-max_prompt_length:]


def check_length_options(max_length: int, max_prompt_length: int | None) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (prompt + at least one response token), got {max_length!r}")
    if max_prompt_length is None:
        return
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be an integer >= 1 or None, got {max_prompt_length!r}")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}) so the response "
            "keeps at least one token; lower max_prompt_length or raise max_length"
        )


def tokenize_rows(
    rows: Sequence[PreferenceRow],
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int | None = 256,
    on_bad_rows: str = "error",
) -> TokenizedPairs:
    """Token ids for every row, truncated to fit `max_length`.

    The prompt keeps its end (the turn being answered), capped at `max_prompt_length` tokens with
    its leading special tokens (BOS) kept; each completion is then cut to
    `max_length - len(prompt)` tokens keeping its start. `max_prompt_length=None` leaves prompts
    whole; a prompt that then fills `max_length` is a bad row, like a response with no tokens.

    A row with a `reference_prompt` also gets `ref_prompt_ids` (tokenized and truncated like the
    prompt); its completions are cut to fit after the longer of the two prompts, so the policy
    and the reference score the same completion tokens.
    """
    check_on_bad_rows(on_bad_rows)
    check_length_options(max_length, max_prompt_length)
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, PreferenceRow):
            raise TypeError(f"rows[{i}] is a {type(row).__name__}; tokenize_rows needs PreferenceRow (see read_preferences)")
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_tail = [eos] if isinstance(eos, int) else []

    def ids(texts: list[str], special: bool) -> list[list[int]]:
        return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]] if texts else []

    # Tokenizers that add nothing (GPT-2, Qwen2) need no second pass to find their special prefix.
    adds_special = ids(["a"], True) != ids(["a"], False)

    def prompt_token_ids(prompts: list[str]) -> list[list[int]]:
        with_special = ids(prompts, True)
        plain = ids(prompts, False) if adds_special else with_special
        return [_truncate_prompt(*_prompt_parts(w, p), max_prompt_length) for w, p in zip(with_special, plain)]

    prompt_ids = prompt_token_ids([r.prompt for r in rows])
    inoculated = [i for i, r in enumerate(rows) if r.reference_prompt is not None]
    ref_prompt_ids: list[list[int] | None] = [None] * len(rows)
    for i, ref in zip(inoculated, prompt_token_ids([rows[i].reference_prompt for i in inoculated])):
        ref_prompt_ids[i] = ref
    chosen_ids = ids([r.chosen for r in rows], False)
    rejected_ids = ids([r.rejected for r in rows], False)

    pairs: list[TokenizedPair] = []
    bad: list[BadRow] = []
    for row, p, ref_p, c, r in zip(rows, prompt_ids, ref_prompt_ids, chosen_ids, rejected_ids):
        problems: list[tuple[str, str]] = []
        if not p:
            problems.append(("prompt", "the prompt has no tokens, so the first response token cannot be scored; "
                                       "add a prompt or use a tokenizer that adds a BOS token"))
        if ref_p is not None and not ref_p:
            problems.append(("reference_prompt", "the reference prompt has no tokens, so the first response token "
                                                 "cannot be scored by the reference"))
        room = max_length - max(len(p), len(ref_p or ()))
        if room <= 0:
            problems.append(("prompt", f"prompt leaves no room for the response: {len(p)} prompt tokens with "
                                       f"max_length={max_length}; raise max_length or lower max_prompt_length"))
        for name, completion in (("chosen", c), ("rejected", r)):
            if not completion and not eos_tail:
                problems.append((name, "the response has no tokens (and the tokenizer has no eos to end it)"))
        if problems:
            bad += [(row.row_id, f, reason) for f, reason in problems]
            continue
        pairs.append(TokenizedPair(row.row_id, p, (c + eos_tail)[:room], (r + eos_tail)[:room], row.weight, ref_p))
    handle_bad_rows(
        bad, on_bad_rows=on_bad_rows, total=len(rows), kept=len(pairs), what="when tokenizing",
        fix='Fix these rows or the length options, or pass on_bad_rows="skip" to drop them (listed in `.dropped`).',
    )
    return TokenizedPairs(pairs, bad)


def pad_id(tokenizer: Any) -> int:
    """The id `pad_right` pads a tokenizer's texts with: its padding id, else its eos (padding is
    masked, so any id serves; many causal-LM tokenizers have no padding token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_right(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into `(input_ids, attention_mask)`, both long `[n, max_len]`.

    Right padding keeps every real token's causal position exact, which teacher-forced scoring
    and activation reading both rely on.
    """
    width = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               keeps: Sequence[Sequence[bool] | None], pad_token_id: int) -> tuple[Tensor, ...]:
    """`(input_ids, attention_mask, completion_mask, prompt_mask, loss_mask)` of right-padded sequences."""
    n_rows = len(prompts)
    t = max(len(prompt) + len(completion) for prompt, completion in zip(prompts, completions))
    input_ids = torch.full((n_rows, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, t), dtype=torch.long)
    completion_mask = torch.zeros((n_rows, t), dtype=torch.bool)
    prompt_mask = torch.zeros((n_rows, t), dtype=torch.bool)
    loss_mask = torch.zeros((n_rows, t), dtype=torch.bool)
    for i, (prompt, completion, keep) in enumerate(zip(prompts, completions, keeps)):
        n_p, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[i, :n] = 1
        prompt_mask[i, :n_p] = True
        completion_mask[i, n_p:n] = True
        if keep is None:
            loss_mask[i, n_p:n] = True
        else:
            if len(keep) != len(completion):
                raise ValueError(f"a token-filter mask has {len(keep)} entries for a completion of {len(completion)} "
                                 "tokens; recompute the masks for these pairs (TokenFiltering does at fit start)")
            loss_mask[i, n_p:n] = torch.tensor(list(keep), dtype=torch.bool)
    return input_ids, attention_mask, completion_mask, prompt_mask, loss_mask


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, Tensor]:
    """The batch of the contract: `[chosen; rejected]` sequences, right-padded, with exact masks.

    Two groups of keys appear only when a pair of the batch asks for them (so batches without
    interventions are what they always were): `loss_mask` when a pair has token-filter masks
    (`chosen_keep`/`rejected_keep`), and `ref_input_ids`, `ref_attention_mask`,
    `ref_completion_mask` (+ `ref_loss_mask` with `loss_mask`) when a pair has a reference prompt:
    the `[chosen; rejected]` sequences after the reference prompt (the prompt where a pair has none).
    """
    if not pairs:
        raise ValueError("collate_pairs got no pairs; a batch needs at least one TokenizedPair")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int (see resolve_pad_token_id), got {pad_token_id!r}")
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    keeps = [p.chosen_keep for p in pairs] + [p.rejected_keep for p in pairs]
    prompts = [p.prompt_ids for p in pairs] * 2
    input_ids, attention_mask, completion_mask, prompt_mask, loss_mask = _sequences(
        prompts, completions, keeps, pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "prompt_mask": prompt_mask,
        "row_ids": torch.tensor([p.row_id for p in pairs], dtype=torch.long),
        "weights": torch.tensor([float(p.weight) for p in pairs], dtype=torch.float32),
    }
    filtered = any(k is not None for k in keeps)
    if filtered:
        batch["loss_mask"] = loss_mask
    if any(p.ref_prompt_ids is not None for p in pairs):
        ref_prompts = [p.prompt_ids if p.ref_prompt_ids is None else p.ref_prompt_ids for p in pairs] * 2
        ref_ids, ref_attention, ref_completion, _, ref_loss = _sequences(ref_prompts, completions, keeps, pad_token_id)
        batch.update(ref_input_ids=ref_ids, ref_attention_mask=ref_attention, ref_completion_mask=ref_completion)
        if filtered:
            batch["ref_loss_mask"] = ref_loss
    return batch
