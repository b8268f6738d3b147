"""The task repository: key layouts, the tick cache, and the migration of store format 1."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack

from flowrra.broker.records import Attempt, TaskRecord
from flowrra.broker.repository import STORE_FORMAT, TaskRepository
from flowrra.broker.store import LmdbStore, MemoryStore, Table
from flowrra.protocol import TaskStatus, pack_args
from tests.broker.harness import NODE_A, Harness, submission


def _record(task_id: str = "t1") -> TaskRecord:
    return TaskRecord.from_submission(submission(task_id), order=1)


def test_finishing_rewrites_neither_the_arguments_nor_the_history() -> None:
    store = MemoryStore()
    repo = TaskRepository(store)
    record = _record()
    repo.add(record)
    store.commit()
    record.attempt = 1
    repo.record_attempt(record, record.attempt_end("failed", error="E: x"))
    record.status = TaskStatus.FAILED
    repo.finish(record, expires_ms=5_000)
    written = {table for table, _ in store._pending}
    assert Table.PAYLOADS not in written
    assert written == {Table.TASKS, Table.HISTORY, Table.DEAD, Table.EXPIRY}
    store.commit()
    repo.end_tick()
    again = repo.get("t1")
    assert again is not None and again.payload == record.payload
    assert again.status is TaskStatus.FAILED
    assert repo.history("t1") == [Attempt(1, None, None, None, "failed", "E: x")]


def test_a_record_written_in_a_tick_is_not_decoded_again_in_it() -> None:
    repo = TaskRepository(MemoryStore())
    record = _record()
    repo.add(record)
    assert repo.get("t1") is record
    repo.end_tick()
    decoded = repo.get("t1")
    assert decoded is not None and decoded is not record and decoded == record


def test_forget_and_expire_remove_every_trace() -> None:
    store = MemoryStore()
    repo = TaskRepository(store)
    record = _record()
    repo.add(record)
    repo.take_queued(record.order)
    record.attempt = 1
    repo.record_attempt(record, record.attempt_end("success"))
    record.status = TaskStatus.SUCCESS
    repo.finish(record, expires_ms=1_000)
    store.commit()
    assert repo.expire(now_ms=999) == 0
    assert repo.expire(now_ms=1_000) == 1
    store.commit()
    repo.end_tick()
    assert all(store.count(table) == 0 for table in Table if table is not Table.META)


def _format_1_record(task_id: str, payload: bytes, history: list[list[object]]) -> bytes:
    fields = [1, task_id, "jobs.work", 0, payload, 3, 2.0, None, 1.0, "success", 2, 1, 7]
    fields += [1.5, 2.5, msgpack.packb(3), None, None, None, None, 0, history, 90.0, 1.2]
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def test_a_format_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    payload = pack_args([1, 2], {})
    history = [[1, "n1", 1.0, 1.2, "failed", "E: x"], [2, "n1", 1.5, 2.5, "success", None]]
    store = LmdbStore(tmp_path / "db")
    store.put(Table.TASKS, b"old", _format_1_record("old", payload, history))
    store.put(Table.META, b"format", struct.pack(">Q", 1))
    store.put(Table.META, b"next_order", struct.pack(">Q", 7))
    store.commit()
    store.close()

    h = Harness(LmdbStore(tmp_path / "db"))
    h.broker.recover(h.now)
    h.broker.store.commit()
    record = h.broker.view("old")
    assert record is not None and record.payload == payload and record.attempt == 2
    assert record.status is TaskStatus.SUCCESS and record.expires_at == 90.0
    assert [list(a) for a in h.broker.history("old")] == history
    assert h.broker.store.get(Table.META, b"format") == struct.pack(">Q", STORE_FORMAT)
    h.ready(NODE_A)
    h.broker.store.close()
