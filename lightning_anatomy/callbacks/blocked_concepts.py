"""`ConceptBlocking`'s `concepts` (and `saes`) arguments read into one `BlockedHook` per hook:
a `ConceptSet`'s `suppress` / `amplify` directions (unit, fp32 CPU), or SAE features
`{name: (hook, feature)}` scored through `saes`, each with its action's sign.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_anatomy.callbacks.concept_refs import ConceptRefSpec, parse_concept
from lightning_anatomy.callbacks.sae_specs import load_saes
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.interventions.blocking_penalty import BlockedHook
from lightning_anatomy.interventions.steering import ACTION_SIGN

if TYPE_CHECKING:
    from sae_lens import SAE

    from lightning_anatomy.concepts.lens import ConceptLens


def plan_blocked_concepts(
    concepts: (Mapping[str, ConceptRefSpec | tuple[str, int, str]] | Sequence[ConceptRefSpec | tuple[str, int, str]]
               | ConceptSet | str | os.PathLike),
    saes: Mapping[str, SAE | str | Mapping[str, str]] | ConceptLens | None,
) -> dict[str, BlockedHook]:
    """`{hook: BlockedHook}` from a ConceptSet (directions) or SAE-feature references with `saes`."""
    if isinstance(concepts, str | os.PathLike):
        concepts = ConceptSet.load(concepts)
    plans: dict[str, BlockedHook] = {}
    if hasattr(concepts, "select") and hasattr(concepts, "hooks"):
        if saes is not None:
            raise ValueError(
                "ConceptBlocking: saes= goes with SAE-feature concepts {name: (hook, feature)}; a ConceptSet "
                "carries its own directions (ConceptSet.from_sae_features builds one from decoder rows)"
            )
        for concept in concepts:
            sign = ACTION_SIGN.get(concept.action)
            if sign is None:
                continue
            plan = plans.setdefault(concept.hook, BlockedHook(concept.hook))
            vector = concept.vector.detach().float().cpu()
            plan.names.append(concept.name)
            plan.signs.append(sign)
            plan.vectors.append(vector / vector.norm())
        if not plans:
            raise ValueError(
                f"ConceptBlocking: concepts has no concept with action 'suppress' or 'amplify' ({len(concepts)} "
                "concepts, all 'allow'); set actions in concepts.yaml or with ConceptSet.with_actions"
            )
        return plans

    if isinstance(concepts, Mapping):
        entries = list(concepts.items())
    elif isinstance(concepts, Sequence) and not isinstance(concepts, str | bytes):
        entries = [(None, ref) for ref in concepts]
    else:
        raise ValueError(
            "ConceptBlocking: concepts must be a ConceptSet (or a saved one's directory), or SAE features "
            f"{{name: (hook, feature)}} with saes={{hook: sae}}; got {type(concepts).__name__}"
        )
    if not entries:
        raise ValueError("ConceptBlocking: concepts is empty; name at least one (hook, feature)")
    if saes is None:
        raise ValueError(
            "ConceptBlocking: SAE-feature concepts {name: (hook, feature)} need saes={hook: sae} to score them"
        )
    loaded, widths = load_saes(saes, "ConceptBlocking")
    seen: set[str] = set()
    for i, (name, ref) in enumerate(entries):
        where = f"concepts[{name!r}]" if name is not None else f"concepts[{i}]"
        action = "suppress"
        if isinstance(ref, tuple | list) and len(ref) == 3:
            ref, action = (ref[0], ref[1]), ref[2]
        if action not in ACTION_SIGN:
            raise ValueError(f"{where}: action {action!r} is not one of {tuple(ACTION_SIGN)}")
        hook, feature = parse_concept(ref, widths, where)
        name = f"{hook}:{feature}" if name is None else name
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"{where}: concept name {name!r} must be a non-empty string without '/'")
        if name in seen:
            raise ValueError(f"{where}: concept name {name!r} appears twice")
        seen.add(name)
        plan = plans.setdefault(hook, BlockedHook(hook, sae=loaded[hook]))
        plan.names.append(name)
        plan.signs.append(ACTION_SIGN[action])
        plan.features.append(feature)
    return plans


__all__ = ["plan_blocked_concepts"]
