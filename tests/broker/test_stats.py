"""Per-name figures and the recent tasks (broker/stats.py) and their admin verbs."""

from __future__ import annotations

import pytest

from flowrra.broker.stats import TaskStats, percentile
from flowrra.protocol import TaskStatus
from tests.broker.harness import NODE_A, Harness, submission
from tests.broker.test_admin import admin, fail_for_good


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.broker.observers.append(TaskStats())
    return harness


def test_percentile_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_run_window_and_recent_are_bounded() -> None:
    stats = TaskStats(recent=3)
    for i in range(1500):
        stats.finished("n", TaskStatus.SUCCESS, float(i), f"t{i}")
    figures = stats.figures()["n"]
    assert figures["finished"] == 1500
    assert figures["runs"] == 1000  # the window keeps the last 1,000 run times
    assert figures["p50_s"] == 999.0  # of 500..1499
    assert list(stats.recent()) == ["t1499", "t1498", "t1497"]


def test_task_stats_counts_failure_rate_and_run_times(h: Harness) -> None:
    h.ready(NODE_A, async_slots=1)
    h.submit(submission("ok1"), submission("bad", max_retries=0), submission("ok2"))
    for task_id in ("ok1", "bad", "ok2"):
        h.tick()
        (dispatch,) = h.dispatched()[NODE_A]
        if task_id == "bad":
            h.failure(NODE_A, task_id, dispatch.attempt)
        else:
            h.result(NODE_A, task_id, dispatch.attempt, 1)
    error, reply = admin(h, "task_stats")
    assert error is None
    figures = reply["tasks"]["jobs.work"]
    assert figures["submitted"] == 3
    assert figures["finished"] == 3
    assert figures["succeeded"] == 2
    assert figures["failed"] == 1
    assert figures["failure_rate"] == round(1 / 3, 4)
    assert figures["runs"] == 3
    assert figures["p50_s"] == pytest.approx(0.5)  # the harness's attempts last 0.5 s
    assert reply["run_window"] == 1000
    assert admin(h, "task_stats", name="nope")[1]["tasks"] == {}


def test_task_list_filters_by_status_and_name(h: Harness) -> None:
    h.ready(NODE_A, async_slots=1, tasks={"jobs.work": "async", "other": "async"})
    h.submit(submission("f1", max_retries=0))
    fail_for_good(h, "f1")
    h.submit(submission("p1"), submission("o1", name="other"))
    error, listed = admin(h, "task_list")
    assert error is None
    assert [t["task_id"] for t in listed] == ["o1", "p1", "f1"]
    failed = admin(h, "task_list", status="failed")[1]
    assert [t["task_id"] for t in failed] == ["f1"]
    assert failed[0]["error"] == "ValueError: boom"
    assert "traceback" not in failed[0] and "result" not in failed[0]
    assert [t["task_id"] for t in admin(h, "task_list", name="other")[1]] == ["o1"]
    both = admin(h, "task_list", status=["failed", "pending"], name="jobs.work", limit=1)[1]
    assert [t["task_id"] for t in both] == ["p1"]
    # A dead letter queued again is listed as pending, no longer as failed.
    assert admin(h, "dead_retry", task_id="f1") == (None, "f1")
    assert admin(h, "task_list", status="failed")[1] == []
    pending = {t["task_id"] for t in admin(h, "task_list", status="pending")[1]}
    assert "f1" in pending


def test_task_list_rejects_bad_arguments(h: Harness) -> None:
    assert "unknown task status" in (admin(h, "task_list", status="done")[0] or "")
    assert "limit" in (admin(h, "task_list", limit=0)[0] or "")
    assert "name" in (admin(h, "task_list", name=3)[0] or "")


def test_a_bare_core_has_no_stats() -> None:
    h = Harness()
    assert admin(h, "task_list") == (None, [])
    assert admin(h, "task_stats")[1]["tasks"] == {}


def test_recent_reads_across_counted_blocks_and_keeps_each_tasks_latest_status() -> None:
    stats = TaskStats(recent=5000)
    for i in range(3000):  # three events each: more than two counted blocks
        task_id = f"t{i}"
        stats.submitted("n", task_id)
        stats.started("n", 0.0, task_id)
        stats.finished("n", TaskStatus.FAILED if i % 3 == 0 else TaskStatus.SUCCESS, 0.1, task_id)
    failed = list(stats.recent(statuses=frozenset({TaskStatus.FAILED})))
    assert failed == [f"t{i}" for i in range(2999, -1, -1) if i % 3 == 0]
    assert len(list(stats.recent())) == 3000  # each task once, newest first
    figures = stats.figures()["n"]
    assert (figures["submitted"], figures["started"], figures["finished"]) == (3000, 3000, 3000)
    assert figures["failed"] == 1000
    assert figures["runs"] == 1000  # the window


def test_a_correction_holds_until_the_tasks_next_event() -> None:
    stats = TaskStats()
    stats.finished("n", TaskStatus.FAILED, None, "a")
    stats.submitted("n", "b")
    assert list(stats.recent(statuses=frozenset({TaskStatus.FAILED}))) == ["a"]
    stats.correct("a", TaskStatus.PENDING)  # queued again from the dead letters
    assert list(stats.recent(statuses=frozenset({TaskStatus.PENDING}))) == ["b", "a"]
    stats.started("n", 0.0, "a")  # a newer event decides again
    assert list(stats.recent(statuses=frozenset({TaskStatus.PENDING}))) == ["b"]
    assert list(stats.recent()) == ["a", "b"]
    list(stats.recent())
    stats.correct("b", None)  # its record is gone
    assert list(stats.recent()) == ["a"]


def test_figures_count_events_not_yet_in_a_full_block() -> None:
    stats = TaskStats()
    stats.submitted("n", "a")
    stats.retried("n", "a")
    assert stats.figures()["n"]["submitted"] == 1
    stats.submitted("n", "b")
    figures = stats.figures()["n"]
    assert (figures["submitted"], figures["retried"]) == (2, 1)  # each event counted once
