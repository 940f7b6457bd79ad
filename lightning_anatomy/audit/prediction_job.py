"""`anatomy check-prediction --config ...`: a saved audit + the policy before and after training
+ held-out prompts from a YAML config to a saved `PredictionCheck` (JSON, PNG, HTML).

Everything is checked before a model loads: the audit directory, the SAE specs of its hooks,
the rollout options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CHECK_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "audit": None,  # the directory `anatomy audit` wrote (<output_dir>/audit)
    "model": {"before": "tiny:gpt2", "after": None, "tokenizer": None, "dtype": None},
    "saes": {},  # the audit's SAEs, {hook: spec} as in the audit config
    # held-out prompts: the rows [offset, offset + limit) of a preference source (their prompts)
    "data": {"source": "toy", "toy_size": 64, "offset": 0, "limit": 32, "on_bad_rows": "error"},
    "rollouts": {"samples_per_prompt": 1, "temperature": 1.0, "max_new_tokens": 64, "batch_size": 8,
                 "measure": "active", "encode_with": "own", "tau": None, "n_bootstrap": 1000},
    "output_dir": "outputs/check_prediction",
}


def check_config(cfg: DictConfig) -> None:
    """The options this job reads itself, before any model loads."""
    if not cfg.audit or not (Path(str(cfg.audit)) / "audit.json").is_file():
        raise ValueError(f"audit={cfg.audit!r} is not a saved audit directory (no audit.json); pass the directory "
                         "`anatomy audit` wrote, e.g. audit=outputs/audit/audit")
    if not cfg.model.after:
        raise ValueError("model.after is not set: pass the trained policy, e.g. model.after=runs/fit/version_0/final")
    if not isinstance(cfg.saes, DictConfig) or not cfg.saes:
        raise ValueError("the config needs `saes:` mapping each audited hook to the SAE spec the audit used")
    for key in ("offset", "limit"):
        value = cfg.data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"data.{key} must be an integer >= 0, got {value!r}")
    unknown = set(cfg.rollouts) - set(CHECK_DEFAULTS["rollouts"])
    if unknown:
        raise ValueError(f"unknown rollouts option(s) {sorted(unknown)}; valid: {sorted(CHECK_DEFAULTS['rollouts'])}")


def run_check_prediction(cfg: DictConfig):
    from lightning_anatomy.audit.job import load_rows, resolve_sae
    from lightning_anatomy.audit.prediction import check_prediction
    from lightning_anatomy.audit.result import AuditResult
    from lightning_anatomy.models.loading import load_model, load_tokenizer

    check_config(cfg)
    audit = AuditResult.load(str(cfg.audit))
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
    saes = {h: resolve_sae(cfg.saes[h], before, h, cfg.seed) for h in hooks}
    options = OmegaConf.to_container(cfg.rollouts, resolve=True)
    check = check_prediction(audit, before, after, prompts, tokenizer=tokenizer, saes=saes, seed=cfg.seed, **options)
    out = check.save(Path(cfg.output_dir), audit_result=audit)
    s = check.summary()
    print(f"{s['n_clusters']} clusters: R² {s['r2']} (CI {s['r2_ci']}), OLS R² {s['r2_ols']}, "
          f"sign agreement {s['sign_agreement']}")
    print(f"report: {out / 'report.html'}")
    return check
