"""The FastAPI recipe (docs/examples/fastapi_app): FastAPI's TestClient runs the lifespan,
which starts the Flowrra app, and the async endpoints await it; with the embedded default and
against a real broker and a node run from the example's directory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from flowrra import Flowrra, FlowrraError
from flowrra.blocking import SyncCallInLoopError
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin
from tests.examples.conftest import Example, example

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def project() -> Iterator[Example]:
    with example("fastapi_app") as found:
        yield found


@pytest.fixture(scope="module")
def remote_broker(module_launcher: Launcher, project: Example) -> BrokerProcess:
    """A broker and one node started as the recipe says: from the directory of ``textjobs``."""
    return project.broker_and_node(module_launcher, "textjobs.tasks:app")


@pytest.fixture(params=["embedded", "remote"])
def flowrra(request: pytest.FixtureRequest, project: Example) -> Flowrra:
    tasks = project.module("textjobs.tasks")
    if request.param == "embedded":
        return embedded_twin(tasks.app, processes=0)
    return remote_twin(tasks.app, request.getfixturevalue("remote_broker"))


@pytest.fixture
def api(flowrra: Flowrra, project: Example) -> FastAPI:
    made: FastAPI = project.module("textjobs.main").create_app(flowrra)
    return made


def assert_not_started(flowrra: Flowrra) -> None:
    """``flowrra`` is not started: its async calls refuse to run."""
    with pytest.raises(FlowrraError, match="the app is not started"):
        asyncio.run(flowrra.get_result("any-id"))


def test_by_default_the_api_uses_the_app_of_the_tasks_module(project: Example) -> None:
    tasks = project.module("textjobs.tasks")
    assert project.module("textjobs.main").api.state.flowrra is tasks.app


def test_the_lifespan_starts_and_stops_the_app(api: FastAPI, flowrra: Flowrra) -> None:
    assert_not_started(flowrra)
    with TestClient(api) as client:
        assert client.get("/jobs/no-such-task").status_code == 404  # the broker answered
    assert_not_started(flowrra)


def test_a_job_is_queued_then_read(api: FastAPI) -> None:
    with TestClient(api) as client:
        queued = client.post("/jobs", json={"text": "the cat saw The dog"})
        assert queued.status_code == 202
        task_id = queued.json()["task"]
        assert queued.json() == {"task": task_id, "status_url": f"/jobs/{task_id}"}

        done = client.get(f"/jobs/{task_id}", params={"wait": 10})
        assert done.status_code == 200
        assert done.json() == {
            "task": task_id,
            "status": "success",
            "result": {"words": 5, "distinct": 4, "characters": 19},
            "error": None,
        }


def test_bad_requests_are_refused(api: FastAPI) -> None:
    with TestClient(api) as client:
        assert client.post("/jobs", json={"text": ""}).status_code == 422
        assert client.post("/jobs", json={"words": "x"}).status_code == 422
        assert client.get("/jobs/any", params={"wait": 60}).status_code == 422
        assert client.get("/jobs/no-such-task").status_code == 404


def test_the_blocking_facade_is_refused_in_the_servers_loop(
    api: FastAPI, flowrra: Flowrra, project: Example
) -> None:
    """The pitfalls the page warns of: ``app.sync`` in an async endpoint raises at once, and
    in a plain ``def`` endpoint (a worker thread) it refuses to start a second loop."""
    word_count = project.module("textjobs.tasks").word_count

    @api.get("/blocking-in-async")
    async def blocking_in_async() -> str:
        return flowrra.sync.submit(word_count, "x")

    @api.get("/blocking-in-thread")
    def blocking_in_thread() -> str:
        return flowrra.sync.submit(word_count, "x")

    with TestClient(api) as client:
        with pytest.raises(SyncCallInLoopError, match=r"use `await app\.submit\(\.\.\.\)`"):
            client.get("/blocking-in-async")
        with pytest.raises(FlowrraError, match="already started in another event loop"):
            client.get("/blocking-in-thread")
        assert not flowrra.sync.running
