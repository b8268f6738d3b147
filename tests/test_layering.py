"""The import graph: no cycles, and layering that runs one way.

wire (protocol, errors) -> transport -> broker, node, client -> app and CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flowrra", "broker", "node")

# What each layer may import from the project (its own modules, and the layers below).
WIRE = {"flowrra.protocol", "flowrra.errors"}
TRANSPORT = {"flowrra.transport", "flowrra.security"}
APP_AND_CLI = {"flowrra.app", "flowrra.cli", "flowrra.dashboard", "broker.cli", "node.cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules a module imports (TYPE_CHECKING imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        out.update(name for name in names if name in known)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) - {name} for name, path in found.items()}


def test_there_are_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for target in edges.get(name, ()):
            if target == "flowrra" or name == "flowrra":
                continue  # the package's __init__ re-exports; it is not a layer
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_layering_runs_one_way() -> None:
    def layer(name: str) -> int:
        if name in WIRE:
            return 0
        if name in TRANSPORT:
            return 1
        if name in APP_AND_CLI:
            return 3
        return 2  # broker, node, client and the pieces they share

    wrong = [
        (source, target)
        for source, targets in graph().items()
        for target in targets
        if source != "flowrra" and target != "flowrra" and layer(target) > layer(source)
    ]
    assert wrong == []
