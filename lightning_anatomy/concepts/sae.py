"""Loading sparse autoencoders with sae-lens, and checking they fit the model they will read.

An SAE trained on another model or hook still "works" numerically and silently returns noise,
so every lens checks the width at construction and can measure reconstruction fidelity on a
sample before any dataset-scale work starts.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_anatomy.model_access import HookPoint, hidden_size_at

__all__ = ["SAELoadError", "load_sae", "check_sae_spec", "RandomSAESpec", "check_width", "measure_fidelity",
           "sae_d_in", "sae_d_sae", "SAE_SPECS"]

# an sae_lens.SAE, a directory, "release/sae_id", {"release": ..., "sae_id": ...}, "embedded", "random:<d_sae>"
SAESpec = Any
SAE_SPECS = ("an sae_lens.SAE object, a directory written by sae.save_model, 'release/sae_id' (sae-lens registry), "
             "{release: ..., sae_id: ...}, 'embedded' (the project's SAE for the embedded SmolLM2) or "
             "'random:<d_sae>' (a seeded random SAE for smoke runs: its features mean nothing)")


class SAELoadError(ValueError):
    """An SAE spec that cannot be loaded (bad form, missing directory, no network)."""


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if flag:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - huggingface_hub missing or changed: assume online
        return False


def _to_inference(sae: Any) -> Any:
    """Training SAEs (BatchTopK above all) encode batch-dependently; use their inference form.

    Round-trips through sae-lens' own `save_inference_model` / `load_from_disk` so the
    conversion (BatchTopK -> JumpReLU thresholds, folded scalings) is exactly sae-lens'.
    """
    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=str(sae.device))


def _split_release(spec: str) -> tuple[str, str]:
    """Split "release/sae_id" where either part may contain slashes, using sae-lens' registry."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    parts = spec.split("/")
    if len(parts) < 2 or not all(parts):
        raise SAELoadError(
            f"SAE spec {spec!r} is neither an existing directory nor 'release/sae_id' "
            "(e.g. 'gpt2-small-res-jb/blocks.8.hook_resid_pre'); check the path or the release name"
        )
    directory = get_pretrained_saes_directory()
    for i in range(1, len(parts)):
        release = "/".join(parts[:i])
        if release in directory:
            return release, "/".join(parts[i:])
    return parts[0], "/".join(parts[1:])


def _from_registry(release: str, sae_id: str, device: str | None, shown: str) -> Any:
    if _offline():
        raise SAELoadError(
            f"SAE {shown} comes from the sae-lens registry (SAE.from_pretrained), which downloads from "
            "the Hugging Face Hub, but HF_HUB_OFFLINE is set. On a machine with network run "
            f"`SAE.from_pretrained({release!r}, {sae_id!r}).save_model('<dir>')` and pass that "
            "directory instead, or unset HF_HUB_OFFLINE"
        )
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id, device=device or "cpu")
    except Exception as err:  # noqa: BLE001 - re-raised with the spec named
        raise SAELoadError(f"could not load SAE release={release!r} sae_id={sae_id!r}: {err}") from err


class RandomSAESpec:
    """`random:<d_sae>` before its model is known: its width is, its `d_in` comes from the hook.

    Callbacks are built (from YAML) before they see the policy, so they hold this and call
    `build(d_in)` at setup; the seed makes every rank and every rerun draw the same SAE.
    """

    def __init__(self, d_sae: int, seed: int = 0) -> None:
        self.d_sae, self.seed = int(d_sae), int(seed)

    def build(self, d_in: int) -> Any:
        from sae_lens import StandardSAE, StandardSAEConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return StandardSAE(StandardSAEConfig(d_in=int(d_in), d_sae=self.d_sae))

    def __repr__(self) -> str:
        return f"random:{self.d_sae}"


def _random_spec(text: str, seed: int) -> RandomSAESpec:
    width = text.split(":", 1)[1]
    if not width.isdigit() or int(width) < 1:
        raise SAELoadError(f"SAE spec {text!r}: random:<d_sae> needs a positive integer width, e.g. 'random:256'")
    return RandomSAESpec(int(width), seed)


def check_sae_spec(spec: SAESpec, where: str = "SAE spec") -> None:
    """Refuse a spec that cannot name an SAE, without loading anything (configs are checked
    before any model loads). Registry specs are only checked for their form."""
    if hasattr(spec, "W_dec") or isinstance(spec, RandomSAESpec):
        return
    if isinstance(spec, dict):
        if set(spec) != {"release", "sae_id"}:
            raise SAELoadError(f"{where}: an SAE spec dict must have exactly the keys 'release' and 'sae_id', got "
                               f"{sorted(spec)}")
        return
    if not isinstance(spec, str | Path) or not str(spec):
        raise SAELoadError(f"{where}: cannot load an SAE from {spec!r}; pass {SAE_SPECS}")
    text = str(spec)
    if text == "embedded":
        return
    if text.startswith("random:"):
        try:
            _random_spec(text, 0)
        except SAELoadError as err:
            raise SAELoadError(f"{where}: {err}") from None
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").is_file():
            raise SAELoadError(f"{where}: SAE directory {text!r} has no cfg.json; write one with sae.save_model(dir)")
        return
    if isinstance(spec, Path) or text.startswith(("/", "./", "../", "~")):
        raise SAELoadError(f"{where}: SAE directory {text!r} does not exist")
    if "/" not in text.strip("/"):
        raise SAELoadError(f"{where}: {text!r} is not an existing SAE directory; pass {SAE_SPECS}")


def load_sae(spec: SAESpec, *, device: str | torch.device | None = None, d_in: int | None = None,
             seed: int = 0) -> Any:
    """An inference `sae_lens.SAE` from any SAE spec (`SAE_SPECS`): the one resolver of SAE specs.

    `spec` may be an `SAE` (training SAEs are converted to their inference form), a directory
    written by `sae.save_model` (`SAE.load_from_disk`), `{"release": ..., "sae_id": ...}` or
    `"release/sae_id"` (`SAE.from_pretrained`, needs network; fails at once under HF_HUB_OFFLINE),
    `"embedded"`, or `"random:<d_sae>"`, which needs `d_in` (the model's width at the hook) and
    uses `seed`; without `d_in` it returns a `RandomSAESpec` to build later.
    """
    from sae_lens import SAE, TrainingSAE

    check_sae_spec(spec)  # the one rule for what a spec may be; below, only loading
    dev = str(device) if device is not None else None
    if isinstance(spec, str) and spec.startswith("random:"):
        spec = _random_spec(spec, seed)
    if isinstance(spec, RandomSAESpec):
        if d_in is None:
            return spec
        sae = spec.build(d_in)
        return sae.to(dev) if dev is not None else sae
    if isinstance(spec, str) and spec == "embedded":
        from lightning_anatomy.models.embedded import load_embedded_sae

        return load_embedded_sae(device=dev or "cpu")
    if isinstance(spec, SAE):
        sae = _to_inference(spec) if isinstance(spec, TrainingSAE) else spec
        return sae.to(dev) if dev is not None else sae
    if isinstance(spec, dict):
        return _from_registry(str(spec["release"]), str(spec["sae_id"]), dev, repr(spec))
    if isinstance(spec, str | Path):
        path = Path(spec).expanduser()
        if path.is_dir():
            return SAE.load_from_disk(path, device=dev or "cpu")
        text = str(spec)
        if _offline():  # fail before parsing the registry (a 2 s YAML read); a naive split suffices
            release, _, sae_id = text.partition("/")
        else:
            release, sae_id = _split_release(text)
        return _from_registry(release, sae_id, dev, repr(text))
    # an object check_sae_spec accepts by shape (it has W_dec) that is no sae_lens.SAE
    raise SAELoadError(f"cannot load an SAE from a {type(spec).__name__}; pass {SAE_SPECS}")


def sae_d_in(sae: Any) -> int:
    return int(sae.cfg.d_in)


def sae_d_sae(sae: Any) -> int:
    return int(sae.cfg.d_sae)


def check_width(sae: Any, model: nn.Module, hook: str | HookPoint) -> int:
    """Raise unless the SAE's `d_in` equals the model's width at `hook`; return that width."""
    name = hook.name if isinstance(hook, HookPoint) else hook
    width = hidden_size_at(model, hook)
    d_in = sae_d_in(sae)
    if d_in != width:
        meta = getattr(sae.cfg, "metadata", None)
        trained = ""
        if meta is not None and (meta.get("model_name") or meta.get("hook_name")):
            trained = f" (it was trained on model {meta.get('model_name')!r} at {meta.get('hook_name')!r})"
        raise ValueError(
            f"SAE d_in={d_in} but model width at {name!r} is {width}{trained}; "
            "use an SAE trained on this model and hook"
        )
    return width


@torch.no_grad()
def measure_fidelity(
    sae: Any,
    activations: torch.Tensor,
    *,
    hook: str | None = None,
    min_fve: float | None = 0.5,
) -> dict[str, float]:
    """How well `sae` reconstructs `activations` ([..., d]; every leading position is a token).

    Returns `fve` (1 - SSE / total variance around the mean activation), `l0` (mean number of
    non-zero features per token), `rel_error` (‖x − x̂‖ / ‖x‖ over all tokens, Frobenius) and
    `dead_fraction` (features that never fire in the sample). Warns, naming the hook, when
    `fve < min_fve` (`None` disables the warning).
    """
    x = activations.reshape(-1, activations.shape[-1])
    if x.shape[0] < 2:
        raise ValueError(f"measure_fidelity needs at least 2 activation vectors, got {x.shape[0]}")
    if x.shape[-1] != sae_d_in(sae):
        raise ValueError(f"activations have width {x.shape[-1]} but SAE d_in={sae_d_in(sae)}")
    device = next(sae.parameters()).device
    x = x.to(device)
    feats = sae.encode(x)
    recon = sae.decode(feats).float()
    xf = x.float()
    sse = (xf - recon).pow(2).sum()
    sst = (xf - xf.mean(0, keepdim=True)).pow(2).sum()
    fve = float(1.0 - sse / sst) if sst > 0 else (1.0 if sse == 0 else float("-inf"))
    firing = feats != 0
    result = {
        "fve": fve,
        "l0": float(firing.sum(-1).float().mean()),
        "rel_error": float(sse.sqrt() / xf.pow(2).sum().sqrt().clamp_min(1e-12)),
        "dead_fraction": float((~firing.any(0)).float().mean()),
    }
    if min_fve is not None and fve < min_fve:
        where = f"at {hook!r} " if hook else ""
        warnings.warn(
            f"SAE {where}explains only {fve:.1%} of the activation variance (threshold {min_fve:.0%}; "
            f"L0={result['l0']:.1f}, relative error {result['rel_error']:.3f}, "
            f"{result['dead_fraction']:.1%} dead features): check that it was trained on this model, hook "
            "and activation scale",
            stacklevel=2,
        )
    return result
