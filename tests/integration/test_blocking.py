"""``app.sync``: the blocking facade, from many threads, embedded and against a real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flowrra import (
    Flowrra,
    FlowrraError,
    SerializationError,
    TaskIdConflict,
    TaskNotFoundError,
    TaskResult,
    TaskStatus,
    call,
)
from flowrra.blocking import SyncCallInLoopError
from tests.apps import failures
from tests.conftest import (
    ROOT,
    BrokerProcess,
    Launcher,
    embedded_twin,
    remote_twin,
    subprocess_env,
)

APP = "tests.apps.failures:app"
THREADS = 8
PER_THREAD = 1000
LOOP_THREAD = "flowrra-sync-loop"


@pytest.fixture(scope="module")
def remote_broker(module_launcher: Launcher) -> BrokerProcess:
    """One broker with two nodes of the test tasks, shared by this module's remote tests."""
    broker = module_launcher.broker()
    nodes = [module_launcher.node(broker, APP, concurrency=100, wait=False) for _ in range(2)]
    for node in nodes:
        node.process.wait_for(r"registered with broker ")
    return broker


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest) -> Iterator[Flowrra]:
    if request.param == "embedded":
        made = embedded_twin(failures.app, processes=0)
    else:
        made = remote_twin(failures.app, request.getfixturevalue("remote_broker"))
    yield made
    made.sync.close()  # before the broker is stopped


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == LOOP_THREAD]


def wait_for_marker(directory: Path, pattern: str, timeout: float = 15.0) -> None:
    """Until a task's marker file appears (in a thread that may not run an event loop)."""
    appeared = threading.Event()
    deadline = time.monotonic() + timeout
    while not any(directory.glob(pattern)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern} in {directory} within {timeout}s")
        appeared.wait(0.01)


@pytest.mark.timeout(120)
def test_many_threads_at_once_get_distinct_ids_and_the_right_results(app: Flowrra) -> None:
    before = len(loop_threads())
    start = threading.Barrier(THREADS)

    def work(thread: int) -> tuple[list[str], list[TaskResult]]:
        start.wait(timeout=30)  # the first use, too, comes from every thread at once
        ids = [app.sync.submit(failures.add, thread * 100_000, i) for i in range(PER_THREAD)]
        return ids, [app.sync.wait_for_result(task_id, timeout=60) for task_id in ids]

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(work, range(THREADS)))

    every_id = [task_id for ids, _ in outcomes for task_id in ids]
    assert len(set(every_id)) == THREADS * PER_THREAD
    for thread, (ids, results) in enumerate(outcomes):
        assert [r.task_id for r in results] == ids
        assert all(r.status is TaskStatus.SUCCESS for r in results)
        assert [r.result for r in results] == [thread * 100_000 + i for i in range(PER_THREAD)]
    assert len(loop_threads()) == before + 1  # one loop thread for the app, however used


def test_errors_raised_in_the_loop_reach_the_calling_thread_unchanged(app: Flowrra) -> None:
    with pytest.raises(SerializationError):
        app.sync.submit(failures.ping, object())
    first = app.sync.submit(failures.ping, 1, task_id="sync-conflict")
    assert app.sync.submit(failures.ping, 1, task_id="sync-conflict") == first  # idempotent
    with pytest.raises(TaskIdConflict):
        app.sync.submit(failures.ping, 2, task_id="sync-conflict")
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.2s"):
        app.sync.wait_for_result("sync-never-submitted", timeout=0.2)
    with pytest.raises(TaskNotFoundError):
        app.sync.submit(print)
    with pytest.raises(TypeError, match="each call of submit_many"):
        app.sync.submit_many(failures.ping, ["not a sequence of arguments"])
    with pytest.raises(ValueError, match="task_id"):
        app.sync.cancel("")
    with pytest.raises(FlowrraError, match="no scheduler yet"):
        _ = app.sync.scheduler
    assert app.sync.wait_for_result(first, timeout=15).result == 1


def test_the_other_client_methods_workflows_and_the_scheduler(app: Flowrra) -> None:
    sync = app.sync
    task_id = sync.submit(failures.add, 2, 3)
    assert sync.wait_for_result(task_id, timeout=15).result == 5
    got = sync.get_result(task_id)
    assert got is not None and got.result == 5
    assert sync.get_result("sync-unknown") is None
    assert sync.cancel(task_id) is False  # already final
    assert [s.status for s in sync.watch(task_id)] == [TaskStatus.SUCCESS]

    ids = sync.submit_many(failures.add, [(i, i) for i in range(10)], priority=5)
    assert [sync.wait_for_result(i, timeout=15).result for i in ids] == [2 * i for i in range(10)]

    last = sync.chain(call(failures.add, 1, 2), call(failures.add, 10))
    assert sync.wait_for_result(last, timeout=15).result == 13
    group_id = sync.group(*(call(failures.add, i, 1) for i in range(5)))
    assert [r.result for r in sync.wait_for_group(group_id, timeout=15)] == [1, 2, 3, 4, 5]
    members = sync.get_group(group_id)
    assert members is not None and [r.result for r in members] == [1, 2, 3, 4, 5]
    callback = sync.chord([call(failures.add, i) for i in range(4)], call(failures.total))
    assert sync.wait_for_result(callback, timeout=15).result == 6

    scheduler = sync.create_scheduler()
    assert sync.scheduler is scheduler and sync.create_scheduler() is scheduler
    schedule = scheduler.schedule_interval(failures.ping, 3600, args=(1,), enabled=False)
    assert scheduler.schedule_interval(failures.ping, 3600, args=(1,), enabled=False) == schedule
    stored = scheduler.get_scheduled_task(schedule)
    assert stored is not None and not stored.enabled and stored.schedule == 3600
    assert scheduler.enable_task(schedule) is True
    assert scheduler.disable_task(schedule) is True
    assert [s.id for s in scheduler.list_scheduled_tasks()] == [schedule]
    assert scheduler.unschedule(schedule) is True
    assert scheduler.get_scheduled_task(schedule) is None


async def test_inside_an_event_loop_it_refuses_and_points_to_the_async_api() -> None:
    app = embedded_twin(failures.app, processes=0)
    with pytest.raises(SyncCallInLoopError, match=r"use `await app\.submit\(\.\.\.\)`"):
        app.sync.submit(failures.ping, 1)
    with pytest.raises(RuntimeError, match=r"await app\.wait_for_result"):
        app.sync.wait_for_result("anything", timeout=1)
    with pytest.raises(SyncCallInLoopError, match=r"async for snapshot in app\.watch"):
        next(app.sync.watch("anything"))
    with pytest.raises(SyncCallInLoopError, match=r"scheduler\.schedule_cron"):
        app.sync.create_scheduler().schedule_cron(failures.ping, "* * * * *")
    assert not app.sync.running  # nothing was started
    async with app:  # and the async API is unaffected
        assert (await app.wait_for_result(await app.submit(failures.ping, 4), 10)).result == 4


async def test_an_app_already_started_in_another_loop_is_refused() -> None:
    app = embedded_twin(failures.app, processes=0)
    async with app:
        with pytest.raises(FlowrraError, match="already started in another event loop"):
            await asyncio.to_thread(app.sync.submit, failures.ping, 1)
        assert (await app.wait_for_result(await app.submit(failures.ping, 2), 10)).result == 2
    assert not app.sync.running


def test_close_stops_the_app_and_joins_the_thread_and_a_later_call_starts_again() -> None:
    app = embedded_twin(failures.app, processes=0)
    before = loop_threads()
    assert not app.sync.running
    assert app.sync.wait_for_result(app.sync.submit(failures.ping, 1), timeout=10).result == 1
    assert app.sync.running and len(loop_threads()) == len(before) + 1
    app.sync.close()
    assert not app.sync.running and loop_threads() == before
    app.sync.close()  # twice is harmless

    async def use_it_async() -> int:  # the app was stopped: another loop may start it
        async with app:
            result = await app.wait_for_result(await app.submit(failures.ping, 2), 10)
            return int(result.result)

    assert asyncio.run(use_it_async()) == 2
    with app.sync as sync:  # started again, and closed at the end of the block
        assert sync.wait_for_result(sync.submit(failures.ping, 3), timeout=10).result == 3
    assert not app.sync.running and loop_threads() == before


def test_a_wait_with_a_timeout_returns_even_while_the_loop_is_blocked(tmp_path: Path) -> None:
    app = embedded_twin(failures.app, processes=0)
    try:
        # An async task that calls time.sleep blocks the loop it runs in: here, app.sync's.
        # (Delayed, so that the submit is acknowledged before the loop is blocked.)
        blocker = app.sync.submit(failures.block_loop, str(tmp_path), 2.5, countdown=0.2)
        wait_for_marker(tmp_path, "block.*")
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=r"app\.sync loop did not answer within 0\.2s"):
            app.sync.wait_for_result(blocker, timeout=0.2)
        assert time.monotonic() - began < 2.0  # not until the loop is free again
        assert app.sync.wait_for_result(blocker, timeout=15).status is TaskStatus.SUCCESS
    finally:
        app.sync.close()


EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading

    from flowrra import Flowrra
    from tests.apps import failures

    app = Flowrra.from_urls(broker=sys.argv[1])
    for spec in failures.app.tasks.values():
        app.task(name=spec.name)(spec.fn)
    outcome = []
    done = threading.Event()

    def report():  # registered before app.sync starts, so it runs after app.sync's handler
        done.wait(10)
        print("outcome:", *outcome, flush=True)

    atexit.register(report)
    app.sync.start()
    print("started", flush=True)
    sys.stdin.readline()  # the test has stopped the broker

    def submit():
        try:
            outcome.append("acked " + app.sync.submit(failures.ping, 7, task_id="at-exit"))
        except BaseException as exc:
            outcome.append(f"failed {exc!r}")
        finally:
            done.set()

    threading.Thread(target=submit, daemon=True).start()
    while not app.sync.pending_acknowledgements and not done.is_set():
        done.wait(0.01)
    print("exiting", flush=True)
    """
)


def test_interpreter_exit_waits_for_outstanding_acknowledgements(launcher: Launcher) -> None:
    broker = launcher.broker()
    script = subprocess.Popen(
        [sys.executable, "-c", EXIT_SCRIPT, broker.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
    )
    assert script.stdin is not None and script.stdout is not None
    stopped = False
    try:
        assert script.stdout.readline().strip() == "started"
        os.kill(broker.process.pid, signal.SIGSTOP)  # nothing is acknowledged for now
        stopped = True
        script.stdin.write("go\n")
        script.stdin.flush()
        assert script.stdout.readline().strip() == "exiting"  # main is done; the submit is not
        os.kill(broker.process.pid, signal.SIGCONT)
        stopped = False
        output, _ = script.communicate(timeout=20)
    finally:
        if stopped:
            os.kill(broker.process.pid, signal.SIGCONT)
        if script.poll() is None:
            script.kill()
            script.wait()
    assert script.returncode == 0, output
    assert output.strip().splitlines()[-1] == "outcome: acked at-exit", output

    async def stored() -> TaskResult | None:
        async with remote_twin(failures.app, broker) as client:
            return await client.get_result("at-exit")

    record = asyncio.run(stored())
    assert record is not None and record.task_name == failures.app.spec_for(failures.ping).name
