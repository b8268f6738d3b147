"""Per-task-name figures and the recent tasks, kept in memory by the broker (no store scans).

:class:`TaskStats` is a :class:`flowrra.broker.core.BrokerObserver`: the broker's loop calls
it on every task event. For each task name it counts what happened since the broker started
and keeps the run times of the last :data:`RUN_WINDOW` finished tasks, from which the
``task_stats`` admin verb computes percentiles; it also remembers the last
:data:`RECENT_TASKS` task ids that had an event, newest last, with the status that event gave
them, which the ``task_list`` verb filters (by name and status) before it reads the few records
it returns. Both are bounded, so memory does not grow with the number of tasks; both start
empty when the broker starts.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from flowrra.protocol import TaskStatus

# Run times kept per task name for its percentiles.
RUN_WINDOW = 1000
# Task ids remembered for the task browser.
RECENT_TASKS = 10_000


@dataclass(slots=True)
class NameStats:
    """What happened to the tasks of one name since the broker started."""

    submitted: int = 0
    started: int = 0
    retried: int = 0
    finished: dict[TaskStatus, int] = field(default_factory=dict)
    runs: deque[float] = field(default_factory=lambda: deque(maxlen=RUN_WINDOW))

    def figures(self) -> dict[str, object]:
        """The ``task_stats`` entry of this name (run times in seconds, None without any)."""
        done = sum(self.finished.values())
        failed = self.finished.get(TaskStatus.FAILED, 0)
        ordered = sorted(self.runs)
        return {
            "submitted": self.submitted,
            "started": self.started,
            "retried": self.retried,
            "finished": done,
            "succeeded": self.finished.get(TaskStatus.SUCCESS, 0),
            "failed": failed,
            "cancelled": self.finished.get(TaskStatus.CANCELLED, 0),
            "expired": self.finished.get(TaskStatus.EXPIRED, 0),
            "failure_rate": round(failed / done, 4) if done else None,
            "runs": len(ordered),
            "p50_s": percentile(ordered, 50),
            "p95_s": percentile(ordered, 95),
            "max_s": ordered[-1] if ordered else None,
        }


def percentile(ordered: list[float], pct: float) -> float | None:
    """The nearest-rank percentile of sorted values (None for no values)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class TaskStats:
    """The broker observer behind the ``task_stats`` and ``task_list`` admin verbs."""

    def __init__(self, *, recent: int = RECENT_TASKS) -> None:
        self._names: dict[str, NameStats] = {}
        # task id -> (name, status of its last event); the newest event last.
        self._recent: OrderedDict[str, tuple[str, TaskStatus]] = OrderedDict()
        self._recent_limit = recent

    def _for(self, name: str) -> NameStats:
        stats = self._names.get(name)
        if stats is None:
            stats = self._names[name] = NameStats()
        return stats

    def _seen(self, task_id: str, name: str, status: TaskStatus) -> None:
        recent = self._recent
        recent[task_id] = (name, status)
        recent.move_to_end(task_id)
        if len(recent) > self._recent_limit:
            recent.popitem(last=False)

    # ------------------------------------------------------------------ BrokerObserver

    def submitted(self, name: str, task_id: str) -> None:
        self._for(name).submitted += 1
        self._seen(task_id, name, TaskStatus.PENDING)

    def started(self, name: str, queue_wait_s: float, task_id: str) -> None:
        self._for(name).started += 1
        self._seen(task_id, name, TaskStatus.RUNNING)

    def retried(self, name: str, task_id: str) -> None:
        self._for(name).retried += 1
        self._seen(task_id, name, TaskStatus.RETRYING)

    def finished(self, name: str, status: TaskStatus, run_s: float | None, task_id: str) -> None:
        stats = self._for(name)
        stats.finished[status] = stats.finished.get(status, 0) + 1
        if run_s is not None:
            stats.runs.append(run_s)
        self._seen(task_id, name, status)

    # ------------------------------------------------------------------ queries

    def figures(self, name: str | None = None) -> dict[str, dict[str, object]]:
        """Figures per task name (of one name if ``name`` is given), by name."""
        if name is not None:
            stats = self._names.get(name)
            return {} if stats is None else {name: stats.figures()}
        return {n: s.figures() for n, s in sorted(self._names.items())}

    def recent(
        self, *, name: str | None = None, statuses: frozenset[TaskStatus] | None = None
    ) -> Iterator[str]:
        """Ids of the remembered tasks, newest event first, whose name is ``name`` and whose
        last event gave them one of ``statuses`` (None: any)."""
        for task_id, (task_name, status) in reversed(self._recent.items()):
            if name is not None and task_name != name:
                continue
            if statuses is not None and status not in statuses:
                continue
            yield task_id

    def correct(self, task_id: str, status: TaskStatus | None) -> None:
        """Fix a remembered status from the task's record (None: the record is gone); keeps
        the task's place in the order."""
        entry = self._recent.get(task_id)
        if entry is None:
            return
        if status is None:
            del self._recent[task_id]
        else:
            self._recent[task_id] = (entry[0], status)
