"""Consistency checks of a broker's whole state, for tests that drive :class:`Broker` directly.

:func:`check_broker` runs them all: the stateful test after every step, the fuzz tests of
``test_core`` after a broker has swallowed garbage. Each check reads the broker's memory
(queues, leases, timers, nodes) and its store (through :class:`TaskRepository` where it has a
reader) and fails with what disagrees:

* :func:`check_places`: every stored task is in exactly one place, the one its status says
  (queued and PENDING, leased and RUNNING, waiting on its timer, or final);
* :func:`check_slots`: each node's free slots, leases and unreported attempts add up to its
  slots, and leases and the nodes' lease sets name each other;
* :func:`check_recovery`: a broker recovering from the store now rebuilds the same queues,
  timers and leases (the store must be committed).
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import msgpack

from flowrra.broker.core import Broker
from flowrra.broker.repository import TaskRepository
from flowrra.broker.store import Table
from flowrra.protocol import SlotKind, TaskStatus

ORPHAN = b""  # the holder of a lease recovered from the store, until a node claims it
# Statuses that wait for a timer (SCHEDULED: its eta; RETRYING: its retry) or for a workflow
# step before them (WAITING), and are in no queue.
_WAITING = (TaskStatus.SCHEDULED, TaskStatus.RETRYING, TaskStatus.WAITING)


def queued(broker: Broker) -> list[tuple[str, int, int]]:
    """(name, priority, order) of every queued task, without disturbing the queues."""
    return sorted(copy.deepcopy(broker.queues).remove())


def timers(broker: Broker) -> list[tuple[int, str]]:
    """(due_ms, task id) of every timer, without disturbing the heap."""
    return sorted(copy.deepcopy(broker.timers).pop_due(math.inf))


def check_places(
    broker: Broker, accepted: set[str] | None = None, *, exact_timers: bool = False
) -> None:
    """Queued (PENDING), leased (RUNNING), waiting (SCHEDULED, RETRYING, WAITING) or final:
    exactly one for every stored task, and a waiting task's timer is set.

    ``accepted``: the stored tasks must be exactly these. ``exact_timers``: no timer may be
    left over (timers are cleared lazily, so only a run without deadlines can ask this).
    """
    store = broker.store
    in_queue: Counter[str] = Counter()
    for name, priority, order in queued(broker):
        entry = store.get(Table.QUEUE, TaskRepository.queue_key(order))
        assert entry is not None, f"queue order {order} has no stored entry"
        task_id, stored_name, stored_priority = msgpack.unpackb(entry)
        assert (stored_name, stored_priority) == (name, priority), (task_id, name, priority)
        in_queue[task_id] += 1
    due = set(timers(broker))
    stored = {key.decode() for key, _ in store.scan(Table.TASKS)}
    if accepted is not None:
        assert stored == accepted, "the stored tasks are not the acknowledged ones"
    placed = set(in_queue) | set(broker.leases)
    assert placed <= stored, f"unknown tasks placed: {placed - stored}"
    needed: set[tuple[int, str]] = set()
    for task_id in sorted(stored):
        record = broker.view(task_id)
        assert record is not None, task_id
        where = {
            "queued": in_queue[task_id],
            "leased": int(task_id in broker.leases),
            "waiting": int(record.status in _WAITING),
            "final": int(record.status.is_final),
        }
        assert sum(where.values()) == 1, f"{task_id} ({record.status}) is in {where}"
        if where["queued"]:
            assert record.status is TaskStatus.PENDING, f"{task_id} is queued, {record.status}"
        if where["leased"]:
            assert record.status is TaskStatus.RUNNING, f"{task_id} is leased, {record.status}"
        wake = {TaskStatus.RETRYING: record.retry_at, TaskStatus.SCHEDULED: record.eta}
        if record.status in wake:
            at = wake[record.status]
            assert at is not None, f"{task_id} is {record.status} with no time to wake"
            needed.add((int(at * 1000), task_id))
        if record.deadline is not None and (where["queued"] or where["waiting"]):
            needed.add((int(record.deadline * 1000), task_id))
    assert needed <= due, f"waiting tasks without their timer: {sorted(needed - due)}"
    if exact_timers:
        assert due == needed, f"timers of no waiting task: {sorted(due - needed)}"


def check_slots(broker: Broker) -> None:
    """A node's free slots, its leases and the attempts taken back from it that it has not
    reported make up its advertised slots; leases and nodes' lease sets agree (an orphan
    recovered after a restart has no node until one adopts it)."""
    registered = {node.peer: node for node in broker.nodes}
    for node in broker.nodes:
        for task_id in node.leases:
            lease = broker.leases.get(task_id)
            assert lease is not None, f"{node.node_id} holds {task_id}, which has no lease"
            assert lease.node == node.peer, (
                f"{node.node_id} holds {task_id}, whose lease {lease.node!r} holds"
            )
        for kind in SlotKind:
            leased = [broker.leases[tid] for tid in node.leases]
            used = sum(1 for lease in leased if lease.kind is kind and not lease.waiting)
            ahead = {(x.task_id, x.attempt) for x in leased if x.kind is kind and x.waiting}
            # Attempts taken back (overdue, cancelled) keep their slot, or their place ahead,
            # until the node reports them.
            taken = {key for key, k in node.unreported.items() if k is kind}
            waiting = set(node.waiting[kind])
            unreported = len(taken - waiting)
            assert node.free[kind] + used + unreported == node.slots[kind], (
                f"{node.node_id} {kind}: {node.free[kind]} free + {used} leased + "
                f"{unreported} unreported != {node.slots[kind]} slots"
            )
            # Dispatched ahead (prefetch): within the node's prefetch, cpu slots only, each a
            # current lease or taken back and unreported; none has its timeout running, and
            # nothing waits while a slot of its kind is free.
            assert waiting == ahead | (taken & waiting), (node.node_id, kind, waiting)
            prefetch = node.slots[kind] * broker.config.cpu_prefetch if kind is SlotKind.CPU else 0
            assert len(waiting) <= node.prefetch[kind] == prefetch
            assert all(broker.leases[tid].deadline is None for tid, _ in ahead)
            assert not ahead or node.free[kind] == 0, f"{node.node_id} waits with a free slot"
            if ahead and broker.limits:
                assert not {tid for tid, _ in ahead} & {
                    t for t, lease in broker.leases.items() if lease.name in broker.limits.names
                }, "a task with fleet-wide limits was dispatched ahead"
    for task_id, lease in broker.leases.items():
        if lease.node == ORPHAN:
            continue
        holder = registered.get(lease.node)
        assert holder is not None, f"{task_id} is leased to {lease.node!r}, no node"
        assert task_id in holder.leases, f"{holder.node_id} does not list {task_id}"


def check_recovery(broker: Broker, now: float) -> None:
    """What a broker recovering from the (committed) store now would rebuild is what this
    one has."""
    store = broker.store
    assert not store.dirty, "commit the store first"
    fresh = Broker(store, broker.config, "inproc://check")
    fresh.recover(now)
    assert not store.dirty, "recover() wrote to the store"
    assert queued(fresh) == queued(broker)
    assert timers(fresh) == timers(broker)
    assert {t: lease.attempt for t, lease in fresh.leases.items()} == {
        t: lease.attempt for t, lease in broker.leases.items()
    }
    # New queue orders never reuse one a task may go back to the queue with (a lost attempt
    # returns at its old order). The live counter may be ahead of the stored one (orders
    # taken in a tick whose commit failed).
    assert fresh._next_order <= broker._next_order
    for key, _ in store.scan(Table.TASKS):
        record = broker.view(key.decode())
        if record is not None and record.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
            assert record.order <= fresh._next_order, (record.task_id, record.order)
    # The stored holder of a lease is its node (recover() gives it back to it by node id).
    stored_holders = {task_id: node_id for task_id, _attempt, node_id in broker.repo.leases()}
    for task_id, lease in broker.leases.items():
        node = broker.nodes.get(lease.node)
        if node is not None:
            assert stored_holders.get(task_id) == node.node_id, (
                f"{task_id} is held by {node.node_id}, stored as held by "
                f"{stored_holders.get(task_id)!r}"
            )
    # Queued records are stored at their queue position.
    for name, priority, order in queued(broker):
        entry = store.get(Table.QUEUE, TaskRepository.queue_key(order))
        assert entry is not None
        record = broker.view(msgpack.unpackb(entry)[0])
        assert record is not None and record.status is TaskStatus.PENDING
        assert (record.name, record.priority, record.order) == (name, priority, order)


def check_broker(
    broker: Broker, now: float, accepted: set[str] | None = None, *, exact_timers: bool = False
) -> None:
    """All of the above (see :func:`check_places` for the options)."""
    check_places(broker, accepted, exact_timers=exact_timers)
    check_slots(broker)
    check_recovery(broker, now)
