"""In-process, a coroutine that submits many tasks without waiting for their confirmation
lets the event loop run every _IN_PROCESS_BURST submits: the broker and node work through
the burst as it goes (as a bounded queue would), instead of everything piling up until it
ends."""

from __future__ import annotations

import asyncio

import pytest

from flowrra import Flowrra
from flowrra.client import _IN_PROCESS_BURST
from tests.conftest import embedded_twin

app = Flowrra.from_urls()


@app.task()
async def add(x: int, y: int) -> int:
    return x + y


async def test_a_long_burst_of_deferred_submits_lets_the_tasks_run_meanwhile() -> None:
    twin = embedded_twin(app)
    async with twin:
        client = twin._connected()
        ids = [await twin.submit(add, i, i) for i in range(10 * _IN_PROCESS_BURST)]
        # Every burst but the last two has run, and its results wait in the client's cache.
        assert len(client._results) >= 8 * _IN_PROCESS_BURST
        assert len(client._unacked) < 2 * _IN_PROCESS_BURST
        # Those results are there already: wait_for_result needs no future for them.
        assert client.finished(ids[0]) is not None and client.finished(ids[-1]) is None
        waits_before = len(client._waiters)
        first = await twin.wait_for_result(ids[0], timeout=10)
        assert first.result == 0 and len(client._waiters) == waits_before
        results = await asyncio.gather(*(twin.wait_for_result(t, timeout=10) for t in ids))
    assert [r.result for r in results] == [2 * i for i in range(10 * _IN_PROCESS_BURST)]


async def test_confirmed_submits_and_gathered_submits_do_not_yield_per_burst() -> None:
    strict = embedded_twin(app, confirm_submits=True)
    async with strict:
        ids = [await strict.submit(add, i, 1) for i in range(2 * _IN_PROCESS_BURST)]
        assert strict._connected()._burst == 0  # confirmed: each waited for its ACK anyway
        done = await asyncio.gather(*(strict.wait_for_result(t, timeout=10) for t in ids))
    assert [r.result for r in done] == [i + 1 for i in range(2 * _IN_PROCESS_BURST)]


async def test_a_submit_cancelled_at_its_burst_yield_submits_nothing() -> None:
    twin = embedded_twin(app)
    async with twin:
        client = twin._connected()
        assert twin._service is not None
        counters = twin._service.broker.counters
        submitted = counters["submitted"]
        ids: list[str] = []

        async def burst() -> None:
            for i in range(_IN_PROCESS_BURST + 1):  # the last one yields before it submits
                ids.append(await twin.submit(add, i, i))

        submitting = asyncio.ensure_future(burst())
        await asyncio.sleep(0)  # it runs until that yield
        assert len(ids) == _IN_PROCESS_BURST and not submitting.done()
        submitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submitting
        results = await asyncio.gather(*(twin.wait_for_result(t, timeout=10) for t in ids))
        assert [r.result for r in results] == [2 * i for i in range(_IN_PROCESS_BURST)]
        assert counters["submitted"] == submitted + _IN_PROCESS_BURST
        assert not client._unacked and not client._outgoing
        again = await twin.submit(add, 2, 2)  # the client goes on as before
        assert (await twin.wait_for_result(again, timeout=10)).result == 4
