"""Completion log-probs without the full logits: equal to the full-logits computation (values,
TRL's logit means, gradients) on every tiny family, PEFT and soft-capping; never a [2B, T, V]
tensor; block hooks still act; an unknown logit transform is refused."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_anatomy.data import collate_pairs, read_preferences, tokenize_rows
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.logprobs import completion_logps
from lightning_anatomy.models.tiny import FAMILIES, build_tiny_model, build_tiny_tokenizer
from lightning_anatomy.module import DPOModule

CHUNK = 7  # several chunks and a remainder on every batch below


def full_logits_reference(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The computation before chunking, frozen here: (logps, lengths, chosen mean logit, rejected mean logit)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = lp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    n = logits.shape[0] // 2

    def mean(rows: slice) -> torch.Tensor:
        m = mask[rows, :, None]
        return (logits[rows, :-1].detach().float() * m).sum() / (m.sum() * logits.shape[-1])

    return (token * mask).sum(-1), mask.sum(-1), mean(slice(None, n)), mean(slice(n, None))


def _batch(n: int = 4):
    tok = build_tiny_tokenizer()
    pairs = tokenize_rows(read_preferences(make_toy_preferences(n, seed=2)), tok, max_length=48, max_prompt_length=32)
    return tok, collate_pairs(pairs, tok.pad_token_id)


def _compare(model, batch, params) -> None:
    """Values and logit means of both paths to 1e-6 relative (fp32), the gradients of Σ w·logps to 1e-5
    relative or 5e-6 of the tensor's largest entry (the head's gradient sums tokens in another order)."""
    w = torch.linspace(-1.0, 1.0, batch["input_ids"].shape[0])
    ref, ref_len, ref_c, ref_r = full_logits_reference(model, batch)
    ref_grads = torch.autograd.grad((w * ref).sum(), params)
    out = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                           chunk_size=CHUNK, logit_sums=True)
    grads = torch.autograd.grad((w * out.logps).sum(), params)
    n = batch["input_ids"].shape[0] // 2
    torch.testing.assert_close(out.logps, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.lengths, ref_len)
    torch.testing.assert_close(out.logit_mean(slice(None, n)), ref_c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logit_mean(slice(n, None)), ref_r, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=5e-6 * float(r.abs().max()) + 1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_equals_full_logits_on_every_family(family):
    tok, batch = _batch()
    model = build_tiny_model(family, vocab_size=len(tok)).train()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family != "gpt_neox")  # both kinds of head are covered
    _compare(model, batch, [p for p in model.parameters()])


def test_gemma2_soft_capping_is_applied():
    tok, batch = _batch()
    model = build_tiny_model("gemma2", vocab_size=len(tok)).train()
    model.config.final_logit_softcapping = 0.5  # small, so that it matters for tiny random logits
    _compare(model, batch, list(model.parameters()))
    capped = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    model.config.final_logit_softcapping = None
    plain = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    assert (capped - plain).abs().max() > 0.05


@pytest.mark.parametrize("family, targets", [("gpt2", ["c_attn", "lm_head"]),
                                             ("llama", ["q_proj", "v_proj", "lm_head"])])
def test_peft_lora_including_the_head_and_adapters_off(family, targets):
    peft = pytest.importorskip("peft")
    tok, batch = _batch()
    base = build_tiny_model(family, vocab_size=len(tok))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: make the adapters (the head's too) change the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())
    _compare(model, batch, lora)
    with model.disable_adapter(), torch.no_grad():  # the PEFT reference: the same modules, adapters off
        off = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
        ref = full_logits_reference(model, batch)[0]
    with torch.no_grad():
        on = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    torch.testing.assert_close(off, ref, rtol=1e-6, atol=1e-6)
    assert (off - on).abs().max() > 1e-3


class VocabRows(TorchDispatchMode):
    """Counts, in rows of V (numel / V), the tensors with a last dimension V that ops produce, forward
    and backward: the largest one, and the most alive at once (views and in-place results not recounted)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest, self.live, self.peak_live = vocab, 0, 0, 0
        self._alive: set[int] = set()

    def _freed(self, key: int, rows: int) -> None:
        self._alive.discard(key)
        self.live -= rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                rows = t.numel() // self.vocab
                self.largest = max(self.largest, rows)
                if not t._is_view() and id(t) not in self._alive:
                    self._alive.add(id(t))
                    self.live += rows
                    weakref.finalize(t, self._freed, id(t), rows)
                    self.peak_live = max(self.peak_live, self.live)
        return out


def test_the_chunked_path_never_holds_the_full_logits():
    vocab, chunk = 2048, 32
    model = build_tiny_model("gpt2", vocab_size=vocab, hidden_size=16, num_heads=2).train()
    ids = torch.randint(4, vocab, (8, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.arange(48).expand(8, 48) >= 4}
    positions = int(batch["completion_mask"][:, 1:].sum())  # 344 scored positions, 11 chunks
    assert model.config.n_embd < chunk  # a [d, V] weight view stays below the chunk bounds
    full = VocabRows(vocab)
    with full:
        full_logits_reference(model, batch)[0].sum().backward()
    assert full.largest >= 8 * 47 and full.peak_live >= 3 * 8 * 47  # the probe sees [2B, T-1, V] (and its copies)
    chunked = VocabRows(vocab)
    with chunked:
        completion_logps(model, ids, batch["attention_mask"], batch["completion_mask"], chunk_size=chunk
                         ).logps.sum().backward()
    assert chunked.largest <= chunk  # one chunk of completion positions (the last-position logits: 8 rows)
    # alive at once: a few tensors of one chunk (logits, softmax, their gradients), not one per chunk
    assert chunked.peak_live <= 8 * chunk < positions


def test_block_hooks_see_and_edit_the_same_activations():
    tok, batch = _batch()
    model = build_tiny_model("llama", vocab_size=len(tok))
    seen: list[torch.Tensor] = []

    def edit(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        seen.append(hidden.detach().clone())
        hidden = hidden * 1.5
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = model.model.layers[0].register_forward_hook(edit)
    with torch.no_grad():
        ref = full_logits_reference(model, batch)[0]
        got = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    handle.remove()
    with torch.no_grad():
        unedited = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert (got - unedited).abs().max() > 1e-3


def test_an_unknown_logit_transform_is_refused():
    tok, batch = _batch()
    model = build_tiny_model("qwen2", vocab_size=len(tok))

    def scale(_m, _a, out):
        out.logits = out.logits * 3.0
        return out

    model.register_forward_hook(scale)
    with pytest.raises(RuntimeError, match=r"Qwen2ForCausalLM: LM head .*logps_chunk_size=None"):
        completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


def test_bf16_passes_the_head_check_and_stays_close():
    tok, batch = _batch()
    model = build_tiny_model("gemma2", vocab_size=len(tok)).to(torch.bfloat16)
    with torch.no_grad():
        ref = full_logits_reference(model, batch)[0]
        got = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0.5)


def test_dpomodule_chunks_by_default_and_both_paths_give_the_same_step():
    tok, batch = _batch()
    chunked = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="copy")
    full = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="copy", logps_chunk_size=None)
    assert chunked.hparams.logps_chunk_size == 512
    with torch.no_grad():
        for m in (chunked.policy, full.policy):
            for i, p in enumerate(m.parameters()):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    loss_c, stats_c = chunked.compute_loss(batch)
    loss_f, stats_f = full.compute_loss(batch)
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-6, atol=1e-7)
    for key in stats_f:
        torch.testing.assert_close(stats_c[key], stats_f[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="logps_chunk_size must be an integer >= 1 or None"):
        DPOModule("tiny:gpt2", logps_chunk_size=0)
