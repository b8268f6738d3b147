"""Operator commands on the broker socket (ADMIN -> ADMIN_REPLY)."""

from __future__ import annotations

from typing import Any

import pytest

from flowrra.broker.store import Table
from flowrra.protocol import Command, SlotKind, TaskStatus, decode, parse_admin_reply
from tests.broker.harness import CLIENT, NODE_A, Harness, ids, submission

ADMIN = b"operator"


@pytest.fixture
def h() -> Harness:
    return Harness()


def admin(h: Harness, verb: str, **args: Any) -> tuple[str | None, Any]:
    """Send one ADMIN request; return the reply's (error, result)."""
    h.send(ADMIN, Command.ADMIN, [17, verb, args])
    messages, publications = h.broker.outbox.take()
    replies = [frames for peer, frames in messages if peer == ADMIN]
    h.broker.outbox.messages = [m for m in messages if m[0] != ADMIN]
    h.broker.outbox.publications = publications
    assert len(replies) == 1, "expected exactly one ADMIN_REPLY"
    message = decode(replies[0])
    assert message.command is Command.ADMIN_REPLY
    request_id, error, result = parse_admin_reply(message.body)
    assert request_id == 17
    return error, result


def fail_for_good(h: Harness, task_id: str) -> None:
    """Run ``task_id`` on NODE_A until it ends FAILED (it must be submitted with no retries)."""
    h.tick()
    (dispatch,) = [d for d in h.dispatched().get(NODE_A, []) if d.task_id == task_id]
    h.failure(NODE_A, task_id, dispatch.attempt)
    assert h.record(task_id).status is TaskStatus.FAILED


def test_status(h: Harness) -> None:
    h.submit(submission("t1"), submission("t2", priority=4), submission("t3", name="other"))
    h.ready(NODE_A, async_slots=1)
    h.tick()
    h.take()
    error, status = admin(h, "status")
    assert error is None
    assert status["broker_id"] == h.broker.broker_id
    assert status["queued"] == 2 and status["in_flight"] == 1
    assert status["queued_by_name"] == {"jobs.work": 1, "other": 1}
    (node,) = status["nodes"]
    assert node["node_id"] == "node-a"
    assert (node["async_used"], node["async_total"]) == (1, 1)
    assert node["tasks"] == ["jobs.work"]


def test_inspect(h: Harness) -> None:
    h.submit(submission("t1", priority=3, max_retries=2))
    h.ready(NODE_A)
    h.tick()
    h.take()
    error, full = admin(h, "inspect", task_id="t1")
    assert error is None
    assert full["status"] == "running" and full["attempt"] == 1
    assert full["priority"] == 3 and full["max_retries"] == 2
    assert admin(h, "inspect", task_id="missing") == (None, None)


def test_tasks_lists_names_and_their_nodes(h: Harness) -> None:
    h.ready(NODE_A, tasks={"a": SlotKind.ASYNC, "c": SlotKind.CPU}, cpu_slots=1)
    h.ready(b"node-b", tasks={"a": SlotKind.ASYNC})
    error, served = admin(h, "tasks")
    assert error is None
    assert served == {"a": ["node-a", "node-b"], "c": ["node-a"]}


def test_purge_drops_queued_tasks(h: Harness) -> None:
    h.submit(submission("low"), submission("high", priority=5), submission("low2"))
    assert admin(h, "purge", priority=0) == (None, 2)
    h.broker.store.commit()
    assert h.broker.repo.get("low") is None and h.broker.repo.get("high") is not None
    assert list(h.broker.store.scan(Table.QUEUE)) != []  # "high" is still queued
    h.ready(NODE_A, async_slots=5)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["high"]
    assert admin(h, "purge") == (None, 0)


def test_purge_everything(h: Harness) -> None:
    h.submit(submission("a"), submission("b", priority=9))
    assert admin(h, "purge") == (None, 2)
    h.broker.store.commit()
    assert len(h.broker.queues) == 0
    assert list(h.broker.store.scan(Table.QUEUE)) == []


def test_dead_letters_list_and_retry(h: Harness) -> None:
    h.submit(submission("doomed", max_retries=0), submission("fine"))
    h.ready(NODE_A, async_slots=1)
    fail_for_good(h, "doomed")
    h.take()
    h.broker.store.commit()  # the server commits every tick; dead_list reads committed data
    error, dead = admin(h, "dead_list")
    assert error is None
    assert [r["task_id"] for r in dead] == ["doomed"]
    assert dead[0]["status"] == "failed"

    assert admin(h, "dead_retry", task_id="doomed") == (None, "doomed")
    record = h.record("doomed")
    assert record.status is TaskStatus.PENDING and record.retries == 0
    h.broker.store.commit()
    assert admin(h, "dead_list") == (None, [])
    h.tick()
    dispatched = h.dispatched()[NODE_A]
    assert [(d.task_id, d.attempt) for d in dispatched] == [("fine", 1)]
    h.result(NODE_A, "fine", 1)
    h.tick()
    (dispatch,) = h.dispatched()[NODE_A]
    assert (dispatch.task_id, dispatch.attempt) == ("doomed", 2)  # attempts stay fenced


def test_retried_dead_letter_is_not_expired_by_its_old_ttl() -> None:
    h = Harness(result_ttl_s=10.0, expiry_sweep_interval_s=0.0)
    h.submit(submission("doomed", max_retries=0))
    h.ready(NODE_A)
    fail_for_good(h, "doomed")
    h.broker.store.commit()
    assert admin(h, "dead_retry", task_id="doomed")[0] is None
    h.broker.store.commit()
    h.broker.expire_results(h.now + 60.0)
    h.broker.store.commit()
    assert h.broker.repo.get("doomed") is not None


@pytest.mark.parametrize(
    ("verb", "args"),
    [
        ("dead_retry", {"task_id": "nope"}),
        ("dead_retry", {}),
        ("inspect", {"task_id": ""}),
        ("purge", {"priority": "high"}),
        ("dead_list", {"limit": 0}),
        ("rm -rf", {}),  # an unknown verb
    ],
)
def test_bad_admin_arguments_get_an_error_reply(h: Harness, verb: str, args: Any) -> None:
    error, result = admin(h, verb, **args)
    assert isinstance(error, str) and error
    assert result is None


@pytest.mark.parametrize(
    "body", [None, [], [1, "status"], ["1", "status", {}], [1, 2, {}], [1, "status", []]]
)
def test_malformed_admin_requests_are_dropped(h: Harness, body: Any) -> None:
    h.send(CLIENT, Command.ADMIN, body)
    assert h.take() == ([], [])
    assert h.broker.counters["malformed"] == 1
