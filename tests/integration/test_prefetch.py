"""cpu_bound tasks dispatched ahead of a free worker process, embedded and through a broker
and node process (one worker process): the waiting task's timeout and start time count
from when it gets the worker, and it can be cancelled while it waits."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowrra import Flowrra, TaskStatus
from tests.apps import prefetch
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin, wait_for_path

APP = "tests.apps.prefetch:app"


@pytest.fixture(scope="module")
def prefetch_broker(module_launcher: Launcher) -> BrokerProcess:
    """A broker and a node with one worker process, shared by the remote runs: each test
    ends with every task of its own finished (the worker free, the node's credit whole)."""
    broker = module_launcher.broker()
    module_launcher.node(broker, APP, processes=1)
    return broker


@pytest.fixture(params=["embedded", "remote"])
async def app(request: pytest.FixtureRequest) -> AsyncIterator[Flowrra]:
    if request.param == "embedded":
        twin = embedded_twin(prefetch.app, processes=1)
    else:
        twin = remote_twin(prefetch.app, request.getfixturevalue("prefetch_broker"))
    async with twin:
        yield twin


def _release(marker_dir: Path, name: str) -> None:
    (marker_dir / f"release-{name}").touch()


async def test_a_task_waiting_for_the_worker_has_no_timeout_running(
    app: Flowrra, tmp_path: Path
) -> None:
    first = await app.submit(prefetch.hold, str(tmp_path), "first")
    behind = await app.submit(prefetch.quick, "behind")  # dispatched ahead, waits
    await wait_for_path(tmp_path / "started-first")
    # Longer than "behind"'s timeout: it waits meanwhile, which must not count.
    await asyncio.sleep(prefetch.SHORT_TIMEOUT_S + 0.3)
    _release(tmp_path, "first")
    done_first = await app.wait_for_result(first, timeout=30)
    done_behind = await app.wait_for_result(behind, timeout=30)
    assert done_first.status is TaskStatus.SUCCESS
    assert done_behind.status is TaskStatus.SUCCESS and done_behind.result == "behind"
    # Its recorded start is when it got the worker, not when it reached the node.
    assert done_first.finished_at is not None and done_behind.started_at is not None
    assert done_behind.started_at >= done_first.finished_at


async def test_a_task_waiting_for_the_worker_can_be_cancelled(app: Flowrra, tmp_path: Path) -> None:
    first = await app.submit(prefetch.hold, str(tmp_path), "first")
    behind = await app.submit(prefetch.hold, str(tmp_path), "behind")
    await wait_for_path(tmp_path / "started-first")
    assert await app.cancel(behind)
    assert (await app.wait_for_result(behind, timeout=30)).status is TaskStatus.CANCELLED
    _release(tmp_path, "first")
    assert (await app.wait_for_result(first, timeout=30)).status is TaskStatus.SUCCESS
    # The worker and the node's credit are whole again: the next task runs.
    after = await app.submit(prefetch.quick, "after")
    assert (await app.wait_for_result(after, timeout=30)).result == "after"
    assert not os.path.exists(tmp_path / "started-behind")
