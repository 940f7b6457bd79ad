"""Training the embedded model's SAE with the project's own code, offline, on CPU.

No SAE for SmolLM2-135M can be downloaded here, so the project trains one: residual-stream
activations at one hook are collected over text available offline (the demo data, text the model
itself samples in chat form, and real prose shipped inside installed packages), then a TopK SAE
is trained with sae-lens' own `SAETrainer` on those in-memory activations and saved in its
inference form with `save_model`. Quality is measured on held-out *sequences*, never on tokens
the SAE was trained on.

Two details matter for quality at this scale. The first token of every sequence is an attention
sink whose residual norm is tens of times the others; it carries no concept and would dominate
the squared error, so it is left out of training and evaluation (`skip_first`). Chat-rendered
texts share their system-prompt prefix, whose activations are identical across texts (causal
model), so positions are de-duplicated by their token prefix.
"""

from __future__ import annotations

import json
import math
import os
import random
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_anatomy.concepts.lens import capture_activations
from lightning_anatomy.concepts.sae import measure_fidelity
from lightning_anatomy.data.tokenize import pad_id, pad_right
from lightning_anatomy.demo.data import DemoData, chat_prompt, make_demo_data
from lightning_anatomy.files import atomic_write_bytes, atomic_write_text
from lightning_anatomy.models.embedded import EMBEDDED_LAYER, MODEL_NAME

# Varied instructions for the model's own chat samples: stories, explanations, lists, code,
# advice, arithmetic, opinions. The sampled replies put the SAE on the distribution it will read.
GENERATION_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Give me three tips for studying for an exam.",
    "What is photosynthesis?",
    "Write a haiku about autumn rain.",
    "How do I make a cup of tea?",
    "Describe the city of Paris in a few sentences.",
    "Write a Python function that reverses a string.",
    "What are the benefits of regular exercise?",
    "Explain the difference between weather and climate.",
    "Tell me a fun fact about octopuses.",
    "How can I be more productive when working from home?",
    "Summarize the plot of Romeo and Juliet.",
    "What is 15 + 27? Explain your steps.",
    "Write a polite email asking for a meeting next week.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What should I pack for a camping trip?",
    "Explain what a neural network is to a child.",
    "Write a limerick about a cat.",
    "What causes earthquakes?",
    "How do vaccines work?",
    "List five animals that live in the ocean.",
    "I think the moon is made of cheese. Am I right?",
    "My friend says 7 times 8 is 54. Is that correct?",
    "Describe your ideal weekend.",
    "How do I fix a flat tire?",
    "What is the capital of Japan, and what is it known for?",
    "Write a short dialogue between a teacher and a student.",
    "Explain why saving money is important.",
    "What are some good habits for sleeping well?",
    "Translate 'good morning' into French and Spanish.",
    "Write a motivational message for someone starting a new job.",
    "How does a refrigerator keep food cold?",
    "What is the difference between a virus and a bacterium?",
    "Tell me about the history of the printing press.",
    "Is it better to rent or to buy a house? Give both sides.",
    "What is 9 - 4? I believe it is 6.",
    "Write a product description for a reusable water bottle.",
    "How can I learn to play the guitar?",
)


def generate_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 20,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    **sampling: Any,
) -> list[str]:
    """Sample one reply per user prompt with the chat template (extra `sampling` keywords, e.g.
    `repetition_penalty`, go to `model.generate`); returns the replies, stripped."""
    if not prompts:
        raise ValueError("generate_replies needs at least one prompt")
    torch.manual_seed(seed)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    replies: list[str] = []
    try:
        for lo in range(0, len(prompts), batch_size):
            rendered = [chat_prompt(tokenizer, p) for p in prompts[lo:lo + batch_size]]
            enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling,
                )
            replies.extend(tokenizer.decode(row, skip_special_tokens=True).strip()
                           for row in out[:, enc["input_ids"].shape[1]:])
    finally:
        tokenizer.padding_side = old_side
    return replies


def generate_chat_texts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str] = GENERATION_PROMPTS, **generation: Any,
) -> list[str]:
    """Sample one reply per prompt (`generation` keywords as `generate_replies` takes them) and
    return the rendered conversations, the texts an SAE reads in chat form."""
    if not prompts:
        raise ValueError("generate_chat_texts needs at least one prompt")
    replies = generate_replies(model, tokenizer, prompts, **generation)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                          tokenize=False) for p, r in zip(prompts, replies)]


def package_texts(
    max_texts: int = 400, *, chars_per_text: int = 700, root: str | os.PathLike | None = None,
    exclude: Sequence[str] = ("lightning_anatomy",),
) -> list[str]:
    """Real prose and code that ships with installed packages: READMEs (METADATA bodies) and licenses.

    Files are read in sorted order and cut at paragraph boundaries into pieces of about
    `chars_per_text`; pieces are taken round-robin across packages so no single long README
    dominates. Deterministic for a given set of installed packages.
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["purelib"])
    per_package: list[list[str]] = []
    for info in sorted(base.glob("*.dist-info")):
        if any(info.name.startswith(name) for name in exclude):
            continue
        docs = []
        meta = info / "METADATA"
        if meta.is_file():
            text = meta.read_text(errors="replace")
            _, _, body = text.partition("\n\n")  # headers end at the first blank line
            docs.append(body)
        for lic in sorted(info.glob("**/LICEN[CS]E*")):
            if lic.is_file():
                docs.append(lic.read_text(errors="replace"))
        pieces = [p for doc in docs for p in _paragraph_chunks(doc, chars_per_text)]
        if pieces:
            per_package.append(pieces)
    texts: list[str] = []
    depth = 0
    while len(texts) < max_texts and any(depth < len(p) for p in per_package):
        texts += [p[depth] for p in per_package if depth < len(p)]
        depth += 1
    return texts[:max_texts]


def _paragraph_chunks(text: str, size: int) -> list[str]:
    chunks, current = [], ""
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if current and len(current) + len(para) > size:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para[: 2 * size]
    if current:
        chunks.append(current)
    return [c for c in chunks if len(c) >= 80]  # drop badges, bare headings and other fragments


def demo_texts(data: DemoData, tokenizer: Any) -> list[str]:
    """Every demo sequence the model will read, chat-rendered: training pairs, held-out items, concept texts."""
    texts = []
    for row in data.train:
        user = row["prompt"][0]["content"]
        for side in ("chosen", "rejected"):
            texts.append(chat_prompt(tokenizer, user) + row[side][0]["content"])
    for items in (data.heldout_conflict, data.heldout_aligned, data.heldout_control):
        for item in items:
            texts.append(chat_prompt(tokenizer, item["prompt"]) + item["correct"])
            texts.append(chat_prompt(tokenizer, item["prompt"]) + item["wrong"])
    texts += [chat_prompt(tokenizer, t) for t in (*data.texts_with_belief, *data.texts_without_belief)]
    return texts


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    hook_name: str,
    *,
    max_length: int = 128,
    batch_size: int = 16,
    skip_first: bool = True,
    dedupe: bool = True,
    seen: set[int] | None = None,
) -> torch.Tensor:
    """Activations `[n_tokens, d]` (fp32) at `hook_name` over `texts`, padding removed.

    `skip_first` drops each sequence's first token (the attention sink). With `dedupe`, a
    position whose whole token prefix was already collected (in this call, or in `seen` from an
    earlier one) is skipped: its activation would be an exact duplicate.
    """
    if not texts:
        raise ValueError("collect_activations needs at least one text")
    seen = set() if seen is None else seen
    pad = pad_id(tokenizer)
    rows: list[torch.Tensor] = []
    for lo in range(0, len(texts), batch_size):
        ids_list = [
            tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            for t in texts[lo:lo + batch_size]
        ]
        ids_list = [ids for ids in ids_list if len(ids) > int(skip_first)]
        if not ids_list:
            continue
        ids, mask = pad_right(ids_list, pad)
        acts = capture_activations(model, [hook_name], ids, mask)[hook_name].float()
        for j, seq in enumerate(ids_list):
            keep, prefix_hash = [], 0
            for t, tok in enumerate(seq):
                prefix_hash = hash((prefix_hash, tok))
                if t == 0 and skip_first:
                    continue
                if dedupe:
                    if prefix_hash in seen:
                        continue
                    seen.add(prefix_hash)
                keep.append(t)
            if keep:
                rows.append(acts[j, keep].cpu())
    if not rows:
        raise ValueError("no activations were collected: every text was empty or a duplicate")
    return torch.cat(rows)


def drop_outliers(acts: torch.Tensor, limit: float) -> tuple[torch.Tensor, int]:
    """Rows whose norm is at most `limit` (massive-activation sinks removed), and how many were dropped."""
    keep = acts.norm(dim=-1) <= limit
    return acts[keep], int((~keep).sum())


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches over the in-memory activations (sae-lens' DataProvider)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=gen)
        for lo in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[lo:lo + batch_size]]


def train_topk_sae(
    activations: torch.Tensor,
    *,
    d_sae: int = 2304,
    k: int = 32,
    training_tokens: int = 300_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """Train a TopK SAE on `activations` `[n, d_in]` with sae-lens' SAETrainer; return the inference SAE.

    Inputs are scaled to an average norm of sqrt(d_in) during training (sae-lens'
    `expected_average_only_in`) and the scale is folded back, so the returned SAE reads raw
    activations. The decoder bias starts at the activation mean; dead features (none fired in the
    last ~50k tokens) get sae-lens' AuxK loss.
    """
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    if activations.ndim != 2 or activations.shape[0] < batch_size:
        raise ValueError(
            f"activations must be [n_tokens, d_in] with at least batch_size={batch_size} rows, got "
            f"{tuple(activations.shape)}; collect more text or lower batch_size"
        )
    acts = activations.float().contiguous()
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=d_sae, k=k, normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(**(metadata or {})),
    )
    sae = TopKTrainingSAE(cfg)
    scale = math.sqrt(acts.shape[1]) / acts.norm(dim=-1).mean()
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * scale)
    steps = max(1, training_tokens // batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=lr / 10,
        lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=max(1, steps // 5), lr_scheduler_name="constant",
        dead_feature_window=max(1, 50_000 // batch_size), feature_sampling_window=max(1, 50_000 // batch_size),
        n_batches_for_norm_estimate=max(1, min(50, acts.shape[0] // batch_size)), device="cpu",
    )
    trainer = SAETrainer(trainer_cfg, sae, _batches(acts, batch_size, seed))
    trained = trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


@torch.no_grad()
def dead_fraction(sae: Any, activations: torch.Tensor, chunk: int = 8192) -> float:
    """Fraction of features that fire on none of `activations` (encoded in chunks to bound memory)."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for lo in range(0, activations.shape[0], chunk):
        fired |= (sae.encode(activations[lo:lo + chunk]) != 0).any(0).cpu()
    return float((~fired).float().mean())


def held_out_split(texts: Sequence[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: every `every`-th text is held out (whole sequences, never tokens)."""
    held = [t for i, t in enumerate(texts) if i % every == every - 1]
    train = [t for i, t in enumerate(texts) if i % every != every - 1]
    return train, held


def save_sae_dir(sae: Any, output_dir: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` (sae-lens `save_model`) and `training_report.json`.

    Each file is written under a temporary name and renamed into place.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        sae.save_model(tmp)
        for name in sorted(os.listdir(tmp)):
            atomic_write_bytes(out / name, (Path(tmp) / name).read_bytes())
    atomic_write_text(out / "training_report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out


def train_embedded_sae(
    output_dir: str | os.PathLike,
    *,
    layer: int = EMBEDDED_LAYER,
    d_sae: int = 2304,
    k: int = 32,
    training_tokens: int = 250_000,
    batch_size: int = 512,
    lr: float = 1e-3,
    n_package_texts: int = 500,
    n_generated: int = len(GENERATION_PROMPTS),
    max_new_tokens: int = 64,
    max_length: int = 128,
    outlier_factor: float = 10.0,
    seed: int = 0,
    extra_eval_texts: dict[str, Sequence[str]] | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    log=print,
) -> dict[str, Any]:
    """Collect activations of the embedded model, train the SAE, evaluate on held-out text, save.

    Returns the report written to `training_report.json` (sources, sizes, timings, and held-out
    FVE / L0 / dead fraction per source). `extra_eval_texts` are only evaluated (out of domain).
    """
    from lightning_anatomy.models.embedded import load_embedded

    hook_name = f"blocks.{layer}.hook_resid_post"
    started = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # timings below depend on how shared the CPU was
    if model is None or tokenizer is None:
        model, tokenizer = load_embedded()
    model.eval()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    generated = generate_chat_texts(model, tokenizer, GENERATION_PROMPTS[:n_generated], max_new_tokens=max_new_tokens,
                                    seed=seed)
    timings["generate_s"] = time.perf_counter() - t
    sources = {
        "demo": demo_texts(make_demo_data(seed=seed), tokenizer),
        "generated": generated,
        "packages": package_texts(n_package_texts),
    }
    rng = random.Random(seed)
    for texts in sources.values():
        rng.shuffle(texts)

    t = time.perf_counter()
    seen: set[int] = set()
    train_parts: list[torch.Tensor] = []
    held: dict[str, torch.Tensor] = {}
    for name, texts in sources.items():
        train_texts, held_texts = held_out_split(texts)
        train_parts.append(collect_activations(model, tokenizer, train_texts, hook_name, max_length=max_length, seen=seen))
        held[name] = collect_activations(model, tokenizer, held_texts, hook_name, max_length=max_length, seen=seen)
    for name, texts in (extra_eval_texts or {}).items():
        held[name] = collect_activations(model, tokenizer, list(texts), hook_name, max_length=max_length, dedupe=False)
    train_acts = torch.cat(train_parts)
    timings["collect_s"] = time.perf_counter() - t
    # Besides each sequence's first token, a few later tokens also become attention sinks (norm in
    # the thousands, ~60x the median): drop them from training and evaluation alike, and count them.
    norm_limit = outlier_factor * float(train_acts.norm(dim=-1).median())
    train_acts, dropped_train = drop_outliers(train_acts, norm_limit)
    dropped = {"train": dropped_train}
    for name in list(held):
        held[name], dropped[name] = drop_outliers(held[name], norm_limit)
    log(f"collected {train_acts.shape[0]} training tokens, held out {sum(h.shape[0] for h in held.values())} "
        f"({timings['collect_s']:.0f} s)")

    t = time.perf_counter()
    metadata = {
        "model_name": MODEL_NAME, "hook_name": hook_name, "hf_hook_name": f"model.layers.{layer}",
        "context_size": max_length, "prepend_bos": False, "dataset_path": "lightning_anatomy offline mix",
    }
    sae = train_topk_sae(train_acts, d_sae=d_sae, k=k, training_tokens=training_tokens, batch_size=batch_size, lr=lr,
                         seed=seed, metadata=metadata)
    timings["train_s"] = time.perf_counter() - t

    held_all = torch.cat([held[name] for name in sources])
    evaluation = {name: measure_fidelity(sae, acts, hook=hook_name, min_fve=None) | {"tokens": int(acts.shape[0])}
                  for name, acts in {"heldout_all": held_all, **{f"heldout_{n}": a for n, a in held.items()}}.items()}
    # `dead_fraction` above: never fires on the held-out sample (rare features look dead there too);
    # `dead_fraction_train`: never fires on any distinct training token.
    evaluation["training_tokens"] = {"dead_fraction_train": dead_fraction(sae, train_acts)}
    timings["total_s"] = time.perf_counter() - started
    report = {
        "model": MODEL_NAME, "hook_name": hook_name, "layer": layer, "architecture": "topk", "d_in": int(sae.cfg.d_in),
        "d_sae": d_sae, "k": k, "training_tokens_seen": (training_tokens // batch_size) * batch_size,
        "distinct_training_tokens": int(train_acts.shape[0]), "batch_size": batch_size, "lr": lr, "seed": seed,
        "max_length": max_length, "first_token_excluded": True,
        "outliers": {"rule": f"norm > {outlier_factor} x median training norm", "norm_limit": round(norm_limit, 2),
                     "dropped_tokens": dropped},
        "sources": {name: {"texts": len(texts)} for name, texts in sources.items()},
        "evaluation": evaluation, "timings_s": {k_: round(v, 1) for k_, v in timings.items()},
        "torch_threads": torch.get_num_threads(), "load_average_at_start": load_at_start,
    }
    save_sae_dir(sae, output_dir, report)
    log(json.dumps(evaluation["heldout_all"]))
    return report
