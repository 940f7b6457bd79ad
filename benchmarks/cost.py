"""Benchmark (d): what a DPO step costs with the concept callbacks, and against TRL's DPOTrainer.

Two groups per model, each measured side by side in one process with the conditions interleaved
round by round (ABC…, …CBA, …), every block a fresh `Trainer.fit` of a few steps on the same
`DPOModule`. Step time is the wall time between consecutive `on_train_batch_end` calls (data,
forward, backward, optimizer and every callback hook), the first step of a block is dropped.

1. callbacks: vanilla DPO vs. `ConceptProjection` (gradient, own layer / all later layers),
   `ConceptAttribution` every step, `ConceptDriftMonitor` (every 50 steps: the steps in between
   are timed as they are, and the probe cost is measured by a run that probes after every step;
   amortised = (49 · t_between + t_probing) / 50) and all three together.
2. TRL: `DPOModule` vs. TRL's `DPOTrainer` on identical token batches (same pairs per step,
   frozen reference copy, fp32, AdamW, no gradient checkpointing, no eval, no logging, no
   precomputed reference); steps/s ratio and step-memory ratio, for DPOModule's default chunked
   log-probs (LM head over chunks of completion positions) and for its full-logits path
   (`logps_chunk_size=None`, the path before chunking), all three interleaved.

Memory: peak RSS inside each block (freed heap returned to the OS before each block, so a block
never inherits another's garbage) and the rise above the RSS resident at block start (gradients,
optimizer state, activations: what training adds to the loaded models). On CUDA also peak
allocated bytes, which is then the basis of the memory ratios.

    python benchmarks/cost.py            # full settings (~6 min on 2 CPU cores)
    python benchmarks/cost.py --quick    # tiny sizes, for the smoke test
    python benchmarks/cost.py --models smollm2-135m --groups trl   # group 2 only -> cost.trl.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

FORMAT = "lightning-anatomy/bench-cost"
VERSION = 1
DRIFT_EVERY = 50
# The targets, stated for a GPU; CPU ratios are reported against them as measured.
TARGETS = {"projection_own": 1.01, "projection_all_later": 1.01, "attribution": 1.03, "drift_amortised": 1.02,
           "blocking": 1.05, "memory": 1.05, "trl_steps_per_s": 1.0}
MEMORY_METHOD = ("peak RSS (VmHWM, reset per block via /proc/self/clear_refs after gc + malloc_trim); "
                 "step memory = that peak minus the RSS at block start")
CALLBACK_CONDITIONS = ("vanilla", "vanilla_aa", "projection_own", "projection_all_later", "attribution", "drift_between",
                       "drift_probing", "blocking", "all")


@dataclass(frozen=True)
class ModelSetting:
    """One model and the batch it is trained on."""

    name: str
    source: str  # "tiny:<family>", "embedded" or "random:<RANDOM_SHAPES key>"
    pairs_per_step: int
    prompt_tokens: int
    completion_tokens: int  # per response, eos included
    layers: int = 2
    width: int = 64
    vocab: int = 260
    hook_layer: int = 0  # tiny models: the SAE's block (embedded: read from the SAE)
    d_sae: int = 256  # tiny models: random SAE width (16× the model width by default)
    n_concepts: int = 8  # suppressed SAE features in the projection's concept set
    probe_pairs: int = 8  # drift monitor probe (chosen responses, teacher-forced)
    steps_per_block: int = 3  # timed steps per block (one more runs first, untimed)
    repeats: int = 3
    warmup: int = 1
    trl: bool = True
    conditions: tuple[str, ...] = CALLBACK_CONDITIONS
    precision: str = "32-true"  # Lightning's; TRL gets bf16=True for "bf16-*"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.conditions) - set(CALLBACK_CONDITIONS))
        if unknown or "vanilla" not in self.conditions:
            raise ValueError(f"ModelSetting {self.name!r}: conditions must include 'vanilla' and come from "
                             f"{CALLBACK_CONDITIONS}; got unknown {unknown}")

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FULL = (
    ModelSetting("gpt2-4x256-byte", "tiny:gpt2", pairs_per_step=4, prompt_tokens=64, completion_tokens=64,
                 layers=4, width=256, vocab=260, hook_layer=1, d_sae=4096, probe_pairs=32,
                 steps_per_block=3, repeats=3),
    # 5-7 s a step on a busy 2-core CPU: the conditions the issue targets, a short sequence, fewer repeats.
    ModelSetting("smollm2-135m", "embedded", pairs_per_step=2, prompt_tokens=24, completion_tokens=24,
                 probe_pairs=8, steps_per_block=2, repeats=2, warmup=0,
                 conditions=("vanilla", "vanilla_aa", "projection_own", "attribution", "drift_probing", "blocking")),
)
QUICK = (
    ModelSetting("gpt2-2x64-byte", "tiny:gpt2", pairs_per_step=2, prompt_tokens=16, completion_tokens=16,
                 layers=2, width=64, vocab=260, hook_layer=0, d_sae=256, probe_pairs=4,
                 steps_per_block=2, repeats=1, warmup=0),
)


# ----------------------------------------------------------------------------------- inputs
def random_pairs(n: int, setting: ModelSetting, vocab: int, eos: int, seed: int) -> list[Any]:
    """Pairs of random tokens with exactly the setting's lengths: every batch is [2B, T], no padding.

    Step cost does not depend on which tokens are seen, and equal lengths make the DPOModule and
    TRL batches identical tensors.
    """
    from lightning_anatomy.data import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    low = 4 if vocab > 8 else 0  # the tiny tokenizer's specials are ids 0..3

    def ids(n_tokens: int) -> list[int]:
        return torch.randint(low, vocab, (n_tokens,), generator=g).tolist()

    c = setting.completion_tokens - 1
    return [TokenizedPair(i, ids(setting.prompt_tokens), ids(c) + [eos], ids(c) + [eos]) for i in range(n)]


# Random models of real shapes (benchmarks/gpu.py): Qwen2-0.5B / 1.5B configurations.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
}


def build_random_model(shape: str, device: str, dtype: torch.dtype) -> Any:
    """A randomly initialised model of a `RANDOM_SHAPES` shape, built on `device` in `dtype` (SDPA attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; choose one of {sorted(RANDOM_SHAPES)}")
    spec = dict(RANDOM_SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                               pad_token_id=2, use_cache=False, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def build_model(setting: ModelSetting, device: str = "cpu") -> tuple[Any, Any, str]:
    """(model, tokenizer, provenance) for a setting; the tokenizer is only needed by TRL."""
    if setting.source.startswith("random:"):
        from lightning_anatomy.models.tiny import build_tiny_tokenizer

        dtype = torch.bfloat16 if setting.precision.startswith("bf16") else torch.float32
        shape = setting.source.split(":", 1)[1]
        # the byte tokenizer only gives TRL its special ids; the batches are random ids of the model's vocabulary
        return build_random_model(shape, device, dtype), build_tiny_tokenizer(), f"random {shape} ({dtype})"
    if setting.source.startswith("tiny:"):
        from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

        model = build_tiny_model(setting.source.split(":", 1)[1], vocab_size=setting.vocab,
                                 hidden_size=setting.width, num_layers=setting.layers,
                                 num_heads=max(1, setting.width // 64), max_positions=max(512, setting.seq_len))
        return model, build_tiny_tokenizer(), f"random {setting.source}"
    if setting.source == "embedded":
        from lightning_anatomy.models.embedded import load_embedded

        model, tokenizer = load_embedded()
        return model, tokenizer, "SmolLM2-135M-Instruct (embedded, fp32)"
    raise ValueError(f"unknown model source {setting.source!r}; use 'tiny:<family>', 'embedded' or 'random:<shape>'")


def build_sae(setting: ModelSetting, model: Any) -> tuple[Any, str, str]:
    """(sae, hook name, provenance): the committed SAE for the embedded model, else a random one."""
    if setting.source == "embedded":
        try:
            from lightning_anatomy.models.embedded import load_embedded_sae

            sae = load_embedded_sae()
            return sae, sae.cfg.metadata.hook_name, "embedded SAE (load_embedded_sae)"
        except Exception as err:  # the asset may not be installed: the cost depends only on the shape
            from sae_lens import TopKSAE, TopKSAEConfig

            from lightning_anatomy.models.embedded import EMBEDDED_HOOK

            common.log(f"  embedded SAE unavailable ({err}); using a random TopK SAE of its shape")
            torch.manual_seed(0)
            sae = TopKSAE(TopKSAEConfig(d_in=model.config.hidden_size, d_sae=2304, k=32))
            return sae, EMBEDDED_HOOK, "random TopK SAE, d_sae=2304, k=32 (embedded SAE not found)"
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=setting.width, d_sae=setting.d_sae))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0.0, 0.05)
    return sae, f"blocks.{setting.hook_layer}.hook_resid_post", f"random StandardSAE d_sae={setting.d_sae}"


# ----------------------------------------------------------------------------------- timing
@dataclass
class Block:
    """What one block measured: per-step wall and process-CPU seconds, and its peak memory."""

    wall: list[float]
    cpu: list[float]
    memory: common.PeakMemory


class _Clock:
    """Step boundaries: wall clock (GPU work synchronised) and this process's CPU time."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        common.sync(self.device)
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self, expected: int) -> tuple[list[float], list[float]]:
        wall = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]
        cpu = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:])]
        if len(wall) != expected:
            raise RuntimeError(f"expected {expected} timed steps, got {len(wall)}")
        return wall, cpu


class StepTimer(Callback):
    """Marks the end of every training batch (put it last, after the callbacks it times)."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.mark()


def _lightning_block(module: Any, pairs: list[Any], callbacks: list[Any], setting: ModelSetting, device: str,
                     pad_id: int) -> Block:
    """One fresh `Trainer.fit` of steps_per_block + 1 steps on `module` (the first step untimed)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_anatomy.data import collate_pairs

    clock = _Clock(device)
    steps = setting.steps_per_block + 1
    loader = DataLoader(pairs[: steps * setting.pairs_per_step], batch_size=setting.pairs_per_step, shuffle=False,
                        collate_fn=partial(collate_pairs, pad_token_id=pad_id))
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, precision=setting.precision,
        callbacks=[*callbacks, StepTimer(clock)],
    )
    with common.PeakMemory(device) as peak:
        trainer.fit(module, train_dataloaders=loader)
    module.trainer = None  # the module would keep this trainer (and its optimizer state) alive
    del trainer
    gc.collect()
    return Block(*clock.steps(setting.steps_per_block), peak)


def _trl_block(policy: Any, reference: Any, tokenizer: Any, pairs: list[Any], setting: ModelSetting, device: str,
               out_dir: str) -> Block:
    """The same steps through TRL's DPOTrainer on the same token ids (its text dataset is swapped out)."""
    from datasets import Dataset

    with contextlib.redirect_stdout(sys.stderr):  # transformers prints a W&B-offline notice on import
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import DPOConfig, DPOTrainer

    clock = _Clock(device)

    class TRLStepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    steps = setting.steps_per_block + 1
    config = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=setting.pairs_per_step, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", beta=0.1, loss_type="sigmoid", max_length=setting.seq_len,
        precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=setting.precision.startswith("bf16"),
        fp16=False,
        use_cpu=not device.startswith("cuda"), logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0,
    )
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=text,
                             processing_class=tokenizer, callbacks=[TRLStepTimer()])
    trainer.remove_callback(PrinterCallback)  # it prints the train summary to stdout
    n = steps * setting.pairs_per_step
    trainer.train_dataset = Dataset.from_list([
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs[:n]])
    with common.PeakMemory(device) as peak, warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        trainer.train()
    del trainer
    for model in (policy, reference):  # undo TRL's fused-LM-head patch, so every block starts alike
        model.__dict__.pop("forward", None)
    gc.collect()
    return Block(*clock.steps(setting.steps_per_block), peak)


def measure(blocks: dict[str, Callable[[], Block]], setting: ModelSetting) -> dict[str, dict[str, Any]]:
    """Interleave the blocks (warm-up rounds dropped); per condition: wall/CPU step summaries and memory."""
    kept: dict[str, list[Block]] = {name: [] for name in blocks}
    rounds = {"n": 0}

    def run(name: str) -> list[float]:
        block = blocks[name]()
        if rounds["n"] // len(blocks) >= setting.warmup:
            kept[name].append(block)
        rounds["n"] += 1
        return block.wall

    common.interleaved({name: partial(run, name) for name in blocks}, repeats=setting.repeats,
                       warmup=setting.warmup)
    out = {}
    for name, done in kept.items():
        out[name] = {
            "wall_s": common.summarize([t for b in done for t in b.wall]),
            "cpu_s": common.summarize([t for b in done for t in b.cpu]),
            "memory": _memory_summary([b.memory for b in done]),
        }
    return out


# ----------------------------------------------------------------------------------- conditions
def _callbacks(setting: ModelSetting, sae: Any, hook: str, probe: list[Any]) -> dict[str, Callable[[], list[Any]]]:
    """Factories of each condition's callbacks (instances are built once and reused across blocks)."""
    from lightning_anatomy.callbacks import (
        ConceptAttribution,
        ConceptBlocking,
        ConceptDriftMonitor,
        ConceptProjection,
    )
    from lightning_anatomy.concepts import ConceptSet

    concepts = ConceptSet.from_sae_features(sae, hook, list(range(setting.n_concepts)))

    def drift(every: int) -> Any:
        return ConceptDriftMonitor({hook: sae}, probe, every_n_steps=every, track=[(hook, 0)],
                                   evaluate_on_train_end=False, batch_size=setting.pairs_per_step * 2)

    def attribution() -> Any:
        return ConceptAttribution({hook: sae}, every_n_steps=1, track=[(hook, 0)])

    factories: dict[str, Callable[[], list[Any]]] = {
        "vanilla": list,
        "vanilla_aa": list,  # vanilla again: its ratio to vanilla is the noise floor of every other ratio
        "projection_own": lambda: [ConceptProjection(concepts, mode="gradient", layers="own")],
        "projection_all_later": lambda: [ConceptProjection(concepts, mode="gradient", layers="all_later")],
        "attribution": lambda: [attribution()],
        "drift_between": lambda: [drift(DRIFT_EVERY)],
        "drift_probing": lambda: [drift(1)],
        # BLOCK-EM on the same SAE features (reads the reference forward that already runs)
        "blocking": lambda: [ConceptBlocking({f"f{f}": (hook, f) for f in range(setting.n_concepts)},
                                             saes={hook: sae}, lam=1.0)],
        "all": lambda: [ConceptProjection(concepts, mode="gradient", layers="own"), attribution(), drift(DRIFT_EVERY)],
    }
    return {name: factories[name] for name in setting.conditions}


def _memory_summary(blocks: list[common.PeakMemory]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "peak_rss_mb": statistics.median(b.rss_peak for b in blocks) / 2**20,
        "step_rss_increase_mb": statistics.median(b.rss_increase for b in blocks) / 2**20,
    }
    if blocks and blocks[0].cuda_peak is not None:
        out["peak_cuda_mb"] = statistics.median(b.cuda_peak for b in blocks) / 2**20
    return out


def run_model(setting: ModelSetting, device: str, with_trl: bool, with_callbacks: bool = True) -> dict[str, Any]:
    from lightning_anatomy.module import DPOModule

    common.log(f"== {setting.name}: {setting.pairs_per_step} pairs x {setting.seq_len} tokens per step on {device}")
    model, tokenizer, provenance = build_model(setting, device)
    sae, hook, sae_provenance = build_sae(setting, model)
    sae = sae.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id, eos_id, vocab = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id), int(model.config.vocab_size)
    pairs = random_pairs((setting.steps_per_block + 1) * setting.pairs_per_step, setting, vocab, eos_id, seed=0)
    probe = random_pairs(setting.probe_pairs, setting, vocab, eos_id, seed=1)

    module = DPOModule(model.to(device), reference="copy", lr=1e-6, scheduler="constant", reference_cache_dir=None)
    callbacks = {name: make() for name, make in _callbacks(setting, sae, hook, probe).items()}
    with warnings.catch_warnings():  # one untimed fit first: lazy initialisation stays out of every block
        warnings.simplefilter("ignore")
        _lightning_block(module, pairs, [], replace(setting, steps_per_block=1), device, pad_id)
    result: dict[str, Any] = {
        "setting": asdict(setting), "model": provenance,
        "parameters": sum(p.numel() for p in module.policy.parameters()), "sae": sae_provenance, "hook": hook,
        "d_sae": int(sae.W_dec.shape[0]), "tokens_per_step": 2 * setting.pairs_per_step * setting.seq_len,
    }
    if with_callbacks:
        common.log("  group 1: concept callbacks")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measured = measure({name: partial(_lightning_block, module, pairs, cbs, setting, device, pad_id)
                                for name, cbs in callbacks.items()}, setting)
        result["callbacks"] = {"conditions": measured, "ratios": _callback_ratios(measured, device)}
    if with_trl and setting.trl:
        result["trl"] = _run_trl(setting, module, pairs, tokenizer, device, pad_id)
    return result


def _run_trl(setting: ModelSetting, module: Any, pairs: list[Any], tokenizer: Any, device: str,
             pad_id: int) -> dict[str, Any]:
    common.log("  group 2: DPOModule (chunked log-probs, full logits) vs TRL DPOTrainer")
    trl_policy = copy.deepcopy(module.policy).train()  # same architecture and (near-)initial weights
    trl_reference = copy.deepcopy(module.reference).eval()

    def full_logits_block() -> Block:
        chunk = module.hparams.logps_chunk_size
        module.hparams.logps_chunk_size = None  # DPOModule's path before chunking: the full [2B, T, V] logits
        try:
            return _lightning_block(module, pairs, [], setting, device, pad_id)
        finally:
            module.hparams.logps_chunk_size = chunk

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure({
            "dpomodule": partial(_lightning_block, module, pairs, [], setting, device, pad_id),
            "dpomodule_full_logits": full_logits_block,
            "trl": partial(_trl_block, trl_policy, trl_reference, tokenizer, pairs, setting, device, tmp),
        }, setting)
    basis = _time_basis(device)
    dpo, full, trl = measured["dpomodule"], measured["dpomodule_full_logits"], measured["trl"]
    out = {
        "conditions": measured, "time_basis": basis,
        "steps_per_s_ratio": common.ratio(trl[basis]["median"], dpo[basis]["median"]),
        "steps_per_s_ratio_wall": common.ratio(trl["wall_s"]["median"], dpo["wall_s"]["median"]),
        "step_memory_ratio": _step_memory_ratio(dpo, trl),
        "full_logits": {  # the same ratios for logps_chunk_size=None
            "steps_per_s_ratio": common.ratio(trl[basis]["median"], full[basis]["median"]),
            "steps_per_s_ratio_wall": common.ratio(trl["wall_s"]["median"], full["wall_s"]["median"]),
            "step_memory_ratio": _step_memory_ratio(full, trl),
        },
        "chunked_vs_full_logits": {
            "steps_per_s_ratio": common.ratio(full[basis]["median"], dpo[basis]["median"]),
            "step_memory_ratio": _step_memory_ratio(dpo, full),
        },
        "logps_chunk_size": module.hparams.logps_chunk_size,
        "settings": {
            "pairs_per_step": setting.pairs_per_step, "max_length": setting.seq_len, "precision": setting.precision,
            "reference": "frozen copy of the policy (both)", "trl_precompute_ref_log_probs": False,
            "gradient_checkpointing": False,
            "optimizer": "torch AdamW, lr 1e-6 constant, each trainer's default: DPOModule fused=True (one kernel "
                         "per parameter, no temporaries), TRL optim=adamw_torch (unfused)",
            "loss": "sigmoid, beta 0.1", "eval": "none", "logging": "off (Lightning logger=False; TRL "
            "logging_strategy=no, report_to=none)", "data": "identical token ids, no padding (swapped into TRL's "
            "train_dataset as prompt_ids/chosen_ids/rejected_ids)", "trl_dropout": "disable_dropout=True (models have "
            "no active dropout)",
        },
    }
    if "peak_cuda_mb" in trl["memory"]:
        out["peak_cuda_ratio"] = common.ratio(dpo["memory"]["peak_cuda_mb"], trl["memory"]["peak_cuda_mb"])
        out["full_logits"]["peak_cuda_ratio"] = common.ratio(full["memory"]["peak_cuda_mb"], trl["memory"]["peak_cuda_mb"])
    return out


def _step_memory_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    base = b["memory"]["step_rss_increase_mb"]
    return common.ratio(a["memory"]["step_rss_increase_mb"], base) if base > 0 else None


def _time_basis(device: str) -> str:
    """Ratios use process CPU time on a CPU (robust to other jobs on a shared machine), wall time on a GPU."""
    return "wall_s" if device.startswith("cuda") else "cpu_s"


def _callback_ratios(measured: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    """Step-time and memory ratios against vanilla; the drift monitor amortised over DRIFT_EVERY steps.

    Between probes the monitor only checks the step number, so where `drift_between` was not
    measured the vanilla step stands in for it.
    """
    basis = _time_basis(device)
    out: dict[str, Any] = {"time_basis": basis, "drift_every_n_steps": DRIFT_EVERY}
    for key in ("cpu_s", "wall_s"):
        t = {name: m[key]["median"] for name, m in measured.items()}
        base = t["vanilla"]
        between = t.get("drift_between", base)
        ratios = {name: common.ratio(t[name], base) for name in t if name != "vanilla"}
        if "drift_probing" in t:
            probe = t["drift_probing"] - between
            out[f"probe_cost_{key}"] = probe
            ratios["drift_amortised"] = common.ratio(between + probe / DRIFT_EVERY, base)
            if "all" in t:
                ratios["all_amortised"] = common.ratio(t["all"] + probe / DRIFT_EVERY, base)
        out["step_time" if key == basis else "step_time_wall" if key == "wall_s" else "step_time_cpu"] = ratios
    mem = {name: m["memory"] for name, m in measured.items()}
    peak_key = "peak_cuda_mb" if "peak_cuda_mb" in mem["vanilla"] else "peak_rss_mb"
    out["peak_memory_basis"] = peak_key
    out["peak_memory"] = {name: common.ratio(m[peak_key], mem["vanilla"][peak_key]) for name, m in mem.items()
                          if name != "vanilla"}
    base_increase = mem["vanilla"]["step_rss_increase_mb"]
    out["step_memory"] = {name: common.ratio(m["step_rss_increase_mb"], base_increase) if base_increase > 0 else None
                          for name, m in mem.items() if name != "vanilla"}
    return out


# ----------------------------------------------------------------------------------- report
ROWS = (  # (ratio key, memory condition, label, GPU target)
    ("vanilla_aa", "vanilla_aa", "vanilla again (A/A: the noise floor)", "–"),
    ("projection_own", "projection_own", "ConceptProjection (gradient, own layer)", "≤ 1.01"),
    ("projection_all_later", "projection_all_later", "ConceptProjection (gradient, all later layers)", "≤ 1.01"),
    ("attribution", "attribution", "ConceptAttribution (every step)", "≤ 1.03"),
    ("drift_amortised", "drift_probing", f"ConceptDriftMonitor (every {DRIFT_EVERY} steps, amortised)", "≤ 1.02"),
    ("drift_between", "drift_between", "ConceptDriftMonitor, a step between probes", "–"),
    ("drift_probing", "drift_probing", "ConceptDriftMonitor probing every step", "–"),
    ("blocking", "blocking", "ConceptBlocking (SAE features, every step)", "≤ 1.05"),
    ("all_amortised", "all", "all three (drift amortised)", "–"),
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def tables(results: dict[str, Any]) -> str:
    machine = results["machine"]
    rows = []
    for name, r in results["models"].items():
        if "callbacks" not in r:  # a --groups trl run
            continue
        ratios = r["callbacks"]["ratios"]
        vanilla = r["callbacks"]["conditions"]["vanilla"]
        basis = ratios["time_basis"]
        rows.append([name, "vanilla DPOModule", f"{vanilla[basis]['median']:.3f} s ({vanilla['wall_s']['median']:.3f} s)",
                     "1.000", "1.000", "1.000", "1.000", ""])
        for key, mem_key, label, target in ROWS:
            if key not in ratios["step_time"]:
                continue
            rows.append([name, label, "", _fmt(ratios["step_time"][key]), _fmt(ratios.get("step_time_wall", {}).get(key)),
                         _fmt(ratios["peak_memory"].get(mem_key)), _fmt(ratios["step_memory"].get(mem_key)), target])
    basis_words = "process CPU time" if results["time_basis"] == "cpu_s" else "wall time"
    out = []
    if rows:
        out = [f"Concept callbacks: step cost relative to vanilla DPOModule on {machine['device']} ({machine['cpu']}, "
               f"{machine['torch_threads']} threads). Medians of interleaved blocks; time × uses {basis_words} (step "
               "column: that, then wall), wall × alongside. Targets are the issue's GPU targets (memory: ≤ 1.05).", "",
               common.markdown_table(["model", "condition", "step", "time ×", "wall ×", "peak mem ×", "step mem ×",
                                      "target (GPU)"], rows)]
    trl_rows = []
    for name, r in results["models"].items():
        t = r.get("trl")
        if not t:
            continue
        trl, basis = t["conditions"]["trl"], t["time_basis"]
        paths = [("chunked log-probs (default)", "dpomodule", t)]
        if "dpomodule_full_logits" in t["conditions"]:  # results from before the chunked path have one row
            paths.append(("full logits (logps_chunk_size=None)", "dpomodule_full_logits", t["full_logits"]))
        for label, key, ratios in paths:
            dpo = t["conditions"][key]
            trl_rows.append([name, label, f"{dpo[basis]['median']:.3f}", f"{trl[basis]['median']:.3f}",
                             _fmt(ratios["steps_per_s_ratio"]), _fmt(ratios["steps_per_s_ratio_wall"]),
                             f"{dpo['memory']['step_rss_increase_mb']:.0f}",
                             f"{trl['memory']['step_rss_increase_mb']:.0f}", _fmt(ratios["step_memory_ratio"])])
    if trl_rows:
        out += ["", f"DPOModule vs TRL 1.16 DPOTrainer on identical batches ({basis_words} per step; steps/s ratio ≥ 1.0 "
                "means DPOModule is at least as fast; step memory = peak RSS above the loaded models; memory ratio "
                "= DPOModule / TRL, target ≤ 0.8).", "",
                common.markdown_table(["model", "DPOModule log-probs", "DPOModule s/step", "TRL s/step", "steps/s ratio",
                                       "wall ratio", "DPOModule step MB", "TRL step MB", "memory ratio"], trl_rows)]
    return "\n".join(out)


SHORT = {"vanilla_aa": "vanilla again (A/A)", "projection_own": "projection, own layer",
         "projection_all_later": "projection, all later", "attribution": "attribution, every step",
         "drift_amortised": f"drift, every {DRIFT_EVERY} (amortised)", "drift_between": "drift, between probes",
         "drift_probing": "drift, probing every step", "blocking": "blocking, every step",
         "all_amortised": "all three (amortised)"}


def plot(results: dict[str, Any], path: Path) -> None:
    """Horizontal bars per condition: step-time ratio (whiskers: the condition's quartiles over the
    vanilla median) and peak-memory ratio, one colour per model."""
    with common.matplotlib_agg() as plt:
        models = list(results["models"])
        keys = [k for k, _, _, _ in ROWS]
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(keys) + 1.8), sharey=True)
        height = 0.8 / max(len(models), 1)
        basis = results["time_basis"]
        for i, name in enumerate(models):
            r = results["models"][name]["callbacks"]
            ratios, cond = r["ratios"], r["conditions"]
            base = cond["vanilla"][basis]["median"]
            ys, xs, err = [], [], [[], []]
            for j, (key, _, _, _) in enumerate(ROWS):
                value = ratios["step_time"].get(key)
                if value is None:
                    continue
                ys.append(j + i * height)
                xs.append(value)
                spread = cond.get(key, {}).get(basis)  # derived rows (amortised) have no samples of their own
                err[0].append(max(value - spread["q1"] / base, 0) if spread else 0)
                err[1].append(max(spread["q3"] / base - value, 0) if spread else 0)
            axes[0].barh(ys, xs, height, xerr=err, label=name, capsize=2)
            mem = [(j + i * height, ratios["peak_memory"].get(m)) for j, (k, m, _, _) in enumerate(ROWS)
                   if k in ratios["step_time"] and ratios["peak_memory"].get(m) is not None]
            axes[1].barh([y for y, _ in mem], [v for _, v in mem], height, label=name)
        device = results["machine"]["device"]
        words = "CPU time" if basis == "cpu_s" else "wall time"
        for ax, title in zip(axes, (f"step {words} / vanilla ({device})", f"peak memory / vanilla ({device})")):
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8, loc="lower right")
        axes[0].set_yticks([j + height * (len(models) - 1) / 2 for j in range(len(keys))])
        axes[0].set_yticklabels([SHORT[k] for k in keys], fontsize=8)
        axes[0].invert_yaxis()
        fig.tight_layout()
        common.atomic_save_figure(fig, path, dpi=110)


def _report_only(path: Path) -> dict[str, Any]:
    import json

    results = json.loads(path.read_text())
    if results.get("format") != FORMAT:
        raise SystemExit(f"--report: {path} is not a cost result (format {results.get('format')!r}, expected {FORMAT!r})")
    plot(results, path.with_suffix(".png"))
    print(tables(results))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 40 s)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="directory for cost.json / cost.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", help="only these model settings (by name)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--groups", nargs="+", choices=("callbacks", "trl"), default=["callbacks", "trl"],
                        help="which groups to measure; a subset is written to cost.<group>.json, not cost.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, cores))")
    parser.add_argument("--report", type=Path, help="only re-print the tables (and redraw the plot) of a saved cost.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        return _report_only(args.report)

    common.setup_offline(args.threads)
    common.quiet_libraries()
    settings = common.select_settings(QUICK if args.quick else FULL, args.models)
    started = time.time()
    results: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "quick": args.quick, "machine": common.machine_info(args.device),
        "packages": common.package_versions(["torch", "lightning", "transformers", "trl", "sae-lens"]),
        "memory_method": MEMORY_METHOD, "time_basis": _time_basis(args.device), "targets_gpu": TARGETS,
        "models": {},
    }
    for setting in settings:
        results["models"][setting.name] = run_model(setting, args.device, with_trl=not args.no_trl and "trl" in args.groups,
                                                    with_callbacks="callbacks" in args.groups)
    results["wall_s"] = time.time() - started
    name = "cost.quick" if args.quick else "cost"
    subset = sorted(set(args.groups)) != ["callbacks", "trl"]
    if subset:
        name += "." + ".".join(sorted(set(args.groups)))
    common.publish(results, args.out, name, tables, None if "callbacks" not in args.groups else plot)
    return results


if __name__ == "__main__":
    main()
