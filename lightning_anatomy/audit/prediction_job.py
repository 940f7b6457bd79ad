"""`anatomy check-prediction --config ...`: a saved audit + the policy before and after training
+ held-out prompts from a YAML config to a saved `PredictionCheck` (JSON, PNG, HTML).

Everything is checked before a model loads: the audit directory, the SAE specs of its hooks,
the rollout options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jsonargparse.typing import NonNegativeInt
from omegaconf import DictConfig, OmegaConf


@dataclass
class Policies:
    """The policy before and after training.

    Args:
        before: model spec of the policy the audit read (usually the base model).
        after: the trained policy, e.g. runs/fit/version_0/final (required).
        tokenizer: tokenizer spec (None: the `before` model's).
        dtype: load dtype (None: the checkpoint's).
    """

    before: str = "tiny:gpt2"
    after: str | None = None
    tokenizer: str | None = None
    dtype: str | None = None


@dataclass
class HeldOut:
    """Held-out prompts: the prompts of rows [offset, offset + limit) of a preference source.

    Args:
        source: 'toy' / 'toy:<n>', 'demo', or a path.
        offset: first row used.
        limit: rows used (None: all after offset).
        on_bad_rows: 'error' or 'skip'.
    """

    source: str = "toy"
    offset: NonNegativeInt = 0
    limit: NonNegativeInt | None = 32
    on_bad_rows: Literal["error", "skip"] = "error"


@dataclass
class Rollouts:
    """How the rollouts are sampled and measured (`check_prediction`'s options).

    Args:
        samples_per_prompt: rollouts per prompt and policy.
        temperature: sampling temperature (0: greedy).
        max_new_tokens: tokens generated per rollout.
        batch_size: prompts per generation batch.
        measure: 'active' (share of rollouts where a cluster is active) or 'freq' (firing frequency).
        encode_with: 'own' (each policy's own activations) or 'before' (both through the base model).
        tau: activity threshold (None: the audit's).
        n_bootstrap: bootstrap replicates of the R² CI.
    """

    samples_per_prompt: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 8
    measure: str = "active"
    encode_with: str = "own"
    tau: float | None = None
    n_bootstrap: int = 1000


@dataclass
class Prediction:
    """Which predictions are compared on the same rollouts.

    Args:
        predictors: 'paper' and/or 'tilt', compared side by side (None: the audit's own predictor).
        tilt_sample: what the tilt predictor reweights: 'rollouts' (the base policy's; a cluster they
            never show falls back to the dataset's responses), 'dataset' or 'both' (pooled).
    """

    predictors: list[Literal["paper", "tilt"]] | None = None
    tilt_sample: Literal["rollouts", "dataset", "both"] = "rollouts"


@dataclass
class CheckPredictionJob:
    """`anatomy check-prediction`: did the policy change as the audit predicted?

    Args:
        seed: seed of sampling and the built-in data sets.
        audit: the directory `anatomy audit` wrote (<output_dir>/audit).
        model: the policies before and after training.
        saes: the audit's SAEs, {hook: spec} as in the audit config.
        data: held-out prompts.
        rollouts: rollout options.
        prediction: the predictors compared on the rollouts.
        output_dir: where the check (JSON, PNG, HTML) is written.
    """

    seed: int = 0
    audit: str | None = None
    model: Policies = field(default_factory=Policies)
    saes: dict[str, str] = field(default_factory=dict)
    data: HeldOut = field(default_factory=HeldOut)
    rollouts: Rollouts = field(default_factory=Rollouts)
    prediction: Prediction = field(default_factory=Prediction)
    output_dir: str = "outputs/check_prediction"


def check_job(cfg: DictConfig) -> None:
    """The options this job reads itself, before any model loads."""
    from lightning_anatomy.audit.tilt import check_predictors
    from lightning_anatomy.concepts.sae import check_sae_spec
    from lightning_anatomy.data.sources import check_source
    from lightning_anatomy.models.loading import check_model_spec

    if cfg.prediction.predictors is not None:  # unset: the audit's own predictor
        check_predictors(list(cfg.prediction.predictors), "prediction.predictors")
    if not cfg.audit or not (Path(str(cfg.audit)) / "audit.json").is_file():
        raise ValueError(f"audit={cfg.audit!r} is not a saved audit directory (no audit.json); pass the directory "
                         "`anatomy audit` wrote, e.g. --audit=outputs/audit/audit")
    if not cfg.model.after:
        raise ValueError("model.after is not set: pass the trained policy, e.g. --model.after=runs/fit/version_0/final")
    check_model_spec(cfg.model.before, "model.before")
    check_model_spec(cfg.model.after, "model.after")
    if not cfg.saes:
        raise ValueError("the config needs `saes:` mapping each audited hook to the SAE spec the audit used")
    for hook, spec in cfg.saes.items():
        check_sae_spec(spec, f"saes[{hook!r}]")
    check_source(cfg.data.source, "data.source")


def run_check_prediction(cfg: DictConfig):
    """Run the job on `cfg` as `cli.job_config` returns it (parsed, type- and spec-checked there)."""
    from lightning_anatomy.audit.job import load_rows
    from lightning_anatomy.audit.prediction import check_prediction
    from lightning_anatomy.audit.result import AuditResult
    from lightning_anatomy.concepts.sae import load_sae
    from lightning_anatomy.model_access import hidden_size_at
    from lightning_anatomy.models.loading import load_model, load_tokenizer

    audit = AuditResult.load(str(cfg.audit))
    if "tilt" in (cfg.prediction.predictors or [audit.options.get("predictor", "paper")]) and audit.features is None:
        raise ValueError(f"prediction.predictors includes 'tilt', which refits the reward on the audit's pairs, but "
                         f"{cfg.audit} holds no span features; rerun `anatomy audit` (it saves them) or drop 'tilt'")
    hooks = sorted(set(audit.feature_clusters["hook"]))
    missing = [h for h in hooks if h not in cfg.saes]
    if missing:
        raise ValueError(f"saes lacks the audited hook(s) {missing}; give the SAE spec of each")
    tokenizer = load_tokenizer(cfg.model.before, cfg.model.tokenizer)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    offset, limit = int(data.pop("offset") or 0), data.pop("limit")
    rows = load_rows(data, tokenizer, cfg.seed)
    prompts = rows[offset: None if limit is None else offset + int(limit)]
    if not prompts:
        raise ValueError(f"no held-out prompts: data has {len(rows)} rows and offset={offset}; lower data.offset")
    before = load_model(cfg.model.before, dtype=cfg.model.dtype).eval()
    after = load_model(cfg.model.after, dtype=cfg.model.dtype).eval()
    saes = {h: load_sae(cfg.saes[h], d_in=hidden_size_at(before, h), seed=cfg.seed) for h in hooks}
    options = OmegaConf.to_container(cfg.rollouts, resolve=True) | OmegaConf.to_container(cfg.prediction, resolve=True)
    check = check_prediction(audit, before, after, prompts, tokenizer=tokenizer, saes=saes, seed=cfg.seed, **options)
    out = check.save(Path(cfg.output_dir), audit_result=audit)
    s = check.summary()
    for name, p in s.get("predictors", {"": s}).items():
        print(f"{name + ': ' if name else ''}{p['n_clusters']} clusters: R² {p['r2']} (CI {p['r2_ci']}), "
              f"OLS R² {p['r2_ols']}, sign agreement {p['sign_agreement']}")
    print(f"report: {out / 'report.html'}")
    return check
