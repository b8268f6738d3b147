"""Retry backoff and the timer heap (times in milliseconds)."""

from __future__ import annotations

import pytest

from flowrra.broker.timers import MAX_BACKOFF_S, Timers, backoff_s


def test_backoff_doubles_from_the_retry_delay() -> None:
    assert [backoff_s(2, n) for n in range(1, 6)] == [2, 4, 8, 16, 32]
    assert backoff_s(0.5, 1) == 0.5
    assert backoff_s(0, 10) == 0


def test_backoff_is_capped() -> None:
    assert backoff_s(3600, 10) == MAX_BACKOFF_S
    assert backoff_s(1e300, 1) == MAX_BACKOFF_S
    assert backoff_s(float("inf"), 1) == MAX_BACKOFF_S
    assert backoff_s(1, 1000) == MAX_BACKOFF_S  # no float overflow for large retry numbers
    assert backoff_s(0, 1000) == 0.0
    assert all(backoff_s(1, n) <= MAX_BACKOFF_S for n in range(1, 200))


@pytest.mark.parametrize("retry_number", [0, -1])
def test_backoff_retry_numbers_start_at_one(retry_number: int) -> None:
    with pytest.raises(ValueError):
        backoff_s(2, retry_number)


def test_empty_timers() -> None:
    timers = Timers()
    assert len(timers) == 0 and not timers
    assert timers.next_due_ms() is None
    assert timers.pop_due(1e18) == []


def test_timers_pop_in_due_order_and_only_when_due() -> None:
    timers = Timers()
    timers.schedule(30_000, "c")
    timers.schedule(10_000, "a")
    timers.schedule(20_000, "b")
    timers.schedule(20_000, "b2")
    assert len(timers) == 4
    assert timers.next_due_ms() == 10_000

    assert timers.pop_due(9_999.5) == []
    assert timers.pop_due(10_000) == [(10_000, "a")]  # due exactly now counts
    assert timers.next_due_ms() == 20_000
    assert timers.pop_due(25_000) == [(20_000, "b"), (20_000, "b2")]
    assert len(timers) == 1
    assert timers.pop_due(29_000) == []
    assert timers.pop_due(100_000) == [(30_000, "c")]
    assert timers.next_due_ms() is None and len(timers) == 0


def test_pop_due_returns_everything_overdue_in_order() -> None:
    timers = Timers()
    for due, task_id in [(5, "e"), (1, "a"), (3, "c"), (2, "b"), (4, "d")]:
        timers.schedule(due, task_id)
    assert [t for _, t in timers.pop_due(4.5)] == ["a", "b", "c", "d"]
    assert timers.pop_due(4.5) == []
    assert timers.next_due_ms() == 5
