"""NodeRegistry: liveness with an injected clock, heartbeats due, credit."""

from __future__ import annotations

from typing import Any

from flowrra.broker.registry import NodeRegistry
from flowrra.protocol import NodeReady, SlotKind

INTERVAL = 1000
LIVENESS = 3
EXPIRY = INTERVAL * LIVENESS


def ready(node_id: str = "n1", **overrides: Any) -> NodeReady:
    fields: dict[str, Any] = {
        "node_id": node_id,
        "hostname": "host",
        "pid": 1,
        "async_slots": 2,
        "cpu_slots": 1,
        "tasks": {"io": SlotKind.ASYNC, "io2": SlotKind.ASYNC, "crunch": SlotKind.CPU},
        "running": [],
    }
    fields.update(overrides)
    return NodeReady(**fields)


def registry() -> NodeRegistry:
    return NodeRegistry(INTERVAL, LIVENESS)


def check_every(reg: NodeRegistry, start: float, end: float, step: float = 250) -> list[bytes]:
    """Call ``expired`` at a steady pace (as the broker loop does); peers that expired."""
    dead: list[bytes] = []
    now = start
    while now <= end:
        dead.extend(n.peer for n in reg.expired(now))
        now += step
    return dead


# --------------------------------------------------------------------------- membership


def test_add_get_remove() -> None:
    reg = registry()
    node = reg.add(b"p1", ready(), 100.0)
    assert len(reg) == 1 and list(reg) == [node]
    assert reg.get(b"p1") is node and reg.get(b"p2") is None
    assert reg.by_node_id("n1") is node and reg.by_node_id("n2") is None
    assert node.slots == {SlotKind.ASYNC: 2, SlotKind.CPU: 1}
    assert node.free == node.slots and node.free is not node.slots
    assert node.names == {SlotKind.ASYNC: ("io", "io2"), SlotKind.CPU: ("crunch",)}
    assert node.last_seen_ms == node.last_sent_ms == node.joined_ms == 100.0
    assert reg.remove(b"p1") is node
    assert reg.remove(b"p1") is None
    assert len(reg) == 0


def test_touch_unknown_peer() -> None:
    assert registry().touch(b"nobody", 5.0) is None


# --------------------------------------------------------------------------- expiry


def test_node_expires_after_interval_times_liveness_not_before() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    assert check_every(reg, 0.0, EXPIRY) == []  # exactly at the window: still alive
    assert len(reg) == 1
    assert [n.peer for n in reg.expired(EXPIRY + 1)] == [b"p1"]
    assert len(reg) == 0 and reg.get(b"p1") is None
    assert reg.expired(EXPIRY + 2) == []  # reported once


def test_touch_refreshes_liveness() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    reg.add(b"p2", ready("n2"), 0.0)
    assert check_every(reg, 0.0, 2500) == []
    reg.touch(b"p1", 2500.0)
    dead = check_every(reg, 2750.0, 5500.0)
    assert dead == [b"p2"]  # p2 died at 3001+; p1 was touched at 2500
    assert reg.get(b"p1") is not None
    assert check_every(reg, 5750.0, 5750.0) == [b"p1"]  # 5750 - 2500 > 3000


def test_only_silent_nodes_expire() -> None:
    reg = registry()
    reg.add(b"quiet", ready("q"), 0.0)
    reg.add(b"chatty", ready("c"), 0.0)
    now, dead = 0.0, []
    while now <= 10_000:
        reg.touch(b"chatty", now)
        dead += [n.peer for n in reg.expired(now)]
        now += 500
    assert dead == [b"quiet"]
    assert reg.get(b"chatty") is not None


def test_a_broker_stall_restarts_the_clocks_instead_of_expiring() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    assert reg.expired(0.0) == []
    # The broker did not check for 10 s (more than half a window): nobody is declared dead.
    assert reg.expired(10_000.0) == []
    node = reg.get(b"p1")
    assert node is not None and node.last_seen_ms == 10_000.0
    # From the stall on, the normal rule applies again.
    assert check_every(reg, 10_250.0, 13_000.0) == []
    assert [n.peer for n in reg.expired(13_001.0)] == [b"p1"]


def test_gap_of_half_a_window_is_not_a_stall() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    reg.expired(2000.0)
    assert [n.peer for n in reg.expired(2000.0 + EXPIRY / 2)] == [b"p1"]  # 3500 > 3000


def test_the_first_check_has_no_stall_baseline() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    assert [n.peer for n in reg.expired(50_000.0)] == [b"p1"]


def test_stall_never_moves_a_clock_backwards() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    reg.expired(0.0)
    reg.touch(b"p1", 20_000.0)  # (a clock ahead of the check)
    reg.expired(10_000.0)
    node = reg.get(b"p1")
    assert node is not None and node.last_seen_ms == 20_000.0


# --------------------------------------------------------------------------- heartbeats


def test_due_for_heartbeat() -> None:
    reg = registry()
    reg.add(b"p1", ready(), 0.0)
    reg.add(b"p2", ready("n2"), 500.0)
    assert reg.due_for_heartbeat(999.0) == []
    assert [n.peer for n in reg.due_for_heartbeat(1000.0)] == [b"p1"]
    assert reg.due_for_heartbeat(1200.0) == []  # p1's send clock restarted at 1000
    assert [n.peer for n in reg.due_for_heartbeat(1500.0)] == [b"p2"]
    assert sorted(n.peer for n in reg.due_for_heartbeat(2500.0)) == [b"p1", b"p2"]
    node = reg.get(b"p1")
    assert node is not None and node.last_sent_ms == 2500.0


# --------------------------------------------------------------------------- credit


def test_credit() -> None:
    reg = registry()
    node = reg.add(b"p1", ready(), 0.0)
    assert node.has_credit()
    assert reg.with_credit() == [node]

    node.free[SlotKind.ASYNC] = 0
    assert node.has_credit()  # a cpu slot is still free
    node.free[SlotKind.CPU] = 0
    assert not node.has_credit()
    assert reg.with_credit() == []

    node.free[SlotKind.CPU] = 1
    assert reg.with_credit() == [node]


def test_free_slots_without_task_names_are_no_credit() -> None:
    reg = registry()
    cpu_only = reg.add(b"p1", ready(tasks={"crunch": SlotKind.CPU}, cpu_slots=0), 0.0)
    assert cpu_only.free[SlotKind.ASYNC] == 2
    assert not cpu_only.has_credit()  # async slots, but no async task to run
    idle = reg.add(b"p2", ready("n2", tasks={}), 0.0)
    assert not idle.has_credit()
    serving = reg.add(b"p3", ready("n3"), 0.0)
    assert reg.with_credit() == [serving]
