"""What the embedded default keeps per task: nothing the garbage collector has to walk.

Client, broker and node keep some state per task for a while (a submission until its
acknowledgement, a node's outcome for RECENT_OUTCOMES_S, the broker's recent task events).
Kept as tuples of str, numbers, bytes and None, the collector untracks it at its first
collection; kept as lists (or NamedTuples, or holding enum members) it stays tracked, and
every full collection of the user's process walks all of it.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from flowrra import Flowrra
from flowrra.broker.stats import TaskStats
from flowrra.client import _IN_PROCESS_BURST
from flowrra.protocol import TaskStatus
from tests.conftest import embedded_twin

app = Flowrra.from_urls()


@app.task()
async def add(x: int, y: int) -> int:
    return x + y


@app.task(max_retries=0)
async def boom() -> None:
    raise ValueError("no")


def tracked(objects: list[Any]) -> list[Any]:
    # A tuple holding a tuple is untracked at the collection after the one that untracked
    # the inner tuple (a failed outcome nests three deep).
    for _ in range(3):
        gc.collect()
    return [o for o in objects if gc.is_tracked(o)]


async def test_submissions_awaiting_their_ack_are_not_tracked() -> None:
    twin = embedded_twin(app)
    async with twin:
        client = twin._connected()
        # One burst shorter than the one after which a submit lets the loop run: the
        # later submits wait for the flush.
        ids = [await twin.submit(add, i, i) for i in range(_IN_PROCESS_BURST)]
        assert len(client._unacked) >= _IN_PROCESS_BURST - 1
        assert tracked(list(client._unacked.values())) == []
        results = await asyncio.gather(*(twin.wait_for_result(t, timeout=10) for t in ids))
    assert [r.result for r in results] == [2 * i for i in range(_IN_PROCESS_BURST)]


async def test_kept_outcomes_and_task_events_are_not_tracked() -> None:
    twin = embedded_twin(app)
    async with twin:
        ids = [await twin.submit(add, i, 1) for i in range(50)]
        ids.append(await twin.submit(boom))
        results = await asyncio.gather(*(twin.wait_for_result(t, timeout=10) for t in ids))
        assert results[-1].status is TaskStatus.FAILED
        assert twin._node is not None and twin._service is not None
        recent = list(twin._node._recent)
        assert len(recent) >= 51
        assert tracked(recent) == []
        (stats,) = (o for o in twin._service.broker.observers if isinstance(o, TaskStats))
        events = list(stats._events)
        assert len(events) >= 3 * 51  # submitted, started, finished
        assert tracked(events) == []
        figures = stats.figures()[boom.__module__ + "." + boom.__qualname__]
        assert figures["failed"] == 1 and figures["finished"] == 1
        failed = list(stats.recent(statuses=frozenset({TaskStatus.FAILED})))
    assert failed == [ids[-1]]
