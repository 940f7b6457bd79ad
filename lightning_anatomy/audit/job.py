"""`anatomy audit --config ...`: model + SAEs + data from a YAML config to a saved audit.

Resumable: extraction shards live in `<output_dir>/features` and a rerun with the same settings
reuses every complete shard; the audit (tables, report, ConceptSet) goes to `<output_dir>/audit`. A summary of the strongest concepts is printed at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

AUDIT_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"policy": "tiny:gpt2", "tokenizer": None, "dtype": None},
    "saes": {},
    "data": {"source": "toy", "toy_size": 64, "limit": None, "on_bad_rows": "error", "max_length": 256,
             "max_prompt_length": None},
    "audit": {"batch_size": 8, "threshold": 0.0},
    "output_dir": "outputs/audit",
}


def resolve_sae(spec: Any, model, hook: str, seed: int = 0):
    """An SAE for `hook` from a config value: a directory, `release/sae_id`, `embedded` (the SAE
    the project trained for SmolLM2) or `random:<d_sae>` (a seeded random SAE, for smoke runs only:
    its features mean nothing)."""
    import torch

    if isinstance(spec, str) and spec == "embedded":
        from lightning_anatomy.models.embedded import load_embedded_sae

        return load_embedded_sae()
    if isinstance(spec, str) and spec.startswith("random:"):
        from sae_lens import StandardSAE, StandardSAEConfig

        from lightning_anatomy.concepts.hooks import hidden_size_at

        torch.manual_seed(seed)
        return StandardSAE(StandardSAEConfig(d_in=hidden_size_at(model, hook), d_sae=int(spec.split(":", 1)[1])))
    from lightning_anatomy.concepts.sae import load_sae

    return load_sae(spec)


def load_rows(data: dict[str, Any], tokenizer, seed: int):
    from lightning_anatomy.data import read_preferences
    from lightning_anatomy.data.toy import make_toy_preferences

    source = data["source"]
    if source == "toy":
        source = make_toy_preferences(data.get("toy_size", 64), seed=seed)
    elif source == "demo":
        from lightning_anatomy.demo.data import make_demo_data

        source = make_demo_data(seed=seed).train
    rows = read_preferences(source, on_bad_rows=data.get("on_bad_rows", "error"), tokenizer=tokenizer)
    if data.get("limit"):
        rows = rows[: int(data["limit"])]
    return rows


def run_audit(cfg: DictConfig):
    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.models.loading import load_model, load_tokenizer

    if not cfg.saes:
        raise ValueError("the audit config needs `saes:` mapping hook names to SAE specs "
                         "(a directory, release/sae_id, 'embedded' or 'random:<d_sae>')")
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.tokenizer)
    rows = load_rows(OmegaConf.to_container(cfg.data, resolve=True), tokenizer, cfg.seed)
    model = load_model(cfg.model.policy, dtype=cfg.model.dtype).eval()
    saes = {hook: resolve_sae(spec, model, hook, cfg.seed) for hook, spec in cfg.saes.items()}
    lens = ConceptLens(model, saes)
    options = OmegaConf.to_container(cfg.audit, resolve=True)
    result = audit_dataset(rows, lens, tokenizer, max_length=cfg.data.max_length,
                           max_prompt_length=cfg.data.max_prompt_length, out_dir=str(out / "features"), **options)
    saved = result.save(out / "audit")
    print(f"audited {len(rows)} pairs; strongest concepts:")
    cols = [c for c in ("hook", "feature", "label", "delta", "cohens_d", "q_value", "split_half_agree",
                        "predicted_direction") if c in result.concepts.columns]
    print(result.concepts[cols].head(10).to_string(index=False))
    print(f"report: {saved / 'report.html'}\nConceptSet to edit (suppress/amplify/allow): {saved / 'concept_set'}")
    return result
