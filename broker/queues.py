"""Per-priority task queues: higher priority first, FIFO within one priority.

Each task name has its own heap, so a node takes the best task among the names it serves
without scanning tasks it cannot run. A heap entry is one int that sorts by priority, then by
queue order; the task ids themselves stay in the store, so a million queued tasks cost a
few tens of megabytes here. Pure logic, no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from flowrra.protocol import MAX_PRIORITY, MIN_PRIORITY

_ORDER_BITS = 48
_ORDER_MASK = (1 << _ORDER_BITS) - 1


def queue_key(priority: int, order: int) -> int:
    """One int that sorts by priority (highest first), then order (lowest first)."""
    return ((MAX_PRIORITY - priority) << _ORDER_BITS) | order


def split_key(key: int) -> tuple[int, int]:
    """The (priority, order) a :func:`queue_key` was made of."""
    return MAX_PRIORITY - (key >> _ORDER_BITS), key & _ORDER_MASK


class TaskQueues:
    """Queued tasks as (priority, order) per task name."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[int]] = {}
        # How many tasks are queued (what len() says; an attribute for the broker's tick,
        # which asks several times per pass and needs no call for it).
        self.size = 0
        self._by_priority: dict[int, int] = {}
        # Entries taken out of the middle of a heap (cancelled, expired): skipped when they
        # reach its top, so a removal costs O(1) instead of rebuilding the heap.
        self._discarded: set[int] = set()

    def __len__(self) -> int:
        return self.size

    def push(self, name: str, priority: int, order: int) -> None:
        """Queue a task; ``order`` breaks ties within a priority (lower runs first)."""
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY or not 0 <= order <= _ORDER_MASK:
            raise ValueError(f"priority {priority} or order {order} out of range")
        # (queue_key inline: one call less per task)
        key = ((MAX_PRIORITY - priority) << _ORDER_BITS) | order
        heapq.heappush(self._heaps.setdefault(name, []), key)
        self.size += 1
        self._by_priority[priority] = self._by_priority.get(priority, 0) + 1

    def discard(self, name: str, priority: int, order: int) -> bool:
        """Take out a task the caller knows is queued (it is skipped when it comes up)."""
        key = queue_key(priority, order)
        heap = self._heaps.get(name)
        if heap is None or key in self._discarded:
            return False
        self._discarded.add(key)
        self._count_out(priority)
        if heap[0] == key:
            self._skip_discarded(name, heap)
        return True

    def _count_out(self, priority: int) -> None:
        self.size -= 1
        remaining = self._by_priority[priority] - 1
        if remaining:
            self._by_priority[priority] = remaining
        else:
            del self._by_priority[priority]

    def _skip_discarded(self, name: str, heap: list[int]) -> None:
        discarded = self._discarded
        while heap and heap[0] in discarded:
            discarded.discard(heapq.heappop(heap))
        if not heap:
            del self._heaps[name]

    def pop_best(self, names: Iterable[str]) -> tuple[str, int, int] | None:
        """Remove and return ``(name, priority, order)`` of the best task among ``names``."""
        best_name: str | None = None
        best = -1
        heaps = self._heaps
        for name in names:
            heap = heaps.get(name)
            if heap and (best_name is None or heap[0] < best):
                best, best_name = heap[0], name
        if best_name is None:
            return None
        heap = heaps[best_name]
        heapq.heappop(heap)
        if self._discarded:
            self._skip_discarded(best_name, heap)
        elif not heap:
            del heaps[best_name]
        priority = MAX_PRIORITY - (best >> _ORDER_BITS)  # (split_key inline)
        self._count_out(priority)
        return best_name, priority, best & _ORDER_MASK

    def remove(self, priority: int | None = None) -> list[tuple[str, int, int]]:
        """Remove every queued task (of one priority, if given); returns what was removed."""
        removed: list[tuple[str, int, int]] = []
        for name in list(self._heaps):
            keep: list[int] = []
            for key in self._heaps[name]:
                if key in self._discarded:
                    continue
                entry_priority, order = split_key(key)
                if priority is None or entry_priority == priority:
                    removed.append((name, entry_priority, order))
                else:
                    keep.append(key)
            if keep:
                heapq.heapify(keep)
                self._heaps[name] = keep
            else:
                del self._heaps[name]
        self._discarded.clear()  # every discarded key was in a heap just rebuilt
        for _, entry_priority, _ in removed:
            self._count_out(entry_priority)
        return removed

    def has_work(self, names: Iterable[str]) -> bool:
        heaps = self._heaps
        return any(name in heaps for name in names)

    def depth_by_priority(self) -> dict[int, int]:
        """Queued tasks per priority (for status and metrics)."""
        return dict(self._by_priority)

    def depth_by_name(self) -> dict[str, int]:
        return {name: len(heap) for name, heap in self._heaps.items()}
