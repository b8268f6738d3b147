"""Priority order through one slot: priority descending, then first in, first out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flowrra import Flowrra, TaskStatus
from tests.apps import ordering
from tests.conftest import Launcher, remote_twin, wait_for_path

# (label, priority); None means "submitted without priority=" (record_default_priority: 7).
SUBMISSIONS: list[tuple[str, int | None]] = [
    ("p0-first", 0),
    ("p5-first", 5),
    ("m3-first", -3),
    ("default7-first", None),
    ("p10-first", 10),
    ("p5-second", 5),
    ("p0-second", 0),
    ("p10-second", 10),
    ("m3-second", -3),
    ("default7-second", None),
    ("p5-third", 5),
]


def expected_order() -> list[str]:
    numbered = [
        (7 if priority is None else priority, index, label)
        for index, (label, priority) in enumerate(SUBMISSIONS)
    ]
    return [label for _, _, label in sorted(numbered, key=lambda t: (-t[0], t[1]))]


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest, launcher: Launcher) -> Flowrra:
    if request.param == "embedded":
        return ordering.app  # concurrency=1
    broker = launcher.broker()
    launcher.node(broker, "tests.apps.ordering:app", concurrency=1)
    return remote_twin(ordering.app, broker)


async def test_priority_then_fifo_through_one_slot(app: Flowrra, tmp_path: Path) -> None:
    started, release = tmp_path / "blocker-started", tmp_path / "release"
    async with app:
        blocker_id = await app.submit(ordering.blocker, str(started), str(release))
        await wait_for_path(started)  # the only slot is taken: everything below queues
        ids: dict[str, str] = {}
        for label, priority in SUBMISSIONS:
            if priority is None:
                ids[label] = await app.submit(ordering.record_default_priority, label)
            else:
                ids[label] = await app.submit(ordering.record, label, priority=priority)
        for task_id in ids.values():  # still queued behind the blocker
            queued = await app.get_result(task_id)
            assert queued is not None and queued.status is TaskStatus.PENDING, queued
        release.touch()
        blocker_result = await app.wait_for_result(blocker_id, timeout=15)
        results = {label: await app.wait_for_result(i, timeout=15) for label, i in ids.items()}

    assert blocker_result.success, blocker_result
    for result in results.values():
        assert result.success, result
    by_start = sorted(results.values(), key=lambda r: r.started_at)  # type: ignore[arg-type, return-value]
    assert [r.result["label"] for r in by_start] == expected_order()
    # One slot: each task started after the previous one finished (and after the blocker).
    previous: Any = blocker_result
    for result in by_start:
        assert result.started_at >= previous.finished_at, (previous, result)
        previous = result
