"""What the concept callbacks share: logging, concept names, and the strategy guard.

Scalars go to every Lightning logger (`logger.log_metrics` with an explicit step) so CSV,
TensorBoard and W&B all get them, and a callback's own schedule is not thinned out by the
Trainer's `log_every_n_steps`. Tables, histograms and scatter plots only exist in W&B: they go
through `WandbLogger.experiment` with `trainer/global_step` attached (the step metric Lightning's
WandbLogger declares), and are skipped silently with any other logger. Everything logs from
global rank zero only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from lightning_anatomy.sharding import is_sharded_strategy

ConceptRef = tuple[str, int]

# Strategies the concept callbacks are tested under. Under FSDP (FSDPStrategy, FSDP2 through
# ModelParallelStrategy) activations and their gradients at the hooks are whole; only weights are
# sharded, so a measuring forward runs on every rank (`measures_on_every_rank`). DeepSpeed ZeRO
# and tensor parallelism (which shards activations too) stay refused.
TESTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy)
# The callbacks tested under the FSDP strategies (2 CPU processes, tests/test_fsdp.py).
SHARDED_TESTED = ("ConceptProjection", "ConceptAttribution", "ConceptDriftMonitor", "ConceptSteering",
                  "ConceptBlocking")


# --------------------------------------------------------------------------- logging


def log_scalars(trainer: Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log scalars to every logger of `trainer` at `step` (rank zero only).

    They stay out of `trainer.callback_metrics`: a rank-zero-only value there would let a
    `ModelCheckpoint(monitor=...)` on another rank fail alone and hang a DDP run.
    """
    if not metrics or not trainer.is_global_zero:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def wandb_experiments(trainer: Trainer) -> list[Any]:
    """The W&B runs behind the trainer's WandbLoggers (empty off rank zero or without W&B)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_wandb(trainer: Trainer, build: Callable[[Any], Mapping[str, Any]], step: int) -> None:
    """Log W&B-only objects: `build(wandb)` returns `{key: wandb.Table | Histogram | chart}`.

    `build` runs only when a WandbLogger is present, so other setups never pay for the objects.
    """
    runs = wandb_experiments(trainer)
    if not runs:
        return
    import wandb

    payload = dict(build(wandb))
    if not payload:
        return
    payload["trainer/global_step"] = step
    for run in runs:
        run.log(payload)


def wandb_table(wandb: Any, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Any:
    return wandb.Table(columns=list(columns), data=[list(r) for r in rows])


# --------------------------------------------------------------------------- concept names


def concept_name(ref: ConceptRef) -> str:
    """`"<hook>:<feature>"`, the name a concept gets when the user did not name it."""
    return f"{ref[0]}:{ref[1]}"


def parse_concept(value: Any, widths: Mapping[str, int], where: str) -> ConceptRef:
    """One concept reference: `(hook, feature)`, `"hook:feature"`, or a bare feature id when
    there is a single hook. `where` names the option/entry in error messages."""
    hooks = list(widths)
    if isinstance(value, str) and ":" in value:
        hook, _, feat = value.rpartition(":")
        try:
            value = (hook, int(feat))
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not 'hook:feature' with an integer feature id") from None
    if isinstance(value, int) and not isinstance(value, bool):
        if len(hooks) != 1:
            raise ValueError(
                f"{where}: a bare feature id {value} is ambiguous with hooks {hooks}; write (hook, feature) "
                "or 'hook:feature'"
            )
        value = (hooks[0], value)
    if not (isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], str)):
        raise ValueError(f"{where}: {value!r} is not a concept; use (hook, feature), 'hook:feature' or a feature id")
    hook, feat = value[0], value[1]
    if hook not in widths:
        raise ValueError(f"{where}: hook {hook!r} has no SAE; SAEs are attached at {hooks}")
    if isinstance(feat, bool) or not isinstance(feat, int) or not 0 <= int(feat) < widths[hook]:
        raise ValueError(f"{where}: feature {feat!r} is out of range for hook {hook!r} (d_sae={widths[hook]})")
    return hook, int(feat)


def parse_track(track: Mapping[str, Any] | Sequence[Any] | None, widths: Mapping[str, int]
                ) -> dict[str, ConceptRef]:
    """`track` as `{metric name: (hook, feature)}`: a dict keeps its names, a list is named
    `hook:feature`."""
    if track is None:
        return {}
    if isinstance(track, Mapping):
        out = {}
        for name, ref in track.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"track: concept name {name!r} must be a non-empty string without '/'")
            out[name] = parse_concept(ref, widths, f"track[{name!r}]")
        return out
    if isinstance(track, str | bytes) or not isinstance(track, Sequence):
        raise ValueError(f"track must be a dict {{name: (hook, feature)}} or a list of concepts, got {track!r}")
    refs = [parse_concept(ref, widths, f"track[{i}]") for i, ref in enumerate(track)]
    return {concept_name(r): r for r in refs}


def parse_labels(labels: Mapping[Any, str] | None, widths: Mapping[str, int]) -> dict[ConceptRef, str]:
    """`labels` keyed by any concept reference `parse_concept` accepts."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels must be a dict {{(hook, feature): label}}, got {type(labels).__name__}")
    return {parse_concept(k, widths, f"labels[{k!r}]"): str(v) for k, v in labels.items()}


def load_saes(saes: Mapping[str, Any] | Any, owner: str) -> tuple[dict[str, Any], dict[str, int]]:
    """`({hook: SAE}, {hook: d_sae})` from a ConceptLens or `{hook: SAE | any SAE spec}`.

    Specs resolve through `concepts.sae.load_sae`, so a YAML config can name SAEs as strings;
    a `random:<d_sae>` spec stays a `RandomSAESpec` until `build_pending_saes` sees the model.
    """
    from lightning_anatomy.concepts.sae import RandomSAESpec, load_sae

    saes = getattr(saes, "saes", saes)
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError(f"{owner}: saes must be a non-empty dict {{hook_name: SAE or SAE spec}} or a ConceptLens")
    loaded, widths = {}, {}
    for hook, spec in saes.items():
        sae = spec if hasattr(spec, "W_dec") or not isinstance(spec, str | dict | RandomSAESpec) else load_sae(spec)
        if isinstance(sae, RandomSAESpec) and isinstance(hook, str):
            loaded[hook], widths[hook] = sae, sae.d_sae
            continue
        w_dec = getattr(sae, "W_dec", None)
        if not isinstance(hook, str) or not isinstance(w_dec, torch.Tensor) or w_dec.dim() != 2:
            raise ValueError(
                f"{owner}: saes[{hook!r}] is not a sae-lens SAE (needs encode() and a 2-d W_dec [d_sae, d_in])"
            )
        loaded[hook], widths[hook] = sae, int(w_dec.shape[0])
    return loaded, widths


def build_pending_saes(saes: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """`saes` with every `RandomSAESpec` built at the model's width at its hook (at setup)."""
    from lightning_anatomy.concepts.sae import RandomSAESpec
    from lightning_anatomy.model_access import hidden_size_at

    return {hook: sae.build(hidden_size_at(model, hook)) if isinstance(sae, RandomSAESpec) else sae
            for hook, sae in saes.items()}


# --------------------------------------------------------------------------- guards


def measures_on_every_rank(trainer: Trainer) -> bool:
    """True when a measuring forward (drift probe, ablation means) must run on every rank, not
    on rank zero alone: with sharded weights each forward is a collective."""
    return is_sharded_strategy(trainer.strategy)


def check_strategy(trainer: Trainer, owner: str, allow_untested: bool) -> None:
    """Refuse strategies the callback was not tested under, before any work starts.

    DeepSpeedStrategy subclasses DDPStrategy in Lightning, so it is refused by name on top of the
    type check: ZeRO shards the weights that hooks and concept bases assume are whole. FSDP is
    accepted for the callbacks in `SHARDED_TESTED`, without tensor parallelism.
    """
    if allow_untested:
        return
    strategy = trainer.strategy
    name = type(strategy).__name__
    deepspeed = any(cls.__name__ == "DeepSpeedStrategy" for cls in type(strategy).__mro__)
    sharded = isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
    if isinstance(strategy, TESTED_STRATEGIES) and not deepspeed and (not sharded or owner in SHARDED_TESTED):
        problem = _sharded_problem(trainer, owner) if sharded else None
        if problem is None:
            return
        raise ValueError(f"{owner} under {name}: {problem}")
    tested = "single-device, DDP and FSDP" if owner in SHARDED_TESTED else "single-device and DDP"
    raise ValueError(
        f"{owner} is tested with {tested} strategies only, not {name} (sharded weights: "
        f"{'DeepSpeed' if owner in SHARDED_TESTED else 'FSDP/DeepSpeed'}); use strategy='ddp', or pass "
        "allow_untested_strategy=True to run it anyway"
    )


def _sharded_problem(trainer: Trainer, owner: str) -> str | None:
    """What makes a tested callback unusable under this sharded strategy, or None."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        return ("tensor parallelism shards the activations the concept hooks read; use "
                "ModelParallelStrategy(tensor_parallel_size=1) (FSDP2 only)")
    return None


def check_resumed_widths(saved: Mapping[str, int], widths: Mapping[str, int], owner: str) -> None:
    """A checkpoint's per-hook SAE widths must match this callback's: state from other SAEs
    (totals, drift baselines) would be silently misread."""
    if dict(saved) != dict(widths):
        raise ValueError(
            f"{owner} checkpoint was saved with SAE widths {dict(saved)}, this callback has {dict(widths)}; "
            "resume with the same SAEs"
        )


def check_every(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
    return value
