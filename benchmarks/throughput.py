"""Feature-extraction and audit throughput, and what they imply for a 260k-pair audit of an 8B model.

Per model, three conditions interleaved round by round in one process, on the same pairs
(rows of the shared HH-RLHF sample when it is present beside the checkout, else the demo set):

- `forward`: the plain model forward up to the hooked layer (`capture_activations` with
  `stop_at_deepest`), on the same length-sorted, pre-collated batches extraction uses: the
  floor any SAE extraction pays;
- `extract`: `extract_span_features` (Trainer.predict, SAE encode, span statistics, sparse
  results), in memory;
- `audit`: `audit_dataset` end to end (tokenize, extract, statistics, clusters, tracing, labels);
- `audit_no_labels`: the same with `label_concepts=False` (no second pass over the traced pairs
  for labels and contexts, a fixed cost that dominates small audits).

Reported: pairs/s and tokens/s of each, extraction throughput as a fraction of the plain forward
(GPU goal ≥ 0.9), and a FLOP-count projection of a 260k-pair audit of Llama-3.1-8B on one
H100 (assumptions written into the JSON; goal ≤ 3 GPU-hours).

    python benchmarks/throughput.py           # full settings (a few minutes on 2 CPU cores)
    python benchmarks/throughput.py --quick   # tiny sizes, for the smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

FORMAT = "lightning-anatomy/bench-throughput"
VERSION = 1
CONDITIONS = ("forward", "extract", "audit", "audit_no_labels")
QUICK_HH_ROWS = 100  # --quick: token statistics of the first rows only (the full sample takes ~10 s)


@dataclass(frozen=True)
class ModelSetting:
    """One model, its SAE and the rows it reads."""

    name: str
    source: str  # "tiny:<family>" or "embedded"
    n_pairs: int
    max_length: int
    batch_size: int = 8
    layers: int = 2
    width: int = 64
    vocab: int = 260
    hook_layer: int = 0  # tiny models (embedded: the committed SAE's hook)
    d_sae: int = 256
    repeats: int = 2
    warmup: int = 1


FULL = (
    ModelSetting("gpt2-4x256-byte", "tiny:gpt2", n_pairs=64, max_length=256, layers=4, width=256, hook_layer=1,
                 d_sae=4096, repeats=3),
    # ~15 s per extraction pass and ~65 s per labelled audit on a busy 2-core CPU: no warm-up round
    # (an untimed forward primes the model), two interleaved rounds.
    ModelSetting("smollm2-135m", "embedded", n_pairs=24, max_length=256, repeats=2, warmup=0),
)
QUICK = (
    ModelSetting("gpt2-2x64-byte", "tiny:gpt2", n_pairs=12, max_length=64, batch_size=4, hook_layer=0, d_sae=256,
                 repeats=1, warmup=0),
)


@dataclass(frozen=True)
class Projection:
    """The audit the issue sizes: Llama-3.1-8B read at a middle layer through a 32× SAE, on one H100.

    FLOPs per token = 2 · (parameters of the blocks up to the hook) + causal attention
    (2 · seq · width per block) + the SAE encoder (2 · width · d_sae). MFU 0.35: the project's own
    H200 measurement of a full DPO step of a 1.5B model (ENVIRONMENT.md: 269 ms for 8 × 512 × 2
    tokens at 8 · 1.5e9 FLOPs per token, i.e. 37% of the 989 TFLOP/s bf16 peak H100 and H200
    share), rounded down; an inference-only prefill of a larger model usually does better.
    """

    model: str = "Llama-3.1-8B"
    width: int = 4096
    n_layers: int = 32
    intermediate: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    hook_layer: int = 15  # blocks 0..15 run: half the network
    d_sae: int = 131072  # 32 × width (Llama Scope-size)
    n_pairs: int = 260_000
    gpu: str = "H100 SXM (bf16 dense peak 989 TFLOP/s)"
    peak_flops: float = 989e12
    mfu: float = 0.35
    batch_pairs: int = 16  # length-sorted batches, for the padding estimate

    def block_params(self) -> int:
        head_dim = self.width // self.n_heads
        attention = 2 * self.width * self.width + 2 * self.width * self.n_kv_heads * head_dim
        return attention + 3 * self.width * self.intermediate

    def flops_per_token(self, mean_seq: float) -> dict[str, float]:
        blocks = self.hook_layer + 1
        dense = 2.0 * self.block_params() * blocks
        attention = 2.0 * mean_seq * self.width * blocks
        sae = 2.0 * self.width * self.d_sae
        return {"dense": dense, "attention": attention, "sae_encode": sae, "total": dense + attention + sae}


# ----------------------------------------------------------------------------------- inputs
def load_rows(n: int, tokenizer: Any) -> tuple[list[Any], str]:
    """The first `n` HH-RLHF rows when the shared sample is present, else the demo set's training rows."""
    from lightning_anatomy.data import read_preferences

    if common.HH_RLHF.is_file():
        return list(read_preferences(common.HH_RLHF, on_bad_rows="skip"))[:n], f"hh-rlhf ({common.HH_RLHF.name}, first {n} rows)"
    from lightning_anatomy.demo.data import make_demo_data

    common.log(f"  {common.HH_RLHF} is absent: using the demo data instead")
    demo = make_demo_data(n_train=n, seed=0)
    return list(read_preferences(demo.train, tokenizer=tokenizer))[:n], f"demo (make_demo_data, {n} rows)"


def build(setting: ModelSetting) -> tuple[Any, Any, Any, str, dict[str, str]]:
    """(model, tokenizer, sae, hook, provenance) for a setting."""
    if setting.source == "embedded":
        from lightning_anatomy.models.embedded import EMBEDDED_HOOK, load_embedded

        model, tokenizer = load_embedded()
        try:
            from lightning_anatomy.models.embedded import load_embedded_sae

            sae = load_embedded_sae()
            hook, sae_note = sae.cfg.metadata.hook_name, "embedded SAE (load_embedded_sae)"
        except Exception as err:  # the committed SAE may be absent: throughput depends only on its shape
            from sae_lens import TopKSAE, TopKSAEConfig

            common.log(f"  embedded SAE unavailable ({err}); using a random TopK SAE of its shape")
            torch.manual_seed(0)
            sae = TopKSAE(TopKSAEConfig(d_in=model.config.hidden_size, d_sae=2304, k=32))
            hook, sae_note = EMBEDDED_HOOK, "random TopK SAE d_sae=2304 k=32 (embedded SAE not found)"
        return model, tokenizer, sae, hook, {"model": "SmolLM2-135M-Instruct (embedded, fp32)", "sae": sae_note}
    if setting.source.startswith("tiny:"):
        from sae_lens import StandardSAE, StandardSAEConfig

        from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

        family = setting.source.split(":", 1)[1]
        model = build_tiny_model(family, vocab_size=setting.vocab, hidden_size=setting.width,
                                 num_layers=setting.layers, num_heads=max(1, setting.width // 64),
                                 max_positions=max(512, setting.max_length))
        torch.manual_seed(0)
        sae = StandardSAE(StandardSAEConfig(d_in=setting.width, d_sae=setting.d_sae))
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0.0, 0.05)
        return model, build_tiny_tokenizer(), sae, f"blocks.{setting.hook_layer}.hook_resid_post", {
            "model": f"random {setting.source}", "sae": f"random StandardSAE d_sae={setting.d_sae}"}
    raise ValueError(f"unknown model source {setting.source!r}; use 'tiny:<family>' or 'embedded'")


def sorted_batches(pairs: list[Any], batch_size: int) -> list[list[Any]]:
    """Longest pairs first, like extraction's plan, so both conditions see the same batch shapes."""
    order = sorted(range(len(pairs)), key=lambda i: (-_longest(pairs[i]), i))
    return [[pairs[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]


def _longest(p: Any) -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def token_counts(pairs: list[Any], batch_size: int) -> dict[str, float]:
    """Real tokens one `[chosen; rejected]` forward reads per pair, and with length-sorted padding."""
    real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    padded = sum(2 * len(b) * max(_longest(p) for p in b) for b in sorted_batches(pairs, batch_size))
    return {"pairs": len(pairs), "real_tokens": real, "padded_tokens": padded,
            "real_tokens_per_pair": real / len(pairs), "padded_tokens_per_pair": padded / len(pairs),
            "mean_sequence": real / (2 * len(pairs))}


def params_up_to(model: Any, layer: int) -> int:
    """Parameters of the transformer blocks 0..layer (embeddings are lookups, not FLOPs)."""
    from lightning_anatomy.model_access import find_blocks

    _, blocks = find_blocks(model)
    return sum(p.numel() for block in list(blocks)[: layer + 1] for p in block.parameters())


# ----------------------------------------------------------------------------------- measuring
def run_model(setting: ModelSetting) -> dict[str, Any]:
    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.concepts.extraction import extract_span_features
    from lightning_anatomy.concepts.lens import capture_activations
    from lightning_anatomy.data import collate_pairs, tokenize_rows
    from lightning_anatomy.data.tokenize import resolve_pad_token_id
    from lightning_anatomy.model_access import resolve_hook

    common.log(f"== {setting.name}: {setting.n_pairs} pairs, max_length {setting.max_length}, "
               f"batch {setting.batch_size}")
    model, tokenizer, sae, hook, provenance = build(setting)
    model.eval()
    rows, data_source = load_rows(setting.n_pairs, tokenizer)
    max_prompt = max(1, min(256, setting.max_length // 2))  # audit_dataset's default
    pairs = list(tokenize_rows(rows, tokenizer, max_length=setting.max_length, max_prompt_length=max_prompt))
    pad = resolve_pad_token_id(tokenizer)
    lens = ConceptLens(model, {hook: sae}, fidelity_check=False)
    point = resolve_hook(model, hook)
    collated = [collate_pairs(b, pad) for b in sorted_batches(pairs, setting.batch_size)]

    def forward() -> None:
        for batch in collated:
            capture_activations(model, [point], batch["input_ids"], batch["attention_mask"], stop_at_deepest=True)

    def extract() -> None:
        extract_span_features(pairs, lens, batch_size=setting.batch_size, progress=False, pad_token_id=pad)

    def audit(label_concepts: bool) -> None:
        audit_dataset(rows, lens, tokenizer, max_length=setting.max_length, batch_size=setting.batch_size,
                      progress=False, label_concepts=label_concepts)

    jobs: dict[str, Callable[[], None]] = {"forward": forward, "extract": extract, "audit": partial(audit, True),
                                           "audit_no_labels": partial(audit, False)}
    first = collated[0]  # an untimed forward first: one-off kernel and allocator set-up stays out
    capture_activations(model, [point], first["input_ids"], first["attention_mask"], stop_at_deepest=True)
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    calls = {"n": 0}

    def timed(name: str) -> float:
        wall, used = common.time_call_cpu(jobs[name])
        if calls["n"] // len(jobs) >= setting.warmup:
            cpu[name].append(used)
        calls["n"] += 1
        return wall

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wall = common.interleaved({name: partial(timed, name) for name in jobs}, repeats=setting.repeats,
                                  warmup=setting.warmup)
    counts = token_counts(pairs, setting.batch_size)
    conditions = {}
    for name in jobs:
        w, c = common.summarize(wall[name]), common.summarize(cpu[name])
        conditions[name] = {
            "wall_s": w, "cpu_s": c, "pairs_per_s": counts["pairs"] / c["median"],
            "pairs_per_s_wall": counts["pairs"] / w["median"],
            "tokens_per_s": counts["real_tokens"] / c["median"],
            "tokens_per_s_wall": counts["real_tokens"] / w["median"],
        }
    n_hook_params = params_up_to(model, point.layer)
    flops_token = 2.0 * n_hook_params + 2.0 * sae.W_enc.shape[0] * sae.W_enc.shape[1]
    return {
        "setting": asdict(setting), **provenance, "hook": hook, "d_sae": int(sae.W_dec.shape[0]),
        "data": data_source, "tokens": counts, "conditions": conditions,
        "params_up_to_hook": n_hook_params, "flops_per_token": flops_token,
        "forward_gflops_per_s": conditions["forward"]["tokens_per_s"] * flops_token / 1e9,
        "extract_vs_forward": common.ratio(conditions["forward"]["cpu_s"]["median"],
                                           conditions["extract"]["cpu_s"]["median"]),
        "extract_vs_forward_wall": common.ratio(conditions["forward"]["wall_s"]["median"],
                                                conditions["extract"]["wall_s"]["median"]),
        "audit_vs_extract": common.ratio(conditions["extract"]["cpu_s"]["median"],
                                         conditions["audit"]["cpu_s"]["median"]),
        "audit_no_labels_vs_extract": common.ratio(conditions["extract"]["cpu_s"]["median"],
                                                   conditions["audit_no_labels"]["cpu_s"]["median"]),
    }


def hh_token_stats(projection: Projection, max_rows: int | None = None) -> dict[str, Any] | None:
    """Tokens per pair of the HH-RLHF sample (all rows, or the first `max_rows`) with the embedded
    (Llama-family BPE) tokenizer; None without the sample or the tokenizer."""
    if not common.HH_RLHF.is_file():
        return None
    from lightning_anatomy.data import read_preferences, tokenize_rows
    from lightning_anatomy.models.embedded import EmbeddedModelError, load_embedded_tokenizer

    try:
        tokenizer = load_embedded_tokenizer()
    except EmbeddedModelError as err:
        common.log(f"  no embedded tokenizer for the HH token statistics ({err})")
        return None
    rows = list(read_preferences(common.HH_RLHF, on_bad_rows="skip"))[:max_rows]
    out: dict[str, Any] = {"rows": len(rows), "tokenizer": "SmolLM2 (49k BPE), standing in for Llama-3's"}
    for label, max_length, max_prompt in (("audit_default_max_length_512", 512, 256),
                                          ("untruncated", 8192, None)):
        pairs = list(tokenize_rows(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt))
        out[label] = token_counts(pairs, projection.batch_pairs)
    return out


def project(projection: Projection, tokens: dict[str, Any], efficiency: float) -> dict[str, Any]:
    """GPU-hours of the audit at the assumed MFU, with extraction at `efficiency` × plain-forward speed."""
    per_token = projection.flops_per_token(tokens["mean_sequence"])
    total_tokens = projection.n_pairs * tokens["padded_tokens_per_pair"]
    seconds_forward = total_tokens * per_token["total"] / (projection.peak_flops * projection.mfu)
    return {
        "flops_per_token": per_token, "tokens_total": total_tokens, "padded_tokens_per_pair": tokens["padded_tokens_per_pair"],
        "forward_gpu_hours": seconds_forward / 3600,
        "extraction_efficiency": efficiency, "gpu_hours": seconds_forward / efficiency / 3600,
    }


def projection_report(results: dict[str, Any], hh_rows: int | None = None) -> dict[str, Any]:
    spec = Projection()
    stats = hh_token_stats(spec, hh_rows)
    source = "hh-rlhf"
    if stats is None:  # no HH data: the measured rows stand in (far shorter than real data: flagged)
        any_model = next(iter(results["models"].values()))
        stats = {"measured_rows": any_model["tokens"]}
        source = f"{any_model['data']} (NOT representative of HH-RLHF lengths)"
    embedded = results["models"].get("smollm2-135m")
    measured = min(embedded["extract_vs_forward"], 1.0) if embedded else None
    base = stats.get("audit_default_max_length_512", stats.get("measured_rows"))
    out: dict[str, Any] = {
        "assumptions": {**asdict(spec), "block_params": spec.block_params(),
                        "params_up_to_hook": spec.block_params() * (spec.hook_layer + 1),
                        "mfu_justification": Projection.__doc__.split("MFU 0.35:", 1)[1].strip().replace("\n    ", " "),
                        "token_source": source},
        "token_stats": stats,
        "at_goal_efficiency_0.9": project(spec, base, 0.9),
    }
    if measured is not None:
        out["at_measured_cpu_efficiency"] = project(spec, base, measured)
        out["measured_reference"] = {
            "model": "smollm2-135m", "extract_tokens_per_s_cpu": embedded["conditions"]["extract"]["tokens_per_s"],
            "forward_tokens_per_s_cpu": embedded["conditions"]["forward"]["tokens_per_s"],
            "forward_gflops_per_s_cpu": embedded["forward_gflops_per_s"],
            "note": "CPU rates set only the extraction efficiency carried over; GPU speed comes from peak × MFU",
        }
    if "untruncated" in stats:
        out["untruncated_at_goal_efficiency_0.9"] = project(spec, stats["untruncated"], 0.9)
    return out


# ----------------------------------------------------------------------------------- report
def tables(results: dict[str, Any]) -> str:
    machine = results["machine"]
    rows = []
    for name, r in results["models"].items():
        c = r["conditions"]
        rows.append([name, r["data"].split(" (")[0], f"{r['tokens']['real_tokens_per_pair']:.0f}",
                     f"{c['forward']['pairs_per_s']:.2f}", f"{c['extract']['pairs_per_s']:.2f}",
                     f"{c['audit']['pairs_per_s']:.2f}", f"{c['audit_no_labels']['pairs_per_s']:.2f}",
                     f"{c['extract']['tokens_per_s']:.0f}",
                     f"{r['extract_vs_forward']:.3f}", f"{r['extract_vs_forward_wall']:.3f}"])
    out = [f"Extraction and audit throughput on {machine['device']} ({machine['cpu']}, {machine['torch_threads']} "
           "threads), per process-CPU second (wall ratio alongside); medians of interleaved runs.", "",
           common.markdown_table(["model", "data", "tokens/pair", "forward pairs/s", "extract pairs/s",
                                  "audit pairs/s", "audit w/o labels pairs/s", "extract tokens/s",
                                  "extract / forward", "(wall)"], rows)]
    p = results["projection"]
    a = p["assumptions"]
    proj_rows = [["extraction at 0.9 × forward (GPU goal)", f"{p['at_goal_efficiency_0.9']['gpu_hours']:.2f}"]]
    if "at_measured_cpu_efficiency" in p:
        eff = p["at_measured_cpu_efficiency"]["extraction_efficiency"]
        proj_rows.append([f"extraction at the measured CPU efficiency ({eff:.2f})",
                          f"{p['at_measured_cpu_efficiency']['gpu_hours']:.2f}"])
    if "untruncated_at_goal_efficiency_0.9" in p:
        proj_rows.append(["untruncated transcripts, 0.9 × forward", f"{p['untruncated_at_goal_efficiency_0.9']['gpu_hours']:.2f}"])
    goal = p["at_goal_efficiency_0.9"]
    out += ["", f"Projected audit of {a['n_pairs']:,} pairs on {a['model']} (hook after block {a['hook_layer']}, "
            f"d_sae {a['d_sae']:,}) on one {a['gpu'].split(' (')[0]} at MFU {a['mfu']}: "
            f"{goal['padded_tokens_per_pair']:.0f} padded tokens/pair ({a['token_source']}), "
            f"{goal['flops_per_token']['total'] / 1e9:.2f} GFLOP/token. Goal ≤ 3 GPU-hours.", "",
            common.markdown_table(["scenario", "GPU-hours"], proj_rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 40 s)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="directory for throughput.json")
    parser.add_argument("--models", nargs="*", help="only these model settings (by name)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, cores))")
    parser.add_argument("--report", type=Path, help="only re-print the tables of a saved throughput.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        import json

        results = json.loads(args.report.read_text())
        if results.get("format") != FORMAT:
            raise SystemExit(f"--report: {args.report} is not a throughput result (format {results.get('format')!r}, "
                             f"expected {FORMAT!r})")
        print(tables(results))
        return results

    common.setup_offline(args.threads)
    import lightning  # noqa: F401  (loaded before quieting its loggers)

    common.quiet_libraries()
    settings = common.select_settings(QUICK if args.quick else FULL, args.models)
    started = time.time()
    results: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "quick": args.quick, "machine": common.machine_info("cpu"),
        "packages": common.package_versions(["torch", "lightning", "transformers", "sae-lens"]),
        "time_basis": "cpu_s", "models": {},
    }
    for setting in settings:
        results["models"][setting.name] = run_model(setting)
    results["projection"] = projection_report(results, hh_rows=QUICK_HH_ROWS if args.quick else None)
    results["wall_s"] = time.time() - started
    name = "throughput.quick" if args.quick else "throughput"
    common.publish(results, args.out, name, tables)
    return results


if __name__ == "__main__":
    main()
