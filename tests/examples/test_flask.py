"""The Flask recipe (docs/examples/flask_app): its views under Flask's test client, with the
embedded default and against a real broker and a node run from the example's directory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask

from flowrra.blocking import SyncCallInLoopError
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin
from tests.examples.conftest import Example, example

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def project() -> Iterator[Example]:
    with example("flask_app") as found:
        yield found


@pytest.fixture(scope="module")
def remote_broker(module_launcher: Launcher, project: Example) -> BrokerProcess:
    """A broker and one node started as the recipe says: from the directory of ``reports``."""
    return project.broker_and_node(module_launcher, "reports.tasks:app")


@pytest.fixture(params=["embedded", "remote"])
def web(request: pytest.FixtureRequest, project: Example) -> Iterator[Flask]:
    tasks = project.module("reports.tasks")
    if request.param == "embedded":
        flowrra = embedded_twin(tasks.app, processes=0)
    else:
        flowrra = remote_twin(tasks.app, request.getfixturevalue("remote_broker"))
    try:
        yield project.module("reports.web").create_app(flowrra)
    finally:
        flowrra.sync.close()


def summary(values: list[float]) -> dict[str, Any]:
    total = sum(values)
    return {"count": len(values), "total": total, "mean": total / len(values), "max": max(values)}


def test_by_default_the_views_use_the_app_of_the_tasks_module(project: Example) -> None:
    tasks = project.module("reports.tasks")
    assert project.module("reports.web").create_app().extensions["flowrra"] is tasks.app


def test_a_report_is_queued_then_read(web: Flask) -> None:
    client = web.test_client()
    queued = client.post("/reports", json={"values": [3, 1.5, 5.5]})
    assert queued.status_code == 202
    task_id = queued.json["task"]  # type: ignore[index]
    assert queued.json == {"task": task_id, "status_url": f"/reports/{task_id}"}

    result = web.extensions["flowrra"].sync.wait_for_result(task_id, timeout=10)
    assert result.success
    done = client.get(f"/reports/{task_id}")
    assert done.status_code == 200
    assert done.json == {
        "task": task_id,
        "status": "success",
        "result": summary([3, 1.5, 5.5]),
        "error": None,
    }


def test_a_request_may_wait_for_its_report(web: Flask) -> None:
    answer = web.test_client().post("/reports?wait=10", json={"values": [2, 4]})
    assert answer.status_code == 200
    assert answer.json is not None and answer.json["result"] == summary([2, 4])


def test_many_threads_share_one_facade(web: Flask) -> None:
    def ask(n: int) -> Any:
        answer = web.test_client().post("/reports?wait=10", json={"values": [n, n + 1]})
        assert answer.status_code == 200
        return answer.json

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    assert [a["result"] for a in answers] == [summary([n, n + 1]) for n in range(16)]
    assert len({a["task"] for a in answers}) == 16


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/reports", {"values": []}),
        ("/reports", {"values": [1, "two"]}),
        ("/reports", {"values": [True]}),
        ("/reports", {"numbers": [1]}),
        ("/reports", [1, 2]),
        ("/reports?wait=soon", {"values": [1]}),
        ("/reports", {"values": [2**70]}),  # no msgpack integer holds it
    ],
)
def test_bad_requests_are_refused(web: Flask, path: str, body: Any) -> None:
    answer = web.test_client().post(path, json=body)
    assert answer.status_code == 400
    assert answer.json is not None and answer.json["error"]


def test_an_unknown_report_is_not_found(web: Flask) -> None:
    assert web.test_client().get("/reports/no-such-task").status_code == 404


def test_an_async_view_hands_the_blocking_calls_to_a_thread(web: Flask, project: Example) -> None:
    """The pitfall the page warns of: in an ``async def`` view (run in an event loop)
    ``app.sync`` refuses; through ``asyncio.to_thread`` it works."""
    flowrra = web.extensions["flowrra"]
    summarize = project.module("reports.tasks").summarize
    web.testing = True  # the view's exception reaches the test

    @web.get("/blocking-in-async")
    async def blocking_in_async() -> str:
        task_id: str = flowrra.sync.submit(summarize, [1])
        return task_id

    @web.get("/in-a-thread")
    async def in_a_thread() -> str:
        task_id: str = await asyncio.to_thread(flowrra.sync.submit, summarize, [1])
        return task_id

    client = web.test_client()
    with pytest.raises(SyncCallInLoopError, match=r"use `await app\.submit\(\.\.\.\)`"):
        client.get("/blocking-in-async")
    task_id = client.get("/in-a-thread").text
    assert flowrra.sync.wait_for_result(task_id, timeout=10).result == summary([1])
