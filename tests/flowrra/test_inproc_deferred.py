"""Deferred submits (confirm_submits=False) of one loop iteration, in-process: the first is
sent at once, the rest wait for the iteration's flush and share one confirmation."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowrra import SubmitRejected
from flowrra.broker.store import Durability
from tests.broker.test_store_faults import EIO, FaultyLmdbStore, _embedded, echo


async def test_a_batch_of_deferred_submits_shares_one_confirmation_and_each_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FAST)
    twin = _embedded(monkeypatch, store, tmp_path / "db", Durability.FAST, confirm_submits=False)
    async with twin:
        client = twin._connected()
        store.fault = EIO
        # No await in between yields to the loop: one iteration's submits.
        refused = [await twin.submit(echo, f"lost-{i}") for i in range(4)]
        # The first went out (and was refused) during its submit; the other three wait for
        # the flush, on one confirmation between them.
        assert len(client._deferred) == 1
        assert len({id(client._acks[task_id]) for task_id in refused[1:]}) == 1
        for task_id in refused:
            with pytest.raises(SubmitRejected, match="storage error"):
                await twin.wait_for_result(task_id, timeout=10)
        assert all(future.done() for future in client._deferred)
        store.fault = None
        kept = [await twin.submit(echo, f"kept-{i}") for i in range(4)]
        await client.confirmed(10)
        results = [await twin.wait_for_result(task_id, timeout=10) for task_id in kept]
        assert [r.result for r in results] == [f"kept-{i}" for i in range(4)]
        # The next iteration's deferred submits get a confirmation of their own.
        assert all(future.done() for future in client._deferred)
        assert client._batch_wait is None
