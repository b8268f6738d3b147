"""What a client gets back about a task."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields, make_dataclass
from typing import Any

from flowrra.progress import Progress
from flowrra.protocol import TaskStatus, unpack_value


def when_utc(timestamp: float | None) -> dt.datetime | None:
    """A Unix time as a timezone-aware datetime in UTC (None stays None)."""
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC)


_STATUSES = {status.value: status for status in TaskStatus}  # faster than TaskStatus(value)
_fromtimestamp = dt.datetime.fromtimestamp
_UTC = dt.UTC


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A task's status and, once it is complete, its result or its error."""

    task_id: str
    task_name: str
    status: TaskStatus
    result: Any = None
    error: str | None = None  # "ExceptionType: message" of the last failed attempt
    traceback: str | None = None
    retries: int = 0
    submitted_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    eta: dt.datetime | None = None  # when a SCHEDULED task is due
    progress: Progress | None = None  # the latest report_progress() of its task

    @property
    def success(self) -> bool:
        """True when the task finished and returned a value."""
        return self.status is TaskStatus.SUCCESS

    @property
    def is_complete(self) -> bool:
        """True once the task has a final status (success, failed, expired or cancelled)."""
        return self.status.is_final

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TaskResult:
        """Build from a public task record (``protocol.RECORD_FIELDS``)."""
        # On every wait_for_result: positional, with when_utc inlined.
        packed, submitted, started, finished, eta, progress = (
            record["result"],
            record["submitted_at"],
            record["started_at"],
            record["finished_at"],
            record["eta"],
            record["progress"],
        )
        build = cls if cls is not TaskResult or _Builder is None else _Builder
        result: TaskResult = build(
            record["task_id"],
            record["task_name"],
            _STATUSES[record["status"]],
            None if packed is None else unpack_value(packed),
            record["error"],
            record["traceback"],
            record["retries"],
            None if submitted is None else _fromtimestamp(submitted, _UTC),
            None if started is None else _fromtimestamp(started, _UTC),
            None if finished is None else _fromtimestamp(finished, _UTC),
            None if eta is None else _fromtimestamp(eta, _UTC),
            None if progress is None else Progress(*progress),
        )
        if build is not cls:
            result.__class__ = TaskResult  # it is one now: same slots, frozen again
        return result


def _builder() -> type | None:
    """A mutable twin of TaskResult with the same slots, for :meth:`TaskResult.from_record`.

    A frozen dataclass's __init__ sets each field through ``object.__setattr__``: about
    1.2 us for TaskResult's twelve, on every wait_for_result. An instance of the twin is
    built at the cost of a plain class (0.2 us) and then given TaskResult as its class: the
    very object TaskResult(...) would have made, frozen from then on. None (and from_record
    calls TaskResult itself) should the two layouts ever differ.
    """
    twin = make_dataclass(
        "_TaskResultBuilder", [(f.name, f.type) for f in fields(TaskResult)], slots=True
    )
    probe = twin(*([None] * len(fields(TaskResult))))
    try:
        probe.__class__ = TaskResult
    except TypeError:
        return None
    return twin


_Builder = _builder()
