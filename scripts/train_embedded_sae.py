"""Train the SAE committed in lightning_anatomy/assets/smollm2_sae/ (the embedded model's SAE).

Runs offline on CPU: `python scripts/train_embedded_sae.py` (about a quarter of an hour on 2 free
cores; the committed weights record their settings, timings and held-out fidelity in
training_report.json). The shared HH-RLHF sample, when present beside the checkout, is only used
to measure out-of-domain fidelity, never for training.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lightning_anatomy.demo.sae_training import train_embedded_sae
from lightning_anatomy.models.embedded import EMBEDDED_SAE_DIR

HH_RLHF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-test-a.jsonl"


def _hh_rlhf_texts(n: int) -> list[str]:
    if not HH_RLHF.is_file():
        return []
    texts = []
    with HH_RLHF.open() as f:
        for line in f:
            texts.append(json.loads(line)["chosen"].strip())
            if len(texts) == n:
                break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=EMBEDDED_SAE_DIR)
    # Unset options keep train_embedded_sae's defaults (the settings of the committed weights).
    for flag, kind in (("--layer", int), ("--d-sae", int), ("--k", int), ("--training-tokens", int),
                       ("--batch-size", int), ("--lr", float), ("--n-package-texts", int), ("--n-generated", int),
                       ("--max-new-tokens", int), ("--seed", int)):
        parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--hh-rlhf-eval", type=int, default=24, help="HH-RLHF transcripts for out-of-domain evaluation")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    hh = _hh_rlhf_texts(args.hh_rlhf_eval)
    options = {name: value for name, value in vars(args).items()
               if value is not None and name not in ("output", "hh_rlhf_eval")}
    report = train_embedded_sae(args.output, extra_eval_texts={"hh_rlhf": hh} if hh else None, **options)
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
