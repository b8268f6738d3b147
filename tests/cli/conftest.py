"""Helpers for the ``flowrra`` CLI tests: run commands in-process against real brokers.

The CLI runs in-process through click's :class:`CliRunner` (each command makes its own
``asyncio.run``, so the tests here are plain functions); brokers and nodes are real processes
started by the fixtures of ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from flowrra import Flowrra
from flowrra.cli import main
from flowrra.result import TaskResult
from tests.cli import cliapp
from tests.conftest import BrokerProcess, Launcher, NodeProcess, remote_twin

T = TypeVar("T")

# A task name no node serves: its submissions stay queued.
UNSERVED = "cli.unserved"


def _unserved() -> None:  # registered on the client side only
    raise AssertionError("no node serves this")


def invoke(url: str, *args: str, input: str | None = None, timeout: float = 5.0) -> Result:
    """``flowrra --broker url --timeout timeout ARGS`` in-process."""
    clean_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FLOWRRA_")}
    return CliRunner().invoke(
        main, ["--broker", url, "--timeout", str(timeout), *args], input=input, env=clean_env
    )


def ok(url: str, *args: str, input: str | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    result = invoke(url, *args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def ok_json(url: str, *args: str) -> Any:
    return json.loads(ok(url, *args, "--json"))


@dataclass
class Client:
    """Submit and wait through an app twin, one short connection per call."""

    url: str

    def run(self, body: Callable[[Flowrra], Awaitable[T]]) -> T:
        async def session() -> T:
            twin = remote_twin(cliapp.app, self.url)
            twin.task(name=UNSERVED)(_unserved)
            async with twin:
                return await body(twin)

        return asyncio.run(session())

    def submit(self, task: Any, *args: Any, priority: int | None = None, **kwargs: Any) -> str:
        return self.run(lambda app: app.submit(task, *args, priority=priority, **kwargs))

    def wait(self, task_id: str, timeout: float = 15.0) -> TaskResult:
        return self.run(lambda app: app.wait_for_result(task_id, timeout))

    def get(self, task_id: str) -> TaskResult | None:
        return self.run(lambda app: app.get_result(task_id))

    def status(self) -> dict[str, Any]:
        reply: dict[str, Any] = ok_json(self.url, "status")
        return reply


@dataclass
class Fleet:
    """One broker with two nodes serving :mod:`tests.cli.cliapp`."""

    broker: BrokerProcess
    nodes: list[NodeProcess]
    client: Client
    tmp: Path

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def fleet(module_launcher: Launcher) -> Iterator[Fleet]:
    broker = module_launcher.broker()
    nodes = [
        module_launcher.node(broker, "tests.cli.cliapp:app", concurrency=4, node_id=node_id)
        for node_id in ("cli-node-a", "cli-node-b")
    ]
    yield Fleet(broker, nodes, Client(broker.url), module_launcher.tmp)
