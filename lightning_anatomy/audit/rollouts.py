"""The model's own rollouts and their cluster firing: what a prediction check measures.

The paper validated its predictions on what the model *says*, not on teacher-forced dataset
text: sample responses to held-out prompts from a policy, read them through the SAEs, and take
per response each feature's firing frequency (fraction of response tokens where it fires). A
cluster's value per response is the mean over its members of 1{freq > τ} ("active", the same
thresholded indicator the paper's disparity u averages) or of the frequency itself ("freq").

Sampling is seeded per prompt (a prompt's rollouts never depend on which other prompts are in
the batch, and two policies get the same random numbers), and runs inside `measurement_pass()`
with the model in eval mode, so no training-time edit acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from lightning_anatomy.audit.feature_conditioned import membership
from lightning_anatomy.model_access import measurement_pass

MEASURES = ("active", "freq")


@dataclass(frozen=True)
class Rollout:
    """One sampled response: the prompt ids and the generated ids (cut after the first eos)."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(getattr(model, "config", None), "eos_token_id", None) if eos is None else eos
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def pad_id_of(model: Any, default: int = 0) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return next(iter(sorted(_eos_ids(model))), default)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_rollouts(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> list[Rollout]:
    """`samples_per_prompt` responses per prompt (temperature 0: greedy), seeded by (seed, prompt index)."""
    device = _device(model)
    eos = _eos_ids(model)
    pad = pad_id_of(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    out: list[Rollout] = []
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad,
                              "num_return_sequences": samples_per_prompt}
    if sample:
        kwargs.update(temperature=float(temperature), top_k=0, top_p=1.0)
    try:
        with torch.no_grad(), measurement_pass():
            for i, prompt in enumerate(prompts):
                ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
                for row in gen[:, ids.shape[1]:].tolist():
                    cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                    out.append(Rollout(i, list(prompt), row[:cut]))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return out


def csr_of(t: torch.Tensor) -> sp.csr_matrix:
    """A [rows, d] tensor's nonzeros as a float32 CSR (only nonzeros leave the device)."""
    rows, cols = t.nonzero(as_tuple=True)
    vals = t[rows, cols].float().cpu().numpy()
    return sp.csr_matrix((vals, (rows.cpu().numpy(), cols.cpu().numpy())), shape=tuple(t.shape))


def response_frequencies(
    lens: Any, rollouts: Sequence[Rollout], *, threshold: float = 0.0, batch_size: int = 8, pad_token_id: int = 0
) -> dict[str, sp.csr_matrix]:
    """`{hook: csr [n_rollouts, d_sae]}`: each feature's firing frequency over each response's tokens
    (0 for an empty response), read through `lens` in a measurement pass."""
    from lightning_anatomy.concepts.lens import span_stats

    parts: dict[str, list[sp.csr_matrix]] = {h: [] for h in lens.saes}
    with torch.no_grad(), measurement_pass():
        for start in range(0, len(rollouts), batch_size):
            chunk = rollouts[start:start + batch_size]
            width = max(len(r.prompt_ids) + len(r.response_ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, r in enumerate(chunk):
                seq = r.prompt_ids + r.response_ids
                ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[row, :len(seq)] = 1
                mask[row, len(r.prompt_ids):len(seq)] = True
            feats = lens.encode(ids, attn)
            for hook, f in feats.items():
                parts[hook].append(csr_of(span_stats(f, mask, threshold)["freq"]))
    return {h: sp.vstack(p, format="csr") if p else sp.csr_matrix((0, lens.d_sae(h))) for h, p in parts.items()}


class ClusterReader:
    """Per-response cluster values from per-response feature frequencies (one sparse product per hook).

    `assignments` (hook, cluster, feature); `clusters` the cluster ids in column order.
    """

    def __init__(self, assignments: pd.DataFrame, widths: Mapping[str, int], clusters: Sequence[int], *,
                 tau: float = 0.01, measure: str = "active") -> None:
        if measure not in MEASURES:
            raise ValueError(f"measure={measure!r} is invalid: choose 'active' (mean of 1{{freq > tau}}, the paper's) "
                             "or 'freq' (mean firing frequency)")
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.tau = float(tau)
        self.measure = measure
        part = assignments[assignments["cluster"].isin(self.clusters)]
        self.maps = {hook: membership(part, hook, int(widths[hook]), self.clusters)
                     for hook in dict.fromkeys(part["hook"])}

    def feature_values(self, freq: sp.spmatrix) -> sp.csr_matrix:
        m = sp.csr_matrix(freq, dtype=np.float64, copy=True)
        if self.measure == "active":
            m.data = (m.data > self.tau).astype(np.float64)
            m.eliminate_zeros()
        return m

    def values(self, freqs: Mapping[str, sp.spmatrix]) -> np.ndarray:
        """[n_responses, n_clusters] dense (the number of clusters is small)."""
        n = next(iter(freqs.values())).shape[0]
        total = np.zeros((n, len(self.clusters)))
        for hook, m in self.maps.items():
            total += np.asarray((self.feature_values(freqs[hook]) @ m).todense())
        return total
