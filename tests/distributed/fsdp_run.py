"""The runs tests/test_fsdp.py compares: 1 process (no sharding) against 2 CPU processes under
FSDP2 (`ModelParallelStrategy`, gloo), with the concept callbacks attached (mean ablation included),
every reference mode, ConceptBlocking on both reference forwards it reads (the sharded copy, the
PEFT adapters-off pass), a sharded and a full checkpoint resumed, and span-feature extraction.

    python tests/fsdp_run.py DEVICES OUT_DIR

writes OUT_DIR/result.json (rank 0): every logged value per run, the precomputed reference's
cache file name (it hashes the gathered weights), the trained parameters' norm and the ablation means.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_anatomy import DPOModule, PreferenceDataModule
from lightning_anatomy.callbacks import (
    ConceptAttribution,
    ConceptBlocking,
    ConceptDriftMonitor,
    ConceptProjection,
    ConceptSteering,
    RewardShaping,
)
from lightning_anatomy.concepts import ConceptSet
from lightning_anatomy.data import read_preferences, tokenize_rows
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from lightning_anatomy.sharding import is_sharded_module
from tests.helpers.concept_callback_helpers import random_sae
from tests.helpers.intervention_helpers import MemoryLogger

HOOK0, HOOK1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
TRACK = {"f0": (HOOK0, 0), "f7": (HOOK0, 7), "f8": (HOOK0, 8)}  # features of the SAE that fire
ROWS, PAIRS_PER_STEP, STEPS = 24, 8, 4
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc", "lm_head"], "lora_dropout": 0.0}


def blocking(sae: Any, lam: float) -> ConceptBlocking:
    """Two features that fire, one growing and one shrinking in each run: the one-sided hinge acts on
    one of them. `lam` puts the penalty at about 1% of the loss (excess is ~100x smaller under LoRA)."""
    return ConceptBlocking({"f0": (HOOK0, 0), "f7": (HOOK0, 7)}, saes={HOOK0: sae}, lam=lam)


def callbacks(tok: Any, kind: str = "all") -> list[Any]:
    sae = random_sae(64, 64, seed=5)
    if kind == "blocking":
        return [blocking(sae, lam=2000.0)]
    probe = tokenize_rows(read_preferences(make_toy_preferences(6, seed=9)), tok, max_length=48, max_prompt_length=32)
    return [
        ConceptAttribution({HOOK0: sae}, every_n_steps=1, track=TRACK),
        ConceptDriftMonitor({HOOK0: sae}, probe, every_n_steps=2, track=TRACK),
        # mean ablation: μ from the 24 train pairs in 3 batches, under FSDP 2 on rank 0 and 1 (+ a dummy) on rank 1
        ConceptProjection(ConceptSet.from_sae_features(sae, HOOK0, [1, 2]), mode="both", ablation="mean"),
        ConceptSteering(ConceptSet.from_sae_features(sae, HOOK1, [5]), strength=0.5),
        RewardShaping({i: 0.1 * (i % 3) for i in range(ROWS)}, lam=1.0),
        blocking(sae, lam=20.0),
    ]


def fit(devices: int, root: Path, *, reference: str = "copy", concept_callbacks: str | None = "all",
        stop_at: int | None = None, ckpt_path: str | None = None, full_checkpoint: bool = False) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), reference=reference, lr=1e-3,
                       adam_eps=1e-4, warmup_steps=1, peft_config=dict(PEFT) if reference == "peft" else None,
                       reference_cache_dir=str(root / "refcache"))
    computed: list[int] = []  # reference log-prob tables this run computed (not read from a cache or checkpoint)
    if reference == "precomputed":  # wrap the strategy's computation (not public: a test-only spy)
        compute = module._reference._compute
        module._reference._compute = lambda pairs, *a: computed.append(len(pairs)) or compute(pairs, *a)
    data = PreferenceDataModule(make_toy_preferences(ROWS, seed=0), tok, batch_size=PAIRS_PER_STEP // devices,
                                val_fraction=0.0, max_length=48, max_prompt_length=32, seed=0, shuffle=False)
    logger = MemoryLogger()
    cbs = callbacks(tok, concept_callbacks) if concept_callbacks else []
    if stop_at is not None:
        def interrupt(trainer: L.Trainer, *_: Any) -> None:
            if trainer.global_step == stop_at:
                trainer.should_stop = True

        cbs += [LambdaCallback(on_train_batch_end=interrupt),
                ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=stop_at, save_top_k=-1)]
    strategy: Any = "auto"
    if devices > 1:
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                         save_distributed_checkpoint=not full_checkpoint)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=logger,
                        callbacks=cbs, enable_checkpointing=stop_at is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                        default_root_dir=str(root), deterministic=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    saved = sorted((root / "ckpt").glob("*.ckpt")) if stop_at is not None else []
    with torch.no_grad():
        norm = sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).double().pow(2).sum())
                   for p in module.policy.parameters())
    means = [cb.means for cb in cbs if isinstance(cb, ConceptProjection)]
    return {"records": logger.records(), "ckpt": str(saved[0]) if saved else None, "param_norm": norm ** 0.5,
            "means": {hook: mu.tolist() for hook, mu in means[0].items()} if means else {},
            "sharded": is_sharded_module(module.policy),
            "reference_sharded": module.reference is not None and is_sharded_module(module.reference),
            "reference_in_state_dict": any(k.startswith("reference.") for k in module.state_dict()),
            "refcache": sorted(p.name for p in (root / "refcache").glob("*.safetensors")), "computed": computed}


def fsdp1_step() -> dict[str, Any]:
    """DPOModule's step under raw FSDP1 on the 2 gloo processes Lightning left initialised (Lightning's
    FSDPStrategy refuses a CPU): the whole module wrapped like FSDPStrategy wraps it, blocks as units
    (`decoder_block_classes`), every rank on the same batch, against the unsharded step."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lightning_anatomy.data import collate_pairs
    from lightning_anatomy.digests import full_model_digest, model_digest
    from lightning_anatomy.sharding import decoder_block_classes

    class Step(torch.nn.Module):
        def __init__(self, dpo: DPOModule) -> None:
            super().__init__()
            self.dpo = dpo

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.dpo.compute_loss(batch)[0]

    tok = build_tiny_tokenizer()
    pairs = tokenize_rows(read_preferences(make_toy_preferences(8, seed=1)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    plain = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), reference="copy")
    with torch.no_grad():  # policy != reference, so the loss has a gradient
        for p in plain.policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sharded = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), reference="copy")
    sharded.policy.load_state_dict(plain.policy.state_dict())
    digest = model_digest(plain.policy)
    loss = plain.compute_loss(batch)[0]
    loss.backward()
    grad_norm = float(torch.cat([p.grad.flatten() for p in plain.policy.parameters()]).norm())
    wrapped = FullyShardedDataParallel(Step(sharded), device_id=torch.device("cpu"), use_orig_params=True,
                                       auto_wrap_policy=ModuleWrapPolicy(decoder_block_classes(sharded.policy)))
    sharded_loss = wrapped(batch)
    sharded_loss.backward()
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        sharded_norm = float(torch.cat([p.grad.flatten() for p in sharded.policy.parameters()]).norm())
        shard_sizes = [p.numel() for p in sharded.policy.parameters()]
    return {"loss": float(loss), "sharded_loss": float(sharded_loss), "grad_norm": grad_norm,
            "sharded_grad_norm": sharded_norm, "digest_equal": full_model_digest(sharded.policy, fsdp_root=wrapped) == digest,
            "full_sizes": [p.numel() for p in plain.policy.parameters()] == shard_sizes}


def extraction(devices: int, root: Path) -> dict[str, Any]:
    """`extract_span_features` of 10 pairs in shards of 2, 2 and 1 batches: under FSDP2 rank 0 runs 3
    batches and rank 1 runs 2 plus a dummy forward. Dense values per (hook, span, stat)."""
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.concepts.extraction import extract_span_features

    tok = build_tiny_tokenizer()
    pairs = tokenize_rows(read_preferences(make_toy_preferences(10, seed=3)), tok, max_length=48, max_prompt_length=32)
    model = build_tiny_model("gpt2", seed=0, vocab_size=len(tok)).eval()
    lens = ConceptLens(model, {HOOK0: random_sae(64, 64, seed=5), HOOK1: random_sae(64, 64, seed=6)},
                       fidelity_check=False)
    strategy: Any = "auto" if devices == 1 else ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    features = extract_span_features(pairs, lens, batch_size=2, shard_size=4, out_dir=root / "extraction",
                                     progress=False, pad_token_id=tok.pad_token_id,
                                     trainer_kwargs={"accelerator": "cpu", "devices": devices, "strategy": strategy})
    return {"row_ids": features.row_ids.tolist(), "fingerprint": features.meta["fingerprint"],
            "sharded": is_sharded_module(model), "lengths": {k: v.tolist() for k, v in features.lengths.items()},
            "values": {"|".join(key): m.toarray().tolist() for key, m in features.matrices.items()}}


def refusals(root: Path) -> dict[str, str | None]:
    """What must not read sharded weights says so: a freshly sharded policy (head a DTensor)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_anatomy.concepts.labels import logit_lens_tokens
    from lightning_anatomy.sharding import shard_fsdp2

    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)))
    shard_fsdp2(module.policy, init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    out: dict[str, str | None] = {}
    for name, call in (("save_pretrained", lambda: module.save_pretrained(root / "final")),
                       ("logit_lens", lambda: logit_lens_tokens(module.policy, tok, torch.ones(64)))):
        try:
            call()
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


def main(devices: int, out: Path) -> None:
    torch.set_num_threads(1)
    runs: dict[str, Any] = {"copy": fit(devices, out / "copy")}
    runs["precomputed"] = fit(devices, out / "precomputed", reference="precomputed", concept_callbacks=None)
    runs["peft"] = fit(devices, out / "peft", reference="peft", concept_callbacks="blocking")
    runs["extraction"] = extraction(devices, out)
    if devices > 1:
        for kind, full in (("sharded", False), ("full", True)):
            first = fit(devices, out / kind, stop_at=2, full_checkpoint=full)
            runs[f"resumed_{kind}"] = fit(devices, out / kind, ckpt_path=first["ckpt"], full_checkpoint=full)
            runs[f"resumed_{kind}"]["ckpt_is_dir"] = Path(first["ckpt"]).is_dir()
        # precomputed reference: FSDP2 loads the checkpoint after on_fit_start; the resumed run (in a
        # folder without the first run's cache) must take the table from the checkpoint, not compute one
        first = fit(devices, out / "pre_part", reference="precomputed", concept_callbacks=None, stop_at=2)
        runs["resumed_precomputed"] = fit(devices, out / "pre_resumed", reference="precomputed",
                                          concept_callbacks=None, ckpt_path=first["ckpt"])
        runs["fsdp1"] = fsdp1_step()
        runs["refusals"] = refusals(out)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
