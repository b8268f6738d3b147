"""Clear errors: each mistake raises a specific exception, at the right moment.

Submit-side checks run against a fake broker (a ROUTER and an XPUB socket in this test) that
records every message, which proves a refused submit sent nothing. The other checks run on the
embedded default and against a real broker and node.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from flowrra import (
    Flowrra,
    FlowrraError,
    SerializationError,
    TaskNotFoundError,
    TaskStatus,
)
from flowrra.protocol import (
    Command,
    Welcome,
    decode,
    encode,
    encode_publication,
    parse_submit,
    unpack_args,
)
from tests.apps import fleet
from tests.conftest import Launcher, embedded_twin, remote_twin


class FakeBroker:
    """Just enough broker for a client to connect and submit; records what it receives."""

    def __init__(self) -> None:
        self.context = zmq.asyncio.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.publisher = self.context.socket(zmq.XPUB)
        for socket in (self.router, self.publisher):
            socket.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:*")
        self.publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.publisher.bind("tcp://127.0.0.1:*")
        self.url = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.publish_url = self.publisher.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.received: list[tuple[Command, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._publish())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.router.close(linger=0)
        self.publisher.close(linger=0)
        self.context.term()

    async def _serve(self) -> None:
        welcome = Welcome("fake", self.publish_url, 1000, 3, 1 << 20).to_wire()
        while True:
            peer, *frames = await self.router.recv_multipart()
            message = decode(frames)
            self.received.append((message.command, message.body))
            if message.command is Command.HELLO:
                reply = encode(Command.WELCOME, welcome)
            elif message.command is Command.SUBMIT:
                reply = encode(Command.ACK, [[s.task_id, None] for s in parse_submit(message.body)])
            elif message.command is Command.GET:
                reply = encode(Command.STATE, [message.body[0], [None for _ in message.body[1]]])
            else:
                continue
            await self.router.send_multipart([peer, *reply])

    async def _publish(self) -> None:
        while True:
            (event,) = await self.publisher.recv_multipart()
            if event[:1] == b"\x01":
                await self.publisher.send_multipart(
                    encode_publication(event[1:], Command.SUBSCRIBED)
                )

    def commands(self) -> list[Command]:
        return [command for command, _ in self.received]


@pytest_asyncio.fixture
async def fake_broker() -> AsyncIterator[FakeBroker]:
    fake = FakeBroker()
    fake.start()
    yield fake
    await fake.close()


def not_a_task(x: int) -> int:
    return x


# --------------------------------------------------------------------------- submitting


async def test_unregistered_function_raises_task_not_found(fake_broker: FakeBroker) -> None:
    app = remote_twin(fleet.app, fake_broker.url)
    async with app:
        with pytest.raises(TaskNotFoundError, match=r"not_a_task.*@app\.task\(\)"):
            await app.submit(not_a_task, 1)
        with pytest.raises(TaskNotFoundError, match=r"no\.such\.task"):
            await app.submit("no.such.task")
        with pytest.raises(LookupError):  # TaskNotFoundError is a LookupError too
            await app.submit_many(not_a_task, [[1]])
    assert Command.SUBMIT not in fake_broker.commands()


async def test_unserializable_argument_fails_before_anything_is_sent(
    fake_broker: FakeBroker,
) -> None:
    app = remote_twin(fleet.app, fake_broker.url)
    async with app:
        for args, kwargs in [
            ((object(),), {}),
            ((), {"when": dt.date(2024, 1, 1)}),  # datetime travels, date does not
            (({"nested": [1, {2, 3}]},), {}),
        ]:
            with pytest.raises(SerializationError, match="cannot send a value of type") as info:
                await app.submit(fleet.echo, *args, **kwargs)
            assert isinstance(info.value, TypeError)
        with pytest.raises(SerializationError):
            await app.submit_many(fleet.echo, [[1], [object()]])  # all or nothing
        # The connection is still usable, and the next SUBMIT carries only the good task.
        task_id = await app.submit(fleet.echo, 1, when=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    assert fake_broker.commands().count(Command.SUBMIT) == 1
    (body,) = [b for c, b in fake_broker.received if c is Command.SUBMIT]
    (submission,) = parse_submit(body)
    assert submission.task_id == task_id
    assert unpack_args(submission.payload) == (
        (1,),
        {"when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)},
    )


async def test_submit_before_start_is_a_clear_error() -> None:
    app = remote_twin(fleet.app, "tcp://127.0.0.1:9")  # never started, never connected
    with pytest.raises(FlowrraError, match="not started"):
        await app.submit(fleet.echo, 1)


def test_wrong_decorator_combinations_raise_type_error() -> None:
    app = Flowrra.from_urls()
    with pytest.raises(TypeError, match="'async def' but cpu_bound=True"):

        @app.task(cpu_bound=True)
        async def both() -> None: ...

    with pytest.raises(TypeError, match="generator"):

        @app.task()
        def generator() -> Any:
            yield 1

    with pytest.raises(TypeError, match="defined inside another function"):

        @app.task(cpu_bound=True)
        def nested() -> None: ...

    with pytest.raises(TypeError, match="priority must be an int"):
        app.task(priority="high")(not_a_task)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_retries"):
        app.task(max_retries=-1)(not_a_task)
    with pytest.raises(ValueError, match="timeout"):
        app.task(timeout=0)(not_a_task)
    assert dict(app.tasks) == {}  # nothing half-registered


async def test_wrong_priority_type_at_submit(fake_broker: FakeBroker) -> None:
    app = remote_twin(fleet.app, fake_broker.url)
    async with app:
        for priority in (1.5, "10", True):
            with pytest.raises(TypeError, match="priority must be an int"):
                await app.submit(fleet.echo, priority=priority)  # type: ignore[arg-type]
    assert Command.SUBMIT not in fake_broker.commands()


# --------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def fleet_broker(module_launcher: Launcher) -> Any:
    broker = module_launcher.broker()
    module_launcher.node(broker, "tests.apps.fleet:app", concurrency=4)
    return broker


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest) -> Flowrra:
    if request.param == "embedded":
        return embedded_twin(fleet.app, processes=0)  # these tests use no cpu_bound task
    return remote_twin(fleet.app, request.getfixturevalue("fleet_broker"))


async def test_wait_for_result_timeout(app: Flowrra, tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with app:
        task_id = await app.submit(fleet.hold, str(tmp_path), str(release))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError, match=rf"task {task_id} did not finish within 0\.3s"):
            await app.wait_for_result(task_id, timeout=0.3)
        assert 0.29 <= loop.time() - started < 2.0
        # The task is unaffected, and waiting again works.
        still = await app.get_result(task_id)
        assert still is not None and not still.is_complete
        release.touch()
        result = await app.wait_for_result(task_id, timeout=10)
    assert result.status is TaskStatus.SUCCESS


async def test_get_result_of_unknown_id_is_none(app: Flowrra) -> None:
    async with app:
        known = await app.submit(fleet.echo, "x")
        assert await app.get_result("0" * 32) is None
        assert await app.get_result("no-such-task") is None
        assert await app.get_result(known[:-1] + ("0" if known[-1] != "0" else "1")) is None
        assert (await app.wait_for_result(known, timeout=10)).success


async def test_task_errors_are_reported_with_type_message_and_traceback(app: Flowrra) -> None:
    async with app:
        failing = await app.submit(fleet.raises_value_error, "bad input 42")
        unsendable = await app.submit(fleet.returns_object)
        failed = await app.wait_for_result(failing, timeout=10)
        bad_result = await app.wait_for_result(unsendable, timeout=10)
    assert failed.status is TaskStatus.FAILED and not failed.success
    assert failed.error == "ValueError: bad input 42"
    assert failed.traceback is not None and "raise ValueError(message)" in failed.traceback
    assert failed.retries == 0
    assert bad_result.status is TaskStatus.FAILED
    assert bad_result.error is not None
    assert bad_result.error.startswith("SerializationError: cannot send a value of type 'object'")
