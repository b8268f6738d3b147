"""The broker's task repository: its durable state in domain terms, over one :class:`Store`.

This module is the one owner of the store's key layouts (after huey's storage classes): the
broker core speaks of tasks to add, queue, lease, time, finish, expire and dead-letter, never
of tables and key bytes. Layouts, table by table:

* ``tasks``: task id -> the record (:meth:`TaskRecord.encode`), without its arguments and
  history, so that finishing a task rewrites neither;
* ``payloads``: task id -> the packed arguments, written once at accept;
* ``history``: len(task id) (1 byte) + task id + attempt (4 bytes, big-endian) -> one attempt's
  end; an attempt appends one entry, and a task's entries are one range scan;
* ``queue``: queue order (8 bytes, big-endian) -> ``[task id, name, priority]``;
* ``leases``: task id -> attempt (8 bytes, big-endian) + node id;
* ``timers``: due_ms (8 bytes, big-endian) + task id -> b"";
* ``expiry``: expire_at_ms (8 bytes, big-endian) + task id -> b"" (finished results);
* ``dead``: (2**64 - 1 - expire_at_ms) (8 bytes, big-endian) + task id -> b"", newest first;
* ``schedules``: schedule id -> its definition and slot state (a msgpack map);
* ``workflows``: workflow id -> its steps and finished members (a msgpack map);
* ``meta``: the store format, the next queue order and the registered node ids.

Big-endian integers sort numerically as LMDB keys, so every index is a cursor scan.

Records decoded or written during a tick are kept until :meth:`end_tick`, so a record
accepted and dispatched in the same tick is decoded zero times. Over the in-memory store
(the embedded default) a record is stored as its immutable :meth:`TaskRecord.snapshot`
(a history entry as its :class:`Attempt`) instead of its encoding: a later tick builds a
new object from it, so changing a record in place never changes what is stored, and a
rolled-back tick leaves the stored records as they were.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

from flowrra.broker.records import Attempt, TaskRecord, decode_attempt, encode_attempt
from flowrra.broker.store import MemoryStore, Store, Table
from flowrra.errors import FlowrraError
from flowrra.protocol import TaskStatus, packb

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U64_MAX = 2**64 - 1
_NEXT_ORDER_KEY = b"next_order"
# The ids of the registered nodes (msgpack list), rewritten when a node joins or leaves.
_NODES_KEY = b"nodes"
_FORMAT_KEY = b"format"
# The layout of the store's tables and keys; bumped whenever any of them changes. Format 1
# kept arguments and history inside the record; it is migrated in place at start-up.
STORE_FORMAT = 2


# The tables as module constants: reading a member from its enum class costs about 70 ns in
# Python 3.11, a module global a few ns, and a task passes a dozen store calls.
_TASKS, _PAYLOADS, _HISTORY = Table.TASKS, Table.PAYLOADS, Table.HISTORY
_QUEUE, _LEASES, _TIMERS, _EXPIRY = Table.QUEUE, Table.LEASES, Table.TIMERS, Table.EXPIRY
_DEAD, _META, _SCHEDULES, _WORKFLOWS = Table.DEAD, Table.META, Table.SCHEDULES, Table.WORKFLOWS
_FAILED = TaskStatus.FAILED


class StoreFormatError(FlowrraError, ValueError):
    """The data directory was written by an incompatible version."""


def _history_prefix(task_id: bytes) -> bytes:
    return bytes([len(task_id)]) + task_id


def _dead_key(expires_ms: int, task_id: bytes) -> bytes:
    return _U64.pack(_U64_MAX - expires_ms) + task_id


class TaskRepository:
    """Tasks, queue entries, leases, timers, results and dead letters, durably."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # In memory, records are kept as snapshots (TaskRecord.snapshot) from one tick to the
        # next: no encoding at each save and no decoding when a later tick reads them.
        self._memory = store if isinstance(store, MemoryStore) else None
        if self._memory is not None:
            self._memory.keep_objects(_TASKS, TaskRecord.encode_snapshot)
            # History entries too: an Attempt is a tuple of immutable values.
            self._memory.keep_objects(_HISTORY, encode_attempt)
        self._records: dict[str, TaskRecord] = {}  # this tick's decoded or written records
        # Queue entries of tasks added this tick (new orders, never committed) -> task id.
        self._fresh: dict[int, str] = {}

    def end_tick(self) -> None:
        """Forget the records kept for this tick (called once per tick, and after a failed
        commit, when the store's pending writes were discarded)."""
        self._records.clear()
        self._fresh.clear()

    # ------------------------------------------------------------------ records

    def get(self, task_id: str) -> TaskRecord | None:
        """A task's stored record (with its arguments, without its history), or None."""
        record = self._records.get(task_id)
        if record is not None:
            return record
        key = task_id.encode()
        memory = self._memory
        data = self.store.get(_TASKS, key) if memory is None else memory.get_object(_TASKS, key)
        if data is None:
            return None
        payload = self.store.get(_PAYLOADS, key) or b""
        if type(data) is tuple:
            record = TaskRecord.from_snapshot(data, payload)
        else:
            record = TaskRecord.decode(data, payload)
        self._records[task_id] = record
        return record

    def exists(self, task_id: str) -> bool:
        if task_id in self._records:
            return True
        key = task_id.encode()
        memory = self._memory
        if memory is not None:
            return memory.get_object(_TASKS, key) is not None
        return self.store.get(_TASKS, key) is not None

    def save(self, record: TaskRecord) -> None:
        """Write a record's state as it is now (its arguments are written once, by
        :meth:`add`); later changes to the object are not stored until it is saved again."""
        if self._memory is not None:
            self._memory.put_object(_TASKS, record.task_id.encode(), record.snapshot())
        else:
            self.store.put(_TASKS, record.task_id.encode(), record.encode())
        self._records[record.task_id] = record

    def add(self, record: TaskRecord, *, queued: bool = True) -> None:
        """Store a new task with its arguments, and queue it (unless it waits for a timer)."""
        self.store.put(_PAYLOADS, record.task_id.encode(), record.payload)
        if queued:
            self.enqueue(record)
            self._fresh[record.order] = record.task_id
        self.save(record)

    def history(self, task_id: str) -> list[Attempt]:
        """The ends of a task's attempts, oldest first."""
        prefix = _history_prefix(task_id.encode())
        stop = prefix + b"\xff" * _U32.size
        return [decode_attempt(v) for _, v in self.store.scan(_HISTORY, prefix, stop)]

    def record_attempt(self, record: TaskRecord, entry: Attempt) -> None:
        """Append the end of the record's current attempt to its history."""
        # Every dispatch has a new attempt number, and each attempt ends once.
        task_id = record.task_id.encode()  # (_history_prefix inline)
        key = bytes((len(task_id),)) + task_id + _U32.pack(record.attempt & 0xFFFFFFFF)
        if self._memory is not None:
            self._memory.put_object(_HISTORY, key, entry)
        else:
            self.store.put(_HISTORY, key, encode_attempt(entry))

    def save_payload(self, record: TaskRecord) -> None:
        """Rewrite a task's arguments (a workflow step handing its result on)."""
        self.store.put(_PAYLOADS, record.task_id.encode(), record.payload)

    def forget(self, task_id: str) -> None:
        """Delete everything stored about a task (and its workflow with its last step)."""
        record = self.get(task_id)
        if record is not None and record.workflow_id is not None:
            workflow = self.get_workflow(record.workflow_id)
            if workflow is not None and task_id in workflow["steps"][-1]:
                self.store.delete(_WORKFLOWS, record.workflow_id.encode())
        key = task_id.encode()
        self.store.delete(_TASKS, key)
        self.store.delete(_PAYLOADS, key)
        prefix = _history_prefix(key)
        for hkey, _ in self.store.scan(_HISTORY, prefix, prefix + b"\xff" * _U32.size):
            self.store.delete(_HISTORY, hkey)
        self._records.pop(task_id, None)

    # ------------------------------------------------------------------ queue

    @staticmethod
    def queue_key(order: int) -> bytes:
        return _U64.pack(order)

    def enqueue(self, record: TaskRecord) -> None:
        """The queue entry of a PENDING record at its ``order``."""
        entry = packb([record.task_id, record.name, record.priority])
        self.store.put(_QUEUE, _U64.pack(record.order), entry)

    def take_queued(self, order: int) -> str | None:
        """Remove a queue entry; the task id it held (None if there was none)."""
        key = _U64.pack(order)
        task_id = self._fresh.pop(order, None)
        # Added this tick, at a new order the store never held: nothing to delete.
        if task_id is not None and self.store.unput(_QUEUE, key):
            return task_id
        entry = self.store.get(_QUEUE, key)
        if entry is None:
            return None
        self.store.delete(_QUEUE, key)
        held: str = msgpack.unpackb(entry)[0]
        return held

    def queued_task(self, order: int) -> str | None:
        """The task id a queue entry holds, left in place (None if there is none)."""
        task_id = self._fresh.get(order)
        if task_id is not None:
            return task_id
        entry = self.store.get(_QUEUE, _U64.pack(order))
        return None if entry is None else msgpack.unpackb(entry)[0]

    def queued(self) -> Iterator[tuple[int, str, int]]:
        """``(order, name, priority)`` of every queue entry, in order (for recovery)."""
        for key, entry in self.store.scan(_QUEUE):
            _task_id, name, priority = msgpack.unpackb(entry)
            yield _U64.unpack(key)[0], name, priority

    def next_order(self) -> int:
        stored = self.store.get(_META, _NEXT_ORDER_KEY)
        return 0 if stored is None else int(_U64.unpack(stored)[0])

    def store_next_order(self, order: int) -> None:
        self.store.put(_META, _NEXT_ORDER_KEY, _U64.pack(order))

    def registered_nodes(self) -> list[str] | None:
        """The node ids registered when the set last changed (None: never stored)."""
        stored = self.store.get(_META, _NODES_KEY)
        return None if stored is None else list(msgpack.unpackb(stored))

    def store_registered_nodes(self, node_ids: list[str]) -> None:
        self.store.put(_META, _NODES_KEY, packb(node_ids))

    # ------------------------------------------------------------------ leases

    def lease(self, record: TaskRecord) -> None:
        """The durable lease of a record's current attempt (on ``record.node_id``)."""
        value = _U64.pack(record.attempt) + (record.node_id or "").encode()
        self.store.put(_LEASES, record.task_id.encode(), value)

    def end_lease(self, task_id: str) -> None:
        self.store.delete(_LEASES, task_id.encode())

    def leases(self) -> Iterator[tuple[str, int, str]]:
        """``(task id, attempt, node id)`` of every stored lease (for recovery)."""
        for key, value in self.store.scan(_LEASES):
            yield key.decode(), _U64.unpack(value[:8])[0], value[8:].decode()

    # ------------------------------------------------------------------ timers

    def set_timer(self, due_ms: int, task_id: str) -> None:
        self.store.put(_TIMERS, _U64.pack(due_ms) + task_id.encode(), b"")

    def clear_timer(self, due_ms: int, task_id: str) -> None:
        self.store.delete(_TIMERS, _U64.pack(due_ms) + task_id.encode())

    def timers(self) -> Iterator[tuple[int, str]]:
        """``(due_ms, task id)`` of every stored timer (for recovery)."""
        for key, _ in self.store.scan(_TIMERS):
            yield _U64.unpack(key[:8])[0], key[8:].decode()

    # ------------------------------------------------------------------ results

    def finish(self, record: TaskRecord, expires_ms: int) -> None:
        """Store a final record, due to be forgotten at ``expires_ms``; a FAILED one is a
        dead letter until then."""
        key = record.task_id.encode()
        if record.status is _FAILED:
            self.store.put(_DEAD, _dead_key(expires_ms, key), b"")
        self.save(record)
        self.store.put(_EXPIRY, _U64.pack(expires_ms) + key, b"")

    def unfinish(self, record: TaskRecord) -> bool:
        """Take a dead letter out of the dead-letter and expiry indexes (to queue it again)."""
        if record.expires_at is None:
            return False
        expires_ms = int(record.expires_at * 1000)
        key = record.task_id.encode()
        if self.store.get(_DEAD, _dead_key(expires_ms, key)) is None:
            return False
        self.store.delete(_DEAD, _dead_key(expires_ms, key))
        self.store.delete(_EXPIRY, _U64.pack(expires_ms) + key)
        return True

    def expire(self, now_ms: int) -> int:
        """Forget finished tasks whose expiry time has passed; how many."""
        expired = 0
        for key, _ in self.store.scan(_EXPIRY, b"", _U64.pack(now_ms + 1)):
            self.store.delete(_EXPIRY, key)
            task_id = key[_U64.size :]
            self.store.delete(_DEAD, _dead_key(_U64.unpack(key[:8])[0], task_id))
            self.forget(task_id.decode())
            expired += 1
        return expired

    def dead_letters(self, limit: int) -> list[TaskRecord]:
        """FAILED tasks, newest first (reads only what it returns)."""
        records = []
        for key, _ in self.store.scan(_DEAD):
            record = self.get(key[_U64.size :].decode())
            if record is not None and record.status is _FAILED:
                records.append(record)
                if len(records) >= limit:
                    break
        return records

    def count_dead(self) -> int:
        return self.store.count(_DEAD)

    def count_results(self) -> int:
        return self.store.count(_EXPIRY)

    # ------------------------------------------------------------------ schedules

    def save_schedule(self, schedule: dict[str, Any]) -> None:
        self.store.put(_SCHEDULES, schedule["id"].encode(), packb(schedule))

    def delete_schedule(self, schedule_id: str) -> None:
        self.store.delete(_SCHEDULES, schedule_id.encode())

    def schedules(self) -> Iterator[dict[str, Any]]:
        for _, value in self.store.scan(_SCHEDULES):
            yield msgpack.unpackb(value, raw=False)

    # ------------------------------------------------------------------ workflows

    def get_workflow(self, workflow_id: str) -> dict[str, Any] | None:
        data = self.store.get(_WORKFLOWS, workflow_id.encode())
        return None if data is None else msgpack.unpackb(data, raw=False)

    def save_workflow(self, workflow: dict[str, Any]) -> None:
        self.store.put(_WORKFLOWS, workflow["id"].encode(), packb(workflow))

    # ------------------------------------------------------------------ format

    def check_format(self) -> None:
        """Refuse a store in a layout this broker does not read; migrate format 1."""
        stored = self.store.get(_META, _FORMAT_KEY)
        if stored is None:  # a new store, or one from before the marker: ask a record
            first = next(iter(self.store.scan(_TASKS)), None)
            if first is None or msgpack.unpackb(first[1])[0] != 1:
                self.store.put(_META, _FORMAT_KEY, _U64.pack(STORE_FORMAT))
                return
            stored = _U64.pack(1)
        version = _U64.unpack(stored)[0]
        if version == 1:
            self._migrate_from_format_1()
        elif version != STORE_FORMAT:
            raise StoreFormatError(
                f"the data directory holds store format {version}; this broker reads "
                f"format {STORE_FORMAT}: run the matching Flowrra version"
            )

    def _migrate_from_format_1(self) -> None:
        """Split arguments and history out of format 1 records (in this tick's commit)."""
        for key, data in list(self.store.scan(_TASKS)):
            record, history = TaskRecord.decode_format_1(data)
            self.store.put(_PAYLOADS, key, record.payload)
            for entry in history:
                current, record.attempt = record.attempt, entry.attempt
                self.record_attempt(record, entry)
                record.attempt = current
            self.store.put(_TASKS, key, record.encode())
        self.store.put(_META, _FORMAT_KEY, _U64.pack(STORE_FORMAT))
