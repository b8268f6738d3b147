"""ProcessPool: results, errors, timeouts, dead workers, parallelism and shutdown, for real."""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import os
import signal
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from flowrra.errors import RemoteTaskError, TaskTimeoutError, WorkerLostError
from flowrra.node.process_pool import FunctionRef, ProcessPool, _resolve
from flowrra.protocol import pack_args, unpack_value
from tests.conftest import wait_until

FUNCS = "tests.node.pool_funcs"

MakePool = Callable[[int], Awaitable[ProcessPool]]

# One event loop for the module, so the well-behaved tests can share one pool: starting a
# spawn worker costs a few tenths of a second.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_pool() -> AsyncIterator[ProcessPool]:
    """A 2-worker pool for tests that leave every worker alive and idle."""
    pool = ProcessPool(2)
    await pool.start()
    yield pool
    await pool.close(grace_s=0.5)


@pytest_asyncio.fixture(loop_scope="module")
async def make_pool() -> AsyncIterator[MakePool]:
    """Fresh pools for tests that kill workers or close the pool."""
    pools: list[ProcessPool] = []

    async def make(size: int) -> ProcessPool:
        pool = ProcessPool(size)
        pools.append(pool)
        await pool.start()
        return pool

    yield make
    for pool in pools:
        await pool.close(grace_s=0.5)


async def call(
    pool: ProcessPool, name: str, *args: Any, timeout: float | None = None, **kwargs: Any
) -> Any:
    raw = await pool.run(FunctionRef(FUNCS, name), pack_args(args, kwargs), timeout)
    return unpack_value(raw)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def distinct_pids(pool: ProcessPool) -> set[int]:
    """Ask every worker for its pid at once; all of them must answer."""
    pids = await asyncio.gather(*(call(pool, "burn", 0.05) for _ in range(pool.size)))
    found = {p[0] for p in pids}
    assert len(found) == pool.size
    return found


async def test_start_gives_a_full_pool(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    assert pool.size == 2
    assert pool.alive == 2
    assert pool.idle == 2
    assert len(pool.pids) == 2
    assert os.getpid() not in pool.pids


async def test_results_round_trip(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    assert await call(pool, "add", 2, b=40) == 42
    assert await call(pool, "echo", 1, "two", [3.0, None], flag=True, nested={"k": b"v"}) == [
        [1, "two", [3.0, None]],
        {"flag": True, "nested": {"k": b"v"}},
    ]
    when = dt.datetime(2024, 2, 28, 12, 30, tzinfo=dt.UTC)
    result = await call(pool, "shift_day", when, b"\x00\x01\xff")
    assert result == {"when": when + dt.timedelta(days=1), "blob": b"\xff\x01\x00", "size": 3}


async def test_calls_run_in_parallel(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    await distinct_pids(pool)  # both workers have imported the task module
    started = time.monotonic()
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = await asyncio.gather(
        call(pool, "burn", 0.5), call(pool, "burn", 0.5)
    )
    elapsed = time.monotonic() - started
    assert pid_a != pid_b
    assert start_a < end_b and start_b < end_a, "the two calls did not overlap"
    # Serial execution would take the sum of both durations.
    single = max(end_a - start_a, end_b - start_b)
    assert elapsed < 1.5 * single, (elapsed, single)


async def test_exception_becomes_remote_task_error(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    with pytest.raises(RemoteTaskError) as info:
        await call(pool, "fail", "bad input 42")
    err = info.value
    assert err.exc_type == "ValueError"
    assert err.message == "bad input 42"
    assert str(err) == "ValueError: bad input 42"
    assert err.traceback is not None
    assert "Traceback (most recent call last)" in err.traceback
    assert "in fail" in err.traceback
    assert "ValueError: bad input 42" in err.traceback

    with pytest.raises(RemoteTaskError) as info:
        await call(pool, "Nested.explode")
    assert (info.value.exc_type, info.value.message) == ("Nested.Boom", "nested boom")

    # The worker survives its task's exceptions.
    assert await call(pool, "add", 1, 1) == 2


async def test_unencodable_result_is_serialization_error(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    with pytest.raises(RemoteTaskError) as info:
        await call(pool, "unencodable")
    assert info.value.exc_type == "SerializationError"
    assert "set" in info.value.message


async def test_unresolvable_functions(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    payload = pack_args([], {})
    with pytest.raises(RemoteTaskError) as info:
        await pool.run(FunctionRef("tests.node.no_such_module", "f"), payload, None)
    assert info.value.exc_type == "ModuleNotFoundError"
    with pytest.raises(RemoteTaskError) as info:
        await pool.run(FunctionRef(FUNCS, "no_such_function"), payload, None)
    assert info.value.exc_type == "AttributeError"
    with pytest.raises(RemoteTaskError) as info:
        await pool.run(FunctionRef(FUNCS, "CONSTANT"), payload, None)
    assert info.value.exc_type == "TypeError"
    assert await call(pool, "add", 1, 2) == 3


async def test_main_module_resolves_to_the_spawned_main(monkeypatch: pytest.MonkeyPatch) -> None:
    mp_main = types.ModuleType("__mp_main__")
    mp_main.task = lambda: "from __mp_main__"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__mp_main__", mp_main)
    assert _resolve("__main__", "task")() == "from __mp_main__"


async def test_timeout_kills_and_replaces_the_worker(make_pool: MakePool) -> None:
    pool = await make_pool(2)
    before = set(pool.pids)
    with pytest.raises(TaskTimeoutError, match=r"^task exceeded its timeout of 0\.3s$"):
        await call(pool, "spin_forever", timeout=0.3)
    gone = {pid for pid in before if not pid_exists(pid)}
    assert len(gone) == 1, "exactly the runaway worker is killed, and reaped before the error"
    await wait_until(lambda: pool.idle == 2)
    assert pool.alive == 2
    after = await distinct_pids(pool)
    assert after & gone == set()
    assert after & before == before - gone
    assert await call(pool, "add", 3, 4, timeout=5.0) == 7


async def test_worker_exit_is_worker_lost(make_pool: MakePool) -> None:
    pool = await make_pool(2)
    before = set(pool.pids)
    with pytest.raises(WorkerLostError) as info:
        await call(pool, "hard_exit", 3)
    message = str(info.value)
    lost = next(pid for pid in before if f"worker process {pid} " in message)
    assert message == f"worker process {lost} died (exit code 3) while running hard_exit"
    await wait_until(lambda: pool.idle == 2)
    assert pool.alive == 2
    after = await distinct_pids(pool)
    assert lost not in after
    assert before - {lost} <= after


async def test_idle_worker_killed_from_outside_is_replaced(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    pid = await call(pool, "getpid")
    os.kill(pid, signal.SIGINT)  # workers leave Ctrl-C to the parent
    assert await call(pool, "getpid") == pid
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: pool.idle == 1 and pid not in pool.pids)
    assert pool.alive == 1
    new_pid = await call(pool, "getpid")
    assert new_pid != pid
    assert not pid_exists(pid)


async def test_more_calls_than_workers_all_complete(shared_pool: ProcessPool) -> None:
    pool = shared_pool
    results = await asyncio.gather(*(call(pool, "burn", 0.05) for _ in range(7)))
    assert len({pid for pid, _, _ in results}) == 2
    # Never more than one call per process: at most two calls overlap at any moment.
    events = sorted(
        [(start, 1) for _, start, _ in results] + [(end, -1) for _, _, end in results],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    assert await asyncio.gather(*(call(pool, "add", i, i) for i in range(5))) == [
        0,
        2,
        4,
        6,
        8,
    ]


async def test_cancelled_call_kills_its_worker(make_pool: MakePool) -> None:
    pool = await make_pool(1)
    (pid,) = pool.pids
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(pool, "spin_forever"), timeout=0.3)
    await wait_until(lambda: pool.idle == 1 and pid not in pool.pids)
    assert pool.alive == 1
    assert await call(pool, "getpid") != pid
    assert not pid_exists(pid)


async def test_close_stops_every_worker(make_pool: MakePool) -> None:
    pool = await make_pool(2)
    pids = list(pool.pids)
    finishing = asyncio.create_task(call(pool, "burn", 0.05))
    runaway = asyncio.create_task(call(pool, "spin_forever"))
    waiting = asyncio.create_task(call(pool, "add", 1, 2))
    await asyncio.sleep(0)  # one loop turn: the three tasks hand over their calls

    await pool.close(grace_s=0.8)

    assert (await finishing)[0] in pids  # a call that ends within the grace period completes
    with pytest.raises(WorkerLostError, match="while running spin_forever"):
        await runaway
    with pytest.raises(WorkerLostError, match="pool closed"):
        await waiting
    assert pool.alive == 0
    assert pool.pids == []
    assert not any(pid_exists(pid) for pid in pids)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]

    await pool.close()  # idempotent
    with pytest.raises(RuntimeError):
        await call(pool, "add", 1, 1)


ORPHAN_SCRIPT = """
import asyncio, os, signal
from flowrra.node.process_pool import ProcessPool

async def main():
    pool = ProcessPool(2)
    await pool.start()
    print(*pool.pids, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # die without close()

asyncio.run(main())
"""


def process_ended(pid: int) -> bool:
    """Gone, or a zombie waiting for an init that does not reap (as in some containers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
async def test_workers_exit_when_the_parent_dies() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHAN_SCRIPT, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    line = await asyncio.wait_for(parent.stdout.readline(), timeout=10)
    await parent.wait()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2
    await wait_until(lambda: all(process_ended(pid) for pid in pids))
