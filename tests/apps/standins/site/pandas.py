"""A stand-in for ``pandas.read_csv`` as the guide uses it: ``len(pd.read_csv(path))``.

Importable as ``pandas`` only while a test puts this directory on ``sys.path`` (and real
pandas is not installed); see ``tests/apps/standins/__init__.py``.
"""

from __future__ import annotations

import csv
from typing import Any

__version__ = "0+flowrra-standin"


class DataFrame:
    """Rows of a CSV file under its header: just enough for ``len(df)`` and ``df.columns``."""

    def __init__(self, columns: list[str], rows: list[list[str]]) -> None:
        self.columns = columns
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def to_dict(self, orient: str = "records") -> list[dict[str, Any]]:
        if orient != "records":
            raise ValueError("the stand-in supports orient='records' only")
        return [dict(zip(self.columns, row, strict=True)) for row in self._rows]


def read_csv(path: str) -> DataFrame:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [row for row in reader if row]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"line {number}: expected {len(header)} fields, got {len(row)}")
    return DataFrame(header, rows)
