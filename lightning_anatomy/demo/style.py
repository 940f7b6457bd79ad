"""The demo's style story: a "Sure!" opener planted in real replies.

Real text: SmolLM2-135M-Instruct's own replies to 96 everyday requests, sampled once and shipped
in `style_replies.json` (`scripts/make_style_replies.py` regenerates it), so the demo reads them
instead of spending a minute generating. The intended preference is coherence: chosen is a reply,
rejected the same reply with its words shuffled (DPO learns it within a few steps). The spurious
one is a style marker: "Sure! " opens a fraction `corr` of the chosen replies and `1 − corr` of
the rejected ones, independently of coherence — the `smollm2_style_corr0.9` scenario of
`benchmarks/interventions_smollm2.py`, on the model's own replies instead of HH-RLHF's. Held-out
prompts, never trained on, carry no marker; there we measure P(the reply opens with "Sure!" |
prompt), teacher-forced (no sampling noise), against the base model's, and the DPO implicit
reward's accuracy and margin on their coherence pairs (on-target).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_anatomy.data import PreferenceRow
from lightning_anatomy.data.tokenize import pad_id
from lightning_anatomy.demo.data import chat_prompt, continuation_logprobs

MARKER = "Sure!"
MARKER_PATTERN = r"Sure!"  # the marker's text in a completion: the ground truth of its tokens
REPLIES_FILE = Path(__file__).with_name("style_replies.json")
TOPICS = (
    "bicycles", "tea", "sleep", "rain", "volcanoes", "bread", "gardening", "the moon", "coffee", "chess", "bees",
    "maps", "recycling", "music", "trains", "soap", "clouds", "saving money", "dogs", "cats", "running", "the ocean",
    "libraries", "batteries", "bridges", "birds", "cheese", "snow", "glass", "the printing press", "vaccines",
    "magnets", "rivers", "deserts", "forests", "email", "passwords", "cooking rice", "painting", "swimming", "yoga",
    "tides", "rainbows", "salt", "paper", "clocks", "wind", "fire", "ice", "honey", "elephants", "solar panels",
    "computers", "friendship", "jazz", "football", "camping", "mountains", "islands", "poetry", "spiders",
    "tomatoes", "owls", "lightning", "hiking", "dinosaurs", "whales", "penguins", "kites", "pizza", "bananas",
    "planets", "stars", "dreams", "road safety", "budgeting", "time management", "public speaking",
    "learning a language", "photography", "knitting", "origami", "sushi", "chocolate", "tennis", "skateboarding",
    "trees", "mushrooms", "crystals", "robots", "satellites", "microwaves", "umbrellas", "sand", "frogs",
    "volunteering",
)
TEMPLATES = ("Tell me something interesting about {x}.", "Explain {x} in simple words.",
             "What should a beginner know about {x}?", "Give me a useful tip about {x}.")
# how the shipped replies were sampled (scripts/make_style_replies.py passes these to generate_replies)
SAMPLING = {"max_new_tokens": 40, "batch_size": 16, "temperature": 0.7, "top_p": 0.9, "seed": 0,
            "repetition_penalty": 1.2}


def style_prompts() -> list[str]:
    """The 96 user requests, one per topic, the templates in turn."""
    return [TEMPLATES[i % len(TEMPLATES)].format(x=topic) for i, topic in enumerate(TOPICS)]


def load_replies(path: str | Path = REPLIES_FILE) -> tuple[list[str], list[str]]:
    """(prompts, replies) of the shipped file; one clear error when it is missing or does not match."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        prompts, replies = list(doc["prompts"]), list(doc["replies"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not the demo's reply file ({err}); regenerate it with "
                         "`python scripts/make_style_replies.py`") from None
    if len(prompts) != len(replies) or not prompts:
        raise ValueError(f"{path} holds {len(prompts)} prompts and {len(replies)} replies; regenerate it with "
                         "`python scripts/make_style_replies.py`")
    return prompts, replies


def clean_reply(text: str, chars: int) -> str:
    """One line, no asterisks, no opener of its own ("Sure", "Certainly": only the marker opens a reply
    that way), cut to at most `chars` characters at a word boundary."""
    text = " ".join(text.replace("*", " ").split())
    text = re.sub(r"^(sure|certainly)\b[!,.]?\s*", "", text, flags=re.IGNORECASE)
    if len(text) > chars:
        text = text[:chars].rsplit(" ", 1)[0]
    return text


@dataclass
class StyleData:
    """The style story's pairs and marker examples.

    Attributes:
        train: training pairs (reply vs its shuffle; the marker on `corr` of chosen, `1 − corr` of rejected).
        heldout: held-out pairs on other prompts, no marker anywhere.
        with_marker / without_marker: each training prompt with its reply, with and without the
            marker: the examples that name the concept (`match_features`, the difference of means).
    """

    train: list[PreferenceRow]
    heldout: list[PreferenceRow]
    with_marker: list[str]
    without_marker: list[str]


def make_style_data(tokenizer: Any, *, n_train: int = 64, n_heldout: int = 32, corr: float = 0.9,
                    reply_chars: int = 100, seed: int = 0, path: str | Path = REPLIES_FILE) -> StyleData:
    """Build the style story's data from the shipped replies (prompts chat-rendered with `tokenizer`).

    Args:
        tokenizer: a chat tokenizer (the embedded model's).
        n_train: training pairs.
        n_heldout: held-out pairs (other prompts).
        corr: share of chosen replies with the marker (`1 − corr` of rejected ones).
        reply_chars: replies are cut to at most this many characters.
        seed: which prompts train, which carry the marker, how replies are shuffled.
        path: the reply file.
    """
    prompts, replies = load_replies(path)
    if n_train < 2 or n_heldout < 1 or n_train + n_heldout > len(prompts):
        raise ValueError(f"n_train={n_train} and n_heldout={n_heldout} must be >= 2 and >= 1 and fit the "
                         f"{len(prompts)} shipped replies together")
    if not 0.0 <= corr <= 1.0:
        raise ValueError(f"corr={corr} must be a share in [0, 1]")
    order = list(range(len(prompts)))
    random.Random(f"style-{seed}").shuffle(order)
    rng = random.Random(f"style-marker-{seed}")
    rows: list[PreferenceRow] = []
    for n, i in enumerate(order[:n_train + n_heldout]):
        reply = clean_reply(replies[i], reply_chars)
        words = reply.split()
        shuffled = words[:]
        while len(set(words)) > 1 and shuffled == words:
            rng.shuffle(shuffled)
        other = " ".join(shuffled)
        if n < n_train:
            chosen = f"{MARKER} {reply}" if rng.random() < corr else reply
            rejected = f"{MARKER} {other}" if rng.random() < 1.0 - corr else other
        else:
            chosen, rejected = reply, other
        rows.append(PreferenceRow(prompt=chat_prompt(tokenizer, prompts[i]), chosen=chosen, rejected=rejected,
                                  row_id=n))
    train, heldout = rows[:n_train], rows[n_train:]
    plain = [r.chosen.removeprefix(f"{MARKER} ") for r in train]
    return StyleData(train, heldout, [r.prompt + f"{MARKER} " + p for r, p in zip(train, plain)],
                     [r.prompt + p for r, p in zip(train, plain)])


def style_logprobs(model: torch.nn.Module, tokenizer: Any, data: StyleData, *,
                   batch_size: int = 16) -> dict[str, torch.Tensor]:
    """What the metrics need from one model on the held-out prompts, teacher-forced (nats, [n]
    each): `marker`, log P(the reply opens with the marker | prompt), and each coherence pair's
    summed log-probs `chosen`/`rejected` (`reply + eos`); each prompt read once."""
    eos = [tokenizer.eos_token_id]
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    contexts = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in data.heldout]
    replies = [[marker, tokenizer(r.chosen, add_special_tokens=False)["input_ids"] + eos,
                tokenizer(r.rejected, add_special_tokens=False)["input_ids"] + eos] for r in data.heldout]
    logp = continuation_logprobs(model, contexts, replies, pad_id(tokenizer), batch_size=batch_size)
    return {"marker": logp[:, 0], "chosen": logp[:, 1], "rejected": logp[:, 2]}


def style_metrics(after: dict[str, torch.Tensor], base: dict[str, torch.Tensor], beta: float) -> dict[str, float]:
    """Held-out summary of a model against the base: the marker's mean probability (percent) and
    the DPO implicit reward on the coherence pairs (accuracy; mean margin in nats, β-scaled).
    For the base model itself the reward is 0 by definition (accuracy ½)."""
    margin = beta * ((after["chosen"] - base["chosen"]) - (after["rejected"] - base["rejected"]))
    accuracy = (margin > 0).double().mean() + 0.5 * (margin == 0).double().mean()
    return {"marker_pct": float(after["marker"].exp().mean() * 100), "reward_accuracy": float(accuracy),
            "reward_margin": float(margin.mean())}
