"""Completion log-probs without the full `[2B, T, V]` logits.

The LM head over every position of a batch is the largest tensor of a DPO step by far (16 × 512
positions × a 152k vocabulary is 5 GB in fp32, more than a 1.5B model's activations), and only
the completion positions are ever scored. So the model runs with `logits_to_keep=1` (its own
forward, through every hook, PEFT wrapper and FSDP root; the head sees one position), the final
hidden states are taken from its decoder's output, and the head runs over chunks of completion
positions only: log-softmax in fp32 per chunk, each chunk under `torch.utils.checkpoint` so its
logits are recomputed in backward instead of kept (not when one chunk holds every completion
position: nothing to gain). Peak memory holds one chunk's logits.

The head is called as a module (tied or untied, a LoRA-wrapped head, an FSDP unit), and the
model's own post-head transforms are applied (Gemma 2's `final_logit_softcapping`, Cohere's
`logit_scale`, Granite's `logits_scaling`). The first forward of every model checks this against
the logits the model itself computed at its last position, so an architecture with another
transform fails loudly instead of training on wrong log-probs.

A forward hook on the LM head module sees completion chunks, not `[2B, T, d]`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_anatomy.losses import ld_token_weights, wpo_weights
from lightning_anatomy.model_access import hook_output, unwrap_model
from lightning_anatomy.token_stats import TokenStats, token_stats

DEFAULT_CHUNK_SIZE = 512

_checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens and the count of those tokens, per sequence.

    Token t is scored by the logits at t-1. The log-softmax is taken in fp32 one row at a time,
    so a bf16 run never materialises the whole fp32 [2B, T, V] tensor.
    """
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.float32)
    shifted = logits[:, :-1]
    rows = []
    for row_logits, row_labels in zip(shifted, labels):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    token_logps = torch.stack(rows)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def masked_logit_mean(logits: Tensor, completion_mask: Tensor) -> Tensor:
    """Mean logit over the completion positions and the vocabulary (TRL's `logits/*`)."""
    mask = completion_mask[:, 1:].unsqueeze(-1)
    shifted = logits[:, :-1].detach()
    total = (shifted.float() * mask).sum()
    count = mask.sum() * shifted.shape[-1]
    return total / count.clamp_min(1)


@dataclass(frozen=True)
class CompletionLogps:
    """Per sequence: summed completion log-probs, completion token counts and (optionally) the
    sum of the logits over those positions and the vocabulary (detached; for `logits/*`)."""

    logps: Tensor
    lengths: Tensor
    logit_sums: Tensor | None
    vocab_size: int
    token_logps: Tensor | None = None  # [R, T-1] per-token log-probs (0 off the completion), with grad
    token_stats: TokenStats | None = None  # [R, T-1] each, detached (entropy, log Σp², top-1): `token_stats=True`

    def logit_mean(self, rows: slice) -> Tensor:
        """TRL's mean logit over the completion positions and vocabulary of `rows`."""
        if self.logit_sums is None:
            raise ValueError("logit sums were not computed; pass logit_sums=True")
        count = self.lengths[rows].sum() * self.vocab_size
        return self.logit_sums[rows].sum() / count.clamp_min(1)


@dataclass(frozen=True)
class _HeadTransform:
    """What the model does to the LM head's output before it is a logit (see `head_transform`)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:  # the same three ops as Gemma 2's forward
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits


def head_transform(model: nn.Module) -> _HeadTransform:
    """The post-head transforms of Hugging Face causal LMs that have one (read from the config)."""
    cfg = getattr(unwrap_model(model), "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = getattr(text, "logit_scale", None)  # Cohere multiplies
    if scale is None and getattr(text, "logits_scaling", None):  # Granite divides
        scale = 1.0 / float(text.logits_scaling)
    cap = getattr(text, "final_logit_softcapping", None)
    return _HeadTransform(scale=1.0 if scale is None else float(scale), softcap=float(cap) if cap else None)


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """`(hidden [R, T, d], logits at the last position [R, V] or None)` from the model's own forward.

    The hidden states are the decoder's output (after the final norm: what the LM head reads),
    captured by a forward hook, so the call goes through the model's forward and with it every
    block hook, PEFT adapter and FSDP unit; `logits_to_keep=1` makes the head run on one position.
    """
    lm = unwrap_model(model)
    get_decoder = getattr(lm, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    if not isinstance(body, nn.Module) or body is lm:
        body = getattr(lm, "base_model", None)
    if not isinstance(body, nn.Module) or body is lm:
        raise ValueError(
            f"cannot find the decoder of {type(lm).__name__} (get_decoder() / base_model) to read its final hidden "
            "states; use DPOModule(logps_chunk_size=None) to score from the model's full logits"
        )
    captured: list[Tensor] = []
    handle = body.register_forward_hook(lambda _m, _a, out: captured.append(hook_output(out)[0]))
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        kwargs["logits_to_keep"] = 1
    try:
        out = model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder {type(body).__name__} ran {len(captured)} times in one forward (expected once)")
    logits = getattr(out, "logits", None)
    return captured[0], None if logits is None else logits[:, -1]


def _chunk_stats(head: nn.Module, transform: _HeadTransform, hidden: Tensor, labels: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    logits = transform(head(hidden).float())
    stats = token_stats(logits, labels)
    return stats.logps, logits.detach().sum(-1), stats.entropy, stats.log_sum_sq_probs, stats.is_top1.float()


def _chunk(head: nn.Module, transform: _HeadTransform, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = transform(head(hidden).float())
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), logits.detach().sum(-1)


def _check_head(model: nn.Module, head: nn.Module, transform: _HeadTransform, hidden: Tensor,
                expected: Tensor | None) -> None:
    """Once per model: the chunked head must reproduce the model's own logits (last position)."""
    if expected is None or model in _checked:
        return
    with torch.no_grad():
        got = transform(head(hidden[:, -1]).float())
        want = expected.detach().float()
    tol = (1e-4 if expected.dtype in (torch.float32, torch.float64) else 2e-2) * (1.0 + float(want.abs().max()))
    err = float((got - want).abs().max())
    if not err <= tol:
        raise RuntimeError(
            f"{type(unwrap_model(model)).__name__}: LM head + {transform} applied to the decoder's hidden states "
            f"differ from the model's own logits by {err:.3g} (tolerance {tol:.3g}); the model transforms its logits "
            "in a way lightning_anatomy.logprobs does not know. Use DPOModule(logps_chunk_size=None) (full logits)"
        )
    _checked.add(model)


def _head_weight_problem(head: nn.Module) -> str | None:
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    if type(weight).__name__ == "DTensor" or weight.dim() != 2 or weight.numel() == 0:
        return (
            f"the LM head's weight is sharded outside the model's forward ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}): shard the decoder blocks and the root model only, so the head stays "
            "gathered after the forward (DPOModule.configure_model does; under FSDPStrategy wrap only the blocks, "
            "e.g. auto_wrap_policy=decoder_block_classes(policy)), or use DPOModule(logps_chunk_size=None)"
        )
    return None


def completion_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, logit_sums: bool = False, with_token_stats: bool = False
                     ) -> CompletionLogps:
    """`sequence_logps` (and the logit sums behind `logits/*`) without the full logits.

    Only completion positions reach the head, `chunk_size` at a time; under grad each chunk is
    checkpointed (its logits recomputed in backward) when there is more than one. The per-token values are scattered back to
    `[R, T-1]` and summed like `sequence_logps`, so the results agree with it to float rounding.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    hidden, last_logits = final_hidden_states(model, input_ids, attention_mask)
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no output embeddings (LM head) to score with")
    problem = _head_weight_problem(head)
    if problem:
        raise RuntimeError(problem)
    transform = head_transform(model)
    _check_head(model, head, transform, hidden, last_logits)
    vocab = int(last_logits.shape[-1]) if last_logits is not None else int(head.weight.shape[0])
    del last_logits

    mask = completion_mask[:, 1:].to(torch.bool)
    rows, cols = mask.nonzero(as_tuple=True)
    selected = hidden[:, :-1][rows, cols]  # position t-1 scores token t
    labels = input_ids[:, 1:][rows, cols]
    # One chunk is all there is: keeping its logits for backward costs no more than recomputing
    # them there (the recompute would run while every activation is still alive), so skip it.
    recompute = selected.shape[0] > chunk_size and torch.is_grad_enabled() and (
        selected.requires_grad or any(p.requires_grad for p in head.parameters()))
    token_logps, token_sums, extras = [], [], []
    fn = _chunk_stats if with_token_stats else _chunk
    for start in range(0, selected.shape[0], chunk_size):
        args = (head, transform, selected[start:start + chunk_size], labels[start:start + chunk_size])
        lp, ls, *more = checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)
        token_logps.append(lp)
        token_sums.append(ls)
        extras.append(more)
    shape, maskf = mask.shape, mask.to(torch.float32)
    dense = hidden.new_zeros(shape, dtype=torch.float32)
    if token_logps:
        dense = dense.index_put((rows, cols), torch.cat(token_logps))
    elif hidden.requires_grad:  # nothing to score: stay connected, so backward (and FSDP's hooks) still run
        dense = dense + 0.0 * hidden.sum()
    sums = None
    if logit_sums:
        sums = hidden.new_zeros(shape, dtype=torch.float32)
        if token_sums:
            sums = sums.index_put((rows, cols), torch.cat(token_sums))
        sums = sums.sum(-1)
    stats = None
    if with_token_stats:
        dense_stats = []
        for i in range(3):
            t = hidden.new_zeros(shape, dtype=torch.float32)
            dense_stats.append(t.index_put((rows, cols), torch.cat([e[i] for e in extras])) if extras else t)
        stats = TokenStats(dense * maskf, dense_stats[0], dense_stats[1], dense_stats[2].bool())
    return CompletionLogps((dense * maskf).sum(-1), maskf.sum(-1), sums, vocab, dense * maskf, stats)


def _full_logits_token_stats(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> TokenStats:
    """`TokenStats` `[R, T-1]` from the model's full logits (row by row, fp32), 0 off the completion."""
    rows = [token_stats(row_logits, row_labels) for row_logits, row_labels in zip(logits[:, :-1], input_ids[:, 1:])]
    maskf = completion_mask[:, 1:].to(torch.float32)
    stacked = [torch.stack([r[i] for r in rows]) for i in range(4)]
    return TokenStats(stacked[0] * maskf, stacked[1] * maskf, stacked[2] * maskf, stacked[3] & maskf.bool())


def pair_logps(model: nn.Module, batch: Mapping[str, Tensor], *, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
               with_stats: bool = False, with_nll: bool = False, ld_alpha: float | None = None,
               with_token_stats: bool = False) -> dict[str, Tensor]:
    """One forward over a `[chosen; rejected]` batch: per-pair log-probs and completion lengths.

    Returns `chosen_logps`, `rejected_logps`, `chosen_lengths`, `rejected_lengths` (`[B]` each);
    with `with_stats` also TRL's `chosen_logits` / `rejected_logits` means, and with `with_nll` too
    the chosen completions' mean NLL (`nll`, RPO's term). `chunk_size=None` scores from the model's
    full logits (`sequence_logps`), else through `completion_logps`. The tokens scored are
    `batch["loss_mask"]` where the batch has one (token filtering), else `completion_mask`.
    """
    ids, mask = batch["input_ids"], batch.get("loss_mask", batch["completion_mask"])
    n = ids.shape[0] // 2
    per_token = ld_alpha is not None or with_token_stats
    stats: TokenStats | None = None
    if chunk_size is None:  # the full-logits path
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        if per_token:
            stats = _full_logits_token_stats(logits, ids, mask)
            lengths = mask[:, 1:].to(torch.float32).sum(-1)
            logps = stats.logps.sum(-1)
        else:
            logps, lengths = sequence_logps(logits, ids, mask)
        if with_stats:
            means = masked_logit_mean(logits[:n], mask[:n]), masked_logit_mean(logits[n:], mask[n:])
    else:
        out = completion_logps(model, ids, batch["attention_mask"], mask, chunk_size=chunk_size,
                               logit_sums=with_stats, with_token_stats=per_token)
        logps, lengths, stats = out.logps, out.lengths, out.token_stats
        if with_stats:
            means = out.logit_mean(slice(None, n)), out.logit_mean(slice(n, None))
    raw_logps = logps
    if ld_alpha is not None:  # LD-DPO: the longer response's tokens beyond the shared length weigh α
        logps = (stats.logps * ld_token_weights(mask[:, 1:], ld_alpha)).sum(-1)
    result = {
        "chosen_logps": logps[:n], "rejected_logps": logps[n:],
        "chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:],
    }
    if with_stats:
        result["chosen_logits"], result["rejected_logits"] = means
        if with_nll:
            result["nll"] = -raw_logps[:n].sum() / lengths[:n].sum().clamp_min(1)
    if ld_alpha is not None:
        result["chosen_logps_raw"] = raw_logps[:n]
    if with_token_stats:
        maskf = mask[:, 1:].to(torch.float32)
        result["entropy_sum"] = (stats.entropy * maskf).sum()
        result["tokens"] = maskf.sum()
        result["top1_correct"] = (stats.is_top1[:n].float() * maskf[:n]).sum()
        result["chosen_tokens"] = maskf[:n].sum()
        result["wpo_weights"] = wpo_weights(stats.logps, stats.log_sum_sq_probs, maskf)
    return result


__all__ = ["CompletionLogps", "DEFAULT_CHUNK_SIZE", "completion_logps", "final_hidden_states", "head_transform",
           "masked_logit_mean", "pair_logps", "sequence_logps"]
