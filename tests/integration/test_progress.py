"""Progress pushed from async and cpu_bound tasks, watched live, embedded and remote."""

from __future__ import annotations

import pytest

from flowrra import Flowrra, FlowrraError, TaskStatus
from tests.apps import failures

APP = "tests.apps.failures:app"


@pytest.mark.parametrize("task", [failures.progress_steps, failures.cpu_progress_steps])
async def test_progress_is_watched_live_until_the_final_result(app: Flowrra, task: object) -> None:
    async with app:
        task_id = await app.submit(task, 20)  # type: ignore[arg-type]
        snapshots = [snapshot async for snapshot in app.watch(task_id)]
        current = await app.get_result(task_id)
    statuses = [s.status for s in snapshots]
    assert statuses[-1] is TaskStatus.SUCCESS and snapshots[-1].result == 20
    assert TaskStatus.RUNNING in statuses
    reported = [s.progress.current for s in snapshots if s.progress is not None]
    assert len(set(reported)) >= 3, snapshots  # several updates were pushed while it ran...
    assert reported == sorted(reported) and max(reported) <= 20
    assert len(snapshots) <= 20 * 0.05 * 12 + 5  # ...coalesced to about 10 per second
    progress = snapshots[-2].progress
    assert progress is not None and progress.total == 20 and progress.message is not None
    assert current is not None and current.progress is not None  # kept with the task


async def test_watching_an_unknown_task_raises(app: Flowrra) -> None:
    async with app:
        with pytest.raises(FlowrraError, match="no task"):
            async for _ in app.watch("no-such-task"):
                pass


async def test_a_late_watcher_gets_the_final_snapshot_at_once(app: Flowrra) -> None:
    async with app:
        task_id = await app.submit(failures.ping, 4)
        await app.wait_for_result(task_id, timeout=10)
        snapshots = [s async for s in app.watch(task_id)]
    assert [s.status for s in snapshots] == [TaskStatus.SUCCESS]
