"""Fewer wake-ups and system calls per message: a ZeroMQ socket is drained by ``EVENTS``
(no failed receive), a send followed by one later check cannot hide a message, and an
fsync'd commit after a tick that dispatched what it accepted waits for those tasks'
outcomes and commits them too (one commit per quick task), publishing nothing early."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

import flowrra.broker.server as server
from flowrra import Flowrra
from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.endpoint import ZmqBrokerEndpoint
from flowrra.broker.server import BrokerService
from flowrra.broker.store import Durability, LmdbStore
from flowrra.transport import Wakeup, WatchedSocket, recv_frames
from tests.conftest import free_port, wait_until


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    a.setsockopt(zmq.LINGER, 0)
    b.setsockopt(zmq.LINGER, 0)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.destroy(linger=0)


async def test_a_drain_receives_only_what_waits(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    a, b = pair
    wakeup = Wakeup()
    watched = WatchedSocket(a, wakeup)
    receives = 0

    def counting(socket: zmq.Socket[bytes], flags: int) -> list[bytes]:
        nonlocal receives
        receives += 1
        return recv_frames(socket, flags)

    try:
        assert watched.drain_with(10, counting) == [] and receives == 0
        for body in (b"one", b"two", b"three"):
            b.send_multipart([b"h", body])
        await wait_until(watched.has_input)  # the descriptor's callback saw them
        got: list[list[bytes]] = []
        while len(got) < 3:
            got.extend(watched.drain_with(10, counting))
            if len(got) < 3:
                await wait_until(watched.has_input)
        assert [frames[1] for frames in got] == [b"one", b"two", b"three"]
        assert receives == 3  # one receive per message, none that failed
        assert not watched.has_input()
    finally:
        watched.close()


async def test_after_a_send_the_next_check_asks_zeromq(
    pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    a, b = pair
    watched = WatchedSocket(a, Wakeup())
    try:
        assert watched.drain(10) == []
        b.send(b"ping")
        # Something other than the watcher lets libzmq take the arrival (as a send can):
        # the descriptor will not signal it again, and the watcher does not know of it.
        assert a.poll(5000, zmq.POLLIN)
        watched.sent()  # what the broker's endpoint does after each send
        assert watched.has_input()  # one EVENTS check finds it
        assert watched.drain(10) == [[b"ping"]]
        assert not watched.has_input()
    finally:
        watched.close()


async def test_a_quick_task_takes_one_fsynced_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its acceptance, dispatch and outcome share one commit, and the result is published
    after that commit returned."""
    monkeypatch.setattr(server, "LINGER_MAX_S", 30.0)  # no timing in the test: wait for it
    app = Flowrra.from_urls(data_dir=str(tmp_path), durability="full")

    @app.task()
    async def double(x: int) -> int:
        return 2 * x

    async with app:
        service = app._service
        assert service is not None
        service._commit_s = 30.0
        commit = service.store.commit
        commits: list[int] = []

        def counted() -> None:
            commit()
            commits.append(len(commits) + 1)

        service.store.commit = counted  # type: ignore[method-assign]
        await app.wait_for_result(await app.submit(double, 1))  # the first may differ
        commits.clear()
        result = await app.wait_for_result(await app.submit(double, 21))
        committed_when_heard = len(commits)
        assert result.result == 42
        assert committed_when_heard == 1  # published after the one commit, not before
        assert commits == [1]


async def test_an_acknowledgement_does_not_wait_for_a_slow_task(tmp_path: Path) -> None:
    """The commit waits for outcomes for about one commit's time at most: a task that runs
    on is acknowledged anyway (confirm_submits waits for the ACK, not the result)."""
    app = Flowrra.from_urls(data_dir=str(tmp_path), durability="full", confirm_submits=True)
    release = asyncio.Event()

    @app.task()
    async def held() -> str:
        await release.wait()
        return "done"

    async with app:
        task_id = await app.submit(held)  # returns once acknowledged (committed)
        record = await app.get_result(task_id)
        assert record is not None and record.status.value in ("pending", "running")
        release.set()
        assert (await app.wait_for_result(task_id)).result == "done"


async def test_the_broker_process_commits_on_its_loop_and_embedded_off_it(
    tmp_path: Path,
) -> None:
    """A standalone broker awaits its commit anyway, so it fsyncs on the loop's thread (a
    hand-off to a thread and back cost ~0.12 ms per commit); embedded, the app shares the
    loop, so the fsync runs on the commit thread."""
    import threading

    threads: list[str] = []
    store, endpoint, service = _standalone(
        tmp_path, lambda: threads.append(threading.current_thread().name)
    )
    running = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        app = Flowrra.from_urls(endpoint.bind_url)
        app.task()(_idle)
        async with app:
            await app.submit(_idle)  # queued (no node): one commit of the submit
        await wait_until(lambda: len(threads) >= 1)
    finally:
        service.stop()
        await running
        endpoint.close()
        store.close()
    assert set(threads) == {threading.main_thread().name}

    embedded = Flowrra.from_urls(data_dir=str(tmp_path / "embedded"), durability="full")
    embedded.task()(_idle)
    async with embedded:
        service = embedded._service
        assert service is not None
        embedded_threads: list[str] = []
        embedded_commit = service.store.commit

        def recorded_embedded() -> None:
            embedded_threads.append(threading.current_thread().name)
            embedded_commit()

        service.store.commit = recorded_embedded  # type: ignore[method-assign]
        await embedded.wait_for_result(await embedded.submit(_idle), timeout=10)
    assert embedded_threads and threading.main_thread().name not in embedded_threads


async def _idle() -> None:
    return None


async def test_over_zeromq_the_linger_polls_until_the_outcome_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standalone full-durability broker polls its sockets while it lingers (waking a
    sleeping loop cost ~0.1 ms a round): the outcome, sent by a bare node only once the test
    decides, still ends the linger, and the task's acceptance and outcome share one commit.
    (The linger is 30 s here, so only the outcome can end it in time.)"""
    from flowrra.protocol import Command, Outcome, decode, encode, pack_value, parse_tasks
    from tests.broker.harness import node_ready

    monkeypatch.setattr(server, "LINGER_MAX_S", 30.0)
    commits: list[float] = []
    store, endpoint, service = _standalone(
        tmp_path, lambda: commits.append(asyncio.get_running_loop().time())
    )
    running = asyncio.create_task(service.run())
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    node = context.socket(zmq.DEALER)
    node.setsockopt(zmq.LINGER, 0)

    def receive(command: Command) -> object:
        while True:
            assert node.poll(10_000, zmq.POLLIN), f"no {command.name}"
            message = decode(recv_frames(node))
            if message.command is command:
                return message.body

    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        node.connect(endpoint.bind_url)
        ready = node_ready("linger-node", async_slots=1, tasks={"tests.linger.idle": "async"})
        node.send_multipart(encode(Command.READY, ready.to_wire()))
        await asyncio.to_thread(receive, Command.WELCOME)
        app = Flowrra.from_urls(endpoint.bind_url)
        app.task(name="tests.linger.idle")(_idle)
        async with app:
            service._commit_s = 30.0
            commits.clear()
            task_id = await app.submit(_idle)
            (dispatch,) = parse_tasks(await asyncio.to_thread(receive, Command.TASKS))
            assert dispatch.task_id == task_id  # dispatched before its commit
            assert commits == []  # lingering: nothing committed yet
            now = time.time()
            outcome = Outcome(task_id, dispatch.attempt, pack_value(None), None, now, now)
            node.send_multipart(encode(Command.RESULTS, [outcome.to_wire()]))
            result = await app.wait_for_result(task_id, timeout=10)
            assert result.status.value == "success"
            assert len(commits) == 1  # acceptance, dispatch and outcome in one commit
    finally:
        service.stop()
        await running
        endpoint.close()
        node.close(linger=0)
        context.term()
        store.close()


def _standalone(
    tmp_path: Path, on_commit: Callable[[], None]
) -> tuple[LmdbStore, ZmqBrokerEndpoint, BrokerService]:
    """A full-durability broker over ZeroMQ on loopback, in this process, whose store calls
    ``on_commit`` after each commit, on the thread that committed."""
    store = LmdbStore(str(tmp_path / "standalone"), Durability.FULL)
    wakeup = Wakeup()
    endpoint = ZmqBrokerEndpoint(
        f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", wakeup
    )
    commit = store.commit

    def recorded() -> None:
        commit()
        on_commit()

    store.commit = recorded  # type: ignore[method-assign]
    service = BrokerService(
        Broker(store, BrokerConfig(data_dir=str(tmp_path)), endpoint.publish_endpoint),
        endpoint,
        wakeup,
        store,
    )
    return store, endpoint, service
