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
        packed = record["result"]
        return cls(
            task_id=record["task_id"],
            task_name=record["task_name"],
            status=TaskStatus(record["status"]),
            result=None if packed is None else unpack_value(packed),
            error=record["error"],
            traceback=record["traceback"],
            retries=record["retries"],
            submitted_at=when_utc(record["submitted_at"]),
            started_at=when_utc(record["started_at"]),
            finished_at=when_utc(record["finished_at"]),
            eta=when_utc(record["eta"]),
            progress=None if record["progress"] is None else Progress(*record["progress"]),
        )
