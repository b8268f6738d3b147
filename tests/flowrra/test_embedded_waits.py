"""wait_for_result in-process: a future per wait (no coroutine of the client's), one timer for
every timeout of a client, and waiters dropped when their record arrives, at their timeout,
or at the quiet check after they were cancelled."""

from __future__ import annotations

import asyncio

import pytest

from flowrra import Flowrra

app = Flowrra.from_urls()
gate: asyncio.Event | None = None


@app.task()
async def held(x: int) -> int:
    assert gate is not None
    await gate.wait()
    return x


async def test_timeouts_fire_in_order_on_one_timer_and_drop_their_waiters() -> None:
    global gate
    gate = asyncio.Event()
    async with app:
        client = app._connected()
        slow = await app.submit(held, 1)
        # Given in the opposite order: the timer is re-armed for the earlier one.
        late = asyncio.ensure_future(app.wait_for_result(slow, timeout=30))
        with pytest.raises(TimeoutError, match=r"did not finish within 0\.05s"):
            await app.wait_for_result(slow, timeout=0.05)
        assert client._waiters[slow] and not late.done()
        gate.set()
        assert (await late).result == 1
        assert slow not in client._waiters and slow not in client._quiet
        # The deadline of the wait that ended first is dropped when the timer gets to it.
        assert client._deadline_timer is not None
        assert all(entry[2].done() for entry in client._deadlines)


async def test_a_cancelled_wait_is_forgotten_at_the_quiet_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global gate
    gate = asyncio.Event()
    async with app:
        client = app._connected()
        task_id = await app.submit(held, 2)
        waiting = asyncio.ensure_future(app.wait_for_result(task_id))
        await asyncio.sleep(0)
        assert task_id in client._waiters
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        client._requery_quiet(client._quiet[task_id][0])  # as the reader does when it is due
        assert task_id not in client._waiters and task_id not in client._quiet
        assert client._requery is None  # nobody waits: nothing to ask the broker
        gate.set()
        assert (await app.wait_for_result(task_id, timeout=10)).result == 2
