"""Chains, groups and chords through the public API, embedded and remote."""

from __future__ import annotations

import pytest

from flowrra import Flowrra, TaskStatus, call
from tests.apps import failures
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin

APP = "tests.apps.failures:app"


@pytest.fixture(scope="module")
def workflow_broker(module_launcher: Launcher) -> BrokerProcess:
    """A broker with two nodes, shared by the remote runs (each test has its own task ids)."""
    broker = module_launcher.broker()
    module_launcher.node(broker, APP)
    module_launcher.node(broker, APP)
    return broker


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest) -> Flowrra:
    if request.param == "embedded":
        return embedded_twin(failures.app, processes=1)
    return remote_twin(failures.app, request.getfixturevalue("workflow_broker"))


async def test_a_chain_hands_each_result_on(app: Flowrra) -> None:
    async with app:
        last = await app.chain(
            call(failures.add, 1, 2), call(failures.add, 10), call(failures.add, y=100)
        )
        result = await app.wait_for_result(last, timeout=15)
    assert result.status is TaskStatus.SUCCESS and result.result == 113


async def test_a_failed_link_fails_every_later_one_without_running_it(app: Flowrra) -> None:
    async with app:
        last = await app.chain(
            call(failures.add, 1).with_options(task_id="first-link"),
            call(failures.boom).with_options(task_id="broken-link"),
            call(failures.add, 1).with_options(task_id="after-1"),
            call(failures.add, 1),
        )
        result = await app.wait_for_result(last, timeout=15)
        after = await app.wait_for_result("after-1", timeout=5)
        broken = await app.wait_for_result("broken-link", timeout=5)
    assert result.status is TaskStatus.FAILED and "broken-link" in (result.error or "")
    assert after.status is TaskStatus.FAILED and after.started_at is None  # never ran
    assert broken.status is TaskStatus.FAILED and "boom after 1" in (broken.error or "")


async def test_a_group_and_its_results_in_order(app: Flowrra) -> None:
    async with app:
        group_id = await app.group(*(call(failures.add, i, i) for i in range(12)))
        results = await app.wait_for_group(group_id, timeout=15)
        again = await app.get_group(group_id)
        assert await app.get_group("no-such-group") is None
    assert [r.result for r in results] == [2 * i for i in range(12)]
    assert again is not None and [r.result for r in again] == [2 * i for i in range(12)]


async def test_a_chord_calls_back_once_with_every_result(app: Flowrra) -> None:
    async with app:
        callback = await app.chord(
            [call(failures.add, i) for i in range(20)], call(failures.total, extra=1000)
        )
        result = await app.wait_for_result(callback, timeout=20)
        members = await app.admin("inspect", task_id=callback)
    assert result.result == sum(range(20)) + 1000
    assert members["workflow"]["kind"] == "chord" and len(members["workflow"]["parents"]) == 20


async def test_a_chord_with_a_failed_member_fails_its_callback(app: Flowrra) -> None:
    async with app:
        callback = await app.chord(
            [call(failures.add, 1), call(failures.boom).with_options(task_id="bad-member")],
            call(failures.total),
        )
        result = await app.wait_for_result(callback, timeout=15)
    assert result.status is TaskStatus.FAILED and "bad-member" in (result.error or "")


async def test_a_group_inside_a_chain_passes_its_list_on(app: Flowrra) -> None:
    async with app:
        last = await app.chain(
            call(failures.add, 1, 1),
            [call(failures.add, 10), call(failures.add, 20)],
            call(failures.total),
        )
        result = await app.wait_for_result(last, timeout=15)
    assert result.result == (2 + 10) + (2 + 20)


async def test_workflow_input_is_checked_before_sending(app: Flowrra) -> None:
    async with app:
        with pytest.raises(ValueError):
            await app.chain()
        with pytest.raises(TypeError):
            await app.chain(failures.add)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await app.chord([], call(failures.total))
