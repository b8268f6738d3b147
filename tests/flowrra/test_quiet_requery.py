"""The quiet check asks the broker about a waiting task only when its publication may have
been lost: a task awaited after it has its result, or no result came for a whole interval.
Tasks that wait their turn behind results still arriving in order are not asked about."""

from __future__ import annotations

import asyncio
import time

from flowrra import Flowrra
from flowrra.client import QUIET_REQUERY_S, BrokerClient

app = Flowrra.from_urls(concurrency=4)
gates: dict[int, asyncio.Event] = {}


@app.task()
async def held(x: int) -> int:
    await gates[x].wait()
    return x


def _due_now(client: BrokerClient) -> float:
    """A quiet check's time at which every waiting task is due."""
    return max(at for at, _, _ in client._quiet.values())


async def test_only_a_task_overtaken_by_a_later_one_or_a_silence_is_asked_about() -> None:
    gates.clear()
    gates.update({x: asyncio.Event() for x in (1, 2, 3)})
    async with app:
        client = app._connected()
        ids = [await app.submit(held, x) for x in (1, 2, 3)]
        waits = [asyncio.ensure_future(app.wait_for_result(t)) for t in ids]
        await asyncio.sleep(0)
        gates[1].set()
        assert (await waits[0]).result == 1

        # 2 and 3 wait behind results arriving in order: nothing to ask.
        client._requery_quiet(_due_now(client))
        assert client._requery is None
        assert set(client._quiet) == {ids[1], ids[2]}

        # 3, awaited after 2, has its result: 2's publication may have been lost.
        gates[3].set()
        assert (await waits[2]).result == 3
        client._requery_quiet(_due_now(client))
        assert client._requery is not None
        await client._requery
        assert not waits[1].done()  # still running: the answer omits it
        assert client._quiet[ids[1]][1] == 2 * QUIET_REQUERY_S  # asked again later

        gates[2].set()
        assert (await waits[1]).result == 2


async def test_with_no_result_for_an_interval_every_quiet_task_is_asked_about() -> None:
    gates.clear()
    gates.update({x: asyncio.Event() for x in (4, 5)})
    async with app:
        client = app._connected()
        ids = [await app.submit(held, x) for x in (4, 5)]
        waits = [asyncio.ensure_future(app.wait_for_result(t)) for t in ids]
        await asyncio.sleep(0)
        client._last_delivered = time.monotonic() - QUIET_REQUERY_S  # a silence
        client._requery_quiet(_due_now(client))
        assert client._requery is not None
        await client._requery
        assert all(client._quiet[t][1] == 2 * QUIET_REQUERY_S for t in ids)
        for x in (4, 5):
            gates[x].set()
        assert [r.result for r in await asyncio.gather(*waits)] == [4, 5]
