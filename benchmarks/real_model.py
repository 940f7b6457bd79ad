"""Benchmark (b): projected vs. vanilla DPO on a real pretrained model, several seeds.

The model is the embedded SmolLM2-135M-Instruct with the project's SAE at
`blocks.12.hook_resid_post`; every concept direction is found by the package, not hand-fed.
Three conditions per seed, trained with the same DPOModule settings, data and batch order:

- `vanilla`: plain DPO;
- `projected`: `ConceptProjection` of the suppressed concepts (mode and layers below);
- `random_control`: the same projection of seeded random directions of the same rank.

Two datasets:

- `demo` (the embedded demo data, `make_demo_data`: the user's stated belief always equals the
  answer in training). The suppressed concept is the belief direction (`ConceptSet.from_mean_difference`
  over prompts with vs. without a belief), the demo's intervention (`both`, layers 12-29).
  Off-target: the rise of sycophancy on held-out questions whose stated belief is wrong, per item
  `base margin - run margin` (nats, margin = log p(correct) - log p(user's wrong belief)) and the
  change in the share of items preferring the wrong belief. On-target: the margin gain and
  preference accuracy with the belief right and with no belief.
- `hh` (`../shared/data/hh-rlhf-harmless-test-a.jsonl`, skipped when absent; row 136, a blank
  reply, is dropped). Each seed draws a held-out split and an audit split; `audit_dataset` on the
  audit split ranks the concepts and the passing ones (at most `hh_top_k`) are suppressed with
  `gradient` projection at every later layer. DPO trains on the first `hh_n_train` pairs of the
  audit split (a CPU budget: the audit needs more pairs for power than the CPU can train on).
  Off-target: the change of the suppressed features' activation (max over each held-out
  completion, the audit's statistic) in the direction the audit predicted, per held-out pair
  (chosen and rejected completions averaged, features averaged), so > 0 means DPO did what the
  audit predicted. Spill-over: the same for the next-ranked audit features, not suppressed.
  On-target: held-out implicit-reward accuracy and margin (beta = the training beta), and the
  change of the plain log-prob preference accuracy.

Ratios are `vanilla off-target change / condition off-target change` with a paired percentile
bootstrap over held-out items (all seeds pooled); null where vanilla's change is not distinguishable
from 0 (its 95% CI includes 0): there is nothing to cut.
Step time is the wall time of each fit over its steps (conditions run one after another in one
process: a coarse cost reading; `cost.py` measures overheads interleaved).

    python benchmarks/real_model.py                 # SmolLM2, demo (3 seeds) + HH-RLHF (2 seeds): ~45 min on 2 CPU cores
    python benchmarks/real_model.py --parts demo    # one dataset only
    python benchmarks/real_model.py --hh-lr 1e-5 --name real_model.hh-lr1e-5   # the HH runs at the demo's rate
    python benchmarks/real_model.py --quick         # a random tiny Llama + random SAE: a smoke run of every path (~30 s)

Writes `<out>/real_model.json` and `<out>/real_model.png` (`real_model.quick.*` with --quick) and
prints the markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_anatomy.model_access import measurement_pass  # noqa: E402

FORMAT = "lightning-anatomy/real-model-benchmark"
VERSION = 1
CONDITIONS = ("vanilla", "projected", "random_control")  # the HH part
DEMO_CONDITIONS = ("vanilla", "projected", "mean_ablation", "blocking", "random_control")
DEMO_TUNE_SEED = 1000  # the blocking λ is picked on this seed's data only
N_BOOT = 2000


@dataclass(frozen=True)
class Setting:
    """Sizes of one run; the full setting matches `configs/demo.yaml` for the demo part."""

    model: str  # "embedded" or "tiny:<family>" (random weights, random SAE: smoke runs only)
    demo_seeds: tuple[int, ...]
    demo_n_train: int
    demo_n_heldout: int
    demo_steps: int
    demo_batch: int
    demo_mode: str
    demo_layers: str
    hh_seeds: tuple[int, ...]
    hh_n_audit: int
    hh_n_train: int
    hh_n_heldout: int
    hh_steps: int
    hh_batch: int
    hh_max_length: int
    hh_max_prompt_length: int
    hh_top_k: int
    hh_spill_k: int
    hh_mode: str
    hh_layers: str
    demo_blocking_lams: tuple[float, ...] = (1.0, 10.0)
    lr: float = 1e-5  # the demo's
    hh_lr: float = 5e-5  # at 1e-5, 12 steps moved nothing measurable on HH-RLHF (README)
    beta: float = 0.1
    warmup_steps: int = 2
    audit_bootstrap: int = 200


FULL = Setting(model="embedded", demo_seeds=(0, 1, 2), demo_n_train=64, demo_n_heldout=32, demo_steps=8, demo_batch=8,
               demo_mode="both", demo_layers="all_later", hh_seeds=(0, 1), hh_n_audit=384, hh_n_train=96, hh_n_heldout=64, hh_steps=12,
               hh_batch=8, hh_max_length=128, hh_max_prompt_length=64, hh_top_k=8, hh_spill_k=10, hh_mode="gradient",
               hh_layers="all_later")
QUICK = Setting(model="tiny:llama", demo_seeds=(0, 1), demo_n_train=8, demo_n_heldout=4, demo_steps=2, demo_batch=4,
                demo_mode="both", demo_layers="all_later", hh_seeds=(0,), hh_n_audit=24, hh_n_train=16, hh_n_heldout=8, hh_steps=2,
                hh_batch=4, hh_max_length=64, hh_max_prompt_length=32, hh_top_k=4, hh_spill_k=4, hh_mode="gradient",
                hh_layers="all_later", lr=1e-3, hh_lr=1e-3, audit_bootstrap=20)


# ----------------------------------------------------------------------------------- model, training
def build(model_spec: str) -> tuple[Any, Any, Any, str, str]:
    """(model, tokenizer, sae, hook, description), the model in eval mode."""
    if model_spec == "embedded":
        from lightning_anatomy.models.embedded import EMBEDDED_HOOK, load_embedded, load_embedded_sae

        model, tokenizer = load_embedded()
        return model.eval(), tokenizer, load_embedded_sae(), EMBEDDED_HOOK, "SmolLM2-135M-Instruct (embedded, fp32)"
    if model_spec.startswith("tiny:"):
        from sae_lens import StandardSAE, StandardSAEConfig

        from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

        torch.manual_seed(0)
        model = build_tiny_model(model_spec.split(":", 1)[1], vocab_size=260, hidden_size=64, num_layers=2,
                                 num_heads=2, max_positions=512)
        sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128))
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0.0, 0.1)
        return model.eval(), build_tiny_tokenizer(), sae, "blocks.0.hook_resid_post", f"random {model_spec} (smoke run)"
    raise SystemExit(f"--model: unknown {model_spec!r}; use 'embedded' or 'tiny:<family>'")


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, projection hooks, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def fit(base: Any, rows: Sequence[Any], tokenizer: Any, setting: Setting, *, lr: float, steps: int, batch: int,
        seed: int, callbacks: Sequence[Any], max_length: int, max_prompt_length: int) -> tuple[Any, float]:
    """DPO from a copy of `base`; returns (trained policy in eval mode, median seconds per step)."""
    from lightning_anatomy import DPOModule, PreferenceDataModule

    L.seed_everything(seed, verbose=False)
    module = DPOModule(copy.deepcopy(base).train(), lr=lr, beta=setting.beta, loss_type="sigmoid",
                       warmup_steps=setting.warmup_steps)
    dm = PreferenceDataModule(list(rows), tokenizer, batch_size=batch, val_fraction=0.0, seed=seed,
                              max_length=max_length, max_prompt_length=max_prompt_length)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[*callbacks, timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    return module.policy.eval(), float(np.median(timer.times))


def projections(concepts: Any, hook: str, seed: int, mode: str, layers: str) -> dict[str, Callable[[], list]]:
    """Fresh callback lists per condition (a callback holds hooks and state of one fit)."""
    from lightning_anatomy.callbacks import ConceptProjection

    rand = common.random_set(concepts, hook, seed)
    return {
        "vanilla": lambda: [],
        "projected": lambda: [ConceptProjection(concepts, mode=mode, layers=layers)],
        "random_control": lambda: [ConceptProjection(rand, mode=mode, layers=layers)],
    }


# ------------------------------------------------------------------------------------------ demo data
def demo_margins(model: Any, tokenizer: Any, items: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per item log p(correct) - log p(wrong) (nats), teacher-forced after the chat-rendered prompt."""
    from lightning_anatomy.demo.data import sycophancy_logprobs

    correct, wrong = sycophancy_logprobs(model, tokenizer, items)
    return correct.numpy().astype(np.float64) - wrong.numpy().astype(np.float64)


def demo_eval(model: Any, tokenizer: Any, data: Any) -> dict[str, np.ndarray]:
    return {name: demo_margins(model, tokenizer, getattr(data, f"heldout_{name}")) for name in ("conflict", "aligned",
                                                                                                   "control")}


def demo_conditions(base: Any, tokenizer: Any, data: Any, hook: str, seed: int, setting: Setting, lam: float,
                    names: Sequence[str]) -> dict[str, Callable[[], list]]:
    """The demo part's conditions: the demo's projection, mean ablation and blocking of the belief
    direction (blocking at the SAE's layer and every later block, where the projection acts too)."""
    from lightning_anatomy import ConceptBlocking
    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.concepts import ConceptSet

    belief = ConceptSet.from_mean_difference(base, tokenizer, hook, data.texts_with_belief, data.texts_without_belief,
                                             name="user_belief", action="suppress")
    out = projections(belief, hook, seed, setting.demo_mode, setting.demo_layers)
    out["mean_ablation"] = lambda: [ConceptProjection(belief, mode="ablate", layers=setting.demo_layers,
                                                      ablation="mean")]
    if "blocking" in names:
        later = ConceptSet.from_mean_difference_later(base, tokenizer, hook, data.texts_with_belief,
                                                      data.texts_without_belief, name="user_belief", action="suppress")
        out["blocking"] = lambda: [ConceptBlocking(later, lam=lam)]
    return {n: out[n] for n in names}


def run_demo_seed(base: Any, tokenizer: Any, sae: Any, hook: str, setting: Setting, seed: int, *, lam: float,
                  names: Sequence[str] = DEMO_CONDITIONS) -> dict[str, Any]:
    from lightning_anatomy.data import read_preferences
    from lightning_anatomy.demo.data import make_demo_data

    data = make_demo_data(n_train=setting.demo_n_train, n_heldout=setting.demo_n_heldout, seed=seed)
    rows = read_preferences(data.train_rows(tokenizer))
    record: dict[str, Any] = {"seed": seed, "base": demo_eval(base, tokenizer, data), "runs": {}, "blocking_lam": lam}
    for name, make in demo_conditions(base, tokenizer, data, hook, seed, setting, lam, names).items():
        policy, step_s = fit(base, rows, tokenizer, setting, lr=setting.lr, steps=setting.demo_steps, batch=setting.demo_batch,
                             seed=seed, callbacks=make(), max_length=128, max_prompt_length=96)
        record["runs"][name] = {"eval": demo_eval(policy, tokenizer, data), "step_s": step_s}
        common.log(f"  demo seed {seed} {name}: conflict prefers correct "
                   f"{(record['runs'][name]['eval']['conflict'] > 0).mean():.3f} "
                   f"(base {(record['base']['conflict'] > 0).mean():.3f}), {step_s:.2f} s/step")
        del policy
        gc.collect()
        common.release_free_memory()  # the first 5-condition run grew to 19.7 GB RSS and was OOM-killed
    return record


def summarize_demo(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled per-item effects (all seeds) per condition, with bootstrap CIs and the cut ratio."""
    def pooled(fn: Callable[[dict[str, Any], dict[str, Any]], np.ndarray], cond: str) -> np.ndarray:
        return np.concatenate([fn(r["base"], r["runs"][cond]["eval"]) for r in records])

    def margin_drop(b, e):  # sycophancy rise in nats: how much the margin against the user's wrong belief fell
        return b["conflict"] - e["conflict"]

    def wrong_rise(b, e):  # change in P(prefers the user's wrong belief)
        return (e["conflict"] <= 0).astype(float) - (b["conflict"] <= 0).astype(float)

    vanilla_drop = pooled(margin_drop, "vanilla")
    conditions = list(records[0]["runs"])
    out: dict[str, Any] = {"base": {k: _side(np.concatenate([r["base"][k] for r in records])) for k in
                                    ("conflict", "aligned", "control")}}
    for cond in conditions:
        drop = pooled(margin_drop, cond)
        out[cond] = {
            "offtarget_margin_drop_nats": common.bootstrap_mean(drop, N_BOOT),
            "offtarget_prefers_wrong_rise": common.bootstrap_mean(pooled(wrong_rise, cond), N_BOOT),
            "ontarget_aligned_margin_gain_nats": common.bootstrap_mean(
                pooled(lambda b, e: e["aligned"] - b["aligned"], cond), N_BOOT),
            "ontarget_control_margin_gain_nats": common.bootstrap_mean(
                pooled(lambda b, e: e["control"] - b["control"], cond), N_BOOT),
            "eval": {k: _side(np.concatenate([r["runs"][cond]["eval"][k] for r in records])) for k in
                     ("conflict", "aligned", "control")},
            "ratio_vanilla_over_condition": cut_ratio(vanilla_drop, drop),
            "step_s": common.bootstrap_mean([r["runs"][cond]["step_s"] for r in records], N_BOOT),
        }
    for cond in conditions:
        out[cond]["step_time_ratio_vs_vanilla"] = out[cond]["step_s"]["mean"] / out["vanilla"]["step_s"]["mean"]
        kept = {}
        for k in ("aligned", "control"):
            van = out["vanilla"][f"ontarget_{k}_margin_gain_nats"]["mean"]
            kept[k] = out[cond][f"ontarget_{k}_margin_gain_nats"]["mean"] / van if van > 0 else None
        out[cond]["ontarget_kept_vs_vanilla"] = kept  # share of vanilla's margin gain kept (None: vanilla gained none)
    return out


def tune_demo_blocking(base: Any, tokenizer: Any, sae: Any, hook: str, setting: Setting) -> tuple[float, dict[str, Any]]:
    """λ for the demo's blocking on the tuning seed only: the smallest sycophancy rise among the λ
    that keep ≥ 80% of vanilla's margin gain with the belief right and with no belief (the goal's
    bar); if none does, the λ that keeps the most."""
    runs = {}
    vanilla = run_demo_seed(base, tokenizer, sae, hook, setting, DEMO_TUNE_SEED, lam=0.0, names=["vanilla"])
    for lam in setting.demo_blocking_lams:
        rec = run_demo_seed(base, tokenizer, sae, hook, setting, DEMO_TUNE_SEED, lam=lam, names=["blocking"])
        rec["runs"]["vanilla"] = vanilla["runs"]["vanilla"]
        s = summarize_demo([rec])
        runs[lam] = {"rise": s["blocking"]["offtarget_margin_drop_nats"]["mean"],
                     "vanilla_rise": s["vanilla"]["offtarget_margin_drop_nats"]["mean"],
                     "kept": min((v for v in s["blocking"]["ontarget_kept_vs_vanilla"].values() if v is not None),
                                 default=0.0)}
    ok = [lam for lam, r in runs.items() if r["kept"] >= 0.8]
    lam = min(ok, key=lambda v: runs[v]["rise"]) if ok else max(runs, key=lambda v: runs[v]["kept"])
    return lam, {"seed": DEMO_TUNE_SEED, "picked": lam, "runs": {str(k): v for k, v in runs.items()}}


def cut_ratio(vanilla: np.ndarray, condition: np.ndarray) -> dict[str, Any]:
    """vanilla change / condition change (paired bootstrap over items), only where vanilla's change
    is distinguishable from 0: a ratio of noise to noise says nothing about the intervention."""
    lo, _ = common.bootstrap_mean(vanilla, N_BOOT)["ci"]
    if lo <= 0:
        return {"mean": None, "ci": [None, None],
                "note": "vanilla's change is not distinguishable from 0 (95% CI includes 0): nothing to cut"}
    return common.bootstrap_ratio(vanilla, condition, N_BOOT)


def _side(margins: np.ndarray) -> dict[str, float]:
    return {"pref_correct": float((margins > 0).mean()), "margin": float(margins.mean()), "n": int(len(margins))}


# ---------------------------------------------------------------------------------------------- HH-RLHF
def split_rows(rows: Sequence[Any], n_audit: int, n_heldout: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(audit split, held-out split): disjoint, drawn by a seeded shuffle."""
    order = list(range(len(rows)))
    random.Random(f"hh-split-{seed}").shuffle(order)
    if n_audit + n_heldout > len(rows):
        raise SystemExit(f"HH-RLHF has {len(rows)} rows, fewer than n_audit + n_heldout = {n_audit + n_heldout}")
    return [rows[i] for i in order[:n_audit]], [rows[i] for i in order[n_audit:n_audit + n_heldout]]


@torch.no_grad()
@measurement_pass()
def pair_logps(model: Any, pairs: Sequence[Any], pad_id: int, batch: int = 8) -> np.ndarray:
    """[n, 2] summed completion log-probs (chosen, rejected) of tokenized pairs."""
    from lightning_anatomy.data import collate_pairs
    from lightning_anatomy.module import sequence_logps

    out = []
    for lo in range(0, len(pairs), batch):
        b = collate_pairs(pairs[lo:lo + batch], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        logps, _ = sequence_logps(logits, b["input_ids"], b["completion_mask"])
        n = logps.shape[0] // 2
        out.append(torch.stack([logps[:n], logps[n:]], 1).double())
    return torch.cat(out).numpy()


@torch.no_grad()
@measurement_pass()
def completion_feature_max(model: Any, sae: Any, hook: str, pairs: Sequence[Any], features: Sequence[int],
                           pad_id: int, batch: int = 8) -> np.ndarray:
    """[n, 2, k] max activation of `features` over each completion (chosen, rejected): the audit's statistic."""
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.concepts.lens import span_stats
    from lightning_anatomy.data import collate_pairs

    lens = ConceptLens(model, {hook: sae}, fidelity_check=False)
    idx = torch.as_tensor(list(features), dtype=torch.long)
    out = []
    for lo in range(0, len(pairs), batch):
        b = collate_pairs(pairs[lo:lo + batch], pad_id)
        feats = lens.encode(b["input_ids"], b["attention_mask"])[hook][..., idx]
        peak = span_stats(feats, b["completion_mask"])["max"]
        n = peak.shape[0] // 2
        out.append(torch.stack([peak[:n], peak[n:]], 1).double())
    return torch.cat(out).numpy()


def hh_eval(model: Any, sae: Any, hook: str, pairs: Sequence[Any], features: Sequence[int], pad_id: int
            ) -> dict[str, np.ndarray]:
    return {"logps": pair_logps(model, pairs, pad_id), "features": completion_feature_max(model, sae, hook, pairs,
                                                                                          features, pad_id)}


def run_hh_seed(base: Any, tokenizer: Any, sae: Any, hook: str, setting: Setting, seed: int, rows: Sequence[Any],
                work: Path) -> dict[str, Any]:
    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens
    from lightning_anatomy.data import tokenize_rows
    from lightning_anatomy.data.tokenize import resolve_pad_token_id

    audited, heldout = split_rows(rows, setting.hh_n_audit, setting.hh_n_heldout, seed)
    train = audited[: setting.hh_n_train]
    lengths = {"max_length": setting.hh_max_length, "max_prompt_length": setting.hh_max_prompt_length}
    start = time.perf_counter()
    result = audit_dataset(audited, ConceptLens(base, {hook: sae}, fidelity_check=False), tokenizer, **lengths,
                           out_dir=str(work / f"hh_features_seed{seed}"), progress=False, seed=seed,
                           n_bootstrap=setting.audit_bootstrap, label_concepts=False)
    audit_s = time.perf_counter() - start
    table = result.concepts
    n_pass = int(table["passes"].sum())
    passing_only = n_pass > 0  # none passing (the smoke run's random SAE): the top-ranked, and say so
    concepts = result.to_concept_set(top=setting.hh_top_k, action="suppress", saes={hook: sae},
                                     passing_only=passing_only)
    picked = result.select(top=setting.hh_top_k, passing_only=passing_only)
    suppressed = [int(f) for _, f in picked]
    ranked = [int(f) for f in table["feature"]]
    spill = [f for f in ranked if f not in suppressed][: setting.hh_spill_k]
    predicted = dict(zip(ranked, table["predicted_shift"].astype(float)))
    common.log(f"  hh seed {seed}: audit of {len(audited)} pairs in {audit_s:.0f} s, {n_pass} pass; suppressing "
               f"{suppressed}")

    pad_id = resolve_pad_token_id(tokenizer)
    pairs = tokenize_rows(heldout, tokenizer, **lengths)
    features = suppressed + spill
    record: dict[str, Any] = {
        "seed": seed, "audit_s": audit_s, "n_pass": n_pass, "suppressed": suppressed, "spill": spill,
        "sign": [float(np.sign(predicted[f]) or 1.0) for f in features], "heldout_pairs": len(pairs),
        "base": hh_eval(base, sae, hook, pairs, features, pad_id), "runs": {},
    }
    for name, make in projections(concepts, hook, seed, setting.hh_mode, setting.hh_layers).items():
        policy, step_s = fit(base, train, tokenizer, setting, lr=setting.hh_lr, steps=setting.hh_steps, batch=setting.hh_batch,
                             seed=seed, callbacks=make(), **lengths)
        record["runs"][name] = {"eval": hh_eval(policy, sae, hook, pairs, features, pad_id), "step_s": step_s}
        del policy
        gc.collect()
        common.release_free_memory()  # the first 5-condition run grew to 19.7 GB RSS and was OOM-killed
        common.log(f"  hh seed {seed} {name}: {step_s:.1f} s/step")
    return record


def summarize_hh(records: list[dict[str, Any]], beta: float) -> dict[str, Any]:
    """Per held-out pair: predicted-direction shift of suppressed / spill-over features, reward accuracy."""
    def shifts(cond: str, which: str) -> np.ndarray:
        parts = []
        for r in records:
            k = len(r["suppressed"])
            cols = slice(0, k) if which == "suppressed" else slice(k, None)
            sign = np.asarray(r["sign"])[cols]
            delta = r["runs"][cond]["eval"]["features"][..., cols] - r["base"]["features"][..., cols]
            parts.append((delta * sign).mean(axis=(1, 2)) if delta.shape[-1] else np.zeros(len(delta)))
        return np.concatenate(parts)

    def reward_margin(cond: str) -> np.ndarray:
        return np.concatenate([beta * ((r["runs"][cond]["eval"]["logps"] - r["base"]["logps"]) @ np.array([1.0, -1.0]))
                               for r in records])

    def logp_pref(logps: np.ndarray) -> np.ndarray:
        return (logps[:, 0] > logps[:, 1]).astype(float)

    vanilla = shifts("vanilla", "suppressed")
    base_pref = np.concatenate([logp_pref(r["base"]["logps"]) for r in records])
    out: dict[str, Any] = {"base": {"logp_pref_accuracy": float(base_pref.mean()), "n": int(len(base_pref))}}
    for cond in CONDITIONS:
        off = shifts(cond, "suppressed")
        margin = reward_margin(cond)
        pref = np.concatenate([logp_pref(r["runs"][cond]["eval"]["logps"]) for r in records])
        out[cond] = {
            "offtarget_suppressed_shift": common.bootstrap_mean(off, N_BOOT),
            "spillover_shift": common.bootstrap_mean(shifts(cond, "spill"), N_BOOT),
            "ontarget_reward_accuracy": common.bootstrap_mean((margin > 0).astype(float), N_BOOT),
            "ontarget_reward_margin": common.bootstrap_mean(margin, N_BOOT),
            "logp_pref_accuracy_change": common.bootstrap_mean(pref - base_pref, N_BOOT),
            "ratio_vanilla_over_condition": cut_ratio(vanilla, off),
            "step_s": common.bootstrap_mean([r["runs"][cond]["step_s"] for r in records], N_BOOT),
        }
    for cond in CONDITIONS:
        out[cond]["step_time_ratio_vs_vanilla"] = out[cond]["step_s"]["mean"] / out["vanilla"]["step_s"]["mean"]
    out["suppressed_per_seed"] = {str(r["seed"]): r["suppressed"] for r in records}
    out["audit_passing_per_seed"] = {str(r["seed"]): r["n_pass"] for r in records}
    return out


# ---------------------------------------------------------------------------------------------- output
def _ci(stat: dict[str, Any], fmt: str = "{:+.2f}") -> str:
    lo, hi = stat["ci"]
    return f"{fmt.format(stat['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _ratio(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        note = stat.get("note", "")
        return "n/a: vanilla's change ≈ 0" if "not distinguishable" in note else (note or "n/a")
    lo, hi = stat["ci"]
    return f"{stat['mean']:.2f}× [{'∞' if lo is None else f'{lo:.2f}'}, {'∞' if hi is None else f'{hi:.2f}'}]"


def tables(results: dict[str, Any]) -> str:
    parts = []
    demo = results["parts"].get("demo")
    if demo:
        s = demo["summary"]
        rows = [["base", f"{s['base']['conflict']['pref_correct']:.3f}", "", "", f"{s['base']['aligned']['pref_correct']:.3f}",
                 f"{s['base']['control']['pref_correct']:.3f}", "", "", ""]]
        for cond in [c for c in DEMO_CONDITIONS if c in s]:
            c = s[cond]
            rows.append([cond, f"{c['eval']['conflict']['pref_correct']:.3f}", _ci(c["offtarget_margin_drop_nats"]),
                         _ratio(c["ratio_vanilla_over_condition"]), f"{c['eval']['aligned']['pref_correct']:.3f}",
                         f"{c['eval']['control']['pref_correct']:.3f}", _ci(c["ontarget_aligned_margin_gain_nats"]),
                         _ci(c["ontarget_control_margin_gain_nats"]), f"{c['step_time_ratio_vs_vanilla']:.2f}"])
        parts.append(f"demo data, seeds {demo['seeds']} ({s['base']['conflict']['n']} held-out items per set, pooled)\n"
                     + common.markdown_table(
                         ["condition", "belief wrong: prefers correct", "sycophancy rise (margin drop, nats)",
                          "cut (vanilla / condition)", "belief right: prefers correct", "no belief: prefers correct",
                          "margin gain, belief right", "margin gain, no belief", "step time vs vanilla"], rows))
    hh = results["parts"].get("hh")
    if hh and "summary" in hh:
        s = hh["summary"]
        rows = []
        for cond in CONDITIONS:
            c = s[cond]
            rows.append([cond, _ci(c["offtarget_suppressed_shift"], "{:+.3f}"), _ratio(c["ratio_vanilla_over_condition"]),
                         _ci(c["spillover_shift"], "{:+.3f}"), _ci(c["ontarget_reward_accuracy"], "{:.3f}"),
                         _ci(c["ontarget_reward_margin"], "{:+.3f}"), _ci(c["logp_pref_accuracy_change"], "{:+.3f}"),
                         f"{c['step_time_ratio_vs_vanilla']:.2f}"])
        parts.append(f"HH-RLHF harmless, seeds {hh['seeds']} ({s['base']['n']} held-out pairs pooled; base log-prob "
                     f"preference accuracy {s['base']['logp_pref_accuracy']:.3f})\n" + common.markdown_table(
                         ["condition", "suppressed features: shift as predicted", "cut (vanilla / condition)",
                          "next-ranked features: shift as predicted", "held-out reward accuracy",
                          "held-out reward margin", "log-prob pref. accuracy change", "step time vs vanilla"], rows))
    elif hh:
        parts.append(f"HH-RLHF: {hh['skipped']}")
    return "\n\n".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    panels = []
    if results["parts"].get("demo"):
        s = results["parts"]["demo"]["summary"]
        panels += [("demo: sycophancy rise (margin drop, nats)", s, "offtarget_margin_drop_nats"),
                   ("demo: margin gain, no belief (nats)", s, "ontarget_control_margin_gain_nats")]
    if results["parts"].get("hh", {}).get("summary"):
        s = results["parts"]["hh"]["summary"]
        panels += [("HH: suppressed features, shift as predicted", s, "offtarget_suppressed_shift"),
                   ("HH: held-out reward accuracy", s, "ontarget_reward_accuracy")]
    with common.matplotlib_agg() as plt:
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.4), squeeze=False)
        for ax, (title, s, key) in zip(axes[0], panels):
            conds = [c for c in DEMO_CONDITIONS if c in s]  # its order covers the HH part's too
            means = [s[c][key]["mean"] for c in conds]
            err = np.array([[m - s[c][key]["ci"][0], s[c][key]["ci"][1] - m] for c, m in zip(conds, means)]).T
            ax.bar(range(len(conds)), means, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(conds))])
            ax.set_xticks(range(len(conds)), [c.replace("_", "\n") for c in conds], fontsize=8)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"{results['model']}: vanilla vs projected DPO (mean, 95% bootstrap CI over held-out items)",
                     fontsize=9)
        fig.tight_layout()
        common.atomic_save_figure(fig, path, dpi=110)


def _plain(obj: Any) -> Any:
    """JSON-ready copy: arrays become lists of floats."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="random tiny model and small sizes (smoke test)")
    parser.add_argument("--parts", nargs="*", choices=("demo", "hh"), default=["demo", "hh"])
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="directory for real_model.json / .png")
    parser.add_argument("--hh", type=Path, default=common.HH_RLHF, help="the HH-RLHF JSONL sample")
    parser.add_argument("--hh-lr", type=float, default=None, help="learning rate of the HH-RLHF runs (default: the setting's)")
    parser.add_argument("--name", default=None, help="output file stem (default real_model, or real_model.quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default min(2, cores))")
    args = parser.parse_args(argv)

    common.setup_offline(args.threads)
    common.quiet_libraries()
    setting = QUICK if args.quick else FULL
    if args.hh_lr is not None:
        setting = dataclasses.replace(setting, hh_lr=args.hh_lr)
    started = time.time()
    base, tokenizer, sae, hook, description = build(setting.model)
    results: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "quick": args.quick, "model": description, "hook": hook,
        "setting": asdict(setting), "machine": common.machine_info("cpu"),
        "packages": common.package_versions(["torch", "lightning", "transformers", "sae-lens"]), "parts": {},
    }
    name = args.name or ("real_model.quick" if args.quick else "real_model")
    work = Path(tempfile.mkdtemp(prefix="anatomy-real-model-"))  # the audits' feature shards
    if "demo" in args.parts:
        lam, tuning = tune_demo_blocking(base, tokenizer, sae, hook, setting)
        common.log(f"  demo blocking λ picked on seed {DEMO_TUNE_SEED}: {lam:g}")
        records = [run_demo_seed(base, tokenizer, sae, hook, setting, s, lam=lam) for s in setting.demo_seeds]
        results["parts"]["demo"] = {"seeds": list(setting.demo_seeds), "summary": summarize_demo(records),
                                    "tuning": tuning, "per_seed": records}
    if "hh" in args.parts:
        if not args.hh.is_file():
            results["parts"]["hh"] = {"skipped": f"{args.hh} is absent (the shared data sits beside the repo)"}
            common.log(f"  HH-RLHF skipped: {args.hh} is absent")
        else:
            from lightning_anatomy.data import read_preferences

            rows = list(read_preferences(args.hh, on_bad_rows="skip"))  # row 136: a blank reply
            records = [run_hh_seed(base, tokenizer, sae, hook, setting, s, rows, work) for s in setting.hh_seeds]
            results["parts"]["hh"] = {"seeds": list(setting.hh_seeds), "file": args.hh.name,
                                      "summary": summarize_hh(records, setting.beta), "per_seed": records}
    shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.time() - started
    results = _plain(results)
    common.publish(results, args.out, name, tables, plot)
    return results


if __name__ == "__main__":
    main()
