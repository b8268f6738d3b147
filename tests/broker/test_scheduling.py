"""The broker's schedules with an injected clock: one task per slot, across restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flowrra.broker.store import LmdbStore
from flowrra.protocol import TaskStatus, pack_args
from flowrra.schedules import slot_task_id
from tests.broker.harness import NODE_A, T0, Harness
from tests.broker.test_admin import admin


@pytest.fixture
def h() -> Harness:
    return Harness()


def declared(**overrides: Any) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "id": "every-2s",
        "task_name": "jobs.work",
        "schedule_type": "interval",
        "schedule": 2.0,
        "tz": "UTC",
        "start": T0,
        "payload": pack_args([1], {}),
        "enabled": True,
        "description": "a test schedule",
        "max_retries": 1,
        "retry_delay": 0.5,
        "priority": 7,
        "timeout": None,
        "catch_up": "once",
        "expires": None,
    }
    schedule.update(overrides)
    return schedule


def test_each_slot_gets_one_task_with_the_schedules_options(h: Harness) -> None:
    error, stored = admin(h, "schedule_put", schedule=declared())
    assert error is None and stored["next_run_at"] == T0 + 2.0
    h.ready(NODE_A)
    h.tick(T0 + 1.9)
    assert h.dispatched() == {}
    h.tick(T0 + 2.0)
    (dispatch,) = h.dispatched()[NODE_A]
    assert dispatch.task_id == slot_task_id("every-2s", T0 + 2.0)
    record = h.record(dispatch.task_id)
    assert (record.priority, record.max_retries, record.retry_delay_s) == (7, 1, 0.5)
    assert record.deadline == T0 + 4.0  # expires defaults to one period
    _, listed = admin(h, "schedule_list")
    assert listed[0]["last_task_id"] == dispatch.task_id
    assert listed[0]["last_run_at"] == T0 + 2.0 and listed[0]["next_run_at"] == T0 + 4.0


def test_declaring_the_same_schedule_again_keeps_one_and_its_state(h: Harness) -> None:
    admin(h, "schedule_put", schedule=declared())
    h.tick(T0 + 2.0)
    _, again = admin(h, "schedule_put", schedule=declared(start=T0 + 1.3, priority=1))
    assert again["start"] == T0 and again["next_run_at"] == T0 + 4.0  # anchor and slot kept
    assert again["priority"] == 1  # options follow the latest declaration
    _, listed = admin(h, "schedule_list")
    assert len(listed) == 1


def test_disable_enable_and_remove(h: Harness) -> None:
    admin(h, "schedule_put", schedule=declared())
    assert admin(h, "schedule_enable", id="every-2s", enabled=False) == (None, True)
    h.tick(T0 + 10.0)
    assert h.broker.counters["scheduled_runs"] == 0
    assert admin(h, "schedule_enable", id="every-2s", enabled=True) == (None, True)
    _, stored = admin(h, "schedule_get", id="every-2s")
    assert stored["next_run_at"] == T0 + 12.0  # missed slots are not made up for
    assert admin(h, "schedule_remove", id="every-2s") == (None, True)
    assert admin(h, "schedule_remove", id="every-2s") == (None, False)
    assert admin(h, "schedule_get", id="every-2s") == (None, None)


def test_invalid_schedules_are_refused(h: Harness) -> None:
    for bad in (
        declared(schedule=0),
        declared(schedule_type="cron", schedule="61 * * * *"),
        declared(tz="Nowhere/Land"),
        declared(catch_up="sometimes"),
        declared(priority="high"),
        "not a map",
    ):
        error, _ = admin(h, "schedule_put", schedule=bad)
        assert error is not None and error.startswith("invalid schedule")


def test_a_slot_fired_before_a_crash_is_not_fired_twice(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.broker.recover(h.now)
    admin(h, "schedule_put", schedule=declared())
    h.broker.store.commit()
    h.tick(T0 + 2.0)  # the slot's task and the next slot, in one commit...
    h.broker.store.commit()
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))  # ...so a restart finds both
    h2.broker.recover(T0 + 2.5)
    h2.tick(T0 + 2.5)
    assert h2.broker.counters["scheduled_runs"] == 0
    h2.tick(T0 + 4.0)
    assert h2.broker.counters["scheduled_runs"] == 1
    h2.broker.store.close()


def test_a_slot_whose_commit_was_lost_is_fired_again_under_the_same_id(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.broker.recover(h.now)
    admin(h, "schedule_put", schedule=declared())
    h.broker.store.commit()
    h.tick(T0 + 2.0)
    fired = slot_task_id("every-2s", T0 + 2.0)
    assert h.broker.view(fired) is not None
    h.broker.store.discard()  # killed before the commit: neither the task nor the slot
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(T0 + 2.5)
    h2.tick(T0 + 2.5)  # caught up once, under the slot's own id
    record = h2.broker.view(fired)
    assert record is not None and record.status is TaskStatus.PENDING
    assert h2.broker.counters["scheduled_runs"] == 1
    h2.broker.store.close()
