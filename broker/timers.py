"""Retry backoff and the broker's timer heap. Pure logic: the caller passes ``now``."""

from __future__ import annotations

import heapq

# No retry waits longer than this, however large the delay or the retry number.
MAX_BACKOFF_S = 24 * 3600.0


def backoff_s(retry_delay_s: float, retry_number: int) -> float:
    """Delay before retry ``retry_number`` (1-based): ``retry_delay * 2**(n-1)``, capped."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    if retry_number > 64:  # 2**63 seconds is past any cap; avoid float overflow
        return MAX_BACKOFF_S if retry_delay_s > 0 else 0.0
    return min(retry_delay_s * 2.0 ** (retry_number - 1), MAX_BACKOFF_S)


class Timers:
    """Task ids waiting for a due time in milliseconds (retries now; countdown and eta later
    use the same heap)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, due_ms: int, task_id: str) -> None:
        heapq.heappush(self._heap, (due_ms, task_id))

    def pop_due(self, now_ms: float) -> list[tuple[int, str]]:
        """Remove and return ``(due_ms, task_id)`` of the timers that are due, in due order."""
        heap = self._heap
        due: list[tuple[int, str]] = []
        while heap and heap[0][0] <= now_ms:
            due.append(heapq.heappop(heap))
        return due

    def next_due_ms(self) -> int | None:
        return self._heap[0][0] if self._heap else None
