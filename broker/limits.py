"""Fleet-wide limits per task name: a strict sliding-window rate and a concurrency cap.

Pure logic with the time passed in. The broker asks :meth:`Limits.allows` before it starts a
run of a limited task; a task held back stays queued (it uses no retry and no node slot), and
the dispatcher takes other names' tasks meanwhile. The rate limit is strict: no more than
``count`` starts in *any* window of ``window_s`` seconds (the start times of the last
``count`` runs are kept), not a token bucket that lets a burst through on top of the rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from flowrra.protocol import TaskLimits

# A start is counted for its window plus this guard: the broker stamps a start with its
# tick's time, and a dispatch reaches its node a few milliseconds later, by a delay that
# varies; without the guard, runs five dispatches apart could *start* less than one window
# apart. 2 % of the window plus 20 ms keeps well over 90 % of the limit's throughput.
GUARD_FRACTION = 0.02
GUARD_S = 0.02


def counted_window_s(window_s: float) -> float:
    """How long a start counts against its rate limit."""
    return window_s * (1 + GUARD_FRACTION) + GUARD_S


class Limits:
    """The limits nodes announced, and the runs started and running under them."""

    def __init__(self) -> None:
        self._limits: dict[str, TaskLimits] = {}
        self._starts: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._limits)

    @property
    def names(self) -> Iterable[str]:
        return self._limits.keys()

    def update(self, limits: Mapping[str, TaskLimits]) -> None:
        """Limits announced by a node (the latest announcement of a name wins)."""
        for name, limit in limits.items():
            if limit.rate_count is None and limit.max_concurrency is None:
                self._limits.pop(name, None)
            else:
                self._limits[name] = limit

    def allows(self, name: str, now: float) -> bool:
        """May a run of ``name`` start now?"""
        limit = self._limits.get(name)
        if limit is None:
            return True
        if (
            limit.max_concurrency is not None
            and self._running.get(name, 0) >= limit.max_concurrency
        ):
            return False
        if limit.rate_count is not None and limit.rate_window_s is not None:
            starts = self._starts.get(name)
            if starts is not None:
                while starts and starts[0] <= now - counted_window_s(limit.rate_window_s):
                    starts.popleft()
                if len(starts) >= limit.rate_count:
                    return False
        return True

    def started(self, name: str, now: float) -> None:
        limit = self._limits.get(name)
        self._running[name] = self._running.get(name, 0) + 1
        if limit is not None and limit.rate_count is not None:
            self._starts.setdefault(name, deque(maxlen=limit.rate_count)).append(now)

    def ended(self, name: str) -> None:
        running = self._running.get(name, 0) - 1
        if running > 0:
            self._running[name] = running
        else:
            self._running.pop(name, None)

    def next_opening(self, now: float, names: Iterable[str]) -> float | None:
        """When the rate window of one of ``names`` next lets a run start (if it is full)."""
        soonest: float | None = None
        for name in names:
            limit = self._limits.get(name)
            starts = self._starts.get(name)
            if limit is None or limit.rate_window_s is None or not starts:
                continue
            if limit.rate_count is not None and len(starts) >= limit.rate_count:
                opening = starts[0] + counted_window_s(limit.rate_window_s)
                soonest = opening if soonest is None else min(soonest, opening)
        return soonest

    def reset_running(self) -> None:
        """Forget the running counts (the leases are being rebuilt from the store)."""
        self._running.clear()
