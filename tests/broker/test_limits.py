"""Fleet-wide rate and concurrency limits, with an injected clock."""

from __future__ import annotations

import pytest

from flowrra import Flowrra
from flowrra.broker.limits import Limits
from flowrra.protocol import TaskLimits
from tests.broker.harness import NODE_A, NODE_B, T0, Harness, ids, submission


def test_a_strict_sliding_window() -> None:
    limits = Limits()
    limits.update({"t": TaskLimits(3, 1.0, None)})
    starts = []
    now = 0.0
    while now < 5.0:
        if limits.allows("t", now):
            limits.started("t", now)
            limits.ended("t")
            starts.append(now)
        now = round(now + 0.01, 2)
    for start in starts:  # never more than 3 in any window of one second
        assert sum(1 for s in starts if start <= s < start + 1.0) <= 3
    assert len(starts) >= 14  # and the rate is reached: 3 per second over 5 seconds
    for start in starts:  # with the guard, a window is a little longer than one second
        assert sum(1 for s in starts if start <= s < start + 1.04) <= 3
    assert limits.allows("other", 0.0)


def test_concurrency_counts_running_runs() -> None:
    limits = Limits()
    limits.update({"t": TaskLimits(None, None, 2)})
    limits.started("t", 0)
    limits.started("t", 0)
    assert not limits.allows("t", 100)
    limits.ended("t")
    assert limits.allows("t", 100)


def test_bad_specs_fail_at_decoration() -> None:
    app = Flowrra.from_urls()
    for bad in ({"rate_limit": "10/x"}, {"rate_limit": "0/s"}, {"rate_limit": "ten/s"},
                {"max_concurrency": 0}, {"max_concurrency": 1.5}):  # fmt: skip
        with pytest.raises(ValueError):
            app.task(**bad)(lambda: None)  # type: ignore[arg-type]


def test_held_back_tasks_stay_queued_and_do_not_block_others() -> None:
    h = Harness()
    limited = {"jobs.limited": TaskLimits(2, 1.0, None)}
    tasks = {"jobs.limited": "async", "jobs.work": "async"}
    h.ready(NODE_A, async_slots=10, tasks=tasks, limits=limited)
    h.ready(NODE_B, async_slots=10, tasks=tasks, limits=limited)
    h.submit(*(submission(f"l{i}", name="jobs.limited", priority=9) for i in range(5)))
    h.submit(*(submission(f"w{i}") for i in range(3)))
    h.tick()
    started = [d for ds in h.dispatched().values() for d in ds]
    assert sorted(d.task_id for d in started if d.name == "jobs.limited") == ["l0", "l1"]
    assert sorted(d.task_id for d in started if d.name == "jobs.work") == ["w0", "w1", "w2"]
    assert h.broker.seconds_until_due(T0) <= 1.0  # it wakes when the window opens
    h.tick(T0 + 0.5)
    assert h.dispatched() == {}
    h.tick(T0 + 1.0)  # one window later, plus the guard for dispatch jitter...
    assert h.dispatched() == {}
    h.tick(T0 + 1.05)
    assert sorted(ids([d for ds in h.dispatched().values() for d in ds])) == ["l2", "l3"]
    assert h.record("l4").retries == 0 and h.record("l4").attempt == 0


def test_a_lost_nodes_run_frees_its_concurrency() -> None:
    h = Harness()
    limited = {"jobs.work": TaskLimits(None, None, 1)}
    h.ready(NODE_A, async_slots=5, limits=limited)
    h.submit(submission("a"), submission("b"))
    h.tick()
    assert ids(h.dispatched()[NODE_A]) == ["a"]
    h.broker.unregister_node(NODE_A, h.now, lost=True)
    h.ready(NODE_B, async_slots=5, limits=limited)
    h.tick()
    assert ids(h.dispatched()[NODE_B]) == ["a"]
