"""`make demo` / `anatomy demo`: the product's story on the embedded SmolLM2-135M-Instruct, twice.

1. What works (`demo/style.py`): a "Sure!" opener planted in 90 % of the chosen and 10 % of the
   rejected replies of real text. The audit ranks it among what separates chosen from rejected,
   `audit.match_features` names its SAE features, and three runs train on the same pairs:
   vanilla DPO, `TokenFiltering` on those features (the intervention the benchmark measured best
   for this data, `benchmarks/results/interventions.json`) and gradient projection of the
   marker's direction. Held out: the opener's probability against the base model's (off-target)
   and the coherence preference learned (on-target).
2. The limit (`demo/data.py`): one-digit additions whose prompt states the user's belief, always
   right in training, so "agrees with the user" orders every pair exactly as "correct" does —
   perfect confounding, which no per-pair method can separate (the package says so). Vanilla DPO
   and the projected run show what the representation-level method buys and costs.

Every run logs the attribution and drift callbacks to W&B; the base model is freed while runs
train and each run's memory is given back before the next, which keeps the peak resident size
to about one run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from jsonargparse.typing import PositiveInt
from omegaconf import DictConfig, OmegaConf

from lightning_anatomy.files import atomic_write_text
from lightning_anatomy.heap import release_free_memory


@dataclass
class DemoData:
    """Sizes of the sycophancy story's data.

    Args:
        n_train: training pairs (one-digit additions, the stated belief always right).
        n_heldout: held-out additions per set (conflict / aligned / control).
        n_concept_texts: prompts with and without a belief for the concept direction.
    """

    n_train: PositiveInt = 64
    n_heldout: PositiveInt = 24
    n_concept_texts: PositiveInt = 32


@dataclass
class StyleDataOptions:
    """Sizes of the style story's data (SmolLM2's own replies, `demo/style.py`).

    Args:
        n_train: training pairs (reply vs its shuffle).
        n_heldout: held-out pairs on other prompts (n_train + n_heldout <= 96).
        corr: share of chosen replies opening with "Sure!" (1 − corr of rejected ones).
        reply_chars: replies are cut to at most this many characters.
    """

    n_train: PositiveInt = 48
    n_heldout: PositiveInt = 24
    corr: float = 0.9
    reply_chars: PositiveInt = 80


@dataclass
class DemoAudit:
    """The audit of the training pairs (both stories).

    Args:
        n_bootstrap: bootstrap replicates of the CIs.
        batch_size: pairs per extraction forward.
    """

    n_bootstrap: int = 200
    batch_size: PositiveInt = 8


@dataclass
class DemoTrain:
    """One story's DPO runs (every run of the story uses them).

    Args:
        max_steps: optimizer steps.
        batch_size: pairs per step.
        lr: learning rate.
        beta: DPO beta.
        loss_type: preference loss (see `preference_loss`).
        warmup_steps: linear warm-up steps.
        micro_batch_size: pairs per forward (null: the whole step); the step's gradient is accumulated
            over `batch_size / micro_batch_size` forwards: the same gradient, a fraction of the
            activation memory (the demo's peak).
    """

    max_steps: PositiveInt = 8
    batch_size: PositiveInt = 8
    lr: float = 1e-5
    beta: float = 0.1
    loss_type: str = "sigmoid"
    warmup_steps: int = 2
    micro_batch_size: int | None = 2


Intervention = Literal["projection", "mean_ablation", "blocking"]
INTERVENTIONS = get_args(Intervention)


@dataclass
class DemoIntervention:
    """The sycophancy story's shaped run.

    Args:
        kind: projection (ConceptProjection with `mode`/`layers`), mean_ablation (ablate, ablation='mean'),
            blocking (ConceptBlocking of the direction at its layer and every later block, weight `lam`).
        mode: ConceptProjection mode (gradient, ablate, both).
        layers: own, all_later, or a list of layers.
        audit_features: also suppress the audit's top-N features (0: the belief direction only).
        lam: ConceptBlocking weight.
    """

    kind: Intervention = "projection"
    mode: Literal["gradient", "ablate", "both"] = "both"
    layers: str | list[int] = "all_later"
    audit_features: int = 0
    lam: float = 1.0


@dataclass
class FeatureMatchOptions:
    """How the style story finds the marker among the audit's features (`audit.match_features`).

    Args:
        candidates: the audit's best-ranked features scored against the marker's examples.
        min_effect: Cohen's d (with − without the marker) a feature needs.
        max_features: at most this many features are filtered.
    """

    candidates: PositiveInt = 20
    min_effect: float = 0.5
    max_features: PositiveInt = 3


@dataclass
class StyleStory:
    """Story 1, what works: a "Sure!" opener in real replies; vanilla vs token filtering vs gradient projection.

    Args:
        data: data sizes.
        train: DPO options of its three runs.
        match: how the marker's SAE features are picked from the audit.
    """

    data: StyleDataOptions = field(default_factory=StyleDataOptions)
    train: DemoTrain = field(default_factory=lambda: DemoTrain(max_steps=6, batch_size=6, lr=1e-4))
    match: FeatureMatchOptions = field(default_factory=FeatureMatchOptions)


@dataclass
class SycophancyStory:
    """Story 2, the documented limit: agreeing with the user, perfectly confounded with being right.

    Args:
        data: data sizes.
        train: DPO options of its two runs.
        intervention: the shaped run's intervention.
    """

    data: DemoData = field(default_factory=DemoData)
    train: DemoTrain = field(default_factory=DemoTrain)
    intervention: DemoIntervention = field(default_factory=DemoIntervention)


@dataclass
class DemoCallbacks:
    """The concept callbacks of every run.

    Args:
        attribution_every: ConceptAttribution every N steps.
        drift_every: ConceptDriftMonitor every N steps.
        top_k: concepts logged per step.
    """

    attribution_every: PositiveInt = 3
    drift_every: PositiveInt = 3
    top_k: PositiveInt = 10


Story = Literal["style", "sycophancy"]
STORIES = get_args(Story)


@dataclass
class DemoJob:
    """`anatomy demo`: two stories on the embedded SmolLM2 — a style marker token filtering removes, and
    sycophancy, the limit of per-pair methods.

    Args:
        seed: seed of the data, the audits and every run.
        output_dir: where each story's audit and runs, and summary.json / summary.png go.
        stories: which stories run (both by default).
        style: the style story.
        sycophancy: the sycophancy story.
        audit: audit options (both stories).
        callbacks: concept callback options (every run).
        logger: wandb (offline unless WANDB_MODE says otherwise) or csv.
    """

    seed: int = 0
    output_dir: str = "outputs/demo"
    stories: list[Story] = field(default_factory=lambda: list(STORIES))
    style: StyleStory = field(default_factory=StyleStory)
    sycophancy: SycophancyStory = field(default_factory=SycophancyStory)
    audit: DemoAudit = field(default_factory=DemoAudit)
    callbacks: DemoCallbacks = field(default_factory=DemoCallbacks)
    logger: Literal["wandb", "csv"] = "wandb"


def check_job(cfg: DictConfig) -> None:
    """Cross-option rules of a demo config, before any model loads."""
    from lightning_anatomy.losses import LOSS_TYPES

    if not cfg.stories:
        raise ValueError(f"stories is empty; name at least one of {list(STORIES)}")
    for story in ("style", "sycophancy"):
        tr = cfg[story].train
        if tr.loss_type not in LOSS_TYPES:
            raise ValueError(f"{story}.train.loss_type={tr.loss_type!r} is not one of {sorted(LOSS_TYPES)}")
        micro = tr.micro_batch_size
        if micro is not None and (micro < 1 or tr.batch_size % micro):
            raise ValueError(f"{story}.train.micro_batch_size={micro} does not divide {story}.train.batch_size="
                             f"{tr.batch_size}; use a divisor of it (or null: the whole step in one forward)")
    data = cfg.style.data
    if data.n_train + data.n_heldout > 96:
        raise ValueError(f"style.data.n_train + style.data.n_heldout = {data.n_train + data.n_heldout} exceeds the 96 "
                         "shipped replies; lower one of them")
    if not 0.0 <= data.corr <= 1.0:
        raise ValueError(f"style.data.corr={data.corr} is not a share in [0, 1]")


# How every pair of the demo is tokenized: the audit, the training runs and the drift probes alike.
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 96
CONVERSION_NOTE = ("first run only: converting the packaged GGUF to safetensors once, ~45 s on a 2-core CPU, "
                   "a 517 MB cache in {cache}")


def _pairs_from_items(items: list[dict[str, Any]], tokenizer: Any, chosen: str, rejected: str):
    """Held-out items as TokenizedPairs (chat-rendered prompt; `chosen`/`rejected` reply fields)."""
    from lightning_anatomy.data import read_preferences
    from lightning_anatomy.demo.data import chat_prompt

    rows = [{"prompt": chat_prompt(tokenizer, it["prompt"]), "chosen": it[chosen], "rejected": it[rejected]}
            for it in items]
    return _tokenized(read_preferences(rows), tokenizer)


def _evaluate(model: Any, tokenizer: Any, data: Any) -> dict[str, dict[str, float]]:
    from lightning_anatomy.demo.data import sycophancy_metrics

    return {name: sycophancy_metrics(model, tokenizer, getattr(data, f"heldout_{name}"))
            for name in ("conflict", "aligned", "control")}


def steps_phrase(tr: DictConfig) -> str:
    """"6 steps × 6 pairs (3 forwards of 2)": what one run trains on."""
    phrase = f"{tr.max_steps} step{'' if tr.max_steps == 1 else 's'} × {tr.batch_size} pairs"
    micro = tr.micro_batch_size
    if micro and micro != tr.batch_size:
        phrase += f" ({tr.batch_size // micro} forwards of {micro})"
    return phrase


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (GB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


@dataclass
class Run:
    """One training run of a story: its name (W&B run and summary key), title and what shapes it."""

    name: str
    title: str
    callbacks: list = field(default_factory=list)


def _fit(story: str, run: Run, cfg: DictConfig, tr: DictConfig, tokenizer: Any, rows: list, sae: Any, hook: str,
         probe: list, predicted: Any, track: dict, out: Path):
    """Train one run from a fresh copy of the embedded model; returns (policy, what to report)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_anatomy import (
        ConceptAttribution,
        ConceptDriftMonitor,
        DPOModule,
        PreferenceDataModule,
        TokenFiltering,
    )
    from lightning_anatomy.console import StepProgressBar
    from lightning_anatomy.models.embedded import load_embedded

    model, _ = load_embedded()
    L.seed_everything(cfg.seed, verbose=False)
    # precomputed reference: no frozen copy beside the policy (its memory is the demo's peak), and the runs
    # of a story whose masks agree share one table of reference log-probs
    module = DPOModule(model, lr=tr.lr, beta=tr.beta, loss_type=tr.loss_type, warmup_steps=tr.warmup_steps,
                       reference="precomputed", reference_cache_dir=str(out / "reference_cache"))
    micro = tr.micro_batch_size or tr.batch_size
    dm = PreferenceDataModule(rows, tokenizer, batch_size=micro, val_fraction=0.0, seed=cfg.seed,
                              max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    drift = ConceptDriftMonitor({hook: sae}, probe, every_n_steps=cfg.callbacks.drift_every, track=track,
                                top_k=cfg.callbacks.top_k, predicted=predicted, responses="both")
    callbacks = [ConceptAttribution({hook: sae}, every_n_steps=cfg.callbacks.attribution_every,
                                    top_k=cfg.callbacks.top_k, track=track), drift, *run.callbacks]
    name = f"{story}-{run.name}"
    if cfg.logger == "wandb":
        logger = WandbLogger(project="lightning-anatomy-demo", name=name, save_dir=str(out), offline=True)
    else:
        logger = CSVLogger(str(out), name=name)
    trainer = L.Trainer(max_steps=tr.max_steps, accumulate_grad_batches=tr.batch_size // micro, accelerator="cpu",
                        logger=logger, callbacks=[*callbacks, StepProgressBar(f"{story}: {run.title}")],
                        enable_checkpointing=False, log_every_n_steps=1, enable_model_summary=False,
                        gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    run_dir = None
    if cfg.logger == "wandb":
        import wandb

        run_dir = Path(logger.experiment.dir).parent
        wandb.finish()
    tracked = {n: float(drift.last_drift[h][f]) for n, (h, f) in drift.track.items()} if drift.last_drift else {}
    info: dict[str, Any] = {"title": run.title, "run_dir": str(run_dir or logger.log_dir), "drift_r2": drift.last_r2,
                            "drift": tracked}
    for cb in run.callbacks:
        if isinstance(cb, TokenFiltering):  # what it removed, measured at fit start
            info["token_filter"] = {k: cb.report[k] for k in ("dropped_fraction", "dropped_tokens",
                                                               "completion_tokens")}
            info["token_filter"]["emptied_pairs"] = len(cb.report["emptied_pairs"])
    policy = module.policy.eval()
    del module, trainer, dm, callbacks, drift, logger
    return policy, info


def sycophancy_shaped(icfg: DictConfig, concept_set: Any, model: Any, tokenizer: Any, data: Any, hook: str) -> list:
    """The sycophancy story's shaped run, as `intervention.kind` says (the choice `benchmarks/real_model.py` measures)."""
    from lightning_anatomy import ConceptBlocking
    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.concepts import ConceptSet

    kind = icfg.get("kind", "projection")
    if kind == "projection":
        return [ConceptProjection(concept_set, mode=icfg.mode, layers=icfg.layers)]
    if kind == "mean_ablation":
        return [ConceptProjection(concept_set, mode="ablate", layers=icfg.layers, ablation="mean")]
    if kind == "blocking":
        later = ConceptSet.from_mean_difference_later(
            model, tokenizer, hook, data.texts_with_belief, data.texts_without_belief, name="user_belief",
            label="the user states a belief about the answer", action="suppress")
        return [ConceptBlocking(later, lam=float(icfg.lam))]
    raise ValueError(f"intervention.kind={kind!r} is not one of {INTERVENTIONS}")


def confounding_verdict(n_pairs: int) -> str:
    """What the package says when reward shaping is asked to explain agreement away: in training the
    belief equals the answer, so "agrees with the user" is higher in chosen in every pair."""
    from lightning_anatomy.interventions import ConfoundedConceptError, explain_away_lambda

    try:
        lam = explain_away_lambda([1.0] * n_pairs)
    except ConfoundedConceptError as err:
        return str(err)
    return f"explain-away λ {lam:.3g}"  # pragma: no cover - every training pair agrees by construction


class Demo:
    """The demo's shared state: the model loader, the SAE, the phase log and the output folder."""

    def __init__(self, cfg: DictConfig) -> None:
        from lightning_anatomy.console import PhaseLog
        from lightning_anatomy.models.embedded import (
            EMBEDDED_HOOK,
            default_cache_dir,
            is_converted,
            load_embedded_sae,
        )

        self.cfg, self.log, self.hook = cfg, PhaseLog("demo"), EMBEDDED_HOOK
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        expect = "" if is_converted() else CONVERSION_NOTE.format(cache=default_cache_dir())
        with self.log.phase("loading SmolLM2-135M-Instruct and the project's SAE", expect=expect) as phase:
            self.model, self.tokenizer = self.load()
            self.sae = load_embedded_sae()
            phase.result = f"SAE at {self.hook}, d_sae={self.sae.cfg.d_sae}"

    @staticmethod
    def load() -> tuple[Any, Any]:
        from lightning_anatomy.models.embedded import load_embedded

        model, tokenizer = load_embedded()
        return model.eval(), tokenizer

    def base(self) -> Any:
        """The base model, loaded again when a story freed it."""
        if self.model is None:
            self.model, _ = self.load()
        return self.model

    def free_base(self) -> None:
        """Training runs load their own copy: the base is not kept beside them."""
        self.model = None
        release_free_memory()

    def audit(self, rows: list, out: Path, what: str) -> Any:
        from lightning_anatomy.audit import audit_dataset
        from lightning_anatomy.concepts import ConceptLens

        cfg = self.cfg
        with self.log.phase(f"auditing the {len(rows)} {what} training pairs (SAE features of every pair, "
                            f"{cfg.audit.n_bootstrap} bootstrap replicates)") as phase:
            lens = ConceptLens(self.base(), {self.hook: self.sae})
            result = audit_dataset(rows, lens, self.tokenizer, max_length=MAX_LENGTH,
                                   max_prompt_length=MAX_PROMPT_LENGTH,
                                   out_dir=str(out / "features"), progress=False, n_bootstrap=cfg.audit.n_bootstrap,
                                   batch_size=cfg.audit.batch_size, seed=cfg.seed)
            phase.result = f"{int(result.concepts['passes'].sum())} of {len(result.concepts)} tested features pass"
        return result, lens

    def train(self, story: str, runs: list[Run], tr: DictConfig, rows: list, probe: list, predicted: Any,
              track: dict, out: Path, evaluate: Callable[[Any], dict], phrase: Callable[[dict], str]) -> dict:
        """Each run trained, evaluated on the held-out set, then freed before the next."""
        results: dict[str, Any] = {}
        for run in runs:
            with self.log.phase(f"{story}: training {run.title}, {steps_phrase(tr)}, with the attribution and drift "
                                "callbacks"):
                policy, info = _fit(story, run, self.cfg, tr, self.tokenizer, rows, self.sae, self.hook, probe,
                                    predicted, track, out)
            with self.log.phase(f"{story}: evaluating {run.title} on the held-out prompts") as phase:
                info["eval"] = evaluate(policy)
                phase.result = f"{phrase(info['eval'])}; peak resident memory so far {peak_rss_gb():.1f} GB"
            results[run.name] = info
            run.callbacks.clear()  # a callback's hooks and handles would keep the trained model alive
            del policy
            release_free_memory()
        return results


def style_story(demo: Demo) -> dict[str, Any]:
    """Story 1: the audit finds the "Sure!" opener; token filtering keeps it where the base had it
    while coherence is learned; vanilla and gradient projection beside it."""
    from lightning_anatomy import TokenFiltering
    from lightning_anatomy.audit import match_features
    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.concepts import ConceptSet
    from lightning_anatomy.demo.style import MARKER, make_style_data, style_logprobs, style_metrics
    from lightning_anatomy.demo.summary import style_phrase

    cfg, sc, log, hook = demo.cfg, demo.cfg.style, demo.log, demo.hook
    out = demo.out / "style"
    d = sc.data
    data = make_style_data(demo.tokenizer, n_train=d.n_train, n_heldout=d.n_heldout, corr=d.corr,
                           reply_chars=d.reply_chars, seed=cfg.seed)
    result, lens = demo.audit(data.train, out, f'"{MARKER}"-opener')
    with log.phase(f'finding the "{MARKER}" opener among the audit\'s top {sc.match.candidates} features (replies '
                   "with vs. without it) and saving the audit report") as phase:
        match = match_features(result, lens, demo.tokenizer, data.with_marker, data.without_marker,
                               candidates=sc.match.candidates, min_effect=sc.match.min_effect,
                               max_features=sc.match.max_features)
        direction = ConceptSet.from_mean_difference(demo.base(), demo.tokenizer, hook, data.with_marker,
                                                    data.without_marker, name="sure_opener",
                                                    label=f'the reply opens with "{MARKER}"', action="suppress")
        result.save(out / "audit")
        del lens  # it holds the base model, which the runs do not keep beside them
        picked = [c for c in match.candidates if (c["hook"], c["feature"]) in set(match.features)]
        phase.result = "; ".join(f"feature {c['feature']} (audit rank {c['audit_rank']}, effect d={c['effect']:.1f}"
                                 + (f", {c['label']}" if c["label"] else "") + ")" for c in picked)
    with log.phase(f"evaluating the base model on {len(data.heldout)} held-out prompts") as phase:
        base = style_logprobs(demo.base(), demo.tokenizer, data)
        base_eval = style_metrics(base, base, sc.train.beta)
        phase.result = style_phrase(base_eval)
    demo.free_base()
    runs = [Run("vanilla", "vanilla DPO"),
            Run("token_filtering", "token filtering",
                [TokenFiltering(concepts=match.concepts(), saes={hook: demo.sae})]),
            Run("gradient_projection", "gradient projection",
                [ConceptProjection(direction, mode="gradient", layers="all_later")])]
    probe = _tokenized(data.heldout, demo.tokenizer)
    track = {f"marker_f{f}": (h, f) for h, f in match.features}

    def evaluate(policy: Any) -> dict[str, float]:
        return style_metrics(style_logprobs(policy, demo.tokenizer, data), base, sc.train.beta)

    runs_out = demo.train("style", runs, sc.train, data.train, probe, result.concepts, track, out, evaluate,
                          style_phrase)
    return {"marker": MARKER, "data": dict(OmegaConf.to_container(d)), "train": dict(OmegaConf.to_container(sc.train)),
            "features": picked, "audit_features_tested": len(result.concepts), "base": base_eval, "runs": runs_out,
            "report": str(out / "audit" / "report.html")}


def _tokenized(rows: list, tokenizer: Any) -> list:
    from lightning_anatomy.data import tokenize_rows

    return tokenize_rows(rows, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)


def sycophancy_story(demo: Demo) -> dict[str, Any]:
    """Story 2: the user's stated belief, always right in training — what per-pair methods cannot
    separate, and what projecting its direction costs."""
    import torch

    from lightning_anatomy.concepts import ConceptSet
    from lightning_anatomy.data import read_preferences
    from lightning_anatomy.demo.data import make_demo_data
    from lightning_anatomy.demo.summary import audit_rank_phrase, scores_phrase, shaped_title

    cfg, sc, log, hook = demo.cfg, demo.cfg.sycophancy, demo.log, demo.hook
    out = demo.out / "sycophancy"
    data = make_demo_data(n_train=sc.data.n_train, n_heldout=sc.data.n_heldout, seed=cfg.seed,
                          n_concept_texts=sc.data.n_concept_texts)
    rows = read_preferences(data.train_rows(demo.tokenizer))
    result, _ = demo.audit(rows, out, "belief-stating")
    with log.phase("finding the spurious concept (prompts with vs. without a stated belief) and saving the "
                   "audit report") as phase:
        model = demo.base()
        belief = ConceptSet.from_mean_difference(
            model, demo.tokenizer, hook, data.texts_with_belief, data.texts_without_belief,
            name="user_belief", label="the user states a belief about the answer", action="suppress")
        direction = belief.basis(hook)[:, 0]
        decoder = torch.nn.functional.normalize(demo.sae.W_dec.detach().float(), dim=1)
        cos = decoder @ direction
        belief_feature = int(cos.argmax())  # the feature that fires WITH the belief direction
        concept_set = belief
        if sc.intervention.audit_features:
            top = result.to_concept_set(top=int(sc.intervention.audit_features), action="suppress",
                                        saes={hook: demo.sae})
            concept_set = belief + top
        result.save(out / "audit")
        concept_set.save(out / "concept_set")
        ranks = {int(f): r for r, f in enumerate(result.concepts["feature"], 1)}
        rank = ranks.get(belief_feature)  # None: the feature never fired often enough to be tested
        verdict = confounding_verdict(len(rows))
        phase.result = (f"the SAE feature most aligned with the belief is {belief_feature} "
                        f"(cos {float(cos[belief_feature]):.2f}), {audit_rank_phrase(rank, len(result.concepts))}; "
                        f"agreeing with the user is higher in chosen in all {len(rows)} pairs: explain-away λ = ∞ "
                        "(perfect confounding)")
    n_heldout = len(data.heldout_conflict)
    with log.phase(f"evaluating the base model on 3 × {n_heldout} held-out additions") as phase:
        base_eval = _evaluate(model, demo.tokenizer, data)
        phase.result = scores_phrase(base_eval)
    kind = sc.intervention.get("kind", "projection")
    shaped = sycophancy_shaped(sc.intervention, concept_set, model, demo.tokenizer, data, hook)
    probe = _pairs_from_items(data.heldout_conflict, demo.tokenizer, "correct", "wrong")
    track = {"belief_feature": (hook, belief_feature)}
    for n, (h, f) in enumerate(zip(result.concepts["hook"].head(3), result.concepts["feature"].head(3)), 1):
        track[f"audit_top{n}"] = (h, int(f))
    del model
    demo.free_base()
    runs = [Run("vanilla", "vanilla DPO"), Run("shaped", shaped_title(kind), shaped)]
    runs_out = demo.train("sycophancy", runs, sc.train, rows, probe, result.concepts, track, out,
                          lambda policy: _evaluate(policy, demo.tokenizer, data), scores_phrase)
    return {"spurious_concept": "user_belief (input-side)", "intervention": dict(OmegaConf.to_container(sc.intervention)),
            "train": dict(OmegaConf.to_container(sc.train)), "belief_feature": belief_feature,
            "belief_feature_audit_rank": rank, "audit_features_tested": len(result.concepts),
            "confounding": verdict, "base": base_eval, "runs": runs_out, "report": str(out / "audit" / "report.html"),
            "concept_set": str(out / "concept_set")}


STORY_RUNNERS = {"style": style_story, "sycophancy": sycophancy_story}


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """Run the job on `cfg` as `cli.job_config` returns it (parsed, type- and spec-checked there).

    Each phase says what it does before it starts and how long it took after (`PhaseLog`).
    """
    import torch

    from lightning_anatomy.demo.summary import plot_summary, summary_lines

    torch.manual_seed(cfg.seed)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    demo = Demo(cfg)
    summary: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (embedded)", "hook": demo.hook}
    for story in STORIES:
        if story in cfg.stories:
            summary[story] = STORY_RUNNERS[story](demo)
    with demo.log.phase("writing summary.json and summary.png"):
        summary["seconds"] = round(demo.log.elapsed(), 1)
        summary["peak_rss_gb"] = round(peak_rss_gb(), 2)
        atomic_write_text(demo.out / "summary.json", json.dumps(summary, indent=2, default=float))
        plot_summary(summary, demo.out / "summary.png")
    print("\n".join(summary_lines(summary, demo.out)), flush=True)
    return summary
