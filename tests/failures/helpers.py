"""Small helpers shared by the failure tests (processes come from ``tests/conftest.py``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from flowrra import Flowrra


async def counter(app: Flowrra, name: str) -> int:
    """One of the broker's ``status`` counters (0 until it first counts)."""
    status = await app.admin("status")
    return int(status["counters"].get(name, 0))


async def eventually(
    probe: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll an async predicate every 20 ms until it holds (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)
