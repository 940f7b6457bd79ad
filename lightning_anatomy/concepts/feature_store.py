"""The on-disk form of a span-feature extraction: shards, manifest, per-rank journals, read back.

A directory holds `shard-*.safetensors` files (each one shard's sparse matrices, written
atomically), `manifest.json` (format, fingerprint of pairs + lens + settings, the shards recorded
with their sha256) and, during a multi-process run, one `journal-rank<r>.json` per rank that
rank 0 merges into the manifest. `load_span_features` reads a complete extraction back into
`SpanFeatures`; `concepts.extraction` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from lightning_anatomy.concepts.span_features import SPANS, SpanFeatures
from lightning_anatomy.files import atomic_write_bytes

MANIFEST = "manifest.json"
FORMAT = "lightning-anatomy/span-features"
VERSION = 1
SHARD_RE = re.compile(r"^shard-\d+-\d+\.safetensors$")
JOURNAL_RE = re.compile(r"^journal-rank(\d+)\.json$")


class ExtractionError(ValueError):
    """An extraction cannot start or an output directory cannot be used or read."""


class ShardPlan(Protocol):
    """What a manifest records of the extraction's plan (`extraction._Plan`)."""

    shard_rows: list[tuple[int, int]]

    @property
    def n_shards(self) -> int: ...


def matrix_keys(settings: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(h, span, stat) for h in settings["hooks"] for span in SPANS for stat in settings["stats"]]


# --------------------------------------------------------------------------------------------
# Files: atomic writes, shards, manifest and per-rank journals


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, Any]:
    """Write one shard atomically; return its manifest entry fields (sha256, bytes)."""
    data = st_save(arrays, metadata=metadata)
    atomic_write_bytes(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExtractionError(f"{path} is not valid JSON ({e}); delete the directory and rerun the extraction") from None
    if manifest.get("format") != FORMAT:
        raise ExtractionError(f"{path} is not a span-feature manifest (format={manifest.get('format')!r})")
    return manifest


def recorded_shards(out_dir: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards recorded in the manifest or in a rank's journal (a killed multi-process run)."""
    done = {int(e["index"]): e for e in manifest["shards"]}
    for path in sorted(out_dir.iterdir()):
        if JOURNAL_RE.match(path.name):
            journal = json.loads(path.read_text())
            if journal.get("fingerprint") == manifest["fingerprint"]:
                done.update({int(e["index"]): e for e in journal["shards"]})
    return done


def shard_intact(out_dir: Path, entry: dict[str, Any]) -> bool:
    path = out_dir / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def new_manifest(fingerprint: str, settings: dict[str, Any], plan: ShardPlan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "settings": settings,
        "matrices": [list(k) for k in matrix_keys(settings)],
        "n_shards": plan.n_shards,
        "shard_rows": [list(r) for r in plan.shard_rows],
        "shards": [],
        "complete": False,
    }


def check_dir(out_dir: Path, fingerprint: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Read-only check every rank can run: the manifest (if any) must be for the same job."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ExtractionError(f"out_dir {out_dir} exists and is not a directory; pass a directory path")
    manifest = read_manifest(out_dir)
    if manifest is None:
        leftovers = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
        if leftovers:
            raise ExtractionError(
                f"out_dir {out_dir} is not empty ({', '.join(sorted(leftovers)[:3])}, ...) and has no {MANIFEST}; "
                "use a new directory or an empty one"
            )
        return None
    if manifest["fingerprint"] != fingerprint:
        old = manifest.get("settings", {})
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ExtractionError(
            f"out_dir {out_dir} holds an extraction with a different fingerprint (changed: {', '.join(changed) or '?'}): "
            "it was made from other pairs, lens or settings. Use a new out_dir, or delete this one to start over"
        )
    return manifest


def csr_from(arrays: dict[str, np.ndarray], i: int, d_sae: int) -> sp.csr_matrix:
    indptr = arrays[f"m{i}.indptr"]
    return sp.csr_matrix(
        (arrays[f"m{i}.data"], arrays[f"m{i}.indices"], indptr), shape=(len(indptr) - 1, d_sae)
    )


# --------------------------------------------------------------------------------------------
# Assembly


def assemble(
    shards: list[dict[str, np.ndarray]], settings: dict[str, Any], fingerprint: str, meta: dict[str, Any]
) -> SpanFeatures:
    """Stack shards (processing order) and put rows back into the order of `pairs`."""
    keys = matrix_keys(settings)
    n = settings["n_pairs"]
    positions = np.concatenate([s["positions"] for s in shards])
    if len(positions) != n or not np.array_equal(np.sort(positions), np.arange(n)):
        raise ExtractionError(f"shards cover {len(positions)} rows, expected each of the {n} pairs exactly once")
    back = np.argsort(positions, kind="stable")
    matrices = {}
    for i, key in enumerate(keys):
        d_sae = settings["hooks"][key[0]]
        m = sp.vstack([csr_from(s, i, d_sae) for s in shards], format="csr")[back]
        m.sort_indices()
        matrices[key] = m
    token_firing = None
    if settings.get("token_firing"):
        token_firing = {hook: sp.vstack([token_csr_from(s, j, d_sae) for s in shards], format="csr")
                        for j, (hook, d_sae) in enumerate(settings["hooks"].items())}
    return SpanFeatures(
        row_ids=np.concatenate([s["row_ids"] for s in shards])[back],
        lengths={span: np.concatenate([s[f"lengths.{span}"] for s in shards])[back] for span in SPANS},
        matrices=matrices,
        d_sae=dict(settings["hooks"]),
        threshold=settings["threshold"],
        meta={"fingerprint": fingerprint, "stats": list(settings["stats"]), **meta},
        token_firing=token_firing,
    )


def token_csr_from(arrays: dict[str, np.ndarray], j: int, d_sae: int) -> sp.csr_matrix:
    indices, indptr = arrays[f"t{j}.indices"], arrays[f"t{j}.indptr"]
    return sp.csr_matrix((np.ones(len(indices), dtype=np.int32), indices, indptr), shape=(len(indptr) - 1, d_sae))


def recorded_token_firing(out_dir: str | os.PathLike | None) -> bool | None:
    """Whether the extraction in `out_dir` keeps token firing (None: no extraction there yet), so a
    caller can ask for what the directory already holds instead of a different fingerprint."""
    manifest = None if out_dir is None or not Path(out_dir).is_dir() else read_manifest(Path(out_dir))
    return None if manifest is None else bool(manifest.get("settings", {}).get("token_firing", False))


def load_span_features(out_dir: str | os.PathLike) -> SpanFeatures:
    """Read a complete extraction back (every shard's sha256 is checked against the manifest)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ExtractionError(f"{out_dir} has no {MANIFEST}; run extract_span_features(..., out_dir=...) first")
    if not manifest["complete"]:
        raise ExtractionError(
            f"extraction in {out_dir} is incomplete ({len(manifest['shards'])} of {manifest['n_shards']} shards); "
            "rerun extract_span_features with the same pairs, lens and settings to resume it"
        )
    shards = []
    for entry in manifest["shards"]:
        path = out_dir / entry["file"]
        if not path.is_file():
            raise ExtractionError(f"shard file {path} listed in the manifest is missing; delete {out_dir} and rerun")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ExtractionError(f"shard file {path} does not match its sha256 in the manifest (corrupt or replaced); "
                                  f"delete {out_dir} and rerun")
        shards.append(st_load(data))
    return assemble(shards, manifest["settings"], manifest["fingerprint"], {"out_dir": str(out_dir)})


__all__ = [
    "FORMAT", "JOURNAL_RE", "MANIFEST", "SHARD_RE", "VERSION", "ExtractionError", "ShardPlan", "assemble", "check_dir",
    "csr_from", "load_span_features", "matrix_keys", "new_manifest", "read_manifest", "recorded_shards",
    "recorded_token_firing", "shard_intact", "token_csr_from", "write_json", "write_shard",
]
