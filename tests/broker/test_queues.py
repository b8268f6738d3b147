"""TaskQueues: priority first, FIFO within a priority, best across names."""

from __future__ import annotations

import pytest

from flowrra.broker.queues import MAX_PRIORITY, MIN_PRIORITY, TaskQueues, queue_key, split_key


def drain(queues: TaskQueues, names: list[str]) -> list[int]:
    """Orders of the popped tasks, best first."""
    out = []
    while (picked := queues.pop_best(names)) is not None:
        out.append(picked[2])
    return out


def test_empty_queues() -> None:
    queues = TaskQueues()
    assert len(queues) == 0
    assert queues.pop_best(["a"]) is None
    assert queues.pop_best([]) is None
    assert not queues.has_work(["a"])
    assert queues.depth_by_priority() == {} and queues.depth_by_name() == {}


def test_higher_priority_first_then_fifo() -> None:
    queues = TaskQueues()
    queues.push("a", 0, 1)
    queues.push("a", 5, 2)
    queues.push("a", 0, 3)
    queues.push("a", 5, 4)
    queues.push("a", -3, 5)
    queues.push("a", 10, 6)
    assert drain(queues, ["a"]) == [6, 2, 4, 1, 3, 5]
    assert len(queues) == 0


def test_pop_best_returns_name_priority_and_order() -> None:
    queues = TaskQueues()
    queues.push("a", -7, 42)
    assert queues.pop_best(["a"]) == ("a", -7, 42)


def test_order_not_push_sequence_decides_fifo() -> None:
    # A requeued task keeps its old order, so it goes back to the head.
    queues = TaskQueues()
    queues.push("a", 0, 2)
    queues.push("a", 0, 3)
    queues.push("a", 0, 1)
    assert drain(queues, ["a"]) == [1, 2, 3]


def test_extreme_priorities_and_orders() -> None:
    queues = TaskQueues()
    big_order = (1 << 48) - 1
    queues.push("a", MIN_PRIORITY, 1)
    queues.push("a", MAX_PRIORITY, big_order)
    queues.push("a", MAX_PRIORITY, 0)
    queues.push("a", 0, big_order)
    queues.push("a", MIN_PRIORITY, 0)
    popped = []
    while (picked := queues.pop_best(["a"])) is not None:
        popped.append(picked[1:])
    assert popped == [
        (MAX_PRIORITY, 0),
        (MAX_PRIORITY, big_order),
        (0, big_order),
        (MIN_PRIORITY, 0),
        (MIN_PRIORITY, 1),
    ]


@pytest.mark.parametrize(
    ("priority", "order"),
    [(MAX_PRIORITY + 1, 1), (MIN_PRIORITY - 1, 1), (0, -1), (0, 1 << 48)],
)
def test_push_rejects_out_of_range_values(priority: int, order: int) -> None:
    queues = TaskQueues()
    with pytest.raises(ValueError):
        queues.push("a", priority, order)
    assert len(queues) == 0


def test_queue_key_round_trips_and_sorts() -> None:
    samples = [(p, o) for p in (MIN_PRIORITY, -1, 0, 1, MAX_PRIORITY) for o in (0, 1, 2**40)]
    for priority, order in samples:
        assert split_key(queue_key(priority, order)) == (priority, order)
    by_key = sorted(samples, key=lambda s: queue_key(*s))
    assert by_key == sorted(samples, key=lambda s: (-s[0], s[1]))


def test_pop_best_picks_the_global_best_across_names() -> None:
    queues = TaskQueues()
    queues.push("a", 0, 1)
    queues.push("b", 3, 2)
    queues.push("c", 3, 3)  # same priority as b's, later
    queues.push("c", 9, 4)
    queues.push("a", 3, 5)
    assert queues.pop_best(["a", "b", "c"]) == ("c", 9, 4)
    assert queues.pop_best(["c", "a", "b"]) == ("b", 3, 2)  # name order does not matter
    assert queues.pop_best(["a", "b", "c"]) == ("c", 3, 3)
    assert queues.pop_best(["a", "b", "c"]) == ("a", 3, 5)
    assert queues.pop_best(["a", "b", "c"]) == ("a", 0, 1)
    assert queues.pop_best(["a", "b", "c"]) is None


def test_pop_best_only_looks_at_the_given_names() -> None:
    queues = TaskQueues()
    queues.push("a", 0, 1)
    queues.push("b", 100, 2)
    assert queues.pop_best(["a", "missing"]) == ("a", 0, 1)
    assert queues.pop_best(["a"]) is None
    assert queues.pop_best(["b"]) == ("b", 100, 2)


def test_has_work() -> None:
    queues = TaskQueues()
    queues.push("a", 0, 1)
    assert queues.has_work(["a"])
    assert queues.has_work(["x", "a"])
    assert not queues.has_work(["b"])
    assert not queues.has_work([])
    queues.pop_best(["a"])
    assert not queues.has_work(["a"])  # an emptied name is forgotten


def test_depth_counters() -> None:
    queues = TaskQueues()
    queues.push("a", 0, 1)
    queues.push("a", 0, 2)
    queues.push("a", 5, 3)
    queues.push("b", 5, 4)
    assert len(queues) == 4
    assert queues.depth_by_priority() == {0: 2, 5: 2}
    assert queues.depth_by_name() == {"a": 3, "b": 1}

    assert queues.pop_best(["a", "b"]) == ("a", 5, 3)
    assert queues.depth_by_priority() == {0: 2, 5: 1}
    assert queues.pop_best(["b"]) == ("b", 5, 4)
    assert queues.depth_by_priority() == {0: 2}  # a priority with no tasks disappears
    assert queues.depth_by_name() == {"a": 2}
    assert len(queues) == 2

    drain(queues, ["a"])
    assert len(queues) == 0
    assert queues.depth_by_priority() == {} and queues.depth_by_name() == {}


def test_depth_views_are_copies() -> None:
    queues = TaskQueues()
    queues.push("a", 1, 1)
    queues.depth_by_priority()[1] = 99
    assert queues.depth_by_priority() == {1: 1}
