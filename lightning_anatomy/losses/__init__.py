"""The preference-loss family as pure tensor functions on summed sequence log-probs.

All 15 loss types of TRL 1.16's `DPOTrainer`, its loss mixtures (`loss_type` a list with
`loss_weights`), f-divergences (`f_divergence_type`, `f_alpha_divergence_coef`), WPO weighting
(`use_weighting`) and LD-DPO (`ld_alpha`) agree numerically with TRL 1.16 (so numbers and
dashboards carry over), with one deliberate addition: `sigmoid` honours `label_smoothing` as
conservative DPO (cDPO), which TRL 1.16 silently ignores for `sigmoid`; at `label_smoothing=0`
the two are identical.

Notation (per pair): ``c = log π(y_w|x) − log π_ref(y_w|x)`` and ``r = log π(y_l|x) − log π_ref(y_l|x)``
are the chosen / rejected log-ratios; ``s_c = f'(c)``, ``s_r = f'(r)`` their f-divergence scores
(``s = c`` for the default reverse KL, i.e. plain DPO); ``Δ = s_c − s_r`` and ``z = β·Δ (+ margin_offset)``
the logits. Everything is computed in fp32 whatever the input dtype: the losses are small differences
of large sums, which bf16 cannot hold.

What needs more than summed log-probs is computed by the caller from per-token log-probs with the
helpers here, then passed in: LD-DPO's weighted sums (`ld_token_weights`: shared-length tokens
weight 1, the longer response's tail weight α), WPO's per-pair weights (`wpo_weights`), and the raw
chosen sum `sft` needs when the others are LD-weighted (`sft_chosen_logps`).

No loss type keeps state: TRL 1.16's `bco_pair` is the stateless −log σ(β·c) − log σ(−β·r) (the
running reward mean of older TRL releases is gone), so nothing here needs checkpointing.

The package: `preference` (`preference_loss`, `PreferenceLossOutput`), `functions` (the registry of
the 15 loss functions, `LOSS_TYPES`), `options` (`validate_loss_options`, TRL's refusals) and
`token_weights` (f-divergence scores, LD-DPO's and WPO's weights).
"""

from lightning_anatomy.losses.functions import LOSS_TYPES
from lightning_anatomy.losses.options import TRL_DISCOPOP_TAU, validate_loss_options
from lightning_anatomy.losses.preference import PreferenceLossOutput, preference_loss
from lightning_anatomy.losses.token_weights import (
    F_DIVERGENCE_TYPES,
    TRL_F_ALPHA_DIVERGENCE_COEF,
    f_divergence_scores,
    ld_token_weights,
    wpo_weights,
)

__all__ = [
    "F_DIVERGENCE_TYPES", "LOSS_TYPES", "TRL_DISCOPOP_TAU", "TRL_F_ALPHA_DIVERGENCE_COEF", "PreferenceLossOutput",
    "f_divergence_scores", "ld_token_weights", "preference_loss", "validate_loss_options", "wpo_weights",
]
