"""How the dashboard turns broker replies into JSON (no processes needed)."""

from __future__ import annotations

import datetime as dt
import json

from flowrra import dashboard
from flowrra.protocol import pack_args, pack_value


def record(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "task_id": "t1",
        "task_name": "app.add",
        "status": "success",
        "priority": 0,
        "payload": pack_args([1, 2], {}),
        "result": pack_value(3),
        "error": None,
        "traceback": None,
        "retries": 0,
        "max_retries": 3,
        "attempt": 1,
        "history": [[1, "node-a", 10.0, 11.0, "success", None]],
    }
    base.update(fields)
    return base


def test_task_view_decodes_arguments_result_and_history() -> None:
    view = dashboard.task_view(record())
    assert view["args"] == [1, 2] and view["kwargs"] == {}
    assert view["has_result"] is True and view["result"] == 3
    assert view["history"] == [
        {
            "attempt": 1,
            "node_id": "node-a",
            "started_at": 10.0,
            "finished_at": 11.0,
            "outcome": "success",
            "error": None,
        }
    ]
    json.dumps(view, allow_nan=False)


def test_values_json_cannot_carry_are_made_explicit() -> None:
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    value = {"b": b"\x00\xff", "when": when, 7: float("nan"), "t": (1, 2)}
    view = dashboard.task_view(record(result=pack_value(value)))
    assert view["result"] == {
        "b": {"$bytes_hex": "00ff"},
        "when": {"$datetime": "2024-05-01T12:00:00+00:00"},
        "7": {"$float": "nan"},
        "t": [1, 2],
    }
    json.dumps(view, allow_nan=False)


def test_large_or_broken_payloads_are_not_decoded() -> None:
    big = pack_args(["x" * (dashboard.MAX_DECODE_BYTES + 1)], {})
    view = dashboard.task_view(record(payload=big, result=b"\xc1"))
    assert view["args"] is None and "too large to show" in view["args_note"]
    assert view["result"] is None and "undecodable result" in view["result_note"]
    view = dashboard.task_view(record(payload=pack_value("not a call"), result=None))
    assert "undecodable arguments" in view["args_note"] and view["has_result"] is False


def test_status_event_is_one_sse_message() -> None:
    snapshot = {"available": True, "status": {"note": "a\nb"}, "throughput": [[1.0, None]]}
    event = dashboard.sse_event("status", snapshot)
    assert event.startswith(b"event: status\ndata: ") and event.endswith(b"\n\n")
    assert event.count(b"\n") == 3  # newlines inside values stay escaped in the JSON
    assert json.loads(event.split(b"data: ", 1)[1]) == snapshot


def test_task_view_shows_the_due_time_and_workflow_links() -> None:
    links = {"workflow": "wf-1", "kind": "chain", "step": 1, "parents": ["a"], "children": []}
    view = dashboard.task_view(record(status="waiting", workflow=links, eta=None, result=None))
    assert view["status"] == "waiting" and view["workflow"] == links and view["eta"] is None
    view = dashboard.task_view(record(status="scheduled", eta=1234.5, result=None))
    assert view["eta"] == 1234.5 and view["workflow"] is None
    json.dumps(view, allow_nan=False)


def schedule(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "sched-1",
        "task_name": "app.add",
        "schedule_type": "interval",
        "schedule": 60.0,
        "tz": "UTC",
        "start": 1000.0,
        "payload": pack_args([1, 2], {"k": "v"}),
        "enabled": True,
        "description": "every minute",
        "max_retries": 3,
        "retry_delay": 1.0,
        "priority": 0,
        "timeout": None,
        "catch_up": "once",
        "expires": None,
        "next_run_at": 1060.0,
        "last_run_at": 1000.0,
        "last_task_id": "sched-1@1000000",
    }
    base.update(fields)
    return base


def test_schedule_view_keeps_what_the_page_shows() -> None:
    view = dashboard.schedule_view(schedule())
    assert view == {
        "id": "sched-1",
        "task_name": "app.add",
        "schedule_type": "interval",
        "schedule": 60.0,
        "tz": "UTC",
        "enabled": True,
        "description": "every minute",
        "priority": 0,
        "catch_up": "once",
        "next_run_at": 1060.0,
        "last_run_at": 1000.0,
        "last_task_id": "sched-1@1000000",
    }
    json.dumps(view, allow_nan=False)  # no raw payload bytes
    full = dashboard.schedule_view(schedule(), with_args=True)
    assert full["args"] == [1, 2] and full["kwargs"] == {"k": "v"} and full["args_note"] is None
    broken = dashboard.schedule_view(schedule(payload=b"\xc1"), with_args=True)
    assert broken["args"] is None and "undecodable arguments" in broken["args_note"]
