"""A tiny learnable preference set for smoke runs (`source: toy` in configs).

Chosen replies call the topic good, rejected ones call it bad: a byte-level tiny model learns this
preference in a few dozen steps, so a fit on it shows `rewards/accuracies` rising.
"""

from __future__ import annotations

import random

TOPICS = ["the sea", "a cat", "music", "bread", "the sun", "rain", "a garden", "chess", "tea", "a river",
          "books", "snow", "a bicycle", "the moon", "coffee", "a forest"]


def make_toy_preferences(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({
            "prompt": f"Tell me about {topic}.",
            "chosen": f" {topic.capitalize()} is good.",
            "rejected": f" {topic.capitalize()} is bad.",
        })
    return rows
