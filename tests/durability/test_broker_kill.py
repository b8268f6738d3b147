"""kill -9 the broker at several points: every acknowledged task ends with exactly one final
result, none is lost, none is doubled, and retry timers keep their due time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from flowrra import Flowrra, TaskStatus
from tests.apps import durable
from tests.conftest import Launcher, remote_twin, wait_for_glob


def runs(marker_dir: Path, key: str) -> int:
    return len(list(marker_dir.glob(f"{key}.*.run")))


async def finals(app: Flowrra, task_ids: list[str], timeout: float = 30.0) -> dict[str, str]:
    results = await asyncio.gather(*(app.wait_for_result(t, timeout=timeout) for t in task_ids))
    assert [r.task_id for r in results] == task_ids
    return {r.task_id: r.status.value for r in results}


async def test_queued_tasks_survive_a_kill(launcher: Launcher, tmp_path: Path) -> None:
    broker = launcher.broker(durability="full")
    client = remote_twin(durable.app, broker)
    async with client:
        keys = [f"q{i}" for i in range(200)]
        ids = await client.submit_many(durable.record, [(str(tmp_path), k) for k in keys])
        broker = launcher.restart(broker)  # acknowledged, nothing ran yet
        launcher.node(broker, "tests.apps.durable:app", concurrency=20)
        statuses = await finals(client, ids)
    assert set(statuses.values()) == {"success"}
    assert all(runs(tmp_path, k) == 1 for k in keys)


async def test_in_flight_tasks_are_reclaimed_after_a_kill(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    release = tmp_path / "release"
    markers = tmp_path / "markers"
    markers.mkdir()
    launcher.node(broker, "tests.apps.durable:app", concurrency=5)
    client = remote_twin(durable.app, broker)
    async with client:
        ids = await client.submit_many(
            durable.hold_until, [(str(markers), f"h{i}", str(release)) for i in range(5)]
        )
        await wait_for_glob(markers, "h*.run", count=5)  # all five are running on the node
        waiting = asyncio.gather(*(client.wait_for_result(t, timeout=30) for t in ids))
        broker = launcher.restart(broker)
        release.touch()
        results = await waiting  # the blocked waits resume by themselves
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * 5
    # The node re-registered holding the attempts: they were adopted, not run again.
    assert all(runs(markers, f"h{i}") == 1 for i in range(5))


async def test_retry_timers_fire_after_a_kill(launcher: Launcher, tmp_path: Path) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, "tests.apps.durable:app")
    client = remote_twin(durable.app, broker)
    async with client:
        task_id = await client.submit(durable.fail_once, str(tmp_path), "r")
        await wait_for_glob(tmp_path, "r.*.run", count=1)

        async def retrying() -> None:
            while (status := await client.get_result(task_id)) is None or (
                status.status is not TaskStatus.RETRYING
            ):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(retrying(), 10)
        failed_at = time.time()
        broker = launcher.restart(broker)
        result = await client.wait_for_result(task_id, timeout=30)
    assert result.status is TaskStatus.SUCCESS
    assert result.retries == 1
    assert runs(tmp_path, "r") == 2
    assert result.started_at is not None
    # Retried after its 2 s backoff from the failure, not at once on restart.
    assert result.started_at.timestamp() >= failed_at + 1.5


async def test_results_are_fetchable_after_a_kill(launcher: Launcher, tmp_path: Path) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, "tests.apps.durable:app")
    client = remote_twin(durable.app, broker)
    async with client:
        ids = await client.submit_many(
            durable.record, [(str(tmp_path), f"d{i}") for i in range(20)]
        )
        await finals(client, ids)
        broker = launcher.restart(broker)
        fetched = [await client.get_result(t) for t in ids]
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in fetched)
    assert [r.result for r in fetched if r is not None] == [f"d{i}" for i in range(20)]


async def test_a_submit_during_downtime_is_neither_lost_nor_doubled(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, "tests.apps.durable:app", concurrency=20)
    client = remote_twin(durable.app, broker, request_timeout=60)
    async with client:
        broker.process.kill9()
        keys = [f"s{i}" for i in range(100)]
        submitting = asyncio.ensure_future(
            client.submit_many(durable.record, [(str(tmp_path), k) for k in keys])
        )
        await asyncio.sleep(0.5)  # the submit is in the client's hands, unacknowledged
        assert not submitting.done()
        broker = launcher.restart(broker)  # on its ports and data directory
        ids = await submitting
        statuses = await finals(client, ids)
    assert set(statuses.values()) == {"success"}
    assert all(runs(tmp_path, k) == 1 for k in keys)


async def test_a_user_task_id_makes_submit_idempotent(launcher: Launcher, tmp_path: Path) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, "tests.apps.durable:app")
    client = remote_twin(durable.app, broker)
    async with client:
        first = await client.submit(durable.record, str(tmp_path), "u", task_id="order-42")
        again = await client.submit(durable.record, str(tmp_path), "u", task_id="order-42")
        result = await client.wait_for_result(first, timeout=10)
        broker = launcher.restart(broker)
        third = await client.submit(durable.record, str(tmp_path), "u", task_id="order-42")
        after = await client.get_result("order-42")
    assert first == again == third == "order-42"
    assert result.status is TaskStatus.SUCCESS
    assert after is not None and after.status is TaskStatus.SUCCESS
    assert runs(tmp_path, "u") == 1
