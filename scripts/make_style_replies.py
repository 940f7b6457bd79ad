"""Regenerate `lightning_anatomy/demo/style_replies.json`: the demo's real replies.

    .venv/bin/python scripts/make_style_replies.py [--out lightning_anatomy/demo/style_replies.json]

Samples SmolLM2-135M-Instruct's own reply to each of the demo's 96 requests
(`lightning_anatomy.demo.style.style_prompts`) with the settings in `style.SAMPLING` (seeded: a
rerun on the same torch build writes the same file), about a minute on 2 CPU cores. The demo ships
the result so that `make demo` spends no time generating.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_anatomy.demo import style
from lightning_anatomy.demo.sae_training import generate_replies
from lightning_anatomy.files import atomic_write_text
from lightning_anatomy.models.embedded import MODEL_NAME, load_embedded


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=style.REPLIES_FILE)
    args = parser.parse_args(argv)
    model, tokenizer = load_embedded()
    prompts = style.style_prompts()
    replies = generate_replies(model.eval(), tokenizer, prompts, **style.SAMPLING)
    doc = {"model": MODEL_NAME, "how": "scripts/make_style_replies.py: one sampled reply per prompt",
           "sampling": style.SAMPLING, "prompts": prompts, "replies": replies}
    atomic_write_text(args.out, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(replies)} replies to {args.out}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
