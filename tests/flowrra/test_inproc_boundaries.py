"""The embedded direct path: the client, the in-process broker and the node share
one process and hand bodies over unencoded, yet a task and its caller never share an object
(arguments are packed at submit, results packed by the node), a send made while the broker
is busy on the same stack waits for the pass under way and keeps its order."""

from __future__ import annotations

import asyncio
from typing import Any

from flowrra import Flowrra, report_progress
from flowrra.inproc import InprocHub
from flowrra.protocol import Command, decode
from flowrra.transport import Wakeup

app = Flowrra.from_urls()
SEEN: list[Any] = []
RETURNED: list[Any] = []
PROCEED = asyncio.Event()


@app.task()
async def mutate(items: list[int], nested: dict[str, list[int]]) -> list[int]:
    SEEN.append(list(items))
    items.append(99)  # the task's own copy
    nested["k"].append(99)
    RETURNED.append(items)
    return items


async def test_a_task_and_its_caller_never_share_an_argument_or_a_result() -> None:
    SEEN.clear()
    RETURNED.clear()
    items, nested = [1, 2], {"k": [3]}
    async with app:
        task_id = await app.submit(mutate, items, nested)
        items.append(7)  # after the submit: the task has what was submitted
        result = await app.wait_for_result(task_id, timeout=10)
        again = await app.wait_for_result(task_id, timeout=10)
    assert SEEN == [[1, 2]]
    assert items == [1, 2, 7] and nested == {"k": [3]}  # the task's mutations stayed there
    assert result.result == [1, 2, 99] and result.result is not RETURNED[0]
    RETURNED[0].append(100)  # the task's side changes what it returned: not the caller's
    result.result.append(5)  # nor does one waiter's copy change another's
    assert again.result == [1, 2, 99]


@app.task()
async def halfway() -> str:
    report_progress(1, 2, "half")
    await PROCEED.wait()
    return "done"


async def test_a_watcher_shares_no_progress_object_with_the_broker() -> None:
    """The progress in a record pushed to a watcher is its own: changing it does not change
    the task's record in the in-process broker (its final result keeps what was reported)."""
    PROCEED.clear()
    async with app:
        task_id = await app.submit(halfway)
        async for record in app._connected().watch(task_id):
            if record["progress"] is not None:
                record["progress"][0] = 999
                record["progress"].append("extra")
                break
        PROCEED.set()
        result = await app.wait_for_result(task_id, timeout=10)
    assert result.result == "done"
    assert result.progress is not None
    assert (result.progress.current, result.progress.total) == (1, 2)
    assert result.progress.message == "half"


def test_a_body_sent_while_the_broker_processes_waits_for_its_pass_in_order() -> None:
    """The broker handles a body on the sender's stack unless it is already processing
    there: then the body is queued encoded, behind what was queued before, and the pass under
    way picks it up (has_input) instead of running a nested pass."""
    hub = InprocHub(Wakeup())
    handled: list[tuple[str, Any]] = []
    busy = [False]

    def process_body(peer: bytes, command: Command, body: Any) -> bool:
        if busy[0]:
            return False
        busy[0] = True
        try:
            handled.append(("body", body))
            # A send made while this pass runs (as a node's outcome sent from a callback).
            nested.send_body(Command.RESULTS, ["nested-1"])
            nested.send_body(Command.RESULTS, ["nested-2"])
            assert handled == [("body", ["first"])]  # not handled inside the pass
            messages, _ = hub.drain(10)
            handled.extend(("queued", m) for _, m in messages)
        finally:
            busy[0] = False
        return True

    hub.process_body = process_body
    hub.process_now = lambda: None
    client = hub.link(Wakeup())
    nested = hub.link(Wakeup())
    client.send_body(Command.SUBMIT, ["first"])
    kinds = [kind for kind, _ in handled]
    assert kinds == ["body", "queued", "queued"]
    bodies = [decode(frames).body for _, frames in handled[1:]]
    assert bodies == [["nested-1"], ["nested-2"]]
    assert not hub.has_input()


async def test_many_concurrent_submits_and_waits_in_process_all_complete() -> None:
    """Submits of many coroutines in one loop iteration (batched, the first one sent
    directly) and their waits: every task runs once and every waiter gets its own result."""
    SEEN.clear()
    async with app:

        async def one(i: int) -> list[int]:
            task_id = await app.submit(mutate, [i], {"k": []})
            return (await app.wait_for_result(task_id, timeout=10)).result  # type: ignore[no-any-return]

        results = await asyncio.gather(*(one(i) for i in range(300)))
    assert results == [[i, 99] for i in range(300)]
    assert sorted(SEEN) == [[i] for i in range(300)]
