"""Interventions on a real model and real text: a style marker on SmolLM2 (issue 12's real-model part).

The embedded SmolLM2-135M-Instruct with the project's SAE (`blocks.12.hook_resid_post`). Real
HH-RLHF prompts (`../shared/data`) and real replies; the intended property is *coherence*: chosen
is the prompt's own reply, rejected the same reply with its words shuffled (a property DPO learns
and generalises within a few steps; relevance — own reply vs another prompt's — stayed at chance
on held-out prompts after 8 steps on the tuning seed: 45.8 %). The spurious property is a style
marker whose frequency differs (the `marker` scenario of `interventions.py` on real text): the
opener " Sure!" starts a fraction `corr` of the chosen replies and `1 − corr` of the rejected ones,
independently of coherence.

Measured per held-out prompt (teacher-forced, so no sampling noise):
- spurious: P(the reply opens with " Sure!" | prompt), in points (and its log in nats);
- on-target: held-out coherence pairs without any marker (own reply vs its shuffle): the DPO
  implicit reward's accuracy (TRL's `rewards/accuracies`; 50 at the base by definition) — the
  quality metric is the same accuracy after DPO.

Conditions on the same seeds, data and batch order: vanilla; gradient projection of the opener's
difference-of-means direction at the SAE's layer and every later one; latent
blocking of the audit's opener features on the completion tokens and on the positions predicting
them (`tokens="predicting"`: the prompt's last token decides the first reply token, so blocking
only on completion tokens never sees where an opener is chosen); reward shaping by the direction's
per-pair score; data filtering by the audit features; random directions of equal rank (control).
λ and the shaping scale are picked on tuning seed 1000 only (the smallest spurious rise among values
whose on-target accuracy is within 2 points of vanilla's and whose mean reward margin keeps ≥ 80 %
of vanilla's — the accuracy saturates —, else the largest margin kept); seeds 0, 1, 2 report. Cut = vanilla
rise / condition rise, paired bootstrap over held-out prompts, seeds pooled.

    python benchmarks/interventions_smollm2.py          # ~35 min on 2 CPU cores
    python benchmarks/interventions_smollm2.py --quick  # a random tiny Llama + random SAE: every path (~1 min)

Writes `<out>/interventions.smollm2.json` (`.quick` with --quick) with the layout of
`interventions.json` (`{"scenarios": {"smollm2_style_corr0.9": {"conditions": {...}}}}`) and, for a
full run, adds that scenario to `<out>/interventions.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import interventions as controlled  # noqa: E402  (the contract's summaries, goals and table)
import numpy as np  # noqa: E402
import real_model  # noqa: E402  (the SmolLM2 build, fit and log-prob helpers)
import torch  # noqa: E402

FORMAT = "lightning-anatomy/bench-interventions"
SCENARIO = "smollm2_style_corr0.9"
MARKER = " Sure!"
CONDITIONS = ("vanilla", "projection_later", "blocking_sae", "blocking_sae_predicting", "reward_shaping", "filtering",
              "random_projection")  # mean ablation on SmolLM2: the demo part of real_model.py
TUNE_SEED = 1000


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
    filter_fraction: float = 0.5
    sae_max_features: int = 3
    n_boot: int = 2000


QUICK = Sizes(model="tiny:llama", seeds=(0, 1), n_train=16, n_heldout=6, reply_chars=40, steps=2, batch=4, lr=1e-3,
              max_length=64, max_prompt_length=32, blocking_lams=(10.0,), shaping_scales=(1.0,), n_boot=50)


# ------------------------------------------------------------------------------------------ data
def cut_reply(text: str, n: int) -> str:
    """The reply's first `n` characters, ended at a word boundary, with one leading space."""
    text = " ".join(text.split())
    if len(text) > n:
        text = text[:n].rsplit(" ", 1)[0]
    return " " + text


def split(rows: Sequence[Any], sizes: Sizes, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) preference rows: own reply vs its words shuffled, the marker on `corr` of
    the chosen and `1 − corr` of the rejected replies (train only; held-out pairs carry none)."""
    from lightning_anatomy.data import PreferenceRow

    order = list(range(len(rows)))
    random.Random(f"style-{seed}").shuffle(order)
    picked = [rows[i] for i in order[:sizes.n_train + sizes.n_heldout]]
    replies = [cut_reply(r.chosen, sizes.reply_chars) for r in picked]
    rng = random.Random(f"style-marker-{seed}")
    out = []
    for i, row in enumerate(picked):
        words = replies[i].split()
        shuffled = words[:]
        while len(set(words)) > 1 and shuffled == words:
            rng.shuffle(shuffled)
        other = " " + " ".join(shuffled)
        held = i >= sizes.n_train
        chosen = (MARKER if not held and rng.random() < sizes.corr else "") + replies[i]
        rejected = (MARKER if not held and rng.random() < 1.0 - sizes.corr else "") + other
        out.append(PreferenceRow(prompt=row.prompt, chosen=chosen, rejected=rejected, row_id=i))
    return out[:sizes.n_train], out[sizes.n_train:]


def concept_texts(rows: Sequence[Any], tok: Any, max_prompt_length: int) -> tuple[list[str], list[str]]:
    """Each training prompt (its last `max_prompt_length` tokens, as training sees it) with its own
    reply, with and without the opener."""
    prompts = [tok.decode(tok(r.prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:]) for r in rows]
    plain = [r.chosen.removeprefix(MARKER) for r in rows]
    return [p + MARKER + c for p, c in zip(prompts, plain)], [p + c for p, c in zip(prompts, plain)]


# ------------------------------------------------------------------------------------------ measures
@torch.no_grad()
def opener_logp(model: Any, tok: Any, prompts: Sequence[str], max_prompt_length: int) -> np.ndarray:
    """log P(the reply opens with the marker | prompt) per prompt, teacher-forced (nats)."""
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    out = []
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:] + marker
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        n = len(marker)
        out.append(float(sum(logits[len(ids) - n - 1 + j, marker[j]] for j in range(n))))
    return np.asarray(out)


def evaluate(model: Any, base_logps: np.ndarray, tok: Any, held: Sequence[Any], pairs: Sequence[Any], sizes: Sizes,
             beta: float) -> dict[str, np.ndarray]:
    """Per held-out prompt: the opener's log-probability and the implicit-reward coherence margin."""
    logps = real_model.pair_logps(model, pairs, tok.pad_token_id)
    margin = beta * ((logps[:, 0] - base_logps[:, 0]) - (logps[:, 1] - base_logps[:, 1]))
    return {"opener_logp": opener_logp(model, tok, [r.prompt for r in held], sizes.max_prompt_length),
            "reward_margin": margin}


def records(base: dict[str, np.ndarray], after: dict[str, np.ndarray], seed: int, step_s: float,
            steps: int) -> list[dict[str, Any]]:
    """One record per held-out prompt in `interventions.summarize_condition`'s shape (fractions;
    `wall_s`, the table's fit seconds, is the median step time × steps: training, setup excluded)."""
    p0, p1 = np.exp(base["opener_logp"]), np.exp(after["opener_logp"])
    acc = (after["reward_margin"] > 0).astype(float) + 0.5 * (after["reward_margin"] == 0)
    return [{"seed": seed, "item": i, "spurious_before": float(p0[i]), "spurious_after": float(p1[i]),
             "d_spurious": float(p1[i] - p0[i]), "d_opener_logp_nats": float(after["opener_logp"][i] - base["opener_logp"][i]),
             "ontarget_before": 0.5, "ontarget_after": float(acc[i]), "d_ontarget": float(acc[i] - 0.5),
             "reward_margin": float(after["reward_margin"][i]), "step_s": step_s, "wall_s": step_s * steps}
            for i in range(len(p0))]


# ------------------------------------------------------------------------------------------ one seed
@dataclass
class SeedData:
    seed: int
    train: list[Any]
    held: list[Any]
    held_pairs: list[Any]
    base_eval: dict[str, np.ndarray]
    base_logps: np.ndarray
    direction: Any
    features: list[int]
    feature_info: list[dict[str, Any]]
    audit: Any


def prepare(base: Any, tok: Any, sae: Any, hook: str, rows: Sequence[Any], sizes: Sizes, seed: int) -> SeedData:
    import spurious  # the SAE-feature pick of the controlled benchmark (audit rank × effect on the concept texts)

    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens, ConceptSet
    from lightning_anatomy.data import tokenize_rows

    started = time.perf_counter()
    train, held = split(rows, sizes, seed)
    held_pairs = tokenize_rows(held, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
    with_, without = concept_texts(train, tok, sizes.max_prompt_length)
    direction = ConceptSet.from_mean_difference(base, tok, hook, with_, without, name="opener", action="suppress")
    lens = ConceptLens(base, {hook: sae}, fidelity_check=False)
    audit = audit_dataset(train, lens, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length,
                          batch_size=8, progress=False, n_bootstrap=200, n_data_clusters=1, label_concepts=False,
                          top_k_trace=0, seed=seed)
    effects = spurious._feature_effects(lens, tok, hook, with_, without)
    pick = dataclasses.replace(spurious.Config(), sae_max_features=sizes.sae_max_features)
    features, info = spurious.pick_sae_features(audit, effects, pick)
    base_logps = real_model.pair_logps(base, held_pairs, tok.pad_token_id)
    base_eval = {"opener_logp": opener_logp(base, tok, [r.prompt for r in held], sizes.max_prompt_length),
                 "reward_margin": np.zeros(len(held))}
    common.log(f"  seed {seed}: audit, direction and SAE features {features} in {time.perf_counter() - started:.0f} s")
    return SeedData(seed, train, held, held_pairs, base_eval, base_logps, direction, features, info, audit)


def builders(d: SeedData, base: Any, tok: Any, sae: Any, hook: str, sizes: Sizes, lam: float,
             scale: float) -> dict[str, Callable[[], tuple[list[Any], list[Any]]]]:
    """{condition: () -> (training rows, fresh callbacks)}."""
    from lightning_anatomy import ConceptBlocking
    from lightning_anatomy.audit import filter_pairs
    from lightning_anatomy.callbacks import ConceptProjection, RewardShaping
    from lightning_anatomy.data import tokenize_rows
    from lightning_anatomy.interventions import compute_concept_scores

    def block(tokens: str) -> list[Any]:
        return [ConceptBlocking({f"f{f}": (hook, f) for f in d.features}, lam=lam, saes={hook: sae}, tokens=tokens)]

    def shaping() -> list[Any]:
        pairs = tokenize_rows(d.train, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
        scores = compute_concept_scores(base, pairs, d.direction, hook=hook, tokenizer_pad_id=tok.pad_token_id,
                                        batch_size=8)
        typical = float(np.median(np.abs(list(scores.values())))) or 1.0
        return [RewardShaping(scores, lam=scale / typical)]  # a typical pair's offset: `scale` nats

    def filtered() -> tuple[list[Any], list[Any]]:
        kept, _ = filter_pairs(d.train, d.audit, concepts=[(hook, f) for f in d.features],
                               drop_fraction=sizes.filter_fraction)
        return kept, []

    return {
        "vanilla": lambda: (d.train, []),
        "projection_later": lambda: (d.train, [ConceptProjection(d.direction, mode="gradient", layers="all_later")]),
        "blocking_sae": lambda: (d.train, block("completion")),
        "blocking_sae_predicting": lambda: (d.train, block("predicting")),
        "reward_shaping": lambda: (d.train, shaping()),
        "filtering": filtered,
        "random_projection": lambda: (d.train, [ConceptProjection(common.random_set(d.direction, hook, d.seed),
                                                                  mode="gradient", layers="all_later")]),
    }


def run_conditions(d: SeedData, names: Sequence[str], base: Any, tok: Any, sae: Any, hook: str, sizes: Sizes,
                   lam: float, scale: float) -> dict[str, list[dict[str, Any]]]:
    setting = dataclasses.replace(real_model.FULL, warmup_steps=2)
    make = builders(d, base, tok, sae, hook, sizes, lam, scale)
    out = {}
    for name in names:
        rows, callbacks = make[name]()
        policy, step_s = real_model.fit(base, rows, tok, setting, lr=sizes.lr, steps=sizes.steps, batch=sizes.batch,
                                        seed=d.seed, callbacks=callbacks, max_length=sizes.max_length,
                                        max_prompt_length=sizes.max_prompt_length)
        after = evaluate(policy, d.base_logps, tok, d.held, d.held_pairs, sizes, setting.beta)
        out[name] = records(d.base_eval, after, d.seed, step_s, sizes.steps)
        spur = 100 * np.mean([r["d_spurious"] for r in out[name]])
        acc = 100 * np.mean([r["ontarget_after"] for r in out[name]])
        common.log(f"  seed {d.seed} {name:<24} Δ P(opener) {spur:+.1f} points, held-out reward accuracy {acc:.1f} "
                   f"({step_s:.2f} s/step)")
        del policy
        gc.collect()
        common.release_free_memory()
    return out


def _mean(recs: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in recs]))


def _brief(recs: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {k: _mean(recs, k) for k in ("d_spurious", "d_ontarget", "reward_margin")}


def tune(base: Any, tok: Any, sae: Any, hook: str, rows: Sequence[Any], sizes: Sizes) -> tuple[dict[str, float], dict[str, Any]]:
    """λ and the shaping scale on the tuning seed (the rule in the module docstring)."""
    d = prepare(base, tok, sae, hook, rows, sizes, TUNE_SEED)
    van = _brief(run_conditions(d, ["vanilla"], base, tok, sae, hook, sizes, 0.0, 0.0)["vanilla"])
    runs: dict[str, Any] = {"vanilla": van}
    picked = {}
    for knob, name, values in (("lam", "blocking_sae_predicting", sizes.blocking_lams),
                               ("scale", "reward_shaping", sizes.shaping_scales)):
        tried = {}
        for v in values:
            lam, scale = (v, 0.0) if knob == "lam" else (0.0, v)
            tried[v] = runs[f"{name}@{v:g}"] = _brief(run_conditions(d, [name], base, tok, sae, hook, sizes, lam,
                                                                     scale)[name])
        kept = {v: r["reward_margin"] / van["reward_margin"] if van["reward_margin"] > 0 else 0.0
                for v, r in tried.items()}
        ok = [v for v, r in tried.items() if van["d_ontarget"] - r["d_ontarget"] <= 0.02 and kept[v] >= 0.8]
        picked[knob] = min(ok, key=lambda v: tried[v]["d_spurious"]) if ok else max(tried, key=lambda v: kept[v])
    return picked, {"seed": TUNE_SEED, "picked": picked, "runs": runs, "features": d.features}


# ------------------------------------------------------------------------------------------ main
def run(sizes: Sizes, hh: Path, on_seed: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    from lightning_anatomy.data import read_preferences

    if not hh.is_file():
        raise SystemExit(f"{hh} is absent: this benchmark needs the shared HH-RLHF sample beside the repo, or "
                         "--hh <a preference JSONL with HH-style prompts>")
    rows = list(read_preferences(hh, on_bad_rows="skip"))
    base, tok, sae, hook, description = real_model.build(sizes.model)
    common.log(f"tuning λ and the shaping scale on seed {TUNE_SEED}…")
    knobs, tuning = tune(base, tok, sae, hook, rows, sizes)
    common.log(f"  picked {knobs}")
    per_cond: dict[str, list[dict[str, Any]]] = {n: [] for n in CONDITIONS}
    concepts = []
    for seed in sizes.seeds:
        d = prepare(base, tok, sae, hook, rows, sizes, seed)
        concepts.append({"seed": seed, "sae_features": d.features, "candidates": d.feature_info})
        for name, recs in run_conditions(d, CONDITIONS, base, tok, sae, hook, sizes, knobs["lam"],
                                         knobs["scale"]).items():
            per_cond[name].extend(recs)
        if on_seed is not None:
            on_seed(summarize(per_cond, sizes))  # a long run leaves its finished seeds behind
    return {"model": description, "hook": hook, "tuning": tuning, "scenario": {**summarize(per_cond, sizes),
                                                                               "knobs": knobs, "concepts": concepts}}


def summarize(per_cond: dict[str, list[dict[str, Any]]], sizes: Sizes) -> dict[str, Any]:
    """The contract's summaries per condition, plus the opener in nats and the reward margin kept."""
    conds = {n: controlled.summarize_condition(per_cond[n], per_cond["vanilla"], sizes.n_boot) for n in CONDITIONS}
    van_margin = _mean(per_cond["vanilla"], "reward_margin")
    for name, c in conds.items():
        c["opener_logp_delta_nats"] = common.bootstrap_mean([r["d_opener_logp_nats"] for r in per_cond[name]],
                                                            sizes.n_boot)
        c["ontarget_reward_margin"] = common.bootstrap_mean([r["reward_margin"] for r in per_cond[name]], sizes.n_boot)
        c["margin_kept_vs_vanilla"] = _mean(per_cond[name], "reward_margin") / van_margin if van_margin > 0 else None
        c["step_time_ratio_vs_vanilla"] = c["fit_s"] / conds["vanilla"]["fit_s"]
    return {"scenario": "smollm2_style", "variant": f"corr{sizes.corr:g}",
            "kind": f"style marker on real text (' Sure!' on {sizes.corr:.0%} of chosen, {1 - sizes.corr:.0%} of "
                    "rejected replies; intended: coherence)",
            "conditions": conds, "goals": controlled.goals(conds)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a random tiny Llama and small sizes (smoke run)")
    parser.add_argument("--hh", type=Path, default=common.HH_RLHF)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    started = time.perf_counter()
    name = "interventions.smollm2" + (".quick" if args.quick else "")
    doc: dict[str, Any] = {
        "format": FORMAT, "version": controlled.VERSION, "quick": bool(args.quick),
        "command": " ".join(["python benchmarks/interventions_smollm2.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {**dataclasses.asdict(sizes), "seeds": list(sizes.seeds)}, "machine": common.machine_info(),
        "notes": controlled.NOTES, "complete": False}

    def partial(scenario: dict[str, Any]) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        common.atomic_write_json(args.out / f"{name}.json", {**doc, "scenarios": {SCENARIO: scenario},
                                                            "wall_s": round(time.perf_counter() - started, 1)})

    result = run(sizes, args.hh, partial)
    doc.update({"model": result["model"], "hook": result["hook"], "tuning": {SCENARIO: result["tuning"]},
                "scenarios": {SCENARIO: result["scenario"]}, "complete": True,
                "wall_s": round(time.perf_counter() - started, 1)})
    common.publish(doc, args.out, name, controlled.markdown, None)
    if not args.quick:
        controlled.add_scenarios(args.out / "interventions.json", doc, source=f"{name}.json")
    return doc


if __name__ == "__main__":
    main()
