"""The package's import graph has no cycles, between files or between subpackages.

Imports inside functions count (they are dependencies all the same); those under
`if TYPE_CHECKING:` do not (they never run). The layers of docs/ARCHITECTURE.md follow from this
plus the foundation rule checked below.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_anatomy"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports (a `from pkg import sub` names the submodule)."""
    out: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                out.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        visit(node)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_files():
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_subpackages():
    """Subpackages and top-level modules as nodes; the facade `__init__` (the top) is left out."""
    components: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        source = _component(module)
        if source:
            components.setdefault(source, set()).update(
                t for t in map(_component, targets) if t and t != source)
    assert _cycles(components) == []


def test_foundation_imports_nothing_of_the_package():
    """`model_access` is the floor: hook points, pass flags, finding the LM and its blocks."""
    assert _graph()["lightning_anatomy.model_access"] == set()


def test_data_layer_imports_only_the_foundation_and_model_loading():
    allowed = {"data", "model_access", "models", "files", "digests", "sharding", "_lazy"}
    for module, targets in _graph().items():
        if _component(module) == "data":
            assert {_component(t) for t in targets} <= allowed, (module, targets)
