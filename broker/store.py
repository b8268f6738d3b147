"""The broker's durable state: one module owns LMDB.

The store is an ordered key-value space split into tables. Writes are buffered and applied by
:meth:`Store.commit` in one write transaction, which the broker calls once per loop tick after
handling everything it drained (group commit); replies go out only after that commit.
:class:`MemoryStore` is the in-memory twin used by the embedded default and by unit tests.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

import lmdb

log = logging.getLogger("flowrra.broker.store")


class Table(enum.StrEnum):
    """The store's tables (LMDB named databases)."""

    TASKS = "tasks"  # task id -> task record (msgpack)
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


class StoreFullError(Exception):
    """The disk (or the configured maximum map size) is full."""


class Store(Protocol):
    """What the broker needs from storage."""

    def get(self, table: Table, key: bytes) -> bytes | None: ...
    def put(self, table: Table, key: bytes, value: bytes) -> None: ...
    def delete(self, table: Table, key: bytes) -> None: ...

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

    def close(self) -> None: ...


_Pending = dict[tuple[Table, bytes], bytes | None]


class _WriteBuffer:
    """The writes of one tick, kept until the store commits them in one transaction."""

    def __init__(self) -> None:
        self._pending: _Pending = {}

    def get(self, table: Table, key: bytes) -> bytes | None:
        pending = self._pending.get((table, key), _MISSING)
        if pending is not _MISSING:
            return pending  # type: ignore[no-any-return]
        return self._committed(table, key)

    def _committed(self, table: Table, key: bytes) -> bytes | None:
        raise NotImplementedError

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        self._pending[(table, key)] = value

    def delete(self, table: Table, key: bytes) -> None:
        self._pending[(table, key)] = None

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def discard(self) -> None:
        self._pending = {}


class MemoryStore(_WriteBuffer):
    """The in-memory twin of :class:`LmdbStore`: same semantics, nothing survives a restart."""

    def __init__(self) -> None:
        super().__init__()
        self._tables: dict[Table, dict[bytes, bytes]] = {t: {} for t in Table}

    def _committed(self, table: Table, key: bytes) -> bytes | None:
        return self._tables[table].get(key)

    def scan(
        self, table: Table, start: bytes = b"", stop: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        data = self._tables[table]
        for key in sorted(k for k in data if k >= start and (stop is None or k < stop)):
            yield key, data[key]

    def commit(self) -> None:
        pending, self._pending = self._pending, {}
        for (table, key), value in pending.items():
            if value is None:
                self._tables[table].pop(key, None)
            else:
                self._tables[table][key] = value

    def count(self, table: Table) -> int:
        return len(self._tables[table])

    def close(self) -> None:
        self._pending.clear()


_MISSING: Any = object()
# LMDB's default maximum key size.
MAX_KEY_BYTES = 511

# The map is address space, not disk: start large and double when full.
_INITIAL_MAP_SIZE = 1 << 30
_MAX_MAP_SIZE = 1 << 40


class LmdbStore(_WriteBuffer):
    """The store in an LMDB environment under ``path``."""

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
        self._env = lmdb.open(
            self.path,
            map_size=map_size,
            max_dbs=len(Table) + 1,
            sync=durability is Durability.FULL,
            metasync=durability is Durability.FULL,
            # One broker per data dir; readers do not need per-thread slots.
            max_readers=16,
            lock=True,
            # Index scans at start-up would otherwise fault in neighbouring task pages too
            # and inflate the broker's resident memory.
            readahead=False,
            # In fast mode a commit then only touches memory (no pwrite per dirty page): the
            # pages still reach the disk through the page cache, so a killed broker loses
            # nothing. Full mode keeps LMDB's default, where its own writes precede the fsync.
            writemap=durability is Durability.FAST,
        )
        self._dbs = {t: self._env.open_db(t.value.encode()) for t in Table}
        self._reader: Any = None
        super().__init__()

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
        if not self._pending:
            return
        self._end_read()
        pending = self._pending
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for (table, key), value in pending.items():
                        if value is None:
                            txn.delete(key, db=self._dbs[table])
                        else:
                            txn.put(key, value, db=self._dbs[table])
                break
            except lmdb.MapFullError:
                self._grow()
            except lmdb.DiskError as exc:
                raise StoreFullError(f"the disk under {self.path} is full: {exc}") from exc
        self._pending = {}

    def count(self, table: Table) -> int:
        entries: int = self._read_txn().stat(self._dbs[table])["entries"]
        return entries

    def _grow(self) -> None:
        size = self._env.info()["map_size"]
        if size >= self.max_map_size:
            raise StoreFullError(f"store at {self.path} reached its maximum size ({size} bytes)")
        log.info("growing the LMDB map from %d to %d bytes", size, size * 2)
        self._env.set_mapsize(min(size * 2, self.max_map_size))

    def sync(self) -> None:
        """Flush to disk (useful in fast mode before a planned shutdown)."""
        self._env.sync(True)

    def close(self) -> None:
        self._end_read()
        self._env.close()


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
