"""Real brokers and nodes: sharing work, a node killed mid-task, runaway cpu tasks, and a
broker restart.

All processes run on 127.0.0.1 with 200 ms heartbeats (liveness 3), so a dead peer is noticed
in well under a second.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

from flowrra import TaskStatus
from tests.apps import fleet
from tests.conftest import (
    BrokerProcess,
    Launcher,
    NodeProcess,
    pid_alive,
    remote_twin,
    wait_for_glob,
    wait_for_path,
    wait_until,
)


def pid_of(marker: Path) -> int:
    return int(marker.name.rsplit("-", 1)[1])


async def test_two_nodes_share_the_work(launcher: Launcher) -> None:
    broker = launcher.broker()
    node_a, node_b = launcher.nodes(broker, count=2, concurrency=2, processes=1)
    app = remote_twin(fleet.app, broker)
    async with app:
        # One batch: the broker hands out one task per node per round, so each node gets
        # two at once; the other four go to whichever node frees a slot first.
        async_ids = await app.submit_many(fleet.whoami, [[0.2] for _ in range(8)])
        cpu_ids = await app.submit_many(fleet.cpu_whoami, [[] for _ in range(8)])
        async_results = [await app.wait_for_result(i, timeout=15) for i in async_ids]
        cpu_results = [await app.wait_for_result(i, timeout=15) for i in cpu_ids]
    assert all(r.success for r in async_results + cpu_results)
    async_pids = [r.result["pid"] for r in async_results]
    assert set(async_pids) == {node_a.pid, node_b.pid}, async_pids
    assert 2 <= async_pids.count(node_a.pid) <= 6, async_pids
    cpu_parents = [r.result["ppid"] for r in cpu_results]
    assert set(cpu_parents) == {node_a.pid, node_b.pid}, cpu_parents
    workers = {r.result["pid"] for r in cpu_results}
    assert workers <= set(node_a.worker_pids()) | set(node_b.worker_pids())


async def test_sigkilled_node_task_completes_on_another_node(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    node_a = launcher.node(broker, "tests.apps.fleet:app", concurrency=1)
    app = remote_twin(fleet.app, broker)
    markers, release = tmp_path / "markers", tmp_path / "release"
    markers.mkdir()
    async with app:
        task_id = await app.submit(fleet.hold, str(markers), str(release))
        await wait_for_path(markers / f"started-{node_a.pid}")  # running on A, the only node
        node_b = launcher.node(broker, "tests.apps.fleet:app", concurrency=1)
        running = await app.get_result(task_id)
        assert running is not None and running.status is TaskStatus.RUNNING
        mark = broker.process.mark()
        node_a.kill9()
        await broker.process.await_line(
            rf"node {node_a.node_id} (missed its heartbeats|disconnected)", since=mark
        )
        await wait_for_path(markers / f"started-{node_b.pid}")  # the broker gave it to B
        release.touch()
        result = await app.wait_for_result(task_id, timeout=15)
    assert result.status is TaskStatus.SUCCESS, result
    assert result.result == {"pid": node_b.pid}
    assert result.retries == 0  # a lost node is not a failed attempt
    assert result.error is None


async def test_task_that_kills_its_node_fails_after_max_worker_losses(
    launcher: Launcher,
) -> None:
    """A poison task is not re-dispatched forever: after N lost nodes it ends FAILED."""
    broker = launcher.broker(args=["--max-worker-losses", "2"])
    app = remote_twin(fleet.app, broker)
    disposable = {"TESTS_NODE_MAY_BE_KILLED": "1"}
    async with app:
        node = launcher.node(broker, "tests.apps.fleet:app", concurrency=1, env=disposable)
        task_id = await app.submit(fleet.kill_my_node)
        for loss in (1, 2):
            await asyncio.to_thread(node.process.proc.wait, 15)  # the task killed it
            assert node.process.proc.returncode == -signal.SIGKILL
            if loss == 1:
                node = launcher.node(broker, "tests.apps.fleet:app", concurrency=1, env=disposable)
        result = await app.wait_for_result(task_id, timeout=15)
        survivor = launcher.node(broker, "tests.apps.fleet:app", concurrency=1)
        after = await app.wait_for_result(await app.submit(fleet.whoami), timeout=10)
    assert result.status is TaskStatus.FAILED, result
    assert result.error is not None and result.error.startswith("WorkerLostError: "), result
    assert result.retries == 0
    assert after.result["pid"] == survivor.pid  # the poison task was not dispatched again


async def test_sigkilled_node_leaves_no_busy_worker_behind(
    launcher: Launcher, tmp_path: Path
) -> None:
    """A worker process busy in a call dies with its SIGKILLed node (it used to finish the
    call first, running the task twice once the broker had moved it to another node)."""
    broker = launcher.broker()
    node = launcher.node(broker, "tests.apps.fleet:app", concurrency=1, processes=1)
    app = remote_twin(fleet.app, broker)
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = 0
    try:
        async with app:
            await app.submit(fleet.cpu_hold, str(markers), 30.0)
            (marker,) = await wait_for_glob(markers, "cpu-*")
            worker = pid_of(marker)
            assert worker in node.worker_pids()
            node.kill9()
            # The orphan should die with its node, not run its call (30 s here) to the end
            # while the broker hands the same task to another node.
            await wait_until(lambda: not pid_alive(worker), timeout=3.0, what="worker exit")
    finally:
        if worker and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


async def test_cpu_timeout_kills_runaway_function_and_pool_keeps_working(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    node = launcher.node(broker, "tests.apps.fleet:app", concurrency=4, processes=2)
    original_workers = set(node.worker_pids())
    assert len(original_workers) == 2
    app = remote_twin(fleet.app, broker)
    markers = tmp_path / "markers"
    markers.mkdir()
    async with app:
        spin_id = await app.submit(fleet.spin, str(markers))
        square_ids = [await app.submit(fleet.square, x) for x in range(6)]
        squares = [await app.wait_for_result(i, timeout=15) for i in square_ids]
        spin = await app.wait_for_result(spin_id, timeout=15)
        # The pool is whole again: more cpu work runs on live worker processes.
        more_ids = await app.submit_many(fleet.square, [[x] for x in range(10, 16)])
        more = [await app.wait_for_result(i, timeout=15) for i in more_ids]

    assert [r.result["value"] for r in squares] == [x * x for x in range(6)], squares
    assert spin.status is TaskStatus.FAILED, spin
    assert spin.retries == 1  # max_retries=1: two attempts, each timed out
    assert spin.error == "TaskTimeoutError: task exceeded its timeout of 0.5s"
    spinners = [pid_of(m) for m in await wait_for_glob(markers, "spin-*", count=2)]
    assert len(set(spinners)) == 2  # each attempt killed its worker process
    for pid in spinners:
        assert pid in original_workers | set(node.worker_pids())
        assert not pid_alive(pid), f"runaway worker {pid} still alive"
    assert [r.result["value"] for r in more] == [x * x for x in range(10, 16)], more
    for result in more:
        assert pid_alive(result.result["pid"])
        assert result.result["pid"] not in spinners
    assert len(re.findall(r"worker process \d+ replaced by \d+", node.process.log())) == 2
    assert node.process.running


async def test_node_reconnects_after_broker_restart(launcher: Launcher) -> None:
    first = launcher.broker()
    node: NodeProcess = launcher.node(first, "tests.apps.fleet:app", concurrency=2)
    app = remote_twin(fleet.app, first)
    async with app:
        before_id = await app.submit(fleet.whoami)
        before = await app.wait_for_result(before_id, timeout=10)
        assert before.result["pid"] == node.pid

        assert first.process.terminate() == 0  # SIGTERM: a clean stop
        second: BrokerProcess = launcher.broker(
            port=first.port, publish_port=first.publish_port, data_dir=first.data_dir
        )
        await second.process.await_line(rf"node {node.node_id} joined")

        # The same client, reconnected by itself, and the same node.
        after_id = await app.submit(fleet.whoami)
        after = await app.wait_for_result(after_id, timeout=10)
        stored = await app.get_result(before_id)  # kept in the data dir across the restart
    assert after.status is TaskStatus.SUCCESS, after
    assert after.result["pid"] == node.pid
    assert node.process.running
    assert stored is not None and stored.status is TaskStatus.SUCCESS
    assert stored.result == before.result

    # A new client of the new broker is served by the same node too.
    fresh = remote_twin(fleet.app, second)
    async with fresh:
        result = await fresh.wait_for_result(await fresh.submit(fleet.whoami), timeout=10)
    assert result.result["pid"] == node.pid
    await asyncio.sleep(0)  # nothing else pending
