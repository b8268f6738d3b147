"""Peers that try to complete, adopt or claim what is not theirs, and tasks whose errors
cannot be printed or encoded: nothing forged reaches a client, nothing stays stuck."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
import zmq

from flowrra import Flowrra, TaskStatus
from flowrra.errors import TaskIdConflict
from flowrra.protocol import (
    MAX_ITEMS_PER_MESSAGE,
    Command,
    NodeReady,
    Outcome,
    SlotKind,
    decode,
    encode,
    pack_args,
    pack_value,
    parse_ack,
)
from tests.apps import failures
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin, wait_for_glob
from tests.failures.helpers import counter
from tests.failures.test_hostile_peers import raw_dealer

APP = "tests.apps.failures:app"


def _forged_results(task_id: str, attempt: int = 1) -> list[bytes]:
    now = time.time()
    outcome = Outcome(task_id, attempt, pack_value("FORGED"), None, now, now)
    return encode(Command.RESULTS, [outcome.to_wire()])


def _fake_node_ready(node_id: str, running: list[tuple[str, int]]) -> list[bytes]:
    ready = NodeReady(
        node_id=node_id,
        hostname="attacker",
        pid=1,
        async_slots=1,
        cpu_slots=0,
        tasks={"tests.apps.failures.hold": SlotKind.ASYNC},
        running=running,
    )
    return encode(Command.READY, ready.to_wire())


def _replies(dealer: zmq.Socket[bytes], until: Command, timeout_s: float = 5.0) -> list[Command]:
    """Commands received until ``until`` arrives (or the timeout)."""
    seen: list[Command] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dealer.poll(50):
            command = decode(dealer.recv_multipart()).command
            seen.append(command)
            if command is until:
                break
    return seen


async def test_no_peer_but_the_lease_holder_can_complete_a_running_task(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    node = launcher.node(broker, APP)
    release = tmp_path / "release"
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.hold, str(tmp_path), str(release))
        await wait_for_glob(tmp_path, "hold.*.*")  # running on the real node
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            # A peer that never registered...
            stranger = raw_dealer(context, broker.url)
            stranger.send_multipart(_forged_results(task_id))
            assert Command.RECONNECT in _replies(stranger, Command.RECONNECT)
            # ...and one that registers as a node claiming the running attempt.
            impostor = raw_dealer(context, broker.url)
            impostor.send_multipart(_fake_node_ready("impostor", [(task_id, 1)]))
            assert Command.WELCOME in _replies(impostor, Command.WELCOME)
            impostor.send_multipart(_forged_results(task_id))
            # Both refusals are counted before the real outcome is let through.
            for _ in range(250):
                if await counter(client, "foreign_results") >= 2:
                    break
                await asyncio.sleep(0.02)
            assert await counter(client, "foreign_results") == 2
            pending = await client.get_result(task_id)
            assert pending is not None and pending.status is TaskStatus.RUNNING
            stranger.close(linger=0)
            impostor.close(linger=0)
        finally:
            context.term()
        release.write_text("go")
        result = await client.wait_for_result(task_id, timeout=15)
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"pid": node.process.pid}


def test_task_ids_are_not_guessable_from_the_public_prefix() -> None:
    from flowrra.client import BrokerClient

    client = BrokerClient.__new__(BrokerClient)
    client.client_id = "0123456789abcdef"
    client._random_ids = []
    ids = [BrokerClient.new_task_id(client) for _ in range(1000)]
    assert all(i.startswith("0123456789abcdef") and len(i) == 32 for i in ids)
    suffixes = {int(i[16:], 16) for i in ids}
    assert len(suffixes) == 1000
    # Not a counter: consecutive ids are far apart.
    ordered = [int(i[16:], 16) for i in ids]
    assert sum(1 for a, b in itertools.pairwise(ordered) if abs(b - a) < 2**32) < 5


@pytest.fixture(params=["embedded", "remote"])
def mode_app(request: pytest.FixtureRequest, launcher: Launcher) -> Flowrra:
    if request.param == "embedded":
        return embedded_twin(failures.app, processes=1)
    broker: BrokerProcess = launcher.broker()
    launcher.node(broker, APP)
    return remote_twin(failures.app, broker)


async def test_another_call_under_a_known_task_id_is_refused(mode_app: Flowrra) -> None:
    async with mode_app as app:
        assert await app.submit(failures.ping, 1, task_id="x") == "x"
        assert await app.submit(failures.ping, 1, task_id="x") == "x"  # idempotent
        with pytest.raises(TaskIdConflict, match="already used by another call"):
            await app.submit(failures.ping, 500, task_id="x")
        with pytest.raises(TaskIdConflict):
            await app.submit(failures.sink, b"", task_id="x")
        result = await app.wait_for_result("x", timeout=15)
    assert result.result == 1


async def test_errors_that_cannot_be_printed_or_encoded_never_cost_a_slot(
    launcher: Launcher,
) -> None:
    broker = launcher.broker()
    launcher.node(broker, APP, concurrency=4)
    async with remote_twin(failures.app, broker) as client:
        # More bad tasks than slots: a leaked slot would leave the healthy ones stuck.
        bad = [await client.submit(failures.raise_unprintable) for _ in range(6)]
        bad += [await client.submit(failures.raise_surrogate) for _ in range(6)]
        good = [await client.submit(failures.ping, i) for i in range(18)]
        results = await asyncio.gather(*(client.wait_for_result(t, timeout=20) for t in bad + good))
    unprintable, surrogate, healthy = results[:6], results[6:12], results[12:]
    assert all(r.status is TaskStatus.FAILED for r in unprintable + surrogate)
    assert all("UnprintableError: <unprintable UnprintableError object>" in (r.error or "")
               for r in unprintable)  # fmt: skip
    assert all("bad text: \\ud800" in (r.error or "") for r in surrogate)
    assert [r.result for r in healthy] == list(range(18))


async def test_an_attempt_a_live_node_never_reports_runs_again_elsewhere(
    launcher: Launcher,
) -> None:
    broker = launcher.broker(args=["--lease-grace", "1"])
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    silent = raw_dealer(context, broker.url)
    ready = NodeReady(
        node_id="silent",
        hostname="silent",
        pid=1,
        async_slots=1,
        cpu_slots=0,
        tasks={"tests.apps.failures.timed_ping": SlotKind.ASYNC},
        running=[],
    )
    silent.send_multipart(encode(Command.READY, ready.to_wire()))
    assert Command.WELCOME in _replies(silent, Command.WELCOME)

    async def keep_heartbeating() -> None:  # alive, but never reports its task
        while True:
            silent.send_multipart(encode(Command.HEARTBEAT))
            while silent.poll(0):
                silent.recv_multipart()
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(keep_heartbeating())
    try:
        async with remote_twin(failures.app, broker) as client:
            task_id = await client.submit(failures.timed_ping, 7)
            for _ in range(250):
                status = await client.get_result(task_id)
                if status is not None and status.status is TaskStatus.RUNNING:
                    break
                await asyncio.sleep(0.02)
            launcher.node(broker, APP)  # a real node, which gets the attempt once it is lost
            result = await client.wait_for_result(task_id, timeout=20)
            assert await counter(client, "overdue") == 1
        assert result.status is TaskStatus.SUCCESS and result.result == 7
    finally:
        beating.cancel()
        silent.close(linger=0)
        context.term()


async def test_a_flood_of_large_submits_is_sliced_and_nobody_is_starved(
    launcher: Launcher,
) -> None:
    broker = launcher.broker()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    flooder = raw_dealer(context, broker.url)
    try:
        payload = pack_args([1], {})
        now = time.time()
        messages = [
            [[f"flood-{m}-{i}", "tests.apps.failures.ping", 0, payload, 0, 0.0, None, now]
             for i in range(MAX_ITEMS_PER_MESSAGE)]
            for m in range(8)
        ]  # fmt: skip
        for items in messages:
            flooder.send_multipart(encode(Command.SUBMIT, items))
        # One message over the cap is dropped whole, without an answer.
        too_many = [
            *messages[0],
            ["extra", "tests.apps.failures.ping", 0, payload, 0, 0.0, None, now],
        ]
        flooder.send_multipart(encode(Command.SUBMIT, too_many))
        async with remote_twin(failures.app, broker) as client:
            launcher.node(broker, APP)
            task_id = await client.submit(failures.ping, 5, priority=9)
            assert (await client.wait_for_result(task_id, timeout=30)).result == 5
            acked: set[str] = set()
            deadline = time.monotonic() + 30
            while len(acked) < 8 * MAX_ITEMS_PER_MESSAGE and time.monotonic() < deadline:
                if flooder.poll(100):
                    for ack in parse_ack(decode(flooder.recv_multipart()).body):
                        assert ack.error is None
                        acked.add(ack.task_id)
            assert len(acked) == 8 * MAX_ITEMS_PER_MESSAGE
            assert await counter(client, "malformed") == 1
            status = await client.get_result("extra")
            assert status is None
    finally:
        flooder.close(linger=0)
        context.term()
