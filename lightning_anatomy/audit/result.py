"""`AuditResult`: the tables of an audit, the evidence behind them, and their files.

`save(dir)` writes everything a later step needs without the model: the tables (Parquet for
programs; JSON for people and other tools, where NaN and ±inf become null), the audited chosen/rejected span matrices (so `trace`
and the data filters work on a loaded result), the HTML report and, when the SAEs are at hand, a
ConceptSet export of the top concepts. The directory is written beside the target and renamed into
place, so a crash never leaves a half-written audit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lightning_anatomy.audit.tracing import trace_pairs
from lightning_anatomy.concepts.span_features import SpanFeatures
from lightning_anatomy.files import atomic_directory

FORMAT_VERSION = 1
MARKER = "audit.json"
TABLES = ("concepts", "clusters", "local", "traces", "feature_clusters", "data_clusters")
OPTIONAL_TABLES = ("cluster_examples",)  # absent from audits saved before the paper method
PREDICTION_COLUMNS = ("hook", "cluster", "predicted_shift", "n_features")
# (column, dtype) of each concept's and cluster's confounding with the preference (`audit.run.confounding_columns`):
# NA where not computed, and in audits saved before them
CONFOUNDING = (("explain_away_lambda", "float64", np.nan), ("pair_auroc", "float64", np.nan),
               ("perfectly_confounded", "boolean", pd.NA), ("differing_pairs", "Int64", pd.NA))


@dataclass
class AuditResult:
    """Ranked concepts and their structure for one dataset.

    `concepts`: one row per tested (hook, feature), strongest evidence first (see
    `audit.statistics` for every column); `clusters`: the same statistics per feature cluster;
    `local`: per (data cluster × feature cluster); `traces`: the top pairs of the top concepts;
    `feature_clusters` (hook, feature, cluster) and `data_clusters` (row_id, data_cluster) the
    assignments; `cofiring[hook]` the MI matrix of the clustered features (report heatmap);
    `contexts` token-level top-activating contexts per concept, when a model was at hand;
    `cluster_examples` (method "paper") the pairs leaning most with each feature cluster.
    `cluster_predictions` is the per-cluster prediction `check_prediction` tests.

    `concepts` (the top rows: those the report lists) and `clusters` carry how confounded each is
    with the preference, from the same per-pair ΔA as their statistics: `explain_away_lambda` (the
    Bradley–Terry MLE of ΔA on the preferences; ±inf when perfectly confounded, then
    `perfectly_confounded` is True; the JSON files write ±inf as null, Parquet keeps it) and
    `pair_auroc` (P(chosen has more of it), ties ½), `differing_pairs` (the pairs whose ΔA is not 0:
    what λ and the AUROC rest on); NA where not computed.
    """

    concepts: pd.DataFrame
    clusters: pd.DataFrame
    local: pd.DataFrame
    traces: pd.DataFrame
    feature_clusters: pd.DataFrame
    data_clusters: pd.DataFrame
    options: dict[str, Any]
    cofiring: dict[str, np.ndarray] = field(default_factory=dict)
    contexts: list[dict[str, Any]] = field(default_factory=list)
    features: SpanFeatures | None = None
    rows: Mapping[int, Any] | None = None
    saes: Mapping[str, Any] | None = None
    cluster_examples: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["cluster", "rank", "row_id", "u", "prompt", "chosen", "rejected"]))

    @property
    def stat(self) -> str:
        return str(self.options.get("stat", "max"))

    @property
    def method(self) -> str:
        return str(self.options.get("method", "paired"))

    @property
    def cluster_predictions(self) -> pd.DataFrame:
        """(hook, cluster, predicted_shift, n_features), one row per tested feature cluster, by id.

        "paper": predicted_shift is the cluster's dataset-wide mean disparity ū (thresholded
        firing, chosen − rejected); "paired": the Δ of the members' mean span statistic.
        """
        if self.clusters.empty:
            return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
        out = self.clusters[["hook", "cluster", "predicted_shift", "size"]].rename(columns={"size": "n_features"})
        out = out.astype({"cluster": np.int64, "n_features": np.int64, "predicted_shift": np.float64})
        return out.sort_values("cluster", kind="mergesort").reset_index(drop=True)

    def top(self, n: int = 20) -> pd.DataFrame:
        """The `n` strongest concepts."""
        return self.concepts.head(n)

    def concept(self, hook: str, feature: int) -> pd.Series:
        """The concepts row of (hook, feature); KeyError naming it when it was not tested."""
        hit = self.concepts[(self.concepts["hook"] == hook) & (self.concepts["feature"] == int(feature))]
        if hit.empty:
            raise KeyError(f"concept (hook={hook!r}, feature={feature}) is not in this audit (never fired often "
                           f"enough, or another hook); tested hooks: {sorted(set(self.concepts['hook']))}")
        return hit.iloc[0]

    def trace(self, hook: str, feature: int, k: int = 5) -> pd.DataFrame:
        """The `k` pairs contributing most to (hook, feature)'s disparity, with text snippets."""
        self.concept(hook, feature)
        stored = self.traces[(self.traces["hook"] == hook) & (self.traces["feature"] == int(feature))]
        # a loaded audit has no rows: its stored traces carry the texts, so prefer them when they suffice
        if self.features is not None and (self.rows is not None or len(stored) < k):
            return trace_pairs(self.features, hook, [int(feature)], stat=self.stat, k=k, rows=self.rows,
                               snippet_chars=int(self.options.get("snippet_chars", 200)))
        if stored.empty:
            raise KeyError(f"no stored trace for (hook={hook!r}, feature={feature}) and this result carries no "
                           "span features; re-run the audit or save it with its features to trace any concept")
        return stored.head(k).reset_index(drop=True)

    def select(
        self, *, top: int | None = None, features: Sequence[tuple[str, int]] | None = None,
        passing_only: bool = True,
    ) -> list[tuple[str, int]]:
        """(hook, feature) pairs: the `top` best-ranked (passing ones only, by default) or `features`."""
        if (top is None) == (features is None):
            raise ValueError("pass exactly one of top=N (the N strongest concepts) or features=[(hook, feature), ...]")
        if features is not None:
            picked = [(str(h), int(f)) for h, f in features]
            for h, f in picked:
                self.concept(h, f)
            return picked
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        table = self.concepts[self.concepts["passes"]] if passing_only else self.concepts
        return [(str(h), int(f)) for h, f in table[["hook", "feature"]].head(top).itertuples(index=False)]

    def to_concept_set(
        self, *, top: int | None = None, features: Sequence[tuple[str, int]] | None = None,
        action: str = "suppress", saes: Mapping[str, Any] | None = None, passing_only: bool = True,
    ) -> Any:
        """A `ConceptSet` of the chosen concepts (their SAE decoder directions), labelled.

        The SAEs come from the lens the audit ran with, or `saes={hook: sae}` for a loaded result.
        """
        picked = self.select(top=top, features=features, passing_only=passing_only)
        if not picked:
            raise ValueError(f"no concept passes (q < {self.options.get('alpha', 0.05)} and split-half agreement), so "
                             "top=N selects nothing; pass passing_only=False or features=[(hook, feature), ...]")
        return concept_set_from(self, picked, action=action, saes=saes if saes is not None else self.saes)

    # ---- files -----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, *, with_features: bool = True, concept_set_top: int = 20,
             next_command: str | None = None) -> Path:
        """Write tables, report, features and (with SAEs) the ConceptSet export, atomically.

        The export (`concept_set/concepts.yaml` + `vectors.safetensors`) holds the
        `concept_set_top` best-ranked concepts with action "allow" and their statistics as
        provenance: the user marks suppress/amplify there, then `ConceptSet.load` it for training.
        `next_command`: the training command the report suggests (None: `report.train_command`).
        """
        from lightning_anatomy.audit.report import render_report

        target = Path(directory)

        def write(tmp: Path) -> None:
            for name in TABLES + OPTIONAL_TABLES:
                table = getattr(self, name)
                table.to_parquet(tmp / f"{name}.parquet", index=False)
                (tmp / f"{name}.json").write_text(table.to_json(orient="records", indent=1, force_ascii=False),
                                                  encoding="utf-8")
            np.savez(tmp / "cofiring.npz", **{f"h{i}": m for i, m in enumerate(self.cofiring.values())})
            meta = {
                "format_version": FORMAT_VERSION,
                "options": self.options,
                "cofiring_hooks": list(self.cofiring),
                "contexts": self.contexts,
                "has_features": bool(with_features and self.features is not None),
            }
            if with_features and self.features is not None:
                meta["features"] = _save_features(self.features, self.stat, tmp / "features")
            if self.saes and concept_set_top > 0 and len(self.concepts):
                # a review sheet: every concept starts as "allow" until the user marks it in concepts.yaml
                picked = self.select(top=concept_set_top, passing_only=False)
                concept_set_from(self, picked, action="allow", saes=self.saes).save(tmp / "concept_set")
            (tmp / MARKER).write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")
            (tmp / "report.html").write_text(render_report(self, next_command=next_command,
                                                           concept_set_dir=str(target / "concept_set")),
                                             encoding="utf-8")

        _check_target(target)
        atomic_directory(target, write)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AuditResult:
        """Read a directory written by `save` (tables from Parquet; features when saved)."""
        root = Path(directory)
        marker = root / MARKER
        if not marker.is_file():
            raise FileNotFoundError(f"{root} is not an audit directory (no {MARKER}); pass the directory that "
                                    "AuditResult.save / anatomy audit wrote")
        meta = json.loads(marker.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{marker} has format_version {meta.get('format_version')}, this version reads "
                             f"{FORMAT_VERSION}; re-run the audit")
        tables = {name: pd.read_parquet(root / f"{name}.parquet") for name in TABLES}
        tables.update({name: pd.read_parquet(root / f"{name}.parquet") for name in OPTIONAL_TABLES
                       if (root / f"{name}.parquet").is_file()})
        for name in ("concepts", "clusters"):  # audits saved before the confounding columns: NA
            for column, dtype, missing in CONFOUNDING:
                if column not in tables[name].columns:
                    tables[name][column] = pd.Series(missing, index=tables[name].index, dtype=dtype)
        with np.load(root / "cofiring.npz") as npz:
            cofiring = {h: npz[f"h{i}"] for i, h in enumerate(meta.get("cofiring_hooks", []))}
        features = _load_features(root / "features", meta["features"]) if meta.get("has_features") else None
        return cls(**tables, options=meta["options"], cofiring=cofiring, contexts=meta.get("contexts", []),
                   features=features)


def concept_set_from(
    result: AuditResult, picked: Sequence[tuple[str, int]], *, action: str, saes: Mapping[str, Any] | None
) -> Any:
    """ConceptSet of SAE decoder directions of `picked`, labelled, with audit statistics as provenance."""
    from lightning_anatomy.concepts.concept_set import ConceptSet

    if not saes:
        raise ValueError("the ConceptSet export needs the SAEs the audit used: pass saes={hook: sae} "
                         "(a loaded audit does not carry them)")
    missing = sorted({h for h, _ in picked} - set(saes))
    if missing:
        raise KeyError(f"no SAE for hook(s) {missing}; pass saes={{hook: sae}} covering every selected concept")
    out = ConceptSet()
    for hook in dict.fromkeys(h for h, _ in picked):
        ids = [f for h, f in picked if h == hook]
        rows = [result.concept(hook, f) for f in ids]
        part = ConceptSet.from_sae_features(saes[hook], hook, ids, labels=[str(r["label"]) for r in rows],
                                            action=action)
        audit = [{k: _json_default(r[k]) if isinstance(r[k], np.generic) else r[k]
                  for k in ("rank", "delta", "cohens_d", "z", "q_value", "passes", "predicted_direction")}
                 for r in rows]
        out = out + ConceptSet(dataclasses.replace(c, source={**c.source, "audit": a}) for c, a in zip(part, audit))
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _save_features(features: SpanFeatures, stat: str, folder: Path) -> dict[str, Any]:
    """The audited stat's chosen/rejected matrices, row ids and lengths; returns the manifest."""
    folder.mkdir()
    np.save(folder / "row_ids.npy", np.asarray(features.row_ids))
    for span, lengths in features.lengths.items():
        np.save(folder / f"lengths_{span}.npy", np.asarray(lengths))
    hooks = []
    for i, hook in enumerate(features.hooks):
        for span in ("chosen", "rejected"):
            sp.save_npz(folder / f"h{i}_{span}.npz", features.get(hook, span, stat).tocsr(), compressed=False)
        hooks.append({"hook": hook, "d_sae": int(features.d_sae[hook])})
    return {"stat": stat, "hooks": hooks, "spans": list(features.lengths), "threshold": features.threshold,
            "meta": dict(features.meta)}  # e.g. the τ of a kept 1{freq > τ}: the tilt predictor reads it back


def _load_features(folder: Path, manifest: Mapping[str, Any]) -> SpanFeatures:
    stat = manifest["stat"]
    matrices = {}
    d_sae = {}
    for i, entry in enumerate(manifest["hooks"]):
        hook = entry["hook"]
        d_sae[hook] = int(entry["d_sae"])
        for span in ("chosen", "rejected"):
            matrices[(hook, span, stat)] = sp.load_npz(folder / f"h{i}_{span}.npz").tocsr()
    return SpanFeatures(
        row_ids=np.load(folder / "row_ids.npy"),
        lengths={span: np.load(folder / f"lengths_{span}.npy") for span in manifest["spans"]},
        matrices=matrices, d_sae=d_sae, threshold=float(manifest.get("threshold", 0.0)),
        meta=dict(manifest.get("meta", {})),
    )


def _check_target(target: Path) -> None:
    """Replace only an empty directory or an earlier audit (has `audit.json`), never someone else's files."""
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / MARKER).is_file())):
        raise FileExistsError(f"{target} exists and is not an audit directory; choose a new or empty directory")
