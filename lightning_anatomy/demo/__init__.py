"""The demo: data with a planted spurious concept, and the embedded model's SAE training.

`sae_training` (which imports sae-lens' trainer) is not imported here; import it explicitly.
"""

from lightning_anatomy.demo.data import (
    DemoData,
    chat_prompt,
    completion_logprobs,
    make_demo_data,
    sycophancy_logprobs,
    sycophancy_metrics,
)

__all__ = ["DemoData", "chat_prompt", "completion_logprobs", "make_demo_data", "sycophancy_logprobs",
           "sycophancy_metrics"]
