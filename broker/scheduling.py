"""The broker's periodic schedules: stored definitions, and the slots that come due.

There is no beat process and no lock: the broker is the one writer. Each slot's task id is
deterministic (the schedule id and the slot time) and the task is written in the same commit
as the schedule's next slot, so a broker killed at any moment neither loses nor doubles a run.
Pure logic over the repository, with the time passed in; :class:`flowrra.broker.core.Broker` owns
one :class:`Schedules` and creates the tasks it asks for.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from typing import Any

from flowrra import protocol
from flowrra.broker.records import TaskRecord
from flowrra.broker.repository import TaskRepository
from flowrra.errors import AdminError
from flowrra.schedules import (
    MAX_SLOTS_PER_FIRE,
    CatchUp,
    ScheduleType,
    Timetable,
    due_slots,
    slot_task_id,
)

# A schedule as stored, sent and listed: a msgpack map with these keys.
SCHEDULE_FIELDS = (
    "id",
    "task_name",
    "schedule_type",
    "schedule",  # cron expression, interval seconds, or run_at (Unix seconds)
    "tz",
    "start",  # interval anchor (Unix seconds), kept while the definition stays the same
    "payload",  # packed [args, kwargs]
    "enabled",
    "description",
    "max_retries",
    "retry_delay",
    "priority",
    "timeout",
    "catch_up",
    "expires",  # seconds a run may wait to start; None: one period
    "next_run_at",
    "last_run_at",
    "last_task_id",
)
# What a declaration sets; the rest is the broker's slot state.
_DEFINITION = ("task_name", "schedule_type", "schedule", "tz", "payload")
_OPTIONS = (
    "enabled",
    "description",
    "max_retries",
    "retry_delay",
    "priority",
    "timeout",
    "catch_up",
    "expires",
)


def timetable(schedule: dict[str, Any]) -> Timetable:
    return Timetable(
        ScheduleType(schedule["schedule_type"]),
        schedule["schedule"],
        schedule["tz"],
        schedule["start"],
    )


def validate(declared: object) -> dict[str, Any]:
    """A declared schedule from the wire, checked field by field (AdminError if bad)."""
    if not isinstance(declared, dict):
        raise AdminError("invalid schedule: it must be a map")
    schedule: dict[str, Any] = {key: declared.get(key) for key in SCHEDULE_FIELDS}
    checks: list[tuple[bool, str]] = [
        (isinstance(schedule["id"], str) and 0 < len(schedule["id"]) <= 150, "bad id"),
        (
            isinstance(schedule["task_name"], str)
            and 0 < len(schedule["task_name"]) <= protocol.MAX_TASK_NAME_CHARS,
            "bad task_name",
        ),
        (schedule["schedule_type"] in {t.value for t in ScheduleType}, "bad schedule_type"),
        (isinstance(schedule["tz"], str), "bad tz"),
        (_number(schedule["start"]), "bad start"),
        (isinstance(schedule["payload"], bytes), "bad payload"),
        (isinstance(schedule["enabled"], bool), "bad enabled"),
        (_optional(schedule["description"], str), "bad description"),
        (
            _integer(schedule["max_retries"])
            and 0 <= schedule["max_retries"] <= protocol.MAX_RETRIES,
            "bad max_retries",
        ),
        (_number(schedule["retry_delay"]) and schedule["retry_delay"] >= 0, "bad retry_delay"),
        (
            _integer(schedule["priority"])
            and protocol.MIN_PRIORITY <= schedule["priority"] <= protocol.MAX_PRIORITY,
            "bad priority",
        ),
        (_optional_positive(schedule["timeout"]), "bad timeout"),
        (schedule["catch_up"] in {c.value for c in CatchUp}, "bad catch_up"),
        (_optional_positive(schedule["expires"]), "bad expires"),
    ]  # fmt: skip
    for ok, what in checks:
        if not ok:
            raise AdminError(f"invalid schedule: {what}")
    try:
        timetable(schedule)
    except (ValueError, TypeError) as exc:
        raise AdminError(f"invalid schedule: {exc}") from exc
    return schedule


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _optional(value: object, kind: type) -> bool:
    return value is None or isinstance(value, kind)


def _optional_positive(value: Any) -> bool:
    return value is None or (_number(value) and value > 0)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Schedules:
    """The broker's schedules by id, and a heap of when the next one is due."""

    def __init__(self, repo: TaskRepository) -> None:
        self.repo = repo
        self._by_id: dict[str, dict[str, Any]] = {}
        self._due: list[tuple[float, str]] = []  # (next_run_at, id); stale entries skipped

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(sorted(self._by_id.values(), key=lambda s: s["id"]))

    def get(self, schedule_id: str) -> dict[str, Any] | None:
        return self._by_id.get(schedule_id)

    def recover(self) -> int:
        """Load every stored schedule (at start-up)."""
        self._by_id.clear()
        self._due.clear()
        for schedule in self.repo.schedules():
            self._by_id[schedule["id"]] = schedule
            self._watch(schedule)
        return len(self._by_id)

    def _watch(self, schedule: dict[str, Any]) -> None:
        if schedule["enabled"] and schedule["next_run_at"] is not None:
            heapq.heappush(self._due, (schedule["next_run_at"], schedule["id"]))

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None

    def put(self, declared: object, now: float) -> dict[str, Any]:
        """Declare a schedule: new, or the same one again (its slot state is kept, so any
        number of processes can declare it at start-up), or changed options."""
        schedule = validate(declared)
        existing = self._by_id.get(schedule["id"])
        same = existing is not None and all(existing[k] == schedule[k] for k in _DEFINITION)
        if existing is not None and same:
            kept = dict(existing)
            was_enabled = kept["enabled"]
            kept.update({key: schedule[key] for key in _OPTIONS})
            schedule = kept
            if schedule["enabled"] and not was_enabled:
                schedule["next_run_at"] = timetable(schedule).slot_after(now)
        else:
            table = timetable(schedule)
            # A new one-off schedule whose time has passed runs at once, not never.
            once = table.kind is ScheduleType.ONCE
            schedule["next_run_at"] = float(table.spec) if once else table.slot_after(now)
            schedule["last_run_at"] = schedule["last_task_id"] = None
        self._store(schedule)
        return schedule

    def remove(self, schedule_id: str) -> bool:
        if self._by_id.pop(schedule_id, None) is None:
            return False
        self.repo.delete_schedule(schedule_id)
        return True

    def set_enabled(self, schedule_id: str, enabled: bool, now: float) -> bool:
        schedule = self._by_id.get(schedule_id)
        if schedule is None:
            return False
        if enabled and not schedule["enabled"]:
            # Slots that passed while it was disabled are not made up for.
            schedule["next_run_at"] = timetable(schedule).slot_after(now)
        schedule["enabled"] = enabled
        self._store(schedule)
        return True

    def _store(self, schedule: dict[str, Any]) -> None:
        self._by_id[schedule["id"]] = schedule
        self.repo.save_schedule(schedule)
        self._watch(schedule)

    def fire(
        self, now: float, start: Callable[[TaskRecord], None], next_order: Callable[[], int]
    ) -> int:
        """Create the tasks of every slot that is due (``start`` stores and queues one);
        each schedule's next slot is stored in the same commit. How many tasks it created."""
        created = 0
        due = self._due
        while due and due[0][0] <= now and created < MAX_SLOTS_PER_FIRE:
            next_run, schedule_id = heapq.heappop(due)
            schedule = self._by_id.get(schedule_id)
            if schedule is None or not schedule["enabled"] or schedule["next_run_at"] != next_run:
                continue  # removed, disabled or moved since this entry was pushed
            table = timetable(schedule)
            slots, following = due_slots(table, next_run, now, CatchUp(schedule["catch_up"]))
            for slot in slots:
                task_id = slot_task_id(schedule_id, slot)
                schedule["last_run_at"], schedule["last_task_id"] = slot, task_id
                if self.repo.exists(task_id):
                    continue  # this slot already has its task
                expires = schedule["expires"]
                if expires is None:
                    expires = table.period_after(slot)
                start(
                    TaskRecord(
                        task_id=task_id,
                        name=schedule["task_name"],
                        priority=schedule["priority"],
                        payload=schedule["payload"],
                        max_retries=schedule["max_retries"],
                        retry_delay_s=float(schedule["retry_delay"]),
                        timeout_s=schedule["timeout"],
                        submitted_at=now,
                        order=next_order(),
                        deadline=None if expires is None else slot + expires,
                    )
                )
                created += 1
            schedule["next_run_at"] = following
            self._store(schedule)
        return created
