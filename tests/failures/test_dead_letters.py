"""Dead letters: a task that failed all its retries is listed, and ``dead_retry`` runs it
again with fresh retries."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flowrra import Flowrra, TaskStatus
from flowrra.errors import AdminError
from tests.apps import failures
from tests.conftest import Launcher, remote_twin, wait_for_glob
from tests.failures.helpers import eventually

APP = "tests.apps.failures:app"


async def _status(client: Flowrra, task_id: str) -> TaskStatus | None:
    result = await client.get_result(task_id)
    return None if result is None else result.status


async def test_a_dead_letter_is_listed_and_retried_to_success(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    launcher.node(broker, APP)
    async with remote_twin(failures.app, broker) as client:
        # flaky has max_retries=3: four attempts, all planned to fail; the fifth call works.
        task_id = await client.submit(failures.flaky, str(tmp_path), "dl", 4)
        fine = await client.submit(failures.ping, 1)
        failed = await client.wait_for_result(task_id, timeout=20)
        await client.wait_for_result(fine, timeout=10)
        dead = await client.admin("dead_list")

        retried = await client.admin("dead_retry", task_id=task_id)

        async def succeeded() -> bool:
            return await _status(client, task_id) is TaskStatus.SUCCESS

        await eventually(succeeded, timeout=20, what="the retried task's success")
        again = await client.get_result(task_id)
        after = await client.admin("dead_list")
        with pytest.raises(AdminError, match="not in the dead-letter list"):
            await client.admin("dead_retry", task_id=task_id)
        with pytest.raises(AdminError, match="not in the dead-letter list"):
            await client.admin("dead_retry", task_id=fine)
        record = await client.admin("inspect", task_id=task_id)
    assert failed.status is TaskStatus.FAILED
    assert failed.retries == 3
    assert failed.error == "RuntimeError: dl: planned failure 4 of 4"
    assert [d["task_id"] for d in dead] == [task_id]  # the succeeded task is not there
    assert dead[0]["status"] == "failed"
    assert retried == task_id
    assert again is not None
    assert again.result == "dl ok after 5 runs"
    assert again.retries == 0
    assert again.error is None
    assert after == []
    assert len(list(tmp_path.glob("dl.*.*"))) == 5
    outcomes = [entry[4] for entry in record["history"]]
    assert outcomes == ["failed"] * 4 + ["success"]


async def test_waiting_on_a_retried_dead_letter_waits_for_its_new_outcome(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The client that saw the task fail, and then retried it, waits for the new run."""
    broker = launcher.broker()
    launcher.node(broker, APP)
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.flaky, str(tmp_path), "w", 4, str(release))
        failed = await client.wait_for_result(task_id, timeout=20)
        assert failed.status is TaskStatus.FAILED
        await client.admin("dead_retry", task_id=task_id)
        waiting = asyncio.ensure_future(client.wait_for_result(task_id, timeout=20))
        await wait_for_glob(tmp_path, "w.*.*", count=5)  # the new run started; it waits
        assert await _status(client, task_id) is TaskStatus.RUNNING
        early = waiting.result() if waiting.done() else None
        release.touch()
        again = await waiting
    assert early is None, f"wait_for_result answered before the new run ended: {early}"
    assert again.status is TaskStatus.SUCCESS
    assert again.result == "w ok after 5 runs"
