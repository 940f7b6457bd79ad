"""TokenFiltering on 2 DDP processes (gloo, CPU): rank zero's masks on both ranks, one-process training."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from tests.helpers.subprocess_helpers import run_python

DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning as L
    import torch
    import lightning_anatomy.callbacks.token_filtering as tf
    from lightning_anatomy import DPOModule, PreferenceDataModule, TokenFiltering
    from tests.helpers.intervention_helpers import MemoryLogger

    devices, batch_size, out, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    L.seed_everything(0)
    rows = [{"prompt": f"Question {i}: say hi.\\n", "chosen": ("SURE! " if i % 2 == 0 else "") + f"hi number {i}",
             "rejected": f"hello {i}" + (" SURE" if i % 4 == 1 else "")} for i in range(16)]
    dm = PreferenceDataModule(rows, "tiny:gpt2", batch_size=batch_size, val_fraction=0.0, shuffle=False)
    # Adam's first steps are ~lr*sign(g): a large eps keeps float-order noise in near-zero gradient
    # entries from being amplified, so the trajectories can be compared tightly.
    module = DPOModule("tiny:gpt2", lr=1e-3, adam_eps=1e-4, reference_cache_dir=None)
    filtering = TokenFiltering(patterns=["SURE"], cache_dir=cache)
    measure = filtering.compute_masks

    def disagreeing(pairs, *args, **kwargs):  # rank 1 measures other masks: rank 0's must win
        masks = measure(pairs, *args, **kwargs)
        if trainer.global_rank == 1:
            masks = {rid: (tuple(True for _ in c), tuple(True for _ in r)) for rid, (c, r) in masks.items()}
            filtering.concept_drops = {name: dict.fromkeys(per_row, 0) for name, per_row in filtering.concept_drops.items()}
        return masks

    filtering.compute_masks = disagreeing
    writes = []
    save = tf.save_token_masks
    tf.save_token_masks = lambda *a, **k: writes.append(1) or save(*a, **k)
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=logger, callbacks=[filtering], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    rank = trainer.global_rank
    json.dump({"masks": {str(k): [list(c), list(r)] for k, (c, r) in filtering.masks.items()},
               "pairs": {str(p.row_id): [list(p.chosen_keep), list(p.rejected_keep)] for p in dm.train_pairs},
               "drops": filtering.concept_drops, "writes": len(writes), "records": logger.records()},
              open(f"{out}/rank{rank}.json", "w"))
    if rank == 0:
        torch.save(torch.cat([p.detach().flatten() for p in module.policy.parameters()]), f"{out}/params.pt")
""")


@pytest.mark.slow
def test_ddp_ranks_share_rank_zeros_masks_and_train_as_one_process(tmp_path):
    script = tmp_path / "ddp_filter.py"
    script.write_text(DDP_SCRIPT)
    results, params = {}, {}
    for devices, batch_size in ((2, 4), (1, 8)):  # the same global batch
        out = tmp_path / f"d{devices}"
        out.mkdir()
        run_python(script, devices, batch_size, out, out / "cache", cwd=tmp_path, timeout=240)
        results[devices] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
        params[devices] = torch.load(out / "params.pt", weights_only=True)
        assert len(list((out / "cache").glob("token-masks-*.json"))) == 1

    one, (rank0, rank1) = results[1][0], results[2]
    # both ranks filter with rank zero's masks (rank 1 measured "keep everything"), as one process does
    assert rank0["masks"] == rank1["masks"] == one["masks"]
    assert rank0["pairs"] == rank1["pairs"] == one["pairs"]
    assert rank1["drops"] == rank0["drops"] == one["drops"] and sum(rank0["drops"]["SURE"].values()) > 0
    assert [r["writes"] for r in results[2]] == [1, 0]  # rank zero alone writes the cache
    assert any(not all(c) for c, _ in rank0["masks"].values())

    key = "concepts/token_filter/dropped_fraction"
    logged = [row[key] for _, row in rank0["records"] if key in row]
    assert len(logged) == 3 and all(math.isfinite(v) and 0 < v < 1 for v in logged)

    def losses(records):
        return [row["train/loss"] for _, row in records if "train/loss" in row]

    # DDP averages the two ranks' gradients of their 4-pair means: the 8-pair mean up to float order
    assert losses(rank0["records"]) == pytest.approx(losses(one["records"]), abs=2e-6)
    assert losses(one["records"])[-1] < losses(one["records"])[0]  # the weights moved
    # (not bit-equal: the all-reduce sums in another order, and each rank pads to its own batch's length)
    assert torch.allclose(params[2], params[1], rtol=0, atol=1e-6), (params[2] - params[1]).abs().max()
