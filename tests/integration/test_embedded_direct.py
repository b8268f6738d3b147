"""The embedded default's direct path: the hot messages are handed over unencoded, on the
sender's stack, while everything a user can see stays as it is over sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flowrra import Flowrra, SerializationError, TaskStatus
from flowrra.inproc import InprocHub
from flowrra.protocol import Command, decode
from flowrra.transport import Frames
from tests.conftest import embedded_twin

app = Flowrra.from_urls()
KEPT: list[Any] = []  # what the task returned, kept by the task's side


@app.task()
async def add(x: int, y: int) -> int:
    return x + y


@app.task()
async def keep(items: list[int]) -> list[int]:
    KEPT.append(items)
    return items


@app.task(max_retries=2, retry_delay=0.0)
async def fails_once(key: str) -> str:
    if key not in KEPT:
        KEPT.append(key)
        raise RuntimeError("first attempt")
    return key


HOT = {Command.SUBMIT, Command.ACK, Command.TASKS, Command.RESULTS, Command.RESULT}


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[Command]:
    """The commands of every message that crosses the hub encoded."""
    seen: list[Command] = []
    deliver, send, publish = InprocHub._deliver, InprocHub.send, InprocHub.publish

    def counting_deliver(hub: InprocHub, identity: bytes, frames: Frames) -> None:
        seen.append(decode(frames).command)
        deliver(hub, identity, frames)

    def counting_send(hub: InprocHub, peer: bytes, frames: Frames) -> bool:
        seen.append(decode(frames).command)
        return send(hub, peer, frames)

    def counting_publish(hub: InprocHub, frames: Frames) -> None:
        seen.append(decode(frames[1:]).command)
        publish(hub, frames)

    monkeypatch.setattr(InprocHub, "_deliver", counting_deliver)
    monkeypatch.setattr(InprocHub, "send", counting_send)
    monkeypatch.setattr(InprocHub, "publish", counting_publish)
    return seen


@pytest.mark.parametrize("confirm", [True, False])
async def test_submits_and_results_never_cross_the_hub_encoded(
    encoded: list[Command], confirm: bool
) -> None:
    twin = embedded_twin(app, confirm_submits=confirm)
    async with twin:
        encoded.clear()  # the handshake (HELLO, WELCOME, READY, SUBSCRIBED) is encoded
        one = await twin.submit(add, 1, 2)
        assert (await twin.wait_for_result(one, timeout=10)).result == 3
        ids = [await twin.submit(add, i, i) for i in range(50)]
        ids += await twin.submit_many(add, [(i, 1) for i in range(50)])
        results = await asyncio.gather(*(twin.wait_for_result(t, timeout=10) for t in ids))
    assert [r.result for r in results] == [2 * i for i in range(50)] + [i + 1 for i in range(50)]
    assert HOT.isdisjoint(encoded), encoded


async def test_a_confirmed_submit_is_stored_before_it_returns() -> None:
    twin = embedded_twin(app, confirm_submits=True)
    async with twin:
        assert twin._service is not None
        counters = twin._service.broker.counters
        before = counters["submitted"]
        await twin.submit(add, 1, 1)
        assert counters["submitted"] == before + 1  # accepted (and committed) on our stack


async def test_arguments_are_still_checked_and_results_still_copied() -> None:
    KEPT.clear()
    async with app:
        with pytest.raises(SerializationError):
            await app.submit(add, object(), 1)
        task_id = await app.submit(keep, [1, 2])
        first = await app.wait_for_result(task_id, timeout=10)
        second = await app.wait_for_result(task_id, timeout=10)
    assert first.result == [1, 2] and first.result is not KEPT[0]
    assert second.result is not first.result  # each waiter decodes its own copy
    KEPT[0].append(3)
    assert first.result == [1, 2]


async def test_retries_run_through_the_same_broker_core() -> None:
    KEPT.clear()
    async with app:
        result = await app.wait_for_result(await app.submit(fails_once, "k"), timeout=10)
    assert result.status is TaskStatus.SUCCESS and result.retries == 1


@pytest.mark.parametrize("durability", ["fast", "full"])
async def test_embedded_with_a_data_dir_keeps_its_results(tmp_path: Path, durability: str) -> None:
    first = embedded_twin(app, data_dir=str(tmp_path), durability=durability)
    async with first:
        ids = [await first.submit(add, i, 1) for i in range(20)]
        done = await asyncio.gather(*(first.wait_for_result(t, timeout=10) for t in ids))
    assert [r.result for r in done] == [i + 1 for i in range(20)]
    again = embedded_twin(app, data_dir=str(tmp_path), durability=durability)
    async with again:
        stored = await asyncio.gather(*(again.get_result(t) for t in ids))
    assert [None if r is None else r.result for r in stored] == [i + 1 for i in range(20)]
