"""Tiny random Hugging Face models and an offline tokenizer.

Tests, the tiny built-in config and the controlled benchmark need real `transformers` models and
a real fast tokenizer without touching a hub. Vocabulary size dominates the cost of small
models on CPU, so the tokenizer is byte-level (259 tokens) unless trained with merges.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

# A ChatML template, like SmolLM2/Qwen2's, so conversational rows render as real ones do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gemma", "gemma2")


def build_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer built offline.

    Without `texts` it has no merges (one token per byte: every string is representable and the
    vocabulary is 260). With `texts` it learns merges up to `vocab_size` (deterministic for the
    same texts), which shortens sequences on real data.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if texts is None:
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(alphabet):
            vocab[ch] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    family: str = "gpt2",
    *,
    vocab_size: int = 260,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given family, built from a config (no download)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    common = dict(vocab_size=vocab_size, tie_word_embeddings=family != "gpt_neox")
    if family == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2", n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common,
        )
    else:
        extra: dict = {}
        if family in ("gemma", "gemma2"):
            extra["head_dim"] = hidden_size // num_heads
        if family == "gemma2":
            extra.update(query_pre_attn_scalar=hidden_size // num_heads, sliding_window=max_positions)
        if family == "gpt_neox":
            extra.update(rotary_pct=0.25, use_parallel_residual=True)
        cfg = AutoConfig.for_model(
            family, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=max_positions,
            bos_token_id=0, eos_token_id=0, pad_token_id=3, **extra, **common,
        )
        if family == "gpt_neox":
            cfg.num_key_value_heads = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.eval()
    return model
