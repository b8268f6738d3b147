"""Per-priority task queues: higher priority first, FIFO within one priority.

Each task name has its own heap, so a node takes the best task among the names it serves
without scanning tasks it cannot run. Entries hold only ``(-priority, order, task_id)``: task
bodies stay in the store. Pure logic, no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

QueueEntry = tuple[int, int, str]  # (-priority, order, task_id)


class TaskQueues:
    """Queued task ids, grouped by task name, ordered by priority then submission order."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[QueueEntry]] = {}
        self._size = 0
        self._by_priority: dict[int, int] = {}

    def __len__(self) -> int:
        return self._size

    def push(self, name: str, priority: int, order: int, task_id: str) -> None:
        """Queue a task; ``order`` breaks ties within a priority (lower runs first)."""
        heapq.heappush(self._heaps.setdefault(name, []), (-priority, order, task_id))
        self._size += 1
        self._by_priority[priority] = self._by_priority.get(priority, 0) + 1

    def pop_best(self, names: Iterable[str]) -> tuple[str, str] | None:
        """Remove and return ``(name, task_id)`` of the best task among ``names``."""
        best_name: str | None = None
        best: QueueEntry | None = None
        heaps = self._heaps
        for name in names:
            heap = heaps.get(name)
            if heap and (best is None or heap[0] < best):
                best, best_name = heap[0], name
        if best is None or best_name is None:
            return None
        heap = heaps[best_name]
        heapq.heappop(heap)
        if not heap:
            del heaps[best_name]
        self._size -= 1
        priority = -best[0]
        remaining = self._by_priority[priority] - 1
        if remaining:
            self._by_priority[priority] = remaining
        else:
            del self._by_priority[priority]
        return best_name, best[2]

    def has_work(self, names: Iterable[str]) -> bool:
        heaps = self._heaps
        return any(name in heaps for name in names)

    def depth_by_priority(self) -> dict[int, int]:
        """Queued tasks per priority (for status and metrics)."""
        return dict(self._by_priority)

    def depth_by_name(self) -> dict[str, int]:
        return {name: len(heap) for name, heap in self._heaps.items()}
