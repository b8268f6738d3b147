"""Submits that return before the broker's acknowledgement (the default, named here all the
same: confirm_submits=False): the client keeps every one until the broker has stored it, so a
broker kill -9 in a burst of sequential submits loses nothing and doubles nothing; refusals
reach the task's waiters, and stopping the app waits (bounded) for the confirmations."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from flowrra import BrokerUnavailable, SubmitRejected
from flowrra.broker.store import Durability
from tests.apps import durable
from tests.broker.test_store_faults import EIO, FaultyLmdbStore, _embedded, echo
from tests.conftest import Launcher, remote_twin
from tests.durability.test_broker_kill import finals, runs


async def test_a_kill_in_a_burst_of_sequential_submits_loses_and_doubles_nothing(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    launcher.node(broker, "tests.apps.durable:app", concurrency=20)
    client = remote_twin(durable.app, broker, request_timeout=60, confirm_submits=False)
    keys = [f"b{i}" for i in range(300)]
    async with client:
        ids = []
        for index, key in enumerate(keys):
            ids.append(await client.submit(durable.record, str(tmp_path), key))
            if index == 150:
                broker = launcher.restart(broker)  # mid-burst; the client stays alive
        statuses = await finals(client, ids, timeout=60)
    assert set(statuses.values()) == {"success"}
    assert [runs(tmp_path, key) for key in keys] == [1] * len(keys)


async def test_stop_waits_for_confirmations_and_says_when_they_do_not_come(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker(durability="full")
    client = remote_twin(durable.app, broker, request_timeout=1, confirm_submits=False)
    await client.start()
    broker.process.proc.send_signal(signal.SIGSTOP)
    try:
        # Returns at once: the submission is in the client's hands, not stored yet.
        task_id = await asyncio.wait_for(client.submit(durable.record, str(tmp_path), "x"), 2)
        assert task_id
        with pytest.raises(BrokerUnavailable, match="did not confirm 1 submitted task"):
            await client.stop()
    finally:
        broker.process.proc.send_signal(signal.SIGCONT)


async def test_a_refusal_reaches_the_tasks_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FAST)
    twin = _embedded(monkeypatch, store, tmp_path / "db", Durability.FAST, confirm_submits=False)
    async with twin:
        store.fault = EIO
        refused = await twin.submit(echo, "lost")  # returns before the commit fails
        with pytest.raises(SubmitRejected, match="storage error"):
            await twin.wait_for_result(refused, timeout=10)
        store.fault = None
        kept = await twin.submit(echo, "kept")
        assert (await twin.wait_for_result(kept, timeout=10)).result == "kept"
