"""The `anatomy` command: `fit`, `audit`, `demo`, driven by omegaconf YAML configs.

Every option of a config can be overridden on the command line as `key.sub=value`
(omegaconf dotlist). Configs are validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

FIT_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"policy": "tiny:gpt2", "tokenizer": None},
    "module": {},
    "data": {"source": "toy", "toy_size": 64, "batch_size": 8, "val_fraction": 0.125, "max_length": 128,
             "max_prompt_length": 64, "on_bad_rows": "error"},
    "trainer": {"max_steps": 30, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                "enable_checkpointing": False, "val_check_interval": None},
    "logger": {"kind": "csv", "save_dir": "runs", "name": "fit", "project": "lightning-anatomy"},
    "callbacks": [],
}


def load_config(path: str | None, overrides: list[str], defaults: dict[str, Any]) -> DictConfig:
    base = OmegaConf.create(defaults)
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path!r} not found; configs/ holds ready ones")
        base = OmegaConf.merge(base, OmegaConf.load(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key.sub=value, got {bad}")
        for override in overrides:
            key, value = override.split("=", 1)
            try:  # update (not merge) so list items can be addressed: callbacks.0.concepts=...
                OmegaConf.update(base, key, yaml.safe_load(value), merge=True)
            except Exception as err:  # omegaconf raises several types; name the override either way
                raise ValueError(f"config override {override!r} does not fit the config: {err}") from err
    unknown = set(base.keys()) - set(defaults)
    if unknown:
        raise ValueError(f"unknown top-level config keys {sorted(unknown)}; valid: {sorted(defaults)}")
    for key, default in defaults.items():
        kind = {dict: DictConfig, list: ListConfig}.get(type(default))
        if kind is not None and not isinstance(base[key], kind):
            raise ValueError(f"config key {key!r} must be a {type(default).__name__}, got {base[key]!r}")
    return base


def build_logger(cfg: DictConfig):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    kind = cfg.kind
    if kind in (None, "none", False):
        return False
    if kind == "csv":
        return CSVLogger(save_dir=cfg.save_dir, name=cfg.name)
    if kind == "wandb":
        return WandbLogger(project=cfg.project, name=cfg.name, save_dir=cfg.save_dir)
    raise ValueError(f"logger.kind={kind!r} is not one of 'csv', 'wandb', 'none'")


def build_fit(cfg: DictConfig):
    """Objects for a fit: (trainer, module, datamodule). Pure construction, no training."""
    import lightning as L

    from lightning_anatomy.callbacks.factory import build_callbacks
    from lightning_anatomy.data import PreferenceDataModule
    from lightning_anatomy.data.toy import make_toy_preferences
    from lightning_anatomy.models.loading import load_model, load_tokenizer
    from lightning_anatomy.module import DPOModule

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    source = data.pop("source")
    toy_size = data.pop("toy_size", 64)
    if source == "toy":
        source = make_toy_preferences(toy_size, seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.tokenizer)
    policy = load_model(cfg.model.policy)
    module = DPOModule(policy, **OmegaConf.to_container(cfg.module, resolve=True))
    datamodule = PreferenceDataModule(source, tokenizer, seed=cfg.seed, **data)
    callbacks = build_callbacks(OmegaConf.to_container(cfg.callbacks, resolve=True))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(logger=build_logger(cfg.logger), callbacks=callbacks, **trainer_kwargs)
    return trainer, module, datamodule


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, FIT_DEFAULTS)
    trainer, module, datamodule = build_fit(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=args.ckpt_path)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if "/" in k}
    print("final metrics:", metrics)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from lightning_anatomy.audit.job import AUDIT_DEFAULTS, run_audit

    cfg = load_config(args.config, args.overrides, AUDIT_DEFAULTS)
    run_audit(cfg)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_anatomy.demo.run import DEMO_DEFAULTS, run_demo

    cfg = load_config(args.config, args.overrides, DEMO_DEFAULTS)
    run_demo(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anatomy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, helptext in (
        ("fit", cmd_fit, "train with DPOModule (+ concept callbacks) from a YAML config"),
        ("audit", cmd_audit, "audit a preference dataset: ranked concepts, HTML report, ConceptSet export"),
        ("demo", cmd_demo, "the main job on the embedded SmolLM2: audit -> vanilla vs projected DPO"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", "-c", default=None, help="YAML config (configs/ holds ready ones)")
        p.add_argument("overrides", nargs="*", help="config overrides as key.sub=value")
        if name == "fit":
            p.add_argument("--ckpt-path", default=None, help="resume from this Lightning checkpoint")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
