"""After recovery's scan of a deep queue, the broker lets go of the store pages it mapped in
(LmdbStore.release_pages): they leave its resident memory and still read back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from flowrra.broker.store import LmdbStore, Table

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _mapped_kb(data: str) -> int:
    """Resident kB of this process's mappings of ``data`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                inside = line.rstrip().endswith(" " + data)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_release_pages_drops_the_mapped_store_and_reads_still_work(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "db")
    try:
        for i in range(20_000):
            store.put(Table.QUEUE, i.to_bytes(8, "big"), os.urandom(64))
        store.commit()
        data = os.path.realpath(tmp_path / "db" / "data.mdb")
        scanned = sum(1 for _ in store.scan(Table.QUEUE))
        assert scanned == 20_000
        before = _mapped_kb(data)
        assert before > 1000, f"the scan mapped only {before} kB: the test tests nothing"
        store.release_pages()
        assert _mapped_kb(data) < before / 10
        assert store.get(Table.QUEUE, (19_999).to_bytes(8, "big")) is not None
        assert sum(1 for _ in store.scan(Table.QUEUE)) == 20_000
    finally:
        store.close()
