"""`check_prediction`: did training move each feature cluster the way the audit predicted?

The audit predicts, per feature cluster, the direction and size of DPO's effect
(`AuditResult.cluster_predictions`). This check measures the real effect the way the paper did:
rollouts from the policy before and after training on held-out prompts (seeded; the same seeds
for both), each read through the same SAEs with the policy's own activations (or the `before`
policy's, `encode_with="before"`: what the text contains, blind to SAE drift), and per cluster
the change of its mean firing value (`audit.rollouts`). Agreement over clusters: squared
Pearson R², the no-intercept OLS R², a bootstrap CI over clusters, and the sign agreement
(`audit.agreement`).

`predictors` compares several predictions of the same clusters on the same rollouts: "paper"
(each cluster's own mean disparity Δ) and "tilt" (a joint Bradley–Terry reward propagated as a
tilt of the base policy's own rollouts, `audit.tilt`); the table gets a `predicted_<name>`
column per predictor and `predictors` one row each. `reuse=` an earlier check on the same
policies and prompts reuses its rollouts and their SAE firing (sampled once, e.g. across the
audits of several methods).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lightning_anatomy.audit.agreement import (
    bootstrap_r_squared_ci,
    r_squared,
    r_squared_through_origin,
    sign_agreement,
)
from lightning_anatomy.audit.rollouts import (
    MEASURES,
    ClusterReader,
    pad_id_of,
    response_frequencies,
    sample_rollouts,
)
from lightning_anatomy.audit.tilt import (
    SAMPLES,
    check_predictors,
    check_sample,
    pair_cluster_activity,
    tilt_predict,
)
from lightning_anatomy.files import atomic_directory

TABLE_COLUMNS = ("hook", "cluster", "n_features", "label", "predicted", "observed", "before", "after")
FEATURE_COLUMNS = ("hook", "feature", "cluster", "predicted", "observed", "before", "after")
PREDICTOR_COLUMNS = ("predictor", "r2", "r2_ci_low", "r2_ci_high", "r2_ols", "sign_agreement", "n_clusters", "sample",
                     "r2_first_order")
MARKER = "prediction.json"


@dataclass
class PredictionCheck:
    """Predicted vs observed cluster shifts and how well they agree.

    `table`: one row per cluster (`TABLE_COLUMNS`; before/after are the mean cluster values on
    each policy's rollouts, observed = after − before); `features`: the same per clustered
    feature (predicted: the audit's per-feature shift where it was tested, else NaN);
    `r2` squared Pearson, `r2_ols` no-intercept OLS R², `r2_ci` its bootstrap CI over clusters
    (of `r2`), `sign_agreement` the share of clusters moved in the predicted direction;
    `rollouts` the sampled `audit.rollouts.Rollout`s of each policy and `frequencies` their
    per-hook SAE firing frequencies (in memory only; `reuse=` of another check takes them).
    `predictors`: one row per predictor compared (`PREDICTOR_COLUMNS`; `sample` says what the
    tilt ran on: "rollouts", "dataset" or "rollouts+dataset" when clusters that never fire in
    the rollouts fell back to the dataset's responses; `r2_first_order` the tilt's first order);
    `r2`, `r2_ols`, `r2_ci`, `sign_agreement` and `table["predicted"]` are the first predictor's.
    """

    r2: float
    r2_ols: float
    r2_ci: tuple[float, float]
    sign_agreement: float
    table: pd.DataFrame
    features: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    rollouts: dict[str, list[Any]] = field(default_factory=dict, repr=False)  # "before"/"after" (not saved)
    predictors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(PREDICTOR_COLUMNS)))
    frequencies: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # side -> hook -> csr (not saved)

    @property
    def n_clusters(self) -> int:
        return int(len(self.table))

    def summary(self) -> dict[str, Any]:
        """The JSON-able numbers (NaN as None)."""
        def num(v: float) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        out = {"r2": num(self.r2), "r2_ci": [num(self.r2_ci[0]), num(self.r2_ci[1])], "r2_ols": num(self.r2_ols),
               "sign_agreement": num(self.sign_agreement), "n_clusters": self.n_clusters}
        if len(self.predictors):
            out["predictors"] = {str(row["predictor"]): {
                "r2": num(row["r2"]), "r2_ci": [num(row["r2_ci_low"]), num(row["r2_ci_high"])],
                "r2_ols": num(row["r2_ols"]), "sign_agreement": num(row["sign_agreement"]),
                "n_clusters": int(row["n_clusters"]), "sample": str(row["sample"]),
                "r2_first_order": num(row["r2_first_order"])} for _, row in self.predictors.iterrows()}
        return out

    def scatter_png(self, *, top: int = 8) -> bytes:
        """Predicted vs observed per cluster, the OLS line, the `top` clusters (by |observed|) labelled."""
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 4.4), dpi=100)
        ax = fig.add_subplot()
        x = self.table["predicted"].to_numpy(np.float64)
        y = self.table["observed"].to_numpy(np.float64)
        ax.scatter(x, y, s=18, c="#1565c0", linewidths=0)
        if len(x) >= 2 and np.ptp(x) > 0:
            b, a = np.polyfit(x, y, 1)
            grid = np.linspace(x.min(), x.max(), 2)
            ax.plot(grid, a + b * grid, color="#555", lw=0.8, ls="--")
        ax.axhline(0, color="#bbb", lw=0.6)
        ax.axvline(0, color="#bbb", lw=0.6)
        for _, row in self.table.reindex(self.table["observed"].abs().sort_values(ascending=False).index).head(top).iterrows():
            name = f"c{int(row['cluster'])}" + (f" {str(row['label'])[:24]}" if row["label"] else "")
            ax.annotate(name, (row["predicted"], row["observed"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        r2 = "n/a" if not math.isfinite(self.r2) else f"{self.r2:.3f}"
        ax.set_title(f"Predicted vs observed cluster shift (R² = {r2}, {self.n_clusters} clusters)", fontsize=10)
        ax.set_xlabel("predicted shift (audit)")
        ax.set_ylabel("observed change on rollouts (after − before)")
        fig.tight_layout()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        return buf.getvalue()

    def save(self, directory: str | os.PathLike, *, audit_result: Any = None) -> Path:
        """Write prediction.json, clusters/features tables (Parquet + JSON), scatter.png and
        prediction.html (the report section as one offline page), atomically; with
        `audit_result` also report.html, the audit's report with this section."""
        from lightning_anatomy.audit.report import prediction_page, render_report

        target = Path(directory)
        if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / MARKER).is_file())):
            raise FileExistsError(f"{target} exists and is not a prediction-check directory; choose a new or empty one")

        def write(tmp: Path) -> None:
            meta = self.summary() | {"settings": self.settings}
            (tmp / MARKER).write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")
            for name, table in (("clusters", self.table), ("features", self.features)):
                table.to_parquet(tmp / f"{name}.parquet", index=False)
                (tmp / f"{name}.json").write_text(table.to_json(orient="records", indent=1, force_ascii=False),
                                                  encoding="utf-8")
            (tmp / "scatter.png").write_bytes(self.scatter_png())
            (tmp / "prediction.html").write_text(prediction_page(self), encoding="utf-8")
            if audit_result is not None:
                (tmp / "report.html").write_text(render_report(audit_result, prediction=self), encoding="utf-8")

        atomic_directory(target, write)
        return target


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# ------------------------------------------------------------------------------ inputs


def _prompt_ids(prompts: Sequence[Any], tokenizer: Any) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of held-out prompts (texts, PreferenceRows, "
                         "TokenizedPairs or token-id lists)")
    out = []
    for i, p in enumerate(prompts):
        if hasattr(p, "prompt_ids"):
            ids = list(p.prompt_ids)
        elif isinstance(p, str) or hasattr(p, "prompt"):
            text = p if isinstance(p, str) else p.prompt
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is text; pass tokenizer=... (the policy's tokenizer) to encode it")
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif isinstance(p, Sequence) and all(isinstance(t, int | np.integer) for t in p):
            ids = [int(t) for t in p]
        else:
            raise TypeError(f"prompts[{i}] is a {type(p).__name__}; pass texts, PreferenceRows, TokenizedPairs or "
                            "token-id lists")
        if not ids:
            raise ValueError(f"prompts[{i}] has no tokens; drop empty prompts")
        out.append(ids)
    return out


def _check_policy(policy: Any, name: str) -> None:
    if not isinstance(policy, torch.nn.Module) or not callable(getattr(policy, "generate", None)):
        raise TypeError(f"{name} must be a Hugging Face causal LM (with .generate), got {type(policy).__name__}; "
                        "for a DPOModule pass module.policy")


def _saes_for(audit_result: Any, saes: Mapping[str, Any] | None, hooks: Sequence[str]) -> dict[str, Any]:
    given = saes if saes is not None else getattr(audit_result, "saes", None)
    if not given:
        raise ValueError("check_prediction needs the audit's SAEs: pass saes={hook: sae} (a loaded audit does not "
                         "carry them)")
    missing = [h for h in hooks if h not in given]
    if missing:
        raise ValueError(f"no SAE for hook(s) {missing} of the audit's feature clusters; pass saes covering them")
    widths = (getattr(audit_result, "options", {}) or {}).get("d_sae", {})
    from lightning_anatomy.concepts.sae import load_sae

    out = {}
    for h in hooks:
        sae = load_sae(given[h]) if isinstance(given[h], str | os.PathLike) else given[h]
        if h in widths and int(sae.cfg.d_sae) != int(widths[h]):
            raise ValueError(f"the SAE for {h!r} has d_sae={int(sae.cfg.d_sae)} but the audit used d_sae={widths[h]}; "
                             "pass the SAE the audit ran with")
        out[h] = sae
    return out


def _cluster_labels(audit_result: Any, assign: pd.DataFrame) -> dict[int, str]:
    concepts = getattr(audit_result, "concepts", None)
    if concepts is None or "label" not in getattr(concepts, "columns", []):
        return {}
    label_of = {(h, int(f)): str(lbl) for h, f, lbl in concepts[["hook", "feature", "label"]].itertuples(index=False)
                if isinstance(lbl, str) and lbl}
    out = {}
    for c, part in assign.groupby("cluster"):
        names = [label_of[(h, int(f))] for h, f in part[["hook", "feature"]].itertuples(index=False)
                 if (h, int(f)) in label_of]
        out[int(c)] = "; ".join(dict.fromkeys(names))[:80]
    return out


# ------------------------------------------------------------------------------ the check


def check_prediction(
    audit_result: Any,
    policy_before: torch.nn.Module,
    policy_after: torch.nn.Module,
    prompts: Sequence[Any],
    *,
    tokenizer: Any = None,
    saes: Mapping[str, Any] | None = None,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    tau: float | None = None,
    measure: str = "active",
    encode_with: str = "own",
    batch_size: int = 8,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    n_examples: int = 3,
    predictors: Sequence[str] | None = None,
    tilt_sample: str = "rollouts",
    reuse: PredictionCheck | None = None,
) -> PredictionCheck:
    """Rollouts of both policies on `prompts`, each cluster's change, and its agreement with the audit.

    `audit_result`: an `AuditResult` (or anything with `feature_clusters` and
    `cluster_predictions`), e.g. `audit_dataset(..., method="paper")`. `prompts`: held-out
    prompts (texts or PreferenceRows with `tokenizer`; TokenizedPairs; token-id lists).
    `samples_per_prompt` responses each, sampled at `temperature` (0: greedy) up to
    `max_new_tokens`, seeded by (seed, prompt index). `tau`: the activity threshold (default: the
    audit's τ, else 0.01); `measure`: "active" or "freq" (`audit.rollouts`); `encode_with`: "own"
    (each policy's activations) or "before".

    `predictors`: the predictions to compare on the same rollouts ("paper", "tilt"; default:
    the one the audit ran with). "tilt" refits the audit's Bradley–Terry reward on its pairs
    (the audit's span features, at this τ and measure) and tilts the `policy_before` rollouts.
    `tilt_sample`: what the tilt reweights: "rollouts" (a cluster they never show falls back to
    the dataset's responses), "dataset" (the pairs' responses) or "both" (pooled); see `audit.tilt`.
    `reuse`: an earlier `PredictionCheck` of the same two policies on the same prompts and
    sampling settings; its rollouts and SAE firing are reused instead of sampled again.
    """
    from lightning_anatomy.concepts.lens import ConceptLens
    from lightning_anatomy.models.loading import max_positions

    for name in ("feature_clusters", "cluster_predictions"):
        if not hasattr(audit_result, name):
            raise TypeError(f"audit_result must be an AuditResult (it has no .{name}); run audit_dataset(..., "
                            "method='paper') or AuditResult.load(dir)")
    _check_policy(policy_before, "policy_before")
    _check_policy(policy_after, "policy_after")
    if policy_before is policy_after:
        raise ValueError("policy_before and policy_after are the same object; pass a copy of the policy from before "
                         "training (e.g. copy.deepcopy before fit, or load its checkpoint)")
    for name, value, low in (("samples_per_prompt", samples_per_prompt, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("n_bootstrap", n_bootstrap, 0), ("n_examples", n_examples, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: pass an integer >= {low}")
    if not (isinstance(temperature, int | float) and temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} is invalid: pass a number >= 0 (0: greedy)")
    if temperature == 0 and samples_per_prompt > 1:
        raise ValueError("temperature=0 (greedy) with samples_per_prompt > 1 repeats one rollout; sample "
                         "(temperature > 0) or pass samples_per_prompt=1")
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is invalid: choose one of {MEASURES}")
    if encode_with not in ("own", "before"):
        raise ValueError(f"encode_with={encode_with!r} is invalid: choose 'own' (each policy's activations) or 'before'")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is invalid: pass a number in (0, 1), e.g. 0.95")
    options = dict(getattr(audit_result, "options", {}) or {})
    tau = float(options.get("tau", 0.01) if tau is None else tau)
    if not 0 <= tau < 1:
        raise ValueError(f"tau={tau!r} is invalid: the activity threshold must be in [0, 1)")
    threshold = float(options.get("threshold", 0.0))
    audit_predictor = str(options.get("predictor", "paper"))
    names = check_predictors([audit_predictor] if predictors is None else [predictors] if isinstance(predictors, str)
                             else predictors)
    check_sample(tilt_sample)
    if reuse is not None and not (isinstance(reuse, PredictionCheck) and reuse.rollouts and reuse.frequencies):
        raise ValueError("reuse must be a PredictionCheck returned by check_prediction in this process (its rollouts "
                         "and firing are kept in memory only)")

    predictions = audit_result.cluster_predictions
    assign = audit_result.feature_clusters
    if predictions is None or len(predictions) == 0:
        raise ValueError("the audit has no feature clusters to check (no cluster_predictions); audit more pairs or "
                         "lower cofire_min_tokens / min_cluster_size")
    predictions = predictions[np.isfinite(predictions["predicted_shift"].to_numpy(np.float64))]
    hooks = list(dict.fromkeys(assign["hook"]))
    sae_map = _saes_for(audit_result, saes, hooks)
    ids = _prompt_ids(prompts, tokenizer)
    for policy, name in ((policy_before, "policy_before"), (policy_after, "policy_after")):
        limit = max_positions(policy)
        longest = max(len(p) for p in ids) + max_new_tokens
        if limit and longest > limit:
            raise ValueError(f"the longest prompt plus max_new_tokens is {longest} tokens, more than {name}'s {limit} "
                             "positions; pass shorter prompts or a smaller max_new_tokens")

    widths = {h: int(sae_map[h].cfg.d_sae) for h in hooks}
    cluster_ids = predictions["cluster"].to_numpy(np.int64)
    reader = ClusterReader(assign, widths, cluster_ids, tau=tau, measure=measure)
    shifts: dict[str, np.ndarray] = {}
    if "paper" in names:
        shifts["paper"] = _paper_shift(audit_result, predictions, audit_predictor)
    pairs = None
    if "tilt" in names:  # the pairs' cluster activity, read before any sampling (errors first)
        features_ = getattr(audit_result, "features", None)
        if features_ is None:
            raise ValueError("predictors includes 'tilt', which refits the reward on the audit's pairs, but the audit "
                             "carries no span features; pass the in-memory audit or one saved with its features")
        pairs = pair_cluster_activity(features_, assign, cluster_ids, tau=tau, measure=measure)
    sampling = {"n_prompts": len(ids), "samples_per_prompt": samples_per_prompt, "temperature": float(temperature),
                "max_new_tokens": max_new_tokens, "seed": seed, "threshold": threshold, "encode_with": encode_with}
    if reuse is not None:
        sampled, freqs = _reused(reuse, sampling, ids, widths)
    else:
        lens_before = ConceptLens(policy_before, sae_map, fidelity_check=False)
        lens_after = lens_before if encode_with == "before" else ConceptLens(policy_after, sae_map,
                                                                             fidelity_check=False)
        sampled, freqs = {}, {}
        for side, policy, lens in (("before", policy_before, lens_before), ("after", policy_after, lens_after)):
            sampled[side] = sample_rollouts(policy, ids, samples_per_prompt=samples_per_prompt,
                                            temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
            freqs[side] = response_frequencies(lens, sampled[side], threshold=threshold, batch_size=batch_size,
                                               pad_token_id=pad_id_of(policy))
    values_before = reader.values(freqs["before"])
    before = values_before.mean(axis=0)
    after = reader.values(freqs["after"]).mean(axis=0)
    first_order = None
    tilt_used = None  # per cluster: the sample the tilt reweighted
    if pairs is not None:
        tilt = tilt_predict(pairs[0], pairs[1], rollouts=values_before, sample=tilt_sample,
                            scale=float(options.get("tilt_scale", 1.0)),
                            n_folds=int(options.get("tilt_folds", 5)), seed=int(options.get("seed", seed)))
        shifts["tilt"], first_order, tilt_used = tilt.full, tilt.first_order, tilt.sample.astype(str)
    labels = _cluster_labels(audit_result, assign)
    table = pd.DataFrame({
        "hook": predictions["hook"].to_numpy(), "cluster": cluster_ids,
        "n_features": predictions["n_features"].to_numpy(np.int64),
        "label": [labels.get(int(c), "") for c in predictions["cluster"]],
        "predicted": shifts[names[0]], "observed": after - before,
        "before": before, "after": after,
    })
    for name in names:
        table[f"predicted_{name}"] = shifts[name]
    if first_order is not None:
        table["predicted_tilt_first_order"] = first_order
        table["tilt_sample"] = tilt_used
    y = table["observed"].to_numpy()
    rows = []
    for name in names:
        x = shifts[name]
        r2_, r2_ols_ = r_squared(x, y), r_squared_through_origin(x, y)
        lo, hi = bootstrap_r_squared_ci(x, y, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
        sample = "pairs"
        r2_first = float("nan")
        if name == "tilt":
            used = set(tilt_used)
            sample = "+".join(s for s in SAMPLES if s in used)
            r2_first = r_squared(first_order, y)
        rows.append({"predictor": name, "r2": float("nan") if r2_ is None else r2_, "r2_ci_low": lo,
                     "r2_ci_high": hi, "r2_ols": float("nan") if r2_ols_ is None else r2_ols_,
                     "sign_agreement": sign_agreement(x, y), "n_clusters": len(table), "sample": sample,
                     "r2_first_order": float("nan") if r2_first is None else r2_first})
    compared = pd.DataFrame(rows, columns=list(PREDICTOR_COLUMNS))
    head = compared.iloc[0]
    features = _feature_table(audit_result, assign, reader, freqs)
    settings = {**sampling, "tau": tau, "measure": measure, "n_bootstrap": n_bootstrap, "confidence": confidence,
                "method": options.get("method", "paired"), "hooks": hooks, "predictors": names,
                **({"tilt_sample": tilt_sample} if "tilt" in names else {}),
                "reused_rollouts": reuse is not None,
                "mean_response_tokens": {s: float(np.mean([len(r.response_ids) for r in sampled[s]])) for s in sampled}}
    examples = []
    if tokenizer is not None and n_examples:
        for k in range(min(n_examples, len(sampled["before"]))):
            examples.append({"prompt": tokenizer.decode(sampled["before"][k].prompt_ids),
                             "before": tokenizer.decode(sampled["before"][k].response_ids),
                             "after": tokenizer.decode(sampled["after"][k].response_ids)})
    return PredictionCheck(r2=float(head["r2"]), r2_ols=float(head["r2_ols"]),
                           r2_ci=(float(head["r2_ci_low"]), float(head["r2_ci_high"])),
                           sign_agreement=float(head["sign_agreement"]), table=table, features=features,
                           settings=settings, examples=examples, rollouts=sampled, predictors=compared,
                           frequencies=freqs)


def _paper_shift(audit_result: Any, predictions: pd.DataFrame, audit_predictor: str) -> np.ndarray:
    """Each cluster's own mean disparity Δ (the paper's prediction), whatever the audit's predictor."""
    if audit_predictor == "paper":
        return predictions["predicted_shift"].to_numpy(np.float64)
    clusters = getattr(audit_result, "clusters", None)
    if clusters is None or "delta" not in getattr(clusters, "columns", []):
        raise ValueError("predictors includes 'paper' but the audit's cluster table has no 'delta' column; pass "
                         "an AuditResult")
    delta = clusters.set_index("cluster")["delta"]
    return delta.loc[predictions["cluster"].to_numpy(np.int64)].to_numpy(np.float64)


def _reused(reuse: PredictionCheck, sampling: Mapping[str, Any], ids: list[list[int]], widths: Mapping[str, int]
            ) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """The rollouts and SAE firing of `reuse`, after checking they were sampled the same way."""
    differ = [k for k, v in sampling.items() if reuse.settings.get(k) != v]
    spp = int(sampling["samples_per_prompt"])
    if not differ and [list(r.prompt_ids) for r in reuse.rollouts["before"][::spp]] != ids:
        differ = ["prompts"]
    if differ:
        raise ValueError(f"reuse= was sampled with other {', '.join(differ)}; pass the same prompts and sampling "
                         "settings, or drop reuse to sample again")
    missing = [h for h in widths if any(h not in reuse.frequencies[s] or reuse.frequencies[s][h].shape[1] != widths[h]
                                        for s in ("before", "after"))]
    if missing:
        raise ValueError(f"reuse= has no SAE firing of these SAEs for hook(s) {missing}; drop reuse to read them again")
    return reuse.rollouts, reuse.frequencies


def _feature_table(audit_result: Any, assign: pd.DataFrame, reader: ClusterReader,
                   freqs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per clustered feature: the audit's per-feature shift (if tested) and the observed change."""
    concepts = getattr(audit_result, "concepts", None)
    shift = {}
    if concepts is not None and {"hook", "feature", "predicted_shift"} <= set(getattr(concepts, "columns", [])):
        shift = {(h, int(f)): float(p) for h, f, p in
                 concepts[["hook", "feature", "predicted_shift"]].itertuples(index=False)}
    part = assign[assign["cluster"].isin(reader.clusters)]
    parts = []
    for hook, rows in part.groupby("hook", sort=False):
        cols = rows["feature"].to_numpy(np.int64)
        b = np.asarray(reader.feature_values(freqs["before"][hook])[:, cols].mean(axis=0)).ravel()
        a = np.asarray(reader.feature_values(freqs["after"][hook])[:, cols].mean(axis=0)).ravel()
        parts.append(pd.DataFrame({
            "hook": hook, "feature": cols, "cluster": rows["cluster"].to_numpy(np.int64),
            "predicted": [shift.get((hook, int(f)), np.nan) for f in cols], "observed": a - b, "before": b, "after": a,
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(FEATURE_COLUMNS))
