"""The web dashboard against a real broker and node, over HTTP and in headless Chromium.

The dashboard runs in its own process (``serve()`` through ``python -c``), like
``flowrra dashboard`` would; it listens on a free port of 127.0.0.1 and logs which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from flowrra import TaskStatus
from flowrra.security import keygen
from tests.apps import fleet
from tests.conftest import (
    BrokerProcess,
    Launcher,
    ManagedProcess,
    NodeProcess,
    free_port,
    remote_twin,
    subprocess_env,
)
from tests.dashboard.browser import Chromium, chromium_path

SERVE = (
    "import asyncio, sys\n"
    "from flowrra.dashboard import serve\n"
    "from flowrra.security import client_keys\n"
    "keys = client_keys(*sys.argv[3:5]) if len(sys.argv) > 3 else None\n"
    "asyncio.run(\n"
    "    serve(sys.argv[1], '127.0.0.1', 0, request_timeout_s=float(sys.argv[2]), keys=keys)\n"
    ")\n"
)
NODE_ID = "dash-node-1"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> & "quoted"'


def launch_dashboard(
    launcher: Launcher,
    broker_url: str,
    request_timeout_s: float = 2.0,
    curve_keys: tuple[Path, Path] | None = None,
) -> ManagedProcess:
    """Start a dashboard process for ``broker_url`` (see :func:`dashboard_url`).

    ``curve_keys`` are the broker's public key file and the dashboard's secret key file.
    """
    keys = [str(path) for path in curve_keys] if curve_keys else []
    process = ManagedProcess(
        "dashboard",
        [sys.executable, "-c", SERVE, broker_url, str(request_timeout_s), *keys],
        env=subprocess_env(),
        cwd=launcher.tmp,
    )
    launcher.processes.append(process)
    return process


def dashboard_url(process: ManagedProcess) -> str:
    """The base URL a dashboard process logs once it listens."""
    return process.wait_for(r"dashboard listening on (http://127\.0\.0\.1:\d+)").group(1)


def start_dashboard(launcher: Launcher, broker_url: str, request_timeout_s: float = 2.0) -> str:
    """Start a dashboard process for ``broker_url`` and wait until it listens."""
    return dashboard_url(launch_dashboard(launcher, broker_url, request_timeout_s))


def need_chromium() -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not installed; .ci/run installs it")


@dataclass
class Stack:
    broker: BrokerProcess
    node: NodeProcess
    url: str


@pytest.fixture(scope="module")
def stack(module_launcher: Launcher) -> Iterator[Stack]:
    """One broker, one node and one dashboard shared by this module's tests."""
    broker = module_launcher.broker()
    node = module_launcher.node(broker, "tests.apps.fleet:app", processes=1, node_id=NODE_ID)
    yield Stack(broker, node, start_dashboard(module_launcher, broker.url))


async def get_json(session: Any, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return response.status, await response.json()


async def run_some_tasks(stack: Stack) -> tuple[list[str], str]:
    """Three echo tasks that succeed and one that fails permanently with ``XSS`` as message."""
    async with remote_twin(fleet.app, stack.broker) as app:
        ok_ids = [await app.submit(fleet.echo, "hello-dashboard", i, flag=True) for i in range(3)]
        failing = await app.submit(fleet.raises_value_error, XSS)
        results = [await app.wait_for_result(i, timeout=15) for i in [*ok_ids, failing]]
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * 3 + [TaskStatus.FAILED]
    return ok_ids, failing


# --------------------------------------------------------------------------- HTTP


async def test_json_endpoints(stack: Stack) -> None:
    ok_ids, failing = await run_some_tasks(stack)
    async with aiohttp.ClientSession() as session:
        status, body = await get_json(session, f"{stack.url}/api/status")
        assert status == 200 and body["available"] is True
        nodes = body["status"]["nodes"]
        assert [n["node_id"] for n in nodes] == [NODE_ID]
        assert nodes[0]["async_total"] == 10 and nodes[0]["cpu_total"] == 1
        assert body["status"]["counters"]["succeeded"] >= 3
        assert isinstance(body["status"]["queued_by_priority"], dict)
        assert isinstance(body["throughput"], list)

        status, task = await get_json(session, f"{stack.url}/api/task/{ok_ids[1]}")
        assert status == 200
        assert task["status"] == "success" and task["task_name"] == "tests.apps.fleet.echo"
        assert task["args"] == ["hello-dashboard", 1] and task["kwargs"] == {"flag": True}
        assert task["result"] == [["hello-dashboard", 1], {"flag": True}]
        assert task["attempt"] == 1 and task["history"][0]["outcome"] == "success"

        status, task = await get_json(session, f"{stack.url}/api/task/{failing}")
        assert task["status"] == "failed" and task["error"] == f"ValueError: {XSS}"
        assert task["has_result"] is False

        status, missing = await get_json(session, f"{stack.url}/api/task/no-such-task")
        assert status == 404 and "no-such-task" in missing["error"]

        # Any task id works in the path, percent-encoded as the page's encodeURIComponent does.
        async with remote_twin(fleet.app, stack.broker) as app:
            odd = await app.submit(fleet.echo, "odd", task_id="odd/id %2F?#&é <b>")
            await app.wait_for_result(odd, timeout=15)
        status, task = await get_json(session, f"{stack.url}/api/task/{quote(odd, safe='')}")
        assert status == 200 and task["task_id"] == odd and task["result"] == [["odd"], {}]

        status, dead = await get_json(session, f"{stack.url}/api/dead")
        assert status == 200
        assert any(r["task_id"] == failing and r["error"] == f"ValueError: {XSS}" for r in dead)


async def test_user_data_never_reaches_html(stack: Stack) -> None:
    """Task data only travels as JSON (never sniffed as HTML); the page itself is static
    and a Content-Security-Policy forbids inline scripts."""
    await run_some_tasks(stack)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.url}/") as response:
            html = await response.text()
            headers = response.headers
        assert response.status == 200 and headers["Content-Type"].startswith("text/html")
        assert "<script>window.__xss" not in html
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        async with session.get(f"{stack.url}/api/dead") as response:
            raw = await response.text()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Content-Type"].startswith("application/json")
        assert XSS in [r["error"].removeprefix("ValueError: ") for r in json.loads(raw)]


async def test_event_stream_sends_status_every_second(stack: Stack) -> None:
    await run_some_tasks(stack)
    events: list[tuple[float, dict[str, Any]]] = []
    failures: list[list[dict[str, Any]]] = []
    async with aiohttp.ClientSession() as session, session.get(f"{stack.url}/events") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        name = None
        while len(events) < 3 or not failures:
            line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name == "status":
                events.append((time.monotonic(), json.loads(line.removeprefix("data: "))))
            elif line.startswith("data: ") and name == "failures":
                failures.append(json.loads(line.removeprefix("data: ")))
    snapshots = [e[1] for e in events]
    assert all(s["available"] for s in snapshots)
    assert [n["node_id"] for n in snapshots[-1]["status"]["nodes"]] == [NODE_ID]
    assert snapshots[2]["time"] > snapshots[1]["time"] > snapshots[0]["time"]
    # The first comes at once (the latest poll), then one per poll interval.
    assert 0.3 < events[2][0] - events[1][0] < 3.0
    assert len(snapshots[-1]["throughput"]) >= 2
    # The recent failures come as their own event, when they change.
    assert any(r["error"] == f"ValueError: {XSS}" for r in failures[-1])


# --------------------------------------------------------------------------- browser


async def test_page_in_chromium(stack: Stack, tmp_path: Path) -> None:
    need_chromium()
    launching = asyncio.create_task(Chromium.launch(tmp_path / "profile"))  # meanwhile
    try:
        ok_ids, failing = await run_some_tasks(stack)
    except BaseException:
        await (await launching).close()
        raise
    async with await launching as browser:
        await browser.navigate(stack.url + "/")
        # Live nodes, with their slots and counts.
        await browser.wait_for(
            f"document.querySelector('#node-rows [data-node-id=\"{NODE_ID}\"]') !== null",
            what="the node row",
        )
        row = await browser.text(f'#node-rows [data-node-id="{NODE_ID}"]')
        assert NODE_ID in row and "/ 10" in row and "/ 1" in row, row
        assert (await browser.text("#conn")) == "live"
        for number in ("#queued", "#in-flight", "#retry-timers", "#dead-letters"):
            assert (await browser.text(number)).replace(",", "").isdigit(), number
        assert "no queued tasks" in await browser.text("#queue-rows")

        # The failure, with its error shown as text: nothing of it was parsed as markup.
        await browser.wait_for(
            f"document.querySelector('#failure-rows [data-task-id=\"{failing}\"]') !== null",
            what="the failed task in recent failures",
        )
        error = await browser.text(f'#failure-rows [data-task-id="{failing}"] td.error')
        assert error.startswith(f"ValueError: {XSS}"), error
        injected = await browser.evaluate(
            "document.querySelectorAll('#failure-rows script, #failure-rows img').length"
        )
        assert injected == 0
        assert await browser.evaluate("typeof window.__xss") == "undefined"

        # Live updates: more tasks finish, and the page's counters follow without a reload.
        before = int((await browser.text("#succeeded")).replace(",", ""))
        done_before = int((await browser.text(f'[data-node-id="{NODE_ID}"] td.ok')) or 0)
        async with remote_twin(fleet.app, stack.broker) as app:
            ids = await app.submit_many(fleet.echo, [["more", i] for i in range(20)])
            for task_id in ids:
                await app.wait_for_result(task_id, timeout=15)
        await browser.wait_for(
            f"Number(document.getElementById('succeeded').innerText.replace(/,/g, ''))"
            f" >= {before + 20}",
            what="the succeeded counter to grow by 20",
        )
        done_after = int(await browser.text(f'[data-node-id="{NODE_ID}"] td.ok'))
        assert done_after >= done_before + 20
        # The throughput chart drew its line (blue pixels on the canvas).
        await browser.wait_for(
            "(() => { const c = document.getElementById('chart');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " for (let i = 0; i < d.length; i += 4)"
            "   if (d[i] === 47 && d[i + 1] === 111 && d[i + 2] === 223) return true;"
            " return false; })()",
            what="a throughput line on the chart",
        )

        # Lookup by id: status, arguments and result.
        await browser.evaluate(
            f"document.getElementById('lookup-id').value = {json.dumps(ok_ids[2])};"
            "document.getElementById('lookup-form').requestSubmit()"
        )
        await browser.wait_for("document.getElementById('lookup-result') !== null")
        assert await browser.text("#lookup-status") == "success"
        result = json.loads(await browser.text("#lookup-result"))
        assert result == [["hello-dashboard", 2], {"flag": True}]
        assert json.loads(await browser.text("#lookup-args")) == ["hello-dashboard", 2]

        # Clicking the failed task looks it up: its error, again as text.
        await browser.evaluate(
            f"document.querySelector('#failure-rows [data-task-id=\"{failing}\"] button').click()"
        )
        await browser.wait_for(
            "(document.getElementById('lookup-status') || {}).innerText === 'failed'"
        )
        assert await browser.text("#lookup-error") == f"ValueError: {XSS}"
        assert await browser.evaluate("document.querySelectorAll('#lookup-out img').length") == 0

        await browser.screenshot(tmp_path / "dashboard.png")
        assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert browser.errors == [], browser.errors
        assert await browser.evaluate("typeof window.__xss") == "undefined"


async def test_broker_unavailable_then_back(launcher: Launcher, tmp_path: Path) -> None:
    """Started before its broker, the dashboard says so, then recovers; the same after the
    broker stops and starts again. Without chromium only the HTTP side is checked."""
    port, publish_port = free_port(), free_port()
    process = launch_dashboard(launcher, f"tcp://127.0.0.1:{port}", request_timeout_s=0.5)
    browser = None
    if chromium_path() is not None:
        browser = await Chromium.launch(tmp_path / "profile")  # while the dashboard starts
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        if browser is not None:
            await stack.enter_async_context(browser)
        url = dashboard_url(process)

        async def expect(available: bool, what: str) -> None:
            state = "live" if available else "broker unavailable"
            if browser is not None:
                await browser.wait_for(
                    f"document.getElementById('conn').innerText === {state!r}", what=what
                )
            deadline = time.monotonic() + 10
            while True:
                status, body = await get_json(session, f"{url}/api/status")
                if status == (200 if available else 503) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert status == (200 if available else 503), (what, body)
            assert body["available"] is available

        if browser is not None:
            await browser.navigate(url + "/")
        await expect(False, "'broker unavailable' before the broker started")
        if browser is not None:
            assert "broker unavailable" in await browser.text("#banner")
            await browser.screenshot(tmp_path / "unavailable.png")

        data_dir = tmp_path / "broker-data"
        broker = launcher.broker(port=port, publish_port=publish_port, data_dir=data_dir)
        await expect(True, "recovery")
        if browser is not None:
            assert await browser.evaluate("document.getElementById('banner').hidden") is True

        broker.process.terminate()
        await expect(False, "'broker unavailable' after the broker stopped")

        launcher.broker(port=port, publish_port=publish_port, data_dir=data_dir)
        await expect(True, "recovery after the restart")
        if browser is not None:
            assert browser.errors == [], browser.errors


async def test_curve_broker(launcher: Launcher, tmp_path: Path) -> None:
    """With a CURVE-protected broker the dashboard connects with its client keys."""
    broker_public, broker_secret = keygen(tmp_path / "broker-keys", "broker")
    client_public, client_secret = keygen(tmp_path / "client-keys", "dashboard")
    broker = launcher.broker(
        args=[
            "--curve-secret-key", str(broker_secret),
            "--client-keys", str(client_public.parent),
            "--node-keys", str(client_public.parent),
        ]
    )  # fmt: skip
    with_keys = launch_dashboard(launcher, broker.url, curve_keys=(broker_public, client_secret))
    without = launch_dashboard(launcher, broker.url, request_timeout_s=0.5)
    async with aiohttp.ClientSession() as session:
        status, body = await get_json(session, f"{dashboard_url(with_keys)}/api/status")
        assert status == 200 and body["status"]["nodes"] == []
        status, body = await get_json(session, f"{dashboard_url(without)}/api/status")
        assert status == 503 and body["available"] is False
