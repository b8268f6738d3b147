"""Less work per message and per task in the broker: the endpoint drains by ``EVENTS`` and
says whether anything waits; a queue entry written and taken in one tick never reaches the
store (a real ZeroMQ endpoint on loopback; the repository over a MemoryStore)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import zmq

from flowrra.broker.endpoint import ZmqBrokerEndpoint
from flowrra.broker.records import TaskRecord
from flowrra.broker.repository import TaskRepository
from flowrra.broker.store import MemoryStore, Table
from flowrra.transport import Wakeup
from tests.broker.harness import submission
from tests.conftest import free_port, wait_until


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


async def test_the_endpoint_says_when_something_waits(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    bind = f"tcp://127.0.0.1:{free_port()}"
    endpoint = ZmqBrokerEndpoint(bind, f"tcp://127.0.0.1:{free_port()}", Wakeup())
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(bind)
    try:
        assert not endpoint.has_input()
        assert endpoint.drain(10) == ([], [])
        for body in (b"one", b"two", b"three"):
            dealer.send(body)
        await wait_until(endpoint.has_input)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            messages, _ = endpoint.drain(2)
            assert len(messages) <= 2
            got.extend(frames[0] for _, frames in messages)
            if not messages:
                await asyncio.sleep(0.005)
        assert got == [b"one", b"two", b"three"]  # in order
        assert not endpoint.has_input()
    finally:
        dealer.close(linger=0)
        endpoint.close()


def _record(task_id: str, order: int) -> TaskRecord:
    return TaskRecord.from_submission(submission(task_id), order=order)


class QueueCountingStore(MemoryStore):
    """Counts the reads and deletes of queue entries."""

    def __init__(self) -> None:
        super().__init__()
        self.queue_ops = 0

    def get(self, table: Table, key: bytes) -> bytes | None:
        self.queue_ops += table is Table.QUEUE
        return super().get(table, key)

    def delete(self, table: Table, key: bytes) -> None:
        self.queue_ops += table is Table.QUEUE
        super().delete(table, key)


def test_a_queue_entry_taken_in_its_tick_is_never_written() -> None:
    store = QueueCountingStore()
    repo = TaskRepository(store)
    repo.add(_record("t1", 1))
    repo.add(_record("t2", 2))
    assert repo.queued_task(1) == "t1"
    assert repo.take_queued(1) == "t1"
    assert store.queue_ops == 0  # no read, no delete: the buffered write was taken back
    store.commit()
    repo.end_tick()
    # t1's entry never reached the store; t2's is there, and taking it later deletes it.
    assert [key for key, _ in store.scan(Table.QUEUE)] == [TaskRepository.queue_key(2)]
    assert repo.take_queued(2) == "t2"
    store.commit()
    assert list(store.scan(Table.QUEUE)) == []


def test_a_queue_entry_committed_within_the_tick_is_deleted() -> None:
    """A commit between adding and taking (tests do that): the entry is stored, so taking
    it must delete it."""
    store = MemoryStore()
    repo = TaskRepository(store)
    repo.add(_record("t1", 1))
    store.commit()
    assert repo.take_queued(1) == "t1"
    store.commit()
    assert list(store.scan(Table.QUEUE)) == []
