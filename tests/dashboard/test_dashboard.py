"""The web dashboard against a real broker and node, over HTTP and in headless Chromium.

The dashboard runs in its own process (``serve()`` through ``python -c``: the ASGI app on
uvicorn), like ``flowrra dashboard`` would; it listens on a free port of 127.0.0.1 and logs
which. tests/dashboard/test_mount.py mounts the same app inside FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from flowrra import TaskStatus, call
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
from tests.dashboard import dashapp
from tests.dashboard.browser import Chromium, chromium_path

# Polls every 0.5 s (the default is 1 s), as in test_mount.py: the tests wait for polls.
SERVE = (
    "import asyncio, sys\n"
    "from flowrra.dashboard import serve\n"
    "from flowrra.security import client_keys\n"
    "keys = client_keys(*sys.argv[3:5]) if len(sys.argv) > 3 else None\n"
    "asyncio.run(\n"
    "    serve(\n"
    "        sys.argv[1], '127.0.0.1', 0, poll_interval_s=0.5,\n"
    "        request_timeout_s=float(sys.argv[2]), keys=keys,\n"
    "    )\n"
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
    node = module_launcher.node(broker, "tests.dashboard.dashapp:app", processes=1, node_id=NODE_ID)
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


@contextlib.asynccontextmanager
async def hourly_schedule(stack: Stack, *words: str) -> AsyncIterator[str]:
    """An hourly schedule of ``fleet.echo(*words)`` (its first slot is an hour away, so it
    never fires during a test), removed afterwards; its id."""
    async with remote_twin(fleet.app, stack.broker) as app:
        schedule_id = await app.create_scheduler().schedule_interval(
            fleet.echo, 3600, args=list(words), description="hourly <b>echo</b>"
        )
    try:
        yield schedule_id
    finally:
        async with remote_twin(fleet.app, stack.broker) as app:
            await app.create_scheduler().unschedule(schedule_id)


async def status_until(
    session: Any, url: str, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """The first ``api/status`` snapshot (what the page polls) for which ``done`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        status, snapshot = await get_json(session, f"{url}/api/status")
        if done(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"no such status in time (last {status})"
        await asyncio.sleep(0.1)


async def fail_three_times(stack: Stack, message: str) -> str:
    """A task that fails on each of its three attempts; its id once it is FAILED."""
    async with remote_twin(dashapp.app, stack.broker) as app:
        task_id = await app.submit(dashapp.always_fails, message)
        assert (await app.wait_for_result(task_id, timeout=15)).status is TaskStatus.FAILED
    return task_id


def schedule_in(snapshot: dict[str, Any], schedule_id: str) -> dict[str, Any] | None:
    return next((s for s in snapshot.get("schedules") or [] if s["id"] == schedule_id), None)


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


async def test_schedules_in_status_events_and_api(stack: Stack) -> None:
    async with (
        hourly_schedule(stack, "from-a-schedule") as schedule_id,
        aiohttp.ClientSession() as session,
    ):
        # The snapshot is at most one poll old: the schedule is there from the next poll.
        body = await status_until(
            session, stack.url, lambda s: schedule_in(s, schedule_id) is not None
        )
        assert body["status"]["schedules"] >= 1
        shown = schedule_in(body, schedule_id)
        assert shown is not None
        assert shown["task_name"] == "tests.apps.fleet.echo" and shown["enabled"] is True
        assert shown["schedule_type"] == "interval" and shown["schedule"] == 3600
        assert shown["tz"] == "UTC" and shown["last_run_at"] is None
        assert shown["next_run_at"] > time.time() + 3000
        assert "payload" not in shown and "args" not in shown

        status, listed = await get_json(session, f"{stack.url}/api/schedules")
        assert status == 200
        full = next(s for s in listed if s["id"] == schedule_id)
        assert full["args"] == ["from-a-schedule"] and full["kwargs"] == {}
        assert full["description"] == "hourly <b>echo</b>"

        # The status the page polls carries them, refreshed on every poll.
        async with remote_twin(fleet.app, stack.broker) as app:
            assert await app.create_scheduler().disable_task(schedule_id)
        await status_until(
            session,
            stack.url,
            lambda s: (schedule_in(s, schedule_id) or {}).get("enabled") is False,
        )
    async with aiohttp.ClientSession() as session:
        await status_until(session, stack.url, lambda s: schedule_in(s, schedule_id) is None)
        status, listed = await get_json(session, f"{stack.url}/api/schedules")
        assert schedule_id not in {s["id"] for s in listed}


async def test_task_api_shows_workflow_links_and_new_statuses(stack: Stack) -> None:
    async with remote_twin(fleet.app, stack.broker) as app:
        last = await app.chain(call(fleet.echo, "first"), call(fleet.echo, "second"))
        assert (await app.wait_for_result(last, timeout=15)).success
        later = await app.submit(fleet.echo, "later", countdown=60)
    async with aiohttp.ClientSession() as session:
        status, task = await get_json(session, f"{stack.url}/api/task/{quote(last, safe='')}")
        assert status == 200 and task["status"] == "success"
        links = task["workflow"]
        assert links["kind"] == "chain" and links["step"] == 1 and links["children"] == []
        (first,) = links["parents"]
        status, head = await get_json(session, f"{stack.url}/api/task/{quote(first, safe='')}")
        assert head["workflow"]["parents"] == [] and head["workflow"]["children"] == [last]
        assert head["workflow"]["workflow"] == links["workflow"]

        status, scheduled = await get_json(session, f"{stack.url}/api/task/{later}")
        assert scheduled["status"] == "scheduled" and scheduled["eta"] > time.time() + 30
        assert scheduled["workflow"] is None
        async with remote_twin(fleet.app, stack.broker) as app:
            assert await app.cancel(later)
        status, cancelled = await get_json(session, f"{stack.url}/api/task/{later}")
        assert cancelled["status"] == "cancelled" and cancelled["eta"] is None


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


async def test_status_follows_the_polls(stack: Stack) -> None:
    """``api/status`` is the poller's latest snapshot: it moves on once per poll, with one
    more throughput sample, and says when the dead letters changed."""
    await run_some_tasks(stack)
    async with aiohttp.ClientSession() as session:
        status, first = await get_json(session, f"{stack.url}/api/status")
        assert status == 200 and first["available"] is True
        later = await status_until(session, stack.url, lambda s: s["time"] > first["time"])
        assert [n["node_id"] for n in later["status"]["nodes"]] == [NODE_ID]
        assert len(later["throughput"]) >= min(len(first["throughput"]) + 1, 300)
        assert later["dead_signature"][0] == later["status"]["broker_id"]
        await fail_three_times(stack, "one more dead letter")
        changed = await status_until(
            session, stack.url, lambda s: s["dead_signature"] != later["dead_signature"]
        )
        assert changed["status"]["dead_letters"] > later["status"]["dead_letters"]


async def test_task_browser_api(stack: Stack) -> None:
    """Recent tasks by status and name, a task's attempts, and the per-name figures."""
    ok_ids, _ = await run_some_tasks(stack)
    failing = await fail_three_times(stack, XSS)
    async with aiohttp.ClientSession() as session:
        status, tasks = await get_json(session, f"{stack.url}/api/tasks")
        assert status == 200
        listed = [t["task_id"] for t in tasks]
        assert listed.index(failing) < listed.index(ok_ids[2]) < listed.index(ok_ids[0])

        status, failed = await get_json(session, f"{stack.url}/api/tasks?status=failed")
        assert {t["status"] for t in failed} == {"failed"}
        (entry,) = [t for t in failed if t["task_id"] == failing]
        assert entry["error"] == f"ValueError: {XSS}" and entry["attempt"] == 3
        assert entry["task_name"] == "tests.dashboard.dashapp.always_fails"
        assert "result" not in entry and "traceback" not in entry

        name = "tests.apps.fleet.echo"
        _, echoes = await get_json(
            session, f"{stack.url}/api/tasks?status=success&status=failed&name={name}&limit=2"
        )
        assert len(echoes) == 2 and {t["task_name"] for t in echoes} == {name}
        assert {t["status"] for t in echoes} == {"success"}

        status, bad = await get_json(session, f"{stack.url}/api/tasks?status=done")
        assert status == 400 and "unknown task status" in bad["error"]

        status, task = await get_json(session, f"{stack.url}/api/task/{failing}")
        assert status == 200 and task["status"] == "failed"
        assert [a["attempt"] for a in task["history"]] == [1, 2, 3]
        assert {a["outcome"] for a in task["history"]} == {"failed"}
        assert {a["error"] for a in task["history"]} == {f"ValueError: {XSS}"}
        assert all(a["node_id"] == NODE_ID and a["run_s"] >= 0 for a in task["history"])
        assert "raise ValueError" in task["traceback"]

        status, stats = await get_json(session, f"{stack.url}/api/stats")
        assert status == 200 and stats["run_window"] == 1000
        echo = stats["tasks"][name]
        assert echo["finished"] >= 3 and echo["failed"] == 0 and echo["failure_rate"] == 0
        assert 0 <= echo["p50_s"] <= echo["p95_s"] <= echo["max_s"]
        failures = stats["tasks"]["tests.dashboard.dashapp.always_fails"]
        assert failures["failure_rate"] == 1 and failures["retried"] >= 2 * failures["failed"]


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


async def test_schedules_workflows_and_statuses_in_chromium(stack: Stack, tmp_path: Path) -> None:
    """The schedules panel follows the broker live; the lookup shows a task's workflow, with
    links to its parents and children, and the new statuses."""
    need_chromium()
    async with remote_twin(fleet.app, stack.broker) as app:
        last = await app.chain(call(fleet.echo, "one"), call(fleet.echo, "two"))
        assert (await app.wait_for_result(last, timeout=15)).success
        later = await app.submit(fleet.echo, "later", countdown=60)
    async with (
        hourly_schedule(stack, XSS) as schedule_id,
        await Chromium.launch(tmp_path / "profile") as browser,
    ):
        await browser.navigate(stack.url + "/")
        row = f'#schedule-rows [data-schedule-id="{schedule_id}"]'
        await browser.wait_for(
            f"document.querySelector({json.dumps(row)}) !== null", what="the schedule row"
        )
        assert await browser.text(f"{row} .schedule-task") == "tests.apps.fleet.echo"
        assert await browser.text(f"{row} .schedule-when") == "every 1 h 0 min UTC"
        assert await browser.text(f"{row} .schedule-enabled") == "yes"
        assert (await browser.text(f"{row} .schedule-next")) not in ("", "\u2013")
        assert await browser.text(f"{row} .schedule-last") == "\u2013"
        assert await browser.text("#schedule-count") == "1 schedule"  # the others are removed

        # Disabled through the broker: the page follows without a reload.
        async with remote_twin(fleet.app, stack.broker) as app:
            assert await app.create_scheduler().disable_task(schedule_id)
        await browser.wait_for(
            f"document.querySelector({json.dumps(row + ' .schedule-enabled')}).innerText === 'no'",
            what="the schedule shown disabled",
        )
        assert await browser.text(f"{row} .schedule-next") == "\u2013"

        # A chain's last link: its workflow and its parent, which one click looks up.
        await browser.evaluate(
            f"document.getElementById('lookup-id').value = {json.dumps(last)};"
            "document.getElementById('lookup-form').requestSubmit()"
        )
        await browser.wait_for("document.getElementById('lookup-workflow') !== null")
        assert "(chain, step 2)" in await browser.text("#lookup-workflow")
        assert await browser.text("#lookup-children") == "none (last step)"
        parent = await browser.text("#lookup-parents button")
        await browser.evaluate("document.querySelector('#lookup-parents button').click()")
        await browser.wait_for(
            f"(document.querySelector('#lookup-children button') || {{}}).innerText"
            f" === {json.dumps(last)}",
            what="the parent looked up",
        )
        assert await browser.text("#lookup-parents") == "none (first step)"
        assert (await browser.evaluate("document.getElementById('lookup-id').value")) == parent

        # A scheduled task, then cancelled: both statuses shown with their own style.
        async def look_up(task_id: str, status: str) -> None:
            await browser.evaluate(
                f"document.getElementById('lookup-id').value = {json.dumps(task_id)};"
                "document.getElementById('lookup-form').requestSubmit()"
            )
            await browser.wait_for(
                f"(document.getElementById('lookup-status') || {{}}).innerText === {status!r}",
                what=f"the task shown {status}",
            )
            css = await browser.evaluate(
                "getComputedStyle(document.getElementById('lookup-status')).fontWeight"
            )
            assert css == "600", css

        await look_up(later, "scheduled")
        assert (await browser.text("#lookup-eta")) not in ("", "\u2013")
        async with remote_twin(fleet.app, stack.broker) as app:
            assert await app.cancel(later)
        await look_up(later, "cancelled")

        await browser.screenshot(tmp_path / "schedules.png")
        assert browser.errors == [], browser.errors
        assert await browser.evaluate("typeof window.__xss") == "undefined"
        assert await browser.evaluate("document.querySelectorAll('#schedule-rows img').length") == 0


def choose(select_id: str, value: str) -> str:
    """JavaScript that picks ``value`` in a select of the page, as a person would."""
    return (
        f"(() => {{ const s = document.getElementById({json.dumps(select_id)});"
        f" s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change')); }})()"
    )


def all_rows(cell: str, value: str) -> str:
    """JavaScript: the task list has rows, and every ``cell`` of them reads ``value``."""
    return (
        f"(() => {{ const cells = [...document.querySelectorAll('#task-rows {cell}')];"
        f" return cells.length > 0 && cells.every((c) => c.innerText === {json.dumps(value)});"
        " })()"
    )


async def test_task_browser_in_chromium(stack: Stack, tmp_path: Path) -> None:
    """Recent tasks filtered by status and by name; a task opened with its attempts, error
    and traceback; the per-name figures; user data shown as text only."""
    need_chromium()
    launching = asyncio.create_task(Chromium.launch(tmp_path / "profile"))  # meanwhile
    try:
        ok_ids, _ = await run_some_tasks(stack)
        failing = await fail_three_times(stack, XSS)
    except BaseException:
        await (await launching).close()
        raise
    echo, always_fails = "tests.apps.fleet.echo", "tests.dashboard.dashapp.always_fails"
    async with await launching as browser:
        await browser.navigate(stack.url + "/")
        row = f'#task-rows [data-task-id="{failing}"]'
        await browser.wait_for(
            f"document.querySelector({json.dumps(row)}) !== null", what="the task list"
        )
        assert await browser.text(f"{row} td.error") == f"ValueError: {XSS}"
        assert await browser.text(f"{row} .task-status") == "failed"

        # By status: only failed tasks are left.
        await browser.evaluate(choose("filter-status", "failed"))
        await browser.wait_for(all_rows(".task-status", "failed"), what="only failed tasks")
        assert await browser.evaluate(f"document.querySelector({json.dumps(row)}) !== null")
        ok_row = f'#task-rows [data-task-id="{ok_ids[0]}"]'
        assert await browser.evaluate(f"document.querySelector({json.dumps(ok_row)}) === null")

        # By name (the names offered are those the broker counted).
        await browser.evaluate(choose("filter-status", ""))
        await browser.wait_for(
            f"[...document.getElementById('filter-name').options]"
            f".some((o) => o.value === {json.dumps(echo)})",
            what="the task names offered",
        )
        await browser.evaluate(choose("filter-name", echo))
        await browser.wait_for(all_rows("td:nth-child(2)", echo), what="only echo tasks")
        assert await browser.evaluate(f"document.querySelector({json.dumps(ok_row)}) !== null")

        # Opened from the list: every attempt, its node and error, and the traceback.
        await browser.evaluate(choose("filter-name", always_fails))
        await browser.wait_for(f"document.querySelector({json.dumps(row)}) !== null")
        await browser.evaluate(f"document.querySelector({json.dumps(row + ' button')}).click()")
        await browser.wait_for(
            "document.getElementById('lookup-history') !== null", what="the attempts"
        )
        assert await browser.text("#lookup-status") == "failed"
        attempts = await browser.evaluate(
            "[...document.querySelectorAll('#lookup-history tbody tr')]"
            ".map((r) => [...r.cells].map((c) => c.innerText))"
        )
        assert [a[0] for a in attempts] == ["1", "2", "3"]
        assert all(a[1] == NODE_ID and a[5] == "failed" for a in attempts), attempts
        assert all(a[6] == f"ValueError: {XSS}" for a in attempts), attempts
        assert await browser.text("#lookup-error") == f"ValueError: {XSS}"
        traceback = await browser.evaluate(
            "document.querySelector('#lookup-out details pre').textContent"
        )
        assert "raise ValueError" in traceback

        # Figures per task name.
        figures = f'#stat-rows [data-task-name="{always_fails}"]'
        await browser.wait_for(f"document.querySelector({json.dumps(figures)}) !== null")
        assert await browser.text(f"{figures} .failure-rate") == "100.0 %"
        echo_figures = f'#stat-rows [data-task-name="{echo}"]'
        assert await browser.text(f"{echo_figures} .failure-rate") == "0.0 %"
        assert (await browser.text(f"{echo_figures} .p50")).endswith("ms")
        assert (await browser.text(f"{echo_figures} .p95")).endswith("ms")

        await browser.screenshot(tmp_path / "tasks.png")
        injected = await browser.evaluate(
            "document.querySelectorAll('#task-rows img, #task-rows script,"
            " #lookup-out img, #lookup-out script').length"
        )
        assert injected == 0
        assert await browser.evaluate("typeof window.__xss") == "undefined"
        assert browser.errors == [], browser.errors


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
            # api/status answers 503 while the broker is down (for scripts and health
            # checks); Chromium logs each such answer, and nothing else may go wrong.
            unavailable = "the server responded with a status of 503"
            assert [e for e in browser.errors if unavailable not in e] == [], browser.errors


async def test_sigterm_stops_the_server_at_once(stack: Stack, launcher: Launcher) -> None:
    """SIGTERM stops uvicorn, closes the broker connection and exits 0, even after a
    page polled: no response of the dashboard stays open."""
    process = launch_dashboard(launcher, stack.broker.url)
    url = dashboard_url(process)
    async with aiohttp.ClientSession() as session:
        status, _ = await get_json(session, f"{url}/api/status")
        assert status == 200
    assert process.terminate() == 0
    assert process.find(r"dashboard stopped") is not None, process.log()


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
