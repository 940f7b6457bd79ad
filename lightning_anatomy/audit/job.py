"""`anatomy audit --config ...`: model + SAEs + data from a YAML config to a saved audit.

Resumable: extraction shards live in `<output_dir>/features` and a rerun with the same settings
reuses every complete shard; the audit (tables, report, ConceptSet) goes to `<output_dir>/audit`. A summary of the strongest concepts is printed at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from lightning_anatomy.audit.options import AuditOptions


@dataclass
class ModelOptions:
    """The interpreted model.

    Args:
        policy: model spec: 'tiny:<family>', 'embedded', a local directory or a hub id.
        tokenizer: tokenizer spec (None: the policy's).
        dtype: load dtype (float32, bfloat16, float16; None: the checkpoint's).
    """

    policy: str = "tiny:gpt2"
    tokenizer: str | None = None
    dtype: str | None = None


@dataclass
class AuditData:
    """The preference pairs to audit.

    Args:
        source: 'toy' / 'toy:<n>', 'demo', or a path (JSONL, JSON, Parquet, save_to_disk folder).
        limit: audit only the first `limit` rows (None: all).
        on_bad_rows: 'error' stops at bad rows (all listed); 'skip' drops and reports them.
        max_length: tokens per sequence (prompt + response).
        max_prompt_length: prompt tokens kept (its end); None: min(256, max_length // 2).
    """

    source: str = "toy"
    limit: int | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    max_length: int = 256
    max_prompt_length: int | None = None


@dataclass(frozen=True)
class AuditSection(AuditOptions):
    """Every audit option (`AuditOptions`), plus how features are extracted.

    Args:
        batch_size: pairs per extraction forward.
        threshold: an SAE feature fires when its activation exceeds this.
        label_concepts: heuristic labels and token contexts for the traced concepts.
        cofire_max_tokens: method 'paper': co-firing corpus cut to this many tokens (None: all).
    """

    batch_size: int = 8
    threshold: float = 0.0
    label_concepts: bool = True
    cofire_max_tokens: int | None = None


@dataclass
class AuditJob:
    """`anatomy audit`: model + SAEs + data -> a saved audit (report.html, concept_set/).

    Args:
        seed: seed of the built-in data sets and random SAEs.
        model: the interpreted model.
        saes: {hook: SAE spec}: a directory, 'release/sae_id', 'embedded' or 'random:<d_sae>'.
        data: the preference pairs.
        audit: audit options.
        output_dir: extraction shards in <output_dir>/features (resumable), the audit in <output_dir>/audit.
    """

    seed: int = 0
    model: ModelOptions = field(default_factory=ModelOptions)
    saes: dict[str, str] = field(default_factory=dict)
    data: AuditData = field(default_factory=AuditData)
    audit: AuditSection = field(default_factory=AuditSection)
    output_dir: str = "outputs/audit"


def check_job(cfg: DictConfig) -> None:
    """Specs and option rules of an audit config, before any model loads."""
    from lightning_anatomy.concepts.sae import check_sae_spec
    from lightning_anatomy.data.sources import check_source
    from lightning_anatomy.models.loading import check_model_spec

    if not cfg.saes:
        raise ValueError("the audit config needs `saes:` mapping hook names to SAE specs "
                         "(a directory, release/sae_id, 'embedded' or 'random:<d_sae>'), e.g. "
                         "--saes '{blocks.12.hook_resid_post: embedded}'")
    check_model_spec(cfg.model.policy, "model.policy")
    if cfg.model.tokenizer is not None:
        check_model_spec(cfg.model.tokenizer, "model.tokenizer")
    for hook, spec in cfg.saes.items():
        check_sae_spec(spec, f"saes[{hook!r}]")
    check_source(cfg.data.source, "data.source")
    options = OmegaConf.to_container(cfg.audit)
    AuditOptions(**{k: v for k, v in options.items() if k in AuditOptions.__dataclass_fields__}).validate()


def load_rows(data: dict[str, Any], tokenizer, seed: int):
    from lightning_anatomy.data import read_preferences
    from lightning_anatomy.data.sources import resolve_source

    rows = read_preferences(resolve_source(data["source"], seed=seed, where="data.source"),
                            on_bad_rows=data.get("on_bad_rows", "error"), tokenizer=tokenizer)
    if data.get("limit"):
        rows = rows[: int(data["limit"])]
    return rows


def run_audit(cfg: DictConfig):
    """Run the job on `cfg` as `cli.job_config` returns it (parsed, type- and spec-checked there)."""
    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.audit.next_step import mark_predicted, train_command
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.concepts.sae import load_sae
    from lightning_anatomy.model_access import hidden_size_at
    from lightning_anatomy.models.loading import load_model, load_tokenizer

    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.tokenizer)
    rows = load_rows(OmegaConf.to_container(cfg.data, resolve=True), tokenizer, cfg.seed)
    model = load_model(cfg.model.policy, dtype=cfg.model.dtype).eval()
    saes = {hook: load_sae(spec, d_in=hidden_size_at(model, hook), seed=cfg.seed) for hook, spec in cfg.saes.items()}
    lens = ConceptLens(model, saes)
    options = OmegaConf.to_container(cfg.audit, resolve=True)
    result = audit_dataset(rows, lens, tokenizer, max_length=cfg.data.max_length,
                           max_prompt_length=cfg.data.max_prompt_length, out_dir=str(out / "features"), **options)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if data.get("max_prompt_length") is None:  # the audit's own default, spelled out for the training run
        data["max_prompt_length"] = min(256, int(data["max_length"]) // 2)
    command = train_command(str(out / "audit" / "concept_set"), policy=cfg.model.policy, data=data,
                            tokenizer=cfg.model.tokenizer, dtype=cfg.model.dtype, seed=cfg.seed)
    saved = result.save(out / "audit", next_command=command)
    marked = mark_predicted(saved / "concept_set")
    print(f"audited {len(rows)} pairs; strongest concepts:")
    cols = [c for c in ("hook", "feature", "label", "delta", "cohens_d", "q_value", "split_half_agree",
                        "predicted_direction", "explain_away_lambda", "pair_auroc", "differing_pairs")
            if c in result.concepts.columns]
    print(result.concepts[cols].head(10).to_string(index=False))
    print("explain_away_lambda: the Bradley–Terry MLE of the concept's ΔA on the preferences (inf: it orders every "
          "differing pair, perfect confounding); pair_auroc: P(chosen has more of it); differing_pairs: the pairs "
          "both rest on")
    print(f"report: {saved / 'report.html'}\nConceptSet to edit (suppress/amplify/allow): {saved / 'concept_set'}")
    if marked:
        print(f"marked suppress in concept_set/concepts.yaml (what DPO is predicted to push up most): "
              f"{', '.join(marked)}; change any action there (suppress/amplify/allow) before training")
    else:
        print(f"first edit {saved / 'concept_set' / 'concepts.yaml'}: no concept passed the audit's tests, so none "
              "is marked; set action: suppress (or amplify) on the concepts to act on")
    print(f"then train with it: {command}")
    return result
