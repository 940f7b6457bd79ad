"""How a callback option names one SAE concept, and the parsers that check such names.

A concept is `(hook, feature)`; options also accept `"hook:feature"` and, with a single hook, a
bare feature id. `ConceptRefSpec` is that accepted form, the type the callback constructors
declare (so LightningCLI checks it and `--help` shows it); `parse_concept` turns one into a
checked `ConceptRef`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ConceptRef = tuple[str, int]
# (hook, feature), "hook:feature", or a bare feature id (single hook only)
ConceptRefSpec = tuple[str, int] | str | int


def concept_name(ref: ConceptRef) -> str:
    """`"<hook>:<feature>"`, the name a concept gets when the user did not name it."""
    return f"{ref[0]}:{ref[1]}"


def parse_concept(value: object, widths: Mapping[str, int], where: str) -> ConceptRef:
    """One concept reference: `(hook, feature)`, `"hook:feature"`, or a bare feature id when
    there is a single hook. `where` names the option/entry in error messages."""
    hooks = list(widths)
    if isinstance(value, str) and ":" in value:
        hook, _, feat = value.rpartition(":")
        try:
            value = (hook, int(feat))
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not 'hook:feature' with an integer feature id") from None
    if isinstance(value, int) and not isinstance(value, bool):
        if len(hooks) != 1:
            raise ValueError(
                f"{where}: a bare feature id {value} is ambiguous with hooks {hooks}; write (hook, feature) "
                "or 'hook:feature'"
            )
        value = (hooks[0], value)
    if not (isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], str)):
        raise ValueError(f"{where}: {value!r} is not a concept; use (hook, feature), 'hook:feature' or a feature id")
    hook, feat = value[0], value[1]
    if hook not in widths:
        raise ValueError(f"{where}: hook {hook!r} has no SAE; SAEs are attached at {hooks}")
    if isinstance(feat, bool) or not isinstance(feat, int) or not 0 <= int(feat) < widths[hook]:
        raise ValueError(f"{where}: feature {feat!r} is out of range for hook {hook!r} (d_sae={widths[hook]})")
    return hook, int(feat)


def parse_track(track: Mapping[str, ConceptRefSpec] | Sequence[ConceptRefSpec] | None, widths: Mapping[str, int]
                ) -> dict[str, ConceptRef]:
    """`track` as `{metric name: (hook, feature)}`: a dict keeps its names, a list is named
    `hook:feature`."""
    if track is None:
        return {}
    if isinstance(track, Mapping):
        out = {}
        for name, ref in track.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"track: concept name {name!r} must be a non-empty string without '/'")
            out[name] = parse_concept(ref, widths, f"track[{name!r}]")
        return out
    if isinstance(track, str | bytes) or not isinstance(track, Sequence):
        raise ValueError(f"track must be a dict {{name: (hook, feature)}} or a list of concepts, got {track!r}")
    refs = [parse_concept(ref, widths, f"track[{i}]") for i, ref in enumerate(track)]
    return {concept_name(r): r for r in refs}


def parse_labels(labels: Mapping[ConceptRefSpec, str] | None, widths: Mapping[str, int]) -> dict[ConceptRef, str]:
    """`labels` keyed by any concept reference `parse_concept` accepts."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels must be a dict {{(hook, feature): label}}, got {type(labels).__name__}")
    return {parse_concept(k, widths, f"labels[{k!r}]"): str(v) for k, v in labels.items()}


__all__ = ["ConceptRef", "ConceptRefSpec", "concept_name", "parse_concept", "parse_labels", "parse_track"]
