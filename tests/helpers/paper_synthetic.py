"""Synthetic inputs with known structure for the paper-method tests.

- `planted_firing`: a token × feature binary matrix where the features come in blocks that fire
  together (a token "is about" one block; its members then fire with high probability) plus
  independent noise features — co-firing clustering must recover the blocks.
- `planted_spans`: chosen/rejected firing frequencies per pair where block m is active on the
  chosen side with probability `chosen_rate[m]` and on the rejected side with `rejected_rate[m]`,
  so the block's expected disparity is chosen_rate − rejected_rate (times the share of members
  that fire above τ when active).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lightning_anatomy.concepts.span_features import SpanFeatures

HOOK = "blocks.0.hook_resid_post"


def blocks_of(n_blocks: int, size: int, offset: int = 0) -> list[list[int]]:
    return [list(range(offset + b * size, offset + (b + 1) * size)) for b in range(n_blocks)]


def planted_firing(blocks: list[list[int]], d_sae: int, *, n_tokens: int = 4000, member_rate: float = 0.7,
                   background: float = 0.01, noise_rate: float = 0.05, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng([seed, 1])
    dense = rng.random((n_tokens, d_sae)) < background
    in_block = {f for b in blocks for f in b}
    noise = [f for f in range(d_sae) if f not in in_block]
    dense[:, noise] = rng.random((n_tokens, len(noise))) < noise_rate
    topic = rng.integers(-1, len(blocks), n_tokens)  # -1: a token about no block
    for m, members in enumerate(blocks):
        rows = np.flatnonzero(topic == m)
        dense[np.ix_(rows, members)] |= rng.random((len(rows), len(members))) < member_rate
    return sp.csr_matrix(dense.astype(np.int32))


def planted_spans(blocks: list[list[int]], d_sae: int, chosen_rate, rejected_rate, *, n_pairs: int = 200,
                  member_share: float = 0.8, seed: int = 0, hook: str = HOOK) -> SpanFeatures:
    rng = np.random.default_rng([seed, 2])
    spans = {}
    for span, rates in (("chosen", chosen_rate), ("rejected", rejected_rate)):
        freq = np.where(rng.random((n_pairs, d_sae)) < 0.05, rng.uniform(0.0, 0.02, (n_pairs, d_sae)), 0.0)
        for m, members in enumerate(blocks):
            on = rng.random(n_pairs) < rates[m]
            fires = on[:, None] & (rng.random((n_pairs, len(members))) < member_share)
            freq[:, members] = np.where(fires, rng.uniform(0.05, 0.5, (n_pairs, len(members))), freq[:, members])
        spans[span] = freq
    prompt = np.zeros((n_pairs, d_sae))
    matrices = {}
    for span, m in (("prompt", prompt), *spans.items()):
        for stat in ("freq", "max"):
            matrices[(hook, span, stat)] = sp.csr_matrix(m.astype(np.float32))
    lengths = {"prompt": rng.integers(5, 20, n_pairs), "chosen": rng.integers(5, 40, n_pairs),
               "rejected": rng.integers(5, 40, n_pairs)}
    return SpanFeatures(row_ids=np.arange(n_pairs, dtype=np.int64) + 500, lengths=lengths, matrices=matrices,
                        d_sae={hook: d_sae})


def coordinate_case(*, n_clusters: int = 12, size: int = 5, rate: float = 0.02, seed: int = 0):
    """A tiny GPT-2, a "coordinate" SAE on its block-0 output (feature c fires when coordinate c
    exceeds its (1 − rate) quantile), planted feature clusters of coordinates and a paper audit
    whose cluster predictions spread from about −0.6 to +0.6.

    Returns (model, sae, audit result, bias(kappa)) where bias(kappa) is the block-0 output shift
    that raises each cluster's coordinates by kappa · predicted shift · their sd: a policy "made
    to raise exactly the flagged features", in proportion to the prediction.
    """
    import pandas as pd
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    from lightning_anatomy.audit import audit_features
    from lightning_anatomy.models.tiny import build_tiny_model

    model = build_tiny_model("gpt2", vocab_size=260, hidden_size=64, num_layers=2, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (32, 48), generator=g)
    with torch.no_grad():
        h0 = model(input_ids=ids, output_hidden_states=True).hidden_states[1].reshape(-1, 64)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=64))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(64))
        sae.W_dec.copy_(torch.eye(64))
        sae.b_dec.zero_()
        sae.b_enc.copy_(-torch.quantile(h0, 1 - rate, dim=0))
    sd = h0.std(0)
    blocks = blocks_of(n_clusters, size)
    chosen = np.linspace(0.1, 0.9, n_clusters)
    rejected = chosen[::-1]
    perm = np.random.default_rng([seed, 3]).permutation(n_clusters)
    features = planted_spans(blocks, 64, chosen[perm], rejected[perm], n_pairs=200, seed=seed)
    assign = pd.DataFrame([(HOOK, m, f) for m, b in enumerate(blocks) for f in b], columns=["hook", "cluster", "feature"])
    result = audit_features(features, method="paper", feature_clusters=assign, n_bootstrap=0, saes={HOOK: sae})
    predicted = result.cluster_predictions.set_index("cluster")["predicted_shift"]

    def bias(kappa: float) -> torch.Tensor:
        out = torch.zeros(64)
        for m, members in enumerate(blocks):
            out[members] = kappa * float(predicted[m]) * sd[members]
        return out

    return model, sae, result, bias


def add_block0_bias(model, vector) -> None:
    """Shift GPT-2 block 0's output (= blocks.0.hook_resid_post) by `vector` on every token."""
    import torch

    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias.add_(vector)
