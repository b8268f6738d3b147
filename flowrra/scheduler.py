"""Periodic schedules kept by the broker, declared from any app process.

``scheduler = app.create_scheduler()``, then ``await scheduler.schedule_cron(...)``. The
names follow upstream flowrra's scheduler so that its users can move over. There is no beat
process: the broker stores each schedule and creates one task per slot, exactly once, across
restarts. Declaring the same task, schedule and arguments again (from any number of
processes) returns the same id and keeps one schedule.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flowrra import protocol
from flowrra.result import when_utc
from flowrra.schedules import CatchUp, ScheduleType, Timetable, schedule_id
from flowrra.task import TaskSpec, aware_timestamp, make_spec


@dataclass(frozen=True, slots=True)
class ScheduledTask:
    """One schedule as the broker keeps it. Times are timezone-aware datetimes."""

    id: str
    task_name: str
    schedule_type: ScheduleType
    schedule: str | float | dt.datetime  # cron expression, interval seconds, or run_at
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    enabled: bool
    last_run_at: dt.datetime | None  # the slot time of the last run it started
    next_run_at: dt.datetime | None
    description: str | None
    max_retries: int
    retry_delay: float
    priority: int
    last_task_id: str | None  # the task the last slot started
    tz: str
    catch_up: CatchUp
    expires: float | None  # seconds a run may wait to start; None: one period

    @classmethod
    def from_wire(cls, stored: dict[str, Any]) -> ScheduledTask:
        kind = ScheduleType(stored["schedule_type"])
        args, kwargs = protocol.unpack_args(stored["payload"])
        schedule = stored["schedule"]
        return cls(
            id=stored["id"],
            task_name=stored["task_name"],
            schedule_type=kind,
            schedule=(when_utc(schedule) or schedule) if kind is ScheduleType.ONCE else schedule,
            args=args,
            kwargs=kwargs,
            enabled=stored["enabled"],
            last_run_at=when_utc(stored["last_run_at"]),
            next_run_at=when_utc(stored["next_run_at"]),
            description=stored["description"],
            max_retries=stored["max_retries"],
            retry_delay=stored["retry_delay"],
            priority=stored["priority"],
            last_task_id=stored["last_task_id"],
            tz=stored["tz"],
            catch_up=CatchUp(stored["catch_up"]),
            expires=stored["expires"],
        )


@dataclass(frozen=True, slots=True)
class _Options:
    """What every run of a schedule is started with."""

    args: Iterable[Any]
    kwargs: dict[str, Any] | None
    enabled: bool
    description: str | None
    max_retries: int
    retry_delay: float
    priority: int

    def check(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"enabled must be True or False: {self.enabled!r}")
        if self.description is not None and not isinstance(self.description, str):
            raise TypeError(f"description must be a str or None: {self.description!r}")
        # The same limits as @app.task's options.
        make_spec(
            _noop,
            name="schedule",
            max_retries=self.max_retries,
            retry_delay=self.retry_delay,
            priority=self.priority,
            cpu_bound=False,
            timeout=None,
        )


def _noop() -> None:
    """Stands in for a task when the schedule's options are checked like a task's."""


class Scheduler:
    """Declares, lists, enables, disables and removes the broker's schedules."""

    def __init__(
        self,
        spec_for: Callable[[str | Callable[..., Any]], TaskSpec],
        admin: Callable[..., Awaitable[Any]],
    ) -> None:
        self._spec_for = spec_for  # the app's registered tasks
        self._admin = admin  # the app's operator commands on its broker connection

    async def schedule_cron(
        self,
        task_name: str | Callable[..., Any],
        cron: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        enabled: bool = True,
        description: str | None = None,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        priority: int = 0,
        task_id: str | None = None,
        *,
        tz: str = "UTC",
        catch_up: str = "once",
        expires: float | None = None,
    ) -> str:
        """Run ``task_name`` at every slot of a 5-field cron expression, read in ``tz``."""
        return await self._declare(
            task_name,
            ScheduleType.CRON,
            cron,
            _Options(args, kwargs, enabled, description, max_retries, retry_delay, priority),
            task_id=task_id,
            tz=tz,
            catch_up=catch_up,
            expires=expires,
        )

    async def schedule_interval(
        self,
        task_name: str | Callable[..., Any],
        interval: float | dt.timedelta,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        enabled: bool = True,
        description: str | None = None,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        priority: int = 0,
        task_id: str | None = None,
        *,
        tz: str = "UTC",
        catch_up: str = "once",
        expires: float | None = None,
    ) -> str:
        """Run ``task_name`` every ``interval`` seconds, at start + k * interval."""
        seconds = interval.total_seconds() if isinstance(interval, dt.timedelta) else interval
        return await self._declare(
            task_name,
            ScheduleType.INTERVAL,
            seconds,
            _Options(args, kwargs, enabled, description, max_retries, retry_delay, priority),
            task_id=task_id,
            tz=tz,
            catch_up=catch_up,
            expires=expires,
        )

    async def schedule_once(
        self,
        task_name: str | Callable[..., Any],
        run_at: dt.datetime,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        enabled: bool = True,
        description: str | None = None,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        priority: int = 0,
        task_id: str | None = None,
        *,
        tz: str = "UTC",
        catch_up: str = "once",
        expires: float | None = None,
    ) -> str:
        """Run ``task_name`` once, at ``run_at`` (a timezone-aware datetime)."""
        when = aware_timestamp(run_at, "run_at")
        return await self._declare(
            task_name,
            ScheduleType.ONCE,
            when,
            _Options(args, kwargs, enabled, description, max_retries, retry_delay, priority),
            task_id=task_id,
            tz=tz,
            catch_up=catch_up,
            expires=expires,
        )

    async def unschedule(self, id: str) -> bool:
        """Remove a schedule; False for an unknown id. Tasks it started are not touched."""
        return bool(await self._admin("schedule_remove", id=id))

    async def enable_task(self, id: str) -> bool:
        """Start firing again, from the next slot (missed ones are not made up for)."""
        return bool(await self._admin("schedule_enable", id=id, enabled=True))

    async def disable_task(self, id: str) -> bool:
        return bool(await self._admin("schedule_enable", id=id, enabled=False))

    async def get_scheduled_task(self, id: str) -> ScheduledTask | None:
        stored = await self._admin("schedule_get", id=id)
        return None if stored is None else ScheduledTask.from_wire(stored)

    async def list_scheduled_tasks(self) -> list[ScheduledTask]:
        return [ScheduledTask.from_wire(s) for s in await self._admin("schedule_list")]

    # ------------------------------------------------------------------ internals

    async def _declare(
        self,
        task: str | Callable[..., Any],
        kind: ScheduleType,
        spec: str | float,
        options: _Options,
        *,
        task_id: str | None,
        tz: str,
        catch_up: str,
        expires: float | None,
    ) -> str:
        spec_of_task = self._spec_for(task)  # TaskNotFoundError for an unknown task
        try:
            catch_up_mode = CatchUp(catch_up)
        except ValueError:
            raise ValueError(
                f"catch_up must be one of {', '.join(c.value for c in CatchUp)}: {catch_up!r}"
            ) from None
        Timetable(kind, spec, tz)  # ValueError for a bad cron, interval or time zone
        options.check()
        if expires is not None and (
            isinstance(expires, bool)
            or not isinstance(expires, int | float)
            or not math.isfinite(expires)
            or expires <= 0
        ):
            raise ValueError(f"expires must be a number of seconds > 0 or None: {expires!r}")
        payload = protocol.pack_args(list(options.args), dict(options.kwargs or {}))
        if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= 150):
            raise ValueError(
                f"task_id must be a non-empty string of at most 150 chars: {task_id!r}"
            )
        declared = {
            "id": task_id or schedule_id(spec_of_task.name, kind, spec, payload, tz),
            "task_name": spec_of_task.name,
            "schedule_type": kind.value,
            "schedule": spec,
            "tz": tz,
            "start": dt.datetime.now(dt.UTC).timestamp(),
            "payload": payload,
            "enabled": options.enabled,
            "description": options.description,
            "max_retries": options.max_retries,
            "retry_delay": float(options.retry_delay),
            "priority": options.priority,
            "timeout": spec_of_task.timeout,
            "catch_up": catch_up_mode.value,
            "expires": None if expires is None else float(expires),
        }
        stored = await self._admin("schedule_put", schedule=declared)
        return str(stored["id"])
