"""Loading sparse autoencoders with sae-lens, and checking they fit the model they will read.

An SAE trained on another model or hook still "works" numerically and silently returns noise,
so every lens checks the width at construction and can measure reconstruction fidelity on a
sample before any dataset-scale work starts.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_anatomy.model_access import HookPoint, hidden_size_at
from lightning_anatomy.models.specs import SpecError, SpecRegistry, refuse_unreachable_hub

__all__ = ["SAELoadError", "SAEWidthError", "load_sae", "check_sae_spec", "RandomSAESpec", "check_width", "measure_fidelity",
           "sae_d_in", "sae_d_sae", "SAE_SPECS", "parse_sae_spec", "SAE_KINDS",
           "SAEObjectSpec", "EmbeddedSAESpec", "SAEDirectorySpec", "RegistrySAESpec"]

# an sae_lens.SAE, a directory, "release/sae_id", {"release": ..., "sae_id": ...}, "embedded", "random:<d_sae>"
SAESpec = Any
SAE_SPECS = ("an sae_lens.SAE object, a directory written by sae.save_model, 'release/sae_id' (sae-lens registry), "
             "{release: ..., sae_id: ...}, 'embedded' (the project's SAE for the embedded SmolLM2) or "
             "'random:<d_sae>' (a seeded random SAE for smoke runs: its features mean nothing)")


class SAELoadError(ValueError):
    """An SAE spec that cannot be loaded (bad form, missing directory, no network)."""


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
    directory = get_pretrained_saes_directory()
    for i in range(1, len(parts)):
        release = "/".join(parts[:i])
        if release in directory:
            return release, "/".join(parts[i:])
    return parts[0], "/".join(parts[1:])


class SAEWidthError(SAELoadError):
    """An SAE whose `d_in` is not the model's width at its hook (trained on another model or hook)."""


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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RandomSAESpec) and (self.d_sae, self.seed) == (other.d_sae, other.seed)

    def __hash__(self) -> int:
        return hash((self.d_sae, self.seed))

    def __repr__(self) -> str:
        return f"random:{self.d_sae}"


# ---- SAE spec kinds: each parsed once (models/specs.py), used by check_sae_spec and load_sae ---------------


@dataclass(frozen=True)
class SAEObjectSpec:
    """An SAE object (anything with `W_dec`; `load_sae` needs an `sae_lens.SAE`)."""

    sae: Any


@dataclass(frozen=True)
class EmbeddedSAESpec:
    """`embedded`: the project's SAE for the embedded SmolLM2."""


@dataclass(frozen=True)
class SAEDirectorySpec:
    """A directory written by `sae.save_model` (holds cfg.json)."""

    path: Path


@dataclass(frozen=True)
class RegistrySAESpec:
    """`release/sae_id` or `{release, sae_id}`: an SAE of the sae-lens registry (from the Hub)."""

    release: str
    sae_id: str


SAESpecKind = SAEObjectSpec | RandomSAESpec | EmbeddedSAESpec | SAEDirectorySpec | RegistrySAESpec
SAE_KINDS: SpecRegistry[SAESpecKind] = SpecRegistry("an SAE spec")


class _SAEError(SAELoadError, SpecError):
    """SAELoadError for callers that catch it, SpecError for those that catch every spec mistake."""


def _refuse_hub(release: str, sae_id: str, where: str) -> None:
    try:
        refuse_unreachable_hub(f"{where}: SAE {release}/{sae_id} (sae-lens registry, SAE.from_pretrained)",
                               f"on a machine with network run `SAE.from_pretrained({release!r}, {sae_id!r})"
                               ".save_model('<dir>')` and pass that directory instead")
    except SpecError as err:
        raise _SAEError(str(err)) from None


def _sae_object(spec: object, where: str) -> SAEObjectSpec | RandomSAESpec | None:
    if isinstance(spec, RandomSAESpec):
        return spec
    return SAEObjectSpec(spec) if hasattr(spec, "W_dec") else None


def _sae_random(spec: object, where: str) -> RandomSAESpec | None:
    if not isinstance(spec, str) or not spec.startswith("random:"):
        return None
    width = spec.split(":", 1)[1]
    if not width.isdigit() or int(width) < 1:
        raise _SAEError(f"{where}: SAE spec {spec!r}: random:<d_sae> needs a positive integer width, "
                        "e.g. 'random:256'")
    return RandomSAESpec(int(width))


def _sae_embedded(spec: object, where: str) -> EmbeddedSAESpec | None:
    return EmbeddedSAESpec() if spec == "embedded" else None


def _sae_directory(spec: object, where: str) -> SAEDirectorySpec | None:
    if not isinstance(spec, str | os.PathLike) or not str(spec):
        return None
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").is_file():
            raise _SAEError(f"{where}: SAE directory {text!r} has no cfg.json; write one with sae.save_model(dir)")
        return SAEDirectorySpec(path)
    if isinstance(spec, os.PathLike) or text.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        raise _SAEError(f"{where}: SAE directory {text!r} does not exist (no such directory {str(path.absolute())!r})")
    if "/" not in text.strip("/"):
        raise _SAEError(f"{where}: {text!r} is not an existing SAE directory; pass {SAE_SPECS}")
    return None


def _sae_registry(spec: object, where: str) -> RegistrySAESpec | None:
    if isinstance(spec, Mapping):
        if set(spec) != {"release", "sae_id"}:
            raise _SAEError(f"{where}: an SAE spec dict must have exactly the keys 'release' and 'sae_id', got "
                            f"{sorted(spec)}")
        release, sae_id = str(spec["release"]), str(spec["sae_id"])
        _refuse_hub(release, sae_id, where)
        return RegistrySAESpec(release, sae_id)
    if not isinstance(spec, str) or "/" not in spec:
        return None
    parts = spec.split("/")
    if not all(parts):
        raise _SAEError(f"{where}: SAE spec {spec!r} is neither an existing directory nor 'release/sae_id' "
                        "(e.g. 'gpt2-small-res-jb/blocks.8.hook_resid_pre'); check the path or the release name")
    _refuse_hub(parts[0], "/".join(parts[1:]), where)  # fail before parsing the registry (a 2 s YAML read)
    return RegistrySAESpec(*_split_release(spec))


SAE_KINDS.register("object", _sae_object, "an sae_lens.SAE object")
SAE_KINDS.register("random", _sae_random, "'random:<d_sae>' (a seeded random SAE for smoke runs: its features "
                   "mean nothing)")
SAE_KINDS.register("embedded", _sae_embedded, "'embedded' (the project's SAE for the embedded SmolLM2)")
SAE_KINDS.register("directory", _sae_directory, "a directory written by sae.save_model")
SAE_KINDS.register("registry", _sae_registry, "'release/sae_id' or {release: ..., sae_id: ...} (sae-lens registry)")


def parse_sae_spec(spec: SAESpec, where: str = "SAE spec") -> SAESpecKind:
    """The typed spec of an SAE spec (parsed once; `check_sae_spec` and `load_sae` both use it)."""
    try:
        return SAE_KINDS.parse(spec, where)
    except SAELoadError:
        raise
    except SpecError:
        raise _SAEError(f"{where}: cannot load an SAE from {spec!r}; pass {SAE_SPECS}") from None


def check_sae_spec(spec: SAESpec, where: str = "SAE spec") -> None:
    """Refuse a spec that cannot name an SAE, without loading anything (configs are checked
    before any model loads). A registry spec is refused at once when the Hub cannot serve it."""
    parse_sae_spec(spec, where)


def load_sae(spec: SAESpec, *, device: str | torch.device | None = None, d_in: int | None = None,
             seed: int = 0, where: str = "SAE spec") -> Any:
    """An inference `sae_lens.SAE` from any SAE spec (`SAE_SPECS`): the one resolver of SAE specs.

    `spec` may be an `SAE` (training SAEs are converted to their inference form), a directory
    written by `sae.save_model` (`SAE.load_from_disk`), `{"release": ..., "sae_id": ...}` or
    `"release/sae_id"` (`SAE.from_pretrained`, needs network; fails at once under HF_HUB_OFFLINE),
    `"embedded"`, or `"random:<d_sae>"`, which needs `d_in` (the model's width at the hook) and
    uses `seed`; without `d_in` it returns a `RandomSAESpec` to build later.
    """
    from sae_lens import SAE, TrainingSAE

    parsed = parse_sae_spec(spec, where)
    dev = str(device) if device is not None else None
    if isinstance(parsed, RandomSAESpec):
        pending = parsed if isinstance(spec, RandomSAESpec) else RandomSAESpec(parsed.d_sae, seed)
        if d_in is None:
            return pending
        sae = pending.build(d_in)
        return sae.to(dev) if dev is not None else sae
    if isinstance(parsed, EmbeddedSAESpec):
        from lightning_anatomy.models.embedded import load_embedded_sae

        return load_embedded_sae(device=dev or "cpu")
    if isinstance(parsed, SAEDirectorySpec):
        return SAE.load_from_disk(parsed.path, device=dev or "cpu")
    if isinstance(parsed, RegistrySAESpec):
        try:
            return SAE.from_pretrained(parsed.release, parsed.sae_id, device=dev or "cpu")
        except Exception as err:  # noqa: BLE001 - re-raised with the spec named
            raise SAELoadError(f"{where}: could not load SAE release={parsed.release!r} "
                               f"sae_id={parsed.sae_id!r}: {err}") from err
    if isinstance(parsed.sae, SAE):
        sae = _to_inference(parsed.sae) if isinstance(parsed.sae, TrainingSAE) else parsed.sae
        return sae.to(dev) if dev is not None else sae
    # an object the spec check accepts by shape (it has W_dec) that is no sae_lens.SAE
    raise SAELoadError(f"{where}: cannot load an SAE from a {type(parsed.sae).__name__}; pass {SAE_SPECS}")


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
        raise SAEWidthError(
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
