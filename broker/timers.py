"""Retry backoff and the broker's timer heap. Pure logic: the caller passes ``now``."""

from __future__ import annotations

import heapq


def backoff_s(retry_delay_s: float, retry_number: int) -> float:
    """Delay before retry ``retry_number`` (1-based): ``retry_delay * 2**(n-1)``."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    return retry_delay_s * 2.0 ** (retry_number - 1)


class Timers:
    """Task ids waiting for a due time (retries now; countdown/eta later use the same heap)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, due_at: float, task_id: str) -> None:
        heapq.heappush(self._heap, (due_at, task_id))

    def pop_due(self, now: float) -> list[str]:
        """Remove and return the ids whose time has come, in due order."""
        heap = self._heap
        due: list[str] = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[1])
        return due

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None
