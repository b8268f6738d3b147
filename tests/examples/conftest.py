"""What the recipe tests share: where the examples are, and importing one of them.

Each example is a small project whose directory is what its users put on ``sys.path`` (or run
``flowrra-node`` from); the tests import its packages the same way, for one test module only.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT, BrokerProcess, Launcher

EXAMPLES = ROOT / "docs" / "examples"


class Example:
    """One example project, its directory on ``sys.path`` while the test module runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def module(self, name: str) -> ModuleType:
        """Import ``name`` from the example (failing if another package of that name wins)."""
        module = importlib.import_module(name)
        where = Path(module.__file__ or "").resolve()
        if not where.is_relative_to(self.directory):
            raise AssertionError(f"{name} was imported from {where}, not from {self.directory}")
        return module

    def broker_and_node(self, launcher: Launcher, app: str) -> BrokerProcess:
        """A broker and one node of ``app`` started as the recipes say: the node runs from the
        example's directory, which is all it has on its path."""
        broker = launcher.broker()
        launcher.node(broker, app, cwd=self.directory, repo_on_path=False, processes=0)
        return broker


@contextmanager
def example(name: str) -> Iterator[Example]:
    """``docs/examples/<name>`` on ``sys.path`` (restored at the end)."""
    directory = EXAMPLES / name
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        yield Example(directory)
