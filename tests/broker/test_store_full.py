"""A full store is a clear error to the submitter, never a corrupt store or a dead broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.server import BrokerService
from flowrra.broker.store import Durability, LmdbStore, Table
from flowrra.client import BrokerClient
from flowrra.errors import SubmitRejected
from flowrra.inproc import InprocHub
from flowrra.protocol import Submission
from flowrra.transport import Wakeup


def _submission(client: BrokerClient, payload: bytes) -> Submission:
    return Submission(client.new_task_id(), "t", 0, payload, 0, 1.0, None, time.time())


async def test_a_full_store_refuses_submits_with_a_clear_error(tmp_path: Path) -> None:
    wakeup = Wakeup()
    hub = InprocHub(wakeup)
    store = LmdbStore(tmp_path, Durability.FAST, map_size=256 * 1024, max_map_size=512 * 1024)
    broker = Broker(store, BrokerConfig(data_dir=str(tmp_path)), hub.publish_endpoint)
    service = BrokerService(broker, hub, wakeup, store)
    running = asyncio.create_task(service.run())
    await service.ready.wait()
    client = BrokerClient(hub, request_timeout_s=10)
    await client.connect()
    try:
        small = _submission(client, b"\xc0" * 100)
        await client.submit([small])
        too_big = _submission(client, b"x" * 700_000)  # more than the store may ever hold
        with pytest.raises(SubmitRejected, match="broker storage error"):
            await client.submit([too_big])
        after = _submission(client, b"\xc0" * 100)
        await client.submit([after])  # the broker is still up and accepting
        assert broker.repo.get(small.task_id) is not None
        assert broker.repo.get(after.task_id) is not None
        assert broker.repo.get(too_big.task_id) is None
        assert len(broker.queues) == 2
    finally:
        await client.close()
        service.stop()
        await running
        store.close()
    reopened = LmdbStore(tmp_path, Durability.FAST)
    try:  # what was acknowledged is intact on disk
        assert reopened.get(Table.TASKS, small.task_id.encode()) is not None
        assert reopened.get(Table.TASKS, too_big.task_id.encode()) is None
    finally:
        reopened.close()
