"""Every code example of the user guide (tasks-guide.rst), run as written.

Each test runs twice: on the embedded default (``tests.apps.guide.app`` itself) and as a
client of a real ``flowrra-broker`` with a real ``flowrra-node --app tests.apps.guide:app``
(shared by the module's tests). The example code below is the guide's, with ``app`` bound to
the app under test; comments mark where a test adds checks around it.

The examples use the real httpx, aiosmtplib and pandas (the ``test`` extra), talking to real
local servers on 127.0.0.1 (``servers.py``: aiohttp for HTTP, aiosmtpd for SMTP). The node
processes learn the SMTP server's address from their environment (``SMTP_HOST``/``SMTP_PORT``,
as the guide says); the HTTP server's URL is a task argument.
"""

from __future__ import annotations

import asyncio
import csv
import inspect
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowrra import Flowrra, TaskStatus
from tests.apps import guide
from tests.apps.guide import (
    background_task,
    fails_at_once,
    fetch_api_data,
    may_fail,
    may_fail_quick,
    my_task,
    normal_task,
    process_csv,
    process_large_file,
    risky_operation,
    risky_operation_with,
    send_email,
    urgent_task,
)
from tests.conftest import Launcher, remote_twin
from tests.integration.servers import LOOPBACK, HttpServer, SmtpServer
from tests.test_docs import GUIDE_BLOCKS


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


def server_env(smtp_server: SmtpServer) -> dict[str, str]:
    """Where the guide's tasks find their servers; no HTTP proxy for loopback addresses."""
    return {
        "SMTP_HOST": LOOPBACK,
        "SMTP_PORT": str(smtp_server.port),
        "NO_PROXY": LOOPBACK,
        "no_proxy": LOOPBACK,
    }


@pytest.fixture(scope="module")
def guide_node(module_launcher: Launcher, smtp_server: SmtpServer) -> Any:
    """One broker and one node serving the guide's app, for the remote runs of this module."""
    broker = module_launcher.broker()
    module_launcher.node(
        broker,
        "tests.apps.guide:app",
        concurrency=20,
        processes=2,
        env=server_env(smtp_server),
    )
    return broker


@pytest.fixture(params=["embedded", "remote"])
def app(
    request: pytest.FixtureRequest, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> Flowrra:
    """The guide's ``app``: itself (embedded default) or its twin, a client of a real broker."""
    if request.param == "embedded":
        for name, value in server_env(smtp_server).items():
            monkeypatch.setenv(name, value)
        return guide.app
    return remote_twin(guide.app, request.getfixturevalue("guide_node"))


@pytest.mark.parametrize(
    "task", [fetch_api_data, send_email, process_csv], ids=lambda t: t.__name__
)
def test_the_app_module_has_the_guide_code_as_printed(task: Any) -> None:
    """The examples that use httpx, aiosmtplib and pandas are the guide's text, to the letter."""
    source = inspect.getsource(task).rstrip()
    [block] = [b for _, b in GUIDE_BLOCKS if f"def {task.__name__}(" in b]
    decorator = block.index("@app.task")
    assert block[decorator:] == source
    module_lines = inspect.getsource(guide).splitlines()
    for line in block[:decorator].splitlines():  # the block's imports
        assert not line or line in module_lines, line


# --------------------------------------------------------------------------- Defining Tasks


async def test_defining_tasks(app: Flowrra) -> None:
    spec = app.spec_for(my_task)
    assert spec.name == "tests.apps.guide.my_task"
    assert spec.is_async and not spec.cpu_bound
    async with app:
        task_id = await app.submit(my_task, "value", 1)
        result = await app.wait_for_result(task_id, timeout=10.0)
    assert result.status is TaskStatus.SUCCESS, result
    assert result.result == {"result": "success"}
    assert result.task_name == "tests.apps.guide.my_task"
    assert result.retries == 0
    assert result.submitted_at <= result.started_at <= result.finished_at  # type: ignore[operator]


# --------------------------------------------------------------------------- Async vs Sync


async def test_async_task_fetch_api_data(app: Flowrra) -> None:
    document = {"id": 42, "name": "ünïcode", "tags": ["a", "b"], "nested": {"ok": True}}
    async with HttpServer({"/api/items/42": document}) as http, app:
        task_id = await app.submit(fetch_api_data, http.url("/api/items/42"))
        result = await app.wait_for_result(task_id, timeout=10.0)
    assert result.success, result
    assert result.result == document
    assert [(m, p) for m, p, _ in http.requests] == [("GET", "/api/items/42")]


async def test_cpu_bound_process_large_file(app: Flowrra, tmp_path: Path) -> None:
    assert app.spec_for(process_large_file).cpu_bound
    path = tmp_path / "large.txt"
    text = "flowrra é 😀\n" * 50_000  # 650,000 characters, more bytes
    path.write_text(text, encoding="utf-8")
    async with app:
        task_id = await app.submit(process_large_file, str(path))
        result = await app.wait_for_result(task_id, timeout=20.0)
    assert result.success, result
    assert result.result == len(text)


# --------------------------------------------------------------------------- Task Configuration


async def test_task_configuration(app: Flowrra) -> None:
    spec = app.tasks["custom_task_name"]
    assert spec.fn is guide.configured_task
    assert (spec.max_retries, spec.retry_delay, spec.priority, spec.cpu_bound, spec.timeout) == (
        3,
        5.0,
        10,
        False,
        30.0,
    )
    async with app:
        task_id = await app.submit("custom_task_name")
        by_function = await app.submit(guide.configured_task)
        results = [await app.wait_for_result(i, timeout=10.0) for i in (task_id, by_function)]
    for result in results:
        assert result.status is TaskStatus.SUCCESS, result
        assert result.result is None
        assert result.task_name == "custom_task_name"


# --------------------------------------------------------------------------- Retry Configuration


async def test_retry_configuration_as_written(app: Flowrra) -> None:
    """``may_fail`` itself: the first attempt fails and a retry is scheduled (2 s later)."""
    spec = app.spec_for(may_fail)
    assert (spec.max_retries, spec.retry_delay) == (5, 2.0)
    async with app:
        task_id = await app.submit(may_fail)
        deadline = time.monotonic() + 10.0
        while True:
            result = await app.get_result(task_id)
            assert result is not None
            if result.retries >= 1 or result.is_complete:
                break
            assert time.monotonic() < deadline, f"no retry scheduled: {result}"
            await asyncio.sleep(0.02)
    assert result.status is TaskStatus.RETRYING, result
    assert result.retries == 1
    assert result.error == "Exception: Temporary failure"
    assert result.traceback and "Temporary failure" in result.traceback


async def test_retry_backoff_doubles(app: Flowrra, tmp_path: Path) -> None:
    """``may_fail`` with retry_delay 0.1 s: attempts 0.1, 0.2, 0.4, 0.8, 1.6 s apart."""
    attempt_log = tmp_path / "attempts.txt"
    async with app:
        task_id = await app.submit(may_fail_quick, str(attempt_log))
        result = await app.wait_for_result(task_id, timeout=20.0)
    assert result.status is TaskStatus.FAILED, result
    assert result.retries == 5
    assert result.error == "Exception: Temporary failure"
    assert result.traceback and 'raise Exception("Temporary failure")' in result.traceback
    starts = [float(line) for line in attempt_log.read_text().split()]
    assert len(starts) == 6, starts  # the first attempt and five retries
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    expected = [0.1 * 2**n for n in range(5)]
    for gap, want in zip(gaps, expected, strict=True):
        # Never early; late only by one dispatch round trip (generous: a busy 2-core machine).
        # An off-by-one exponent or a constant delay falls outside these bounds.
        assert want - 0.005 <= gap <= want + 0.35, f"gaps {gaps}, expected {expected}"


# --------------------------------------------------------------------------- Submitting Tasks


async def test_submitting_tasks(app: Flowrra) -> None:
    submitted: list[str] = []  # added: collects the ids the example creates

    # fmt: off
    async def main():
        async with app:
            # Submit task with arguments
            task_id = await app.submit(my_task, "arg1_value", 42)
            submitted.append(task_id)  # added

            # Submit with keyword arguments
            task_id = await app.submit(
                my_task,
                arg1="value",
                arg2=42
            )
            submitted.append(task_id)  # added

            # added: both calls bind to my_task(arg1, arg2), or they would fail with TypeError
            for task_id in submitted:
                result = await app.wait_for_result(task_id, timeout=10.0)
                assert result.success, result
                assert result.result == {"result": "success"}
    # fmt: on

    await main()
    assert len(set(submitted)) == 2


# --------------------------------------------------------------------------- Retrieving Results


async def test_wait_for_result_and_print(app: Flowrra, capsys: pytest.CaptureFixture[str]) -> None:
    async with app:
        task_id = await app.submit(my_task, "test", 123)

        # Wait for result with timeout
        result = await app.wait_for_result(task_id, timeout=10.0)

        if result.success:
            print(f"Result: {result.result}")
        else:
            print(f"Error: {result.error}")

        # added: the same code for a task that fails
        task_id = await app.submit(fails_at_once)
        result = await app.wait_for_result(task_id, timeout=10.0)
        if result.success:
            print(f"Result: {result.result}")
        else:
            print(f"Error: {result.error}")
    assert capsys.readouterr().out == (
        "Result: {'result': 'success'}\nError: Exception: Temporary failure\n"
    )


async def test_check_task_status(app: Flowrra, capsys: pytest.CaptureFixture[str]) -> None:
    async with app:
        task_id = await app.submit(my_task, "test", 123)

        # Get task status without waiting
        result = await app.get_result(task_id)

        if result:
            print(f"Status: {result.status}")
            print(f"Result: {result.result}")

        # added: once it is complete
        await app.wait_for_result(task_id, timeout=10.0)
        result = await app.get_result(task_id)
        if result:
            print(f"Status: {result.status}")
            print(f"Result: {result.result}")
    first_status, first_result, final_status, final_result = capsys.readouterr().out.splitlines()
    assert first_status in {"Status: pending", "Status: running", "Status: success"}
    assert first_result in {"Result: None", "Result: {'result': 'success'}"}
    assert (final_status, final_result) == ("Status: success", "Result: {'result': 'success'}")


# --------------------------------------------------------------------------- Error Handling


async def test_error_handling(app: Flowrra) -> None:
    assert app.spec_for(risky_operation).max_retries == 3
    async with app:
        as_written = await app.submit(risky_operation)
        specific = await app.submit(risky_operation_with, "specific")
        other = await app.submit(risky_operation_with, "other")
        fine = await app.submit(risky_operation_with, None)
        results = {
            name: await app.wait_for_result(task_id, timeout=10.0)
            for name, task_id in [
                ("as_written", as_written),
                ("specific", specific),
                ("other", other),
                ("fine", fine),
            ]
        }
    assert results["as_written"].status is TaskStatus.SUCCESS
    assert results["as_written"].result is None
    # SpecificError is re-raised: retried max_retries times, then FAILED.
    assert results["specific"].status is TaskStatus.FAILED
    assert results["specific"].retries == 3
    assert results["specific"].error == "SpecificError: the dependency is flaky"
    # Any other exception becomes an error value: the task succeeds at once.
    assert results["other"].status is TaskStatus.SUCCESS
    assert results["other"].result == {"error": "the input is bad"}
    assert results["other"].retries == 0
    assert results["fine"].result == {"ok": True}


# --------------------------------------------------------------------------- Task Priority


async def test_task_priority_example(app: Flowrra) -> None:
    """The example runs as written (the order itself is tested in test_priority_order.py)."""
    async with app:
        # added: record the ids; each line below is the guide's
        ids = []
        # High priority task (executed first)
        ids.append(await app.submit(urgent_task, priority=100))

        # Normal priority task
        ids.append(await app.submit(normal_task, priority=0))

        # Low priority task (executed last)
        ids.append(await app.submit(background_task, priority=-10))

        results = [await app.wait_for_result(task_id, timeout=10.0) for task_id in ids]
    assert [r.result["task"] for r in results] == ["urgent", "normal", "background"]
    assert all(r.success for r in results)


# --------------------------------------------------------------------------- Examples


async def test_send_email(app: Flowrra, smtp_server: SmtpServer) -> None:
    spec = app.spec_for(send_email)
    assert (spec.max_retries, spec.retry_delay) == (3, 10.0)
    smtp_server.drain()  # mail of the other mode's run
    async with app:
        task_id = await app.submit(
            send_email,
            "alice@example.com",
            "Hello from Flowrra",
            "Flowrra sent this.\nSecond line.",
        )
        result = await app.wait_for_result(task_id, timeout=15.0)
    assert result.status is TaskStatus.SUCCESS, result
    assert result.result == {"sent": True, "to": "alice@example.com"}
    assert result.retries == 0
    # The server queues a message before it acknowledges it, so it is there already.
    mail = smtp_server.received.get_nowait()
    assert mail.sender == "noreply@example.com"
    assert mail.recipients == ["alice@example.com"]
    assert mail.message["To"] == "alice@example.com"
    assert mail.message["Subject"] == "Hello from Flowrra"
    assert mail.message.get_content().splitlines() == ["Flowrra sent this.", "Second line."]
    assert smtp_server.received.empty()  # exactly one message


async def test_process_csv(app: Flowrra, tmp_path: Path) -> None:
    spec = app.spec_for(process_csv)
    assert spec.cpu_bound and spec.timeout == 300.0
    path = tmp_path / "data.csv"
    rows = 1234
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "score", "note"])
        for i in range(rows):
            # Quoted fields with commas and line breaks: a record is not a line.
            note = f"line one,\nline two of row {i}" if i % 100 == 0 else "plain"
            writer.writerow([i, f"rów{i}", i * 0.5, note])
    assert len(path.read_text(encoding="utf-8").splitlines()) == rows + 1 + 13
    async with app:
        task_id = await app.submit(process_csv, str(path))
        result = await app.wait_for_result(task_id, timeout=30.0)
    assert result.status is TaskStatus.SUCCESS, result
    assert result.result == {"rows_processed": rows}
