"""kill -9 the broker around delays, cancels, schedules and expiry: due times are kept, a
cancel is final, a schedule's slots run once each, and an expired task never runs.

Real ``flowrra-broker`` and ``flowrra-node`` processes; the client process stays alive across
the kills. Tasks leave a marker file per run (its content is the run's start time), so tests
count runs and see when they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import zmq

from flowrra import Flowrra, TaskResult, TaskStatus, protocol
from flowrra.protocol import Command, SlotKind
from flowrra.scheduler import ScheduledTask
from flowrra.schedules import slot_task_id
from tests.apps import durable
from tests.conftest import Launcher, remote_twin, wait_for_glob

APP = "tests.apps.durable:app"
# Timers are kept in whole milliseconds, and the marker is written a moment after the start.
EARLY_TOLERANCE_S = 0.005

T = TypeVar("T")


def marker_times(marker_dir: Path, pattern: str) -> list[float]:
    """The times the markers matching ``pattern`` hold (each a run's start), sorted."""
    return sorted(float(p.read_text()) for p in marker_dir.glob(pattern))


def run_times(marker_dir: Path, key: str) -> list[float]:
    """The start time of each run of ``key`` (one marker per run, see tests/apps/durable)."""
    return marker_times(marker_dir, f"{key}.*.run")


async def poll(
    fetch: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout: float = 15.0,
    what: str = "condition",
) -> T:
    """``await fetch()`` every 20 ms until ``done`` holds for its value; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last: {value!r}")
        await asyncio.sleep(0.02)


async def status_of(client: Flowrra, task_id: str) -> TaskResult:
    result = await client.get_result(task_id)
    assert result is not None, f"the broker does not know {task_id}"
    return result


# --------------------------------------------------------------------------- delays


async def test_delayed_tasks_keep_their_eta_across_a_kill(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, APP)
    client = remote_twin(durable.app, broker)
    countdowns = {"d0": 1.5, "d1": 1.75, "d2": 2.0, "d3": 2.25}
    async with client:
        ids = {
            key: await client.submit(durable.record, str(tmp_path), key, countdown=countdown)
            for key, countdown in countdowns.items()
        }
        long_id = await client.submit(durable.record, str(tmp_path), "long", countdown=60)
        before = {key: await status_of(client, task_id) for key, task_id in ids.items()}
        long_before = await status_of(client, long_id)
        assert all(r.status is TaskStatus.SCHEDULED for r in before.values()), before
        assert long_before.status is TaskStatus.SCHEDULED
        etas = {key: r.eta.timestamp() for key, r in before.items() if r.eta is not None}
        assert set(etas) == set(ids) and long_before.eta is not None

        broker = launcher.restart(broker)
        # The node serves the new broker (so nothing waits for it) before the first eta:
        # a broker that started the delayed tasks on recovery would start them early.
        probe = await client.submit(durable.record, str(tmp_path), "probe")
        assert (await client.wait_for_result(probe, timeout=15)).status is TaskStatus.SUCCESS
        after = {key: await status_of(client, task_id) for key, task_id in ids.items()}
        assert time.time() < min(etas.values()), "the restart took longer than the countdowns"
        # Read back before any was due: still waiting, for the same due time.
        assert all(r.status is TaskStatus.SCHEDULED for r in after.values()), after
        assert {key: r.eta for key, r in after.items()} == {k: r.eta for k, r in before.items()}

        results = await asyncio.gather(
            *(client.wait_for_result(task_id, timeout=20) for task_id in ids.values())
        )
        long_after = await status_of(client, long_id)

    assert [r.status for r in results] == [TaskStatus.SUCCESS] * len(ids)
    for key, result in zip(ids, results, strict=True):
        (started,) = run_times(tmp_path, key)  # exactly one run
        assert started >= etas[key] - EARLY_TOLERANCE_S, (key, started, etas[key])
        assert result.started_at is not None
        assert result.started_at.timestamp() >= etas[key] - EARLY_TOLERANCE_S
    # The long one waits on, with the same due time.
    assert long_after.status is TaskStatus.SCHEDULED
    assert long_after.eta == long_before.eta
    assert run_times(tmp_path, "long") == []


# --------------------------------------------------------------------------- cancel


async def test_cancelled_waiting_tasks_stay_cancelled_across_a_kill(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")  # no node yet: nothing can start
    client = remote_twin(durable.app, broker)
    async with client:
        scheduled = await client.submit(durable.record, str(tmp_path), "s", countdown=1.0)
        queued = await client.submit(durable.record, str(tmp_path), "q")
        assert (await status_of(client, scheduled)).status is TaskStatus.SCHEDULED
        assert (await status_of(client, queued)).status is TaskStatus.PENDING
        eta = (await status_of(client, scheduled)).eta
        assert eta is not None
        assert await client.cancel(scheduled) is True
        assert await client.cancel(queued) is True
        broker = launcher.restart(broker)  # right after the cancels were acknowledged

        assert (await status_of(client, scheduled)).status is TaskStatus.CANCELLED
        assert (await status_of(client, queued)).status is TaskStatus.CANCELLED
        launcher.node(broker, APP, concurrency=1)
        # Had either come back, it would run before these: the queued one is ahead of
        # "now" in the same queue, the scheduled one's timer is due before "later".
        now = await client.submit(durable.record, str(tmp_path), "now")
        later = await client.submit(
            durable.record, str(tmp_path), "later", eta=eta + dt.timedelta(seconds=0.3)
        )
        for sentinel in (now, later):
            assert (await client.wait_for_result(sentinel, timeout=15)).success
        finals = [await client.wait_for_result(t, timeout=5) for t in (scheduled, queued)]
        assert await client.cancel(scheduled) is False  # final: nothing to cancel
        assert await client.cancel(queued) is False

    assert [r.status for r in finals] == [TaskStatus.CANCELLED] * 2
    assert run_times(tmp_path, "s") == [] and run_times(tmp_path, "q") == []
    assert len(run_times(tmp_path, "later")) == 1


async def test_a_late_result_of_a_cancelled_running_task_is_discarded_across_a_kill(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, APP)
    release = tmp_path / "release"
    client = remote_twin(durable.app, broker)
    try:
        async with client:
            # The task swallows CancelledError and goes on: its node reports a SUCCESS later.
            task_id = await client.submit(
                durable.shrug_off_cancel, str(tmp_path), "c", str(release)
            )
            await wait_for_glob(tmp_path, "c.*.run")
            assert await client.cancel(task_id) is True
            broker = launcher.restart(broker)

            assert (await status_of(client, task_id)).status is TaskStatus.CANCELLED
            # The node serves the new broker (it reported the attempt it still runs).
            probe = await client.submit(durable.record, str(tmp_path), "probe")
            assert (await client.wait_for_result(probe, timeout=15)).success
            release.touch()
            await wait_for_glob(tmp_path, "c-done.*.run")
            # The node queued the outcome as the task returned; a later task's result comes
            # after it on the same connection, so once that is in, the broker has seen it.
            sentinel = await client.submit(durable.record, str(tmp_path), "sentinel")
            assert (await client.wait_for_result(sentinel, timeout=15)).success
            final = await client.wait_for_result(task_id, timeout=5)
            again = await status_of(client, task_id)
    finally:
        release.touch()  # else the task outlives a failed test and holds its node up

    assert final.status is TaskStatus.CANCELLED and final.result is None
    assert again.status is TaskStatus.CANCELLED
    assert len(run_times(tmp_path, "c")) == 1  # not run again after the restart


# --------------------------------------------------------------------------- schedules

INTERVAL_S = 1.5
KILLS = 3
RUN_S = 0.4  # each run takes a while, so some kills land while one is running
# A kill within the first moments of a slot can land between the dispatch of the slot's task
# and the commit that stores it: then the slot's task runs again under the same id (the
# documented at-least-once execution; it still gets one result). Kills avoid that window.
KILL_AFTER_SLOT_S = (0.1, 1.4)


async def slot_result(client: Flowrra, schedule: str, slot: float) -> TaskResult | None:
    """The task of the slot at ``slot`` (read back from a datetime: it may be off by 1 ms)."""
    exact = round(slot * 1000)
    for ms in (exact, exact - 1, exact + 1):
        result = await client.get_result(slot_task_id(schedule, ms / 1000))
        if result is not None:
            return result
    return None


async def test_an_interval_schedule_runs_each_slot_once_across_kills(
    launcher: Launcher, tmp_path: Path
) -> None:
    rng = random.Random()
    broker = launcher.broker(durability="full")
    launcher.node(broker, APP)
    client = remote_twin(durable.app, broker)
    outages: list[tuple[float, float]] = []  # (killed at, listening again at)
    async with client:
        scheduler = client.create_scheduler()
        schedule = await scheduler.schedule_interval(
            durable.timed_run, INTERVAL_S, args=(str(tmp_path), "tick", RUN_S)
        )
        declared = await scheduler.get_scheduled_task(schedule)
        assert declared is not None and declared.next_run_at is not None
        first_slot = declared.next_run_at.timestamp()

        async def fired(slot: float) -> ScheduledTask:
            """Until the schedule has started the slot at ``slot`` (or a later one)."""
            item = await poll(
                lambda: scheduler.get_scheduled_task(schedule),
                lambda s: (
                    s is not None
                    and s.last_run_at is not None
                    and s.last_run_at.timestamp() >= slot - 0.001
                ),
                timeout=15,
                what=f"the slot at {slot:.3f}",
            )
            assert item is not None
            return item

        async def next_slot() -> float:
            item = await scheduler.get_scheduled_task(schedule)
            assert item is not None and item.next_run_at is not None
            return item.next_run_at.timestamp()

        for _ in range(KILLS):
            slot = await next_slot()
            await fired(slot)
            # A random moment within that slot (fault injection, not synchronisation).
            await asyncio.sleep(max(0.0, slot + rng.uniform(*KILL_AFTER_SLOT_S) - time.time()))
            killed_at = time.time()
            broker = launcher.restart(broker)
            outages.append((killed_at, time.time()))
        # One more slot on schedule after the last restart, then close the window.
        await fired(await next_slot())
        assert await scheduler.disable_task(schedule) is True
        item = await scheduler.get_scheduled_task(schedule)
        assert item is not None and item.last_run_at is not None
        last_slot = item.last_run_at.timestamp()
        slots: list[float] = []
        while (slot := first_slot + len(slots) * INTERVAL_S) <= last_slot + 0.001:
            slots.append(slot)
        found: dict[float, TaskResult] = {}
        for slot in slots:
            result = await slot_result(client, schedule, slot)
            if result is not None:
                found[slot] = await client.wait_for_result(result.task_id, timeout=15)

    context = {"outages": outages, "found": found}
    assert len(slots) >= KILLS + 1, context  # a slot per kill, and one after the last
    assert item.last_task_id == found[last_slot].task_id
    for slot in slots:
        outage = next(((k, u) for k, u in outages if k < slot <= u), None)
        if outage is None:  # the broker was up at the slot: its task ran
            assert slot in found, (slot, context)
            assert found[slot].status is TaskStatus.SUCCESS, (slot, context)
        elif slot == max(s for s in slots if s <= outage[1]):
            # catch_up="once": the latest slot missed while down starts on the restart.
            assert slot in found, (slot, context)
            assert found[slot].status in (TaskStatus.SUCCESS, TaskStatus.EXPIRED), context
        # Earlier slots of an outage longer than the interval may have no task at all.
    ran = {slot: r for slot, r in found.items() if r.status is TaskStatus.SUCCESS}
    for slot, result in ran.items():
        assert result.result >= slot - EARLY_TOLERANCE_S, (slot, result)
    # Every run that completed is the run whose result a slot's task recorded, once each.
    # (Starts are not counted: an attempt taken back from its node is cancelled there before
    # it completes, see the duplicate-READY test below.)
    completed = marker_times(tmp_path, "tick.*.done")
    assert completed == sorted(r.result for r in ran.values()), (
        completed,
        marker_times(tmp_path, "tick.*.start"),
        context,
    )


class ScriptedNode:
    """A node played by hand over a DEALER socket, to order its messages exactly. It
    heartbeats every 100 ms (from :meth:`start`), as a node does."""

    def __init__(self, url: str, node_id: str) -> None:
        self.node_id = node_id
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(url)
        self.inbox: list[protocol.Message] = []
        self._beating: asyncio.Task[None] | None = None

    def send(self, command: Command, body: object = None) -> None:
        self.socket.send_multipart(protocol.encode(command, body))

    def start(self) -> None:
        async def beat() -> None:
            while True:
                self.send(Command.HEARTBEAT)
                await asyncio.sleep(0.1)

        self._beating = asyncio.create_task(beat())

    def ready(self, running: list[tuple[str, int]]) -> None:
        ready = protocol.NodeReady(
            node_id=self.node_id,
            hostname="scripted",
            pid=os.getpid(),
            async_slots=10,
            cpu_slots=0,
            tasks={name: SlotKind.ASYNC for name in durable.app.tasks},
            running=running,
        )
        self.send(Command.READY, ready.to_wire())

    def received(self, command: Command) -> list[protocol.Message]:
        """The messages of that command received so far (they stay in the inbox)."""
        while self.socket.poll(0):
            self.inbox.append(protocol.decode(self.socket.recv_multipart()))
        return [m for m in self.inbox if m.command is command]

    async def expect(self, command: Command, timeout: float = 10.0) -> protocol.Message:
        """The first message of that command not taken yet, in arrival order."""
        deadline = time.monotonic() + timeout
        while not self.received(command):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {command.name} within {timeout}s: {self.inbox}")
            await asyncio.sleep(0.005)
        message = self.received(command)[0]
        self.inbox.remove(message)
        return message

    async def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        self.socket.close()
        self.context.term()


async def test_a_duplicate_ready_after_a_restart_does_not_run_a_task_again(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    client = remote_twin(durable.app, broker)
    node = ScriptedNode(broker.url, "scripted-node")
    try:
        async with client:
            task_id = await client.submit(durable.record, str(tmp_path), "x")  # no node yet
            broker = launcher.restart(broker)
            # What a real node's socket delivers after an outage shorter than its liveness
            # window: the heartbeats it sent meanwhile, each answered with RECONNECT.
            node.send(Command.HEARTBEAT)
            node.send(Command.HEARTBEAT)
            await node.expect(Command.RECONNECT)
            await node.expect(Command.RECONNECT)
            node.ready(running=[])  # for the first RECONNECT
            await node.expect(Command.WELCOME)
            node.start()
            (dispatch,) = protocol.parse_tasks((await node.expect(Command.TASKS)).body)
            assert (dispatch.task_id, dispatch.attempt) == (task_id, 1)
            # For the second RECONNECT, read before the TASKS: nothing was running yet. (A
            # real node sends it a few ms after the first; here it reaches the broker after
            # the tick that dispatched the task, as it sometimes does for real.)
            node.ready(running=[])
            await node.expect(Command.WELCOME)
            now = time.time()
            outcome = protocol.Outcome(task_id, 1, protocol.pack_value("x"), None, now, now)
            node.send(Command.RESULTS, [outcome.to_wire()])
            # Until the task is complete, or the broker hands it out again.
            result = await poll(
                lambda: client.get_result(task_id),
                lambda r: (r is not None and r.is_complete) or bool(node.received(Command.TASKS)),
                timeout=10,
                what="a final result or another dispatch",
            )
            again = [d for m in node.received(Command.TASKS) for d in protocol.parse_tasks(m.body)]
    finally:
        await node.close()
    assert again == [], "attempt 1 was taken back and the task dispatched again"
    assert result is not None and result.status is TaskStatus.SUCCESS and result.result == "x"


# --------------------------------------------------------------------------- expiry


async def test_tasks_expire_with_no_node_and_never_run_after_a_kill(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")  # and no node
    client = remote_twin(durable.app, broker)
    async with client:
        submitted = time.time()
        soon = await client.submit(durable.record, str(tmp_path), "soon", expires=0.5)
        later = await client.submit(durable.record, str(tmp_path), "later", expires=2.5)
        expired = await client.wait_for_result(soon, timeout=5)
        waited = time.time() - submitted
        assert (await status_of(client, later)).status is TaskStatus.PENDING
        broker = launcher.restart(broker)  # "later"'s deadline passes after the restart
        assert (await status_of(client, soon)).status is TaskStatus.EXPIRED
        expired_later = await client.wait_for_result(later, timeout=10)
        waited_later = time.time() - submitted

        launcher.node(broker, APP, concurrency=1)
        # Had either been queued still, it would run before this one.
        sentinel = await client.submit(durable.record, str(tmp_path), "sentinel")
        assert (await client.wait_for_result(sentinel, timeout=15)).success

    assert expired.status is TaskStatus.EXPIRED and "deadline" in (expired.error or "")
    assert 0.5 - EARLY_TOLERANCE_S <= waited < 3.0, waited
    assert expired_later.status is TaskStatus.EXPIRED
    assert 2.5 - EARLY_TOLERANCE_S <= waited_later < 6.0, waited_later
    assert run_times(tmp_path, "soon") == [] and run_times(tmp_path, "later") == []
