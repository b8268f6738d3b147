"""TaskResult: the client's view of a public task record."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flowrra.protocol import RECORD_FIELDS, TaskStatus, pack_value
from flowrra.result import TaskResult


def record(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task_id": "t-1",
        "task_name": "mod.fn",
        "status": "success",
        "result": pack_value({"when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC), "n": [1, 2]}),
        "error": None,
        "traceback": None,
        "retries": 2,
        "submitted_at": 1_700_000_000.0,
        "started_at": 1_700_000_001.5,
        "finished_at": None,
        "eta": None,
        "progress": None,
    }
    fields.update(overrides)
    assert set(fields) == set(RECORD_FIELDS)
    return fields


def test_from_record_unpacks_the_result_and_times() -> None:
    result = TaskResult.from_record(record())
    assert result.task_id == "t-1" and result.task_name == "mod.fn"
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC), "n": [1, 2]}
    assert result.retries == 2
    assert result.submitted_at == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)
    assert result.started_at == dt.datetime(2023, 11, 14, 22, 13, 21, 500000, tzinfo=dt.UTC)
    assert result.finished_at is None
    assert result.success and result.is_complete


def test_failed_and_pending_records() -> None:
    failed = TaskResult.from_record(
        record(status="failed", result=None, error="ValueError: boom", traceback="tb")
    )
    assert failed.result is None and failed.error == "ValueError: boom"
    assert failed.traceback == "tb"
    assert not failed.success and failed.is_complete

    for status in ("pending", "running", "retrying"):
        pending = TaskResult.from_record(record(status=status, result=None))
        assert pending.status is TaskStatus(status)
        assert not pending.success and not pending.is_complete


def test_a_result_of_none_is_distinct_from_no_result() -> None:
    assert TaskResult.from_record(record(result=pack_value(None))).result is None
    assert TaskResult.from_record(record(result=pack_value(0))).result == 0
