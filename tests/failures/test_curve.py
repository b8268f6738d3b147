"""CURVE: only keys the broker knows connect, and only node keys may act as nodes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowrra import TaskStatus
from flowrra.errors import BrokerUnavailable
from flowrra.security import keygen
from tests.apps import failures
from tests.conftest import BrokerProcess, Launcher, remote_twin

APP = "tests.apps.failures:app"


@dataclass
class Keys:
    broker_public: Path
    broker_secret: Path
    node_secret: Path
    client_secret: Path
    stranger_secret: Path

    def as_node(self, secret: Path) -> list[str]:
        return ["--curve-server-key", str(self.broker_public), "--curve-secret-key", str(secret)]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    broker_public, broker_secret = keygen(tmp_path / "broker", "broker")
    _, node_secret = keygen(tmp_path / "nodes", "node1")  # the broker's node key directory
    _, client_secret = keygen(tmp_path / "clients", "client1")  # its client key directory
    _, stranger_secret = keygen(tmp_path / "elsewhere", "stranger")  # in neither
    return Keys(broker_public, broker_secret, node_secret, client_secret, stranger_secret)


@pytest.fixture
def curve_broker(launcher: Launcher, keys: Keys, tmp_path: Path) -> BrokerProcess:
    return launcher.broker(
        args=[
            "--curve-secret-key", str(keys.broker_secret),
            "--node-keys", str(tmp_path / "nodes"),
            "--client-keys", str(tmp_path / "clients"),
        ]
    )  # fmt: skip


async def test_known_keys_run_tasks(
    launcher: Launcher, keys: Keys, curve_broker: BrokerProcess
) -> None:
    assert "CURVE authentication on" in curve_broker.process.log()
    node = launcher.node(curve_broker, APP, args=keys.as_node(keys.node_secret))
    client = remote_twin(
        failures.app,
        curve_broker,
        curve_server_key=str(keys.broker_public),
        curve_secret_key=str(keys.client_secret),
    )
    async with client:
        ping = await client.submit(failures.ping, 5)
        result = await client.wait_for_result(ping, timeout=10)
        status = await client.admin("status")
    assert result.status is TaskStatus.SUCCESS and result.result == 5
    assert [n["node_id"] for n in status["nodes"]] == [node.node_id]
    assert "refused" not in curve_broker.process.log()


async def test_unknown_keys_and_wrong_roles_are_refused(
    launcher: Launcher, keys: Keys, curve_broker: BrokerProcess, tmp_path: Path
) -> None:
    log = curve_broker.process
    # A stranger's key: the handshake is refused, so the client never hears the broker.
    stranger = remote_twin(
        failures.app,
        curve_broker,
        connect_timeout=1,
        curve_server_key=str(keys.broker_public),
        curve_secret_key=str(keys.stranger_secret),
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await stranger.start()
    assert time.monotonic() - started < 4
    await log.await_line(r"refused a connection with an unknown CURVE key", timeout=5)

    # No keys at all: a plaintext peer cannot talk to a CURVE server.
    plaintext = remote_twin(failures.app, curve_broker, connect_timeout=1)
    with pytest.raises(BrokerUnavailable):
        await plaintext.start()

    # A node holding a *client* key connects, but its node commands are dropped.
    mark = log.mark()
    impostor = launcher.node(curve_broker, APP, args=keys.as_node(keys.client_secret), wait=False)
    await log.await_line(r"refused a node command from a non-node key \(client:", since=mark)
    await impostor.process.await_line(r"connecting to ", timeout=5)

    # The legitimate client sees no node at all, and nothing runs.
    client = remote_twin(
        failures.app,
        curve_broker,
        curve_server_key=str(keys.broker_public),
        curve_secret_key=str(keys.client_secret),
    )
    async with client:
        task_id = await client.submit(failures.record, str(tmp_path), "impostor")
        # A READY sent after the task was queued would get it dispatched at once: wait for
        # the impostor's next refused command (its heartbeat thread beats every second).
        mark = log.mark()
        await log.await_line(r"refused a node command from a non-node key", since=mark)
        status = await client.admin("status")
        pending = await client.get_result(task_id)
    assert status["nodes"] == []
    assert pending is not None and pending.status is TaskStatus.PENDING
    assert not list(tmp_path.glob("impostor.*"))
    assert "registered with broker" not in impostor.process.log()
    assert impostor.process.running
