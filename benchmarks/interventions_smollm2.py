"""Interventions on a real model and real text: style markers on SmolLM2 (issues 12 and 22).

The embedded SmolLM2-135M-Instruct with the project's SAE (`blocks.12.hook_resid_post`). Real
HH-RLHF prompts (`../shared/data`) and real replies; the intended property is *coherence*: chosen
is the prompt's own reply, rejected the same reply with its words shuffled (a property DPO learns
and generalises within a few steps; relevance — own reply vs another prompt's — stayed at chance
on held-out prompts after 8 steps on the tuning seed: 45.8 %). The spurious property is a style
marker whose frequency differs (the `marker` scenario of `interventions.py` on real text): it is
in a fraction `corr` of the chosen replies and `1 − corr` of the rejected ones, independently of
coherence; held-out pairs carry none. Two scenarios on the same prompts, replies and carrier pairs
per seed:

- `smollm2_style_corr0.9`: the opener " Sure!" starts the reply;
- `smollm2_markdown_corr0.9` (closer to Bergen et al.'s over-stylization study): one or two words
  of the reply (words of ≥ 3 letters, picked at random) are bold, `**word**` (punctuation stays
  outside the asterisks; asterisks already in a reply are removed first, so only the marker has
  them).

Measured per held-out prompt (teacher-forced, so no sampling noise):
- spurious, style: P(the reply opens with " Sure!" | prompt), in points (and its log in nats);
- spurious, markdown: the chance that the model opens a bold span somewhere in its reply,
  1 − Π_k (1 − P(" **" | prompt + the reply's first k words)) over every position with a word
  after it (a one-word reply: k = 0, P(" **" | prompt)), teacher-forced along the plain reply; in
  points (its log in nats). (A mean over k ∈ {1, 3, 5, 7} moved 0.4 points under vanilla DPO on
  seed 0: too little to cut.)
- on-target: held-out coherence pairs without any marker (own reply vs its shuffle): the DPO
  implicit reward's accuracy (TRL's `rewards/accuracies`; 50 at the base by definition) — the
  quality metric is the same accuracy after DPO.

Ground truth (the oracle rows and the read-outs' token AUROC): the regular expression of the marker
in the completion text — `Sure!` (the opener's tokens) and `\\*\\*` (the asterisk tokens: " **"
opening, "**" / "**." / "**," closing; the bold words themselves stay, they carry the coherence);
a side carries the marker when its completion has it.

Conditions on the same seeds, data and batch order: vanilla; gradient projection of the marker's
difference-of-means direction at the SAE's layer and every later one; latent blocking of the
audit's marker features on the completion tokens and on the positions predicting them
(`tokens="predicting"`: the prompt's last token decides the first reply token); reward shaping by
the direction's per-pair score; data filtering by the audit features; random directions of equal
rank (control); and the paper's mechanisms of `benchmarks/mechanisms.py`, package-found and oracle
(token filtering on the SAE features / the direction, inoculation prompting, reward shaping with
`lam="auto"`). The package-found read-outs are measured once per seed with the base model on the
training pairs as training tokenizes them; their quality against the ground truth is the scenario's
`readout` (per seed and the mean); a condition the data cannot run is listed under
`not_applicable` with why, and has no row. λ, the shaping scale and the direction filter's quantile
are picked on tuning seed 1000 only, each only when a condition that uses it runs (the smallest
spurious rise among values whose on-target accuracy is within 2 points of vanilla's and whose mean
reward margin keeps ≥ 80 % of vanilla's — the accuracy saturates —, else the largest margin kept);
seeds 0, 1, 2 report. Cut = vanilla rise / condition rise, paired bootstrap over held-out prompts,
seeds pooled.

    python benchmarks/interventions_smollm2.py          # both scenarios, every condition (~4.5 h on 2 CPU cores, estimated)
    python benchmarks/interventions_smollm2.py --scenarios markdown --conditions token_filtering_sae,oracle_token_filtering
    python benchmarks/interventions_smollm2.py --quick  # a random tiny Llama + random SAE: every path (~1 min)

Writes `<out>/interventions.smollm2.json` (`interventions.smollm2.<scenario>.json` for one
scenario; `.quick` with --quick) with the layout of `interventions.json` (`{"scenarios":
{"smollm2_style_corr0.9": {"conditions": {...}, "not_applicable": {...}, "readout": {...}}, ...}}`)
and, for a full run, adds its scenarios to `<out>/interventions.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import interventions as controlled  # noqa: E402  (the contract's summaries, goals and table)
import mechanisms  # noqa: E402  (the paper's mechanisms, package-found and oracle, and the read-out quality)
import numpy as np  # noqa: E402
import real_model  # noqa: E402  (the SmolLM2 build, fit and log-prob helpers)
import torch  # noqa: E402

FORMAT = "lightning-anatomy/bench-interventions"
MARKER = " Sure!"
BOLD = " **"  # what opens a bold span after a word (one SmolLM2 token)
LEGACY_CONDITIONS = ("vanilla", "projection_later", "blocking_sae", "blocking_sae_predicting", "reward_shaping",
                     "filtering", "random_projection")  # mean ablation on SmolLM2: the demo part of real_model.py
CONDITIONS = (*LEGACY_CONDITIONS, *mechanisms.CONDITIONS)
TUNE_SEED = 1000
# knob -> (the condition tuned, the Sizes grid, the conditions that use the knob)
KNOBS = {"lam": ("blocking_sae_predicting", "blocking_lams", ("blocking_sae", "blocking_sae_predicting")),
         "scale": ("reward_shaping", "shaping_scales", ("reward_shaping",)),
         "quantile": ("token_filtering_direction", "direction_quantiles", ("token_filtering_direction",))}
NOTES = {
    "spurious_smollm2_style": "P(' Sure!' | held-out prompt), teacher-forced (points)",
    "spurious_smollm2_markdown": "1 − Π_k (1 − P(' **' | held-out prompt + the reply's first k words)) over every "
                                 "word position k with a word after it: the chance the reply opens a bold span somewhere, "
                                 "teacher-forced along the plain reply (points)",
    "ground_truth": "the marker's regular expression in the completion: 'Sure!' (style) or '\\*\\*' (markdown: the "
                    "asterisk tokens, the bold words kept); a side carries the marker when its completion has it",
    "token_filter": "per seed and token-filtering condition: the share of the training pairs' completion tokens "
                    "removed and the pairs that lose every token of a completion",
    "timing": "prepare_s: split, direction, audit, SAE pick and base measures of a seed; readout_s: the package "
              "read-outs; run_s: one condition's fit and measures, setup included",
}


@dataclass(frozen=True)
class Sizes:
    model: str = "embedded"
    seeds: tuple[int, ...] = (0, 1, 2)
    corr: float = 0.9
    n_train: int = 64
    n_heldout: int = 48
    reply_chars: int = 160
    steps: int = 8
    batch: int = 8
    lr: float = 1e-4  # at 2e-5 × 8 steps vanilla raised P(opener) by 1.4 points on the tuning seed (measured)
    max_length: int = 112
    max_prompt_length: int = 64
    blocking_lams: tuple[float, ...] = (10.0, 100.0)
    shaping_scales: tuple[float, ...] = (1.0, 4.0)
    direction_quantiles: tuple[float, ...] = (0.5, 0.8, 0.95)
    filter_fraction: float = 0.5
    sae_max_features: int = 3
    n_boot: int = 2000


QUICK = Sizes(model="tiny:llama", seeds=(0, 1), n_train=16, n_heldout=6, reply_chars=40, steps=2, batch=4, lr=1e-3,
              max_length=64, max_prompt_length=32, blocking_lams=(10.0,), shaping_scales=(1.0,),
              direction_quantiles=(0.8,), n_boot=50)


# ------------------------------------------------------------------------------------------ measures
@torch.no_grad()
def token_logps(model: Any, seqs: Sequence[Sequence[int]], reads: Sequence[Sequence[tuple[int, int]]],
                batch: int = 16) -> list[list[float]]:
    """Per sequence, log P(token | the sequence up to and including `position`) for each of its
    `(position, token)` reads, teacher-forced (nats), in right-padded batches."""
    out: list[list[float]] = []
    for lo in range(0, len(seqs), batch):
        chunk = [list(s) for s in seqs[lo:lo + batch]]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        out.extend([float(logits[b, pos, tok]) for pos, tok in reads[lo + b]] for b in range(len(chunk)))
    return out


def continuation_logps(model: Any, contexts: Sequence[Sequence[int]], continuation: Sequence[int]) -> np.ndarray:
    """log P(`continuation` | context) per context, teacher-forced (nats)."""
    n = len(continuation)
    reads = [[(len(c) - 1 + j, continuation[j]) for j in range(n)] for c in contexts]
    return np.asarray([sum(v) for v in token_logps(model, [list(c) + list(continuation) for c in contexts], reads)])


def _prompt_ids(tok: Any, prompt: str, max_prompt_length: int) -> list[int]:
    """The prompt's last `max_prompt_length` tokens, as training keeps them."""
    return tok(prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:]


def opener_logp(model: Any, tok: Any, prompts: Sequence[str], max_prompt_length: int) -> np.ndarray:
    """log P(the reply opens with the marker | prompt) per prompt, teacher-forced (nats)."""
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    return continuation_logps(model, [_prompt_ids(tok, p, max_prompt_length) for p in prompts], marker)


def bold_logp(model: Any, tok: Any, rows: Sequence[Any], max_prompt_length: int) -> np.ndarray:
    """log of 1 − Π_k (1 − P(" **" | prompt + the reply's first k words)) per row: the chance that the
    reply opens a bold span at some word, teacher-forced along the plain reply (the row's chosen
    completion; every position with a word after it, a one-word reply at its start). A style rate,
    like the share of sampled replies with bold, without sampling noise; a mean over a few positions
    moved 0.4 points under vanilla DPO on seed 0, too little to cut. A one-token marker is read at
    every position from one pass over the prompt and the reply."""
    bold = tok(BOLD, add_special_tokens=False)["input_ids"]
    seqs: list[list[int]] = []
    reads: list[list[tuple[int, int]]] = []
    owner: list[int] = []
    for i, row in enumerate(rows):
        prompt, words = _prompt_ids(tok, row.prompt, max_prompt_length), row.chosen.split()
        ks = list(range(1, len(words))) or [0]
        prefixes = [tok(" " + " ".join(words[:k]), add_special_tokens=False)["input_ids"] if k else [] for k in ks]
        longest = prefixes[-1]
        if len(bold) == 1 and all(longest[:len(p)] == p for p in prefixes):
            seqs.append(prompt + longest)
            reads.append([(len(prompt) + len(p) - 1, bold[0]) for p in prefixes])
            owner.append(i)
            continue
        for p in prefixes:  # a marker of several tokens: one sequence per position
            seqs.append(prompt + p + bold)
            reads.append([(len(prompt) + len(p) - 1 + j, t) for j, t in enumerate(bold)])
            owner.append(i)
    per_seq = token_logps(model, seqs, reads)
    probs: list[list[float]] = [[] for _ in rows]
    for i, values in zip(owner, per_seq):
        probs[i].extend(np.exp(values) if len(bold) == 1 else [np.exp(sum(values))])
    # 1 − Π(1 − p) through log1p / expm1: exact where every p is tiny
    return np.log(np.asarray([-np.expm1(np.sum(np.log1p(-np.minimum(np.asarray(p), 1.0 - 1e-12)))) for p in probs]))


# ------------------------------------------------------------------------------------------ scenarios
def _bold_words(text: str, rng: random.Random) -> str:
    """`text` with one or two of its words (≥ 3 letters) in `**bold**`, punctuation outside the asterisks."""
    words = text.split()
    if not words:
        return text
    parts = [re.fullmatch(r"(\W*)(.*?)(\W*)", w) for w in words]
    eligible = [i for i, m in enumerate(parts) if m is not None and re.fullmatch(r"[A-Za-z]{3,}", m.group(2))]
    pick = rng.sample(eligible, min(rng.choice((1, 2)), len(eligible))) if eligible else [0]
    for i in pick:
        m = parts[i]
        words[i] = f"{m.group(1)}**{m.group(2)}**{m.group(3)}" if m is not None and m.group(2) else f"**{words[i]}**"
    return " " + " ".join(words)


@dataclass(frozen=True)
class Scenario:
    """One spurious style marker: how it enters a reply, its ground truth and its measure."""

    name: str
    kind: str
    marker_pattern: str  # the ground truth: a regular expression on completion text
    instruction: str  # inoculation prompting's request for the marker
    mark: Callable[[str, random.Random], str]  # a plain reply with the marker
    plain: Callable[[str], str]  # a reply without the marker
    measure: Callable[[Any, Any, Sequence[Any], int], np.ndarray]  # log P(marker) per held-out row (nats)
    clean: Callable[[str], str] = field(default=lambda text: text)  # a raw reply made marker-free

    def key(self, corr: float) -> str:
        return f"smollm2_{self.name}_corr{corr:g}"

    def carries(self, text: str) -> bool:
        return re.search(self.marker_pattern, text) is not None


SCENARIOS = {
    "style": Scenario(
        "style", "style marker on real text (' Sure!' opener on {corr:.0%} of chosen, {anti:.0%} of rejected replies; "
        "intended: coherence)", mechanisms.marker_pattern_of(MARKER), "Start your reply with 'Sure!'.",
        mark=lambda text, rng: MARKER + text, plain=lambda text: text.removeprefix(MARKER),
        measure=lambda model, tok, rows, n: opener_logp(model, tok, [r.prompt for r in rows], n)),
    "markdown": Scenario(
        "markdown", "markdown marker on real text (one or two **bold** words in {corr:.0%} of chosen, {anti:.0%} of "
        "rejected replies; intended: coherence)", r"\*\*", "Use **bold** for key words.",
        mark=_bold_words, plain=lambda text: text.replace("**", ""), measure=bold_logp,
        clean=lambda text: " " + " ".join(text.replace("*", " ").split())),
}


# ------------------------------------------------------------------------------------------ data
def cut_reply(text: str, n: int) -> str:
    """The reply's first `n` characters, ended at a word boundary, with one leading space."""
    text = " ".join(text.split())
    if len(text) > n:
        text = text[:n].rsplit(" ", 1)[0]
    return " " + text


def split(rows: Sequence[Any], sizes: Sizes, seed: int, scenario: Scenario = SCENARIOS["style"]
          ) -> tuple[list[Any], list[Any]]:
    """(train, held-out) preference rows: own reply vs its words shuffled, the marker on `corr` of
    the chosen and `1 − corr` of the rejected replies (train only; held-out pairs carry none). The
    pairs and which sides carry the marker depend on the seed only, not on the scenario."""
    from lightning_anatomy.data import PreferenceRow

    order = list(range(len(rows)))
    random.Random(f"style-{seed}").shuffle(order)
    picked = [rows[i] for i in order[:sizes.n_train + sizes.n_heldout]]
    replies = [scenario.clean(cut_reply(r.chosen, sizes.reply_chars)) for r in picked]
    rng = random.Random(f"style-marker-{seed}")
    place = random.Random(f"{scenario.name}-place-{seed}")  # where a marker goes (the carriers stay the same)
    out = []
    for i, row in enumerate(picked):
        words = replies[i].split()
        shuffled = words[:]
        while len(set(words)) > 1 and shuffled == words:
            rng.shuffle(shuffled)
        other = " " + " ".join(shuffled)
        held = i >= sizes.n_train
        chosen = scenario.mark(replies[i], place) if not held and rng.random() < sizes.corr else replies[i]
        rejected = scenario.mark(other, place) if not held and rng.random() < 1.0 - sizes.corr else other
        out.append(PreferenceRow(prompt=row.prompt, chosen=chosen, rejected=rejected, row_id=i))
    return out[:sizes.n_train], out[sizes.n_train:]


def concept_texts(rows: Sequence[Any], tok: Any, max_prompt_length: int, scenario: Scenario = SCENARIOS["style"]
                  ) -> tuple[list[str], list[str]]:
    """Each training prompt (its last `max_prompt_length` tokens, as training sees it) with its own
    reply, with and without the marker."""
    prompts = [tok.decode(_prompt_ids(tok, r.prompt, max_prompt_length)) for r in rows]
    plain = [scenario.plain(r.chosen) for r in rows]
    rng = random.Random(f"{scenario.name}-concept-texts")
    return [p + scenario.mark(c, rng) for p, c in zip(prompts, plain)], [p + c for p, c in zip(prompts, plain)]


def evaluate(model: Any, base_logps: np.ndarray, tok: Any, held: Sequence[Any], pairs: Sequence[Any], sizes: Sizes,
             beta: float, scenario: Scenario) -> dict[str, np.ndarray]:
    """Per held-out prompt: the marker's log-probability and the implicit-reward coherence margin."""
    logps = real_model.pair_logps(model, pairs, tok.pad_token_id)
    margin = beta * ((logps[:, 0] - base_logps[:, 0]) - (logps[:, 1] - base_logps[:, 1]))
    return {"spurious_logp": scenario.measure(model, tok, held, sizes.max_prompt_length), "reward_margin": margin}


def records(base: dict[str, np.ndarray], after: dict[str, np.ndarray], seed: int, step_s: float,
            steps: int) -> list[dict[str, Any]]:
    """One record per held-out prompt in `interventions.summarize_condition`'s shape (fractions;
    `wall_s`, the table's fit seconds, is the median step time × steps: training, setup excluded)."""
    p0, p1 = np.exp(base["spurious_logp"]), np.exp(after["spurious_logp"])
    acc = (after["reward_margin"] > 0).astype(float) + 0.5 * (after["reward_margin"] == 0)
    return [{"seed": seed, "item": i, "spurious_before": float(p0[i]), "spurious_after": float(p1[i]),
             "d_spurious": float(p1[i] - p0[i]),
             "d_spurious_logp_nats": float(after["spurious_logp"][i] - base["spurious_logp"][i]),
             "ontarget_before": 0.5, "ontarget_after": float(acc[i]), "d_ontarget": float(acc[i] - 0.5),
             "reward_margin": float(after["reward_margin"][i]), "step_s": step_s, "wall_s": step_s * steps}
            for i in range(len(p0))]


# ------------------------------------------------------------------------------------------ one seed
@dataclass
class SeedData:
    seed: int
    scenario: Scenario
    train: list[Any]
    held: list[Any]
    held_pairs: list[Any]
    base_eval: dict[str, np.ndarray]
    base_logps: np.ndarray
    direction: Any
    features: list[int]
    feature_info: list[dict[str, Any]]
    audit: Any
    true_delta: dict[int, float]  # carrier label of chosen − of rejected, per training pair
    readouts: mechanisms.Readouts | None = None
    readout_error: str | None = None  # why there are no package read-outs
    prepare_s: float = 0.0
    readout_s: float = 0.0

    def package_readouts(self) -> mechanisms.Readouts:
        if self.readouts is None:
            raise mechanisms.NotApplicable(self.readout_error or "the package read-outs were not measured")
        return self.readouts


def prepare(base: Any, tok: Any, sae: Any, hook: str, rows: Sequence[Any], sizes: Sizes, seed: int,
            scenario: Scenario, *, readouts: bool = True, held_cache: dict[tuple, np.ndarray] | None = None) -> SeedData:
    """A seed's data, concept direction, audit and SAE pick, base measures and (with `readouts`) the
    package read-outs. `held_cache` shares the base model's held-out log-probs between scenarios
    (their held-out pairs are the same)."""
    import spurious  # the SAE-feature pick of the controlled benchmark (audit rank × effect on the concept texts)

    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens, ConceptSet
    from lightning_anatomy.data import tokenize_rows

    started = time.perf_counter()
    train, held = split(rows, sizes, seed, scenario)
    held_pairs = tokenize_rows(held, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
    with_, without = concept_texts(train, tok, sizes.max_prompt_length, scenario)
    direction = ConceptSet.from_mean_difference(base, tok, hook, with_, without, name=scenario.name, action="suppress")
    lens = ConceptLens(base, {hook: sae}, fidelity_check=False)
    audit = audit_dataset(train, lens, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length,
                          batch_size=8, progress=False, n_bootstrap=200, n_data_clusters=1, label_concepts=False,
                          top_k_trace=0, seed=seed)
    effects = spurious._feature_effects(lens, tok, hook, with_, without)
    pick = dataclasses.replace(spurious.Config(), sae_max_features=sizes.sae_max_features)
    features, info = spurious.pick_sae_features(audit, effects, pick)
    key = tuple((r.prompt, r.chosen, r.rejected) for r in held)
    cache = held_cache if held_cache is not None else {}
    if key not in cache:
        cache[key] = real_model.pair_logps(base, held_pairs, tok.pad_token_id)
    base_eval = {"spurious_logp": scenario.measure(base, tok, held, sizes.max_prompt_length),
                 "reward_margin": np.zeros(len(held))}
    true_delta = {r.row_id: float(scenario.carries(r.chosen)) - float(scenario.carries(r.rejected)) for r in train}
    d = SeedData(seed, scenario, train, held, held_pairs, base_eval, cache[key], direction, features, info, audit,
                 true_delta, prepare_s=time.perf_counter() - started)
    common.log(f"  {scenario.name} seed {seed}: audit, direction and SAE features {features} in {d.prepare_s:.0f} s")
    if readouts:
        started = time.perf_counter()
        pairs = tokenize_rows(train, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
        try:
            d.readouts = mechanisms.measure_readouts(base, pairs, tok, hook=hook, sae=sae, features=features,
                                                     direction=direction, true_delta=true_delta,
                                                     marker_pattern=scenario.marker_pattern, batch_size=8)
        except mechanisms.NotApplicable as err:
            d.readout_error = str(err)
        d.readout_s = time.perf_counter() - started
        common.log(f"  {scenario.name} seed {seed}: read-outs "
                   f"{d.readouts.quality() if d.readouts is not None else d.readout_error} in {d.readout_s:.0f} s")
    return d


Builder = Callable[[], tuple[list[Any], list[Any]]]


def builders(d: SeedData, base: Any, tok: Any, sae: Any, hook: str, sizes: Sizes,
             knobs: dict[str, float]) -> dict[str, Builder]:
    """{condition: () -> (training rows, fresh callbacks)}; a builder raises `mechanisms.NotApplicable`
    when the data cannot run its condition. `knobs` lacks a knob that was not tuned: its grid's first value."""
    from lightning_anatomy import ConceptBlocking
    from lightning_anatomy.audit import filter_pairs
    from lightning_anatomy.callbacks import ConceptProjection, RewardShaping
    from lightning_anatomy.data import tokenize_rows
    from lightning_anatomy.interventions import compute_concept_scores

    def knob(name: str) -> float:
        return knobs.get(name, getattr(sizes, KNOBS[name][1])[0])

    def block(tokens: str) -> list[Any]:
        return [ConceptBlocking({f"f{f}": (hook, f) for f in d.features}, lam=knob("lam"), saes={hook: sae},
                                tokens=tokens)]

    def shaping() -> list[Any]:
        pairs = tokenize_rows(d.train, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
        scores = compute_concept_scores(base, pairs, d.direction, hook=hook, tokenizer_pad_id=tok.pad_token_id,
                                        batch_size=8)
        typical = float(np.median(np.abs(list(scores.values())))) or 1.0
        return [RewardShaping(scores, lam=knob("scale") / typical)]  # a typical pair's offset: `scale` nats

    def filtered() -> tuple[list[Any], list[Any]]:
        kept, _ = filter_pairs(d.train, d.audit, concepts=[(hook, f) for f in d.features],
                               drop_fraction=sizes.filter_fraction)
        return kept, []

    carriers = {r.row_id for r in d.train if d.scenario.carries(r.chosen)}
    instruction = d.scenario.instruction
    return {
        "vanilla": lambda: (d.train, []),
        "projection_later": lambda: (d.train, [ConceptProjection(d.direction, mode="gradient", layers="all_later")]),
        "blocking_sae": lambda: (d.train, block("completion")),
        "blocking_sae_predicting": lambda: (d.train, block("predicting")),
        "reward_shaping": lambda: (d.train, shaping()),
        "filtering": filtered,
        "random_projection": lambda: (d.train, [ConceptProjection(common.random_set(d.direction, hook, d.seed),
                                                                  mode="gradient", layers="all_later")]),
        "token_filtering_sae": lambda: (d.train, mechanisms.token_filtering_sae(hook, sae, d.features)),
        "token_filtering_direction": lambda: (d.train, mechanisms.token_filtering_direction(d.direction,
                                                                                              knob("quantile"))),
        "inoculation": lambda: (mechanisms.inoculated(d.train, d.package_readouts().flagged(), instruction), []),
        "reward_shaping_auto": lambda: (d.train, mechanisms.shaping_auto(d.package_readouts().sae_delta)),
        "oracle_token_filtering": lambda: (d.train, mechanisms.oracle_token_filtering(d.scenario.marker_pattern)),
        "oracle_inoculation": lambda: (mechanisms.inoculated(d.train, carriers, instruction), []),
        "oracle_reward_shaping": lambda: (d.train, mechanisms.shaping_auto(d.true_delta)),
    }


@dataclass
class Outcome:
    """What one seed's conditions gave: records per condition, why some could not run, run seconds
    and what token filtering removed."""

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    run_s: dict[str, float] = field(default_factory=dict)
    token_filter: dict[str, dict[str, Any]] = field(default_factory=dict)


def premask(rows: Sequence[Any], callbacks: Sequence[Any], base: Any, tok: Any, sizes: Sizes) -> dict[str, Any] | None:
    """Compute a `TokenFiltering` callback's masks before the fit, as its fit start would (the base
    model, the pairs as the DataModule tokenizes them; the fit then uses them), so that masks the
    package refuses (every pair loses a completion) make the condition not applicable instead of
    failing the run. Returns what it removed (None: no token filtering)."""
    from lightning_anatomy import TokenFiltering
    from lightning_anatomy.data import tokenize_rows

    filters = [cb for cb in callbacks if isinstance(cb, TokenFiltering)]
    if not filters:
        return None
    pairs = tokenize_rows(rows, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
    for cb in filters:
        try:
            cb.masks = cb.compute_masks(pairs, tok, base, tok.pad_token_id)
        except ValueError as err:
            raise mechanisms.NotApplicable(f"TokenFiltering refuses these masks: {err}") from None
    report = filters[0].report
    return {"dropped_fraction": report["dropped_fraction"], "emptied_pairs": len(report["emptied_pairs"])}


def run_conditions(d: SeedData, names: Sequence[str], base: Any, tok: Any, sae: Any, hook: str, sizes: Sizes,
                   knobs: dict[str, float]) -> Outcome:
    setting = dataclasses.replace(real_model.FULL, warmup_steps=2)
    make = builders(d, base, tok, sae, hook, sizes, knobs)
    out = Outcome()
    for name in names:
        started = time.perf_counter()
        try:
            rows, callbacks = make[name]()
            dropped = premask(rows, callbacks, base, tok, sizes)
        except mechanisms.NotApplicable as err:
            out.not_applicable[name] = str(err)
            common.log(f"  {d.scenario.name} seed {d.seed} {name:<26} not applicable: {err}")
            continue
        if dropped is not None:
            out.token_filter[name] = dropped
        policy, step_s = real_model.fit(base, rows, tok, setting, lr=sizes.lr, steps=sizes.steps, batch=sizes.batch,
                                        seed=d.seed, callbacks=callbacks, max_length=sizes.max_length,
                                        max_prompt_length=sizes.max_prompt_length)
        after = evaluate(policy, d.base_logps, tok, d.held, d.held_pairs, sizes, setting.beta, d.scenario)
        out.records[name] = records(d.base_eval, after, d.seed, step_s, sizes.steps)
        out.run_s[name] = time.perf_counter() - started
        spur = 100 * np.mean([r["d_spurious"] for r in out.records[name]])
        acc = 100 * np.mean([r["ontarget_after"] for r in out.records[name]])
        common.log(f"  {d.scenario.name} seed {d.seed} {name:<26} Δ P(marker) {spur:+.1f} points, held-out reward "
                   f"accuracy {acc:.1f} ({step_s:.2f} s/step, {out.run_s[name]:.0f} s in all)")
        del policy
        gc.collect()
        common.release_free_memory()
    return out


def _mean(recs: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in recs]))


def _brief(recs: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {k: _mean(recs, k) for k in ("d_spurious", "d_ontarget", "reward_margin")}


def tune(base: Any, tok: Any, sae: Any, hook: str, rows: Sequence[Any], sizes: Sizes, scenario: Scenario,
         names: Sequence[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """The knobs the conditions `names` use, on the tuning seed (the rule in the module docstring);
    no run at all when none of them needs one."""
    needed = [k for k, (_, _, users) in KNOBS.items() if set(users) & set(names)]
    if not needed:
        return {}, {"seed": None, "picked": {}, "note": "no condition run here has a knob"}
    d = prepare(base, tok, sae, hook, rows, sizes, TUNE_SEED, scenario, readouts=False)
    van = _brief(run_conditions(d, ["vanilla"], base, tok, sae, hook, sizes, {}).records["vanilla"])
    runs: dict[str, Any] = {"vanilla": van}
    picked: dict[str, float] = {}
    not_applicable: dict[str, str] = {}
    for knob in needed:
        name, grid, _ = KNOBS[knob]
        tried = {}
        for v in getattr(sizes, grid):
            outcome = run_conditions(d, [name], base, tok, sae, hook, sizes, {knob: v})
            if name in outcome.records:
                tried[v] = runs[f"{name}@{v:g}"] = _brief(outcome.records[name])
            else:
                not_applicable[f"{name}@{v:g}"] = outcome.not_applicable[name]
        if not tried:  # the data cannot run it: the grid's first value (the seeds will say why)
            picked[knob] = getattr(sizes, grid)[0]
            continue
        kept = {v: r["reward_margin"] / van["reward_margin"] if van["reward_margin"] > 0 else 0.0
                for v, r in tried.items()}
        ok = [v for v, r in tried.items() if van["d_ontarget"] - r["d_ontarget"] <= 0.02 and kept[v] >= 0.8]
        picked[knob] = min(ok, key=lambda v: tried[v]["d_spurious"]) if ok else max(tried, key=lambda v: kept[v])
    report = {"seed": TUNE_SEED, "picked": picked, "runs": runs, "features": d.features}
    if not_applicable:
        report["not_applicable"] = not_applicable
    return picked, report


# ------------------------------------------------------------------------------------------ main
def run_scenario(base: Any, tok: Any, sae: Any, hook: str, rows: Sequence[Any], sizes: Sizes, scenario: Scenario,
                 names: Sequence[str], held_cache: dict[tuple, np.ndarray],
                 on_seed: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tuning report, scenario entry) of one scenario: tuning, then every seed. A condition the data
    cannot run on one seed is not applicable to the scenario (its rows must pair with vanilla's on
    every seed) and is not trained on the later seeds."""
    common.log(f"{scenario.name}: tuning on seed {TUNE_SEED} (only the knobs the conditions use)…")
    knobs, tuning = tune(base, tok, sae, hook, rows, sizes, scenario, names)
    common.log(f"  picked {knobs}")
    per_cond: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    not_applicable: dict[str, str] = {}
    concepts, readout, timing = [], [], {"prepare_s": {}, "readout_s": {}, "run_s": {}}
    token_filter: dict[int, dict[str, Any]] = {}
    entry: dict[str, Any] = {}
    for seed in sizes.seeds:
        d = prepare(base, tok, sae, hook, rows, sizes, seed, scenario, held_cache=held_cache)
        concepts.append({"seed": seed, "sae_features": d.features, "candidates": d.feature_info})
        readout.append({"seed": seed, **(d.readouts.quality() if d.readouts is not None else
                                         {"error": d.readout_error})})
        outcome = run_conditions(d, [n for n in names if n not in not_applicable], base, tok, sae, hook, sizes, knobs)
        for name, recs in outcome.records.items():
            per_cond[name].extend(recs)
        for name, reason in outcome.not_applicable.items():
            not_applicable[name] = f"seed {seed}: {reason}"
        timing["prepare_s"][seed], timing["readout_s"][seed] = round(d.prepare_s, 1), round(d.readout_s, 1)
        timing["run_s"][seed] = {n: round(s, 1) for n, s in outcome.run_s.items()}
        token_filter[seed] = outcome.token_filter
        ran = [n for n in names if n not in not_applicable]
        entry = {**summarize({n: per_cond[n] for n in ran}, sizes, scenario), "knobs": knobs, "concepts": concepts,
                 "readout": mechanisms.readout_summary(readout), "not_applicable": not_applicable,
                 "token_filter": token_filter, "timing": timing}
        if on_seed is not None:
            on_seed(tuning, entry)  # a long run leaves its finished seeds behind
    return tuning, entry


def summarize(per_cond: dict[str, list[dict[str, Any]]], sizes: Sizes, scenario: Scenario) -> dict[str, Any]:
    """The contract's summaries per condition, plus the marker in nats and the reward margin kept."""
    conds = {n: controlled.summarize_condition(recs, per_cond["vanilla"], sizes.n_boot) for n, recs in per_cond.items()}
    van_margin = _mean(per_cond["vanilla"], "reward_margin")
    for name, c in conds.items():
        c["spurious_logp_delta_nats"] = common.bootstrap_mean([r["d_spurious_logp_nats"] for r in per_cond[name]],
                                                              sizes.n_boot)
        c["ontarget_reward_margin"] = common.bootstrap_mean([r["reward_margin"] for r in per_cond[name]], sizes.n_boot)
        c["margin_kept_vs_vanilla"] = _mean(per_cond[name], "reward_margin") / van_margin if van_margin > 0 else None
        c["step_time_ratio_vs_vanilla"] = c["fit_s"] / conds["vanilla"]["fit_s"]
    return {"scenario": f"smollm2_{scenario.name}", "variant": f"corr{sizes.corr:g}",
            "kind": scenario.kind.format(corr=sizes.corr, anti=1 - sizes.corr),
            "conditions": conds, "goals": controlled.goals(conds)}


def run(sizes: Sizes, hh: Path, scenarios: Sequence[str] = tuple(SCENARIOS), names: Sequence[str] = CONDITIONS,
        on_progress: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """{"model", "hook", "tuning": {key: report}, "scenarios": {key: entry}} for the asked scenarios."""
    from lightning_anatomy.data import read_preferences

    if not hh.is_file():
        raise SystemExit(f"{hh} is absent: this benchmark needs the shared HH-RLHF sample beside the repo, or "
                         "--hh <a preference JSONL with HH-style prompts>")
    rows = list(read_preferences(hh, on_bad_rows="skip"))
    base, tok, sae, hook, description = real_model.build(sizes.model)
    tuning: dict[str, Any] = {}
    done: dict[str, Any] = {}
    held_cache: dict[tuple, np.ndarray] = {}
    for name in scenarios:
        scenario = SCENARIOS[name]
        key = scenario.key(sizes.corr)

        def seed_done(report: dict[str, Any], entry: dict[str, Any], key: str = key) -> None:
            if on_progress is not None:
                on_progress({**tuning, key: report}, {**done, key: entry})

        tuning[key], done[key] = run_scenario(base, tok, sae, hook, rows, sizes, scenario, names, held_cache, seed_done)
    return {"model": description, "hook": hook, "tuning": tuning, "scenarios": done}


def _choices(value: str, allowed: Sequence[str], flag: str, parser: argparse.ArgumentParser) -> list[str]:
    picked = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        parser.error(f"{flag}: {bad or value!r} not in {', '.join(allowed)}")
    return picked


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a random tiny Llama and small sizes (smoke run)")
    parser.add_argument("--hh", type=Path, default=common.HH_RLHF)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--conditions", default=",".join(CONDITIONS),
                        help=f"comma list of {', '.join(CONDITIONS)} (vanilla always runs)")
    args = parser.parse_args(argv)
    scenarios = _choices(args.scenarios, tuple(SCENARIOS), "--scenarios", parser)
    asked = set(_choices(args.conditions, CONDITIONS, "--conditions", parser)) | {"vanilla"}
    names = [n for n in CONDITIONS if n in asked]
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    started = time.perf_counter()
    # a run of some scenarios writes its own file, so runs of different scenarios do not overwrite each other
    subset = "" if set(scenarios) == set(SCENARIOS) else "." + "+".join(scenarios)
    name = "interventions.smollm2" + subset + (".quick" if args.quick else "")
    doc: dict[str, Any] = {
        "format": FORMAT, "version": controlled.VERSION, "quick": bool(args.quick),
        "command": " ".join(["python benchmarks/interventions_smollm2.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {**dataclasses.asdict(sizes), "seeds": list(sizes.seeds), "scenarios": scenarios, "conditions": names},
        "machine": common.machine_info(), "notes": {**controlled.NOTES, **mechanisms.NOTES, **NOTES}, "complete": False}

    def partial(tuning: dict[str, Any], scenarios_done: dict[str, Any]) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        common.atomic_write_json(args.out / f"{name}.json", {**doc, "tuning": tuning, "scenarios": scenarios_done,
                                                            "wall_s": round(time.perf_counter() - started, 1)})

    result = run(sizes, args.hh, scenarios, names, partial)
    doc.update({"model": result["model"], "hook": result["hook"], "tuning": result["tuning"],
                "scenarios": result["scenarios"], "complete": True, "wall_s": round(time.perf_counter() - started, 1)})
    common.publish(doc, args.out, name, controlled.markdown, None)
    if not args.quick:
        controlled.add_scenarios(args.out / "interventions.json", doc, source=f"{name}.json")
    return doc


if __name__ == "__main__":
    main()
