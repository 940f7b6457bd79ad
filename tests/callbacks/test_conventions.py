"""The conventions every public callback follows (docs/ARCHITECTURE.md, "Callback conventions").

Typed constructors (no `Any`, resolvable by LightningCLI), the first parameter (`concepts` for the
callbacks that edit concepts, `saes` for the ones that measure them), the strategies declared on
the class and said in the docstring, and one release of the old names with a DeprecationWarning.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import typing
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    SingleDeviceStrategy,
    Strategy,
)

import lightning_anatomy.callbacks
from lightning_anatomy.callbacks import (
    ConceptAttribution,
    ConceptBlocking,
    ConceptDriftMonitor,
    ConceptProjection,
    ConceptSteering,
    RewardShaping,
)
from lightning_anatomy.callbacks.strategies import DATA_PARALLEL, SHARDED, check_strategy
from lightning_anatomy.concepts import ConceptSet
from tests.helpers.concept_callback_helpers import random_pairs, random_sae

HOOK = "blocks.0.hook_resid_post"
EDITING = (ConceptProjection, ConceptBlocking, ConceptSteering)
MEASURING = (ConceptAttribution, ConceptDriftMonitor)
# acting on the loss's inputs rather than on activations: first what they act with
INPUT_SHAPING = {"RewardShaping": "scores", "TokenFiltering": "patterns"}
CALLBACKS = tuple(getattr(lightning_anatomy.callbacks, name) for name in lightning_anatomy.callbacks.__all__)


def _type_checking_names(cls: type) -> dict[str, object]:
    """The names a callback's module imports under `if TYPE_CHECKING:` (LightningCLI resolves them
    the same way), so its annotations can be evaluated."""
    module = sys.modules[cls.__module__]
    names: dict[str, object] = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__file__, "exec"), names)
    return names


def _init_hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls.__init__, localns=_type_checking_names(cls))


def _leaves(hint: object) -> list[object]:
    args = typing.get_args(hint)
    return [hint] if not args else [hint, *(leaf for arg in args for leaf in _leaves(arg))]


def _concepts() -> ConceptSet:
    return ConceptSet.from_vectors(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), HOOK)


# --------------------------------------------------------------------------- the public names


def test_the_facade_exports_every_callback_from_its_own_module():
    from lightning_anatomy import ConceptSteering as FacadeSteering
    from lightning_anatomy import RewardShaping as FacadeShaping

    assert FacadeSteering is ConceptSteering and FacadeShaping is RewardShaping
    assert ConceptSteering.__module__ == "lightning_anatomy.callbacks.steering"
    assert RewardShaping.__module__ == "lightning_anatomy.callbacks.reward_shaping"
    import lightning_anatomy

    assert {cls.__name__ for cls in CALLBACKS} <= set(lightning_anatomy.__all__)


# --------------------------------------------------------------------------- typed constructors


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_every_constructor_parameter_has_a_real_type(cls):
    hints = _init_hints(cls)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    missing = [p.name for p in params if p.name not in hints]
    assert not missing, f"{cls.__name__}: parameters without a type hint: {missing}"
    with_any = [p.name for p in params if any(leaf is typing.Any for leaf in _leaves(hints[p.name]))]
    assert not with_any, f"{cls.__name__}: parameters typed with Any: {with_any}"
    assert not any(p.kind is p.VAR_KEYWORD or p.kind is p.VAR_POSITIONAL for p in params)


def test_the_checker_sees_any_nested_in_a_type():
    assert any(leaf is typing.Any for leaf in _leaves(dict[str, typing.Any] | None))
    assert not any(leaf is typing.Any for leaf in _leaves(dict[str, int] | None))


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_lightning_cli_resolves_and_shows_every_type(cls):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "cb")
    help_text = parser.format_help()
    first = next(p for p in inspect.signature(cls.__init__).parameters if p != "self")
    assert f"--cb.{first}" in help_text
    assert "Any" not in help_text.replace("Any strategy", "")
    if cls in EDITING:
        assert "ConceptSet" in help_text
    if cls in MEASURING:
        assert "ConceptLens" in help_text


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_the_first_parameter_follows_the_convention(cls):
    first = next(iter(inspect.signature(cls).parameters))
    if cls in EDITING:
        assert first == "concepts"
    elif cls in MEASURING:
        assert first == "saes"
    else:  # a new callback must be placed in one of the groups (docs/ARCHITECTURE.md)
        assert first == INPUT_SHAPING[cls.__name__]


def test_strength_names_follow_the_rule():
    """`lam` weighs a term of the loss; `strength` scales an edit of activations or gradients."""
    for cls in (RewardShaping, ConceptBlocking):
        assert "lam" in inspect.signature(cls).parameters and "strength" not in inspect.signature(cls).parameters
    for cls in (ConceptSteering, ConceptProjection):
        assert "strength" in inspect.signature(cls).parameters and "lam" not in inspect.signature(cls).parameters


# --------------------------------------------------------------------------- renamed parameters


def test_concept_steering_alpha_still_works_as_strength():
    concepts = _concepts()
    with pytest.warns(DeprecationWarning, match=r"ConceptSteering: alpha= is deprecated .* use strength="):
        old = ConceptSteering(concepts, alpha=0.5)
    new = ConceptSteering(concepts, strength=0.5)
    assert old.strength == new.strength == 0.5
    assert old.state_key == new.state_key  # checkpoints resume across the rename
    with pytest.raises(ValueError, match="got both strength=1.0 and its deprecated name alpha=0.5"), \
            pytest.warns(DeprecationWarning):
        ConceptSteering(concepts, strength=1.0, alpha=0.5)
    with pytest.raises(ValueError, match="strength is required"):
        ConceptSteering(concepts)


def test_concept_projection_amplify_factor_still_works_as_strength():
    concepts = _concepts()
    with pytest.warns(DeprecationWarning, match=r"ConceptProjection: amplify_factor= is deprecated .* use strength="):
        old = ConceptProjection(concepts, amplify_factor=3.0)
    new = ConceptProjection(concepts, strength=3.0)
    assert old.strength == new.strength == 3.0
    assert old.state_key == new.state_key != ConceptProjection(concepts).state_key
    assert new.state_dict()["settings"]["amplify_factor"] == 3.0  # checkpoints keep their settings key
    with pytest.raises(ValueError, match="got both strength=4.0 and its deprecated name amplify_factor=3.0"), \
            pytest.warns(DeprecationWarning):
        ConceptProjection(concepts, strength=4.0, amplify_factor=3.0)


def test_concept_drift_monitor_lens_or_saes_still_works_as_saes():
    sae, probe = random_sae(), random_pairs(2)
    with pytest.warns(DeprecationWarning, match=r"ConceptDriftMonitor: lens_or_saes= is deprecated .* use saes="):
        old = ConceptDriftMonitor(lens_or_saes={HOOK: sae}, probe=probe)
    new = ConceptDriftMonitor({HOOK: sae}, probe)
    assert old.widths == new.widths == {HOOK: 128} and old.saes[HOOK] is sae
    assert old.state_key == new.state_key
    with pytest.raises(ValueError, match="saes is required"):
        ConceptDriftMonitor(probe=probe)
    with pytest.raises(ValueError, match="probe is required"):
        ConceptDriftMonitor({HOOK: sae})


@pytest.mark.parametrize(("module", "names"), [
    ("lightning_anatomy.callbacks.shaping", ("RewardShaping", "ConceptSteering")),
    ("lightning_anatomy.interventions.ablation", ("register_activation_edit", "ablation_edit", "orthonormal_union")),
])
def test_old_module_paths_warn_and_reexport(module, names):
    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match=f"{module} is deprecated"):
        old = importlib.import_module(module)
    import lightning_anatomy.callbacks as callbacks
    import lightning_anatomy.interventions as interventions

    for name in names:
        assert getattr(old, name) is getattr(callbacks if "callbacks" in module else interventions, name)


@pytest.mark.parametrize("name", ["project_out", "mean_ablate", "component_along"])
def test_moved_subspace_edits_warn_at_their_old_path(name):
    from lightning_anatomy.interventions import activation_edits, projection

    with pytest.warns(DeprecationWarning, match=f"projection.{name} is deprecated"):
        old = getattr(projection, name)
    assert old is getattr(activation_edits, name)
    with pytest.raises(AttributeError):
        projection.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_every_callback_declares_its_strategies_and_its_docstring_agrees(cls):
    supported = cls.__dict__.get("supported_strategies")
    assert isinstance(supported, tuple) and supported, f"{cls.__name__} declares no supported_strategies"
    assert all(isinstance(s, type) and issubclass(s, Strategy) for s in supported)
    doc = " ".join(inspect.getdoc(cls).split())
    assert "supported_strategies" in doc
    for strategy in supported:
        assert strategy.__name__ in doc, f"{cls.__name__}'s docstring does not name {strategy.__name__}"
    if not any(issubclass(s, SHARDED) for s in supported) and Strategy not in supported:
        assert "FSDP" not in doc


def _guarded(supported: tuple[type[Strategy], ...], allow: bool = False) -> SimpleNamespace:
    guarded = type("Guarded", (), {"supported_strategies": supported})()
    guarded.allow_untested_strategy = allow
    return guarded


def test_check_strategy_follows_the_declared_strategies():
    fsdp = SimpleNamespace(strategy=FSDPStrategy())
    ddp = SimpleNamespace(strategy=DDPStrategy())
    single = SimpleNamespace(strategy=SingleDeviceStrategy(device=torch.device("cpu")))
    deepspeed = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy))  # deepspeed is not installed
    check_strategy(fsdp, _guarded(DATA_PARALLEL + SHARDED))
    check_strategy(ddp, _guarded(DATA_PARALLEL))
    check_strategy(single, _guarded(DATA_PARALLEL))
    with pytest.raises(ValueError, match=r"Guarded is tested with SingleDeviceStrategy, DDPStrategy only, "
                                         r"not FSDPStrategy .*FSDP/DeepSpeed.*allow_untested_strategy=True"):
        check_strategy(fsdp, _guarded(DATA_PARALLEL))
    with pytest.raises(ValueError, match="not DeepSpeedStrategy"):  # a DDPStrategy subclass, refused by name
        check_strategy(deepspeed, _guarded(DATA_PARALLEL + SHARDED))
    check_strategy(deepspeed, _guarded(DATA_PARALLEL, allow=True))
    check_strategy(fsdp, _guarded(DATA_PARALLEL, allow=True))
