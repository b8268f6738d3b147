"""Shared fixtures: real ``flowrra-broker`` and ``flowrra-node`` processes on 127.0.0.1.

The processes are started by :mod:`flowrra.processes` (the launcher the scripts use too);
this module only adds the suite's defaults and pytest glue:

* :func:`free_port` / ``free_port`` fixture: a loopback port nobody listens on.
* ``launcher`` (per test) and ``module_launcher`` (per module): :class:`Launcher` starts
  brokers (:meth:`Launcher.broker` waits for ``broker listening on``) and nodes
  (:meth:`Launcher.node` waits for ``registered with broker``; :meth:`Launcher.nodes` starts
  several at once) with 200 ms heartbeats;
  ``start_broker``, ``start_node`` and ``broker`` are shortcuts to the per-test one.
* :func:`remote_twin`: a client app pointed at a broker, with the same task registrations as a
  test app module (whose own ``app`` is the embedded default the nodes import);
  :func:`embedded_twin` the same for a fresh embedded app with other options.
* :func:`wait_for_path`, :func:`wait_for_glob`, :func:`wait_until`: wait for a task's marker
  file or a condition (tests synchronise on events, not on sleeps).

Every process runs in its own session (process group). Teardown sends SIGTERM, then SIGKILL
after a grace period, and fails the test if a process ignored SIGTERM or if any process of its
group (such as a node's worker processes) is still alive afterwards. Each process's combined
stdout/stderr is kept and attached to the report of a failing test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from flowrra import Flowrra, processes
from flowrra.processes import (
    BrokerProcess,
    ManagedProcess,
    NodeProcess,
    clean_env,
    free_port,
    live_processes,
    pid_alive,
)
from flowrra.testing import copy_tasks

__all__ = [
    "BIN",
    "BROKER_EXE",
    "HEARTBEAT_MS",
    "LIVENESS",
    "NODE_EXE",
    "ROOT",
    "BrokerProcess",
    "Launcher",
    "ManagedProcess",
    "NodeProcess",
    "embedded_twin",
    "free_port",
    "pid_alive",
    "remote_twin",
    "subprocess_env",
    "wait_for_glob",
    "wait_for_path",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BROKER_EXE = str(BIN / "flowrra-broker")
NODE_EXE = str(BIN / "flowrra-node")

# Short heartbeats so a dead node or broker is noticed in well under a second.
HEARTBEAT_MS = 200
LIVENESS = 3
LOG_TAIL_LINES = 300


def subprocess_env(
    extra_path: Sequence[str | os.PathLike[str]] = (), *, repo: bool = True, **env: str
) -> dict[str, str]:
    """The environment for a broker, node or script: no stray FLOWRRA_* options, and on
    PYTHONPATH only ``extra_path`` and (with ``repo``) the repository root, for ``tests.apps``.
    """
    return clean_env([*extra_path, *([ROOT] if repo else [])], **env)


_TEST_START = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_START] = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Attach the logs of the processes that lived during a failed test to its report."""
    outcome = yield
    report = outcome.get_result()
    live = live_processes()
    if not report.failed or report.when == "teardown" or not live:
        return
    since = item.stash.get(_TEST_START, 0.0)
    for process in live:
        if process.ended_at is not None and process.ended_at < since:
            continue
        report.sections.append(
            (f"{process.name} (pid {process.pid}) log", process.log(LOG_TAIL_LINES) or "(empty)")
        )


# --------------------------------------------------------------------------- broker / node


class Launcher(processes.Launcher):
    """:class:`flowrra.processes.Launcher` with the suite's defaults: short heartbeats, fast
    durability, ``tests.apps`` importable by nodes (run from the repository root), and a
    teardown that fails the test if a process ignored SIGTERM or left processes behind."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(
            tmp, python_path=[ROOT], node_cwd=ROOT, heartbeat_ms=HEARTBEAT_MS, liveness=LIVENESS
        )

    def node(
        self,
        broker: BrokerProcess | str,
        app: str = "tests.apps.fleet:app",
        *,
        extra_path: Sequence[str | os.PathLike[str]] = (),
        repo_on_path: bool = True,
        **options: Any,
    ) -> NodeProcess:
        """Start a node serving ``app`` (see :meth:`flowrra.processes.Launcher.node`);
        ``extra_path`` goes on PYTHONPATH before the repository root (``repo_on_path``)."""
        path = [*extra_path, *([ROOT] if repo_on_path else [])]
        return super().node(broker, app, python_path=path, **options)

    def nodes(
        self,
        broker: BrokerProcess | str,
        app: str = "tests.apps.fleet:app",
        *,
        count: int,
        **options: Any,
    ) -> list[NodeProcess]:
        """``count`` nodes like :meth:`node`'s, started at once (their start-ups, mostly
        imports, overlap) and each awaited until registered."""
        started = [self.node(broker, app, wait=False, **options) for _ in range(count)]
        for node in started:
            node.process.wait_for(processes.NODE_READY, processes.START_TIMEOUT_S)
        return started

    def close(self) -> list[str]:
        problems = super().close()
        if problems:
            pytest.fail("teardown: " + "; ".join(problems), pytrace=False)
        return problems


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    yield launch
    launch.close()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Processes shared by the tests of one module (started once, stopped at its end)."""
    launch = Launcher(tmp_path_factory.mktemp("module-processes"))
    yield launch
    launch.close()


@pytest.fixture
def start_broker(launcher: Launcher) -> Callable[..., BrokerProcess]:
    """``start_broker(**options)`` starts a broker for this test (see :meth:`Launcher.broker`)."""
    return launcher.broker


@pytest.fixture
def start_node(launcher: Launcher) -> Callable[..., NodeProcess]:
    """``start_node(broker, app, **options)`` starts a node (see :meth:`Launcher.node`)."""
    return launcher.node


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    """One broker with short heartbeats."""
    return start_broker()


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    return free_port


# --------------------------------------------------------------------------- apps


def remote_twin(app: Flowrra, broker: BrokerProcess | str, **options: Any) -> Flowrra:
    """A client of ``broker`` with the same task registrations as ``app``.

    A test app module's own ``app`` is the embedded default, which is what a node imports; the
    test submits through this twin. Registrations are copied through the public decorator, so
    ``twin.submit(module.function, ...)`` and task-name strings both work.
    """
    url = broker if isinstance(broker, str) else broker.url
    twin = Flowrra.from_urls(broker=url, **options)
    copy_tasks(app, twin)
    return twin


def embedded_twin(app: Flowrra, **options: Any) -> Flowrra:
    """A fresh embedded app with ``app``'s registrations (e.g. with other ``processes``)."""
    twin = Flowrra.from_urls(**options)
    copy_tasks(app, twin)
    return twin


async def wait_for_path(path: str | os.PathLike[str], timeout: float = 15.0) -> None:
    """Until a file exists (a task's marker), checking every 10 ms."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        await asyncio.sleep(0.01)


async def wait_for_glob(
    directory: Path, pattern: str, count: int = 1, timeout: float = 15.0
) -> list[Path]:
    """Until ``directory`` holds at least ``count`` files matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(directory.glob(pattern))
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} x {pattern} did not appear in {directory}: {found}")
        await asyncio.sleep(0.01)


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)
