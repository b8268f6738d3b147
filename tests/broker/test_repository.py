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


# --------------------------------------------------------------------------- in-memory snapshots


def _full_record() -> TaskRecord:
    record = _record()
    record.status = TaskStatus.RETRYING
    record.attempt, record.retries, record.worker_losses, record.step = 2, 1, 1, 3
    record.started_at, record.finished_at, record.retry_at = 10.5, 11.25, 12.0
    record.result, record.error, record.traceback = b"\x01", "E: x", "Traceback ..."
    record.node_id, record.workflow_id = "node-a", "wf"
    record.expires_at, record.queued_at, record.eta, record.deadline = 99.0, 9.0, 8.0, 50.0
    record.progress = [3, 10, "copying"]
    return record


def test_a_snapshot_encodes_to_the_stored_record_and_rebuilds_it() -> None:
    record = _full_record()
    assert TaskRecord.encode_snapshot(record.snapshot()) == record.encode()
    rebuilt = TaskRecord.from_snapshot(record.snapshot(), record.payload)
    assert rebuilt == record == TaskRecord.decode(record.encode(), record.payload)
    assert rebuilt.status is TaskStatus.RETRYING and rebuilt.progress == [3, 10, "copying"]
    # The in-memory store reads like LMDB: its bytes are the record's encoding.
    store = MemoryStore()
    repo = TaskRepository(store)
    repo.add(record)
    assert store.get(Table.TASKS, b"t1") == record.encode()
    store.commit()
    assert store.get(Table.TASKS, b"t1") == record.encode()
    assert list(store.scan(Table.TASKS)) == [(b"t1", record.encode())]


def test_a_record_changed_in_place_leaves_the_stored_one_as_it_was_saved() -> None:
    store = MemoryStore()
    repo = TaskRepository(store)
    record = _full_record()
    repo.add(record)
    store.commit()
    repo.end_tick()
    # The caller still holds the object it saved (as a lease holds its record) and changes
    # it, nested progress list included, without saving it again.
    record.status = TaskStatus.SUCCESS
    record.result = b"changed"
    assert record.progress is not None
    record.progress[0] = 99
    stored = repo.get("t1")
    assert stored is not None and stored is not record
    assert stored.status is TaskStatus.RETRYING and stored.result == b"\x01"
    assert stored.progress == [3, 10, "copying"]


def test_a_rolled_back_tick_restores_the_records_it_changed() -> None:
    """A failed commit (``Broker.abandon_tick``) discards the tick's writes: every record
    read from the store afterwards is as committed, whatever the tick did to the objects it
    read, saved or kept."""
    store = MemoryStore()
    repo = TaskRepository(store)
    kept = _full_record()
    repo.add(kept)
    other = TaskRecord.from_submission(submission("t2"), order=2)
    repo.add(other)
    store.commit()
    repo.end_tick()
    committed = {t: store.get(Table.TASKS, t.encode()) for t in ("t1", "t2")}
    # The lost tick: t1 read and changed in place (not saved), t2 changed and saved, the
    # object added in an earlier tick changed and saved too, and a new task added.
    read = repo.get("t1")
    assert read is not None
    read.status, read.attempt = TaskStatus.RUNNING, 3
    again = repo.get("t2")
    assert again is not None
    again.status, again.result = TaskStatus.SUCCESS, b"lost"
    repo.finish(again, expires_ms=5_000)
    kept.error = "changed in the lost tick"
    repo.save(kept)
    repo.add(TaskRecord.from_submission(submission("t3"), order=3))
    store.discard()
    repo.end_tick()
    assert {t: store.get(Table.TASKS, t.encode()) for t in ("t1", "t2")} == committed
    t1, t2 = repo.get("t1"), repo.get("t2")
    assert t1 is not None and t1.status is TaskStatus.RETRYING and t1.attempt == 2
    assert t1.error == "E: x"
    assert t2 is not None and t2.status is TaskStatus.PENDING and t2.result is None
    assert repo.get("t3") is None and not repo.exists("t3")
    assert store.count(Table.EXPIRY) == 0


def test_a_failed_commit_after_an_outcome_rolls_the_broker_back_to_the_stored_record() -> None:
    """The broker's own rollback over the in-memory store: the outcome of a tick whose commit
    failed is not in the record, and applied again it is recorded once."""
    h = Harness(MemoryStore())
    h.submit(submission("t1"))
    h.ready(NODE_A)
    h.tick()
    h.broker.store.commit()  # t1 is durably leased to A (its record is as accepted)
    h.take()
    h.result(NODE_A, "t1", 1, "done")  # complete() changes the lease's record in place
    assert h.record("t1").status is TaskStatus.SUCCESS
    h.broker.store.discard()  # the tick's commit fails
    h.broker.abandon_tick("disk full", h.now)
    data = h.broker.store.get(Table.TASKS, b"t1")
    assert data is not None
    stored = TaskRecord.decode(data, b"")
    assert stored.status is TaskStatus.PENDING and stored.attempt == 0
    assert stored.result is None and stored.finished_at is None
    assert h.record("t1").status is TaskStatus.RUNNING  # its lease was recovered
    assert h.broker.history("t1") == []
    h.result(NODE_A, "t1", 1, "done")  # reported again (the node re-sends after READY)
    h.broker.store.commit()
    h.broker.repo.end_tick()
    final = h.broker.repo.get("t1")
    assert final is not None and final.status is TaskStatus.SUCCESS and final.attempt == 1
    assert [a.outcome for a in h.broker.history("t1")] == ["success"]
