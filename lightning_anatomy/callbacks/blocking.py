"""`ConceptBlocking`: keep selected concepts from growing beyond the reference model (BLOCK-EM).

BLOCK-EM (Ustaomeroglu & Qu 2026, arXiv 2602.00767) picks a few SAE latents that drive an
unwanted behaviour and adds a *one-sided* regulariser to the fine-tuning loss that stops them from
strengthening relative to the frozen base model; the rest of the model learns freely. Here, for
each blocked concept c with score s_c(h) at a token (an SAE feature: `sae.encode(h)[f]`; a
`ConceptSet` direction: h·v/‖v‖), the excess on token t of the batch is

    e_c(t) = s_c(h_policy(t)) − s_c(h_reference(t))      (same token, same batch)

and the term added to the training loss is

    penalty = λ_k · mean over t ∈ T, c ∈ C of relu(σ_c·e_c(t))²    (one_sided=True)
    penalty = λ_k · mean over t ∈ T, c ∈ C of e_c(t)²              (one_sided=False)

with σ_c = +1 for a `suppress` concept (only growth costs) and −1 for `amplify` (only a decrease
costs), T the selected tokens (completion tokens of the chosen and/or rejected half, or the
positions predicting them, `tokens="predicting"`) and
λ_k = λ·min(1, (k+1)/warmup_steps) at the k-th blocked optimizer step. The squared hinge is flat
(zero value, zero gradient) wherever the policy is at or on the allowed side of the reference, so
blocking never pushes a concept below where the reference model has it, only stops it growing.
Normalising by tokens × concepts is this package's choice, so λ is not on the paper's scale
(λ = 13×10³ there). Under data parallelism (DDP, FSDP) T is the selected tokens of every rank's
batch together: each rank's term is scaled by W·n_rank/n_all (W ranks, n tokens), so the averaged
gradient, the logged loss and the penalty equal those of one process on the whole batch, however
the tokens fall on the ranks. Gradient accumulation keeps one mean per micro-batch, like the loss.

The reference activation comes from the reference forward DPOModule already runs, captured by a
forward hook at the same hook point: on `pl_module.reference_forward_module()` for `reference="copy"`, on the
policy's own modules inside `reference_pass()` for `reference="peft"` (adapters off).
`reference="precomputed"` keeps only log-probs, so it is refused. Under FSDP the hooks sit on the
sharded blocks (activations are whole there) and a copy reference is sharded like the policy:
the captures are the same. The penalty reaches the loss through
`DPOModule.register_auxiliary_loss`: it sits in the same graph as the DPO loss, so AMP scaling,
gradient accumulation (each micro-batch's term is divided like its loss) and DDP/FSDP averaging
treat it like the loss.

The scores and the penalty (`BlockedHook`, `blocking_penalty`, `predicting_positions`) are in
`interventions/blocking_penalty.py`; this module is the callback: capture, checks, resume, logging.

Logged (every `trainer.log_every_n_steps` optimizer steps, rank 0, averaged over the step's
micro-batches and the DDP ranks): `concepts/blocking/<name>` — mean excess e_c over the selected
tokens (positive: the policy has more of the concept than the reference) — and
`concepts/blocking/penalty` — the term added to the loss (mean over micro-batches).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn

from lightning_anatomy.callbacks._hooked import HookedCallback
from lightning_anatomy.callbacks.blocked_concepts import plan_blocked_concepts
from lightning_anatomy.callbacks.concept_refs import ConceptRefSpec
from lightning_anatomy.callbacks.logging import log_scalars
from lightning_anatomy.callbacks.strategies import DATA_PARALLEL, SHARDED, check_strategy
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.interventions.blocking_penalty import (
    BlockedHook,
    blocking_penalty,
    predicting_positions,
)
from lightning_anatomy.interventions.steering import SIDES
from lightning_anatomy.model_access import (
    HookPoint,
    find_causal_lm,
    hidden_size_at,
    hook_input,
    hook_output,
    is_measurement_pass,
    is_reference_pass,
    resolve_hook,
)

if TYPE_CHECKING:
    from sae_lens import SAE

TOKENS = ("completion", "predicting", "all")
AUX_LOSS_PREFIX = "ConceptBlocking"


class ConceptBlocking(HookedCallback):
    """Penalise blocked concepts for moving beyond the reference model (BLOCK-EM; formula above).

    Args:
        concepts: a `ConceptSet` (or a saved one's directory): every `suppress` / `amplify`
            concept is blocked along its direction v/‖v‖, `allow` ones are ignored. Or SAE
            features with `saes`: `{name: (hook, feature)}` (also `"hook:feature"`, or
            `(hook, feature, "amplify")`; default action `suppress`), or a list of those
            (named `hook:feature`).
        lam: λ, the penalty weight (finite, > 0).
        one_sided: penalise only growth of `suppress` / shrinkage of `amplify` concepts (BLOCK-EM);
            False penalises any excess.
        saes: `{hook: SAE | directory | registry spec}` or a `ConceptLens`, for SAE-feature concepts.
        sides: `"both"`, `"chosen"` or `"rejected"` half of the `[chosen; rejected]` batch.
        tokens: `"completion"` (the batch's `completion_mask`), `"predicting"` (the positions whose
            next-token logits score the completion: the completion shifted one to the left, so the
            prompt's last token, which decides a completion's first token — an opener — is in
            and the last completion token is out) or `"all"` (every non-pad token).
        warmup_steps: grow λ linearly over this many optimizer steps (0: full λ from the start).
        allow_untested_strategy: run under strategies other than `supported_strategies`.

    Needs a LightningModule with `register_auxiliary_loss` (DPOModule) whose reference runs as a
    forward each training step (`reference="copy"` or `"peft"`). Captures happen only between a
    training batch's start and the module's request for the term: validation, measurement passes
    and gradient-checkpointing recomputations are never counted (one capture per hook, model role
    and micro-batch). SAE parameters are frozen (`requires_grad_(False)`) and moved to the
    module's device in fp32 at fit start.

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy and
    ModelParallelStrategy (FSDP2, without tensor parallelism); others are refused at setup.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = DATA_PARALLEL + SHARDED

    def __init__(
        self,
        # the mapping and list forms come first: LightningCLI tries the union in order, and `str`
        # would take a YAML dict as its text
        concepts: (Mapping[str, ConceptRefSpec | tuple[str, int, str]]
                   | Sequence[ConceptRefSpec | tuple[str, int, str]]
                   | ConceptSet | str | os.PathLike),
        lam: float = 1.0,
        one_sided: bool = True,
        saes: Mapping[str, SAE | str | Mapping[str, str]] | ConceptLens | None = None,
        sides: str = "both",
        tokens: str = "completion",
        warmup_steps: int = 0,
        allow_untested_strategy: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"ConceptBlocking: lam must be a finite number > 0, got {lam!r}")
        if not isinstance(one_sided, bool):
            raise ValueError(f"ConceptBlocking: one_sided must be True or False, got {one_sided!r}")
        if sides not in SIDES:
            raise ValueError(f"ConceptBlocking: sides={sides!r} is not one of {SIDES}")
        if tokens not in TOKENS:
            raise ValueError(f"ConceptBlocking: tokens={tokens!r} is not one of {TOKENS}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"ConceptBlocking: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.lam = float(lam)
        self.one_sided = one_sided
        self.sides = sides
        self.tokens = tokens
        self.warmup_steps = warmup_steps
        self.allow_untested_strategy = bool(allow_untested_strategy)
        self.plans: dict[str, BlockedHook] = plan_blocked_concepts(concepts, saes)
        self.names: list[str] = [n for plan in self.plans.values() for n in plan.names]

        # State that survives a resume (see state_dict).
        self.blocked_steps = 0
        # The last logged values ({metric key: value}), for inspection.
        self.last_logged: dict[str, float] = {}

        # Run-time only.
        self._mode: str | None = None
        self._points: dict[str, HookPoint] = {}
        self._reference_points: dict[str, HookPoint] = {}
        self._module: LightningModule | None = None
        self._armed = False
        self._select: Tensor | None = None
        self._seen: set[tuple[str, str]] = set()
        self._captures: dict[tuple[str, str], Tensor] = {}
        self._versions: dict[str, int] = {}
        self._scale: Tensor | float = 1.0  # rank_share of the current micro-batch
        self._reset_step()

    # ------------------------------------------------------------------ identity and resume
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._settings(), concepts=tuple(self.names))

    def _settings(self) -> dict[str, Any]:
        return {"lam": self.lam, "one_sided": self.one_sided, "sides": self.sides, "tokens": self.tokens,
                "warmup_steps": self.warmup_steps}

    @property
    def fingerprint(self) -> str:
        """A short hash of the blocked concepts: names, hooks, signs and directions / SAE decoder rows."""
        digest = hashlib.sha256()
        for hook, plan in self.plans.items():
            digest.update(f"{hook}|{plan.names}|{plan.signs}|{plan.features}".encode())
            rows = plan.vectors if plan.sae is None else [plan.sae.W_dec[f].detach().float().cpu()
                                                          for f in plan.features]
            for row in rows:
                digest.update(row.double().mul(1e4).round().to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "settings": self._settings(), "blocked_steps": self.blocked_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a run that blocked other concepts or with other settings."""
        if state_dict.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"ConceptBlocking: the checkpoint blocked other concepts (fingerprint {state_dict.get('fingerprint')!r}) "
                f"than this callback ({self.fingerprint!r}: {self.names}); resume with the same concepts and SAEs, "
                "or start a new run instead of resuming"
            )
        if state_dict.get("settings") != self._settings():
            raise ValueError(
                f"ConceptBlocking: the checkpoint used settings {state_dict.get('settings')} but this callback has "
                f"{self._settings()}; resume with the same settings"
            )
        self.blocked_steps = int(state_dict["blocked_steps"])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse a resume whose checkpoint holds ConceptBlocking state under another key.

        The key includes the settings and concept names, so Lightning would silently skip the
        saved state (restarting the warm-up) when either changed; `load_state_dict` catches
        the rest (same names, other directions or SAE). Lightning calls this hook with the whole
        checkpoint under every strategy (FSDP2 restores only after `on_fit_start`).
        """
        states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
        if not isinstance(states, Mapping) or self.state_key in states:
            return
        others = [k for k in states if isinstance(k, str) and k.startswith(type(self).__qualname__)]
        if others:
            raise ValueError(
                f"ConceptBlocking: the checkpoint holds blocking state for {others} but not for this callback "
                f"({self.state_key}): settings or concepts differ; resume with the same ConceptBlocking "
                "arguments, or start a new run instead of resuming"
            )

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self)
        if not callable(getattr(pl_module, "register_auxiliary_loss", None)) or not callable(
                getattr(pl_module, "remove_auxiliary_loss", None)):
            raise ValueError(
                f"ConceptBlocking adds its penalty to the training loss through "
                f"register_auxiliary_loss(name, term) / remove_auxiliary_loss(name), which {type(pl_module).__name__} "
                "does not have; train with lightning_anatomy.DPOModule, or give your LightningModule these two "
                "methods and add every registered term() to the loss once per training step, after the policy and "
                "reference forwards"
            )
        self._mode = _reference_mode(pl_module)
        policy = find_causal_lm(pl_module)
        self._points = {hook: self._resolve(policy, hook, "the policy") for hook in self.plans}
        if self._mode == "copy":
            reference = pl_module.reference_forward_module()
            self._reference_points = {hook: self._resolve(reference, hook, "the reference model")
                                      for hook in self.plans}
        for hook, plan in self.plans.items():
            width = hidden_size_at(policy, self._points[hook])
            expected = plan.width if plan.sae is None else int(plan.sae.W_dec.shape[1])
            if width != expected:
                what = "SAE d_in" if plan.sae is not None else "concept vectors have d"
                raise ValueError(
                    f"ConceptBlocking: at {hook!r} the {what}={expected} but the model's activation there has width "
                    f"{width}; the concepts were built for another model or hook"
                )

    @staticmethod
    def _resolve(model: nn.Module, hook: str, what: str) -> HookPoint:
        try:
            return resolve_hook(model, hook)
        except ValueError as err:
            raise ValueError(f"ConceptBlocking: concept hook {hook!r} does not fit {what}: {err}") from None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._points:  # fit without setup (a Trainer subclass skipping it)
            self.setup(trainer, pl_module, "fit")
        self.remove_hooks()
        directions = trainer.strategy.broadcast(
            {hook: plan.vectors for hook, plan in self.plans.items() if plan.sae is None}, src=0)
        for hook, vectors in directions.items():
            self.plans[hook].vectors = vectors
        for plan in self.plans.values():
            plan.on_device.clear()
            if plan.sae is not None:
                plan.sae.to(device=pl_module.device, dtype=torch.float32)
                plan.sae.requires_grad_(False)
        for hook, point in self._points.items():
            self._handles.append(_capture_hook(point, lambda h, hook=hook: self._on_activation(hook, h, False)))
        for hook, point in self._reference_points.items():
            self._handles.append(_capture_hook(point, lambda h, hook=hook: self._on_activation(hook, h, True)))
        pl_module.register_auxiliary_loss(self._loss_name, self.penalty)
        self._module = pl_module

    @property
    def _loss_name(self) -> str:
        return f"{AUX_LOSS_PREFIX}:{self.state_key}"

    def remove_hooks(self) -> None:
        """Drop the hooks, the auxiliary loss and whatever the current step had captured."""
        super().remove_hooks()
        if self._module is not None:
            self._module.remove_auxiliary_loss(self._loss_name)
            self._module = None
        self._disarm()
        self._reset_step()

    @property
    def hooked(self) -> list[str]:
        """Hook points currently hooked, policy's first (empty outside fit)."""
        if not self._handles:
            return []
        return list(self._points) + [f"reference:{h}" for h in self._reference_points]

    # ------------------------------------------------------------------ capture
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        mask = batch.get("completion_mask") if isinstance(batch, Mapping) else None
        if self.tokens == "all":
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] % 2:
            key = "attention_mask" if self.tokens == "all" else "completion_mask"
            raise ValueError(
                f"ConceptBlocking needs contract batches: a dict with {key} [2B, T] over [chosen; rejected] rows "
                "(see docs/ARCHITECTURE.md)"
            )
        select = predicting_positions(mask) if self.tokens == "predicting" else mask.bool().clone()
        half = select.shape[0] // 2
        if self.sides == "chosen":
            select[half:] = False
        elif self.sides == "rejected":
            select[:half] = False
        self._select = select
        self._scale = rank_share(trainer, select.sum())
        self._seen = set()
        self._captures = {}
        self._armed = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._armed:
            self._disarm()
            raise RuntimeError(
                f"ConceptBlocking: {type(pl_module).__name__} finished a training step without asking for the "
                "blocking penalty; its training_step must add every term registered with register_auxiliary_loss "
                "to the loss (DPOModule does)"
            )

    def _disarm(self) -> None:
        self._armed = False
        self._select = None
        self._scale = 1.0
        self._seen = set()
        self._captures = {}
        self._versions = {}

    def _role(self, on_reference_model: bool) -> str | None:
        """Which forward an activation belongs to: the policy's training forward, the reference's, or neither."""
        if not self._armed or is_measurement_pass():
            return None
        if on_reference_model:
            return "reference"
        if is_reference_pass():
            return "reference" if self._mode == "peft" else None
        return "policy" if torch.is_grad_enabled() else None

    def _on_activation(self, hook: str, hidden: Tensor, on_reference_model: bool) -> None:
        role = self._role(on_reference_model)
        if role is None or (hook, role) in self._seen:
            return  # not a training forward, or a checkpoint recomputation of one already captured
        self._seen.add((hook, role))
        select = self._select
        assert select is not None
        if tuple(hidden.shape[:2]) != tuple(select.shape):
            raise ValueError(
                f"ConceptBlocking: activations at hook {hook!r} have shape {tuple(hidden.shape)} but the batch's "
                f"mask is {tuple(select.shape)}; the model must run one forward over the whole [chosen; rejected] batch"
            )
        if role == "reference":
            with torch.no_grad():
                self._captures[(hook, role)] = self.plans[hook].scores(hidden.detach()[select.to(hidden.device)])
        else:
            # Kept as it is and scored in `penalty()`: ops with grad inside a checkpointed block
            # would save tensors that its recomputation (which captures nothing) does not reproduce.
            self._captures[(hook, role)] = hidden
            self._versions[hook] = hidden._version

    # ------------------------------------------------------------------ the penalty
    def warmup_factor(self) -> float:
        """λ's warm-up factor for the next blocked optimizer step."""
        return min(1.0, (self.blocked_steps + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def penalty(self) -> Tensor | None:
        """The auxiliary loss term for the current micro-batch (called by the module once, after both
        forwards); None outside a training step."""
        if not self._armed:
            return None
        captures = self._captures
        versions, select, scale = self._versions, self._select, self._scale
        self._disarm()  # from here on, recomputed forwards (checkpointing) capture nothing
        policy, reference = [], []
        for hook, plan in self.plans.items():
            hidden, ref = captures.get((hook, "policy")), captures.get((hook, "reference"))
            if hidden is None:
                raise RuntimeError(
                    f"ConceptBlocking saw no training forward (with grad) of the policy through hook {hook!r}; the "
                    "model found by find_causal_lm must run the step's forward through it. Reentrant gradient "
                    "checkpointing runs blocks without grad: use use_reentrant=False (DPOModule does) or hook a "
                    "block output"
                )
            if ref is None:
                raise RuntimeError(
                    f"ConceptBlocking saw no reference forward through hook {hook!r} in this training step; the "
                    "reference must run as a model forward each step (reference='copy' or 'peft', without "
                    "ref_*_logps in the batch)"
                )
            if hidden._version != versions[hook]:
                raise RuntimeError(
                    f"ConceptBlocking: the activation at hook {hook!r} was modified in place after the hook saw it; "
                    "hook a module whose output the model does not edit in place"
                )
            assert select is not None
            pol = plan.scores(hidden[select.to(hidden.device)])
            policy.append(pol)
            reference.append(ref.to(pol.device))
        excess = torch.cat(policy, dim=1) - torch.cat(reference, dim=1)
        signs = torch.tensor([s for plan in self.plans.values() for s in plan.signs], device=excess.device)
        value = (self.lam * self.warmup_factor()) * blocking_penalty(excess, signs, self.one_sided) * scale
        with torch.no_grad():
            summed = excess.detach().double().sum(0)
            self._excess_sum = summed if self._excess_sum is None else self._excess_sum + summed
            self._tokens += int(excess.shape[0])
            self._penalty_sum += float(value.detach())
            self._terms += 1
        return value

    def _reset_step(self) -> None:
        self._excess_sum: Tensor | None = None
        self._tokens = 0
        self._penalty_sum = 0.0
        self._terms = 0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._terms == 0:
            return
        step = trainer.global_step
        self.blocked_steps += 1
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        if step % every == 0:
            assert self._excess_sum is not None
            device = self._excess_sum.device
            extra = torch.tensor([self._tokens, self._penalty_sum, self._terms], dtype=torch.float64, device=device)
            flat = trainer.strategy.reduce(torch.cat([self._excess_sum, extra]), reduce_op="sum").double().cpu()
            tokens, penalty_sum, terms = flat[-3:].tolist()
            means = flat[:-3] / max(tokens, 1.0)
            metrics = {f"concepts/blocking/{name}": float(v) for name, v in zip(self.names, means)}
            metrics["concepts/blocking/penalty"] = penalty_sum / max(terms, 1.0)
            self.last_logged = metrics
            log_scalars(trainer, metrics, step=step)
        self._reset_step()


# --------------------------------------------------------------------------- helpers


def rank_share(trainer: Trainer, local_tokens: Tensor) -> Tensor | float:
    """W·n_rank/n_all, the factor that turns this rank's token mean into its share of the mean over
    every rank's tokens (DDP and FSDP average the W ranks' gradients). 1.0 on one process.

    An all-reduce: every rank calls it once per training micro-batch, before the forward.
    """
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world == 1:
        return 1.0
    local = local_tokens.detach().to(torch.float64).reshape(1)
    total = trainer.strategy.reduce(local.clone(), reduce_op="sum")
    return (world * local / total.clamp_min(1.0)).squeeze(0).float()


def _capture_hook(point: HookPoint, capture) -> Any:
    """A forward (pre-)hook at `point` that hands the activation to `capture` and changes nothing."""
    if point.kind == "input":
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            capture(hook_input(args, kwargs)[0])

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        capture(hook_output(output)[0])

    return point.module.register_forward_hook(hook)


def _reference_mode(pl_module: LightningModule) -> str:
    """`"copy"` (a separate reference model: `reference_forward_module()`) or `"peft"` (the policy's
    own modules, adapters off inside `reference_pass()`), read through the `PreferenceModule` surface
    (`lightning_anatomy.preference_module`); refuses a precomputed reference, which runs no forward
    to capture."""
    mode = getattr(pl_module, "reference_mode", None)
    if mode == "precomputed":
        raise ValueError(
            "ConceptBlocking compares the policy's activations with the reference model's on every training batch, "
            "but reference='precomputed' keeps only cached reference log-probs and runs no reference forward; "
            "use DPOModule(reference='copy') (a frozen copy of the initial policy) or reference='peft' "
            "(LoRA adapters, reference = adapters off)"
        )
    forward_module = getattr(pl_module, "reference_forward_module", None)
    if mode in ("copy", "peft") and callable(forward_module) and isinstance(forward_module(), nn.Module):
        return mode
    raise ValueError(
        f"ConceptBlocking cannot find the reference forward of {type(pl_module).__name__}: expected "
        "reference_mode 'copy' or 'peft' and reference_forward_module() returning the module the reference "
        "forward runs through (the PreferenceModule surface of lightning_anatomy.preference_module, as DPOModule "
        "has)"
    )

__all__ = ["ConceptBlocking", "blocking_penalty", "TOKENS"]
