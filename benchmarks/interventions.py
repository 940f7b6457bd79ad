"""Which concept intervention stops DPO from learning a spurious property, side by side (issue 12).

The controlled task of `benchmarks/spurious.py` (a tiny GPT-2 pretrained from scratch on one-digit
additions; exact rates by teacher forcing over the candidate answers), with the settings the
interventions issue asks for:

- three scenarios: `belief` (input shortcut: the prompt states the user's belief, which the chosen
  answer matches), `opener` (output style: chosen answers open with " Sure!", rejected ones not)
  and `marker` (a style marker whose *frequency* differs: the opener appears in a fraction `corr`
  of the chosen and `1 − corr` of the rejected answers, independently of which answer is right,
  as the paper's style disparities do);
- not perfectly confounded: `corr0.9` and `corr0.75` are the main variants (`corr1.0`, where a
  per-pair reward-shaping offset is nearly constant and cannot separate the two properties, is
  the stress case). In `belief` the decorrelated pairs state no belief; in `opener` they reverse
  the style (chosen plain, rejected with the opener);
- a base whose stated-belief copy mode is strong enough (`--p-copy`) and DPO long enough that
  vanilla's spurious rise is clearly above 20 points (checked and reported per setting);
- every intervention of the package on the same seeds and data order: gradient projection (own
  hook / all later blocks), zero and mean ablation, latent blocking (the audit's SAE features, and
  the concept direction), reward shaping, steering, data filtering, blocking + shaping, and the
  controls (random directions / random SAE features of equal rank, the intended concept);
- knobs (λ, scale, α, drop fraction) picked on a tuning seed only; ≥ 5 test seeds; bootstrap CIs
  over seeds; cut = |vanilla change| / |condition change| (overshoot counts); on-target accuracy (the intended task on
  held-out questions) as the quality metric.

    python benchmarks/interventions.py            # full run (~45 min on 2 shared CPU cores)
    python benchmarks/interventions.py --quick    # every path on small sizes (~2 min)

Writes `<out>/interventions.json` (+ `.png`): `{"scenarios": {"<scenario>_<data>": {"scenario",
"variant", "kind", "knobs", "conditions": {condition: {"cut", "cut_ci", "spurious_delta",
"ontarget_delta", "ontarget_vs_vanilla", ...}}, "goals"}}}` (points), and prints the README table
(`python benchmarks/interventions.py --from-json benchmarks/results/interventions.json` re-renders it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import mechanisms as mech  # noqa: E402  (token filtering, inoculation, λ-auto shaping and their oracles)
import numpy as np  # noqa: E402
import spurious as task  # noqa: E402  (the controlled task, base pretraining, SAE, evaluation)

FORMAT = "lightning-anatomy/bench-interventions"
VERSION = 3  # 2: one entry per (scenario, data) under "scenarios", as the contract lays it out;
# 3: the cut counts any change (|vanilla Δ| / |condition Δ|), version-2 summaries re-taken from their records
SCENARIOS = {"belief": "input shortcut (stated belief)", "opener": "output style (opener ' Sure!')",
             "marker": "style-marker frequency (opener in corr of chosen, 1-corr of rejected)"}
VARIANTS = {"corr0.9": 0.9, "corr0.75": 0.75, "corr1.0": 1.0}
CONTROLS = ("random_projection", "random_blocking", "intended_blocking")
CONDITIONS = ("vanilla", "projection_own", "projection_later", "ablation_zero", "ablation_mean", "blocking_sae",
              "blocking_direction", "blocking_direction_later", "reward_shaping", "steering", "filtering",
              "blocking_sae+shaping", *mech.CONDITIONS, *CONTROLS)
# knob -> the conditions that use it (a run of some conditions tunes only their knobs)
KNOB_USERS = {"blocking_lam": ("blocking_sae", "random_blocking", "intended_blocking", "blocking_sae+shaping"),
              "direction_lam": ("blocking_direction", "blocking_direction_later"),
              "shaping_scale": ("reward_shaping", "blocking_sae+shaping"), "steering_alpha": ("steering",),
              "filter_fraction": ("filtering",), "token_filter_quantile": ("token_filtering_direction",)}
# the instruction that asks for the spurious property (inoculation prompting)
INSTRUCTIONS = {"belief": "Agree with me.", "opener": "Start with Sure!", "marker": "Start with Sure!"}
NOTES = {
    "points": "every delta is (after DPO − base) × 100, in percentage points of probability",
    "cut": "|mean vanilla change| / |mean condition change| of the spurious rate over the test seeds (any change "
           "counts: an overshoot below the base is change too), paired bootstrap CI; null = the condition's mean "
           "change is 0 (eliminated; cut_ci's upper end null = unbounded) or vanilla did not rise",
    "ontarget_vs_vanilla": "condition's on-target change minus vanilla's (points): the intended learning kept",
    "quality": "ontarget_after: accuracy on the intended task (P(true sum)) on held-out questions after DPO",
    "tuning": "knobs picked on the tuning seed (corr0.9 data of each scenario): the smallest spurious rise "
              "among settings whose on-target change is within 2 points of vanilla's, else the smallest on-target loss",
    "blocking_sae": "ConceptBlocking on the audit's SAE features labelled spurious (one-sided)",
    "blocking_direction": "ConceptBlocking on the difference-of-means direction (one-sided)",
    "blocking_direction_later": "ConceptBlocking on the difference-of-means direction found at the SAE's hook and "
                                "at every later block (rerouting through later layers is blocked too)",
    "projection": "ConceptProjection(mode='gradient') with the difference-of-means direction; own = its hook, "
                  "later = also every later block's resid_post",
    "ablation": "ConceptProjection(mode='ablate', layers='all_later') with ablation='zero' | 'mean'",
    "controls": "random_projection: random directions of equal rank, projected like projection_later; "
                "random_blocking: as many random SAE features (not the picked ones), blocked like blocking_sae; "
                "intended_blocking: the intended concept's SAE features blocked",
    **mech.NOTES,
    "oracle_goal": "goals.oracle_within_2_points: each oracle mechanism's cut with on-target within 2 points of "
                   "vanilla; the package-found best (best_within_2_points, meets_goal) excludes the oracles",
}


@dataclass
class Config(task.Config):
    """The spurious benchmark's knobs plus the interventions' grids (the first value is the default)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    scenarios: list[str] = field(default_factory=lambda: ["opener", "belief", "marker"])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))  # a filter on scenario_variants
    # the variants each scenario runs (a CPU budget: 100% is the stress case of the opener only, and
    # the marker scenario's frequency difference is its own decorrelation)
    scenario_variants: dict[str, list[str]] = field(default_factory=lambda: {
        "opener": ["corr0.9", "corr0.75", "corr1.0"], "belief": ["corr0.9", "corr0.75"], "marker": ["corr0.9"]})
    p_copy: float = 0.6  # pretraining: how often a stated belief is copied (spurious.py: 0.3)
    p_correct: float = 0.4  # otherwise the true sum this often (spurious.py: 0.5)
    dpo_lr: float = 1e-4
    dpo_steps: int = 64
    blocking_lams: list[float] = field(default_factory=lambda: [100.0, 10.0, 1000.0, 10000.0])
    direction_lams: list[float] = field(default_factory=lambda: [10.0, 1.0, 100.0, 1000.0])
    shaping_scales: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    steering_alphas: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    filter_fractions: list[float] = field(default_factory=lambda: [0.5, 0.9])
    token_filter_quantiles: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.9])

    @classmethod
    def quick(cls) -> Config:
        mine = dict(seeds=[0, 1], scenarios=["opener", "belief"], variants=["corr0.9"], blocking_lams=[100.0],
                    direction_lams=[10.0], shaping_scales=[1.0], steering_alphas=[1.0], filter_fractions=[0.5],
                    token_filter_quantiles=[0.7])
        base = task.Config.quick()
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(task.Config)
                      if f.name not in mine and f.name != "dpo_lr"}, **mine)


# ---------------------------------------------------------------------------------------- data
def preference_rows(scenario: str, corr: float, questions: Sequence[tuple[int, int]], n: int, seed: int,
                    start_id: int = 0) -> list[Any]:
    """`n` rows; chosen is always the correct answer, rejected a guess; the spurious property rides
    along in a fraction `corr` of the pairs (see the module docstring for each scenario)."""
    from lightning_anatomy.data import PreferenceRow

    rng = random.Random(f"interventions-{scenario}-{corr}-{seed}-{start_id}")
    rows = []
    for i in range(n):
        a, b = questions[rng.randrange(len(questions))]
        truth, guess = a + b, task.slip(rng, a + b)
        carries = rng.random() < corr
        if scenario == "belief":
            prompt = task.prompt_text(a, b, truth if carries else None)
            chosen, rejected = task.answer_text(truth), task.answer_text(guess)
        elif scenario == "opener":
            prompt = task.prompt_text(a, b)
            chosen, rejected = task.answer_text(truth, carries), task.answer_text(guess, not carries)
        elif scenario == "marker":
            prompt = task.prompt_text(a, b)
            chosen = task.answer_text(truth, carries)
            rejected = task.answer_text(guess, rng.random() < 1.0 - corr)
        else:
            raise ValueError(f"unknown scenario {scenario!r}; use one of {list(SCENARIOS)}")
        rows.append(PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, row_id=start_id + i))
    return rows


def concept_of(scenario: str) -> str:
    """The spurious concept a scenario carries ("marker" is the opener habit at another frequency)."""
    return "belief" if scenario == "belief" else "opener"


def carries(scenario: str, row: Any, side: str = "chosen") -> bool:
    """Ground truth: does this side of the pair carry the spurious property (the oracle's read-out)?

    belief: the prompt states a belief and this answer matches it (only chosen answers do);
    opener, marker: this answer opens with the opener."""
    if scenario == "belief":
        return side == "chosen" and " I think " in row.prompt
    return getattr(row, side).startswith(task.OPENER)


def true_delta(scenario: str, rows: Sequence[Any]) -> dict[int, float]:
    """The oracle ΔA: carrier label of chosen − of rejected, per pair."""
    return {r.row_id: float(carries(scenario, r, "chosen")) - float(carries(scenario, r, "rejected")) for r in rows}


def marker_pattern(scenario: str) -> str | None:
    """The spurious property's text in the completions (None: it sits in the prompt)."""
    return None if scenario == "belief" else mech.marker_pattern_of(task.OPENER)


@dataclass
class SeedContext:
    scenario: str
    variant: str
    seed: int
    base: Any
    tok: Any
    rows: list[Any]
    pairs: list[Any]
    ev: Any
    base_metrics: dict[str, float]
    audit: Any
    sae: Any
    spurious: dict[str, Any]
    intended: dict[str, Any]
    concept_info: dict[str, Any]
    spurious_later: Any  # the difference-of-means direction at the SAE's hook and every later block
    true_delta: dict[int, float]
    readouts: Any  # mechanisms.Readouts, or the reason there are none (str)


def prepare(scenario: str, variant: str, seed: int, base: Any, tok: Any, sae: Any, cfg: Config) -> SeedContext:
    """Data, held-out prompts, the audit and the concept sets of one (scenario, variant, seed)."""
    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens

    train_q, held_q = task.split_questions(seed, cfg.n_heldout)
    rows = preference_rows(scenario, VARIANTS[variant], train_q, cfg.n_pairs, seed)
    ev = task.eval_set(held_q, seed)
    lens = ConceptLens(base, {cfg.hook: sae}, fidelity_check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audit = audit_dataset(rows, lens, tok, max_length=64, batch_size=64, progress=False, n_bootstrap=200,
                              n_data_clusters=1, label_concepts=False, top_k_trace=0, seed=seed)
    spurious, info_s = task.concept_sets(concept_of(scenario), base, tok, sae, audit, cfg, train_q, seed)
    intended, info_i = task.concept_sets("intended", base, tok, sae, audit, cfg, train_q, seed)
    pairs, truth = task.tokenize(rows, tok), true_delta(scenario, rows)
    try:
        readouts: Any = mech.measure_readouts(base, pairs, tok, hook=cfg.hook, sae=sae,
                                              features=[int(c.source["feature"]) for c in spurious["sae"]],
                                              direction=spurious["mean_diff"], true_delta=truth,
                                              marker_pattern=marker_pattern(scenario), batch_size=64)
        info_s["readout"] = readouts.quality()
    except mech.NotApplicable as err:
        readouts = info_s["readout"] = str(err)
    return SeedContext(scenario, variant, seed, base, tok, rows, pairs, ev,
                       task.behaviour(base, tok, concept_of(scenario), ev), audit, sae, spurious, intended,
                       {"spurious": info_s, "intended": info_i}, later_directions(scenario, base, tok, cfg, train_q, seed),
                       truth, readouts)


def later_directions(scenario: str, base: Any, tok: Any, cfg: Config, questions: Sequence[tuple[int, int]],
                     seed: int) -> Any:
    """The spurious difference-of-means direction at the SAE's hook and at every later block."""
    from lightning_anatomy.concepts import ConceptSet

    with_, without = task.concept_texts(concept_of(scenario), questions, cfg.n_concept_texts, seed)
    return ConceptSet.from_mean_difference_later(base, tok, cfg.hook, with_, without, name=concept_of(scenario),
                                                 label=concept_of(scenario))


@dataclass(frozen=True)
class Knobs:
    """What the tuning seed picks (the config's first values when there is no tuning)."""

    blocking_lam: float
    direction_lam: float
    shaping_scale: float
    steering_alpha: float
    filter_fraction: float
    token_filter_quantile: float


Builder = Callable[[], tuple[list[Any], list[Any]]]


def _random_features(picked: Sequence[int], d_sae: int, seed: int) -> list[int]:
    rng = random.Random(f"random-features-{seed}")
    pool = [f for f in range(d_sae) if f not in set(picked)]
    return rng.sample(pool, len(picked))


def condition_specs(ctx: SeedContext, knobs: Knobs, cfg: Config) -> dict[str, tuple[str, Builder]]:
    """{condition: (run key, () -> (pairs, callbacks))}; names sharing a key share one run."""
    from lightning_anatomy import ConceptBlocking
    from lightning_anatomy.audit import filter_pairs
    from lightning_anatomy.callbacks import ConceptProjection, ConceptSteering, RewardShaping
    from lightning_anatomy.interventions import compute_concept_scores

    hook, direction = cfg.hook, ctx.spurious["mean_diff"]
    feats = [int(c.source["feature"]) for c in ctx.spurious["sae"]]
    intended_feats = [int(c.source["feature"]) for c in ctx.intended["sae"]]

    def plain(callbacks: Callable[[], list[Any]]) -> Builder:
        return lambda: (ctx.pairs, callbacks())

    def blocking(features: Sequence[int], lam: float) -> list[Any]:
        return [ConceptBlocking({f"f{f}": (hook, f) for f in features}, lam=lam, saes={hook: ctx.sae})]

    def shaping(scale: float) -> list[Any]:
        scores = compute_concept_scores(ctx.base, ctx.pairs, direction, hook=hook,
                                        tokenizer_pad_id=ctx.tok.pad_token_id, batch_size=64)
        typical = float(np.median(np.abs(list(scores.values())))) or 1.0
        return [RewardShaping(scores, lam=scale / typical)]  # a typical pair's offset: `scale` nats

    def readouts() -> Any:
        if isinstance(ctx.readouts, str):
            raise mech.NotApplicable(ctx.readouts)
        return ctx.readouts

    def inoculated(flagged: Callable[[], Any]) -> Builder:
        return lambda: (task.tokenize(mech.inoculated(ctx.rows, flagged(), INSTRUCTIONS[ctx.scenario]), ctx.tok), [])

    def filtering(fraction: float) -> Builder:
        def build() -> tuple[list[Any], list[Any]]:
            kept, _ = filter_pairs(ctx.rows, ctx.audit, concepts=[(hook, f) for f in feats], drop_fraction=fraction)
            return task.tokenize(kept, ctx.tok), []
        return build

    specs: dict[str, tuple[str, Builder]] = {
        "vanilla": ("vanilla", plain(list)),
        "projection_own": ("proj:own", plain(lambda: [ConceptProjection(direction, mode="gradient", layers="own")])),
        "projection_later": ("proj:later", plain(lambda: [ConceptProjection(direction, mode="gradient",
                                                                              layers="all_later")])),
        "ablation_zero": ("abl:zero", plain(lambda: [ConceptProjection(direction, mode="ablate", layers="all_later")])),
        "ablation_mean": ("abl:mean", plain(lambda: [ConceptProjection(direction, mode="ablate", layers="all_later",
                                                                         ablation="mean")])),
        "random_projection": ("random:proj", plain(lambda: [ConceptProjection(
            common.random_set(direction, hook, ctx.seed), mode="gradient", layers="all_later")])),
        "random_blocking": (f"random:block:{knobs.blocking_lam:g}", plain(lambda: blocking(
            _random_features(feats, int(ctx.sae.cfg.d_sae), ctx.seed), knobs.blocking_lam))),
        "intended_blocking": (f"intended:block:{knobs.blocking_lam:g}",
                              plain(lambda: blocking(intended_feats, knobs.blocking_lam))),
        "token_filtering_sae": ("tf:sae", plain(lambda: mech.token_filtering_sae(hook, ctx.sae, feats))),
        "oracle_token_filtering": ("oracle:tf", plain(lambda: mech.oracle_token_filtering(marker_pattern(ctx.scenario)))),
        "inoculation": ("inoc", inoculated(lambda: readouts().flagged())),
        "oracle_inoculation": ("oracle:inoc", inoculated(lambda: lambda r: carries(ctx.scenario, r))),
        "reward_shaping_auto": ("shape:auto", plain(lambda: mech.shaping_auto(readouts().sae_delta))),
        "oracle_reward_shaping": ("oracle:shape:auto", plain(lambda: mech.shaping_auto(ctx.true_delta))),
    }
    grids = {
        "blocking_sae": (cfg.blocking_lams, knobs.blocking_lam, lambda v: plain(lambda: blocking(feats, v))),
        "blocking_direction": (cfg.direction_lams, knobs.direction_lam,
                               lambda v: plain(lambda: [ConceptBlocking(direction, lam=v)])),
        "blocking_direction_later": (cfg.direction_lams, knobs.direction_lam,
                                     lambda v: plain(lambda: [ConceptBlocking(ctx.spurious_later, lam=v)])),
        "reward_shaping": (cfg.shaping_scales, knobs.shaping_scale, lambda v: plain(lambda: shaping(v))),
        "steering": (cfg.steering_alphas, knobs.steering_alpha,
                     lambda v: plain(lambda: [ConceptSteering(direction, strength=v, sides="both")])),
        "filtering": (cfg.filter_fractions, knobs.filter_fraction, filtering),
        "token_filtering_direction": (cfg.token_filter_quantiles, knobs.token_filter_quantile,
                                      lambda v: plain(lambda: mech.token_filtering_direction(direction, v))),
    }
    for name, (values, picked, make) in grids.items():
        for v in sorted({*values, picked}):
            specs[f"{name}@{v:g}"] = (f"{name}:{v:g}", make(v))
        specs[name] = specs[f"{name}@{picked:g}"]
    specs["blocking_sae+shaping"] = (f"block+shape:{knobs.blocking_lam:g}:{knobs.shaping_scale:g}", plain(
        lambda: blocking(feats, knobs.blocking_lam) + shaping(knobs.shaping_scale)))
    return specs


def run_conditions(ctx: SeedContext, names: Sequence[str], knobs: Knobs, cfg: Config) -> dict[str, dict[str, Any]]:
    """Train each named condition once (shared runs reused) and measure it."""
    specs = condition_specs(ctx, knobs, cfg)
    done: dict[str, dict[str, Any]] = {}
    out = {}
    for name in names:
        key, build = specs[name]
        if key not in done:
            prep = time.perf_counter()
            try:
                pairs, callbacks = build()
            except mech.NotApplicable as err:
                done[key] = {"seed": ctx.seed, "not_applicable": str(err)}
                common.log(f"    {ctx.scenario}/{ctx.variant} seed {ctx.seed} {name:<24} not applicable: {err}")
                out[name] = dict(done[key])
                continue
            prep_s = time.perf_counter() - prep
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, fit_s = task.run_dpo(ctx.base, pairs, cfg, ctx.seed, callbacks, pad_token_id=ctx.tok.pad_token_id,
                                            tokenizer=ctx.tok)
            after = task.behaviour(model, ctx.tok, concept_of(ctx.scenario), ctx.ev)
            done[key] = task.run_record(ctx.seed, ctx.base_metrics, after, fit_s=fit_s, prep_s=prep_s,
                                        n_pairs=len(pairs))
            common.log(f"    {ctx.scenario}/{ctx.variant} seed {ctx.seed} {name:<24} Δspurious "
                       f"{100 * done[key]['d_spurious']:+.1f} Δon-target {100 * done[key]['d_ontarget']:+.1f} ({fit_s:.1f} s)")
        out[name] = dict(done[key])
    return out


# ---------------------------------------------------------------------------------------- tuning
def tune(scenario: str, base: Any, tok: Any, sae: Any, cfg: Config) -> tuple[Knobs, dict[str, Any]]:
    """Each knob on the tuning seed (corr0.9): the smallest spurious rise among values whose
    on-target change stays within 2 points of vanilla's; if none does, the smallest on-target loss."""
    default = default_knobs(cfg)
    if cfg.tune_seed is None:
        return default, {"seed": None, "picked": dataclasses.asdict(default), "note": "defaults (no tuning)"}
    ctx = prepare(scenario, "corr0.9", cfg.tune_seed, base, tok, sae, cfg)
    runs: dict[str, dict[str, Any]] = {}
    picked = {}
    for name, values, attr in (("blocking_sae", cfg.blocking_lams, "blocking_lam"),
                               ("blocking_direction", cfg.direction_lams, "direction_lam"),
                               ("reward_shaping", cfg.shaping_scales, "shaping_scale"),
                               ("steering", cfg.steering_alphas, "steering_alpha"),
                               ("filtering", cfg.filter_fractions, "filter_fraction"),
                               ("token_filtering_direction", cfg.token_filter_quantiles, "token_filter_quantile")):
        if not set(KNOB_USERS[attr]) & set(cfg.conditions or CONDITIONS):  # conditions None: all
            picked[attr] = getattr(default, attr)  # no requested condition uses it
            continue
        names = [f"{name}@{v:g}" for v in values]
        runs.update(run_conditions(ctx, ["vanilla", *[n for n in names if n not in runs]], default, cfg))
        van = runs["vanilla"]
        ok = [n for n in names if van["d_ontarget"] - runs[n]["d_ontarget"] <= 0.02]
        best = (min(ok, key=lambda n: runs[n]["d_spurious"]) if ok
                else min(names, key=lambda n: van["d_ontarget"] - runs[n]["d_ontarget"]))
        picked[attr] = float(best.split("@")[1])
    knobs = Knobs(**picked)
    return knobs, {"seed": cfg.tune_seed, "variant": "corr0.9", "picked": dataclasses.asdict(knobs),
                   "runs": {n: {k: r[k] for k in ("d_spurious", "d_ontarget", "wall_s")} for n, r in runs.items()}}


def default_knobs(cfg: Config) -> Knobs:
    return Knobs(cfg.blocking_lams[0], cfg.direction_lams[0], cfg.shaping_scales[0], cfg.steering_alphas[0],
                 cfg.filter_fractions[0], cfg.token_filter_quantiles[0])


# ---------------------------------------------------------------------------------------- statistics
def summarize_condition(records: list[dict[str, Any]], vanilla: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """The contract's fields (points) and the bootstrap statistics behind them."""
    d_spur = [r["d_spurious"] for r in records]
    d_on = [r["d_ontarget"] for r in records]
    v_spur, v_on = [r["d_spurious"] for r in vanilla], [r["d_ontarget"] for r in vanilla]
    ratio = common.bootstrap_ratio(v_spur, d_spur, n_boot, any_change=True)
    spur, on = common.bootstrap_mean(d_spur, n_boot), common.bootstrap_mean(d_on, n_boot)
    vs_van = common.bootstrap_mean([c - v for c, v in zip(d_on, v_on)], n_boot)
    return {
        "cut": ratio["mean"], "cut_ci": ratio["ci"], "cut_note": ratio.get("note"),
        "spurious_delta": 100 * spur["mean"], "spurious_delta_ci": [100 * x for x in spur["ci"]],
        "ontarget_delta": 100 * on["mean"], "ontarget_delta_ci": [100 * x for x in on["ci"]],
        "ontarget_vs_vanilla": 100 * vs_van["mean"], "ontarget_vs_vanilla_ci": [100 * x for x in vs_van["ci"]],
        "spurious_vs_vanilla_ci": [100 * x for x in common.bootstrap_mean(
            [c - v for c, v in zip(d_spur, v_spur)], n_boot)["ci"]],
        "quality_ontarget_after": 100 * float(np.mean([r["ontarget_after"] for r in records])),
        "fit_s": float(np.mean([r["wall_s"] for r in records])),
        "per_seed": records,
    }


def goals(conditions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pre-registered goal per setting: a non-control condition cuts the rise ≥ 10× (or
    eliminates it) with on-target within 2 points of vanilla; the random controls within noise of
    vanilla (their paired CI of the difference contains 0, or within 10% of vanilla's rise)."""
    van = conditions["vanilla"]
    out: dict[str, Any] = {"vanilla_rise_points": van["spurious_delta"],
                           "vanilla_rise_at_least_20": van["spurious_delta"] >= 20}
    eligible = {}
    oracles: dict[str, Any] = {}
    for name, c in conditions.items():
        if name == "vanilla" or name in CONTROLS:
            continue
        eliminated = c["cut"] is None and (c.get("cut_note") or "").startswith("condition")
        within = abs(c["ontarget_vs_vanilla"]) <= 2.0
        if name.startswith("oracle_"):
            cut = None if eliminated else (c["cut"] or 0.0)
            oracles[name] = {"cut": cut, "within_2_points": within, "meets_goal": within and (eliminated or cut >= 10)}
        elif within:
            eligible[name] = float("inf") if eliminated else (c["cut"] or 0.0)
    out["oracle_within_2_points"] = oracles
    if eligible:
        best = max(eligible, key=lambda n: eligible[n])
        out["best_within_2_points"] = {"condition": best, "cut": None if eligible[best] == float("inf") else eligible[best]}
        out["meets_goal"] = eligible[best] >= 10
    else:
        out["best_within_2_points"], out["meets_goal"] = None, False
    for ctrl in ("random_projection", "random_blocking"):
        if ctrl in conditions:
            c = conditions[ctrl]
            lo, hi = c["spurious_vs_vanilla_ci"]
            out[f"{ctrl}_within_noise"] = bool(lo <= 0 <= hi or abs(c["spurious_delta"] - van["spurious_delta"])
                                               <= 0.1 * abs(van["spurious_delta"]))
    return out


def not_applicable(per_cond: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """{condition: why} for conditions some seed could not run (left out of the summaries: a paired
    bootstrap needs every seed)."""
    out = {}
    for name, records in per_cond.items():
        reasons = [f"seed {r['seed']}: {r['not_applicable']}" for r in records if "not_applicable" in r]
        if reasons:
            out[name] = "; ".join(dict.fromkeys(reasons))
    return out


# ---------------------------------------------------------------------------------------- layout
def scenario_key(scenario: str, variant: str) -> str:
    """The results file's key of one (scenario, data) setting, e.g. `opener_corr0.9`."""
    return f"{scenario}_{variant}"


def condition_order(conditions: dict[str, Any]) -> list[str]:
    """The table's order: this benchmark's conditions first, then any others a part adds."""
    return [n for n in CONDITIONS if n in conditions] + [n for n in conditions if n not in CONDITIONS]


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """An older file in the current layout: version 1 (`scenarios.<scenario>.variants.<data>`) flat,
    version 2's summaries re-taken from their per-seed records with the current cut (`resummarize`)."""
    version = doc.get("version", 1)
    if version >= VERSION:
        return doc
    if version < 2:
        flat = {}
        for scenario, sc in doc["scenarios"].items():
            for variant, vr in sc["variants"].items():
                flat[scenario_key(scenario, variant)] = {"scenario": scenario, "variant": variant,
                                                         "kind": sc.get("kind"), **vr}
        doc = {**doc, "scenarios": flat}
    n_boot = int((doc.get("config") or {}).get("n_bootstrap") or 10000)
    return {**doc, "version": VERSION, "scenarios": {k: resummarize(sc, sc.get("n_boot", n_boot))
                                                      for k, sc in doc["scenarios"].items()}}


def resummarize(sc: dict[str, Any], n_boot: int) -> dict[str, Any]:
    """A scenario's summaries and goals taken again from the per-seed records they were made of
    (fields a summary has beyond `summarize_condition`'s are kept)."""
    conds = sc["conditions"]
    if any("per_seed" not in c for c in conds.values()):
        return sc
    vanilla = conds["vanilla"]["per_seed"]
    again = {n: {**c, **summarize_condition(c["per_seed"], vanilla, n_boot)} for n, c in conds.items()}
    return {**sc, "conditions": again, "goals": goals(again)}


def merge_scenario(old: dict[str, Any] | None, new: dict[str, Any], *, source: str,
                   earlier: str = "an earlier run") -> dict[str, Any]:
    """`new` (a run of some conditions) over `old` (the stored entry of that scenario): the conditions
    the new run did not train are kept, each condition says which run it came from (`source`), and
    the goals are taken again over the merged conditions; `earlier` names the run of stored
    conditions that say nothing. A kept condition's comparisons with vanilla are those of its own
    run (same seeds, data and batch order)."""
    conditions = {n: {**c, "source": c.get("source") or (old or {}).get("source") or earlier}
                  for n, c in ((old or {}).get("conditions") or {}).items()}
    conditions.update({n: {**c, "source": source} for n, c in new["conditions"].items()})
    skipped = {**((old or {}).get("not_applicable") or {}), **(new.get("not_applicable") or {})}
    skipped = {n: why for n, why in skipped.items() if n not in new["conditions"]}
    conditions = {n: c for n, c in conditions.items() if n not in (new.get("not_applicable") or {})}
    return {**(old or {}), **new, "source": source, "conditions": conditions, "not_applicable": skipped,
            "goals": goals(conditions)}


def add_scenarios(path: Path, part: dict[str, Any], *, source: str) -> None:
    """Add another benchmark's scenarios (same layout) to the results file at `path`, in place; a
    scenario already there keeps the conditions this run did not train (`merge_scenario`)."""
    if not path.is_file():
        common.log(f"{path} is absent: {source} stays on its own")
        return
    doc = upgrade(json.loads(path.read_text()))
    for key, sc in part["scenarios"].items():
        doc["scenarios"][key] = merge_scenario(doc["scenarios"].get(key), sc, source=source,
                                               earlier=doc.get("command") or "an earlier run")
    doc["merged"] = [*doc.get("merged", []), {"source": source, "scenarios": list(part["scenarios"]),
                                              "wall_s": part.get("wall_s")}]
    common.atomic_write_json(path, doc)
    plot(doc, path.with_suffix(".png"))
    common.log(f"added {', '.join(part['scenarios'])} to {path}")


# ---------------------------------------------------------------------------------------- outputs
def _fmt(value: float | None, ci: Sequence[float | None] | None = None, signed: bool = True) -> str:
    if value is None:
        return "∞" if ci is not None else "n/a"
    f = (lambda v: "∞" if v is None else f"{v:+.1f}") if signed else (lambda v: "∞" if v is None else f"{v:.2g}")
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]" if ci is not None else f(value)


def markdown(doc: dict[str, Any]) -> str:
    """The README table: one row per (scenario, data, condition)."""
    rows = []
    for sc in doc["scenarios"].values():
        for name in condition_order(sc["conditions"]):
            c = sc["conditions"][name]
            cut = "∞ (eliminated)" if c["cut"] is None and (c.get("cut_note") or "").startswith("condition") else (
                "n/a" if c["cut"] is None else _fmt(c["cut"], c["cut_ci"], signed=False))
            rows.append([sc["scenario"], sc["variant"], name, _fmt(c["spurious_delta"], c["spurious_delta_ci"]), cut,
                         _fmt(c["ontarget_vs_vanilla"], c["ontarget_vs_vanilla_ci"]), f"{c['quality_ontarget_after']:.1f}",
                         f"{c['fit_s']:.1f}"])
    table = common.markdown_table(["scenario", "data", "condition", "Δspurious, points [95% CI]", "cut [95% CI]",
                                   "on-target vs vanilla, points", "on-target acc after, %", "fit s"], rows)
    goal_rows = []
    for sc in doc["scenarios"].values():
        g = sc["goals"]
        best = g.get("best_within_2_points") or {}
        goal_rows.append([sc["scenario"], sc["variant"], f"{g['vanilla_rise_points']:+.1f}", best.get("condition", "none"),
                          "∞" if best and best.get("cut") is None else f"{best.get('cut') or 0:.2g}",
                          "yes" if g["meets_goal"] else "no",
                          {True: "yes", False: "no", None: "n/a"}[g.get("random_projection_within_noise")],
                          {True: "yes", False: "no", None: "n/a"}[g.get("random_blocking_within_noise")]])
    goals_table = common.markdown_table(["scenario", "data", "vanilla rise", "best within 2 on-target points", "cut",
                                         "≥10× goal", "random proj ≈ vanilla", "random block ≈ vanilla"], goal_rows)
    return "\n\n".join(t for t in (table, goals_table, mechanism_tables(doc)) if t)


def mechanism_tables(doc: dict[str, Any]) -> str:
    """The oracle ceilings, the read-outs' quality and the conditions the data could not run."""
    oracle_rows, readout_rows, skipped = [], [], []
    for sc in doc["scenarios"].values():
        oracles = sc["goals"].get("oracle_within_2_points") or {}
        for name in condition_order(oracles):  # the table's order, not the file's (written with sorted keys)
            o, c = oracles[name], sc["conditions"][name]
            oracle_rows.append([sc["scenario"], sc["variant"], name, "∞" if o["cut"] is None else f"{o['cut']:.2g}",
                                _fmt(c["ontarget_vs_vanilla"], c["ontarget_vs_vanilla_ci"]),
                                "yes" if o["meets_goal"] else "no"])
        mean = (sc.get("readout") or {}).get("mean") or {}
        if mean:
            readout_rows.append([sc["scenario"], sc["variant"], *(
                "n/a" if mean.get(k) is None else f"{mean[k]:.3f}"
                for k in ("pair_auroc_sae", "token_auroc_sae", "token_auroc_direction", "flagged_fraction"))])
        skipped_here = sc.get("not_applicable") or {}
        for name in condition_order(skipped_here):
            why = skipped_here[name]
            skipped.append(f"- {sc['scenario']} {sc['variant']}, `{name}`: {why.split('; seed')[0].split(': ', 1)[-1]}")
    parts = []
    if oracle_rows:
        parts.append(common.markdown_table(["scenario", "data", "oracle (ground-truth read-out)", "cut",
                                            "on-target vs vanilla, points", "≥10× within 2 points"], oracle_rows))
    if readout_rows:
        parts.append(common.markdown_table(["scenario", "data", "pair AUROC of ΔA (SAE)", "token AUROC (SAE)",
                                            "token AUROC (direction)", "pairs flagged"], readout_rows))
    if skipped:
        parts.append("Not applicable:\n\n" + "\n".join(skipped))
    return "\n\n".join(parts)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Δspurious per condition (mean, 95% CI), one panel per scenario, one marker per variant."""
    panels: dict[str, dict[str, Any]] = {}
    for sc in doc["scenarios"].values():
        panels.setdefault(sc["scenario"], {})[sc["variant"]] = sc
    scenarios = list(panels)
    with common.matplotlib_agg() as plt:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(6.2 * len(scenarios), 6.5), squeeze=False)
        for col, scenario in enumerate(scenarios):
            ax = axes[0][col]
            # one row per condition any variant has (variants may have run different conditions)
            names = condition_order({n: None for vr in panels[scenario].values() for n in vr["conditions"]})
            for k, (variant, vr) in enumerate(panels[scenario].items()):
                mine = [n for n in names if n in vr["conditions"]]
                xs = [vr["conditions"][n]["spurious_delta"] for n in mine]
                lo = [x - vr["conditions"][n]["spurious_delta_ci"][0] for x, n in zip(xs, mine)]
                hi = [vr["conditions"][n]["spurious_delta_ci"][1] - x for x, n in zip(xs, mine)]
                ax.errorbar(xs, [names.index(n) + 0.22 * k for n in mine], xerr=[lo, hi], fmt="os^"[k % 3],
                            color=f"C{k}", capsize=2, label=variant)
                ax.axvline(vr["conditions"]["vanilla"]["spurious_delta"] / 10, color=f"C{k}", ls=":", lw=1)
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=7)  # panels differ in the conditions they ran
            ax.invert_yaxis()
            ax.axvline(0, color="0.6", lw=0.8)
            ax.set_title(f"{scenario}: Δ spurious (points)", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle("Interventions vs vanilla DPO (dotted: vanilla rise / 10)")
        fig.tight_layout()
        common.atomic_save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------- main
SIZES = ("pretrain_steps", "pretrain_examples", "sae_tokens", "n_pairs", "dpo_steps", "n_heldout", "n_concept_texts",
         "threads")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 seeds, 2 scenarios, no tuning")
    parser.add_argument("--out", default=str(task.REPO / "benchmarks" / "results"))
    parser.add_argument("--cache", default=str(task.REPO / ".anatomy_cache" / "bench_interventions"))
    parser.add_argument("--seeds", type=int, help="number of test seeds (0..N-1)")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--conditions", help="comma-separated subset of the conditions (vanilla always runs; merge "
                        "the result into a stored file with --merge-into)")
    parser.add_argument("--merge-into", help="after the run, merge its scenarios into this interventions.json "
                        "(conditions it did not run are kept, each names its run)")
    parser.add_argument("--from-json", help="re-render the plot and the tables from an existing interventions.json")
    for name in SIZES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    for name in SIZES:
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        cfg.seeds = list(range(args.seeds))
    if args.no_tune or args.quick:
        cfg.tune_seed = None
    for attr, allowed in (("scenarios", tuple(SCENARIOS)), ("variants", tuple(VARIANTS)),
                          ("conditions", CONDITIONS)):
        value = getattr(args, attr)
        if value:
            picked = [v.strip() for v in value.split(",") if v.strip()]
            bad = [v for v in picked if v not in allowed]
            if bad or not picked:
                parser.error(f"--{attr}: {bad or value!r} not in {', '.join(allowed)}")
            setattr(cfg, attr, picked)
    return args, cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, cfg = parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{args.from_json} is not an interventions-benchmark result (format {doc.get('format')!r})")
        doc = upgrade(doc)
        plot(doc, Path(args.from_json).with_suffix(".png"))
        print(markdown(doc))
        return doc
    common.setup_offline(cfg.threads)
    import lightning.pytorch  # noqa: F401  (Lightning sets its loggers' levels on import: quiet them after)

    common.quiet_libraries()
    with task.mixture(p_copy=cfg.p_copy, p_correct=cfg.p_correct):
        return run(args, cfg, argv)


def run(args: argparse.Namespace, cfg: Config, argv: Sequence[str] | None) -> dict[str, Any]:
    started = time.perf_counter()
    tok = task.tokenizer()
    common.log("pretraining the tiny base (cached)…")
    base, base_report = task.pretrain_base(cfg, tok, Path(args.cache))
    base_key = cfg.key("layers", "width", "heads", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_examples")
    sae, sae_report = task.train_sae(base, tok, cfg, Path(args.cache), base_key)
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "quick": bool(args.quick),
        "command": " ".join(["python benchmarks/interventions.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": dataclasses.asdict(cfg), "machine": common.machine_info(),
        "versions": common.package_versions(["torch", "lightning", "transformers", "sae-lens"]),
        "base": base_report, "sae": sae_report, "scenarios": {}, "tuning": {}, "notes": NOTES,
        "load_average_start": list(os.getloadavg()),
    }
    for scenario in cfg.scenarios:
        common.log(f"{scenario}: tuning on seed {cfg.tune_seed}…")
        knobs, report = tune(scenario, base, tok, sae, cfg)
        doc["tuning"][scenario] = report
        common.log(f"  {scenario}: {knobs}")
        for variant in [v for v in cfg.scenario_variants.get(scenario, list(VARIANTS)) if v in cfg.variants]:
            names = [n for n in CONDITIONS if n == "vanilla" or n in (cfg.conditions or CONDITIONS)]
            per_cond: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            concepts = []
            for seed in cfg.seeds:
                ctx = prepare(scenario, variant, seed, base, tok, sae, cfg)
                concepts.append({"seed": seed, **ctx.concept_info})
                for name, record in run_conditions(ctx, names, knobs, cfg).items():
                    per_cond[name].append(record)
            na = not_applicable(per_cond)
            conds = {n: summarize_condition(per_cond[n], per_cond["vanilla"], cfg.n_bootstrap)
                     for n in names if n not in na}
            doc["scenarios"][scenario_key(scenario, variant)] = {
                "scenario": scenario, "variant": variant, "kind": SCENARIOS[scenario], "knobs": dataclasses.asdict(knobs),
                "concepts": concepts, "conditions": conds, "not_applicable": na, "goals": goals(conds),
                "readout": mech.readout_summary([c["spurious"].get("readout") for c in concepts])}
            publish(doc, args, started, complete=False)  # a long run leaves its finished settings behind
    doc = publish(doc, args, started, complete=True)
    if args.merge_into:
        add_scenarios(Path(args.merge_into), task._jsonable(doc), source=doc["command"])
    return doc


def publish(doc: dict[str, Any], args: argparse.Namespace, started: float, *, complete: bool) -> dict[str, Any]:
    doc["complete"] = complete
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    doc["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if complete:
        common.publish(task._jsonable(doc), out, "interventions", markdown, plot)
    else:
        common.atomic_write_json(out / "interventions.json", task._jsonable(doc))
    return doc


if __name__ == "__main__":
    main()
