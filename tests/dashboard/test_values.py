"""How broker replies become JSON and views (flowrra.render, shared by the CLI and the
dashboard), and what the dashboard makes of them (no processes needed)."""

from __future__ import annotations

import datetime as dt
import json

from flowrra import render
from flowrra.dashboard import app as dashboard
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
            "run_s": 1.0,
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


def test_one_json_convention_for_what_json_cannot_carry() -> None:
    value = {
        b"k": [b"\x01", (1, 2.5)],
        3: float("inf"),
        "d": dt.datetime(2024, 1, 2, tzinfo=dt.UTC),
        "n": None,
    }
    assert render.to_json(value) == {
        "6b": [{"$bytes_hex": "01"}, [1, 2.5]],
        "3": {"$float": "inf"},
        "d": {"$datetime": "2024-01-02T00:00:00+00:00"},
        "n": None,
    }
    assert json.loads(render.dumps(value)) == render.to_json(value)


def test_attempts_are_typed_and_malformed_entries_skipped() -> None:
    history = [
        [1, "node-a", 10.0, 12.5, "failed", "ValueError: x"],
        [2, None, None, 20.0, "lost", None],
        ["not", "an", "attempt"],
        [True, "n", 1.0, 2.0, "success", None],  # a bool is no attempt number
    ]
    first, second = render.attempts(history)
    assert first == render.Attempt(1, "node-a", 10.0, 12.5, "failed", "ValueError: x")
    assert first.run_s == 2.5 and second.run_s is None and second.outcome == "lost"
    assert render.to_json(first)["run_s"] == 2.5
    assert render.attempts(None) == []


def test_inspect_view_keeps_bytes_out_and_says_why_values_are_missing() -> None:
    view = render.inspect_view(record(payload=None, result=None))
    assert view["args_note"] == "no arguments stored" and view["has_result"] is False
    assert "payload" not in view
    view = render.inspect_view(record(result=pack_value(b"\x00")))
    assert view["result"] == b"\x00" and render.to_json(view)["result"] == {"$bytes_hex": "00"}
    # Without a limit (the CLI) large values are decoded; the dashboard's limit skips them.
    big = pack_args(["x" * (dashboard.MAX_DECODE_BYTES + 1)], {})
    assert render.inspect_view(record(payload=big))["args"] == [
        "x" * (dashboard.MAX_DECODE_BYTES + 1)
    ]


def test_workflow_view_leaves_packed_arguments_out() -> None:
    stored = {
        "id": "wf-1",
        "kind": "chain",
        "steps": [[["t1", "app.add", 0, b"\x92\x90\x80"]]],
        "done": {"t1": 1},
    }
    view = dashboard.workflow_view(stored)
    assert view == {"id": "wf-1", "kind": "chain", "steps": [[["t1", "app.add", 0]]],
                    "done": {"t1": 1}}  # fmt: skip
    json.dumps(view, allow_nan=False)
