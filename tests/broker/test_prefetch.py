"""cpu_bound tasks dispatched ahead (``cpu_prefetch``), with the injected clock.

A node's worker process should never idle for a dispatch round trip, so the broker sends one
cpu task per cpu slot ahead; the node queues it for the next free worker. What must hold:
free slots everywhere go first, queued tasks keep strict priority order, an attempt waiting on
a node has no timeout running (it counts from the slot it gets), it is re-queued without a
loss when its node goes, it can be cancelled, and limited tasks are never sent ahead.
"""

from __future__ import annotations

from typing import Any

import pytest

from flowrra.broker.registry import NodeState
from flowrra.protocol import (
    Command,
    SlotKind,
    Submission,
    TaskLimits,
    TaskStatus,
    parse_cancel,
)
from tests.broker.harness import (
    EXPIRY_S,
    NODE_A,
    NODE_B,
    STEP,
    Harness,
    ids,
    submission,
)
from tests.broker.invariants import check_slots

CPU = {"jobs.cpu": SlotKind.CPU}


def cpu(task_id: str, **overrides: Any) -> Submission:
    return submission(task_id, name="jobs.cpu", **overrides)


def _node(h: Harness, peer: bytes = NODE_A) -> NodeState:
    node = h.broker.nodes.get(peer)
    assert node is not None
    return node


def _cpu_harness(slots: int = 2, **config: Any) -> Harness:
    h = Harness(**config)
    h.ready(NODE_A, async_slots=0, cpu_slots=slots, tasks=CPU)
    h.take()
    return h


def test_one_task_per_cpu_slot_is_dispatched_ahead() -> None:
    h = _cpu_harness(slots=2)
    h.submit(*(cpu(f"t{i}") for i in range(6)))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t0", "t1", "t2", "t3"]
    node = _node(h)
    assert node.free[SlotKind.CPU] == 0
    assert list(node.waiting[SlotKind.CPU]) == [("t2", 1), ("t3", 1)]
    assert [h.broker.leases[t].waiting for t in ("t0", "t1", "t2", "t3")] == [
        False,
        False,
        True,
        True,
    ]
    assert h.record("t2").status is TaskStatus.RUNNING  # leased: it is the node's now
    check_slots(h.broker)
    # t0 ends: t2 takes its slot, and t4 is sent ahead in t2's place.
    h.result(NODE_A, "t0", 1)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t4"]
    assert list(node.waiting[SlotKind.CPU]) == [("t3", 1), ("t4", 1)]
    assert not h.broker.leases["t2"].waiting
    check_slots(h.broker)


def test_async_slots_get_no_prefetch() -> None:
    h = Harness()
    h.ready(NODE_A, async_slots=2)
    h.submit(*(submission(f"t{i}") for i in range(4)))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t0", "t1"]
    assert not _node(h).waiting[SlotKind.ASYNC]


def test_prefetch_can_be_switched_off() -> None:
    h = _cpu_harness(slots=2, cpu_prefetch=0)
    h.submit(*(cpu(f"t{i}") for i in range(4)))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t0", "t1"]
    check_slots(h.broker)


def test_free_slots_anywhere_go_before_tasks_sent_ahead() -> None:
    h = _cpu_harness(slots=1)
    h.submit(cpu("t0"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["t0"]
    h.ready(NODE_B, async_slots=0, cpu_slots=1, tasks=CPU)
    h.take()
    h.submit(cpu("t1"), cpu("t2"), cpu("t3"))
    h.tick()
    sent = {peer: ids(d) for peer, d in h.dispatched().items()}
    # B's free slot takes the best task; then each node gets one ahead.
    assert sent == {NODE_B: ["t1", "t3"], NODE_A: ["t2"]}
    check_slots(h.broker)


def test_queued_tasks_keep_strict_priority_order() -> None:
    """What is queued goes by priority; an attempt sent ahead before a higher-priority task
    arrived still runs first (the documented cost of prefetching)."""
    h = _cpu_harness(slots=1)
    h.submit(cpu("low-1"), cpu("low-2"), cpu("low-3"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["low-1", "low-2"]  # one running, one ahead
    h.submit(cpu("high", priority=5))
    h.tick()
    assert h.dispatched() == {}
    h.result(NODE_A, "low-1", 1)  # low-2 (ahead) runs now; high goes ahead of low-3
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["high"]
    h.result(NODE_A, "low-2", 1)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["low-3"]


def test_a_timeout_counts_from_the_slot_not_from_the_dispatch() -> None:
    h = _cpu_harness(slots=1, lease_grace_s=2.0)
    h.submit(cpu("long"), cpu("next", timeout_s=1.0))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["long", "next"]
    assert h.broker.leases["next"].deadline is None
    # "long" runs for 10 s: "next" waits on the node meanwhile and is not overdue.
    h.advance(10.0, heartbeats=(NODE_A,))
    assert h.broker.leases["next"].attempt == 1 and h.broker.counters["overdue"] == 0
    h.result(NODE_A, "long", 1)
    h.tick()
    lease = h.broker.leases["next"]
    assert not lease.waiting and lease.deadline == pytest.approx(h.now + 1.0 + 2.0)
    # From its start, the usual rule: unreported after timeout + grace, it counts as lost.
    h.advance(3.0 + STEP, heartbeats=(NODE_A,))
    assert h.broker.counters["overdue"] == 1
    assert h.record("next").status is TaskStatus.PENDING


def test_an_overdue_attempt_takes_back_the_ones_waiting_behind_it() -> None:
    h = _cpu_harness(slots=1, lease_grace_s=2.0)
    h.submit(cpu("hung", timeout_s=1.0), cpu("behind"))
    h.tick()
    h.take()
    h.advance(3.0 + STEP, heartbeats=(NODE_A,))
    cancels = [parse_cancel(m.body) for _, m in h.replies(Command.CANCEL)]
    assert cancels == [[("behind", 1)]]
    node = _node(h)
    assert h.record("behind").status is TaskStatus.PENDING
    assert h.record("behind").worker_losses == 0 and h.record("hung").worker_losses == 1
    assert set(node.unreported) == {("hung", 1), ("behind", 1)}
    check_slots(h.broker)
    # Nothing new for the node while it does not report; its reports free it again.
    h.tick()
    assert h.dispatched() == {}
    h.failure(NODE_A, "behind", 1, exc="CancelledError")
    h.tick()
    assert h.dispatched() == {}  # its slot is still held by "hung"
    h.failure(NODE_A, "hung", 1, exc="TaskTimeoutError")
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["hung", "behind"]  # (ordered by queue place)
    check_slots(h.broker)


def test_a_lost_node_gives_back_its_waiting_attempts_without_a_loss() -> None:
    h = _cpu_harness(slots=1)
    h.submit(cpu("running"), cpu("waiting"))
    h.tick()
    h.take()
    h.advance(EXPIRY_S + 2 * STEP)  # the node falls silent
    assert h.broker.nodes.get(NODE_A) is None
    assert h.record("running").worker_losses == 1
    assert h.record("waiting").worker_losses == 0
    assert h.record("waiting").status is TaskStatus.PENDING


def test_cancelling_an_attempt_sent_ahead() -> None:
    h = _cpu_harness(slots=1)
    h.submit(cpu("running"), cpu("waiting"), cpu("queued"))
    h.tick()
    h.take()
    assert h.broker.cancel("waiting", h.now)
    cancels = [parse_cancel(m.body) for _, m in h.replies(Command.CANCEL)]
    assert cancels == [[("waiting", 1)]]
    assert h.record("waiting").status is TaskStatus.CANCELLED
    node = _node(h)
    check_slots(h.broker)
    h.tick()
    assert h.dispatched() == {}  # its place ahead is held until the node reports it
    h.failure(NODE_A, "waiting", 1, exc="CancelledError")
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["queued"]
    assert list(node.waiting[SlotKind.CPU]) == [("queued", 1)]
    assert h.record("waiting").status is TaskStatus.CANCELLED  # the late report is fenced
    h.result(NODE_A, "running", 1)
    h.tick()
    assert not node.waiting[SlotKind.CPU] and not h.broker.leases["queued"].waiting
    check_slots(h.broker)


@pytest.mark.parametrize(
    "limit", [TaskLimits(100, 1.0, None), TaskLimits(None, None, 10)], ids=["rate", "concurrency"]
)
def test_limited_tasks_are_never_sent_ahead(limit: TaskLimits) -> None:
    h = Harness()
    h.ready(NODE_A, async_slots=0, cpu_slots=1, tasks=CPU | {"jobs.free": SlotKind.CPU})
    h.ready(NODE_A, async_slots=0, cpu_slots=1, tasks=CPU, limits={"jobs.cpu": limit})
    h.take()
    h.submit(cpu("l0"), cpu("l1"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["l0"]
    assert not _node(h).waiting[SlotKind.CPU]
    h.result(NODE_A, "l0", 1)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["l1"]


def test_a_node_re_registering_after_a_restart_keeps_its_order() -> None:
    """After a broker restart, the attempts a node lists (started ones first) take its slots
    in that order; the rest wait again, with no timeout running."""
    h = _cpu_harness(slots=1)
    h.submit(cpu("a", timeout_s=5.0), cpu("b", timeout_s=5.0))
    h.tick()
    h.take()
    h.broker.store.commit()
    restarted = Harness(store=h.broker.store)
    restarted.now = h.now
    restarted.broker.recover(restarted.now)
    restarted.ready(NODE_A, async_slots=0, cpu_slots=1, tasks=CPU, running=[("a", 1), ("b", 1)])
    leases = restarted.broker.leases
    assert not leases["a"].waiting and leases["a"].deadline is not None
    assert leases["b"].waiting and leases["b"].deadline is None
    check_slots(restarted.broker)


def test_a_task_with_a_deadline_is_never_sent_ahead() -> None:
    """It must start before its deadline, and one sent ahead starts when the task before it
    ends: it waits in the queue for a free slot. Nothing behind it jumps ahead of it."""
    h = _cpu_harness(slots=1)
    h.submit(cpu("running"), cpu("expiring", deadline=h.now + 5.0), cpu("plain"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["running"]
    assert h.record("expiring").status is TaskStatus.PENDING
    h.result(NODE_A, "running", 1)
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["expiring", "plain"]  # a slot, then ahead
    assert h.broker.leases["plain"].waiting
    check_slots(h.broker)


def test_a_task_with_a_deadline_expires_in_the_queue_not_on_a_node() -> None:
    h = _cpu_harness(slots=1)
    h.submit(cpu("running"), cpu("expiring", deadline=h.now + 5.0))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["running"]
    h.advance(5.0 + STEP, heartbeats=(NODE_A,))
    assert h.record("expiring").status is TaskStatus.EXPIRED
    check_slots(h.broker)
