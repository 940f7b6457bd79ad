"""The means behind mean ablation (`ConceptProjection(ablation="mean")`): the mean component
Qᵀh of the activations at each hooked point over the completion tokens of reference pairs.

Replacing a concept's component by this mean (h − QQᵀh + Qμ) instead of zero keeps the edit from
acting as a steering vector (Persona vectors, App. J.1). A measurement: it runs forwards in
`measurement_pass()`, needs no Trainer, and under sharded weights splits the pairs over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from lightning_anatomy.data.tokenize import collate_pairs
from lightning_anatomy.interventions.activation_edits import component_along
from lightning_anatomy.model_access import HookPoint, hook_input, hook_output, measurement_pass
from lightning_anatomy.sharding import rank_batches


class MeanTarget(Protocol):
    """What `reference_means` reads of a target: where to capture, and the basis Q `[d, k]`."""

    point: HookPoint
    suppress: Tensor | None


@torch.no_grad()
def reference_means(model: torch.nn.Module, targets: Mapping[str, MeanTarget], pairs: list, *, pad_token_id: int = 0,
                    batch_size: int = 8, rank: int = 0, world: int = 1,
                    all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Mean of Qᵀh over the completion tokens (chosen and rejected) of `pairs`, per target, fp32.

    Runs in eval mode inside `measurement_pass()`, so no callback's training-time edit acts on the
    measured activations; the model's train/eval mode is restored afterwards. With `world` > 1
    (sharded weights) this rank runs its share of the batches (`rank_batches`: every rank joins
    the same number of forwards) and `all_reduce` (a sum over ranks) joins the fp64 sums and
    counts, so every rank returns the same means.
    """
    sums = {name: torch.zeros(t.suppress.shape[1], dtype=torch.float64) for name, t in targets.items()}
    counts = dict.fromkeys(targets, 0)
    state: dict[str, Tensor] = {}
    handles = []
    for name, target in targets.items():
        def keep(hidden: Tensor, name: str = name) -> None:
            state[name] = hidden

        if target.point.kind == "input":
            handles.append(target.point.module.register_forward_pre_hook(
                lambda _m, args, kwargs, keep=keep: keep(hook_input(args, kwargs)[0]), with_kwargs=True))
        else:
            handles.append(target.point.module.register_forward_hook(
                lambda _m, _args, out, keep=keep: keep(hook_output(out)[0])))
    device = next(model.parameters()).device
    starts = list(range(0, len(pairs), batch_size))
    mine = rank_batches(len(starts), rank, world) if world > 1 else list(range(len(starts)))
    was_training = model.training
    model.eval()
    try:
        with measurement_pass():
            for index in mine:
                start = starts[0 if index is None else index]  # None: a dummy forward, dropped
                batch = collate_pairs(pairs[start:start + batch_size], pad_token_id)
                mask = batch["completion_mask"].bool().to(device)
                state.clear()
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
                if index is None:
                    continue
                for name, target in targets.items():
                    coords = component_along(state[name][mask], target.suppress)
                    sums[name] += coords.double().sum(0).cpu()
                    counts[name] += int(coords.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if world > 1:
        if all_reduce is None:
            raise ValueError(f"reference_means over {world} ranks needs all_reduce (a sum over the ranks)")
        sums, counts = _summed_over_ranks(sums, counts, all_reduce, device)
    if not all(counts.values()):
        raise ValueError("ConceptProjection: the mean-ablation pairs have no completion tokens to measure the mean on")
    return {name: (sums[name] / counts[name]).float() for name in targets}


def _summed_over_ranks(sums: dict[str, Tensor], counts: dict[str, int], all_reduce: Callable[[Tensor], Tensor],
                       device: torch.device) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Every rank's sums and counts added up, in one collective (fp64 on the model's device, which
    the process group's backend serves)."""
    names = list(sums)
    flat = torch.cat([sums[n] for n in names] + [torch.tensor([float(counts[n]) for n in names], dtype=torch.float64)])
    flat = all_reduce(flat.to(device)).double().cpu()
    out, offset = {}, 0
    for name in names:
        size = sums[name].numel()
        out[name], offset = flat[offset:offset + size], offset + size
    return out, {name: int(flat[offset + i]) for i, name in enumerate(names)}


__all__ = ["MeanTarget", "reference_means"]
