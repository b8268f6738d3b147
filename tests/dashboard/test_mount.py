"""The dashboard mounted under a prefix inside a FastAPI app, as a user would run it.

uvicorn serves the host app in the test's event loop on a free port of 127.0.0.1; a real
broker and node run in their own processes. FastAPI runs no lifespan of a mounted app, so
the dashboard connects on its first request and the host's lifespan calls ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from flowrra import TaskStatus, call
from flowrra.dashboard import DashboardApp, asgi_app
from tests.apps import fleet
from tests.conftest import BrokerProcess, Launcher, free_port, remote_twin
from tests.dashboard import dashapp
from tests.dashboard.browser import Chromium, chromium_path

PREFIX = "/ops/flowrra"
NODE_ID = "mount-node-1"


@dataclass
class Host:
    broker: BrokerProcess
    dashboard: DashboardApp
    url: str  # the host app's base URL (no trailing slash)
    client: httpx.AsyncClient


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise AssertionError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def broker(module_launcher: Launcher) -> BrokerProcess:
    """One broker and node for this module's tests (each test has its own host app)."""
    broker = module_launcher.broker()
    module_launcher.node(broker, "tests.dashboard.dashapp:app", processes=1, node_id=NODE_ID)
    return broker


@pytest.fixture
async def host(broker: BrokerProcess) -> AsyncIterator[Host]:
    dashboard = asgi_app(broker.url, poll_interval_s=0.5, request_timeout_s=2.0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await dashboard.aclose()

    api = FastAPI(lifespan=lifespan)

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    api.mount(PREFIX, dashboard)
    port = free_port()
    config = uvicorn.Config(api, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(_wait_started(server, task), 15)
        async with httpx.AsyncClient(timeout=10) as client:
            yield Host(broker, dashboard, f"http://127.0.0.1:{port}", client)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_json_endpoints_under_the_prefix(host: Host) -> None:
    client, base = host.client, host.url + PREFIX
    # Nothing connects before the first request (a mounted app gets no startup event).
    assert host.dashboard.dashboard.latest is None and host.dashboard.dashboard._client is None
    async with remote_twin(dashapp.app, host.broker) as app:
        done = await app.submit(fleet.echo, "mounted", 1)
        failing = await app.submit(dashapp.always_fails, "mounted failure")
        chained = await app.chain(call(fleet.echo, "a"), call(fleet.echo, "b"))
        for task_id in (done, failing, chained):
            await app.wait_for_result(task_id, timeout=15)

    status = (await client.get(f"{base}/api/status")).json()
    assert status["available"] is True
    assert [n["node_id"] for n in status["status"]["nodes"]] == [NODE_ID]

    task = (await client.get(f"{base}/api/task/{quote(failing, safe='')}")).json()
    assert task["status"] == TaskStatus.FAILED.value and len(task["history"]) == 3
    assert task["error"] == "ValueError: mounted failure"

    failed = (await client.get(f"{base}/api/tasks", params={"status": "failed"})).json()
    assert failed[0]["task_id"] == failing and {t["status"] for t in failed} == {"failed"}
    stats = (await client.get(f"{base}/api/stats")).json()["tasks"]
    assert stats["tests.dashboard.dashapp.always_fails"]["failure_rate"] == 1
    assert stats["tests.apps.fleet.echo"]["finished"] >= 3  # the chain's two links and one

    link = (await client.get(f"{base}/api/task/{quote(chained, safe='')}")).json()["workflow"]
    workflow = await client.get(f"{base}/api/workflow/{quote(link['workflow'], safe='')}")
    assert workflow.status_code == 200 and workflow.json()["kind"] == "chain"
    missing = await client.get(f"{base}/api/workflow/no-such-workflow")
    assert missing.status_code == 404
    dead = (await client.get(f"{base}/api/dead")).json()
    assert dead[0]["task_id"] == failing  # newest first
    assert (await client.get(f"{base}/api/schedules")).json() == []
    # The host app is untouched by the mount.
    assert (await client.get(f"{host.url}/health")).json() == {"ok": True}


async def test_the_page_and_its_assets_resolve_under_the_prefix(host: Host) -> None:
    client = host.client
    bare = await client.get(host.url + PREFIX)  # relative URLs need the slash
    assert bare.status_code in (301, 307, 308)
    assert bare.headers["location"].endswith(PREFIX + "/")
    page_url = host.url + PREFIX + "/"
    page = await client.get(page_url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert sorted(assets) == ["data:,", "static/dashboard.css", "static/dashboard.js"]
    script = ""
    for asset in assets:
        if asset.startswith("data:"):  # the empty icon
            continue
        response = await client.get(urljoin(page_url, asset))
        assert response.status_code == 200, asset
        assert response.headers["x-content-type-options"] == "nosniff"
        if asset.endswith(".js"):
            assert response.headers["content-type"].startswith("text/javascript")
            script = response.text
        else:
            assert response.headers["content-type"].startswith("text/css")
    # Every URL the script asks for is relative to the page.
    requested = re.findall(r'(?:fetch|getJSON)\("([^"]*)"', script)
    assert requested and all(not url.startswith("/") for url in requested), requested
    assert '"/' not in script.replace('"/"', "")
    # Only the page's own files are served from static/.
    assert (await client.get(page_url + "static/app.py")).status_code == 404


async def test_aclose_closes_the_connection_and_a_request_reopens_it(host: Host) -> None:
    base = host.url + PREFIX
    assert (await host.client.get(f"{base}/api/status")).json()["available"] is True
    inner = host.dashboard.dashboard
    assert inner._client is not None and inner._poller is not None
    await host.dashboard.aclose()
    assert inner._client is None and inner._poller is None
    await host.dashboard.aclose()  # idempotent
    # The next request connects again (the host keeps serving the mount).
    assert (await host.client.get(f"{base}/api/stats")).status_code == 200
    assert inner._client is not None


async def test_the_mounted_page_in_chromium(host: Host, tmp_path: Path) -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not installed; .ci/run installs it")
    async with await Chromium.launch(tmp_path / "profile") as browser:
        await browser.navigate(host.url + PREFIX + "/")
        await browser.wait_for(
            f"document.querySelector('#node-rows [data-node-id=\"{NODE_ID}\"]') !== null",
            what="the node row under the prefix",
        )
        assert await browser.text("#conn") == "live"
        async with remote_twin(dashapp.app, host.broker) as app:
            failing = await app.submit(dashapp.always_fails, "seen through the mount")
            await app.wait_for_result(failing, timeout=15)
        await browser.wait_for(
            f"document.querySelector('#task-rows [data-task-id=\"{failing}\"]') !== null",
            what="the task in the task list",
        )
        await browser.evaluate(
            f"document.querySelector('#task-rows [data-task-id=\"{failing}\"] button').click()"
        )
        await browser.wait_for("document.getElementById('lookup-history') !== null")
        assert await browser.text("#lookup-error") == "ValueError: seen through the mount"
        assert browser.errors == [], browser.errors


async def test_polling_stops_when_no_page_asks(broker: BrokerProcess) -> None:
    """The poller ends by itself after ``idle_s`` without requests, dropping its broker
    connection; the next request starts both again (no server: httpx calls the app)."""
    dashboard = asgi_app(broker.url, poll_interval_s=0.05, idle_s=0.3)
    transport = httpx.ASGITransport(app=dashboard)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://mounted") as client:
            assert (await client.get("/api/status")).json()["available"] is True
            poller = dashboard.dashboard._poller
            assert poller is not None
            await asyncio.wait_for(poller, 10)  # returns once idle
            assert dashboard.dashboard._poller is None and dashboard.dashboard._client is None
            assert (await client.get("/api/status")).json()["available"] is True
            assert dashboard.dashboard._poller is not None
    finally:
        await dashboard.aclose()
