"""Periodic schedules: when each slot of a cron, interval or one-off schedule falls.

Pure logic with the current time passed in, shared by the broker (which fires the slots) and
the client (which validates a schedule before sending it). Times are Unix seconds.

* **cron**: standard 5-field expressions (ranges, steps, names, and the rule that a day
  matches when its day of month *or* its day of week does, if both are restricted), parsed
  by croniter and read as wall-clock times in the schedule's time zone (``zoneinfo``). A
  wall-clock time skipped by a DST change runs once, at the first valid instant after the
  gap; a repeated wall-clock time runs once, at its first occurrence.
* **interval**: slots at ``start + k * interval``, anchored, so they never drift.
* **once**: one slot at ``run_at``.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import math
import zoneinfo
from dataclasses import dataclass
from typing import Any

import msgpack
from croniter import CroniterBadCronError, croniter

# Most slots one schedule fires in one go (catch_up="all" after a long outage); the rest
# follow on later ticks.
MAX_SLOTS_PER_FIRE = 1000
# A slot fired later than this after its time counts as missed (for catch_up="skip").
MISSED_AFTER_S = 5.0


class ScheduleType(enum.StrEnum):
    CRON = "cron"
    INTERVAL = "interval"
    ONCE = "once"


class CatchUp(enum.StrEnum):
    """What happens to slots missed while the broker was down."""

    ONCE = "once"  # one run for all of them (the latest), then on schedule
    SKIP = "skip"  # none of them; the next run is the next slot
    ALL = "all"  # one run per missed slot (each still subject to ``expires``)


def time_zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name``; ValueError for an unknown one."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tz must be an IANA time zone name such as 'Europe/Berlin': {name!r}")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def check_cron(expression: str) -> None:
    """ValueError unless ``expression`` is a valid standard 5-field cron expression."""
    if not isinstance(expression, str) or len(expression.split()) != 5:
        raise ValueError(
            f"cron must be a 5-field expression (minute hour day-of-month month day-of-week), "
            f"got {expression!r}"
        )
    try:
        croniter(expression)
    except (CroniterBadCronError, ValueError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Timetable:
    """The slots of one schedule."""

    kind: ScheduleType
    spec: str | float  # cron expression, interval seconds, or run_at (Unix seconds)
    tz: str = "UTC"
    start: float = 0.0  # interval anchor (Unix seconds)

    def __post_init__(self) -> None:
        if self.kind is ScheduleType.CRON:
            check_cron(str(self.spec))
        elif self.kind is ScheduleType.INTERVAL:
            interval = self.spec
            if isinstance(interval, bool) or not isinstance(interval, int | float):
                raise ValueError(f"interval must be a number of seconds, got {interval!r}")
            if not math.isfinite(interval) or interval <= 0:
                raise ValueError(f"interval must be a finite number of seconds > 0: {interval!r}")
        elif not isinstance(self.spec, int | float) or not math.isfinite(self.spec):
            raise ValueError(f"run_at must be a point in time, got {self.spec!r}")
        time_zone(self.tz)

    def slot_after(self, t: float) -> float | None:
        """The first slot strictly after ``t``, or None when there is none."""
        if self.kind is ScheduleType.INTERVAL:
            interval = float(self.spec)
            if t < self.start:
                return self.start
            slot = self.start + (math.floor((t - self.start) / interval) + 1) * interval
            return slot if slot > t else slot + interval
        if self.kind is ScheduleType.ONCE:
            run_at = float(self.spec)
            return run_at if run_at > t else None
        zone = time_zone(self.tz)
        local = dt.datetime.fromtimestamp(t, zone).replace(tzinfo=None, fold=0)
        times = croniter(str(self.spec), local)
        for _ in range(10_000):  # every valid expression matches within a few years
            instant = wall_time_instant(times.get_next(dt.datetime), zone)
            if instant > t:
                return instant
        return None

    def latest_slot(self, t: float) -> float | None:
        """The last slot at or before ``t``, or None when there is none."""
        if self.kind is ScheduleType.INTERVAL:
            if t < self.start:
                return None
            return self.start + math.floor((t - self.start) / float(self.spec)) * float(self.spec)
        if self.kind is ScheduleType.ONCE:
            run_at = float(self.spec)
            return run_at if run_at <= t else None
        zone = time_zone(self.tz)
        local = dt.datetime.fromtimestamp(t, zone).replace(tzinfo=None, fold=0)
        times = croniter(str(self.spec), local + dt.timedelta(seconds=1))
        for _ in range(10_000):
            instant = wall_time_instant(times.get_prev(dt.datetime), zone)
            if instant <= t:
                return instant
        return None

    def period_after(self, slot: float) -> float | None:
        """Time from ``slot`` to the next one (a run's default expiry), or None."""
        following = self.slot_after(slot)
        return None if following is None else following - slot


def wall_time_instant(local: dt.datetime, zone: zoneinfo.ZoneInfo) -> float:
    """The Unix time of a naive wall-clock time in ``zone``: its first occurrence when it is
    repeated (DST ends), the first valid instant after the gap when it is skipped."""
    first = local.replace(tzinfo=zone, fold=0)
    if first.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) == local:
        return first.timestamp()
    # Skipped: the gap's end is the instant the offset changes, between the two readings.
    low = local.replace(tzinfo=zone, fold=1).timestamp()
    high = first.timestamp()
    if low > high:
        low, high = high, low
    after = zone.utcoffset(dt.datetime.fromtimestamp(high, zone))
    while high - low > 1:
        middle = (low + high) / 2
        if zone.utcoffset(dt.datetime.fromtimestamp(middle, zone)) == after:
            high = middle
        else:
            low = middle
    return float(math.ceil(high))


def due_slots(
    timetable: Timetable, next_run: float, now: float, catch_up: CatchUp
) -> tuple[list[float], float | None]:
    """The slots to run now for a schedule whose next slot is ``next_run``, and the next
    slot after them (None when the schedule has no more)."""
    if next_run > now:
        return [], next_run
    if catch_up is not CatchUp.ALL:
        # Only the latest due slot matters: find it directly, however long the outage.
        latest = max(next_run, timetable.latest_slot(now) or next_run)
        following = timetable.slot_after(latest)
        if catch_up is CatchUp.SKIP and now - latest > MISSED_AFTER_S:
            return [], following
        return [latest], following
    due: list[float] = []
    slot: float | None = next_run
    while slot is not None and slot <= now and len(due) < MAX_SLOTS_PER_FIRE:
        due.append(slot)
        slot = timetable.slot_after(slot)
    return due, slot  # a slot still <= now means: more than one fire's worth, the rest later


def schedule_id(task_name: str, kind: ScheduleType, spec: Any, payload: bytes, tz: str) -> str:
    """The same task, schedule, arguments and time zone always give the same id."""
    digest = hashlib.sha256(msgpack.packb([task_name, kind.value, spec, payload, tz]))
    return "sched-" + digest.hexdigest()[:24]


def slot_task_id(schedule: str, slot: float) -> str:
    """The task id of one slot: deterministic, so a slot fired again is deduplicated."""
    return f"{schedule}@{round(slot * 1000)}"
