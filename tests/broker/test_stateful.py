"""A stateful fuzz test of the broker core: random runs of clients, nodes, clock and crashes.

A hypothesis :class:`RuleBasedStateMachine` drives :class:`flowrra.broker.core.Broker` over a
:class:`MemoryStore` with an injected clock, as :mod:`flowrra.broker.server` does: every step
handles its messages, calls ``tick``, sends the dispatches, commits the store and only then delivers
the rest of the outbox. Steps are submits (new ids, and idempotent resubmits of the same
call), node registrations (READY, also after a reconnect or a node restart), results from the
lease holder, results a node still believes it owes, hostile RESULTS (from a peer that does not
hold the lease, with a wrong attempt, for an unknown task), node loss (BYE, an unreachable
peer, liveness expiry as the clock advances), retry timers and overdue attempts firing as the
clock advances, broker restarts over the same store (after the last commit, and a kill that
loses the uncommitted writes of its last tick), and a failed commit (``abandon_tick``).

After every step the invariants below are checked: each accepted task is in exactly one place,
node slot accounting adds up, a final result never changes, and the in-memory state is what
``recover()`` rebuilds from the store.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.registry import Lease
from flowrra.broker.store import MemoryStore, Table
from flowrra.protocol import (
    Command,
    ErrorInfo,
    NodeReady,
    Outcome,
    SlotKind,
    Submission,
    TaskStatus,
    decode,
    encode,
    pack_args,
    pack_value,
    parse_ack,
    parse_tasks,
)
from tests.broker.harness import INTERVAL_MS, LIVENESS, STEP, T0
from tests.broker.invariants import (
    ORPHAN,
    check_places,
    check_recovery,
    check_slots,
    queued,
    timers,
)
from tests.flowrra.strategies import EXAMPLES

CLIENT = b"client"
STRANGER = b"stranger"  # a peer that never registered as a node
NAMES = ("jobs.work", "jobs.cpu")
# Each node's capacity and the task names it serves.
NODES: dict[str, tuple[int, int, dict[str, SlotKind]]] = {
    "n0": (2, 1, {"jobs.work": SlotKind.ASYNC, "jobs.cpu": SlotKind.CPU}),
    "n1": (1, 0, {"jobs.work": SlotKind.ASYNC}),
    "n2": (1, 1, {"jobs.work": SlotKind.ASYNC, "jobs.cpu": SlotKind.CPU}),
}
NODE_IDS = tuple(NODES)
CONFIG = BrokerConfig(
    data_dir=None,
    heartbeat_interval_ms=INTERVAL_MS,
    heartbeat_liveness=LIVENESS,
    max_worker_losses=2,
    result_ttl_s=1e9,  # final records never expire within a run: they are compared to the model
    lease_grace_s=2.0,  # an attempt of a task with a 1 s timeout is overdue after 3 s
)


class CountingStore(MemoryStore):
    """A MemoryStore that counts writes, so a check can tell that a message wrote nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        self.writes += 1
        super().put(table, key, value)

    def delete(self, table: Table, key: bytes) -> None:
        self.writes += 1
        super().delete(table, key)


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = CountingStore()
        self.now = T0
        self.broker = self._start_broker()
        self.next_id = 0
        # Every submission ever sent, by task id (a resubmit sends the same call again).
        self.sent: dict[str, Submission] = {}
        # Task ids acknowledged without an error: the broker has them durably.
        self.accepted: set[str] = set()
        # The public record of every task once it was seen final (it must never change).
        self.finals: dict[str, dict[str, Any]] = {}
        # Node processes: their current routing id, and the attempts they believe they run.
        self.peer: dict[str, bytes | None] = dict.fromkeys(NODE_IDS)
        self.connections: dict[str, int] = dict.fromkeys(NODE_IDS, 0)
        self.owner: dict[bytes, str] = {}  # routing id -> node id, for every connection
        self.held: dict[str, dict[str, int]] = {node: {} for node in NODE_IDS}

    # ------------------------------------------------------------------ driving

    def _start_broker(self) -> Broker:
        """A broker process starting over the store: recover, then commit (as the server)."""
        broker = Broker(self.store, CONFIG, "inproc://results")
        broker.recover(self.now)
        if self.store.dirty:
            self.store.commit()
        return broker

    def _send(self, peer: bytes, command: Command, body: object = None) -> None:
        self.broker.handle(peer, encode(command, body), self.now)

    def _deliver(self, messages: list[tuple[bytes, list[bytes]]], *, committed: bool) -> None:
        """Messages reach their peers: nodes learn their tasks, clients their acks."""
        for peer, frames in messages:
            message = decode(frames)
            if message.command is Command.TASKS:
                node = self.owner.get(peer)
                assert node is not None, f"TASKS sent to {peer!r}, which is no node"
                for dispatch in parse_tasks(message.body):
                    self.held[node][dispatch.task_id] = dispatch.attempt
            elif message.command is Command.ACK:
                assert committed, "an ACK left before the commit"
                for ack in parse_ack(message.body):
                    # Every submission here is valid and each resubmit is the same call.
                    assert ack.error is None, f"{ack.task_id} refused: {ack.error}"
                    self.accepted.add(ack.task_id)

    def _end_step(self) -> None:
        """The rest of one server loop iteration: tick, dispatches out, commit, the rest out."""
        self.broker.tick(self.now)
        self._deliver(self.broker.outbox.take_dispatches(), committed=False)
        self.store.commit()
        messages, _publications = self.broker.outbox.take()
        self._deliver(messages, committed=True)

    def _state(self) -> object:
        """Everything a message could change, for checks that one changed nothing."""
        broker = self.broker
        records = {}
        for task_id in sorted(self.sent):
            record = broker.view(task_id)
            records[task_id] = None if record is None else dataclasses.astuple(record)
        return (
            self.store.writes,
            {tid: (lease.attempt, lease.node, lease.kind) for tid, lease in broker.leases.items()},
            {
                node.peer: (dict(node.free), set(node.leases), dict(node.unreported))
                for node in broker.nodes
            },
            queued(broker),
            timers(broker),
            records,
        )

    def _lease_of(self, data: st.DataObject, *, held: bool) -> Lease:
        """A current lease: one a registered node holds (``held``), or any, orphans too."""
        leases = [
            lease
            for _, lease in sorted(self.broker.leases.items())
            if not held or lease.node != ORPHAN
        ]
        return data.draw(st.sampled_from(leases), label="lease")

    def _has_lease(self, *, held: bool) -> bool:
        return any(not held or lease.node != ORPHAN for lease in self.broker.leases.values())

    # ------------------------------------------------------------------ step pieces

    def _submit_new(self, data: st.DataObject) -> list[Submission]:
        count = data.draw(st.integers(1, 2), label="count")
        subs = []
        for _ in range(count):
            task_id = f"t{self.next_id}"
            self.next_id += 1
            sub = Submission(
                task_id=task_id,
                name=data.draw(st.sampled_from(NAMES), label="name"),
                priority=data.draw(st.integers(0, 1), label="priority"),
                payload=pack_args([task_id], {}),
                max_retries=data.draw(st.integers(0, 2), label="max_retries"),
                retry_delay_s=data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="retry_delay_s"),
                timeout_s=data.draw(st.sampled_from([None, 1.0]), label="timeout_s"),
                submitted_at=self.now,
            )
            self.sent[task_id] = sub
            subs.append(sub)
        if data.draw(st.booleans(), label="repeat one within the message"):
            subs.append(subs[0])
        self._send(CLIENT, Command.SUBMIT, [s.to_wire() for s in subs])
        return subs

    def _register(self, node: str, *, reconnect: bool, restarted: bool) -> None:
        """READY from a node: the same connection again, a new one, or a restarted process."""
        if restarted:
            self.held[node].clear()  # a new process runs nothing
        peer = self.peer[node]
        if peer is None or reconnect or restarted:
            self.connections[node] += 1
            peer = f"{node}.{self.connections[node]}".encode()
            self.peer[node] = peer
            self.owner[peer] = node
        async_slots, cpu_slots, tasks = NODES[node]
        ready = NodeReady(
            node_id=node,
            hostname="host",
            pid=self.connections[node],
            async_slots=async_slots,
            cpu_slots=cpu_slots,
            tasks=tasks,
            running=sorted(self.held[node].items()),
        )
        self._send(peer, Command.READY, ready.to_wire())

    def _report(self, peer: bytes, task_id: str, attempt: int, ok: bool, repeat: bool) -> None:
        """RESULTS for one attempt (``repeat``: the same outcome twice in the message), with
        the effect the sender's standing calls for checked at once."""
        broker = self.broker
        lease = broker.leases.get(task_id)
        current = None if lease is None else (lease.attempt, lease.node)  # before the message
        before = self._state()
        sender = broker.nodes.get(peer)
        unreported = set() if sender is None else set(sender.unreported)
        record = broker.view(task_id)  # (the cached record a result updates in place)
        retries = None if record is None else (record.retries, record.max_retries)
        error = None if ok else ErrorInfo("ValueError", "boom", "Traceback: ...")
        value = pack_value(f"{task_id}#{attempt}") if ok else None
        outcome = Outcome(task_id, attempt, value, error, self.now - 0.5, self.now)
        self._send(peer, Command.RESULTS, [outcome.to_wire()] * (2 if repeat else 1))
        node = self.owner.get(peer)
        if node is not None and self.held[node].get(task_id) == attempt:
            del self.held[node][task_id]  # the node reported it: it no longer runs it
        if current is None or current[0] != attempt:
            # A stale attempt, a future one, or a task the broker does not run: fenced out.
            if sender is not None and (task_id, attempt) in unreported:
                # An attempt taken back from the node (overdue) ended after all: the slot it
                # kept busy is free again, and nothing else changes.
                assert (task_id, attempt) not in sender.unreported
                return
            assert self._state() == before, f"a result for {task_id}#{attempt} changed state"
            return
        holder = current[1]
        if holder != peer:
            # Not the lease holder: another node, a stranger, or anyone at all while the lease
            # is an orphan recovered after a restart (only its node's READY adopts it).
            # KNOWN BUG until 93dbd6e ("only the lease holder completes an attempt"): before
            # it, Broker.complete checked just (task id, attempt), so any peer naming the
            # current attempt completed the task. This asserts the correct behaviour: such a
            # result changes nothing.
            assert self._state() == before, (
                f"{peer!r} completed {task_id}#{attempt}, whose lease {holder!r} holds"
            )
            return
        # The holder's result is recorded.
        assert retries is not None
        after = broker.view(task_id)
        assert after is not None and task_id not in broker.leases
        if ok:
            assert after.status is TaskStatus.SUCCESS and after.result == value
        elif retries[0] < retries[1]:
            assert after.status is TaskStatus.RETRYING and after.retries == retries[0] + 1
        else:
            assert after.status is TaskStatus.FAILED

    def _uncommitted_work(self, data: st.DataObject) -> None:
        """What one tick handles before its commit: submits, results, a registration."""
        for _ in range(data.draw(st.integers(1, 2), label="messages")):
            action = data.draw(st.sampled_from(["submit", "result", "ready"]), label="action")
            if action == "submit":
                self._submit_new(data)
            elif action == "result" and self._has_lease(held=True):
                lease = self._lease_of(data, held=True)
                self._report(
                    lease.node, lease.task_id, lease.attempt, data.draw(st.booleans()), False
                )
            elif action == "ready":
                node = data.draw(st.sampled_from(NODE_IDS), label="node")
                self._register(node, reconnect=False, restarted=False)
        self.broker.tick(self.now)
        # Dispatches leave before the commit (see broker/server.py).
        self._deliver(self.broker.outbox.take_dispatches(), committed=False)

    # ------------------------------------------------------------------ clients

    @rule(data=st.data())
    def submit_new(self, data: st.DataObject) -> None:
        """A client submits one or two new tasks (perhaps one twice in the message)."""
        self._submit_new(data)
        self._end_step()

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def resubmit(self, data: st.DataObject) -> None:
        """A client sends a call again (it missed the ack, or retries): idempotent."""
        task_id = data.draw(st.sampled_from(sorted(self.sent)), label="task_id")
        known = task_id in self.accepted
        before = self._state()
        self._send(CLIENT, Command.SUBMIT, [self.sent[task_id].to_wire()])
        if known:
            assert self._state() == before, f"resubmitting {task_id} changed state"
        self._end_step()
        assert task_id in self.accepted

    # ------------------------------------------------------------------ nodes

    @rule(node=st.sampled_from(NODE_IDS), reconnect=st.booleans(), restarted=st.booleans())
    def register(self, node: str, reconnect: bool, restarted: bool) -> None:
        """READY, listing the attempts the node still runs (none after a process restart)."""
        self._register(node, reconnect=reconnect, restarted=restarted)
        self._end_step()

    @precondition(lambda self: self._has_lease(held=True))
    @rule(data=st.data(), ok=st.booleans(), repeat=st.booleans())
    def result_from_holder(self, data: st.DataObject, ok: bool, repeat: bool) -> None:
        """The node holding a lease reports its attempt: success, a retry, or failure."""
        lease = self._lease_of(data, held=True)
        self._report(lease.node, lease.task_id, lease.attempt, ok, repeat)
        self._end_step()

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), ok=st.booleans())
    def result_a_node_believes_it_owes(self, data: st.DataObject, ok: bool) -> None:
        """A node reports an attempt it was sent, from its current connection: perhaps one
        the broker has moved on from (the node was lost, or the broker restarted)."""
        node = data.draw(st.sampled_from([n for n in NODE_IDS if self.held[n]]), label="node")
        task_id = data.draw(st.sampled_from(sorted(self.held[node])), label="task_id")
        peer = self.peer[node]
        assert peer is not None
        self._report(peer, task_id, self.held[node][task_id], ok, False)
        self._end_step()

    @precondition(lambda self: self._has_lease(held=False))
    @rule(data=st.data(), ok=st.booleans())
    def hostile_result_from_a_non_holder(self, data: st.DataObject, ok: bool) -> None:
        """RESULTS naming the current attempt, from a peer that does not hold its lease."""
        lease = self._lease_of(data, held=False)
        others = [peer for peer in sorted(self.owner) if peer != lease.node]
        peer = data.draw(st.sampled_from([STRANGER, *others]), label="peer")
        self._report(peer, lease.task_id, lease.attempt, ok, False)
        self._end_step()

    @precondition(lambda self: self._has_lease(held=False))
    @rule(data=st.data(), ok=st.booleans(), offset=st.sampled_from([-1, 1, 5]))
    def hostile_result_with_a_wrong_attempt(
        self, data: st.DataObject, ok: bool, offset: int
    ) -> None:
        """RESULTS from the lease holder (or, for an orphan, from a stranger) naming another
        attempt than the current one: a superseded one, or one never dispatched."""
        lease = self._lease_of(data, held=False)
        peer = lease.node if lease.node != ORPHAN else STRANGER
        self._report(peer, lease.task_id, lease.attempt + offset, ok, False)
        self._end_step()

    @rule(
        peer=st.sampled_from([STRANGER, b"n0.1", b"n1.1"]),
        attempt=st.integers(0, 3),
        ok=st.booleans(),
    )
    def hostile_result_for_an_unknown_task(self, peer: bytes, attempt: int, ok: bool) -> None:
        """RESULTS for a task id the broker never accepted."""
        self._report(peer, "no-such-task", attempt, ok, False)
        self._end_step()

    @rule(node=st.sampled_from(NODE_IDS))
    def node_says_bye(self, node: str) -> None:
        """A node leaves (its tasks go back without counting a loss)."""
        peer = self.peer[node]
        if peer is not None:
            self._send(peer, Command.BYE)
            self.held[node].clear()  # the process ends
            self.peer[node] = None
        self._end_step()

    @rule(node=st.sampled_from(NODE_IDS), process_survives=st.booleans())
    def node_unreachable(self, node: str, process_survives: bool) -> None:
        """The transport lost the node (as the server reports a failed send)."""
        peer = self.peer[node]
        if peer is not None:
            self.broker.peer_unreachable(peer, self.now)
            if not process_survives:
                self.held[node].clear()
                self.peer[node] = None
        self._end_step()

    # ------------------------------------------------------------------ time

    @rule(
        seconds=st.sampled_from([STEP, 1.0, 2.5, 3.5, 7.0]),
        alive=st.sets(st.sampled_from(NODE_IDS)),
    )
    def advance_clock(self, seconds: float, alive: set[str]) -> None:
        """Time passes in housekeeping steps, each a server loop iteration with a commit;
        nodes outside ``alive`` stay silent (and miss their liveness window)."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(self.now + STEP, end)
            for node in sorted(alive):
                peer = self.peer[node]
                if peer is not None:
                    self._send(peer, Command.HEARTBEAT)
            self._end_step()

    # ------------------------------------------------------------------ broker faults

    @rule()
    def restart_broker(self) -> None:
        """The broker is killed after its last commit and starts again over the store."""
        self.broker = self._start_broker()
        self._end_step()

    @rule(data=st.data())
    def kill_broker_before_the_commit(self, data: st.DataObject) -> None:
        """The broker is killed with a tick handled but not committed: its writes are lost
        (its dispatches had already left), and a new broker starts over the store."""
        self._uncommitted_work(data)
        self.broker.outbox.take()  # nothing else leaves
        self.store.discard()
        self.broker = self._start_broker()
        self._end_step()

    @rule(data=st.data())
    def commit_fails(self, data: st.DataObject) -> None:
        """A tick's commit fails (a full disk): the server discards it and abandons the tick."""
        self._uncommitted_work(data)
        self.store.discard()
        self.broker.abandon_tick("disk full", self.now)
        if self.store.dirty:
            self.store.commit()
        messages, _ = self.broker.outbox.take()
        for peer, frames in messages:
            message = decode(frames)
            if message.command is Command.ACK:
                for ack in parse_ack(message.body):
                    # Refused unless an earlier tick stored it.
                    assert (ack.error is None) == (ack.task_id in self.accepted), ack
            elif message.command is Command.TASKS:
                self._deliver([(peer, frames)], committed=False)
        self._end_step()

    # ------------------------------------------------------------------ invariants
    # The state checks are tests/broker/invariants.py's (the fuzz tests of test_core use them
    # too); only the one that needs this test's model of final results lives here.

    @invariant()
    def each_accepted_task_is_in_exactly_one_place(self) -> None:
        """Queued (PENDING), leased (RUNNING), timed (RETRYING) or final: exactly one; the
        stored tasks are exactly the acknowledged ones, and no timer is left over."""
        check_places(self.broker, self.accepted, exact_timers=True)

    @invariant()
    def node_slots_and_leases_add_up(self) -> None:
        check_slots(self.broker)

    @invariant()
    def final_results_never_change(self) -> None:
        """Once a task is seen final (after a commit), its public record stays as it was."""
        for task_id in sorted(self.accepted):
            record = self.broker.view(task_id)
            assert record is not None, task_id
            if task_id in self.finals:
                assert record.public() == self.finals[task_id], f"{task_id}'s result changed"
            elif record.status.is_final:
                self.finals[task_id] = record.public()

    @invariant()
    def memory_agrees_with_the_store(self) -> None:
        """What a broker recovering from the store now would rebuild is what this one has."""
        check_recovery(self.broker, self.now)


BrokerMachine.TestCase.settings = settings(
    # 5-10 s at the default FLOWRRA_TEST_EXAMPLES=50; set it to 2000 for a thorough run.
    max_examples=3 * EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # Shrinking a failure to a short program takes minutes: one bug at a time is enough.
    report_multiple_bugs=False,
    # The same programs on every plain run (CI stays predictable); a thorough run with
    # FLOWRRA_TEST_EXAMPLES set explores new ones.
    derandomize="FLOWRRA_TEST_EXAMPLES" not in os.environ,
)
# Longer than the suite's 60 s per test, so that a failure is shrunk and reported.
TestBrokerMachine = pytest.mark.timeout(900)(BrokerMachine.TestCase)
