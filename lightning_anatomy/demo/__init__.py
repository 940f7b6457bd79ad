"""The demo: data with a planted spurious concept, and the embedded model's SAE training.

Names are imported lazily (`lightning_anatomy._lazy`); `sae_training` (which imports sae-lens'
trainer) is not exported here: import it explicitly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {name: "lightning_anatomy.demo.data" for name in (
    "DemoData", "chat_prompt", "completion_logprobs", "make_demo_data", "sycophancy_logprobs", "sycophancy_metrics")}

__all__ = ["DemoData", "chat_prompt", "completion_logprobs", "make_demo_data", "sycophancy_logprobs",
           "sycophancy_metrics"]  # literal so linters see the re-exports

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.demo.data import (
        DemoData,
        chat_prompt,
        completion_logprobs,
        make_demo_data,
        sycophancy_logprobs,
        sycophancy_metrics,
    )
