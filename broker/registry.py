"""The broker's view of connected nodes: capacity, credit, leases and liveness.

Pure logic with an injected clock (times in milliseconds), so heartbeat expiry is tested
without sleeping.

Credit per slot kind: ``free`` counts the slots with nothing running, and ``waiting`` the
attempts dispatched ahead to run next (at most ``prefetch`` of them, cpu slots only), which the
node queues for its worker processes in the order they arrive.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from flowrra.broker.records import TaskRecord
from flowrra.protocol import NodeReady, SlotKind

KINDS = (SlotKind.ASYNC, SlotKind.CPU)  # iterating the enum itself is slower, per dispatch


@dataclass(slots=True)
class Lease:
    """One task attempt held by a node.

    While a lease exists the task is running; the stored record is not rewritten at dispatch
    (the durable ``leases`` table has the attempt number), so ``record`` caches it here.
    """

    task_id: str
    attempt: int
    kind: SlotKind
    node: bytes  # routing id of the node holding it
    record: TaskRecord | None = None
    name: str = ""  # the task's name (for its fleet-wide limits)
    # For an orphan recovered from the store: the node the attempt was given to. Only it may
    # adopt the attempt (after a lost tick the same attempt number may have gone elsewhere).
    owner: str = ""
    # Dispatched ahead: waits on its node for a worker, so its timeout has not started.
    waiting: bool = False
    # When the attempt counts as overdue (timeout + grace from its start); None: never.
    deadline: float | None = None


@dataclass(slots=True)
class NodeState:
    """A connected node as the broker tracks it."""

    peer: bytes
    node_id: str
    hostname: str
    pid: int
    slots: dict[SlotKind, int]
    free: dict[SlotKind, int]
    names: dict[SlotKind, tuple[str, ...]]  # task names served, per slot kind
    # Attempts that may wait on the node for a slot of each kind (dispatched ahead).
    prefetch: dict[SlotKind, int]
    last_seen_ms: float
    last_sent_ms: float
    joined_ms: float
    leases: set[str] = field(default_factory=set)  # task ids
    # Attempts taken back from this node (overdue or cancelled), (task id, attempt) -> slot
    # kind: their slots stay busy (the node may still be running them) until it reports them.
    unreported: dict[tuple[str, int], SlotKind] = field(default_factory=dict)
    tasks_done: int = 0
    tasks_failed: int = 0
    paused: bool = False  # draining for shutdown: finishes what it holds, takes nothing new
    # Attempts dispatched ahead, (task id, attempt), oldest first, per kind: current ones and
    # ones taken back but not yet reported. They hold no slot; the oldest current one takes
    # the next slot that frees (the node runs them in the order they arrived).
    waiting: dict[SlotKind, dict[tuple[str, int], None]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )

    @property
    def names_all(self) -> frozenset[str]:
        """Every task name it serves, of either kind."""
        return frozenset((*self.names[SlotKind.ASYNC], *self.names[SlotKind.CPU]))

    def has_credit(self) -> bool:
        """It may be sent more attempts of a kind it serves: its credit of that kind (free
        slots, then places ahead: free + prefetch - waiting) is not zero."""
        if self.paused:
            return False
        # (a loop, not any() over a generator: asked of every node at each dispatch pass)
        free, prefetch, waiting, names = self.free, self.prefetch, self.waiting, self.names
        for kind in KINDS:
            if free[kind] + prefetch[kind] != len(waiting[kind]) and names[kind]:
                return True
        return False


class NodeRegistry:
    """Nodes by routing id, with liveness expiry."""

    def __init__(self, heartbeat_interval_ms: int, liveness: int, cpu_prefetch: int = 0) -> None:
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.cpu_prefetch = cpu_prefetch  # attempts dispatched ahead per cpu slot
        self.expiry_ms = heartbeat_interval_ms * liveness
        self._nodes: dict[bytes, NodeState] = {}
        self._by_node_id: dict[str, NodeState] = {}
        self._last_check_ms: float | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[NodeState]:
        return iter(self._nodes.values())

    def get(self, peer: bytes) -> NodeState | None:
        return self._nodes.get(peer)

    def by_node_id(self, node_id: str) -> NodeState | None:
        return self._by_node_id.get(node_id)

    def add(self, peer: bytes, ready: NodeReady, now_ms: float) -> NodeState:
        slots = {SlotKind.ASYNC: ready.async_slots, SlotKind.CPU: ready.cpu_slots}
        names = {
            kind: tuple(sorted(n for n, k in ready.tasks.items() if k is kind)) for kind in KINDS
        }
        node = NodeState(
            peer=peer,
            node_id=ready.node_id,
            hostname=ready.hostname,
            pid=ready.pid,
            slots=slots,
            free=dict(slots),
            names=names,
            prefetch={SlotKind.ASYNC: 0, SlotKind.CPU: ready.cpu_slots * self.cpu_prefetch},
            last_seen_ms=now_ms,
            last_sent_ms=now_ms,
            joined_ms=now_ms,
        )
        self._nodes[peer] = node
        self._by_node_id[node.node_id] = node
        return node

    def remove(self, peer: bytes) -> NodeState | None:
        node = self._nodes.pop(peer, None)
        if node is not None and self._by_node_id.get(node.node_id) is node:
            del self._by_node_id[node.node_id]
        return node

    def touch(self, peer: bytes, now_ms: float) -> NodeState | None:
        node = self._nodes.get(peer)
        if node is not None:
            node.last_seen_ms = now_ms
        return node

    def expired(self, now_ms: float) -> list[NodeState]:
        """Nodes silent for longer than the liveness window (removed from the registry).

        If the broker itself was stalled for most of a window (a long GC pause, a slow disk),
        silence proves nothing about the nodes, so their clocks restart instead.
        """
        last = self._last_check_ms
        self._last_check_ms = now_ms
        if last is not None and now_ms - last > self.expiry_ms / 2:
            for node in self._nodes.values():
                node.last_seen_ms = max(node.last_seen_ms, now_ms)
            return []
        dead = [n for n in self._nodes.values() if now_ms - n.last_seen_ms > self.expiry_ms]
        for node in dead:
            self.remove(node.peer)
        return dead

    def due_for_heartbeat(self, now_ms: float) -> list[NodeState]:
        """Nodes the broker has not sent a heartbeat to for a heartbeat interval."""
        due = [
            n for n in self._nodes.values() if now_ms - n.last_sent_ms >= self.heartbeat_interval_ms
        ]
        for node in due:
            node.last_sent_ms = now_ms
        return due

    def with_credit(self) -> list[NodeState]:
        out = []  # (a loop, not a comprehension: one frame less per dispatch pass)
        for node in self._nodes.values():
            if node.has_credit():
                out.append(node)
        return out
