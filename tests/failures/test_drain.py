"""SIGTERM on a node: it drains (no new tasks, running ones get ``--grace`` seconds), then
exits 0; whatever is still running then, or on a second SIGTERM, is handed back and runs
elsewhere."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from flowrra import TaskStatus
from tests.apps import failures
from tests.apps.failures import pids
from tests.conftest import Launcher, remote_twin, wait_for_glob

APP = "tests.apps.failures:app"


async def test_a_draining_node_finishes_its_task_and_takes_no_new_one(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    draining = launcher.node(broker, APP, args=["--grace", "10"])
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        running = await client.submit(failures.hold, str(tmp_path), str(release))
        await wait_for_glob(tmp_path, "hold.*.*")
        mark = broker.process.mark()
        draining.process.proc.send_signal(signal.SIGTERM)
        await draining.process.await_line(r"draining: waiting up to 10s for 1 running tasks")
        await broker.process.await_line(rf"node {draining.node_id} is draining", since=mark)
        # Submitted during the drain: the broker keeps it queued rather than hand it over.
        later = await client.submit(failures.record, str(tmp_path), "later")
        queued = await client.get_result(later)
        assert queued is not None and queued.status is TaskStatus.PENDING
        release.touch()
        result = await client.wait_for_result(running, timeout=15)
        code = await asyncio.to_thread(draining.process.proc.wait, 15)
        assert not list(tmp_path.glob("later.*"))
        still = await client.get_result(later)
        assert still is not None and still.status is TaskStatus.PENDING
        # A new node takes it.
        fresh = launcher.node(broker, APP)
        done = await client.wait_for_result(later, timeout=15)
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"pid": draining.pid}
    assert code == 0
    assert done.status is TaskStatus.SUCCESS
    assert done.result == {"pid": fresh.pid}
    assert pids(tmp_path, "later") == [fresh.pid]
    assert "grace period over" not in draining.process.log()


async def test_a_task_still_running_after_the_grace_period_is_handed_back(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    leaving = launcher.node(broker, APP, args=["--grace", "1"])
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.hold, str(tmp_path), str(release))
        await wait_for_glob(tmp_path, "hold.*.*")
        signalled = time.monotonic()
        leaving.process.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(leaving.process.proc.wait, 15)
        took = time.monotonic() - signalled
        assert "grace period over: handing 1 tasks back" in leaving.process.log()
        other = launcher.node(broker, APP)
        await wait_for_glob(tmp_path, "hold.*.*", count=2)
        release.touch()
        result = await client.wait_for_result(task_id, timeout=15)
        record = await client.admin("inspect", task_id=task_id)
    assert code == 0
    assert 0.9 <= took < 6
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"pid": other.pid}
    assert sorted(pids(tmp_path, "hold")) == sorted([leaving.pid, other.pid])
    # Handed back, not lost: it does not count towards --max-worker-losses.
    assert [entry[4] for entry in record["history"]] == ["returned", "success"]
    assert record["worker_losses"] == 0


async def test_a_second_sigterm_stops_the_drain_at_once(launcher: Launcher, tmp_path: Path) -> None:
    broker = launcher.broker()
    leaving = launcher.node(broker, APP, args=["--grace", "30"])
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.hold, str(tmp_path), str(release))
        await wait_for_glob(tmp_path, "hold.*.*")
        leaving.process.proc.send_signal(signal.SIGTERM)
        await leaving.process.await_line(r"draining: waiting up to 30s")
        signalled = time.monotonic()
        leaving.process.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(leaving.process.proc.wait, 15)
        took = time.monotonic() - signalled
        other = launcher.node(broker, APP)
        await wait_for_glob(tmp_path, "hold.*.*", count=2)
        release.touch()
        result = await client.wait_for_result(task_id, timeout=15)
        record = await client.admin("inspect", task_id=task_id)
    assert code == 0
    assert took < 5  # not the 30 s grace
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"pid": other.pid}
    assert [entry[4] for entry in record["history"]] == ["returned", "success"]
