"""A node cut off from the broker while it holds a task: the task runs elsewhere, and the cut
node's late result, once it is back, is fenced out.

The loopback variant freezes the node with SIGSTOP (its heartbeat thread included), which looks
like a cut network to the broker. The namespace variant cuts a real link: broker and nodes run
in their own network namespaces joined by veth pairs, and ``ip link set ... down`` cuts one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from flowrra import Flowrra, TaskStatus
from flowrra.transport import ZmqConnector
from tests.apps import failures
from tests.apps.failures import pids
from tests.conftest import (
    BROKER_EXE,
    HEARTBEAT_MS,
    LIVENESS,
    NODE_EXE,
    ROOT,
    Launcher,
    ManagedProcess,
    NodeProcess,
    remote_twin,
    subprocess_env,
    wait_for_glob,
)
from tests.failures.helpers import counter, eventually

APP = "tests.apps.failures:app"


def _history(record: dict) -> list[str]:
    return [entry[4] for entry in record["history"]]


async def _check_fenced(
    client: Flowrra, task_id: str, winner_pid: int, loser: NodeProcess, markers: Path
) -> None:
    """The late attempt of ``loser`` changed nothing.

    Back from its freeze, the loser either finishes its attempt before it registers again, and
    its late result reaches the broker, which counts it as stale; or it registers first, and
    the broker tells it to stop the superseded attempt. Which comes first is a race of the
    node's own loop; both must leave the winner's result alone."""
    (ending,) = await wait_for_glob(markers, f"cut-*.{loser.pid}.*", timeout=20)
    if ending.name.startswith("cut-done."):
        await eventually(
            lambda: _at_least(client, "stale_results", 1), timeout=20, what="a stale result"
        )
    else:
        assert ending.name.startswith("cut-cancelled."), ending
    result = await client.get_result(task_id)
    assert result is not None
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"pid": winner_pid}
    record = await client.admin("inspect", task_id=task_id)
    assert _history(record) == ["lost", "success"]  # exactly one final result
    assert record["attempt"] == 2


async def _at_least(client: Flowrra, name: str, value: int) -> bool:
    return await counter(client, name) >= value


# --------------------------------------------------------------------------- loopback


async def test_a_frozen_node_loses_its_task_and_its_late_result_is_ignored(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    nodes = launcher.nodes(broker, APP, count=2)
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.hold, str(tmp_path), str(release), "cut")
        await wait_for_glob(tmp_path, "cut.*.*")
        (first_pid,) = pids(tmp_path, "cut")
        frozen = next(n for n in nodes if n.pid == first_pid)
        other = next(n for n in nodes if n.pid != first_pid)
        mark = broker.process.mark()
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            await broker.process.await_line(
                rf"node {frozen.node_id} missed its heartbeats", since=mark, timeout=10
            )
            await wait_for_glob(tmp_path, "cut.*.*", count=2)
            assert sorted(pids(tmp_path, "cut")) == sorted([frozen.pid, other.pid])
            release.touch()
            result = await client.wait_for_result(task_id, timeout=15)
            assert result.status is TaskStatus.SUCCESS
            assert result.result == {"pid": other.pid}
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        # Back, it notices the silence, registers again and reports its late result.
        await broker.process.await_line(rf"node {frozen.node_id} joined", since=mark, timeout=15)
        await _check_fenced(client, task_id, other.pid, frozen, tmp_path)
    assert "register" in frozen.process.log(tail=50)


# --------------------------------------------------------------------------- namespaces

CLONE_NEWNET = 0x40000000
BROKER_PORT = 5555


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


@dataclass
class NetLab:
    """Network namespaces joined by veth pairs to a broker namespace, all torn down after."""

    tmp: Path
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    subnet: int = field(default_factory=lambda: 1 + int.from_bytes(os.urandom(1)) % 250)
    namespaces: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (namespace, device)
    launcher: Launcher | None = None

    def __post_init__(self) -> None:
        self.launcher = Launcher(self.tmp)
        self.broker_ns = self.add_namespace("b")

    def add_namespace(self, role: str) -> str:
        name = f"flowrra-{role}-{self.suffix}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        self.exec(name, "ip", "link", "set", "lo", "up")
        return name

    def exec(self, namespace: str, *argv: str) -> None:
        _ip("netns", "exec", namespace, *argv)

    def connect(self, role: str, index: int) -> tuple[str, str, str]:
        """A new namespace wired to the broker's by a veth pair; returns (namespace, its
        device, the broker's address on that link)."""
        namespace = self.add_namespace(role)
        broker_dev, node_dev = f"flb{index}{self.suffix}", f"fln{index}{self.suffix}"
        _ip("link", "add", broker_dev, "type", "veth", "peer", "name", node_dev)
        _ip("link", "set", broker_dev, "netns", self.broker_ns)
        self.links.append((self.broker_ns, broker_dev))
        _ip("link", "set", node_dev, "netns", namespace)
        self.links.append((namespace, node_dev))
        broker_addr = f"10.203.{self.subnet}.{4 * index + 1}"
        node_addr = f"10.203.{self.subnet}.{4 * index + 2}"
        self.exec(self.broker_ns, "ip", "addr", "add", f"{broker_addr}/30", "dev", broker_dev)
        self.exec(namespace, "ip", "addr", "add", f"{node_addr}/30", "dev", node_dev)
        self.exec(self.broker_ns, "ip", "link", "set", broker_dev, "up")
        self.exec(namespace, "ip", "link", "set", node_dev, "up")
        return namespace, node_dev, broker_addr

    def start(self, namespace: str, name: str, argv: list[str]) -> ManagedProcess:
        assert self.launcher is not None
        process = ManagedProcess(
            name, ["ip", "netns", "exec", namespace, *argv], env=subprocess_env(), cwd=ROOT
        )
        self.launcher.processes.append(process)
        return process

    def broker(self) -> ManagedProcess:
        process = self.start(
            self.broker_ns,
            f"netns-broker-{self.suffix}",
            [
                BROKER_EXE,
                "--bind", f"tcp://0.0.0.0:{BROKER_PORT}",
                "--publish", f"tcp://0.0.0.0:{BROKER_PORT + 1}",
                "--data-dir", str(self.tmp / "broker-data"),
                "--durability", "fast",
                "--heartbeat-ms", str(HEARTBEAT_MS),
                "--liveness", str(LIVENESS),
            ],
        )  # fmt: skip
        process.wait_for(r"broker listening on ")
        return process

    def node(self, namespace: str, broker_addr: str, node_id: str) -> NodeProcess:
        process = self.start(
            namespace,
            node_id,
            [
                NODE_EXE,
                "--app", APP,
                "--broker", f"tcp://{broker_addr}:{BROKER_PORT}",
                "--concurrency", "5",
                "--processes", "0",
                "--node-id", node_id,
                "--grace", "1",
            ],
        )  # fmt: skip
        process.wait_for(r"registered with broker ")
        return NodeProcess(process, node_id, APP)

    def context(self) -> zmq.Context[zmq.Socket[bytes]]:
        """A ZeroMQ context whose I/O threads live in the broker's namespace, so this test
        process can be a client there (connect to 127.0.0.1 of that namespace)."""
        box: dict[str, object] = {}

        def enter() -> None:  # setns changes only this thread; its children inherit it
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/var/run/netns/{self.broker_ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
                context.socket(zmq.DEALER).close()  # starts the I/O threads here
                box["context"] = context
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["context"]  # type: ignore[return-value]

    def close(self) -> None:
        try:
            if self.launcher is not None:
                self.launcher.close()  # the processes first: then the namespaces can go
        finally:
            for namespace, device in self.links:
                _ip("netns", "exec", namespace, "ip", "link", "del", device, check=False)
            for namespace in self.namespaces:
                _ip("netns", "del", namespace, check=False)


@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[NetLab]:
    probe = f"flowrra-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run 'ip netns add': {exc}")
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)
    lab = NetLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


async def test_a_node_behind_a_cut_link_loses_its_task_and_its_late_result_is_ignored(
    netlab: NetLab, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    release = tmp_path / "release"
    ns1, dev1, addr1 = netlab.connect("n1", 1)
    ns2, _, addr2 = netlab.connect("n2", 2)
    broker = netlab.broker()
    cut = netlab.node(ns1, addr1, f"cut-{netlab.suffix}")
    context = netlab.context()
    url = f"tcp://127.0.0.1:{BROKER_PORT}"
    # The app's connection is made over a context created inside the broker's namespace.
    client = remote_twin(failures.app, url, connector=ZmqConnector(url, context=context))
    await client.start()
    try:
        task_id = await client.submit(failures.hold, str(markers), str(release), "cut")
        await wait_for_glob(markers, "cut.*.*")
        assert pids(markers, "cut") == [cut.pid]
        other = netlab.node(ns2, addr2, f"other-{netlab.suffix}")
        mark = broker.mark()
        netlab.exec(ns1, "ip", "link", "set", dev1, "down")
        try:
            await broker.await_line(
                rf"node {cut.node_id} missed its heartbeats", since=mark, timeout=10
            )
            await wait_for_glob(markers, "cut.*.*", count=2)
            assert sorted(pids(markers, "cut")) == sorted([cut.pid, other.pid])
            release.touch()  # both attempts finish; only one can be heard
            result = await client.wait_for_result(task_id, timeout=15)
            assert result.status is TaskStatus.SUCCESS
            assert result.result == {"pid": other.pid}
            await wait_for_glob(markers, f"cut-done.{cut.pid}.*", timeout=15)
            assert await counter(client, "stale_results") == 0  # not heard yet: still cut
        finally:
            netlab.exec(ns1, "ip", "link", "set", dev1, "up")
        await broker.await_line(rf"node {cut.node_id} joined", since=mark, timeout=20)
        await _check_fenced(client, task_id, other.pid, cut, markers)
    finally:
        await client.stop()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(context.term)
