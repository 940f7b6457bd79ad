"""Benchmark (d): what a DPO step costs with the concept callbacks, and against TRL's DPOTrainer.

Two groups per model, each measured side by side in one process with the conditions interleaved
round by round (ABC…, …CBA, …), every block a fresh `Trainer.fit` of a few steps on the same
`DPOModule`. Step time is the wall time between consecutive `on_train_batch_end` calls (data,
forward, backward, optimizer and every callback hook), the first step of a block is dropped. Every block
fits from a `PairsData` DataModule (its tokenizer and pairs: what `TokenFiltering` reads).

1. callbacks: vanilla DPO vs. `ConceptProjection` (gradient, own layer / all later layers),
   `ConceptAttribution` every step, `ConceptDriftMonitor` (every 50 steps: the steps in between
   are timed as they are, and the probe cost is measured by a run that probes after every step;
   amortised = (49 · t_between + t_probing) / 50) and all three together; and issue 22's style
   interventions on the benchmark's markdown-marker data (the pattern `\\*\\*`, after
   `benchmarks/interventions_smollm2.py`'s `smollm2_markdown` scenario): `TokenFiltering` (masks
   set before the blocks: the one-time pass is timed apart, below) and inoculation (half the
   pairs carry the instruction, their reference scores the prompt without it). Target ≤ 1.02.
   The one-time pass, per pair, beside the audit's extraction on the same model and pairs,
   interleaved: `TokenFiltering.compute_masks` with the pattern, and with SAE features of the
   setting's SAE (a measurement forward), vs `extract_span_features` (what `audit_dataset`
   runs). Target: ≤ 1.0× the extraction.
2. TRL: `DPOModule` vs. TRL's `DPOTrainer` on identical token batches (same pairs per step,
   frozen reference copy, fp32, AdamW, no gradient checkpointing, no eval, no logging, no
   precomputed reference); steps/s ratio and step-memory ratio, for DPOModule's default chunked
   log-probs (LM head over chunks of completion positions) and for its full-logits path
   (`logps_chunk_size=None`, the path before chunking), all three interleaved.

Memory: peak RSS inside each block (freed heap returned to the OS before each block, so a block
never inherits another's garbage) and the rise above the RSS resident at block start (gradients,
optimizer state, activations: what training adds to the loaded models). On CUDA also peak
allocated bytes, which is then the basis of the memory ratios.

    python benchmarks/cost.py            # full settings (~8 min on 2 CPU cores)
    python benchmarks/cost.py --quick    # tiny sizes, for the smoke test
    python benchmarks/cost.py --models smollm2-135m --groups trl   # group 2 only -> cost.trl.json
    python benchmarks/cost.py --groups callbacks --callbacks vanilla_aa token_filtering inoculation --repeats 4
        # only these conditions (and vanilla) -> cost.callbacks.vanilla_aa+token_filtering+inoculation.json
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
from lightning.pytorch import Callback, LightningDataModule  # noqa: E402

FORMAT = "lightning-anatomy/bench-cost"
VERSION = 1
DRIFT_EVERY = 50
# The issues' targets (the concept callbacks' stated for a GPU; issue 22's token filtering,
# inoculation and one-time pass for any device); ratios are reported against them as measured.
TARGETS = {"projection_own": 1.01, "projection_all_later": 1.01, "attribution": 1.03, "drift_amortised": 1.02,
           "blocking": 1.05, "memory": 1.05, "trl_steps_per_s": 1.0, "token_filtering": 1.02, "inoculation": 1.02,
           "one_time_pass_vs_extraction": 1.0}
MEMORY_METHOD = ("peak RSS (VmHWM, reset per block via /proc/self/clear_refs after gc + malloc_trim); "
                 "step memory = that peak minus the RSS at block start")
CALLBACK_CONDITIONS = ("vanilla", "vanilla_aa", "projection_own", "projection_all_later", "attribution", "drift_between",
                       "drift_probing", "blocking", "all", "token_filtering", "inoculation")
# Issue 22's style interventions on markdown-marked pairs, as in interventions_smollm2's smollm2_markdown
# scenario: a `**bold**` span in 90 % of chosen and 10 % of rejected completions, filtered by its pattern;
# inoculation asks for it in the prompts of half the pairs.
MARKER = " **bold**"
MARKED_SHARE = {"chosen": 0.9, "rejected": 0.1}
FILTER_PATTERN = r"\*\*"
INSTRUCTION = " Use **bold** for key words."
INOCULATED_SHARE = 0.5
# The one-time pass with SAE concepts: a few features (the SAE's most often firing ones on the pairs, a
# stand-in for the audit's top features of a marker), each flagging its top 5 % of completion tokens;
# batch size as the audit's default.
PASS_FEATURES = 2
PASS_QUANTILE = 0.95
PASS_BATCH = 8
PASS_JOBS = ("mask_patterns", "mask_sae_features", "audit_extraction")
GOALS = ("token_filtering_step_time", "inoculation_step_time", "mask_patterns_vs_extraction",
         "mask_sae_features_vs_extraction")  # issue 22's, in the order the tables list them


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
    pass_pairs: int = 32  # pairs of the one-time pass timing (token-filter masks vs the audit's extraction)
    trl: bool = True
    conditions: tuple[str, ...] = CALLBACK_CONDITIONS
    precision: str = "32-true"  # Lightning's; TRL gets bf16=True for "bf16-*"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.conditions) - set(CALLBACK_CONDITIONS))
        if unknown or "vanilla" not in self.conditions:
            raise ValueError(f"ModelSetting {self.name!r}: conditions must include 'vanilla' and come from "
                             f"{CALLBACK_CONDITIONS}; got unknown {unknown}")
        if self.source.startswith("random:") and "token_filtering" in self.conditions:
            raise ValueError(f"ModelSetting {self.name!r}: token_filtering decodes completions, but a random:<shape> "
                             "model has only the byte tokenizer, not one of its vocabulary; leave it out")

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.completion_tokens


FULL = (
    ModelSetting("gpt2-4x256-byte", "tiny:gpt2", pairs_per_step=4, prompt_tokens=64, completion_tokens=64,
                 layers=4, width=256, vocab=260, hook_layer=1, d_sae=4096, probe_pairs=32,
                 steps_per_block=3, repeats=3),
    # 5-7 s a step on a busy 2-core CPU: the conditions the issue targets, a short sequence, fewer repeats.
    ModelSetting("smollm2-135m", "embedded", pairs_per_step=2, prompt_tokens=24, completion_tokens=24,
                 probe_pairs=8, steps_per_block=2, repeats=2, warmup=0, pass_pairs=16,
                 conditions=("vanilla", "vanilla_aa", "projection_own", "attribution", "drift_probing", "blocking",
                             "token_filtering", "inoculation")),
)
QUICK = (
    ModelSetting("gpt2-2x64-byte", "tiny:gpt2", pairs_per_step=2, prompt_tokens=16, completion_tokens=16,
                 layers=2, width=64, vocab=260, hook_layer=0, d_sae=256, probe_pairs=4,
                 steps_per_block=2, repeats=1, warmup=0, pass_pairs=8),
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


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def mark_pairs(pairs: list[Any], marker: list[int], seed: int) -> list[Any]:
    """The pairs with `marker` written over a random window of `MARKED_SHARE` of each side's
    completions (lengths kept, eos untouched; a marker longer than the completion is cut).

    What token filtering removes on real text: a style span in most chosen and few rejected replies.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in pairs:
        sides = {}
        for side, share in MARKED_SHARE.items():
            ids = list(getattr(p, f"{side}_ids"))
            body = len(ids) - 1
            if body > 0 and torch.rand((), generator=g).item() < share:
                m = marker[:body]
                at = int(torch.randint(0, body - len(m) + 1, (), generator=g))
                ids[at:at + len(m)] = m
            sides[f"{side}_ids"] = ids
        out.append(replace(p, **sides))
    return out


def inoculate_pairs(pairs: list[Any], instruction: list[int], share: float = INOCULATED_SHARE) -> list[Any]:
    """`share` of the pairs (spread evenly, so every batch mixes both kinds) inoculated: the
    policy's prompt ends with the instruction and the reference scores it without
    (`ref_prompt_ids`), as `interventions.inoculate` + `tokenize_rows` give it.

    The policy's prompt keeps its length (its last tokens become the instruction, cut to half the
    prompt), so the policy batch has vanilla's shape and the step ratio is the mechanism's cost:
    the reference's own `[2B, T_ref]` batch and its padding.
    """
    if not 0 < share <= 1:
        raise ValueError(f"inoculate_pairs: share must be in (0, 1], got {share!r}")
    out, done = [], 0
    for i, p in enumerate(pairs):
        if done >= share * (i + 1):
            out.append(p)
            continue
        k = min(len(instruction), len(p.prompt_ids) // 2)
        if k < 1:
            raise ValueError(f"inoculate_pairs: a prompt of {len(p.prompt_ids)} token(s) leaves no room for the "
                             "instruction; use prompts of >= 2 tokens")
        original = list(p.prompt_ids[:-k])
        out.append(replace(p, prompt_ids=original + list(instruction[:k]), ref_prompt_ids=original))
        done += 1
    return out


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


class PairsData(LightningDataModule):
    """A block's pairs as a DataModule (every condition's data path): `TokenFiltering` takes the
    tokenizer and the `pairs` from it and writes its masks into them in place, which the loader
    (over that very list) then reads."""

    def __init__(self, pairs: list[Any], tokenizer: Any, pad_token_id: int, batch_size: int) -> None:
        super().__init__()
        self.pairs, self.train_pairs, self.val_pairs = pairs, pairs, None
        self.tokenizer, self.pad_token_id, self.batch_size = tokenizer, pad_token_id, batch_size

    def train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        from lightning_anatomy.data import collate_pairs

        return DataLoader(self.train_pairs, batch_size=self.batch_size, shuffle=False,
                          collate_fn=partial(collate_pairs, pad_token_id=self.pad_token_id))


def _lightning_block(module: Any, pairs: list[Any], callbacks: list[Any], setting: ModelSetting, device: str,
                     pad_id: int, tokenizer: Any = None) -> Block:
    """One fresh `Trainer.fit` of steps_per_block + 1 steps on `module` (the first step untimed)."""
    import lightning as L

    clock = _Clock(device)
    steps = setting.steps_per_block + 1
    data = PairsData(pairs[: steps * setting.pairs_per_step], tokenizer, pad_id, setting.pairs_per_step)
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, precision=setting.precision,
        callbacks=[*callbacks, StepTimer(clock)],
    )
    with common.PeakMemory(device) as peak:
        trainer.fit(module, datamodule=data)
    module.trainer = None  # the module would keep this trainer (and its optimizer state) alive
    del trainer, data
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
    """Factories of each condition's callbacks (instances are built once and reused across blocks).

    `inoculation` adds no callback: its pairs differ (`inoculate_pairs`), the module is the same.
    """
    from lightning_anatomy.callbacks import (
        ConceptAttribution,
        ConceptBlocking,
        ConceptDriftMonitor,
        ConceptProjection,
        TokenFiltering,
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
        "token_filtering": lambda: [TokenFiltering(patterns=[FILTER_PATTERN])],
        "inoculation": list,
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
    styled = bool({"token_filtering", "inoculation"} & set(setting.conditions))
    if styled:  # every condition trains on the same (marked) pairs; inoculation on its own copy of them
        pairs = mark_pairs(pairs, _text_ids(tokenizer, MARKER), seed=0)
    probe = random_pairs(setting.probe_pairs, setting, vocab, eos_id, seed=1)

    module = DPOModule(model.to(device), reference="copy", lr=1e-6, scheduler="constant", reference_cache_dir=None)
    callbacks = {name: make() for name, make in _callbacks(setting, sae, hook, probe).items()}
    own_pairs = {"inoculation": inoculate_pairs(pairs, _text_ids(tokenizer, INSTRUCTION))} if styled else {}
    style: dict[str, Any] = {}
    if "token_filtering" in callbacks:  # the one-time mask pass here, untimed: the blocks time the steps alone
        (token_filter,) = callbacks["token_filtering"]
        token_filter.masks = token_filter.compute_masks(pairs, tokenizer, None, pad_id)
        style["token_filtering"] = {"pattern": FILTER_PATTERN, "marker": MARKER, "marked_share": MARKED_SHARE,
                                    "dropped_fraction": token_filter.report["dropped_fraction"]}
    if "inoculation" in own_pairs:
        inoculated = [p for p in own_pairs["inoculation"] if p.ref_prompt_ids is not None]
        style["inoculation"] = {"instruction": INSTRUCTION, "inoculated_share": len(inoculated) / len(pairs),
                                "instruction_tokens": len(inoculated[0].prompt_ids) - len(inoculated[0].ref_prompt_ids)}
    with warnings.catch_warnings():  # one untimed fit first: lazy initialisation stays out of every block
        warnings.simplefilter("ignore")
        _lightning_block(module, pairs, [], replace(setting, steps_per_block=1), device, pad_id, tokenizer)
    result: dict[str, Any] = {
        "setting": asdict(setting), "model": provenance,
        "parameters": sum(p.numel() for p in module.policy.parameters()), "sae": sae_provenance, "hook": hook,
        "d_sae": int(sae.W_dec.shape[0]), "tokens_per_step": 2 * setting.pairs_per_step * setting.seq_len,
    }
    if with_callbacks:
        common.log("  group 1: concept callbacks")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measured = measure({name: partial(_lightning_block, module, own_pairs.get(name, pairs), cbs, setting,
                                              device, pad_id, tokenizer)
                                for name, cbs in callbacks.items()}, setting)
        result["callbacks"] = {"conditions": measured, "ratios": _callback_ratios(measured, device), **style}
    if with_trl and setting.trl:
        result["trl"] = _run_trl(setting, module, pairs, tokenizer, device, pad_id)
    if with_callbacks and "token_filtering" in callbacks:  # last: the audit's extraction runs Trainer.predict
        result["one_time_pass"] = _one_time_pass(setting, module.policy, sae, hook, tokenizer, device, pad_id, vocab,
                                                 eos_id)
    result["goals"] = _goals(result)
    return result


def _one_time_pass(setting: ModelSetting, model: Any, sae: Any, hook: str, tokenizer: Any, device: str, pad_id: int,
                   vocab: int, eos_id: int) -> dict[str, Any]:
    """Per pair: TokenFiltering's one-time mask pass (the pattern; SAE features, which need a
    forward) beside the audit's extraction (`extract_span_features`, as `audit_dataset` calls it),
    on the same model, SAE and marked pairs, interleaved; one untimed call of each on a batch first."""
    from lightning_anatomy.callbacks import TokenFiltering
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.concepts.extraction import extract_span_features
    from lightning_anatomy.interventions import Quantile

    common.log(f"  one-time pass: token-filter masks vs the audit's extraction, {setting.pass_pairs} pairs")
    pairs = mark_pairs(random_pairs(setting.pass_pairs, setting, vocab, eos_id, seed=2), _text_ids(tokenizer, MARKER),
                       seed=2)
    by_pattern = TokenFiltering(patterns=[FILTER_PATTERN])
    features = {f"f{f}": (hook, f) for f in _firing_features(model, sae, hook, pairs[:PASS_BATCH], pad_id, device)}
    by_features = TokenFiltering(concepts=features, saes={hook: sae}, threshold=Quantile(PASS_QUANTILE),
                                 batch_size=PASS_BATCH)
    lens = ConceptLens(model, {hook: sae}, fidelity_check=False)
    jobs: dict[str, Callable[[list[Any]], Any]] = {
        "mask_patterns": lambda ps: by_pattern.compute_masks(ps, tokenizer, None, pad_id),
        "mask_sae_features": lambda ps: by_features.compute_masks(ps, tokenizer, model, pad_id),
        "audit_extraction": lambda ps: extract_span_features(ps, lens, batch_size=PASS_BATCH, progress=False,
                                                             pad_token_id=pad_id),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}

    def timed(name: str) -> float:
        wall, cpu = common.time_call_cpu(partial(jobs[name], pairs), device)
        samples[name].append((wall, cpu))
        return wall

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for job in jobs.values():  # imports, kernels, the first Trainer: lazy set-up stays out of the samples
            job(pairs[:PASS_BATCH])
        common.interleaved({name: partial(timed, name) for name in jobs}, repeats=setting.repeats, warmup=0)
    n = len(pairs)
    per_pair = {name: {"wall_s": common.summarize([w / n for w, _ in got]),
                       "cpu_s": common.summarize([c / n for _, c in got])} for name, got in samples.items()}
    basis = _time_basis(device)
    base = per_pair["audit_extraction"]
    return {
        "pairs": n, "batch_size": PASS_BATCH, "time_basis": basis, "per_pair": per_pair,
        "ratios": {name: common.ratio(per_pair[name][basis]["median"], base[basis]["median"])
                   for name in ("mask_patterns", "mask_sae_features")},
        "ratios_wall": {name: common.ratio(per_pair[name]["wall_s"]["median"], base["wall_s"]["median"])
                        for name in ("mask_patterns", "mask_sae_features")},
        "dropped_fraction": {"mask_patterns": by_pattern.report["dropped_fraction"],
                             "mask_sae_features": by_features.report["dropped_fraction"]},
        "settings": {"pattern": FILTER_PATTERN, "sae_features": {k: list(v) for k, v in features.items()},
                     "threshold": f"Quantile({PASS_QUANTILE}) per feature", "marker": MARKER,
                     "marked_share": MARKED_SHARE, "extraction": "extract_span_features(stats max/freq/mean, "
                     "threshold 0), what audit_dataset(method='paired') runs before its statistics"},
    }


@torch.no_grad()
def _firing_features(model: Any, sae: Any, hook: str, pairs: list[Any], pad_id: int, device: str) -> list[int]:
    """The `PASS_FEATURES` SAE features that fire on the most completion tokens of `pairs` (untimed):
    features that flag tokens, as the audit's would, where fixed ids of a random SAE may be dead."""
    from lightning_anatomy.concepts.lens import capture_activations
    from lightning_anatomy.data import collate_pairs

    batch = collate_pairs(pairs, pad_id)
    acts = capture_activations(model, [hook], batch["input_ids"].to(device), batch["attention_mask"].to(device))
    (hidden,) = acts.values()
    fired = sae.encode(hidden.to(sae.W_dec.dtype))[batch["completion_mask"].to(device)] > 0
    return [int(f) for f in fired.float().mean(0).topk(PASS_FEATURES).indices]


def _goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 22's cost goals as measured: `{goal: {value, target, met}}` (only those measured)."""
    out: dict[str, dict[str, Any]] = {}
    step = result.get("callbacks", {}).get("ratios", {}).get("step_time", {})
    for key in ("token_filtering", "inoculation"):
        if key in step:
            out[f"{key}_step_time"] = {"value": step[key], "target": TARGETS[key], "met": step[key] <= TARGETS[key]}
    target = TARGETS["one_time_pass_vs_extraction"]
    for key, value in result.get("one_time_pass", {}).get("ratios", {}).items():
        out[f"{key}_vs_extraction"] = {"value": value, "target": target, "met": value <= target}
    return out


def _run_trl(setting: ModelSetting, module: Any, pairs: list[Any], tokenizer: Any, device: str,
             pad_id: int) -> dict[str, Any]:
    common.log("  group 2: DPOModule (chunked log-probs, full logits) vs TRL DPOTrainer")
    trl_policy = copy.deepcopy(module.policy).train()  # same architecture and (near-)initial weights
    trl_reference = copy.deepcopy(module.reference).eval()

    def full_logits_block() -> Block:
        chunk = module.hparams.logps_chunk_size
        module.hparams.logps_chunk_size = None  # DPOModule's path before chunking: the full [2B, T, V] logits
        try:
            return _lightning_block(module, pairs, [], setting, device, pad_id, tokenizer)
        finally:
            module.hparams.logps_chunk_size = chunk

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure({
            "dpomodule": partial(_lightning_block, module, pairs, [], setting, device, pad_id, tokenizer),
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
ROWS = (  # (ratio key, memory condition, label, target: GPU for the concept callbacks, any device for issue 22's)
    ("vanilla_aa", "vanilla_aa", "vanilla again (A/A: the noise floor)", "–"),
    ("projection_own", "projection_own", "ConceptProjection (gradient, own layer)", "≤ 1.01"),
    ("projection_all_later", "projection_all_later", "ConceptProjection (gradient, all later layers)", "≤ 1.01"),
    ("attribution", "attribution", "ConceptAttribution (every step)", "≤ 1.03"),
    ("drift_amortised", "drift_probing", f"ConceptDriftMonitor (every {DRIFT_EVERY} steps, amortised)", "≤ 1.02"),
    ("drift_between", "drift_between", "ConceptDriftMonitor, a step between probes", "–"),
    ("drift_probing", "drift_probing", "ConceptDriftMonitor probing every step", "–"),
    ("blocking", "blocking", "ConceptBlocking (SAE features, every step)", "≤ 1.05"),
    ("all_amortised", "all", "all three (drift amortised)", "–"),
    ("token_filtering", "token_filtering", "TokenFiltering (pattern masks, every step)", "≤ 1.02"),
    ("inoculation", "inoculation", f"inoculation ({INOCULATED_SHARE:.0%} of pairs, reference on the original prompt)",
     "≤ 1.02"),
)
PASS_LABELS = {"mask_patterns": f"TokenFiltering masks, pattern {FILTER_PATTERN}",
               "mask_sae_features": f"TokenFiltering masks, {PASS_FEATURES} SAE features (a forward)"}


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
               "column: that, then wall), wall × alongside. Targets: the concept callbacks' are their issue's GPU "
               "targets (memory: ≤ 1.05); token filtering's and inoculation's are issue 22's (any device).", "",
               common.markdown_table(["model", "condition", "step", "time ×", "wall ×", "peak mem ×", "step mem ×",
                                      "target"], rows)]
    out += _pass_tables(results, basis_words)
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
         "all_amortised": "all three (amortised)", "token_filtering": "token filtering, every step",
         "inoculation": "inoculation, every step"}


def _pass_tables(results: dict[str, Any], basis_words: str) -> list[str]:
    """Issue 22's one-time pass per pair beside the audit's extraction, and its cost goals as measured."""
    rows, goals = [], []
    for name, r in results["models"].items():
        one = r.get("one_time_pass")
        if one:
            basis, base = one["time_basis"], one["per_pair"]["audit_extraction"]
            for key, label in PASS_LABELS.items():
                rows.append([name, label, str(one["pairs"]), f"{one['per_pair'][key][basis]['median'] * 1e3:.2f}",
                             f"{base[basis]['median'] * 1e3:.2f}", _fmt(one["ratios"][key]),
                             _fmt(one["ratios_wall"][key]), f"{one['dropped_fraction'][key]:.1%}"])
        measured = r.get("goals", {})  # the JSON file has its keys sorted: list them in GOALS' order
        for goal, g in ((k, measured[k]) for k in GOALS if k in measured):
            goals.append([name, goal, _fmt(g["value"]), f"≤ {g['target']:.2f}", "met" if g["met"] else "**missed**"])
    out = []
    if rows:
        out += ["", f"Token filtering's one-time mask pass per pair vs the audit's extraction (`extract_span_features`, "
                f"what `audit_dataset` runs) on the same model, SAE and pairs, interleaved ({basis_words}; target ≤ 1.0×; "
                "dropped: the share of completion tokens the masks remove).", "",
                common.markdown_table(["model", "one-time pass", "pairs", "ms/pair", "extraction ms/pair", "× extraction",
                                       "wall ×", "dropped"], rows)]
    if goals:
        out += ["", "Issue 22's cost goals, as measured:", "",
                common.markdown_table(["model", "goal", "measured ×", "target", ""], goals)]
    return out


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
    parser.add_argument("--callbacks", nargs="+", choices=CALLBACK_CONDITIONS, metavar="CONDITION",
                        help="only these callback conditions (vanilla always runs: every ratio is against it), "
                             f"interleaved as ever; written to cost[.callbacks].<names>.json. Choices: {CALLBACK_CONDITIONS}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured rounds per model (default: each setting's); more narrows a subset's ratios")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, cores))")
    parser.add_argument("--report", type=Path, help="only re-print the tables (and redraw the plot) of a saved cost.json")
    args = parser.parse_args(argv)
    if args.report is not None:
        return _report_only(args.report)

    common.setup_offline(args.threads)
    common.quiet_libraries()
    settings = common.select_settings(QUICK if args.quick else FULL, args.models)
    chosen = [c for c in CALLBACK_CONDITIONS if c != "vanilla" and c in (args.callbacks or ())]
    if args.callbacks:
        if "callbacks" not in args.groups:
            raise SystemExit("--callbacks selects conditions of the callbacks group; add --groups callbacks")
        settings = tuple(replace(s, conditions=tuple(c for c in s.conditions if c == "vanilla" or c in chosen))
                         for s in settings)
        for s in settings:
            missing = [c for c in chosen if c not in s.conditions]
            if missing:
                common.log(f"  {s.name}: does not measure {missing} (not among its conditions)")
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
        settings = tuple(replace(s, repeats=args.repeats) for s in settings)
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
    if args.callbacks:  # a subset of the conditions never overwrites the full group's file
        name += "." + ("+".join(chosen) or "vanilla")
    common.publish(results, args.out, name, tables, None if "callbacks" not in args.groups else plot)
    return results


if __name__ == "__main__":
    main()
