"""What `ConceptDriftMonitor` measures, without the Lightning plumbing: the probe's mini-batches,
the mean SAE activation per feature over their completion tokens (and the cluster measure of
`check_prediction` per sequence), and greedy rollouts turned into teacher-forcing batches.

The caller runs these in eval mode inside `no_grad()` and `measurement_pass()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from lightning_anatomy.audit.rollouts import csr_of
from lightning_anatomy.concepts.lens import span_stats

if TYPE_CHECKING:
    from lightning_anatomy.audit.rollouts import ClusterReader
    from lightning_anatomy.concepts.lens import ConceptLens

# A probe mini-batch: token ids, attention mask, and the mask of tokens whose features count.
ProbeBatch = tuple[Tensor, Tensor, Tensor]


def probe_batches(collated: Sequence[Mapping[str, Tensor]], responses: str, batch_size: int) -> list[ProbeBatch]:
    """The `responses` half ("chosen", "rejected" or "both") of collated `[chosen; rejected]`
    batches, cut into mini-batches of `batch_size` sequences, on CPU."""
    batches: list[ProbeBatch] = []
    for batch in collated:
        missing = [k for k in ("input_ids", "attention_mask", "completion_mask") if k not in batch]
        if missing or batch["input_ids"].shape[0] % 2:
            raise ValueError(f"probe batch lacks {missing or 'an even number of rows'}: use collate_pairs output")
        n = batch["input_ids"].shape[0] // 2
        rows = {"chosen": slice(0, n), "rejected": slice(n, 2 * n), "both": slice(0, 2 * n)}[responses]
        ids, attn, mask = (batch[k][rows].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
        for i in range(0, ids.shape[0], batch_size):
            batches.append((ids[i:i + batch_size], attn[i:i + batch_size], mask[i:i + batch_size].bool()))
    return batches


def feature_means(lens: ConceptLens, batches: Sequence[ProbeBatch], widths: Mapping[str, int],
                  reader: ClusterReader | None = None, threshold: float = 0.0
                  ) -> tuple[dict[str, Tensor], np.ndarray | None]:
    """Mean SAE activation per feature over the masked tokens of all `batches` (float64, CPU) and,
    with a `reader`, the mean cluster value per sequence (`audit.rollouts.ClusterReader`; firing
    above `threshold`)."""
    sums = {h: torch.zeros(w, dtype=torch.float64) for h, w in widths.items()}
    count = 0
    cluster_sum, rows = None, 0
    for ids, attn, mask in batches:
        feats = lens.encode(ids, attn)
        for hook, f in feats.items():
            sums[hook] += f[mask.to(f.device)].double().sum(0).cpu()
        count += int(mask.sum())
        if reader is not None:
            freqs = {h: csr_of(span_stats(f, mask, threshold)["freq"]) for h, f in feats.items()}
            values = reader.values(freqs).sum(axis=0)
            cluster_sum = values if cluster_sum is None else cluster_sum + values
            rows += ids.shape[0]
    means = {h: s / max(count, 1) for h, s in sums.items()}
    return means, None if cluster_sum is None else cluster_sum / max(rows, 1)


def rollout_batches(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    batch_size: int) -> list[ProbeBatch]:
    """Greedy continuations of `prompts` (cut after the first eos), as teacher-forcing batches
    whose mask covers the new tokens."""
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(config, "eos_token_id", None) if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = next(iter(eos_ids), 0) if getattr(config, "pad_token_id", None) is None else config.pad_token_id
    seqs: list[tuple[list[int], int]] = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        new = out[0, len(prompt):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        seqs.append((list(prompt) + new[:cut], len(prompt)))
    batches = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, (seq, start) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            attn[row, :len(seq)] = 1
            mask[row, start:len(seq)] = True
        batches.append((ids, attn, mask))
    return batches


__all__ = ["ProbeBatch", "feature_means", "probe_batches", "rollout_batches"]
