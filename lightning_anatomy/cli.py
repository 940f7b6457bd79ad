"""The `anatomy` command: `fit` / `validate` (LightningCLI), `audit`, `demo`, `check-prediction`.

Every subcommand parses with jsonargparse (`parser_mode="omegaconf"`), the parser Lightning users
know from LightningCLI: `--config file.yaml`, `--print_config`, `--help` listing every key with
its type and default, and overrides as `--key.sub=value` (`key.sub=value` is accepted too and
read the same way). The whole config is type-checked, and every spec in it (model, data source,
SAE, ConceptSet) checked for existence, before any model loads. A mistake a user can make prints
one line that names the flag to change and exits 2 (`cli_errors.py` maps the package's error types
to flags; `ANATOMY_DEBUG=1` adds the traceback); a misspelt key suggests the key meant, and
abbreviated keys are refused.

    anatomy fit --config configs/tiny.yaml --trainer.max_steps=50 --model.loss_type=ipo
    anatomy fit --config configs/tiny.yaml --print_config
    anatomy audit --config configs/audit/tiny.yaml --saes '{blocks.1.hook_resid_post: random:256}'
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_anatomy.cli_errors import (
    ClassParams,
    class_params,
    constructor_error,
    option_keys,
    unknown_key_line,
    user_error_line,
)
from lightning_anatomy.wandb_offline import wait_until_finished

FIT_COMMANDS = ("fit", "validate")
JOBS = {  # subcommand -> (module, config dataclass, run function, help)
    "audit": ("lightning_anatomy.audit.job", "AuditJob", "run_audit",
              "audit a preference dataset: ranked concepts, HTML report, ConceptSet export"),
    "demo": ("lightning_anatomy.demo.run", "DemoJob", "run_demo",
             "the main job on the embedded SmolLM2: audit -> vanilla vs concept-shaped DPO"),
    "check-prediction": ("lightning_anatomy.audit.prediction_job", "CheckPredictionJob", "run_check_prediction",
                         "rollouts before vs after training: R² of the audit's cluster predictions"),
}
# Keys whose value is a {hook: spec} mapping: `--saes.<hook>=<spec>` would be split at the hook's dots.
HOOK_MAPPINGS = ("saes",)


class ConfigError(ValueError):
    """A config value that cannot work, found before any model loads (the message names the key)."""


@dataclass
class SaveOptions:
    """What `anatomy fit` saves when training ends.

    Args:
        final: write the trained policy as a Hugging Face model folder (+ tokenizer) in `<run>/final`.
        merge_adapters: a PEFT policy is merged into its base (False: the adapter only).
    """

    final: bool = True
    merge_adapters: bool = True


# ------------------------------------------------------------------------------ arguments


def normalize_args(argv: Sequence[str]) -> list[str]:
    """Read `key.sub=value` as `--key.sub=value`, `--ckpt-path` as `--ckpt_path`, and
    `--saes.<hook>=<spec>` (one or more) as one `--saes={hook: spec, ...}`."""
    out: list[str] = []
    mappings: dict[str, dict[str, str]] = {}
    for arg in argv:
        if re.match(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*=", arg):
            arg = "--" + arg
        if arg.startswith("--ckpt-path"):
            arg = "--ckpt_path" + arg[len("--ckpt-path"):]
        head = next((k for k in HOOK_MAPPINGS if arg.startswith(f"--{k}.") and "=" in arg), None)
        if head is not None:
            key, value = arg[len(head) + 3:].split("=", 1)
            mappings.setdefault(head, {})[key] = value
            continue
        out.append(arg)
    for head, values in mappings.items():
        out.append(f"--{head}=" + "{" + ", ".join(f"{k!r}: {v!r}" for k, v in values.items()) + "}")
    return out


# ------------------------------------------------------------------------------ spec checks


def _at(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def check_specs(config: Any) -> None:
    """Every spec of a fit config, checked without loading anything (ConfigError names the key)."""
    from lightning_anatomy.concepts.concept_set import check_concept_dir
    from lightning_anatomy.concepts.sae import check_sae_spec
    from lightning_anatomy.data.sources import check_source
    from lightning_anatomy.models.loading import check_model_spec

    checks = [("model.init_args.policy", check_model_spec), ("data.init_args.tokenizer", check_model_spec),
              ("data.init_args.source", check_source)]
    for key, check in checks:
        value = _at(config, key)
        if isinstance(value, str):
            _named(check, value, key.replace(".init_args", ""))
    ckpt = config.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={str(ckpt)!r} is not a file; checkpoints are in <run>/checkpoints "
                          "(last.ckpt, step<N>.ckpt)")
    every = _at(config, "checkpoint.every_n_train_steps")
    if every is not None and every < 0:
        raise ConfigError(f"checkpoint.every_n_train_steps={every} must be >= 0 (0 or null: only last.ckpt)")
    for i, cb in enumerate(_at(config, "trainer.callbacks") or []):
        args = cb.get("init_args") if hasattr(cb, "get") else None
        if not args:
            continue
        where = f"trainer.callbacks[{i}] ({str(cb.get('class_path', '')).rsplit('.', 1)[-1]})"
        for name in ("concepts",):
            if isinstance(args.get(name), str):
                _named(check_concept_dir, args[name], f"{where}.{name}")
        for name in ("saes", "lens_or_saes"):
            if hasattr(args.get(name), "items"):
                for hook, spec in args[name].items():
                    _named(check_sae_spec, spec, f"{where}.{name}[{hook!r}]")


def _named(check: Any, value: Any, key: str) -> None:
    try:
        check(value, key)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise ConfigError(str(err)) from err


# ------------------------------------------------------------------------------ fit / validate


def _cli_class():
    """The LightningCLI subclass (built lazily: importing Lightning takes seconds)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class RunConfig(SaveConfigCallback):
        """The full resolved config with the run: `config.yaml` in the run folder and, with a
        W&B logger, the run's config (W&B otherwise holds only the module's hyper-parameters)."""

        def save_config(self, trainer, pl_module, stage: str) -> None:
            from lightning.pytorch.loggers import WandbLogger

            from lightning_anatomy.files import atomic_write_text

            if not trainer.is_global_zero:
                return
            text = self.parser.dump(self.config, skip_none=False)
            folder = run_folder(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "config.yaml", text)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.config.update({"anatomy_config": self.config.as_dict()}, allow_val_change=True)

    class AnatomyCLI(LightningCLI):
        """LightningCLI with the package's defaults: DPOModule + PreferenceDataModule (any
        LightningModule / LightningDataModule by class_path), a CSV logger in runs/, checkpoints
        every 100 steps in `<run>/checkpoints`, the trained model in `<run>/final`."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items() if k in FIT_COMMANDS}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.filename": "step{step}", "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 100, "checkpoint.save_top_k": -1, "checkpoint.save_last": True,
                "model": {"class_path": "lightning_anatomy.DPOModule"},
                "data": {"class_path": "lightning_anatomy.PreferenceDataModule", "init_args": {"source": "toy"}},
                "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "runs", "name": "fit"}},
                "trainer.enable_model_summary": False, "trainer.log_every_n_steps": 10, "seed_everything": 0,
            })
            parser.add_class_arguments(SaveOptions, "save")

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except argparse.ArgumentError as err:
                keys = option_keys(parser, *getattr(self, "_subcommand_parsers", {}).values())
                keys += [f"--model.{p}" for p in class_params("lightning_anatomy.DPOModule")]
                keys += [f"--data.{p}" for p in class_params("lightning_anatomy.PreferenceDataModule")]
                line = (unknown_key_line(str(err), keys, ClassParams())
                        or unknown_key_line(tidy_error(str(err)), keys, ClassParams()))
                if line is None:
                    raise
                raise ConfigError(line) from err

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            data_args = _at(config, "data.init_args")
            policy = _at(config, "model.init_args.policy")
            if data_args is not None and data_args.get("tokenizer") is None and isinstance(policy, str):
                data_args["tokenizer"] = policy  # the policy's own tokenizer unless one is named
            check_specs(config)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:  # a constructor refused a value of the config
                raise ConfigError(constructor_error(err)) from err

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.pytorch.callbacks import ProgressBar

            from lightning_anatomy.console import StepProgressBar

            trainer_cfg = self._get(self.config_init, "trainer", default={})
            given = trainer_cfg.get("callbacks") or []
            if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                              for c in given):
                self.trainer_defaults = {**self.trainer_defaults, "callbacks": [StepProgressBar()]}
            return super().instantiate_trainer(**kwargs)

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            except BaseException:
                remove_if_empty(run_folder(self.trainer))
                raise

        def after_fit(self) -> None:
            trainer, cfg = self.trainer, self.config["fit"]
            metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if "/" in k}
            if not trainer.is_global_zero:
                return
            print("final metrics:", metrics)
            print(f"logs: {run_folder(trainer)}")
            if trainer.checkpoint_callback is not None:
                print(f"checkpoints: {trainer.checkpoint_callback.dirpath}")
            if cfg.save.final and hasattr(self.model, "save_pretrained"):
                tokenizer = getattr(self.datamodule, "tokenizer", None)
                final = self.model.save_pretrained(run_folder(trainer) / "final",
                                                   merge_adapters=cfg.save.merge_adapters, tokenizer=tokenizer)
                print(f"saved model: {final}")

    return AnatomyCLI, RunConfig


def run_folder(trainer: Any) -> Path:
    """Where a fit's logs, config, checkpoints and final model go: the logger's version folder
    (`<save_dir>/<name>/version_N` for CSV; `<save_dir>/<project>/<run id>` for W&B)."""
    logger = trainer.logger
    if logger is not None and type(logger).__name__ == "CSVLogger":
        return Path(logger.log_dir)
    if logger is not None and getattr(logger, "version", None) is not None and logger.save_dir is not None:
        return Path(logger.save_dir) / str(logger.name) / str(logger.version)
    return Path(trainer.default_root_dir)


def remove_if_empty(folder: Path) -> None:
    """After a failed start, drop a run folder that holds nothing but the config it was given."""
    if folder.is_dir() and all(p.name in ("config.yaml", "hparams.yaml") for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def tidy_error(message: str) -> str:
    """jsonargparse's error for a subclass-mode key (`--model.lr=fast`) lists every Union
    alternative; keep the one that matters, with the full key: `model.lr: Expected a float ...`."""
    outer = re.search(r'Parser key "([^"]+)":', message)
    inner = re.search(r"Problem with given class_path '([^']+)':\s*(.*?)\n\s*- Expected a <class 'NoneType'>",
                      message, flags=re.S)
    if outer is None or inner is None:
        return message
    text = re.sub(r'Parser key "([^"]+)"', lambda m: f'key "{outer.group(1)}.{m.group(1)}"', inner.group(2))
    text = re.sub(r"\s*\n\s*", " ", text).strip()
    return f'key "{outer.group(1)}" ({inner.group(1)}): {text}' if not text.startswith("key") else text


def run_fit(argv: list[str]) -> int:
    from lightning_anatomy.console import quiet_lightning

    quiet_lightning()
    cli_class, run_config = _cli_class()

    def cli(args: list[str]) -> None:
        cli_class(
            model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=run_config, save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "prog": "anatomy", "allow_abbrev": False,
                           **{c: {"allow_abbrev": False} for c in FIT_COMMANDS}},
            args=args, auto_configure_optimizers=False,
        )

    if any(a in ("-h", "--help") for a in argv):  # the project's keys first, then Lightning's (trainer, ...)
        print(f"anatomy {argv[0]}: the project's keys first (model: DPOModule, data: PreferenceDataModule, concept "
              "callbacks), then every key of the command with Lightning's trainer options.\n")
        for extra in (["--model.help", "lightning_anatomy.DPOModule"],
                      ["--data.help", "lightning_anatomy.PreferenceDataModule"], None, []):
            if extra is None:
                print("\nConcept callbacks (--trainer.callbacks+=<Name>, or class_path/init_args items in YAML): "
                      "ConceptProjection, ConceptAttribution, ConceptDriftMonitor, ConceptBlocking, ConceptSteering, "
                      "RewardShaping; their keys: --trainer.callbacks.help lightning_anatomy.<Name>\n", flush=True)
                continue
            try:
                cli([argv[0], *extra] if extra else argv)
            except SystemExit:
                pass
        return 0
    try:
        cli(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(unknown_key_line(tidy_error(str(err)), [], ClassParams()) or tidy_error(str(err))) from err
    finally:
        finish_wandb()
    return 0


def finish_wandb(timeout: float = 30.0) -> None:
    """Close the command's W&B run, so its files are complete when `main` returns (also when it is
    called from Python, e.g. a notebook, where the process does not exit).

    `wandb.finish()` may return before wandb-core has written the run's last records, so this
    waits (at most `timeout` seconds) until the `.wandb` file holds its exit record.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    sync_file = Path(run.settings.sync_file)
    wandb.finish()
    if sync_file.is_file():
        wait_until_finished(sync_file, timeout)


# ------------------------------------------------------------------------------ jobs


def job_parser(name: str):
    """The jsonargparse parser of a job subcommand, from its config dataclass (types, defaults,
    help from the docstring), with `--config` and `--print_config`."""
    import importlib

    from jsonargparse import ActionConfigFile, ArgumentParser

    module, config_cls, _, helptext = JOBS[name]
    parser = ArgumentParser(prog=f"anatomy {name}", description=helptext, parser_mode="omegaconf",
                            exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", "-c", action=ActionConfigFile, help="a YAML config (configs/ holds ready ones)")
    parser.add_class_arguments(getattr(importlib.import_module(module), config_cls), nested_key=None, fail_untyped=True)
    return parser


def job_config(name: str, argv: list[str]):
    """A job's config from command-line arguments: parsed, type-checked and spec-checked (no model
    loads); the DictConfig its run function takes."""
    import importlib

    from omegaconf import OmegaConf

    parser = job_parser(name)
    try:
        namespace = parser.parse_args(normalize_args(argv))
    except argparse.ArgumentError as err:
        line = unknown_key_line(str(err), option_keys(parser))
        if line is None:
            raise
        raise ConfigError(line) from err
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    cfg = OmegaConf.create(json.loads(json.dumps(values)))  # plain types: jsonargparse's PositiveInt is an int subclass
    try:  # specs and cross-option rules, before any model loads
        importlib.import_module(JOBS[name][0]).check_job(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    return cfg


def run_job(name: str, argv: list[str]) -> int:
    import importlib

    from lightning_anatomy.console import quiet_lightning

    cfg = job_config(name, argv)
    quiet_lightning()
    module, _, run, _ = JOBS[name]
    getattr(importlib.import_module(module), run)(cfg)
    return 0


# ------------------------------------------------------------------------------ entry point


def _usage() -> str:
    lines = ["usage: anatomy {fit,validate,audit,demo,check-prediction} [--config FILE] [--key.sub=value ...]",
             "", "  fit / validate     train (or validate) with DPOModule + concept callbacks (LightningCLI)"]
    lines += [f"  {k:<18} {v[3]}" for k, v in JOBS.items()]
    lines += ["", "`anatomy <command> --help` lists every key with its type and default; --print_config shows the "
              "resolved config.",
              "A mistake prints one line naming the flag to change (exit 2); ANATOMY_DEBUG=1 adds the traceback. "
              "anatomy --version prints the version."]
    return "\n".join(lines)


def version() -> str:
    """The installed package's version (the source tree's `__version__` when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lightning-anatomy")
    except PackageNotFoundError:
        from lightning_anatomy import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    """Run `anatomy <command>`; returns the exit status (2 for a user's mistake, printed as one line)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `anatomy fit --help | head`: the reader left; say nothing more
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        return 141


def _main(args: list[str]) -> int:
    import os

    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        print(f"anatomy {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command not in FIT_COMMANDS and command not in JOBS:
        print(f"anatomy: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if command in FIT_COMMANDS:
            return run_fit([command, *normalize_args(rest)])
        return run_job(command, rest)
    except SystemExit as done:  # --help and --print_config print, then exit
        return int(done.code or 0)
    except Exception as err:
        line = user_error_line(err, command)
        if line is None:
            raise
        if os.environ.get("ANATOMY_DEBUG", "").strip() not in ("", "0"):
            import traceback

            traceback.print_exc()
        print(f"anatomy {command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
