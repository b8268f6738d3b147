"""What a client gets back about a task."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
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
        return cls(
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
