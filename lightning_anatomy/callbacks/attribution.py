"""`ConceptAttribution`: which SAE concepts each optimizer step pushes up or down.

Attribution patching with no second backward pass: a forward hook keeps the activation h at each
hook point (detached) and hangs a tensor hook on it that receives ∂L/∂h during the step's normal
backward. Per SAE feature f, over the completion tokens t of one half of the batch,

    attr_f = Σ_t a_f(t) · (∂L/∂h(t) · W_dec[f]),   a = sae.encode(h),

the first-order change of the loss when feature f's contribution to h is removed. The optimizer
descends, so it moves a_f along −∂L/∂a_f: the callback reports the *push* −attr_f, positive when
the step pushes the concept up, negative when it pushes it down.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from lightning_anatomy.callbacks._hooked import HookedCallback
from lightning_anatomy.callbacks.concept_refs import ConceptRef, ConceptRefSpec, parse_labels, parse_track
from lightning_anatomy.callbacks.logging import log_scalars, log_wandb, wandb_table
from lightning_anatomy.callbacks.options import check_every
from lightning_anatomy.callbacks.sae_specs import build_pending_saes, check_resumed_widths, load_saes
from lightning_anatomy.callbacks.strategies import DATA_PARALLEL, SHARDED, check_strategy
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.concepts.sae import check_width
from lightning_anatomy.model_access import (
    HookPoint,
    edits_suspended,
    find_causal_lm,
    hook_input,
    hook_output,
    resolve_hook,
)

if TYPE_CHECKING:
    from sae_lens import SAE

# Tokens encoded at once: bounds the two [tokens, d_sae] fp32 temporaries to 2 × 64 MiB.
_CHUNK_ELEMENTS = 1 << 24
TABLE_COLUMNS = ("direction", "rank", "hook", "feature", "label", "push", "push_chosen", "push_rejected",
                 "push_cumulative")


def feature_attribution(sae: Any, h: Tensor, grad: Tensor, completion_mask: Tensor) -> Tensor:
    """`attr[s, f] = Σ_t a_f(t)·(grad(t)·W_dec[f])` over the completion tokens of half s.

    `h`, `grad`: `[2B, T, d]` activations and ∂L/∂h of a `[chosen; rejected]` batch;
    `completion_mask`: `[2B, T]`. Returns `[2, d_sae]` fp32 (row 0 chosen, row 1 rejected).
    Only masked tokens are encoded, in chunks; the decoder product is one matmul in fp32.
    """
    n_pairs = h.shape[0] // 2
    w_dec_t = sae.W_dec.detach().float().T
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)
    half = (rows >= n_pairs).long()
    out = torch.zeros(2, w_dec_t.shape[1], dtype=torch.float32, device=h.device)
    chunk = max(1, _CHUNK_ELEMENTS // w_dec_t.shape[1])
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk):
            r, c = rows[start:start + chunk], cols[start:start + chunk]
            acts = sae.encode(h[r, c]).float()
            out.index_add_(0, half[start:start + chunk], acts * (grad[r, c].float() @ w_dec_t))
    return out


class ConceptAttribution(HookedCallback):
    """Attribute each attributed step's preference loss to SAE features, split chosen/rejected.

    Args:
        saes: `{hook_name: SAE}` (an `sae_lens.SAE`, a directory written by `sae.save_model`, or a
            registry spec; see `concepts.sae.load_sae`) or a `ConceptLens` (its SAEs are used).
        every_n_steps: attribute optimizer steps whose index is a multiple of this. All
            micro-batches of such a step are summed (the loss Lightning backpropagates is already
            divided by `accumulate_grad_batches`); under DDP the per-rank numbers are averaged,
            as DDP averages the gradients.
        top_k: rows per direction in the W&B table `concepts/attribution_top`.
        track: concepts with a scalar series: `{name: (hook, feature)}`, or a list of
            `(hook, feature)` / `"hook:feature"` (named `hook:feature`); a bare feature id works
            with a single hook.
        labels: `{(hook, feature) | "hook:feature": label}` shown in the table.
        log_table_every: log the table every this many optimizer steps (a multiple of
            `every_n_steps`; default `10 × every_n_steps`), ranked by the push summed over the
            attributed steps since the previous table.
        allow_untested_strategy: run under strategies other than `supported_strategies` anyway.

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy and
    ModelParallelStrategy (FSDP2, without tensor parallelism); others are refused at setup.

    Logged (at the step's index, like the module's `train/*` metrics), for each tracked concept:
    `concepts/attribution/<name>` (push over chosen + rejected completion tokens),
    `concepts/attribution/<name>/chosen`, `concepts/attribution/<name>/rejected`, where
    push = −attr (positive: the step pushes the concept up). Sums over tokens, not means.

    Nothing is captured during validation, reference and measurement passes (`edits_suspended()`), forward
    passes without grad, or a gradient-checkpointing recomputation of a forward already captured
    (one capture per hook per micro-batch). Hooks exist only from the first micro-batch of an
    attributed step until its optimizer step, and are removed on fit end and on exceptions.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = DATA_PARALLEL + SHARDED

    def __init__(
        self,
        saes: Mapping[str, SAE | str | Mapping[str, str]] | ConceptLens,
        every_n_steps: int = 1,
        top_k: int = 10,
        track: Mapping[str, ConceptRefSpec] | Sequence[ConceptRefSpec] | None = None,
        labels: Mapping[ConceptRefSpec, str] | None = None,
        log_table_every: int | None = None,
        allow_untested_strategy: bool = False,
    ) -> None:
        super().__init__()
        self.saes, self.widths = load_saes(saes, "ConceptAttribution")
        self.every_n_steps = check_every(every_n_steps, "every_n_steps")
        self.top_k = check_every(top_k, "top_k")
        self.log_table_every = check_every(
            10 * self.every_n_steps if log_table_every is None else log_table_every, "log_table_every"
        )
        if self.log_table_every % self.every_n_steps:
            raise ValueError(
                f"log_table_every={self.log_table_every} must be a multiple of every_n_steps={self.every_n_steps} "
                "(tables are logged on attributed steps)"
            )
        self.track: dict[str, ConceptRef] = parse_track(track, self.widths)
        self.labels: dict[ConceptRef, str] = parse_labels(labels, self.widths)
        self.allow_untested_strategy = bool(allow_untested_strategy)

        # State that survives a resume (see state_dict): push = −attr, rows (chosen, rejected).
        self.attributed_steps = 0
        self.last_step = -1
        self.total_push = {h: torch.zeros(2, w) for h, w in self.widths.items()}
        self.window_push = {h: torch.zeros(2, w) for h, w in self.widths.items()}
        self.last_push: dict[str, Tensor] = {}

        # Run-time only.
        self._points: dict[str, HookPoint] = {}
        self._armed_step: int | None = None
        self._mask: Tensor | None = None
        self._seen: set[str] = set()
        self._captures: dict[str, dict[str, Tensor | None]] = {}
        self._step_sum: dict[str, Tensor] = {}
        self._captured_any = False
        self._warned_no_grad: set[str] = set()

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            hooks=sorted(self.widths.items()), every_n_steps=self.every_n_steps, top_k=self.top_k,
            log_table_every=self.log_table_every, track=sorted(self.track.items()),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "widths": dict(self.widths),
            "attributed_steps": self.attributed_steps,
            "last_step": self.last_step,
            "total_push": {h: t.clone() for h, t in self.total_push.items()},
            "window_push": {h: t.clone() for h, t in self.window_push.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_widths(state_dict["widths"], self.widths, "ConceptAttribution")
        self.attributed_steps = int(state_dict["attributed_steps"])
        self.last_step = int(state_dict["last_step"])
        self.total_push = {h: t.detach().float().cpu().clone() for h, t in state_dict["total_push"].items()}
        self.window_push = {h: t.detach().float().cpu().clone() for h, t in state_dict["window_push"].items()}

    # ------------------------------------------------------------------ set-up and clean-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self)
        model = find_causal_lm(pl_module)
        self.saes = build_pending_saes(self.saes, model)
        self._points = {hook: resolve_hook(model, hook) for hook in self.widths}
        for hook, point in self._points.items():
            check_width(self.saes[hook], model, point)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for sae in self.saes.values():
            sae.to(pl_module.device)

    def remove_hooks(self) -> None:
        """Drop the hooks and whatever the current step had captured."""
        super().remove_hooks()
        self._armed_step = None
        self._mask = None
        self._captures = {}
        self._step_sum = {}
        self._seen = set()

    # ------------------------------------------------------------------ capture
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._armed_step is not None and self._armed_step != step:
            self.remove_hooks()  # a step that never reached the optimizer (skipped): drop it
        if step % self.every_n_steps:
            return
        mask = batch.get("completion_mask") if isinstance(batch, Mapping) else None
        if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] % 2:
            raise ValueError(
                "ConceptAttribution needs contract batches: a dict with completion_mask [2B, T] over "
                "[chosen; rejected] rows (see docs/ARCHITECTURE.md)"
            )
        if self._armed_step is None:
            self._armed_step = step
            self._step_sum = {h: torch.zeros(2, w, device=pl_module.device) for h, w in self.widths.items()}
            self._captured_any = False
            self._install()
        self._mask = mask.bool()
        self._seen = set()
        self._captures = {}

    def _install(self) -> None:
        for hook, point in self._points.items():
            if point.kind == "input":
                handle = point.module.register_forward_pre_hook(self._input_hook(hook), with_kwargs=True)
            else:
                handle = point.module.register_forward_hook(self._output_hook(hook))
            self._handles.append(handle)

    def _should_capture(self, hook: str) -> bool:
        return (self._armed_step is not None and hook not in self._seen and torch.is_grad_enabled()
                and not edits_suspended())

    def _output_hook(self, hook: str):
        def capture(module, args, output):
            if not self._should_capture(hook):
                return None
            hidden, rebuild = hook_output(output)
            new = self._capture(hook, hidden)
            return None if new is hidden else rebuild(new)

        return capture

    def _input_hook(self, hook: str):
        def capture(module, args, kwargs):
            if not self._should_capture(hook):
                return None
            hidden, rebuild = hook_input(args, kwargs)
            new = self._capture(hook, hidden)
            return None if new is hidden else rebuild(new)

        return capture

    def _capture(self, hook: str, hidden: Tensor) -> Tensor:
        """Keep h and hang a gradient catcher on it; returns the tensor the forward continues with.

        An activation that does not require grad (frozen layers below a PEFT adapter) is replaced
        by a detached copy that does, so ∂L/∂h still arrives; upstream nothing needed grad anyway.
        """
        self._seen.add(hook)
        assert self._mask is not None
        if tuple(hidden.shape[:2]) != tuple(self._mask.shape):
            raise ValueError(
                f"ConceptAttribution: activations at hook {hook!r} have shape {tuple(hidden.shape)} but the batch's "
                f"completion_mask is {tuple(self._mask.shape)}; the policy must run one forward over the whole "
                "[chosen; rejected] batch"
            )
        if not hidden.requires_grad:
            hidden = hidden.detach().requires_grad_(True)
        slot: dict[str, Tensor | None] = {"h": hidden.detach(), "g": None}
        self._captures[hook] = slot

        def catch(grad: Tensor) -> None:
            slot["g"] = grad.detach() if slot["g"] is None else slot["g"] + grad.detach()

        hidden.register_hook(catch)
        return hidden

    # ------------------------------------------------------------------ attribution
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._armed_step is None or not self._captures:
            return
        scale = _loss_scale(trainer)
        for hook, slot in self._captures.items():
            self._captured_any = True
            if slot["g"] is None:
                if hook not in self._warned_no_grad:
                    self._warned_no_grad.add(hook)
                    warnings.warn(f"ConceptAttribution: no gradient reached hook {hook!r}; its attribution is zero",
                                  stacklevel=2)
                continue
            attr = feature_attribution(self.saes[hook], slot["h"], slot["g"], self._mask)
            self._step_sum[hook] -= attr / scale
        self._captures = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._armed_step is None or not self._step_sum:
            return
        step, sums, captured = self._armed_step, self._step_sum, self._captured_any
        self.remove_hooks()
        hooks = list(self.widths)
        flag = torch.tensor([float(captured)], device=sums[hooks[0]].device)
        flat = torch.cat([sums[h].flatten() for h in hooks] + [flag])
        flat = trainer.strategy.reduce(flat, reduce_op="mean").float().cpu()
        if flat[-1] <= 0:
            raise RuntimeError(
                f"ConceptAttribution saw no training forward through hooks {hooks} during step {step}; the "
                "policy found by find_causal_lm must run the step's forward (with grad) through these modules"
            )
        if not torch.isfinite(flat).all():
            return  # an AMP overflow step: the optimizer skips it, so does the attribution
        parts = torch.split(flat[:-1], [2 * self.widths[h] for h in hooks])
        self.last_push = {h: p.view(2, -1).clone() for h, p in zip(hooks, parts)}
        for h in hooks:
            self.total_push[h] += self.last_push[h]
            self.window_push[h] += self.last_push[h]
        self.attributed_steps += 1
        self.last_step = step
        self._log(trainer, step)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: Trainer, step: int) -> None:
        scalars: dict[str, float] = {}
        for name, (hook, feat) in self.track.items():
            chosen, rejected = (float(v) for v in self.last_push[hook][:, feat])
            key = f"concepts/attribution/{name}"
            scalars.update({key: chosen + rejected, f"{key}/chosen": chosen, f"{key}/rejected": rejected})
        log_scalars(trainer, scalars, step)
        if step % self.log_table_every == 0:
            rows = self.top_rows()
            log_wandb(trainer, lambda wandb: {"concepts/attribution_top": wandb_table(wandb, TABLE_COLUMNS, rows)},
                      step)
            self.window_push = {h: torch.zeros_like(t) for h, t in self.window_push.items()}

    def top_rows(self) -> list[list[Any]]:
        """Top-k pushed-up and pushed-down concepts of the current window (rows of TABLE_COLUMNS)."""
        hooks = list(self.widths)
        window = torch.cat([self.window_push[h] for h in hooks], dim=1)  # [2, Σ d_sae]
        total = torch.cat([self.total_push[h] for h in hooks], dim=1).sum(0)
        push = window.sum(0)
        offsets = torch.tensor([0] + [self.widths[h] for h in hooks]).cumsum(0)
        rows: list[list[Any]] = []
        k = min(self.top_k, push.numel())
        for direction, values in (("up", push), ("down", -push)):
            top = torch.topk(values, k)
            for rank, (value, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                if value <= 0:
                    break
                which = int(torch.searchsorted(offsets, idx, right=True)) - 1
                hook, feat = hooks[which], idx - int(offsets[which])
                rows.append([direction, rank, hook, feat, self.labels.get((hook, feat), ""), float(push[idx]),
                             float(window[0, idx]), float(window[1, idx]), float(total[idx])])
        return rows


def _loss_scale(trainer: Trainer) -> float:
    """The AMP loss scale the captured gradients carry (1.0 without a GradScaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        return float(scaler.get_scale())
    return 1.0


__all__ = ["ConceptAttribution", "feature_attribution", "TABLE_COLUMNS"]
