"""Workflows in the broker core, with an injected clock: hand-offs, counting, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flowrra.broker.store import LmdbStore
from flowrra.protocol import TaskStatus, pack_args, unpack_args
from tests.broker.harness import NODE_A, NODE_B, Harness, ids, submission
from tests.broker.test_admin import admin


@pytest.fixture
def h() -> Harness:
    return Harness()


def chord(h: Harness, members: int, workflow_id: str = "w1") -> None:
    steps: list[list[Any]] = [
        [submission(f"m{i}").to_wire() for i in range(members)],
        [submission("cb", payload=pack_args([], {"extra": 1})).to_wire()],
    ]
    error, _ = admin(
        h, "workflow_submit", workflow={"id": workflow_id, "kind": "chord", "steps": steps}
    )
    assert error is None


def test_the_callback_waits_and_gets_every_result_in_order(h: Harness) -> None:
    chord(h, 3)
    assert h.record("cb").status is TaskStatus.WAITING
    h.ready(NODE_A, async_slots=10)
    h.tick()
    assert sorted(ids(h.dispatched()[NODE_A])) == ["m0", "m1", "m2"]
    for i in (2, 0, 1):  # finishing out of order
        h.result(NODE_A, f"m{i}", 1, i * 10)
    h.tick()
    assert h.dispatched() == {}  # not before the commit that released it...
    h.broker.store.commit()
    h.tick()  # ...but in the next tick
    (dispatch,) = h.dispatched()[NODE_A]
    assert dispatch.task_id == "cb"
    assert unpack_args(dispatch.payload) == (([0, 10, 20],), {"extra": 1})


def test_a_member_run_twice_after_a_node_loss_is_counted_once(h: Harness) -> None:
    chord(h, 2)
    h.ready(NODE_A, async_slots=1)
    h.tick()
    (first,) = h.dispatched()[NODE_A]
    h.broker.unregister_node(NODE_A, h.now, lost=True)  # its attempt is lost, runs again
    h.ready(NODE_B, async_slots=2)
    h.tick()
    assert sorted(ids(h.dispatched()[NODE_B])) == ["m0", "m1"]
    h.result(NODE_A, first.task_id, 1, "late")  # the lost attempt's late result: fenced
    h.result(NODE_B, "m0", 2 if first.task_id == "m0" else 1, "a")
    h.tick()
    assert h.record("cb").status is TaskStatus.WAITING  # one of two members counted
    h.result(NODE_B, "m1", 2 if first.task_id == "m1" else 1, "b")
    h.tick()
    h.tick()
    assert ids(h.dispatched()[NODE_B]) == ["cb"]
    workflow = h.broker.workflows.get("w1")
    assert workflow is not None and sorted(workflow["finished"]) == ["m0", "m1"]


def test_a_failed_member_fails_the_callback_without_running_it(h: Harness) -> None:
    chord(h, 2)
    h.ready(NODE_A, async_slots=2)
    h.tick()
    h.failure(NODE_A, "m1", 1)  # max_retries=3: retried first...
    h.tick(h.now + 60)
    h.failure(NODE_A, "m1", 2)
    h.tick(h.now + 60)
    h.failure(NODE_A, "m1", 3)
    h.tick(h.now + 60)
    h.failure(NODE_A, "m1", 4)  # ...then final
    callback = h.record("cb")
    assert callback.status is TaskStatus.FAILED and "m1" in (callback.error or "")
    h.result(NODE_A, "m0", 1, 0)
    h.tick()
    assert h.record("cb").status is TaskStatus.FAILED  # stays failed; never dispatched
    assert "cb" not in ids(h.dispatched().get(NODE_A, []))


def test_resubmitting_a_workflow_is_idempotent(h: Harness) -> None:
    chord(h, 2)
    chord(h, 2)
    assert h.broker.counters["submitted"] == 2
    error, _ = admin(
        h,
        "workflow_submit",
        workflow={"id": "w2", "kind": "chain", "steps": [[submission("m0").to_wire()]]},
    )
    assert error is not None and "already belongs" in error


def test_the_count_survives_a_restart_between_members(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.broker.recover(h.now)
    chord(h, 2)
    h.ready(NODE_A, async_slots=2)
    h.tick()
    h.result(NODE_A, "m0", 1, "a")
    h.broker.store.commit()  # the member's result and its count, in one commit
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    h2.ready(NODE_A, running=[("m1", 1)])
    h2.result(NODE_A, "m1", 1, "b")
    h2.tick()
    h2.tick()
    (dispatch,) = h2.dispatched()[NODE_A]
    assert dispatch.task_id == "cb" and unpack_args(dispatch.payload)[0] == (["a", "b"],)
    h2.broker.store.close()


def test_a_step_released_in_a_lost_tick_waits_again_and_runs_once(tmp_path: Path) -> None:
    path = tmp_path / "store"
    h = Harness(LmdbStore(path))
    h.broker.recover(h.now)
    chord(h, 1)
    h.ready(NODE_A, async_slots=2)
    h.tick()
    h.broker.store.commit()
    h.result(NODE_A, "m0", 1, "a")
    h.tick()  # the callback is released, but held back until this commit...
    assert "cb" not in ids(h.dispatched().get(NODE_A, []))
    h.broker.store.discard()  # ...which never happens: the broker is killed
    h.broker.store.close()

    h2 = Harness(LmdbStore(path))
    h2.broker.recover(h2.now)
    assert h2.record("cb").status is TaskStatus.WAITING
    h2.ready(NODE_A, running=[("m0", 1)])
    h2.result(NODE_A, "m0", 1, "a")  # the node reports again after the restart
    h2.tick()
    h2.broker.store.commit()
    h2.tick()
    (dispatch,) = h2.dispatched()[NODE_A]
    assert dispatch.task_id == "cb" and dispatch.attempt == 1  # dispatched once, in all
    h2.broker.store.close()
