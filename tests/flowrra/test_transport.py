"""WatchedSocket: a drain that knows its socket is empty asks ZeroMQ nothing, and still
never misses an arrival (the FD's callback, or a send, makes it ask again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import zmq

from flowrra import transport
from flowrra.transport import Wakeup, WatchedSocket, recv_frames, send_frames


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WatchedSocket, zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    watched = WatchedSocket(dealer, Wakeup())
    try:
        yield watched, router
    finally:
        watched.close()
        router.close()
        context.term()


async def _next(watched: WatchedSocket) -> list[list[bytes]]:
    """Wait for the wakeup, then drain (what a reader loop does)."""
    for _ in range(50):
        await watched.wakeup.wait(0.1)
        got = watched.drain(100)
        if got:
            return got
    raise AssertionError("no message arrived")


async def test_known_empty_drain_skips_the_events_check_and_misses_nothing(
    pair: tuple[WatchedSocket, zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    watched, router = pair
    send_frames(watched.socket, [b"hello"])
    watched.sent()
    peer = await asyncio.to_thread(recv_frames, router)  # blocking receive, off the loop
    assert peer[1:] == [b"hello"]

    checks = 0
    readable = transport.readable

    def counting(socket: zmq.Socket[bytes]) -> bool:
        nonlocal checks
        checks += 1
        return readable(socket)

    monkeypatch.setattr(transport, "readable", counting)
    assert watched.drain(100) == []  # a send came since the last check: it asks
    assert checks == 1
    assert watched.drain(100) == []  # known empty now: it does not ask again
    assert watched.drain(100) == []
    assert checks == 1

    # An arrival after the drain said "empty" still wakes the FD's callback.
    send_frames(router, [peer[0], b"reply-1"])
    assert await _next(watched) == [[b"reply-1"]]

    # A send on the watched socket may consume the FD's edge: the next drain asks again.
    send_frames(router, [peer[0], b"reply-2"])
    for _ in range(200):
        if watched.socket.poll(10, zmq.POLLIN):
            break
    before = checks
    watched.sent()
    assert watched.drain(100) == [[b"reply-2"]]
    assert checks > before


async def test_a_wakeup_times_out_and_keeps_one_timer() -> None:
    loop = asyncio.get_running_loop()
    wakeup = Wakeup()
    started = loop.time()
    await wakeup.wait(0.05)  # nothing sets it: the timeout ends it
    assert loop.time() - started >= 0.04
    # A long wait arms a timer; a set ends the wait and the timer stays armed.
    waiting = asyncio.create_task(wakeup.wait(30.0))
    await asyncio.sleep(0)
    wakeup.set()
    await asyncio.wait_for(waiting, 5)
    # A shorter wait after it is not held to the longer timer: it ends by its own timeout.
    started = loop.time()
    await asyncio.wait_for(wakeup.wait(0.05), 5)
    assert loop.time() - started < 5
    # Set before the wait: it returns at once.
    wakeup.set()
    await asyncio.wait_for(wakeup.wait(30.0), 1)


def test_a_wakeup_times_out_on_a_second_event_loop() -> None:
    """A timer armed on a loop that is gone must not stand for the next loop's timeout."""
    wakeup = Wakeup()

    async def wait_then_set() -> None:
        waiting = asyncio.create_task(wakeup.wait(0.2))  # its timer stays armed on this loop
        await asyncio.sleep(0)
        wakeup.set()
        await waiting

    asyncio.run(wait_then_set())
    # Due later than the dead loop's timer: a timer of its own is armed, so it times out
    # (without one it would wait for good, and wait_for would raise).
    asyncio.run(asyncio.wait_for(wakeup.wait(0.3), 5))


def test_a_sub_millisecond_wakeup_timeout_is_one_timer_under_uvloop() -> None:
    """uvloop rounds a timer's delay to whole milliseconds: a 0.4 ms timer fired at once,
    so a loop waiting for a sub-millisecond deadline (the broker's linger) spun until it
    passed. The timeout is rounded up instead: one wait, no early return."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[int, float]:
        wakeup = Wakeup()
        waits = 0
        started = time.monotonic()
        deadline = started + 0.0004
        while time.monotonic() < deadline:  # the linger's loop: wait, look again
            await wakeup.wait(deadline - time.monotonic())
            waits += 1
        return waits, time.monotonic() - started

    waits, elapsed_s = uvloop.run(main())
    assert waits == 1
    assert elapsed_s >= 0.0004


async def test_a_drain_stopped_by_its_limit_leaves_the_loop_awake_for_the_rest() -> None:
    """A drain that stops at its limit has not asked ZeroMQ whether more waits (the FD
    will not signal what is already there): it sets the wakeup, so a reader that then
    sleeps returns at once and drains the rest."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://review-limit")
    b.connect("inproc://review-limit")
    watched = WatchedSocket(a, Wakeup())
    try:
        for body in (b"1", b"2", b"3", b"4", b"5"):
            b.send(body)  # inproc: in a's pipe when send returns
        got: list[list[bytes]] = []
        for _ in range(2):
            batch = watched.drain(2)
            assert len(batch) == 2  # stopped by the limit with more waiting ...
            got.extend(batch)
            await asyncio.wait_for(watched.wakeup.wait(None), 1)  # ... so no sleep
        got.extend(watched.drain(2))
        assert got == [[b"1"], [b"2"], [b"3"], [b"4"], [b"5"]]
        assert not watched.has_input() and watched.drain(2) == []
    finally:
        watched.close()
        b.close(linger=0)
        context.term()


async def test_a_set_during_a_wait_of_another_timeout_is_not_missed() -> None:
    """set() between waits, during a wait with no timeout, and with a kept timer from a
    longer-ago shorter wait: each ends the wait it belongs to, none sleeps for good."""
    wakeup = Wakeup()
    await wakeup.wait(0.001)  # fired: its timer is gone
    waiting = asyncio.create_task(wakeup.wait(None))
    await asyncio.sleep(0)
    wakeup.set()
    await asyncio.wait_for(waiting, 1)
    waiting = asyncio.create_task(wakeup.wait(0.001))  # a short timer, kept ...
    await asyncio.sleep(0)
    wakeup.set()
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(wakeup.wait(30.0), 1)  # ... may end a longer wait early
    wakeup.set()
    wakeup.set()  # twice before one wait: one wait returns at once, the next one sleeps
    await asyncio.wait_for(wakeup.wait(30.0), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wakeup.wait(None), 0.05)
