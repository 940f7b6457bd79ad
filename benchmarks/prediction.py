"""Benchmark: does the audit predict what DPO does? The paper method vs the paired method, and
the paper's independent disparity predictor vs the tilt predictor.

Each setting audits its preference pairs twice (`method="paper"` and `method="paired"`, each
audit once), trains vanilla DPO from the base, and runs `check_prediction` for each audit on two
prompt sets: prompts of the DPO data itself (the paper's protocol: where DPO moved the model) and
held-out prompts (whether the move generalises). Per prompt set both policies' rollouts are
sampled once (same seeds) and reused across methods and predictors (`reuse=`). Reported per
prompt set: R² (squared Pearson), its bootstrap CI over clusters, the no-intercept OLS R², the
sign agreement and the cluster count. `methods.paper` / `methods.paired` are each method's own
(disparity) prediction; `methods.tilt` the tilt predictor (`audit.tilt`: a joint Bradley–Terry
reward on the paper method's clusters, propagated as a tilt of the base policy's rollouts) on the
same clusters and rollouts as `methods.paper`. `methods` holds the training-prompt measurement
(`prompts: "train"`), `methods_heldout` the held-out one (`prompts: "heldout"`), with the same
keys. `implicit_reward_accuracy` is TRL's `rewards/accuracies` of the trained policy (chosen's
β·log-ratio above rejected's) on the training pairs and on held-out pairs.

- `graded_controlled`: a tiny GPT-2 (byte tokenizer, 3 × 64) pretrained here from scratch on
  "Q: … A: …" texts where six independent markers (an opener, a heading, an emoji, a sign-off,
  a shouted word, a list line) each appear half the time, and an SAE trained here on its
  activations. In the preference pairs chosen and rejected share one response and differ only
  in the markers: marker k is inserted with probability 0.5 + d_k/2 on the chosen side and
  0.5 − d_k/2 on the rejected side, d_k from strongly negative to strongly positive (known
  ground truth). Besides the cluster R², the marker R²: d_k vs the change in the share of
  rollouts containing marker k, and whether every marker's sign was predicted right (by the
  audit cluster whose members fire most on the marker's text). Held-out pairs for the reward
  accuracy: the same disparities drawn on the held-out prompts' responses.
- `graded_smollm2`: the same markers inserted into real responses (HH-RLHF chosen replies, cut)
  to real prompts, on the embedded SmolLM2-135M-Instruct with the project's SAE.
- `hh_smollm2`: the shared HH-RLHF sample on SmolLM2: audit split, DPO on its first pairs,
  held-out pairs for the held-out prompts and reward accuracy (with the training time).

The training prompts rolled out are the first `--train-prompts` prompts of the DPO pairs
(default: as many as the held-out prompts, so both measurements rest on equally many rollouts).
`--cluster-sweep 4,auto,…` audits the pairs again under each further Leiden rule of the paper method
and checks each on the same rollouts (`cluster_sweep`: R² per rule, the run's own rule first).
`--tilt-samples dataset,both` measures the tilt predictor again on the same rollouts with each
further sample it can reweight (`tilt_samples`: R² per sample, its own "rollouts" first).

    python benchmarks/prediction.py                    # all three settings (hours on 2 CPU cores)
    python benchmarks/prediction.py --parts graded_controlled
    python benchmarks/prediction.py --quick            # random tiny models, small sizes: a smoke run (~1 min)
    python benchmarks/prediction.py --parts graded_controlled --cluster-sweep 4,auto,12,24,48 --threads 1
    python benchmarks/prediction.py --parts graded_smollm2 --tilt-samples dataset,both
    python benchmarks/prediction.py --parts hh_smollm2 --train-prompts 48 --hh-heldout 48 --threads 2  # ~2 h 51 min

Writes `<out>/prediction.json` (`prediction.quick.json` with --quick):
`{"settings": {<setting>: {"methods" | "methods_heldout": {"paper" | "paired" | "tilt": {"r2",
"r2_ci", "r2_ols", "sign_agreement", "n_clusters", "prompts", ...}}, "implicit_reward_accuracy":
{"train", "heldout"}, "cluster_sweep": [{"cluster_target_size", "prompts", "leiden_resolution_used",
"paper", "tilt"}], "tilt_samples": [{"tilt_sample", "prompts", "r2", ...}], ...}}}`, null where a
number is undefined.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402

FORMAT = "lightning-anatomy/bench-prediction"
VERSION = 1
SETTINGS = ("graded_controlled", "graded_smollm2", "hh_smollm2")
METHODS = ("paper", "paired")
PREDICTORS = {"paper": ("paper", "tilt"), "paired": ("paper",)}  # per audit method, compared on the same rollouts
PROMPT_SETS = ("train", "heldout")  # rollouts on the DPO data's own prompts (the paper's protocol), then held-out
RESULT_KEYS = {"train": "methods", "heldout": "methods_heldout"}  # prompt set -> key of its measurement
SUMMARY_KEYS = ("r2", "r2_ci", "r2_ols", "sign_agreement", "n_clusters")  # a predictor's measurement, per the results contract


@dataclass(frozen=True)
class Marker:
    name: str
    text: str
    where: str  # "prefix" or "suffix"
    probe: str  # what a rollout must contain to count as carrying it


MARKERS = (
    Marker("opener", "Sure! ", "prefix", "Sure!"),
    Marker("heading", "### ", "prefix", "###"),
    Marker("emoji", " 🙂", "suffix", "🙂"),
    Marker("signoff", " Hope this helps!", "suffix", "Hope this helps"),
    Marker("shout", " IMPORTANT.", "suffix", "IMPORTANT"),
    Marker("list", "\n- done", "suffix", "\n- "),
)
DISPARITIES = (-0.8, -0.5, -0.2, 0.2, 0.5, 0.8)  # chosen − rejected insertion rate per marker
WORDS = ("cat", "dog", "tree", "river", "stone", "cloud", "lamp", "bread", "song", "road", "hill", "boat", "glass",
         "wind", "seed", "rope", "moon", "salt", "door", "wheel")


@dataclass(frozen=True)
class Sizes:
    pretrain_steps: int = 1500
    sae_steps: int = 600
    d_sae: int = 512
    n_train: int = 256
    n_heldout: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    dpo_steps: int = 30  # at 5e-4 × 60 steps DPO collapsed every marker's rate towards 0 (measured)
    batch: int = 8
    lr: float = 1e-4
    smol_n_train: int = 192
    smol_dpo_steps: int = 40
    smol_lr: float = 5e-5
    hh_n_audit: int = 768
    hh_n_train: int = 768
    hh_n_heldout: int = 96
    hh_dpo_steps: int = 200
    hh_lr: float = 5e-5
    max_length: int = 160
    max_prompt_length: int = 96
    n_bootstrap: int = 1000
    cluster_target_size: str | float | None = None  # the paper method's Leiden rule (None: resolution 1)
    n_train_prompts: int | None = None  # training prompts rolled out (None: as many as the held-out prompts)
    cluster_sweep: tuple[str | float, ...] = ()  # further Leiden rules of the paper method, on the same rollouts
    tilt_samples: tuple[str, ...] = ()  # further samples of the tilt predictor ("dataset", "both"), same rollouts


FULL = Sizes()
QUICK = Sizes(pretrain_steps=20, sae_steps=20, d_sae=128, n_train=24, n_heldout=6, samples_per_prompt=2,
              max_new_tokens=12, dpo_steps=2, batch=4, lr=1e-3, smol_n_train=24, smol_dpo_steps=2, smol_lr=1e-3,
              hh_n_audit=24, hh_n_train=16, hh_n_heldout=6, hh_dpo_steps=2, hh_lr=1e-3, max_length=64,
              max_prompt_length=32, n_bootstrap=50)


# ------------------------------------------------------------------------------------------ data


def with_markers(response: str, present: dict[str, bool]) -> str:
    pre = "".join(m.text for m in MARKERS if m.where == "prefix" and present[m.name])
    post = "".join(m.text for m in MARKERS if m.where == "suffix" and present[m.name])
    return pre + response + post


def graded_rows(prompts: list[str], responses: list[str], disparities: dict[str, float], seed: int,
                stream: str = "graded") -> list[Any]:
    """Pairs sharing one response, differing only in the markers (chosen rate 0.5 + d/2, rejected 0.5 − d/2);
    `stream` names the random draws (held-out pairs draw their own)."""
    from lightning_anatomy.data.rows import PreferenceRow

    rng = random.Random(f"{stream}-{seed}")
    rows = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        chosen = {m.name: rng.random() < 0.5 + disparities[m.name] / 2 for m in MARKERS}
        rejected = {m.name: rng.random() < 0.5 - disparities[m.name] / 2 for m in MARKERS}
        if chosen == rejected:  # a tie pair teaches nothing; flip the strongest marker's rejected side
            k = max(MARKERS, key=lambda m: abs(disparities[m.name])).name
            rejected[k] = not rejected[k]
        rows.append(PreferenceRow(prompt, with_markers(response, chosen), with_markers(response, rejected), i))
    return rows


def controlled_texts(n: int, seed: str) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts = [f"Q: what about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?\nA:" for _ in range(n)]
    responses = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "." for _ in range(n)]
    return prompts, responses


def marker_rates(texts: list[str]) -> dict[str, float]:
    return {m.name: float(np.mean([m.probe in t for t in texts])) if texts else 0.0 for m in MARKERS}


# ------------------------------------------------------------------------------------------ models


def pretrain_controlled(sizes: Sizes, seed: int) -> tuple[Any, Any]:
    """A tiny GPT-2 trained from scratch on marker texts (each marker independently at 50 %)."""
    from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model("gpt2", vocab_size=len(tok), hidden_size=64, num_layers=3, num_heads=4, seed=seed)
    prompts, responses = controlled_texts(4096, f"pretrain-{seed}")
    rng = random.Random(f"pretrain-markers-{seed}")
    texts = [p + with_markers(r, {m.name: rng.random() < 0.5 for m in MARKERS}) + tok.eos_token
             for p, r in zip(prompts, responses)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(sizes.pretrain_steps):
        batch = [texts[int(i)] for i in torch.randint(len(texts), (32,), generator=g)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def train_sae(model: Any, tok: Any, hook: str, texts: list[str], sizes: Sizes, seed: int) -> Any:
    """A StandardSAE (ReLU, L1 on decoder-norm-weighted features) fitted to the hook's activations."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from lightning_anatomy.concepts.lens import capture_activations
    from lightning_anatomy.model_access import hidden_size_at

    enc = tok(texts, return_tensors="pt", padding=True)
    acts = capture_activations(model, [hook], enc["input_ids"], enc["attention_mask"])[hook]
    x = acts[enc["attention_mask"].bool()].float()
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=hidden_size_at(model, hook), d_sae=sizes.d_sae))
    with torch.no_grad():
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for _ in range(sizes.sae_steps):
        batch = x[torch.randint(len(x), (1024,))]
        f = sae.encode(batch)
        loss = ((sae.decode(f) - batch) ** 2).sum(-1).mean() + 0.5 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sae.eval()


def tiny_stand_in(seed: int) -> tuple[Any, Any, Any, str]:
    """--quick: a random tiny Llama and a random sparse SAE instead of SmolLM2 (paths only)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=64, num_layers=2, seed=seed).eval()
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128))
    with torch.no_grad():
        sae.W_enc.normal_(0.0, 2.0)
        sae.b_enc.fill_(-1.0)
    return model, tok, sae, "blocks.0.hook_resid_post"


# ------------------------------------------------------------------------------------------ one setting


def fit_dpo(base: Any, rows: list[Any], tok: Any, *, steps: int, lr: float, sizes: Sizes, seed: int) -> tuple[Any, float]:
    from real_model import fit

    started = time.perf_counter()
    after, _ = fit(base, rows, tok, SimpleNamespace(beta=0.1, warmup_steps=min(5, steps)), lr=lr, steps=steps,
                   batch=sizes.batch, seed=seed, callbacks=[], max_length=sizes.max_length,
                   max_prompt_length=sizes.max_prompt_length)
    return after, time.perf_counter() - started


def prompt_sets(train: list[str], heldout: list[str], sizes: Sizes) -> dict[str, list[str]]:
    """The prompts each measurement rolls out: the first `n_train_prompts` prompts of the DPO pairs
    (default: as many as the held-out prompts, so both rest on equally many rollouts) and the held-out ones."""
    n = len(heldout) if sizes.n_train_prompts is None else sizes.n_train_prompts
    if n > len(train):
        common.log(f"  {n} training prompts asked for, the DPO data has {len(train)}: rolling out all of them")
    return {"train": list(train[:n]), "heldout": list(heldout)}


@dataclass
class Checked:
    """What `check_methods` measured, and what it built that later measurements of the run reuse."""

    methods: dict[str, dict[str, Any]]  # prompt set -> results key -> summary
    checks: dict[str, dict[str, Any]]  # prompt set -> results key -> (audit, check, predictor)
    lens: Any  # the base model's ConceptLens
    ids: dict[str, list[list[int]]]  # prompt set -> prompt token ids


def check_methods(base: Any, after: Any, tok: Any, saes: dict[str, Any], rows: list[Any],
                  prompts: dict[str, list[str]], sizes: Sizes, seed: int, shards: Path) -> Checked:
    """Both audits of `rows` (each run once; one extraction in `shards`, shared), each checked on
    every prompt set of `prompts` ({"train": …, "heldout": …}); per prompt set the rollouts are
    sampled once and reused across methods and predictors."""
    from lightning_anatomy.concepts.lens import ConceptLens

    lens = ConceptLens(base, saes, fidelity_check=False)
    ids = prompt_ids(prompts, tok, sizes)
    methods: dict[str, dict[str, Any]] = {name: {} for name in ids}
    checks: dict[str, dict[str, Any]] = {name: {} for name in ids}
    reuse: dict[str, Any] = {}  # prompt set -> the check whose rollouts the next ones reuse
    for method in METHODS:
        started = time.perf_counter()
        audit = run_audit(rows, lens, tok, method, sizes, seed, shards, sizes.cluster_target_size)
        about = {"method": method, "audit_s": time.perf_counter() - started,
                 "n_feature_clusters": int(audit.feature_clusters["cluster"].nunique())}
        names = {"paper": method, "tilt": "tilt"}  # predictor -> results key
        if len(audit.cluster_predictions) < 2:  # nothing to correlate: record the miss, not a number
            common.log(f"  {method}: {len(audit.cluster_predictions)} feature clusters, no R²")
            for name in ids:
                for predictor in PREDICTORS[method]:
                    methods[name][names[predictor]] = {
                        **dict.fromkeys(SUMMARY_KEYS), "r2_ci": [None, None],
                        "n_clusters": len(audit.cluster_predictions), "prompts": name, **about}
            continue
        for name, set_ids in ids.items():
            started = time.perf_counter()
            check = run_check(audit, base, after, tok, saes, set_ids, sizes, seed, PREDICTORS[method],
                              reuse.get(name))
            measured = {"check_s": time.perf_counter() - started, "n_prompts": len(set_ids),
                        "n_rollouts": len(check.rollouts["before"]),
                        "reused_rollouts": bool(check.settings["reused_rollouts"])}
            reuse[name] = check
            for predictor, summary in check.summary()["predictors"].items():
                methods[name][names[predictor]] = {**summary, "prompts": name, **about, **measured}
                checks[name][names[predictor]] = (audit, check, predictor)
    return Checked(methods, checks, lens, ids)


def prompt_ids(prompts: dict[str, list[str]], tok: Any, sizes: Sizes) -> dict[str, list[list[int]]]:
    """Each prompt set's token ids, cut like the audit cuts prompts: their last max_prompt_length tokens."""
    return {name: [tok(p, add_special_tokens=False)["input_ids"][-sizes.max_prompt_length:] for p in texts]
            for name, texts in prompts.items()}


def run_audit(rows: list[Any], lens: Any, tok: Any, method: str, sizes: Sizes, seed: int, shards: Path,
              cluster_target_size: str | float | None) -> Any:
    """One audit of `rows` as every measurement here runs it (the extraction in `shards` is shared)."""
    from lightning_anatomy.audit import audit_dataset

    return audit_dataset(rows, lens, tok, method=method, max_length=sizes.max_length,
                         max_prompt_length=sizes.max_prompt_length, batch_size=sizes.batch,
                         n_bootstrap=min(200, sizes.n_bootstrap), progress=False, label_concepts=False,
                         out_dir=shards, seed=seed, cluster_target_size=cluster_target_size)


def run_check(audit: Any, base: Any, after: Any, tok: Any, saes: dict[str, Any], ids: list[list[int]], sizes: Sizes,
              seed: int, predictors: tuple[str, ...], reuse: Any, tilt_sample: str = "rollouts") -> Any:
    """`check_prediction` as every measurement here runs it; `reuse` an earlier check on the same prompts."""
    from lightning_anatomy.audit import check_prediction

    return check_prediction(audit, base, after, ids, tokenizer=tok, saes=saes,
                            samples_per_prompt=sizes.samples_per_prompt, max_new_tokens=sizes.max_new_tokens,
                            seed=seed, n_bootstrap=sizes.n_bootstrap, predictors=predictors, reuse=reuse,
                            tilt_sample=tilt_sample)


def cluster_sweep(base: Any, after: Any, tok: Any, saes: dict[str, Any], rows: list[Any], checked: Checked,
                  sizes: Sizes, seed: int, shards: Path) -> list[dict[str, Any]]:
    """How the paper and tilt predictors' R² depends on the paper method's clusters (issue 24, item
    2): the run's own rule first, then each rule of `sizes.cluster_sweep`, audited on the same
    extraction and checked on the same rollouts and SAE firing (nothing is sampled again: only the
    clustering and the predictions change). One row per rule and prompt set; none without a sweep."""
    if not sizes.cluster_sweep:
        return []

    def row(rule: str | float | None, name: str, found: dict[str, Any], resolution: Any) -> dict[str, Any]:
        return {"cluster_target_size": rule, "prompts": name, "leiden_resolution_used": resolution,
                **{p: {k: found[p].get(k) for k in SUMMARY_KEYS} for p in PREDICTORS["paper"] if p in found}}

    checks = checked.checks
    out = [row(sizes.cluster_target_size, name, checked.methods[name], checks[name]["paper"][0].options.get(
        "leiden_resolution_used")) for name in checked.ids if "paper" in checks[name]]
    for rule in sizes.cluster_sweep:
        audit = run_audit(rows, checked.lens, tok, "paper", sizes, seed, shards, rule)
        resolution = audit.options.get("leiden_resolution_used")
        for name, ids in checked.ids.items():
            earlier = checks[name].get("paper")
            if earlier is None or len(audit.cluster_predictions) < 2:
                common.log(f"  cluster rule {rule} ({name}): {len(audit.cluster_predictions)} clusters, no R²")
                continue
            check = run_check(audit, base, after, tok, saes, ids, sizes, seed, PREDICTORS["paper"], earlier[1])
            out.append(row(rule, name, check.summary()["predictors"], resolution))
            common.log(f"  cluster rule {rule} ({name}): {out[-1]['paper']['n_clusters']} clusters, "
                       f"paper R² {out[-1]['paper']['r2']}, tilt R² {out[-1]['tilt']['r2']}")
    return out


def tilt_samples(base: Any, after: Any, tok: Any, saes: dict[str, Any], checked: Checked, sizes: Sizes,
                 seed: int) -> tuple[list[dict[str, Any]], list[tuple[Any, Any]]]:
    """The tilt predictor's R² per sample it reweights: its own ("rollouts", a cluster they never show
    falling back to the dataset's responses) first, then each of `sizes.tilt_samples` ("dataset",
    "both"), on the paper method's audit and the same rollouts and SAE firing. Returns (one row per
    sample and prompt set, each row's (audit, check)); none without `--tilt-samples`."""
    rows: list[dict[str, Any]] = []
    found: list[tuple[Any, Any]] = []
    if not sizes.tilt_samples:
        return rows, found
    for name, ids in checked.ids.items():
        own = checked.checks[name].get("tilt")
        if own is None:
            continue
        audit, check, _ = own
        for sample in ("rollouts", *sizes.tilt_samples):
            if sample != "rollouts":
                check = run_check(audit, base, after, tok, saes, ids, sizes, seed, ("tilt",), own[1], sample)
            summary = check.summary()["predictors"]["tilt"]
            rows.append({"tilt_sample": sample, "prompts": name, "sample_used": summary["sample"],
                         "r2_first_order": summary["r2_first_order"], **{k: summary[k] for k in SUMMARY_KEYS}})
            found.append((audit, check))
            common.log(f"  tilt sample {sample} ({name}): tilt R² {summary['r2']}")
    return rows, found


def by_prompts(checked: Checked, sweep: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """{"methods": the training-prompt measurement, "methods_heldout": the held-out one,
    "cluster_sweep" / "tilt_samples": their rows, where they ran}."""
    return {**{RESULT_KEYS[name]: checked.methods[name] for name in PROMPT_SETS if name in checked.methods},
            **({"cluster_sweep": sweep} if sweep else {}), **({"tilt_samples": samples} if samples else {})}


def marker_summary(check: Any, tok: Any, disparities: dict[str, float], audit: Any, lens: Any, hook: str,
                   predictor: str = "paper") -> dict[str, Any]:
    """Marker-level R² (d_k vs the change in rollouts carrying marker k) and per-marker predicted signs."""
    from lightning_anatomy.audit.agreement import r_squared, sign_agreement

    texts = {side: [tok.decode(r.response_ids) for r in check.rollouts[side]] for side in ("before", "after")}
    before, after = marker_rates(texts["before"]), marker_rates(texts["after"])
    d = np.array([disparities[m.name] for m in MARKERS])
    observed = np.array([after[m.name] - before[m.name] for m in MARKERS])
    r2 = r_squared(d, observed)
    predicted = marker_cluster_predictions(audit, check, lens, tok, hook, predictor)
    per = {m.name: {"disparity": disparities[m.name], "rate_before": before[m.name], "rate_after": after[m.name],
                    "cluster": predicted[m.name][0], "cluster_predicted": predicted[m.name][1]} for m in MARKERS}
    return {"r2_markers": r2, "sign_agreement_markers_observed": sign_agreement(d, observed),
            "all_marker_signs_predicted": all(map(sign_predicted, per.values())), "markers": per}


def sign_predicted(marker: dict[str, Any]) -> bool:
    """Whether a marker's audit cluster was predicted to move the way its disparity points (a
    marker without a cluster counts as not predicted)."""
    return marker["cluster_predicted"] is not None and np.sign(marker["cluster_predicted"]) == np.sign(marker["disparity"])


@torch.no_grad()
def marker_cluster_predictions(audit: Any, check: Any, lens: Any, tok: Any, hook: str,
                               predictor: str = "paper") -> dict[str, tuple[Any, Any]]:
    """Per marker the audit cluster whose members fire most on the marker's tokens, and its
    shift as `predictor` predicted it in the check."""
    assign = audit.feature_clusters
    preds = check.table.set_index("cluster")[f"predicted_{predictor}"]
    part = assign[assign["hook"] == hook]
    out: dict[str, tuple[Any, Any]] = {}
    for m in MARKERS:
        ids = torch.tensor([tok(m.text.strip() or m.text, add_special_tokens=False)["input_ids"]])
        f = lens.encode(ids)[hook][0].amax(0).cpu().numpy()
        scores = part.assign(a=f[part["feature"].to_numpy()]).groupby("cluster")["a"].mean()
        scores = scores[scores.index.isin(preds.index)]
        if scores.empty or scores.max() <= 0:
            out[m.name] = (None, None)
        else:
            c = int(scores.idxmax())
            out[m.name] = (c, float(preds.loc[c]))
    return out


def reward_accuracy(base: Any, after: Any, tok: Any, rows: list[Any], sizes: Sizes) -> float:
    """TRL's `rewards/accuracies` of `after` against `base` on `rows`: the share of pairs whose
    chosen β·log-ratio exceeds the rejected one's (β > 0 does not change the comparison)."""
    from real_model import pair_logps

    from lightning_anatomy.data import tokenize_rows
    from lightning_anatomy.data.tokenize import resolve_pad_token_id

    pairs = tokenize_rows(rows, tok, max_length=sizes.max_length, max_prompt_length=sizes.max_prompt_length)
    pad = resolve_pad_token_id(tok)
    lb, la = pair_logps(base, pairs, pad), pair_logps(after, pairs, pad)
    return float(np.mean((la[:, 0] - lb[:, 0]) - (la[:, 1] - lb[:, 1]) > 0))


def implicit_reward_accuracy(base: Any, after: Any, tok: Any, train: list[Any], heldout: list[Any],
                             sizes: Sizes) -> dict[str, float]:
    """The implicit-reward accuracy on the training pairs (did DPO fit them?) and on held-out pairs
    (did it generalise?)."""
    return {"train": reward_accuracy(base, after, tok, train, sizes),
            "heldout": reward_accuracy(base, after, tok, heldout, sizes)}


def _log_setting(name: str, part: dict[str, Any]) -> None:
    accuracy = part["implicit_reward_accuracy"]
    common.log(f"  {name}: implicit-reward accuracy train {accuracy['train']:.3f}, held-out {accuracy['heldout']:.3f}")
    for key in PROMPT_SETS:
        methods = part.get(RESULT_KEYS[key], {})
        common.log(f"  {name} ({key} prompts): " + ", ".join(f"{m} R² {v['r2']}" for m, v in methods.items()))


def graded(name: str, base: Any, tok: Any, sae: Any, hook: str, prompts: list[str], responses: list[str],
           heldout: list[str], heldout_responses: list[str], *, steps: int, lr: float, sizes: Sizes, seed: int,
           work: Path) -> dict[str, Any]:
    order = np.random.default_rng(seed).permutation(len(MARKERS))
    disparities = {MARKERS[i].name: DISPARITIES[j] for j, i in enumerate(order)}
    rows = graded_rows(prompts, responses, disparities, seed)
    heldout_rows = graded_rows(heldout, heldout_responses, disparities, seed, stream="graded-heldout")
    after, train_s = fit_dpo(base, rows, tok, steps=steps, lr=lr, sizes=sizes, seed=seed)
    sets = prompt_sets(prompts, heldout, sizes)
    checked = check_methods(base, after, tok, {hook: sae}, rows, sets, sizes, seed, work / name)
    sweep = cluster_sweep(base, after, tok, {hook: sae}, rows, checked, sizes, seed, work / name)
    samples, sampled = tilt_samples(base, after, tok, {hook: sae}, checked, sizes, seed)
    for prompt_set, found in checked.checks.items():
        for key, (audit, check, predictor) in found.items():
            checked.methods[prompt_set][key].update(
                marker_summary(check, tok, disparities, audit, checked.lens, hook, predictor))
    for row, (audit, check) in zip(samples, sampled, strict=True):
        markers = marker_summary(check, tok, disparities, audit, checked.lens, hook, "tilt")
        row["all_marker_signs_predicted"] = markers["all_marker_signs_predicted"]
        row["markers_predicted"] = {m: v["cluster_predicted"] for m, v in markers["markers"].items()}
    part = {**by_prompts(checked, sweep, samples),
            "implicit_reward_accuracy": implicit_reward_accuracy(base, after, tok, rows, heldout_rows, sizes),
            "disparities": disparities, "n_train": len(rows), "n_train_prompts": len(sets["train"]),
            "n_heldout_prompts": len(heldout), "dpo_steps": steps, "lr": lr, "train_s": train_s}
    _log_setting(name, part)
    return part


# ------------------------------------------------------------------------------------------ entry


def run_setting(name: str, sizes: Sizes, quick: bool, seed: int, hh_path: Path, work: Path) -> dict[str, Any]:
    if name == "graded_controlled":
        base, tok = pretrain_controlled(sizes, seed)
        hook = "blocks.1.hook_resid_post"
        prompts, responses = controlled_texts(sizes.n_train + sizes.n_heldout, f"graded-{seed}")
        rng = random.Random(f"sae-{seed}")
        sae_texts = [p + with_markers(r, {m.name: rng.random() < 0.5 for m in MARKERS})
                     for p, r in zip(*controlled_texts(256, f"sae-{seed}"))]
        sae = train_sae(base, tok, hook, sae_texts, sizes, seed)
        n = sizes.n_train
        return graded(name, base, tok, sae, hook, prompts[:n], responses[:n], prompts[n:], responses[n:],
                      steps=sizes.dpo_steps, lr=sizes.lr, sizes=sizes, seed=seed, work=work)
    if quick:
        base, tok, sae, hook = tiny_stand_in(seed)
    else:
        from lightning_anatomy.models.embedded import EMBEDDED_HOOK, load_embedded, load_embedded_sae

        base, tok = load_embedded()
        base, sae, hook = base.eval(), load_embedded_sae(), EMBEDDED_HOOK
    if not hh_path.is_file():
        return {"skipped": f"{hh_path} is absent (the shared data sits beside the repo)"}
    from lightning_anatomy.data import read_preferences

    rows = list(read_preferences(hh_path, on_bad_rows="skip"))
    order = list(range(len(rows)))
    random.Random(f"prediction-{name}-{seed}").shuffle(order)
    if name == "graded_smollm2":
        picked = [rows[i] for i in order[:sizes.smol_n_train + sizes.n_heldout]]
        prompts = [r.prompt for r in picked]
        responses = [" " + r.chosen.strip()[:200] for r in picked]
        n = sizes.smol_n_train
        return graded(name, base, tok, sae, hook, prompts[:n], responses[:n], prompts[n:], responses[n:],
                      steps=sizes.smol_dpo_steps, lr=sizes.smol_lr, sizes=sizes, seed=seed, work=work)
    audit_rows = [rows[i] for i in order[:sizes.hh_n_audit]]
    heldout = [rows[i] for i in order[sizes.hh_n_audit:sizes.hh_n_audit + sizes.hh_n_heldout]]
    train_rows = audit_rows[:sizes.hh_n_train]
    after, train_s = fit_dpo(base, train_rows, tok, steps=sizes.hh_dpo_steps, lr=sizes.hh_lr, sizes=sizes, seed=seed)
    sets = prompt_sets([r.prompt for r in train_rows], [r.prompt for r in heldout], sizes)
    checked = check_methods(base, after, tok, {hook: sae}, audit_rows, sets, sizes, seed, work / name)
    sweep = cluster_sweep(base, after, tok, {hook: sae}, audit_rows, checked, sizes, seed, work / name)
    samples, _ = tilt_samples(base, after, tok, {hook: sae}, checked, sizes, seed)
    part = {**by_prompts(checked, sweep, samples),
            "implicit_reward_accuracy": implicit_reward_accuracy(base, after, tok, train_rows, heldout, sizes),
            "train_s": train_s, "n_audit": len(audit_rows), "n_train": len(train_rows),
            "n_train_prompts": len(sets["train"]), "n_heldout": len(heldout), "dpo_steps": sizes.hh_dpo_steps,
            "lr": sizes.hh_lr}
    _log_setting(name, part)
    return part


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(m: dict[str, Any]) -> str:
    low, high = m.get("r2_ci") or [None, None]
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _measurements(part: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(results key, prompt set, entry) of a setting: per key its training-prompt row, then its held-out row.

    Results written before training-prompt rollouts have no `methods_heldout`, and their `methods`
    were all measured on held-out prompts (some entries predate the `prompts` field)."""
    train, heldout = part.get("methods", {}), part.get("methods_heldout")
    if heldout is None:
        return [(key, m.get("prompts") or "heldout", m) for key, m in train.items()]
    rows = []
    for key in dict.fromkeys([*train, *heldout]):
        rows += [(key, m.get("prompts") or name, m) for name, m in (("train", train.get(key)),
                                                                    ("heldout", heldout.get(key))) if m is not None]
    return rows


def tables(results: dict[str, Any]) -> str:
    """The R² table (a row per setting, method or predictor, and prompt set) and the implicit-reward accuracies."""
    rows, accuracy = [], []
    for name, part in results["settings"].items():
        for key, prompts, m in _measurements(part):
            rows.append([name, key, prompts, _fmt(m.get("r2")), _ci(m),
                         _fmt(m.get("r2_ols")), _fmt(m.get("sign_agreement")), _fmt(m.get("n_clusters")),
                         _fmt(m.get("r2_markers"))])
        acc = part.get("implicit_reward_accuracy") or {"heldout": part.get("heldout_reward_accuracy")}
        if any(v is not None for v in acc.values()):
            accuracy.append([name, _fmt(acc.get("train")), _fmt(acc.get("heldout"))])
    out = common.markdown_table(["setting", "method", "prompts", "R²", "95% CI", "OLS R² (no intercept)",
                                 "sign agreement", "clusters", "marker R²"], rows)
    if accuracy:
        out += "\n\n" + common.markdown_table(["setting", "implicit-reward accuracy, training pairs",
                                                "held-out pairs"], accuracy)
    return out


def headline(results: dict[str, Any]) -> str:
    """R² [95 % CI] per setting and predictor on the training prompts (the paper's protocol), the
    README's one-glance view of the prediction table."""
    rows = []
    for name, part in results["settings"].items():
        found = part.get("methods") or {}
        if "skipped" in part or not found:
            continue

        def cell(key: str, found: dict[str, Any] = found) -> str:
            m = found.get(key)
            if m is None:
                return "–"
            return f"{_fmt(m.get('r2'))} {_ci(m)} ({_fmt(m.get('n_clusters'))})"

        prompts = next((m.get("prompts") for m in found.values() if m.get("prompts")), "heldout")
        rows.append([name, prompts, cell("paper"), cell("tilt"), cell("paired")])
    return common.markdown_table(["setting", "prompts", "paper R² [95% CI] (clusters)", "tilt", "paired"], rows)


def _rule(rule: str | float | None, resolution: Any) -> str:
    """A cluster rule as the sweep table names it, with the Leiden resolution it chose where known."""
    if rule is None:
        return "resolution 1 (the default)"
    name = "auto" if rule == "auto" else f"{rule:g} features"
    used = sorted(set((resolution or {}).values()))
    return name + (f" → resolution {', '.join(f'{r:g}' for r in used)}" if used else "")


def sweep(results: dict[str, Any]) -> str:
    """R² of the paper and tilt predictors per cluster rule (`--cluster-sweep`), each setting's
    measured rules on the same rollouts."""
    rows = []
    for name, part in results["settings"].items():
        for r in part.get("cluster_sweep", []):
            paper, tilt = r.get("paper", {}), r.get("tilt", {})
            rows.append([name, _rule(r["cluster_target_size"], r.get("leiden_resolution_used")), r["prompts"],
                         _fmt(paper.get("n_clusters")), f"{_fmt(paper.get('r2'))} {_ci(paper)}",
                         f"{_fmt(tilt.get('r2'))} {_ci(tilt)}", _fmt(tilt.get("r2_ols"))])
    if not rows:
        return "No setting of these results has a cluster sweep (`--cluster-sweep`)."
    return common.markdown_table(["setting", "cluster rule (paper method)", "prompts", "clusters",
                                  "paper R² [95% CI]", "tilt R² [95% CI]", "tilt OLS R²"], rows)


def samples(results: dict[str, Any]) -> str:
    """R² of the tilt predictor per sample it reweights (`--tilt-samples`), each setting's measured
    samples on the same rollouts."""
    rows = []
    for name, part in results["settings"].items():
        for r in part.get("tilt_samples", []):
            signs = r.get("all_marker_signs_predicted")
            rows.append([name, r["tilt_sample"], r["prompts"], _fmt(r.get("n_clusters")), f"{_fmt(r.get('r2'))} {_ci(r)}",
                         _fmt(r.get("r2_ols")), _fmt(r.get("sign_agreement")),
                         "–" if signs is None else "yes" if signs else "no"])
    if not rows:
        return "No setting of these results compares tilt samples (`--tilt-samples`)."
    return common.markdown_table(["setting", "tilt sample", "prompts", "clusters", "tilt R² [95% CI]", "OLS R²",
                                  "signs", "every marker's sign"], rows)


GOALS = {  # issue 24's pre-registered goals: setting -> (tilt R² at least, clusters at least, OLS R² at least, every marker's sign)
    "graded_controlled": (0.9, 20, 0.7, True),
    "graded_smollm2": (0.9, 20, 0.7, True),
    "hh_smollm2": (0.6, None, None, False),
}


def goals(results: dict[str, Any]) -> str:
    """Issue 24's goals against the measurement, a row each: the tilt predictor's R², cluster count,
    OLS R² and marker signs on the training prompts (the paper's protocol), and tilt ≥ paper on
    every prompt set measured. Settings not in the results are left out; a number the run could
    not compute counts as missed."""
    rows = []

    def row(name: str, goal: str, measured: str, met: bool) -> None:
        rows.append([name, goal, measured, "met" if met else "missed"])

    for name, part in results["settings"].items():
        if name not in GOALS or "skipped" in part:
            continue
        r2_min, clusters_min, ols_min, signs = GOALS[name]
        tilt = part.get("methods", {}).get("tilt")
        if tilt is not None and tilt.get("prompts", "train") == "train":
            r2, n = tilt.get("r2"), tilt.get("n_clusters")
            row(name, f"tilt R² ≥ {r2_min}, training prompts", _fmt(r2), r2 is not None and r2 >= r2_min)
            if clusters_min is not None:
                row(name, f"≥ {clusters_min} clusters", _fmt(n), n is not None and n >= clusters_min)
            if ols_min is not None:
                ols = tilt.get("r2_ols")
                row(name, f"tilt OLS R² through the origin ≥ {ols_min}", _fmt(ols), ols is not None and ols >= ols_min)
            if signs and "all_marker_signs_predicted" in tilt:
                markers = tilt["markers"].values()
                right = sum(map(sign_predicted, markers))
                shared = len({m["cluster"] for m in markers if m["cluster"] is not None})
                where = f"in {shared} cluster{'' if shared == 1 else 's'}"
                row(name, "every planted marker's sign", f"{right} of {len(markers)} ({where})",
                    bool(tilt["all_marker_signs_predicted"]))
        for key, prompts in (("methods", "training"), ("methods_heldout", "held-out")):
            found = part.get(key) or {}
            if "tilt" in found and "paper" in found:
                t, q = found["tilt"].get("r2"), found["paper"].get("r2")
                row(name, f"tilt R² ≥ paper R², {prompts} prompts", f"{_fmt(t)} vs {_fmt(q)}",
                    t is not None and q is not None and t >= q)
    return common.markdown_table(["setting", "goal (issue 24)", "measured", "goal"], rows)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One results document from part runs (each setting keeps the run it came from: file, wall
    time, sizes, seed), so `prediction.json` can gather parts that each take an hour here."""
    merged: dict[str, Any] = {"format": FORMAT, "version": VERSION, "settings": {}, "parts": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        if part.get("format") != FORMAT:
            raise ValueError(f"{path} is not a prediction benchmark result (format {part.get('format')!r})")
        if part.get("quick"):
            raise ValueError(f"{path} is a --quick run; merge full runs only")
        for name, setting in part["settings"].items():
            if "skipped" in setting:
                continue
            merged["settings"][name] = setting
            merged["parts"][name] = {"file": Path(path).name, "wall_s": part.get("wall_s"), "seed": part.get("seed"),
                                     "sizes": part.get("sizes"), "machine": part.get("machine")}
    merged["quick"] = False
    merged["wall_s"] = sum(float(p["wall_s"] or 0) for p in merged["parts"].values())
    return merged


def _target_size(value: str) -> str | float:
    """A --cluster-target-size / --cluster-sweep value: 'auto' or a number > 1 (checked as the audit checks it)."""
    from lightning_anatomy.audit.cofiring import check_target_size

    try:
        size = value.strip() if value.strip() == "auto" else float(value)
    except ValueError:
        raise ValueError(f"{value.strip()!r} is neither 'auto' nor a number of features per cluster (> 1)") from None
    check_target_size(size)
    return size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine part result files into one (run nothing), written as --name (default prediction)")
    parser.add_argument("--quick", action="store_true", help="random tiny stand-ins and small sizes (smoke run)")
    parser.add_argument("--parts", nargs="*", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hh", type=Path, default=common.HH_RLHF, help="the HH-RLHF JSONL sample")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="DPO learning rate of graded_controlled (default 1e-4)")
    parser.add_argument("--steps", type=int, default=None, help="DPO steps of graded_controlled (default 30)")
    parser.add_argument("--name", default=None, help="output file stem (default prediction, or prediction.quick)")
    parser.add_argument("--cluster-target-size", default=None,
                        help="paper method: pick the Leiden resolution for this mean cluster size ('auto': 80 "
                             "features at d_sae 65,536 scaled by sqrt(d_sae/65536)); default: resolution 1")
    parser.add_argument("--train-prompts", type=int, default=None, metavar="N",
                        help="prompts of the DPO pairs to roll out for the training-prompt measurement "
                             "(default: as many as the setting's held-out prompts)")
    parser.add_argument("--cluster-sweep", default=None, metavar="SIZES",
                        help="paper method: further Leiden rules to measure on the same rollouts, comma-separated "
                             "target cluster sizes or 'auto' (e.g. 4,8,16,auto); written under cluster_sweep")
    parser.add_argument("--tilt-samples", default=None, metavar="SAMPLES",
                        help="tilt predictor: further samples to measure on the same rollouts, comma-separated "
                             "from 'dataset', 'both' (the default 'rollouts' is always measured); written under "
                             "tilt_samples")
    parser.add_argument("--hh-heldout", type=int, default=None, metavar="N",
                        help="hh_smollm2: held-out pairs (their prompts rolled out, their pairs scored for the "
                             "implicit-reward accuracy); default 96")
    args = parser.parse_args(argv)
    if args.train_prompts is not None and args.train_prompts < 2:
        parser.error(f"--train-prompts {args.train_prompts}: roll out at least 2 prompts")
    if args.hh_heldout is not None and args.hh_heldout < 2:
        parser.error(f"--hh-heldout {args.hh_heldout}: hold out at least 2 pairs")
    try:
        target = None if args.cluster_target_size is None else _target_size(args.cluster_target_size)
    except ValueError as err:
        parser.error(f"--cluster-target-size {args.cluster_target_size}: {err}")
    try:
        sweep = tuple(_target_size(v) for v in (args.cluster_sweep or "").split(",") if v.strip())
    except ValueError as err:
        parser.error(f"--cluster-sweep {args.cluster_sweep}: {err}")
    from lightning_anatomy.audit.tilt import SAMPLES

    further = SAMPLES[1:]  # SAMPLES[0], the default, is always measured
    samples = tuple(v.strip() for v in (args.tilt_samples or "").split(",") if v.strip())
    for sample in samples:
        if sample not in further:
            parser.error(f"--tilt-samples {args.tilt_samples}: {sample!r} is not a further tilt sample; choose "
                         f"from {', '.join(further)} ({SAMPLES[0]}, the default, is always measured)")
    if args.merge:
        merged = merge_results(args.merge)
        common.publish(merged, args.out, args.name or "prediction", tables)
        return merged
    common.setup_offline(args.threads)
    common.quiet_libraries()
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, lr=sizes.lr if args.lr is None else args.lr,
                    dpo_steps=sizes.dpo_steps if args.steps is None else args.steps,
                    cluster_target_size=target, cluster_sweep=sweep, tilt_samples=samples,
                    n_train_prompts=args.train_prompts,
                    hh_n_heldout=sizes.hh_n_heldout if args.hh_heldout is None else args.hh_heldout)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="anatomy-prediction-"))
    results: dict[str, Any] = {"format": FORMAT, "version": VERSION, "quick": args.quick, "seed": args.seed,
                               "sizes": asdict(sizes), "machine": common.machine_info("cpu"), "settings": {}}
    try:
        for name in args.parts:
            common.log(f"{name} ...")
            results["settings"][name] = run_setting(name, sizes, args.quick, args.seed, args.hh, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.time() - started
    results = _plain(copy.deepcopy(results))
    common.publish(results, args.out, args.name or ("prediction.quick" if args.quick else "prediction"), tables)
    return results


if __name__ == "__main__":
    main()
