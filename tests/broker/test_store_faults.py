"""Failed commits (EIO, ENOSPC, a panicked LMDB environment) through a fault-injecting store.

:class:`FaultyLmdbStore` is a real :class:`LmdbStore` whose write transactions fail at commit
on demand, the way ``mdb_txn_commit`` fails on a full or failing disk: the writes were made,
LMDB aborts the transaction, and the error comes back. The promise being tested
(docs/operations.md, "A full disk"): such a commit refuses the tick's submissions with
``SubmitRejected``, the broker keeps serving reads and results, and it takes writes again as
soon as the disk does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

import flowrra.broker.server
import flowrra.broker.store
from flowrra import Flowrra
from flowrra.broker.config import BrokerConfig
from flowrra.broker.store import (
    Durability,
    LmdbStore,
    MemoryStore,
    Store,
    StoreError,
    StoreFullError,
    Table,
)
from flowrra.errors import FlowrraError, SubmitRejected
from flowrra.protocol import Command, TaskStatus, parse_ack
from tests.broker.harness import NODE_A, Harness, submission
from tests.conftest import wait_until
from tests.failures.helpers import eventually

Fault = Callable[[], BaseException]

# What a commit on a full or failing disk raises, as LMDB (py-lmdb) and the OS report it.
FAULTS: dict[str, Fault] = {
    "lmdb-eio": lambda: lmdb.Error("mdb_txn_commit: Input/output error"),
    "lmdb-enospc": lambda: lmdb.DiskError("mdb_txn_commit: No space left on device"),
    "os-enospc": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "os-eio": lambda: OSError(errno.EIO, os.strerror(errno.EIO)),
}
EIO = FAULTS["lmdb-eio"]
# The faults that name a full disk whatever the free space.
FULL_DISK = {"lmdb-enospc", "os-enospc"}


class _FailingCommit:
    """A write transaction whose commit fails: LMDB has aborted it, nothing was applied."""

    def __init__(self, txn: Any, fault: BaseException) -> None:
        self._txn = txn
        self._fault = fault

    def __enter__(self) -> Any:
        return self._txn.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        if exc_type is not None:
            return self._txn.__exit__(exc_type, exc, tb)
        self._txn.abort()
        raise self._fault


class _FaultyEnv:
    """An LMDB environment whose write transactions fail while its store has a fault."""

    def __init__(self, env: Any, store: FaultyLmdbStore) -> None:
        self._env = env
        self._store = store

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        store = self._store
        if store.panicked:
            raise lmdb.PanicError(
                "mdb_txn_begin: MDB_PANIC: Update of meta page failed or environment had "
                "fatal error"
            )
        txn = self._env.begin(*args, **kwargs)
        if kwargs.get("write") and store.fault is not None:
            store.failures += 1
            store.panicked = store.panic
            return _FailingCommit(txn, store.fault())
        return txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


class FaultyLmdbStore(LmdbStore):
    """An :class:`LmdbStore` whose commits fail while ``fault`` is set.

    With ``panic``, a failure also leaves the environment the way LMDB does when it could not
    write its meta page (MDB_FATAL_ERROR): every later transaction fails until it is reopened.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fault: Fault | None = None
        self.panic = False
        self.panicked = False
        self.failures = 0
        self.opened = 0
        super().__init__(*args, **kwargs)

    def _open_env(self) -> Any:
        self.opened += 1
        self.panicked = False
        return _FaultyEnv(super()._open_env(), self)


class FaultyMemoryStore(MemoryStore):
    """A :class:`MemoryStore` whose commits raise ``fault`` (any error, as-is)."""

    def __init__(self) -> None:
        super().__init__()
        self.fault: Fault | None = None

    def commit(self) -> None:
        if self.fault is not None and self.dirty:
            raise self.fault()
        super().commit()


@pytest.fixture(params=list(Durability))
def lmdb_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FaultyLmdbStore]:
    store = FaultyLmdbStore(tmp_path / "db", request.param)
    yield store
    store.close()


# --------------------------------------------------------------------------- the errors


def test_store_errors_are_flowrra_errors() -> None:
    assert issubclass(StoreError, FlowrraError)
    assert issubclass(StoreFullError, StoreError)
    assert (
        flowrra.broker.store.StoreFullError is StoreFullError
    )  # still importable from flowrra.broker.store


# --------------------------------------------------------------------------- the store


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_commit_raises_a_store_error_and_changes_nothing(
    lmdb_store: FaultyLmdbStore, fault: str
) -> None:
    lmdb_store.put(Table.TASKS, b"kept", b"1")
    lmdb_store.commit()
    lmdb_store.fault = FAULTS[fault]
    lmdb_store.put(Table.TASKS, b"new", b"2")
    lmdb_store.delete(Table.TASKS, b"kept")
    with pytest.raises(StoreError) as raised:
        lmdb_store.commit()
    assert isinstance(raised.value, StoreFullError) is (fault in FULL_DISK)
    assert str(FAULTS[fault]()) in str(raised.value)  # the cause, named for the operator
    assert lmdb_store.path in str(raised.value)
    assert isinstance(raised.value.__cause__, lmdb.Error | OSError)
    # Nothing was applied, the writes are still buffered, and the committed data is readable.
    assert lmdb_store.dirty
    assert list(lmdb_store.scan(Table.TASKS)) == [(b"kept", b"1")]
    lmdb_store.discard()
    assert lmdb_store.get(Table.TASKS, b"kept") == b"1"
    assert lmdb_store.get(Table.TASKS, b"new") is None
    # Once the disk takes writes again, so does the store.
    lmdb_store.fault = None
    lmdb_store.put(Table.TASKS, b"after", b"3")
    lmdb_store.commit()
    assert list(lmdb_store.scan(Table.TASKS)) == [(b"after", b"3"), (b"kept", b"1")]


def test_a_commit_can_be_retried_after_a_failure(lmdb_store: FaultyLmdbStore) -> None:
    lmdb_store.fault = EIO
    lmdb_store.put(Table.TASKS, b"k", b"v")
    with pytest.raises(StoreError):
        lmdb_store.commit()
    lmdb_store.fault = None
    lmdb_store.commit()  # the buffered writes were kept
    assert not lmdb_store.dirty
    assert list(lmdb_store.scan(Table.TASKS)) == [(b"k", b"v")]


def test_eio_on_a_nearly_full_disk_is_a_full_disk(
    lmdb_store: FaultyLmdbStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short write on a nearly full file system comes back from LMDB as EIO, not ENOSPC.
    monkeypatch.setattr(flowrra.broker.store, "_free_bytes", lambda path: 12 * 1024)
    lmdb_store.fault = EIO
    lmdb_store.put(Table.TASKS, b"k", b"v" * 50_000)
    with pytest.raises(StoreFullError, match=r"is full: mdb_txn_commit: Input/output error"):
        lmdb_store.commit()


def test_a_panicked_environment_is_reopened_and_keeps_serving_reads(
    lmdb_store: FaultyLmdbStore,
) -> None:
    lmdb_store.put(Table.TASKS, b"kept", b"1")
    lmdb_store.commit()
    lmdb_store.fault, lmdb_store.panic = EIO, True
    lmdb_store.put(Table.TASKS, b"new", b"2")
    with pytest.raises(StoreError):
        lmdb_store.commit()
    assert lmdb_store.opened == 2  # reopened: a panicked environment refuses every txn
    lmdb_store.discard()
    assert lmdb_store.get(Table.TASKS, b"kept") == b"1"
    assert list(lmdb_store.scan(Table.TASKS)) == [(b"kept", b"1")]
    lmdb_store.fault = None
    lmdb_store.put(Table.TASKS, b"after", b"3")
    lmdb_store.commit()
    assert lmdb_store.get(Table.TASKS, b"after") == b"3"


def test_the_maximum_map_size_is_a_full_store(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db", Durability.FAST, map_size=64 * 1024, max_map_size=128 * 1024)
    try:
        store.put(Table.TASKS, b"big", b"x" * 300_000)
        with pytest.raises(StoreFullError, match="maximum size"):
            store.commit()
        store.discard()
        store.put(Table.TASKS, b"small", b"x")
        store.commit()
        assert store.get(Table.TASKS, b"small") == b"x"
    finally:
        store.close()


# --------------------------------------------------------------------------- the broker


def _acks(h: Harness) -> dict[str, str | None]:
    return {a.task_id: a.error for _, m in h.replies(Command.ACK) for a in parse_ack(m.body)}


def _commit(h: Harness) -> bool:
    """Commit the tick the way BrokerService does; False if the commit failed."""
    try:
        h.broker.store.commit()
    except StoreError as exc:
        h.broker.store.discard()
        h.broker.abandon_tick(str(exc), h.now)
        return False
    return True


def test_the_broker_refuses_a_failed_ticks_submits_and_serves_reads(tmp_path: Path) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FAST)
    h = Harness(store)
    try:
        h.submit(submission("t1"))
        assert _commit(h)
        assert _acks(h) == {"t1": None}
        store.fault = EIO
        h.submit(submission("t2"))
        assert not _commit(h)
        error = _acks(h)["t2"]
        assert error is not None and "broker storage error" in error
        assert "Input/output error" in error
        record = h.get("t1")  # reads are served meanwhile
        assert record is not None and record["status"] == TaskStatus.PENDING
        assert h.get("t2") is None
        store.fault = None
        h.submit(submission("t2"))  # the same id again, once the disk has room
        assert _commit(h)
        assert _acks(h) == {"t2": None}
        assert len(h.broker.queues) == 2
    finally:
        store.close()


def test_a_result_reported_in_a_failed_tick_is_recorded_once_the_disk_has_room(
    tmp_path: Path,
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FAST)
    h = Harness(store)
    try:
        h.submit(submission("t1"))
        h.ready(NODE_A)
        h.tick()
        assert _commit(h)  # t1 is durably leased to A
        h.take()
        store.fault = EIO
        h.result(NODE_A, "t1", 1, "done")  # the node sends its outcome once...
        h.tick()
        assert not _commit(h)  # ...in a tick whose commit fails
        store.fault = None
        # Node A stays connected and behaves like node/worker.py: it heartbeats, and when
        # asked to register again it lists t1#1 as held and re-sends its recent outcomes.
        welcomed = 1
        for _ in range(40):
            h.advance(0.25, heartbeats=(NODE_A,))
            assert _commit(h)
            for peer, message in h.replies():
                if peer != NODE_A:
                    continue
                if message.command is Command.RECONNECT:
                    h.ready(NODE_A, running=[("t1", 1)])
                elif message.command is Command.WELCOME:
                    welcomed += 1
                    if welcomed > 1:
                        h.result(NODE_A, "t1", 1, "done")
            if h.record("t1").status is TaskStatus.SUCCESS:
                break
        assert h.record("t1").status is TaskStatus.SUCCESS
    finally:
        store.close()


# --------------------------------------------------------------------------- end to end


async def echo(value: str) -> str:
    return value


def _embedded(
    monkeypatch: pytest.MonkeyPatch,
    store: Store,
    data_dir: Path,
    durability: Durability,
    *,
    confirm_submits: bool = True,
) -> Flowrra:
    """An embedded app (broker, node and client in this process) over ``store``, whose
    submits wait for the broker's confirmation (a refusal is raised by ``submit()``), or
    with ``confirm_submits=False`` do not (a refusal reaches the task's waiters)."""
    monkeypatch.setattr(flowrra.broker.server, "open_store", lambda config: store)
    twin = Flowrra.from_urls(
        data_dir=str(data_dir), durability=durability.value, confirm_submits=confirm_submits
    )
    twin.task(max_retries=0)(echo)
    return twin


async def _status_counter(twin: Flowrra, name: str) -> int:
    status = await twin.admin("status")
    return int(status["counters"].get(name, 0))


@pytest.mark.parametrize("fault", ["lmdb-eio", "lmdb-enospc", "os-enospc"])
@pytest.mark.parametrize("durability", list(Durability))
async def test_submits_are_refused_reads_served_and_writes_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Durability, fault: str
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", durability)
    twin = _embedded(monkeypatch, store, tmp_path / "db", durability)
    async with twin:
        before = await twin.submit(echo, "before")
        assert (await twin.wait_for_result(before, timeout=10)).result == "before"

        store.fault = FAULTS[fault]
        refused_id = "f" * 32
        with pytest.raises(SubmitRejected, match="broker storage error") as refused:
            await twin.submit(echo, "during", task_id=refused_id)
        assert str(FAULTS[fault]()) in str(refused.value)
        assert not any(task.done() for task in twin._background)  # broker and node run on
        # The broker is still up and serves reads: state, results, operator commands.
        result = await twin.get_result(before)
        assert result is not None and result.success and result.result == "before"
        assert await twin.get_result(refused_id) is None
        assert await _status_counter(twin, "failed_commits") >= 1
        assert store.failures >= 1

        store.fault = None
        again = await twin.submit(echo, "during", task_id=refused_id)  # the refused call
        after = await twin.submit(echo, "after")
        assert (await twin.wait_for_result(again, timeout=10)).result == "during"
        assert (await twin.wait_for_result(after, timeout=10)).result == "after"
    assert store.opened == 1


async def test_a_panicked_store_is_reopened_and_the_broker_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FULL)
    twin = _embedded(monkeypatch, store, tmp_path / "db", Durability.FULL)
    async with twin:
        before = await twin.submit(echo, "before")
        await twin.wait_for_result(before, timeout=10)
        store.fault, store.panic = EIO, True
        with pytest.raises(SubmitRejected, match="Input/output error"):
            await twin.submit(echo, "during")
        assert store.opened == 2
        result = await twin.get_result(before)
        assert result is not None and result.result == "before"
        store.fault = None
        after = await twin.submit(echo, "after")
        assert (await twin.wait_for_result(after, timeout=10)).result == "after"


FLAKY_ATTEMPTS: list[str] = []


async def flaky(tag: str) -> str:
    """Fails its first attempt (so that its retry falls due while the disk is full)."""
    FLAKY_ATTEMPTS.append(tag)
    if len(FLAKY_ATTEMPTS) == 1:
        raise ValueError("the first attempt fails")
    return tag


async def test_a_task_due_while_commits_fail_is_not_handed_out_on_every_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FAST)
    monkeypatch.setattr(flowrra.broker.server, "open_store", lambda config: store)
    twin = Flowrra.from_urls(data_dir=str(tmp_path / "db"))
    twin.task(max_retries=1, retry_delay=0.3)(flaky)
    FLAKY_ATTEMPTS.clear()
    async with twin:
        task_id = await twin.submit(flaky, "done")

        async def retrying() -> bool:
            state = await twin.get_result(task_id)
            return state is not None and state.status is TaskStatus.RETRYING

        await eventually(retrying, what="the first attempt failed and its retry scheduled")
        store.fault = EIO  # the retry falls due while no commit succeeds
        await wait_until(lambda: store.failures >= 8, what="failed commits")
        during = len(FLAKY_ATTEMPTS) - 1
        store.fault = None
        result = await twin.wait_for_result(task_id, timeout=10)
        assert result.success and result.result == "done"
    assert during <= 1, f"the retry was started {during} times while commits failed"


@pytest.mark.parametrize(
    "error",
    [
        lambda: StoreError("could not write to the store: Input/output error"),
        lambda: StoreFullError("the disk is full"),
        FAULTS["os-enospc"],
    ],
    ids=["store-error", "store-full", "os-error"],
)
async def test_any_store_s_commit_error_refuses_the_tick(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Fault
) -> None:
    store = FaultyMemoryStore()
    twin = _embedded(monkeypatch, store, tmp_path / "unused", Durability.FAST)
    async with twin:
        store.fault = error
        with pytest.raises(SubmitRejected, match="broker storage error"):
            await twin.submit(echo, "during")
        store.fault = None
        after = await twin.submit(echo, "after")
        assert (await twin.wait_for_result(after, timeout=10)).result == "after"


async def test_the_failure_is_logged_once_then_at_intervals_and_the_recovery_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyLmdbStore(tmp_path / "db", Durability.FAST)
    twin = _embedded(monkeypatch, store, tmp_path / "db", Durability.FAST)
    async with twin:
        store.fault = EIO
        with caplog.at_level("WARNING", logger="flowrra.broker"):
            for value in ("a", "b", "c"):
                with pytest.raises(SubmitRejected):
                    await twin.submit(echo, value)
            store.fault = None
            done = await twin.submit(echo, "after")
            await twin.wait_for_result(done, timeout=10)
    failed = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failed) == 1, [r.message for r in failed]
    assert "Input/output error" in failed[0].message
    assert any("accepts writes again, after 3 failed commits" in r.message for r in caplog.records)


def test_open_store_gives_the_lmdb_store_for_a_data_dir(tmp_path: Path) -> None:
    store = flowrra.broker.server.open_store(BrokerConfig(data_dir=str(tmp_path / "db")))
    try:
        assert isinstance(store, LmdbStore)
        store.put(Table.META, b"k", b"v")
        store.commit()
    finally:
        store.close()
    assert isinstance(flowrra.broker.server.open_store(BrokerConfig(data_dir=None)), MemoryStore)
