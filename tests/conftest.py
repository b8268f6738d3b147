"""Shared fixtures: real ``flowrra-broker`` and ``flowrra-node`` processes on 127.0.0.1.

* :func:`free_port` / ``free_port`` fixture: a loopback port nobody listens on.
* ``launcher`` (per test) and ``module_launcher`` (per module): :class:`Launcher` starts
  brokers (:meth:`Launcher.broker` waits for ``broker listening on``) and nodes
  (:meth:`Launcher.node` waits for ``registered with broker``); ``start_broker``,
  ``start_node`` and ``broker`` are shortcuts to the per-test one.
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
import atexit
import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowrra import Flowrra
from flowrra.testing import copy_tasks

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BROKER_EXE = str(BIN / "flowrra-broker")
NODE_EXE = str(BIN / "flowrra-node")

# Short heartbeats so a dead node or broker is noticed in well under a second.
HEARTBEAT_MS = 200
LIVENESS = 3
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 300


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(
    extra_path: Sequence[str | os.PathLike[str]] = (), *, repo: bool = True, **env: str
) -> dict[str, str]:
    """The environment for a broker, node or script: no stray FLOWRRA_* options, and on
    PYTHONPATH only ``extra_path`` and (with ``repo``) the repository root, for ``tests.apps``.
    """
    out = {k: v for k, v in os.environ.items() if not k.startswith("FLOWRRA_")}
    out.pop("PYTHONPATH", None)
    path = [os.fspath(p) for p in extra_path] + ([str(ROOT)] if repo else [])
    if path:
        out["PYTHONPATH"] = os.pathsep.join(path)
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env)
    return out


# --------------------------------------------------------------------------- processes


def _alive_in_group(pgid: int) -> list[int]:
    """Process ids of the group ``pgid`` that are alive (not zombies)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


class ManagedProcess:
    """A daemon started for a test; its output is read line by line in a thread."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: str | Path):
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.problems: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,  # its own process group: its children can be found
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()
        _LIVE.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # ----------------------------------------------------------------------- logs

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def mark(self) -> int:
        """The current log position, for :meth:`wait_for` ``since=``."""
        with self._cond:
            return len(self.lines)

    def log(self, tail: int | None = None) -> str:
        with self._cond:
            lines = self.lines if tail is None else self.lines[-tail:]
            return "\n".join(lines)

    def find(self, pattern: str, since: int = 0) -> re.Match[str] | None:
        regex = re.compile(pattern)
        with self._cond:
            for line in self.lines[since:]:
                match = regex.search(line)
                if match:
                    return match
        return None

    def wait_for(
        self, pattern: str, timeout: float = START_TIMEOUT_S, since: int = 0
    ) -> re.Match[str]:
        """Block until a log line from ``since`` on matches ``pattern``; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        position = since
        with self._cond:
            while True:
                while position < len(self.lines):
                    match = regex.search(self.lines[position])
                    position += 1
                    if match:
                        return match
                if self._eof:
                    self.proc.wait()
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode} before logging "
                        f"{pattern!r}; its log:\n{self.log(LOG_TAIL_LINES)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name} did not log {pattern!r} within {timeout}s; its log:\n"
                        f"{self.log(LOG_TAIL_LINES)}"
                    )
                self._cond.wait(remaining)

    async def await_line(
        self, pattern: str, timeout: float = START_TIMEOUT_S, since: int = 0
    ) -> re.Match[str]:
        """:meth:`wait_for` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, pattern, timeout, since)

    # ----------------------------------------------------------------------- ending

    def kill9(self) -> None:
        """SIGKILL the process itself (not its group) and reap it."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_GRACE_S)
        self._ended()

    def terminate(self, timeout: float = STOP_GRACE_S) -> int:
        """SIGTERM and wait; returns the exit code (no SIGKILL, see :meth:`stop`)."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._ended()
        return code

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a grace period, then make sure its whole group is gone."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{self.name} ignored SIGTERM for {STOP_GRACE_S}s")
                self.proc.kill()
                self.proc.wait(STOP_GRACE_S)
        self._ended()
        # Children (worker processes) get a moment to notice their parent is gone.
        deadline = time.monotonic() + 5.0
        leftovers = _alive_in_group(self.pid)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.05)
            leftovers = _alive_in_group(self.pid)
        if leftovers:
            self.problems.append(f"{self.name} left processes behind: {leftovers}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self._reader.join(5.0)

    def _ended(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()


_LIVE: list[ManagedProcess] = []


@atexit.register
def _kill_everything() -> None:  # a last resort if pytest itself is interrupted
    for process in _LIVE:
        if process.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def _stop_all(processes: list[ManagedProcess]) -> None:
    for process in processes:  # SIGTERM everyone first, so they stop in parallel
        if process.running:
            process.proc.send_signal(signal.SIGTERM)
    problems = []
    for process in processes:
        process.stop()
        problems.extend(process.problems)
        with contextlib.suppress(ValueError):
            _LIVE.remove(process)
    if problems:
        pytest.fail("teardown: " + "; ".join(problems), pytrace=False)


_TEST_START = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_START] = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Attach the logs of the processes that lived during a failed test to its report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when == "teardown" or not _LIVE:
        return
    since = item.stash.get(_TEST_START, 0.0)
    for process in _LIVE:
        if process.ended_at is not None and process.ended_at < since:
            continue
        report.sections.append(
            (f"{process.name} (pid {process.pid}) log", process.log(LOG_TAIL_LINES) or "(empty)")
        )


# --------------------------------------------------------------------------- broker / node


@dataclass
class BrokerProcess:
    process: ManagedProcess
    port: int
    publish_port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def publish_url(self) -> str:
        return f"tcp://127.0.0.1:{self.publish_port}"


@dataclass
class NodeProcess:
    process: ManagedProcess
    node_id: str
    app: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill9(self) -> None:
        """SIGKILL the node process (its worker processes are left to notice)."""
        self.process.kill9()

    def worker_pids(self) -> list[int]:
        """Worker processes the node's pool reported starting (including replacements)."""
        return [int(m) for m in re.findall(r"worker process (\d+) started", self.process.log())]


_names = itertools.count(1)


class Launcher:
    """Starts brokers and nodes for one fixture scope and stops them all at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[ManagedProcess] = []

    def broker(
        self,
        *,
        port: int | None = None,
        publish_port: int | None = None,
        data_dir: Path | None = None,
        heartbeat_ms: int = HEARTBEAT_MS,
        liveness: int = LIVENESS,
        args: Sequence[str] = (),
    ) -> BrokerProcess:
        """Start a broker (fast durability) and wait until it listens."""
        fixed = port is not None
        data_dir = data_dir or self.tmp / f"broker-data-{next(_names)}"
        for _ in range(1 if fixed else 5):
            bind_port = port if port is not None else free_port()
            pub_port = publish_port if publish_port is not None else free_port()
            name = f"broker-{next(_names)}"
            argv = [
                BROKER_EXE,
                "--bind", f"tcp://127.0.0.1:{bind_port}",
                "--publish", f"tcp://127.0.0.1:{pub_port}",
                "--data-dir", str(data_dir),
                "--durability", "fast",
                "--heartbeat-ms", str(heartbeat_ms),
                "--liveness", str(liveness),
                *args,
            ]  # fmt: skip
            process = ManagedProcess(name, argv, env=subprocess_env(), cwd=self.tmp)
            self.processes.append(process)
            try:
                process.wait_for(r"broker listening on ")
            except AssertionError:
                if fixed or "cannot bind" not in process.log():
                    raise
                continue  # somebody took the port meanwhile: try others
            return BrokerProcess(process, bind_port, pub_port, data_dir)
        raise AssertionError("could not start a broker on free ports")

    def node(
        self,
        broker: BrokerProcess | str,
        app: str = "tests.apps.fleet:app",
        *,
        concurrency: int = 10,
        processes: int = 0,
        node_id: str | None = None,
        cwd: Path | None = None,
        extra_path: Sequence[str | os.PathLike[str]] = (),
        repo_on_path: bool = True,
        env: dict[str, str] | None = None,
        wait: bool = True,
        args: Sequence[str] = (),
    ) -> NodeProcess:
        """Start a node serving ``app`` and (by default) wait until it is registered."""
        url = broker if isinstance(broker, str) else broker.url
        node_id = node_id or f"node-{next(_names)}"
        argv = [
            NODE_EXE,
            "--app", app,
            "--broker", url,
            "--concurrency", str(concurrency),
            "--processes", str(processes),
            "--node-id", node_id,
            *args,
        ]  # fmt: skip
        process = ManagedProcess(
            node_id,
            argv,
            env=subprocess_env(extra_path, repo=repo_on_path, **(env or {})),
            cwd=cwd or ROOT,
        )
        self.processes.append(process)
        node = NodeProcess(process, node_id, app)
        if wait:
            process.wait_for(r"registered with broker ")
        return node

    def close(self) -> None:
        _stop_all(self.processes)


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
