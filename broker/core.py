"""The broker's state machine: requests in, replies and dispatches out. No sockets here.

:class:`Broker` is driven by :mod:`flowrra.broker.server`, which feeds it the messages drained
in one loop tick, calls :meth:`Broker.tick`, commits the store once and only then sends
what the broker put in its :class:`Outbox`. Methods are verbs on the broker's state, after Majordomo
(``register_node``, ``dispatch``, ``purge_nodes``, ``send_heartbeats``).
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections import defaultdict
from typing import Any, Protocol

from flowrra import protocol
from flowrra.broker import admin
from flowrra.broker.config import BrokerConfig
from flowrra.broker.limits import Limits
from flowrra.broker.queues import TaskQueues
from flowrra.broker.records import Attempt, TaskRecord
from flowrra.broker.registry import KINDS, Lease, NodeRegistry, NodeState
from flowrra.broker.repository import TaskRepository
from flowrra.broker.scheduling import Schedules
from flowrra.broker.store import Store
from flowrra.broker.timers import Timers, backoff_s
from flowrra.broker.workflows import Workflows
from flowrra.broker.workflows import validate as validate_workflow
from flowrra.errors import AdminError, ProtocolError
from flowrra.protocol import (
    Command,
    ErrorInfo,
    Outcome,
    SlotKind,
    Submission,
    TaskStatus,
    VersionMismatch,
    Welcome,
)

log = logging.getLogger("flowrra.broker")

# The holder of a lease recovered from the store, until a node claims it.
_ORPHAN = b""
# Bytes of a STATE piece kept for everything but its records; and how many pieces' worth one
# GET may be answered with (the rest is listed as omitted, and the client asks again).
_STATE_HEADROOM = 64 * 1024
_GET_REPLY_PIECES = 4
# Work one tick takes on before the server defers the rest of what it drained to the next
# tick (after this one's commit and sends): keeps every tick to a few tens of milliseconds.
TICK_ITEMS = 5000
TICK_REPLY_BYTES = 64 * 1024 * 1024
EXPIRED = TaskStatus.EXPIRED
# Statuses set or tested for every task: an enum member read from its class costs about
# 0.1 us in Python 3.11, a module constant a few ns.
_PENDING, _RUNNING, _RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
_SUCCESS, _FAILED = TaskStatus.SUCCESS, TaskStatus.FAILED
# The commands of nearly every message (module constants for the same reason).
_SUBMIT, _RESULTS, _HEARTBEAT = Command.SUBMIT, Command.RESULTS, Command.HEARTBEAT
# Statuses of tasks that wait for a timer or a slot: they may still expire.
_WAITING = frozenset((TaskStatus.SCHEDULED, TaskStatus.PENDING, TaskStatus.RETRYING))
# How long after a failed commit the outcomes it lost are applied again.
REPLAY_INTERVAL_S = 0.5
# Commands whose content does not depend on the store (kept when a commit fails).
# Records per RESULT publication: a tick's results for one client go out in pieces that
# stay under pyzmq's zero-copy threshold (64 KiB) for small results, so they are copied into
# libzmq instead of sent without a copy and tracked (each tracked frame wakes pyzmq's
# garbage-collector thread, which then competes with the loop for the GIL).
PUBLICATION_RECORDS = 200

_STATELESS = frozenset(
    bytes([c]) for c in (Command.WELCOME, Command.HEARTBEAT, Command.RECONNECT, Command.ERROR)
)


class Outbox:
    """What one tick wants to send, batched per peer, sent after the tick's commit."""

    def __init__(self) -> None:
        self.acks: dict[bytes, list[list[Any]]] = defaultdict(list)
        self.tasks: dict[bytes, list[list[Any]]] = defaultdict(list)
        self.messages: list[tuple[bytes, list[bytes]]] = []
        self.publications: list[list[bytes]] = []
        # Task records to publish, batched per topic: one RESULT message per topic per tick.
        self.results: dict[bytes, list[dict[str, Any]]] = defaultdict(list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.tasks or self.messages or self.publications or self.results)

    def send(self, peer: bytes, command: Command, body: object = None) -> None:
        self.messages.append((peer, protocol.encode(command, body)))

    def publish(self, topic: str, command: Command, body: object = None) -> None:
        self.publications.append(protocol.encode_publication(topic.encode(), command, body))

    def take_dispatches(self) -> list[tuple[bytes, list[bytes]]]:
        """What may leave before the tick's commit: the TASKS messages, preceded by the
        messages that do not depend on the store (a node's WELCOME must reach it before
        its first tasks)."""
        out = [(peer, frames) for peer, frames in self.messages if frames[1] in _STATELESS]
        if out:
            self.messages = [m for m in self.messages if m[1][1] not in _STATELESS]
        out.extend(
            (peer, protocol.encode(Command.TASKS, items)) for peer, items in self.tasks.items()
        )
        self.tasks = defaultdict(list)
        return out

    def take(self) -> tuple[list[tuple[bytes, list[bytes]]], list[list[bytes]]]:
        """All pending messages as frames, and all publications; empties the outbox."""
        out = self.messages
        for peer, items in self.acks.items():
            out.append((peer, protocol.encode(Command.ACK, items)))
        for peer, items in self.tasks.items():
            out.append((peer, protocol.encode(Command.TASKS, items)))
        publications = self.publications
        for topic, records in self.results.items():
            for start in range(0, len(records), PUBLICATION_RECORDS):
                chunk = records[start : start + PUBLICATION_RECORDS]
                publications.append(protocol.encode_publication(topic, Command.RESULT, chunk))
        self.acks = defaultdict(list)
        self.tasks = defaultdict(list)
        self.messages = []
        self.publications = []
        self.results = defaultdict(list)
        return out, publications


class BrokerObserver(Protocol):
    """Receives task events (for metrics and broker/stats.py), each with the task's name and
    id; called on the broker's loop, so keep it cheap."""

    def submitted(self, name: str, task_id: str) -> None: ...
    def started(self, name: str, queue_wait_s: float, task_id: str) -> None: ...
    def retried(self, name: str, task_id: str) -> None: ...
    def finished(
        self, name: str, status: TaskStatus, run_s: float | None, task_id: str
    ) -> None: ...


class RateWindow:
    """Events per second over the last ``seconds`` seconds, in one-second buckets."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self._buckets: dict[int, int] = {}

    def add(self, now: float) -> None:
        second = int(now)
        self._buckets[second] = self._buckets.get(second, 0) + 1
        if len(self._buckets) > self.seconds + 1:
            for old in [s for s in self._buckets if s <= second - self.seconds]:
                del self._buckets[old]

    def rate(self, now: float) -> float:
        second = int(now)
        recent = sum(n for s, n in self._buckets.items() if second - self.seconds < s <= second)
        return recent / self.seconds


class Broker:
    """Queues, node registry, leases, retry timers and results, over one :class:`Store`."""

    def __init__(self, store: Store, config: BrokerConfig, publish_endpoint: str) -> None:
        self.store = store
        self.repo = TaskRepository(store)
        self.schedules = Schedules(self.repo)
        self.workflows = Workflows(self.repo)
        self.limits = Limits()
        self.config = config
        self.broker_id = uuid.uuid4().hex
        self.welcome = Welcome(
            self.broker_id,
            publish_endpoint,
            config.heartbeat_interval_ms,
            config.heartbeat_liveness,
            config.max_message_bytes,
        ).to_wire()
        self.queues = TaskQueues()
        self.nodes = NodeRegistry(
            config.heartbeat_interval_ms, config.heartbeat_liveness, config.cpu_prefetch
        )
        self.leases: dict[str, Lease] = {}
        self.timers = Timers()
        self.outbox = Outbox()
        self.enforce_liveness = True
        self._next_order = 0
        self._order_dirty = False
        self._next_sweep = 0.0
        self._next_housekeeping = 0.0
        self._orphans_until: float | None = None
        self.counters: dict[str, int] = defaultdict(int)
        # Outcomes accepted since the last successful commit (kept in case it fails), and
        # those of a failed tick, applied again in the next one.
        self._uncommitted_outcomes: list[tuple[bytes, Outcome]] = []
        self._replay_outcomes: list[tuple[bytes, Outcome]] = []
        # While commits fail, replays are tried this often, so that the ticks in between
        # (reads, heartbeats) write nothing and their replies still go out.
        self._replay_after = 0.0
        # Ticks run so far, and workflow steps released in one, queued after its commit.
        self._ticks = 0
        self._dispatch_after = 0.0  # after a restart: when dispatching may start
        # After a restart: the nodes registered before it that have not re-registered yet.
        self._awaited_nodes: set[str] = set()
        self._dispatch_floor = 0.0
        self._held: list[tuple[int, TaskRecord]] = []
        # Ids of the tasks first stored by the messages handled since the last tick, and
        # those of the tick that ran last (see dispatches_only_accepted).
        self._accepting: set[str] = set()
        self._tick_accepted: set[str] = set()
        # Items handled and reply bytes built in the current tick (see TICK_ITEMS).
        self.tick_items = 0
        self.tick_reply_bytes = 0
        # (deadline, task id, attempt) of attempts with a timeout, earliest first; stale
        # entries are skipped when they come due.
        self._deadlines: list[tuple[float, str, int]] = []
        self.finished_per_second = RateWindow(60)
        self.observers: list[BrokerObserver] = []
        # Task ids that a subscriber watches by their own topic (tasks it did not submit).
        self.watched: set[bytes] = set()
        self.started_at = time.time()

    # ------------------------------------------------------------------ state helpers

    def _take_order(self) -> int:
        self._next_order += 1
        self._order_dirty = True  # stored once per tick, in the tick's commit
        return self._next_order

    def _store_order(self) -> None:
        if self._order_dirty:
            self._order_dirty = False
            self.repo.store_next_order(self._next_order)

    def _enqueue(self, record: TaskRecord) -> None:
        """Queue a PENDING record at its ``order`` (durably, and in the in-memory heaps)."""
        record.queued_at = time.time()
        self.repo.enqueue(record)
        self.queues.push(record.name, record.priority, record.order)

    def _lease(self, record: TaskRecord, kind: SlotKind, node: NodeState, now: float) -> Lease:
        self.repo.lease(record)
        lease = Lease(record.task_id, record.attempt, kind, node.peer, record, record.name)
        self.leases[record.task_id] = lease
        self._occupy(node, lease, now)
        return lease

    def _occupy(self, node: NodeState, lease: Lease, now: float) -> None:
        """Count an attempt a node holds (dispatched now, or adopted): on a free slot, where
        it starts now, or else dispatched ahead, waiting on the node for the next slot."""
        kind = lease.kind
        node.leases.add(lease.task_id)
        if node.free[kind] > 0 or len(node.waiting[kind]) >= node.prefetch[kind]:
            # (With neither left, after a re-registration, it runs over the count.)
            free = node.free[kind]
            node.free[kind] = free - 1 if free > 0 else 0
            record = lease.record
            # (A record at hand without a timeout has no deadline to watch.)
            if (lease.waiting or lease.deadline is None) and (
                record is None or record.timeout_s is not None
            ):
                self._watch_deadline(lease, now)
            lease.waiting = False
        else:
            lease.waiting = True
            lease.deadline = None  # its timeout starts when it gets a slot
            node.waiting[kind][(lease.task_id, lease.attempt)] = None

    def _slot_back(
        self, node: NodeState, kind: SlotKind, task_id: str, attempt: int, now: float
    ) -> None:
        """A node reported an attempt: its slot (or its place ahead) is free. The oldest
        attempt waiting on the node takes the slot: the node started it as the slot freed."""
        waiting = node.waiting[kind]
        if waiting:
            if (task_id, attempt) in waiting:
                del waiting[(task_id, attempt)]  # it held no slot
                return
            for key in waiting:
                lease = self.leases.get(key[0])
                if lease is not None and lease.attempt == key[1] and lease.node == node.peer:
                    del waiting[key]
                    lease.waiting = False
                    # Counted from now, when the broker learns of it: never before its start.
                    self._watch_deadline(lease, now)
                    return
        node.free[kind] += 1

    def _watch_deadline(self, lease: Lease, now: float) -> None:
        """A node must report a started attempt of a task with a timeout within timeout +
        grace (an attempt dispatched ahead: from when it gets its slot)."""
        record = self._leased_record(lease)
        if record is not None and record.timeout_s is not None:
            lease.deadline = now + record.timeout_s + self.config.lease_grace_s
            heapq.heappush(self._deadlines, (lease.deadline, lease.task_id, lease.attempt))

    def reclaim_overdue(self, now: float) -> None:
        """Attempts that outlived their timeout + grace unreported are lost: run them again,
        and take back the attempts waiting behind them on that node."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, task_id, attempt = heapq.heappop(deadlines)
            lease = self.leases.get(task_id)
            if (
                lease is None
                or lease.attempt != attempt
                or lease.node == _ORPHAN
                or lease.deadline != deadline  # superseded: the attempt waited, or was adopted
            ):
                continue
            node = self.nodes.get(lease.node)
            log.warning(
                "task %s#%d was not reported within its timeout and grace; its node %s "
                "counts as lost for it",
                task_id,
                attempt,
                "?" if node is None else node.node_id,
            )
            if node is not None:
                # Its slot stays busy: the node may still be running the attempt.
                node.leases.discard(task_id)
                node.unreported[(task_id, attempt)] = lease.kind
            self.counters["overdue"] += 1
            self._requeue_lost(task_id, now, count_loss=True)
            if node is not None:
                self._take_back_waiting(node, lease.kind, now)

    def _take_back_waiting(self, node: NodeState, kind: SlotKind, now: float) -> None:
        """A node that does not report a started attempt may never start those waiting
        behind it: cancel them there and queue them again (no loss counted; each keeps its
        place ahead until the node reports it)."""
        taken: list[list[Any]] = []
        for task_id, attempt in list(node.waiting[kind]):
            lease = self.leases.get(task_id)
            if lease is None or lease.attempt != attempt or lease.node != node.peer:
                continue  # taken back already, waiting for its report
            node.leases.discard(task_id)
            node.unreported[(task_id, attempt)] = kind
            taken.append([task_id, attempt])
            self._requeue_lost(task_id, now, count_loss=False)
        if taken:
            self.outbox.send(node.peer, Command.CANCEL, taken)

    def _leased_record(self, lease: Lease) -> TaskRecord | None:
        """The record of a running task, as it is now (loaded once, then cached)."""
        record = lease.record
        if record is None:
            record = self.repo.get(lease.task_id)
            if record is None:
                return None
            lease.record = record
        record.status = _RUNNING
        record.attempt = lease.attempt
        return record

    def view(self, task_id: str) -> TaskRecord | None:
        """A task's current record (running tasks are not rewritten in the store)."""
        lease = self.leases.get(task_id)
        if lease is not None:
            return self._leased_record(lease)
        return self.repo.get(task_id)

    def history(self, task_id: str) -> list[Attempt]:
        """How each attempt of a task ended, oldest first."""
        return self.repo.history(task_id)

    def _end_lease(self, task_id: str) -> Lease | None:
        lease = self.leases.pop(task_id, None)
        if lease is not None:
            self.repo.end_lease(task_id)
            if lease.name:
                self.limits.ended(lease.name)
        return lease

    def _set_timer(self, record: TaskRecord, due_at: float) -> None:
        record.retry_at = int(due_at * 1000) / 1000
        self._wake_at(record.task_id, due_at)

    def _wake_at(self, task_id: str, due_at: float) -> None:
        """A durable timer: :meth:`fire_timers` looks at the task again at ``due_at``."""
        due_ms = int(due_at * 1000)
        self.repo.set_timer(due_ms, task_id)
        self.timers.schedule(due_ms, task_id)

    # ------------------------------------------------------------------ recovery

    def recover(
        self, now: float, *, quiet: bool = False, held_before: dict[str, bytes] | None = None
    ) -> None:
        """Rebuild queues, leases and timers from the store after a start or a crash.

        Attempts that were in flight become orphaned leases for two liveness windows: a node
        that still runs one re-registers and adopts it, or reports its outcome, and the attempt
        counts. Orphans nobody claims go back to their queue at their old position. Attempt
        numbers are durable, so a result from a superseded attempt is always fenced out.
        """
        held_before = held_before or {}
        self.repo.check_format()
        # Only the small index tables are read: task records stay on disk until dispatched.
        self._next_order = max(self._next_order, self.repo.next_order())
        queued = running = retrying = 0
        for order, name, priority in self.repo.queued():
            self.queues.push(name, priority, order)
            # New orders must never reuse a queued one (the counter is stored once per tick).
            self._next_order = max(self._next_order, order)
            queued += 1
        for task_id, attempt, node_id in self.repo.leases():
            lease = Lease(task_id, attempt, SlotKind.ASYNC, _ORPHAN, owner=node_id)
            self.leases[task_id] = lease
            recovered = self.repo.get(task_id)  # in flight: a few, bounded by the slots
            if recovered is not None:
                lease.name = recovered.name
                self.limits.started(recovered.name, now)
            holder = self.nodes.by_node_id(node_id)
            # Still connected (recovering from a failed commit): it gets back what it held.
            if holder is not None and held_before.get(task_id) == holder.peer:
                self._attach(lease, holder, now)
            running += 1
        for due_ms, task_id in self.repo.timers():
            self.timers.schedule(due_ms, task_id)
            retrying += 1
        scheduled = self.schedules.recover()
        if running:
            # Two liveness windows: time for every surviving node to notice and re-register.
            self._orphans_until = now + 2 * self.nodes.expiry_ms / 1000
        if queued and not quiet:
            # A queued task may have been dispatched just before the crash (dispatches leave
            # before the commit): let the nodes re-register and claim such attempts (see
            # _adopt_lost_dispatch) before anything is dispatched. That is until every node
            # registered before the crash is back, at most one liveness window (a node may
            # take a reconnect back-off and a heartbeat interval to notice the restart).
            # Not before one heartbeat interval in any case: a node that registered in the
            # lost tick itself is not on the stored list.
            self._dispatch_floor = now + self.config.heartbeat_interval_ms / 1000
            self._dispatch_after = self._dispatch_floor
            before = self.repo.registered_nodes() or []
            self._awaited_nodes = {n for n in before if self.nodes.by_node_id(n) is None}
            if self._awaited_nodes:
                self._dispatch_after = now + self.nodes.expiry_ms / 1000
        if queued or running or retrying or scheduled:
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "recovered %d queued, %d in flight and %d timed tasks, and %d schedules",
                queued,
                running,
                retrying,
                scheduled,
            )

    def abandon_tick(self, reason: str, now: float) -> None:
        """The tick's writes could not be committed: refuse its submissions, drop the rest
        of its output, and rebuild the in-memory state from what the store really holds."""
        self.repo.end_tick()  # records changed in memory by the lost tick
        self.workflows.discard()
        self._accepting.clear()
        self._tick_accepted.clear()
        # A node sends an outcome once (again only after it registers again): keep the ones
        # this tick accepted and apply them again in the next tick.
        self._replay_outcomes.extend(self._uncommitted_outcomes)
        self._replay_after = now + REPLAY_INTERVAL_S
        self._uncommitted_outcomes = []
        refused = self.outbox.acks
        # Replies that do not depend on what failed to commit still go out.
        kept = [(peer, frames) for peer, frames in self.outbox.messages if frames[1] in _STATELESS]
        self.outbox = Outbox()
        self.outbox.messages = kept
        error = f"broker storage error: {reason}"
        for peer, items in refused.items():
            # A re-sent task that an earlier tick stored is still acknowledged: it will run.
            self.outbox.acks[peer] = [
                [task_id, None if self.repo.exists(task_id) else error, *rest]
                for task_id, _, *rest in items
            ]
        held_before = {t: lease.node for t, lease in self.leases.items() if lease.node != _ORPHAN}
        for peer, outcome in self._replay_outcomes:  # ended in the lost tick, by their holder
            held_before.setdefault(outcome.task_id, peer)
        self.queues = TaskQueues()
        self._held = []  # their release was not committed: they are WAITING again
        self.leases = {}
        self.limits.reset_running()
        self.timers = Timers()
        for node in self.nodes:
            node.leases.clear()
            node.free = dict(node.slots)
            waiting, node.waiting = node.waiting, {kind: {} for kind in KINDS}
            self._keep_unreported(node, node.unreported, waiting)
        # Committed leases go back to the connections that held them, and only those.
        self.recover(now, quiet=True, held_before=held_before)

    def _attach(self, lease: Lease, node: NodeState, now: float) -> bool:
        """Give an orphaned lease to the node that holds the attempt (the one it was
        dispatched to, by the store)."""
        if lease.owner and lease.owner != node.node_id:
            return False
        record = self._leased_record(lease)
        if record is None:
            return False
        lease.kind = SlotKind.CPU if record.name in node.names[SlotKind.CPU] else SlotKind.ASYNC
        lease.node = node.peer
        record.node_id = node.node_id
        self._occupy(node, lease, now)
        return True

    @staticmethod
    def _keep_unreported(
        node: NodeState,
        unreported: dict[tuple[str, int], SlotKind],
        waiting: dict[SlotKind, dict[tuple[str, int], None]],
    ) -> None:
        """Attempts taken back from a node (before it re-registered, or before a lost tick)
        still hold their slot, or their place ahead, until the node reports them."""
        for key, kind in unreported.items():
            if key in waiting[kind]:
                node.waiting[kind][key] = None
            else:
                node.free[kind] = max(0, node.free[kind] - 1)

    def requeue_orphans(self, now: float) -> None:
        """Re-queue recovered in-flight attempts that no node claimed in time."""
        if self._orphans_until is None or now < self._orphans_until:
            return
        self._orphans_until = None
        orphans = [tid for tid, lease in self.leases.items() if lease.node == _ORPHAN]
        for task_id in orphans:
            self._requeue_lost(task_id, now, count_loss=False)
        if orphans:
            log.info("re-queued %d in-flight tasks that no node reclaimed", len(orphans))

    # ------------------------------------------------------------------ input

    def handle(self, peer: bytes, frames: list[bytes], now: float) -> None:
        """Process one message; malformed input is logged and dropped, never raised."""
        try:
            message = protocol.decode(frames)
        except VersionMismatch as exc:
            log.warning("peer %s: %s", peer.hex(), exc)
            self.outbox.send(peer, Command.ERROR, {"code": "version", "message": str(exc)})
            return
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            log.warning("dropped a malformed message from %s: %s", peer.hex(), exc)
            return
        self.handle_message(peer, message.command, message.body, now)

    def handle_message(self, peer: bytes, command: Command, body: object, now: float) -> None:
        """Process one decoded message (in-process peers hand theirs over unencoded, with no
        Message around them); its body is validated as on the wire."""
        try:
            self._dispatch_command(peer, command, body, now)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            log.warning("dropped a malformed %s from %s: %s", command.name, peer.hex(), exc)
        except Exception:
            # A last line of defence: one bad message must not end the broker.
            self.counters["handler_errors"] += 1
            log.exception("error handling %s from %s; dropped", command.name, peer.hex())

    def _dispatch_command(self, peer: bytes, command: Command, body: object, now: float) -> None:
        if command is _SUBMIT:
            valid, rejected = protocol.split_submit(body)
            self.accept(peer, valid, now)
            for task_id, reason in rejected:
                log.warning("refused task %r from %s: %s", task_id, peer.hex(), reason)
                self.outbox.acks[peer].append([task_id, reason])
        elif command is _RESULTS:
            self.complete(peer, protocol.parse_results(body), now)
        elif command is _HEARTBEAT:
            self.heartbeat_from(peer, body, now)
        elif command is Command.PROGRESS:
            self.note_progress(peer, protocol.parse_progress(body))
        elif command is Command.GET:
            self.answer_get(peer, body)
        elif command is Command.HELLO:
            self.outbox.send(peer, Command.WELCOME, self.welcome)
        elif command is Command.READY:
            self.register_node(peer, protocol.parse_ready(body), now)
        elif command is Command.BYE:
            self.unregister_node(peer, now, lost=False)
        elif command is Command.PAUSE:
            node = self.nodes.touch(peer, now * 1000)
            if node is not None and not node.paused:
                node.paused = True
                log.info("node %s is draining: no new tasks for it", node.node_id)
        elif command is Command.ADMIN:
            self.answer_admin(peer, body, now)
        else:
            raise ProtocolError(f"{command.name} is not a request a broker accepts")

    def handle_subscription(self, topic: bytes) -> None:
        """A subscriber's subscription took effect: replay what is stored for that topic.

        This closes the slow-joiner gap: whatever was published before the subscription was
        live is sent again now that it is.
        """
        try:
            task_id = topic.decode()
        except UnicodeDecodeError:
            return
        record = self.view(task_id) if task_id else None
        if record is None:
            self.outbox.publish(task_id, Command.SUBSCRIBED)
            return
        self.outbox.results[topic].append(record.public())
        if not record.status.is_final:
            self.watched.add(topic)  # its final result will be published on this topic too

    def publish_result(self, record: TaskRecord) -> None:
        """Publish a record (final, or queued again) to the submitter's id prefix (batched per
        client) and, if someone subscribed to this very task id, on that topic as well."""
        public = record.public()
        topic = record.task_id.encode()
        group = topic[: protocol.CLIENT_PREFIX_CHARS]
        self.outbox.results[group].append(public)
        if topic in self.watched:
            if record.status.is_final:
                self.watched.discard(topic)
            if topic != group:
                self.outbox.results[topic].append(public)

    # ------------------------------------------------------------------ clients

    def accept(self, peer: bytes, submissions: list[Submission], now: float) -> None:
        """Store and queue submitted tasks; a task id seen before is acknowledged again."""
        acks = self.outbox.acks[peer]
        self.tick_items += len(submissions)
        for sub in submissions:
            stored = self.repo.get(sub.task_id)
            if stored is None:
                record = TaskRecord.from_submission(sub, self._take_order())
                self._add(record, now)
                self._accepting.add(record.task_id)
                self.counters["submitted"] += 1
                for observer in self.observers:
                    observer.submitted(record.name, record.task_id)
            elif not stored.is_call_of(sub):
                # The same id for another call: refusing it keeps one client (or a typo)
                # from getting, or giving, another call's result.
                self.counters["id_conflicts"] += 1
                acks.append(
                    [
                        sub.task_id,
                        f"task id {sub.task_id!r} is already used by another call "
                        "(a different task or different arguments)",
                        protocol.ACK_CONFLICT,
                    ]
                )
                continue
            acks.append([sub.task_id, None])

    def _add(self, record: TaskRecord, now: float) -> None:
        """Store a new task: queued, or SCHEDULED until its eta, with a timer for its
        deadline; all in this tick's commit."""
        if record.eta is not None and record.eta > now:
            record.status = TaskStatus.SCHEDULED
            self.repo.add(record, queued=False)
            self._wake_at(record.task_id, record.eta)
        else:
            record.eta = None
            record.queued_at = time.time()
            self.repo.add(record)
            self.queues.push(record.name, record.priority, record.order)
        if record.deadline is not None:
            self._wake_at(record.task_id, record.deadline)

    def answer_get(self, peer: bytes, body: object) -> None:
        if not isinstance(body, list) or len(body) != 2 or not isinstance(body[0], int):
            raise ProtocolError("GET body must be [request_id, [task ids]]")
        request_id = body[0]
        # Each id is answered once, in pieces within the message size limit, and in all at
        # most a few pieces' worth: one small GET cannot make the broker build a huge reply.
        task_ids = dict.fromkeys(protocol.parse_task_ids(body[1], "GET"))
        self.tick_items += len(task_ids)
        limit = self.config.max_message_bytes
        piece_limit = limit - min(_STATE_HEADROOM, limit // 8)
        reply_limit = piece_limit * _GET_REPLY_PIECES
        piece: list[dict[str, Any]] = []
        omitted: list[str] = []
        piece_bytes = reply_bytes = 0
        for task_id in task_ids:
            if reply_bytes >= reply_limit:
                omitted.append(task_id)
                continue
            record = self.view(task_id)
            if record is None:
                continue
            cost = record.public_size()
            # The first record always goes (progress); later ones only within the bound.
            if reply_bytes and reply_bytes + cost > reply_limit:
                omitted.append(task_id)
                continue
            if piece and piece_bytes + cost > piece_limit:
                self.outbox.send(peer, Command.STATE, [request_id, piece, True, []])
                piece, piece_bytes = [], 0
            piece.append(record.public())
            piece_bytes += cost
            reply_bytes += cost
        self.tick_reply_bytes += reply_bytes
        self.outbox.send(peer, Command.STATE, [request_id, piece, False, omitted])

    def answer_admin(self, peer: bytes, body: object, now: float) -> None:
        request_id, verb, args = protocol.parse_admin(body)
        try:
            result = admin.answer(self, verb, args, now)
        except AdminError as exc:
            self.outbox.send(peer, Command.ADMIN_REPLY, [request_id, str(exc), None])
            return
        self.outbox.send(peer, Command.ADMIN_REPLY, [request_id, None, result])

    def requeue_failed(self, task_id: str, now: float) -> bool:
        """Queue a dead-lettered task again with fresh retries (``flowrra dead retry``)."""
        record = self.repo.get(task_id)
        if record is None or record.status is not TaskStatus.FAILED:
            return False
        if not self.repo.unfinish(record):
            return False
        record.status = TaskStatus.PENDING
        record.retries = 0
        record.worker_losses = 0
        record.finished_at = record.expires_at = None
        record.order = self._take_order()
        self._enqueue(record)  # sets queued_at, saved next
        self.repo.save(record)
        self.counters["dead_retried"] += 1
        self.publish_result(record)  # tells clients holding its old result that it is back
        log.info("dead-lettered task %s (%s) queued again", task_id, record.name)
        return True

    def dead_letters(self, limit: int) -> list[TaskRecord]:
        """Tasks that ended FAILED, newest first."""
        return self.repo.dead_letters(limit)

    def purge(self, priority: int | None) -> int:
        """Drop queued tasks (of one priority, or all); how many."""
        removed = self.queues.remove(priority)
        for _name, _priority, order in removed:
            task_id = self.repo.take_queued(order)
            if task_id is not None:
                self.repo.forget(task_id)
        self.counters["purged"] += len(removed)
        return len(removed)

    def stored_counts(self) -> dict[str, int]:
        """Dead letters and stored results (committed)."""
        return {"dead_letters": self.repo.count_dead(), "results": self.repo.count_results()}

    # ------------------------------------------------------------------ nodes

    def register_node(self, peer: bytes, ready: protocol.NodeReady, now: float) -> None:
        """A node joined (or rejoined): record its capacity and adopt what it still holds."""
        now_ms = now * 1000
        previous = self.nodes.get(peer) or self.nodes.by_node_id(ready.node_id)
        adopted = {task_id: attempt for task_id, attempt in ready.running}
        # Attempts dispatched on this very connection after it sent this READY (a READY
        # repeated, e.g. one per RECONNECT after a restart) are still on their way to it.
        in_transit: list[Lease] = []
        if previous is not None:
            self.nodes.remove(previous.peer)
            for task_id in list(previous.leases):
                lease = self.leases.get(task_id)
                if lease is None or adopted.get(task_id) == lease.attempt:
                    continue
                if previous.peer == peer:
                    in_transit.append(lease)
                else:  # a new connection: what it does not list never reached the node
                    self._requeue_lost(task_id, now, count_loss=False)
        node = self.nodes.add(peer, ready, now_ms)
        if previous is None or previous.node_id != ready.node_id:
            self._store_nodes()
        if previous is not None and previous.peer == peer:
            node.unreported.update(previous.unreported)
            self._keep_unreported(node, previous.unreported, previous.waiting)
        self.limits.update(ready.limits)
        superseded: list[list[Any]] = []
        for task_id, attempt in adopted.items():
            lease = self.leases.get(task_id)
            if lease is None and self._adopt_lost_dispatch(task_id, attempt, node, now):
                continue
            if lease is None or lease.attempt != attempt:
                # The broker moved on (cancelled, finished, or running it elsewhere): stop it
                # there; a late result would be fenced out anyway.
                superseded.append([task_id, attempt])
                continue
            if lease.node == _ORPHAN:
                if not self._attach(lease, node, now):
                    superseded.append([task_id, attempt])  # given to another node
            elif previous is not None and lease.node == previous.peer:
                # It moves over from this node's previous connection. Another node's lease
                # is never taken over: only its holder may complete an attempt.
                self._move_lease(lease, previous, node)
                self._occupy(node, lease, now)
        # Sent after its READY, so behind what it listed: those it ran take the slots first.
        for lease in sorted(in_transit, key=lambda lease: lease.waiting):
            if previous is not None:
                self._move_lease(lease, previous, node)
            self._occupy(node, lease, now)
        self.outbox.send(peer, Command.WELCOME, self.welcome)
        if superseded:
            self.outbox.send(peer, Command.CANCEL, superseded)
        if self._awaited_nodes:
            self._awaited_nodes.discard(ready.node_id)
            if not self._awaited_nodes:  # every node is back and has claimed what it holds
                self._dispatch_after = self._dispatch_floor
        log.info(
            "node %s joined from %s (pid %d): %d async and %d cpu slots, %d task names",
            ready.node_id,
            ready.hostname,
            ready.pid,
            ready.async_slots,
            ready.cpu_slots,
            len(ready.tasks),
        )

    def _move_lease(self, lease: Lease, previous: NodeState, node: NodeState) -> None:
        """A lease of a node's previous registration goes to its new one. Under a new node
        id the stored holder follows (after a restart, recovery gives a lease back to the
        node id it names)."""
        lease.node = node.peer
        if previous.node_id != node.node_id:
            record = self._leased_record(lease)
            if record is not None:
                record.node_id = node.node_id
                self.repo.lease(record)

    def _adopt_lost_dispatch(self, task_id: str, attempt: int, node: NodeState, now: float) -> bool:
        """A node holds the next attempt of a task that is queued: the broker dispatched it
        and was killed before the commit that recorded the dispatch (dispatches leave
        before the commit). The node is running (or ran) exactly that attempt: adopt it
        instead of running the task a second time."""
        record = self.repo.get(task_id)
        if record is None or record.status is not TaskStatus.PENDING:
            return False
        if attempt != record.attempt + 1 or record.name not in node.names_all:
            return False
        self._unqueue(record)
        kind = SlotKind.CPU if record.name in node.names[SlotKind.CPU] else SlotKind.ASYNC
        record.attempt = attempt
        record.status = TaskStatus.RUNNING
        record.node_id = node.node_id
        self._lease(record, kind, node, now)
        self.limits.started(record.name, now)
        self.counters["adopted_dispatches"] += 1
        return True

    def heartbeat_from(self, peer: bytes, body: object, now: float) -> None:
        """A heartbeat on a node's main socket, or (with a body naming the node) on its
        separate heartbeat socket, which keeps beating while the node's event loop is busy."""
        if body is not None:
            if not isinstance(body, dict) or not isinstance(body.get("node_id"), str):
                raise ProtocolError("HEARTBEAT body must be {node_id: str}")
            node = self.nodes.by_node_id(body["node_id"])
            if node is not None:
                node.last_seen_ms = now * 1000
                self.outbox.send(peer, Command.HEARTBEAT)  # tells the beater we are alive
            return
        if self.nodes.touch(peer, now * 1000) is None:
            # We do not know this node (we restarted, or dropped it): ask it to register.
            self.outbox.send(peer, Command.RECONNECT)

    def unregister_node(self, peer: bytes, now: float, *, lost: bool) -> None:
        node = self.nodes.remove(peer)
        if node is not None:
            self._release_node(node, now, lost=lost)

    def peer_unreachable(self, peer: bytes, now: float) -> None:
        """The transport says a peer is gone; if it was a node, its tasks go back."""
        node = self.nodes.remove(peer)
        if node is not None:
            log.warning("node %s disconnected", node.node_id)
            self._release_node(node, now, lost=True)

    def _store_nodes(self) -> None:
        """Keep the registered node ids: after a restart, dispatch waits for them."""
        self.repo.store_registered_nodes(sorted(node.node_id for node in self.nodes))

    def _release_node(self, node: NodeState, now: float, *, lost: bool) -> None:
        self._store_nodes()
        for task_id in list(node.leases):
            lease = self.leases.get(task_id)
            # An attempt waiting on the node for a slot never ran there: no loss to count.
            waited = lease is not None and lease.waiting
            self._requeue_lost(task_id, now, count_loss=lost and not waited)
        if not lost:
            log.info("node %s left", node.node_id)

    def _requeue_lost(self, task_id: str, now: float, *, count_loss: bool) -> None:
        """Put a task whose node is gone back at its old place in the queue."""
        lease = self.leases.get(task_id)
        record = None if lease is None else self._leased_record(lease)
        self._end_lease(task_id)
        if record is None:
            return
        self.repo.record_attempt(
            record, record.attempt_end("lost" if count_loss else "returned", finished_at=now)
        )
        if count_loss:
            record.worker_losses += 1
            if record.worker_losses >= self.config.max_worker_losses:
                error = ErrorInfo(
                    "WorkerLostError",
                    f"the node running this task was lost {record.worker_losses} times",
                    None,
                )
                self._finish(record, None, error, now)
                return
        record.status = TaskStatus.PENDING
        record.node_id = None
        self._enqueue(record)  # sets queued_at, saved next
        self.repo.save(record)
        self.counters["requeued"] += 1

    def purge_nodes(self, now: float) -> None:
        """Drop nodes that missed their liveness window; their tasks run again elsewhere."""
        for node in self.nodes.expired(now * 1000):
            log.warning(
                "node %s missed its heartbeats; re-queueing %d tasks",
                node.node_id,
                len(node.leases),
            )
            self._release_node(node, now, lost=True)

    def send_heartbeats(self, now: float) -> None:
        for node in self.nodes.due_for_heartbeat(now * 1000):
            self.outbox.send(node.peer, Command.HEARTBEAT)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> None:
        """Hand queued tasks to nodes with free slots, one per node per round (fair spread);
        then, on nodes whose cpu slots are all busy, one task per slot to run next (dispatched
        ahead, so that a worker process does not idle for a round trip between two tasks)."""
        queues = self.queues
        if not queues.size or now < self._dispatch_after:
            return
        nodes = self.nodes.with_credit()
        limits = self.limits
        limited = bool(limits)  # (asked once: Limits.__bool__ is a call, and no node joins here)
        held: set[str] = set()  # names whose best task may not wait on a node (this tick)
        for ahead in (False, True):
            if ahead and not (self.nodes.cpu_prefetch and queues.size):
                return
            current = nodes
            while current and queues.size:
                still: list[NodeState] = []
                for node in current:
                    took = False
                    for kind in KINDS:
                        names = node.names[kind]
                        if not names:
                            continue
                        if ahead:
                            if node.free[kind] or len(node.waiting[kind]) >= node.prefetch[kind]:
                                continue
                            if node.unreported and self._owes_reports(node, kind):
                                continue
                            if limited:
                                # A limited task never waits on a node: its limits count what
                                # runs, and when it would start is not known here.
                                names = tuple(n for n in names if n not in limits.names)
                            if held:
                                names = tuple(n for n in names if n not in held)
                        else:
                            if node.free[kind] <= 0:
                                continue
                            if limited:  # names at their fleet-wide limit wait, queued
                                names = tuple(n for n in names if limits.allows(n, now))
                        if names and queues.size:  # (a cpu slot after the last task)
                            picked = queues.pop_best(names)
                            if picked is None:
                                continue
                            if ahead and not self._may_wait(picked[2]):
                                queues.push(*picked)  # back at its place, for a free slot
                                held.add(picked[0])
                                took = True  # (the node may still take another name's)
                                continue
                            self._start_attempt(node, kind, picked[2], now)
                            took = True
                    if took:
                        still.append(node)
                current = still

    def _may_wait(self, order: int) -> bool:
        """May this queued task be sent ahead? Not with a deadline: it must start before
        it, and when a task sent ahead starts depends on the task before it."""
        task_id = self.repo.queued_task(order)
        record = None if task_id is None else self.repo.get(task_id)
        return record is None or record.deadline is None

    @staticmethod
    def _owes_reports(node: NodeState, kind: SlotKind) -> bool:
        """Attempts taken back from the node's slots (overdue, cancelled) are unreported: it
        may be stuck in them, so nothing is sent to wait behind them."""
        waiting = node.waiting[kind]
        return any(k is kind and key not in waiting for key, k in node.unreported.items())

    def _start_attempt(self, node: NodeState, kind: SlotKind, order: int, now: float) -> None:
        task_id = self.repo.take_queued(order)
        if task_id is None:
            log.error("queue entry %d is missing from the store", order)
            return
        record = self.repo.get(task_id)
        if record is None or record.status is not _PENDING:
            return  # finished meanwhile
        if record.deadline is not None and now >= record.deadline:
            self._expire(record, now, queued=False)  # its timer has not fired yet
            return
        record.attempt += 1
        record.status = _RUNNING
        record.node_id = node.node_id
        self._lease(record, kind, node, now)
        self.limits.started(record.name, now)
        for observer in self.observers:
            waited = time.time() - (record.queued_at or record.submitted_at)
            observer.started(record.name, max(0.0, waited), record.task_id)
        if self.watched:
            self._publish_to_watchers(record)
        self.outbox.tasks[node.peer].append(
            # Dispatch(...).to_wire(), without the NamedTuple in between.
            [task_id, record.attempt, record.name, record.payload, record.timeout_s]
        )

    # ------------------------------------------------------------------ results

    def complete(self, peer: bytes, outcomes: list[Outcome], now: float) -> None:
        """Record attempt outcomes; outcomes of attempts no longer current are ignored."""
        node = self.nodes.touch(peer, now * 1000)
        self.tick_items += len(outcomes)
        steps = False  # an outcome of a workflow step (only they change workflows here)
        for outcome in outcomes:
            lease = self.leases.get(outcome.task_id)
            if lease is None or lease.attempt != outcome.attempt:
                if node is not None and node.unreported:
                    kind = node.unreported.pop((outcome.task_id, outcome.attempt), None)
                    if kind is not None:  # a taken-back attempt ended after all: slot is free
                        self._slot_back(node, kind, outcome.task_id, outcome.attempt, now)
                self.counters["stale_results"] += 1
                log.debug("ignored a stale result for %s#%d", outcome.task_id, outcome.attempt)
                continue
            if lease.node != peer:
                # Only the holder of the lease may complete an attempt (an orphan recovered
                # after a restart is adopted through READY first). A node that reconnected
                # under a new routing id registers again and then re-sends its outcomes.
                self.counters["foreign_results"] += 1
                log.warning(
                    "refused a result for %s#%d from %s, which does not hold that attempt",
                    outcome.task_id,
                    outcome.attempt,
                    peer.hex(),
                )
                continue
            self._uncommitted_outcomes.append((peer, outcome))
            record = self._leased_record(lease)
            self._end_lease(outcome.task_id)
            if node is not None:
                node.leases.discard(outcome.task_id)
                self._slot_back(node, lease.kind, outcome.task_id, outcome.attempt, now)
                if outcome.error is None:
                    node.tasks_done += 1
                else:
                    node.tasks_failed += 1
            if record is None:
                continue
            if record.workflow_id is not None:
                steps = True
            record.started_at = outcome.started_at
            self.repo.record_attempt(
                record,
                record.attempt_end(
                    "success" if outcome.error is None else "failed",
                    started_at=outcome.started_at,
                    finished_at=outcome.finished_at,
                    error=None
                    if outcome.error is None
                    else f"{outcome.error.exc_type}: {outcome.error.message}",
                ),
            )
            if outcome.error is not None and record.retries < record.max_retries:
                due = now + backoff_s(record.retry_delay_s, record.retries + 1)
                if record.deadline is not None and due >= record.deadline:
                    self._expire(record, now, queued=False, after=outcome.error)
                else:
                    self._schedule_retry(record, outcome.error, now)
            else:
                self._finish(record, outcome.value, outcome.error, now, outcome.finished_at)
        if steps:
            self.workflows.flush()
        if node is None:
            self.outbox.send(peer, Command.RECONNECT)

    def note_progress(self, peer: bytes, reports: list[tuple[str, int, list[Any]]]) -> None:
        """Keep each running attempt's latest progress with its record (stored when it
        finishes) and push it to whoever watches the task; only the lease holder counts."""
        self.tick_items += len(reports)
        for task_id, attempt, progress in reports:
            lease = self.leases.get(task_id)
            if lease is None or lease.attempt != attempt or lease.node != peer:
                continue
            record = self._leased_record(lease)
            if record is None:
                continue
            record.progress = progress
            self._publish_to_watchers(record)

    def _publish_to_watchers(self, record: TaskRecord) -> None:
        """A change of a task that is not final: pushed only on its own topic, if watched."""
        topic = record.task_id.encode()
        if topic in self.watched:
            self.outbox.results[topic].append(record.public())

    def _schedule_retry(self, record: TaskRecord, error: ErrorInfo, now: float) -> None:
        record.retries += 1
        record.status = _RETRYING
        record.error = f"{error.exc_type}: {error.message}"
        record.traceback = error.traceback
        self._set_timer(record, now + backoff_s(record.retry_delay_s, record.retries))
        record.node_id = None
        self.repo.save(record)
        self.counters["retried"] += 1
        if self.watched:
            self._publish_to_watchers(record)
        for observer in self.observers:
            observer.retried(record.name, record.task_id)
        log.warning(
            "task %s (%s) failed with %s; retry %d of %d in %.1fs",
            record.task_id,
            record.name,
            error.exc_type,
            record.retries,
            record.max_retries,
            (record.retry_at or now) - now,
        )

    def _finish(
        self,
        record: TaskRecord,
        value: bytes | None,
        error: ErrorInfo | None,
        now: float,
        finished_at: float | None = None,
        status: TaskStatus | None = None,
    ) -> None:
        """Give a record its final status: SUCCESS or FAILED by ``error``, or ``status``."""
        record.finished_at = finished_at or now
        record.retry_at = None
        record.eta = None
        record.node_id = None
        self.finished_per_second.add(now)
        if error is None:
            record.status = _SUCCESS
            record.result = value
            record.error = record.traceback = None
            self.counters["succeeded"] += 1
        else:
            record.status = status or _FAILED
            record.error = f"{error.exc_type}: {error.message}"
            record.traceback = error.traceback
            self.counters[record.status.value] += 1
            if record.status is _FAILED:
                log.warning("task %s (%s) failed: %s", record.task_id, record.name, record.error)
        expires_ms = int((now + self.config.result_ttl_s) * 1000)
        record.expires_at = expires_ms / 1000
        self.repo.finish(record, expires_ms)
        if self.observers:
            run_s = None
            if record.started_at is not None and finished_at is not None:
                run_s = max(0.0, finished_at - record.started_at)
            for observer in self.observers:
                observer.finished(record.name, record.status, run_s, record.task_id)
        self.publish_result(record)
        if record.workflow_id is not None:
            self.workflows.finished(
                record,
                release=lambda waiting: self._release(waiting, now),
                fail=lambda waiting, why: self._finish(waiting, None, why, now),
            )

    def _release(self, record: TaskRecord, now: float) -> None:
        """A workflow step whose inputs are ready: queue it (or schedule it until its eta)."""
        record.order = self._take_order()
        if record.eta is not None and record.eta > now:
            record.status = TaskStatus.SCHEDULED
            self._wake_at(record.task_id, record.eta)
        else:
            record.status = TaskStatus.PENDING
            record.eta = None
            record.queued_at = time.time()
            self.repo.enqueue(record)
            # Dispatched only once the commit that released it is done: dispatches leave
            # before a tick's commit, and a crash in between would record the releasing
            # result again after the restart and run the step a second time.
            self._held.append((self._ticks, record))
        self.repo.save(record)

    @property
    def holds_released(self) -> bool:
        """Workflow steps released and waiting for their commit before they dispatch."""
        return bool(self._held)

    def _queue_held(self) -> None:
        """Queue the steps released before the last tick (its commit has happened since)."""
        ready = [record for ticks, record in self._held if ticks < self._ticks]
        if ready:
            self._held = [(ticks, record) for ticks, record in self._held if ticks >= self._ticks]
            for record in ready:
                self.queues.push(record.name, record.priority, record.order)

    def submit_workflow(self, declared: object, now: float) -> dict[str, Any]:
        """Store a chain, group or chord (its first step queued); idempotent by its id."""
        workflow_id, kind, steps = validate_workflow(declared)

        def add(record: TaskRecord) -> None:
            self._add(record, now)
            self.counters["submitted"] += 1

        def new_record(sub: Submission) -> TaskRecord:
            return TaskRecord.from_submission(sub, self._take_order())

        return self.workflows.create(workflow_id, kind, steps, add, new_record)

    # ------------------------------------------------------------------ time

    def fire_timers(self, now: float) -> None:
        now_ms = int(now * 1000)
        for due_ms, task_id in self.timers.pop_due(now_ms):
            self.repo.clear_timer(due_ms, task_id)
            if task_id in self.leases:
                continue  # running: it started in time (its stored record says pending)
            record = self.repo.get(task_id)
            if record is None or record.status not in _WAITING:
                continue  # a timer of a task that moved on (started, finished, cancelled)
            # Timers are kept in whole milliseconds: compare in those.
            if record.deadline is not None and now_ms >= int(record.deadline * 1000):
                self._expire(record, now, queued=record.status is _PENDING)
                continue
            if record.status is _PENDING:
                continue  # a deadline timer of a queued task that is not due yet
            due_at = record.retry_at if record.status is _RETRYING else record.eta
            if due_at is not None and now_ms < int(due_at * 1000):
                continue  # this was its deadline timer; its own is still to come
            record.status = _PENDING
            record.retry_at = record.eta = None
            record.order = self._take_order()
            self._enqueue(record)  # sets queued_at, saved next
            self.repo.save(record)

    def fire_schedules(self, now: float) -> None:
        """Create the tasks of the schedule slots that are due (with the schedules' next
        slots, in this tick's commit)."""

        def start(record: TaskRecord) -> None:
            self._add(record, now)
            self.counters["scheduled_runs"] += 1
            for observer in self.observers:
                observer.submitted(record.name, record.task_id)

        self.schedules.fire(now, start, self._take_order)

    def _expire(
        self, record: TaskRecord, now: float, *, queued: bool, after: ErrorInfo | None = None
    ) -> None:
        """End a task that did not start before its deadline (it never runs again)."""
        if queued:
            self._unqueue(record)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.deadline or now))
        message = f"the task did not start before its deadline ({when})"
        if after is not None:
            message += f"; its last attempt failed with {after.exc_type}: {after.message}"
        self._finish(record, None, ErrorInfo("TaskExpired", message, None), now, status=EXPIRED)

    def _unqueue(self, record: TaskRecord) -> None:
        self.queues.discard(record.name, record.priority, record.order)
        self.repo.take_queued(record.order)

    def cancel(self, task_id: str, now: float) -> bool:
        """Stop a task before it finishes; False if it is finished or unknown.

        Queued, scheduled and retrying tasks never run; a running attempt is cancelled on
        its node (its slot stays busy until the node reports it). The task ends CANCELLED,
        durably, in this tick's commit; a late result of the attempt is fenced out.
        """
        lease = self.leases.get(task_id)
        if lease is not None:
            record = self._leased_record(lease)
            self._end_lease(task_id)
            node = self.nodes.get(lease.node)
            if node is not None:
                node.leases.discard(task_id)
                node.unreported[(task_id, lease.attempt)] = lease.kind
                self.outbox.send(node.peer, Command.CANCEL, [[task_id, lease.attempt]])
            if record is None:
                return False
            self.repo.record_attempt(record, record.attempt_end("cancelled", finished_at=now))
        else:
            record = self.repo.get(task_id)
            if record is None or record.status.is_final:
                return False
            if record.status is TaskStatus.PENDING:
                self._unqueue(record)
            # A scheduled or retrying task's timer finds it final and does nothing.
        error = ErrorInfo("TaskCancelled", "the task was cancelled", None)
        self._finish(record, None, error, now, status=TaskStatus.CANCELLED)
        self.workflows.flush()
        log.info("task %s (%s) cancelled", task_id, record.name)
        return True

    def expire_results(self, now: float) -> None:
        """Forget finished tasks whose result TTL has passed."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.config.expiry_sweep_interval_s
        expired = self.repo.expire(int(now * 1000))
        if expired:
            log.info("expired %d results", expired)

    @property
    def tick_is_full(self) -> bool:
        """The current tick has taken on its share of work: defer further messages."""
        return self.tick_items >= TICK_ITEMS or self.tick_reply_bytes >= TICK_REPLY_BYTES

    @property
    def dispatches_only_accepted(self) -> bool:
        """The tick that ran last dispatched tasks, all of them first stored by that tick.

        A re-sent submit of a task that an earlier tick stored is acknowledged like a new
        one but does not count: that task's dispatch is not new with its acceptance."""
        tasks, accepted = self.outbox.tasks, self._tick_accepted
        if not tasks or not accepted:
            return False
        return all(item[0] in accepted for items in tasks.values() for item in items)

    def committed(self) -> None:
        """The tick's writes are durable (the server calls this after each good commit)."""
        self._uncommitted_outcomes.clear()

    def tick(self, now: float) -> None:
        """Time-driven work, then dispatch; called once per loop iteration."""
        self.tick_items = self.tick_reply_bytes = 0
        if self._accepting or self._tick_accepted:
            self._tick_accepted, self._accepting = self._accepting, set()
        if self._held:
            self._queue_held()
        if self._replay_outcomes and now >= self._replay_after:  # from a tick whose commit failed
            replay, self._replay_outcomes = self._replay_outcomes, []
            for peer, outcome in replay:
                self.complete(peer, [outcome], now)
        if now >= self._next_housekeeping:
            # A few times per heartbeat interval is precise enough and keeps the per-tick
            # cost independent of the number of nodes.
            self._next_housekeeping = now + self.config.heartbeat_interval_ms / 4000
            if self.enforce_liveness:
                self.purge_nodes(now)
            self.requeue_orphans(now)
            self.reclaim_overdue(now)
            self.send_heartbeats(now)
            self.expire_results(now)
        if self.timers:
            self.fire_timers(now)
        next_slot = self.schedules.next_due()
        if next_slot is not None and next_slot <= now:
            self.fire_schedules(now)
        if self.queues.size:  # (an empty queue, as after most results: no dispatch pass)
            self.dispatch(now)
        self.workflows.flush()
        if self._order_dirty:
            self._store_order()
        self.repo.end_tick()
        self._ticks += 1

    def seconds_until_due(self, now: float) -> float:
        """How long the loop may sleep before :meth:`tick` has work to do."""
        wait = self._next_housekeeping - now
        next_timer = self.timers.next_due_ms()
        if next_timer is not None:
            wait = min(wait, next_timer / 1000 - now)
        next_slot = self.schedules.next_due()
        if next_slot is not None:
            wait = min(wait, next_slot - now)
        if self._replay_outcomes:
            wait = min(wait, self._replay_after - now)
        if self._held:
            wait = 0.0  # the next tick queues them
        queued = self.queues.size
        if queued and now < self._dispatch_after:
            wait = min(wait, self._dispatch_after - now)
        if queued and self.limits:
            waiting = [n for n in self.limits.names if self.queues.has_work((n,))]
            opening = self.limits.next_opening(now, waiting)
            if opening is not None:
                wait = min(wait, opening - now)
        return max(wait, 0.0)
