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
                "val_check_interval": None},
    "logger": {"kind": "csv", "save_dir": "runs", "name": "fit", "project": "lightning-anatomy"},
    # Lightning checkpoints in <run>/checkpoints: last.ckpt, and every N optimizer steps (null: last only).
    "checkpoint": {"every_n_steps": 100, "save_last": True},
    # The trained policy as a Hugging Face model folder in <run>/final (PEFT: merged, or adapter-only).
    "save": {"final": True, "merge_adapters": True},
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


def check_fit_config(cfg: DictConfig) -> None:
    """Options a fit reads itself, checked before any model loads."""
    every = cfg.checkpoint.get("every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint.every_n_steps must be an integer >= 1 or null (last only), got {every!r}")
    for key in ("save_last",):
        if not isinstance(cfg.checkpoint.get(key), bool):
            raise ValueError(f"checkpoint.{key} must be true or false, got {cfg.checkpoint.get(key)!r}")
    for key in ("final", "merge_adapters"):
        if not isinstance(cfg.save.get(key), bool):
            raise ValueError(f"save.{key} must be true or false, got {cfg.save.get(key)!r}")


def run_dir(logger: Any, cfg: DictConfig) -> Path:
    """Where this fit's logs, checkpoints and final model go: the logger's version folder
    (`<save_dir>/<name>/version_N` for CSV, `<save_dir>/<name>/<run id>` for W&B)."""
    if logger and cfg.logger.kind == "csv":
        return Path(logger.log_dir)
    if logger and logger.version is not None:
        return Path(cfg.logger.save_dir) / str(cfg.logger.name) / str(logger.version)
    return Path(cfg.logger.save_dir) / str(cfg.logger.name)


def build_fit(cfg: DictConfig):
    """Objects for a fit: (trainer, module, datamodule). Pure construction, no training."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

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
    logger = build_logger(cfg.logger)
    if trainer_kwargs.get("enable_checkpointing", True) and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        every = cfg.checkpoint.every_n_steps
        callbacks.append(ModelCheckpoint(
            dirpath=run_dir(logger, cfg) / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
            every_n_train_steps=every, save_top_k=-1 if every else 0, save_last=cfg.checkpoint.save_last))
    trainer = L.Trainer(logger=logger, callbacks=callbacks, **trainer_kwargs)
    return trainer, module, datamodule


def cmd_fit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, FIT_DEFAULTS)
    check_fit_config(cfg)
    if args.ckpt_path is not None and not Path(args.ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt-path {args.ckpt_path!r} is not a file; checkpoints are in <run>/checkpoints")
    trainer, module, datamodule = build_fit(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=args.ckpt_path)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if "/" in k}
    print("final metrics:", metrics)
    if trainer.checkpoint_callback is not None and trainer.is_global_zero:
        print(f"checkpoints: {trainer.checkpoint_callback.dirpath}")
    if cfg.save.final and trainer.is_global_zero:
        final = module.save_pretrained(run_dir(trainer.logger, cfg) / "final", merge_adapters=cfg.save.merge_adapters,
                                       tokenizer=datamodule.tokenizer)
        print(f"saved model: {final}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from lightning_anatomy.audit.job import AUDIT_DEFAULTS, run_audit

    cfg = load_config(args.config, args.overrides, AUDIT_DEFAULTS)
    run_audit(cfg)
    return 0


def cmd_check_prediction(args: argparse.Namespace) -> int:
    from lightning_anatomy.audit.prediction_job import CHECK_DEFAULTS, run_check_prediction

    run_check_prediction(load_config(args.config, args.overrides, CHECK_DEFAULTS))
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
        ("check-prediction", cmd_check_prediction, "rollouts before vs after training: R² of the audit's cluster predictions"),
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
