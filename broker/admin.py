"""Operator commands the broker answers on its one socket: status, inspect, purge, dead letters,
the recent tasks and per-name figures.

Each verb is a function of the broker's state that returns a msgpack-able value; they are
cheap (no full scans except ``purge`` and ``dead_list``; ``task_list`` and ``task_stats`` read
the bounded in-memory window of :mod:`flowrra.broker.stats`), so they never slow the task path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from flowrra.broker.queues import TaskQueues
from flowrra.broker.records import Attempt, TaskRecord
from flowrra.broker.registry import Lease, NodeState
from flowrra.broker.scheduling import Schedules
from flowrra.broker.stats import RUN_WINDOW, TaskStats
from flowrra.broker.timers import Timers
from flowrra.broker.workflows import Workflows
from flowrra.errors import AdminError
from flowrra.protocol import SlotKind, TaskStatus

# Most tasks one ``task_list`` reply carries.
TASK_LIST_MAX = 1000


class Rate(Protocol):
    def rate(self, now: float) -> float: ...


class Broker(Protocol):
    """What the operator commands read and do: the broker core provides it (admin never
    touches the store, its tables or its keys)."""

    @property
    def broker_id(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def nodes(self) -> Iterable[NodeState]: ...
    @property
    def queues(self) -> TaskQueues: ...
    @property
    def leases(self) -> Mapping[str, Lease]: ...
    @property
    def timers(self) -> Timers: ...
    @property
    def counters(self) -> Mapping[str, int]: ...
    @property
    def finished_per_second(self) -> Rate: ...
    @property
    def observers(self) -> Sequence[object]: ...

    def view(self, task_id: str) -> TaskRecord | None: ...
    def history(self, task_id: str) -> list[Attempt]: ...
    def dead_letters(self, limit: int) -> list[TaskRecord]: ...
    def purge(self, priority: int | None) -> int: ...
    def requeue_failed(self, task_id: str, now: float) -> bool: ...
    def cancel(self, task_id: str, now: float) -> bool: ...
    @property
    def schedules(self) -> Schedules: ...
    @property
    def workflows(self) -> Workflows: ...
    def submit_workflow(self, declared: object, now: float) -> dict[str, Any]: ...
    def stored_counts(self) -> dict[str, int]: ...


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
    stored = broker.stored_counts()
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
        "schedules": len(broker.schedules),
        "dead_letters": stored["dead_letters"],
        "results_stored": stored["results"],
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
            "history": [list(entry) for entry in broker.history(task_id)],
            "workflow": broker.workflows.links(record),
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
    return broker.purge(priority)


def dead_list(broker: Broker, args: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Tasks that ended FAILED, newest first (up to ``limit``, default 100)."""
    limit = args.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise AdminError("limit must be a positive integer")
    return [record.public() for record in broker.dead_letters(limit)]


def dead_retry(broker: Broker, args: dict[str, Any], now: float) -> str:
    """Queue a FAILED task again, with its retries reset; returns its id."""
    task_id = _task_id(args)
    if not broker.requeue_failed(task_id, now):
        raise AdminError(f"task {task_id} is not in the dead-letter list")
    stats = _stats(broker)
    if stats is not None:
        stats.correct(task_id, TaskStatus.PENDING)
    return task_id


def cancel(broker: Broker, args: dict[str, Any], now: float) -> bool:
    """Stop a task before it finishes; False if it had finished or is unknown."""
    return broker.cancel(_task_id(args), now)


def schedule_put(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any]:
    """Declare a schedule (idempotent); returns it as stored."""
    return broker.schedules.put(args.get("schedule"), now)


def schedule_remove(broker: Broker, args: dict[str, Any], now: float) -> bool:
    return broker.schedules.remove(_schedule_id(args))


def schedule_enable(broker: Broker, args: dict[str, Any], now: float) -> bool:
    enabled = args.get("enabled")
    if not isinstance(enabled, bool):
        raise AdminError("enabled must be true or false")
    return broker.schedules.set_enabled(_schedule_id(args), enabled, now)


def schedule_get(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any] | None:
    return broker.schedules.get(_schedule_id(args))


def schedule_list(broker: Broker, args: dict[str, Any], now: float) -> list[dict[str, Any]]:
    return list(broker.schedules)


def workflow_submit(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any]:
    """Store a chain, group or chord and queue its first step; returns it as stored."""
    return broker.submit_workflow(args.get("workflow"), now)


def workflow_get(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any] | None:
    return broker.workflows.get(_schedule_id(args))


def task_list(broker: Broker, args: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """The tasks with the latest events since the broker started (submitted, started, retried
    or finished; up to :data:`~flowrra.broker.stats.RECENT_TASKS` remembered), newest first:
    of task ``name`` if given, with ``status`` (one status or a list) if given, up to
    ``limit`` (default 50). Each is its record without the result and traceback, plus its
    attempt number, node, priority and workflow."""
    name = args.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise AdminError("name must be a task name")
    statuses = _statuses(args.get("status"))
    limit = _limit(args, 50, TASK_LIST_MAX)
    stats = _stats(broker)
    if stats is None:
        return []
    found: list[dict[str, Any]] = []
    # The remembered status is that of the task's last event; the record decides (a dead
    # letter queued again, a record expired). Fixed after the scan, which must not change it.
    corrections: list[tuple[str, TaskStatus | None]] = []
    for task_id in stats.recent(name=name, statuses=statuses):
        record = broker.view(task_id)
        if record is None or (statuses is not None and record.status not in statuses):
            corrections.append((task_id, None if record is None else record.status))
            continue
        summary = record.public()
        del summary["result"], summary["traceback"]
        summary.update(
            {
                "has_result": record.result is not None,
                "attempt": record.attempt,
                "node_id": record.node_id,
                "priority": record.priority,
                "workflow_id": record.workflow_id,
            }
        )
        found.append(summary)
        if len(found) >= limit:
            break
    for task_id, status in corrections:
        stats.correct(task_id, status)
    return found


def task_stats(broker: Broker, args: dict[str, Any], now: float) -> dict[str, Any]:
    """Per task name (of ``name`` only, if given), since the broker started: how many were
    submitted, started, retried and finished (by status), the failure rate (FAILED of the
    finished) and the p50, p95 and maximum run time of the last ``run_window`` finished."""
    name = args.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise AdminError("name must be a task name")
    stats = _stats(broker)
    return {
        "since": broker.started_at,
        "run_window": RUN_WINDOW,
        "tasks": {} if stats is None else stats.figures(name),
    }


def _stats(broker: Broker) -> TaskStats | None:
    """The broker's task statistics (the BrokerService adds them; a bare core has none)."""
    for observer in broker.observers:
        if isinstance(observer, TaskStats):
            return observer
    return None


def _statuses(value: object) -> frozenset[TaskStatus] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise AdminError("status must be a task status or a list of them")
    try:
        return frozenset(TaskStatus(name) for name in names)
    except ValueError:
        known = ", ".join(s.value for s in TaskStatus)
        raise AdminError(f"unknown task status in {value!r} (known: {known})") from None


def _limit(args: dict[str, Any], default: int, most: int) -> int:
    limit = args.get("limit", default)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= most:
        raise AdminError(f"limit must be an integer from 1 to {most}")
    return limit


def _schedule_id(args: dict[str, Any]) -> str:
    schedule_id = args.get("id")
    if not isinstance(schedule_id, str) or not schedule_id:
        raise AdminError("id is required")
    return schedule_id


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
    "task_list": task_list,
    "task_stats": task_stats,
    "dead_retry": dead_retry,
    "cancel": cancel,
    "schedule_put": schedule_put,
    "schedule_remove": schedule_remove,
    "schedule_enable": schedule_enable,
    "schedule_get": schedule_get,
    "schedule_list": schedule_list,
    "workflow_submit": workflow_submit,
    "workflow_get": workflow_get,
}


def answer(broker: Broker, verb: str, args: dict[str, Any], now: float | None = None) -> Any:
    """Run one verb; raises AdminError, whose message goes back to the caller."""
    handler = VERBS.get(verb)
    if handler is None:
        raise AdminError(f"unknown admin verb {verb!r} (known: {', '.join(VERBS)})")
    return handler(broker, args, time.time() if now is None else now)
