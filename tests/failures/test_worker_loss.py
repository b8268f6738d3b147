"""Worker losses: nodes SIGKILLed under a running task, and worker processes that kill
themselves. A lost attempt runs again elsewhere, and a task that keeps killing whatever runs it
ends FAILED with WorkerLostError instead of looping forever."""

from __future__ import annotations

import re
from pathlib import Path

from flowrra import TaskStatus
from tests.apps import failures
from tests.apps.failures import pids
from tests.conftest import Launcher, remote_twin, wait_for_glob

APP = "tests.apps.failures:app"


async def test_a_task_on_a_killed_node_runs_on_another_node(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    nodes = launcher.nodes(broker, APP, count=2)
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.hold, str(tmp_path), str(release))
        await wait_for_glob(tmp_path, "hold.*.*")
        (first_pid,) = pids(tmp_path, "hold")
        victim = next(n for n in nodes if n.pid == first_pid)
        survivor = next(n for n in nodes if n.pid != first_pid)
        victim.kill9()
        await wait_for_glob(tmp_path, "hold.*.*", count=2)  # it started again
        assert pids(tmp_path, "hold").count(survivor.pid) == 1
        release.touch()
        result = await client.wait_for_result(task_id, timeout=15)
        record = await client.admin("inspect", task_id=task_id)
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"pid": survivor.pid}
    assert result.retries == 0  # a lost node is not a failure of the task
    assert [entry[4] for entry in record["history"]] == ["lost", "success"]
    assert record["worker_losses"] == 1


async def test_a_task_whose_node_dies_every_time_ends_failed(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(args=["--max-worker-losses", "3"])
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.hang, str(tmp_path))
        for losses in range(1, 4):
            node = launcher.node(broker, APP)  # a fresh node each time
            await wait_for_glob(tmp_path, "hang.*.*", count=losses)
            assert node.pid in pids(tmp_path, "hang")
            node.kill9()
        result = await client.wait_for_result(task_id, timeout=15)
        record = await client.admin("inspect", task_id=task_id)
        # A node that joins now gets nothing: the task is over, not queued again.
        status = await client.admin("status")
    assert result.status is TaskStatus.FAILED
    assert result.error is not None
    assert result.error.startswith("WorkerLostError")
    assert "lost" in result.error
    assert record["worker_losses"] == 3
    assert [entry[4] for entry in record["history"]] == ["lost", "lost", "lost"]
    assert status["queued"] == 0 and status["in_flight"] == 0
    assert len(pids(tmp_path, "hang")) == 3


async def test_a_cpu_task_that_kills_its_worker_fails_and_the_pool_keeps_its_size(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    node = launcher.node(broker, APP, processes=1)
    (first_worker,) = node.worker_pids()
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.cpu_suicide, str(tmp_path))
        result = await client.wait_for_result(task_id, timeout=30)
        # The one worker process died three times; each time a new one took its place.
        await node.process.await_line(r"worker process \d+ replaced by \d+", timeout=5)
        after = [await client.submit(failures.cpu_pid) for _ in range(3)]
        outcomes = [await client.wait_for_result(t, timeout=15) for t in after]
    # max_retries=2: three attempts, each lost with its worker process.
    assert result.status is TaskStatus.FAILED
    assert result.retries == 2
    assert result.error is not None
    assert result.error.startswith("WorkerLostError")
    assert "died" in result.error
    suicides = pids(tmp_path, "suicide")
    assert len(suicides) == 3
    assert first_worker in suicides
    assert [o.status for o in outcomes] == [TaskStatus.SUCCESS] * 3
    workers = node.worker_pids()
    assert len(workers) == 4  # the first worker and three replacements
    replacement = workers[-1]
    assert {o.result["pid"] for o in outcomes} == {replacement}
    assert all(o.result["ppid"] == node.pid for o in outcomes)
    replaced = re.findall(r"worker process (\d+) replaced by (\d+)", node.process.log())
    assert sorted(int(old) for old, _ in replaced) == sorted(suicides)
