"""A tiny learnable preference set for smoke runs (`source: toy` in configs).

Chosen replies call the topic good, rejected ones call it bad: a byte-level tiny model learns this
preference in a few dozen steps, so a fit on it shows `rewards/accuracies` rising.
"""

from __future__ import annotations

import random

TOPICS = ["the sea", "a cat", "music", "bread", "the sun", "rain", "a garden", "chess", "tea", "a river",
          "books", "snow", "a bicycle", "the moon", "coffee", "a forest"]


ASKS = ["Tell me about {}.", "What do you think of {}?", "Describe {}.", "Say something about {}.",
        "How is {}?", "Give me your view on {}.", "Talk about {}.", "Any thoughts on {}?"]


def make_toy_preferences(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """`n` pairs; the first 128 (every topic × question form) are distinct, so the toy set is not a
    set of duplicates (the reader warns about those)."""
    rng = random.Random(seed)
    combos = [(ask, topic) for ask in ASKS for topic in TOPICS]
    rng.shuffle(combos)
    rows = []
    for i in range(n):
        ask, topic = combos[i % len(combos)]
        rows.append({
            "prompt": ask.format(topic),
            "chosen": f" {topic.capitalize()} is good.",
            "rejected": f" {topic.capitalize()} is bad.",
        })
    return rows
