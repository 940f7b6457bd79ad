"""Dataset-scale sparse span-feature extraction, resumable and spread over every Trainer device.

An audit of 260k pairs × 65k SAE features cannot be held dense, so each batch's span statistics
are made sparse right after `ConceptLens.encode` and only nonzeros travel on. Pairs are
processed in length-sorted batches (less padding); batches are grouped into fixed shards whose
boundaries depend only on the data and settings, never on the number of devices, so a run
killed on 8 GPUs can resume on 1 and give the same bytes. Each shard is written atomically and
recorded only once complete; `manifest.json` carries a fingerprint of the pairs, lens and
settings so a rerun never mixes results from different inputs (the directory's format, and
reading it back: `concepts.feature_store`).

Multi-process runs go through `Trainer.predict`: shard k of the pending ones goes to rank
k mod world_size (no DistributedSampler), each rank writes its own shard files and records them
in its own journal (no two processes ever write one file), and rank 0 merges the journals into
the single manifest after a barrier.

Under `ModelParallelStrategy` (FSDP2) the model is sharded in place with `fully_shard` (as
`DPOModule` shards for training; it stays sharded afterwards) and every forward is a collective:
a rank with fewer pending batches pads its stream with dummy forwards (the plan's shortest batch)
whose results are dropped, and the forward runs to the end instead of stopping after the deepest
hook. The fingerprint hashes the gathered weights, so a sharded run resumes a 1-process one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_anatomy.concepts.feature_store import (
    JOURNAL_RE,
    MANIFEST,
    SHARD_RE,
    ExtractionError,
    assemble,
    check_dir,
    load_span_features,
    matrix_keys,
    new_manifest,
    read_manifest,
    recorded_shards,
    recorded_token_firing,
    shard_intact,
    write_json,
    write_shard,
)
from lightning_anatomy.concepts.lens import ConceptLens, span_stats
from lightning_anatomy.concepts.span_features import SPANS, STATS, SpanFeatures
from lightning_anatomy.concepts.token_firing import masked_firing, pair_firing_mask
from lightning_anatomy.data.tokenize import TokenizedPair, collate_pairs
from lightning_anatomy.digests import full_model_digest, model_digest, pairs_digest
from lightning_anatomy.models.loading import max_positions
from lightning_anatomy.sharding import (
    fsdp2_data_mesh,
    is_fsdp2_module,
    is_sharded_module,
    shard_fsdp2,
    unsharded_class_name,
)

__all__ = ["ExtractionError", "extract_span_features", "load_span_features", "recorded_token_firing"]

DEFAULT_BATCHES_PER_SHARD = 64
_write_shard = write_shard  # the one shard write (tests patch it here to kill a run mid-shard)


# --------------------------------------------------------------------------------------------
# Plan: length-sorted batches grouped into world-size-independent shards


@dataclass(frozen=True)
class _Plan:
    batches: list[np.ndarray]  # positions (indices into `pairs`) of each batch, length-sorted
    shards: list[list[int]]  # batch indices of each shard
    shard_rows: list[tuple[int, int]]  # [start, stop) of each shard in processing order

    @property
    def n_shards(self) -> int:
        return len(self.shards)


def _make_plan(pairs: Sequence[TokenizedPair], batch_size: int, batches_per_shard: int) -> _Plan:
    """Longest pairs first (an OOM shows up in the first batch, not after hours); ties by position."""
    longest = np.array([len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])
    positions = np.arange(len(pairs))
    order = np.lexsort((positions, -longest))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shards, rows, start = [], [], 0
    for i in range(0, len(batches), batches_per_shard):
        ids = list(range(i, min(i + batches_per_shard, len(batches))))
        n = sum(len(batches[b]) for b in ids)
        shards.append(ids)
        rows.append((start, start + n))
        start += n
    return _Plan(batches=batches, shards=shards, shard_rows=rows)


# --------------------------------------------------------------------------------------------
# Fingerprint: everything that changes the numbers or the shard layout


def _lens_saes(lens: ConceptLens) -> dict[str, nn.Module]:
    saes = getattr(lens, "saes", None)
    if not isinstance(saes, (dict, nn.ModuleDict)):
        raise ExtractionError("the lens has no `saes` mapping {hook: sae}; build it with ConceptLens(model, saes={...})")
    return dict(saes.items())


def _settings(
    pairs: Sequence[TokenizedPair], lens: ConceptLens, batch_size: int, batches_per_shard: int,
    threshold: float, stats: tuple[str, ...], token_firing: bool,
) -> dict[str, Any]:
    saes = _lens_saes(lens)
    # Only when on, so that the fingerprints of extractions made without it stay as they were.
    extra = {"token_firing": True} if token_firing else {}
    return {
        "n_pairs": len(pairs),
        "pairs_sha256": pairs_digest(pairs),
        # In name order: manifest.json sorts its keys, and the shards' matrix numbering must be
        # the same whether the settings come from the lens or from the manifest.
        "hooks": {h: int(lens.d_sae(h)) for h in sorted(lens.hooks)},
        "sae_digests": {h: f"{type(saes[h]).__name__}:{model_digest(saes[h])}" for h in lens.hooks},
        "model_digest": f"{unsharded_class_name(lens.model)}:{_weights_digest(lens.model)}",
        "threshold": float(threshold),
        "stats": list(stats),
        "spans": list(SPANS),
        "batch_size": batch_size,
        "batches_per_shard": batches_per_shard,
        **extra,
    }


def _weights_digest(model: nn.Module) -> str:
    """`model_digest`, of the gathered weights when the model is already sharded (a collective:
    every rank computes the settings)."""
    return full_model_digest(model) if is_sharded_module(model) else model_digest(model)


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Sparse per-batch statistics


def _dense_to_csr(t: torch.Tensor) -> sp.csr_matrix:
    """[rows, d] tensor -> canonical float32 CSR of its nonzeros; only nonzeros leave the device."""
    rows, cols = t.nonzero(as_tuple=True)
    vals = t[rows, cols].float().cpu().numpy()
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy().astype(np.int32)
    indptr = np.zeros(t.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=t.shape[0]), out=indptr[1:])
    return sp.csr_matrix((vals, cols, indptr), shape=tuple(t.shape))


class _ShardBuffer:
    """The sparse results of one shard's batches, until the shard is complete."""

    def __init__(self) -> None:
        self.positions: list[np.ndarray] = []
        self.lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPANS}
        self.parts: dict[tuple[str, str, str], list[sp.csr_matrix]] = {}
        self.tokens: dict[str, list[sp.csr_matrix]] = {}  # binary token firing per hook (token_firing)

    def arrays(self, keys: list[tuple[str, str, str]], row_ids: np.ndarray) -> dict[str, np.ndarray]:
        positions = np.concatenate(self.positions).astype(np.int64)
        out = {"positions": positions, "row_ids": row_ids[positions].astype(np.int64)}
        for span in SPANS:
            out[f"lengths.{span}"] = np.concatenate(self.lengths[span]).astype(np.int64)
        for i, key in enumerate(keys):
            m = sp.vstack(self.parts[key], format="csr")
            m.sort_indices()
            out[f"m{i}.data"] = np.ascontiguousarray(m.data, dtype=np.float32)
            out[f"m{i}.indices"] = np.ascontiguousarray(m.indices, dtype=np.int32)
            out[f"m{i}.indptr"] = np.ascontiguousarray(m.indptr, dtype=np.int64)
        for j, parts in enumerate(self.tokens.values()):  # hooks in settings order
            t = sp.vstack(parts, format="csr")
            t.sort_indices()
            out[f"t{j}.indices"] = np.ascontiguousarray(t.indices, dtype=np.int32)
            out[f"t{j}.indptr"] = np.ascontiguousarray(t.indptr, dtype=np.int64)
        return out


# --------------------------------------------------------------------------------------------
# Lightning: a stream of this rank's batches and a module whose predict_step writes shards


class _BatchStream(IterableDataset):
    """This rank's batches, collated lazily (memory bounded by one batch), then `n_dummy` copies of
    the plan's shortest batch marked `dummy` (sharded models: every rank runs as many forwards).
    Iterable, so Lightning never injects a DistributedSampler that would re-split them."""

    def __init__(self, pairs: Sequence[TokenizedPair], plan: _Plan, shard_ids: list[int], pad_token_id: int,
                 n_dummy: int = 0):
        self.pairs, self.plan, self.shard_ids, self.pad_token_id = pairs, plan, shard_ids, pad_token_id
        self.n_dummy = n_dummy

    def __len__(self) -> int:
        return sum(len(self.plan.shards[k]) for k in self.shard_ids) + self.n_dummy

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k in self.shard_ids:
            batch_ids = self.plan.shards[k]
            for j, b in enumerate(batch_ids):
                batch = self._collate(self.plan.batches[b])
                batch["shard"] = k
                batch["last_of_shard"] = j == len(batch_ids) - 1
                yield batch
        for _ in range(self.n_dummy):
            yield {**self._collate(self.plan.batches[-1]), "dummy": True}

    def _collate(self, pos: np.ndarray) -> dict[str, Any]:
        batch = collate_pairs([self.pairs[i] for i in pos], self.pad_token_id)
        batch["positions"] = torch.as_tensor(pos, dtype=torch.long)
        return batch


@dataclass
class _Job:
    pairs: Sequence[TokenizedPair]
    plan: _Plan
    settings: dict[str, Any]
    fingerprint: str
    out_dir: Path | None
    pad_token_id: int


class _ExtractionModule(pl.LightningModule):
    """Runs the lens on each batch; shards go to disk (out_dir) or stay in `self.results`."""

    def __init__(self, lens: ConceptLens, job: _Job) -> None:
        super().__init__()
        self.lens = lens
        # Registered so that Lightning moves (and, under DDP, rank-0-synchronises) them.
        self.lm = lens.model
        self.saes = nn.ModuleList(_lens_saes(lens).values())
        self.job = job
        self.keys = matrix_keys(job.settings)
        self.row_ids = np.array([p.row_id for p in job.pairs], dtype=np.int64)
        self.results: dict[int, dict[str, np.ndarray]] = {}
        self._buffers: dict[int, _ShardBuffer] = {}
        self._journal: list[dict[str, Any]] = []
        self._pending: list[int] = []
        # A resume can leave fewer pending shards than ranks: an idle rank is fine here.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # -- setup: decide (on rank 0) what is left and tell every rank ---------------------------
    def setup(self, stage: str) -> None:
        pending = self._prepare_out_dir() if self.global_rank == 0 else None
        if self.trainer.world_size > 1:
            pending = self.trainer.strategy.broadcast(pending, src=0)
        self._pending = list(pending)

    def _prepare_out_dir(self) -> list[int]:
        job = self.job
        if job.out_dir is None:
            return list(range(job.plan.n_shards))
        job.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = check_dir(job.out_dir, job.fingerprint, job.settings) or new_manifest(job.fingerprint, job.settings, job.plan)
        done = {k: e for k, e in recorded_shards(job.out_dir, manifest).items() if shard_intact(job.out_dir, e)}
        manifest["shards"] = [done[k] for k in sorted(done)]
        manifest["complete"] = len(done) == job.plan.n_shards
        write_json(job.out_dir / MANIFEST, manifest)
        keep = {e["file"] for e in done.values()}
        for path in job.out_dir.iterdir():  # journals are merged; partial or unrecorded shards redone
            stale = JOURNAL_RE.match(path.name) or (SHARD_RE.match(path.name) and path.name not in keep)
            partial = path.name.startswith((".shard-", f".{MANIFEST}.", ".journal-rank")) and (
                path.name.endswith(".tmp") or ".tmp-" in path.name)  # temps of older versions, then of files.py
            if stale or partial:
                path.unlink()
        return [k for k in range(job.plan.n_shards) if k not in done]

    def configure_model(self) -> None:
        """Under ModelParallelStrategy, shard the model with FSDP2 over the data-parallel mesh (SAEs
        stay replicated); other strategies need nothing."""
        try:
            mesh = fsdp2_data_mesh(self.trainer.strategy, "extraction")
        except ValueError as err:
            raise ExtractionError(str(err)) from None
        if mesh is not None and not is_fsdp2_module(self.lm):
            shard_fsdp2(self.lm, mesh)

    def predict_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        shares = [self._pending[r::world] for r in range(world)]
        counts = [sum(len(self.job.plan.shards[k]) for k in share) for share in shares]
        mine = shares[self.global_rank]
        dummies = max(counts) - counts[self.global_rank] if world > 1 and is_sharded_module(self.lm) else 0
        stream = _BatchStream(self.job.pairs, self.job.plan, mine, self.job.pad_token_id, n_dummy=dummies)
        return DataLoader(stream, batch_size=None, num_workers=0)

    # -- the work --------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        feats = self.lens.encode(batch["input_ids"], batch["attention_mask"])
        if batch.get("dummy"):
            return  # a sharded model's forward that only keeps the ranks in step
        k = batch["shard"]
        buf = self._buffers.setdefault(k, _ShardBuffer())
        b = batch["positions"].shape[0]
        masks = {
            "prompt": (slice(0, b), batch["prompt_mask"][:b]),
            "chosen": (slice(0, b), batch["completion_mask"][:b]),
            "rejected": (slice(b, 2 * b), batch["completion_mask"][b:]),
        }
        threshold = self.job.settings["threshold"]
        for span, (_, mask) in masks.items():
            buf.lengths[span].append(mask.sum(dim=1).cpu().numpy())
        firing_mask = pair_firing_mask(batch) if self.job.settings.get("token_firing") else None
        for hook in self.job.settings["hooks"]:
            f = feats[hook]
            for span, (rows, mask) in masks.items():
                stats = span_stats(f[rows], mask, threshold)
                for stat in self.job.settings["stats"]:
                    buf.parts.setdefault((hook, span, stat), []).append(_dense_to_csr(stats[stat]))
            if firing_mask is not None:
                buf.tokens.setdefault(hook, []).append(masked_firing(f, firing_mask, threshold))
        buf.positions.append(batch["positions"].cpu().numpy())
        if batch["last_of_shard"]:
            self._finish_shard(k, self._buffers.pop(k))

    def _finish_shard(self, k: int, buf: _ShardBuffer) -> None:
        arrays = buf.arrays(self.keys, self.row_ids)
        job = self.job
        if job.out_dir is None:
            self.results[k] = arrays
            return
        name = f"shard-{self.global_rank}-{k:05d}.safetensors"
        entry = {"index": k, "file": name, "rows": list(job.plan.shard_rows[k]), "nnz": int(
            sum(len(arrays[f"m{i}.data"]) for i in range(len(self.keys))))}
        # One metadata key: safetensors writes a metadata map in hash order, so several keys
        # would make identical shards differ byte-wise between runs.
        meta = {"span_features": json.dumps({"fingerprint": job.fingerprint, "shard": k}, sort_keys=True)}
        entry.update(_write_shard(job.out_dir / name, arrays, meta))
        self._record(entry)

    def _record(self, entry: dict[str, Any]) -> None:
        """Rank 0 owns manifest.json; other ranks keep a journal that rank 0 merges at the end."""
        out_dir = self.job.out_dir
        assert out_dir is not None
        if self.global_rank == 0:
            manifest = read_manifest(out_dir)
            assert manifest is not None
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda e: e["index"])
            write_json(out_dir / MANIFEST, manifest)
        else:
            self._journal.append(entry)
            write_json(out_dir / f"journal-rank{self.global_rank}.json",
                        {"fingerprint": self.job.fingerprint, "shards": self._journal})

    def finalize(self) -> None:
        """After predict, on every rank: rank 0 merges the journals into a complete manifest.

        Not an `on_predict_end` hook: Lightning skips the hooks on a rank with no batches left,
        and the barriers must be reached by every rank.
        """
        if self._buffers:
            raise RuntimeError(f"extraction ended with unfinished shards {sorted(self._buffers)}; this is a bug")
        out_dir = self.job.out_dir
        if out_dir is None:
            return
        strategy = self.trainer.strategy
        strategy.barrier("span_features_shards_written")
        if self.global_rank == 0:
            manifest = read_manifest(out_dir)
            assert manifest is not None
            done = recorded_shards(out_dir, manifest)
            manifest["shards"] = [done[k] for k in sorted(done)]
            manifest["complete"] = len(done) == self.job.plan.n_shards
            write_json(out_dir / MANIFEST, manifest)
            for path in out_dir.iterdir():
                if JOURNAL_RE.match(path.name):
                    path.unlink()
        strategy.barrier("span_features_manifest_written")


# --------------------------------------------------------------------------------------------
# Entry point


def _validate(
    pairs: Sequence[TokenizedPair], lens: ConceptLens, batch_size: int, threshold: float, shard_size: int | None,
    stats: Sequence[str], trainer: pl.Trainer | None, trainer_kwargs: dict | None, pad_token_id: int,
) -> tuple[str, ...]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractionError(f"batch_size must be a positive int, got {batch_size!r}")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise ExtractionError(f"shard_size must be a positive int (pairs per shard) or None, got {shard_size!r}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ExtractionError(f"threshold must be a finite number, got {threshold!r}")
    stats = tuple(stats) if not isinstance(stats, str) else (stats,)
    bad = [s for s in stats if s not in STATS]
    if not stats or bad or len(set(stats)) != len(stats):
        raise ExtractionError(f"stats must be distinct names from {STATS}, got {stats!r}")
    if trainer is not None and trainer_kwargs:
        raise ExtractionError("pass either trainer or trainer_kwargs, not both (trainer_kwargs build a Trainer)")
    if len(pairs) == 0:
        raise ExtractionError("pairs is empty: nothing to extract")
    hooks = list(lens.hooks)
    if not hooks:
        raise ExtractionError("the lens has no hooks; build ConceptLens(model, saes={hook_name: sae})")
    vocab = lens.model.get_input_embeddings().num_embeddings
    max_pos = max_positions(lens.model)
    seen: dict[int, int] = {}
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ExtractionError(f"pad_token_id must be an int (see data.tokenize.resolve_pad_token_id), got {pad_token_id!r}")
    for i, p in enumerate(pairs):
        if not all(hasattr(p, f) for f in ("row_id", "prompt_ids", "chosen_ids", "rejected_ids")):
            raise ExtractionError(f"pairs[{i}] is a {type(p).__name__}; extraction needs TokenizedPair (see tokenize_rows)")
        if p.row_id in seen:
            raise ExtractionError(f"pairs[{i}] repeats row_id {p.row_id} of pairs[{seen[p.row_id]}]; row ids must be unique")
        seen[p.row_id] = i
        for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
            ids = getattr(p, field)
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise ExtractionError(
                    f"pairs[{i}] (row_id {p.row_id}) has {field} outside the model vocabulary [0, {vocab}); "
                    "tokenize with the model's tokenizer"
                )
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
        if longest == 0:
            raise ExtractionError(f"pairs[{i}] (row_id {p.row_id}) has no tokens at all")
        if max_pos and longest > max_pos:
            raise ExtractionError(
                f"pairs[{i}] (row_id {p.row_id}) has {longest} tokens, more than the model's {max_pos} positions; "
                "tokenize with a smaller max_length"
            )
    return stats


def _accelerator_of(model: nn.Module) -> str:
    device = next(model.parameters()).device
    return {"cuda": "gpu", "cpu": "cpu", "mps": "mps"}.get(device.type, "auto")


def extract_span_features(
    pairs: list[TokenizedPair],
    lens: ConceptLens,
    *,
    batch_size: int = 8,
    threshold: float = 0.0,
    out_dir: str | os.PathLike | None = None,
    shard_size: int | None = None,
    stats: Sequence[str] = ("max", "freq", "mean"),
    progress: bool = True,
    trainer: pl.Trainer | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    pad_token_id: int = 0,
    token_firing: bool = False,
) -> SpanFeatures:
    """Per-pair, per-span sparse SAE statistics for every hook of `lens`, rows in the order of `pairs`.

    One forward encodes `[chosen; rejected]`: prompt stats come from the chosen sequence's prompt
    tokens, chosen/rejected stats from their completion tokens. `shard_size` (pairs, rounded up
    to whole batches; default 64 batches) sets the unit of resumption and of distribution over
    ranks. With `out_dir`, shards and `manifest.json` go there and a rerun resumes; without it
    everything stays in memory (single process only). Multi-device: pass a `trainer` (or
    `trainer_kwargs`, e.g. `{"devices": 8, "strategy": "ddp"}`); every rank returns the full result.

    `token_firing` also keeps, from the same forwards, the binary token × feature firing of the
    prompt (once) and both completions (`.token_firing`, as `token_firing.pair_span_firing` gives
    it, rows in processing order): the paper audit's co-firing corpus without a second pass.
    """
    stats = _validate(pairs, lens, batch_size, threshold, shard_size, stats, trainer, trainer_kwargs, pad_token_id)
    batches_per_shard = DEFAULT_BATCHES_PER_SHARD if shard_size is None else math.ceil(shard_size / batch_size)
    if not isinstance(token_firing, bool):
        raise ExtractionError(f"token_firing must be True or False, got {token_firing!r}")
    settings = _settings(pairs, lens, batch_size, batches_per_shard, threshold, stats, token_firing)
    fingerprint = _fingerprint(settings)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        manifest = check_dir(out_path, fingerprint, settings)  # every rank, before any heavy work
        if manifest is not None and manifest["complete"]:
            return load_span_features(out_path)

    if trainer is None:
        kwargs = dict(
            accelerator=_accelerator_of(lens.model), devices=1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=progress, use_distributed_sampler=False,
        )
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
    if trainer.world_size > 1 and out_path is None:
        raise ExtractionError(
            f"extraction over {trainer.world_size} processes needs out_dir (a directory every rank can write to); "
            "pass out_dir=... or run on one device"
        )

    plan = _make_plan(pairs, batch_size, batches_per_shard)
    job = _Job(pairs=pairs, plan=plan, settings=settings, fingerprint=fingerprint, out_dir=out_path,
               pad_token_id=pad_token_id)
    module = _ExtractionModule(lens, job)
    devices = {id(m): next(m.parameters()).device for m in (module.lm, *module.saes) if any(True for _ in m.parameters())}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
            warnings.filterwarnings("ignore", message=r".*predict returned None.*")  # shards are the output
            warnings.filterwarnings("ignore", message=r".*across ranks is zero.*")  # idle ranks on a resume
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")  # inside Lightning
            trainer.predict(module, return_predictions=False)
        module.finalize()
    finally:  # Lightning's teardown moves modules to CPU; give the caller's model back where it was
        for m in (module.lm, *module.saes):
            if id(m) in devices:
                m.to(devices[id(m)])
    if out_path is not None:
        return load_span_features(out_path)
    return assemble([module.results[k] for k in sorted(module.results)], settings, fingerprint, {})
