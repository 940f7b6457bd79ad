"""The math of concept blocking (BLOCK-EM, Ustaomeroglu & Qu 2026): concept scores, the
one-sided penalty on their excess over the reference model, and the "predicting" token positions.

`callbacks/blocking.py` (`ConceptBlocking`) captures the policy's and the reference's activations
during a training step and hands them here; nothing in this module needs a Trainer.
For each blocked concept c with score s_c(h) (an SAE feature: `sae.encode(h)[f]`; a direction:
h·v/‖v‖) the excess on token t is e_c(t) = s_c(h_policy(t)) − s_c(h_reference(t)), and the
penalty is the mean over tokens and concepts of relu(σ_c·e_c(t))² (one-sided) or e_c(t)²
(σ_c = +1 for `suppress`, −1 for `amplify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE


def blocking_penalty(excess: Tensor, signs: Tensor, one_sided: bool = True) -> Tensor:
    """mean over tokens and concepts of relu(σ·e)² (one-sided) or e² (two-sided), in fp32.

    `excess`: `[tokens, concepts]` policy − reference scores; `signs`: `[concepts]` (+1 suppress,
    −1 amplify). An empty token set gives 0 (still in the graph).
    """
    signed = excess.float() * signs.to(device=excess.device, dtype=torch.float32)
    hinge = signed.clamp_min(0.0) if one_sided else signed
    return hinge.square().sum() / max(hinge.numel(), 1)


def predicting_positions(completion_mask: Tensor) -> Tensor:
    """The positions whose next-token logits score a completion token: `completion_mask` shifted
    one to the left (position t is in when token t+1 is a completion token), as bool."""
    mask = completion_mask.bool()
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, 1:]
    return out


@dataclass
class BlockedHook:
    """The blocked concepts at one hook: how to score them and their signs.

    Either SAE features (`sae` and `features`) or unit directions (`vectors`, fp32 CPU).
    """

    hook: str
    names: list[str] = field(default_factory=list)
    signs: list[float] = field(default_factory=list)
    features: list[int] = field(default_factory=list)  # SAE concepts
    vectors: list[Tensor] = field(default_factory=list)  # direction concepts (unit, fp32 CPU)
    sae: SAE | None = None
    on_device: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.vectors[0].numel()) if self.vectors else -1

    def directions(self, device: torch.device) -> Tensor:
        key = ("v", device)
        if key not in self.on_device:
            self.on_device[key] = torch.stack(self.vectors, dim=1).to(device=device, dtype=torch.float32)
        return self.on_device[key]

    def feature_index(self, device: torch.device) -> Tensor:
        key = ("f", device)
        if key not in self.on_device:
            self.on_device[key] = torch.tensor(self.features, dtype=torch.long, device=device)
        return self.on_device[key]

    def scores(self, h: Tensor) -> Tensor:
        """`[tokens, k]` fp32 scores of the selected tokens' activations `h` `[tokens, d]`."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            if self.sae is not None:
                return self.sae.encode(x).float().index_select(-1, self.feature_index(x.device))
            return x @ self.directions(x.device)


__all__ = ["BlockedHook", "blocking_penalty", "predicting_positions"]
