"""Delays, expiry, cancel and schedules through the public API, embedded and remote."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from flowrra import Flowrra, TaskStatus
from flowrra.errors import TaskNotFoundError
from tests.apps import failures
from tests.conftest import wait_for_glob

APP = "tests.apps.failures:app"


async def test_a_countdown_holds_the_task_scheduled_until_due(app: Flowrra) -> None:
    async with app:
        before = dt.datetime.now(dt.UTC)
        task_id = await app.submit(failures.ping, 3, countdown=0.6)
        waiting = await app.get_result(task_id)
        assert waiting is not None and waiting.status is TaskStatus.SCHEDULED
        assert waiting.eta is not None and waiting.eta >= before + dt.timedelta(seconds=0.5)
        result = await app.wait_for_result(task_id, timeout=10)
        assert result.result == 3 and result.started_at is not None
        assert result.started_at >= waiting.eta - dt.timedelta(milliseconds=5)
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.3)
        (later,) = await app.submit_many(failures.ping, [(4,)], eta=eta)
        assert (await app.wait_for_result(later, timeout=10)).result == 4


async def test_bad_time_options_are_refused_before_sending(app: Flowrra) -> None:
    async with app:
        naive = dt.datetime.now()
        for options, match in (
            ({"countdown": 1, "eta": dt.datetime.now(dt.UTC)}, "not both"),
            ({"eta": naive}, "timezone-aware"),
            ({"countdown": -1}, "countdown"),
            ({"countdown": float("nan")}, "countdown"),
            ({"expires": float("inf")}, "expires"),
            ({"expires": naive}, "timezone-aware"),
        ):
            with pytest.raises(ValueError, match=match):
                await app.submit(failures.ping, 1, **options)


async def test_a_task_not_started_in_time_expires_and_never_runs(
    app: Flowrra, tmp_path: Path
) -> None:
    async with app:
        release = tmp_path / "release"
        # Occupy the only cpu slot, so the next cpu task cannot start before its deadline.
        busy = await app.submit(failures.cpu_hang, str(tmp_path))
        try:
            await wait_for_glob(tmp_path, "cpu-hang.*.*")
            late = await app.submit(failures.cpu_pid, expires=0.3)
            result = await app.wait_for_result(late, timeout=10)
        finally:
            # Also when the wait failed: the remote runs share their node's one worker.
            cancelled = await app.cancel(busy)
        assert result.status is TaskStatus.EXPIRED and not result.success
        assert "deadline" in (result.error or "")
        assert cancelled is True
        assert not release.exists()


async def test_cancel_queued_scheduled_and_finished(app: Flowrra) -> None:
    async with app:
        scheduled = await app.submit(failures.ping, 1, countdown=30)
        assert await app.cancel(scheduled) is True
        result = await app.wait_for_result(scheduled, timeout=5)
        assert result.status is TaskStatus.CANCELLED and not result.success
        assert await app.cancel(scheduled) is False
        done = await app.submit(failures.ping, 2)
        await app.wait_for_result(done, timeout=10)
        assert await app.cancel(done) is False
        assert await app.cancel("no-such-task") is False


async def test_cancel_a_running_async_task(app: Flowrra, tmp_path: Path) -> None:
    async with app:
        task_id = await app.submit(failures.hang_until_cancelled, str(tmp_path))
        await wait_for_glob(tmp_path, "waiting.*.*")
        assert await app.cancel(task_id) is True
        result = await app.wait_for_result(task_id, timeout=5)
        assert result.status is TaskStatus.CANCELLED and result.retries == 0
        await wait_for_glob(tmp_path, "cancelled.*.*")  # the coroutine saw CancelledError
        # The slot came back: more tasks still run.
        after = await app.submit(failures.ping, 9)
        assert (await app.wait_for_result(after, timeout=10)).result == 9


async def test_cancel_a_running_cpu_task_kills_its_worker(app: Flowrra, tmp_path: Path) -> None:
    async with app:
        task_id = await app.submit(failures.cpu_hang, str(tmp_path))
        await wait_for_glob(tmp_path, "cpu-hang.*.*")
        (marker,) = list(tmp_path.glob("cpu-hang.*.*"))
        worker_pid = int(marker.name.split(".")[1])
        assert await app.cancel(task_id) is True
        assert (await app.wait_for_result(task_id, timeout=5)).status is TaskStatus.CANCELLED
        # The worker process is replaced: the next cpu task runs in a new one.
        after = await app.submit(failures.cpu_pid)
        result = await app.wait_for_result(after, timeout=20)
        assert result.status is TaskStatus.SUCCESS and result.result["pid"] != worker_pid


async def test_an_interval_schedule_runs_each_slot_once(app: Flowrra) -> None:
    async with app:
        scheduler = app.create_scheduler()
        assert app.scheduler is scheduler
        first = await scheduler.schedule_interval(failures.ping, 0.3, args=(5,), priority=3)
        again = await scheduler.schedule_interval(
            "tests.apps.failures.ping", 0.3, args=[5], priority=3
        )
        assert first == again  # idempotent: one schedule (options follow the latest call)
        other = await scheduler.schedule_interval(failures.ping, 0.3, args=(6,), enabled=False)
        assert other != first
        seen: set[str] = set()
        for _ in range(200):
            item = await scheduler.get_scheduled_task(first)
            assert item is not None
            if item.last_task_id is not None:
                seen.add(item.last_task_id)
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(seen) >= 2
        for task_id in seen:
            result = await app.wait_for_result(task_id, timeout=10)
            assert result.result == 5
        listed = {s.id: s for s in await scheduler.list_scheduled_tasks()}
        assert set(listed) == {first, other}
        item = listed[first]
        assert item.schedule_type == "interval" and item.schedule == 0.3 and item.args == (5,)
        assert item.priority == 3 and item.next_run_at is not None
        assert item.next_run_at.tzinfo is not None
        assert listed[other].enabled is False and listed[other].last_task_id is None
        assert await scheduler.disable_task(first) is True
        assert await scheduler.unschedule(first) is True
        assert await scheduler.unschedule(first) is False
        assert await scheduler.get_scheduled_task(first) is None
        # None left behind: the remote runs share their broker (the listing above is exact).
        assert await scheduler.unschedule(other) is True


async def test_bad_schedules_get_clear_errors(app: Flowrra) -> None:
    async with app:
        scheduler = app.create_scheduler()
        with pytest.raises(ValueError, match="cron"):
            await scheduler.schedule_cron(failures.ping, "61 * * * *")
        with pytest.raises(ValueError, match="interval"):
            await scheduler.schedule_interval(failures.ping, 0)
        with pytest.raises(ValueError, match="time zone"):
            await scheduler.schedule_cron(failures.ping, "* * * * *", tz="Mars/Olympus")
        with pytest.raises(TaskNotFoundError):
            await scheduler.schedule_cron("no.such.task", "* * * * *")
        with pytest.raises(ValueError, match="timezone-aware"):
            await scheduler.schedule_once(failures.ping, dt.datetime.now())
        when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        once = await scheduler.schedule_once(failures.ping, when, args=(1,), tz="Europe/Berlin")
        item = await scheduler.get_scheduled_task(once)
        assert item is not None and item.schedule == when.replace(
            microsecond=item.schedule.microsecond
        )  # type: ignore[union-attr]
        # None left behind: the remote runs share their broker (and one test lists them all).
        assert await scheduler.unschedule(once) is True
