"""Operator commands the broker answers on its one socket: status, inspect, purge, dead letters.

Each verb is a function of the broker's state that returns a msgpack-able value; they are
cheap (no full scans except ``purge`` and ``dead_list``), so they never slow the task path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from broker.store import Table
from flowrra.errors import AdminError
from flowrra.protocol import SlotKind, TaskStatus

if TYPE_CHECKING:
    from broker.core import Broker


def status(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any]:
    """Nodes, queues, in-flight work, timers, dead letters and throughput."""
    nodes = []
    for node in broker.nodes:
        nodes.append(
            {
                "node_id": node.node_id,
                "hostname": node.hostname,
                "pid": node.pid,
                "async_used": node.slots[SlotKind.ASYNC] - node.free[SlotKind.ASYNC],
                "async_total": node.slots[SlotKind.ASYNC],
                "cpu_used": node.slots[SlotKind.CPU] - node.free[SlotKind.CPU],
                "cpu_total": node.slots[SlotKind.CPU],
                "tasks_done": node.tasks_done,
                "tasks_failed": node.tasks_failed,
                "last_heartbeat_age_s": round(max(0.0, now - node.last_seen_ms / 1000), 3),
                "tasks": sorted({*node.names[SlotKind.ASYNC], *node.names[SlotKind.CPU]}),
            }
        )
    return {
        "broker_id": broker.broker_id,
        "uptime_s": round(now - broker.started_at, 1),
        "nodes": nodes,
        "queued": len(broker.queues),
        "queued_by_priority": {
            str(p): n for p, n in sorted(broker.queues.depth_by_priority().items(), reverse=True)
        },
        "queued_by_name": broker.queues.depth_by_name(),
        "in_flight": len(broker.leases),
        "retry_timers": len(broker.timers),
        "dead_letters": broker.store.count(Table.DEAD),
        "results_stored": broker.store.count(Table.EXPIRY),
        "tasks_per_second_1m": round(broker.finished_per_second.rate(now), 3),
        "counters": dict(broker.counters),
    }


def inspect(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any] | None:
    """The whole record of one task (arguments stay msgpack bytes for the caller to decode)."""
    task_id = _task_id(args)
    record = broker.view(task_id)
    if record is None:
        return None
    full = record.public()
    full.update(
        {
            "priority": record.priority,
            "payload": record.payload,
            "max_retries": record.max_retries,
            "retry_delay": record.retry_delay_s,
            "timeout": record.timeout_s,
            "attempt": record.attempt,
            "node_id": record.node_id,
            "retry_at": record.retry_at,
            "worker_losses": record.worker_losses,
            "history": record.history,
            "expires_at": record.expires_at,
        }
    )
    return full


def tasks(broker: Broker, args: dict[str, Any], now: float) -> dict[str, list[str]]:
    """Task names the connected nodes serve, each with the nodes serving it."""
    served: dict[str, list[str]] = {}
    for node in broker.nodes:
        for kind in SlotKind:
            for name in node.names[kind]:
                served.setdefault(name, []).append(node.node_id)
    return {name: sorted(ids) for name, ids in sorted(served.items())}


def purge(broker: Broker, args: dict[str, Any], now: float) -> int:
    """Drop queued tasks (of one priority if ``priority`` is given); returns how many."""
    priority = args.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise AdminError("priority must be an integer")
    removed = broker.queues.remove(priority)
    for _name, _priority, order in removed:
        key = broker.queue_key(order)
        entry = broker.store.get(Table.QUEUE, key)
        broker.store.delete(Table.QUEUE, key)
        if entry is not None:
            broker.store.delete(Table.TASKS, msgpack.unpackb(entry)[0].encode())
    broker.counters["purged"] += len(removed)
    return len(removed)


def dead_list(broker: Broker, args: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Tasks that ended FAILED, newest first (up to ``limit``, default 100)."""
    limit = args.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise AdminError("limit must be a positive integer")
    records = []
    for key, _ in broker.store.scan(Table.DEAD):  # newest first: stop after ``limit``
        record = broker.load(key[8:].decode())
        if record is not None and record.status is TaskStatus.FAILED:
            records.append(record.public())
            if len(records) >= limit:
                break
    return records


def dead_retry(broker: Broker, args: dict[str, Any], now: float) -> str:
    """Queue a FAILED task again, with its retries reset; returns its id."""
    task_id = _task_id(args)
    if not broker.requeue_failed(task_id, now):
        raise AdminError(f"task {task_id} is not in the dead-letter list")
    return task_id


def _task_id(args: dict[str, Any]) -> str:
    task_id = args.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise AdminError("task_id is required")
    return task_id


VERBS: dict[str, Callable[[Broker, dict[str, Any], float], Any]] = {
    "status": status,
    "inspect": inspect,
    "tasks": tasks,
    "purge": purge,
    "dead_list": dead_list,
    "dead_retry": dead_retry,
}


def answer(broker: Broker, verb: str, args: dict[str, Any], now: float | None = None) -> Any:
    """Run one verb; raises AdminError, whose message goes back to the caller."""
    handler = VERBS.get(verb)
    if handler is None:
        raise AdminError(f"unknown admin verb {verb!r} (known: {', '.join(VERBS)})")
    return handler(broker, args, time.time() if now is None else now)
