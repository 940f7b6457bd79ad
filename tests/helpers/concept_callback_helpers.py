"""Shared fixtures of the concept-callback tests (attribution, drift): tiny pairs, SAEs, trainers."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import lightning as L
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from torch import nn
from torch.utils.data import DataLoader

from lightning_anatomy.data import TokenizedPair, collate_pairs
from lightning_anatomy.model_access import hook_input, hook_output, resolve_hook

PAD = 3
VOCAB = 260


def random_pairs(n: int, seed: int = 0, start_id: int = 0) -> list[TokenizedPair]:
    """Pairs of random byte tokens with varied prompt/completion lengths (eos 0 appended)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(4, VOCAB, (length,), generator=g).tolist()

    return [TokenizedPair(start_id + i, ids(3, 8), ids(2, 7) + [0], ids(2, 7) + [0]) for i in range(n)]


def random_sae(d_in: int = 64, d_sae: int = 128, seed: int = 0) -> StandardSAE:
    """A random StandardSAE whose features fire on about half of the tokens."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae

def perfect_sae(d: int):
    """A ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: decode(encode(x)) == x exactly."""
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae



def loader(pairs: list[TokenizedPair], batch_size: int) -> DataLoader:
    return DataLoader(pairs, batch_size=batch_size, shuffle=False, collate_fn=partial(collate_pairs, pad_token_id=PAD))


def batches(pairs: list[TokenizedPair], batch_size: int) -> list[dict[str, torch.Tensor]]:
    return list(loader(pairs, batch_size))


def trainer(callbacks: list, *, root: Path | str = ".", **kwargs) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(root))
    opts.update(kwargs)
    return L.Trainer(callbacks=callbacks, **opts)


def hook_count(model: nn.Module) -> int:
    """Forward and forward-pre hooks registered on any submodule of `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def offline_wandb_env(monkeypatch, tmp_path: Path) -> None:
    """W&B offline, quiet, and with its config/cache folders inside the test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def reference_push(module: L.LightningModule, batch: dict, saes: dict, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Brute force: splice each SAE's features into the forward as explicit leaf tensors a,
    h' = h + (a − a.detach())·W_dec (the same value), take ∂L/∂a by autograd, and return the
    push −Σ_t a·∂L/∂a over the chosen / rejected completion tokens."""
    mod = copy.deepcopy(module)
    feats: dict[str, torch.Tensor] = {}
    handles = []

    def splice(hook: str, h: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # a reference forward (e.g. PEFT adapters off)
            return h
        sae = saes[hook]
        a = sae.encode(h).detach().requires_grad_(True)
        feats[hook] = a
        return h + (a - a.detach()) @ sae.W_dec.detach()

    for hook in saes:
        point = resolve_hook(mod.policy, hook)
        if point.kind == "input":
            def pre(m, args, kwargs, hook=hook):
                h, rebuild = hook_input(args, kwargs)
                return rebuild(splice(hook, h))

            handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(m, args, out, hook=hook):
                h, rebuild = hook_output(out)
                return rebuild(splice(hook, h))

            handles.append(point.module.register_forward_hook(post))
    loss = mod.compute_loss(batch)[0] * loss_scale
    grads = torch.autograd.grad(loss, [feats[h] for h in saes])
    n = batch["input_ids"].shape[0] // 2
    mask = batch["completion_mask"].float()[..., None]
    out = {}
    for hook, grad in zip(saes, grads):
        contrib = feats[hook].detach() * grad * mask
        out[hook] = -torch.stack([contrib[:n].sum((0, 1)), contrib[n:].sum((0, 1))])
    for handle in handles:
        handle.remove()
    return out
