"""A task that blocks the node's event loop must not get the node declared dead: the node's
heartbeat thread, with its own socket, keeps beating while the loop is stuck."""

from __future__ import annotations

import time
from pathlib import Path

from flowrra import TaskStatus
from flowrra.protocol import HEARTBEAT_INTERVAL_MS
from tests.apps import failures
from tests.apps.failures import pids
from tests.conftest import (
    HEARTBEAT_MS,
    LIVENESS,
    BrokerProcess,
    Launcher,
    NodeProcess,
    remote_twin,
    wait_for_glob,
    wait_until,
)

APP = "tests.apps.failures:app"
EXPIRY_S = HEARTBEAT_MS * LIVENESS / 1000


async def test_a_blocked_event_loop_does_not_lose_the_node(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The loop blocks right after the node registered (its first task does it).

    The heartbeat thread must already beat at the broker's interval then, not only after
    its first period at the protocol's default interval has gone by.
    """
    broker = launcher.broker()
    node = launcher.node(broker, APP)
    await _block_and_check(broker, node, tmp_path)


async def test_a_blocked_event_loop_later_on_does_not_lose_the_node(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The same once the node has run for longer than the heartbeat thread's first period
    (at the protocol's default interval: the broker's WELCOME only changes later periods)."""
    broker = launcher.broker()
    node = launcher.node(broker, APP)
    registered_at = time.monotonic()
    await wait_until(
        lambda: time.monotonic() - registered_at > 1.5 * HEARTBEAT_INTERVAL_MS / 1000,
        what="the node's first heartbeat period",
    )
    await _block_and_check(broker, node, tmp_path)


async def _block_and_check(broker: BrokerProcess, node: NodeProcess, tmp_path: Path) -> None:
    async with remote_twin(failures.app, broker) as client:
        blocker = await client.submit(failures.block_loop, str(tmp_path), 3 * EXPIRY_S)
        await wait_for_glob(tmp_path, "block.*.*")
        # Submitted while the loop is blocked: dispatched to the same (only) node.
        other = await client.submit(failures.record, str(tmp_path), "other")
        blocked = await client.wait_for_result(blocker, timeout=20)
        after = await client.wait_for_result(other, timeout=20)
        record = await client.admin("inspect", task_id=blocker)
        status = await client.admin("status")
    assert blocked.status is TaskStatus.SUCCESS
    assert blocked.result == {"pid": node.pid}
    assert after.status is TaskStatus.SUCCESS
    assert after.result == {"pid": node.pid}
    # It ran once: never re-dispatched as if its node had died.
    assert pids(tmp_path, "block") == [node.pid]
    assert [entry[4] for entry in record["history"]] == ["success"]
    # The other task could only start once the loop was free again.
    block_done = float(next(tmp_path.glob("block-done.*.*")).read_text())
    other_ran = float(next(tmp_path.glob("other.*.*")).read_text())
    assert other_ran >= block_done
    broker_log = broker.process.log()
    assert "missed its heartbeats" not in broker_log
    assert "disconnected" not in broker_log
    assert broker_log.count(f"node {node.node_id} joined") == 1
    assert "broker silent" not in node.process.log()
    assert [n["node_id"] for n in status["nodes"]] == [node.node_id]
    assert status["counters"].get("requeued", 0) == 0
