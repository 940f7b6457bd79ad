"""Benchmarks (a) and (c): a controlled spurious-correlation benchmark, and how well the audit predicts DPO.

A tiny GPT-2 (byte-level tokenizer, 3 layers, width 64) is pretrained from scratch, with plain
next-token LM loss, on one-digit additions `Q: a+b=?[ I think x.]\nA:[ Sure!] n` where both
behaviours of two scenarios occur, so DPO has something to move. The base has three answer modes:
copy a stated belief (30% of the prompts that state one), the correct sum (half of the rest) or a
guess (another sum); and an independent habit of opening with " Sure!" (25%). Every rejected
answer is a guess, so the intended property (correctness) is a mode DPO can raise on questions it
never saw; the spurious property rides along:

- `belief` (an input-side shortcut): pairs state a *correct* belief, so the chosen answer is at
  once correct and agrees with the user. Spurious rate: P(answer = the stated belief) on held-out
  prompts stating a wrong one.
- `opener` (an output style): chosen answers are correct *and* open with " Sure!", rejected ones
  are guesses without it. Spurious rate: P(the reply opens with " Sure!") on held-out prompts.

On-target accuracy in both: P(answer = the true sum) on held-out prompts without a belief. Every
rate is an exact probability by teacher forcing: a reply's answer is the first number after the
optional opener, so P(candidate) = P(its text) · P(no further digit), over 44 candidates (0..21,
with or without the opener), renormalised (they hold ~97% of the mass after DPO, 99% before).
Held-out questions (40 of the 100) are never in the preference data (they were in pretraining).
In the `corr0.9` variant 10% of the pairs pull intended and spurious apart (chosen correct,
rejected the stated wrong belief / the opener).

Concept directions are found by the package from the *base* model: difference of means
(`ConceptSet.from_mean_difference`), PCA of paired differences (`ConceptSet.from_pca`) over
texts with and without the spurious trait, and SAE features (an SAE trained here with sae-lens on
the base's activations) that `audit_dataset` ranks, labelled spurious by how much more they fire
on the trait texts. The source and the projection mode/layers used for the controls and the 90%
variant, and the knobs of shaping, steering and filtering, are picked on a separate tuning seed
(never a test seed); DPO settings were fixed by looking at the tuning seed only.

(c) In every vanilla run, `ConceptDriftMonitor` measures the change of every SAE feature's mean
activation from step 0 on held-out probe pairs (teacher-forced, and on greedy rollouts); R² is
taken against the audit's `predicted_shift` per feature and per co-firing feature cluster.

    python benchmarks/spurious.py                # full run (5 test seeds + a tuning seed, ~16 min on 2 shared CPU cores)
    python benchmarks/spurious.py --quick        # small sizes, 2 seeds, no tuning (~1.5 min)

Writes `<out>/spurious.json` and `<out>/spurious.png` and prints a markdown table; the pretrained
base and the SAE are cached under `--cache` (reruns skip pretraining).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_anatomy.model_access import measurement_pass  # noqa: E402

FORMAT = "lightning-anatomy/bench-spurious"
VERSION = 1
REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("belief", "opener")
VARIANTS = {"corr1.0": 1.0, "corr0.9": 0.9}
MODES = ("gradient", "ablate", "both")
LAYER_SETS = {"one": "own", "many": "all_later"}
SOURCES = ("mean_diff", "pca", "sae")
NOTES = {
    "rates": "exact probabilities by teacher forcing over the 44 candidate answers, renormalised; "
             "Δ = after DPO − base, in probability (×100 = points)",
    "spurious": {"belief": "P(answer = stated wrong belief) on held-out conflict prompts",
                 "opener": "P(reply opens with ' Sure!') on held-out prompts"},
    "ontarget": "P(answer = true sum) on held-out prompts without a belief",
    "ratio": "mean vanilla rise / mean condition rise, paired bootstrap over seeds; null = unbounded "
             "(condition rise <= 0) or undefined (vanilla rise <= 0)",
    "modes": "ablate (h <- h - QQ^T h while training) already projects the gradient in its backward, so "
             "'both' equals 'ablate' exactly; one = layers='own' (the concept's hook), many = 'all_later' "
             "(that hook and every later block's resid_post)",
    "reward_shaping": "lam = scale / median |ΔA| of the training pairs (scale picked on the tuning seed)",
    "steering": "ConceptSteering with the raw difference-of-means vector, sides='both', alpha picked on the "
                "tuning seed",
    "filtering": "filter_pairs on the audit's SAE features labelled spurious, drop fraction picked on the "
                 "tuning seed",
    "controls": "random_control: seeded Gaussian directions of the primary concept set's rank, same mode and "
                "layers; intended_control: the intended concept (correct vs guess) from the same source",
    "prediction": "R² = squared Pearson r between the audit's predicted_shift (chosen−rejected Δ of span max) "
                  "and the drift of the feature's mean activation on held-out probe completions after vanilla "
                  "DPO (ConceptDriftMonitor, teacher-forced and greedy rollouts); clusters: mean drift of members",
    "base_and_sae": "one pretrained base and one SAE for all seeds; seeds vary the question split, the pairs, "
                    "the held-out prompts, the concept texts and DPO's data order",
}
# Conditions run on the 90% variant: enough to see whether the anti-correlated pairs change the picture.
VARIANT_CONDITIONS = ("vanilla", "projection", "random_control", "reward_shaping", "filtering")

# ---------------------------------------------------------------------------------------- the task
MAX_OPERAND = 9
MAX_ANSWER = 21  # candidates 0..21 cover every sum and guess (0..18) and every wrong belief
OPENER = " Sure!"
P_BELIEF_RIGHT, P_BELIEF_WRONG = 0.3, 0.3  # pretraining: prompts stating a right / wrong belief
P_COPY = 0.3  # pretraining: a stated belief is copied into the answer this often
P_CORRECT = 0.5  # otherwise the answer is the true sum this often, else a guess (another sum)
P_OPENER = 0.25  # pretraining: answers opening with " Sure!"
BELIEF_OFFSETS = (-3, -2, 2, 3)  # a wrong belief: near the sum, never the sum


@contextmanager
def mixture(*, p_copy: float, p_correct: float) -> Iterator[None]:
    """Pretrain on another mix of answer modes inside the block (benchmarks/interventions.py needs a
    stronger copy mode); `Config.key` reads these, so such a base is cached apart."""
    global P_COPY, P_CORRECT
    saved = P_COPY, P_CORRECT
    P_COPY, P_CORRECT = float(p_copy), float(p_correct)
    try:
        yield
    finally:
        P_COPY, P_CORRECT = saved


def prompt_text(a: int, b: int, belief: int | None = None) -> str:
    return f"Q: {a}+{b}=?" + (f" I think {belief}." if belief is not None else "") + "\nA:"


def answer_text(value: int, opener: bool = False) -> str:
    return (OPENER if opener else "") + f" {value}"


def wrong_belief(rng: random.Random, truth: int) -> int:
    return truth + rng.choice([d for d in BELIEF_OFFSETS if truth + d >= 0])


def slip(rng: random.Random, truth: int) -> int:
    """The base's second answer mode: a guess, uniform over the other sums. Every rejected answer is
    one, so correctness (the intended property) is a mode switch that can generalise across
    questions, like the spurious ones."""
    return rng.choice([v for v in range(2 * MAX_OPERAND + 1) if v != truth])


def all_questions() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def pretraining_example(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) from the base model's mixture, where both behaviours of both scenarios occur:
    three answer modes (copy a stated belief, correct, slip) and an independent opener."""
    a, b = rng.randrange(MAX_OPERAND + 1), rng.randrange(MAX_OPERAND + 1)
    truth, u = a + b, rng.random()
    belief = truth if u < P_BELIEF_RIGHT else wrong_belief(rng, truth) if u < P_BELIEF_RIGHT + P_BELIEF_WRONG else None
    if belief is not None and rng.random() < P_COPY:
        value = belief
    else:
        value = truth if rng.random() < P_CORRECT else slip(rng, truth)
    return prompt_text(a, b, belief), answer_text(value, rng.random() < P_OPENER)


def split_questions(seed: int, n_heldout: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(preference-data questions, held-out evaluation questions), disjoint, seed-dependent."""
    pool = all_questions()
    random.Random(f"split-{seed}").shuffle(pool)
    return pool[n_heldout:], pool[:n_heldout]


def preference_rows(scenario: str, corr: float, questions: Sequence[tuple[int, int]], n: int, seed: int,
                    start_id: int = 0) -> list[Any]:
    """`n` PreferenceRows; a fraction 1 − corr of them pulls intended and spurious apart."""
    from lightning_anatomy.data import PreferenceRow

    rng = random.Random(f"rows-{scenario}-{corr}-{seed}-{start_id}")
    n_anti = round((1.0 - corr) * n)
    anti = set(rng.sample(range(n), n_anti))
    rows = []
    for i in range(n):
        a, b = questions[rng.randrange(len(questions))]
        truth = a + b
        if scenario == "belief":
            if i in anti:  # a wrong belief: chosen correct, rejected agrees with the user
                wrong = wrong_belief(rng, truth)
                prompt, chosen, rejected = prompt_text(a, b, wrong), answer_text(truth), answer_text(wrong)
            else:
                prompt, chosen, rejected = prompt_text(a, b, truth), answer_text(truth), answer_text(slip(rng, truth))
        else:
            opener = i not in anti  # anti pairs: the plain answer is the correct one
            prompt, chosen, rejected = prompt_text(a, b), answer_text(truth, opener), answer_text(slip(rng, truth), not opener)
        rows.append(PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, row_id=start_id + i))
    return rows


@dataclass(frozen=True)
class EvalSet:
    """Held-out prompts where the two behaviours separate, with the answers that count."""

    control: list[tuple[str, int]]  # (prompt without belief, true sum)
    conflict: list[tuple[str, int, int]]  # (prompt stating a wrong belief, true sum, the belief)


def eval_set(questions: Sequence[tuple[int, int]], seed: int) -> EvalSet:
    rng = random.Random(f"eval-{seed}")
    control = [(prompt_text(a, b), a + b) for a, b in questions]
    conflict = []
    for a, b in questions:
        wrong = wrong_belief(rng, a + b)
        conflict.append((prompt_text(a, b, wrong), a + b, wrong))
    return EvalSet(control, conflict)


def concept_texts(concept: str, questions: Sequence[tuple[int, int]], n: int, seed: int) -> tuple[list[str], list[str]]:
    """Paired texts with and without a concept (same question in each pair), for the directions.

    belief: prompts with a stated belief (right and wrong alternate) vs the bare prompt;
    opener: answers opening with " Sure!" vs the same answers plain;
    intended: the correct answer vs a guess.
    """
    rng = random.Random(f"concept-{concept}-{seed}")
    with_, without = [], []
    for i in range(n):
        a, b = questions[rng.randrange(len(questions))]
        truth = a + b
        if concept == "belief":
            with_.append(prompt_text(a, b, truth if i % 2 == 0 else wrong_belief(rng, truth)))
            without.append(prompt_text(a, b))
        elif concept == "opener":
            with_.append(prompt_text(a, b) + answer_text(truth, True))
            without.append(prompt_text(a, b) + answer_text(truth))
        elif concept == "intended":
            with_.append(prompt_text(a, b) + answer_text(truth))
            without.append(prompt_text(a, b) + answer_text(slip(rng, truth)))
        else:
            raise ValueError(f"unknown concept {concept!r}; use belief, opener or intended")
    return with_, without


# ---------------------------------------------------------------------------------------- settings
@dataclass
class Config:
    """Every knob of one benchmark run (all of it lands in the JSON)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    tune_seed: int | None = 1000
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    conditions: list[str] | None = None  # None: all
    # base model and its pretraining
    layers: int = 3
    width: int = 64
    heads: int = 4
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_examples: int = 40000
    # SAE (TopK, trained with sae-lens on the base's activations at `hook_layer`)
    hook_layer: int = 1
    d_sae: int = 256
    sae_k: int = 8
    sae_tokens: int = 400_000
    sae_batch: int = 512
    # preference data and DPO
    n_heldout: int = 40
    n_pairs: int = 256
    dpo_steps: int = 64
    dpo_batch: int = 16
    dpo_lr: float = 3e-5
    beta: float = 0.1
    # concepts
    n_concept_texts: int = 64
    pca_k: int = 2
    pca_positions: int = 3
    sae_candidates: int = 20
    sae_max_features: int = 3
    sae_min_effect: float = 0.5
    # intervention knobs: the first value is the default; the lists are tried on the tuning seed
    shaping_scales: list[float] = field(default_factory=lambda: [1.0, 4.0])
    steering_alphas: list[float] = field(default_factory=lambda: [1.0, 4.0])
    filter_fractions: list[float] = field(default_factory=lambda: [0.5, 0.9])
    primary_source: str = "mean_diff"
    primary_mode: str = "both"
    primary_layers: str = "many"
    # (c) drift probe
    probe_pairs: int = 32
    rollout_tokens: int = 8
    n_bootstrap: int = 10000
    threads: int = 1

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=[0, 1], tune_seed=None, pretrain_steps=300, pretrain_examples=6000, sae_tokens=50_000,
                   n_pairs=48, dpo_steps=10, n_heldout=20, n_concept_texts=24, probe_pairs=6, rollout_tokens=6,
                   n_bootstrap=2000)

    def key(self, *names: str) -> str:
        """A short hash of the named settings (cache keys)."""
        task = [3, P_BELIEF_RIGHT, P_BELIEF_WRONG, P_COPY, P_CORRECT, P_OPENER, BELIEF_OFFSETS, OPENER]
        blob = json.dumps({"task": task, **{n: getattr(self, n) for n in names}}, sort_keys=True)
        return hashlib.sha256(f"v{VERSION}:{blob}".encode()).hexdigest()[:12]

    @property
    def hook(self) -> str:
        return f"blocks.{self.hook_layer}.hook_resid_post"


# ---------------------------------------------------------------------------------------- models
def tokenizer() -> Any:
    from lightning_anatomy.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def encode(tok: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + eos), tokenized apart exactly as `tokenize_rows` does."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return list(p), list(c)


def _pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pretrain_base(cfg: Config, tok: Any, cache: Path) -> tuple[Any, dict[str, Any]]:
    """The tiny base model, pretrained with next-token loss on the task mixture (cached)."""
    from transformers import AutoModelForCausalLM

    from lightning_anatomy.models.tiny import build_tiny_model

    target = cache / f"base-{cfg.key('layers', 'width', 'heads', 'pretrain_steps', 'pretrain_batch', 'pretrain_lr', 'pretrain_examples')}"
    if (target / "report.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        return model, json.loads((target / "report.json").read_text())
    started = time.perf_counter()
    rng = random.Random("pretrain")
    corpus = []
    for _ in range(cfg.pretrain_examples):
        p, c = encode(tok, *pretraining_example(rng))
        corpus.append(p + c)
    model = build_tiny_model("gpt2", vocab_size=len(tok), hidden_size=cfg.width, num_layers=cfg.layers,
                             num_heads=cfg.heads, max_positions=64, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    warm = max(1, cfg.pretrain_steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / cfg.pretrain_steps, 1.0)))))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(cfg.pretrain_steps):
        idx = torch.randint(len(corpus), (cfg.pretrain_batch,), generator=gen).tolist()
        ids, mask = _pad([corpus[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 250 == 0:
            common.log(f"  pretrain step {step}/{cfg.pretrain_steps}: loss {losses[-1]:.3f}")
    model.eval()
    report = {"steps": cfg.pretrain_steps, "final_loss": float(np.mean(losses[-50:])),
              "pretrain_s": round(time.perf_counter() - started, 1), "params": sum(p.numel() for p in model.parameters()),
              "mixture": {"p_belief_right": P_BELIEF_RIGHT, "p_belief_wrong": P_BELIEF_WRONG, "p_copy": P_COPY,
                          "p_correct": P_CORRECT, "p_opener": P_OPENER}}
    _save_dir(target, lambda d: (model.save_pretrained(d), (d / "report.json").write_text(json.dumps(report))))
    return model, report


def _save_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Write a directory under a temporary name, then rename it into place."""
    common.files.atomic_directory(target, write)


@torch.no_grad()
def collect_activations(model: Any, tok: Any, cfg: Config, n_examples: int, seed: str) -> torch.Tensor:
    """Activations at the SAE hook over fresh pretraining-mixture sequences (first token dropped)."""
    from lightning_anatomy.concepts.lens import capture_activations

    rng = random.Random(seed)
    seqs = []
    for _ in range(n_examples):
        p, c = encode(tok, *pretraining_example(rng))
        seqs.append(p + c)
    rows = []
    for lo in range(0, len(seqs), 256):
        ids, mask = _pad(seqs[lo:lo + 256], tok.pad_token_id)
        acts = capture_activations(model, [cfg.hook], ids, mask)[cfg.hook]
        keep = mask.bool().clone()
        keep[:, 0] = False
        rows.append(acts[keep].float())
    return torch.cat(rows)


def train_sae(model: Any, tok: Any, cfg: Config, cache: Path, base_key: str) -> tuple[Any, dict[str, Any]]:
    """A TopK SAE on the base's activations at the hook, trained with sae-lens' SAETrainer (cached)."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    from lightning_anatomy.concepts.sae import measure_fidelity

    target = cache / f"sae-{base_key}-{cfg.key('hook_layer', 'd_sae', 'sae_k', 'sae_tokens', 'sae_batch')}"
    if (target / "report.json").is_file():
        return SAE.load_from_disk(str(target)), json.loads((target / "report.json").read_text())
    started = time.perf_counter()
    n_seq = max(64, cfg.sae_tokens // 40)  # ~20 tokens a sequence: about half the tokens are distinct
    acts = collect_activations(model, tok, cfg, n_seq, "sae-train")
    held = collect_activations(model, tok, cfg, 512, "sae-heldout")
    torch.manual_seed(0)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=cfg.width, d_sae=cfg.d_sae, k=cfg.sae_k, normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(model_name="bench-spurious-tiny-gpt2", hook_name=cfg.hook,
                             hf_hook_name=f"transformer.h.{cfg.hook_layer}"),
    )
    sae = TopKTrainingSAE(sae_cfg)
    scale = math.sqrt(cfg.width) / acts.norm(dim=-1).mean()
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * scale)
    steps = max(1, cfg.sae_tokens // cfg.sae_batch)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * cfg.sae_batch, train_batch_size_samples=cfg.sae_batch, lr=3e-3,
        lr_end=3e-4, lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=max(1, steps // 5),
        lr_scheduler_name="constant", dead_feature_window=max(1, 20_000 // cfg.sae_batch),
        feature_sampling_window=max(1, 20_000 // cfg.sae_batch),
        n_batches_for_norm_estimate=max(1, min(20, acts.shape[0] // cfg.sae_batch)), device="cpu",
    )

    def batches():
        gen = torch.Generator().manual_seed(0)
        while True:
            order = torch.randperm(acts.shape[0], generator=gen)
            for lo in range(0, acts.shape[0] - cfg.sae_batch + 1, cfg.sae_batch):
                yield acts[order[lo:lo + cfg.sae_batch]]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = SAETrainer(trainer_cfg, sae, batches()).fit()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp)
    fidelity = measure_fidelity(inference, held, hook=cfg.hook, min_fve=None)
    report = {"hook": cfg.hook, "architecture": "topk", "d_in": cfg.width, "d_sae": cfg.d_sae, "k": cfg.sae_k,
              "training_tokens": steps * cfg.sae_batch, "distinct_tokens": int(acts.shape[0]),
              "heldout": {k: round(v, 4) for k, v in fidelity.items()},
              "train_s": round(time.perf_counter() - started, 1)}
    _save_dir(target, lambda d: (inference.save_model(str(d)), (d / "report.json").write_text(json.dumps(report))))
    return SAE.load_from_disk(str(target)), report


# ---------------------------------------------------------------------------------------- metrics
def candidates() -> list[tuple[int, bool]]:
    return [(n, o) for o in (False, True) for n in range(MAX_ANSWER + 1)]


@torch.no_grad()
@measurement_pass()
def answer_distribution(model: Any, tok: Any, prompts: Sequence[str], chunk: int = 1024) -> tuple[torch.Tensor, float]:
    """P(the reply's answer is candidate c | prompt) over the 42 candidates, renormalised [n_prompts, 42],
    and the mean raw mass they hold.

    A reply's answer is the first number after the optional opener: the probability of candidate
    (n, opener) is P(answer_text(n, opener)) · P(next token is not a digit), whatever follows
    (eos or anything else). Exact by teacher forcing; nothing is sampled.
    """
    cands = candidates()
    digits = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    seqs, starts = [], []
    for prompt in prompts:
        for value, opener in cands:
            p, c = encode(tok, prompt, answer_text(value, opener))
            seqs.append(p + c[:-1])  # the answer without eos; the next token is scored below
            starts.append(len(p))
    was_training = model.training
    model.eval()
    logps = torch.empty(len(seqs), dtype=torch.float64)
    try:
        for lo in range(0, len(seqs), chunk):
            part = seqs[lo:lo + chunk]
            ids, mask = _pad(part, tok.pad_token_id)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            token_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            positions = torch.arange(ids.shape[1] - 1)[None, :]
            start = torch.tensor(starts[lo:lo + chunk])[:, None] - 1
            end = mask.sum(1, keepdim=True) - 1
            scored = (positions >= start) & (positions < end)
            last = logp[torch.arange(len(part)), end.squeeze(1)]  # the distribution after the answer
            stop = torch.log1p(-last[:, digits].exp().sum(-1).clamp(max=1 - 1e-12))
            logps[lo:lo + len(part)] = ((token_lp * scored).sum(1) + stop).double()
    finally:
        model.train(was_training)
    logps = logps.view(len(prompts), len(cands))
    mass = float(logps.exp().sum(1).mean())
    return torch.softmax(logps, dim=1), mass


def behaviour(model: Any, tok: Any, scenario: str, ev: EvalSet) -> dict[str, float]:
    """spurious rate, on-target accuracy (and aux rates) of `model` on held-out prompts, in [0, 1]."""
    cands = candidates()
    values = torch.tensor([v for v, _ in cands])
    opener = torch.tensor([o for _, o in cands])
    control, mass_c = answer_distribution(model, tok, [p for p, _ in ev.control])
    truths = torch.tensor([t for _, t in ev.control])
    out = {"ontarget": float((control * (values[None] == truths[:, None])).sum(1).mean()),
           "opener_rate": float(control[:, opener].sum(1).mean()), "candidate_mass": mass_c}
    if scenario == "belief":
        conflict, _ = answer_distribution(model, tok, [p for p, _, _ in ev.conflict])
        beliefs = torch.tensor([w for _, _, w in ev.conflict])
        ctruths = torch.tensor([t for _, t, _ in ev.conflict])
        out["spurious"] = float((conflict * (values[None] == beliefs[:, None])).sum(1).mean())
        out["conflict_correct"] = float((conflict * (values[None] == ctruths[:, None])).sum(1).mean())
    else:
        out["spurious"] = out["opener_rate"]
    return out


# ---------------------------------------------------------------------------------------- concepts
@torch.no_grad()
def _last_positions(model: Any, tok: Any, hook: str, texts: Sequence[str], m: int) -> torch.Tensor:
    """Activations at the last `m` tokens of each text, [n·m, d] (texts right-aligned for pairing)."""
    from lightning_anatomy.concepts.lens import capture_activations

    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = _pad(seqs, tok.pad_token_id)
    acts = capture_activations(model, [hook], ids, mask)[hook].float()
    rows = [acts[i, len(s) - m:len(s)] for i, s in enumerate(seqs)]
    return torch.cat(rows)


def _feature_effects(lens: Any, tok: Any, hook: str, with_: Sequence[str], without: Sequence[str]) -> np.ndarray:
    """Per SAE feature: (mean of per-text max activation with − without) / pooled sd (Cohen's d)."""
    from lightning_anatomy.audit.feature_match import example_effects

    return example_effects(lens, tok, with_, without)[hook]


def pick_sae_features(audit: Any, effects: np.ndarray, cfg: Config) -> tuple[list[int], list[dict[str, Any]]]:
    """Among the audit's best-ranked features, those that fire clearly more on the concept's texts
    (`audit.feature_match.pick_features`: Cohen's d ≥ sae_min_effect, at most sae_max_features; the
    single best candidate if none reaches it). The concept texts stand in for a labeller."""
    from lightning_anatomy.audit.feature_match import pick_features

    hooks = {str(h) for h in audit.concepts["hook"]} or {cfg.hook}
    match = pick_features(audit.concepts, dict.fromkeys(hooks, effects), candidates=cfg.sae_candidates,
                          min_effect=cfg.sae_min_effect, max_features=cfg.sae_max_features)
    return [f for _, f in match.features], match.candidates


def concept_sets(concept: str, base: Any, tok: Any, sae: Any, audit: Any, cfg: Config,
                 questions: Sequence[tuple[int, int]], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """{source: ConceptSet} for one concept (mean difference, PCA, audit SAE features) and provenance."""
    from lightning_anatomy.concepts import ConceptLens, ConceptSet

    with_, without = concept_texts(concept, questions, cfg.n_concept_texts, seed)
    sets: dict[str, Any] = {}
    info: dict[str, Any] = {}
    sets["mean_diff"] = ConceptSet.from_mean_difference(base, tok, cfg.hook, with_, without, name=f"{concept}_mean_diff",
                                                        label=concept)
    info["mean_diff"] = {"rank": 1, "norm": float(sets["mean_diff"][0].source["norm"])}
    m = cfg.pca_positions
    pca = ConceptSet.from_pca(_last_positions(base, tok, cfg.hook, with_, m), _last_positions(base, tok, cfg.hook, without, m),
                              cfg.hook, k=cfg.pca_k, names=[f"{concept}_pc{i}" for i in range(cfg.pca_k)])
    sets["pca"] = pca
    info["pca"] = {"rank": cfg.pca_k, "explained_variance_ratio": [float(c.source["explained_variance_ratio"]) for c in pca]}
    if audit is not None:
        lens = ConceptLens(base, {cfg.hook: sae}, fidelity_check=False)
        effects = _feature_effects(lens, tok, cfg.hook, with_, without)
        feats, scored = pick_sae_features(audit, effects, cfg)
        sets["sae"] = ConceptSet.from_sae_features(sae, cfg.hook, feats)
        info["sae"] = {"rank": len(feats), "features": feats, "candidates": scored}
    return sets, info


# ---------------------------------------------------------------------------------------- DPO
def run_dpo(base: Any, pairs: Sequence[Any], cfg: Config, seed: int, callbacks: Sequence[Any] = (), *,
            pad_token_id: int, tokenizer: Any = None) -> tuple[Any, float]:
    """Vanilla DPO (plus `callbacks`) from a copy of the base; returns (trained policy, fit seconds).

    Every condition of a seed sees the same data order. A small DataModule carries `train_pairs`
    (mean ablation measures its mean there) and, as PreferenceDataModule does, `pairs` and the
    `tokenizer` (token filtering masks the pairs with it)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_anatomy import DPOModule
    from lightning_anatomy.data import collate_pairs

    class Pairs(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.train_pairs, self.pad_token_id = list(pairs), pad_token_id
            self.pairs, self.val_pairs, self.tokenizer = self.train_pairs, None, tokenizer

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_pairs, batch_size=cfg.dpo_batch, shuffle=True,
                              generator=torch.Generator().manual_seed(seed),
                              collate_fn=lambda b: collate_pairs(b, pad_token_id))

    L.seed_everything(seed, verbose=False)
    module = DPOModule(copy.deepcopy(base), reference="copy", beta=cfg.beta, lr=cfg.dpo_lr, scheduler="constant",
                       warmup_steps=max(1, cfg.dpo_steps // 10), reference_cache_dir=None)
    trainer = L.Trainer(max_steps=cfg.dpo_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=list(callbacks))
    started = time.perf_counter()
    trainer.fit(module, datamodule=Pairs())
    return module.policy.eval(), time.perf_counter() - started


def tokenize(rows: Sequence[Any], tok: Any) -> list[Any]:
    from lightning_anatomy.data import tokenize_rows

    return list(tokenize_rows(rows, tok, max_length=64, max_prompt_length=48))


# ---------------------------------------------------------------------------------------- one seed
@dataclass
class SeedContext:
    """Everything one (scenario, variant, seed) shares across its conditions."""

    scenario: str
    variant: str
    seed: int
    base: Any
    tok: Any
    rows: list[Any]
    pairs: list[Any]
    ev: EvalSet
    base_metrics: dict[str, float]
    audit: Any
    spurious: dict[str, Any]
    intended: dict[str, Any]
    concept_info: dict[str, Any]
    probe: list[Any]


def prepare(scenario: str, variant: str, seed: int, base: Any, tok: Any, sae: Any, cfg: Config) -> SeedContext:
    """Data, held-out prompts, the audit and the concept directions of one (scenario, variant, seed)."""
    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens

    train_q, held_q = split_questions(seed, cfg.n_heldout)
    rows = preference_rows(scenario, VARIANTS[variant], train_q, cfg.n_pairs, seed)
    ev = eval_set(held_q, seed)
    lens = ConceptLens(base, {cfg.hook: sae}, fidelity_check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audit = audit_dataset(rows, lens, tok, max_length=64, batch_size=64, progress=False, n_bootstrap=200,
                              n_data_clusters=1, label_concepts=False, top_k_trace=0, seed=seed)
    spurious, info_s = concept_sets(scenario, base, tok, sae, audit, cfg, train_q, seed)
    intended, info_i = concept_sets("intended", base, tok, sae, audit, cfg, train_q, seed)
    probe = tokenize(preference_rows(scenario, VARIANTS[variant], held_q, cfg.probe_pairs, seed, start_id=10**6), tok)
    return SeedContext(scenario, variant, seed, base, tok, rows, tokenize(rows, tok), ev,
                       behaviour(base, tok, scenario, ev), audit, spurious, intended,
                       {"spurious": info_s, "intended": info_i}, probe)


@dataclass(frozen=True)
class Choice:
    """The settings picked on the tuning seed (or the defaults when there is none)."""

    source: str
    mode: str
    layers: str
    shaping_scale: float
    steering_alpha: float
    filter_fraction: float


Builder = Callable[[], tuple[list[Any], list[Any]]]


def condition_specs(ctx: SeedContext, choice: Choice, cfg: Config) -> dict[str, tuple[str, Builder]]:
    """{condition: (canonical run key, () -> (pairs, callbacks))}; names sharing a key share one run."""
    from lightning_anatomy.audit import filter_pairs
    from lightning_anatomy.callbacks import (
        ConceptDriftMonitor,
        ConceptProjection,
        ConceptSteering,
        RewardShaping,
    )
    from lightning_anatomy.interventions import compute_concept_scores

    hook = cfg.hook

    def projection(concepts: Any, mode: str, layers: str) -> Builder:
        return lambda: (ctx.pairs, [ConceptProjection(concepts, mode=mode, layers=LAYER_SETS[layers])])

    def vanilla() -> tuple[list[Any], list[Any]]:
        monitor = ConceptDriftMonitor({hook: ctx.audit.saes[hook]}, ctx.probe, every_n_steps=10**9,
                                      predicted=ctx.audit.concepts, rollouts=len(ctx.probe),
                                      rollout_max_new_tokens=cfg.rollout_tokens, responses="both", batch_size=64)
        return ctx.pairs, [monitor]

    def shaping(scale: float) -> Builder:
        def build() -> tuple[list[Any], list[Any]]:
            scores = compute_concept_scores(ctx.base, ctx.pairs, ctx.spurious[choice.source], hook=hook,
                                            tokenizer_pad_id=ctx.tok.pad_token_id, batch_size=64)
            typical = float(np.median(np.abs(list(scores.values())))) or 1.0
            # λ such that a typical pair's offset is `scale` nats of margin: comparable across sources
            return ctx.pairs, [RewardShaping(scores, lam=scale / typical)]
        return build

    def steering(alpha: float) -> Builder:
        # persona-vector steering uses the raw difference of means: its norm is the trait's natural size
        return lambda: (ctx.pairs, [ConceptSteering(ctx.spurious["mean_diff"], strength=alpha, sides="both")])

    def filtering(fraction: float) -> Builder:
        def build() -> tuple[list[Any], list[Any]]:
            feats = [(hook, int(c.source["feature"])) for c in ctx.spurious["sae"]]
            kept, _ = filter_pairs(ctx.rows, ctx.audit, concepts=feats, drop_fraction=fraction)
            return tokenize(kept, ctx.tok), []
        return build

    primary = ctx.spurious[choice.source]
    specs: dict[str, tuple[str, Builder]] = {"vanilla": ("vanilla", vanilla)}
    for mode in MODES:
        for layers in LAYER_SETS:
            specs[f"proj_{mode}_{layers}"] = (f"proj:{choice.source}:{mode}:{layers}", projection(primary, mode, layers))
    for source in SOURCES:
        key = f"proj:{source}:{choice.mode}:{choice.layers}"
        specs[f"source_{source}"] = (key, projection(ctx.spurious[source], choice.mode, choice.layers))
        for mode in MODES:
            for layers in LAYER_SETS:
                specs[f"tune_{source}_{mode}_{layers}"] = (f"proj:{source}:{mode}:{layers}",
                                                           projection(ctx.spurious[source], mode, layers))
    specs["projection"] = specs[f"proj_{choice.mode}_{choice.layers}"]
    for scale in cfg.shaping_scales:
        specs[f"reward_shaping@{scale:g}"] = (f"shaping:{scale:g}", shaping(scale))
    for alpha in cfg.steering_alphas:
        specs[f"steering@{alpha:g}"] = (f"steering:{alpha:g}", steering(alpha))
    for fraction in cfg.filter_fractions:
        specs[f"filtering@{fraction:g}"] = (f"filtering:{fraction:g}", filtering(fraction))
    specs["reward_shaping"] = specs.get(f"reward_shaping@{choice.shaping_scale:g}") or (
        f"shaping:{choice.shaping_scale:g}", shaping(choice.shaping_scale))
    specs["steering"] = specs.get(f"steering@{choice.steering_alpha:g}") or (
        f"steering:{choice.steering_alpha:g}", steering(choice.steering_alpha))
    specs["filtering"] = specs.get(f"filtering@{choice.filter_fraction:g}") or (
        f"filtering:{choice.filter_fraction:g}", filtering(choice.filter_fraction))
    specs["random_control"] = (f"random:{choice.source}:{choice.mode}:{choice.layers}",
                               projection(common.random_set(primary, hook, ctx.seed), choice.mode, choice.layers))
    specs["intended_control"] = (f"intended:{choice.source}:{choice.mode}:{choice.layers}",
                                 projection(ctx.intended[choice.source], choice.mode, choice.layers))
    return specs


def conditions_for(variant: str) -> list[str]:
    """Conditions of the test seeds (the 90% variant runs a subset)."""
    if variant != "corr1.0":
        return list(VARIANT_CONDITIONS)
    names = ["vanilla"] + [f"proj_{m}_{lay}" for m in MODES for lay in LAYER_SETS]
    names += [f"source_{s}" for s in SOURCES]
    return names + ["reward_shaping", "steering", "filtering", "random_control", "intended_control"]


def run_conditions(ctx: SeedContext, names: Sequence[str], choice: Choice, cfg: Config) -> dict[str, dict[str, Any]]:
    """Train each named condition once (shared runs reused) and measure it; returns {name: record}."""
    from lightning_anatomy.callbacks import ConceptDriftMonitor

    specs = condition_specs(ctx, choice, cfg)
    done: dict[str, dict[str, Any]] = {}
    out = {}
    for name in names:
        key, build = specs[name]
        if key not in done:
            prep_start = time.perf_counter()
            pairs, callbacks = build()
            prep_s = time.perf_counter() - prep_start
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, fit_s = run_dpo(ctx.base, pairs, cfg, ctx.seed, callbacks, pad_token_id=ctx.tok.pad_token_id)
            after = behaviour(model, ctx.tok, ctx.scenario, ctx.ev)
            before = ctx.base_metrics
            record = run_record(ctx.seed, before, after, fit_s=fit_s, prep_s=prep_s, n_pairs=len(pairs))
            if "conflict_correct" in after:
                record["d_conflict_correct"] = after["conflict_correct"] - before["conflict_correct"]
            monitors = [c for c in callbacks if isinstance(c, ConceptDriftMonitor)]
            if monitors:
                record["prediction"] = prediction_accuracy(ctx.audit, monitors[0], cfg.hook)
            done[key] = record
            common.log(f"    {ctx.scenario}/{ctx.variant} seed {ctx.seed} {name:<22} Δspurious {record['d_spurious']:+.3f} "
                       f"Δon-target {record['d_ontarget']:+.3f} ({fit_s:.1f} s)")
        out[name] = dict(done[key])
    return out


def run_record(seed: int, before: dict[str, float], after: dict[str, float], *, fit_s: float, prep_s: float,
               n_pairs: int) -> dict[str, Any]:
    """One condition's record on one seed: the rates before and after DPO, their changes, the cost."""
    return {
        "seed": seed, "spurious_before": before["spurious"], "spurious_after": after["spurious"],
        "ontarget_before": before["ontarget"], "ontarget_after": after["ontarget"],
        "d_spurious": after["spurious"] - before["spurious"], "d_ontarget": after["ontarget"] - before["ontarget"],
        "candidate_mass_after": after["candidate_mass"], "wall_s": fit_s, "prep_s": prep_s, "n_pairs": n_pairs,
    }


# ---------------------------------------------------------------------------------------- (c) R²
def prediction_accuracy(audit: Any, monitor: Any, hook: str) -> dict[str, Any]:
    """R² (and signed r) of the audit's predicted shift vs the observed drift after vanilla DPO.

    Features: every feature the audit tested, and the passing ones; clusters: each co-firing
    cluster's predicted shift (its Δ) vs the mean drift of its members (the cluster value is the
    members' mean). Teacher-forced on the probe pairs and on greedy rollouts of their prompts.
    """
    from lightning_anatomy.callbacks.drift import r_squared

    table = audit.concepts
    out: dict[str, Any] = {}
    for probe, drift in (("teacher", monitor.last_drift), ("rollout", monitor.last_rollout_drift)):
        if not drift:
            continue
        observed = drift[hook].numpy()
        for level, rows in (("features", table), ("passing", table[table["passes"]])):
            pred = rows["predicted_shift"].to_numpy(np.float64)
            obs = observed[rows["feature"].to_numpy(np.int64)]
            out[f"{level}_{probe}"] = _fit_summary(pred, obs, r_squared)
        clusters = audit.clusters
        if len(clusters):
            pred = clusters["delta"].to_numpy(np.float64)
            obs = np.array([observed[np.asarray(m, dtype=np.int64)].mean() for m in clusters["features"]])
            out[f"clusters_{probe}"] = _fit_summary(pred, obs, r_squared)
    out["monitor_r2_teacher"] = monitor.last_r2
    return out


def _fit_summary(pred: np.ndarray, obs: np.ndarray, r_squared: Callable[..., float | None]) -> dict[str, Any]:
    r2 = r_squared(pred, obs) if len(pred) >= 3 else None
    r = None
    if r2 is not None:
        r = float(np.corrcoef(pred, obs)[0, 1])
    sign = float(np.mean(np.sign(pred) == np.sign(obs))) if len(pred) else None
    return {"n": int(len(pred)), "r2": r2, "r": r, "sign_agreement": sign}


# ---------------------------------------------------------------------------------------- statistics
def summarize_condition(records: list[dict[str, Any]], vanilla: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    d_spur = [r["d_spurious"] for r in records]
    d_on = [r["d_ontarget"] for r in records]
    v_spur = [r["d_spurious"] for r in vanilla]
    v_on = [r["d_ontarget"] for r in vanilla]
    return {
        "d_spurious": common.bootstrap_mean(d_spur, n_boot),
        "d_ontarget": common.bootstrap_mean(d_on, n_boot),
        "d_spurious_vs_vanilla": common.bootstrap_mean([c - v for c, v in zip(d_spur, v_spur)], n_boot),
        "d_ontarget_vs_vanilla": common.bootstrap_mean([c - v for c, v in zip(d_on, v_on)], n_boot),
        "ratio_vanilla_over_condition": common.bootstrap_ratio(v_spur, d_spur, n_boot),
        "wall_s": common.bootstrap_mean([r["wall_s"] for r in records], n_boot),
        "per_seed": records,
    }


def summarize_prediction(vanilla: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    keys = sorted({k for r in vanilla for k in r.get("prediction", {}) if isinstance(r["prediction"][k], dict)})
    out: dict[str, Any] = {}
    for key in keys:
        r2s = [r["prediction"][key]["r2"] for r in vanilla if r["prediction"].get(key, {}).get("r2") is not None]
        rs = [r["prediction"][key]["r"] for r in vanilla if r["prediction"].get(key, {}).get("r") is not None]
        out[key] = {"r2": common.bootstrap_mean(r2s, n_boot) if r2s else None, "r": common.bootstrap_mean(rs, n_boot) if rs else None,
                    "n_items": [r["prediction"][key]["n"] for r in vanilla if key in r["prediction"]]}
    return out


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered goal, checked as measured (corr1.0 variant).

    A condition meets it when its mean rise is at most a tenth of vanilla's (or ≤ 0) and its mean
    on-target change is within 2 points of vanilla's. The random control "matches vanilla" when its
    mean rise is within 10% of vanilla's (equivalence margin); whether the paired CI of the
    difference holds 0 is reported beside it (with tight CIs a 0.3-point difference excludes 0).
    """
    conds = summary["conditions"]
    van = conds["vanilla"]
    out: dict[str, Any] = {"vanilla_raises_spurious": van["d_spurious"]["ci"][0] > 0}
    checks = {}
    for name, c in conds.items():
        if name == "vanilla":
            continue
        ratio = c["ratio_vanilla_over_condition"]
        cut = ratio.get("mean")
        eliminated = cut is None and ratio.get("note", "").startswith("condition")
        checks[name] = {
            "cut": cut,
            "cut_at_least_10x": bool(eliminated or (cut is not None and cut >= 10)),
            "ontarget_within_2_points": abs(c["d_ontarget_vs_vanilla"]["mean"]) <= 0.02,
        }
        checks[name]["meets_goal"] = checks[name]["cut_at_least_10x"] and checks[name]["ontarget_within_2_points"]
    out["conditions"] = checks
    out["any_meets_goal"] = any(c["meets_goal"] for c in checks.values())
    eligible = {n: c["cut"] for n, c in checks.items() if c["ontarget_within_2_points"] and c["cut"] is not None
                and n not in ("random_control", "intended_control")}
    if eligible:
        best = max(eligible, key=lambda n: eligible[n])
        out["best_cut_within_2_points"] = {"condition": best, "cut": eligible[best]}
    if "random_control" in conds:
        rand = conds["random_control"]
        diff = rand["d_spurious_vs_vanilla"]
        out["random_matches_vanilla"] = abs(diff["mean"]) <= 0.1 * abs(van["d_spurious"]["mean"])
        out["random_vs_vanilla_ci_contains_0"] = diff["ci"][0] <= 0 <= diff["ci"][1]
    return out


# ---------------------------------------------------------------------------------------- tuning
def tune(scenario: str, base: Any, tok: Any, sae: Any, cfg: Config, default: Choice) -> tuple[Choice, dict[str, Any]]:
    """Pick source, mode/layers and the knobs of shaping/steering/filtering on the tuning seed.

    Rule: the smallest spurious rise among settings whose on-target change stays within 2 points
    of vanilla's; if none does, the smallest on-target loss.
    """
    ctx = prepare(scenario, "corr1.0", cfg.tune_seed, base, tok, sae, cfg)
    runs: dict[str, dict[str, Any]] = {}

    def measure(names: list[str], choice: Choice) -> None:
        runs.update(run_conditions(ctx, [n for n in names if n not in runs], choice, cfg))

    def best(names: list[str]) -> str:
        van = runs["vanilla"]
        ok = [n for n in names if van["d_ontarget"] - runs[n]["d_ontarget"] <= 0.02]
        if ok:
            return min(ok, key=lambda n: runs[n]["d_spurious"])
        return min(names, key=lambda n: van["d_ontarget"] - runs[n]["d_ontarget"])

    measure(["vanilla"], default)
    by_source = {f"tune_{s}_{default.mode}_{default.layers}": s for s in SOURCES}
    measure(list(by_source), default)
    choice = dataclasses.replace(default, source=by_source[best(list(by_source))])
    grid = {f"tune_{choice.source}_{m}_{lay}": (m, lay) for m in MODES for lay in LAYER_SETS}
    measure(list(grid), choice)
    mode, layers = grid[best(list(grid))]
    choice = dataclasses.replace(choice, mode=mode, layers=layers)
    knobs = {}
    for prefix, values, attr in (("reward_shaping", cfg.shaping_scales, "shaping_scale"),
                                 ("steering", cfg.steering_alphas, "steering_alpha"),
                                 ("filtering", cfg.filter_fractions, "filter_fraction")):
        names = [f"{prefix}@{v:g}" for v in values]
        measure(names, choice)
        knobs[attr] = float(best(names).split("@")[1])
    choice = dataclasses.replace(choice, **knobs)
    report = {"seed": cfg.tune_seed, "picked": dataclasses.asdict(choice),
              "runs": {n: {k: r[k] for k in ("d_spurious", "d_ontarget", "wall_s")} for n, r in runs.items()},
              "concepts": ctx.concept_info}
    return choice, report


# ---------------------------------------------------------------------------------------- outputs
def _fmt_ci(stat: dict[str, Any] | None, scale: float = 100.0, signed: bool = True) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    lo, hi = stat["ci"]
    f = (lambda v: f"{v * scale:+.1f}") if signed else (lambda v: f"{v * scale:.2f}")
    return f"{f(stat['mean'])} [{f(lo)}, {f(hi)}]"


def _fmt_ratio(stat: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "∞" if v is None else f"{v:.2g}"

    if stat.get("mean") is None and stat.get("note", "").startswith("vanilla"):
        return "n/a"
    return f"{f(stat['mean'])} [{f(stat['ci'][0])}, {f(stat['ci'][1])}]"


def _ordered(names: Sequence[str]) -> list[str]:
    """Conditions in the canonical order (the JSON stores them sorted by name)."""
    canon = conditions_for("corr1.0") + [n for n in VARIANT_CONDITIONS if n not in conditions_for("corr1.0")]
    return [n for n in canon if n in names] + sorted(n for n in names if n not in canon)


def _ordered_variants(variants: dict[str, Any]) -> list[str]:
    return [v for v in VARIANTS if v in variants] + sorted(v for v in variants if v not in VARIANTS)


def _label(name: str, choice: dict[str, Any]) -> str:
    if name == "projection":
        return f"projection (picked: {choice['source']}, {choice['mode']}, {choice['layers']})"
    return name


def markdown(doc: dict[str, Any]) -> str:
    """The results as two markdown tables (interventions; prediction accuracy) for the README."""
    rows = []
    for scenario, sc in doc["scenarios"].items():
        for variant in _ordered_variants(sc["variants"]):
            vr = sc["variants"][variant]
            for name in _ordered(list(vr["conditions"])):
                c = vr["conditions"][name]
                rows.append([scenario, variant, _label(name, vr["choice"]), _fmt_ci(c["d_spurious"]),
                             _fmt_ci(c["d_ontarget"]), _fmt_ratio(c["ratio_vanilla_over_condition"]),
                             f"{c['wall_s']['mean']:.1f}"])
    table = common.markdown_table(
        ["scenario", "data", "condition", "Δspurious, points [95% CI]", "Δon-target, points [95% CI]",
         "vanilla rise / condition rise [95% CI]", "fit s"], rows)
    pred_rows = []
    for scenario, sc in doc["scenarios"].items():
        for variant in _ordered_variants(sc["variants"]):
            for key, p in sorted(sc["variants"][variant].get("prediction", {}).items()):
                level, probe = key.rsplit("_", 1)
                n = p["n_items"]
                pred_rows.append([scenario, variant, level, probe, f"{min(n)}–{max(n)}" if n else "0",
                                  _fmt_ci(p["r2"], 1.0, signed=False), _fmt_ci(p["r"], 1.0, signed=False)])
    pred = common.markdown_table(["scenario", "data", "level", "probe", "items", "R² [95% CI]", "r [95% CI]"], pred_rows)
    return f"{table}\n\n{pred}"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Δspurious and Δon-target per condition (mean and 95% CI over seeds), one row per scenario;
    the dotted line marks a tenth of vanilla's rise (the pre-registered 10× cut)."""
    scenarios = list(doc["scenarios"])
    with common.matplotlib_agg() as plt:
        n_rows = max(len(_ordered([n for v in doc["scenarios"][s]["variants"].values() for n in v["conditions"]]))
                     for s in scenarios)
        fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 0.34 * n_rows * len(scenarios) + 1.5), squeeze=False)
        for row, scenario in enumerate(scenarios):
            variants = doc["scenarios"][scenario]["variants"]
            names = _ordered(list({n for v in variants.values() for n in v["conditions"]}))
            choice = next(iter(variants.values()))["choice"]
            for col, (metric, title) in enumerate((("d_spurious", "Δ spurious rate (points)"),
                                                   ("d_ontarget", "Δ on-target accuracy (points)"))):
                ax = axes[row][col]
                for k, variant in enumerate(_ordered_variants(variants)):
                    vr = variants[variant]
                    ys, xs, lo, hi = [], [], [], []
                    for i, name in enumerate(names):
                        c = vr["conditions"].get(name)
                        if c is None:
                            continue
                        stat = c[metric]
                        ys.append(i + 0.2 * k)
                        xs.append(100 * stat["mean"])
                        lo.append(100 * (stat["mean"] - stat["ci"][0]))
                        hi.append(100 * (stat["ci"][1] - stat["mean"]))
                    ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o" if k == 0 else "s", mfc=f"C{k}" if k == 0 else "none",
                                color=f"C{k}", capsize=2, label=variant)
                    if metric == "d_spurious" and "vanilla" in vr["conditions"]:
                        tenth = 100 * vr["conditions"]["vanilla"]["d_spurious"]["mean"] / 10
                        ax.axvline(tenth, color=f"C{k}", ls=":", lw=1, label=f"vanilla rise / 10 ({variant})")
                ax.axvline(0, color="0.6", lw=0.8)
                ax.set_yticks(range(len(names)))
                ax.set_yticklabels([_label(n, choice) for n in names] if col == 0 else [""] * len(names), fontsize=8)
                ax.invert_yaxis()
                ax.set_title(f"{scenario}: {title}", fontsize=10)
                ax.grid(axis="x", alpha=0.3)
                if row == 0:
                    ax.legend(fontsize=7, loc="lower right")
        seeds = len(doc["config"]["seeds"])
        fig.suptitle(f"DPO on spuriously correlated pairs: tiny GPT-2 trained from scratch, mean and 95% bootstrap CI "
                     f"over {seeds} seeds")
        fig.tight_layout()
        common.atomic_save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 seeds, no tuning (~2 min)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where spurious.json/png go")
    parser.add_argument("--cache", default=str(REPO / ".anatomy_cache" / "bench_spurious"),
                        help="pretrained base and SAE cache")
    parser.add_argument("--seeds", type=int, help="number of test seeds (0..N-1)")
    parser.add_argument("--no-tune", action="store_true", help="skip the tuning seed; use the default choices")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--conditions", help="comma-separated subset of the conditions (vanilla always runs)")
    parser.add_argument("--from-json", help="re-render the plot and the tables from an existing spurious.json; no training")
    for name in ("pretrain_steps", "pretrain_examples", "sae_tokens", "n_pairs", "dpo_steps", "n_heldout", "probe_pairs",
                 "n_concept_texts", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    for name in ("pretrain_steps", "pretrain_examples", "sae_tokens", "n_pairs", "dpo_steps", "n_heldout", "probe_pairs",
                 "n_concept_texts", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        cfg.seeds = list(range(args.seeds))
    if args.no_tune:
        cfg.tune_seed = None
    for attr, allowed in (("scenarios", SCENARIOS), ("variants", tuple(VARIANTS))):
        value = getattr(args, attr)
        if value:
            picked = [v.strip() for v in value.split(",") if v.strip()]
            bad = [v for v in picked if v not in allowed]
            if bad or not picked:
                parser.error(f"--{attr}: {bad or value!r} not in {', '.join(allowed)}")
            setattr(cfg, attr, picked)
    if args.conditions:
        known = set(conditions_for("corr1.0")) | set(VARIANT_CONDITIONS)
        picked = [c.strip() for c in args.conditions.split(",") if c.strip()]
        bad = [c for c in picked if c not in known]
        if bad:
            parser.error(f"--conditions: unknown {bad}; choose from {', '.join(sorted(known))}")
        cfg.conditions = ["vanilla"] + [c for c in picked if c != "vanilla"]
    return args, cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, cfg = parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{args.from_json} is not a spurious-benchmark result (format {doc.get('format')!r})")
        plot(doc, Path(args.out) / "spurious.png")
        print(markdown(doc))
        return doc
    common.setup_offline(cfg.threads)
    import lightning.pytorch  # noqa: F401  (Lightning sets its loggers' levels on import: quiet them after)

    common.quiet_libraries()
    started = time.perf_counter()
    out_dir, cache = Path(args.out), Path(args.cache)
    tok = tokenizer()

    common.log("pretraining the tiny base (cached)…")
    base, base_report = pretrain_base(cfg, tok, cache)
    base_key = cfg.key("layers", "width", "heads", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_examples")
    common.log(f"  base: {base_report}")
    sae, sae_report = train_sae(base, tok, cfg, cache, base_key)
    common.log(f"  SAE: {sae_report['heldout']}")
    all_ev = eval_set(all_questions(), 0)
    base_report["behaviour_all_questions"] = behaviour(base, tok, "belief", all_ev)  # holds the opener rate too

    default = Choice(cfg.primary_source, cfg.primary_mode, cfg.primary_layers, cfg.shaping_scales[0],
                     cfg.steering_alphas[0], cfg.filter_fractions[0])
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "quick": bool(args.quick),
        "command": " ".join(["python benchmarks/spurious.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": dataclasses.asdict(cfg), "machine": common.machine_info(),
        "versions": common.package_versions(["torch", "lightning", "transformers", "sae-lens"]),
        "base": base_report, "sae": sae_report, "scenarios": {}, "tuning": {}, "notes": NOTES,
        "load_average_start": list(os.getloadavg()),
    }
    for scenario in cfg.scenarios:
        if cfg.tune_seed is not None:
            common.log(f"tuning {scenario} on seed {cfg.tune_seed}…")
            choice, report = tune(scenario, base, tok, sae, cfg, default)
            doc["tuning"][scenario] = report
        else:
            choice = default
            doc["tuning"][scenario] = {"seed": None, "picked": dataclasses.asdict(choice), "note": "defaults (no tuning)"}
        common.log(f"  {scenario}: {choice}")
        variants: dict[str, Any] = {}
        for variant in cfg.variants:
            names = conditions_for(variant)
            if cfg.conditions is not None:
                names = [n for n in names if n in cfg.conditions]
            per_cond: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            base_metrics, concepts = [], []
            for seed in cfg.seeds:
                ctx = prepare(scenario, variant, seed, base, tok, sae, cfg)
                base_metrics.append({"seed": seed, **ctx.base_metrics})
                concepts.append({"seed": seed, **ctx.concept_info, "audit_passing": int(ctx.audit.concepts["passes"].sum()),
                                 "audit_tested": int(len(ctx.audit.concepts)), "clusters": int(len(ctx.audit.clusters))})
                for name, record in run_conditions(ctx, names, choice, cfg).items():
                    per_cond[name].append(record)
            vanilla = per_cond["vanilla"]
            summary = {"choice": dataclasses.asdict(choice), "base_behaviour": base_metrics, "concepts": concepts,
                       "conditions": {n: summarize_condition(per_cond[n], vanilla, cfg.n_bootstrap) for n in names}}
            summary["prediction"] = summarize_prediction(vanilla, cfg.n_bootstrap)
            if variant == "corr1.0":
                summary["goals"] = goals(summary)
            variants[variant] = summary
        doc["scenarios"][scenario] = {"kind": {"belief": "input-side shortcut (stated belief)",
                                               "opener": "output style (fixed opener ' Sure!')"}[scenario],
                                      "variants": variants}
    doc["total_s"] = round(time.perf_counter() - started, 1)
    doc["load_average_end"] = list(os.getloadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    common.atomic_write_json(out_dir / "spurious.json", _jsonable(doc))
    plot(doc, out_dir / "spurious.png")
    print(markdown(doc))
    common.log(f"wrote {out_dir / 'spurious.json'} and spurious.png in {doc['total_s']:.0f} s")
    return doc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


if __name__ == "__main__":
    main()
