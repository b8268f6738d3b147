"""The import graph: no cycles, and layering that runs one way.

wire (protocol, errors) -> transport -> broker, node, client -> app and CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the installed package it becomes (flowrra/broker and flowrra/node are
# symlinks to the top-level folders, so there is one copy of each file).
PACKAGES = {"flowrra": "flowrra", "broker": "flowrra.broker", "node": "flowrra.node"}

# What each layer may import from the project (its own modules, and the layers below).
WIRE = {"flowrra.protocol", "flowrra.errors"}
# The client/node side of the sockets and the in-process hub; the broker's endpoint
# (flowrra.broker.endpoint) is part of the broker layer.
TRANSPORT = {"flowrra.transport", "flowrra.inproc", "flowrra.security"}
APP_AND_CLI = {
    "flowrra.app",
    "flowrra.cli",
    "flowrra.dashboard",
    "flowrra.broker.cli",
    "flowrra.node.cli",
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = (package, *path.relative_to(ROOT / folder).with_suffix("").parts)
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


def test_nothing_imports_the_bare_top_level_folders() -> None:
    """``broker`` and ``node`` are only ever imported as ``flowrra.broker`` and ``flowrra.node``.

    The bare names would load a second copy of each module (and are not installed at all).
    """
    bare = []
    for folder in ("flowrra", "broker", "node", "tests", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                bare += [
                    f"{path.relative_to(ROOT)}: {name}"
                    for name in names
                    if name.split(".")[0] in ("broker", "node")
                ]
    assert bare == []


def test_the_namespace_symlinks_point_at_the_top_level_folders() -> None:
    for folder in ("broker", "node"):
        link = ROOT / "flowrra" / folder
        assert link.is_symlink(), f"flowrra/{folder} must be a symlink to ../{folder}"
        assert link.resolve() == (ROOT / folder).resolve()
