"""MemoryStore and LmdbStore share one contract; LMDB also persists and grows."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from flowrra.broker.store import Durability, LmdbStore, MemoryStore, Store, Table

MakeStore = Callable[[], Store]


@pytest.fixture(params=["memory", "lmdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else LmdbStore(tmp_path / "db")
    yield s
    s.close()


def test_get_missing(store: Store) -> None:
    assert store.get(Table.TASKS, b"nope") is None
    assert not store.dirty


def test_get_sees_pending_writes_before_commit(store: Store) -> None:
    store.put(Table.TASKS, b"k", b"v1")
    assert store.dirty
    assert store.get(Table.TASKS, b"k") == b"v1"
    store.put(Table.TASKS, b"k", b"v2")
    assert store.get(Table.TASKS, b"k") == b"v2"
    # ...but scan shows committed data only.
    assert list(store.scan(Table.TASKS)) == []


def test_commit_applies(store: Store) -> None:
    store.put(Table.TASKS, b"a", b"1")
    store.put(Table.META, b"a", b"meta")
    store.commit()
    assert not store.dirty
    assert store.get(Table.TASKS, b"a") == b"1"
    assert store.get(Table.META, b"a") == b"meta"
    assert store.get(Table.EXPIRY, b"a") is None  # tables are separate
    assert list(store.scan(Table.TASKS)) == [(b"a", b"1")]


def test_commit_with_nothing_pending(store: Store) -> None:
    store.commit()
    assert not store.dirty


def test_discard_forgets_pending_writes(store: Store) -> None:
    store.put(Table.TASKS, b"kept", b"1")
    store.commit()
    store.put(Table.TASKS, b"new", b"2")
    store.delete(Table.TASKS, b"kept")
    store.discard()
    assert not store.dirty
    assert store.get(Table.TASKS, b"new") is None
    assert store.get(Table.TASKS, b"kept") == b"1"
    store.commit()
    assert list(store.scan(Table.TASKS)) == [(b"kept", b"1")]


def test_delete(store: Store) -> None:
    store.put(Table.TASKS, b"a", b"1")
    store.put(Table.TASKS, b"b", b"2")
    store.commit()
    store.delete(Table.TASKS, b"a")
    assert store.dirty
    assert store.get(Table.TASKS, b"a") is None  # pending delete is visible to get
    assert list(store.scan(Table.TASKS)) == [(b"a", b"1"), (b"b", b"2")]  # not yet to scan
    store.commit()
    assert store.get(Table.TASKS, b"a") is None
    assert list(store.scan(Table.TASKS)) == [(b"b", b"2")]


def test_delete_of_a_missing_key_is_harmless(store: Store) -> None:
    store.delete(Table.TASKS, b"ghost")
    store.commit()
    assert store.get(Table.TASKS, b"ghost") is None


def test_put_then_delete_in_one_commit(store: Store) -> None:
    store.put(Table.TASKS, b"a", b"1")
    store.delete(Table.TASKS, b"a")
    assert store.get(Table.TASKS, b"a") is None
    store.commit()
    assert store.get(Table.TASKS, b"a") is None
    assert list(store.scan(Table.TASKS)) == []


def test_delete_then_put_in_one_commit(store: Store) -> None:
    store.put(Table.TASKS, b"a", b"1")
    store.commit()
    store.delete(Table.TASKS, b"a")
    store.put(Table.TASKS, b"a", b"2")
    store.commit()
    assert store.get(Table.TASKS, b"a") == b"2"


def test_scan_order_and_bounds(store: Store) -> None:
    keys = [b"b", b"a", b"c\x00", b"c", b"\x00", b"ab", b"\xff\xff", b"d"]
    for key in keys:
        store.put(Table.EXPIRY, key, key + b"!")
    store.commit()
    store.put(Table.EXPIRY, b"bb", b"uncommitted")

    assert [k for k, _ in store.scan(Table.EXPIRY)] == sorted(keys)
    assert all(v == k + b"!" for k, v in store.scan(Table.EXPIRY))
    assert [k for k, _ in store.scan(Table.EXPIRY, b"ab")] == [
        b"ab",
        b"b",
        b"c",
        b"c\x00",
        b"d",
        b"\xff\xff",
    ]
    assert [k for k, _ in store.scan(Table.EXPIRY, b"aa", b"c")] == [b"ab", b"b"]  # stop excluded
    assert [k for k, _ in store.scan(Table.EXPIRY, b"c", b"c\x00")] == [b"c"]
    assert list(store.scan(Table.EXPIRY, b"e", b"f")) == []
    assert list(store.scan(Table.EXPIRY, b"\xff\xff\xff")) == []  # start past the end
    assert list(store.scan(Table.EXPIRY, b"d", b"a")) == []  # stop before start
    assert list(store.scan(Table.TASKS)) == []


def test_scan_of_big_endian_time_keys_is_chronological(store: Store) -> None:
    times = [5, 300, 70_000, 1, 2**40]
    for t in times:
        store.put(Table.EXPIRY, t.to_bytes(8, "big") + b"task", b"")
    store.commit()
    got = [int.from_bytes(k[:8], "big") for k, _ in store.scan(Table.EXPIRY)]
    assert got == sorted(times)
    stop = (301).to_bytes(8, "big")
    assert [int.from_bytes(k[:8], "big") for k, _ in store.scan(Table.EXPIRY, b"", stop)] == [
        1,
        5,
        300,
    ]


# --------------------------------------------------------------------------- LMDB only


@pytest.mark.parametrize("durability", list(Durability))
def test_lmdb_data_survives_close_and_reopen(tmp_path: Path, durability: Durability) -> None:
    path = tmp_path / "db"
    first = LmdbStore(path, durability)
    first.put(Table.TASKS, b"kept", b"yes")
    first.put(Table.META, b"schema", b"1")
    first.commit()
    first.put(Table.TASKS, b"lost", b"never committed")
    first.close()

    second = LmdbStore(path, durability)
    try:
        assert second.get(Table.TASKS, b"kept") == b"yes"
        assert second.get(Table.META, b"schema") == b"1"
        assert second.get(Table.TASKS, b"lost") is None
        assert list(second.scan(Table.TASKS)) == [(b"kept", b"yes")]
    finally:
        second.close()


def test_lmdb_reads_after_a_commit_see_the_new_data(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db")
    try:
        store.put(Table.TASKS, b"k", b"1")
        store.commit()
        assert store.get(Table.TASKS, b"k") == b"1"  # opens a read transaction
        store.put(Table.TASKS, b"k", b"2")
        store.commit()
        assert store.get(Table.TASKS, b"k") == b"2"  # not the old snapshot
        store.delete(Table.TASKS, b"k")
        store.commit()
        assert store.get(Table.TASKS, b"k") is None
    finally:
        store.close()


def test_lmdb_map_grows_instead_of_failing(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db", Durability.FAST, map_size=64 * 1024)
    try:
        initial = store._env.info()["map_size"]
        value = b"x" * 1000
        for i in range(2000):  # ~2 MB in one commit, far more than the initial map
            store.put(Table.TASKS, i.to_bytes(4, "big"), value)
        store.commit()
        assert store._env.info()["map_size"] > initial
        for batch in range(3):  # and growing again later, across several commits
            for i in range(500):
                store.put(Table.EXPIRY, (batch * 500 + i).to_bytes(4, "big"), value * 4)
            store.commit()
        assert sum(1 for _ in store.scan(Table.TASKS)) == 2000
        assert sum(1 for _ in store.scan(Table.EXPIRY)) == 1500
        assert store.get(Table.TASKS, (1999).to_bytes(4, "big")) == value
    finally:
        store.close()
    reopened = LmdbStore(tmp_path / "db", Durability.FAST, map_size=64 * 1024)
    try:
        assert sum(1 for _ in reopened.scan(Table.TASKS)) == 2000
    finally:
        reopened.close()


@pytest.mark.parametrize("durability", list(Durability))
def test_lmdb_data_file_grows_with_use_not_to_the_map_size(
    tmp_path: Path, durability: Durability
) -> None:
    # No MDB_WRITEMAP: the file is not a sparse file of the whole map, whose pages the disk
    # may fail to back later (SIGBUS), but grows by written pages (see docs/operations.md).
    store = LmdbStore(tmp_path / "db", durability)
    try:
        store.put(Table.TASKS, b"k", b"v" * 50_000)
        store.commit()
        assert os.path.getsize(tmp_path / "db" / "data.mdb") < 1 << 20
    finally:
        store.close()


def test_lmdb_opens_a_store_written_through_the_map(tmp_path: Path) -> None:
    # Fast mode used MDB_WRITEMAP before: its data directories (data.mdb a sparse file of the
    # whole map) open and take writes as they are.
    path = tmp_path / "db"
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=len(Table) + 1, writemap=True)
    with env.begin(write=True) as txn:
        txn.put(b"old", b"1", db=env.open_db(Table.TASKS.value.encode(), txn=txn))
    env.close()
    store = LmdbStore(path, Durability.FAST)
    try:
        assert store.get(Table.TASKS, b"old") == b"1"
        store.put(Table.TASKS, b"new", b"2")
        store.commit()
        assert list(store.scan(Table.TASKS)) == [(b"new", b"2"), (b"old", b"1")]
    finally:
        store.close()
