"""A client whose broker is down gets BrokerUnavailable after a bounded, configurable wait;
it never hangs."""

from __future__ import annotations

import time

import pytest

from flowrra import Flowrra
from flowrra.errors import BrokerUnavailable
from tests.apps import failures
from tests.conftest import Launcher, free_port, remote_twin


async def test_connecting_to_no_broker_fails_after_the_connect_timeout() -> None:
    app = Flowrra.from_urls(broker=f"tcp://127.0.0.1:{free_port()}", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"within 1"):
        await app.start()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0
    assert app._client is None  # nothing half-open is left behind


async def test_requests_to_a_killed_broker_fail_after_the_request_timeout(
    launcher: Launcher,
) -> None:
    broker = launcher.broker()
    # Strict submits: each one waits for the broker (the default's deferred confirmations
    # are covered by tests/durability/test_deferred_confirm.py).
    client = remote_twin(failures.app, broker, request_timeout=1, confirm_submits=True)
    async with client:
        task_id = await client.submit(failures.ping, 1)  # connected, and the broker answers
        broker.process.kill9()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"within 1"):
            await client.submit(failures.ping, 2)
        submit_s = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await client.get_result(task_id)
        get_s = time.monotonic() - started
    assert 0.9 <= submit_s < 3.0
    assert 0.9 <= get_s < 3.0
