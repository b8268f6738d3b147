"""Late acknowledgements: a client that does not wait for its ACKs (``late_acks`` in its
HELLO) gets the ACK of a task dispatched at once together with the task's result, or after
``ACK_HOLD_MAX_S`` at the latest; a client whose submits wait for their ACK gets it at once.

The broker runs in this process over real ZeroMQ sockets on loopback; the node is a bare
DEALER speaking the protocol, so the test decides when an outcome arrives."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import zmq

import flowrra.broker.server as server
import flowrra.client as client_module
from flowrra import Flowrra
from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.endpoint import ZmqBrokerEndpoint
from flowrra.broker.server import BrokerService
from flowrra.broker.store import MemoryStore, StoreError
from flowrra.protocol import (
    Command,
    Dispatch,
    Outcome,
    decode,
    encode,
    pack_args,
    pack_value,
    parse_tasks,
)
from flowrra.transport import Wakeup, recv_frames
from tests.broker.harness import node_ready, submission
from tests.conftest import free_port

TASK = "tests.late_acks.echo"


@dataclass
class Setup:
    url: str
    node: zmq.Socket[bytes]
    service: BrokerService


def _recv(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> list[bytes]:
    if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise AssertionError("nothing arrived")
    return recv_frames(sock)


async def _next_body(sock: zmq.Socket[bytes], command: Command) -> object:
    """The body of the next ``command`` message on ``sock`` (others are skipped)."""
    while True:
        message = decode(await asyncio.to_thread(_recv, sock))
        if message.command is command:
            return message.body


async def _next_tasks(node: zmq.Socket[bytes]) -> list[Dispatch]:
    return parse_tasks(await _next_body(node, Command.TASKS))


async def _next_ack(sock: zmq.Socket[bytes]) -> list[object]:
    body = await _next_body(sock, Command.ACK)
    assert isinstance(body, list)
    return body


def _client_socket(url: str, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def _report(node: zmq.Socket[bytes], dispatch: Dispatch, value: object) -> None:
    now = time.time()
    outcome = Outcome(dispatch.task_id, dispatch.attempt, pack_value(value), None, now, now)
    node.send_multipart(encode(Command.RESULTS, [outcome.to_wire()]))


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    async with _running_broker(BrokerConfig(data_dir=None)) as running:
        yield running


@contextlib.asynccontextmanager
async def _running_broker(config: BrokerConfig) -> AsyncIterator[Setup]:
    url = f"tcp://127.0.0.1:{free_port()}"
    wakeup = Wakeup()
    endpoint = ZmqBrokerEndpoint(url, f"tcp://127.0.0.1:{free_port()}", wakeup)
    store = MemoryStore()
    service = BrokerService(
        Broker(store, config, endpoint.publish_endpoint),
        endpoint,
        wakeup,
        store,
    )
    running = asyncio.create_task(service.run())
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    node = _client_socket(url, context)
    ready = node_ready("late-ack-node", async_slots=10, tasks={TASK: "async"})
    node.send_multipart(encode(Command.READY, ready.to_wire()))
    assert decode(await asyncio.to_thread(_recv, node)).command is Command.WELCOME
    try:
        yield Setup(url, node, service)
    finally:
        service.stop()
        await running
        endpoint.close()
        node.close(linger=0)
        context.term()


def _app(url: str, *, confirm_submits: bool) -> Flowrra:
    app = Flowrra.from_urls(url, confirm_submits=confirm_submits)
    app.task(name=TASK)(_echo)
    return app


async def _echo(x: int) -> int:
    return x


async def test_a_deferred_submit_is_acknowledged_with_its_result(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 30.0)  # no timing: only the result ends it
    async with _app(setup.url, confirm_submits=False) as app:
        client = app._connected()
        assert client.late_acks
        task_id = await app.submit(_echo, 7)
        (dispatch,) = await _next_tasks(setup.node)
        assert dispatch.task_id == task_id
        # Stored and dispatched, but the ACK waits for the outcome: nothing confirmed yet.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(client.confirmed(30.0)), 0.3)
        _report(setup.node, dispatch, 7)
        assert (await app.wait_for_result(task_id, timeout=5)).result == 7
        await client.confirmed(5.0)  # the ACK came with it


async def test_the_published_result_stands_for_the_held_ack(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result, published on the client's own prefix, acknowledges the submit: the
    broker sends no ACK for it at all (one message less each way)."""
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 30.0)
    acked: list[str] = []
    send = ZmqBrokerEndpoint.send

    def recording(self: ZmqBrokerEndpoint, peer: bytes, frames: list[bytes]) -> bool:
        message = decode(frames)
        if message.command is Command.ACK:
            acked.extend(item[0] for item in message.body)
        return send(self, peer, frames)

    monkeypatch.setattr(ZmqBrokerEndpoint, "send", recording)
    async with _app(setup.url, confirm_submits=False) as app:
        task_id = await app.submit(_echo, 5)
        (dispatch,) = await _next_tasks(setup.node)
        _report(setup.node, dispatch, 5)
        assert (await app.wait_for_result(task_id, timeout=5)).result == 5
        await app._connected().confirmed(5.0)
        # A later submit's ACK still comes: the one that goes out by the bound.
        monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 0.01)
        second = await app.submit(_echo, 6)
        await app._connected().confirmed(5.0)
    assert task_id not in acked
    assert second in acked


async def test_a_held_ack_leaves_after_the_bound_without_an_outcome(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 0.05)
    async with _app(setup.url, confirm_submits=False) as app:
        task_id = await app.submit(_echo, 1)
        (dispatch,) = await _next_tasks(setup.node)
        await app._connected().confirmed(5.0)  # the node never answered: the bound did it
        _report(setup.node, dispatch, 1)
        assert (await app.wait_for_result(task_id, timeout=5)).result == 1


async def test_a_client_that_waits_for_acks_gets_them_at_once(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 30.0)
    async with _app(setup.url, confirm_submits=True) as app:
        assert not app._connected().late_acks
        task_id = await asyncio.wait_for(app.submit(_echo, 3), 5)  # while the task runs
        (dispatch,) = await _next_tasks(setup.node)
        _report(setup.node, dispatch, 3)
        assert (await app.wait_for_result(task_id, timeout=5)).result == 3


def test_free_port_is_loopback() -> None:
    port = free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # still free, and on loopback


async def _hello(sock: zmq.Socket[bytes], body: dict[str, object]) -> None:
    sock.send_multipart(encode(Command.HELLO, body))
    assert decode(await asyncio.to_thread(_recv, sock)).command is Command.WELCOME


async def test_a_held_ack_still_leaves_after_its_client_says_hello_without_late_acks(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only late-ack client sends a new HELLO without ``late_acks`` (same routing id)
    while its ACK is held: the broker forgets the flag, and the held ACK must still leave
    (at the bound at the latest) instead of staying held for ever."""
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 0.05)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = _client_socket(setup.url, context)
    try:
        prefix = "ab" * 8
        await _hello(client, {"role": "client", "id": prefix, "late_acks": True})
        task_id = prefix + "01" * 8
        wire = submission(task_id, name=TASK, payload=pack_args([1], {})).to_wire()
        client.send_multipart(encode(Command.SUBMIT, [wire]))
        (dispatch,) = await _next_tasks(setup.node)  # stored, dispatched: its ACK is held
        assert dispatch.task_id == task_id
        await _hello(client, {"role": "client", "id": prefix})  # no late_acks any more
        assert await _next_ack(client) == [[task_id, None]]
    finally:
        client.close(linger=0)
        context.term()


async def test_a_lost_result_publication_is_recovered_by_the_resend(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker leaves the held ACK out because the result it publishes stands for it; if
    that publication never reaches the client, the client re-sends the submit, and the
    idempotent resubmit of a finished task is acknowledged (and the waiter asks)."""
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 30.0)  # only the result releases it
    monkeypatch.setattr(client_module, "RESEND_INTERVAL_S", 0.05)
    monkeypatch.setattr(client_module, "QUIET_REQUERY_S", 0.05)
    acked: list[str] = []
    dropped: list[bytes] = []
    send, publish = ZmqBrokerEndpoint.send, ZmqBrokerEndpoint.publish

    def recording(self: ZmqBrokerEndpoint, peer: bytes, frames: list[bytes]) -> bool:
        message = decode(frames)
        if message.command is Command.ACK:
            acked.extend(item[0] for item in message.body)
        return send(self, peer, frames)

    def losing(self: ZmqBrokerEndpoint, frames: list[bytes]) -> None:
        if decode(frames[1:]).command is Command.RESULT and not dropped:
            dropped.append(frames[0])  # the first RESULT publication is lost on the way
            return
        publish(self, frames)

    monkeypatch.setattr(ZmqBrokerEndpoint, "send", recording)
    monkeypatch.setattr(ZmqBrokerEndpoint, "publish", losing)
    async with _app(setup.url, confirm_submits=False) as app:
        client = app._connected()
        task_id = await app.submit(_echo, 4)
        (dispatch,) = await _next_tasks(setup.node)
        _report(setup.node, dispatch, 4)
        await client.confirmed(5.0)  # by the re-sent submit's ACK
        assert dropped == [client.client_id.encode()]
        assert acked == [task_id]
        assert (await app.wait_for_result(task_id, timeout=5)).result == 4


async def test_a_result_that_may_expire_before_a_resend_does_not_stand_for_the_ack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a result TTL shorter than the client's resend interval, a lost publication
    would make the resend find nothing and run the task again. Such a broker sends the
    held ACK even when it publishes the result: the task is accepted and runs once."""
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 30.0)  # only the result releases it
    monkeypatch.setattr(client_module, "RESEND_INTERVAL_S", 0.5)
    config = BrokerConfig(data_dir=None, result_ttl_s=0.05, expiry_sweep_interval_s=0.01)
    publish = ZmqBrokerEndpoint.publish
    dropped: list[bytes] = []

    def losing(self: ZmqBrokerEndpoint, frames: list[bytes]) -> None:
        if decode(frames[1:]).command is Command.RESULT:
            dropped.append(frames[0])  # every RESULT publication is lost on the way
            return
        publish(self, frames)

    monkeypatch.setattr(ZmqBrokerEndpoint, "publish", losing)
    async with _running_broker(config) as running, _app(running.url, confirm_submits=False) as app:
        client = app._connected()
        assert client.late_acks
        await app.submit(_echo, 8)
        (dispatch,) = await _next_tasks(running.node)
        _report(running.node, dispatch, 8)
        await client.confirmed(5.0)
        assert dropped == [client.client_id.encode()]
        assert running.service.broker.counters["submitted"] == 1  # not accepted again


async def test_a_held_ack_stays_a_stored_ack_when_a_later_commit_fails(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ACK held after its commit is for a stored task: a later tick whose commit fails
    refuses that tick's submissions only, and the held ACK still leaves as stored."""
    monkeypatch.setattr(server, "ACK_HOLD_MAX_S", 0.2)
    store = setup.service.store
    commit = store.commit
    failures = [StoreError("disk full (test)")]

    def failing_once() -> None:
        if failures:
            raise failures.pop()
        commit()

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = _client_socket(setup.url, context)
    try:
        prefix = "cd" * 8
        await _hello(client, {"role": "client", "id": prefix, "late_acks": True})
        stored, refused = prefix + "01" * 8, prefix + "02" * 8
        wire = submission(stored, name=TASK, payload=pack_args([1], {})).to_wire()
        client.send_multipart(encode(Command.SUBMIT, [wire]))
        (dispatch,) = await _next_tasks(setup.node)  # committed; its ACK is held
        assert dispatch.task_id == stored
        monkeypatch.setattr(store, "commit", failing_once)
        wire = submission(refused, name=TASK, payload=pack_args([2], {})).to_wire()
        client.send_multipart(encode(Command.SUBMIT, [wire]))
        items: dict[str, object] = {}
        while len(items) < 2:
            items.update((item[0], item[1]) for item in await _next_ack(client))
        assert failures == []  # the second tick's commit failed
        assert items[stored] is None
        assert isinstance(items[refused], str) and "storage error" in items[refused]
    finally:
        client.close(linger=0)
        context.term()
