"""Task functions the process-pool tests run inside worker processes."""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any


def echo(*args: Any, **kwargs: Any) -> list[Any]:
    return [list(args), kwargs]


def add(a: int, b: int) -> int:
    return a + b


def shift_day(when: dt.datetime, blob: bytes) -> dict[str, Any]:
    return {"when": when + dt.timedelta(days=1), "blob": blob[::-1], "size": len(blob)}


def getpid() -> int:
    return os.getpid()


def burn(cpu_seconds: float) -> list[Any]:
    """Spin until this process has used ``cpu_seconds`` of CPU; report pid and wall interval."""
    started = time.monotonic()
    deadline = time.process_time() + cpu_seconds
    n = 0
    while time.process_time() < deadline:
        n += 1
    return [os.getpid(), started, time.monotonic()]


def spin_forever() -> None:
    while True:
        pass


def fail(message: str) -> None:
    raise ValueError(message)


class Nested:
    class Boom(Exception):
        pass

    @staticmethod
    def explode() -> None:
        raise Nested.Boom("nested boom")


def unencodable() -> object:
    return {1, 2, 3}


def hard_exit(code: int) -> None:
    os._exit(code)


CONSTANT = 42  # not callable: resolving it must fail cleanly
