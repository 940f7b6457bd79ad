"""Memory and time of the paper method's feature clustering (`audit.cofiring`) at SAE scale.

A random 16,384-feature SAE (`d_in` 576, SmolLM2's width) reads synthetic activations with
co-firing structure (each token mixes a few of 256 random "topic" directions plus noise); the
encoder bias of each feature is set so its firing rate follows a Zipf-like law with a mean L0 of
64 per token (a realistic SAE sparsity; the cost of co-firing grows with Σ L0²). The binary
token × feature matrix is built chunk by chunk (never dense), then `cofiring_clusters` runs the
blocked sparse XᵀX, keeps the top 1 % of pairs by NMI and runs Leiden. Measured: wall and CPU
time of each stage and the peak RSS above the starting point (`_common.PeakMemory`), next to
what a dense d_sae × d_sae float64 NMI matrix alone would take.

    python benchmarks/cofiring_scale.py                    # 16,384 features × 1M tokens (minutes)
    python benchmarks/cofiring_scale.py --quick            # 1,024 features × 20k tokens (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

FORMAT = "lightning-anatomy/bench-cofiring-scale"
VERSION = 1


def firing_matrix(n_tokens: int, d_sae: int, *, d_in: int = 576, l0: float = 64.0, n_topics: int = 256,
                  chunk: int = 8192, seed: int = 0) -> sp.csr_matrix:
    """Binary firing of a random SAE on structured random activations, as int32 CSR [n_tokens, d_sae]."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    topics = torch.randn(n_topics, d_in, generator=g)

    def activations(n: int) -> torch.Tensor:
        mix = torch.zeros(n, n_topics)
        picks = torch.randint(0, n_topics, (n, 3), generator=g)
        mix.scatter_(1, picks, torch.rand(n, 3, generator=g) * 2 + 0.5)
        return mix @ topics + 0.5 * torch.randn(n, d_in, generator=g)

    # Zipf-like target rates with mean l0 / d_sae, thresholds from a calibration sample
    rank = torch.arange(1, d_sae + 1, dtype=torch.float64)
    rate = rank ** -0.8
    rate = (rate / rate.sum() * l0).clamp(max=0.5)[torch.randperm(d_sae, generator=g)]
    pre = activations(min(chunk, n_tokens)) @ w_enc
    ordered = pre.sort(dim=0).values
    row = ((1 - rate) * (pre.shape[0] - 1)).round().long().clamp(0, pre.shape[0] - 1)
    threshold = ordered[row, torch.arange(d_sae)]
    del pre, ordered
    parts = []
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        fired = (activations(n) @ w_enc) > threshold
        r, c = fired.nonzero(as_tuple=True)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(r.numpy(), minlength=n), out=indptr[1:])
        parts.append(sp.csr_matrix((np.ones(len(c), dtype=np.int32), c.numpy().astype(np.int32), indptr),
                                   shape=(n, d_sae)))
    return sp.vstack(parts, format="csr")


def run(n_tokens: int, d_sae: int, block_size: int, seed: int) -> dict[str, Any]:
    from lightning_anatomy.audit.cofiring import cofiring_clusters, cofiring_edges, leiden_communities

    t0, c0 = time.perf_counter(), time.process_time()
    x = firing_matrix(n_tokens, d_sae, seed=seed)
    gen = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    with common.PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        kept, i, j, w = cofiring_edges(x, min_tokens=10, top_fraction=0.01, block_size=block_size)
        edges = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        t0, c0 = time.perf_counter(), time.process_time()
        labels = leiden_communities(len(kept), i, j, w, seed=seed)
        leiden = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    check = cofiring_clusters({"h": x[: min(n_tokens, 2000)]}, min_tokens=10) if n_tokens else None
    return {
        "n_tokens": n_tokens, "d_sae": d_sae, "block_size": block_size,
        "mean_l0": float(x.nnz / max(n_tokens, 1)), "firing_nnz": int(x.nnz),
        "firing_matrix_mb": (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**20,
        "features_in_graph": int(len(kept)), "edges_kept": int(len(i)),
        "clusters_at_least_4": int((sizes >= 4).sum()), "features_in_clusters_at_least_4": int(sizes[sizes >= 4].sum()),
        "generate": gen, "cofiring_edges": edges, "leiden": leiden,
        "peak_rss_increase_mb": mem.rss_increase / 2**20, "peak_rss_mb": mem.rss_peak / 2**20,
        "dense_nmi_matrix_mb": d_sae * d_sae * 8 / 2**20,
        "smoke_clusters_on_2k_tokens": 0 if check is None else int(check["cluster"].nunique()),
    }


def tables(results: dict[str, Any]) -> str:
    r = results["run"]
    rows = [[f"{r['d_sae']:,}", f"{r['n_tokens']:,}", f"{r['mean_l0']:.1f}", f"{r['firing_matrix_mb']:.0f}",
             f"{r['cofiring_edges']['wall_s']:.1f}", f"{r['leiden']['wall_s']:.1f}", f"{r['peak_rss_increase_mb']:.0f}",
             f"{r['dense_nmi_matrix_mb']:.0f}", f"{r['edges_kept']:,}", f"{r['clusters_at_least_4']:,}"]]
    return common.markdown_table(["d_sae", "tokens", "L0", "X (MB)", "XᵀX + NMI + top 1 % (s)", "Leiden (s)",
                                  "peak RSS above start (MB)", "dense NMI would be (MB)", "edges", "clusters ≥ 4"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,024 features × 20k tokens")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--d-sae", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    common.setup_offline(args.threads)
    tokens = args.tokens or (20_000 if args.quick else 1_000_000)
    d_sae = args.d_sae or (1024 if args.quick else 16_384)
    start = time.perf_counter()
    results = {"format": FORMAT, "version": VERSION, "quick": args.quick, "machine": common.machine_info(),
               "run": run(tokens, d_sae, args.block_size, args.seed)}
    results["wall_s"] = time.perf_counter() - start
    name = "cofiring_scale.quick" if args.quick else "cofiring_scale"
    common.publish(results, args.out, name, tables)
    return results


if __name__ == "__main__":
    main()
