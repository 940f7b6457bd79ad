"""Benchmark (e): the cost benchmark on a CUDA GPU, at the sizes the package's users train.

Random-initialised Qwen2-shaped models at 0.5B and 1.5B (bf16, SDPA attention, 8 pairs × 512
tokens, frozen reference copy, AdamW), measured interleaved in one run with `benchmarks/cost.py`'s
machinery (wall time; peak CUDA memory):

1. callbacks: vanilla DPOModule vs ConceptProjection (gradient, own layer / all later layers),
   ConceptAttribution every step with a 16k-feature SAE, ConceptDriftMonitor every 50 steps
   (amortised), ConceptBlocking;
2. DPOModule (chunked log-probs, and its full-logits path) vs TRL 1.16's DPOTrainer;
3. FSDP on 1 GPU as a smoke: a few DPO steps under `ModelParallelStrategy` (FSDP2) and
   `FSDPStrategy` (FSDP1, blocks wrapped with `decoder_block_classes`; GPU only), their step time
   and peak memory next to the unsharded step.

It is sized to finish in about 8 minutes on one H200 and stops starting new work past
`--budget-s`. Without CUDA it writes nothing and exits 0 ("skipped"); `--smoke` runs the same code
path on a tiny CPU model (the tests' check of this script).

    python benchmarks/gpu.py                 # on a CUDA machine -> results/gpu.json
    python benchmarks/gpu.py --smoke --out /tmp/x   # tiny CPU run of every code path -> gpu.smoke.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import cost  # noqa: E402
import torch  # noqa: E402

FORMAT = "lightning-anatomy/bench-gpu"
VERSION = 1
GPU_CONDITIONS = ("vanilla", "vanilla_aa", "projection_own", "projection_all_later", "attribution",
                  "drift_between", "drift_probing", "blocking")
GPU = (
    cost.ModelSetting("qwen2-0.5b", "random:qwen2-0.5b", pairs_per_step=8, prompt_tokens=256, completion_tokens=256,
                      layers=24, width=896, vocab=151936, hook_layer=12, d_sae=16384, probe_pairs=8,
                      steps_per_block=4, repeats=2, warmup=1, conditions=GPU_CONDITIONS, precision="bf16-true"),
    cost.ModelSetting("qwen2-1.5b", "random:qwen2-1.5b", pairs_per_step=8, prompt_tokens=256, completion_tokens=256,
                      layers=28, width=1536, vocab=151936, hook_layer=14, d_sae=16384, probe_pairs=8,
                      steps_per_block=4, repeats=2, warmup=1, conditions=GPU_CONDITIONS, precision="bf16-true"),
)
SMOKE = (
    cost.ModelSetting("tiny-qwen2", "tiny:qwen2", pairs_per_step=2, prompt_tokens=8, completion_tokens=8,
                      layers=2, width=64, vocab=260, hook_layer=0, d_sae=128, probe_pairs=2, steps_per_block=1,
                      repeats=1, warmup=0, conditions=("vanilla", "attribution")),  # the GPU conditions: cost.py's smoke
)
FSDP_STEPS = 3


def fsdp_smoke(setting: cost.ModelSetting, device: str) -> dict[str, Any]:
    """A few DPO steps per FSDP flavour on one device, beside the unsharded step (each in its own fit).

    A failure is recorded, not raised: the smoke must not cost the numbers measured before it.
    """
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.utils.data import DataLoader

    from lightning_anatomy.data import collate_pairs
    from lightning_anatomy.module import DPOModule
    from lightning_anatomy.sharding import decoder_block_classes

    steps = FSDP_STEPS + 1
    flavours: dict[str, Any] = {
        "unsharded": lambda model: "auto",
        "fsdp2": lambda model: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
    }
    if device.startswith("cuda"):  # Lightning refuses FSDPStrategy without a GPU
        flavours["fsdp1"] = lambda model: FSDPStrategy(auto_wrap_policy=decoder_block_classes(model))
    out: dict[str, Any] = {}
    for name, make in flavours.items():
        try:
            model, tokenizer, _ = cost.build_model(setting, device)  # fresh: sharding changes a model in place
            pad, eos = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
            pairs = cost.random_pairs(steps * setting.pairs_per_step, setting, int(model.config.vocab_size), eos,
                                      seed=0)
            module = DPOModule(model, reference="copy", lr=1e-6, scheduler="constant", reference_cache_dir=None)
            clock = cost._Clock(device)
            loader = DataLoader(pairs, batch_size=setting.pairs_per_step, collate_fn=partial(collate_pairs, pad_token_id=pad))
            trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                                strategy=make(model), max_steps=steps, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                precision=setting.precision, callbacks=[cost.StepTimer(clock)])
            with common.PeakMemory(device) as peak, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, train_dataloaders=loader)
            wall, _ = clock.steps(FSDP_STEPS)
            out[name] = {"ok": True, "wall_s": common.summarize(wall), "peak_cuda_mb": None if peak.cuda_peak is None
                         else peak.cuda_peak / 2**20, "final_loss": float(trainer.callback_metrics["train_loss"])}
            del trainer, module, model
        except Exception as err:  # noqa: BLE001 - a smoke records what broke
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        gc.collect()
    return out


def tables(results: dict[str, Any]) -> str:
    parts = [f"GPU benchmark on {results['machine'].get('gpu', results['machine']['device'])}: "
             + ("smoke run (tiny model, CPU)" if results["smoke"] else "random Qwen2 shapes, bf16, 8 pairs x 512 tokens")]
    parts.append(cost.tables({**results, "models": {k: v for k, v in results["models"].items() if "setting" in v}}))
    rows = []
    for name, r in results["models"].items():
        for flavour, f in r.get("fsdp_smoke", {}).items():
            rows.append([name, flavour, "ok" if f["ok"] else f["error"][:80],
                         f"{f['wall_s']['median']:.3f}" if f["ok"] else "–",
                         "–" if not f["ok"] or f["peak_cuda_mb"] is None else f"{f['peak_cuda_mb']:.0f}"])
    if rows:
        parts += ["", "FSDP on one device (smoke):", "",
                  common.markdown_table(["model", "strategy", "status", "s/step", "peak CUDA MB"], rows)]
    if results.get("skipped_settings"):
        parts.append(f"\nnot measured (time budget): {', '.join(results['skipped_settings'])}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (tests)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="directory for gpu.json")
    parser.add_argument("--models", nargs="*", help="only these model settings (by name)")
    parser.add_argument("--quick", action="store_true", help="the 0.5B model only (run_all.py --quick passes it)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no new model after this many seconds")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        common.log("gpu.py: skipped, no CUDA device (nothing written); --smoke runs the code path on a CPU")
        return None
    device = "cpu" if args.smoke else "cuda"
    common.setup_offline(1 if args.smoke else None)
    common.quiet_libraries()
    settings = common.select_settings(SMOKE if args.smoke else GPU[:1] if args.quick else GPU, args.models)
    started = time.time()
    machine = common.machine_info(device)
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    results: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "smoke": args.smoke, "machine": machine,
        "packages": common.package_versions(["torch", "lightning", "transformers", "trl", "sae-lens"]),
        "memory_method": "peak CUDA allocated bytes per block (torch.cuda.max_memory_allocated)",
        "time_basis": cost._time_basis(device), "targets_gpu": cost.TARGETS, "models": {}, "skipped_settings": [],
    }
    for setting in settings:
        if time.time() - started > args.budget_s:
            results["skipped_settings"].append(setting.name)
            continue
        result = cost.run_model(setting, device, with_trl=not args.no_trl)
        result["fsdp_smoke"] = fsdp_smoke(replace(setting, steps_per_block=FSDP_STEPS), device)
        results["models"][setting.name] = result
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    results["wall_s"] = time.time() - started
    common.publish(results, args.out, "gpu.smoke" if args.smoke else "gpu", tables)
    return results


if __name__ == "__main__":
    main()
