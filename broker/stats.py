"""Per-task-name figures and the recent tasks, kept in memory by the broker (no store scans).

:class:`TaskStats` is a :class:`flowrra.broker.core.BrokerObserver`: the broker's loop calls
it on every task event. For each task name it counts what happened since the broker started
and keeps the run times of the last :data:`RUN_WINDOW` finished tasks, from which the
``task_stats`` admin verb computes percentiles; it also logs the last events (task id, name,
status), enough for the last :data:`RECENT_TASKS` tasks, which the ``task_list`` verb reads
newest first and filters (by name and status) before it reads the few records it returns.
Both are bounded, so memory does not grow with the number of tasks; both start empty when
the broker starts.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

from flowrra.protocol import TaskStatus

# Run times kept per task name for its percentiles.
RUN_WINDOW = 1000
# Task ids remembered for the task browser.
RECENT_TASKS = 10_000
# Events logged per remembered task (submitted, started, finished, and a retry or two).
EVENTS_PER_TASK = 4
_NAME_AND_STATUS = itemgetter(1, 2)
_RUN_S = itemgetter(3)


@dataclass(slots=True)
class NameStats:
    """What happened to the tasks of one name since the broker started."""

    submitted: int = 0
    started: int = 0
    retried: int = 0
    # By status value (a TaskStatus, a StrEnum, finds its entry too).
    finished: dict[str, int] = field(default_factory=dict)
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


# One task event: (task id, name, the value of the status it gave the task, run time in
# seconds of a finished attempt or None). PENDING is a submit, RUNNING a start, RETRYING a
# retry. The status is kept as its str value, not the enum member: a tuple of str, float
# and None is untracked by the garbage collector at its first collection, one holding an
# enum member never is, and the log keeps tens of thousands of events (each full
# collection would walk them all).
Event = tuple[str, str, str, float | None]
# Events are counted per name in blocks of this many, at C speed.
BLOCK = 1024
_PENDING = TaskStatus.PENDING._value_
_RUNNING = TaskStatus.RUNNING._value_
_RETRYING = TaskStatus.RETRYING._value_


class TaskStats:
    """The broker observer behind the ``task_stats`` and ``task_list`` admin verbs.

    It sits on the dispatch path (three calls per task), so an event costs one append to a
    log; the log is counted per name a block at a time, and the work of finding each task's
    latest status is left to the rare ``task_list`` query, which reads the log newest first.
    """

    def __init__(self, *, recent: int = RECENT_TASKS) -> None:
        self._names: dict[str, NameStats] = {}
        self._recent_limit = recent
        # The newest events, newest last; the first ``_counted`` of them are in ``_names``.
        self._events: list[Event] = []
        self._counted = 0
        # Older blocks of BLOCK events, all counted: enough for the last ``recent`` tasks at
        # EVENTS_PER_TASK events each.
        self._blocks: deque[list[Event]] = deque(maxlen=-(-recent * EVENTS_PER_TASK // BLOCK))
        # The newest event of each task the last scan of :meth:`recent` went past.
        self._scanned: dict[str, Event] = {}
        # Statuses fixed from records: task id -> (status, None for a record gone; the event
        # it corrects). Once the task has a newer event the fix no longer applies.
        self._fixed: dict[str, tuple[str | None, Event]] = {}

    def _for(self, name: str) -> NameStats:
        stats = self._names.get(name)
        if stats is None:
            stats = self._names[name] = NameStats()
        return stats

    def _count(self) -> None:
        """Add the events not yet counted to their names' figures."""
        events = self._events
        fresh = events[self._counted :]
        self._counted = len(events)
        counts = Counter(map(_NAME_AND_STATUS, fresh))
        names: set[str] = set()
        for (name, status), count in counts.items():
            names.add(name)
            stats = self._for(name)
            if status == _PENDING:
                stats.submitted += count
            elif status == _RUNNING:
                stats.started += count
            elif status == _RETRYING:
                stats.retried += count
            else:
                stats.finished[status] = stats.finished.get(status, 0) + count
        if len(names) == 1:  # the common case: the run times extend one window in C
            self._for(names.pop()).runs.extend(
                run_s for run_s in map(_RUN_S, fresh) if run_s is not None
            )
        else:
            for _, name, _, run_s in fresh:
                if run_s is not None:
                    self._for(name).runs.append(run_s)
        if len(events) >= BLOCK:
            self._blocks.append(events)
            self._events, self._counted = [], 0

    # ------------------------------------------------------------------ BrokerObserver

    def submitted(self, name: str, task_id: str) -> None:
        events = self._events
        events.append((task_id, name, _PENDING, None))
        if len(events) >= BLOCK:
            self._count()

    def started(self, name: str, queue_wait_s: float, task_id: str) -> None:
        events = self._events
        events.append((task_id, name, _RUNNING, None))
        if len(events) >= BLOCK:
            self._count()

    def retried(self, name: str, task_id: str) -> None:
        events = self._events
        events.append((task_id, name, _RETRYING, None))
        if len(events) >= BLOCK:
            self._count()

    def finished(self, name: str, status: TaskStatus, run_s: float | None, task_id: str) -> None:
        events = self._events
        events.append((task_id, name, status._value_, run_s))
        if len(events) >= BLOCK:
            self._count()

    # ------------------------------------------------------------------ queries

    def figures(self, name: str | None = None) -> dict[str, dict[str, object]]:
        """Figures per task name (of one name if ``name`` is given), by name."""
        self._count()
        if name is not None:
            stats = self._names.get(name)
            return {} if stats is None else {name: stats.figures()}
        return {n: s.figures() for n, s in sorted(self._names.items())}

    def recent(
        self, *, name: str | None = None, statuses: frozenset[TaskStatus] | None = None
    ) -> Iterator[str]:
        """Ids of the remembered tasks (the last ``recent`` to have an event), newest event
        first, whose name is ``name`` and whose last event gave them one of ``statuses``
        (None: any), or the status :meth:`correct` fixed since."""
        scanned = self._scanned = {}
        fixed = self._fixed
        for event in chain(reversed(self._events), *map(reversed, reversed(self._blocks))):
            task_id = event[0]
            if task_id in scanned:
                continue
            if len(scanned) >= self._recent_limit:
                return
            scanned[task_id] = event
            status: str | None = event[2]
            fix = fixed.get(task_id)
            if fix is not None and fix[1] is event:
                status = fix[0]
                if status is None:
                    continue  # its record is gone
            if name is not None and event[1] != name:
                continue
            if statuses is not None and status not in statuses:
                continue
            yield task_id

    def correct(self, task_id: str, status: TaskStatus | None) -> None:
        """Fix the status the last :meth:`recent` scan found for a task from its record
        (None: the record is gone); it keeps its place in the order, until its next event."""
        event = self._scanned.get(task_id)
        if event is None:
            return
        fixed = self._fixed
        fixed[task_id] = (None if status is None else status._value_, event)
        if len(fixed) > 2 * self._recent_limit:
            # A fix of a task the last scan did not reach has fallen out of the log.
            self._fixed = {t: fix for t, fix in fixed.items() if t in self._scanned}
