"""The broker state machine, driven directly: frames in, outbox out, time injected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrra.broker.server import BrokerService
from flowrra.broker.store import LmdbStore, Table
from flowrra.broker.timers import MAX_BACKOFF_S
from flowrra.inproc import InprocHub
from flowrra.protocol import (
    ACK_CONFLICT,
    HEADER,
    MAGIC,
    MAX_ITEMS_PER_MESSAGE,
    Command,
    Dispatch,
    ErrorInfo,
    Message,
    Outcome,
    SlotKind,
    TaskStatus,
    decode,
    encode,
    pack_args,
    pack_value,
    parse_ack,
    parse_error,
    parse_record,
    parse_welcome,
)
from flowrra.transport import Wakeup
from tests.broker.harness import (
    CLIENT,
    EXPIRY_S,
    INTERVAL_MS,
    LIVENESS,
    NODE_A,
    NODE_B,
    STEP,
    T0,
    Harness,
    ids,
    node_ready,
    submission,
)
from tests.broker.invariants import check_broker
from tests.flowrra.strategies import EXAMPLES, msgpack_values, mutated


@pytest.fixture
def h() -> Harness:
    return Harness()


# --------------------------------------------------------------------------- clients


def test_hello_gets_welcome(h: Harness) -> None:
    h.send(CLIENT, Command.HELLO)
    ((peer, message),) = h.replies()
    assert peer == CLIENT and message.command is Command.WELCOME
    welcome = parse_welcome(message.body)
    assert welcome.broker_id == h.broker.broker_id
    assert welcome.publish_endpoint == "inproc://results"
    assert (welcome.heartbeat_interval_ms, welcome.heartbeat_liveness) == (INTERVAL_MS, LIVENESS)


def test_submit_is_acked_stored_and_queued(h: Harness) -> None:
    h.submit(submission("t1"), submission("t2"))
    ((peer, message),) = h.replies()
    assert peer == CLIENT and message.command is Command.ACK
    assert [(a.task_id, a.error) for a in parse_ack(message.body)] == [("t1", None), ("t2", None)]
    record = h.record("t1")
    assert record.status is TaskStatus.PENDING and record.attempt == 0
    assert record.payload == pack_args(["t1"], {})
    assert len(h.broker.queues) == 2
    assert h.broker.counters["submitted"] == 2


def test_acks_are_batched_per_peer(h: Harness) -> None:
    h.submit(submission("a1"), peer=b"c1")
    h.submit(submission("b1"), peer=b"c2")
    h.submit(submission("a2"), peer=b"c1")
    acks = {peer: [a.task_id for a in parse_ack(m.body)] for peer, m in h.replies(Command.ACK)}
    assert acks == {b"c1": ["a1", "a2"], b"c2": ["b1"]}


def test_a_repeated_task_id_is_acked_but_not_queued_twice(h: Harness) -> None:
    h.submit(submission("t1"))
    h.broker.store.commit()
    h.submit(submission("t1", priority=9, submitted_at=2.0))  # the same call, sent again
    h.submit(submission("t1"), submission("t1"))  # also within one message
    acks = [a for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)]
    assert [(a.task_id, a.error) for a in acks] == [("t1", None)] * 4
    assert len(h.broker.queues) == 1
    assert h.broker.counters["submitted"] == 1
    assert h.record("t1").priority == 0  # the first submission wins


@pytest.mark.parametrize("other", [{"name": "other.name"}, {"payload": pack_args([500, 500], {})}])
def test_another_call_under_a_known_task_id_is_refused(h: Harness, other: dict[str, Any]) -> None:
    h.submit(submission("t1"))
    h.broker.store.commit()
    h.submit(submission("t1", **other))
    h.submit(submission("t1", **other), submission("t2"))  # also before the commit...
    h.submit(submission("t3"), submission("t3", **other))  # ...and within one message
    acks = [a for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)]
    verdicts = [(a.task_id, a.code) for a in acks]
    assert verdicts == [
        ("t1", None),
        ("t1", ACK_CONFLICT),
        ("t1", ACK_CONFLICT),
        ("t2", None),
        ("t3", None),
        ("t3", ACK_CONFLICT),
    ]
    assert all("already used by another call" in (a.error or "") for a in acks if a.code)
    assert h.broker.counters["id_conflicts"] == 3
    assert h.record("t1").name == "jobs.work"
    assert len(h.broker.queues) == 3


def test_a_repeated_id_within_one_tick_before_commit(h: Harness) -> None:
    h.submit(submission("t1"))
    h.submit(submission("t1"))  # not committed yet: the store's pending write counts
    assert len(h.broker.queues) == 1


def test_resubmitting_a_finished_task_does_not_run_it_again(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.result(NODE_A, "t1", 1, "done")
    h.take()
    h.submit(submission("t1"))
    h.tick()
    assert h.dispatched() == {}
    assert h.record("t1").status is TaskStatus.SUCCESS


def test_get_answers_state_with_records_and_none(h: Harness) -> None:
    h.submit(submission("t1"))
    h.take()
    h.send(CLIENT, Command.GET, [7, ["t1", "missing", "t1"]])
    ((peer, message),) = h.replies()
    assert peer == CLIENT and message.command is Command.STATE
    request_id, records, more, omitted = message.body
    assert request_id == 7 and more is False and omitted == []
    assert len(records) == 1  # unknown ids are absent, and a repeated id is answered once
    record = parse_record(records[0])
    assert record["task_id"] == "t1" and record["status"] == "pending"
    assert record["task_name"] == "jobs.work" and record["retries"] == 0
    assert record["result"] is None and record["submitted_at"] == T0


def test_get_with_no_ids(h: Harness) -> None:
    h.send(CLIENT, Command.GET, [1, []])
    ((_, message),) = h.replies()
    assert message.body == [1, [], False, []]


def test_a_get_reply_is_split_within_the_message_limit_and_bounded() -> None:
    h = Harness(max_message_bytes=1024 * 1024)
    h.ready(NODE_A, async_slots=20)
    ids = [f"big{i}" for i in range(20)]
    h.submit(*(submission(task_id) for task_id in ids))
    h.tick()
    for task_id in ids:
        h.result(NODE_A, task_id, 1, "x" * 300_000)
    h.take()
    h.send(CLIENT, Command.GET, [3, [*ids, *ids, "missing"]])
    pieces = [m.body for _, m in h.replies(Command.STATE)]
    assert all(len(encode(Command.STATE, body)[2]) <= 1024 * 1024 for body in pieces)
    assert [body[2] for body in pieces] == [True] * (len(pieces) - 1) + [False]
    answered = [parse_record(r)["task_id"] for body in pieces for r in body[1]]
    omitted = pieces[-1][3]
    # A few pieces' worth at most; the rest is listed as omitted, in order, and nothing twice.
    assert 0 < len(answered) < len(ids)
    assert answered + omitted == ids
    assert len(pieces) <= 5  # four pieces of records at most, and the closing one


@pytest.mark.parametrize(
    "body", [None, [], [1], ["1", ["t"]], [1, "t"], [1, [2]], {"id": 1}, [1, ["t"], 3]]
)
def test_a_malformed_get_is_dropped(h: Harness, body: object) -> None:
    h.send(CLIENT, Command.GET, body)
    assert h.replies() == []
    assert h.broker.counters["malformed"] == 1


# --------------------------------------------------------------------------- nodes


def test_ready_registers_a_node_and_welcomes_it(h: Harness) -> None:
    h.ready(NODE_A, async_slots=4, cpu_slots=2, tasks={"a": SlotKind.ASYNC, "c": SlotKind.CPU})
    ((peer, message),) = h.replies()
    assert peer == NODE_A and message.command is Command.WELCOME
    node = h.broker.nodes.get(NODE_A)
    assert node is not None and node.node_id == "node-a"
    assert node.free == {SlotKind.ASYNC: 4, SlotKind.CPU: 2}


def test_dispatch_respects_credit(h: Harness) -> None:
    h.submit(*(submission(f"t{i}") for i in range(5)))
    h.ready(NODE_A, async_slots=2)
    h.take()
    h.tick()
    sent = h.dispatched()
    assert list(sent) == [NODE_A]
    assert ids(sent[NODE_A]) == ["t0", "t1"]  # FIFO, and only two slots
    assert [d.attempt for d in sent[NODE_A]] == [1, 1]
    assert len(h.broker.queues) == 3

    h.tick()
    assert h.dispatched() == {}  # no credit left

    h.result(NODE_A, "t0", 1)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t2"]  # one slot freed, one more task


def test_dispatch_marks_records_running(h: Harness) -> None:
    h.submit(submission("t1", timeout_s=5.0))
    h.ready(NODE_A)
    h.take()
    h.tick()
    (dispatch,) = h.dispatched()[NODE_A]
    assert dispatch == Dispatch("t1", 1, "jobs.work", pack_args(["t1"], {}), 5.0)
    record = h.record("t1")
    assert record.status is TaskStatus.RUNNING
    assert record.attempt == 1 and record.node_id == "node-a"
    lease = h.broker.leases["t1"]
    assert (lease.attempt, lease.node) == (1, NODE_A)
    public = h.get("t1")  # what a client asking for it sees
    assert public is not None and public["status"] == "running"


def test_higher_priority_is_dispatched_first(h: Harness) -> None:
    h.submit(
        submission("low"),
        submission("high-1", priority=10),
        submission("mid", priority=5),
        submission("high-2", priority=10),
        submission("negative", priority=-1),
    )
    h.ready(NODE_A, async_slots=1)
    order = []
    for _ in range(5):
        h.tick()
        (dispatch,) = h.dispatched()[NODE_A]
        order.append(dispatch.task_id)
        h.result(NODE_A, dispatch.task_id, dispatch.attempt)
    assert order == ["high-1", "high-2", "mid", "low", "negative"]


def test_nodes_only_get_tasks_they_serve(h: Harness) -> None:
    h.submit(submission("io-task", name="io"), submission("cpu-task", name="crunch"))
    h.ready(NODE_A, tasks={"io": SlotKind.ASYNC}, async_slots=5)
    h.ready(NODE_B, tasks={"crunch": SlotKind.CPU}, async_slots=0, cpu_slots=1)
    h.take()
    h.tick()
    sent = h.dispatched()
    assert {peer: ids(d) for peer, d in sent.items()} == {
        NODE_A: ["io-task"],
        NODE_B: ["cpu-task"],
    }
    assert h.broker.leases["cpu-task"].kind is SlotKind.CPU
    node_b = h.broker.nodes.get(NODE_B)
    assert node_b is not None and node_b.free[SlotKind.CPU] == 0


def test_unserved_names_stay_queued(h: Harness) -> None:
    h.submit(submission("t1", name="nobody.serves.this"))
    h.ready(NODE_A)
    h.take()
    h.tick()
    assert h.dispatched() == {}
    assert len(h.broker.queues) == 1


def test_dispatch_spreads_over_nodes(h: Harness) -> None:
    h.submit(*(submission(f"t{i}") for i in range(4)))
    h.ready(NODE_A, async_slots=2)
    h.ready(NODE_B, async_slots=2)
    h.take()
    h.tick()
    sent = h.dispatched()
    assert {peer: ids(d) for peer, d in sent.items()} == {
        NODE_A: ["t0", "t2"],
        NODE_B: ["t1", "t3"],
    }


def test_heartbeat_from_unknown_peer_asks_it_to_reconnect(h: Harness) -> None:
    h.send(NODE_A, Command.HEARTBEAT)
    ((peer, message),) = h.replies()
    assert peer == NODE_A and message.command is Command.RECONNECT


def test_heartbeat_from_known_node_refreshes_it(h: Harness) -> None:
    h.ready(NODE_A)
    h.take()
    h.now += 2.0
    h.send(NODE_A, Command.HEARTBEAT)
    assert h.replies() == []
    node = h.broker.nodes.get(NODE_A)
    assert node is not None and node.last_seen_ms == h.now * 1000


def test_broker_sends_heartbeats_to_idle_nodes(h: Harness) -> None:
    h.ready(NODE_A)
    h.take()
    h.tick()
    assert h.take() == ([], [])
    h.advance(INTERVAL_MS / 1000, heartbeats=(NODE_A,))
    messages, _ = h.take()
    assert (NODE_A, Message(Command.HEARTBEAT, None)) in messages


def test_bye_requeues_without_counting_a_loss(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.send(NODE_A, Command.BYE)
    assert h.broker.nodes.get(NODE_A) is None
    record = h.record("t1")
    assert record.status is TaskStatus.PENDING and record.worker_losses == 0
    assert len(h.broker.queues) == 1


# --------------------------------------------------------------------------- results


def test_success_records_and_publishes(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.take()
    h.now += 3.0
    h.result(NODE_A, "t1", 1, {"answer": 42})
    record = h.record("t1")
    assert record.status is TaskStatus.SUCCESS
    assert record.result == pack_value({"answer": 42})
    assert record.finished_at == h.now and record.started_at == h.now - 0.5
    assert record.error is None and record.retries == 0
    assert "t1" not in h.broker.leases
    messages, publications = h.take()
    assert messages == []
    ((topic, message),) = publications
    assert topic == b"t1" and message.command is Command.RESULT
    (body,) = message.body
    public = parse_record(body)
    assert public == record.public()
    assert public["status"] == "success"
    node = h.broker.nodes.get(NODE_A)
    assert node is not None and node.tasks_done == 1 and node.free[SlotKind.ASYNC] == 1
    assert h.broker.counters["succeeded"] == 1


def test_a_huge_retry_delay_does_not_crash_the_broker(h: Harness) -> None:
    # parse_submit accepts any retry_delay >= 0; the retry timer key is a u64 of
    # milliseconds, so the backoff must be capped before it gets there.
    h.submit(submission("t1", retry_delay_s=1e20), submission("t2", retry_delay_s=1e300))
    h.ready(NODE_A, async_slots=2)
    h.tick()
    h.failure(NODE_A, "t1", 1)
    h.failure(NODE_A, "t2", 1)
    h.tick()
    h.broker.store.commit()
    for task_id in ("t1", "t2"):
        record = h.record(task_id)
        assert record.status is TaskStatus.RETRYING
        assert record.retry_at is not None and record.retry_at - h.now <= MAX_BACKOFF_S


def test_many_retries_do_not_overflow_the_timer_key() -> None:
    # retry_delay=1 with max_retries=1000 (allowed): retry 65's plain backoff, 2**64 s, would
    # not fit the 8-byte timer key. Every retry must be timed, fire and run again.
    h = Harness()
    h.submit(submission("t1", retry_delay_s=1.0, max_retries=1000))
    h.ready(NODE_A)
    h.tick()
    assert [(d.task_id, d.attempt) for d in h.dispatched()[NODE_A]] == [("t1", 1)]
    for attempt in range(1, 70):
        h.failure(NODE_A, "t1", attempt)
        record = h.record("t1")
        assert record.status is TaskStatus.RETRYING and record.retry_at is not None
        assert record.retries == attempt
        assert record.retry_at - h.now <= MAX_BACKOFF_S
        h.tick(record.retry_at)
        # The timer fired: the next attempt went to the node.
        assert [(d.task_id, d.attempt) for d in h.dispatched()[NODE_A]] == [("t1", attempt + 1)]
    h.broker.store.commit()
    assert h.record("t1").retries == 69  # past retry 65


def test_index_tables_follow_the_task_life(h: Harness) -> None:
    store = h.broker.store

    def table(t: Table) -> list[bytes]:
        store.commit()
        return [k for k, _ in store.scan(t)]

    h.submit(submission("t1", retry_delay_s=1.0))
    assert len(table(Table.QUEUE)) == 1
    assert table(Table.LEASES) == [] and table(Table.TIMERS) == []
    h.ready(NODE_A)
    h.tick()
    assert table(Table.QUEUE) == []
    assert table(Table.LEASES) == [b"t1"]
    h.failure(NODE_A, "t1", 1)
    assert table(Table.LEASES) == []
    (timer,) = table(Table.TIMERS)
    assert timer[8:] == b"t1" and int.from_bytes(timer[:8], "big") == (h.now + 1.0) * 1000
    h.tick(h.now + 1.0)
    assert table(Table.TIMERS) == []
    assert table(Table.LEASES) == [b"t1"]  # fired, queued and dispatched again in one tick
    h.result(NODE_A, "t1", 2, "ok")
    assert table(Table.QUEUE) == [] and table(Table.LEASES) == [] and table(Table.TIMERS) == []
    assert [k[8:] for k in table(Table.EXPIRY)] == [b"t1"]


def test_seconds_until_due_follows_housekeeping_and_timers(h: Harness) -> None:
    h.tick()
    assert h.broker.seconds_until_due(h.now) == pytest.approx(STEP)
    assert h.broker.seconds_until_due(h.now + 10) == 0.0
    h.submit(submission("t1", retry_delay_s=0.1))
    h.ready(NODE_A)
    h.tick()
    h.failure(NODE_A, "t1", 1)
    assert h.broker.seconds_until_due(h.now) == pytest.approx(0.1)


def test_finished_results_expire_after_their_ttl() -> None:
    h = Harness(result_ttl_s=60.0, expiry_sweep_interval_s=1.0)
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.result(NODE_A, "t1", 1, "v")
    h.broker.store.commit()
    h.broker.expire_results(h.now + 59.0)
    h.broker.store.commit()
    assert h.broker.repo.get("t1") is not None
    h.broker.expire_results(h.now + 61.0)
    h.broker.store.commit()
    assert h.broker.repo.get("t1") is None
    assert list(h.broker.store.scan(Table.EXPIRY)) == []


def test_failure_with_retries_left_schedules_a_retry(h: Harness) -> None:
    h.submit(submission("t1", retry_delay_s=2.0, max_retries=3))
    h.ready(NODE_A)
    h.tick()
    h.take()
    h.failure(NODE_A, "t1", 1)
    record = h.record("t1")
    assert record.status is TaskStatus.RETRYING
    assert record.retries == 1
    assert record.error == "ValueError: boom"
    assert record.traceback is not None and record.traceback.startswith("Traceback")
    assert record.retry_at == h.now + 2.0
    assert h.broker.timers.next_due_ms() == (h.now + 2.0) * 1000
    _, publications = h.take()
    assert publications == []  # not final: nothing published

    h.tick(h.now + 1.9)
    assert h.dispatched() == {}  # not yet due
    h.tick(T0 + 2.0)
    (dispatch,) = h.dispatched()[NODE_A]
    assert (dispatch.task_id, dispatch.attempt) == ("t1", 2)
    assert h.record("t1").status is TaskStatus.RUNNING


def test_retries_back_off_exponentially_then_fail(h: Harness) -> None:
    h.submit(submission("t1", retry_delay_s=2.0, max_retries=3))
    h.ready(NODE_A)
    h.tick()
    delays = []
    for attempt in (1, 2, 3):
        h.take()
        h.failure(NODE_A, "t1", attempt)
        record = h.record("t1")
        assert record.status is TaskStatus.RETRYING and record.retries == attempt
        assert record.retry_at is not None
        delays.append(record.retry_at - h.now)
        h.tick(record.retry_at)
        (dispatch,) = h.dispatched()[NODE_A]
        assert dispatch.attempt == attempt + 1
    assert delays == [2.0, 4.0, 8.0]

    h.failure(NODE_A, "t1", 4, exc="KeyError")
    record = h.record("t1")
    assert record.status is TaskStatus.FAILED
    assert record.retries == record.max_retries == 3
    assert record.error == "KeyError: boom"
    assert record.retry_at is None and record.result is None
    _, publications = h.take()
    ((topic, message),) = publications
    assert topic == b"t1" and [parse_record(b)["status"] for b in message.body] == ["failed"]
    assert h.broker.counters["failed"] == 1


def test_no_retries_fails_at_once(h: Harness) -> None:
    h.submit(submission("t1", max_retries=0))
    h.ready(NODE_A)
    h.tick()
    h.failure(NODE_A, "t1", 1)
    record = h.record("t1")
    assert record.status is TaskStatus.FAILED and record.retries == 0
    assert len(h.broker.timers) == 0


def test_success_after_a_retry_clears_the_error(h: Harness) -> None:
    h.submit(submission("t1", retry_delay_s=0.0))
    h.ready(NODE_A)
    h.tick()
    h.failure(NODE_A, "t1", 1)
    h.tick()
    h.result(NODE_A, "t1", 2, "ok")
    record = h.record("t1")
    assert record.status is TaskStatus.SUCCESS and record.retries == 1
    assert record.error is None and record.traceback is None


def test_stale_attempt_results_are_ignored(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.take()
    h.result(NODE_A, "t1", 7, "from a future attempt")
    h.result(NODE_A, "t1", 0, "from a past attempt")
    h.result(NODE_A, "unknown", 1, "never submitted")
    record = h.record("t1")
    assert record.status is TaskStatus.RUNNING and record.result is None
    assert h.broker.counters["stale_results"] == 3
    assert h.take() == ([], [])
    h.result(NODE_A, "t1", 1, "right")
    assert h.record("t1").status is TaskStatus.SUCCESS


def test_a_result_is_accepted_once(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.result(NODE_A, "t1", 1, "first")
    h.result(NODE_A, "t1", 1, "duplicate")
    assert h.record("t1").result == pack_value("first")
    assert h.broker.counters["stale_results"] == 1
    node = h.broker.nodes.get(NODE_A)
    assert node is not None and node.free[SlotKind.ASYNC] == 1  # not freed twice


def test_results_from_an_unknown_peer_get_reconnect(h: Harness) -> None:
    h.result(b"stranger", "t1", 1)
    ((peer, message),) = h.replies()
    assert peer == b"stranger" and message.command is Command.RECONNECT


# --------------------------------------------------------------------------- lost nodes


def test_node_expiry_requeues_at_the_head_for_another_node(h: Harness) -> None:
    h.submit(submission("t1"), submission("t2"), submission("t3"))
    h.ready(NODE_A)
    h.ready(NODE_B)
    h.tick()
    sent = h.dispatched()
    assert {p: ids(d) for p, d in sent.items()} == {NODE_A: ["t1"], NODE_B: ["t2"]}

    # A goes silent; B keeps heartbeating. A is not declared dead early...
    h.advance(EXPIRY_S - STEP, heartbeats=(NODE_B,))
    assert h.broker.nodes.get(NODE_A) is not None
    # ...but once its liveness window has passed.
    h.advance(2 * STEP, heartbeats=(NODE_B,))
    assert h.broker.nodes.get(NODE_A) is None
    record = h.record("t1")
    assert record.status is TaskStatus.PENDING and record.worker_losses == 1
    assert record.node_id is None
    assert "t1" not in h.broker.leases

    # B finishes t2; its free slot gets t1 (back at the head), not t3.
    h.take()
    h.result(NODE_B, "t2", 1)
    h.tick()
    (dispatch,) = h.dispatched()[NODE_B]
    assert (dispatch.task_id, dispatch.attempt) == ("t1", 2)

    # A comes back with its result for attempt 1: fenced out, and asked to reconnect.
    h.result(NODE_A, "t1", 1, "late")
    assert h.record("t1").status is TaskStatus.RUNNING
    assert [m.command for _, m in h.replies()] == [Command.RECONNECT]
    h.result(NODE_B, "t1", 2, "current")
    assert h.record("t1").result == pack_value("current")


def test_liveness_is_not_enforced_when_disabled(h: Harness) -> None:
    h.broker.enforce_liveness = False  # the in-process hub: peers cannot vanish
    h.ready(NODE_A)
    h.advance(10 * EXPIRY_S)
    assert h.broker.nodes.get(NODE_A) is not None


def test_a_stalled_broker_does_not_expire_its_nodes(h: Harness) -> None:
    h.ready(NODE_A)
    h.tick()
    h.tick(h.now + 10 * EXPIRY_S)  # one tick after a very long gap
    assert h.broker.nodes.get(NODE_A) is not None


def test_worker_losses_reaching_the_limit_fail_the_task() -> None:
    h = Harness(max_worker_losses=3)
    h.submit(submission("t1"))
    for loss in (1, 2, 3):
        peer = f"node-{loss}".encode()
        h.ready(peer)
        h.tick()
        (dispatch,) = h.dispatched()[peer]
        assert dispatch.attempt == loss
        h.broker.peer_unreachable(peer, h.now)
        assert h.record("t1").worker_losses == loss
    record = h.record("t1")
    assert record.status is TaskStatus.FAILED
    assert record.error is not None and record.error.startswith("WorkerLostError: ")
    assert len(h.broker.queues) == 0 and "t1" not in h.broker.leases
    _, publications = h.take()
    assert [parse_record(b)["status"] for _, m in publications for b in m.body] == ["failed"]


def test_reconnecting_node_keeps_what_it_still_runs(h: Harness) -> None:
    h.submit(submission("t1"), submission("t2"))
    h.ready(NODE_A, async_slots=2)
    h.tick()
    h.take()
    # The same node comes back under a new routing id, still running t1 (not t2).
    h.ready(b"node-a-again", node_id="node-a", async_slots=2, running=[("t1", 1)])
    assert h.broker.nodes.get(NODE_A) is None
    node = h.broker.nodes.get(b"node-a-again")
    assert node is not None and node.leases == {"t1"}
    assert node.free[SlotKind.ASYNC] == 1
    assert h.broker.leases["t1"].node == b"node-a-again"
    t2 = h.record("t2")
    assert t2.status is TaskStatus.PENDING and t2.worker_losses == 0
    h.result(b"node-a-again", "t1", 1, "kept")
    assert h.record("t1").status is TaskStatus.SUCCESS


# --------------------------------------------------------------------------- subscriptions


def test_subscription_to_a_finished_task_replays_its_result(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.result(NODE_A, "t1", 1, 5)
    h.take()
    h.broker.handle_subscription(b"t1")
    messages, publications = h.take()
    assert messages == []
    ((topic, message),) = publications
    assert topic == b"t1" and message.command is Command.RESULT
    assert [parse_record(b) for b in message.body] == [h.record("t1").public()]


def test_subscription_to_an_unknown_task_says_subscribed(h: Harness) -> None:
    h.broker.handle_subscription(b"nobody")
    _, publications = h.take()
    assert publications == [(b"nobody", Message(Command.SUBSCRIBED, None))]


def test_subscription_with_an_undecodable_topic_is_ignored(h: Harness) -> None:
    h.broker.handle_subscription(b"\xff\xfe")
    assert h.take() == ([], [])


# --------------------------------------------------------------------------- malformed input


def test_a_wrong_protocol_version_gets_an_error_reply(h: Harness) -> None:
    h.broker.handle(CLIENT, [MAGIC + bytes([99]), bytes([Command.HELLO])], T0)
    ((peer, message),) = h.replies()
    assert peer == CLIENT and message.command is Command.ERROR
    code, text = parse_error(message.body)
    assert code == "version" and "99" in text


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"GET / HTTP/1.1"],
        [b"junk", b"\x01"],
        [HEADER, b"\x99"],
        [HEADER, bytes([Command.SUBMIT]), b"\xc1"],
        [HEADER, bytes([Command.SUBMIT]), encode(Command.SUBMIT, [["t"]])[2]],
        [HEADER, bytes([Command.READY]), encode(Command.READY, {"node_id": 1})[2]],
        [HEADER, bytes([Command.RESULTS]), encode(Command.RESULTS, {"a": 1})[2]],
        [HEADER, bytes([Command.WELCOME])],  # a broker-to-peer command
        [HEADER, bytes([Command.TASKS]), encode(Command.TASKS, [])[2]],
    ],
)
def test_malformed_frames_are_dropped(h: Harness, frames: list[bytes]) -> None:
    h.broker.handle(CLIENT, frames, T0)
    assert h.take() == ([], [])
    assert h.broker.counters["malformed"] == 1


def _busy_harness() -> Harness:
    """A broker with something in every state, so garbage meets real leases and records."""
    h = Harness()
    h.broker.recover(h.now)  # as a server starts: the store gets its format
    h.broker.store.commit()
    h.submit(submission("t1"), submission("t2"), submission("t3", name="jobs.cpu"))
    h.ready(NODE_A, async_slots=1, cpu_slots=1, tasks={"jobs.work": "async", "jobs.cpu": "cpu"})
    h.tick()
    h.take()
    return h


def _check_survives(frames: list[bytes]) -> None:
    """The broker takes ``frames`` from its node and from a stranger without raising, and
    its state is consistent afterwards (tests/broker/invariants.py): every task in the one
    place its status says, slots and leases adding up, the store agreeing with memory."""
    h = _busy_harness()
    h.broker.handle(NODE_A, frames, h.now)
    h.broker.handle(b"someone-else", frames, h.now)
    h.advance(STEP)
    h.take()
    h.broker.store.commit()
    check_broker(h.broker, h.now)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=30), max_size=4))
def test_random_frames_leave_the_broker_consistent(frames: list[bytes]) -> None:
    _check_survives(frames)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(Command)), msgpack_values)
def test_random_bodies_leave_the_broker_consistent(command: Command, body: Any) -> None:
    _check_survives(encode(command, body))


_NEAR_VALID = {
    Command.SUBMIT: [[submission("t1").to_wire()], [submission("new").to_wire()]],
    Command.RESULTS: [
        [Outcome("t1", 1, pack_value(1), None, 1.0, 2.0).to_wire()],
        [Outcome("t3", 1, None, ErrorInfo("E", "m", None), 1.0, 2.0).to_wire()],
    ],
    Command.READY: [node_ready(running=[("t1", 1)]).to_wire()],
    Command.GET: [[1, ["t1", "t2"]], [["t1", "t2"], 1]],
    Command.ADMIN: [
        [1, "status", {}],
        [2, "purge", {"priority": 0}],
        [3, "inspect", {"task_id": "t1"}],
        [4, "dead_retry", {"task_id": "t1"}],
        [5, "dead_list", {"limit": 5}],
    ],
}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(_NEAR_VALID)).flatmap(
        lambda c: st.tuples(st.just(c), mutated(_NEAR_VALID[c]))
    )
)
def test_near_valid_bodies_leave_the_broker_consistent(case: tuple[Command, Any]) -> None:
    command, body = case
    _check_survives(encode(command, body))


# --------------------------------------------------------------------------- recovery


def test_recover_after_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.submit(
        submission("running"),
        submission("retrying", retry_delay_s=60.0),
        submission("pending-low"),
        submission("pending-high", priority=3),
        submission("done"),
    )
    h.ready(NODE_A, async_slots=3)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["pending-high", "running", "retrying"]
    h.failure(NODE_A, "retrying", 1)
    retry_at = h.record("retrying").retry_at
    assert retry_at == h.now + 60.0
    h.result(NODE_A, "pending-high", 1, "ok")
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["pending-low", "done"]
    h.result(NODE_A, "pending-low", 1, "ok")
    h.result(NODE_A, "done", 1, "ok")
    h.submit(submission("queued"))
    h.broker.store.commit()
    h.broker.store.close()

    # The broker restarts.
    h2 = Harness(LmdbStore(path))
    h2.now = T0 + 1.0
    h2.broker.recover(h2.now)
    assert h2.record("pending-high").status is TaskStatus.SUCCESS
    assert len(h2.broker.queues) == 1  # "queued"; "running" is held for its node a while
    assert retry_at is not None
    assert h2.broker.timers.next_due_ms() == retry_at * 1000
    assert h2.broker.leases["running"].attempt == 1
    h2.broker.store.commit()

    h2.ready(NODE_B, async_slots=5)
    h2.tick()
    assert h2.dispatched() == {}  # nodes get time to claim lost dispatches
    h2.advance(INTERVAL_MS / 1000, heartbeats=(NODE_B,))
    # Node A, registered before the restart, is not back: dispatch waits for it, for one
    # liveness window at most.
    assert h2.dispatched() == {}
    h2.advance(EXPIRY_S - INTERVAL_MS / 1000, heartbeats=(NODE_B,))
    assert ids(h2.dispatched()[NODE_B]) == ["queued"]
    h2.result(NODE_B, "queued", 1, "ok")

    # Nobody claims "running" within the orphan window: it runs again, as attempt 2.
    h2.advance(2 * EXPIRY_S + STEP, heartbeats=(NODE_B,))
    sent = h2.dispatched().get(NODE_B, [])
    assert [(d.task_id, d.attempt) for d in sent] == [("running", 2)]
    assert h2.record("running").worker_losses == 0
    # The retry timer survived the restart too.
    h2.tick(retry_at)
    assert [(d.task_id, d.attempt) for d in h2.dispatched()[NODE_B]] == [("retrying", 2)]
    # A late result of the attempt from before the restart is fenced out.
    h2.result(NODE_A, "running", 1, "late")
    assert h2.record("running").status is TaskStatus.RUNNING
    h2.broker.store.close()


def test_recover_restores_order_counter_and_requeues_pending(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.submit(submission("a"), submission("b"))
    h.broker.store.commit()
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.submit(submission("c"))
    h2.ready(NODE_A, async_slots=3)
    h2.advance(INTERVAL_MS / 1000, heartbeats=(NODE_A,))  # past the post-restart hold
    assert ids(h2.dispatched()[NODE_A]) == ["a", "b", "c"]  # new work after the old
    h2.broker.store.close()


def test_a_node_reclaims_its_running_task_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.broker.store.commit()
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.send(NODE_A, Command.HEARTBEAT)
    assert [m.command for _, m in h2.replies()] == [Command.RECONNECT]
    h2.ready(NODE_A, running=[("t1", 1)])
    node = h2.broker.nodes.get(NODE_A)
    assert node is not None and node.leases == {"t1"} and not node.has_credit()
    h2.advance(3 * EXPIRY_S, heartbeats=(NODE_A,))
    assert h2.dispatched() == {}  # adopted, so not re-queued when the window ends
    h2.result(NODE_A, "t1", 1, "finished")
    assert h2.record("t1").status is TaskStatus.SUCCESS
    h2.broker.store.close()


def test_an_orphan_outcome_counts_once_its_node_registered_again(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.broker.store.commit()
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    # Before READY nobody holds the recovered attempt, so nobody may complete it...
    h2.result(NODE_A, "t1", 1, "done meanwhile")
    assert h2.record("t1").status is TaskStatus.RUNNING
    assert h2.broker.counters["foreign_results"] == 1
    assert [m.command for _, m in h2.replies()] == [Command.RECONNECT]
    # ...the node registers again, claiming the attempt, and re-sends its outcome.
    h2.ready(NODE_A, running=[("t1", 1)])
    h2.result(NODE_A, "t1", 1, "done meanwhile")
    assert h2.record("t1").status is TaskStatus.SUCCESS
    h2.broker.store.close()


# --------------------------------------------------------------------------- failed commits


def test_abandon_tick_refuses_the_ticks_submissions_and_rolls_back(h: Harness) -> None:
    h.submit(submission("kept"))
    h.broker.store.commit()
    h.take()
    h.submit(submission("lost"))
    h.broker.store.discard()  # the commit failed
    h.broker.abandon_tick("disk full", h.now)
    acks = [a for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)]
    assert [(a.task_id, a.error is not None) for a in acks] == [("lost", True)]
    assert "disk full" in (acks[0].error or "")
    assert h.broker.repo.get("lost") is None
    assert len(h.broker.queues) == 1  # "kept", rebuilt from the store


def test_abandon_tick_still_acks_a_resubmitted_task_that_is_stored(h: Harness) -> None:
    h.submit(submission("t1"))
    h.broker.store.commit()
    h.take()
    # The client resends t1 (its first ack was lost) in a tick whose commit then fails.
    h.submit(submission("t1"), submission("t2"))
    h.broker.store.discard()
    h.broker.abandon_tick("disk full", h.now)
    acks = {a.task_id: a.error for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)}
    assert acks["t2"] is not None
    assert h.broker.repo.get("t1") is not None  # t1 is durably stored and will run...
    assert acks["t1"] is None  # ...so refusing it would make the client give up on it


def test_abandon_tick_requeues_the_ticks_dispatches(h: Harness) -> None:
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.broker.store.commit()
    h.take()
    h.tick()  # dispatches t1, but the commit of this tick fails
    h.broker.store.discard()
    h.broker.abandon_tick("disk full", h.now)
    assert h.dispatched() == {}  # the TASKS of the failed tick are never sent
    h.tick()
    (dispatch,) = h.dispatched()[NODE_A]
    assert (dispatch.task_id, dispatch.attempt) == ("t1", 1)


def test_abandon_tick_keeps_committed_leases_with_their_live_nodes(h: Harness) -> None:
    h.submit(submission("t1"), submission("t2"))
    h.ready(NODE_A, async_slots=1)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t1"]
    h.broker.store.commit()  # t1 is durably leased to A, which is running it
    h.submit(submission("t3"))
    h.broker.store.discard()  # this tick's commit fails
    h.broker.abandon_tick("disk full", h.now)
    h.take()
    # A still runs t1 in its only slot: until it has re-registered (or reported t1), it
    # must not be handed t2 as well.
    h.tick()
    assert h.dispatched() == {}
    # A re-registers, still holding t1; t1 must not run a second time while A is alive.
    h.ready(NODE_A, async_slots=1, running=[("t1", 1)])
    h.advance(3 * EXPIRY_S, heartbeats=(NODE_A,))
    assert h.dispatched() == {}
    h.result(NODE_A, "t1", 1, "done")
    assert h.record("t1").status is TaskStatus.SUCCESS
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t2"]


def test_abandon_tick_does_not_leave_a_node_registered_but_unwelcomed(h: Harness) -> None:
    h.take()
    h.ready(NODE_A)  # registered in memory; WELCOME waits in the outbox
    h.submit(submission("t1"))
    h.broker.store.discard()  # the tick's commit fails
    h.broker.abandon_tick("disk full", h.now)
    messages, _ = h.take()
    told = {m.command for p, m in messages if p == NODE_A}
    # A node waits for WELCOME before it heartbeats; if the broker keeps it registered but
    # drops its WELCOME (and does not ask it to register again), the node is later expired
    # as dead, after being sent tasks.
    assert told & {Command.WELCOME, Command.RECONNECT} or h.broker.nodes.get(NODE_A) is None


def test_a_task_id_too_long_for_lmdb_is_refused(tmp_path: Path) -> None:
    # LMDB keys are limited to 511 bytes and index keys are 8 bytes + the UTF-8 task id:
    # 200 x "€" (600 bytes) must be refused, not break the commit.
    h = Harness(LmdbStore(tmp_path / "store"))
    try:
        h.submit(submission("€" * 200), submission("fine"))
        h.broker.store.commit()  # must not raise (it would stop the broker loop)
        acks = {a.task_id: a.error for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)}
        assert acks["fine"] is None
        assert acks["€" * 200] is not None
        assert h.broker.repo.get("fine") is not None
        assert h.broker.repo.get("€" * 200) is None
    finally:
        h.broker.store.discard()
        h.broker.store.close()


def test_invalid_items_are_refused_one_by_one(h: Harness) -> None:
    good = submission("good").to_wire()
    bad = submission("bad").to_wire()
    bad[4] = -1  # max_retries out of range
    h.send(CLIENT, Command.SUBMIT, [good, bad])
    acks = {a.task_id: a.error for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)}
    assert acks["good"] is None and acks["bad"] is not None
    assert h.broker.repo.get("bad") is None
    assert len(h.broker.queues) == 1


def test_results_are_batched_per_client_prefix_and_sent_to_watchers(h: Harness) -> None:
    prefix = "a" * 16
    ids_ = [f"{prefix}{i:016x}" for i in range(3)]
    h.submit(*(submission(task_id) for task_id in ids_))
    h.ready(NODE_A, async_slots=3)
    h.tick()
    h.take()
    h.broker.handle_subscription(ids_[2].encode())  # someone else watches the third task
    h.take()
    for task_id in ids_:
        h.result(NODE_A, task_id, 1, task_id)
    _, publications = h.take()
    by_topic = {topic: [parse_record(b)["task_id"] for b in m.body] for topic, m in publications}
    # One message for the submitter's prefix with all three, one for the watcher.
    assert by_topic == {prefix.encode(): ids_, ids_[2].encode(): [ids_[2]]}


def test_early_dispatches_follow_the_nodes_welcome(h: Harness) -> None:
    # TASKS may leave before the tick's commit; a new node's WELCOME must still come first.
    h.take()
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    early = [(peer, decode(frames).command) for peer, frames in h.broker.outbox.take_dispatches()]
    assert early == [(NODE_A, Command.WELCOME), (NODE_A, Command.TASKS)]
    messages, _ = h.take()  # what is left waits for the commit: the client's ACK
    assert [m.command for _, m in messages] == [Command.ACK]


# --------------------------------------------------------------------------- hostile limits


def test_an_attempt_nobody_reports_within_timeout_and_grace_runs_again() -> None:
    h = Harness(lease_grace_s=5.0, max_worker_losses=2)
    h.ready(NODE_A, async_slots=2)
    h.submit(submission("t1", timeout_s=2.0))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t1"]
    # The node keeps heartbeating but never reports the attempt.
    for _ in range(int(6.5 / STEP)):
        h.send(NODE_A, Command.HEARTBEAT)
        h.tick(h.now + STEP)
    assert h.broker.view("t1").status is TaskStatus.RUNNING  # type: ignore[union-attr]
    h.send(NODE_A, Command.HEARTBEAT)
    h.tick(h.now + 0.8)  # past 2 s + 5 s: lost, counted, and dispatched again
    assert h.broker.counters["overdue"] == 1
    (again,) = h.dispatched()[NODE_A]
    assert again.task_id == "t1" and again.attempt == 2
    node = h.broker.nodes.get(NODE_A)
    assert node is not None and node.free[SlotKind.ASYNC] == 0
    h.result(NODE_A, "t1", 1, "late")  # the first attempt's late result is fenced out...
    assert h.broker.view("t1").status is TaskStatus.RUNNING  # type: ignore[union-attr]
    assert node.free[SlotKind.ASYNC] == 1  # ...and gives back the slot it kept busy
    h.tick(h.now + 7.5)  # lost again: the worker-loss limit ends it
    record = h.record("t1")
    assert record.status is TaskStatus.FAILED and record.worker_losses == 2
    assert "WorkerLostError" in (record.error or "")


def test_a_task_without_timeout_is_never_reclaimed_from_a_live_node() -> None:
    h = Harness(lease_grace_s=1.0)
    h.ready(NODE_A)
    h.submit(submission("t1"))
    h.tick()
    for _ in range(100):
        h.send(NODE_A, Command.HEARTBEAT)
        h.tick(h.now + STEP)
    assert h.broker.counters["overdue"] == 0
    assert h.broker.view("t1").status is TaskStatus.RUNNING  # type: ignore[union-attr]


def test_a_submit_with_too_many_items_is_dropped_whole(h: Harness) -> None:
    items = [submission(f"t{i}").to_wire() for i in range(MAX_ITEMS_PER_MESSAGE + 1)]
    h.send(CLIENT, Command.SUBMIT, items)
    assert h.replies() == [] and len(h.broker.queues) == 0
    assert h.broker.counters["malformed"] == 1


def test_a_tick_fills_up_and_starts_empty(h: Harness) -> None:
    items = [submission(f"t{i}").to_wire() for i in range(MAX_ITEMS_PER_MESSAGE)]
    assert not h.broker.tick_is_full
    h.send(CLIENT, Command.SUBMIT, items)
    assert h.broker.tick_is_full  # the server defers further messages to the next tick
    h.tick()
    assert not h.broker.tick_is_full


# --------------------------------------------------------------------------- time and control


def test_a_delayed_task_waits_scheduled_and_starts_on_time(h: Harness) -> None:
    h.ready(NODE_A)
    h.submit(submission("later", eta=T0 + 10.0))
    h.tick()
    assert h.dispatched() == {}  # nothing reaches a node before it is due
    record = h.get("later")
    assert record is not None and record["status"] == "scheduled" and record["eta"] == T0 + 10
    assert len(h.broker.queues) == 0 and len(h.broker.timers) == 1
    h.tick(T0 + 9.999)
    assert h.dispatched() == {}
    h.tick(T0 + 10.0)
    assert ids(h.dispatched()[NODE_A]) == ["later"]
    record = h.get("later")
    assert record is not None and record["status"] == "running" and record["eta"] is None


def test_a_delayed_task_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.submit(submission("later", eta=T0 + 10.0))
    h.tick()
    h.broker.store.commit()
    h.broker.store.close()
    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.ready(NODE_A)
    h2.advance(5, heartbeats=(NODE_A,))
    assert h2.dispatched() == {}
    h2.advance(5, heartbeats=(NODE_A,))
    assert ids(h2.dispatched()[NODE_A]) == ["later"]
    h2.broker.store.close()


def test_a_task_not_started_by_its_deadline_expires_without_a_node(h: Harness) -> None:
    h.submit(submission("soon", deadline=T0 + 2.0))
    h.submit(submission("scheduled", eta=T0 + 5.0, deadline=T0 + 3.0))
    h.tick(T0 + 1.9)
    h.take()
    h.tick(T0 + 3.0)
    for task_id in ("soon", "scheduled"):
        record = h.record(task_id)
        assert record.status is TaskStatus.EXPIRED and "deadline" in (record.error or "")
    _, publications = h.take()  # waiters wake at the deadline
    published = {parse_record(r)["task_id"] for _, m in publications for r in m.body}
    assert published == {"soon", "scheduled"}
    assert len(h.broker.queues) == 0
    h.ready(NODE_A)
    h.tick(T0 + 10)
    assert h.dispatched() == {}  # never dispatched
    assert h.broker.counters["expired"] == 2


def test_a_retry_that_would_fall_after_the_deadline_expires_the_task(h: Harness) -> None:
    h.ready(NODE_A)
    h.submit(submission("t1", retry_delay_s=5.0, deadline=T0 + 3.0))
    h.tick()
    h.failure(NODE_A, "t1", 1)
    record = h.record("t1")
    assert record.status is TaskStatus.EXPIRED and record.retries == 0
    assert "ValueError: boom" in (record.error or "")


def test_cancel_stops_queued_scheduled_and_retrying_tasks(h: Harness) -> None:
    h.submit(submission("queued"), submission("scheduled", eta=T0 + 5.0))
    h.ready(NODE_A, async_slots=1)
    h.submit(submission("retrying", priority=9))
    h.tick()
    h.failure(NODE_A, "retrying", 1)
    assert h.record("retrying").status is TaskStatus.RETRYING
    for task_id in ("queued", "scheduled", "retrying"):
        assert h.broker.cancel(task_id, h.now) is True
        assert h.record(task_id).status is TaskStatus.CANCELLED
    assert h.broker.cancel("queued", h.now) is False  # finished: nothing changes
    assert h.broker.cancel("unknown", h.now) is False
    h.take()
    h.tick(T0 + 60)
    assert h.dispatched() == {}
    assert len(h.broker.queues) == 0


def test_cancel_of_a_running_task_tells_its_node_and_fences_its_result(h: Harness) -> None:
    h.ready(NODE_A, async_slots=1)
    h.submit(submission("t1"), submission("t2"))
    h.tick()
    h.take()
    assert h.broker.cancel("t1", h.now) is True
    (cancel,) = h.replies(Command.CANCEL)
    assert cancel[0] == NODE_A and cancel[1].body == [["t1", 1]]
    assert h.record("t1").status is TaskStatus.CANCELLED
    h.tick()
    assert h.dispatched() == {}  # the slot stays busy until the node reports the attempt
    h.failure(NODE_A, "t1", 1, exc="CancelledError")
    record = h.record("t1")
    assert record.status is TaskStatus.CANCELLED and record.retries == 0
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t2"]


def test_a_deadline_passing_while_the_task_runs_changes_nothing(h: Harness) -> None:
    h.ready(NODE_A, async_slots=2)
    h.submit(submission("t1", deadline=T0 + 1.0), submission("t2", priority=5))
    h.tick()
    h.tick(T0 + 2.0)  # t1 started before its deadline: it must not expire now
    assert h.record("t1").status is TaskStatus.RUNNING
    h.result(NODE_A, "t1", 1, "done")
    assert h.record("t1").status is TaskStatus.SUCCESS


def test_a_task_cancelled_while_its_node_was_away_is_stopped_when_it_returns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.broker.store.commit()
    h.broker.store.close()
    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    assert h2.broker.cancel("t1", h2.now) is True  # an orphan: nobody to tell yet
    h2.take()
    h2.ready(NODE_A, running=[("t1", 1)])  # the node comes back still running it
    cancels = [m.body for _, m in h2.replies(Command.CANCEL)]
    assert cancels == [[["t1", 1]]]
    assert h2.record("t1").status is TaskStatus.CANCELLED
    h2.broker.store.close()


def test_a_repeated_ready_does_not_take_back_what_was_just_dispatched(h: Harness) -> None:
    h.ready(NODE_A, async_slots=2)
    h.submit(submission("t1"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t1"]
    h.ready(NODE_A, async_slots=2)  # sent before TASKS arrived: it lists nothing yet
    h.tick()
    assert h.dispatched() == {}  # t1 is not queued again, nor dispatched as attempt 2
    node = h.broker.nodes.get(NODE_A)
    assert node is not None and node.leases == {"t1"} and node.free[SlotKind.ASYNC] == 1
    h.result(NODE_A, "t1", 1, "ok")
    assert h.record("t1").status is TaskStatus.SUCCESS


def test_a_ready_on_a_new_connection_gives_back_what_it_does_not_hold(h: Harness) -> None:
    h.ready(NODE_A, node_id="n1")
    h.submit(submission("t1"))
    h.tick()
    h.dispatched()
    h.ready(NODE_B, node_id="n1")  # the same node, reconnected: t1 never reached it
    h.tick()
    (again,) = h.dispatched()[NODE_B]
    assert again.task_id == "t1" and again.attempt == 2


def test_a_dispatch_lost_in_a_crash_is_adopted_not_run_again(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.broker.recover(h.now)
    h.submit(submission("t1"))
    h.broker.store.commit()
    h.ready(NODE_A)
    h.tick()  # t1#1 leaves for the node...
    assert ids(h.dispatched()[NODE_A]) == ["t1"]
    h.broker.store.discard()  # ...and the broker is killed before recording it
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.ready(NODE_A, running=[("t1", 1)])  # the node ran (or runs) t1#1
    h2.tick()
    assert h2.dispatched() == {}  # not run a second time
    assert h2.broker.counters["adopted_dispatches"] == 1
    h2.result(NODE_A, "t1", 1, "once")
    assert h2.record("t1").status is TaskStatus.SUCCESS
    h2.broker.store.close()


def _dispatched_then_killed(path: Path) -> bytes:
    """Two nodes registered and committed, t1 dispatched to one of them, then a kill before
    the commit that records the dispatch; returns the node t1 went to."""
    h = Harness(LmdbStore(path))
    h.broker.recover(h.now)
    h.ready(NODE_A)
    h.ready(NODE_B)
    h.submit(submission("t1"))
    h.broker.store.commit()
    h.tick()
    (holder,) = h.dispatched()
    h.broker.store.discard()
    h.broker.store.close()
    return holder


def _restarted_with_the_other_node(path: Path) -> tuple[Harness, bytes, bytes]:
    """After :func:`_dispatched_then_killed`: a restarted broker that the node without t1
    has rejoined; returns it, t1's holder and the other node."""
    holder = _dispatched_then_killed(path)
    other = NODE_B if holder == NODE_A else NODE_A
    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.ready(other)
    return h2, holder, other


def test_after_a_restart_dispatch_waits_for_the_nodes_registered_before_it(
    tmp_path: Path,
) -> None:
    h2, holder, other = _restarted_with_the_other_node(tmp_path / "store")
    h2.advance(2 * INTERVAL_MS / 1000, heartbeats=(other,))  # past one heartbeat interval
    assert h2.dispatched() == {}  # the holder is not back yet: nothing leaves
    h2.ready(holder, running=[("t1", 1)])
    h2.tick()
    assert h2.broker.counters["adopted_dispatches"] == 1
    assert h2.dispatched() == {}  # adopted by its holder, not run a second time
    h2.broker.store.close()


def test_a_node_that_never_comes_back_holds_dispatch_for_one_liveness_window_only(
    tmp_path: Path,
) -> None:
    h2, _, other = _restarted_with_the_other_node(tmp_path / "store")
    h2.advance(EXPIRY_S - STEP, heartbeats=(other,))
    assert h2.dispatched() == {}
    h2.advance(2 * STEP, heartbeats=(other,))
    assert ids(h2.dispatched()[other]) == ["t1"]  # run where it can be, after the window
    h2.broker.store.close()


def test_when_every_node_is_back_dispatch_starts_after_one_heartbeat_interval(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    _dispatched_then_killed(path)
    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.ready(NODE_A)
    h2.ready(NODE_B)  # neither holds t1 (the kill came before it arrived)
    h2.tick()
    assert h2.dispatched() == {}  # a node that registered in the lost tick gets its interval
    h2.advance(INTERVAL_MS / 1000 + STEP, heartbeats=(NODE_A, NODE_B))
    assert ids([d for ds in h2.dispatched().values() for d in ds]) == ["t1"]
    h2.broker.store.close()


def test_a_lease_that_moves_to_a_new_node_id_is_stored_under_it(tmp_path: Path) -> None:
    """Found by the near-valid fuzz test: a node re-registering on its connection under a
    new node id keeps its attempt, and the stored holder follows, so that after a restart
    recovery gives the attempt back to the node id that now holds it."""
    h = Harness(LmdbStore(tmp_path / "store"))
    h.broker.recover(h.now)
    h.ready(NODE_A)
    h.submit(submission("t1"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t1"]
    h.ready(NODE_A, node_id="renamed", running=[("t1", 1)])
    h.tick()
    h.broker.store.commit()
    assert [(t, a, n) for t, a, n in h.broker.repo.leases()] == [("t1", 1, "renamed")]
    check_broker(h.broker, h.now)
    h.broker.store.close()


def _fresh_dispatch(h: Harness) -> bool:
    """What the server decides from this tick: a dispatch of only tasks accepted with it
    (the fsync'd commit may linger and a late-ack client's ACK may be held for it)."""
    wakeup = Wakeup()
    service = BrokerService(h.broker, InprocHub(wakeup), wakeup, h.broker.store)
    return service._fresh_dispatch()


def test_a_task_stored_earlier_is_not_a_fresh_dispatch_when_its_resubmit_comes_with_it(
    h: Harness,
) -> None:
    """A re-sent submit is acknowledged as a new one is, but its task was stored (and
    committed) by an earlier tick: dispatching it now is no fresh dispatch, so its commit
    does not linger and the window before it stays one commit long."""
    h.ready(NODE_A, async_slots=1)
    h.submit(submission("first"))
    h.tick()
    assert _fresh_dispatch(h) and h.broker.dispatches_only_accepted  # accepted and dispatched
    h.take()
    h.submit(submission("second"))
    h.tick()  # no free slot: "second" waits in the queue, stored
    assert not _fresh_dispatch(h)
    h.take()
    h.submit(submission("second"))  # re-sent, and in the same tick a slot comes free
    h.result(NODE_A, "first", 1, "done")
    h.tick()
    assert [item[0] for item in h.broker.outbox.tasks[NODE_A]] == ["second"]
    assert [item[0] for item in h.broker.outbox.acks[CLIENT]] == ["second"]
    assert not h.broker.dispatches_only_accepted
    assert not _fresh_dispatch(h)
