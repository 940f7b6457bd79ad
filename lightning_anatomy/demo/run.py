"""`make demo` / `anatomy demo`: the whole story on the embedded SmolLM2-135M-Instruct.

audit the demo data -> a ConceptSet marking the spurious concept (the user's stated belief, an
input-side shortcut) suppressed -> vanilla DPO and concept-ablated/projected DPO, each with the
attribution and drift callbacks logging to W&B -> a summary table and plot of on-target
(held-out correctness when the belief is right or absent) and off-target (held-out sycophancy:
preferring the user's wrong belief) for the base model and both runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from jsonargparse.typing import PositiveInt
from omegaconf import DictConfig, OmegaConf

from lightning_anatomy.files import atomic_write_file, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class DemoData:
    """Sizes of the demo data.

    Args:
        n_train: training pairs (one-digit additions, the stated belief always right).
        n_heldout: held-out additions per set (conflict / aligned / control).
        n_concept_texts: prompts with and without a belief for the concept direction.
    """

    n_train: PositiveInt = 64
    n_heldout: PositiveInt = 32
    n_concept_texts: PositiveInt = 32


@dataclass
class DemoAudit:
    """The audit of the training pairs.

    Args:
        n_bootstrap: bootstrap replicates of the CIs.
        batch_size: pairs per extraction forward.
    """

    n_bootstrap: int = 200
    batch_size: PositiveInt = 8


@dataclass
class DemoTrain:
    """Both DPO runs (vanilla and shaped).

    Args:
        max_steps: optimizer steps.
        batch_size: pairs per step.
        lr: learning rate.
        beta: DPO beta.
        loss_type: preference loss (see `preference_loss`).
        warmup_steps: linear warm-up steps.
    """

    max_steps: PositiveInt = 8
    batch_size: PositiveInt = 8
    lr: float = 1e-5
    beta: float = 0.1
    loss_type: str = "sigmoid"
    warmup_steps: int = 2


Intervention = Literal["projection", "mean_ablation", "blocking"]
INTERVENTIONS = get_args(Intervention)


@dataclass
class DemoIntervention:
    """The shaped run's intervention.

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
class DemoCallbacks:
    """The concept callbacks of both runs.

    Args:
        attribution_every: ConceptAttribution every N steps.
        drift_every: ConceptDriftMonitor every N steps.
        top_k: concepts logged per step.
    """

    attribution_every: PositiveInt = 1
    drift_every: PositiveInt = 4
    top_k: PositiveInt = 10


@dataclass
class DemoJob:
    """`anatomy demo`: audit -> ConceptSet -> vanilla vs concept-shaped DPO on the embedded SmolLM2.

    Args:
        seed: seed of the data, the audit and both runs.
        output_dir: where the audit, both runs' logs and summary.json / summary.png go.
        data: demo data sizes.
        audit: audit options.
        train: DPO options.
        intervention: the shaped run's intervention.
        callbacks: concept callback options.
        logger: wandb (offline unless WANDB_MODE says otherwise) or csv.
    """

    seed: int = 0
    output_dir: str = "outputs/demo"
    data: DemoData = field(default_factory=DemoData)
    audit: DemoAudit = field(default_factory=DemoAudit)
    train: DemoTrain = field(default_factory=DemoTrain)
    intervention: DemoIntervention = field(default_factory=DemoIntervention)
    callbacks: DemoCallbacks = field(default_factory=DemoCallbacks)
    logger: Literal["wandb", "csv"] = "wandb"


def check_job(cfg: DictConfig) -> None:
    """Cross-option rules of a demo config, before any model loads."""
    from lightning_anatomy.losses import LOSS_TYPES

    if cfg.train.loss_type not in LOSS_TYPES:
        raise ValueError(f"train.loss_type={cfg.train.loss_type!r} is not one of {sorted(LOSS_TYPES)}")


# The shaped run as a reader names it, by `intervention.kind`.
SHAPED_TITLES = {"projection": "projected DPO", "mean_ablation": "mean-ablated DPO", "blocking": "blocked DPO"}
# The three held-out sets, in the order the lines and the table show them.
HELDOUT_SETS = (("aligned", "belief right"), ("control", "no belief"), ("conflict", "belief WRONG"))
CONVERSION_NOTE = ("first run only: converting the packaged GGUF to safetensors once, ~45 s on a 2-core CPU, "
                   "a 517 MB cache in {cache}")


def run_title(name: str, kind: str) -> str:
    """What a reader calls a run: "vanilla DPO", or the shaped run by its intervention ("projected DPO")."""
    return "vanilla DPO" if name == "vanilla" else SHAPED_TITLES.get(kind, f"shaped DPO ({kind})")


def audit_rank_phrase(rank: int | None, n_tested: int) -> str:
    """Where the audit ranked a feature, in words; `None` (absent from the audit's table) means the
    feature fired too rarely in the pairs to be tested, which is itself a finding, not a blank."""
    if rank is None:
        return f"not among the {n_tested} features the audit tested: it fired too rarely in these pairs"
    return f"audit rank {rank} of {n_tested} tested features"


def scores_phrase(evals: dict[str, dict[str, float]]) -> str:
    """Held-out preference for the correct answer per set, in one line."""
    return "prefers the correct answer: " + ", ".join(f"{title} {evals[key]['pref_correct']:.3f}"
                                                        for key, title in HELDOUT_SETS)


def _pairs_from_items(items: list[dict[str, Any]], tokenizer: Any, chosen: str, rejected: str):
    """Held-out items as TokenizedPairs (chat-rendered prompt; `chosen`/`rejected` reply fields)."""
    from lightning_anatomy.data import read_preferences, tokenize_rows
    from lightning_anatomy.demo.data import chat_prompt

    rows = [{"prompt": chat_prompt(tokenizer, it["prompt"]), "chosen": it[chosen], "rejected": it[rejected]}
            for it in items]
    return tokenize_rows(read_preferences(rows), tokenizer, max_length=128, max_prompt_length=96)


def _evaluate(model: Any, tokenizer: Any, data: Any) -> dict[str, dict[str, float]]:
    from lightning_anatomy.demo.data import sycophancy_metrics

    return {name: sycophancy_metrics(model, tokenizer, getattr(data, f"heldout_{name}"))
            for name in ("conflict", "aligned", "control")}


def _fit(name: str, title: str, cfg: DictConfig, base_state: dict, tokenizer: Any, rows: list, sae: Any, hook: str,
         probe: list, predicted: Any, track: dict, extra_callbacks: list, out: Path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_anatomy import ConceptAttribution, ConceptDriftMonitor, DPOModule, PreferenceDataModule
    from lightning_anatomy.console import StepProgressBar
    from lightning_anatomy.models.embedded import load_embedded

    model, _ = load_embedded()
    model.load_state_dict(base_state)
    L.seed_everything(cfg.seed, verbose=False)
    tr = cfg.train
    module = DPOModule(model, lr=tr.lr, beta=tr.beta, loss_type=tr.loss_type, warmup_steps=tr.warmup_steps)
    dm = PreferenceDataModule(rows, tokenizer, batch_size=tr.batch_size, val_fraction=0.0, seed=cfg.seed,
                              max_length=128, max_prompt_length=96)
    callbacks = [
        ConceptAttribution({hook: sae}, every_n_steps=cfg.callbacks.attribution_every, top_k=cfg.callbacks.top_k,
                           track=track),
        ConceptDriftMonitor({hook: sae}, probe, every_n_steps=cfg.callbacks.drift_every, track=track,
                            top_k=cfg.callbacks.top_k, predicted=predicted, responses="both"),
        *extra_callbacks,
    ]
    if cfg.logger == "wandb":
        logger = WandbLogger(project="lightning-anatomy-demo", name=name, save_dir=str(out), offline=True)
    else:
        logger = CSVLogger(str(out), name=name)
    trainer = L.Trainer(max_steps=tr.max_steps, accelerator="cpu", logger=logger, callbacks=[*callbacks, StepProgressBar(title)],
                        enable_checkpointing=False, log_every_n_steps=1, enable_model_summary=False,
                        gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    run_dir = None
    if cfg.logger == "wandb":
        import wandb

        run_dir = Path(logger.experiment.dir).parent
        wandb.finish()
    drift = callbacks[1]
    tracked = {name: float(drift.last_drift[h][f]) for name, (h, f) in drift.track.items()} if drift.last_drift else {}
    return module.policy.eval(), {"run_dir": str(run_dir or logger.log_dir), "drift_r2": drift.last_r2,
                                  "drift": tracked}


def shaped_callbacks(icfg: DictConfig, concept_set: Any, model: Any, tokenizer: Any, data: Any, hook: str) -> list:
    """The shaped run's edit, as `intervention.kind` says (the choice `benchmarks/real_model.py` measures)."""
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


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """Run the job on `cfg` as `cli.job_config` returns it (parsed, type- and spec-checked there).

    Each phase says what it does before it starts and how long it took after (`PhaseLog`).
    """
    import torch

    from lightning_anatomy.audit import audit_dataset
    from lightning_anatomy.concepts import ConceptLens, ConceptSet
    from lightning_anatomy.console import PhaseLog
    from lightning_anatomy.data import read_preferences
    from lightning_anatomy.demo.data import make_demo_data
    from lightning_anatomy.models.embedded import (
        EMBEDDED_HOOK,
        default_cache_dir,
        is_converted,
        load_embedded,
        load_embedded_sae,
    )

    log = PhaseLog("demo")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    hook = EMBEDDED_HOOK
    kind = cfg.intervention.get("kind", "projection")
    titles = {name: run_title(name, kind) for name in ("vanilla", "shaped")}

    expect = "" if is_converted() else CONVERSION_NOTE.format(cache=default_cache_dir())
    with log.phase("loading SmolLM2-135M-Instruct and the project's SAE", expect=expect) as phase:
        model, tokenizer = load_embedded()
        model.eval()
        sae = load_embedded_sae()
        phase.result = f"SAE at {hook}, d_sae={sae.cfg.d_sae}"

    # 1. audit: what separates chosen from rejected, and what DPO is predicted to do
    with log.phase(f"auditing the {cfg.data.n_train} training pairs (SAE features of every pair, "
                   f"{cfg.audit.n_bootstrap} bootstrap replicates)") as phase:
        data = make_demo_data(n_train=cfg.data.n_train, n_heldout=cfg.data.n_heldout, seed=cfg.seed,
                              n_concept_texts=cfg.data.n_concept_texts)
        rows = read_preferences(data.train_rows(tokenizer))
        lens = ConceptLens(model, {hook: sae})
        result = audit_dataset(rows, lens, tokenizer, max_length=128, max_prompt_length=96,
                               out_dir=str(out / "features"), progress=False,
                               n_bootstrap=cfg.audit.n_bootstrap, batch_size=cfg.audit.batch_size, seed=cfg.seed)
        n_tested = len(result.concepts)
        phase.result = f"{int(result.concepts['passes'].sum())} of {n_tested} tested features pass"

    # 2. the spurious concept: the user's stated belief (difference of means with vs. without it)
    with log.phase("finding the spurious concept (prompts with vs. without a stated belief) and saving the "
                   "audit report") as phase:
        belief = ConceptSet.from_mean_difference(
            model, tokenizer, hook, data.texts_with_belief, data.texts_without_belief,
            name="user_belief", label="the user states a belief about the answer", action="suppress")
        direction = belief.basis(hook)[:, 0]
        decoder = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
        cos = decoder @ direction
        belief_feature = int(cos.argmax())  # the feature that fires WITH the belief direction
        concept_set = belief
        if cfg.intervention.audit_features:
            top = result.to_concept_set(top=int(cfg.intervention.audit_features), action="suppress", saes={hook: sae})
            concept_set = belief + top
        result.save(out / "audit")
        concept_set.save(out / "concept_set")
        ranks = {int(f): r for r, f in enumerate(result.concepts["feature"], 1)}
        rank_of_belief = ranks.get(belief_feature)  # None: the feature never fired often enough to be tested
        phase.result = (f"report {out / 'audit' / 'report.html'}; the SAE feature most aligned with the belief is "
                        f"{belief_feature} (cos {float(cos[belief_feature]):.2f}), "
                        f"{audit_rank_phrase(rank_of_belief, n_tested)}")

    # 3. base model, vanilla DPO, concept-shaped DPO
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_heldout = len(data.heldout_conflict)
    with log.phase(f"evaluating the base model on 3 × {n_heldout} held-out additions") as phase:
        base_eval = _evaluate(model, tokenizer, data)
        phase.result = scores_phrase(base_eval)
    probe = _pairs_from_items(data.heldout_conflict, tokenizer, "correct", "wrong")
    track = {"belief_feature": (hook, belief_feature)}
    for n, (h, f) in enumerate(zip(result.concepts["hook"].head(3), result.concepts["feature"].head(3)), 1):
        track[f"audit_top{n}"] = (h, int(f))
    runs: dict[str, Any] = {}
    with log.phase(f"preparing the {titles['shaped']} run's intervention ({kind})"):
        shaped = shaped_callbacks(cfg.intervention, concept_set, model, tokenizer, data, hook)
    tr = cfg.train
    for name, extra in (("vanilla", []), ("shaped", shaped)):
        with log.phase(f"training {titles[name]}: {tr.max_steps} step{'' if tr.max_steps == 1 else 's'} × "
                       f"{tr.batch_size} pairs, with the attribution and drift callbacks"):
            policy, info = _fit(name, titles[name], cfg, base_state, tokenizer, rows, sae, hook, probe,
                                result.concepts, track, extra, out)
        with log.phase(f"evaluating {titles[name]} on 3 × {n_heldout} held-out additions") as phase:
            info["eval"] = _evaluate(policy, tokenizer, data)
            phase.result = scores_phrase(info["eval"])
        runs[name] = info
        del policy

    with log.phase("writing summary.json and summary.png"):
        summary = {
            "model": "SmolLM2-135M-Instruct (embedded)", "hook": hook, "spurious_concept": "user_belief (input-side)",
            "intervention": dict(OmegaConf.to_container(cfg.intervention)),
            "train": dict(OmegaConf.to_container(cfg.train)),
            "belief_feature": belief_feature, "belief_feature_audit_rank": rank_of_belief,
            "audit_features_tested": n_tested,
            "base": base_eval, "runs": runs, "seconds": round(log.elapsed(), 1),
        }
        _write_json(summary, out / "summary.json")
        _plot(summary, out / "summary.png")
    print("\n".join(summary_lines(summary, out)), flush=True)
    return summary


def summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    """The closing lines: the table, where the belief feature ranked, and where every output is."""
    runs = summary["runs"]
    rank = audit_rank_phrase(summary.get("belief_feature_audit_rank"), summary.get("audit_features_tested", 0))
    return [_table(summary), "",
            f"belief-aligned SAE feature {summary['belief_feature']}: {rank}",
            f"report: {out / 'audit' / 'report.html'}",
            f"concept set: {out / 'concept_set'}",
            f"plot: {out / 'summary.png'}",
            "W&B runs (offline): " + " , ".join(str(r["run_dir"]) for r in runs.values()),
            f"summary: {out / 'summary.json'}  ({summary['seconds']} s)"]


def _table(summary: dict[str, Any]) -> str:
    kind = summary.get("intervention", {}).get("kind", "projection")
    lines = ["| model | on-target: pref. correct, belief right | on-target: no belief | off-target: pref. correct, "
             "belief wrong | margin (nats), belief wrong | belief-feature drift |",
             "|---|---|---|---|---|---|"]
    entries = [("base", summary["base"], "— (not trained)")]
    for name, run in summary["runs"].items():
        drift = run.get("drift", {}).get("belief_feature")
        entries.append((run_title(name, kind), run["eval"], "not measured" if drift is None else f"{drift:+.4f}"))
    for title, ev, drift in entries:
        lines.append(f"| {title} | {ev['aligned']['pref_correct']:.3f} | {ev['control']['pref_correct']:.3f} | "
                     f"{ev['conflict']['pref_correct']:.3f} | {ev['conflict']['margin']:+.3f} | {drift} |")
    return "\n".join(lines)


def _write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float))


def summary_figure(summary: dict[str, Any]) -> Figure:
    """The summary picture: held-out preference per set (left) and the sycophancy margin (right).

    The legend sits above the left panel, outside both axes, so it covers no bar whatever the scores.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = summary.get("intervention", {}).get("kind", "projection")
    names = ["base", *(run_title(name, kind) for name in summary["runs"])]
    evals = [summary["base"]] + [r["eval"] for r in summary["runs"].values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    width = 0.25
    for i, (key, title) in enumerate((("aligned", "belief right"), ("control", "no belief"),
                                      ("conflict", "belief WRONG (sycophancy test)"))):
        axes[0].bar([j + i * width for j in range(len(names))], [e[key]["pref_correct"] for e in evals], width,
                    label=title)
    axes[0].set_xticks([j + width for j in range(len(names))], names)
    axes[0].set_ylabel("held-out: prefers the correct answer")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                   handlelength=1.2, columnspacing=1.0)
    axes[1].bar(names, [e["conflict"]["margin"] for e in evals], color="tab:red")
    axes[1].set_ylabel("log p(correct) − log p(user's wrong belief)")
    axes[1].set_title("margin when the belief is WRONG", fontsize=9)
    axes[1].axhline(0, color="k", lw=0.5)
    fig.suptitle("Demo: DPO on data where the user's belief always equals the answer")
    return fig


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = summary_figure(summary)
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
