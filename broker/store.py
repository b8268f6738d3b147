"""The broker's durable state: one module owns LMDB.

The store is an ordered key-value space split into tables. Writes are buffered and applied by
:meth:`Store.commit` in one write transaction, which the broker calls once per loop tick after
handling everything it drained (group commit); replies go out only after that commit.
:class:`MemoryStore` is the in-memory twin used by the embedded default and by unit tests.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import lmdb

from flowrra.errors import FlowrraError

log = logging.getLogger("flowrra.broker.store")


class Table(enum.StrEnum):
    """The store's tables (LMDB named databases)."""

    # Key layouts: broker/repository.py, the one module that reads and writes them.
    TASKS = "tasks"  # task id -> task record (msgpack)
    PAYLOADS = "payloads"  # task id -> packed arguments
    HISTORY = "history"  # task id, attempt -> how the attempt ended
    SCHEDULES = "schedules"  # schedule id -> its definition and slot state
    WORKFLOWS = "workflows"  # workflow id -> its steps and finished members
    QUEUE = "queue"  # queue order (8 bytes, big-endian) -> [task id, name, priority]
    LEASES = "leases"  # task id -> attempt number of the attempt in flight
    TIMERS = "timers"  # due_ms (8 bytes, big-endian) + task id -> b""
    EXPIRY = "expiry"  # expire_at_ms (8 bytes, big-endian) + task id -> b""
    # Tasks that ended FAILED (the dead-letter list), newest first:
    # (2**64 - 1 - expire_at_ms) (8 bytes, big-endian) + task id -> b""
    DEAD = "dead"
    META = "meta"  # store-wide values (the next queue order)


class Durability(enum.StrEnum):
    """How hard a commit tries to reach the disk."""

    FULL = "full"  # fsync every commit: survives a power cut
    FAST = "fast"  # no fsync: survives a killed process, not a crashed OS


class StoreError(FlowrraError):
    """A commit could not be written: none of its writes were applied, and what was
    committed before is intact and still readable. The buffered writes are kept until
    :meth:`Store.discard` (or a retried :meth:`Store.commit`)."""


class StoreFullError(StoreError):
    """The disk (or the configured maximum map size) is full."""


class Store(Protocol):
    """What the broker needs from storage."""

    def get(self, table: Table, key: bytes) -> bytes | None: ...
    def put(self, table: Table, key: bytes, value: bytes) -> None: ...
    def delete(self, table: Table, key: bytes) -> None: ...
    def unput(self, table: Table, key: bytes) -> bool:
        """Take back a buffered write of a key the store does not hold (a queue entry
        written and taken in one tick), so the commit neither writes nor deletes it; False
        if no write of it is buffered (it was committed meanwhile)."""
        ...

    def scan(
        self, table: Table, start: bytes = b"", stop: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Committed entries with ``start <= key < stop`` in key order."""
        ...

    @property
    def dirty(self) -> bool:
        """True when writes are waiting for :meth:`commit`."""
        ...

    def commit(self) -> None:
        """Apply all buffered writes atomically (safe to call from a worker thread)."""
        ...

    def discard(self) -> None:
        """Forget buffered writes (after a commit failed)."""
        ...

    def count(self, table: Table) -> int:
        """Committed entries in ``table``."""
        ...

    def release_pages(self) -> None:
        """Let go of the store pages that reads mapped into memory (the recovery scan, and
        the lookups of a deep queue), called after recovery and every few seconds."""
        ...

    def close(self) -> None: ...


# A buffered value: bytes, None for a delete, or (MemoryStore.put_object) a Python object.
_Pending = dict[tuple[Table, bytes], Any]


class _WriteBuffer:
    """The writes of one tick, kept until the store commits them in one transaction."""

    def __init__(self) -> None:
        self._pending: _Pending = {}

    def get(self, table: Table, key: bytes) -> bytes | None:
        pending = self._pending.get((table, key), _MISSING)
        if pending is _MISSING:
            return self._committed(table, key)
        if pending is None or type(pending) is bytes:
            return pending
        return self._encode(table, pending)

    def _committed(self, table: Table, key: bytes) -> bytes | None:
        raise NotImplementedError

    def _encode(self, table: Table, value: object) -> bytes:
        raise TypeError(f"{type(self).__name__} holds bytes only, not {type(value).__name__}")

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        self._pending[(table, key)] = value

    def delete(self, table: Table, key: bytes) -> None:
        self._pending[(table, key)] = None

    def unput(self, table: Table, key: bytes) -> bool:
        if self._pending.get((table, key)) is None:
            return False  # nothing buffered for it (or a delete, which must stay)
        del self._pending[(table, key)]
        return True

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def discard(self) -> None:
        self._pending = {}


class MemoryStore(_WriteBuffer):
    """The in-memory twin of :class:`LmdbStore`: same semantics, nothing survives a restart."""

    def __init__(self) -> None:
        super().__init__()
        # Values are bytes, or objects written with put_object to a table keep_objects named.
        self._tables: dict[Table, dict[bytes, Any]] = {t: {} for t in Table}
        self._encoders: dict[Table, Callable[[Any], bytes]] = {}

    def keep_objects(self, table: Table, encode: Callable[[Any], bytes]) -> None:
        """Let ``table`` hold immutable Python objects (:meth:`put_object`) instead of their
        encoding: nothing is encoded at each write or decoded at each read (the repository
        keeps task records so), and as no caller can change a stored value in place,
        :meth:`discard` still rolls a tick back. :meth:`get` and :meth:`scan` return
        ``encode(value)``: the bytes LMDB would hold."""
        self._encoders[table] = encode

    def put_object(self, table: Table, key: bytes, value: object) -> None:
        """Buffer a write of an immutable object to a table named by :meth:`keep_objects`."""
        assert table in self._encoders, f"{table} holds bytes only"
        self._pending[(table, key)] = value

    def get_object(self, table: Table, key: bytes) -> Any:
        """A key's value as it was written (an object or bytes), or None."""
        pending = self._pending.get((table, key), _MISSING)
        if pending is not _MISSING:
            return pending
        return self._tables[table].get(key)

    def _committed(self, table: Table, key: bytes) -> bytes | None:
        value = self._tables[table].get(key)
        if value is None or type(value) is bytes:
            return value
        return self._encode(table, value)

    def _encode(self, table: Table, value: object) -> bytes:
        return self._encoders[table](value)

    def scan(
        self, table: Table, start: bytes = b"", stop: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        data = self._tables[table]
        for key in sorted(k for k in data if k >= start and (stop is None or k < stop)):
            value = data[key]
            yield key, value if type(value) is bytes else self._encode(table, value)

    def commit(self) -> None:
        pending, self._pending = self._pending, {}
        tables = self._tables
        for (table, key), value in pending.items():
            if value is None:
                tables[table].pop(key, None)
            else:
                tables[table][key] = value

    def count(self, table: Table) -> int:
        return len(self._tables[table])

    def release_pages(self) -> None:
        pass  # nothing is mapped

    def close(self) -> None:
        self._pending.clear()


_MISSING: Any = object()
_MADV_DONTNEED = 4  # Linux
# LMDB's default maximum key size.
MAX_KEY_BYTES = 511

# The map is address space, not disk: start large and double when full.
_INITIAL_MAP_SIZE = 1 << 30
_MAX_MAP_SIZE = 1 << 40

# A failed commit counts as a full disk when the error says so, or when the file system has
# less than this left beyond what the commit needed: on a nearly full file system a short
# write comes back from LMDB as EIO ("mdb_txn_commit: Input/output error"), not ENOSPC.
_LOW_SPACE_BYTES = 1 << 20
_FULL_DISK_MESSAGES = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT))


class LmdbStore(_WriteBuffer):
    """The store in an LMDB environment under ``path``.

    :meth:`commit` raises :class:`StoreError` (:class:`StoreFullError` for a full disk or
    map) for every failed write, EIO and ENOSPC included, and the store stays usable: what
    was committed can still be read, and a later commit succeeds once the disk has room.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        durability: Durability = Durability.FULL,
        map_size: int = _INITIAL_MAP_SIZE,
        max_map_size: int = _MAX_MAP_SIZE,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = os.fspath(path)
        self.durability = durability
        self.max_map_size = max_map_size
        self._map_size = map_size
        self._reader: Any = None
        self._env = self._open_env()
        self._dbs = {t: self._env.open_db(t.value.encode()) for t in Table}
        super().__init__()

    def _open_env(self) -> Any:
        full = self.durability is Durability.FULL
        return lmdb.open(
            self.path,
            map_size=self._map_size,
            max_dbs=len(Table) + 1,
            sync=full,
            metasync=full,
            # One broker per data dir; readers do not need per-thread slots.
            max_readers=16,
            lock=True,
            # Index scans at start-up would otherwise fault in neighbouring task pages too
            # and inflate the broker's resident memory.
            readahead=False,
            # Never MDB_WRITEMAP, in either mode. With it, LMDB sizes data.mdb to the whole
            # map as a sparse file and writes pages through a shared mapping: when the disk
            # cannot back a page, the kernel kills the broker with SIGBUS instead of failing
            # the commit. Without it every page reaches the file by pwrite(), so a full or
            # failing disk is an error the broker survives (StoreError). Preallocating the
            # map instead would occupy the whole map (1 GiB, then 2, 4, ...) of real disk and
            # still not protect copy-on-write file systems. The cost in fast mode is a few
            # microseconds per commit: see docs/operations.md.
            writemap=False,
        )

    def _read_txn(self) -> Any:
        if self._reader is None:
            self._reader = self._env.begin(buffers=False)
        return self._reader

    def _end_read(self) -> None:
        if self._reader is not None:
            self._reader.abort()
            self._reader = None

    def _committed(self, table: Table, key: bytes) -> bytes | None:
        if not 0 < len(key) <= MAX_KEY_BYTES:
            return None  # LMDB could not hold such a key, so it holds no value for it
        return self._read_txn().get(key, db=self._dbs[table])  # type: ignore[no-any-return]

    def scan(
        self, table: Table, start: bytes = b"", stop: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        with self._env.begin(db=self._dbs[table], buffers=False) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start):
                return
            for key, value in cursor:
                if stop is not None and key >= stop:
                    return
                yield key, value

    def commit(self) -> None:
        """Write the buffered writes in one transaction, or raise :class:`StoreError` and
        keep them buffered (for :meth:`discard`, or another try)."""
        if not self._pending:
            return
        self._end_read()
        try:
            self._write(self._pending)
        except StoreError:
            raise
        except (lmdb.Error, OSError) as exc:
            # Any failure of the write transaction: LMDB aborted it, so nothing of it was
            # applied. ENOSPC, EIO from a short write, EDQUOT, a failed fsync, ...
            raise self._write_error(exc) from exc
        self._pending = {}

    def _write(self, pending: _Pending) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for (table, key), value in pending.items():
                        if value is None:
                            txn.delete(key, db=self._dbs[table])
                        else:
                            txn.put(key, value, db=self._dbs[table])
                return
            except lmdb.MapFullError:
                self._grow()

    def _write_error(self, exc: BaseException) -> StoreError:
        self._check_env()
        free = _free_bytes(self.path)
        where = self.path if free is None else f"{self.path} ({_human_bytes(free)} free)"
        needed = sum(len(key) + len(value or b"") for (_, key), value in self._pending.items())
        if (
            isinstance(exc, lmdb.DiskError)
            or any(message in str(exc) for message in _FULL_DISK_MESSAGES)
            or (free is not None and free < needed + _LOW_SPACE_BYTES)
        ):
            return StoreFullError(f"the disk under {where} is full: {exc}")
        return StoreError(f"could not write to the store at {where}: {exc}")

    def _check_env(self) -> None:
        """After a failed write: if LMDB flagged the environment as fatal (MDB_PANIC, when
        its meta page could not be written), every later transaction, reads included, would
        fail. Reopen it: what the last good meta page points to is intact."""
        try:
            self._env.begin().abort()
        except lmdb.PanicError:
            log.warning("reopening the LMDB environment at %s after a failed write", self.path)
            self._env.close()
            self._env = self._open_env()
            self._dbs = {t: self._env.open_db(t.value.encode()) for t in Table}

    def count(self, table: Table) -> int:
        entries: int = self._read_txn().stat(self._dbs[table])["entries"]
        return entries

    def release_pages(self) -> None:
        """Drop this process's page mappings of ``data.mdb`` (``madvise(MADV_DONTNEED)``).

        Reads map the pages they touch into the broker: recovery's scan of a deep queue's
        index, and the duplicate check of every submit, which over a million queued tasks
        touches most of the task table. Clean, read-only file pages, but counted in its RSS
        (with 1,000,000 queued tasks: 582 MB after queueing and 312 MB after a restart,
        against 144 and 91 MB released). They stay in the page cache and fault back in when
        read again. Linux only; elsewhere it does nothing.
        """
        data = os.path.realpath(os.path.join(self.path, "data.mdb"))
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open("/proc/self/maps") as maps:
                ranges = [line.split()[0] for line in maps if line.rstrip().endswith(" " + data)]
        except (OSError, AttributeError):
            return
        self._end_read()  # no reader holds on to a snapshot meanwhile
        for span in ranges:
            start, end = (int(part, 16) for part in span.split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)

    def _grow(self) -> None:
        size = self._env.info()["map_size"]
        if size >= self.max_map_size:
            raise StoreFullError(f"store at {self.path} reached its maximum size ({size} bytes)")
        new_size = min(size * 2, self.max_map_size)
        log.info("growing the LMDB map from %d to %d bytes", size, new_size)
        self._env.set_mapsize(new_size)
        self._map_size = new_size

    def close(self) -> None:
        self._end_read()
        self._env.close()


def _human_bytes(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            break
        count //= 1024
    return f"{count} {unit}"


def _free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def backup(data_dir: str | os.PathLike[str], destination: str | os.PathLike[str]) -> int:
    """Write a compacted, consistent copy of the store in ``data_dir`` to ``destination``.

    Safe while a broker is running on ``data_dir`` (LMDB readers never block the writer).
    Returns the size in bytes of the copy.
    """
    source = os.fspath(data_dir)
    if not os.path.exists(os.path.join(source, "data.mdb")):
        raise FileNotFoundError(f"no Flowrra store in {source}")
    target = os.fspath(destination)
    os.makedirs(target, exist_ok=True)
    if os.listdir(target):
        raise FileExistsError(f"{target} is not empty")
    env = lmdb.open(source, max_dbs=len(Table) + 1, readonly=True, lock=True)
    try:
        env.copy(target, compact=True)
    finally:
        env.close()
    return os.path.getsize(os.path.join(target, "data.mdb"))
