"""The pytest plugin of ``flowrra.testing``: ``flowrra_app`` and ``flowrra_clock``.

The plugin is active through the package's ``pytest11`` entry point (no ``pytest_plugins``
here): these tests use its fixtures as a user's tests would. Retries and countdowns of hours
run after ``flowrra_clock.advance()``, with no real wait (each test is bounded in real time).
"""

from __future__ import annotations

import time

import pytest

from flowrra import Flowrra, TaskStatus
from flowrra.testing import Clock, embedded_copy, load_app, wait_for_status
from tests.apps import guide
from tests.conftest import free_port
from tests.integration.servers import SmtpServer

# The app under test, as a user's project would have it: its tasks are registered on it, and
# the flowrra_app fixture runs an embedded copy of it per test.
app = Flowrra.from_urls()
attempts: dict[str, int] = {}


@app.task(max_retries=3, retry_delay=60.0)
async def flaky(key: str, failures: int) -> str:
    """Fails its first ``failures`` attempts, then returns ``"ok after N"``."""
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] <= failures:
        raise ConnectionError(f"attempt {attempts[key]} failed")
    return f"ok after {attempts[key]}"


@app.task()
async def hello(name: str) -> str:
    return f"hello {name}"


pytestmark = [pytest.mark.flowrra_app(app), pytest.mark.timeout(20)]

pytest_plugins = ["pytester"]

# Nothing here may take long in real time: the clock does the waiting.
REAL_S = 5.0


async def test_a_failed_task_is_retried_after_advancing_the_clock(
    flowrra_app: Flowrra, flowrra_clock: Clock
) -> None:
    started = time.monotonic()
    task_id = await flowrra_app.submit(flaky, "retry", failures=1)
    retrying = await wait_for_status(flowrra_app, task_id, "retrying", retries=1)
    assert retrying.error == "ConnectionError: attempt 1 failed"

    flowrra_clock.advance(59)  # not yet due: the retry waits for the full 60 s
    with pytest.raises(TimeoutError):
        await flowrra_app.wait_for_result(task_id, timeout=0.3)
    assert attempts["retry"] == 1

    flowrra_clock.advance(1)
    result = await flowrra_app.wait_for_result(task_id, timeout=REAL_S)
    assert result.success and result.result == "ok after 2" and result.retries == 1
    assert time.monotonic() - started < REAL_S


async def test_backoff_doubles_on_the_clock(flowrra_app: Flowrra, flowrra_clock: Clock) -> None:
    task_id = await flowrra_app.submit(flaky, "backoff", failures=3)
    for retry, delay in [(1, 60), (2, 120), (3, 240)]:
        await wait_for_status(flowrra_app, task_id, "retrying", retries=retry)
        flowrra_clock.advance(delay)
    result = await flowrra_app.wait_for_result(task_id, timeout=REAL_S)
    assert result.result == "ok after 4" and result.retries == 3


async def test_a_countdown_task_runs_once_the_clock_reaches_it(
    flowrra_app: Flowrra, flowrra_clock: Clock
) -> None:
    task_id = await flowrra_app.submit(hello, "later", countdown=3600)
    scheduled = await wait_for_status(flowrra_app, task_id, "scheduled")
    assert scheduled.eta is not None

    flowrra_clock.advance(3000)
    with pytest.raises(TimeoutError):
        await flowrra_app.wait_for_result(task_id, timeout=0.3)

    flowrra_clock.advance(600)
    result = await flowrra_app.wait_for_result(task_id, timeout=REAL_S)
    assert result.result == "hello later"


async def test_expires_follows_the_clock(flowrra_app: Flowrra, flowrra_clock: Clock) -> None:
    task_id = await flowrra_app.submit(hello, "too late", countdown=600, expires=300)
    await wait_for_status(flowrra_app, task_id, "scheduled")
    flowrra_clock.advance(300)
    result = await flowrra_app.wait_for_result(task_id, timeout=REAL_S)
    assert result.status is TaskStatus.EXPIRED


# Each test gets a new app with an empty store: an id stored by the first of these two tests
# is unknown in the second (pytest runs them in this order).
KNOWN_ID = "plugin-clean-store"


async def test_store_a_task(flowrra_app: Flowrra) -> None:
    await flowrra_app.submit(hello, "store", task_id=KNOWN_ID)
    assert (await flowrra_app.wait_for_result(KNOWN_ID, timeout=REAL_S)).success


async def test_the_next_test_starts_with_an_empty_store(flowrra_app: Flowrra) -> None:
    assert await flowrra_app.get_result(KNOWN_ID) is None
    assert flowrra_app is not app and app._service is None  # the user's app never starts


# ----------------------------------------------------------------------- docs/testing.md
# The example of docs/testing.md, as written there (the guide's send_email task, whose app
# tests/apps/guide.py mirrors; a real project would write "myproject.tasks:app").


@pytest.mark.flowrra_app("tests.apps.guide:app", processes=0)
async def test_send_email_is_retried_until_it_fails(flowrra_app, flowrra_clock, monkeypatch):
    # No SMTP server listens there: every attempt fails to connect.
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(free_port()))

    task_id = await flowrra_app.submit(guide.send_email, "a@example.com", "Hi", "Hello")

    # send_email has max_retries=3, retry_delay=10.0: retries 10, 20 and 40 s after a failure.
    for retry, delay in [(1, 10), (2, 20), (3, 40)]:
        await wait_for_status(flowrra_app, task_id, "retrying", retries=retry)
        flowrra_clock.advance(delay)

    result = await flowrra_app.wait_for_result(task_id, timeout=5)
    assert result.status is TaskStatus.FAILED
    assert result.retries == 3
    assert "Connect" in (result.error or "")  # aiosmtplib's SMTPConnectError


@pytest.mark.flowrra_app("tests.apps.guide:app", processes=0)
async def test_send_email_retry_delivers_once_the_server_is_up(
    flowrra_app: Flowrra, flowrra_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(free_port()))
    task_id = await flowrra_app.submit(guide.send_email, "b@example.com", "Hi", "Hello")
    await wait_for_status(flowrra_app, task_id, "retrying", retries=1)

    server = SmtpServer().start()
    try:
        monkeypatch.setenv("SMTP_PORT", str(server.port))  # read by the next attempt
        flowrra_clock.advance(10)
        result = await flowrra_app.wait_for_result(task_id, timeout=REAL_S)
        assert result.result == {"sent": True, "to": "b@example.com"}
        assert result.retries == 1
        assert server.received.get(timeout=1).recipients == ["b@example.com"]
    finally:
        server.stop()


# ----------------------------------------------------------------------- building blocks


def test_embedded_copy_has_the_same_tasks() -> None:
    copy = embedded_copy("tests.apps.guide:app", processes=0)
    assert copy is not guide.app and copy.embedded and copy.processes == 0
    assert set(copy.tasks) == set(guide.app.tasks)
    assert copy.spec_for(guide.send_email) == guide.app.spec_for(guide.send_email)
    assert load_app("tests.apps.guide") is guide.app  # the attribute defaults to "app"


def test_load_app_refuses_what_is_not_an_app() -> None:
    with pytest.raises(TypeError, match="not a Flowrra app"):
        load_app("tests.apps.guide:send_email")


def test_the_clock_only_moves_forward() -> None:
    clock = Clock()
    before = clock()
    clock.advance(100)
    assert clock() - before >= 100
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)


def test_a_remote_app_takes_no_clock() -> None:
    with pytest.raises(ValueError, match="embedded"):
        Clock().attach(Flowrra.from_urls(broker="tcp://127.0.0.1:1"))


def test_the_entry_point_registers_the_plugin(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("flowrra")
    assert plugin is not None and plugin.__name__ == "flowrra.testing"


INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"


def test_a_project_names_its_app_in_the_pytest_configuration(pytester: pytest.Pytester) -> None:
    # A user's project: nothing imported from flowrra.testing, the app named in the ini file.
    pytester.makeini(f"{INI}flowrra_app = tests.apps.guide:app\n")
    pytester.makepyfile(
        """
        from tests.apps.guide import my_task

        async def test_it(flowrra_app):
            task_id = await flowrra_app.submit(my_task, "a", 1)
            result = await flowrra_app.wait_for_result(task_id, timeout=5)
            assert result.result == {"result": "success"}
        """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_without_a_target_the_fixture_says_how_to_give_one(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile("async def test_it(flowrra_app):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*@pytest.mark.flowrra_app('myproject.tasks:app')*"])
